#!/usr/bin/env python
"""Scale benchmark (issue 14): refstorage against ZODB's FileStorage at 1M, 2M (10M) objects.

    PYTHONPATH=src python bench/bench_scale.py [--objects 1000000,2000000] [--quick]
                                               [--tmpdir DIR] [--json OUT] [--keep]

For each size N the same database is built through ZODB.DB on both storages,
one after the other (never in parallel): N small persistent objects (ZODB's
MinPO) under an OOBTree and an IOBTree (half in each), created in
transactions of 10,000, rewritten twice (3 revisions each), then a quarter of
them removed from the trees (unreachable, garbage for pack).  The 10M point
runs only when asked for (``--objects 10000000``).

Every heavy phase then runs in a fresh child process, so its peak RSS
(``ru_maxrss``, the whole process: interpreter, imports, open and the work) is
that phase's alone.  Phases, each for both storages:

    build          the ZODB.DB build above (seconds)
    convert        FileStorage -> refstorage (refstorage.copying.copy_transactions, what
                   `refstorage convert` runs) against ZODB's FileStorage -> FileStorage
                   copyTransactionsFrom, from the same FileStorage file
    reopen_index   open with the index file (seconds; VmRSS after open; ru_maxrss)
    reopen_scan    open without the index file (rebuilt by a scan; read-only, not saved)
    cold_loads     20,000 random loads after posix_fadvise(DONTNEED) on the data file
    verify         `refstorage verify` (tools.verify.verify) against ZODB's fstest.check
                   (structure of every record; neither unpickles); MB/s of the file
    backup_full    `refstorage backup --full` against repozo -B -F
    backup_incr    after 10 more transactions of 1,000 changes: incremental backup of
                   each (refstorage backup; repozo -B)
    info           `refstorage info` against ZODB's scripts/analyze.py (per-class report)
    refs           referrers of one object by a scan: `refstorage refs --scan` against ZODB's
                   FileStorage.fsoids.Tracer (the FileStorage way to find them)
    refs_index     refstorage only: `refstorage refs` with the referrer index
                   (<name>.referrers): its one-time build (the first run: build and query;
                   seconds, peak RSS, file size), then a query with it in a fresh process,
                   and (after backup_incr's 10 more transactions, or 10 of its own when
                   backup is not measured) the query that updates it incrementally
    pack           pack to now with GC (seconds, ru_maxrss)

Ratios are refstorage / FileStorage (seconds: lower is better for refstorage;
for verify MB/s, higher).  ``--quick`` builds 5,000 objects (a smoke test:
tests/test_bench_scale_smoke.py; no figure of it means anything).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 10_000
N_LOADS = 20_000
EXTRA_TXNS = 10
EXTRA_CHANGES = 1_000
KINDS = ("fs", "rs")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- child side ------------------------------------------------------------------------

def _open(kind: str, path: str, **kw):
    if kind == "fs":
        from ZODB.FileStorage import FileStorage
        return FileStorage(path, **kw)
    import refstorage
    return refstorage.FileStorage(path, **kw)


def _index_path(kind: str, path: str) -> str:
    return path + ".index"


def _removed(i: int) -> bool:
    return i % 4 == 0


def _vmrss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


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
    live = obj_of(1)._p_oid.hex()  # an object kept: its referrer is a bucket of io
    for start in range(0, n, BATCH):
        for i in range(start, min(n, start + BATCH)):
            if _removed(i):
                if i % 2 == 0:
                    del oo[f"k{i:09d}"]
                else:
                    del io[i]
        transaction.commit()
        conn.cacheMinimize()
    last_oid = u64(db.storage.new_oid()) - 1
    conn.close()
    db.close()
    return {"seconds": time.perf_counter() - started, "size": os.path.getsize(path),
            "live_oid": live, "last_oid": last_oid}


def u64(b: bytes) -> int:
    return int.from_bytes(b, "big")


def child_append(kind: str, path: str, n: int) -> dict:
    """EXTRA_TXNS transactions of EXTRA_CHANGES changes, for the incremental backup."""
    import transaction
    from ZODB import DB

    db = DB(_open(kind, path))
    conn = db.open()
    io = conn.root()["io"]
    keys = [i for i in range(1, n, 2) if not _removed(i)]
    rng = random.Random(7)
    for t in range(EXTRA_TXNS):
        for i in rng.sample(keys, min(EXTRA_CHANGES, len(keys))):
            io[i].value = (i, 100 + t)
        transaction.commit()
        conn.cacheMinimize()
    conn.close()
    db.close()
    return {"size": os.path.getsize(path)}


def _cpu() -> float:
    """CPU seconds of this process so far (user + system): less sensitive than wall
    time to the other processes of a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_convert(kind: str, src: str, dst: str) -> dict:
    from ZODB.FileStorage import FileStorage

    source = FileStorage(src, read_only=True)
    started = time.perf_counter()
    cpu = _cpu()
    if kind == "fs":
        dest = FileStorage(dst, create=True)
        dest.copyTransactionsFrom(source)
    else:
        import refstorage
        from refstorage.copying import copy_transactions
        dest = refstorage.FileStorage(dst, create=True)
        copy_transactions(source, dest)
    dest.close()
    seconds = time.perf_counter() - started
    cpu = _cpu() - cpu
    source.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "size": os.path.getsize(dst)}


