#!/usr/bin/env python
"""`refstorage inspect` at scale (issue 15): indexing time and page times, file and zeo:// sources.

    PYTHONPATH=src python bench/bench_inspect.py [--objects 1000000,2000000] [--no-zeo]
                                                 [--quick] [--tmpdir DIR] [--json OUT]

For each size N: N raw ZODB-shaped records (a tree, 16 children each, 20,000
per transaction, then 5% rewritten: tests/test_webui.py's 2M-object database)
are written to a refstorage file.  Then, in this process:

    file   Inspector(path).index(): seconds, and the growth of the process's peak RSS;
           then every page, each asked 3 times through Flask's test client (the
           application's own time, no HTTP): the slowest of the 3
    zeo    the same file served by ZEO's runzeo (a subprocess), ZeoInspector.index()
           (ZEO's remote iterator, one round trip per record batch), seconds and
           seconds per million records, then the same pages
    pack   the pack forecast to now (on the pages a background job, started by the index;
           here computed again, alone, for its time)

``--quick`` writes 5,000 objects (a smoke test: tests/test_bench_inspect_smoke.py;
no figure of it means anything).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

PAGES = ("/", "/?days=1", "/classes", "/class/app.models.Node?page={class_page}", "/transactions",
         "/transactions?q=batch&page=5", "/transaction/{mid}", "/transaction/{mid}?page=50",
         "/object/0x00", "/object/0x14", "/object/{deep}", "/object/0x14/graph", "/garbage")


def build(path: str, n: int) -> None:
    import transaction
    from ZODB.utils import p64

    import refstorage
    meta = b"\x80\x03capp.models\nNode\nq\x00N\x86q\x01."

    class Ref:
        def __init__(self, oid: int):
            self.oid = oid

    def record(i: int, version: int) -> bytes:
        f = io.BytesIO()
        p = pickle.Pickler(f, 3)
        p.persistent_id = lambda o: (p64(o.oid), None) if isinstance(o, Ref) else None
        p.dump({"n": i, "version": version,
                "kids": [Ref(k) for k in range(16 * i + 1, min(n, 16 * i + 17))]})
        return meta + f.getvalue()
    st = refstorage.FileStorage(path, create=True)
    try:
        for start in range(0, n, 20000):
            t = transaction.Transaction()
            t.description = f"batch {start}"
            st.tpc_begin(t)
            for i in range(start, min(n, start + 20000)):
                st.store(p64(i), b"\0" * 8, record(i, 0), "", t)
            st.tpc_vote(t)
            st.tpc_finish(t)
        t = transaction.Transaction()
        st.tpc_begin(t)
        for i in range(0, n, 20):
            st.store(p64(i), st.load(p64(i))[1], record(i, 1), "", t)
        st.tpc_vote(t)
        st.tpc_finish(t)
    finally:
        st.close()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pages(ins, n: int) -> dict[str, float]:
    """The slowest of 3 answers of each page, in seconds (every answer must be 200)."""
    from refstorage.webui.app import create_app
    token = "bench"
    c = create_app(ins, token).test_client()
    mid = ins.txns[len(ins.txns) // 2].pos
    urls = [u.format(mid=mid, class_page=max(0, n // 100 // 2), deep=hex(n // 2)) for u in PAGES]
    out = {}
    for url in urls:
        worst = 0.0
        for _ in range(3):
            started = time.perf_counter()
            r = c.get(url + ("&" if "?" in url else "?") + f"token={token}")
            worst = max(worst, time.perf_counter() - started)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code}")
        out[url] = worst
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zeo_server(path: str, tmp: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = os.path.join(tmp, "zeo.conf")
    with open(conf, "w") as f:
        f.write(f"<zeo>\n  address 127.0.0.1:{port}\n</zeo>\n"
                f"%import refstorage\n<refstorage 1>\n  path {path}\n  read-only true\n</refstorage>\n")
    log = open(os.path.join(tmp, "zeo.log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "ZEO.runzeo", "-C", conf], stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the ZEO server exited ({proc.returncode}); see {tmp}/zeo.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the ZEO server did not start") from None
            time.sleep(0.1)


def run(n: int, tmp: str, zeo: bool) -> dict:
    from refstorage.tools.info import pack_forecast
    from refstorage.webui.model import Inspector, ZeoInspector
    path = os.path.join(tmp, f"inspect-{n}.rfs")
    started = time.perf_counter()
    build(path, n)
    row: dict = {"objects": n, "build_s": time.perf_counter() - started, "size": os.path.getsize(path)}
    rss = peak_rss()
    ins = Inspector(path)
    try:
        started = time.perf_counter()
        ins.index()
        row["file_index_s"] = time.perf_counter() - started
        row["file_index_rss_growth"] = peak_rss() - rss
        row["records"] = ins.records
        started = time.perf_counter()
        f = pack_forecast(ins.log, ins.built, ins.txns[-1].time + 1)
        row["file_forecast_s"] = time.perf_counter() - started
        row["file_forecast"] = (f.revisions_removed, f.objects_removed)
        row["file_pages"] = pages(ins, n)
    finally:
        ins.close()
    if zeo:
        proc, port = zeo_server(path, tmp)
        try:
            rss = peak_rss()
            zins = ZeoInspector(f"zeo://127.0.0.1:{port}?storage=1", wait_timeout=120)
            try:
                started = time.perf_counter()
                zins.index()
                row["zeo_index_s"] = time.perf_counter() - started
                row["zeo_index_s_per_million_records"] = row["zeo_index_s"] / zins.records * 1e6
                row["zeo_index_rss_growth"] = peak_rss() - rss
                started = time.perf_counter()
                f = zins.pack_forecast(zins.txns[-1].time + 1)
                row["zeo_forecast_s"] = time.perf_counter() - started
                row["zeo_forecast"] = (f.revisions_removed, f.objects_removed)
                row["zeo_pages"] = pages(zins, n)
            finally:
                zins.close()
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    os.unlink(path)
    return row


def report(rows: list[dict]) -> None:
    print("| objects | records | file | file index | RSS growth | forecast | slowest page | "
          "zeo index | s per 1M records | RSS growth | forecast | slowest page |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
    def slowest(r: dict, key: str) -> str:
        if key not in r:
            return "-"
        url, s = max(r[key].items(), key=lambda kv: kv[1])
        return f"{s:.3f} s (`{url}`)"
    for r in rows:
        zeo = (f"{r['zeo_index_s']:.1f} s | {r['zeo_index_s_per_million_records']:.1f} s | "
               f"{r['zeo_index_rss_growth'] / 2**20:,.0f} MiB | {r['zeo_forecast_s']:.1f} s"
               if "zeo_index_s" in r else "- | - | - | -")
        print(f"| {r['objects']:,} | {r['records']:,} | {r['size'] / 2**20:,.0f} MiB | "
              f"{r['file_index_s']:.1f} s | {r['file_index_rss_growth'] / 2**20:,.0f} MiB | "
              f"{r['file_forecast_s']:.1f} s | {slowest(r, 'file_pages')} | {zeo} | "
              f"{slowest(r, 'zeo_pages')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", default="1000000,2000000")
    ap.add_argument("--no-zeo", action="store_true", help="only the file source")
    ap.add_argument("--quick", action="store_true", help="5,000 objects (a smoke test)")
    ap.add_argument("--tmpdir")
    ap.add_argument("--json")
    args = ap.parse_args()
    sizes = [5000] if args.quick else [int(x) for x in args.objects.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-inspect-", dir=args.tmpdir)
    rows = []
    try:
        for n in sizes:
            rows.append(run(n, tmp, not args.no_zeo))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
