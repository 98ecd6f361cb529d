"""An exception (not a kill) at every step of a commit: no durable transaction lost or overwritten.

The kill variant is in test_crash.py.  Here the process lives on: the
exception reaches the caller, which aborts as the transaction package does,
and keeps using the storage.  For every fault point between vote and the end
of finish (each named step of `FileStorage.tpc_vote`/`tpc_finish` and the index
save), and for the DB's callback and the index update raising:

- a transaction whose tpc_finish returned is never lost;
- a transaction whose fsync completed (the fault came after it) is committed:
  visible at once, kept after a reopen, and never written over by the next
  commit -- even though its tpc_finish raised;
- a fault before the fsync leaves nothing behind (the file is cut back);
- afterwards the storage either keeps working (the next commit succeeds) or
  refuses every read and write with StorageBrokenError (when its in-memory
  index could not be updated), and a reopen then shows every committed
  transaction;
- the storage's invariants hold (FileStorage._check-style full scan).
"""

from __future__ import annotations

import threading
import time

import pytest
from ZODB import POSException
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64

import refstorage
from refstorage import errors, fileio
from refstorage import storage as storage_module
from refstorage.index import OidIndex

from .helpers import check_storage, commit, current_serial, temp_dir

pytestmark = pytest.mark.reliability

# Every point a commit passes, in order (vote, finish, index save).
COMMIT_POINTS = [
    "commit.vote-start", "commit.after-data-write", "commit.finish-start",
    "commit.after-status-flip", "commit.after-fsync", "commit.after-callback",
    "commit.after-publish", "index.save.after-write", "index.save.after-fsync",
    "index.save.after-replace", "commit.after-index-save",
]
# From this point on the transaction is durable.
FIRST_DURABLE = COMMIT_POINTS.index("commit.after-fsync")


class Boom(Exception):
    pass


class RecordingOps(fileio.Ops):
    def __init__(self):
        self.seen: list[str] = []

    def point(self, name):
        self.seen.append(name)


class RaiseAt(fileio.Ops):
    """Raises Boom at the first occurrence of point `name`."""

    def __init__(self, name: str):
        self.name = name
        self.fired = False

    def point(self, name):
        if name == self.name and not self.fired:
            self.fired = True
            raise Boom(name)


def _attempt(st, writes: dict[bytes, bytes], callback=None) -> tuple[bytes | None, BaseException | None]:
    """One commit as ZODB's transaction package makes it: abort after any failure.

    Returns (tid if tpc_finish returned, the exception raised if any)."""
    t = TransactionMetaData("u", "d")
    try:
        st.tpc_begin(t)
    except BaseException as exc:
        return None, exc
    try:
        for oid, data in writes.items():
            st.store(oid, current_serial(st, oid), data, "", t)
        st.tpc_vote(t)
        return st.tpc_finish(t, callback), None
    except BaseException as exc:
        st.tpc_abort(t)
        return None, exc


def test_the_points_are_those_a_commit_passes(tmp_path, monkeypatch):
    """COMMIT_POINTS is exactly what a commit with an index save passes (so the loop covers all)."""
    monkeypatch.setattr(storage_module, "INDEX_SAVE_BYTES", 0)
    st = refstorage.FileStorage(str(tmp_path / "Data.rfs"))
    rec = RecordingOps()
    with fileio.injected(rec):
        commit(st, {p64(1): b"x"})
    st.close()
    assert rec.seen == COMMIT_POINTS


def test_callback_raising_keeps_the_durable_commit(tmp_path):
    """The reproduction from issue 11: a raising callback made the next commit overwrite it."""
    path = str(tmp_path / "Data.rfs")
    st = refstorage.FileStorage(path)
    t1 = commit(st, {p64(1): b"one"})

    def callback(tid):
        raise Boom("callback")

    tid2, exc = _attempt(st, {p64(2): b"two"}, callback)
    assert tid2 is None and isinstance(exc, Boom)
    assert st.load(p64(2))[0] == b"two", "a durable transaction was not published"
    t3 = commit(st, {p64(3): b"three"})
    st.close()
    st = refstorage.FileStorage(path)
    assert st.load(p64(1)) == (b"one", t1)
    assert st.load(p64(2))[0] == b"two"
    assert st.load(p64(3)) == (b"three", t3)
    check_storage(st)
    st.close()


def _faults() -> list[str]:
    return [*COMMIT_POINTS, "callback", "index-update"]


