"""Replication through ZEO (refstorage.replicate, `refstorage replicate`).

The primaries here are real ZEO servers on 127.0.0.1 (ZEO.server, in a
thread of this process, over refstorage or ZODB's FileStorage); clients
commit through ZEO.DB.  At the end of each test the replica's history is
compared with the primary's file read directly: tids, status, metadata,
records (data and backpointers) and blob contents.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import transaction
import ZEO
from click.testing import CliRunner
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.utils import z64

import refstorage
from refstorage.cli import main
from refstorage.errors import HistoryDivergedError, ReplicationError
from refstorage.replicate import MIN_PIECE, Replicator, open_source, parse_source, piece_ranges

TIMEOUT = 30.0


def refstorage_conf(path, blobs) -> str:
    return f"%import refstorage\n<refstorage>\n  path {path}\n  blob-dir {blobs}\n</refstorage>\n"


@pytest.fixture(params=["refstorage", "filestorage"])
def primary(request, tmp_path):
    """A ZEO server over a refstorage or a FileStorage primary (with blobs)."""
    blobs = str(tmp_path / "primary-blobs")
    if request.param == "refstorage":
        path = str(tmp_path / "primary.rfs")
        addr, stop = ZEO.server(storage_conf=refstorage_conf(path, blobs), port=0)
    else:
        path = str(tmp_path / "primary.fs")
        addr, stop = ZEO.server(path=path, blob_dir=blobs, port=0)
    db = ZEO.DB(addr, blob_dir=str(tmp_path / "client-cache"), wait_timeout=TIMEOUT)
    info = {"kind": request.param, "path": path, "blobs": blobs, "addr": addr, "db": db,
            "source": f"{addr[0]}:{addr[1]}", "tmp": tmp_path}
    try:
        yield info
    finally:
        db.close()
        stop()


def commit_work(db, start: int, count: int) -> None:
    """`count` transactions: metadata, new objects, blobs, changes; then an undo."""
    for i in range(start, start + count):
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        try:
            txn = tm.begin()
            txn.note(f"step {i}")
            txn.setUser(f"user{i % 3}")
            txn.setExtendedInfo("step", i)
            root = conn.root()
            root.setdefault("items", PersistentMapping())
            root["items"][i] = PersistentMapping(value=i)
            if i % 3 == 0:
                root[f"blob{i}"] = Blob(b"blob %d " % i * 100)
            tm.commit()
        finally:
            conn.close()
    # an undo: its records become backpointers on both sides
    with db.transaction() as conn:
        conn.root()["items"][start].value = "changed"
    last = db.undoLog(0, 1)[0]
    db.undo(last["id"])
    transaction.commit()


def history(storage) -> list:
    """Everything a replica must reproduce, in a comparable form."""
    out = []
    for txn in storage.iterator():
        ext = txn.extension if isinstance(txn.extension, dict) else {}
        records = []
        for rec in txn:
            records.append((rec.oid, rec.data, rec.data_txn))
        out.append((txn.tid, txn.status, bytes(txn.user), bytes(txn.description), ext, records))
    return out


def blob_contents(storage) -> dict:
    """{(oid, tid): bytes} of every blob record that has a file."""
    from ZODB.blob import is_blob_record
    found = {}
    for txn in storage.iterator():
        for rec in txn:
            if rec.data and is_blob_record(rec.data):
                try:
                    with open(storage.loadBlob(rec.oid, rec.tid), "rb") as f:
                        found[(rec.oid, rec.tid)] = f.read()
                except Exception:
                    pass
    return found


def open_primary_file(primary):
    if primary["kind"] == "refstorage":
        return refstorage.FileStorage(primary["path"], read_only=True, blob_dir=primary["blobs"])
    from ZODB.blob import BlobStorage
    from ZODB.FileStorage import FileStorage as ZFS
    return BlobStorage(primary["blobs"], ZFS(primary["path"], read_only=True))


def assert_same(primary, replica_path, replica_blobs, backpointers: bool = True) -> int:
    src = open_primary_file(primary)
    rep = refstorage.FileStorage(replica_path, read_only=True, blob_dir=replica_blobs)
    try:
        expected = history(src)
        got = history(rep)
        assert [t[0] for t in got] == [t[0] for t in expected]
        assert got == expected
        blobs = blob_contents(src)
        assert blobs and blob_contents(rep) == blobs
        if backpointers:
            assert any(rec[2] for t in expected for rec in t[5]), "no backpointer was exercised"
        return len(expected)
    finally:
        src.close()
        rep.close()


def run_cli(*args):
    return CliRunner().invoke(main, ["replicate", *args], catch_exceptions=False)


def test_parse_source():
    assert parse_source("127.0.0.1:8100") == (("127.0.0.1", 8100), {})
    assert parse_source("zeo://localhost:9?storage=main&x=1") == (("localhost", 9), {"storage": "main"})
    for bad in ("8100", "127.0.0.1:", "file:///x.fs", "host:99999"):
        with pytest.raises(ReplicationError):
            parse_source(bad)


def test_once_copies_and_resumes_without_gap_or_duplicate(primary):
    db = primary["db"]
    commit_work(db, 0, 7)
    replica = str(primary["tmp"] / "replica.rfs")
    blobs = str(primary["tmp"] / "replica-blobs")
    result = run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "--json", "-q")
    assert result.exit_code == 0, result.output
    first = json.loads(result.output)
    assert first["transactions"] == assert_same(primary, replica, blobs)
    assert first["blobs"] >= 3
    # more commits, then resume: only the new transactions are copied
    commit_work(db, 7, 4)
    result = run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "--json", "-q")
    assert result.exit_code == 0, result.output
    second = json.loads(result.output)
    total = assert_same(primary, replica, blobs)
    assert first["transactions"] + second["transactions"] == total
    assert second["transactions"] == 6  # 4 commits, a change and its undo
    # nothing new: nothing copied
    result = run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "--json", "-q")
    assert json.loads(result.output)["transactions"] == 0


def test_zeo_uri_source_and_storage_name(primary):
    commit_work(primary["db"], 0, 2)
    replica = str(primary["tmp"] / "replica.rfs")
    blobs = str(primary["tmp"] / "replica-blobs")
    host, port = primary["addr"]
    result = run_cli(f"zeo://{host}:{port}?storage=1", replica, "--blob-dir", blobs, "--once")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("copied ")
    assert_same(primary, replica, blobs)


def test_refuses_a_diverging_replica_naming_the_first_tid(primary, tmp_path):
    commit_work(primary["db"], 0, 3)
    replica = str(tmp_path / "replica.rfs")
    blobs = str(tmp_path / "replica-blobs")
    assert run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "-q").exit_code == 0
    # a commit made on the replica itself: the replica is ahead on another branch
    rep = refstorage.FileStorage(replica, blob_dir=blobs)
    common = rep.lastTransaction()
    import ZODB
    rdb = ZODB.DB(rep)
    with rdb.transaction() as conn:
        conn.root()["local"] = 1
    own = rep.lastTransaction()
    rdb.close()
    commit_work(primary["db"], 3, 2)
    result = run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "-q")
    assert result.exit_code == 1
    assert f"diverges from the source at transaction {own.hex()}" in result.output
    assert replica in result.output
    # nothing was written
    rep = refstorage.FileStorage(replica, read_only=True)
    assert rep.lastTransaction() == own
    assert [t.tid for t in rep.iterator()][-2] == common
    rep.close()


def test_refuses_an_unrelated_replica(primary, tmp_path):
    commit_work(primary["db"], 0, 2)
    replica = str(tmp_path / "other.rfs")
    import ZODB
    other = ZODB.DB(refstorage.FileStorage(replica, create=True))
    other.close()
    other_first = next(iter(refstorage.FileStorage(replica, read_only=True).iterator())).tid
    src = open_primary_file(primary)
    source_first = next(iter(src.iterator())).tid
    src.close()
    result = run_cli(primary["source"], replica, "--blob-dir", str(tmp_path / "b"), "--once", "-q")
    assert result.exit_code == 1
    assert f"at transaction {min(other_first, source_first).hex()}" in result.output


def test_a_source_with_blobs_needs_a_replica_blob_dir(primary, tmp_path):
    commit_work(primary["db"], 0, 1)
    result = run_cli(primary["source"], str(tmp_path / "r.rfs"), "--once", "-q")
    assert result.exit_code == 1
    assert "--blob-dir" in result.output


def test_unreachable_source(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    result = run_cli(f"127.0.0.1:{port}", str(tmp_path / "r.rfs"), "--once", "--wait-timeout", "1", "-q")
    assert result.exit_code == 1
    assert "cannot reach the ZEO server" in result.output
    assert time.monotonic() - t0 < 20


def test_follow_is_woken_by_invalidations(primary, tmp_path):
    """With a 60 s poll, only invalidations can bring the commits over in time."""
    db = primary["db"]
    commit_work(db, 0, 1)
    rep = refstorage.FileStorage(str(tmp_path / "r.rfs"), create=True, blob_dir=str(tmp_path / "rb"))
    src = open_source(primary["source"], blob_cache=str(tmp_path / "rcache"))
    committed = []
    replicator = Replicator(src, rep, poll_interval=60.0,
                            on_commit=lambda tid, oids: committed.append((tid, len(oids))))
    thread = threading.Thread(target=replicator.run, kwargs={"deadline": time.monotonic() + TIMEOUT})
    thread.start()
    try:
        # lags are measured once the first catch-up is done
        deadline = time.monotonic() + 10
        while not replicator.following and time.monotonic() < deadline:
            time.sleep(0.005)
        for i in range(5):
            with db.transaction() as conn:
                conn.root()["n"] = i
            tid = db.lastTransaction()
            deadline = time.monotonic() + 10
            while rep.lastTransaction() < tid and time.monotonic() < deadline:
                time.sleep(0.005)
            assert rep.lastTransaction() == tid
    finally:
        replicator.stop()
        thread.join(TIMEOUT)
        src.close()
        rep.close()
    assert not thread.is_alive()
    assert committed[-1] == (tid, 1)
    lag = replicator.stats.lag_summary()
    assert lag["count"] == 5 and lag["max"] < 5.0


def test_piece_ranges_cover_every_tid_in_order_without_overlap():
    from ZODB.utils import p64, u64
    start = p64(1 << 60)
    for span, pieces in ((0, 4), (MIN_PIECE - 1, 4), (MIN_PIECE * 3 + 7, 4), (MIN_PIECE * 100, 4),
                         (MIN_PIECE * 100, 1), (MIN_PIECE * 100 + 5, 7)):
        target = p64(u64(start) + span)
        ranges = piece_ranges(start, target, pieces)
        assert ranges[0][0] == start and ranges[-1][1] is None
        assert len(ranges) == max(1, min(pieces, span // MIN_PIECE))
        for (a, b), (c, _d) in zip(ranges, ranges[1:], strict=False):
            assert a <= b and u64(c) == u64(b) + 1
        if len(ranges) > 1:
            assert u64(ranges[-2][1]) < u64(target)
    # a target before the start (nothing new as far as the client knows): one open range
    assert piece_ranges(p64(10), p64(5), 4) == [(p64(10), None)]


def test_catch_up_reads_several_ranges_at_once(primary):
    """The transactions to copy are read through several remote iterators over
    consecutive tid ranges (round trips overlap); the copy is still exact."""
    db = primary["db"]
    for i in range(6):
        commit_work(db, i * 2, 2)
        time.sleep(0.03)
    replica = str(primary["tmp"] / "replica.rfs")
    blobs = str(primary["tmp"] / "replica-blobs")
    rep = refstorage.FileStorage(replica, create=True, blob_dir=blobs)
    src = open_source(primary["source"], blob_cache=str(primary["tmp"] / "cache"))
    opened = []
    iterator = src.iterator

    def recording(start=None, stop=None):
        opened.append((start, stop))
        return iterator(start, stop)

    src.iterator = recording
    try:
        stats = Replicator(src, rep, pieces=4).run(follow=False)
    finally:
        src.close()
        rep.close()
    assert len(opened) == 4, opened
    assert opened[-1][1] is None
    assert stats.transactions == assert_same(primary, replica, blobs)


def test_catch_up_progress_has_a_total_and_an_eta(primary, tmp_path):
    commit_work(primary["db"], 0, 6)
    rep = refstorage.FileStorage(str(tmp_path / "r.rfs"), create=True, blob_dir=str(tmp_path / "rb"))
    src = open_source(primary["source"], blob_cache=str(tmp_path / "rcache"))
    seen = []
    try:
        replicator = Replicator(src, rep)
        before = replicator.progress()
        assert (before.transactions, before.done, before.eta) == (0, 0.0, None)
        replicator.on_progress = lambda stats: seen.append(replicator.progress())
        stats = replicator.run(follow=False)
        source_last = src.lastTransaction()
    finally:
        src.close()
        rep.close()
    from refstorage.replicate import tid_time
    first_tid = seen[0].replica_last
    total = tid_time(source_last) - tid_time(first_tid)
    assert total > 0
    assert [p.transactions for p in seen] == list(range(1, stats.transactions + 1))
    assert all(p.total == pytest.approx(total) and p.source_last == source_last for p in seen)
    dones = [p.done for p in seen]
    assert dones == sorted(dones) and dones[0] == 0.0 and dones[-1] == pytest.approx(total)
    assert seen[-1].eta == 0.0 and any(p.eta and p.eta > 0 for p in seen)
    line = seen[-1].as_dict()
    assert line["total_s"] == line["done_s"] and line["source_last_tid"] == source_last.hex()


def test_json_status_lines_while_catching_up(primary):
    commit_work(primary["db"], 0, 4)
    replica = str(primary["tmp"] / "replica.rfs")
    blobs = str(primary["tmp"] / "replica-blobs")
    result = run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [line["phase"] for line in lines][0] == "catching up"
    assert lines[-1]["phase"] == "caught up"
    assert lines[-1]["transactions"] == summary["transactions"] > 0
    assert lines[-1]["done_s"] == lines[-1]["total_s"] > 0
    assert lines[-1]["replica_last_tid"] == lines[-1]["source_last_tid"] == summary["last_tid"]
    # the first line comes with the first copy: nothing to base an ETA on yet
    assert lines[0]["total_s"] == lines[-1]["total_s"] and lines[0]["eta_s"] is None
    assert lines[-1]["eta_s"] == 0.0


def test_the_catch_up_bar_has_the_source_s_history_as_its_total(primary, tmp_path, monkeypatch):
    import io

    from tqdm import tqdm

    import refstorage.cli.replicate as cli_replicate
    out = io.StringIO()
    monkeypatch.setattr(cli_replicate, "progress_bar",
                        lambda total, desc, unit="txn": tqdm(total=total, desc=desc, unit=unit, file=out,
                                                             disable=False, mininterval=0))
    commit_work(primary["db"], 0, 2)
    time.sleep(0.1)
    commit_work(primary["db"], 2, 2)
    rep = refstorage.FileStorage(str(tmp_path / "r.rfs"), create=True, blob_dir=str(tmp_path / "rb"))
    src = open_source(primary["source"], blob_cache=str(tmp_path / "rcache"))
    totals = []
    try:
        replicator = Replicator(src, rep)
        status = cli_replicate.StatusLine(replicator, primary["source"], enabled=True)

        def progress(stats):
            status(stats)
            totals.append((status.bar.total, status.bar.n))

        replicator.on_progress = progress
        replicator.run(follow=False)
        expected = round(replicator.progress().total, 2)
        status.close()
    finally:
        src.close()
        rep.close()
    assert expected > 0 and totals[-1] == (expected, expected)
    assert all(total == expected for total, _n in totals)
    assert "catching up" in out.getvalue() and "txn" in out.getvalue()


def test_stats_and_empty_source(tmp_path):
    addr, stop = ZEO.server(path=str(tmp_path / "p.fs"), port=0)
    try:
        rep = refstorage.FileStorage(str(tmp_path / "r.rfs"), create=True)
        src = open_source(f"{addr[0]}:{addr[1]}")
        try:
            stats = Replicator(src, rep).run(follow=False)
            assert stats.transactions == 0 and stats.last_tid == z64
            assert rep.lastTransaction() == z64
        finally:
            src.close()
            rep.close()
    finally:
        stop()


def test_diverged_error_pickles():
    import pickle
    err = HistoryDivergedError("/x/r.rfs", b"\x01" * 8, "why")
    back = pickle.loads(pickle.dumps(err))
    assert back.tid == err.tid and str(back) == str(err)
    assert "/x/r.rfs" in str(err) and "0101010101010101" in str(err)
    assert os.path.basename(back.path) == "r.rfs"


def test_resumes_when_a_pack_removed_the_replica_s_last_transaction(primary, tmp_path):
    db = primary["db"]
    commit_work(db, 0, 2)
    with db.transaction() as conn:
        conn.root()["n"] = 0              # the replica's last: only the root, soon superseded
    replica, blobs = str(tmp_path / "replica.rfs"), str(tmp_path / "replica-blobs")
    assert run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "-q").exit_code == 0
    last = refstorage.FileStorage(replica, read_only=True).lastTransaction()
    for n in (1, 2):
        with db.transaction() as conn:
            conn.root()["n"] = n
    time.sleep(0.01)
    pack_time = time.time()
    db.pack(pack_time)                    # empties and drops `last` on the primary
    src = open_primary_file(primary)
    tids = [t.tid for t in src.iterator()]
    src.close()
    assert last not in tids
    result = run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["transactions"] >= 1
    rep = refstorage.FileStorage(replica, read_only=True)
    mine = [t.tid for t in rep.iterator()]
    rep.close()
    after = [tid for tid in tids if tid > last]
    assert mine[-len(after):] == after
    if primary["kind"] == "refstorage":   # the same pack on the replica gives the same history
        rep = refstorage.FileStorage(replica, blob_dir=blobs)
        rep.pack(pack_time)
        rep.close()
        assert_same(primary, replica, blobs, backpointers=False)


def test_refuses_a_replica_whose_last_transaction_has_other_records(primary, tmp_path):
    """Same tids and metadata, other data in the last transaction: found by the record check."""
    commit_work(primary["db"], 0, 2)
    src = open_primary_file(primary)
    replica = str(tmp_path / "forged.rfs")
    rep = refstorage.FileStorage(replica, create=True)
    txns = [(txn, list(txn)) for txn in src.iterator()]
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import u64
    forged = None
    for n, (txn, recs) in enumerate(txns):
        meta = TransactionMetaData(txn.user, txn.description, txn.extension)
        rep.tpc_begin(meta, txn.tid, txn.status)
        for rec in recs:
            data = rec.data
            if n == len(txns) - 1 and forged is None:
                forged = rec.oid              # the revision before, under the last tid
                data = src.loadBefore(rec.oid, txn.tid)[0]
                assert data != rec.data
            rep.restore(rec.oid, txn.tid, data, "", None, meta)
        rep.tpc_vote(meta)
        rep.tpc_finish(meta)
    rep.close()
    src.close()
    result = run_cli(primary["source"], replica, "--blob-dir", str(tmp_path / "b"), "--once", "-q")
    assert result.exit_code == 1
    assert f"at transaction {txns[-1][0].tid.hex()}" in result.output
    assert f"other data for oid {u64(forged)}" in result.output


def test_resumes_when_a_pack_removed_an_unreachable_last_transaction(primary, tmp_path):
    """The replica's last transaction only wrote an unreachable object: a pack drops it and
    the source's next transaction (after the pack time) is not packed."""
    db = primary["db"]
    commit_work(db, 0, 2)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    with tm:
        conn.add(PersistentMapping(orphan=True))   # stored, referenced by nothing
    conn.close()
    replica, blobs = str(tmp_path / "replica.rfs"), str(tmp_path / "replica-blobs")
    assert run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "-q").exit_code == 0
    last = refstorage.FileStorage(replica, read_only=True).lastTransaction()
    time.sleep(0.01)
    pack_time = time.time()
    time.sleep(0.01)
    with db.transaction() as conn:
        conn.root()["after"] = 1          # after the pack time: the file's last transaction
    db.pack(pack_time)
    src = open_primary_file(primary)
    txns = [(t.tid, t.status) for t in src.iterator()]
    src.close()
    assert last not in [tid for tid, _ in txns]
    assert txns[-1][1] == " " and all(status == "p" for _, status in txns[:-1])
    result = run_cli(primary["source"], replica, "--blob-dir", blobs, "--once", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["transactions"] == 1
    # a replica that never had the packed history is still refused
    other = str(tmp_path / "other.rfs")
    import ZODB
    ZODB.DB(refstorage.FileStorage(other, create=True)).close()
    result = run_cli(primary["source"], other, "--blob-dir", blobs + "2", "--once", "-q")
    assert result.exit_code == 1
    assert "diverges" in result.output


def test_the_replica_packs_on_its_own_schedule_while_following(primary, tmp_path):
    from refstorage.replicate import PackSchedule
    db = primary["db"]
    commit_work(db, 0, 4)
    rep = refstorage.FileStorage(str(tmp_path / "r.rfs"), create=True, blob_dir=str(tmp_path / "rb"),
                                 pack_keep_old=False)
    src = open_source(primary["source"], blob_cache=str(tmp_path / "rcache"))
    replicator = Replicator(src, rep, poll_interval=0.2)
    schedule = PackSchedule(rep, days=0, every=0.3)
    thread = threading.Thread(target=replicator.run, kwargs={"deadline": time.monotonic() + TIMEOUT})
    thread.start()
    schedule.start()
    try:
        deadline = time.monotonic() + 20
        n = 0
        while (schedule.packs < 2 or n < 10) and time.monotonic() < deadline:
            with db.transaction() as conn:
                conn.root()["items"][n % 3].value = n   # history for the packs to drop
            n += 1
            time.sleep(0.05)
        tid = db.lastTransaction()
        deadline = time.monotonic() + 10
        while rep.lastTransaction() < tid and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rep.lastTransaction() == tid      # the packs did not stop the copy
    finally:
        schedule.stop()
        replicator.stop()
        thread.join(TIMEOUT)
        src.close()
    assert schedule.packs >= 2
    statuses = [t.status for t in rep.iterator()]
    assert "p" in statuses
    # current data equals the primary's
    src = open_primary_file(primary)
    try:
        for oid in {rec.oid for t in rep.iterator() for rec in t}:
            try:
                expected = src.load(oid)
            except Exception:
                continue
            assert rep.load(oid) == expected
    finally:
        src.close()
        rep.close()


def test_pack_days_needs_replicate(tmp_path):
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "r.rfs"), "--pack-days", "1"])
    assert result.exit_code == 2
    assert "--replicate" in result.output
