"""Reading the log: records at positions, transactions in order, and recovery.

This layer sits on the I/O layer (`fileio.DataFile`) and the format module;
it never decodes bytes itself.  It knows how to

- read one data record or transaction header at a file position (one
  positioned read for the common small record, checksums always checked);
- walk transactions forwards and backwards;
- scan a file region at open time, building the oid -> position map, and
  classify what it finds at the first bad transaction: a torn tail (the last,
  unfinished or cut-short transaction, which recovery moves to a side file)
  versus damage followed by valid transactions (corruption: never truncated).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from . import fileformat as fmt
from .errors import CorruptedDataError, CorruptedError, CorruptedTransactionError
from .fileio import DataFile

# One read fetches this much; most records and transaction headers fit.
READ_AHEAD = 4096
SCAN_CHUNK = 8 << 20
INDEX_BATCH = 1 << 20


class LogReader:
    """Positioned reads of records from one data file."""

    def __init__(self, file: DataFile):
        self.file = file
        self.path = file.path

    # -- single records --------------------------------------------------------------

    def read_data_record(self, pos: int, oid: bytes | None = None) -> fmt.DataRecord:
        """The checked data record at `pos` (optionally asserting its oid)."""
        buf = self.file.read(pos, READ_AHEAD)
        header = fmt.peek_data_header(buf, 0, self.path, pos)
        if header.length > len(buf):
            buf = self.file.read(pos, header.length)
        rec = fmt.decode_data_record(buf, 0, self.path, pos, header)
        if oid is not None and rec.oid != oid:
            raise CorruptedDataError(
                self.path, f"record for oid {rec.oid.hex()} found where oid {oid.hex()} was expected", pos)
        return rec

    def read_data(self, pos: int, oid: bytes) -> tuple[bytes, bytes | None, int]:
        """(tid, data or None, backpointer) of oid's checked record at `pos` (the load path)."""
        buf = self.file.read(pos, READ_AHEAD)
        got = fmt.decode_data_payload(buf, self.path, pos)
        if type(got) is int:
            buf = self.file.read(pos, got)
            got = fmt.decode_data_payload(buf, self.path, pos)
            if type(got) is int:
                raise CorruptedDataError(self.path, f"data record cut short ({len(buf)} of {got} bytes)", pos)
        roid, tid, data, back = got
        if roid != oid:
            raise CorruptedDataError(
                self.path, f"record for oid {roid.hex()} found where oid {oid.hex()} was expected", pos)
        return tid, data, back

    def resolve(self, rec: fmt.DataRecord) -> fmt.DataRecord | None:
        """Follow backpointers to the record holding the data; None if deleted."""
        seen = 0
        while rec.is_backpointer:
            if not rec.back:
                return None
            if rec.back >= rec.pos or seen > 1000:
                raise CorruptedDataError(self.path, f"backpointer {rec.back} does not point back", rec.pos)
            rec = self.read_data_record(rec.back, rec.oid)
            seen += 1
        return rec

    def read_txn_header(self, pos: int, file_size: int | None = None) -> fmt.TxnHeader:
        buf = self.file.read(pos, READ_AHEAD)
        need = fmt.txn_header_needs(buf, 0)
        if need > len(buf):
            buf = self.file.read(pos, need)
        return fmt.decode_txn_header(buf, 0, self.path, pos, file_size)

    def txn_ending_at(self, end: int, file_size: int | None = None) -> fmt.TxnHeader:
        """The transaction whose trailer ends at `end` (the next one would start there)."""
        if end - fmt.TRAILER_SIZE < fmt.HEADER_SIZE + fmt.TXN_HEADER_SIZE:
            raise CorruptedTransactionError(self.path, "no transaction ends here", end)
        raw = self.file.read(end - fmt.TRAILER_SIZE, fmt.TRAILER_SIZE)
        if len(raw) < fmt.TRAILER_SIZE:
            raise CorruptedTransactionError(self.path, "transaction trailer cut short", end - 8)
        tlen = fmt.decode_trailer(raw)
        pos = end - fmt.TRAILER_SIZE - tlen
        if pos < fmt.HEADER_SIZE:
            raise CorruptedTransactionError(self.path, f"trailer length {tlen} points before the data",
                                            end - fmt.TRAILER_SIZE)
        th = self.read_txn_header(pos, file_size)
        if th.tlen != tlen:
            raise CorruptedTransactionError(
                self.path, f"trailer length {tlen} does not match header length {th.tlen}", end - 8)
        return th

    def txn_records(self, th: fmt.TxnHeader) -> Iterator[fmt.DataRecord]:
        """The checked data records of one transaction, in file order."""
        pos = th.data_pos
        end = th.records_end
        while pos < end:
            chunk_end = min(end, pos + SCAN_CHUNK)
            buf = self.file.read(pos, chunk_end - pos)
            off = 0
            while pos + off < end:
                if len(buf) - off < fmt.DATA_HEADER_SIZE:
                    break
                header = fmt.peek_data_header(buf, off, self.path, pos + off)
                length = header.length
                if pos + off + length > end:
                    raise CorruptedDataError(self.path, "data record runs past its transaction", pos + off)
                if off + length > len(buf):
                    break
                yield fmt.decode_data_record(buf, off, self.path, pos + off, header)
                off += length
            if off == 0:  # a single record larger than the chunk
                length = fmt.peek_data_header(self.file.read(pos, fmt.DATA_HEADER_SIZE),
                                              0, self.path, pos).length
                if pos + length > end:
                    raise CorruptedDataError(self.path, "data record runs past its transaction", pos)
                yield self.read_data_record(pos)
                off = length
            pos += off

    def read_data_records(self, positions: Sequence[int]) -> Iterator[fmt.DataRecord]:
        """The checked data records at `positions` (ascending), read in large chunks.

        For reading many records spread over the file (every current record,
        say) without one read per record; a chunk covers the positions within
        SCAN_CHUNK of its start, so sparse positions cost small reads."""
        buf = b""
        bufpos = 0
        n = len(positions)
        for i, pos in enumerate(positions):
            off = pos - bufpos
            if off < 0 or off + fmt.DATA_HEADER_SIZE > len(buf):
                last = positions[min(n, bisect_right(positions, pos + SCAN_CHUNK - READ_AHEAD, i)) - 1]
                buf, bufpos, off = self.file.read(pos, last - pos + READ_AHEAD), pos, 0
            header = fmt.peek_data_header(buf, off, self.path, pos)
            if off + header.length > len(buf):
                buf, bufpos, off = self.file.read(pos, max(header.length, READ_AHEAD)), pos, 0
            yield fmt.decode_data_record(buf, off, self.path, pos, header)

    # -- walking transactions ----------------------------------------------------------

    def iter_txns(self, start: int, end: int) -> Iterator[fmt.TxnHeader]:
        """Transaction headers from `start` up to (not including) `end`."""
        pos = start
        while pos < end:
            th = self.read_txn_header(pos, end)
            yield th
            pos = th.next_pos

    def iter_txns_backward(self, end: int, start: int = fmt.HEADER_SIZE) -> Iterator[fmt.TxnHeader]:
        """Transaction headers, newest first, of those ending at or before `end`."""
        while end > start:
            th = self.txn_ending_at(end)
            yield th
            end = th.pos


