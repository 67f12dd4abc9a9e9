"""The first line of every stage's log: what the stage will do, where, on what, and how
long its training steps should take, from the benchmark's measured seconds per step
when the run has one (results/<run>/benchmark/). Reads JSON files only (no torch)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .runs import method_runs
from .paths import RunLayout


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _data_text(params: dict, root: Path) -> tuple[str, dict | None]:
    provenance = _read(root / RunLayout.of(params).data_provenance)
    if not provenance or "images" not in provenance:
        return "data not built yet", None
    images = provenance["images"]
    return f"{images['train']:,} train / {images['val']:,} val / {images['test']:,} test images", images


def _measured_step(params: dict, root: Path, names: tuple[str, ...]) -> tuple[float, str] | None:
    """(seconds per step, device) of the first of `names` in the run's benchmark."""
    layout = RunLayout.of(params)
    result = _read(root / layout.root / "benchmark" / f"benchmark_{params['model']['arch']}.json")
    for name in names:
        for row in (result or {}).get("rows", []):
            if row.get("method") == name and row.get("seconds_per_step"):
                return float(row["seconds_per_step"]), str(result.get("device", "?"))
    return None


def _estimate(steps: int, measured: tuple[float, str] | None) -> str:
    if measured is None:
        return "no estimate (no benchmark of this run measured)"
    seconds = steps * measured[0]
    shown = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return (f"about {shown} of training steps ({steps:,} steps at {measured[0]:.3g} s each, "
            f"measured by the benchmark on {measured[1]}; validation and start-up extra)")


def _schedule(cfg: dict) -> str:
    text = f"{cfg['epochs']} epochs, batch {cfg['batch_size']}"
    if "ramp_epochs" in cfg:
        text += f" ({cfg['warmup_epochs']} warm-up, {cfg['ramp_epochs']} ramp)"
    return text


def stage_header(params: dict, command: str, method: str | None, root: Path, device: str) -> str:
    """`[train] duet-s0 | cpu, 2 threads | 9,000 train / ... | 15 epochs ... | about 12 min ...`."""
    threads = params["run"]["cpu_threads"]
    parts = [f"[{command}]" + (f" {method}" if method else ""),
             f"{device}" + (f", {threads} CPU thread{'s' if threads != 1 else ''}" if device == "cpu" else "")]
    data, images = _data_text(params, root)
    if command != "data":
        parts.append(data)
    if command == "vanilla":
        cfg = params["vanilla"]
        parts.append(_schedule(cfg))
        if images:
            steps = cfg["epochs"] * math.ceil(images["train"] / cfg["batch_size"])
            parts.append(_estimate(steps, _measured_step(params, root, ("floor",))))
    elif command == "train" and method:
        run = method_runs(params)[method]
        cfg = run.config
        parts.append(_schedule(cfg))
        if images:
            steps = cfg["epochs"] * (images["train"] // cfg["batch_size"])
            parts.append(_estimate(steps, _measured_step(params, root, (run.group, run.method))))
    elif command == "certify":
        images_text = params["certify"]["test_images"] or "all"
        parts.append(f"certify {images_text} test images at eps {params['certify']['eps']:.4g}, "
                     f"{params['certify']['radius_points']} radii")
    elif command == "pgd":
        cfg = params["pgd"]
        parts.append(f"PGD {cfg['steps']} steps x {cfg['restarts']} restarts" + (" + APGD" if cfg["apgd"] else "")
                     + " on the correctly classified test images")
    return " | ".join(parts)
