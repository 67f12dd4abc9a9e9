"""The campaign tools. tools/campaign_run.sh trains runs in a clone at the campaign's commit
against the committed guide, never retraining it; tools/campaign_harvest.py brings a finished
run back with its metrics, history, benchmark files and logs (no machine paths), and adds it to
committed_runs; an unfinished run, a broken certificate or another guide is refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import copy_project, run
from test_window import TINY, _add_profile
from tools.campaign_harvest import run_files
from pipeline_src.config import load_params
from pipeline_src.io import state_dict_sha256
from pipeline_src.paths import RunLayout

ROOT_DIR = Path(__file__).resolve().parents[1]
RUN = "lmt-s1"   # a committed run of the cpu profile: its files stand in for a clone's
LAYOUT = RunLayout("results/cpu")
PARAMS = load_params("cpu")


def _clone_with_run(project: Path, clone: Path) -> None:
    """A stand-in campaign clone holding RUN's files (taken from the project, which then loses
    them), one log naming the clone's absolute path as Snakemake's logs do."""
    for name in run_files(PARAMS, RUN):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(project / name, clone / name)
    log = clone / LAYOUT.log(f"train_{RUN}")
    log.write_text(log.read_text() + f"wrote {clone}/results/cpu/train/{RUN}/model.pt\n")
    params = project / "config/cpu/params.yaml"
    text = params.read_text()
    assert f", {RUN}," in text or f", {RUN}]" in text
    params.write_text(text.replace(f", {RUN},", ",").replace(f", {RUN}]", "]"))


def _committed_runs(project: Path) -> list[str]:
    return yaml.safe_load((project / "config/cpu/params.yaml").read_text())["committed_runs"]


def test_a_finished_run_is_copied_without_machine_paths_and_committed(tmp_path: Path):
    project, clone = copy_project(tmp_path / "project"), tmp_path / "clone"
    _clone_with_run(project, clone)
    assert RUN not in _committed_runs(project)
    done = run([sys.executable, "tools/campaign_harvest.py", "--clone", str(clone), RUN], cwd=project)
    assert all((project / name).is_file() for name in run_files(PARAMS, RUN))
    log = (project / LAYOUT.log(f"train_{RUN}")).read_text()
    assert str(clone) not in log and f"wrote results/cpu/train/{RUN}/model.pt" in log
    assert _committed_runs(project).count(RUN) == 1
    assert "# " in (project / "config/cpu/params.yaml").read_text()   # the file's comments kept
    assert f"git add -f {LAYOUT.train(RUN, 'metrics.json')}" in done.stdout
    certify = json.loads((project / LAYOUT.certify(RUN, "metrics.json")).read_text())
    assert f"{RUN}: {certify['clean_accuracy']:.2f} / " in done.stdout   # its summary line


def test_the_summary_line_gives_the_paired_differences():
    """A Duet run's line ends with its differences against BCP of the same seed, from the files."""
    from tools.campaign_harvest import ROOT, summary

    def read(run: str, stage: str) -> dict:
        path = {"certify": LAYOUT.certify, "pgd": LAYOUT.attack}[stage](run, "metrics.json")
        return json.loads((ROOT / path).read_text())

    duet, bcp = "duet-lambda_0p01-s1", "bcp-s1"
    line = summary(ROOT, LAYOUT, load_params("cpu"), duet)
    clean = read(duet, "certify")["clean_accuracy"] - read(bcp, "certify")["clean_accuracy"]
    pgd = read(duet, "pgd")["pgd_accuracy"] - read(bcp, "pgd")["pgd_accuracy"]
    certified = (read(duet, "certify")["headline_certified_accuracy"]
                 - read(bcp, "certify")["headline_certified_accuracy"])
    assert line.startswith(f"{duet}: ")
    assert line.endswith(f"against {bcp}: {clean:+.2f} / {pgd:+.2f} / {certified:+.2f}")
    assert f"none of {read(duet, 'pgd')['certified_points']} certified points broken" in line
    assert "against" not in summary(ROOT, LAYOUT, load_params("cpu"), "lmt-s1")   # LMT is paired with nothing


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


def test_a_composed_run_brings_its_compose_stage_and_is_refused_if_that_attack_broke_a_point(tmp_path: Path):
    """A run of compose.methods keeps its compose metrics, benchmark file and log too; a
    composite certificate its attack broke is refused like any other."""
    from tools.campaign_harvest import check_run

    params = {**PARAMS, "compose": {**PARAMS["compose"], "methods": ["lmt"]}}
    files = run_files(params, RUN)
    assert {LAYOUT.compose(RUN, "metrics.json"), LAYOUT.benchmark(f"compose_{RUN}"), LAYOUT.log(f"compose_{RUN}")
            } <= set(files) and set(run_files(PARAMS, RUN)) < set(files)
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("metrics.json") and "/compose/" in name:
            (tmp_path / name).write_text(json.dumps({"attack": {"certified_points_broken": 2}}))
        elif (ROOT_DIR / name).is_file():
            shutil.copyfile(ROOT_DIR / name, tmp_path / name)
        else:
            (tmp_path / name).write_text("")
    guide = json.loads((tmp_path / LAYOUT.similarity(RUN, "metrics.json")).read_text())["vanilla_weights_sha256"]
    composed = LAYOUT.compose(RUN, "metrics.json")
    with pytest.raises(SystemExit, match=f"2 certified points broken by the attack \\({composed}"):
        check_run(tmp_path, params, RUN, guide)


