#!/usr/bin/env python
"""Pack benchmark: refstorage.FileStorage against ZODB's FileStorage, in one run.

    PYTHONPATH=src python bench/bench_pack.py [--objects N] [--quick] [--rounds R] [--json OUT]

The same history is built through ZODB.DB on both storages (each in its own
child process, the two in parallel): N small persistent objects (ZODB's
MinPO) under an OOBTree and an IOBTree, half in each, created in
transactions of 10,000, then rewritten twice (3 revisions each), then half of
them removed from the trees (unreachable).  Each storage's file is then packed
to "now" in a fresh child process per round, on a fresh copy of the built
file: one child per storage and round, run one after the other, never in
parallel.

Reported per storage: seconds of pack(), the peak RSS growth of the child
during the pack (VmHWM reset just before pack() via /proc/self/clear_refs,
minus VmRSS before), file sizes before and after; with --tracemalloc also the
tracemalloc peak during pack (in a separate child: tracemalloc slows Python
down several times, and it does not see the malloc'ed C arrays of ZODB's
BTrees-based fsIndex, so it flatters FileStorage).  After the first round's
pack the child checks that every object still in the trees loads with its last
revision and that a sample of the removed ones raises POSKeyError.  CPU time
is reported too: on a shared machine it varies less than wall time.

Targets: refstorage at least 5x faster (FileStorage seconds / refstorage
seconds >= 5) with peak memory no higher (refstorage / FileStorage <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 10_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- child side ------------------------------------------------------------------------

def _open(kind: str, path: str, **kw):
    if kind == "fs":
        from ZODB.FileStorage import FileStorage
        return FileStorage(path, **kw)
    import refstorage
    return refstorage.FileStorage(path, **kw)


def _removed(i: int) -> bool:
    """Half of the objects of each tree are removed: i even goes to oo, odd to io."""
    return (i // 2) % 2 == 0


def child_build(kind: str, path: str, n: int) -> dict:
    import transaction
    from BTrees.IOBTree import IOBTree
    from BTrees.OOBTree import OOBTree
    from ZODB import DB
    from ZODB.tests.MinPO import MinPO

    started = time.perf_counter()
    db = DB(_open(kind, path, create=True), cache_size=2 * BATCH)
    conn = db.open()
    root = conn.root()
    root["oo"], root["io"] = OOBTree(), IOBTree()
    transaction.commit()
    oo, io = root["oo"], root["io"]

    def obj_of(i):
        return oo[f"k{i:09d}"] if i % 2 == 0 else io[i]

    for start in range(0, n, BATCH):
        for i in range(start, min(n, start + BATCH)):
            if i % 2 == 0:
                oo[f"k{i:09d}"] = MinPO((i, 1))
            else:
                io[i] = MinPO((i, 1))
        transaction.commit()
        conn.cacheMinimize()
    for rev in (2, 3):
        for start in range(0, n, BATCH):
            for i in range(start, min(n, start + BATCH)):
                obj_of(i).value = (i, rev)
            transaction.commit()
            conn.cacheMinimize()
    removed_oids = []
    for start in range(0, n, BATCH):
        for i in range(start, min(n, start + BATCH)):
            if _removed(i):
                if len(removed_oids) < 1000 and i % 97 == 0:
                    removed_oids.append(obj_of(i)._p_oid.hex())
                if i % 2 == 0:
                    del oo[f"k{i:09d}"]
                else:
                    del io[i]
        transaction.commit()
        conn.cacheMinimize()
    conn.close()
    db.close()
    return {"seconds": time.perf_counter() - started, "size": os.path.getsize(path),
            "removed_sample": removed_oids}


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def child_pack(kind: str, path: str, n: int, removed_sample: list[str], use_tracemalloc: bool,
               check: bool) -> dict:
    import gc

    from ZODB.serialize import referencesf

    storage = _open(kind, path)
    size_before = os.path.getsize(path)
    t = time.time()
    gc.collect()
    if use_tracemalloc:
        import tracemalloc
        tracemalloc.start()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss_before = _status()["VmRSS"]
    started = time.perf_counter()
    cpu_started = time.process_time()
    storage.pack(t, referencesf)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    status = _status()
    traced = None
    if use_tracemalloc:
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    size_after = os.path.getsize(path)
    objects_after = len(storage)
    storage.close()
    result = verify(kind, path, n, removed_sample) if check else "not checked"
    return {"seconds": seconds, "cpu": cpu, "rss_before": rss_before, "hwm": status["VmHWM"],
            "peak_growth": status["VmHWM"] - rss_before if hwm_reset else None,
            "tracemalloc_peak": traced, "size_before": size_before, "size_after": size_after,
            "objects_after": objects_after, "check": result}


def verify(kind: str, path: str, n: int, removed_sample: list[str]) -> str:
    """Every object left in the trees loads with revision 3; removed ones are gone."""
    from ZODB import DB
    from ZODB.POSException import POSKeyError

    storage = _open(kind, path, read_only=True)
    db = DB(storage)
    try:
        conn = db.open()
        root = conn.root()
        seen = 0
        for tree in (root["oo"], root["io"]):
            for i, obj in enumerate(tree.values()):
                value = obj.value
                if value[1] != 3 or _removed(value[0]):
                    return f"ERROR: wrong object {value!r}"
                seen += 1
                if i % 5000 == 0:
                    conn.cacheMinimize()
        expected = sum(1 for i in range(n) if not _removed(i))
        if seen != expected:
            return f"ERROR: {seen} objects in the trees, expected {expected}"
        for oid in removed_sample:
            try:
                storage.load(bytes.fromhex(oid))
            except POSKeyError:
                continue
            return f"ERROR: removed object {oid} still loads"
        conn.close()
        return "ok"
    finally:
        db.close()


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["build", "pack"])
    p.add_argument("--kind", choices=["fs", "rs"], required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--objects", type=int, required=True)
    p.add_argument("--removed", default="[]")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    if a.what == "build":
        result = child_build(a.kind, a.path, a.objects)
    else:
        result = child_pack(a.kind, a.path, a.objects, json.loads(a.removed), a.tracemalloc, a.check)
    print("RESULT " + json.dumps(result), flush=True)


# -- parent side -----------------------------------------------------------------------

def spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(HERE), "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *args],
                            stdout=subprocess.PIPE, text=True, env=env)


def collect(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child failed with status {proc.returncode}")
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def copy_db(src: str, dst: str) -> None:
    for suffix in ("", ".index"):
        if os.path.exists(src + suffix):
            shutil.copyfile(src + suffix, dst + suffix)
    for suffix in (".old", ".pack", ".lock", ".tmp"):
        if os.path.exists(dst + suffix):
            os.remove(dst + suffix)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):,.1f} MiB"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, help="objects (default 500,000; --quick 50,000)")
    p.add_argument("--quick", action="store_true", help="10x smaller")
    p.add_argument("--rounds", type=int, help="pack rounds per storage (default 3; --quick 1)")
    p.add_argument("--tracemalloc", action="store_true",
                   help="also measure the tracemalloc peak (one more, slower, pack per storage)")
    p.add_argument("--tmpdir", help="scratch directory (default: a new one under the system's)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json", help="also write the raw numbers here")
    a = p.parse_args()
    n = a.objects or (50_000 if a.quick else 500_000)
    rounds = a.rounds or (1 if a.quick else 3)
    tmp = tempfile.mkdtemp(prefix="refstorage-bench-pack-", dir=a.tmpdir)
    names = {"fs": "ZODB FileStorage", "rs": "refstorage"}
    try:
        built = {kind: os.path.join(tmp, f"built-{kind}.{'fs' if kind == 'fs' else 'rfs'}")
                 for kind in ("fs", "rs")}
        log(f"building {n:,} objects x 3 revisions on both storages (in parallel) in {tmp} ...")
        procs = {kind: spawn("build", "--kind", kind, "--path", built[kind], "--objects", str(n))
                 for kind in ("fs", "rs")}
        builds = {kind: collect(proc) for kind, proc in procs.items()}
        for kind, b in builds.items():
            log(f"  {names[kind]}: built {b['size']:,} bytes in {b['seconds']:.1f} s")
        runs: dict[str, list[dict]] = {"fs": [], "rs": []}
        for r in range(rounds):
            for kind in (("fs", "rs") if r % 2 == 0 else ("rs", "fs")):
                work = os.path.join(tmp, f"work-{kind}.{'fs' if kind == 'fs' else 'rfs'}")
                copy_db(built[kind], work)
                extra = ["--check"] if r == 0 else []  # the packed file is checked once
                res = collect(spawn("pack", "--kind", kind, "--path", work, "--objects", str(n),
                                    "--removed", json.dumps(builds[kind]["removed_sample"]), *extra))
                runs[kind].append(res)
                log(f"  round {r + 1} {names[kind]}: {res['seconds']:.2f} s ({res['cpu']:.2f} s CPU), "
                    f"peak RSS growth "
                    f"{mib(res['peak_growth'])}, {res['size_before']:,} -> {res['size_after']:,} bytes, "
                    f"check {res['check']}")
        traced = {}
        if a.tracemalloc:
            for kind in ("fs", "rs"):
                work = os.path.join(tmp, f"work-{kind}.{'fs' if kind == 'fs' else 'rfs'}")
                copy_db(built[kind], work)
                res = collect(spawn("pack", "--kind", kind, "--path", work, "--objects", str(n),
                                    "--removed", json.dumps(builds[kind]["removed_sample"]),
                                    "--tracemalloc"))
                traced[kind] = res["tracemalloc_peak"]
                log(f"  tracemalloc {names[kind]}: peak {mib(traced[kind])}")
        med = {kind: statistics.median(x["seconds"] for x in runs[kind]) for kind in runs}
        cpu = {kind: statistics.median(x["cpu"] for x in runs[kind]) for kind in runs}
        growth = {kind: statistics.median((x["peak_growth"] or 0) for x in runs[kind]) for kind in runs}
        speedup = med["fs"] / med["rs"] if med["rs"] else float("inf")
        mem_ratio = growth["rs"] / growth["fs"] if growth["fs"] else float("inf")
        checks = {kind: sorted({x["check"] for x in runs[kind]} - {"not checked"}) for kind in runs}
        print(f"\npack of {n:,} objects x 3 revisions, half unreachable; median of {rounds} round(s); "
              f"python {sys.version.split()[0]}, {os.cpu_count()} cpus\n")
        print("| storage | pack s | CPU s | peak RSS growth | tracemalloc peak | file before | file after "
              "| check |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for kind in ("fs", "rs"):
            last = runs[kind][-1]
            print(f"| {names[kind]} | {med[kind]:.2f} | {cpu[kind]:.2f} | {mib(int(growth[kind]))} "
                  f"| {mib(traced.get(kind))} | {last['size_before']:,} | {last['size_after']:,} "
                  f"| {', '.join(checks[kind])} |")
        ok_speed = speedup >= 5
        ok_mem = mem_ratio <= 1
        print(f"\nspeed: refstorage is {speedup:.1f}x faster (target >= 5x): "
              f"{'PASS' if ok_speed else 'MISS'}  (CPU time: {cpu['fs'] / cpu['rs']:.1f}x)")
        print(f"memory: refstorage / FileStorage peak RSS growth = {mem_ratio:.2f} (target <= 1): "
              f"{'PASS' if ok_mem else 'MISS'}")
        if traced.get("fs") and traced.get("rs"):
            print(f"tracemalloc peak ratio (info; misses fsIndex's C arrays): "
                  f"{traced['rs'] / traced['fs']:.2f}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"objects": n, "rounds": rounds, "builds": builds, "runs": runs,
                           "tracemalloc": traced, "speedup": speedup, "memory_ratio": mem_ratio}, f,
                          indent=2)
        if any(c != "ok" for cs in checks.values() for c in cs):
            raise SystemExit("a packed database failed its check")
    finally:
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
