"""Blob support: `BlobSupport`, the mixin FileStorage inherits, and the blob
side of pack (`pack_blobs`).

Blob files live in ZODB's blob directory layout, managed with ZODB.blob's
helpers (`FilesystemHelper`, `rename_or_copy_blob`, ...), so a blob
directory is interchangeable with one of ZODB's FileStorage: the committed
file of object `oid` as written by transaction `tid` is
``fshelper.getBlobFilename(oid, tid)``, made read-only.  Uncommitted files
wait in ``<blob_dir>/tmp`` (`temporaryDirectory()`).

Every record of a blob object has its own file, named by the record's tid:
a store moves the application's file into place; restore (copies) and undo
(which writes a backpointer to an older revision) link or copy the older
file under the new tid, so `loadBlob(oid, serial)` works for every serial a
load can return.

The files a transaction added are removed again by tpc_abort.  Pack removes
the files of revisions the packed log no longer holds (`pack_blobs`).

Nothing here touches the data file or its index: the log is read through the
storage core's read snapshot (`core.StorageCore`, which the class mixing
BlobSupport in implements).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from typing import IO, Any

import zope.interface
from ZODB import POSException
from ZODB.blob import (
    BLOB_SUFFIX,
    LAYOUT_MARKER,
    BlobFile,
    FilesystemHelper,
    NoBlobsFileSystemHelper,
    is_blob_record,
    remove_committed,
    remove_committed_dir,
    rename_or_copy_blob,
)
from ZODB.interfaces import IBlobStorage, IBlobStorageRestoreable

from . import fileio
from .core import Pending, StorageCore
from .errors import BlobDirectoryError

logger = logging.getLogger("refstorage.blobs")

__all__ = ["BlobSupport", "pack_blobs", "copies_blobs", "copy_blob_to_temporary"]


class BlobSupport:
    """Mixin giving FileStorage IBlobStorage and IBlobStorageRestoreable.

    Blobs are active only when the storage was opened with a `blob_dir`
    (`_blob_init`); only then does the instance declare the blob interfaces,
    and without it the blob methods raise `Unsupported`.  The storage calls
    `_blob_tpc_finish` / `_blob_tpc_abort` when a transaction ends and
    `_blob_undo` after planning an undo.  It uses the storage only through
    ZODB's storage API and the storage core's interface (`core.StorageCore`:
    read_snapshot, pending_transaction, untransformed, pack_keep_old).
    """

    blob_dir: str | None = None
    fshelper: Any = NoBlobsFileSystemHelper()

    def _blob_init(self, blob_dir: str | os.PathLike | None, create: bool = False) -> None:
        # (oid, tid) of the committed-to-be files the current transaction added
        self._blob_dirty: list[tuple[bytes, bytes]] = []
        # orders creating an oid's directory against pack removing it when empty
        self._blob_dir_lock = threading.Lock()
        if blob_dir is None or not os.fspath(blob_dir):
            self.blob_dir = None
            self.fshelper = NoBlobsFileSystemHelper()
            return
        path = os.path.abspath(os.fspath(blob_dir))
        try:
            if os.path.exists(path) and not os.path.isdir(path):
                raise BlobDirectoryError(path, "blob_dir is not a directory")
            if create and os.path.exists(path):
                remove_committed_dir(path)
            fshelper = FilesystemHelper(path)
            new = not os.path.isdir(path)
            fshelper.create()
            if new:  # its name and its layout marker, durably
                fileio.fsync_dir(path)
                fileio.fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise BlobDirectoryError(path, f"cannot use as blob directory: {exc}") from exc
        except ValueError as exc:  # a layout marker that does not match
            raise BlobDirectoryError(path, str(exc)) from exc
        self.blob_dir = path
        self.fshelper = fshelper
        # only IBlobStorageRestoreable (it extends IBlobStorage), as ZODB's FileStorage:
        # ZEO reports providedBy's order to clients
        zope.interface.alsoProvides(self, IBlobStorageRestoreable)

    def _require_blobs(self) -> None:
        if self.blob_dir is None:
            raise POSException.Unsupported(
                "this storage was opened without blob_dir, so it cannot store blobs")

    # -- IBlobStorage --------------------------------------------------------------

    def is_blob_record(self, record: bytes | None) -> bool:
        """True if the (possibly transformed) record data is a blob's pickle."""
        if not record:
            return False
        return bool(is_blob_record(self.untransformed(record)))

    def storeBlob(self, oid: bytes, oldserial: bytes, data: bytes, blobfilename: str, version: str,
                  transaction) -> None:
        """Store data and move the file `blobfilename` into the blob directory."""
        self._require_blobs()
        self.store(oid, oldserial, data, version, transaction)
        self._blob_move_in(oid, self.pending_transaction(transaction).tid, blobfilename)

    def restoreBlob(self, oid: bytes, serial: bytes, data: bytes, blobfilename: str,
                    prev_txn: bytes | None, transaction) -> None:
        """Restore a blob record as another storage had it (copies, recovery)."""
        self._require_blobs()
        self.restore(oid, serial, data, "", prev_txn, transaction)
        self._blob_move_in(oid, self.pending_transaction(transaction).tid, blobfilename)

    def loadBlob(self, oid: bytes, serial: bytes) -> str:
        """The name of the committed blob file of oid's revision `serial`."""
        self._require_blobs()
        filename = self.fshelper.getBlobFilename(oid, serial)
        if not os.path.exists(filename):
            raise POSException.POSKeyError(f"No blob file at {filename}", oid, serial)
        return filename

    def openCommittedBlobFile(self, oid: bytes, serial: bytes, blob=None) -> IO[bytes]:
        """The committed blob file, opened for reading (a BlobFile if `blob` is given)."""
        filename = self.loadBlob(oid, serial)
        if blob is None:
            return open(filename, "rb")
        return BlobFile(filename, "r", blob)

    def temporaryDirectory(self) -> str:
        """Where uncommitted blob files are made (same file system as the blobs)."""
        self._require_blobs()
        return self.fshelper.temp_dir

    # -- transaction hooks -----------------------------------------------------------

    def _blob_note_dirty(self, oid: bytes, tid: bytes) -> None:
        dirty = self._blob_dirty
        if dirty and dirty[-1][1] != tid:
            # left over from a transaction that ended without reaching our hooks
            dirty.clear()
        dirty.append((oid, tid))

    def _blob_oid_dir(self, oid: bytes) -> None:
        """Create oid's blob directory if missing, durably (each new directory's parent synced)."""
        path = self.fshelper.getPathForOID(oid)
        missing = []
        while not os.path.isdir(path) and len(path) > len(self.blob_dir or ""):
            missing.append(path)
            path = os.path.dirname(path)
        if missing:
            self.fshelper.getPathForOID(oid, create=True)
            for made in reversed(missing):
                fileio.fsync_dir(os.path.dirname(made))

    @staticmethod
    def _blob_sync(target: str) -> None:
        """Make a committed-to-be blob file durable: its content, then its name.

        Done before the transaction is voted, so the blob file of a commit
        that survives a power loss survives too (ZODB's FileStorage leaves
        that to the operating system)."""
        fileio.sync_path(target)
        fileio.fsync_dir(os.path.dirname(target))

    def _blob_move_in(self, oid: bytes, tid: bytes, filename: str) -> None:
        with self._blob_dir_lock:
            self._blob_oid_dir(oid)
            target = self.fshelper.getBlobFilename(oid, tid)
            rename_or_copy_blob(filename, target)
            self._blob_note_dirty(oid, tid)
        fileio.point("blob.after-move-in")
        self._blob_sync(target)

    def _blob_link_in(self, oid: bytes, tid: bytes, source: str) -> None:
        """Make the committed file `source` also the blob of (oid, tid)."""
        with self._blob_dir_lock:
            self._blob_oid_dir(oid)
            target = self.fshelper.getBlobFilename(oid, tid)
            if os.path.exists(target):
                remove_committed(target)
            try:
                os.link(source, target)
            except OSError:
                fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=self.fshelper.temp_dir)
                with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                rename_or_copy_blob(tmp, target)
            self._blob_note_dirty(oid, tid)
        fileio.point("blob.after-link-in")
        self._blob_sync(target)

    def _blob_tpc_finish(self) -> None:
        """The transaction committed: its blob files stay."""
        self._blob_dirty = []

    def _blob_tpc_abort(self) -> None:
        """The transaction was aborted: remove the blob files it added."""
        dirty, self._blob_dirty = self._blob_dirty, []
        for oid, tid in dirty:
            filename = self.fshelper.getBlobFilename(oid, tid)
            if os.path.exists(filename):
                remove_committed(filename)

    def _blob_undo(self, pending: Pending, oids: Iterable[bytes]) -> None:
        """After an undo planned its records: give each restored blob revision its file.

        An undo record that points back at an older revision of a blob
        needs that revision's file under the undo's tid (ZODB's FileStorage
        copies it the same way)."""
        if self.blob_dir is None:
            return
        reader = self.read_snapshot().reader
        for oid in oids:
            data, back = pending.latest[oid]
            if data is not None or not back:
                continue
            rec = reader.resolve(reader.read_data_record(back, oid))
            if rec is None or not self.is_blob_record(rec.data):
                continue
            source = self.fshelper.getBlobFilename(oid, rec.tid)
            if not os.path.exists(source):
                raise POSException.UndoError(
                    f"the blob file of the revision to restore is missing ({source})", oid)
            self._blob_link_in(oid, pending.tid, source)


