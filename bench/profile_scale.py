#!/usr/bin/env python
"""Where the time of one bench_scale.py phase goes: cProfile (and tracemalloc) of it.

    PYTHONPATH=src python bench/profile_scale.py build  --objects N DIR      # both files in DIR
    PYTHONPATH=src python bench/profile_scale.py PHASE [--tracemalloc] DIR  # PHASE: pack verify reopen
                                                      # reopen_scan convert (refstorage side)

The files are bench_scale.py's (same builder); pack works on a copy.  Prints
the top functions by cumulative and by own time (and the top allocation sites
with --tracemalloc, which slows everything down several times).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["build", "pack", "verify", "reopen", "reopen_scan", "convert"])
    ap.add_argument("dir")
    ap.add_argument("--objects", type=int, default=200_000)
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    fs, rs = os.path.join(args.dir, "Data.fs"), os.path.join(args.dir, "Data.rfs")
    if args.phase == "build":
        os.makedirs(args.dir, exist_ok=True)
        for kind, path in (("fs", fs), ("rs", rs)):
            print(kind, bench_scale.run_child("build", kind, path, args.objects))
        return 0
    from ZODB.serialize import referencesf

    import refstorage

    if args.phase == "pack":
        target = rs + ".pack-copy"
        shutil.copyfile(rs, target)
        shutil.copyfile(rs + ".index", target + ".index")
        storage = refstorage.FileStorage(target)

        def work():
            storage.pack(time.time(), referencesf)
    elif args.phase == "verify":
        from refstorage.tools.verify import verify

        def work():
            verify(rs)
    elif args.phase == "reopen":
        def work():
            refstorage.FileStorage(rs, read_only=True).close()
    elif args.phase == "reopen_scan":  # no index file: the index is rebuilt by a scan
        target = os.path.join(args.dir, "scan.rfs")
        bench_scale.remove_storage(target)
        os.link(rs, target)

        def work():
            refstorage.FileStorage(target, read_only=True).close()
    else:
        from ZODB.FileStorage import FileStorage

        from refstorage.copying import copy_transactions
        target = os.path.join(args.dir, "conv.rfs")
        bench_scale.remove_storage(target)

        def work():
            source = FileStorage(fs, read_only=True)
            dest = refstorage.FileStorage(target, create=True)
            copy_transactions(source, dest)
            dest.close()
            source.close()
    if args.tracemalloc:
        import tracemalloc
        tracemalloc.start(5)
    prof = cProfile.Profile()
    started = time.perf_counter()
    prof.enable()
    work()
    prof.disable()
    print(f"{args.phase}: {time.perf_counter() - started:.2f} s (under cProfile)")
    if args.tracemalloc:
        snap = tracemalloc.take_snapshot()
        print(f"tracemalloc peak {tracemalloc.get_traced_memory()[1] / 2**20:.1f} MiB")
        for stat in snap.statistics("lineno")[:10]:
            print("  ", stat)
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    if args.phase in ("pack", "reopen_scan"):
        bench_scale.remove_storage(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
