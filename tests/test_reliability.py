"""Reliability, counted: bad params values, bad data inputs and kills at random points of
training, each through the plain commands (`python -m pipeline_src <stage> --profile X`)
in a copy of the project, each with its outcome.

- A bad params value: exit status 2, one line `error: ...` naming the key or the file,
  no traceback, and the existing data cache byte for byte as it was (nothing lost).
- A bad data input: exit status 2, one line naming the file; no cache is left that a
  later stage could take for this input, and the vanilla stage then refuses to run.
- A kill (SIGKILL to the process group of `python -m pipeline_src vanilla`) at a random
  point of training: no final output appears; rerunning the same command (the documented
  recovery) resumes from the last epoch checkpoint; the weights at the end are bit for
  bit those of a run never killed.

The counts and every outcome go to `reliability.json` under pytest's base temp folder
and to the terminal summary; each test asserts its own count."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import copy_project, tool_env
from test_data import make_archive, make_tree, write_image

# The tiny profile every case starts from: the committed sample, 400 training images,
# 4 short vanilla epochs (a checkpoint after each), any accuracy accepted.
TINY = {
    "run": {"name": "rel", "device": "cpu", "seed": 0},
    "data": {"source": "sample", "path": None, "val_size": 500},
    "vanilla": {"epochs": 4, "batch_size": 50, "lr": 0.01, "warmup_epochs": 1, "eval_batch_size": 500,
                "min_test_accuracy": 0.0},
}
CACHE = Path("results/rel/data/cifar10.pt")
VANILLA = Path("results/rel/vanilla")

LEDGER: dict[str, list[dict]] = {"bad params values": [], "bad data inputs": [], "kills during training": []}


@pytest.fixture(scope="module")
def ledger(request, tmp_path_factory):
    yield LEDGER
    counts = {kind: len(rows) for kind, rows in LEDGER.items()}
    passed = {kind: sum(row["ok"] for row in rows) for kind, rows in LEDGER.items()}
    path = tmp_path_factory.getbasetemp() / "reliability.json"
    path.write_text(json.dumps({"counts": counts, "as_expected": passed, "cases": LEDGER}, indent=1))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():   # to the terminal, not into a captured section
            reporter.write_sep("-", "reliability (tests/test_reliability.py)")
            for kind, rows in LEDGER.items():
                if rows:
                    reporter.write_line(f"{kind}: {passed[kind]}/{counts[kind]} as expected "
                                        f"({rows[0]['expected']})")
            reporter.write_line(f"cases: {path}")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """One copy of the project for every case, with the tiny profile and its data cache."""
    root = copy_project(tmp_path_factory.mktemp("reliability") / "project")
    write_profile(root, "rel", TINY)
    cli(root, "data", "rel", check=True)
    return root


def write_profile(root: Path, name: str, params: dict | str) -> None:
    path = root / "config" / name / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False))


def cli(root: Path, stage: str, profile: str, check: bool = False, **popen) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline_src", stage, "--profile", profile], cwd=root,
                            env=tool_env(), capture_output=True, text=True, timeout=600, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"{stage} --profile {profile} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(result: subprocess.CompletedProcess, *named: str) -> str | None:
    """None when the command failed with status 2 and one line `error: ...` naming each of
    `named`; otherwise what was wrong."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode != 2:
        return f"exit status {result.returncode}: {result.stderr[-500:]}"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"not one error line: {result.stderr[-500:]!r}"
    missing = [name for name in named if name not in lines[0]]
    return f"{missing} not named in {lines[0]!r}" if missing else None


def record(kind: str, case: str, expected: str, problem: str | None, message: str = "") -> None:
    LEDGER[kind].append({"case": case, "expected": expected, "ok": problem is None,
                         "outcome": problem or message})