@pytest.mark.parametrize("fault", _faults())
def test_exception_at_every_commit_step(fault, monkeypatch):
    monkeypatch.setattr(storage_module, "INDEX_SAVE_BYTES", 0)  # every commit saves the index
    with temp_dir() as d:
        path = f"{d}/Data.rfs"
        st = refstorage.FileStorage(path)
        acked: dict[bytes, tuple[bytes, bytes]] = {}  # oid -> (data, tid) acknowledged
        t1 = commit(st, {p64(1): b"a1", p64(2): b"b1"})
        acked.update({p64(1): (b"a1", t1), p64(2): (b"b1", t1)})
        writes = {p64(1): b"a2", p64(3): b"c2"}

        callback = None
        if fault == "callback":
            def callback(tid):
                raise Boom("callback")
            ops = fileio.Ops()
        elif fault == "index-update":
            real_update = OidIndex.update

            def failing_update(self, pairs):
                monkeypatch.setattr(OidIndex, "update", real_update)
                raise MemoryError("injected")
            monkeypatch.setattr(OidIndex, "update", failing_update)
            ops = fileio.Ops()
        else:
            ops = RaiseAt(fault)
        last_before = st.lastTransaction()
        with fileio.injected(ops):
            tid2, exc = _attempt(st, writes, callback)
        if isinstance(ops, RaiseAt):
            assert ops.fired, f"point {fault} was never reached"
        durable = fault in ("callback", "index-update") or (
            fault in COMMIT_POINTS and COMMIT_POINTS.index(fault) >= FIRST_DURABLE)
        if fault.startswith("index.save"):
            # a failed index save is logged, never raised: the commit is acknowledged
            assert exc is None and tid2 is not None
        else:
            assert tid2 is None and exc is not None, "the injected fault did not reach the caller"
        if fault == "index-update":  # the storage broke: it refuses reads, writes need a reopen
            for call in (lambda: st.load(p64(1)), st.record_iternext, st.undoLog,
                         lambda: st.iterator(), lambda: st.history(p64(1)),
                         lambda: st.pack(time.time() + 1, None)):
                with pytest.raises(errors.StorageBrokenError, match="reopen"):
                    call()
            two = st.lastTransaction()
            assert two > last_before
            acked.update({p64(1): (b"a2", two), p64(3): (b"c2", two)})
        elif durable:
            two = st.lastTransaction()
            assert two > last_before, "a durable transaction was not published"
            assert st.load(p64(1)) == (b"a2", two)
            assert st.load(p64(3)) == (b"c2", two)
            acked.update({p64(1): (b"a2", two), p64(3): (b"c2", two)})
        else:
            assert st.lastTransaction() == last_before
            with pytest.raises(POSException.POSKeyError):
                st.load(p64(3))

        # the next commit: succeeds, or is refused clearly (never written over the durable one)
        tid3, exc3 = _attempt(st, {p64(4): b"d3", p64(1): b"a3"})
        if fault == "index-update":
            assert isinstance(exc3, errors.StorageBrokenError), exc3
            assert "reopen" in str(exc3)
        else:
            assert exc3 is None, exc3
            acked.update({p64(4): (b"d3", tid3), p64(1): (b"a3", tid3)})
            check_storage(st)
        st.close()

        st = refstorage.FileStorage(path)
        for oid, (data, tid) in acked.items():
            assert st.load(oid) == (data, tid), f"oid {oid.hex()} lost its committed revision"
        if not durable:
            with pytest.raises(POSException.POSKeyError):
                st.load(p64(3))
        check_storage(st)
        # and it keeps working
        commit(st, {p64(5): b"e"})
        check_storage(st)
        st.close()


def test_format_limit_refused_at_vote(tmp_path, monkeypatch):
    """A transaction past the format's position limit is refused before anything is durable."""
    monkeypatch.setattr(storage_module, "MAX_POS", 2000)
    st = refstorage.FileStorage(str(tmp_path / "Data.rfs"))
    tid, exc = _attempt(st, {p64(1): b"x" * 5000})
    assert tid is None and isinstance(exc, errors.FileSizeLimitError), exc
    assert "format's limit" in str(exc)
    monkeypatch.setattr(storage_module, "MAX_POS", 2**48 - 1)
    commit(st, {p64(2): b"y"})
    check_storage(st)
    st.close()


def test_close_aborts_an_idle_transaction(tmp_path, monkeypatch):
    """close() with a transaction begun (and voted) but idle aborts it: nothing of it stays."""
    monkeypatch.setattr(storage_module, "CLOSE_WAIT", 0.1)
    path = str(tmp_path / "Data.rfs")
    st = refstorage.FileStorage(path)
    t1 = commit(st, {p64(1): b"one"})
    t = TransactionMetaData()
    st.tpc_begin(t)
    st.store(p64(2), current_serial(st, p64(2)), b"two", "", t)
    st.tpc_vote(t)
    st.close()
    with pytest.raises(POSException.StorageTransactionError):
        st.tpc_finish(t)
    st.tpc_abort(t)  # harmless
    st = refstorage.FileStorage(path)  # the lock was released
    assert st.load(p64(1)) == (b"one", t1)
    with pytest.raises(POSException.POSKeyError):
        st.load(p64(2))
    check_storage(st)
    st.close()


def test_close_never_cuts_a_commit_being_written(tmp_path, monkeypatch):
    """close() while another thread is inside tpc_finish: the file stays open until it ends,
    the commit completes and is durable, and the storage then closes itself."""
    monkeypatch.setattr(storage_module, "CLOSE_WAIT", 0.1)
    path = str(tmp_path / "Data.rfs")
    st = refstorage.FileStorage(path)
    inside, release = threading.Event(), threading.Event()

    class Slow(fileio.Ops):
        def point(self, name):
            if name == "commit.after-status-flip":
                inside.set()
                assert release.wait(10)

    result: dict = {}

    def writer():
        with fileio.injected(Slow()):
            result["tid"] = commit(st, {p64(1): b"slow"})

    th = threading.Thread(target=writer)
    th.start()
    assert inside.wait(10)
    t0 = time.monotonic()
    st.close()  # returns: the commit closes the storage when it ends
    assert time.monotonic() - t0 < 5
    with pytest.raises(POSException.StorageError):
        st.tpc_begin(TransactionMetaData())
    release.set()
    th.join(10)
    assert "tid" in result, "the commit in flight failed"
    st2 = refstorage.FileStorage(path)  # closed by the commit: the lock is free
    assert st2.load(p64(1)) == (b"slow", result["tid"])
    st2.close()
