"""Walking a whole log, transaction by transaction, past any damage.

`walk` yields each transaction (checked, and with its records decoded and
checksummed when asked) and, for each damaged stretch, a `Damage` naming the
byte range that holds no usable transaction and what was wrong at its start.
After damage it resumes where `log.next_valid_txn` says the next valid
transaction starts: the rule open's scan uses to tell a torn tail (nothing
valid follows) from corruption.  verify, dump, info and recover are built on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .. import fileformat as fmt
from ..errors import CorruptedError, CorruptedTransactionError
from ..log import (
    READ_AHEAD,
    SEARCH_CHUNK,
    CheckedRecords,
    LogReader,
    header_candidates,
    next_valid_txn,
    read_checked_txn_bounded,
    read_moved_txn,
)
from .common import Progress


class Txn(NamedTuple):
    header: fmt.TxnHeader
    records: list[fmt.DataRecord] | CheckedRecords | None  # None when not decoded
    # Not 0: the transaction is intact but was written `delta` bytes before where it
    # is now (bytes were lost or inserted before it); its records' tpos, prev and
    # backpointers hold the old positions (their `pos` is where they are now).
    delta: int = 0


class Damage(NamedTuple):
    start: int  # first byte of the damaged stretch (where a transaction should start)
    end: int  # where the next valid transaction starts, or the end of the file
    error: CorruptedError  # what was wrong at `start`
    after_tid: bytes | None = None  # tid of the last good transaction before it
    delta: int = 0  # shift of the transactions before it (see Txn.delta)

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
    last_delta = 0
    while pos < end:
        try:
            th = reader.read_txn_header(pos, end)
            _check_status_and_order(reader, th, last_tid)
            delta = 0
            if decode is True or (decode is not False and decode(th)):
                try:
                    th, recs = read_checked_txn_bounded(reader, pos, end)
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
            yield Damage(pos, stop, exc, last_tid, last_delta)
            pos = stop
            if progress is not None:
                progress(pos)
            continue
        yield Txn(th, recs, delta)
        last_tid, last_delta = th.tid, delta
        pos = th.next_pos
        if progress is not None:
            progress(pos)


# -- salvage: the intact records of a damaged stretch ----------------------------------------

class Lost(NamedTuple):
    """A record that was in a damaged transaction and could not be read back."""

    pos: int  # where it is (or was meant to be) in the file
    oid: bytes | None  # None: unknown
    tid: bytes | None  # None: unknown
    oid_certain: bool  # the oid comes from a checked oid table (else from the damaged record itself)
    reason: str


class Piece(NamedTuple):
    """What could be read of one damaged transaction (see `salvage`)."""

    start: int  # where the transaction starts (or the part of the stretch this covers)
    end: int  # where it ends
    header: fmt.TxnHeader | None  # its header if that passed its checksum (status: the raw byte)
    tid: bytes | None  # the header's tid, else the one its intact records share
    records: list[fmt.DataRecord]  # the records that passed their checksums, in file order
    lost: list[Lost]  # the records known to be there that did not
    complete: bool  # every record it held is in `records` or `lost` (nothing unaccounted for)
    unfinished: bool  # its status is 'c': voted, never finished (never acknowledged)


def read_header_any_status(reader: LogReader, pos: int, end: int) -> fmt.TxnHeader | None:
    """The header at `pos` if it passes its checksum and fits before `end`, whatever its status byte.

    The checksum skips the status byte, so a flipped status leaves the rest
    of the header trustworthy.  The result's `status` is the raw byte."""
    path = reader.path
    try:
        buf = reader.file.read(pos, min(READ_AHEAD, end - pos))
        need = fmt.txn_header_needs(buf, 0)
        tlen = fmt.decode_txn_header_fixed(buf, 0, path, pos).tlen
        if need > min(end - pos, tlen):  # lengths that cannot be right: read no further
            return None
        if need > len(buf):
            buf = reader.file.read(pos, need)
        raw = bytes(buf[fmt.STATUS_OFFSET:fmt.STATUS_OFFSET + 1])
        if raw not in fmt.STATUSES:
            buf = bytearray(buf)
            buf[fmt.STATUS_OFFSET] = fmt.STATUS_COMMITTED[0]
        return fmt.decode_txn_header(buf, 0, path, pos)._replace(status=raw)
    except CorruptedError:
        return None


