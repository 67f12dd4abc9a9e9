rule svd:
    """Offline SVD of every vanilla layer: factors, ranks, operator norms."""
    conda:
        "../envs/pipeline.yaml"
    input:
        code=CODE["svd"],
        model=LAYOUT.vanilla_model,
    output:
        factors=LAYOUT.svd_factors,
        summary=LAYOUT.svd_summary,
    params:
        model=P["model"],
        svd=P["svd"],
        run=P["run"],
    log:
        LAYOUT.log("svd"),
    benchmark:
        LAYOUT.benchmark("svd")
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        stage_command("svd")
