"""The commit spool (core.Spool): a large transaction's records wait in a temporary file,
not in memory, and commit exactly as a small one does (issue 14 part 3)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, z64

import refstorage
from refstorage import core, errors
from refstorage import fileformat as fmt

ROOT = Path(__file__).resolve().parent.parent


class _Ref:
    __slots__ = ("oid",)

    def __init__(self, oid: bytes):
        self.oid = oid


def _record(refs: list[bytes], payload: bytes) -> bytes:
    f = io.BytesIO()
    pickle.Pickler(f, 3).dump((PersistentMapping, None))
    p = pickle.Pickler(f, 3)
    p.persistent_id = lambda o: (o.oid, PersistentMapping) if isinstance(o, _Ref) else None
    p.dump({"payload": payload, "kids": [_Ref(r) for r in refs]})
    return f.getvalue()


def _tid(i: int) -> bytes:
    return p64(0x03E0000000000000 + i)


def _history(st: refstorage.FileStorage) -> None:
    """Transactions exercising every kind of record: stores with references, the same oid
    stored twice, an undone creation (None), a backpointer (restore with prev_txn),
    raw bytes without references, and conflict-free updates of committed objects."""
    t = TransactionMetaData("u", "first")
    st.tpc_begin(t, _tid(1))
    for i in range(40):
        st.store(p64(i), z64, _record([p64(i + 1)], b"x" * (i * 7)), "", t)
    st.tpc_vote(t)
    st.tpc_finish(t)
    t = TransactionMetaData("u", "second")
    st.tpc_begin(t, _tid(2))
    for i in range(0, 40, 3):
        st.store(p64(i), _tid(1), _record([], b"second %d" % i), "", t)
    st.store(p64(5), _tid(1), b"not a pickle", "", t)
    st.store(p64(5), _tid(1), _record([p64(6)], b"stored twice"), "", t)
    st.restore(p64(7), _tid(2), _record([p64(8)], b"x" * 49), "", _tid(1), t)  # a backpointer
    st.restore(p64(100), _tid(2), None, "", None, t)  # an undone creation
    st.tpc_vote(t)
    st.tpc_finish(t)


def _body(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()[fmt.HEADER_SIZE:]


def test_spooled_commit_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held = refstorage.FileStorage(str(tmp_path / "held.rfs"), create=True)
    try:
        _history(held)
    finally:
        held.close()
    spools: list[core.Spool] = []
    real_spill = core.Pending.spill

    def spill(self: core.Pending) -> None:
        real_spill(self)
        spools.append(self.spool)

    monkeypatch.setattr(core.Pending, "spill", spill)
    monkeypatch.setattr(core, "SPOOL_RECORDS", 3)
    monkeypatch.setattr(core, "SPOOL_READ", 100)  # many chunks, some of one record
    spooled = refstorage.FileStorage(str(tmp_path / "spooled.rfs"), create=True)
    try:
        _history(spooled)
        spooled._check()
        assert spooled.load(p64(5)) == (_record([p64(6)], b"stored twice"), _tid(2))
        assert spooled.load(p64(7))[0] == _record([p64(8)], b"x" * 49)
    finally:
        spooled.close()
    assert len(spools) == 2 and all(s.closed for s in spools)
    assert _body(str(tmp_path / "spooled.rfs")) == _body(str(tmp_path / "held.rfs"))


def test_store_path_spills_by_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "SPOOL_BYTES", 1000)
    st = refstorage.FileStorage(str(tmp_path / "d.rfs"), create=True)
    try:
        t = TransactionMetaData()
        st.tpc_begin(t)
        st.store(p64(1), z64, b"a" * 999, "", t)
        assert st._pending.spool is None
        st.store(p64(2), z64, b"b" * 2, "", t)
        assert st._pending.spool is not None and len(st._pending) == 2
        assert st._pending.records == []
        st.tpc_vote(t)
        st.tpc_finish(t)
        assert st.load(p64(1))[0] == b"a" * 999 and st.load(p64(2))[0] == b"b" * 2
    finally:
        st.close()


def test_large_commit_memory_does_not_hold_the_records(tmp_path: Path) -> None:
    """20,000 records of 2,000 bytes (40 MB): the commit's traced peak stays far below."""
    n, size = 20_000, 2_000
    st = refstorage.FileStorage(str(tmp_path / "d.rfs"), create=True)
    try:
        datas = [bytes([i % 251]) * size for i in range(256)]
        t = TransactionMetaData()
        tracemalloc.start()
        try:
            st.tpc_begin(t)
            for i in range(n):
                st.store(p64(i + 1), z64, datas[i % 256], "", t)
            st.tpc_vote(t)
            st.tpc_finish(t)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < core.SPOOL_BYTES + 4 * core.SPOOL_READ + 100 * n, peak
        assert peak < n * size // 2
        assert len(st) == n
        assert st.load(p64(n))[0] == datas[(n - 1) % 256]
        st._check()
    finally:
        st.close()


