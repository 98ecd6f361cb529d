"""Transactional undo: the undo log, and what an undo writes for each record.

Undoing transaction T writes, for each object T changed, a record that puts
back the object's state from before T:

- a backpointer to the revision before T's (or a backpointer 0 when T created
  the object), when the object's current data is still what T wrote -- the
  common case, which copies no data;
- otherwise the result of conflict resolution (`_p_resolveConflict`) between
  the current state, T's state and the state before T;
- otherwise an `UndoError` (all of them together as `MultipleUndoErrors`).

Undo never goes past a packed transaction (status 'p') or the file's pack
time: what a pack dropped cannot be restored.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator

from persistent.TimeStamp import TimeStamp
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError, MultipleUndoErrors, UndoError

from . import fileformat as fmt
from .core import Pending, StorageCore
from .index import OidIndex
from .log import LogReader


def undo_id(tid: bytes) -> bytes:
    """The opaque id undoLog hands out for a transaction (as ZODB's FileStorage)."""
    return base64.encodebytes(tid).rstrip()


def tid_from_undo_id(transaction_id) -> bytes:
    if isinstance(transaction_id, str):
        transaction_id = transaction_id.encode("ascii")
    if len(transaction_id) == 8:
        return transaction_id
    try:
        tid = base64.decodebytes(transaction_id + b"\n")
    except (binascii.Error, ValueError):
        tid = b""
    if len(tid) != 8:
        raise UndoError(f"invalid transaction id {transaction_id!r}")
    return tid


def undoable_txns(reader: LogReader, end: int, pack_tid: bytes) -> Iterator[fmt.TxnHeader]:
    """Committed transactions, newest first, down to the last pack."""
    for th in reader.iter_txns_backward(end):
        if th.status == fmt.STATUS_PACKED or th.tid <= pack_tid:
            return
        if th.status == fmt.STATUS_COMMITTED:
            yield th


def txn_description(th: fmt.TxnHeader) -> dict:
    """An undoLog entry: the standard keys, then the extension's (as ZODB's FileStorage)."""
    d = {"id": undo_id(th.tid), "time": TimeStamp(th.tid).timeTime(), "user_name": th.user,
         "description": th.description, "size": th.tlen}
    if th.extension:
        try:
            d.update(TransactionMetaData(extension=th.extension).extension)
        except Exception:  # an unreadable extension does not hide the transaction
            pass
    return d


def undo_log(reader: LogReader, end: int, pack_tid: bytes, first: int, last: int,
             filter: Callable[[dict], bool] | None) -> list[dict]:
    if last < 0:  # -last is the maximum number of entries
        last = first - last
    results = []
    i = 0
    for th in undoable_txns(reader, end, pack_tid):
        if i >= last:
            break
        d = txn_description(th)
        if filter is None or filter(d):
            if i >= first:
                results.append(d)
            i += 1
    return results


def find_txn(reader: LogReader, end: int, pack_tid: bytes, tid: bytes) -> fmt.TxnHeader:
    for th in reader.iter_txns_backward(end):
        if th.tid == tid:
            if th.status != fmt.STATUS_COMMITTED:
                raise UndoError("non-undoable transaction (it was packed)")
            return th
        if th.tid < tid or th.status == fmt.STATUS_PACKED or th.tid <= pack_tid:
            break
    raise UndoError(f"invalid transaction id {tid.hex()}: no undoable transaction has it")


class UndoPlanner:
    """Decides the records an undo writes into the pending transaction."""

    def __init__(self, storage: StorageCore, reader: LogReader, index: OidIndex, pending: Pending):
        self.storage = storage
        self.reader = reader
        self.index = index  # the storage's live index (the commit lock is held)
        self.pending = pending

    def _current(self, oid: bytes):
        """(tid, position holding the data or None, data or None) of oid now."""
        entry = self.pending.latest.get(oid)
        if entry is not None:
            data, back = entry
            if data is not None:
                return self.pending.tid, None, data
            return self.pending.tid, back, self._data_at(back)
        pos = self.index.get(oid)
        if pos is None:
            raise UndoError("the object no longer exists", oid)
        rec = self.reader.read_data_record(pos, oid)
        target = self.reader.resolve(rec)
        if target is None:
            return rec.tid, 0, None
        return rec.tid, target.pos, target.data

    def _data_at(self, pos: int) -> bytes | None:
        if not pos:
            return None
        target = self.reader.resolve(self.reader.read_data_record(pos))
        return None if target is None else target.data

    def plan(self, th: fmt.TxnHeader) -> list[bytes]:
        failures: dict[bytes, UndoError] = {}
        oids = []
        for rec in self.reader.txn_records(th):
            failures.pop(rec.oid, None)
            try:
                data, back = self._undo_record(rec)
            except UndoError as exc:
                failures[rec.oid] = exc
                continue
            self.storage.add_record(self.pending, rec.oid, data, back)
            oids.append(rec.oid)
        if failures:
            # As ZODB's FileStorage does: ZEO's client rebuilds MultipleUndoErrors
            # (an UndoError) from its `_errs`, while any other exception class
            # would reach ZEO clients as ZEO.Exceptions.ServerException.
            raise MultipleUndoErrors([(oid, exc._reason) for oid, exc in failures.items()])
        return oids

    def _undo_record(self, rec: fmt.DataRecord) -> tuple[bytes | None, int]:
        """(data, 0) to write data, or (None, position) to write a backpointer."""
        oid = rec.oid
        undone = self.reader.resolve(rec)
        undone_pos = undone.pos if undone is not None else 0
        if oid in self.pending.latest or self.index.get(oid) != rec.pos:
            ctid, cpos, cdata = self._current(oid)
            if cpos != undone_pos or cpos is None:
                undone_data = undone.data if undone is not None else None
                if undone_data != cdata:
                    if not rec.prev:
                        raise UndoError("Can't undo an add transaction followed by"
                                        " conflicting transactions.", oid)
                    before = self._data_at(rec.prev)
                    try:
                        resolved = self.storage.tryToResolveConflict(
                            oid, ctid, rec.tid, before, cdata or b"")
                    except ConflictError:
                        raise UndoError("Some data were modified by a later transaction", oid) from None
                    return resolved, 0
        if not rec.prev:
            return None, 0  # undo the creation
        before = self.reader.resolve(self.reader.read_data_record(rec.prev, oid))
        return None, (before.pos if before is not None else 0)
