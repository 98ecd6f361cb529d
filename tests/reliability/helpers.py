"""Shared helpers of the reliability tests: profiles, commits, a model, invariant checks."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest
from ZODB import POSException
from ZODB.Connection import TransactionMetaData
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import p64, u64, z64

import refstorage
from refstorage import fileformat as fmt
from refstorage import fileio
from refstorage.errors import RefStorageError
from refstorage.log import ScanResult

LONG_ENV = "REFSTORAGE_TEST_LONG"  # set by tests/conftest.py under --long
LONG = os.environ.get(LONG_ENV) == "1"


def scaled(ci: int, long: int) -> int:
    """`ci` in the default (CI) profile, `long` under ``pytest --long``."""
    return long if LONG else ci


def child_env() -> dict[str, str]:
    """Environment for a child Python process that must import refstorage and these tests."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [os.path.dirname(here), *sys.path]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))


# -- data ------------------------------------------------------------------------------

def value_data(value: str) -> bytes:
    """A real ZODB record (a MinPO pickle) holding `value`, so pack and undo see real pickles."""
    return zodb_pickle(MinPO(value))


def current_serial(st, oid: bytes) -> bytes:
    """The serial a store of `oid` must name: its current record's tid, z64 if it has none.

    getTid raises POSKeyError for a deleted object (or an undone creation), as
    ZODB's FileStorage does, but a store must still name the deletion's tid."""
    try:
        return st.getTid(oid)
    except POSException.POSKeyError:
        pos = st._state.index.get(oid)
        return st._state.reader.read_data_record(pos, oid).tid if pos else z64


def commit(st, oid_data: dict[bytes, bytes | None], user: str = "", description: str = "",
           extension: dict | None = None) -> bytes:
    """Store {oid: data} (None: delete) in one transaction through the raw API; return the tid."""
    t = TransactionMetaData(user, description, extension or {})
    st.tpc_begin(t)
    try:
        for oid, data in oid_data.items():
            serial = current_serial(st, oid)
            if data is None:
                st.deleteObject(oid, serial, t)
            else:
                st.store(oid, serial, data, "", t)
        st.tpc_vote(t)
    except BaseException:
        st.tpc_abort(t)
        raise
    return st.tpc_finish(t)


# -- a model of committed transactions ---------------------------------------------------

class TxnModel:
    """What a storage must hold: committed transactions in order.

    Each transaction is (tid, {oid: data}), data None meaning "no data" (a
    deleted object, an undone creation).  `state(n)` is the current data of
    every oid after the first n transactions.
    """

    def __init__(self) -> None:
        self.txns: list[tuple[bytes, dict[bytes, bytes | None]]] = []

    def add(self, tid: bytes, writes: dict[bytes, bytes | None]) -> None:
        if self.txns:
            assert tid > self.txns[-1][0], "model tids must increase"
        self.txns.append((tid, dict(writes)))

    def __len__(self) -> int:
        return len(self.txns)

    @property
    def tids(self) -> list[bytes]:
        return [tid for tid, _ in self.txns]

    def last_tid(self, n: int | None = None) -> bytes:
        n = len(self.txns) if n is None else n
        return self.txns[n - 1][0] if n else z64

    def state(self, n: int | None = None) -> dict[bytes, bytes | None]:
        n = len(self.txns) if n is None else n
        out: dict[bytes, bytes | None] = {}
        for _tid, writes in self.txns[:n]:
            out.update(writes)
        return out

    def oids(self) -> set[bytes]:
        return {oid for _tid, writes in self.txns for oid in writes}

    def revision_before(self, oid: bytes, tid: bytes) -> tuple[bytes | None, bytes, bytes | None] | None:
        """What loadBefore(oid, tid) must return: (data, its tid, next tid) or None."""
        found = None
        end = None
        for t, writes in self.txns:
            if oid not in writes:
                continue
            if t < tid:
                found = (writes[oid], t)
            elif end is None:
                end = t
                break
        if found is None:
            return None
        return found[0], found[1], end

    def truncate(self, n: int) -> None:
        del self.txns[n:]


