"""The storage core: what FileStorage offers the modules that work on it.

undo.py, blobs.py and pack.py act on a storage they do not own.  They reach
it only through the small interface described here (`StorageCore`), which
`refstorage.storage.FileStorage` implements; none of them touches the
storage's private attributes, and none imports storage.py (it imports them).

- a read snapshot (`read_snapshot`): the data file, its reader and index, the
  end of the committed log, the last tid and the pack tid, taken together
  under the readers' lock.  The file and index are those of one generation of
  the file (pack swaps them as one `State`); the index keeps changing with
  commits unless a copy is asked for.
- the commit lock (`commit_lock`): held, no transaction commits and the
  storage's file stays the one in the snapshot taken meanwhile.
- the commit buffer (`Pending`, `pending_transaction`, `add_record`): the
  records of the transaction being committed until vote, in memory for a
  small transaction, in a temporary file (`Spool`) for a large one.
- installing a packed file (`install_packed`), under the commit lock.

The classes it names, `State`, `Pending` and `Snapshot`, are defined here so
that every module can use them without importing storage.py.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from array import array
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from .errors import StorageIOError
from .fileio import DataFile
from .index import OidIndex
from .log import LogReader

if TYPE_CHECKING:  # pragma: no cover
    import threading

__all__ = ["State", "Pending", "Spool", "Snapshot", "StorageCore"]


class State:
    """What a read needs, swapped as one object (pack replaces the file)."""

    __slots__ = ("file", "reader", "index")

    def __init__(self, file: DataFile, index: OidIndex):
        self.file = file
        self.reader = LogReader(file)
        self.index = index


# A transaction's records stay in memory (a list of tuples) until they hold more
# than SPOOL_BYTES of data or SPOOL_RECORDS records; then they move to a
# temporary file (`Spool`) and only 16 bytes a record stay in memory.
SPOOL_BYTES = 8 << 20
SPOOL_RECORDS = 1 << 15
# Records are read back from the spool this many bytes at a time (at least one record).
SPOOL_READ = 4 << 20

_SPOOL_HEADER = struct.Struct(">QQQ")  # back, prev, data length (_NO_DATA: None)
_NO_DATA = 2**64 - 1


class Spool:
    """The records of a large transaction being committed, in an unnamed temporary file.

    Each record is written as (back, prev, data length) and its data; memory
    holds only its oid (8 bytes, in `oids`) and its spool offset (8 bytes, in
    `offsets`).  The file is created in `directory` (the data file's, so it is
    on the same file system, not in a tmpfs that takes memory) without a name
    (`tempfile.TemporaryFile`): a crash leaves nothing behind, and closing it
    frees the space.  `path` names it in errors."""

    def __init__(self, directory: str, path: str):
        self.path = path
        self.oids = bytearray()
        self.offsets = array("Q")
        self.end = 0
        self._failed: str | None = None
        try:
            self._file = tempfile.TemporaryFile(dir=directory, prefix=".refstorage-spool-",
                                                buffering=1 << 20)
        except OSError as exc:
            raise StorageIOError(path, f"cannot create the commit spool in {directory}: "
                                 f"{exc.strerror or exc}", None, exc.errno) from None
        self._fd = self._file.fileno()

    def __len__(self) -> int:
        return len(self.offsets)

    def append(self, oid: bytes, data: bytes | None, back: int, prev: int) -> None:
        """Add a record.  After a failed write the spool is unusable (part of the record may be
        in it, and later records would not be where `offsets` says): every later append
        raises too, and the transaction can only be aborted."""
        if self._failed is not None:
            raise StorageIOError(self.path, "an earlier write to the commit spool failed "
                                 f"({self._failed}); abort this transaction", self.end)
        header = _SPOOL_HEADER.pack(back, prev, _NO_DATA if data is None else len(data))
        try:
            self._file.write(header)
            if data:
                self._file.write(data)
        except OSError as exc:
            self._failed = exc.strerror or str(exc)
            raise StorageIOError(self.path, f"write failed: {exc.strerror or exc}", self.end,
                                 exc.errno) from None
        self.oids += oid
        self.offsets.append(self.end)
        self.end += _SPOOL_HEADER.size + (len(data) if data else 0)

    def _read(self, pos: int, n: int) -> bytes:
        try:
            self._file.flush()
            data = os.pread(self._fd, n, pos)
        except OSError as exc:
            raise StorageIOError(self.path, f"read failed: {exc.strerror or exc}", pos,
                                 exc.errno) from None
        if len(data) != n:
            raise StorageIOError(self.path, f"read {len(data)} of {n} bytes", pos)
        return data

    def record(self, i: int) -> tuple[bytes, bytes | None, int, int]:
        """Record `i` as (oid, data or None, back, prev)."""
        start = self.offsets[i]
        stop = self.offsets[i + 1] if i + 1 < len(self.offsets) else self.end
        return self._decode(self._read(start, stop - start), i, i + 1)[0]

    def _decode(self, buf: bytes, i: int, j: int) -> list[tuple[bytes, bytes | None, int, int]]:
        unpack = _SPOOL_HEADER.unpack_from
        oids = self.oids
        size = _SPOOL_HEADER.size
        out = []
        off = 0
        start = self.offsets[i] if i < len(self.offsets) else self.end
        for k in range(i, j):
            if len(buf) - off < size:
                raise StorageIOError(self.path, "commit spool record cut short", start + off)
            back, prev, dlen = unpack(buf, off)
            off += size
            if dlen == _NO_DATA:
                data = None
            else:
                if len(buf) - off < dlen:
                    raise StorageIOError(self.path, "commit spool record cut short", start + off)
                data = buf[off:off + dlen]
                off += dlen
            out.append((bytes(oids[8 * k:8 * k + 8]), data, back, prev))
        if off != len(buf):
            raise StorageIOError(self.path, "commit spool records do not end where expected",
                                 start + off)
        return out

    def chunks(self, limit: int = SPOOL_READ) -> Iterator[list[tuple[bytes, bytes | None, int, int]]]:
        """The records in store order, as lists of (oid, data, back, prev) tuples of about
        `limit` bytes of spool each (one record alone if it is larger)."""
        offsets, n = self.offsets, len(self.offsets)
        i = 0
        while i < n:
            start = offsets[i]
            j = max(i + 1, bisect_left(offsets, start + limit, i + 1))
            stop = offsets[j] if j < n else self.end
            yield self._decode(self._read(start, stop - start), i, j)
            i = j

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed


class _SpooledLatest(Mapping):
    """`Pending.latest` of a spooled transaction: oid -> (data, back), read from the spool."""

    def __init__(self, spool: Spool, where: dict[bytes, int]):
        self._spool = spool
        self._where = where

    def __getitem__(self, oid: bytes) -> tuple[bytes | None, int]:
        _oid, data, back, _prev = self._spool.record(self._where[oid])
        return data, back

    def __contains__(self, oid: object) -> bool:
        return oid in self._where

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class Pending:
    """The transaction being committed: its records until vote.

    A small transaction's records are a list in memory (`records`); past
    SPOOL_BYTES of data or SPOOL_RECORDS records they move to a `Spool`
    (`spool`), and so does every later record: memory then holds 16 bytes a
    record, whatever the transaction's size.  Always add records with `add`
    (or, on the commit path, append to `records` while `spool` is None and
    call `check_spill`)."""

    __slots__ = ("transaction", "tid", "status", "user", "description", "extension",
                 "records", "_latest", "_latest_n", "tpos", "voted", "size", "spool",
                 "spool_bytes", "spool_records", "_spool_dir", "_spool_path")

    def __init__(self, transaction, tid: bytes, status: bytes, user: bytes,
                 description: bytes, extension: bytes, tpos: int,
                 spool_dir: str | None = None, spool_path: str = "commit spool"):
        self.transaction = transaction
        self.tid = tid
        self.status = status
        self.user = user
        self.description = description
        self.extension = extension
        # (oid, data or None, backpointer, prev) in store order; an oid stored
        # twice keeps both records (as copies of other storages need).  prev is
        # the oid's committed record (stable: the commit lock is held until
        # finish).  References are computed for all records at once, at vote.
        self.records: list[tuple[bytes, bytes | None, int, int]] = []
        # oid -> (data, back) in memory; oid -> record number once spooled
        self._latest: dict = {}
        self._latest_n = 0  # records[:_latest_n] are in _latest
        self.tpos = tpos
        self.voted = False
        # bytes of data held so far (for the quota and the spool; exact size at vote)
        self.size = 0
        self.spool: Spool | None = None
        # spill past these (SPOOL_BYTES, SPOOL_RECORDS when the transaction began)
        self.spool_bytes = SPOOL_BYTES
        self.spool_records = SPOOL_RECORDS
        self._spool_dir = spool_dir
        self._spool_path = spool_path

    def __len__(self) -> int:
        """The number of records."""
        return len(self.records) if self.spool is None else len(self.spool)

    def add(self, oid: bytes, data: bytes | None, back: int, prev: int) -> None:
        """Add a record (data, or a backpointer `back`; None and 0: no data)."""
        self.size += 8 if data is None else len(data)
        spool = self.spool
        if spool is None:
            self.records.append((oid, data, back, prev))
            self.check_spill()
        else:
            spool.append(oid, data, back, prev)

    def check_spill(self) -> None:
        """Move the records to a spool once they are too many or too large for memory."""
        if self.spool is None and (self.size > self.spool_bytes
                                   or len(self.records) > self.spool_records):
            self.spill()

    def spill(self) -> None:
        """Move the records to a spool file; every later record goes there too."""
        if self.spool is not None:
            return
        spool = Spool(self._spool_dir or tempfile.gettempdir(), self._spool_path)
        try:
            for rec in self.records:
                spool.append(*rec)
        except BaseException:
            spool.close()
            raise
        self.spool = spool
        self.records = []
        self._latest = {}
        self._latest_n = 0

    def chunks(self) -> Iterator[Sequence[tuple[bytes, bytes | None, int, int]]]:
        """The records in store order, in lists of bounded size once spooled."""
        if self.spool is None:
            if self.records:
                yield self.records
        else:
            yield from self.spool.chunks()

    def close(self) -> None:
        """Free the spool (abort, finish): its space goes back to the file system."""
        if self.spool is not None:
            self.spool.close()

    @property
    def latest(self) -> Mapping[bytes, tuple[bytes | None, int]]:
        """oid -> (data or None, backpointer) of its latest record here.

        Built on demand (undo and blobs ask; a plain commit never does), from
        the records appended since the last call."""
        latest = self._latest
        spool = self.spool
        if spool is not None:
            oids, n = spool.oids, len(spool)
            for i in range(self._latest_n, n):
                latest[bytes(oids[8 * i:8 * i + 8])] = i
            self._latest_n = n
            return _SpooledLatest(spool, latest)
        records, n = self.records, self._latest_n
        if n != len(records):
            for i in range(n, len(records)):
                oid, data, back, _prev = records[i]
                latest[oid] = (data, back)
            self._latest_n = len(records)
        return latest


class Snapshot(NamedTuple):
    """A consistent view of the storage for reading (`StorageCore.read_snapshot`)."""

    state: State  # the file, its reader and its index
    end: int  # end of the last committed transaction
    last_tid: bytes  # its tid (z64 if none)
    pack_tid: bytes  # the file's pack time (z64 if never packed)
    index: OidIndex  # state.index, or a copy of it taken with the rest

    @property
    def reader(self) -> LogReader:
        return self.state.reader

    @property
    def file(self) -> DataFile:
        return self.state.file


class StorageCore(Protocol):
    """The interface FileStorage offers undo.py, blobs.py and pack.py.

    Besides these, they use only ZODB's public storage API (getName,
    lastTransaction, tryToResolveConflict, ...)."""

    @property
    def closed(self) -> bool:
        """True once close() began: no pack may install a file any more."""

    @property
    def pack_keep_old(self) -> bool:
        """Whether pack keeps the pre-pack file (``<name>.old``, ``<blob_dir>.old``)."""

    @property
    def commit_lock(self) -> threading.Lock:
        """Held from tpc_begin to tpc_finish/tpc_abort; pack holds it to swap files."""

    def read_snapshot(self, copy_index: bool = False) -> Snapshot:
        """The file, log end, last tid and pack tid, taken together under the readers'
        lock; with `copy_index`, `index` is a copy taken under that lock too.
        StorageBrokenError if the storage broke (a committed transaction could
        not be published): nothing may read or rewrite it until it is reopened."""

    def pending_transaction(self, transaction) -> Pending:
        """The commit buffer of `transaction` (StorageTransactionError if it is not
        the one being committed)."""

    def add_record(self, pending: Pending, oid: bytes, data: bytes | None, back: int = 0) -> None:
        """Buffer a record (data, or a backpointer `back`; None and 0: no data)."""

    def untransformed(self, data: bytes) -> bytes:
        """Record data as the application wrote it (undoing a DB wrapper's transform)."""

    def install_packed(self, file: DataFile, index: OidIndex, end: int, file_id: bytes,
                       pack_tid: bytes) -> None:
        """Make a packed file, already renamed to the storage's name, its file.

        Called with the commit lock held."""
