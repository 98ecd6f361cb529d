"""Walking a whole log, transaction by transaction, past any damage.

`walk` yields each transaction (checked, and with its records decoded and
checksummed when asked) and, for each damaged stretch, a `Damage` naming the
byte range that holds no usable transaction and what was wrong at its start.
After damage it resynchronises: it looks for the next position where a valid
transaction starts (a header that passes its checksum, with a later tid than
the last good one, an intact oid table and a matching trailer).  verify,
dump and recover are built on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .. import fileformat as fmt
from ..errors import CorruptedError, CorruptedTransactionError
from ..log import LogReader, read_checked_txn, read_moved_txn
from .common import Progress

SEARCH_CHUNK = 1 << 20
# A transaction header has one of these status bytes (never 'c' for a good one) at
# STATUS_OFFSET: candidates for a resynchronisation are found with one regex search.
_STATUS_RE = re.compile(b"[" + re.escape(fmt.STATUS_COMMITTED + fmt.STATUS_PACKED) + b"]")


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


def valid_txn_at(reader: LogReader, pos: int, end: int, after_tid: bytes | None = None) -> bool:
    """Does a finished transaction with a tid after `after_tid` start at `pos`?

    Its header, oid table and trailer are checked (not its records)."""
    try:
        th = reader.read_txn_header(pos, end)
        _check_status_and_order(reader, th, after_tid)
        _check_table_and_trailer(reader, th)
    except CorruptedError:
        return False
    return True


def next_valid_txn(reader: LogReader, bad: int, end: int, after_tid: bytes | None = None) -> int | None:
    """The first position after `bad` where a valid transaction starts, or None.

    If the transaction at `bad` has an intact header, the one after it is
    tried first; otherwise every byte position is a candidate (those whose
    status byte is plausible are checked)."""
    try:
        th = reader.read_txn_header(bad, end)
    except CorruptedError:
        th = None
    if th is not None and th.next_pos < end and valid_txn_at(reader, th.next_pos, end, after_tid):
        return th.next_pos
    path = reader.path
    p = bad + 1
    while p + fmt.MIN_TXN_SIZE <= end:
        buf = reader.file.read(p, min(SEARCH_CHUNK + fmt.TXN_HEADER_SIZE, end - p))
        limit = len(buf) - fmt.TXN_HEADER_SIZE + 1  # candidates whose fixed header is in buf
        if limit <= 0:
            break
        for m in _STATUS_RE.finditer(buf, fmt.STATUS_OFFSET, limit + fmt.STATUS_OFFSET):
            off = m.start() - fmt.STATUS_OFFSET
            fixed = fmt.decode_txn_header_fixed(buf, off, path, p + off)
            tid, tlen, _status, ulen, dlen, elen, nrec, _ = fixed
            if after_tid is not None and tid <= after_tid:
                continue
            if p + off + tlen + fmt.TRAILER_SIZE > end:
                continue
            if tlen < fmt.TXN_HEADER_SIZE + ulen + dlen + elen + fmt.oid_table_size(nrec):
                continue
            if valid_txn_at(reader, p + off, end, after_tid):
                return p + off
        p += min(limit, SEARCH_CHUNK)
    return None


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
