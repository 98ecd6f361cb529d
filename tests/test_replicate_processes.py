"""Replication with real processes on 127.0.0.1.

* a primary: `refstorage serve primary.rfs` (or runzeo over ZODB's FileStorage);
* a read-only replica server that follows it: `refstorage serve replica.rfs
  --read-only --replicate PRIMARY`;
* a second replica chained from the first: `refstorage replicate REPLICA_SERVER r2.rfs`;
* a writer process committing (with blobs) for a bounded time through ZEO.

Mid-stream: kill -9 of the replica server and of the chained replicator, a
pack on the primary, kill -9 of the primary; each is restarted.  At the end
the replicas' histories equal the primary's (tids, status, metadata,
records, blob contents), the replica having been packed at the primary's
pack time.  Every wait is bounded and every process is stopped in teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import ZEO
from persistent.TimeStamp import TimeStamp

import refstorage
from refstorage import fileformat as fmt
from refstorage.pack import pack_tid_for
from test_replicate import blob_contents, history
from test_zeo import ENV, _free_port, _read_line, _stop, _wait_listening

TIMEOUT = 30.0

WRITER = textwrap.dedent('''
    import json, sys, time
    import transaction, ZEO
    from persistent.mapping import PersistentMapping
    from ZODB.blob import Blob
    port, cache, seconds, pause = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    db = ZEO.DB(("127.0.0.1", port), blob_dir=cache, wait_timeout=10)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    done = errors = 0
    deadline = time.monotonic() + seconds
    print(json.dumps({"ready": True}), flush=True)
    while time.monotonic() < deadline:
        try:
            txn = tm.begin()
            txn.note("write %d" % done)
            txn.setExtendedInfo("n", done)
            root = conn.root()
            items = root.setdefault("items", PersistentMapping())
            items[done % 50] = PersistentMapping(n=done)
            if done % 7 == 0:
                root["blob%d" % (done % 5)] = Blob(b"blob %d " % done * 50)
            root["counter"] = done
            tm.commit()
            done += 1
        except Exception as exc:
            errors += 1
            tm.abort()
            time.sleep(0.1)
        time.sleep(pause)
    print(json.dumps({"commits": done, "errors": errors, "last": db.lastTransaction().hex()}), flush=True)
    db.close()
''')


class Server:
    """A `refstorage serve` process on a fixed port (so a restart keeps the address)."""

    def __init__(self, args: list[str], log_path: str):
        self.args = args
        self.port = _free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "refstorage", "serve", *self.args,
                                      "--port", str(self.port)], env=ENV, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        _wait_listening(self.proc, self.port)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(TIMEOUT)

    def stop(self) -> int | None:
        return _stop(self.proc) if self.proc is not None else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def last_tid(port: int) -> bytes:
    from ZEO.ClientStorage import ClientStorage
    cs = ClientStorage(("127.0.0.1", port), read_only=True, wait_timeout=TIMEOUT)
    try:
        return cs.lastTransaction()
    finally:
        cs.close()


def wait_for(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def compare(a, b) -> None:
    ha, hb = history(a), history(b)
    assert [t[0] for t in ha] == [t[0] for t in hb]
    assert ha == hb
    assert blob_contents(a) == blob_contents(b)


def replicate_proc(source: str, path: str, blobs: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "refstorage", "replicate", source, path,
                             "--blob-dir", blobs, "--poll", "1", "--json", "-q", *extra],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_primary_replica_server_and_chained_replicator_survive_kills_and_a_pack(tmp_path, long_profile):
    seconds = 40.0 if long_profile else 9.0
    primary = Server([str(tmp_path / "p.rfs"), "--create", "--blob-dir", str(tmp_path / "pb")],
                     str(tmp_path / "primary.log"))
    primary.start()
    replica = Server([str(tmp_path / "r.rfs"), "--blob-dir", str(tmp_path / "rb"), "--read-only",
                      "--replicate", f"127.0.0.1:{primary.port}", "--poll", "1"],
                     str(tmp_path / "replica.log"))
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = chained = None
    try:
        replica.start()
        writer = subprocess.Popen([sys.executable, str(script), str(primary.port), str(tmp_path / "wc"),
                                   str(seconds), "0.01"], env=ENV, stdout=subprocess.PIPE, text=True)
        assert json.loads(_read_line(writer)) == {"ready": True}
        chained = replicate_proc(replica.address, str(tmp_path / "r2.rfs"), str(tmp_path / "r2b"))
        step = seconds / 8
        time.sleep(step)
        replica.kill9()                       # the replica server (and its replicator) dies
        time.sleep(step / 2)
        replica.start()
        time.sleep(step)
        chained.kill()                        # the chained replicator dies
        chained.wait(TIMEOUT)
        chained = replicate_proc(replica.address, str(tmp_path / "r2.rfs"), str(tmp_path / "r2b"))
        time.sleep(step)
        from ZEO.ClientStorage import ClientStorage
        from ZODB.serialize import referencesf
        cs = ClientStorage(("127.0.0.1", primary.port), wait_timeout=TIMEOUT)
        pack_time = time.time()
        cs.pack(pack_time, referencesf)       # a pack on the primary, mid-stream
        cs.close()
        time.sleep(step)
        primary.kill9()                       # the primary dies mid-commit-stream
        time.sleep(step / 2)
        primary.start()
        end = json.loads(_read_line(writer, timeout=seconds + TIMEOUT))
        assert writer.wait(TIMEOUT) == 0
        assert end["commits"] > 20, end
        # the replicas catch up (invalidations or polls, through the restarts)
        final = last_tid(primary.port)
        wait_for(lambda: last_tid(replica.port) == final, what="the replica server")
        # a read-only client of the replica sees the last commit
        rdb = ZEO.DB(("127.0.0.1", replica.port), read_only=True, wait_timeout=TIMEOUT,
                     blob_dir=str(tmp_path / "rc"))
        with rdb.transaction() as conn:
            assert conn.root()["counter"] == end["commits"] - 1
        rdb.close()
        wait_for(lambda: os.path.exists(tmp_path / "r2.rfs") and
                 refstorage.FileStorage(str(tmp_path / "r2.rfs"), read_only=True).lastTransaction() == final,
                 what="the chained replica")
        os.kill(chained.pid, signal.SIGTERM)
        out, _ = chained.communicate(timeout=TIMEOUT)
        assert chained.returncode == 0
        assert json.loads(out)["last_tid"] == final.hex()
    finally:
        for proc in (writer, chained):
            if proc is not None:
                _stop(proc)
        assert replica.stop() == 0
        assert primary.stop() == 0
    p = refstorage.FileStorage(str(tmp_path / "p.rfs"), read_only=True, blob_dir=str(tmp_path / "pb"))
    r = refstorage.FileStorage(str(tmp_path / "r.rfs"), blob_dir=str(tmp_path / "rb"))
    r2 = refstorage.FileStorage(str(tmp_path / "r2.rfs"), blob_dir=str(tmp_path / "r2b"))
    try:
        compare(r, r2)                        # the chain copied everything, before any pack
        assert any(t[1] == "p" for t in history(p)), "the primary's pack removed nothing"
        # The replica packs on its own schedule, to the time the primary's pack took
        # effect: a pack never goes past the last *finished* transaction, so when the
        # writer's commit was in flight (its tid below pack_time, not yet finished) the
        # primary packed to the transaction before it, and a replica packed to pack_time
        # itself would rightly drop one revision more (seen in CI under load).
        effective = p.read_snapshot().pack_tid
        assert fmt.Z64 < effective <= pack_tid_for(pack_time)
        r.pack(TimeStamp(effective).timeTime() + 1e-6)
        compare(p, r)
    finally:
        p.close()
        r.close()
        r2.close()


def test_promotion(tmp_path):
    primary = Server([str(tmp_path / "p.rfs"), "--create"], str(tmp_path / "primary.log"))
    primary.start()
    replica = Server([str(tmp_path / "r.rfs"), "--read-only", "--replicate", primary.address,
                      "--poll", "60"], str(tmp_path / "replica.log"))
    pdb = rdb = None
    try:
        replica.start()
        pdb = ZEO.DB(("127.0.0.1", primary.port), wait_timeout=TIMEOUT)
        with pdb.transaction() as conn:
            conn.root()["a"] = 1
        final = pdb.lastTransaction()
        pdb.close()
        pdb = None
        wait_for(lambda: last_tid(replica.port) == final, what="the replica (60 s poll: "
                 "only invalidations can make it in time)", timeout=20)
        # a client writable if it can be: connects read-only to the replica
        rdb = ZEO.DB([("127.0.0.1", replica.port)], read_only_fallback=True, wait_timeout=TIMEOUT)
        assert rdb.storage.isReadOnly()
        from ZODB.POSException import ReadOnlyError
        with pytest.raises(ReadOnlyError):
            with rdb.transaction() as conn:
                conn.root()["b"] = 2
        primary.stop()                        # the primary is gone
        replica.proc.send_signal(signal.SIGUSR1)  # promote
        from persistent.mapping import PersistentMapping
        from ZEO.Exceptions import ClientDisconnected

        def commit() -> bool:
            conn = rdb.open()
            try:
                with conn.transaction_manager as txn:
                    root = conn.root()
                    assert root["a"] == 1
                    root["b"] = 2
                    root["new"] = PersistentMapping(x=1)  # a new oid, not one the primary used
                    txn.note("after promotion")
            except (ReadOnlyError, ClientDisconnected):
                return False  # the client has not reconnected read-write yet
            finally:
                conn.close()
            return True

        wait_for(commit, what="the client to upgrade to read-write and commit")
        assert rdb.storage.lastTransaction() > final
    finally:
        for db in (pdb, rdb):
            if db is not None:
                db.close()
        assert replica.stop() == 0
        primary.stop()
    r = refstorage.FileStorage(str(tmp_path / "r.rfs"), read_only=True)
    p = refstorage.FileStorage(str(tmp_path / "p.rfs"), read_only=True)
    try:
        assert [t.tid for t in p.iterator()] == [t.tid for t in r.iterator()][:-1]
        oids = [rec.oid for t in r.iterator() for rec in t]
        new = [rec.oid for rec in list(r.iterator())[-1]]
        assert all(oid not in oids[:-len(new)] or oid == b"\0" * 8 for oid in new)
    finally:
        r.close()
        p.close()


def test_filestorage_primary_to_refstorage_replica_process(tmp_path):
    """A live migration: runzeo over ZODB's FileStorage, `refstorage replicate --once` then following."""
    port = _free_port()
    conf = tmp_path / "zeo.conf"
    conf.write_text(textwrap.dedent(f"""\
        <zeo>
          address 127.0.0.1:{port}
        </zeo>
        <filestorage 1>
          path {tmp_path / 'p.fs'}
          blob-dir {tmp_path / 'pb'}
        </filestorage>
        """))
    server = subprocess.Popen([sys.executable, "-m", "ZEO.runzeo", "-C", str(conf)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    follow = None
    try:
        _wait_listening(server, port)
        writer = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path / "wc"), "3.0",
                                   "0.01"], env=ENV, stdout=subprocess.PIPE, text=True)
        assert json.loads(_read_line(writer)) == {"ready": True}
        time.sleep(0.3)
        once = subprocess.run([sys.executable, "-m", "refstorage", "replicate", f"zeo://127.0.0.1:{port}",
                               str(tmp_path / "r.rfs"), "--blob-dir", str(tmp_path / "rb"), "--once",
                               "--json", "-q"], env=ENV, capture_output=True, text=True, timeout=60)
        assert once.returncode == 0, once.stderr
        follow = replicate_proc(f"127.0.0.1:{port}", str(tmp_path / "r.rfs"), str(tmp_path / "rb"))
        json.loads(_read_line(writer, timeout=TIMEOUT))
        assert writer.wait(TIMEOUT) == 0
        final = last_tid(port)
        wait_for(lambda: refstorage.FileStorage(str(tmp_path / "r.rfs"), read_only=True).lastTransaction()
                 == final, what="the replica")
        os.kill(follow.pid, signal.SIGTERM)
        out, _ = follow.communicate(timeout=TIMEOUT)
        assert follow.returncode == 0
        assert json.loads(out)["transactions"] > 0  # the writer went on after --once
        assert json.loads(once.stdout)["transactions"] + json.loads(out)["transactions"] == \
            len(list(refstorage.FileStorage(str(tmp_path / "r.rfs"), read_only=True).iterator()))
    finally:
        if follow is not None:
            _stop(follow)
        _stop(server)
    from ZODB.blob import BlobStorage
    from ZODB.FileStorage import FileStorage as ZFS
    p = BlobStorage(str(tmp_path / "pb"), ZFS(str(tmp_path / "p.fs"), read_only=True))
    r = refstorage.FileStorage(str(tmp_path / "r.rfs"), read_only=True, blob_dir=str(tmp_path / "rb"))
    try:
        compare(p, r)
    finally:
        p.close()
        r.close()


