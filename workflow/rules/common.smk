# Shared by every rule: how a stage is invoked and which code it runs.

# Resources of the stages that use the GPU: `gpu=1` asks a cluster executor for a card
# per job (profiles/slurm); `gpu_jobs=1` is one of the jobs that share one card on a
# single machine: `snakemake --cores 16 --resources gpu_jobs=6` runs up to six of them
# at once on it (small networks leave a GPU idle; tools/gpu_window.sh). Without
# --resources, neither limits a local run: --cores does.

# `python -m pipeline_src <stage>` for the selected profile; stdout and stderr
# go to the terminal and to the rule's log.
def stage_command(stage, method=False):
    per_method = " --method {wildcards.method}" if method else ""
    return f"python -m pipeline_src {stage} --profile {PROFILE}{per_method} --log {{log}}"


# The package files each stage runs: editing one reruns the stages that use it.
CORE_CODE = [
    "pipeline_src/__main__.py",
    "pipeline_src/cli.py",
    "pipeline_src/config.py",
    "pipeline_src/io.py",
    "pipeline_src/paths.py",
    "workflow/schemas/params.schema.yaml",
]
MODEL_CODE = [
    "pipeline_src/models/activations.py",
    "pipeline_src/models/architectures.py",
]
CODE = {
    "data": CORE_CODE + ["pipeline_src/data/cifar.py"],
    "vanilla": CORE_CODE + MODEL_CODE + [
        "pipeline_src/data/cifar.py",
        "pipeline_src/data/loader.py",
        "pipeline_src/training/common.py",
        "pipeline_src/training/vanilla.py",
    ],
    "svd": CORE_CODE + MODEL_CODE + [
        "pipeline_src/spectral/operator_norm.py",
        "pipeline_src/spectral/svd_export.py",
    ],
}
BOUND_CODE = MODEL_CODE + [
    "pipeline_src/bounds/bcp.py",
    "pipeline_src/bounds/gloro.py",
    "pipeline_src/bounds/ibp.py",
    "pipeline_src/bounds/lipschitz.py",
    "pipeline_src/bounds/local.py",
    "pipeline_src/spectral/operator_norm.py",
    "pipeline_src/certify/certifiers.py",
]
METHOD_CODE = [
    "pipeline_src/methods/__init__.py",
    "pipeline_src/methods/base.py",
    "pipeline_src/methods/bcp.py",
    "pipeline_src/methods/duet.py",
    "pipeline_src/methods/duet_local.py",
    "pipeline_src/methods/gloro.py",
    "pipeline_src/methods/lmt.py",
    "pipeline_src/methods/localbcp.py",
    "pipeline_src/spectral/rotation.py",
]
EVAL_CODE = CORE_CODE + BOUND_CODE + METHOD_CODE + [
    "pipeline_src/models/loading.py",
    "pipeline_src/data/cifar.py",
    "pipeline_src/data/loader.py",
    "pipeline_src/training/common.py",
    "pipeline_src/certify/stage.py",
]
# Duet's training also reads the SVD export's factors.
CODE["train"] = EVAL_CODE + ["pipeline_src/training/certified.py", "pipeline_src/spectral/svd_export.py"]
CODE["certify"] = EVAL_CODE
CODE["pgd"] = EVAL_CODE + ["pipeline_src/certify/attack.py"]
CODE["similarity"] = EVAL_CODE + ["pipeline_src/certify/similarity.py"]
REPORT_CODE = CORE_CODE + [
    "pipeline_src/report/__init__.py",
    "pipeline_src/report/collect.py",
    "pipeline_src/report/paper.py",
    "pipeline_src/report/stage.py",
    "pipeline_src/report/tables.py",
]
CODE["tables"] = REPORT_CODE
CODE["figures"] = REPORT_CODE + ["pipeline_src/report/figures.py"]
CODE["report"] = CODE["figures"] + ["pipeline_src/report/document.py"]
CODE["benchmark"] = EVAL_CODE + ["pipeline_src/benchmark.py", "pipeline_src/spectral/svd_export.py"]
CODE["report"] = CODE["report"] + ["pipeline_src/benchmark.py"]