def check_model(st, model: TxnModel, n: int | None = None, oids=None, history: bool = True,
                after_tid: bytes = z64) -> None:
    """Every oid loads its model value (POSKeyError where it has none); lastTransaction
    matches; with `history`, loadBefore/loadSerial of each transaction's records after
    `after_tid` (a pack time) match too."""
    n = len(model) if n is None else n
    assert st.lastTransaction() == model.last_tid(n), (
        f"lastTransaction {st.lastTransaction().hex()} != model {model.last_tid(n).hex()}")
    state = model.state(n)
    for oid in set(oids or ()) | model.oids():
        want = state.get(oid)
        if want is None:
            try:
                got = st.load(oid)
            except POSException.POSKeyError:
                continue
            raise AssertionError(f"oid {u64(oid)} loads {got!r}, the model has no data for it")
        assert st.load(oid)[0] == want, f"oid {u64(oid)}: wrong data"
    if not history:
        return
    sub = TxnModel()
    sub.txns = model.txns[:n]
    for tid, writes in sub.txns:
        if tid <= after_tid:
            continue
        following = p64(u64(tid) + 1)
        for oid, data in writes.items():
            if data is None:  # a deletion: loadBefore raises POSKeyError
                with pytest.raises(POSException.POSKeyError):
                    st.loadBefore(oid, following)
                continue
            got = st.loadBefore(oid, following)
            want = sub.revision_before(oid, following)
            assert got == want, f"loadBefore(oid {u64(oid)}, {following.hex()}): {got!r} != {want!r}"
            assert st.loadSerial(oid, tid) == data


# -- invariant checks of a storage ---------------------------------------------------------

def check_storage(st, idle: bool = True) -> ScanResult:
    """The storage's internal invariants (`FileStorage._check`)."""
    return st._check(idle=idle)


# -- small utilities ----------------------------------------------------------------------------

class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def capture_log(name: str = "refstorage") -> Iterator[list[logging.LogRecord]]:
    """Collect the package's log records (INFO and up) without pytest's capture.

    The loops here open storages thousands of times; keeping their warnings out
    of pytest's report keeps them fast and the report readable."""
    records: list[logging.LogRecord] = []
    logger = logging.getLogger(name)
    handler = _ListHandler(records)
    old_propagate, old_level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
        logger.setLevel(old_level)


@contextlib.contextmanager
def temp_dir(prefix: str = "rfs-rel-") -> Iterator[str]:
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def open_storage(path: str, **kw) -> refstorage.FileStorage:
    return refstorage.FileStorage(path, **kw)


def is_package_error(exc: BaseException) -> bool:
    return isinstance(exc, RefStorageError | POSException.POSKeyError)


def report(name: str, **figures) -> None:
    """Print a test's measured figures (shown with -s) and, if REFSTORAGE_TEST_REPORT
    names a file, append them to it as one JSON line (docs/reliability.md is made from them)."""
    import json
    import time

    line = {"test": name, "long": LONG, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    print(f"\n[reliability] {json.dumps(line, sort_keys=True)}")
    out = os.environ.get("REFSTORAGE_TEST_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")


# -- a small database for the exhaustive tests (bit flips, truncation, fuzzing) -----------

def build_small_db(path: str) -> tuple[TxnModel, list[tuple[int, int]]]:
    """Three transactions of a few small records, and no index file.

    1: oids 0, 1, 2 (plain bytes, user/description/extension set);
    2: oid 1 again, oid 3 created (a real pickle that references oid 0);
    3: undo of 2 (a backpointer for oid 1, "no data" for oid 3) plus new data for oid 0.
    Returns the model and each transaction's byte range [start, next start)."""
    child = MinPO("child")
    child._p_oid = p64(0)
    st = refstorage.FileStorage(path, create=True)
    model = TxnModel()
    w1 = {p64(0): b"zero-1", p64(1): b"one-1", p64(2): b"two-1"}
    model.add(commit(st, w1, user="alice", description="first", extension={"k": 1}), w1)
    w2 = {p64(1): b"one-2", p64(3): zodb_pickle(MinPO(child))}
    t2 = commit(st, w2, description="second")
    model.add(t2, w2)
    t = TransactionMetaData("bob", "undo second")
    st.tpc_begin(t)
    st.undo(t2, t)
    st.store(p64(0), st.getTid(p64(0)), b"zero-3", "", t)
    st.tpc_vote(t)
    model.add(st.tpc_finish(t), {p64(1): b"one-1", p64(3): None, p64(0): b"zero-3"})
    ranges = [(th.pos, th.next_pos) for th in st._state.reader.iter_txns(fmt.HEADER_SIZE, st._end)]
    st._saved_end = st._end  # no index file
    st.close()
    assert not os.path.exists(path + ".index")
    return model, ranges


def close_quickly(st) -> None:
    """close() without saving an index (keeps loops that open thousands of files fast)."""
    if not st.isReadOnly():
        st._saved_end = st._end
    st.close()


class NoSyncOps(fileio.Ops):
    """fsync and directory fsync do nothing: for loops that test decoding, not durability
    (the power-loss and crash tests keep the real ones)."""

    def fsync(self, fd):
        pass

    def fsync_dir(self, path):
        pass


def no_fsync():
    return fileio.injected(NoSyncOps())
