"""Smoke test of bench/bench_scale.py: every phase runs on both storages and the table prints.

No timing is asserted: this checks the harness (and that both storages get the
same answers where the benchmark can compare them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_scale.py"


def test_bench_scale_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--tmpdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())
    (size, res), = result["results"].items()
    assert size == "5000"
    phases = ["build", "convert", "reopen_index", "reopen_scan", "cold_loads", "verify", "info",
              "refs", "backup_full", "backup_incr", "pack"]
    rs_only = ["refs_index_build", "refs_index", "refs_index_update"]
    assert sorted(res) == sorted(phases + rs_only)
    for phase in phases:
        for kind in ("fs", "rs"):
            assert res[phase][kind]["maxrss"] > 0, (phase, kind)
    # the referrer index: built, used, then updated after backup_incr's transactions; same answer
    assert [res[p]["rs"]["note"] for p in rs_only] == ["built", "used", "updated"]
    assert all(res[p]["rs"]["referrers"] == 1 for p in rs_only)
    # same database on both sides
    assert res["build"]["fs"]["last_oid"] == res["build"]["rs"]["last_oid"]
    assert res["reopen_index"]["fs"]["objects"] == res["reopen_index"]["rs"]["objects"]
    assert res["reopen_scan"]["rs"]["objects"] == res["reopen_index"]["rs"]["objects"]
    assert res["cold_loads"]["fs"]["found"] == res["cold_loads"]["rs"]["found"] > 0
    assert res["verify"]["fs"]["ok"] and res["verify"]["rs"]["ok"]
    assert res["refs"]["fs"]["referrers"] == res["refs"]["rs"]["referrers"] == 1
    # a quarter of the objects were made unreachable: pack removed them on both
    assert res["pack"]["fs"]["objects_after"] == res["pack"]["rs"]["objects_after"]
    assert res["pack"]["rs"]["objects_after"] < res["reopen_index"]["rs"]["objects"]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| figure | objects | FileStorage | refstorage")
    assert any(line.startswith("| pack with GC (s) | 5,000 |") for line in table)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("refstorage-scale-")]
    # the table can be printed again from the JSON file
    again = subprocess.run([sys.executable, str(BENCH), "--table-from", str(out)],
                           capture_output=True, text=True, env=env, timeout=60, check=True)
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == table


def test_bench_scale_only_convert(tmp_path: Path) -> None:
    """--only convert builds the FileStorage file alone and measures convert --rounds times."""
    out = tmp_path / "conv.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "convert", "--rounds", "2",
         "--tmpdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    (res,) = json.loads(out.read_text())["results"].values()
    assert sorted(res) == ["build", "convert"]
    assert list(res["build"]) == ["fs"]
    for kind in ("fs", "rs"):
        assert len(res["convert"][kind]["rounds"]) == 2
        assert res["convert"][kind]["size"] > 0
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| convert")]
    assert len(rows) == 2
    bad = subprocess.run([sys.executable, str(BENCH), "--only", "nonsense"], capture_output=True,
                         text=True, env=env, timeout=60, check=False)
    assert bad.returncode == 2 and "unknown phases" in bad.stderr
