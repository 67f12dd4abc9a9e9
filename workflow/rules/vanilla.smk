rule vanilla:
    """Cross-entropy pretraining of the vanilla (guide) model."""
    conda:
        "../envs/pipeline.yaml"
    input:
        code=CODE["vanilla"],
        cache=LAYOUT.data_cache,
    output:
        model=LAYOUT.vanilla_model,
        history=LAYOUT.vanilla_history,
        metrics=LAYOUT.vanilla_metrics,
    params:
        run=P["run"],
        model=P["model"],
        vanilla=P["vanilla"],
        # Its metrics include the accuracy on the certified test subset (Table 2's vanilla row).
        certify__test_images=P["certify"]["test_images"],
    log:
        LAYOUT.log("vanilla"),
    benchmark:
        LAYOUT.benchmark("vanilla")
    resources:
        gpu=1,
        gpu_jobs=1,
        mem_mb=16000,
        runtime=240,
    shell:
        stage_command("vanilla")
