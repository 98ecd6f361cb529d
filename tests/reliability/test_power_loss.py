"""Power loss: crash images that keep only what was fsynced still hold every acknowledged commit.

A workload (create, commits, undos, aborts, a crash with a voted transaction
and the recovery after it, index saves, close and reopen, a pack) runs on a
real directory through `RecordingOps`, which logs every file operation that
changes something -- create, write, truncate, fsync, rename, link, unlink,
directory fsync -- and `FsModel` replays that log against a model of each
file's *durable* content (what its last fsync made permanent) and each
directory's durable names (what its last directory fsync made permanent).

For a cut after k operations, a crash image is what a machine could find
after losing power there: the durable state plus, per mode,

- ``drop``:    nothing that was not synced;
- ``all``:     everything (the page cache survived: a process crash);
- ``zero``:    the unsynced writes as zeros (sizes persisted, data not);
- ``prefix``:  the unsynced operations of each file in order up to a random
               one, that one only partly written;
- ``reorder``: each 512-byte sector written since the last fsync holds its
               content as of a random moment since then (write-back reached the
               disk in any order, a sector at a time), the file size as of
               another; and a random prefix of the directory's unsynced
               creates, renames, links and unlinks (the journal keeps their order);
- ``mixed``:   ``reorder``, with some sectors past the synced end of the file
               zeros instead (space allocated, data never written).

Unsynced renames, links and unlinks are lost except in ``reorder`` and
``mixed``.  Note that ``reorder`` is not "any subset of the write calls": a
later write to a sector can only reach the disk together with the earlier
writes to it (they share a page of the page cache).  A subset of write calls
could apply a commit's one-byte status flip without the header written just
before it over an aborted transaction's header -- which no disk can do.

Every image is written to a fresh directory and opened: the open succeeds,
the state is the model after some prefix of the commits that holds every
transaction acknowledged before the cut (tpc_finish had returned), the file
passes a full verify and the index equals a fresh scan; a second open finds
the same.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections import Counter

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, u64, z64

import refstorage
from refstorage import fileio, storage

from .helpers import (
    TxnModel,
    capture_log,
    check_model,
    check_storage,
    commit,
    current_serial,
    report,
    scaled,
    temp_dir,
    value_data,
)

pytestmark = pytest.mark.reliability

MODES = ("drop", "all", "zero", "prefix", "reorder", "mixed")
DATA = "Data.rfs"
SECTOR = 512  # the unit a disk writes atomically


class RecordingOps(fileio.Ops):
    """Does every operation for real and logs, in order, those that change the directory."""

    def __init__(self, dirpath: str):
        self.dir = os.path.realpath(dirpath)
        self.log: list[tuple] = []
        self.names: dict[str, int] = {}  # the directory now: name -> inode number
        self.fds: dict[int, int] = {}
        self.next_ino = 0

    def _name(self, path: str) -> str:
        path = os.path.realpath(path)
        assert os.path.dirname(path) == self.dir, f"{path} is outside the recorded directory"
        return os.path.basename(path)

    def open(self, path, flags, mode=0o666):
        name = self._name(path)
        fd = super().open(path, flags, mode)
        if name not in self.names:
            assert flags & os.O_CREAT
            self.next_ino += 1
            self.names[name] = self.next_ino
            self.log.append(("create", name, self.next_ino))
        ino = self.names[name]
        if flags & os.O_TRUNC:
            self.log.append(("trunc", ino, 0))
        self.fds[fd] = ino
        return fd

    def close(self, fd):
        self.fds.pop(fd, None)
        super().close(fd)

    def pwrite(self, fd, data, pos):
        n = super().pwrite(fd, data, pos)
        self.log.append(("write", self.fds[fd], pos, bytes(data[:n])))
        return n

    def ftruncate(self, fd, size):
        super().ftruncate(fd, size)
        self.log.append(("trunc", self.fds[fd], size))

    def fsync(self, fd):
        super().fsync(fd)
        self.log.append(("fsync", self.fds[fd]))

    def replace(self, src, dst):
        super().replace(src, dst)
        s, d = self._name(src), self._name(dst)
        self.names[d] = self.names.pop(s)
        self.log.append(("replace", s, d))

    def link(self, src, dst):
        super().link(src, dst)
        s, d = self._name(src), self._name(dst)
        self.names[d] = self.names[s]
        self.log.append(("link", s, d))

    def unlink(self, path):
        super().unlink(path)
        name = self._name(path)
        self.names.pop(name)
        self.log.append(("unlink", name))

    def fsync_dir(self, path):
        super().fsync_dir(path)
        assert os.path.realpath(path) == self.dir
        self.log.append(("fsync_dir",))


def _apply(content: bytearray, op: tuple, data: bytes | None = None) -> None:
    if op[0] == "trunc":
        del content[op[1]:]
        content.extend(bytes(op[1] - len(content)))
    else:
        pos, new = op[1], op[2] if data is None else data
        if len(content) < pos:
            content.extend(bytes(pos - len(content)))
        content[pos:pos + len(new)] = new


class FsModel:
    """Durable and volatile state of one directory, advanced one logged operation at a time."""

    def __init__(self):
        self.names: dict[str, int] = {}  # volatile directory
        self.durable_names: dict[str, int] = {}
        self.dir_pending: list[tuple] = []  # renames, links, unlinks, creates since the last dir fsync
        self.durable: dict[int, bytearray] = {}  # inode -> content made durable by fsync
        self.pending: dict[int, list[tuple]] = {}  # inode -> unsynced ("trunc", size) / ("write", pos, data)

    def step(self, op: tuple) -> None:
        kind = op[0]
        if kind == "create":
            self.names[op[1]] = op[2]
            self.durable[op[2]] = bytearray()
            self.pending[op[2]] = []
            self.dir_pending.append(op)
        elif kind == "trunc":
            self.pending[op[1]].append(("trunc", op[2]))
        elif kind == "write":
            self.pending[op[1]].append(("write", op[2], op[3]))
        elif kind == "fsync":
            for p in self.pending[op[1]]:
                _apply(self.durable[op[1]], p)
            self.pending[op[1]] = []
        elif kind == "replace":
            self.names[op[2]] = self.names.pop(op[1])
            self.dir_pending.append(op)
        elif kind == "link":
            self.names[op[2]] = self.names[op[1]]
            self.dir_pending.append(op)
        elif kind == "unlink":
            del self.names[op[1]]
            self.dir_pending.append(op)
        elif kind == "fsync_dir":
            self.durable_names = dict(self.names)
            self.dir_pending = []
        else:  # pragma: no cover
            raise AssertionError(op)

    def volatile(self) -> dict[str, bytes]:
        """What the file system shows now (checked against the real directory)."""
        out = {}
        for name, ino in self.names.items():
            content = bytearray(self.durable[ino])
            for p in self.pending[ino]:
                _apply(content, p)
            out[name] = bytes(content)
        return out

    def image(self, mode: str, rng: random.Random) -> dict[str, bytes]:
        names = dict(self.durable_names)
        if mode == "all":
            names = dict(self.names)
        elif mode in ("reorder", "mixed"):
            # the journal keeps directory operations in order: some prefix of them survives
            for op in self.dir_pending[:rng.randrange(len(self.dir_pending) + 1)]:
                if op[0] == "create":
                    names[op[1]] = op[2]
                elif op[0] == "replace":
                    names[op[2]] = names.pop(op[1])
                elif op[0] == "link":
                    names[op[2]] = names[op[1]]
                elif op[0] == "unlink":
                    del names[op[1]]
        contents: dict[int, bytes] = {}
        for ino in set(names.values()):
            content = bytearray(self.durable[ino])
            pend = self.pending[ino]
            if mode == "all":
                for p in pend:
                    _apply(content, p)
            elif mode == "zero":
                for p in pend:
                    _apply(content, p, None if p[0] == "trunc" else bytes(len(p[2])))
            elif mode == "prefix" and pend:
                j = rng.randrange(len(pend) + 1)
                for p in pend[:j]:
                    _apply(content, p)
                if j < len(pend) and pend[j][0] == "write" and len(pend[j][2]) > 1:
                    p = pend[j]
                    _apply(content, p, p[2][:rng.randrange(1, len(p[2]))])
            elif mode in ("reorder", "mixed") and pend:
                content = self._sectors(content, pend, rng, zero=mode == "mixed")
            contents[ino] = bytes(content)
        return {name: contents[ino] for name, ino in names.items()}

    @staticmethod
    def _sectors(durable: bytearray, pend: list[tuple], rng: random.Random, zero: bool) -> bytearray:
        """Each sector as of its own random moment since the last fsync; the size as of another.

        This is what write-back can leave: any subset of dirty sectors reached the disk, each
        with the content its page had when it was written, in any order.  (A subset of the
        write *calls* is not: a later write to a sector can only reach the disk together with
        the earlier writes to that sector, as they share its page.)  With `zero`, a sector
        past the synced end of the file may instead hold zeros (space allocated, data not)."""
        states = [bytes(durable)]
        cur = bytearray(durable)
        for p in pend:
            _apply(cur, p)
            states.append(bytes(cur))
        size = len(states[rng.randrange(len(states))])
        synced = len(durable)
        out = bytearray(size)
        for s in range(0, size, SECTOR):
            chunk = states[rng.randrange(len(states))][s:s + SECTOR]
            if zero and s + SECTOR > synced and rng.random() < 0.25:
                # newly allocated space whose data never arrived (bytes already synced stay)
                keep = max(0, synced - s)
                chunk = chunk[:keep] + bytes(max(0, len(chunk) - keep))
            out[s:s + len(chunk)] = chunk
        return out


class Workload:
    """The recorded run: every transaction with the log positions where it started and was acknowledged."""

    def __init__(self, seed: int, nsteps: int):
        self.rng = random.Random(seed)
        self.nsteps = nsteps
        self.model = TxnModel()
        self.started: list[int] = []  # log length when the transaction's tpc_begin ran
        self.acked: list[int] = []  # log length when its tpc_finish returned
        self.packed = False

    def run(self, dirpath: str) -> RecordingOps:
        path = os.path.join(dirpath, DATA)
        rec = RecordingOps(dirpath)
        old = storage.INDEX_SAVE_BYTES, storage.WRITE_CHUNK
        storage.INDEX_SAVE_BYTES, storage.WRITE_CHUNK = 2500, 600
        try:
            with fileio.injected(rec), capture_log():
                st = refstorage.FileStorage(path)
                st = self._steps(st, path, rec, self.nsteps // 2)
                st = self._crash_with_voted_txn(st, path, rec)
                st = self._steps(st, path, rec, self.nsteps // 4)
                st.close()
                st = refstorage.FileStorage(path)  # reopen with a saved index
                st.pack(_later_than(self.model.last_tid()), gc=False)
                self.packed = True
                st = self._steps(st, path, rec, self.nsteps // 4)
                st.close()
        finally:
            storage.INDEX_SAVE_BYTES, storage.WRITE_CHUNK = old
        return rec

    def _commit(self, st, rec: RecordingOps, writes: dict[bytes, bytes | None], undo: bytes | None = None):
        self.started.append(len(rec.log))
        if undo is None:
            tid = commit(st, writes)
        else:
            t = TransactionMetaData()
            st.tpc_begin(t)
            st.undo(undo, t)
            st.tpc_vote(t)
            tid = st.tpc_finish(t)
        self.acked.append(len(rec.log))
        self.model.add(tid, writes)
        return tid

    def _steps(self, st, path: str, rec: RecordingOps, n: int):
        rng = self.rng
        last_store = None
        for _ in range(n):
            r = rng.random()
            if last_store is not None and r < 0.2:
                tid, writes = last_store
                before = self.model.state(len(self.model) - 1)
                self._commit(st, rec, {oid: before.get(oid) for oid in writes}, undo=tid)
                last_store = None
                continue
            writes = {}
            for oid in rng.sample(range(12), rng.choice((1, 2, 3))):
                writes[p64(oid)] = value_data(f"{len(self.model)}.{oid}." + "y" * rng.choice((5, 80, 900)))
            if r > 0.85:  # vote, then abort: truncates the file back
                t = TransactionMetaData()
                st.tpc_begin(t)
                for oid, data in writes.items():
                    st.store(oid, current_serial(st, oid), data, "", t)
                st.tpc_vote(t)
                st.tpc_abort(t)
                last_store = None
                continue
            last_store = (self._commit(st, rec, writes), writes)
        return st

    def _crash_with_voted_txn(self, st, path: str, rec: RecordingOps):
        t = TransactionMetaData()
        st.tpc_begin(t)
        st.store(p64(0), current_serial(st, p64(0)), value_data("never finished"), "", t)
        st.tpc_vote(t)
        st._state.file.close()  # the process dies here
        st._release_lock_file()
        return refstorage.FileStorage(path)  # recovery moves the voted transaction to a side file


def _later_than(tid: bytes) -> float:
    from persistent.TimeStamp import TimeStamp

    return TimeStamp(tid).timeTime() + 0.001


def _check_image(files: dict[str, bytes], work: Workload, k: int, imgdir: str, stats: Counter,
                 reopen: bool) -> None:
    for name in os.listdir(imgdir):
        os.remove(os.path.join(imgdir, name))
    for name, content in files.items():
        with open(os.path.join(imgdir, name), "wb") as f:
            f.write(content)
    model = work.model
    acked = sum(1 for a in work.acked if a <= k)
    begun = sum(1 for s in work.started if s < k)
    path = os.path.join(imgdir, DATA)
    if DATA not in files:
        assert acked == 0, f"the data file is gone but {acked} transactions were acknowledged"
        stats["images without a data file"] += 1
        return
    with capture_log() as log:
        st = refstorage.FileStorage(path)
        try:
            last = st.lastTransaction()
            tids = model.tids
            n = tids.index(last) + 1 if last != z64 else 0
            assert n >= acked, f"lost acknowledged transactions: {n} < {acked}"
            assert n <= begun, f"holds {n} transactions, only {begun} had begun"
            check_model(st, model, n, after_tid=st._pack_tid)
            check_storage(st)
            stats["unacknowledged commits kept"] += n - acked
        finally:
            st.close()
        if reopen:
            st = refstorage.FileStorage(path)
            try:
                assert st.lastTransaction() == last
                check_storage(st)
            finally:
                st.close()
    if any("incomplete last transaction" in r.getMessage() for r in log):
        stats["torn tails moved"] += 1
    if any("index" in r.getMessage() for r in log if r.levelname == "WARNING"):
        stats["saved index ignored"] += 1


@pytest.mark.parametrize("seed", range(scaled(1, 4)))
def test_power_loss_images(seed):
    rng = random.Random(1000 + seed)
    work = Workload(seed, nsteps=scaled(24, 40))
    stats: Counter = Counter()
    images = Counter()
    with temp_dir() as d:
        rundir = os.path.join(d, "run")
        imgdir = os.path.join(d, "image")
        os.mkdir(rundir)
        os.mkdir(imgdir)
        rec = work.run(rundir)
        fs = FsModel()
        for op in rec.log:
            fs.step(op)
        # the model's view of the directory is what the file system really holds
        real = {}
        for name in os.listdir(rundir):
            if not name.endswith(".lock"):
                with open(os.path.join(rundir, name), "rb") as f:
                    real[name] = f.read()
        assert fs.volatile() == real
        fs = FsModel()
        for k in range(len(rec.log) + 1):
            if k:
                fs.step(rec.log[k - 1])
            if scaled(True, False):
                modes = ["drop", "all", MODES[2 + k % 4]]
            else:
                modes = [m for m in MODES for _ in range(1 if m in ("drop", "all") else 3)]
            for mode in modes:
                files = fs.image(mode, rng)
                try:
                    _check_image(files, work, k, imgdir, stats, reopen=k % 5 == 0)
                except BaseException as exc:
                    raise AssertionError(f"image after {k} operations ({rec.log[k - 1][0] if k else '-'}), "
                                         f"mode {mode}: {exc}") from exc
                images[mode] += 1
    report("power_loss", seed=seed, operations=len(rec.log), transactions=len(work.model),
           images=sum(images.values()), images_by_mode=dict(images), **stats)


# -- blobs -----------------------------------------------------------------------------------

class SyncLog(fileio.Ops):
    """Logs, in order, the fsyncs (by path), directory fsyncs and fault points."""

    def __init__(self):
        self.log: list[tuple[str, str]] = []
        self.paths: dict[int, str] = {}

    def open(self, path, flags, mode=0o666):
        fd = super().open(path, flags, mode)
        self.paths[fd] = os.path.realpath(path)
        return fd

    def fsync(self, fd):
        super().fsync(fd)
        self.log.append(("fsync", self.paths[fd]))

    def fsync_dir(self, path):
        super().fsync_dir(path)
        self.log.append(("fsync_dir", os.path.realpath(path)))

    def point(self, name):
        self.log.append(("point", name))


def _blob_record(value: str) -> bytes:
    import pickle

    from ZODB.blob import Blob
    return pickle.dumps(Blob, 3) + pickle.dumps(value, 3)


def test_blob_files_are_durable_before_their_commit(tmp_path):
    """A power loss keeps what was fsynced: every blob file of a commit -- its content, its
    name, every directory created for it -- is synced before the commit's status flip is.

    storeBlob (new and existing oid directories), restoreBlob, an undo that gives the
    restored revision its file under the undo's tid, and a commit after a pack."""
    path = str(tmp_path / "Data.rfs")
    blob_dir = os.path.realpath(str(tmp_path / "blobs"))
    ops = SyncLog()
    with fileio.injected(ops):
        st = refstorage.FileStorage(path, blob_dir=blob_dir)
        try:
            assert ("fsync_dir", blob_dir) in ops.log  # the new blob directory and its name
            checked = 0

            def run(kind: str, oids: list[int], undo_tid: bytes | None = None) -> bytes:
                nonlocal checked
                before = {d for d, _dirs, _files in os.walk(blob_dir)}
                start = len(ops.log)
                t = TransactionMetaData("", kind)
                tid = p64(u64(st.lastTransaction()) + 1) if kind == "restore" else None
                st.tpc_begin(t, tid) if tid else st.tpc_begin(t)
                if kind == "undo":
                    st.undo(undo_tid, t)
                for i in oids:
                    fd, upload = tempfile.mkstemp(dir=st.temporaryDirectory())
                    with os.fdopen(fd, "wb") as f:
                        f.write(f"{kind} {i}".encode())
                    if kind == "restore":
                        st.restoreBlob(p64(i), tid, _blob_record(f"r{i}"), upload, None, t)
                    else:
                        st.storeBlob(p64(i), current_serial(st, p64(i)), _blob_record(f"s{i}"), upload,
                                     "", t)
                st.tpc_vote(t)
                got = st.tpc_finish(t)
                tid = tid or got
                seg = ops.log[start:]
                flip = seg.index(("point", "commit.after-status-flip"))
                seg = seg[:flip]
                files = [st.fshelper.getBlobFilename(p64(i), tid) for i in range(1, 6)]
                files = [os.path.realpath(f) for f in files if os.path.exists(f)]
                assert files, kind
                for f in files:
                    assert ("fsync", f) in seg, f"{kind}: {f} not synced before the commit"
                    synced = seg.index(("fsync", f))
                    assert ("fsync_dir", os.path.dirname(f)) in seg[synced:], \
                        f"{kind}: the name of {f} not synced before the commit"
                    checked += 1
                for d in {d for d, _dirs, _files in os.walk(blob_dir)} - before:
                    assert ("fsync_dir", os.path.dirname(d)) in seg, f"{kind}: new directory {d}"
                return tid

            run("store", [1, 2])
            run("store", [1])
            last = run("store", [2, 3])
            run("restore", [4])
            run("undo", [], undo_tid=last)
            st.pack(time.time(), gc=False)
            run("store", [5, 1])
            assert checked >= 8
        finally:
            st.close()
