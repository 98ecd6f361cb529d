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
  records of the transaction being committed, buffered in memory until vote.
- installing a packed file (`install_packed`), under the commit lock.

The classes it names, `State`, `Pending` and `Snapshot`, are defined here so
that every module can use them without importing storage.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

from .fileio import DataFile
from .index import OidIndex
from .log import LogReader

if TYPE_CHECKING:  # pragma: no cover
    import threading

__all__ = ["State", "Pending", "Snapshot", "StorageCore"]


class State:
    """What a read needs, swapped as one object (pack replaces the file)."""

    __slots__ = ("file", "reader", "index")

    def __init__(self, file: DataFile, index: OidIndex):
        self.file = file
        self.reader = LogReader(file)
        self.index = index


class Pending:
    """The transaction being committed: buffered records until vote."""

    __slots__ = ("transaction", "tid", "status", "user", "description", "extension",
                 "records", "_latest", "_latest_n", "tpos", "voted", "size")

    def __init__(self, transaction, tid: bytes, status: bytes, user: bytes,
                 description: bytes, extension: bytes, tpos: int):
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
        self._latest: dict[bytes, tuple[bytes | None, int]] = {}
        self._latest_n = 0  # records[:_latest_n] are in _latest
        self.tpos = tpos
        self.voted = False
        # bytes of data buffered so far (for the quota; exact size at vote)
        self.size = 0

    @property
    def latest(self) -> dict[bytes, tuple[bytes | None, int]]:
        """oid -> (data or None, backpointer) of its latest record here.

        Built on demand (undo and blobs ask; a plain commit never does), from
        the records appended since the last call."""
        records, n = self.records, self._latest_n
        if n != len(records):
            latest = self._latest
            for i in range(n, len(records)):
                oid, data, back, _prev = records[i]
                latest[oid] = (data, back)
            self._latest_n = len(records)
        return self._latest


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
