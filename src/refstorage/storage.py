"""refstorage.FileStorage: opening, two-phase commit, loads and MVCC reads.

Locks.  `_commit_lock` is held from tpc_begin to tpc_finish/tpc_abort, so one
transaction at a time writes.  `_lock` is the readers' lock, never held across
I/O: tpc_finish holds it to call the DB's callback and publish the new index
entries and tid; a load holds it only for its index lookup (so it is ordered
after a finishing commit's callback, as ZODB requires), then reads without it.
Reads use positioned reads and an index that only ever points at durable,
finished records, so they run while a commit writes and syncs.

The modules that work on the storage (undo, blobs, pack) use it only through
the storage core's interface, `core.StorageCore` (read snapshots, the commit
lock and buffer, installing a packed file), implemented here.

Commit.  store() buffers records (never in the data file): in memory, or for
a large transaction in an unnamed temporary file beside the data file, with
16 bytes a record in memory (`core.Pending`, `core.Spool`).  tpc_vote
appends the whole transaction at once with status 'c'; tpc_finish flips the
status to ' ', fsyncs once, and only then publishes and returns.  tpc_abort,
or a vote that fails (disk full, I/O error), truncates back to where the
transaction started, so no partial record remains.

Open.  The saved index is used when it matches the data file (file id, and
the last transaction it covers); only what was written after it is scanned.
A torn or unfinished last transaction is moved to a side file; damage
followed by valid transactions is refused (read-only too, unless the caller
asks to be served the transactions before it: serve_valid_prefix).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from itertools import repeat
from operator import attrgetter
from typing import Any

import zc.lockfile
import zope.interface
from persistent.TimeStamp import TimeStamp
from ZODB import POSException
from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.Connection import TransactionMetaData
from ZODB.interfaces import (
    IExternalGC,
    IStorage,
    IStorageCurrentRecordIteration,
    IStorageIteration,
    IStorageRestoreable,
    IStorageUndoable,
)
from ZODB.serialize import referencesf as _referencesf
from ZODB.utils import p64, u64, z64

from . import fileformat as fmt
from . import fileio
from .blobs import BlobSupport
from .core import Pending, Snapshot, State
from .errors import (
    FilePermissionError,
    FileSizeLimitError,
    MissingFileError,
    PathIsDirectoryError,
    QuotaError,
    StorageBrokenError,
    StorageLockedError,
)
from .index import MAX_POS, OidIndex
from .indexfile import save_index
from .iterator import TransactionIterator
from .log import ScanResult, scan
from .pack import PackReport, Progress, pack_storage
from .recovery import open_log
from .refs import references_many
from .undo import UndoPlanner, find_txn, tid_from_undo_id, undo_log

try:
    from ._refscan import index_lookup as _index_lookup
except ImportError:  # pragma: no cover - depends on the build (the extension is optional)
    _index_lookup = None

def index_save_interval(objects: int) -> int:
    """Bytes of commits after which a running storage saves its index of `objects` entries."""
    return max(INDEX_SAVE_BYTES, INDEX_SAVE_BYTES * objects // INDEX_SAVE_SCALE)


RESTORE_BATCH = 4096  # records of a source transaction restore_records takes at a time
RESTORE_BATCH_BYTES = 8 << 20  # ... and about this much data at most
_get_oid = attrgetter("oid")
_get_data = attrgetter("data")
_get_data_txn = attrgetter("data_txn")

logger = logging.getLogger("refstorage")

# Save the index while running once this many bytes were committed since the
# last save, so a reopen after a crash scans at most about this much; past
# INDEX_SAVE_SCALE objects the interval grows in proportion to the index (64
# bytes of log per object: 64 MiB at 1M objects), so that saving, which
# writes the whole index (~6 bytes an object) each time, stays a bounded share
# of the bytes written instead of growing with the square of the file.
INDEX_SAVE_BYTES = 32 << 20
INDEX_SAVE_SCALE = 1 << 19
# Flush a voting transaction to the file in pieces of about this size.
WRITE_CHUNK = 1 << 20
# A spooled transaction's index entries are published this many at a time.
PUBLISH_SLICE = 1 << 16
# How long close() waits for a commit in progress before leaving the closing to it.
CLOSE_WAIT = 5.0


_MAX_OID = b"\xff" * 8


def _identity(data: bytes) -> bytes:
    return data



def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


# The order of ZODB's FileStorage: ZEO servers report providedBy's order to
# their clients, and ZEO's tests (checkInterfaceFromRemoteStorage) compare it.
@zope.interface.implementer(IStorageRestoreable, IStorageIteration, IStorageUndoable,
                            IStorageCurrentRecordIteration, IExternalGC, IStorage)
class FileStorage(BlobSupport, ConflictResolvingStorage):
    """A file-based, append-only, transactional ZODB storage.

    The constructor mirrors ZODB's FileStorage: a missing file is created
    (unless read_only), create=True starts a new empty database, quota limits
    the file size in bytes, pack_gc and pack_keep_old shape pack, and
    blob_dir enables blobs (see blobs.py).

    A file damaged before its last transaction is refused (CorruptedError
    naming the offset), read-only too; serve_valid_prefix=True (read-only
    only) serves the transactions before the damage instead, an older state.
    """

    _transaction = None
    last_pack_report: PackReport | None = None
    # (state, oid, pos, data, tid) of the object record_iternext read ahead
    _iternext_ahead: tuple | None = None

    def __init__(self, file_name: str, create: bool = False, read_only: bool = False,
                 quota: int | None = None, pack_gc: bool = True, pack_keep_old: bool = True,
                 blob_dir: str | None = None, serve_valid_prefix: bool = False):
        if serve_valid_prefix and not read_only:
            raise ValueError("serve_valid_prefix needs read_only=True")
        self._serve_valid_prefix = bool(serve_valid_prefix)
        self.__name__ = self._file_name = os.fspath(file_name)
        self._is_read_only = bool(read_only)
        self._quota = quota
        self._pack_gc = pack_gc
        self._pack_keep_old = pack_keep_old
        self._lock = threading.RLock()
        self._commit_lock = threading.Lock()
        self._pending: Pending | None = None
        self._resolved: list[bytes] = []
        self._untransform = _identity
        self._lock_file = None
        self._closed = False
        # close() called while a commit was in flight: the commit closes on its way out
        self._close_requested = False
        # threads inside tpc_vote, tpc_finish or tpc_abort
        self._io_depth = 0
        # why the storage refuses writes (see _break), or None
        self._broken: str | None = None
        self._index_path = self._file_name + ".index"
        try:
            self._open(create)
        except BaseException:
            self._release_lock_file()
            raise
        try:
            self._blob_init(blob_dir, create)
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------

    def _open(self, create: bool) -> None:
        path = self._file_name
        if os.path.isdir(path):
            raise PathIsDirectoryError(path, "is a directory, not a storage file")
        if self._is_read_only:
            if create:
                raise POSException.ReadOnlyError("cannot create a storage read-only")
            if not fileio.exists(path):
                raise MissingFileError(path, "no such file (read-only open does not create one)")
        else:
            self._take_lock_file()
            if create or not fileio.exists(path):
                self._create_file()
        file = fileio.DataFile(path, read_only=self._is_read_only)
        try:
            header = fmt.decode_file_header(file.read(0, fmt.HEADER_SIZE), path)
            self._file_id = header.file_id
            self._pack_tid = header.pack_tid
            index, end, last_tid, saved_end = open_log(file, self._index_path, self._file_id,
                                                       self._is_read_only, self._serve_valid_prefix)
            self._index_saved_end = saved_end
            if not self._is_read_only and end - saved_end > INDEX_SAVE_BYTES:
                self._save_index_now(index, end, last_tid)
        except BaseException:
            file.close()
            raise
        self._state = State(file, index)
        self._end = end  # end of the last finished transaction
        self._ltid = last_tid or z64
        self._ts = TimeStamp(self._ltid)
        max_oid = index.max_oid()
        self._oid = max_oid if max_oid is not None else z64
        self._saved_end = self._index_saved_end

    def _take_lock_file(self) -> None:
        lock_path = self._file_name + ".lock"
        try:
            self._lock_file = zc.lockfile.LockFile(lock_path, content_template="pid {pid} on {hostname}")
        except PermissionError as exc:
            raise FilePermissionError(lock_path, "cannot create the lock file: permission denied "
                                      "(open read_only=True to read without it)", None, exc.errno) from None
        except zc.lockfile.LockError:
            try:
                holder = fileio.read_whole(lock_path).decode("utf-8", "replace").strip() or "unknown"
            except Exception:
                holder = "unknown"
            raise StorageLockedError(
                self._file_name, f"is open for writing by another process ({holder}); "
                "open it read_only=True beside it, or stop that process") from None

    def _release_lock_file(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _create_file(self) -> None:
        fileio.atomic_write(self._file_name, [fmt.encode_file_header(uuid.uuid4().bytes)],
                            point_prefix="create")
        fileio.remove_if_exists(self._index_path)

    # -- index persistence -----------------------------------------------------------

    def _save_index_now(self, index: OidIndex, end: int, last_tid: bytes | None) -> None:
        save_index(self._index_path, index, file_id=self._file_id, pos=end, tid=last_tid or z64)
        self._index_saved_end = self._saved_end = end

    def _maybe_save_index(self) -> None:
        """Called with the commit lock held, so the index does not change meanwhile."""
        if self._end - self._saved_end >= index_save_interval(len(self._state.index)):
            try:
                self._save_index_now(self._state.index, self._end, self._ltid)
            except Exception:
                logger.exception("%s: could not save the index (it will be rebuilt)", self._file_name)

    # -- simple queries ------------------------------------------------------------

    def getName(self) -> str:
        return self.__name__

    def sortKey(self) -> str:
        return os.path.abspath(self._file_name)

    def getSize(self) -> int:
        return self._state.file.size

    def __len__(self) -> int:
        return len(self._state.index)

    def isReadOnly(self) -> bool:
        return self._is_read_only

    def lastTransaction(self) -> bytes:
        with self._lock:
            return self._ltid

    def registerDB(self, wrapper) -> None:
        ConflictResolvingStorage.registerDB(self, wrapper)
        self._untransform = wrapper.untransform_record_data

    def new_oid(self) -> bytes:
        if self._is_read_only:
            raise POSException.ReadOnlyError()
        with self._lock:
            self._oid = p64(u64(self._oid) + 1)
            return self._oid

    def set_max_oid(self, oid: bytes) -> None:
        with self._lock:
            if oid > self._oid:
                self._oid = oid

    def tpc_transaction(self):
        return self._transaction

    # -- the storage core's interface (core.StorageCore: for undo, blobs, pack) ------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pack_keep_old(self) -> bool:
        return self._pack_keep_old

    @property
    def commit_lock(self) -> threading.Lock:
        return self._commit_lock

    def read_snapshot(self, copy_index: bool = False) -> Snapshot:
        """The file, log end, last tid and pack tid, consistent with each other.

        StorageBrokenError once the storage broke (see `_break`)."""
        with self._lock:
            if self._broken:
                raise StorageBrokenError(self._file_name, self._broken)
            state = self._state
            index = state.index.copy() if copy_index else state.index
            return Snapshot(state, self._end, self._ltid, self._pack_tid, index)

    def pending_transaction(self, transaction) -> Pending:
        """The commit buffer of `transaction`, the one being committed."""
        return self._check_transaction(transaction)

    def untransformed(self, data: bytes) -> bytes:
        """Record data as the application wrote it (the DB wrapper's untransform)."""
        return self._untransform(data)

    # -- reads ---------------------------------------------------------------------

    def _lookup(self, oid: bytes) -> tuple[State, int]:
        """The file state and the position of oid's newest record (POSKeyError if none)."""
        # The lock orders this read after a finishing commit's callback (ZODB's
        # tid-ordering contract); it is held for the lookup only, not the read.
        with self._lock:
            if self._broken:
                raise StorageBrokenError(self._file_name, self._broken)
            state = self._state
            pos = state.index.get(oid)
        if pos is None:
            raise POSException.POSKeyError(oid)
        return state, pos

    def _current(self, oid: bytes) -> tuple[State, fmt.DataRecord]:
        state, pos = self._lookup(oid)
        return state, state.reader.read_data_record(pos, oid)

    def load(self, oid: bytes, version: str = "") -> tuple[bytes, bytes]:
        state, pos = self._lookup(oid)
        found = self._read_current(state, pos, oid)
        if found is None:
            raise POSException.POSKeyError(oid)
        return found

    @staticmethod
    def _read_current(state: State, pos: int, oid: bytes) -> tuple[bytes, bytes] | None:
        """(data, tid) of oid's record at `pos`, or None if it records a deletion."""
        reader = state.reader
        tid, data, back = reader.read_data(pos, oid)
        if data is not None:
            return data, tid
        if not back:
            return None
        data_rec = reader.resolve(reader.read_data_record(pos, oid))
        if data_rec is None:
            return None
        return data_rec.data, tid

    def getTid(self, oid: bytes) -> bytes:
        state, rec = self._current(oid)
        if rec.is_backpointer and not rec.back:
            raise POSException.POSKeyError(oid)
        return rec.tid

    def loadSerial(self, oid: bytes, serial: bytes) -> bytes:
        state, rec = self._current(oid)
        reader = state.reader
        while rec.tid != serial:
            if not rec.prev or rec.tid < serial:
                raise POSException.POSKeyError(oid)
            rec = reader.read_data_record(rec.prev, oid)
        data_rec = reader.resolve(rec)
        if data_rec is None:
            raise POSException.POSKeyError(oid)
        return data_rec.data

    def loadBefore(self, oid: bytes, tid: bytes):
        state, rec = self._current(oid)
        reader = state.reader
        end_tid = None
        while rec.tid >= tid:
            if not rec.prev:
                return None
            end_tid = rec.tid
            rec = reader.read_data_record(rec.prev, oid)
        data_rec = reader.resolve(rec)
        if data_rec is None:
            raise POSException.POSKeyError(oid)
        return data_rec.data, rec.tid, end_tid

    def history(self, oid: bytes, size: int = 1, filter=None) -> list[dict]:
        state, rec = self._current(oid)
        reader = state.reader
        result: list[dict] = []
        while len(result) < size:
            th = reader.read_txn_header(rec.tpos)
            d = dict(TransactionMetaData(th.user, th.description, th.extension).extension)
            # FileStorage's keys and meanings: size is the data this record holds
            # (0 for a backpointer, as an undo writes), not the resolved state's.
            d.update(time=TimeStamp(rec.tid).timeTime(), user_name=th.user,
                     description=th.description, tid=rec.tid,
                     size=len(rec.data) if rec.data is not None else 0)
            if filter is None or filter(d):
                result.append(d)
            if not rec.prev:
                break
            rec = reader.read_data_record(rec.prev, oid)
        return result

    def iterator(self, start: bytes | None = None, stop: bytes | None = None) -> TransactionIterator:
        state, end = self._snapshot()  # as ZODB expects, later commits are not seen
        return TransactionIterator(state.reader, end, start, stop)

    def _snapshot(self) -> tuple[State, int]:
        """The file and the end of its log, consistent with each other (pack swaps both)."""
        with self._lock:
            if self._broken:
                raise StorageBrokenError(self._file_name, self._broken)
            return self._state, self._end

    # -- two-phase commit ----------------------------------------------------------

    def _check_transaction(self, transaction) -> Pending:
        pending = self._pending
        if pending is None or transaction is not pending.transaction:
            raise POSException.StorageTransactionError(self, transaction)
        return pending

    def tpc_begin(self, transaction, tid: bytes | None = None, status: str | bytes = " ") -> None:
        if self._is_read_only:
            raise POSException.ReadOnlyError()
        with self._lock:
            if self._transaction is transaction:
                raise POSException.StorageTransactionError(
                    "Duplicate tpc_begin calls for same transaction")
            if self._closed or self._close_requested:
                raise POSException.StorageError("storage is closed")
        status = _as_bytes(status) or fmt.STATUS_COMMITTED
        if status not in (fmt.STATUS_COMMITTED, fmt.STATUS_PACKED):
            if status == b"u":  # legacy "undone" status of old FileStorage files
                status = fmt.STATUS_COMMITTED
            else:
                raise POSException.StorageTransactionError(f"invalid transaction status {status!r}")
        self._commit_lock.acquire()
        try:
            with self._lock:
                if self._closed or self._close_requested:
                    raise POSException.StorageError("storage is closed")
                if self._broken:
                    raise StorageBrokenError(self._file_name, self._broken)
                if tid is None:
                    now = time.time()
                    ts = TimeStamp(*(time.gmtime(now)[:5] + (now % 60,)))
                    ts = ts.laterThan(self._ts)
                    tid = ts.raw()
                else:
                    if tid <= self._ltid:
                        raise POSException.StorageTransactionError(
                            f"transaction id {tid.hex()} is not after the last one {self._ltid.hex()}")
                    ts = TimeStamp(tid)
                ext = getattr(transaction, "extension_bytes", None)
                if ext is None:
                    ext = TransactionMetaData(extension=getattr(transaction, "extension", None)
                                              or {}).extension_bytes
                self._pending = Pending(
                    transaction, tid, status, _as_bytes(transaction.user),
                    _as_bytes(transaction.description), _as_bytes(ext), self._end,
                    fileio._dir_of(self._file_name), self._file_name + " (commit spool)")
                self._pending_ts = ts
                self._resolved = []
                self._transaction = transaction
        except BaseException:
            self._commit_lock.release()
            raise

    def add_record(self, pending: Pending, oid: bytes, data: bytes | None, back: int = 0,
                   prev: int | None = None) -> None:
        """Buffer a record of the transaction being committed (core interface, see core.py)."""
        if prev is None:
            prev = self._state.index.get(oid, 0)
        pending.add(oid, data, back, prev)
        if self._quota is not None:
            self._check_quota(pending.size)
        if oid > self._oid:
            self.set_max_oid(oid)

    def _check_quota(self, size: int) -> None:
        if self._quota is not None and self._end + size > self._quota:
            raise QuotaError(self._file_name, f"the transaction would take the file past its quota "
                             f"of {self._quota} bytes")

    def store(self, oid: bytes, serial: bytes, data: bytes, version: str, transaction) -> None:
        pending = self._pending
        if pending is None or transaction is not pending.transaction:
            if self._is_read_only:
                raise POSException.ReadOnlyError()
            raise POSException.StorageTransactionError(self, transaction)
        if version:
            raise POSException.Unsupported("versions are not supported")
        if data is not None and len(data) > fmt.MAX_DATA_LEN:
            raise POSException.StorageError(f"record of {len(data)} bytes exceeds the format's limit")
        state = self._state
        pos = state.index.get(oid)
        if pos is not None:
            committed = state.reader.read_data(pos, oid)[0]
            if serial != committed:
                data = self.tryToResolveConflict(oid, committed, serial, data)
                self._resolved.append(oid)
        # add_record, inlined for the commit-heavy path
        if pending.spool is None and data is not None:
            pending.records.append((oid, data, 0, pos or 0))
            pending.size += len(data)
            if pending.size > pending.spool_bytes or len(pending.records) > pending.spool_records:
                pending.spill()
        else:
            pending.add(oid, data, 0, pos or 0)
        if self._quota is not None:
            self._check_quota(pending.size)
        if oid > self._oid:
            with self._lock:
                if oid > self._oid:
                    self._oid = oid

    def checkCurrentSerialInTransaction(self, oid: bytes, serial: bytes, transaction) -> None:
        self._check_transaction(transaction)
        committed = self.getTid(oid)
        if committed != serial:
            raise POSException.ReadConflictError(oid=oid, serials=(committed, serial))

    def tpc_vote(self, transaction):
        pending = self._check_transaction(transaction)
        if not pending.voted:
            with self._commit_io(pending):
                self._write_pending(pending)
        return list(self._resolved) or None

    def _write_pending(self, pending: Pending) -> None:
        """Append the whole transaction, status 'c': header, records, oid table.

        The records are written first, in chunks, and the header last, once
        the length is known; until the trailer is written the transaction is
        a torn tail to any reader.  A spooled transaction is read back from its
        spool in bounded chunks; its oid table (16 bytes a record) is the only
        thing that grows with it, and it is what `_publish` updates the index
        from."""
        if pending.spool is not None:
            self._write_spooled(pending)
            return
        records = pending.records
        untransform = self._untransform if self._untransform is not _identity else None
        refs_iter = iter(references_many([r[1] for r in records if r[1] is not None], untransform))
        hlen = fmt.txn_header_len(pending.user, pending.description, pending.extension)
        file = self._state.file
        tpos, tid = pending.tpos, pending.tid
        table: list[bytes] = []
        positions: dict[bytes, int] = {}
        parts: list[bytes] = []
        written = pos = tpos + hlen
        encode = fmt.encode_data_records
        try:
            fileio.point("commit.vote-start")
            done = 0
            while done < len(records):
                chunk, done = encode(tid, tpos, pos, records, done, WRITE_CHUNK, refs_iter, table,
                                     positions)
                pos += len(chunk)
                self._check_size(tpos, pos - tpos)
                if done < len(records):
                    file.write_at(written, chunk)
                    written = pos
                else:
                    parts.append(chunk)
            rel = pos - tpos
            tlen = rel + fmt.oid_table_size(len(records))
            self._check_size(tpos, tlen)
            header = fmt.encode_txn_header(tid, tlen, fmt.STATUS_CHECKPOINT, pending.user,
                                           pending.description, pending.extension, len(records))
            parts.append(fmt.encode_oid_table_entries(table))
            parts.append(fmt.encode_trailer(tlen))
            if written == tpos + hlen:  # nothing flushed yet: one write for all
                file.write_at(tpos, b"".join([header, *parts]))
            else:
                file.write_at(written, b"".join(parts))
                file.write_at(tpos, header)
            fileio.point("commit.after-data-write")
        except BaseException:
            self._truncate_back(pending)
            raise
        pending.voted = True
        pending.size = tlen + fmt.TRAILER_SIZE
        self._new_positions = positions

    def _write_spooled(self, pending: Pending) -> None:
        """`_write_pending` of a spooled transaction: the same bytes, read from the spool
        in chunks of bounded size, references computed chunk by chunk."""
        untransform = self._untransform if self._untransform is not _identity else None
        hlen = fmt.txn_header_len(pending.user, pending.description, pending.extension)
        file = self._state.file
        tpos, tid = pending.tpos, pending.tid
        nrec = len(pending)
        table_body = bytearray()  # the packed oid-table entries: 16 bytes a record
        written = pos = tpos + hlen
        encode = fmt.encode_data_records
        try:
            fileio.point("commit.vote-start")
            for records in pending.chunks():
                refs_iter = iter(references_many([r[1] for r in records if r[1] is not None],
                                                 untransform))
                table: list[bytes] = []
                positions: dict[bytes, int] = {}
                done = 0
                while done < len(records):
                    chunk, done = encode(tid, tpos, pos, records, done, WRITE_CHUNK, refs_iter,
                                         table, positions)
                    pos += len(chunk)
                    self._check_size(tpos, pos - tpos)
                    file.write_at(written, chunk)
                    written = pos
                table_body += b"".join(table)
                del records, table, positions, refs_iter
            tlen = pos - tpos + fmt.oid_table_size(nrec)
            self._check_size(tpos, tlen)
            file.write_at(written, table_body)
            file.write_at(written + len(table_body),
                          fmt.oid_table_crc(table_body) + fmt.encode_trailer(tlen))
            file.write_at(tpos, fmt.encode_txn_header(tid, tlen, fmt.STATUS_CHECKPOINT, pending.user,
                                                      pending.description, pending.extension, nrec))
            fileio.point("commit.after-data-write")
        except BaseException:
            self._truncate_back(pending)
            raise
        pending.voted = True
        pending.size = tlen + fmt.TRAILER_SIZE
        self._new_positions = table_body

    def _check_size(self, tpos: int, tlen: int) -> None:
        """Refuse (before anything is durable) a transaction the quota or the format cannot hold."""
        self._check_quota(tlen + fmt.TRAILER_SIZE)
        if tpos + tlen + fmt.TRAILER_SIZE > MAX_POS:
            raise FileSizeLimitError(self._file_name, f"the transaction would take the file past "
                                     f"the format's limit of {MAX_POS} bytes", tpos)

    def _truncate_back(self, pending: Pending) -> None:
        file = self._state.file
        if file.size > pending.tpos or file.physical_size() > pending.tpos:
            try:
                file.truncate(pending.tpos)
            except Exception:
                logger.exception("%s: could not truncate an aborted transaction at %d",
                                 self._file_name, pending.tpos)

    def tpc_finish(self, transaction, f=None) -> bytes:
        """Flip the status, fsync, then call `f(tid)` and publish, under the readers' lock.

        Once the fsync returned the transaction is committed, whatever raises
        afterwards: it is published even when `f` raises (the exception is then
        passed on), and if publishing itself fails the storage refuses every
        later write (StorageBrokenError) rather than write over it."""
        pending = self._check_transaction(transaction)
        try:
            with self._commit_io(pending):
                return self._finish(pending, f)
        finally:
            if self._close_requested:
                self.close()

    def _finish(self, pending: Pending, f) -> bytes:
        try:
            if not pending.voted:
                self._write_pending(pending)
            fileio.point("commit.finish-start")
            file = self._state.file
            try:
                file.write_at(pending.tpos + fmt.STATUS_OFFSET, pending.status)
                fileio.point("commit.after-status-flip")
                file.sync()
            except BaseException:
                if not file.broken:  # after a failed fsync nothing is written any more
                    self._truncate_back(pending)
                raise
            # Durable from here on.
            tid = pending.tid
            try:
                with self._lock:
                    try:
                        fileio.point("commit.after-fsync")
                        if f is not None:
                            f(tid)
                        fileio.point("commit.after-callback")
                    finally:
                        self._publish(pending)
                fileio.point("commit.after-publish")
                self._maybe_save_index()
                fileio.point("commit.after-index-save")
            except BaseException:
                logger.critical("%s: failure after transaction %s was committed; it is kept",
                                self._file_name, tid.hex(), exc_info=True)
                raise
            return tid
        finally:
            self._clear_pending()
            self._commit_lock.release()

    def _publish(self, pending: Pending) -> None:
        """Make the durable transaction `pending` visible; called with `_lock` held.

        The end of the log moves first: nothing may ever be written over a
        durable transaction.  A failure after that leaves the index behind
        the file, so the storage breaks (no later read or write: StorageBrokenError)
        until it is reopened."""
        self._end = pending.tpos + pending.size
        self._ltid = pending.tid
        self._ts = self._pending_ts
        self._blob_tpc_finish()
        try:
            positions = self._new_positions
            if isinstance(positions, dict):
                self._state.index.update(positions)
            else:  # a spooled transaction's oid table: in slices (later entries win)
                step = PUBLISH_SLICE * fmt.TABLE_ENTRY_SIZE
                for start in range(0, len(positions), step):
                    self._state.index.update(
                        dict(fmt.iter_oid_table_entries(positions[start:start + step])))
        except BaseException as exc:
            self._break(f"transaction {pending.tid.hex()} is committed but could not be "
                        f"published ({exc!r}); reopen the storage")
            raise

    def _break(self, reason: str) -> None:
        """Refuse every later read and write: the in-memory state no longer matches the file."""
        logger.critical("%s: %s", self._file_name, reason)
        self._broken = reason
        self._state.file.mark_broken(reason)

    def tpc_abort(self, transaction) -> None:
        pending = self._pending
        if pending is None or transaction is not pending.transaction:
            return
        try:
            self._abort_pending(pending)
        finally:
            if self._close_requested:
                self.close()

    def _abort_pending(self, pending: Pending) -> None:
        """Drop `pending` (truncate what its vote wrote) and release the commit lock."""
        with self._commit_io(pending):
            try:
                if pending.voted:
                    self._truncate_back(pending)
                self._blob_tpc_abort()
            finally:
                self._clear_pending()
                self._commit_lock.release()

    @contextlib.contextmanager
    def _commit_io(self, pending: Pending) -> Iterator[None]:
        """Marks a thread inside vote, finish or abort of `pending` (close() must not cut it)."""
        with self._lock:
            if self._pending is not pending:
                raise POSException.StorageTransactionError(
                    "the transaction was aborted (the storage was closed)")
            self._io_depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._io_depth -= 1

    def _clear_pending(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.close()
            self._pending = None
            self._transaction = None
            self._new_positions = {}
            self._resolved = []

    # -- undo ------------------------------------------------------------------------

    def supportsUndo(self) -> bool:
        return True

    def undoLog(self, first: int = 0, last: int = -20, filter=None) -> list[dict]:
        with self._lock:
            if self._broken:
                raise StorageBrokenError(self._file_name, self._broken)
            state, end, pack_tid = self._state, self._end, self._pack_tid
        return undo_log(state.reader, end, pack_tid, first, last, filter)

    def undoInfo(self, first: int = 0, last: int = -20, specification: dict | None = None) -> list[dict]:
        flt = None
        if specification:
            items = list(specification.items())

            def flt(desc):
                return all(desc.get(k, None) == v for k, v in items)
        return self.undoLog(first, last, flt)

    def undo(self, transaction_id, transaction):
        """Undo a transaction: returns (this transaction's tid, the oids it changes)."""
        if self._is_read_only:
            raise POSException.ReadOnlyError()
        pending = self._check_transaction(transaction)
        tid = tid_from_undo_id(transaction_id)
        snap = self.read_snapshot()
        th = find_txn(snap.reader, snap.end, snap.pack_tid, tid)
        oids = UndoPlanner(self, snap.reader, snap.index, pending).plan(th)
        self._blob_undo(pending, oids)
        return pending.tid, oids

    # -- restore, delete, record iteration, copy -------------------------------------

    def restore(self, oid: bytes, serial: bytes, data: bytes | None, version: str,
                prev_txn: bytes | None, transaction) -> None:
        """Write a record as another storage had it (copying, recovery).

        No conflict checks.  Data equal to the revision written in `prev_txn`
        becomes a backpointer to it; None records an undone creation."""
        if self._is_read_only:
            raise POSException.ReadOnlyError()
        pending = self._check_transaction(transaction)
        if version:
            raise POSException.Unsupported("versions are not supported")
        back = 0
        if data is not None and prev_txn:
            target = self._revision(oid, prev_txn)
            if target is not None and target.data == data:
                back, data = target.pos, None
        self.add_record(pending, oid, data, back)

    def restore_records(self, records: Iterable, transaction) -> tuple[int, int]:
        """`restore` of each record of a source transaction, in bulk (what
        `copying.copy_transactions` runs): the same records as one `restore` call
        per record, in order.  `records` yields objects with the attributes of
        a storage iterator's records (oid, data, data_txn).  Returns (records,
        bytes of data).

        The committed positions (the new records' prev) are looked up a batch
        at a time (one C pass over the index's blocks with the extension), and
        a batch of plain records (no `data_txn`) joins the transaction in one
        C-level step; a record naming a `data_txn` goes through `restore` (it
        may become a backpointer).  A batch is at most `RESTORE_BATCH` records
        and about `RESTORE_BATCH_BYTES` of data, so a huge transaction still
        goes to the commit spool in bounded memory."""
        if self._is_read_only:
            raise POSException.ReadOnlyError()
        pending = self._check_transaction(transaction)
        index = self._state.index
        quota = self._quota
        restore = self.restore
        count = nbytes = 0
        it = iter(records)
        batch, batch_bytes = RESTORE_BATCH, RESTORE_BATCH_BYTES
        while True:
            chunk: list = []
            append = chunk.append
            size = 0
            for rec in it:
                append(rec)
                data = rec.data
                if data is not None:
                    size += len(data)
                    if size >= batch_bytes:
                        break
                if len(chunk) >= batch:
                    break
            if not chunk:
                break
            nbytes += size
            oids = list(map(_get_oid, chunk))
            joined = b"".join(oids)
            if len(joined) == 8 * len(oids) and _index_lookup is not None:
                prevs = _index_lookup(index.blocks(), joined)
            else:
                prevs = [index.get(oid, 0) if len(oid) == 8 else 0 for oid in oids]
            datas = list(map(_get_data, chunk))
            if (pending.spool is None and quota is None and len(joined) == 8 * len(oids)
                    and not any(map(_get_data_txn, chunk))):
                # the common case, as pending.add one by one: size, records, then the spill check
                pending.size += size + 8 * datas.count(None)
                pending.records.extend(zip(oids, datas, repeat(0), prevs))
                pending.check_spill()
            else:
                for rec, oid, data, prev in zip(chunk, oids, datas, prevs, strict=True):
                    if data is not None and (rec.data_txn or len(oid) != 8):
                        restore(oid, rec.tid, data, "", rec.data_txn, transaction)
                        continue
                    pending.add(oid, data, 0, prev)
                    if quota is not None:
                        self._check_quota(pending.size)
            count += len(chunk)
            top = max(oids)
            if top > self._oid:
                self.set_max_oid(top)
        return count, nbytes

    def _revision(self, oid: bytes, tid: bytes) -> fmt.DataRecord | None:
        """The data record holding oid's data as written by transaction `tid`."""
        state = self._state
        pos = state.index.get(oid)
        reader = state.reader
        while pos:
            rec = reader.read_data_record(pos, oid)
            if rec.tid == tid:
                return reader.resolve(rec)
            if rec.tid < tid:
                return None
            pos = rec.prev
        return None

    def deleteObject(self, oid: bytes, oldserial: bytes, transaction) -> None:
        """Write a deletion record (IExternalGC); ConflictError on a stale serial."""
        if self._is_read_only:
            raise POSException.ReadOnlyError()
        pending = self._check_transaction(transaction)
        _state, rec = self._current(oid)
        if rec.tid != oldserial:
            raise POSException.ConflictError(oid=oid, serials=(rec.tid, oldserial))
        self.add_record(pending, oid, None, 0)

    def record_iternext(self, next: bytes | None = None):
        """(oid, tid, data, next_oid) of the first live object at or after `next`.

        Deleted objects (undone creations, deleteObject) are skipped.  Each
        call reads the object it returns and the one after it, which the next
        call then takes from a one-entry cache: a full pass reads every record
        once.  Safe beside commits (objects they add during a pass may or may
        not be seen, as with any iteration that is not a snapshot)."""
        state, _end = self._snapshot()
        found = self._live_from(state, next or z64)
        if found is None:
            raise ValueError("no more records")
        oid, _pos, data, tid = found
        following = None
        if oid != _MAX_OID:
            ahead = self._live_from(state, p64(u64(oid) + 1))
            if ahead is not None:
                following = ahead[0]
                self._iternext_ahead = (state, *ahead)
        return oid, tid, data, following

    def _live_from(self, state: State, oid: bytes) -> tuple[bytes, int, bytes, bytes] | None:
        """(oid, pos, data, tid) of the first live object at or after `oid`, or None."""
        index = state.index
        while True:
            ahead = self._iternext_ahead
            if ahead is not None and ahead[0] is state and ahead[1] == oid:
                with self._lock:
                    current = index.get(oid)
                if current == ahead[2]:
                    return ahead[1:]
            found_oid = index.min_key(oid)
            if found_oid is None:
                return None
            with self._lock:  # ordered after a finishing commit, as in _lookup
                pos = index.get(found_oid)
            if pos is not None:
                live = self._read_current(state, pos, found_oid)
                if live is not None:
                    return found_oid, pos, live[0], live[1]
            if found_oid == _MAX_OID:
                return None
            oid = p64(u64(found_oid) + 1)

    def copyTransactionsFrom(self, other, verbose: bool = False) -> None:
        from .copying import copy_transactions
        copy_transactions(other, self)

    # -- pack ------------------------------------------------------------------------

    def pack(self, t: float, referencesf=None, gc: bool | None = None, *,
             progress: Progress | None = None) -> None:
        """Remove the revisions not needed as of time `t` (seconds since the epoch).

        Loads and commits go on meanwhile.  References come from the records;
        `referencesf` is used only for records whose references are not stored.
        gc=None uses the storage's pack_gc; gc=False keeps every object's
        revision at `t` and drops only older history.  Returns None, as ZODB
        storages do; what the pack did is in `last_pack_report` (a PackReport).
        See refstorage.pack.
        """
        if self._is_read_only:
            raise POSException.ReadOnlyError()
        if self._broken:
            raise StorageBrokenError(self._file_name, self._broken)
        if gc is None:
            gc = self._pack_gc
        if referencesf is None:
            untransform = self._untransform

            def referencesf(data: bytes) -> list:
                return _referencesf(untransform(data))
        self.last_pack_report = pack_storage(self, t, referencesf, bool(gc), progress)

    def install_packed(self, file: fileio.DataFile, index: OidIndex, end: int, file_id: bytes,
                        pack_tid: bytes) -> None:
        """Make the packed file, already renamed to our name, the storage's file
        (core interface, see core.py).

        Called by pack with the commit lock held.  The old file is not closed:
        a load or an iterator may still be reading it; it closes itself when
        the last of them lets go of it."""
        with self._lock:
            self._state = State(file, index)
            self._end = end
            self._file_id = file_id
            self._pack_tid = pack_tid
            self._saved_end = self._index_saved_end = fmt.HEADER_SIZE
        try:
            self._save_index_now(index, end, self._ltid)
        except Exception:
            logger.exception("%s: could not save the index after the pack (it will be rebuilt)",
                             self._file_name)

    # -- ZEO -------------------------------------------------------------------------

    def lastInvalidations(self, count: int) -> list[tuple[bytes, list[bytes]]]:
        """The last `count` transactions as (tid, oids it changed), oldest first.

        ZEO's server seeds its invalidation queue with this, so clients that
        reconnect after a server restart can catch up without full cache
        verification."""
        state, end = self._snapshot()
        reader = state.reader
        result: list[tuple[bytes, list[bytes]]] = []
        if count <= 0:
            return result
        for th in reader.iter_txns_backward(end):
            result.append((th.tid, list(dict.fromkeys(rec.oid for rec in reader.txn_records(th)))))
            if len(result) >= count:
                break
        result.reverse()
        return result

    # -- invariants ------------------------------------------------------------------

    def _check(self, idle: bool = True) -> ScanResult:
        """Verify the storage's internal invariants against a fresh verifying scan of its file.

        - the in-memory index is well formed (`OidIndex._check`);
        - a full verifying scan (every record decoded and checksummed) from the
          file header up to the committed end finds no damage and ends exactly
          there, at the storage's last transaction;
        - the index equals what that scan builds, and every position in it
          holds a record of that oid (backpointers resolve);
        - no oid in the index is above the one new_oid last handed out;
        - with `idle` (no transaction in progress), nothing lies past the
          committed end.

        AssertionError names the first violation (like `OidIndex._check`, a
        tool for tests, not a runtime check); returns the scan's result.
        """

        def fail(msg: str) -> None:
            raise AssertionError(msg)

        state, end = self._snapshot()
        reader = state.reader
        state.index._check()
        fresh = OidIndex()
        result = scan(reader, fmt.HEADER_SIZE, end, fresh, verify=True)
        if result.bad_pos is not None:
            fail(f"verifying scan found damage: {result.error}")
        if result.end != end:
            fail(f"verifying scan ends at {result.end}, the committed end is {end}")
        if (result.last_tid or z64) != self.lastTransaction():
            fail(f"the scan's last tid {(result.last_tid or z64).hex()} is not "
                 f"lastTransaction() {self.lastTransaction().hex()}")
        got = dict(state.index.items())
        if got != dict(fresh.items()):
            fail("the index differs from a fresh scan of the file")
        for oid, pos in got.items():
            rec = reader.read_data_record(pos, oid)
            if rec.pos != pos or rec.oid != oid:
                fail(f"index entry of oid {oid.hex()} at {pos} reads oid {rec.oid.hex()} at {rec.pos}")
            reader.resolve(rec)
        if got and max(got) > self._oid:
            fail("new_oid could hand out an oid already in use")
        if idle and not self._is_read_only and state.file.physical_size() != end:
            fail(f"{state.file.physical_size() - end} bytes past the committed end {end}")
        return result

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Save the index and close the file and lock.

        A commit in flight is never cut: close waits a little for it; then a
        transaction only begun (no thread inside vote, finish or abort) is
        aborted, and one being written closes the storage when it ends."""
        if self._closed:
            return
        if not self._commit_lock.acquire(timeout=CLOSE_WAIT):
            with self._lock:
                pending = self._pending
                if self._io_depth:
                    # A thread is inside vote, finish or abort: it closes at its end.
                    self._close_requested = True
                    logger.warning("%s: close() while a commit writes; the storage "
                                   "closes when that commit ends", self._file_name)
                    return
            if pending is None:  # a pack's final phase: short, wait for it
                with self._lock:
                    self._close_requested = True  # no new transaction begins meanwhile
                self._commit_lock.acquire()
            elif not self._abort_idle(pending):  # on success the commit lock is ours
                return
        try:
            if self._closed:
                return
            self._closed = True
            state = self._state
            try:
                if not self._is_read_only and not self._broken and self._end != self._saved_end:
                    try:
                        self._save_index_now(state.index, self._end, self._ltid)
                    except Exception:
                        logger.exception("%s: could not save the index on close", self._file_name)
            finally:
                state.file.close()
                self._release_lock_file()
        finally:
            self._commit_lock.release()

    def _abort_idle(self, pending: Pending) -> bool:
        """Abort `pending`, begun but idle, for close(); its commit lock passes to the caller.

        Nothing of it is durable.  It is detached first, so its owner's next
        call (store, vote, finish) fails with StorageTransactionError.  False
        if it moved meanwhile (then the commit closes the storage at its end)."""
        with self._lock:
            if self._io_depth or self._pending is not pending:
                self._close_requested = True
                return False
            self._pending = None
            self._transaction = None
        logger.warning("%s: close() aborts transaction %s, begun but not finished",
                       self._file_name, pending.tid.hex())
        try:
            if pending.voted:
                self._truncate_back(pending)
            self._blob_tpc_abort()
        finally:
            pending.close()
            self._clear_pending()
        return True

    def cleanup(self) -> None:
        """Remove the data file and every file derived from it (used by tests)."""
        for suffix in ("", ".index", ".lock", ".pack", ".old", ".tmp"):
            fileio.remove_if_exists(self._file_name + suffix)