def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=project,
                          check=True, capture_output=True, text=True).stdout.strip()


def test_campaign_run_trains_against_the_committed_guide_without_retraining_it(tmp_path: Path, monkeypatch):
    """The campaign's commit predates the guide's metrics: the script copies the guide's weights
    (on disk, not committed) into its clone, marks them up to date, trains runs' chains against
    them, two at once with CAMPAIGN_JOBS=2 (one thread each); a params-only commit of the
    campaign branch leaves finished stages standing; without the weights it trains the vanilla
    stage at the commit the guide's metrics record, gets the pinned hash (the same machine) and
    keeps the weights; a pinned hash the weights do not have stops it before any training, and
    more jobs than the cores hold threads stop it too."""
    project = copy_project(tmp_path / "project")
    _add_profile(project, "tinycamp", {**TINY, "run": {**TINY["run"], "name": "tinycamp", "cpu_threads": 1},
                                       "seeds": [0, 1]})
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "the campaign's code and params")
    campaign_commit = _git(project, "rev-parse", "HEAD")
    run(["snakemake", "--cores", "1", "results/tinycamp/vanilla/metrics.json", "--config", "profile=tinycamp"],
        project)
    guide = project / "results/tinycamp/vanilla"
    _git(project, "add", "-f", str(guide / "metrics.json"), str(guide / "history.csv"))   # no weights in git
    _git(project, "commit", "-qm", "the campaign's guide, pinned")
    sha = json.loads((guide / "metrics.json").read_text())["weights_sha256"]

    clone = tmp_path / "clone"
    monkeypatch.setenv("CAMPAIGN_JOBS", "2")
    done = run(["bash", "tools/campaign_run.sh", str(clone), campaign_commit, "tinycamp", "bcp-s0", "bcp-s1"],
               project)
    assert "bcp-s0 bcp-s1 (2 at once, bcp-s0 first)" in done.stdout and "bcp-s0 bcp-s1 done" in done.stdout, \
        done.stdout[-2000:]
    assert _git(clone, "rev-parse", "HEAD") == campaign_commit
    assert json.loads((clone / "results/tinycamp/vanilla/metrics.json").read_text())["weights_sha256"] == sha
    assert not (clone / "results/tinycamp/logs/vanilla.log").exists(), "the guide was retrained"
    for seed in (0, 1):
        attack = json.loads((clone / f"results/tinycamp/pgd/bcp-s{seed}/metrics.json").read_text())
        assert attack["certified_points_broken"] == 0

    params = clone / "config/tinycamp/params.yaml"   # a campaign branch's params-only commit
    params.write_text(params.read_text().replace("cpu_threads: 1", "cpu_threads: 2"))
    _git(clone, "commit", "-qam", "params only: one run at a time at two threads")
    trained = (clone / "results/tinycamp/train/bcp-s0/model.pt").stat().st_mtime_ns
    monkeypatch.setenv("CAMPAIGN_JOBS", "1")
    run(["bash", "tools/campaign_run.sh", str(clone), _git(clone, "rev-parse", "HEAD"), "tinycamp", "bcp-s0"], project)
    assert (clone / "results/tinycamp/train/bcp-s0/model.pt").stat().st_mtime_ns == trained, "bcp-s0 was retrained"
    assert not (clone / "results/tinycamp/logs/vanilla.log").exists(), "the guide was retrained"
    monkeypatch.setenv("CAMPAIGN_JOBS", str(os.cpu_count() + 1))
    crowded = run(["bash", "tools/campaign_run.sh", str(clone), _git(clone, "rev-parse", "HEAD"), "tinycamp"],
                  project, check=False)
    assert crowded.returncode == 2 and "cores" in crowded.stderr, crowded.stderr
    monkeypatch.setenv("CAMPAIGN_JOBS", "1")

    (guide / "model.pt").unlink()   # a fresh machine: the weights are gone, the pinned hash is not
    rebuilt = tmp_path / "rebuilt"
    done = run(["bash", "tools/campaign_run.sh", str(rebuilt), campaign_commit, "tinycamp"], project)
    assert "training the vanilla stage at " + campaign_commit in done.stdout
    assert (tmp_path / "rebuilt.guide/results/tinycamp/logs/vanilla.log").exists()
    assert not (rebuilt / "results/tinycamp/logs/vanilla.log").exists()
    assert json.loads((rebuilt / "results/tinycamp/vanilla/metrics.json").read_text())["weights_sha256"] == sha
    kept = torch.load(guide / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert state_dict_sha256(kept) == sha, "the rebuilt weights are not kept in the checkout"

    recorded = json.loads((guide / "metrics.json").read_text())
    (guide / "metrics.json").write_text(json.dumps({**recorded, "weights_sha256": "0" * 64}))
    stopped = run(["bash", "tools/campaign_run.sh", str(rebuilt), campaign_commit, "tinycamp", "duet-s0"], project,
                  check=False)
    assert stopped.returncode == 1 and f"GUIDE MISMATCH: {sha}, not {'0' * 64}" in stopped.stderr
    assert not (rebuilt / "results/tinycamp/train/duet-s0").exists()