def record_within(reader: LogReader, pos: int, limit: int) -> fmt.DataRecord | None:
    """The record at `pos` if it passes its checks and ends at or before `limit`, else None."""
    if pos < fmt.HEADER_SIZE or pos + fmt.DATA_HEADER_SIZE + fmt.CRC_SIZE > limit:
        return None
    try:
        buf = reader.file.read(pos, min(READ_AHEAD, limit - pos))
        header = fmt.peek_data_header(buf, 0, reader.path, pos)
        length = header[7]
        if pos + length > limit:
            return None
        if length > len(buf):
            buf = reader.file.read(pos, length)
        return fmt.decode_data_record(buf, 0, reader.path, pos, header)
    except CorruptedError:
        return None


def _find_all(reader: LogReader, pattern: bytes, start: int, end: int) -> Iterator[int]:
    """Positions p in [start, end) where `pattern` occurs, in order, read in chunks."""
    n = len(pattern)
    p = start
    while p + n <= end:
        buf = reader.file.read(p, min(SEARCH_CHUNK + n - 1, end - p))
        i = buf.find(pattern)
        while i != -1:
            yield p + i
            i = buf.find(pattern, i + 1)
        if len(buf) < n:
            break
        p += len(buf) - n + 1


def _lost_at(reader: LogReader, pos: int, limit: int, tid: bytes | None, reason: str) -> Lost:
    """A record that failed at `pos`: its oid as far as its own (unchecked) header says."""
    try:
        raw = reader.file.read(pos, fmt.DATA_HEADER_SIZE) if pos + fmt.DATA_HEADER_SIZE <= limit else b""
    except CorruptedError:
        raw = b""
    oid = None
    claimed = fmt.unchecked_data_oid_tid(raw)
    if claimed is not None and (tid is None or claimed[1] == tid):
        oid = claimed[0]
    return Lost(pos, oid, tid, False, reason)


def _sequential(reader: LogReader, first: int, limit: int, hard_limit: int, tid: bytes,
                ) -> tuple[list[fmt.DataRecord], list[Lost], int]:
    """Decode records of transaction `tid` one after the other from `first`.

    After a record that fails, the next one is found by its tid (at offset 8
    of its header).  Records are expected up to `limit` (where the oid table
    should start); when bytes were inserted or lost inside the transaction
    they go on past it, so they are followed up to `hard_limit`, but a failure
    there is the end of the records, not a loss.  Returns (records, lost,
    where the decoding stopped)."""
    recs: list[fmt.DataRecord] = []
    lost: list[Lost] = []
    pos = first
    while pos < hard_limit:
        rec = record_within(reader, pos, hard_limit)
        if rec is not None and rec.tid == tid:
            recs.append(rec)
            pos += rec.length
            continue
        if pos >= limit:
            break
        lost.append(_lost_at(reader, pos, limit, tid, "record fails its checks"))
        for q in _find_all(reader, tid, pos + 1 + 8, hard_limit):
            rec = record_within(reader, q - 8, hard_limit)
            if rec is not None and rec.tid == tid:
                pos = q - 8
                break
        else:
            break
    return recs, lost, pos


def _with_header(reader: LogReader, th: fmt.TxnHeader, end: int) -> Piece:
    """The records of a damaged transaction whose header is intact."""
    limit = min(th.records_end, end)
    entries = None
    if th.next_pos <= end:
        try:
            raw = reader.file.read(th.records_end, fmt.oid_table_size(th.nrec))
            entries = list(fmt.decode_oid_table(raw, 0, th.nrec, reader.path, th.records_end))
        except CorruptedError:
            entries = None
    if entries:
        shift = th.data_pos - entries[0][1]  # the transaction was written `shift` bytes before
        starts = [p + shift for _oid, p in entries] + [th.records_end]
        if any(a >= b for a, b in zip(starts, starts[1:], strict=False)):
            entries = None  # a table that passes its checksum yet does not fit: not trusted
    if entries:
        recs, lost = [], []
        for i, (oid, _p) in enumerate(entries):
            rec = record_within(reader, starts[i], starts[i + 1])
            if (rec is not None and rec.oid == oid and rec.tid == th.tid
                    and rec.pos + rec.length == starts[i + 1]):
                recs.append(rec)
            else:
                lost.append(Lost(starts[i], oid, th.tid, True, "record fails its checks"))
        return Piece(th.pos, th.next_pos, th, th.tid, recs, lost, True, False)
    if th.nrec == 0 and th.data_pos == th.records_end:
        return Piece(th.pos, min(th.next_pos, end), th, th.tid, [], [], True, False)
    recs, lost, stop = _sequential(reader, th.data_pos, limit, end, th.tid)
    complete = stop == limit and not lost and th.records_end <= end and len(recs) == th.nrec
    # cut short: what follows where its records stop may belong to other transactions
    piece_end = max(th.next_pos, stop) if th.next_pos <= end else max(stop, th.data_pos)
    return Piece(th.pos, piece_end, th, th.tid, recs, lost, complete, False)


