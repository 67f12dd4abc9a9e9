# Certified training, certification, the attack cross-check and the rotation
# similarity, one job per run of RUNS: every method in `methods`, and every
# point of Duet's ablation grid (runs.method_runs). The rule param `method`
# carries the run's params block (dvc.yaml maps it to the method's key).

rule train:
    """Certified training of one method; model selected on validation."""
    conda:
        "../envs/pipeline.yaml"
    input:
        unpack(train_inputs),
    output:
        model=LAYOUT.train("{method}", "model.pt"),
        history=LAYOUT.train("{method}", "history.csv"),
        metrics=LAYOUT.train("{method}", "metrics.json"),
    params:
        method=lambda wildcards: RUNS[wildcards.method].config,
        run=P["run"],
        model=P["model"],
        certify=P["certify"],
    log:
        LAYOUT.log("train_{method}"),
    benchmark:
        LAYOUT.benchmark("train_{method}")
    resources:
        gpu=1,
        gpu_jobs=1,
        mem_mb=16000,
        runtime=600,
    shell:
        stage_command("train", method=True)


rule certify:
    """Sound certification of the test set with every certifier that applies."""
    conda:
        "../envs/pipeline.yaml"
    input:
        code=CODE["certify"],
        cache=LAYOUT.data_cache,
        model=LAYOUT.train("{method}", "model.pt"),
    output:
        metrics=LAYOUT.certify("{method}", "metrics.json"),
        certified=LAYOUT.certify("{method}", "certified.pt"),
    params:
        run=P["run"],
        certify=P["certify"],
    log:
        LAYOUT.log("certify_{method}"),
    benchmark:
        LAYOUT.benchmark("certify_{method}")
    resources:
        gpu=1,
        gpu_jobs=1,
        mem_mb=8000,
        runtime=60,
    shell:
        stage_command("certify", method=True)


rule pgd:
    """l2 PGD and APGD; fails if an attack breaks a certified point."""
    conda:
        "../envs/pipeline.yaml"
    input:
        code=CODE["pgd"],
        cache=LAYOUT.data_cache,
        model=LAYOUT.train("{method}", "model.pt"),
        certified=LAYOUT.certify("{method}", "certified.pt"),
    output:
        metrics=LAYOUT.attack("{method}", "metrics.json"),
    params:
        run=P["run"],
        certify=P["certify"],
        pgd=P["pgd"],
    log:
        LAYOUT.log("pgd_{method}"),
    benchmark:
        LAYOUT.benchmark("pgd_{method}")
    resources:
        gpu=1,
        gpu_jobs=1,
        mem_mb=8000,
        runtime=120,
    shell:
        stage_command("pgd", method=True)


rule similarity:
    """Rotation similarity to the vanilla model and Lipschitz product (Table 1)."""
    conda:
        "../envs/pipeline.yaml"
    input:
        code=CODE["similarity"],
        model=LAYOUT.train("{method}", "model.pt"),
        vanilla=LAYOUT.vanilla_model,
        certified=LAYOUT.certify("{method}", "metrics.json"),
    output:
        metrics=LAYOUT.similarity("{method}", "metrics.json"),
    params:
        run=P["run"],
        duet=P["duet"],
    log:
        LAYOUT.log("similarity_{method}"),
    benchmark:
        LAYOUT.benchmark("similarity_{method}")
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        stage_command("similarity", method=True)
