"""Adding a certified method is three edits: its module in pipeline_src/methods/, its params
block in params.yaml and its schema block (with the method's facts under `x-method`).

The test makes exactly those three edits in a copy of the project, adds the method to the
smoke profile's `methods`, and runs it where a method goes: one training step, certification,
the report's collect and Table 2, and the train rule's code inputs (code_deps)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from pipeline_src import code_deps

ROOT = Path(__file__).resolve().parent.parent

TOY_MODULE = '''"""Toy: LMT under another name (tests/test_methods_registry.py)."""
from .base import register
from .lmt import LMT


@register
class Toy(LMT):
    name = "toy"
'''
TOY_SCHEMA_BLOCK = '''  toy:
    x-method: {label: Toy, paired_with: null, similarity_term: false, colour: "#000000"}
    $ref: "#/$defs/certified_method"
'''

# Runs in the copy (its own pipeline_src, params and schema), in a process of its own: the
# methods and their facts are read once per process, when the package is imported.
SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch

    root = Path.cwd()
    sys.path.insert(0, sys.argv[1])   # the project's tests, for the report's fake metrics files
    from conftest import save_cut_cache
    from test_report import write_fake_runs

    from pipeline_src.certify.stage import certify_model
    from pipeline_src.config import load_params
    from pipeline_src.data.cifar import build_cache
    from pipeline_src.methods import METHODS
    from pipeline_src.paths import RunLayout
    from pipeline_src.report.collect import collect
    from pipeline_src.report.tables import table2
    from pipeline_src.runs import METHOD_FACTS, method_runs
    from pipeline_src.training.certified import train_certified

    params = load_params("smoke")
    assert params["methods"] == ["bcp", "toy"], params["methods"]
    assert METHODS["toy"].facts == METHOD_FACTS["toy"] and METHOD_FACTS["toy"].label == "Toy"
    assert list(method_runs(params)) == ["bcp", "toy"]

    layout = RunLayout.of(params)
    cache = build_cache({**params["data"], "val_size": 20}, root / "full.pt", root / "full.json", root)
    small = {**cache.__dict__, "train_x": cache.train_x[:20], "train_y": cache.train_y[:20]}
    save_cut_cache(small, root / layout.data_cache, params["data"])
    params["toy"].update(epochs=1, warmup_epochs=0, ramp_epochs=1, batch_size=20)   # one step
    params["certify"] = {**params["certify"], "batch_size": 20, "test_images": 10, "radius_points": 2}
    trained = train_certified(params, "toy", root)
    assert trained["method"] == "toy"
    certified = certify_model(params, "toy", root)
    assert certified["method"] == "toy" and 0.0 <= certified["headline_certified_accuracy"] <= 100.0

    report_root = root / "report"
    params["benchmark"]["enabled"] = False
    write_fake_runs(report_root, params, {"toy": {"clean": 50.0, "certified": 30.0}})
    inputs = collect(params, report_root)
    assert [run.label for run in inputs.runs] == ["BCP", "Toy"]
    rows = table2(inputs).rows
    assert any(row[0] == "Toy" for row in rows), rows
    print("toy method ok")
''')


def copy_project(destination: Path) -> Path:
    shutil.copytree(ROOT / "pipeline_src", destination / "pipeline_src",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "workflow" / "schemas", destination / "workflow" / "schemas")
    shutil.copytree(ROOT / "config" / "smoke", destination / "config" / "smoke")
    shutil.copy2(ROOT / "params.yaml", destination / "params.yaml")
    return destination


def add_toy_method(root: Path) -> None:
    """The three edits of a new method, and the profile that trains it."""
    (root / "pipeline_src" / "methods" / "toy.py").write_text(TOY_MODULE)
    lmt_block = yaml.safe_load((root / "params.yaml").read_text())["lmt"]
    with open(root / "params.yaml", "a") as fh:
        fh.write("\n" + yaml.safe_dump({"toy": lmt_block}, sort_keys=False))
    schema = root / "workflow" / "schemas" / "params.schema.yaml"
    anchor = "  benchmark:\n"
    assert schema.read_text().count(anchor) == 1
    schema.write_text(schema.read_text().replace(anchor, TOY_SCHEMA_BLOCK + anchor))
    profile = root / "config" / "smoke" / "params.yaml"
    methods_line = "methods: [lmt, bcp, localbcp, duet, gloro, duet_local]\n"
    assert methods_line in profile.read_text()
    profile.write_text(profile.read_text().replace(methods_line, "methods: [bcp, toy]\n"))


def test_a_method_added_in_three_edits_trains_certifies_and_reaches_the_report(tmp_path: Path):
    root = copy_project(tmp_path / "project")
    add_toy_method(root)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "tests")], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "toy method ok" in done.stdout


def test_a_method_module_is_a_code_input_of_the_train_rule_only(tmp_path: Path):
    """code_deps sees every module of pipeline_src/methods (the package imports them by
    discovery): a new method module, and an edit of an existing one, change the train and
    certify rules' code inputs and leave the data rule's alone."""
    root = copy_project(tmp_path / "project")
    package = root / "pipeline_src"
    (package / "methods" / "toy.py").write_text(TOY_MODULE)
    train = code_deps.stage_code("_stage_train", package, root)
    assert "pipeline_src/methods/toy.py" in train and "pipeline_src/methods/gloro.py" in train
    assert "pipeline_src/methods/toy.py" in code_deps.stage_code("_stage_certify", package, root)
    assert not [f for f in code_deps.stage_code("_stage_data", package, root) if "/methods/" in f]