def child_reopen(kind: str, path: str, with_index: bool) -> dict:
    # The storage's module is imported first, and timed apart: "seconds" is the open
    # alone (importing refstorage or ZODB.FileStorage takes 70-90 ms, more than an
    # open with the index file).
    started = time.perf_counter()
    if kind == "fs":
        import ZODB.FileStorage  # noqa: F401
    else:
        import refstorage  # noqa: F401
    imported = time.perf_counter()
    cpu = _cpu()
    storage = _open(kind, path, read_only=True)
    seconds = time.perf_counter() - imported
    cpu = _cpu() - cpu
    rss = _vmrss()
    n = len(storage)
    storage.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "import_seconds": imported - started,
            "rss_after_open": rss, "objects": n}


def child_cold_loads(kind: str, path: str, last_oid: int) -> dict:
    from ZODB.POSException import POSKeyError
    from ZODB.utils import p64

    storage = _open(kind, path, read_only=True)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    rng = random.Random(11)
    oids = [p64(rng.randrange(1, last_oid + 1)) for _ in range(N_LOADS)]
    found = 0
    started = time.perf_counter()
    for oid in oids:
        try:
            storage.load(oid, "")
            found += 1
        except POSKeyError:
            pass
    seconds = time.perf_counter() - started
    storage.close()
    return {"seconds": seconds, "loads_per_s": N_LOADS / seconds, "found": found}


def child_verify(kind: str, path: str) -> dict:
    size = os.path.getsize(path)
    started, cpu_started = time.perf_counter(), time.process_time()
    if kind == "fs":
        from ZODB.scripts import fstest
        fstest.check(path)
        ok = True
    else:
        from refstorage.tools.verify import verify
        report = verify(path)
        ok = not report.problems
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started  # on a loaded machine, seconds include waiting for a CPU
    return {"seconds": seconds, "mb_per_s": size / seconds / 1e6, "ok": ok, "cpu_seconds": cpu,
            "mb_per_cpu_s": size / cpu / 1e6 if cpu else 0.0}


def _repozo(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "ZODB.scripts.repozo", *args], check=True,
                   stdout=subprocess.DEVNULL)


def child_backup(kind: str, path: str, backup_dir: str, full: bool) -> dict:
    started = time.perf_counter()
    if kind == "fs":
        # repozo runs in its own process (its CLI); its peak RSS is read from RUSAGE_CHILDREN
        _repozo(["-B", "-r", backup_dir, "-f", path] + (["-F"] if full else []))
    else:
        from refstorage.tools.backup import backup
        backup(path, backup_dir, full=full)
    seconds = time.perf_counter() - started
    size = sum(os.path.getsize(os.path.join(backup_dir, f)) for f in os.listdir(backup_dir))
    return {"seconds": seconds, "backup_dir_size": size}


def child_info(kind: str, path: str) -> dict:
    import io
    from contextlib import redirect_stdout

    started = time.perf_counter()
    if kind == "fs":
        from ZODB.scripts import analyze
        with redirect_stdout(io.StringIO()):
            analyze.report(analyze.analyze(path))
    else:
        from refstorage.tools.info import info
        info(path)
    return {"seconds": time.perf_counter() - started}


