"""`python -m pipeline_src benchmark`: seconds per training epoch and peak
memory of each certified method, beside the floor (a plain cross-entropy
epoch of the same network) on the same device, data already on the device.

Each measurement runs `warmup_steps` untimed steps, then times `steps` steps
(synchronising the device) and extrapolates to one epoch of the profile's
training set at the method's batch size; the eps used is the method's
eps_train (the full bound, as after the ramp). Numbers are only comparable
within one run on one device; the output names the device. CPU numbers say
nothing about a GPU.

With `benchmark.concurrency` (e.g. [1, 2, 4, 6]) it also times k BCP trainings at
once on the device, one process each (as Snakemake runs k train jobs sharing a
card, `--resources gpu_jobs=k`): the aggregate images per second and how much
slower each training runs than alone. Small networks leave a GPU mostly idle
(the step is bound by kernel launches), so k trainings can cost far less than k
times one; `fit-epochs` and tools/window_fit.py size concurrent schedules from it.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data.cifar import load_cache
from .data.loader import DeviceBatches
from .runs import METHOD_FACTS, method_runs
from .io import git_commit, save_json, save_torch
from .methods import METHODS, build_method, method_context
from .models import build_model
from .paths import RunLayout
from .report.benchmark_tables import concurrency_markdown_table, depth_markdown_table, markdown_table
from .report.format import format_peak_memory
from .runtime import (device_name, make_generator, peak_memory_mb, reset_peak_memory, resolve_device,
                      use_fp32_numerics)
from .spectral.svd_export import export_svd
from .training.certified import certified_step
from .training.vanilla_checks import check_guide


def _time_steps(step, batches, warmup_steps: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, peak memory MB) of `step(x, y, index)` over the batches."""
    iterator = iter(batches)
    for _ in range(warmup_steps):
        step(*next(iterator))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reset_peak_memory(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(*next(iterator))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps, peak_memory_mb(device)


def _guide_root(params: dict, root: Path, arch: str) -> Path:
    """Where Duet's (and Duet-local's) guide is read: the run's own vanilla model and SVD export when they
    have this architecture; otherwise (a depth comparison) a random vanilla model of
    `arch` and its export in a scratch folder: the cost does not depend on the weights."""
    layout = RunLayout.of(params)
    if arch == params["model"]["arch"] and (root / layout.svd_factors).is_file():
        return root
    scratch = Path(tempfile.mkdtemp(prefix=f"benchmark-guide-{arch}-"))
    model_params = {**params["model"], "arch": arch}
    save_torch({"state_dict": build_model(model_params).state_dict(), "model": model_params,
                "data_sha256": "benchmark"}, scratch / layout.vanilla_model)
    export_svd({**params, "model": model_params, "svd": {**params["svd"], "power_iterations": 20}}, scratch,
               check_guide)
    return scratch


def benchmark_depth(params: dict, root: Path, methods: list[str], archs: list[str], warmup_steps: int,
                    steps: int) -> dict:
    """Every method at every architecture, on one device: how an epoch's cost grows with depth."""
    results = [benchmark(params, root, methods, arch, warmup_steps, steps) for arch in archs]
    table = {row["method"]: {} for row in results[0]["rows"]}
    for result in results:
        for row in result["rows"]:
            table[row["method"]][result["arch"]] = row["seconds_per_epoch"]
    depth = {"device": results[0]["device"], "archs": archs, "seconds_per_epoch": table,
             "growth_over_first_arch": {m: {a: t[a] / t[archs[0]] for a in archs} for m, t in table.items()},
             "git_commit": git_commit(root)}
    out = root / RunLayout.of(params).benchmark_depth
    save_json(depth, out)
    print(depth_markdown_table(depth))
    print(f"[benchmark] wrote {out.relative_to(root).as_posix()}")
    return depth


def benchmark(params: dict, root: Path, methods: list[str], arch: str | None, warmup_steps: int,
              steps: int, duet_ranks: list | None = None, compiled: bool = False) -> dict:
    """`methods`: run names of `method_runs` (a method, or a Duet grid point);
    `duet_ranks`: also time Duet at each of these ranks (its cost against r);
    `compiled`: time each method that has a `compile` key both eager and compiled
    (rows `bcp` and `bcp+compile`); without it, as its block says (a compiled row is
    named `+compile`). Compilation happens in the untimed warm-up steps."""
    layout = RunLayout.of(params)
    device = resolve_device(params["run"]["device"])
    use_fp32_numerics()
    data = load_cache(root / layout.data_cache, params)
    n_train = len(data.train_y)
    arch = arch or params["model"]["arch"]
    rows = []

    def run(name: str, batch_size: int, model_params: dict, make_step) -> None:
        generator = make_generator(params["run"]["seed"], device)
        model = build_model({**model_params, "arch": arch}).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        batches = DeviceBatches(data.train_x, data.train_y, batch_size, device, shuffle=True,
                                crop_padding=4, flip=True, generator=generator, with_indices=True,
                                drop_last=True)
        needed = warmup_steps + steps
        if len(batches) < needed:
            raise ValueError(f"benchmark: {needed} steps need {needed * batch_size} training images, "
                             f"the cache has {n_train}")
        step = make_step(model, optimizer, generator)
        per_step, memory = _time_steps(step, batches, warmup_steps, steps, device)
        rows.append({"method": name, "arch": arch, "batch_size": batch_size,
                     "compiled": name.endswith("+compile"),
                     "seconds_per_step": per_step,
                     "seconds_per_epoch": per_step * (n_train // batch_size),
                     "peak_memory_mb": memory})
        print(f"[benchmark] {name:9s} {arch} batch {batch_size}: {rows[-1]['seconds_per_epoch']:.2f} s/epoch, "
              f"{format_peak_memory(memory, device_name(device), with_unit=True)} peak", flush=True)

    def plain_step(model, optimizer, generator):
        def step(x, y, index):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    # A run's cost does not depend on its seed: runs are named by their group (`bcp`).
    # Any method with a params block can be timed, trained by the profile or not.
    runs = {name: (name, params[name]) for name in METHODS if name in params}
    runs.update({run.group: (run.method, run.config) for run in method_runs(params).values()})
    unknown = [name for name in methods if name not in runs]
    if unknown:
        raise ValueError(f"benchmark: {unknown} are neither methods nor runs of this profile "
                         f"({', '.join(runs)})")
    timed = [(name, *runs[name]) for name in methods]
    for rank in duet_ranks or []:
        timed.append((f"duet-r{rank}", "duet", {**params["duet"], "rank": rank if rank == "full" else int(rank)}))
    timed = compile_variants(timed, compiled)
    floor_batch = params["bcp"]["batch_size"]
    run("floor", floor_batch, params["model"], plain_step)
    guide_root = _guide_root(params, root, arch) if any(METHOD_FACTS[m].similarity_term for _, m, _ in timed) else root
    for name, method_name, cfg in timed:

        def make_step(model, optimizer, generator, method_name=method_name, cfg=cfg):
            return method_step(model, optimizer, generator, method_name, cfg, n_train, guide_root, layout,
                               device)

        run(name, cfg["batch_size"], {**params["model"], **cfg.get("model", {})}, make_step)
    if guide_root != root:  # the stand-in guide was read into memory; its scratch folder goes
        shutil.rmtree(guide_root, ignore_errors=True)

    floor = rows[0]["seconds_per_epoch"]
    # The ratio's reference: BCP as timed (eager if both were).
    bcp = next((r["seconds_per_epoch"] for name in ("bcp", "bcp+compile") for r in rows if r["method"] == name),
               None)
    for row in rows:
        row["ratio_to_floor"] = row["seconds_per_epoch"] / floor
        row["ratio_to_bcp"] = row["seconds_per_epoch"] / bcp if bcp else None
    result = {"device": device_name(device), "torch": torch.__version__, "arch": arch,
              "train_images": n_train, "warmup_steps": warmup_steps, "timed_steps": steps,
              "note": "seconds per epoch extrapolated from the timed steps; TF32 off",
              "rows": rows, "git_commit": git_commit(root)}
    counts = params["benchmark"].get("concurrency")
    if counts and arch == params["model"]["arch"]:
        result["concurrency"] = concurrency_benchmark(params, root, counts, warmup_steps, steps)
    out = root / layout.benchmark_result(arch)
    save_json(result, out)
    print(markdown_table(result))
    if "concurrency" in result:
        print(concurrency_markdown_table(result["concurrency"]))
    print(f"[benchmark] wrote {out.relative_to(root).as_posix()}")
    return result


def compile_variants(timed: list[tuple[str, str, dict]], both: bool) -> list[tuple[str, str, dict]]:
    """Rows of (name, method, params block). A block with `compile: true` is timed
    compiled and named `<name>+compile`; with `both`, every block that has the key
    is timed eager under its plain name and compiled under `<name>+compile`."""
    if not both:
        return [(f"{name}+compile" if cfg.get("compile") else name, method, cfg) for name, method, cfg in timed]
    eager = [(name, method, {**cfg, "compile": False} if "compile" in cfg else cfg) for name, method, cfg in timed]
    return eager + [(f"{name}+compile", method, {**cfg, "compile": True})
                    for name, method, cfg in timed if "compile" in cfg]


def method_step(model, optimizer, generator, method_name: str, cfg: dict, n_train: int, guide_root: Path,
                layout: RunLayout, device: torch.device):
    """`step(x, y, index)`: training's `certified_step` of the method at its full bound
    (eps_train, kappa_final: the steps after the ramp)."""
    if cfg.get("compile"):
        # A fresh compilation per row: rows of other models would otherwise pile up
        # recompilations of the same function towards dynamo's limit.
        torch._dynamo.reset()
    method = build_method(method_name, model, cfg, generator, n_train,
                          method_context(method_name, cfg, guide_root, layout, device))

    def step(x, y, index):
        certified_step(method, optimizer, x, y, index, cfg["eps_train"], cfg["kappa_final"])
    return step


# ------------------------------------------------------------------ k trainings at once

CONCURRENCY_METHOD = "bcp"
# How long the main process waits for a worker (start-up, compilation, a round) before
# it gives up: a worker that died must not hang the benchmark.
WORKER_TIMEOUT_S = 900


def _concurrent_worker(worker: int, params: dict, root: str, method_name: str, warmup_steps: int,
                       inbox, outbox) -> None:
    """One training process: its own model, optimizer and batches (its own seed); warm-up
    (and compilation) first, then on each request `steps` timed steps, reported as the
    system-wide monotonic times they started and ended."""
    try:
        root_path = Path(root)
        layout = RunLayout.of(params)
        device = resolve_device(params["run"]["device"])
        use_fp32_numerics()
        data = load_cache(root_path / layout.data_cache, params)
        cfg = params[method_name]
        generator = make_generator(params["run"]["seed"] + worker, device)
        model = build_model({**params["model"], **cfg.get("model", {})}).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        batches = DeviceBatches(data.train_x, data.train_y, cfg["batch_size"], device, shuffle=True,
                                crop_padding=4, flip=True, generator=generator, with_indices=True,
                                drop_last=True)
        step = method_step(model, optimizer, generator, method_name, cfg, len(data.train_y), root_path,
                           layout, device)

        def batch_stream():
            while True:
                yield from batches

        stream = batch_stream()
        for _ in range(warmup_steps):
            step(*next(stream))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        outbox.put((worker, "ready", None))
        while (steps := inbox.get()) is not None:
            started = time.monotonic()
            for _ in range(steps):
                step(*next(stream))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            outbox.put((worker, "round", (started, time.monotonic())))
    except Exception as err:  # noqa: BLE001 - reported to the main process, which stops
        outbox.put((worker, "error", f"{type(err).__name__}: {err}"))


def concurrency_benchmark(params: dict, root: Path, counts: list[int], warmup_steps: int, steps: int) -> dict:
    """Aggregate images per second of k concurrent BCP trainings for each k in `counts`
    (1 is always measured: the reference), one process each, all started (and compiled)
    once: round k runs `steps` timed steps in the first k processes at once while the
    others wait. The wall time of a round is from the first start to the last end."""
    counts = sorted(set(counts) | {1})
    method_name = CONCURRENCY_METHOD
    batch = params[method_name]["batch_size"]
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    outbox = context.Queue()
    inboxes = [context.Queue() for _ in range(max(counts))]
    workers = [context.Process(target=_concurrent_worker, daemon=True,
                               args=(i, params, str(root), method_name, warmup_steps, inboxes[i], outbox))
               for i in range(max(counts))]
    for process in workers:
        process.start()

    def receive(expected: str):
        try:
            worker, kind, payload = outbox.get(timeout=WORKER_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError(f"benchmark: no answer from the concurrent workers in {WORKER_TIMEOUT_S} s") from None
        if kind == "error" or kind != expected:
            raise RuntimeError(f"benchmark: concurrent worker {worker} failed: {payload}")
        return payload

    rows = []
    try:
        for _ in workers:
            receive("ready")
        for k in counts:
            for inbox in inboxes[:k]:
                inbox.put(steps)
            spans = [receive("round") for _ in range(k)]
            wall = max(end for _, end in spans) - min(start for start, _ in spans)
            each = sum(end - start for start, end in spans) / k / steps
            rows.append({"jobs": k, "wall_seconds": wall, "seconds_per_step_each": each,
                         "images_per_second": k * steps * batch / wall})
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for process in workers:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    alone = rows[0]
    for row in rows:
        row["speedup_over_one"] = row["images_per_second"] / alone["images_per_second"]
        # How much longer an epoch of each training takes than alone: what fit-epochs scales by.
        row["slowdown_each"] = row["jobs"] / row["speedup_over_one"]
    return {"method": method_name, "batch_size": batch, "timed_steps": steps, "warmup_steps": warmup_steps,
            "compiled": bool(params[method_name].get("compile")),
            "mps": os.environ.get("PIPELINE_MPS", "") == "1",
            "note": "k processes train at once, each its own model and batches; images per second over "
                    "the wall time from the first start to the last end",
            "rows": rows}
