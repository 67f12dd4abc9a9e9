"""The three report stages: tables, figures, REPORT.md."""
from __future__ import annotations

from pathlib import Path

from ..io import save_text
from ..paths import RunLayout
from .collect import collect


def make_tables(params: dict, root: Path) -> list[Path]:
    from .tables import write_tables

    written = write_tables(collect(params, root), RunLayout.of(params), root)
    print(f"[tables] wrote {len(written)} files under {RunLayout.of(params).table(1, 'md').rsplit('/', 1)[0]}/")
    return written


def make_figures(params: dict, root: Path) -> list[Path]:
    from .figures import write_figures

    written = write_figures(collect(params, root), RunLayout.of(params), root)
    print(f"[figures] wrote {len(written)} files under "
          f"{RunLayout.of(params).figure('x', 'png').rsplit('/', 1)[0]}/")
    return written


def make_report(params: dict, root: Path) -> Path:
    from .document import build_report
    from .format import render_html

    layout = RunLayout.of(params)
    path = root / layout.report
    text = build_report(collect(params, root), layout, root)
    save_text(text, path)
    save_text(render_html(text, f"Duet reproduction: profile {params['profile']}"), root / layout.report_html)
    print(f"[report] wrote {layout.report} and {layout.report_html}")
    return path