# ---------------------------------------------------------------- bad params values
def merged(**changes) -> dict:
    """TINY with blocks updated (one level deep)."""
    params = json.loads(json.dumps(TINY))
    for block, values in changes.items():
        params[block] = {**params.get(block, {}), **values} if isinstance(values, dict) else values
    return params


# (case, the profile's params or raw text, what the error must name)
BAD_PARAMS = [
    ("wrong type: an int as a word", merged(vanilla={"epochs": "three"}), "vanilla.epochs"),
    ("wrong type: a boolean as a word", merged(vanilla={"nesterov": "yes"}), "vanilla.nesterov"),
    ("negative: a validation size", merged(data={"val_size": -5}), "data.val_size"),
    ("zero: a learning rate", merged(vanilla={"lr": 0}), "vanilla.lr"),
    ("out of range: an accuracy threshold over 100", merged(vanilla={"min_test_accuracy": 150}),
     "vanilla.min_test_accuracy"),
    ("unknown key in a block", merged(vanilla={"epoch": 3}), "vanilla.epoch"),
    ("unknown top-level block", merged(trainig={"epochs": 3}), "trainig"),
    ("bad enum: architecture", merged(model={"arch": "7C2F"}), "model.arch"),
    ("bad enum: optimizer", merged(vanilla={"optimizer": "rmsprop"}), "vanilla.optimizer"),
    ("bad enum: device", merged(run={"device": "tpu"}), "run.device"),
    ("empty list: SVD ranks", merged(svd={"ranks": []}), "svd.ranks"),
    ("malformed sha256", merged(data={"sha256": "abc"}), "data.sha256"),
    ("zero: images per class", merged(data={"per_class": {"train": 0, "test": 10}}), "data.per_class.train"),
    ("negative: images per class", merged(data={"per_class": {"train": 20, "test": -3}}), "data.per_class.test"),
    ("not an integer: images per class", merged(data={"per_class": {"train": 2.5, "test": 10}}),
     "data.per_class.train"),
    ("a ramp past the last epoch", merged(bcp={"epochs": 2, "warmup_epochs": 1, "ramp_epochs": 5}),
     "bcp.ramp_epochs"),
    ("not a mapping", "- just\n- a list\n", "config/bad{index}/params.yaml"),
    ("bad enum: an item of a list set by the profile", merged(methods=["bcp", "resnet"]), "methods"),
    ("not YAML (one line: where the parser stopped)", "vanilla: [epochs: 3\n", "config/bad{index}/params.yaml"),
]

def test_bad_params_values_give_one_line_errors_and_lose_nothing(project: Path, ledger):
    before = sha256(project / CACHE)
    for index, (case, params, named) in enumerate(BAD_PARAMS):
        profile = f"bad{index:02d}"
        write_profile(project, profile, params if isinstance(params, str)
                      else {**params, "run": {**params["run"], "name": "rel"}})
        result = cli(project, "data", profile)
        problem = one_line_error(result, named.format(index=f"{index:02d}"), f"config/{profile}/params.yaml")
        if problem is None and sha256(project / CACHE) != before:
            problem = "the existing data cache changed"
        record("bad params values", case, "one-line error naming the key and file; the cache untouched",
               problem, result.stderr.strip())
        # Gone once tried: a profile left behind with run.name 'rel' would be refused
        # beside 'rel' (they would share results/rel/).
        shutil.rmtree(project / "config" / profile)
    unknown = cli(project, "data", "no_such_profile")
    record("bad params values", "unknown profile", "one-line error naming the key and file; the cache untouched",
           one_line_error(unknown, "no_such_profile", "profiles: paper"), unknown.stderr.strip())
    rows = LEDGER["bad params values"]
    assert len(rows) == len(BAD_PARAMS) + 1 >= 15
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]


