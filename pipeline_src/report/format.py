"""Formatting shared by Table 3 and the benchmark's tables, so that both say the
same thing for the same measurement; and Markdown rendered as an HTML page (the
tables and REPORT.md in `snakemake --report`, which shows HTML, not Markdown).

Peak memory is GPU memory (torch's peak allocation): a CPU run has none to
report, and the training and benchmark code store 0 MB for it
(`training.common.peak_memory_mb`). A 0 from a CPU device is therefore "not
measured", never "0 MB"."""
from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence

NOT_MEASURED = "not measured (CPU)"
UNITS = {"MB": (1.0, 0), "GB": (1024.0, 2)}  # divisor from MB, decimals shown


def _devices(device: str | Iterable[str] | None) -> list[str]:
    if device is None:
        return []
    return [device] if isinstance(device, str) else list(device)


def peak_memory_measured(mb: float | Sequence[float] | None, device: str | Iterable[str] | None = None) -> bool:
    """Whether a peak-memory value is a measurement: not None, finite, and from no CPU device."""
    if any(d.strip().lower() == "cpu" for d in _devices(device)):
        return False
    values = [mb] if mb is None or isinstance(mb, (int, float)) else list(mb)
    return bool(values) and all(v is not None and math.isfinite(float(v)) for v in values)


def format_peak_memory(mb: float | Sequence[float] | None, device: str | Iterable[str] | None = None,
                       unit: str = "MB", with_unit: bool = False) -> str:
    """Peak GPU memory as a table cell: `2048` (MB, no decimals) or `2.00` (GB, two
    decimals); several values (one per seed) as mean ± sample std; `not measured (CPU)`
    when `device` is (or any of several devices is) the CPU, or the value is None.
    `with_unit` appends the unit to a number (`2048 MB`), for running text."""
    if not peak_memory_measured(mb, device):
        return NOT_MEASURED
    divisor, digits = UNITS[unit]
    values = [float(v) / divisor for v in ([mb] if isinstance(mb, (int, float)) else mb)]
    mean = sum(values) / len(values)
    text = f"{mean:.{digits}f}"
    if len(values) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        text += f" ± {std:.{digits}f}"
    return f"{text} {unit}" if with_unit else text


def render_html(markdown: str, title: str) -> str:
    """A Markdown page (a table, REPORT.md) as one HTML page, tables and links kept.
    markdown-it-py comes with DVC (through rich); where it is
    not installed (a bare GPU machine) the page holds the Markdown source, saying so."""
    try:  # optional: the GPU machine's image lacks it
        from markdown_it import MarkdownIt
    except ImportError:
        body = ("<p>(markdown-it-py is not installed here: the Markdown source follows)</p>"
                f"<pre>{html.escape(markdown)}</pre>")
    else:
        body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = ("body{font-family:sans-serif;max-width:70em;margin:auto} table{border-collapse:collapse} "
             "td,th{border:1px solid #ccc;padding:2px 6px} blockquote{background:#fff4e0;margin:0;padding:4px 12px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")
