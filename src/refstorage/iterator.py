"""Iterating over a storage's transactions (IStorageIteration).

Transaction objects carry tid, status, user, description, extension and the
stored extension bytes; their records carry oid, tid, data and data_txn (the
tid of the transaction that wrote the data a backpointer points to), as
copyTransactionsFrom, zodbconvert and ZEO expect.
"""

from __future__ import annotations

from collections.abc import Iterator

from ZODB.BaseStorage import DataRecord, TransactionRecord

from . import fileformat as fmt
from .log import LogReader


class Record(DataRecord):
    """One data record as the iterator reports it."""

    def __init__(self, oid: bytes, tid: bytes, data: bytes | None, data_txn: bytes | None,
                 refs: bytes = b"", pos: int = 0):
        super().__init__(oid, tid, data, data_txn)
        self.refs = refs
        self.pos = pos


class Transaction(TransactionRecord):
    """One transaction as the iterator reports it; iterating yields its records."""

    def __init__(self, reader: LogReader, th: fmt.TxnHeader):
        super().__init__(th.tid, th.status.decode("ascii"), th.user, th.description, th.extension)
        self._reader = reader
        self._th = th
        self.pos = th.pos

    def __iter__(self) -> Iterator[Record]:
        reader = self._reader
        for rec in reader.txn_records(self._th):
            if rec.is_backpointer:
                target = reader.resolve(rec)
                if target is None:
                    yield Record(rec.oid, rec.tid, None, None, b"", rec.pos)
                else:
                    yield Record(rec.oid, rec.tid, target.data, target.tid, target.refs, rec.pos)
            else:
                yield Record(rec.oid, rec.tid, rec.data, None, rec.refs, rec.pos)


class TransactionIterator:
    """Committed transactions with start <= tid <= stop, oldest first.

    It reads up to `end`, the end of the log when it was made: transactions
    committed later, and the one being committed, are not seen.
    """

    def __init__(self, reader: LogReader, end: int, start: bytes | None = None,
                 stop: bytes | None = None):
        self._reader = reader
        self._end = end
        self._stop = stop
        self._pos = self._find_start(start) if start else fmt.HEADER_SIZE
        self._closed = False

    def _find_start(self, start: bytes) -> int:
        """The position of the first transaction with tid >= start.

        Steps back from the end: starts near the end (incremental copies,
        ZEO catching up) are the common case and cost a few reads."""
        pos = self._end
        for th in self._reader.iter_txns_backward(pos):
            if th.tid < start:
                break
            pos = th.pos
        return pos

    def __iter__(self) -> TransactionIterator:
        return self

    def __next__(self) -> Transaction:
        if self._closed:
            raise StopIteration
        if self._pos >= self._end:
            raise StopIteration
        th = self._reader.read_txn_header(self._pos)
        if self._stop is not None and th.tid > self._stop:
            self._closed = True
            raise StopIteration
        self._pos = th.next_pos
        return Transaction(self._reader, th)

    next = __next__

    def close(self) -> None:
        self._closed = True
