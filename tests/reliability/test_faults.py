"""Disk full and I/O errors: ENOSPC or EIO at every write, fsync, truncate, rename and directory fsync.

A small workload (create the file, eight commits of several chunks each, an
aborted transaction, index saves, close) runs once to count its operations;
then, for every k, it runs again with the k-th operation of one kind failing
(once, or -- for a full disk -- three times in a row, then clearing).  The
workload behaves like an application: a failed vote is aborted and retried, a
failed open is retried, and a storage whose fsync failed is reopened.

Required:
- a failing vote raises StorageIOError with the errno, and the file is cut
  back to the last committed transaction (nothing past the committed end);
- a failing fsync at finish raises, publishes nothing (lastTransaction
  unchanged), and every later write -- the next vote -- raises
  StorageBrokenError: no retry can pretend the data is durable; reopening works;
- once the fault clears the next commit succeeds;
- at the end, reopened without faults, the file passes a full verify and holds
  every acknowledged transaction (and a transaction whose finish failed after
  its data reached the file at most in addition).

Plus one real run under a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so
writes fail with EFBIG) in a child process.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64

import refstorage
from refstorage import errors, fileio, storage

from .helpers import (
    TxnModel,
    capture_log,
    check_model,
    check_storage,
    child_env,
    current_serial,
    report,
    temp_dir,
    value_data,
)

pytestmark = pytest.mark.reliability

class FaultOps(fileio.Ops):
    """Fails the k-th call of one kind (and the `times - 1` after it) with errno `err`."""

    KINDS = ("pwrite", "fsync", "ftruncate", "replace", "fsync_dir")

    def __init__(self, kind: str | None = None, k: int = 0, err: int = errno.EIO, times: int = 1):
        self.kind, self.k, self.err, self.times = kind, k, err, times
        self.counts: Counter = Counter()
        self.fired = 0
        self.last_failed: tuple | None = None

    def _check(self, kind: str, detail=None) -> None:
        self.counts[kind] += 1
        if kind == self.kind and self.counts[kind] >= self.k and self.fired < self.times:
            self.fired += 1
            self.last_failed = (kind, detail)
            raise OSError(self.err, os.strerror(self.err))

    def pwrite(self, fd, data, pos):
        self._check("pwrite", (len(data), pos))
        return super().pwrite(fd, data, pos)

    def fsync(self, fd):
        self._check("fsync")
        return super().fsync(fd)

    def ftruncate(self, fd, size):
        self._check("ftruncate")
        return super().ftruncate(fd, size)

    def replace(self, src, dst):
        self._check("replace")
        return super().replace(src, dst)

    def fsync_dir(self, path):
        self._check("fsync_dir")
        return super().fsync_dir(path)


def _plan() -> list[tuple[str, dict[bytes, bytes]]]:
    steps = []
    for i in range(8):
        writes = {p64(oid): value_data(f"{i}.{oid}." + "z" * (150 * oid + 40 * i))
                  for oid in range(i % 4 + 1)}
        steps.append(("abort" if i == 3 else "commit", writes))
    return steps


class Workload:
    def __init__(self, path: str, ops: FaultOps):
        self.path = path
        self.ops = ops
        self.model = TxnModel()
        self.st = None
        self.stats: Counter = Counter()

    def _open(self):
        for _ in range(5):
            try:
                return refstorage.FileStorage(self.path)
            except errors.StorageIOError as exc:
                assert exc.errno == self.ops.err, exc
                self.stats["open failed, retried"] += 1
        raise AssertionError("open keeps failing after the fault cleared")

    def _reopen(self) -> None:
        self.st.close()
        self.st = self._open()

    def run(self) -> None:
        self.st = self._open()
        for kind, writes in _plan():
            for _attempt in range(6):
                if self._attempt(kind, writes):
                    break
            else:
                raise AssertionError("a commit kept failing after the fault cleared")
        self.st.close()

    def _attempt(self, kind: str, writes: dict) -> bool:
        st = self.st
        t = TransactionMetaData()
        st.tpc_begin(t)
        end = st._end
        try:
            for oid, data in writes.items():
                st.store(oid, current_serial(st, oid), data, "", t)
            st.tpc_vote(t)
        except (errors.StorageIOError, errors.StorageBrokenError) as exc:
            broken = st._state.file.broken
            st.tpc_abort(t)
            if isinstance(exc, errors.StorageIOError):
                assert exc.errno == self.ops.err
            if broken:
                self.stats["vote refused by a broken storage; reopened"] += 1
                self._reopen()
            else:
                assert os.path.getsize(self.path) == end == st._end, "a failed vote left bytes behind"
                self.stats["vote failed; file cut back"] += 1
            return False
        if kind == "abort":
            st.tpc_abort(t)
            if os.path.getsize(self.path) != end:
                # the truncate of the abort itself failed: logged, and the bytes stay past the end
                assert self.ops.last_failed and self.ops.last_failed[0] == "ftruncate"
                self.stats["abort's truncate failed"] += 1
            return True
        last = st.lastTransaction()
        try:
            tid = st.tpc_finish(t)
        except errors.StorageIOError as exc:
            assert exc.errno == self.ops.err
            assert st.lastTransaction() == last, "a failed finish published its transaction"
            if "fsync" in exc.detail:
                self._after_failed_fsync(st)
                self.stats["fsync at finish failed; broken, reopened"] += 1
            else:
                self.stats["status write at finish failed; file cut back"] += 1
                assert os.path.getsize(self.path) == st._end, "a failed finish left bytes behind"
            now = self.st.lastTransaction()
            if now != last:  # the data reached the file before the failure: it is there
                assert now > last
                self.model.add(now, writes)
                self.stats["unacknowledged but durable"] += 1
                return True
            return False
        self.model.add(tid, writes)
        return True

    def _after_failed_fsync(self, st) -> None:
        assert st._state.file.broken
        size = os.path.getsize(self.path)
        t = TransactionMetaData()
        st.tpc_begin(t)
        st.store(p64(99), current_serial(st, p64(99)), b"must not be written", "", t)
        with pytest.raises(errors.StorageBrokenError, match="fsync failed"):
            st.tpc_vote(t)
        st.tpc_abort(t)
        assert os.path.getsize(self.path) == size, "a broken storage wrote"
        self._reopen()


def _run_case(d: str, ops: FaultOps) -> Workload:
    path = os.path.join(d, "Data.rfs")
    for name in os.listdir(d):
        os.remove(os.path.join(d, name))
    old = storage.INDEX_SAVE_BYTES, storage.WRITE_CHUNK
    storage.INDEX_SAVE_BYTES, storage.WRITE_CHUNK = 2500, 500
    work = Workload(path, ops)
    try:
        with capture_log(), fileio.injected(ops):
            try:
                work.run()
            finally:
                if work.st is not None and not work.st._closed:
                    work.st.close()
    finally:
        storage.INDEX_SAVE_BYTES, storage.WRITE_CHUNK = old
    with capture_log():
        st = refstorage.FileStorage(path)
        try:
            check_model(st, work.model)
            check_storage(st)
        finally:
            st.close()
    return work


def test_fault_at_every_operation():
    stats: Counter = Counter()
    runs = Counter()
    with temp_dir() as d:
        clean = _run_case(d, FaultOps())
        counts = clean.ops.counts
        assert len(clean.model) == 7
        cases = []
        for kind in FaultOps.KINDS:
            for k in range(1, counts[kind] + 1):
                cases.append((kind, k, errno.EIO, 1))
                if kind in ("pwrite", "fsync"):
                    cases.append((kind, k, errno.ENOSPC, 1))
                if kind == "pwrite":
                    cases.append((kind, k, errno.ENOSPC, 3))  # a full disk stays full for a while
        for kind, k, err, times in cases:
            ops = FaultOps(kind, k, err, times)
            try:
                work = _run_case(d, ops)
            except BaseException as exc:
                raise AssertionError(f"{os.strerror(err)} at {kind} #{k} (x{times}): {exc!r}") from exc
            assert ops.fired, f"{kind} #{k} never happened"
            assert len(work.model) >= 7
            stats.update(work.stats)
            runs[f"{kind} {errno.errorcode[err]}" + (f" x{times}" if times > 1 else "")] += 1
    report("faults", operations_in_workload=dict(counts), fault_runs=sum(runs.values()),
           runs_by_fault=dict(runs), outcomes=dict(stats))


def test_failed_status_write_truncates_back(tmp_path):
    path = str(tmp_path / "Data.rfs")
    st = refstorage.FileStorage(path)

    class FailFlip(fileio.Ops):
        def pwrite(self, fd, data, pos):
            if len(data) == 1:
                raise OSError(errno.EIO, "I/O error")
            return super().pwrite(fd, data, pos)

    t = TransactionMetaData()
    st.tpc_begin(t)
    st.store(p64(1), current_serial(st, p64(1)), b"x" * 500, "", t)
    st.tpc_vote(t)
    with fileio.injected(FailFlip()), pytest.raises(errors.StorageIOError):
        st.tpc_finish(t)
    st.tpc_abort(t)
    try:
        assert os.path.getsize(path) == st._end
    finally:
        st.close()


FSIZE_SCRIPT = textwrap.dedent("""
    import json, os, resource, signal, sys
    import refstorage
    from refstorage import errors
    from reliability.helpers import commit
    from ZODB.utils import p64
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    path, limit = sys.argv[1], int(sys.argv[2])
    st = refstorage.FileStorage(path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    acked, failures, n = [], [], 0
    for i in range(400):
        size = 100 + (i * 37) % 2000
        try:
            tid = commit(st, {p64(i % 50): os.urandom(4) + b"v" * size})
        except errors.StorageIOError as exc:
            failures.append([exc.errno, os.path.getsize(path), st._end, exc.detail])
            size = 10
            if len(failures) >= 5:
                break
            continue
        acked.append([i % 50, tid.hex()])
    st.close()
    print(json.dumps({"acked": acked, "failures": failures}))
""")


def test_real_file_size_limit():
    """RLIMIT_FSIZE makes writes fail with EFBIG: votes fail cleanly, small commits go on."""
    limit = 60_000
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        out = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, path, str(limit)], capture_output=True,
                             text=True, env=child_env(), timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        failures = result["failures"]
        assert failures, "the limit was never reached"
        for err, size, end, detail in failures:
            assert err == errno.EFBIG, detail
            assert size == end, "a failed vote left bytes behind"
        assert os.path.getsize(path) <= limit
        st = refstorage.FileStorage(path)
        try:
            assert st.lastTransaction().hex() == result["acked"][-1][1]
            check_storage(st)
            want = {}
            for oid, tid in result["acked"]:
                want[oid] = tid
            for oid, tid in want.items():
                assert st.getTid(p64(oid)).hex() == tid
        finally:
            st.close()
    report("file_size_limit", limit=limit, commits=len(result["acked"]), efbig_failures=len(failures))
