"""Smoke test of bench/bench_core.py: it runs to the end and prints every row.

No timing is asserted, ever: this only checks that the harness works (and that
both storages get through every workload with correct data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_core.py"
ROWS = ["1", "2", "3", "3b", "4a", "4b", "5", "5b", "5c", "5d", "6"]


def refstorage_available() -> bool:
    try:
        import refstorage

        return hasattr(refstorage, "FileStorage")
    except ImportError:
        return False


def run_bench(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--objects", "2000", "--tmpdir", str(tmp_path),
         "--json", str(out), *extra],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def check_output(proc: subprocess.CompletedProcess[str], result: dict) -> None:
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "workload"
    printed = [line.split("|")[1].strip().split(".")[0] for line in table[1:]]
    assert printed == ROWS
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    for key, row in rows.items():
        assert row["error"] is None, key
        assert row["fs"] is not None and row["rs"] is not None, key
        assert row["result"] in ("PASS", "MISS", "info"), key
    assert result["machine"]["ZODB"]
    assert result["machine"]["nproc"]
    # The scratch directory is removed at exit.
    assert not [p for p in os.listdir(os.path.dirname(result["machine"]["tmp_dir"]))
                if p.startswith("refstorage-bench-")]


def test_bench_self_test(tmp_path: Path) -> None:
    """The harness itself, with ZODB's FileStorage on both sides."""
    proc, result = run_bench(tmp_path, "--self-test")
    check_output(proc, result)


@pytest.mark.skipif(not refstorage_available(), reason="refstorage.FileStorage not importable yet")
def test_bench_refstorage(tmp_path: Path) -> None:
    proc, result = run_bench(tmp_path)
    check_output(proc, result)
    assert result["machine"]["rs_class"].startswith("refstorage")