class ScanResult(NamedTuple):
    end: int  # position after the last good transaction
    last_tid: bytes | None  # tid of that transaction (None if none was scanned)
    ntxn: int
    bad_pos: int | None  # where the first bad transaction starts, if any
    error: CorruptedError | None  # what was wrong there
    torn_tail: bool  # True: the bad part is only an unfinished last transaction


def scan(reader: LogReader, start: int, file_size: int, index=None, verify: bool = False) -> ScanResult:
    """Walk the transactions in [start, file_size) and classify the first damage.

    Every transaction header, oid table and trailer is checked.  The records
    themselves are decoded and checksummed (and matched against the oid
    table) for the last transaction -- the only one a crash can leave half
    written -- and, with `verify`, for every transaction.  When damage is
    found, the good transaction just before it is checked that fully too: it
    may be the last commit, its fsync cut short by a power loss, and the bytes
    after it the remains of an aborted transaction that stood there earlier
    (a disk writes back sectors in any order).  Each good
    transaction's oid -> position map goes into `index` (anything with
    update(), e.g. an OidIndex), in log order.  A transaction with status 'c'
    (voted, never finished) counts as bad.
    """
    path = reader.path
    last_tid = None
    ntxn = 0
    pos = start
    buf = b""
    bufpos = start
    # entries are merged into the index in large batches, in log order: the
    # index builds each block once per merge, which is slow per transaction
    # when a transaction's oids are scattered over many blocks
    batch: list[tuple[bytes, int]] = []
    merge = getattr(index, "update_log_order", None) or (lambda entries: index.update(dict(entries)))
    # the last good transaction, its entries held back from `batch` until the
    # next one is good too (see above); checked: its records were verified
    held: list[tuple[bytes, int]] = []
    held_pos, held_checked, tid_before_held = None, True, None
    while pos < file_size:
        try:
            off = pos - bufpos
            need = fmt.txn_header_needs(buf, off) if off < len(buf) else fmt.TXN_HEADER_SIZE
            if off + need > len(buf):
                buf = reader.file.read(pos, max(READ_AHEAD, need))
                bufpos, off = pos, 0
                need = fmt.txn_header_needs(buf, 0)
                if need > len(buf):
                    raise CorruptedTransactionError(path, "transaction header cut short", pos)
            th = fmt.decode_txn_header(buf, off, path, pos, file_size)
            if th.status == fmt.STATUS_CHECKPOINT:
                raise CorruptedTransactionError(path, "transaction was voted but never finished", pos)
            if last_tid is not None and th.tid <= last_tid:
                raise CorruptedTransactionError(path, "transaction id does not increase", pos)
            tend = th.next_pos
            checked = verify or tend >= file_size
            if checked:
                # decode every record; the last transaction is always checked
                # fully, as the only one a crash can leave half written
                if tend - bufpos > len(buf):
                    buf = reader.file.read(pos, max(SCAN_CHUNK, tend - pos))
                    bufpos = pos
                table = list(fmt.decode_oid_table(buf, th.records_end - bufpos, th.nrec, path,
                                                  th.records_end))
                fmt.check_trailer(buf, th.end - bufpos, th, path)
                _check_records(buf, bufpos, th, table, path)
            else:
                # only the oid table and the trailer are read
                tstart = th.records_end
                if tend - bufpos > len(buf):
                    buf = reader.file.read(tstart, tend - tstart)
                    bufpos = tstart
                table = fmt.decode_oid_table(buf, tstart - bufpos, th.nrec, path, tstart)
                fmt.check_trailer(buf, th.end - bufpos, th, path)
            if index is not None:
                batch += held
                held = list(table)
                if len(batch) >= INDEX_BATCH:
                    merge(batch)
                    batch = []
        except CorruptedError as exc:
            error = exc
            if held_pos is not None and not held_checked:
                try:
                    read_checked_txn(reader, held_pos, file_size)
                except CorruptedError as earlier:  # the damage starts there
                    pos, error, held = held_pos, earlier, []
                    last_tid = tid_before_held
                    ntxn -= 1
            batch += held
            if index is not None and batch:
                merge(batch)
            torn = _is_torn_tail(reader, pos, file_size)
            return ScanResult(pos, last_tid, ntxn, pos, error, torn)
        tid_before_held, last_tid = last_tid, th.tid
        held_pos, held_checked = pos, checked
        ntxn += 1
        pos = tend
    batch += held
    if index is not None and batch:
        merge(batch)
    return ScanResult(pos, last_tid, ntxn, None, None, False)


