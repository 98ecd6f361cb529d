"""Smoke test of bench/bench_inspect.py: it runs to the end with tiny sizes (file and zeo://).

No timing is asserted: this only checks that the harness works (the database is
written, both sources index it, every page answers 200, the table prints).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flask")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_inspect.py"


def test_bench_inspect_runs(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--tmpdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = json.loads(out.read_text())
    assert [r["objects"] for r in rows] == [5000] and rows[0]["records"] == 5250
    assert len(rows[0]["file_pages"]) == len(rows[0]["zeo_pages"]) == 13  # (every page answered 200)
    # the same database, the same pack forecast from both sources (revisions, objects removed)
    assert rows[0]["file_forecast"] == rows[0]["zeo_forecast"] and rows[0]["file_forecast"][0] == 250
    assert [line for line in proc.stdout.splitlines() if line.startswith("| 5,000 | 5,250 |")]
