# Certify or predict (beyond the paper, issue 22): each trained run of `compose.methods`
# composed with the vanilla guide at every tau of `compose.taus`, with the guide's controls in
# its place, tau chosen on validation against the reference run of the same seed; the
# composite attacked and every certified point cross-checked (pipeline_src/certify/compose.py).

COMPOSE_RUNS = compose_runs_to_train(P)


rule compose:
    """Certify or predict: the run composed with the vanilla guide, its tau curve and attack."""
    conda:
        "../envs/pipeline.yaml"
    input:
        unpack(compose_inputs),
    output:
        metrics=LAYOUT.compose("{method}", "metrics.json"),
    params:
        run=P["run"],
        model=P["model"],  # the untrained control is the vanilla model's initialisation
        certify=P["certify"],
        pgd=P["pgd"],
        compose=P["compose"],
    log:
        LAYOUT.log("compose_{method}"),
    benchmark:
        LAYOUT.benchmark("compose_{method}")
    resources:
        gpu=1,
        gpu_jobs=1,
        mem_mb=8000,
        runtime=60,
    shell:
        stage_command("compose", method=True)
