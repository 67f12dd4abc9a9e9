"""The benchmark's results as markdown tables (`python -m pipeline_src benchmark`
prints them; REPORT.md's cost section shows them): one device's methods beside
the floor, the cost against depth, k trainings at once."""
from __future__ import annotations

from .format import format_peak_memory


def markdown_table(result: dict) -> str:
    lines = [f"Device: {result['device']} (torch {result['torch']}), {result['arch']}, "
             f"{result['train_images']} training images, {result['timed_steps']} timed steps",
             "", "| method | batch | s / epoch | peak memory (MB) | x floor | x BCP |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        to_bcp = "" if row["ratio_to_bcp"] is None else f"{row['ratio_to_bcp']:.2f}"
        memory = format_peak_memory(row["peak_memory_mb"], result["device"])
        lines.append(f"| {row['method']} | {row['batch_size']} | {row['seconds_per_epoch']:.2f} | "
                     f"{memory} | {row['ratio_to_floor']:.2f} | {to_bcp} |")
    return "\n".join(lines)


def depth_markdown_table(depth: dict) -> str:
    archs = depth["archs"]
    lines = [f"Device: {depth['device']}; seconds per epoch (× the {archs[0]} time)", "",
             "| method | " + " | ".join(archs) + " |", "| --- |" + " ---: |" * len(archs)]
    for method, times in depth["seconds_per_epoch"].items():
        growth = depth["growth_over_first_arch"][method]
        lines.append(f"| {method} | " + " | ".join(f"{times[a]:.2f} (×{growth[a]:.2f})" for a in archs) + " |")
    return "\n".join(lines)


def concurrency_markdown_table(concurrency: dict) -> str:
    lines = [f"{concurrency['method']} trainings at once (one process each, batch {concurrency['batch_size']}, "
             f"{'compiled' if concurrency['compiled'] else 'eager'}, MPS {'on' if concurrency['mps'] else 'off'})",
             "", "| jobs | images / s | × one job | each job's slowdown |", "| ---: | ---: | ---: | ---: |"]
    for row in concurrency["rows"]:
        lines.append(f"| {row['jobs']} | {row['images_per_second']:.0f} | {row['speedup_over_one']:.2f} | "
                     f"{row['slowdown_each']:.2f} |")
    return "\n".join(lines)
