# The Duet reproduction DAG. The paper's configuration is params.yaml; a run
# profile overrides it: `snakemake --cores 1 all --config profile=smoke`.
# dvc.yaml files are generated from this workflow (`python -m pipeline_src
# export-dvc`); a test fails when they drift apart.
import re
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from snakemake.exceptions import WorkflowError

from pipeline_src.config import ParamsError, load_params, read_base_params
from pipeline_src.runs import method_runs, runs_to_train
from pipeline_src.paths import RunLayout, benchmark_outputs, control_outputs


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


PROFILE = config.get("profile", "paper")
# The project this Snakefile is in (not the one a pipeline_src already imported belongs to).
ROOT = Path(workflow.basedir)
try:
    # Stages read params from the files, never from --config: only `profile` may be set there.
    extra = {k: v for k, v in config.items() if k != "profile" and read_base_params(ROOT).get(k) != v}
    if extra:
        raise ParamsError(f"--config/--configfile: {', '.join(sorted(extra))} set on the command line; only "
                          "'profile' is read there: select a profile with `--config profile=<name>` (not "
                          "`--configfile config/<name>/params.yaml`) and set every other key in params.yaml or "
                          "the profile's file")
    P = load_params(PROFILE, ROOT)
except ParamsError as err:
    raise WorkflowError(f"invalid params: {err}")
LAYOUT = RunLayout.of(P)
RUNS = method_runs(P)  # {run name: CertifiedRun(method, params block, seed, group)}
# The runs this DAG trains: all but `committed_runs`, whose committed metrics files the
# report stages read as plain inputs. No per-run rule can match a committed run's files,
# so their missing weights are never rebuilt.
TRAIN_RUNS = runs_to_train(P)


wildcard_constraints:
    method="|".join(re.escape(name) for name in TRAIN_RUNS) or "(?!)",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/vanilla.smk"
include: "workflow/rules/svd.smk"
include: "workflow/rules/certified.smk"
include: "workflow/rules/controls.smk"
include: "workflow/rules/compose.smk"
include: "workflow/rules/report.smk"


# Every output of every job, intermediate ones included: a file that is missing (a
# model.pt lost when a `--forcerun` run was killed) is rebuilt, and what depends on it
# reruns by modification time, instead of "Nothing to be done" beside stale tables.
rule all:
    input:
        rules.data.output,
        rules.vanilla.output,
        rules.svd.output,
        *(expand(rule.output, method=TRAIN_RUNS) for rule in (rules.train, rules.certify, rules.pgd,
                                                              rules.similarity)),
        expand(rules.compose.output, method=COMPOSE_RUNS),
        *([rules.vanilla_control.output] if CONTROLS else []),
        list(CONTROLS.values()),  # Table 1's control rows (similarity.controls)
        BENCHMARK_OUTPUTS,
        rules.tables.output,
        rules.figures.output,
        rules.report.output,
    default_target: True


# Snakemake and DVC share results/ (docs/runners.md): a successful run records the lock
# entries of its jobs for `dvc repro` (when DVC is installed).
onsuccess:
    from pipeline_src.dag import record_snakemake_jobs_for_dvc
    from pipeline_src.snakemake_adapter import dag_jobs

    record_snakemake_jobs_for_dvc(dag_jobs(workflow), PROFILE, ROOT)


onerror:
    print(f"\nThe run stopped before every job finished; what finished is kept. To go on, run the same "
          f"command again; if Snakemake says the directory is locked (no other Snakemake running): "
          f"`snakemake --unlock --config profile={PROFILE}`, then the command with --rerun-incomplete. "
          f"A killed training resumes from its checkpoint. See docs/runners.md.", file=sys.stderr)