def _check_records(buf, bufpos: int, th: fmt.TxnHeader, table, path: str) -> list[fmt.DataRecord]:
    """Decode every record of a transaction held in buf; match them to its table."""
    rpos = th.data_pos - bufpos
    rend = th.records_end - bufpos
    n = 0
    recs = []
    for oid, where in table:
        if rpos >= rend or bufpos + rpos != where:
            raise CorruptedTransactionError(path, "oid table does not match the records", th.records_end)
        rec = fmt.decode_data_record(buf, rpos, path, bufpos + rpos)
        if rec.oid != oid or rec.tid != th.tid or rec.tpos != th.pos:
            raise CorruptedDataError(path, "data record does not belong to its transaction", rec.pos)
        if bufpos + rpos + rec.length > th.records_end:
            raise CorruptedDataError(path, "data record runs past its transaction", rec.pos)
        rpos += rec.length
        n += 1
        recs.append(rec)
    if rpos != rend:
        raise CorruptedTransactionError(
            path, f"transaction holds more data than its {n} records", bufpos + rpos)
    return recs


def _read_txn(reader: LogReader, pos: int, file_size: int):
    """(buffer holding the whole transaction at pos, its header, its checked oid table entries)."""
    buf = reader.file.read(pos, READ_AHEAD)
    need = fmt.txn_header_needs(buf, 0)
    if need > len(buf):
        buf = reader.file.read(pos, need)
    th = fmt.decode_txn_header(buf, 0, reader.path, pos, file_size)
    if th.next_pos - pos > len(buf):
        buf = reader.file.read(pos, th.next_pos - pos)
    table = list(fmt.decode_oid_table(buf, th.records_end - pos, th.nrec, reader.path, th.records_end))
    fmt.check_trailer(buf, th.end - pos, th, reader.path)
    return buf, th, table


