"""Record every test's duration: run the whole suite as CI does and write
tests/durations.json, which tests/conftest.py reads to mark the `slow` tests
(5 s or more). Run it in a clean clone on an otherwise idle machine:

    python tools/record_durations.py            # the suite as CI runs it (-n 2)

The file holds, per test node id, setup + call + teardown seconds, and beside
them the commit, the date, the machine's cores, the pytest command and its wall
time, so a reader knows what was measured where."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "durations.json"
LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)")


def parse_durations(text: str) -> dict[str, float]:
    """{node id: seconds} from pytest's `--durations=0 --durations-min=0` report."""
    seconds: dict[str, float] = {}
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            seconds[match.group(3)] = round(seconds.get(match.group(3), 0.0) + float(match.group(1)), 2)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="2", help="pytest-xdist workers (-n), as CI runs the suite")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "pytest", "-q", "-n", args.workers, "--durations=0", "--durations-min=0",
               "-p", "no:cacheprovider"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    sys.stdout.write(result.stdout[-2000:])
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        print(f"the suite failed ({result.returncode}): {OUT} not written", file=sys.stderr)
        return result.returncode
    seconds = parse_durations(result.stdout)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    OUT.write_text(json.dumps({
        "what": "seconds per test (setup + call + teardown), the whole suite as CI runs it",
        "commit": commit, "date": datetime.date.today().isoformat(), "cores": os.cpu_count(),
        "command": " ".join(["python"] + command[1:]), "wall_seconds": round(wall, 1),
        "tests": len(seconds), "seconds": dict(sorted(seconds.items())),
    }, indent=1) + "\n")
    print(f"wrote {OUT}: {len(seconds)} tests, {wall:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