def test_replica_server_exits_on_a_diverged_history(tmp_path):
    """A replica server that cannot follow says why and exits 1 instead of serving a stale copy."""
    primary = Server([str(tmp_path / "p.rfs"), "--create"], str(tmp_path / "primary.log"))
    primary.start()
    try:
        pdb = ZEO.DB(("127.0.0.1", primary.port), wait_timeout=TIMEOUT)
        pdb.close()
        import ZODB
        local = ZODB.DB(refstorage.FileStorage(str(tmp_path / "r.rfs"), create=True))  # its own root
        local.close()
        log = tmp_path / "replica.log"
        proc = subprocess.Popen([sys.executable, "-m", "refstorage", "serve", str(tmp_path / "r.rfs"),
                                 "--port", "0", "--read-only", "--replicate", primary.address],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        try:
            assert proc.wait(TIMEOUT) == 1
        finally:
            _stop(proc)
        assert "history diverges from the source at transaction" in log.read_text()
    finally:
        primary.stop()


def test_replicate_option_needs_read_only(tmp_path):
    from click.testing import CliRunner

    from refstorage.cli import main
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "r.rfs"), "--replicate", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "--read-only" in result.output


def test_lag_benchmark_runs(tmp_path):
    """Smoke test of bench/bench_replicate.py: it runs and prints its table (no timing asserted)."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                         "bench_replicate.py")
    out = tmp_path / "lag.json"
    proc = subprocess.run([sys.executable, bench, "--seconds", "1", "--rates", "30", "--json", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| 30/s |" in proc.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["commits"] > 5 and row["lost"] == 0
    assert row["p99_s"] is not None


def test_replicate_command_packs_the_replica_on_its_schedule(tmp_path):
    addr, stop_server = ZEO.server(path=str(tmp_path / "p.fs"), port=0)
    try:
        db = ZEO.DB(addr, wait_timeout=TIMEOUT)
        for n in range(5):
            with db.transaction() as conn:
                conn.root()["n"] = n
        final = db.lastTransaction()
        db.close()
        proc = replicate_proc(f"{addr[0]}:{addr[1]}", str(tmp_path / "r.rfs"), str(tmp_path / "rb"),
                              "--pack-days", "0", "--pack-every", "0.0002")   # every 0.72 s
        try:
            def packed() -> bool:
                if not os.path.exists(tmp_path / "r.rfs"):
                    return False
                r = refstorage.FileStorage(str(tmp_path / "r.rfs"), read_only=True)
                try:
                    return r.lastTransaction() == final and any(t.status == "p" for t in r.iterator())
                finally:
                    r.close()
            wait_for(packed, what="the replica's scheduled pack")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0
        assert json.loads(out)["last_tid"] == final.hex()
    finally:
        stop_server()