def read_checked_txn(reader: LogReader, pos: int, file_size: int,
                     ) -> tuple[fmt.TxnHeader, list[fmt.DataRecord]]:
    """The transaction at `pos` and its records, everything checked as `scan(verify=True)` does.

    Header checksum and status, the length against `file_size`, the oid table
    (checksum, and matching the records), the trailer, and every record
    (checksum, tid and tpos).  The whole transaction is read at once.  Status
    and tid order are the caller's to judge."""
    buf, th, table = _read_txn(reader, pos, file_size)
    return th, _check_records(buf, pos, th, table, reader.path)


def read_moved_txn(reader: LogReader, pos: int, file_size: int,
                   ) -> tuple[fmt.TxnHeader, list[fmt.DataRecord], int]:
    """Like `read_checked_txn`, for a transaction written `delta` bytes before where it is now.

    After bytes were lost from (or inserted into) the middle of a file, the
    transactions after the gap are intact but sit at other positions than
    the ones their oid table and records' tpos name.  This accepts one whose
    table and records are consistent with a single origin ``pos - delta``.
    Returns (th, records, delta): th and each record's `pos` are where they
    are now; tpos, prev and backpointers still hold the old positions."""
    buf, th, table = _read_txn(reader, pos, file_size)
    delta = th.data_pos - table[0][1] if table else 0
    recs = _check_records(buf, pos - delta, th._replace(pos=pos - delta), table, reader.path)
    return th, [rec._replace(pos=rec.pos + delta) for rec in recs], delta


def _is_torn_tail(reader: LogReader, bad: int, file_size: int) -> bool:
    """Is the bad transaction at `bad` the unfinished end of the file?

    It is not if a valid transaction can be found after it: either right after
    it (when its own header and length are intact), or by stepping back from
    the end of the file.
    """
    try:
        th = reader.read_txn_header(bad, file_size)
    except CorruptedError:
        th = None
    if th is not None and th.next_pos < file_size and _valid_txn_at(reader, th.next_pos, file_size):
        return False
    # Step back from the end of the file: a complete transaction there that
    # starts after the damage proves the damage is not a torn tail.
    try:
        last = reader.txn_ending_at(file_size, file_size)
    except CorruptedError:
        return True
    return not last.pos > bad


def _valid_txn_at(reader: LogReader, pos: int, file_size: int) -> bool:
    try:
        th = reader.read_txn_header(pos, file_size)
        raw = reader.file.read(th.records_end, fmt.oid_table_size(th.nrec) + fmt.TRAILER_SIZE)
        fmt.decode_oid_table(raw, 0, th.nrec, reader.path, th.records_end)
        fmt.check_trailer(raw, fmt.oid_table_size(th.nrec), th, reader.path)
    except CorruptedError:
        return False
    return True
