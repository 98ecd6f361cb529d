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

from collections.abc import Iterator
from typing import NamedTuple

from . import format as fmt
from .errors import CorruptedDataError, CorruptedError, CorruptedTransactionError
from .fileio import DataFile

# One read fetches this much; most records and transaction headers fit.
READ_AHEAD = 4096
SCAN_CHUNK = 8 << 20


class LogReader:
    """Positioned reads of records from one data file."""

    def __init__(self, file: DataFile):
        self.file = file
        self.path = file.path

    # -- single records --------------------------------------------------------------

    def read_data_record(self, pos: int, oid: bytes | None = None) -> fmt.DataRecord:
        """The checked data record at `pos` (optionally asserting its oid)."""
        buf = self.file.read(pos, READ_AHEAD)
        length = fmt.peek_data_header(buf, 0, self.path, pos)[7]
        if length > len(buf):
            buf = self.file.read(pos, length)
        rec = fmt.decode_data_record(buf, 0, self.path, pos)
        if oid is not None and rec.oid != oid:
            raise CorruptedDataError(
                self.path, f"record for oid {rec.oid.hex()} found where oid {oid.hex()} was expected", pos)
        return rec

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
                length = fmt.peek_data_header(buf, off, self.path, pos + off)[7]
                if pos + off + length > end:
                    raise CorruptedDataError(self.path, "data record runs past its transaction", pos + off)
                if off + length > len(buf):
                    break
                yield fmt.decode_data_record(buf, off, self.path, pos + off)
                off += length
            if off == 0:  # a single record larger than the chunk
                length = fmt.peek_data_header(self.file.read(pos, fmt.DATA_HEADER_SIZE),
                                              0, self.path, pos)[7]
                if pos + length > end:
                    raise CorruptedDataError(self.path, "data record runs past its transaction", pos)
                yield self.read_data_record(pos)
                off = length
            pos += off

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
    oids: dict  # oid -> position of its newest record in the scanned region
    ntxn: int
    bad_pos: int | None  # where the first bad transaction starts, if any
    error: CorruptedError | None  # what was wrong there
    torn_tail: bool  # True: the bad part is only an unfinished last transaction


def scan(reader: LogReader, start: int, file_size: int, verify: bool = False) -> ScanResult:
    """Walk the transactions in [start, file_size) and classify the first damage.

    Every transaction header, oid table and trailer is checked.  The records
    themselves are decoded and checksummed (and matched against the oid
    table) for the last transaction -- the only one a crash can leave half
    written -- and, with `verify`, for every transaction.  Returns the map of
    each oid to its newest record.  A transaction with status 'c' (voted,
    never finished) counts as bad.
    """
    path = reader.path
    oids: dict[bytes, int] = {}
    last_tid = None
    ntxn = 0
    pos = start
    buf = b""
    bufpos = start
    while pos < file_size:
        try:
            off = pos - bufpos
            need = fmt.txn_header_needs(buf, off) if off < len(buf) else fmt.TXN_HEADER_SIZE
            if off + need > len(buf):
                buf = reader.file.read(pos, max(SCAN_CHUNK, need))
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
            full = verify or tend >= file_size
            if full:
                # a whole transaction's records are read into memory at once
                if tend - bufpos > len(buf):
                    buf = reader.file.read(pos, max(SCAN_CHUNK, tend - pos))
                    bufpos = pos
            else:
                # only the table and trailer are needed
                tstart = th.records_end
                if tend - bufpos > len(buf) or tstart < bufpos:
                    buf = reader.file.read(tstart, max(SCAN_CHUNK, tend - tstart))
                    bufpos = tstart
            table = fmt.decode_oid_table(buf, th.records_end - bufpos, th.nrec, path, th.records_end)
            fmt.check_trailer(buf, th.end - bufpos, th, path)
            if full:
                _check_records(buf, bufpos, th, table, path)
            tpos = th.pos
            for oid, rel in table:
                oids[oid] = tpos + rel
        except CorruptedError as exc:
            torn = _is_torn_tail(reader, pos, file_size)
            return ScanResult(pos, last_tid, oids, ntxn, pos, exc, torn)
        last_tid = th.tid
        ntxn += 1
        pos = tend
    return ScanResult(pos, last_tid, oids, ntxn, None, None, False)


def _check_records(buf, bufpos: int, th: fmt.TxnHeader, table, path: str) -> None:
    """Decode every record of a transaction held in buf; match them to its table."""
    rpos = th.data_pos - bufpos
    rend = th.records_end - bufpos
    n = 0
    for oid, rel in table:
        if rpos >= rend or bufpos + rpos != th.pos + rel:
            raise CorruptedTransactionError(path, "oid table does not match the records", th.records_end)
        rec = fmt.decode_data_record(buf, rpos, path, bufpos + rpos)
        if rec.oid != oid or rec.tid != th.tid or rec.tpos != th.pos:
            raise CorruptedDataError(path, "data record does not belong to its transaction", rec.pos)
        if bufpos + rpos + rec.length > th.records_end:
            raise CorruptedDataError(path, "data record runs past its transaction", rec.pos)
        rpos += rec.length
        n += 1
    if rpos != rend:
        raise CorruptedTransactionError(
            path, f"transaction holds more data than its {n} records", bufpos + rpos)


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