def _without_header(reader: LogReader, start: int, end: int, delta: int,
                    after_tid: bytes | None) -> list[Piece]:
    """The records of a transaction at `start` whose header fails its checksum (stretch up to `end`).

    Its records name it by position (tpos, `start - delta`); if the trailer
    before `end` leads back to `start`, its oid table is tried with the record
    count its damaged header holds."""
    tpos = start - delta
    entries = None
    try:
        tlen = fmt.decode_trailer(reader.file.read(end - fmt.TRAILER_SIZE, fmt.TRAILER_SIZE))
        if start + tlen + fmt.TRAILER_SIZE == end:
            fixed = fmt.decode_txn_header_fixed(reader.file.read(start, fmt.TXN_HEADER_SIZE), 0,
                                                reader.path, start)
            nrec = fixed[6]
            tstart = start + tlen - fmt.oid_table_size(nrec)
            if fmt.HEADER_SIZE < tstart and nrec:
                raw = reader.file.read(tstart, fmt.oid_table_size(nrec))
                entries = list(fmt.decode_oid_table(raw, 0, nrec, reader.path, tstart))
                starts = [p + delta for _oid, p in entries] + [tstart]
                if any(a >= b for a, b in zip(starts, starts[1:], strict=False)) or starts[0] <= start:
                    entries = None
    except (CorruptedError, ValueError):
        entries = None
    if entries:
        recs, lost, tids = [], [], set()
        for i, (oid, _p) in enumerate(entries):
            rec = record_within(reader, starts[i], starts[i + 1])
            if (rec is not None and rec.oid == oid and rec.tpos == tpos
                    and rec.pos + rec.length == starts[i + 1]):
                recs.append(rec)
                tids.add(rec.tid)
            else:
                lost.append(Lost(starts[i], oid, None, True, "record fails its checks"))
        if len(tids) <= 1:
            tid = next(iter(tids), None)
            lost = [x._replace(tid=tid) for x in lost]
            return [Piece(start, end, None, tid, recs, lost, True, False)]
    return _found_records(reader, start, end, tpos, after_tid)


# Where a data record may start: its prev and tpos are positions (below 2**48, see
# format.MAX_POS: two leading zero bytes; the original positions, so possibly past the
# end of a file that lost bytes; tpos at least the file header's size) and its flags fit
# in 2 bits.  Matches are the flags (at offset 32).  A necessary condition, checked in C
# (the flags first, then what precedes them); `record_within` decides.
_FLAGS_OFFSET = 32
_RECORD_CANDIDATES = re.compile(b"\\x00[\\x00-\\x03](?<=\\x00\\x00[\\x00-\\xff]{6}"
                                b"\\x00\\x00(?!\\x00\\x00\\x00\\x00[\\x00-\\x03])[\\x00-\\xff]{8})")


def _found_records(reader: LogReader, start: int, end: int, tpos: int,
                   after_tid: bytes | None) -> list[Piece]:
    """Every record that passes its checks in [start, end), grouped by transaction (tpos, tid).

    Records follow one another, so after one is found the next is tried right
    after it; elsewhere every byte position is a candidate.  The group naming
    `tpos` (the transaction that should start at `start`) comes first."""
    groups: dict[tuple[int, bytes], list[fmt.DataRecord]] = {}
    pattern = _RECORD_CANDIDATES
    p = start
    while p + fmt.DATA_HEADER_SIZE + fmt.CRC_SIZE <= end:
        buf = reader.file.read(p, min(SEARCH_CHUNK + fmt.DATA_HEADER_SIZE, end - p))
        limit = len(buf) - fmt.DATA_HEADER_SIZE + 1
        if limit <= 0:
            break
        nxt = p + min(limit, SEARCH_CHUNK)
        for m in pattern.finditer(buf, _FLAGS_OFFSET):
            off = m.start() - _FLAGS_OFFSET
            if off >= limit:
                break
            q = p + off
            rec = record_within(reader, q, end)
            if rec is None or after_tid is not None and rec.tid <= after_tid:
                continue
            while rec is not None and (after_tid is None or rec.tid > after_tid):
                groups.setdefault((rec.tpos, rec.tid), []).append(rec)
                q = rec.pos + rec.length
                rec = record_within(reader, q, end)
            nxt = q
            break
        p = nxt
    pieces = [Piece(start, end, None, tid, recs, [], False, False)
              for (tp, tid), recs in sorted(groups.items(), key=lambda kv: (kv[0][0] != tpos, kv[1][0].pos))]
    return pieces or [Piece(start, end, None, None, [], [], False, False)]


