"""Replication lag under sustained commits (issue 13).

Starts, on 127.0.0.1, a primary (`refstorage serve`) and a read-only replica
server that follows it (`refstorage serve --read-only --replicate`), both as
subprocesses.  In this process, a writer commits to the primary through
ZEO.DB for --seconds at --rate commits per second (0: as fast as it can),
and a ZEO client of the replica records when each transaction's invalidation
reaches it.  The lag of a transaction is

    (replica client notified of tid) - (primary's tpc_finish returned to the writer)

i.e. how long a commit acknowledged by the primary stays invisible to the
replica's clients; a transaction that never arrives within --settle seconds
is counted as lost (there should be none).  Prints one table row per rate
and, with --json, writes the raw figures.

    PYTHONPATH=src python bench/bench_replicate.py                    # rates 20, 100, max; 20 s each
    PYTHONPATH=src python bench/bench_replicate.py --seconds 3 --rates 50   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(args: list[str], log) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "src"), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "refstorage", "serve", *args, "--port", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Arrivals:
    """A stand-in DB for the replica's ClientStorage: when each tid's invalidation arrives."""

    def __init__(self) -> None:
        self.times: dict[bytes, float] = {}
        self.cond = threading.Condition()

    def invalidate(self, tid, oids, version=""):
        now = time.time()
        with self.cond:
            self.times.setdefault(tid, now)
            self.cond.notify_all()

    def invalidateCache(self):
        pass

    def transform_record_data(self, data):
        return data

    untransform_record_data = transform_record_data


def measure(primary_port: int, replica_port: int, rate: float, seconds: float, settle: float,
            payload: int) -> dict:
    import transaction
    import ZEO
    from persistent.mapping import PersistentMapping
    from ZEO.ClientStorage import ClientStorage

    arrivals = Arrivals()
    watcher = ClientStorage(("127.0.0.1", replica_port), read_only=True, wait_timeout=30)
    watcher.registerDB(arrivals)
    db = ZEO.DB(("127.0.0.1", primary_port), wait_timeout=30)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    acked: list[tuple[bytes, float]] = []
    interval = 1.0 / rate if rate > 0 else 0.0
    t0 = time.monotonic()
    next_at = t0
    n = 0
    try:
        while time.monotonic() - t0 < seconds:
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
            with tm:
                root = conn.root()
                root[n % 100] = PersistentMapping(n=n, pad="x" * payload)
            acked.append((conn._storage.lastTransaction(), time.time()))
            n += 1
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + settle
        last = acked[-1][0] if acked else None
        with arrivals.cond:
            while last is not None and last not in arrivals.times and time.monotonic() < deadline:
                arrivals.cond.wait(0.1)
    finally:
        conn.close()
        db.close()
        watcher.close()
    lags = sorted(arrivals.times[tid] - at for tid, at in acked if tid in arrivals.times)
    lost = sum(1 for tid, _ in acked if tid not in arrivals.times)

    def pct(q: float) -> float | None:
        return round(lags[min(len(lags) - 1, int(q * len(lags)))], 4) if lags else None

    return {"rate_target": rate, "commits": len(acked), "commits_per_s": round(len(acked) / elapsed, 1),
            "lost": lost, "p50_s": pct(0.5), "p90_s": pct(0.9), "p99_s": pct(0.99),
            "max_s": round(lags[-1], 4) if lags else None, "min_s": round(lags[0], 4) if lags else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="20,100,0",
                    help="commit rates to measure, per second (0: as fast as one writer can)")
    ap.add_argument("--seconds", type=float, default=20.0, help="commit time per rate")
    ap.add_argument("--settle", type=float, default=30.0, help="max wait for the last commit to arrive")
    ap.add_argument("--payload", type=int, default=200, help="bytes of padding per committed object")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--json", default=None, help="write the results there")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    tmp = tempfile.mkdtemp(prefix="refstorage-bench-replicate-", dir=args.tmpdir)
    log = open(os.path.join(tmp, "servers.log"), "w")
    rows = []
    try:
        primary, pport = start_server([os.path.join(tmp, "p.rfs"), "--create"], log)
        try:
            replica, rport = start_server([os.path.join(tmp, "r.rfs"), "--read-only", "--replicate",
                                           f"127.0.0.1:{pport}"], log)
            try:
                for rate in rates:
                    rows.append(measure(pport, rport, rate, args.seconds, args.settle, args.payload))
            finally:
                stop(replica)
        finally:
            stop(primary)
    finally:
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"replication lag, primary ack -> replica client invalidation ({platform.node()}, "
          f"{os.cpu_count()} cpus, {args.seconds:g} s per rate)")
    print("| target rate | commits/s | commits | lost | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        def ms(v):
            return "-" if v is None else f"{v * 1000:.1f}"
        target = "max" if not r["rate_target"] else f"{r['rate_target']:g}/s"
        print(f"| {target} | {r['commits_per_s']} | {r['commits']} | {r['lost']} | {ms(r['p50_s'])} | "
              f"{ms(r['p90_s'])} | {ms(r['p99_s'])} | {ms(r['max_s'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": args.seconds, "python": sys.version.split()[0],
                       "nproc": os.cpu_count()}, f, indent=2)


if __name__ == "__main__":
    main()
