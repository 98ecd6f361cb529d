#!/usr/bin/env python
"""ZEO benchmark: a ZEO server over ZODB's FileStorage against one over refstorage.

    python bench/bench_zeo.py [--quick] [--rounds R] [--clients 1,4,8] [--json OUT]

In the same run, for each backend, a ZEO server (ZEO's runzeo, a subprocess on
127.0.0.1) serves a data file of --objects objects (real ZODB pickles of about
500 bytes, built before the server starts, not timed), and 1, 4 and 8 client
processes (raw ClientStorage API, one process each) run:

- commits: each client commits single-object transactions (store, vote,
  finish; the server fsyncs every commit) on objects of its own (no conflicts);
- cold loads: each client, a fresh ClientStorage with an empty cache, loads
  random distinct oids, right after the server's data file was evicted from
  the OS page cache (posix_fadvise DONTNEED);
- warm loads: the same with new clients (empty client caches again), the
  server's file now in the page cache.

A figure is the aggregate throughput: all clients' operations over the time
from the first client's start to the last one's end (clients are started and
connected before a common go).  The backends alternate their order from round
to round, and a ratio (refstorage / FileStorage, higher is better) is the
median of the per-round ratios.  Target: >= 1.0 on every row.

`--self-test` serves ZODB's FileStorage on both sides (an A/A run: every ratio
should be near 1; the spread shows how much noise the machine adds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
TIMEOUT = 600.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def p64(i: int) -> bytes:
    return i.to_bytes(8, "big")


def make_pickle(i: int) -> bytes:
    from ZODB.tests.MinPO import MinPO
    from ZODB.tests.StorageTestBase import zodb_pickle
    return zodb_pickle(MinPO(f"object {i} ".ljust(480, "x")))


# -- worker processes (python bench_zeo.py --worker ...) ---------------------------------

def worker(args: argparse.Namespace) -> None:
    from ZEO.ClientStorage import ClientStorage
    from ZODB.Connection import TransactionMetaData

    cs = ClientStorage(("127.0.0.1", args.port), wait_timeout=60, cache_size=64 << 20)
    rng = random.Random(args.seed)
    if args.worker == "commits":
        # objects of our own, created before the clock starts
        oids = [cs.new_oid() for _ in range(10)]
        t = TransactionMetaData()
        cs.tpc_begin(t)
        for oid in oids:
            cs.store(oid, b"\0" * 8, make_pickle(0), "", t)
        cs.tpc_vote(t)
        serial = cs.tpc_finish(t)
        serials = dict.fromkeys(oids, serial)
        data = make_pickle(1)
    else:
        todo = rng.sample(range(1, args.objects + 1), args.count)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    t0 = time.time()
    if args.worker == "commits":
        for k in range(args.count):
            oid = oids[k % len(oids)]
            t = TransactionMetaData()
            cs.tpc_begin(t)
            cs.store(oid, serials[oid], data, "", t)
            cs.tpc_vote(t)
            serials[oid] = cs.tpc_finish(t)
    else:
        for i in todo:
            cs.load(p64(i))
    t1 = time.time()
    cs.close()
    print(json.dumps({"n": args.count, "t0": t0, "t1": t1}), flush=True)


# -- the parent -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.abspath(SRC),
                                                                     os.environ.get("PYTHONPATH")])))


SELF_TEST = False  # --self-test: FileStorage on both sides


def open_storage(backend: str, path: str):
    if backend == "fs" or SELF_TEST:
        import ZODB.FileStorage
        return ZODB.FileStorage.FileStorage(path, create=True)
    import refstorage
    return refstorage.FileStorage(path, create=True)


def build(backend: str, path: str, objects: int) -> None:
    from ZODB.Connection import TransactionMetaData
    st = open_storage(backend, path)
    try:
        oid = 1
        while oid <= objects:
            t = TransactionMetaData()
            st.tpc_begin(t)
            for i in range(oid, min(oid + 5000, objects + 1)):
                st.store(p64(i), b"\0" * 8, make_pickle(i), "", t)
            st.tpc_vote(t)
            st.tpc_finish(t)
            oid = i + 1
    finally:
        st.close()


def server_conf(backend: str, path: str, port: int) -> str:
    section = ("<filestorage 1>\n  path {}\n</filestorage>" if backend == "fs" or SELF_TEST
               else "%import refstorage\n<refstorage 1>\n  path {}\n</refstorage>").format(path)
    return f"<zeo>\n  address 127.0.0.1:{port}\n</zeo>\n{section}\n"


class Server:
    def __init__(self, backend: str, path: str, tmp: str):
        self.port = free_port()
        conf = os.path.join(tmp, f"zeo-{backend}.conf")
        with open(conf, "w") as f:
            f.write(server_conf(backend, path, self.port))
        self.log = open(os.path.join(tmp, f"server-{backend}.log"), "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "ZEO.runzeo", "-C", conf], env=env(),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {backend} server exited ({self.proc.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {backend} server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_clients(kind: str, port: int, clients: int, count: int, objects: int, seed: int) -> float:
    """Aggregate operations per second of `clients` worker processes."""
    me = os.path.abspath(__file__)
    procs = [subprocess.Popen([sys.executable, me, "--worker", kind, "--port", str(port),
                               "--count", str(count), "--objects", str(objects), "--seed", str(seed + c)],
                              env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for c in range(clients)]
    try:
        for p in procs:
            ready, _, _ = select.select([p.stdout], [], [], TIMEOUT)
            if not ready or p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {kind} client did not start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            if p.returncode != 0:
                raise RuntimeError(f"a {kind} client failed ({p.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    elapsed = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return sum(r["n"] for r in results) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 5x smaller sizes, one round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, --quick 1)")
    parser.add_argument("--clients", default="1,4,8", help="client process counts (default 1,4,8)")
    parser.add_argument("--objects", type=int, default=None, help="objects in the data file (default 20000)")
    parser.add_argument("--commits", type=int, default=None, help="commits per client (default 200)")
    parser.add_argument("--loads", type=int, default=None, help="loads per client (default 2000)")
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    parser.add_argument("--tmpdir", default=None)
    parser.add_argument("--self-test", action="store_true", help="FileStorage on both sides (A/A run)")
    parser.add_argument("--worker", choices=["commits", "loads"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    global SELF_TEST
    SELF_TEST = args.self_test
    div = 5 if args.quick else 1
    rounds = args.rounds or (1 if args.quick else 3)
    objects = args.objects or 20000 // div
    commits = args.commits or 200 // div
    loads = min(args.loads or 2000 // div, objects)
    client_counts = [int(c) for c in args.clients.split(",")]

    import refstorage  # noqa: F401  (fail early if it is missing)
    tmp = tempfile.mkdtemp(prefix="refstorage-bench-zeo-", dir=args.tmpdir)
    figures: dict[str, dict[str, list[float]]] = {}
    ratios: dict[str, list[float]] = {}
    try:
        paths = {}
        for backend in ("fs", "rs"):
            paths[backend] = os.path.join(tmp, "Data.fs" if backend == "fs" else "Data.rfs")
            build(backend, paths[backend], objects)
        for rnd in range(rounds):
            order = ("fs", "rs") if rnd % 2 == 0 else ("rs", "fs")
            this_round: dict[str, dict[str, float]] = {}
            for backend in order:
                server = Server(backend, paths[backend], tmp)
                try:
                    rows = this_round.setdefault(backend, {})
                    for n in client_counts:
                        rows[f"commits, {n} client(s)"] = run_clients("commits", server.port, n, commits,
                                                                      objects, 1000 * rnd)
                    for n in client_counts:
                        evict(paths[backend])
                        rows[f"cold loads, {n} client(s)"] = run_clients("loads", server.port, n, loads,
                                                                         objects, 1000 * rnd + 100)
                        rows[f"warm loads, {n} client(s)"] = run_clients("loads", server.port, n, loads,
                                                                         objects, 1000 * rnd + 100)
                finally:
                    server.stop()
                log(f"round {rnd + 1}/{rounds} {backend}: " +
                    ", ".join(f"{k} {v:.0f}/s" for k, v in rows.items()))
            for key in this_round["fs"]:
                for backend in ("fs", "rs"):
                    figures.setdefault(key, {}).setdefault(backend, []).append(this_round[backend][key])
                ratios.setdefault(key, []).append(this_round["rs"][key] / this_round["fs"][key])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    kinds = ("commits", "cold loads", "warm loads")
    order = [f"{kind}, {n} client(s)" for kind in kinds for n in client_counts]
    print(f"ZEO {_version('ZEO')}, ZODB {_version('ZODB')}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {rounds} round(s), {objects} objects, {commits} commits and "
          f"{loads} loads per client" + (" -- SELF TEST: FileStorage on both sides" if SELF_TEST else ""))
    print("| workload | FileStorage (ops/s) | refstorage (ops/s) | ratio | per-round ratios | target "
          "| result |")
    print("|---|---:|---:|---:|---|---:|---|")
    rows = []
    for key in order:
        fs = statistics.median(figures[key]["fs"])
        rs = statistics.median(figures[key]["rs"])
        ratio = statistics.median(ratios[key])
        result = "PASS" if ratio >= 1.0 else "MISS"
        rows.append({"workload": key, "fs": figures[key]["fs"], "rs": figures[key]["rs"],
                     "ratios": ratios[key], "ratio": ratio, "result": result})
        spread = " ".join(f"{r:.2f}" for r in ratios[key])
        print(f"| {key} | {fs:,.0f} | {rs:,.0f} | {ratio:.2f}x | {spread} | >= 1.0x | {result} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rounds": rounds, "objects": objects, "commits": commits, "loads": loads,
                       "clients": client_counts, "ZEO": _version("ZEO"), "ZODB": _version("ZODB"),
                       "python": platform.python_version(), "nproc": os.cpu_count(),
                       "self_test": SELF_TEST}, f, indent=1)


def _version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