def test_abort_of_a_spooled_transaction_frees_the_spool(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "SPOOL_RECORDS", 2)
    path = str(tmp_path / "d.rfs")
    st = refstorage.FileStorage(path, create=True)
    try:
        before = sorted(os.listdir(tmp_path))
        size = os.path.getsize(path)
        for vote in (False, True):
            t = TransactionMetaData()
            st.tpc_begin(t)
            for i in range(10):
                st.store(p64(i + 1), z64, b"data %d" % i, "", t)
            spool = st._pending.spool
            assert spool is not None and not spool.closed
            assert sorted(os.listdir(tmp_path)) == before  # the spool has no name
            if vote:
                st.tpc_vote(t)
                assert os.path.getsize(path) > size
            st.tpc_abort(t)
            assert spool.closed
            assert os.path.getsize(path) == size
            assert sorted(os.listdir(tmp_path)) == before
        assert len(st) == 0
        st._check()
    finally:
        st.close()


def test_close_aborting_a_spooled_transaction_frees_the_spool(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "SPOOL_RECORDS", 1)
    monkeypatch.setattr(refstorage.storage, "CLOSE_WAIT", 0.01)
    st = refstorage.FileStorage(str(tmp_path / "d.rfs"), create=True)
    t = TransactionMetaData()
    st.tpc_begin(t)
    for i in range(3):
        st.store(p64(i + 1), z64, b"data", "", t)
    spool = st._pending.spool
    st.close()
    assert spool is not None and spool.closed


CRASH = textwrap.dedent("""
    import os, sys
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64, z64
    import refstorage
    from refstorage import core
    core.SPOOL_RECORDS = 4
    st = refstorage.FileStorage(sys.argv[1])
    t = TransactionMetaData()
    st.tpc_begin(t)
    for i in range(50):
        st.store(p64(i + 10), z64, b"lost %d" % i, "", t)
    assert st._pending.spool is not None
    if sys.argv[2] == "voted":
        st.tpc_vote(t)
    os._exit(0)
""")


