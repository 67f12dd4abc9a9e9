# Shared by every rule: how a stage is invoked and which code it runs.

# `python -m pipeline_src <stage>` for the selected profile; stdout and stderr
# go to the terminal and to the rule's log.
def stage_command(stage):
    return f"python -m pipeline_src {stage} --profile {PROFILE} --log {{log}}"


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