# ---------------------------------------------------------------- bad data inputs
def bad_inputs(folder: Path, archive: Path) -> list[tuple[str, Path, dict, list[str]]]:
    """(case, input, extra data params, what the error must name): tiny image archives
    (one image per class and split), each broken in one way, beside the good `archive`."""
    cases = [("missing archive", folder / "absent.tar.gz", {}, ["not found"])]
    truncated = folder / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    cases.append(("truncated archive", truncated, {}, ["not a readable"]))
    cases.append(("wrong checksum", archive, {"sha256": "0" * 64}, ["does not match the expected " + "0" * 64]))
    cases.append(("more images per class than a class holds", archive, {"per_class": {"train": 2, "test": 1}},
                  ["data.per_class.train", "airplane 1"]))
    text = folder / "notes.tar.gz"
    text.write_text("not an archive\n")
    cases.append(("not an archive", text, {}, ["not a readable"]))
    for name, change, named in [
        ("a class missing from the test split", lambda root: [p.unlink() for p in (root / "test/truck").iterdir()],
         ["truck"]),
        ("no test split", lambda root: [p.unlink() for p in (root / "test").rglob("*.png")], ["test/"]),
        ("an image not 32x32", lambda root: write_image(root / "train/cat/00.png", np.zeros((16, 32, 3), np.uint8)),
         ["train/cat/00.png", "32x32"]),
        ("a corrupted image", lambda root: (root / "train/dog/00.png").write_bytes(b"\x89PNG garbage"),
         ["train/dog/00.png", "corrupted"]),
        ("an unknown class folder", lambda root: write_image(root / "train/horses/00.png",
                                                             np.zeros((32, 32, 3), np.uint8)),
         ["horses"]),
    ]:
        tree = folder / name.replace(" ", "_")
        make_tree(tree, per_class=1, suffix=".png")
        change(tree)
        out = make_archive(tree, folder / f"{tree.name}.tar.gz", "w:gz")
        cases.append((name, out, {}, named))
    return cases


def test_bad_data_inputs_give_one_line_errors_and_leave_no_stale_cache(project: Path, tmp_path: Path, ledger):
    """Each case starts from a good cache of a good archive, then puts the bad input at the
    same path (or sets the bad params) and reruns the data stage: it must fail in one line
    and leave no cache, and the vanilla stage must then refuse to run (the stale-cache
    scenario: a failed data stage, then a later stage)."""
    expected = "one-line error naming the file; no cache left (the vanilla stage then refuses)"
    make_tree(tmp_path / "good", per_class=1, suffix=".png")
    archive = make_archive(tmp_path / "good", tmp_path / "good.tar.gz", "w:gz")
    good_bytes = archive.read_bytes()
    target = tmp_path / "input.tar.gz"
    target.write_bytes(good_bytes)
    params = merged(run={"name": "reldata"}, data={"source": "images", "path": str(target), "val_size": 2})
    write_profile(project, "reldata", params)
    cli(project, "data", "reldata", check=True)
    cache = project / "results/reldata/data/cifar10.pt"
    saved = {path: path.read_bytes() for path in cache.parent.iterdir()}
    for index, (case, path, extra, named) in enumerate(bad_inputs(tmp_path, archive)):
        target.write_bytes(good_bytes)
        for saved_path, content in saved.items():
            saved_path.write_bytes(content)
        if path.exists():
            target.write_bytes(path.read_bytes())
        else:
            target.unlink()
        write_profile(project, "reldata", merged(run={"name": "reldata"},
                                                 data={**params["data"], **extra}))
        result = cli(project, "data", "reldata")
        problem = one_line_error(result, str(target), *named)
        if problem is None and cache.exists():
            problem = "the previous cache is still there"
        if problem is None and index < 2:   # what a later stage then does (the same for every case)
            vanilla = cli(project, "vanilla", "reldata")
            problem = one_line_error(vanilla, str(cache), "python -m pipeline_src data --profile reldata")
        record("bad data inputs", case, expected, problem, result.stderr.strip())

    # Params changed after the data stage (no failure at all): the cache is refused.
    write_profile(project, "rel", merged(data={"val_size": 400}))
    result = cli(project, "vanilla", "rel")
    write_profile(project, "rel", TINY)
    record("bad data inputs", "cache of other data params (val_size changed, data stage not rerun)",
           expected, one_line_error(result, str(project / CACHE), "data.val_size: 500 in the cache, 400 in the params",
                                    "python -m pipeline_src data --profile rel"), result.stderr.strip())
    rows = LEDGER["bad data inputs"]
    assert len(rows) >= 10
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]


