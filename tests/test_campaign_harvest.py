"""tools/campaign_harvest.py: a campaign clone's finished run is committed here with its
metrics, history, benchmark files and logs (no machine paths), and joins committed_runs;
an unfinished run, a broken certificate or another guide is refused."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from conftest import copy_project, run
from tools.campaign_harvest import run_files
from pipeline_src.paths import RunLayout

RUN = "lmt-s1"   # a committed run of the cpu profile: its files stand in for a clone's
LAYOUT = RunLayout("results/cpu")


def _clone_with_run(project: Path, clone: Path) -> None:
    """A stand-in campaign clone holding RUN's files (taken from the project, which then loses
    them), one log naming the clone's absolute path as Snakemake's logs do."""
    for name in run_files(LAYOUT, RUN):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(project / name, clone / name)
    log = clone / LAYOUT.log(f"train_{RUN}")
    log.write_text(log.read_text() + f"wrote {clone}/results/cpu/train/{RUN}/model.pt\n")
    params = project / "config/cpu/params.yaml"
    params.write_text(params.read_text().replace(f", {RUN}]", "]"))


def _committed_runs(project: Path) -> list[str]:
    return yaml.safe_load((project / "config/cpu/params.yaml").read_text())["committed_runs"]


def test_a_finished_run_is_copied_without_machine_paths_and_committed(tmp_path: Path):
    project, clone = copy_project(tmp_path / "project"), tmp_path / "clone"
    _clone_with_run(project, clone)
    assert RUN not in _committed_runs(project)
    done = run([sys.executable, "tools/campaign_harvest.py", "--clone", str(clone), RUN], cwd=project)
    assert all((project / name).is_file() for name in run_files(LAYOUT, RUN))
    log = (project / LAYOUT.log(f"train_{RUN}")).read_text()
    assert str(clone) not in log and f"wrote results/cpu/train/{RUN}/model.pt" in log
    assert _committed_runs(project)[-1] == RUN
    assert "# " in (project / "config/cpu/params.yaml").read_text()   # the file's comments kept
    assert f"git add -f {LAYOUT.train(RUN, 'metrics.json')}" in done.stdout


def test_unfinished_broken_or_other_guide_runs_are_refused(tmp_path: Path):
    project, clone = copy_project(tmp_path / "project"), tmp_path / "clone"
    _clone_with_run(project, clone)
    cmd = [sys.executable, "tools/campaign_harvest.py", "--clone", str(clone), RUN]

    def refused(why: str) -> None:
        done = run(cmd, cwd=project, check=False)
        assert done.returncode != 0 and why in done.stderr, done.stderr
        assert RUN not in _committed_runs(project)

    attack, similarity = clone / LAYOUT.attack(RUN, "metrics.json"), clone / LAYOUT.similarity(RUN, "metrics.json")
    original = attack.read_text()
    attack.write_text(json.dumps({**json.loads(original), "certified_points_broken": 3}))
    refused("3 certified points broken")
    attack.write_text(original)
    similarity.write_text(json.dumps({**json.loads(similarity.read_text()), "vanilla_weights_sha256": "0" * 64}))
    refused(f"compared with guide {'0' * 64}")
    (clone / LAYOUT.benchmark(f"pgd_{RUN}")).unlink()
    refused("unfinished")
    refused_name = run([sys.executable, "tools/campaign_harvest.py", "--clone", str(clone), "lmt-s9"],
                       cwd=project, check=False)
    assert refused_name.returncode != 0 and "not runs of profile cpu: lmt-s9" in refused_name.stderr
