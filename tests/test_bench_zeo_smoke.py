"""Smoke test of bench/bench_zeo.py: it runs to the end with tiny sizes.

No timing is asserted: this only checks that the harness works (both servers
start, every client process gets through every workload, every row prints).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_zeo.py"


def test_bench_zeo_runs(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--clients", "2", "--objects", "200", "--commits", "5",
         "--loads", "20", "--tmpdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == [
        f"{kind}, {n} client(s)" for kind in ("commits", "cold loads", "warm loads") for n in (2,)]
    result = json.loads(out.read_text())
    for row in result["rows"]:
        assert row["result"] in ("PASS", "MISS")
        assert all(v > 0 for v in row["fs"] + row["rs"]), row
    # the scratch directory is removed at exit
    assert not [p for p in os.listdir(tmp_path) if p.startswith("refstorage-bench-zeo-")]