# -- copying (copying.py) --------------------------------------------------------------


def copies_blobs(source, dest) -> bool:
    """True if a copy from source to dest should carry blob files along.

    Warns when the source has blobs and the destination cannot take them:
    such a copy keeps the blob records but not their files."""
    if not IBlobStorage.providedBy(source):
        return False
    if IBlobStorage.providedBy(dest) and hasattr(dest, "restoreBlob"):
        return True
    logger.warning("%s has blobs but %s has no blob directory: blob files will not be copied",
                   _name(source), _name(dest))
    return False


def _name(storage) -> str:
    try:
        return str(storage.getName())
    except Exception:
        return repr(storage)


def copy_blob_to_temporary(source, dest, rec) -> str | None:
    """A copy of rec's blob file in dest's temporary directory, for restoreBlob.

    None if rec is not a blob record, or the source has no file for it (then
    only the record is copied, as ZODB's copyTransactionsFromTo does)."""
    data = rec.data
    if not data:
        return None
    check = getattr(source, "is_blob_record", None)
    if not (check(data) if check is not None else is_blob_record(data)):
        return None
    try:
        filename = source.loadBlob(rec.oid, rec.tid)
    except POSException.POSKeyError:
        return None
    fd, tmp = tempfile.mkstemp(prefix="copy-", suffix=".tmp", dir=dest.temporaryDirectory())
    try:
        with os.fdopen(fd, "wb") as out, open(filename, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


# -- pack ---------------------------------------------------------------------------


def _record_tids(storage: StorageCore, oid: bytes) -> set[bytes]:
    """The tids of every record of oid in the storage's current log."""
    snap = storage.read_snapshot()
    reader = snap.reader
    tids = set()
    pos = snap.index.get(oid)
    while pos:
        rec = reader.read_data_record(pos, oid)
        tids.add(rec.tid)
        pos = rec.prev
    return tids


def _remove_empty_dirs(storage: BlobSupport, path: str) -> None:
    """Remove `path` and its parents up to the blob directory while they are empty."""
    base = storage.blob_dir
    assert base is not None
    with storage._blob_dir_lock:
        while len(path) > len(base) and path.startswith(base):
            try:
                if os.listdir(path):
                    return
                os.rmdir(path)
            except FileNotFoundError:
                pass
            path = os.path.dirname(path)


def pack_blobs(storage: BlobSupport, removed: Iterable[tuple[bytes, bytes]] | None = None,
               keep_old: bool | None = None) -> int:
    """Remove the blob files of revisions a pack dropped; returns how many.

    Call it after the packed log replaced the old one (the storage's read
    snapshot is the packed file), with or without the commit lock.

    With `removed=None` it sweeps the blob directory: every blob file whose
    (oid, tid) has no record in the packed log goes.  Files of transactions
    newer than the last one committed when the sweep starts are never
    touched, so commits running meanwhile are safe.  Alternatively pass the
    (oid, tid) pairs of the records the pack dropped.

    With keep_old (default: the storage's pack_keep_old) the removed files
    are moved to ``<blob_dir>.old`` and every remaining one is hard-linked
    (or copied) there, so ``<blob_dir>.old`` goes with ``<file>.old`` as a
    complete pre-pack copy, as ZODB's FileStorage does.
    """
    blob_dir = storage.blob_dir
    if blob_dir is None:
        return 0
    if keep_old is None:
        keep_old = bool(storage.pack_keep_old)
    fshelper = storage.fshelper
    old_dir = blob_dir + ".old"
    if os.path.exists(old_dir):
        remove_committed_dir(old_dir)
    if keep_old:
        os.mkdir(old_dir)
        shutil.copyfile(os.path.join(blob_dir, LAYOUT_MARKER), os.path.join(old_dir, LAYOUT_MARKER))

    def dispose(path: str) -> None:
        if keep_old:
            dest = old_dir + path[len(blob_dir):]
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.rename(path, dest)
        else:
            remove_committed(path)
        fileio.point("pack.blobs.after-dispose")

    count = 0
    if removed is not None:
        for oid, tid in removed:
            path = fshelper.getBlobFilename(oid, tid)
            if os.path.exists(path):
                dispose(path)
                count += 1
                _remove_empty_dirs(storage, os.path.dirname(path))
    else:
        last = storage.lastTransaction()
        for oid, oid_path in list(fshelper.listOIDs()):
            tids = _record_tids(storage, oid)
            for name in sorted(os.listdir(oid_path)):
                if not name.endswith(BLOB_SUFFIX):
                    continue
                path = os.path.join(oid_path, name)
                tid = fshelper.splitBlobFilename(path)[1]
                if tid <= last and tid not in tids:
                    dispose(path)
                    count += 1
            _remove_empty_dirs(storage, oid_path)
    if keep_old:
        _link_tree(blob_dir, old_dir)
    return count


def _link_tree(src_dir: str, dest_dir: str) -> None:
    """Hard-link (or copy) every committed blob file of src_dir into dest_dir."""
    for path, dirs, files in os.walk(src_dir):
        if path == src_dir and "tmp" in dirs:
            dirs.remove("tmp")
        for name in files:
            if not name.endswith(BLOB_SUFFIX):
                continue
            source = os.path.join(path, name)
            dest = dest_dir + source[len(src_dir):]
            if os.path.exists(dest):
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)