@pytest.mark.parametrize("when", ["storing", "voted"])
def test_crash_with_a_spooled_transaction_leaves_nothing(tmp_path: Path, when: str) -> None:
    path = str(tmp_path / "d.rfs")
    st = refstorage.FileStorage(path, create=True)
    t = TransactionMetaData()
    st.tpc_begin(t)
    st.store(p64(1), z64, b"kept", "", t)
    st.tpc_vote(t)
    st.tpc_finish(t)
    st.close()
    before = sorted(os.listdir(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run([sys.executable, "-c", CRASH, path, when], check=True, env=env, timeout=120)
    leftovers = set(os.listdir(tmp_path)) - set(before) - {"d.rfs.lock"}
    assert not leftovers  # no spool file a reopen (or anyone) could take for data
    st = refstorage.FileStorage(path)
    try:
        assert len(st) == 1 and st.load(p64(1))[0] == b"kept"
        st._check()
    finally:
        st.close()
    extra = set(os.listdir(tmp_path)) - set(before) - {"d.rfs.lock"}
    # only what any crash after a vote leaves: the unfinished transaction moved to a side file
    assert extra - {"d.rfs.index"} == ({"d.rfs.tr0"} if when == "voted" else set()), extra


def test_undo_into_a_spooled_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo reads the pending records back (Pending.latest) from the spool, including an oid
    the same transaction stored before."""
    st = refstorage.FileStorage(str(tmp_path / "d.rfs"), create=True)
    try:
        tids = []
        for round_ in range(2):
            t = TransactionMetaData()
            st.tpc_begin(t)
            for i in range(6):
                serial = z64 if round_ == 0 else tids[0]
                st.store(p64(i + 1), serial, _record([], b"round %d %d" % (round_, i)), "", t)
            st.tpc_vote(t)
            tids.append(st.tpc_finish(t))
        undo_id = st.undoLog(0, 1)[0]["id"]
        monkeypatch.setattr(core, "SPOOL_RECORDS", 2)
        t = TransactionMetaData()
        st.tpc_begin(t)
        st.store(p64(50), z64, _record([], b"new"), "", t)
        st.store(p64(51), z64, _record([], b"new"), "", t)
        st.store(p64(52), z64, _record([], b"new"), "", t)
        assert st._pending.spool is not None
        _tid, oids = st.undo(undo_id, t)
        assert sorted(oids) == [p64(i + 1) for i in range(6)]
        latest = st._pending.latest
        assert p64(3) in latest and latest[p64(51)] == (_record([], b"new"), 0)
        st.tpc_vote(t)
        st.tpc_finish(t)
        for i in range(6):
            assert st.load(p64(i + 1))[0] == _record([], b"round 0 %d" % i)
        st._check()
    finally:
        st.close()


def test_spool_errors_name_the_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = core.Spool(str(tmp_path), "d.rfs (commit spool)")
    try:
        spool.append(p64(1), b"abc", 0, 0)
        monkeypatch.setattr(core.os, "pread", lambda fd, n, pos: b"")
        with pytest.raises(errors.StorageIOError, match="commit spool"):
            spool.record(0)
    finally:
        spool.close()
    with pytest.raises(errors.StorageIOError, match="cannot create the commit spool"):
        core.Spool(str(tmp_path / "missing"), "d.rfs (commit spool)")


@pytest.mark.parametrize("fail_at", ["header", "data"])
def test_a_failed_spool_write_refuses_the_rest_of_the_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str) -> None:
    """A write to the spool that fails part way (disk full) leaves the spool unusable: a
    caller that catches the store's error and goes on storing gets errors, never another
    record's bytes committed as its data (outside review)."""
    monkeypatch.setattr(core, "SPOOL_RECORDS", 4)
    real_temporary_file = core.tempfile.TemporaryFile
    plan = {"writes": 0, "fail_on": None}

    class Failing:  # the spool's file, whose write can fail part way
        def __init__(self, *args, **kwargs):
            self._f = real_temporary_file(*args, **kwargs)

        def write(self, b):
            plan["writes"] += 1
            if plan["writes"] == plan["fail_on"]:
                self._f.write(bytes(b)[:5])  # part of it reached the file
                raise OSError(28, "No space left on device")
            return self._f.write(b)

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(core.tempfile, "TemporaryFile", Failing)
    path = str(tmp_path / "d.rfs")
    st = refstorage.FileStorage(path, create=True)
    try:
        t = TransactionMetaData()
        st.tpc_begin(t)
        for i in range(6):
            st.store(p64(i), z64, b"object %d " % i + b"x" * 30, "", t)
        assert plan["writes"] > 0  # spooled
        plan["fail_on"] = plan["writes"] + (1 if fail_at == "header" else 2)
        with pytest.raises(errors.StorageIOError, match="No space left"):
            st.store(p64(6), z64, b"object 6 " + b"x" * 30, "", t)
        with pytest.raises(errors.StorageIOError, match="earlier write to the commit spool failed"):
            st.store(p64(7), z64, b"object 7", "", t)
        st.tpc_abort(t)
        # the storage goes on: a new transaction commits and loads
        t = TransactionMetaData()
        st.tpc_begin(t)
        for i in range(8):
            st.store(p64(i), z64, b"again %d" % i, "", t)
        st.tpc_vote(t)
        st.tpc_finish(t)
        assert [st.load(p64(i))[0] for i in range(8)] == [b"again %d" % i for i in range(8)]
    finally:
        st.close()


def test_a_spool_record_cut_short_is_an_error(tmp_path: Path) -> None:
    spool = core.Spool(str(tmp_path), "d.rfs (commit spool)")
    try:
        spool.append(p64(1), b"abcdef", 0, 0)
        spool.append(p64(2), b"ghi", 0, 0)
        good = spool.end
        spool.offsets[1] -= 2  # where the records are no longer matches what was written
        with pytest.raises(errors.StorageIOError, match="commit spool record"):
            spool.record(0)
        spool.offsets[1] += 2
        spool.end = good - 1  # the last record cut short
        with pytest.raises(errors.StorageIOError, match="commit spool record"):
            spool.record(1)
        with pytest.raises(errors.StorageIOError, match="commit spool record"):
            list(spool.chunks())
        spool.end = good + 1  # a byte more than the records hold
        with pytest.raises(errors.StorageIOError, match="commit spool"):
            list(spool.chunks())
    finally:
        spool.close()


def test_iterator_reads_a_large_transaction_in_bounded_chunks(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The iterator (copyTransactionsFrom, convert, ZEO's remote iterator) never reads a
    transaction whole: its reads stay within log.SCAN_CHUNK (plus one read-ahead)."""
    from refstorage import log

    st = refstorage.FileStorage(str(tmp_path / "d.rfs"), create=True)
    try:
        t = TransactionMetaData()
        st.tpc_begin(t)
        for i in range(2000):
            st.store(p64(i + 1), z64, _record([p64(i + 2)], bytes([i % 251]) * 1000), "", t)
        st.tpc_vote(t)
        st.tpc_finish(t)
        monkeypatch.setattr(log, "SCAN_CHUNK", 64 << 10)
        file = st._state.file
        sizes: list[int] = []
        real_read = file.read

        def read(pos: int, n: int) -> bytes:
            sizes.append(n)
            return real_read(pos, n)

        monkeypatch.setattr(file, "read", read)
        count = sum(1 for txn in st.iterator() for _rec in txn)
        assert count == 2000
        assert max(sizes) <= (64 << 10) + log.READ_AHEAD
        assert sum(sizes) >= 2000 * 1000
    finally:
        st.close()