# ---------------------------------------------------------------- kills during training
KILLS = 3


def vanilla_weights(root: Path) -> str:
    import torch

    from pipeline_src.io import state_dict_sha256

    return state_dict_sha256(torch.load(root / VANILLA / "model.pt", weights_only=False)["state_dict"])


def test_kills_at_random_points_resume_to_the_same_weights(project: Path, ledger):
    """Each kill: a fresh `vanilla` run, SIGKILL to its process group at a random point
    (start-up, an epoch, a checkpoint write, the evaluation), then the same command again."""
    expected = "no final output after the kill; the rerun resumes; bit-identical weights"
    outputs = [project / VANILLA / name for name in ("model.pt", "metrics.json", "history.csv", "checkpoint.pt")]
    cli(project, "vanilla", "rel", check=True)
    reference = vanilla_weights(project)

    epoch_seconds = min(float(row["seconds"]) for row in csv.DictReader(open(project / VANILLA / "history.csv")))
    epochs = TINY["vanilla"]["epochs"]
    rng = random.Random(14)
    for kill in range(KILLS):
        for path in outputs:
            path.unlink(missing_ok=True)
        # A random point: after the checkpoint of a random epoch (0: before the first),
        # a random part of an epoch later (training, a checkpoint write, the evaluation).
        after_epoch, delay = rng.randrange(epochs), rng.uniform(0.0, 0.9) * epoch_seconds
        job = subprocess.Popen([sys.executable, "-m", "pipeline_src", "vanilla", "--profile", "rel"], cwd=project,
                               env=tool_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        while after_epoch and job.poll() is None and (_checkpoint_epoch(outputs[-1]) or 0) < after_epoch:
            time.sleep(0.1)
        try:
            job.wait(timeout=delay if after_epoch else delay + 2.0)   # start-up: a couple of seconds
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        epoch = _checkpoint_epoch(outputs[-1])
        case = (f"kill {kill + 1}: " + (f"{delay:.1f} s after epoch {after_epoch}'s checkpoint" if after_epoch
                else f"{delay + 2.0:.1f} s after the start") + f" (checkpoint on disk: epoch {epoch})")
        if job.returncode != -signal.SIGKILL:
            record("kills during training", case, expected, f"the run ended (status {job.returncode}) before the kill")
            continue
        if any(path.exists() for path in outputs[:3]):
            record("kills during training", case, expected, "a killed run left a final output")
            continue
        rerun = cli(project, "vanilla", "rel")
        problem = None
        if rerun.returncode != 0:
            problem = f"the rerun failed: {rerun.stderr[-500:]}"
        elif epoch and f"continuing after epoch {epoch}" not in rerun.stdout:
            problem = f"the rerun did not resume from the checkpoint of epoch {epoch}"
        elif vanilla_weights(project) != reference:
            problem = "the final weights differ from those of the run never killed"
        record("kills during training", case, expected, problem,
               f"resumed after epoch {epoch}, bit-identical" if epoch
               else "restarted (no checkpoint yet), bit-identical")
    rows = LEDGER["kills during training"]
    assert len(rows) == KILLS
    assert all(row["ok"] for row in rows), rows


def _checkpoint_epoch(path: Path) -> int | None:
    if not path.is_file():
        return None
    import torch

    try:
        return int(torch.load(path, weights_only=False)["epoch"])
    except Exception:
        return None