def child_refs(kind: str, path: str, oid_hex: str) -> dict:
    import io
    from contextlib import redirect_stdout

    oid = bytes.fromhex(oid_hex)
    started = time.perf_counter()
    if kind == "fs":
        from ZODB.FileStorage.fsoids import Tracer
        tracer = Tracer(path)
        tracer.register_oids(u64(oid))
        with redirect_stdout(io.StringIO()) as out:
            tracer.run()
            tracer.report()
        referrers = out.getvalue().count("referenced by")
    else:
        from refstorage.tools.info import refs
        report = refs(path, oid, use_index=False)
        referrers = len(report.referrers)
    return {"seconds": time.perf_counter() - started, "referrers": referrers}


def child_refs_index(kind: str, path: str, oid_hex: str) -> dict:
    """`refstorage refs` through the referrer index: build, use or update it, as the file needs."""
    from refstorage.referrers import referrers_path
    from refstorage.tools.info import refs

    oid = bytes.fromhex(oid_hex)
    started = time.perf_counter()
    report = refs(path, oid)
    seconds = time.perf_counter() - started
    assert report.method == "index", report.method_note
    return {"seconds": seconds, "referrers": len(report.referrers), "note": report.method_note,
            "size": os.path.getsize(referrers_path(path))}


def child_pack(kind: str, path: str) -> dict:
    import gc

    from ZODB.serialize import referencesf

    storage = _open(kind, path)
    size_before = os.path.getsize(path)
    t = time.time()
    gc.collect()
    started = time.perf_counter()
    cpu_started = time.process_time()
    storage.pack(t, referencesf)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    n = len(storage)
    storage.close()
    return {"seconds": seconds, "cpu": cpu, "size_before": size_before,
            "size_after": os.path.getsize(path), "objects_after": n}


CHILDREN = {
    "build": child_build, "append": child_append, "convert": child_convert,
    "reopen": child_reopen, "cold_loads": child_cold_loads, "verify": child_verify,
    "backup": child_backup, "info": child_info, "refs": child_refs, "refs_index": child_refs_index,
    "pack": child_pack,
}


def child_main(phase: str, args: list) -> None:
    result = CHILDREN[phase](*args)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result["maxrss"] = max(own, kids)
    print("RESULT " + json.dumps(result), flush=True)


# -- parent side -----------------------------------------------------------------------

def run_child(phase: str, *args) -> dict:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(HERE), "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", phase,
                           json.dumps(list(args))], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {phase} {args} failed:\n{proc.stdout}\n{proc.stderr}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {phase} printed no result:\n{proc.stdout}\n{proc.stderr}")


