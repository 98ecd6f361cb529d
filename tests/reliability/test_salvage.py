"""`refstorage recover` salvages record by record: random single-bit flips of a small file.

For each flip (a random byte of the whole file, a random bit; seeded), the
damaged copy is recovered into a new file, which is read back revision by
revision ((oid, tid) -> data) and compared with the original.  Required:

- no revision with other data than was written, and none that was not
  written (checksums: salvage never invents or corrupts);
- the report names exactly the lost revisions -- as (oid, tid) pairs -- and
  its outcome (the command's exit status) is "losses" exactly when one was
  lost, "repaired" otherwise;
- on average at most 1 revision lost per flip (the record the flip hit; a
  flip in a header, an oid table, a trailer or a status byte loses nothing).

The figures are printed with -s; bench/bench_salvage.py measures ZODB's
fsrecover on the same shape beside it (docs/reliability.md).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from refstorage.tools.recover import recover

from .helpers import report, scaled, temp_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_salvage  # noqa: E402

pytestmark = pytest.mark.reliability


def test_random_bit_flips_lose_at_most_one_revision_on_average():
    flips = scaled(40, 400)
    rnd = random.Random(11)
    lost_total = 0
    by_outcome: dict[str, int] = {}
    worst = 0
    with temp_dir() as d:
        original = os.path.join(d, "Data.rfs")
        bench_salvage.build(original, txns=8, objects=12, seed=3)
        orig = bench_salvage.revisions(original, "rs")
        damaged = os.path.join(d, "Damaged.rfs")
        out = os.path.join(d, "Out.rfs")
        for i in range(flips):
            byte, bit = bench_salvage.flip(original, damaged, rnd)
            for p in (out, out + ".index", out + ".lock"):
                if os.path.exists(p):
                    os.remove(p)
            rep = recover(damaged, out)
            got = bench_salvage.revisions(out, "rs")
            where = f"flip {i}: byte {byte} bit {bit}"
            assert set(got) <= set(orig), f"{where}: revisions that were never written"
            missing = {k for k, v in orig.items() if k not in got}
            assert all(got[k] == orig[k] for k in got), f"{where}: wrong data"
            named = {(x.oid, x.tid) for x in rep.lost}
            assert named == missing, f"{where}: the report names {named}, lost are {missing}"
            assert rep.outcome == ("losses" if missing else "repaired"), f"{where}: {rep.outcome}"
            assert not {k: n for k, n in rep.verify.counts.items() if k != "dangling"}, where
            lost_total += len(missing)
            worst = max(worst, len(missing))
            by_outcome[rep.outcome] = by_outcome.get(rep.outcome, 0) + 1
        size = os.path.getsize(original)
    average = lost_total / flips
    report("salvage", file_bytes=size, revisions=len(orig), flips=flips, lost=lost_total,
           lost_per_flip=round(average, 3), worst_flip=worst, outcomes=by_outcome)
    assert average <= 1.0, f"{average:.2f} revisions lost per flip"


def test_the_bench_compares_with_fsrecover(tmp_path):
    """The bench's FileStorage half runs: fsrecover on the same history, figures comparable."""
    rs = str(tmp_path / "Data.rfs")
    fs = str(tmp_path / "Data.fs")
    bench_salvage.build(rs, txns=3, objects=5, seed=1)
    bench_salvage.to_filestorage(rs, fs)
    assert bench_salvage.revisions(fs, "fs") == bench_salvage.revisions(rs, "rs")
    rows = bench_salvage.measure("fs", fs, 3, 1, str(tmp_path))
    assert len(rows) == 3 and all(0 <= r["wrong"] <= r["lost"] for r in rows)


def _mutate(data: bytes, rnd: random.Random) -> tuple[bytes, list]:
    """1 to 4 of: bit flips, cuts, insertions of random bytes, zeroed runs, a truncation."""
    m = bytearray(data)
    ops: list = []
    for _ in range(rnd.randint(1, 4)):
        k, p = rnd.random(), rnd.randrange(len(m))
        if k < 0.5:
            m[p] ^= 1 << rnd.randrange(8)
            ops.append(("flip", p))
        elif k < 0.65:
            n = rnd.randint(1, 300)
            del m[p:p + n]
            ops.append(("cut", p, n))
        elif k < 0.8:
            n = rnd.randint(1, 300)
            m[p:p] = bytes(rnd.getrandbits(8) for _ in range(n))
            ops.append(("insert", p, n))
        elif k < 0.9:
            n = rnd.randint(1, 64)
            m[p:p + n] = bytes(n)
            ops.append(("zero", p, n))
        else:
            del m[p:]
            ops.append(("truncate", p))
    return bytes(m), ops


def test_random_damage_never_yields_wrong_or_invented_revisions():
    """Several flips, cuts, insertions, zeroed runs, truncations: recover raises only the
    package's errors, and what it writes is always a subset of what was written, under
    the original tids (found by this fuzzing: records split by inserted bytes were
    written under a new tid)."""
    from refstorage.errors import RefStorageError

    cases = scaled(60, 600)
    rnd = random.Random(5)
    outcomes: dict[str, int] = {}
    with temp_dir() as d:
        original = os.path.join(d, "Data.rfs")
        bench_salvage.build(original, txns=8, objects=12, seed=3)
        orig = bench_salvage.revisions(original, "rs")
        data = open(original, "rb").read()
        src, out = os.path.join(d, "Damaged.rfs"), os.path.join(d, "Out.rfs")
        for i in range(cases):
            damaged, ops = _mutate(data, rnd)
            for p in (out, out + ".index", out + ".lock"):
                if os.path.exists(p):
                    os.remove(p)
            with open(src, "wb") as f:
                f.write(damaged)
            try:
                rep = recover(src, out)
            except RefStorageError as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                continue
            got = bench_salvage.revisions(out, "rs")
            assert set(got) <= set(orig), f"case {i} {ops}: revisions never written"
            assert all(got[k] == orig[k] for k in got), f"case {i} {ops}: wrong data"
            outcomes[rep.outcome] = outcomes.get(rep.outcome, 0) + 1
    report("salvage-fuzz", cases=cases, outcomes=outcomes)
