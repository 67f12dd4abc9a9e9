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


# The package files each stage runs, derived from the imports of its code
# (pipeline_src/code_deps.py: the stage's handler in cli and everything it imports,
# at module level or inside functions): editing one reruns the stages that run it.
from pipeline_src.cli import STAGES, TOOLS
from pipeline_src.code_deps import stage_code

CODE = {name: stage_code(handler.__name__) for name, (handler, _) in {**STAGES, **TOOLS}.items()}


# Input functions of the rules (`snakemake --lint`: functions live here, rules in their files).
from pipeline_src.dag import data_inputs
from pipeline_src.runs import (METHOD_FACTS, compose_reference_run, compose_runs, compose_runs_to_train,
                               trains_with_guide)


def data_source(wildcards):
    """What the data stage reads (`dag.data_inputs`). An archive whose sha256 the params pin
    (`data.sha256`) is known by its hash, which the stage checks: a newer mtime alone (the
    archive touched or copied again) does not rerun the chain (`ancient`); a new hash in the
    params does. Without a pinned hash, replacing the archive at its path reruns the stage."""
    paths = data_inputs(P["data"])
    return [ancient(path) for path in paths] if P["data"].get("sha256") else paths


def train_inputs(wildcards):
    """A method with Duet's similarity term (Duet, Duet-local) also reads the vanilla
    model and its SVD factors (not with `guide: untrained`); one that reads the guide as a
    teacher, or a run that starts from it (`init_from: vanilla_unit_norm`), the vanilla model."""
    inputs = {"code": CODE["train"], "cache": LAYOUT.data_cache}
    run = RUNS[wildcards.method]
    if trains_with_guide(run):
        inputs.update(vanilla=LAYOUT.vanilla_model)
        if METHOD_FACTS[run.method].similarity_term:
            inputs.update(factors=LAYOUT.svd_factors)
    return inputs


def compose_inputs(wildcards):
    """The run's weights, the guide and the controls in h's place, and the reference run's
    training metrics (its validation certified accuracy, committed or trained)."""
    guides = {"vanilla": LAYOUT.vanilla_model, "vanilla_control": LAYOUT.vanilla_control("model.pt")}
    return {"code": CODE["compose"], "cache": LAYOUT.data_cache,
            "model": LAYOUT.train(wildcards.method, "model.pt"),
            **{name: guides[name] for name in P["compose"]["guides"] if name in guides},
            "reference": LAYOUT.train(compose_reference_run(P, wildcards.method), "metrics.json")}


def run_metrics(wildcards):
    """The metrics files of every run, and what the tables' context comes from."""
    per_run = lambda name: expand(name, method=RUNS)  # noqa: E731
    return {
        "provenance": LAYOUT.data_provenance,
        "vanilla": LAYOUT.vanilla_metrics,
        "svd": LAYOUT.svd_summary,
        "train": per_run(LAYOUT.train("{method}", "metrics.json")),
        "history": per_run(LAYOUT.train("{method}", "history.csv")),
        "certify": per_run(LAYOUT.certify("{method}", "metrics.json")),
        "pgd": per_run(LAYOUT.attack("{method}", "metrics.json")),
        "similarity": per_run(LAYOUT.similarity("{method}", "metrics.json")),
        "compose": [LAYOUT.compose(name, "metrics.json") for name in compose_runs(P)],
        "controls": list(CONTROLS.values()),
        "timing": BENCHMARK_OUTPUTS,
    }
