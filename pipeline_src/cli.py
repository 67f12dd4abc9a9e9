"""`python -m pipeline_src <stage> --profile <name>`: every stage of the DAG as
a plain command, so it runs where neither Snakemake nor DVC is installed."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import PAPER_PROFILE, PROJECT_ROOT, ParamsError, load_params
from .dag import record_dvc_stage_for_snakemake
from .errors import StageError
from .runs import committed_seeds, method_runs
from .stage_header import stage_header

# Each handler imports its stage's code inside itself, on purpose: a rule's code inputs are
# the import closure of its handler (code_deps.py, docs/dag.md "Code inputs"), so an import
# moved to the top of this module would become a code input of every stage, and make each
# stage's start-up pay for every other stage's modules.


def _stage_data(params: dict, root: Path, args) -> None:
    from .data.cifar import build_cache
    from .paths import RunLayout

    layout = RunLayout.of(params)
    cache = build_cache(params["data"], root / layout.data_cache, root / layout.data_provenance, root)
    note = cache.provenance["note"]
    print(f"[data] {cache.provenance['source']}: {len(cache.train_y)} train / {len(cache.val_y)} val / "
          f"{len(cache.test_y)} test images ({note})")


def _stage_vanilla(params: dict, root: Path, args) -> None:
    from .training.vanilla import train_vanilla

    train_vanilla(params, root)


def _stage_svd(params: dict, root: Path, args) -> None:
    from .spectral.svd_export import export_svd
    from .training.vanilla_checks import check_guide

    export_svd(params, root, check_guide)


def _stage_train(params: dict, root: Path, args) -> None:
    from .training.certified import train_certified

    train_certified(params, args.method, root)


def _stage_certify(params: dict, root: Path, args) -> None:
    from .certify.stage import certify_model

    certify_model(params, args.method, root)


def _stage_pgd(params: dict, root: Path, args) -> None:
    from .certify.attack import attack_model

    attack_model(params, args.method, root)


def _benchmark(params: dict, root: Path, args) -> None:
    from .benchmark import benchmark, benchmark_depth
    from .runs import benchmark_archs, benchmark_methods

    cfg = params["benchmark"]
    methods = args.methods or benchmark_methods(params)
    archs = args.archs or benchmark_archs(params)
    steps = args.steps or cfg["steps"]
    warmup = cfg["warmup_steps"] if args.warmup_steps is None else args.warmup_steps
    if len(archs) > 1:
        if args.duet_ranks or args.compile:
            raise ParamsError("benchmark: --duet-ranks and --compile with one architecture at a time")
        benchmark_depth(params, root, methods, archs, warmup, steps)
    else:
        benchmark(params, root, methods, archs[0], warmup, steps, args.duet_ranks, args.compile)


def _stage_compose(params: dict, root: Path, args) -> None:
    from .certify.compose import compose_run

    compose_run(params, args.method, root)


def _stage_similarity(params: dict, root: Path, args) -> None:
    from .certify.similarity import similarity_metrics

    similarity_metrics(params, args.method, root)


def _stage_vanilla_control(params: dict, root: Path, args) -> None:
    from .training.vanilla import train_vanilla_control

    train_vanilla_control(params, root)


def _stage_similarity_control(params: dict, root: Path, args) -> None:
    from .certify.similarity import similarity_controls

    similarity_controls(params, root)


def _stage_tables(params: dict, root: Path, args) -> None:
    from .report.tables import make_tables

    make_tables(params, root)


def _stage_figures(params: dict, root: Path, args) -> None:
    from .report.figures import make_figures

    make_figures(params, root)


def _stage_report(params: dict, root: Path, args) -> None:
    from .report.document import make_report

    make_report(params, root)


def _export_dvc(params: dict, root: Path, args) -> None:
    from .dag import write_dvc_yaml

    for path in write_dvc_yaml(root, profiles=args.profiles):
        print(f"[export-dvc] wrote {path.relative_to(root).as_posix()}")


def _fit_epochs(params: dict, root: Path, args) -> None:
    from .schedule_fit import fit_epochs

    fit_epochs(params, root, args.method, args.seconds)


def _check_params(params: dict, root: Path, args) -> None:
    print(f"[check-params] profile '{params['profile']}': params valid")


def _make_sample(params: dict, root: Path, args) -> None:
    from .data.cifar import SAMPLE_ARCHIVE
    from .data.sample import cut_sample

    digest = cut_sample(Path(args.source), SAMPLE_ARCHIVE)
    print(f"[make-sample] wrote {SAMPLE_ARCHIVE.relative_to(root).as_posix()} sha256 {digest}; "
          "pin it in data/cifar.py SAMPLE_SHA256")


STAGES = {
    "data": (_stage_data, "build the CIFAR-10 cache (uint8 tensors, splits, provenance)"),
    "vanilla": (_stage_vanilla, "pretrain the vanilla (guide) model with cross-entropy"),
    "svd": (_stage_svd, "export the SVD factors and operator norms of the vanilla model"),
    "train": (_stage_train, "certified training of one method (--method)"),
    "certify": (_stage_certify, "certify the test set of one trained method (--method)"),
    "pgd": (_stage_pgd, "attack one trained method and cross-check its certificates (--method)"),
    "compose": (_stage_compose, "certify or predict: one trained run composed with the vanilla guide (--method)"),
    "similarity": (_stage_similarity, "rotation similarity of one trained method to the vanilla model"),
    "vanilla_control": (_stage_vanilla_control,
                        "Table 1's control: a second vanilla model, the same recipe from another seed"),
    "similarity_control": (_stage_similarity_control,
                           "Table 1's control rows: the second vanilla model and the architecture at "
                           "initialisation against the vanilla model"),
    "tables": (_stage_tables, "Tables 1-3 from every run's metrics, beside the paper's numbers"),
    "figures": (_stage_figures, "Figures 2-3, the radius curve and per-layer similarity"),
    "report": (_stage_report, "REPORT.md: the tables, figures and provenance of the run"),
}
METHOD_STAGES = ("train", "certify", "pgd", "compose", "similarity")
# Stages that read metrics files only (pandas, matplotlib) and run without torch, whose
# import alone takes 2.8 s on two cores (measured): no torch numerics to set for them.
# tests/test_imports.py checks that their code imports no torch.
TORCH_FREE_STAGES = ("tables", "figures", "report")
TOOLS = {
    "benchmark": (_benchmark, "seconds per epoch and peak memory of each method beside the floor"),
    "fit-epochs": (_fit_epochs, "shrink a method's schedule in the profile to a time budget, from the benchmark"),
    "check-params": (_check_params, "validate a profile's params against the schema"),
    "export-dvc": (_export_dvc, "regenerate dvc.yaml files from the Snakemake workflow"),
    "make-sample": (_make_sample, "cut the committed CIFAR-10 sample from a full image archive"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline_src", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in {**STAGES, **TOOLS}.items():
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--profile", default=PAPER_PROFILE,
                         help="run profile: 'paper' (params.yaml) or config/<name>/params.yaml")
        cmd.add_argument("--log", default=None,
                         help="also write everything the stage prints to this file")
        if name in METHOD_STAGES:
            cmd.add_argument("--method", required=True,
                             help="a certified training run: a method (bcp) or a Duet grid point")
        if name in TORCH_FREE_STAGES:
            cmd.add_argument("--committed-seeds", action="store_true",
                             help="only the seeds whose every run is in committed_runs (a campaign's "
                                  "committed tables while its next seed trains)")
        if name == "export-dvc":
            cmd.add_argument("--profiles", nargs="+", default=None,
                             help="profiles to export (default: paper and every config/*/params.yaml)")
        if name == "benchmark":
            cmd.add_argument("--methods", nargs="+", default=None,
                             help="methods or runs to time (default: benchmark.methods, else the profile's methods)")
            cmd.add_argument("--duet-ranks", nargs="+", default=None,
                             help="also time Duet at these ranks (ints or 'full')")
            cmd.add_argument("--archs", nargs="+", default=None, choices=["4C3F", "6C2F", "8C2F"],
                             help="default: benchmark.archs; several (4C3F 6C2F 8C2F): time per epoch against depth")
            cmd.add_argument("--steps", type=int, default=None, help="timed steps per method (benchmark.steps)")
            cmd.add_argument("--compile", action="store_true",
                             help="time the methods that can compile their bounds both eager and compiled "
                                  "(one architecture)")
            cmd.add_argument("--warmup-steps", type=int, default=None,
                             help="untimed steps first (benchmark.warmup_steps)")
        if name == "fit-epochs":
            cmd.add_argument("--method", required=True, help="the method whose schedule is shrunk")
            cmd.add_argument("--seconds", type=float, required=True,
                             help="seconds of training the schedule must fit in")
        if name == "make-sample":
            cmd.add_argument("--source", required=True, help="full CIFAR-10 image archive")
    return parser


class _Tee:
    """Write to the terminal and a log file at once (the runners' `log:` files). A
    progress bar's redraws (writes with a carriage return) reach the terminal only:
    the log keeps the lines the stage prints."""

    def __init__(self, terminal, log):
        self.streams = (terminal, log)

    def write(self, text: str) -> int:
        terminal, log = self.streams
        terminal.write(text)
        terminal.flush()
        if "\r" not in text:
            log.write(text)
            log.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def set_numerics(params: dict) -> None:
    """The numerics of a stage, set by the stage itself so that the same params give the
    same bits under Snakemake (which exports OMP_NUM_THREADS=1), `dvc repro` and the plain
    commands: `run.cpu_threads` torch threads, deterministic algorithms where torch has
    them when `run.deterministic` (warn_only: a GPU kernel without one warns instead of
    failing; their cost on a GPU is unmeasured, hence the switch), and the cuBLAS
    workspace that deterministic GPU matmuls need, set before CUDA starts."""
    threads, deterministic = params["run"]["cpu_threads"], params["run"]["deterministic"]
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Inductor's own switch, read when torch._inductor.config is first imported.
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1" if deterministic else "0"
    # Lazy: the report stages run without torch (TORCH_FREE_STAGES; its import takes 2.8 s on
    # two cores, measured), and the Snakefile imports this package to plan the DAG.
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or inter-op work already started in this process
        pass
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    else:
        # torch.use_deterministic_algorithms imports torch._inductor to set its config: 2.5 s
        # of every stage's start on two CPU cores (measured), for a compiler a CPU stage rarely
        # runs. The same two switches without it: torch's flag, and inductor's config through
        # the variable above (or directly, if something imported it already).
        torch._C._set_deterministic_algorithms(deterministic, warn_only=True)
        if "torch._inductor.config" in sys.modules:
            sys.modules["torch._inductor.config"].deterministic = deterministic


def _device_text(name: str) -> str:
    """The device a stage will ask for (`auto`: cuda where there is one); the stage
    itself refuses `cuda` without one."""
    if name != "auto":
        return name
    import torch  # lazy, as in set_numerics

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {**STAGES, **TOOLS}[args.command][0]
    root = PROJECT_ROOT
    # Params are checked before anything is written: a bad value leaves every output,
    # the log included, as it was (the error goes to the terminal).
    try:
        params = load_params(args.profile, root)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if getattr(args, "committed_seeds", False):
        params["seeds"] = committed_seeds(params)
        if not params["seeds"]:
            print(f"error: --committed-seeds: no seed of profile {args.profile} has every run in committed_runs",
                  file=sys.stderr)
            return 2
    if getattr(args, "method", None) and args.method not in method_runs(params):
        print(f"error: --method {args.method}: not a run of this profile "
              f"({', '.join(method_runs(params))})", file=sys.stderr)
        return 2
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        log = open(args.log, "w")
        sys.stdout, sys.stderr = _Tee(sys.__stdout__, log), _Tee(sys.__stderr__, log)
    # The DAG's stages: STAGES and the benchmark (the `timing` rule).
    dag_stage = args.command in STAGES or args.command == "benchmark"
    torch_free = args.command in TORCH_FREE_STAGES
    if dag_stage and not torch_free:
        set_numerics(params)
    if args.command in STAGES:
        device = "no torch" if torch_free else _device_text(params["run"]["device"])
        print(stage_header(params, args.command, getattr(args, "method", None), root, device), flush=True)
    try:
        handler(params, root, args)
    except StageError as err:  # ParamsError, DataError, ReportError, an unsound certificate, ...
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dag_stage and os.environ.get("DVC_STAGE"):
        record_dvc_stage_for_snakemake(os.environ["DVC_STAGE"], args.profile, args.log, root)
    return 0