def salvage(reader: LogReader, damage: Damage) -> list[Piece]:
    """The intact records in a damaged stretch, grouped by the transaction that holds them.

    Each transaction in the stretch is met in order: one whose header passes
    its checksum (a flipped status byte does not matter) gives its tid,
    metadata and extent, and its oid table (if intact) where each record is
    and which oid it holds, so exactly the records that fail are lost;
    without the table its records are decoded one after the other.  One whose
    header fails gives what its records say: they carry its tid and position.
    Nothing is decoded here but through `format`'s decoders."""
    pieces: list[Piece] = []
    pos, end = damage.start, damage.end
    while pos < end:
        th = read_header_any_status(reader, pos, end)
        if th is not None and (damage.after_tid is None or th.tid > damage.after_tid):
            if th.status == fmt.STATUS_CHECKPOINT:
                piece = Piece(th.pos, min(th.next_pos, end), th, th.tid, [], [], True, True)
            else:
                piece = _with_header(reader, th, end)
        else:
            nxt = _next_header(reader, pos + 1, end, damage.after_tid)
            pieces += _without_header(reader, pos, nxt, damage.delta, damage.after_tid)
            pos = nxt
            continue
        pieces.append(piece)
        if piece.end <= pos:
            break
        pos = piece.end
    return _merged(pieces)


def _merged(pieces: list[Piece]) -> list[Piece]:
    """One piece per tid, in tid order (pieces without a tid hold no records: kept as they are).

    Damage inside a transaction can split its records over several pieces
    (those before the damage, found from its header, and those after, found
    by their tid); they are one transaction again.  A record of an oid the
    transaction already holds is dropped (a transaction writes an oid once), and so is
    a loss, read from a record's own header, of an oid the transaction holds."""
    by_tid: dict[bytes, Piece] = {}
    rest: list[Piece] = []
    for piece in pieces:
        if piece.tid is None:
            rest.append(piece)
            continue
        first = by_tid.get(piece.tid)
        if first is None:
            by_tid[piece.tid] = piece
            continue
        seen = {r.oid for r in first.records}
        by_tid[piece.tid] = first._replace(
            end=max(first.end, piece.end), header=first.header or piece.header,
            records=first.records + [r for r in piece.records if r.oid not in seen],
            lost=first.lost + piece.lost, complete=first.complete and piece.complete,
            unfinished=first.unfinished or piece.unfinished)
    merged = []
    for tid in sorted(by_tid):
        piece = by_tid[tid]
        kept = {r.oid for r in piece.records}  # a record that failed in one place, found in another
        merged.append(piece._replace(lost=[x for x in piece.lost if x.oid_certain or x.oid not in kept]))
    return rest + merged


def _next_header(reader: LogReader, start: int, end: int, after_tid: bytes | None) -> int:
    """The first position in [start, end) where a header passing its checksum starts, else `end`."""
    pattern = header_candidates(end)
    p = start
    while p + fmt.TXN_HEADER_SIZE <= end:
        buf = reader.file.read(p, min(SEARCH_CHUNK + fmt.TXN_HEADER_SIZE, end - p))
        limit = len(buf) - fmt.TXN_HEADER_SIZE + 1
        if limit <= 0:
            break
        for m in pattern.finditer(buf, fmt.STATUS_OFFSET):
            off = m.start() - fmt.STATUS_OFFSET
            if off >= limit:
                break
            th = read_header_any_status(reader, p + off, end)
            if th is not None and (after_tid is None or th.tid > after_tid):
                return p + off
        p += min(limit, SEARCH_CHUNK)
    return end
