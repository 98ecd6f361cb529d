"""Walking a whole log, transaction by transaction, past any damage.

`walk` yields each transaction (checked, and with its records decoded and
checksummed when asked) and, for each damaged stretch, a `Damage` naming the
byte range that holds no usable transaction and what was wrong at its start.
After damage it resumes where `log.next_valid_txn` says the next valid
transaction starts: the rule open's scan uses to tell a torn tail (nothing
valid follows) from corruption.  verify, dump, info and recover are built on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

from .. import format as fmt
from ..errors import CorruptedError, CorruptedTransactionError
from ..log import LogReader, next_valid_txn, read_checked_txn, read_moved_txn
from .common import Progress


class Txn(NamedTuple):
    header: fmt.TxnHeader
    records: list[fmt.DataRecord] | None  # None when not decoded
    # Not 0: the transaction is intact but was written `delta` bytes before where it
    # is now (bytes were lost or inserted before it); its records' tpos, prev and
    # backpointers hold the old positions (their `pos` is where they are now).
    delta: int = 0


class Damage(NamedTuple):
    start: int  # first byte of the damaged stretch (where a transaction should start)
    end: int  # where the next valid transaction starts, or the end of the file
    error: CorruptedError  # what was wrong at `start`

    @property
    def length(self) -> int:
        return self.end - self.start


def _check_table_and_trailer(reader: LogReader, th: fmt.TxnHeader) -> None:
    raw = reader.file.read(th.records_end, fmt.oid_table_size(th.nrec) + fmt.TRAILER_SIZE)
    fmt.decode_oid_table(raw, 0, th.nrec, reader.path, th.records_end)
    fmt.check_trailer(raw, fmt.oid_table_size(th.nrec), th, reader.path)


def _check_status_and_order(reader: LogReader, th: fmt.TxnHeader, last_tid: bytes | None) -> None:
    if th.status == fmt.STATUS_CHECKPOINT:
        raise CorruptedTransactionError(reader.path, "transaction was voted but never finished", th.pos)
    if last_tid is not None and th.tid <= last_tid:
        raise CorruptedTransactionError(
            reader.path, f"transaction id {th.tid.hex()} does not increase (previous {last_tid.hex()})",
            th.pos)


def walk(reader: LogReader, start: int, end: int, decode: bool | Callable[[fmt.TxnHeader], bool] = True,
         progress: Progress | None = None, moved: bool = True) -> Iterator[Txn | Damage]:
    """Every transaction in [start, end), in order, and a Damage for each damaged stretch.

    `decode` says whether a transaction's records are decoded and checked
    (True, False, or a function of its header); when they are not, only its
    header, oid table and trailer are checked.  A transaction voted but never
    finished (status 'c') and one whose tid does not increase count as damage.
    With `moved`, a decoded transaction that is intact but sits at another
    position than it was written at (bytes lost or inserted before it) is
    yielded with its `delta` (see `log.read_moved_txn`) rather than as damage.
    """
    pos = start
    last_tid: bytes | None = None
    while pos < end:
        try:
            th = reader.read_txn_header(pos, end)
            _check_status_and_order(reader, th, last_tid)
            delta = 0
            if decode is True or (decode is not False and decode(th)):
                try:
                    th, recs = read_checked_txn(reader, pos, end)
                except CorruptedError as exc:
                    if not moved:
                        raise
                    try:
                        th, recs, delta = read_moved_txn(reader, pos, end)
                    except CorruptedError:
                        raise exc from None
                    if not delta:
                        raise
            else:
                _check_table_and_trailer(reader, th)
                recs = None
        except CorruptedError as exc:
            nxt = next_valid_txn(reader, pos, end, last_tid)
            stop = end if nxt is None else nxt
            yield Damage(pos, stop, exc)
            pos = stop
            if progress is not None:
                progress(pos)
            continue
        yield Txn(th, recs, delta)
        last_tid = th.tid
        pos = th.next_pos
        if progress is not None:
            progress(pos)