def remove_storage(path: str) -> None:
    for suffix in ("", ".index", ".lock", ".tmp", ".old", ".pack", ".referrers"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


PHASES = ("build", "convert", "reopen_index", "reopen_scan", "cold_loads", "verify", "info", "refs",
          "refs_index", "backup", "pack")


def measure_size(n: int, work: str, only: set[str] | None = None, rounds: int = 1) -> dict:
    """Every phase (or those in `only`; the build always runs) for both storages at n objects.

    Returns {phase: {kind: result}}.  `rounds` repeats convert, alternating which storage
    goes first, and keeps the median seconds (all of them under "rounds")."""
    res: dict[str, dict[str, dict]] = {}

    def want(phase: str) -> bool:
        return only is None or phase in only

    def record(phase, kind, r):
        res.setdefault(phase, {})[kind] = r
        log(f"  {n:>10,} {phase:<13} {kind}: "
            + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items()))

    paths = {"fs": os.path.join(work, "Data.fs"), "rs": os.path.join(work, "Data.rfs")}
    built = KINDS if only is None or only - {"build", "convert"} or "build" in only else ("fs",)
    for kind in built:
        record("build", kind, run_child("build", kind, paths[kind], n))
    last_oid = res["build"]["fs"]["last_oid"]
    live = res["build"]["fs"]["live_oid"]
    # convert, from the same FileStorage file
    if want("convert"):
        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for r in range(rounds):
            for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
                dst = os.path.join(work, "conv." + kind)
                runs[kind].append(run_child("convert", kind, paths["fs"], dst))
                remove_storage(dst)
        for kind in KINDS:
            ordered = sorted(runs[kind], key=lambda x: x["seconds"])
            best = dict(ordered[len(ordered) // 2])
            best["maxrss"] = max(x["maxrss"] for x in runs[kind])
            if rounds > 1:
                best["rounds"] = [round(x["seconds"], 3) for x in runs[kind]]
            record("convert", kind, best)
    if only is not None and not only - {"build", "convert"}:
        for kind in built:
            remove_storage(paths[kind])
        return res
    for kind in KINDS if want("reopen_index") else ():
        record("reopen_index", kind, run_child("reopen", kind, paths[kind], True))
    for kind in KINDS if want("reopen_scan") else ():
        index = _index_path(kind, paths[kind])
        os.rename(index, index + ".aside")
        try:
            record("reopen_scan", kind, run_child("reopen", kind, paths[kind], False))
        finally:
            if os.path.exists(index):
                os.remove(index)
            os.rename(index + ".aside", index)
    for kind in KINDS if want("cold_loads") else ():
        record("cold_loads", kind, run_child("cold_loads", kind, paths[kind], last_oid))
    for kind in KINDS if want("verify") else ():
        record("verify", kind, run_child("verify", kind, paths[kind]))
    for kind in KINDS if want("info") else ():
        record("info", kind, run_child("info", kind, paths[kind]))
    for kind in KINDS if want("refs") else ():
        record("refs", kind, run_child("refs", kind, paths[kind], live))
    if want("refs_index"):
        record("refs_index_build", "rs", run_child("refs_index", "rs", paths["rs"], live))
        record("refs_index", "rs", run_child("refs_index", "rs", paths["rs"], live))
    for kind in KINDS if want("backup") else ():
        bdir = os.path.join(work, "backup." + kind)
        os.makedirs(bdir)
        record("backup_full", kind, run_child("backup", kind, paths[kind], bdir, True))
        run_child("append", kind, paths[kind], n)
        record("backup_incr", kind, run_child("backup", kind, paths[kind], bdir, False))
        shutil.rmtree(bdir)
    if want("refs_index"):
        if not want("backup"):
            run_child("append", "rs", paths["rs"], n)
        record("refs_index_update", "rs", run_child("refs_index", "rs", paths["rs"], live))
    for kind in KINDS if want("pack") else ():
        record("pack", kind, run_child("pack", kind, paths[kind]))
    for kind in KINDS:
        remove_storage(paths[kind])
    return res


# (phase, figure key, label, target as "rs/fs <= x" or ">= x", higher_is_better)
FIGURES = [
    ("build", "seconds", "build through ZODB.DB (s)", None),
    ("convert", "seconds", "convert from FileStorage (s; FS: copyTransactionsFrom)", ("<=", 1.0)),
    ("convert", "maxrss", "convert peak RSS", None),
    ("reopen_index", "seconds", "reopen with the index file (s)", ("<=", 1.0)),
    ("reopen_index", "rss_after_open", "RSS after open", ("<=", 1.0)),
    ("reopen_scan", "seconds", "reopen without the index file (s)", None),
    ("reopen_scan", "rss_after_open", "RSS after open without the index file", None),
    ("reopen_scan", "maxrss", "reopen without index, peak RSS", None),
    ("cold_loads", "loads_per_s", "cold loads (/s, higher is better)", None),
    ("pack", "seconds", "pack with GC (s)", ("<=", 0.1)),
    ("pack", "maxrss", "pack peak RSS (ru_maxrss, whole process)", ("<=", 1.0)),
    ("verify", "mb_per_s", "verify (MB/s; FS: fstest)", ("rs>=", 100.0)),
    ("verify", "maxrss", "verify peak RSS", None),
    ("backup_full", "seconds", "full backup (s; FS: repozo -F)", None),
    ("backup_incr", "seconds", "incremental backup (s; FS: repozo)", None),
    ("info", "seconds", "info (s; FS: analyze.py)", None),
    ("refs", "seconds", "referrers of one object, scan (s; FS: fsoids; rs: refs --scan)", None),
    ("refs_index_build", "seconds", "referrers, first run: build the referrer index + query (s)", None),
    ("refs_index_build", "maxrss", "referrer index build peak RSS", None),
    ("refs_index_build", "size", "referrer index file size", None),
    ("refs_index", "seconds", "referrers with the referrer index (s)", None),
    ("refs_index_update", "seconds", "referrers after 10 more transactions: update + query (s)", None),
    ("build", "size", "file size after build", None),
]


def fmt_value(key: str, v: float) -> str:
    if key in ("maxrss", "rss_after_open", "size"):
        return f"{v / 2**20:,.0f} MiB"
    if key == "loads_per_s":
        return f"{v:,.0f}"
    if key == "mb_per_s":
        return f"{v:,.1f}"
    return f"{v:,.3f}" if v < 10 else f"{v:,.1f}"


def table(results: dict[int, dict]) -> str:
    lines = ["| figure | objects | FileStorage | refstorage | ratio rs/fs | target | result |",
             "|---|---:|---:|---:|---:|---|---|"]
    for phase, key, label, target in FIGURES:
        for n, res in results.items():
            if "rs" not in res.get(phase, {}):
                continue  # not measured (--only)
            if "fs" not in res[phase]:  # a refstorage-only figure
                lines.append(f"| {label} | {n:,} | — | {fmt_value(key, res[phase]['rs'][key])} | | | |")
                continue
            fs, rs = res[phase]["fs"][key], res[phase]["rs"][key]
            ratio = rs / fs if fs else float("inf")
            verdict, tgt = "", ""
            if target:
                op, x = target
                if op == "<=":
                    tgt, ok = f"≤ {x}x", ratio <= x
                else:
                    tgt, ok = f"≥ {x:g} MB/s", rs >= x
                verdict = "pass" if ok else "MISS"
            lines.append(f"| {label} | {n:,} | {fmt_value(key, fs)} | {fmt_value(key, rs)} "
                         f"| {ratio:.2f}x | {tgt} | {verdict} |")
    return "\n".join(lines)


def machine() -> dict:
    import ZODB
    try:
        from refstorage import _refscan  # noqa: F401
        scanner = "c"
    except ImportError:
        scanner = "python"
    if os.environ.get("REFSTORAGE_PURE_PYTHON") == "1":
        scanner = "python"
    try:
        zodb_version = ZODB.__version__  # type: ignore[attr-defined]
    except AttributeError:
        from importlib.metadata import version
        zodb_version = version("ZODB")
    return {"python": platform.python_version(), "ZODB": zodb_version, "nproc": os.cpu_count(),
            "loadavg": os.getloadavg(), "refstorage_reference_scanner": scanner}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", default="1000000,2000000",
                    help="comma-separated sizes (default 1000000,2000000; 10000000 on request)")
    ap.add_argument("--quick", action="store_true", help="one size of 5,000 objects (smoke test)")
    ap.add_argument("--tmpdir", default=None, help="where the files go (default: the system's)")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--only", default=None,
                    help="comma-separated phases to measure (" + ",".join(PHASES) + "); the build "
                    "always runs (for convert alone, only the FileStorage one)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="convert runs this many times per storage (median kept)")
    ap.add_argument("--table-from", default=None, metavar="JSON",
                    help="print the table of a --json file written earlier, and exit")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return 0
    if args.table_from:
        with open(args.table_from) as f:
            saved = json.load(f)
        print(table({int(n): r for n, r in saved["results"].items()}))
        return 0
    only = None if args.only is None else set(args.only.split(","))
    if only is not None and only - set(PHASES):
        ap.error(f"unknown phases {sorted(only - set(PHASES))}; known: {','.join(PHASES)}")
    sizes = [5_000] if args.quick else [int(s.replace("_", "")) for s in args.objects.split(",")]
    info = machine()
    log(f"machine: {info}")
    results: dict[int, dict] = {}
    work_root = tempfile.mkdtemp(prefix="refstorage-scale-", dir=args.tmpdir)
    try:
        for n in sizes:
            work = os.path.join(work_root, str(n))
            os.makedirs(work)
            started = time.perf_counter()
            results[n] = measure_size(n, work, only, args.rounds)
            log(f"  {n:,} objects: {time.perf_counter() - started:.0f} s in all")
            shutil.rmtree(work)
            log(table(results))  # each size as soon as it is done
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"machine": info, "results": {str(k): r for k, r in results.items()}},
                              f, indent=1)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": {str(n): r for n, r in results.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
