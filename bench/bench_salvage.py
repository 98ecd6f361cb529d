#!/usr/bin/env python
"""Salvage after single-bit flips: `refstorage recover` against ZODB's fsrecover.

    PYTHONPATH=src python bench/bench_salvage.py [--flips 40] [--seed 1] [--txns 31] [--objects 50]

The same history is written twice: through ZODB.DB into a refstorage file,
then copied (copyTransactionsFrom) into a ZODB FileStorage, so both hold the
same transactions and object revisions.  The default shape: 31 transactions
over an OOBTree of PersistentMappings (1 creating the tree, then 30 each
creating or rewriting `--objects` mappings), about 1,660 records.

For each of `--flips` random single-bit flips (a random byte of the whole
file, a random bit; seeded, drawn separately for each file since their sizes
differ), a fresh copy of the file is damaged and salvaged into a new file:
refstorage with `refstorage.tools.recover.recover`, FileStorage with
`ZODB.fsrecover.recover(..., partial=True, force=True)` (partial mode: keep
what it can of a damaged transaction).  The salvaged file is read back
through the storage's iterator and compared with the original, revision by
revision ((oid, tid) -> data): a revision is *lost* if it is missing or its
data differs; *wrong* counts the differing ones (data served that was never
written; fsrecover has no checksums, refstorage must have 0).

Prints the average revisions lost per flip for both, and with --json writes
the per-flip figures.  tests/reliability/test_salvage.py runs the refstorage
half on a small file and asserts at most 1 revision lost per flip on average.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping


def build(path: str, txns: int = 31, objects: int = 50, seed: int = 0) -> None:
    """A refstorage file: one transaction creating an OOBTree, then `txns - 1` each creating or
    rewriting `objects` PersistentMappings in it (about half new, half rewritten)."""
    import refstorage

    rnd = random.Random(seed)
    db = ZODB.DB(refstorage.FileStorage(path, create=True))
    conn = db.open()
    root = conn.root()
    root["tree"] = tree = OOBTree()
    transaction.get().note("tree")
    transaction.commit()
    n = 0
    for t in range(txns - 1):
        for _ in range(objects):
            if n and rnd.random() < 0.5:
                tree[f"k{rnd.randrange(n):05d}"]["v"] = rnd.random()
            else:
                tree[f"k{n:05d}"] = PersistentMapping(v=n, text="x" * rnd.randrange(40))
                n += 1
        transaction.get().note(f"batch {t}")
        transaction.get().setUser("bench")
        transaction.commit()
    conn.close()
    db.close()


def to_filestorage(src: str, dst: str) -> None:
    from ZODB.FileStorage import FileStorage

    import refstorage

    rs = refstorage.FileStorage(src, read_only=True)
    fs = FileStorage(dst, create=True)
    try:
        fs.copyTransactionsFrom(rs)
    finally:
        fs.close()
        rs.close()


def revisions(path: str, kind: str) -> dict[tuple[bytes, bytes], bytes | None]:
    """(oid, tid) -> data of every record the file's iterator yields."""
    if kind == "rs":
        import refstorage
        st = refstorage.FileStorage(path, read_only=True)
    else:
        from ZODB.FileStorage import FileStorage
        st = FileStorage(path, read_only=True)
    try:
        return {(r.oid, r.tid): r.data for t in st.iterator() for r in t}
    finally:
        st.close()


def flip(src: str, dst: str, rnd: random.Random) -> tuple[int, int]:
    data = bytearray(open(src, "rb").read())
    byte, bit = rnd.randrange(len(data)), rnd.randrange(8)
    data[byte] ^= 1 << bit
    with open(dst, "wb") as f:
        f.write(data)
    return byte, bit


def compare(orig: dict, got: dict) -> tuple[int, int]:
    """(revisions lost: missing or different, of which different)."""
    lost = wrong = 0
    for key, data in orig.items():
        if key not in got:
            lost += 1
        elif got[key] != data:
            lost += 1
            wrong += 1
    return lost, wrong


def salvage_refstorage(path: str, work: str) -> dict[tuple[bytes, bytes], bytes | None]:
    from refstorage.tools.recover import recover

    out = os.path.join(work, "out.rfs")
    for p in (out, out + ".index", out + ".lock"):
        if os.path.exists(p):
            os.remove(p)
    recover(path, out)
    return revisions(out, "rs")


def salvage_filestorage(path: str, work: str) -> dict[tuple[bytes, bytes], bytes | None]:
    from ZODB.fsrecover import recover

    out = os.path.join(work, "out.fs")
    for suffix in ("", ".index", ".lock", ".tmp"):
        if os.path.exists(out + suffix):
            os.remove(out + suffix)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            recover(path, out, verbose=0, partial=True, force=True)
        return revisions(out, "fs")
    except Exception:  # fsrecover gave up, or wrote a file its storage cannot read: nothing salvaged
        return {}


def measure(kind: str, original: str, flips: int, seed: int, work: str) -> list[dict]:
    orig = revisions(original, kind)
    rnd = random.Random(f"{seed}-{kind}")
    damaged = os.path.join(work, "damaged" + (".rfs" if kind == "rs" else ".fs"))
    rows = []
    for _ in range(flips):
        byte, bit = flip(original, damaged, rnd)
        for suffix in (".index", ".lock", ".tmp"):
            if os.path.exists(damaged + suffix):
                os.remove(damaged + suffix)
        got = (salvage_refstorage if kind == "rs" else salvage_filestorage)(damaged, work)
        lost, wrong = compare(orig, got)
        rows.append({"byte": byte, "bit": bit, "lost": lost, "wrong": wrong,
                     "invented": len(set(got) - set(orig))})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flips", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--txns", type=int, default=31)
    ap.add_argument("--objects", type=int, default=55, help="objects created or rewritten per transaction")
    ap.add_argument("--json", help="write the per-flip figures here")
    ap.add_argument("--tmpdir")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="rfs-salvage-", dir=args.tmpdir)
    try:
        rs_path = os.path.join(work, "Data.rfs")
        fs_path = os.path.join(work, "Data.fs")
        build(rs_path, args.txns, args.objects, args.seed)
        to_filestorage(rs_path, fs_path)
        nrev = len(revisions(rs_path, "rs"))
        assert revisions(fs_path, "fs") == revisions(rs_path, "rs"), "the two files hold other revisions"
        print(f"{args.txns} transactions, {nrev} records; refstorage {os.path.getsize(rs_path):,} bytes, "
              f"FileStorage {os.path.getsize(fs_path):,} bytes; {args.flips} single-bit flips each "
              f"(seed {args.seed})")
        result = {"transactions": args.txns, "records": nrev, "flips": args.flips, "seed": args.seed}
        for kind, name in (("rs", "refstorage recover"), ("fs", "ZODB fsrecover (partial)")):
            started = time.perf_counter()
            rows = measure(kind, rs_path if kind == "rs" else fs_path, args.flips, args.seed, work)
            lost = sum(r["lost"] for r in rows)
            wrong = sum(r["wrong"] for r in rows)
            invented = sum(r["invented"] for r in rows)
            worst = max(r["lost"] for r in rows)
            print(f"{name:26s} revisions lost per flip: {lost / len(rows):6.2f} (total {lost}; wrong data "
                  f"{wrong}; revisions not in the original {invented}; worst flip {worst}"
                  f"; {time.perf_counter() - started:.1f} s)")
            result[kind] = {"lost_per_flip": lost / len(rows), "lost": lost, "wrong": wrong,
                            "invented": invented, "rows": rows}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
