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

import re
import struct
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from . import fileformat as fmt
from .errors import CorruptedDataError, CorruptedError, CorruptedTransactionError
from .fileio import DataFile

# One read fetches this much; most records and transaction headers fit.
READ_AHEAD = 4096
SCAN_CHUNK = 8 << 20
# The open-time scan merges oid-table entries into the index this many at a time; a
# batch is held as the tables' raw bytes (16 bytes an entry), not as Python objects.
INDEX_BATCH = 1 << 20
# A record or transaction header longer than this is checksummed in reads of
# CHECK_CHUNK bytes before it is read whole: a damaged length field (not yet
# covered by a checksum when it is read) never makes a reader allocate more
# than this much at once.  Every read of a record also stays inside the
# transaction that holds it, whose header is checksummed.
BIG_READ = 16 << 20
CHECK_CHUNK = 1 << 20
# A transaction whose records take more bytes than this is read twice by the tools that
# walk a file (checked, then read record by record), never held whole in memory.
LARGE_TXN = 32 << 20
_TABLE_ENTRY = struct.Struct(">8sQ")  # an oid table entry (fileformat's layout)
LIMITS_CACHED = 4096  # transaction bounds remembered by records_limit


class LogReader:
    """Positioned reads of records from one data file."""

    def __init__(self, file: DataFile):
        self.file = file
        self.path = file.path
        # tpos -> (data_pos, records_end) of transactions records_limit checked
        # (a committed transaction never changes: loads of long records read
        # the header of a transaction once)
        self._limits: dict[int, tuple[int, int]] = {}

    # -- single records --------------------------------------------------------------

    def read_data_record(self, pos: int, oid: bytes | None = None, limit: int | None = None,
                         ) -> fmt.DataRecord:
        """The checked data record at `pos` (optionally asserting its oid).

        A record longer than one read-ahead must end by `limit` (default: the
        end of the records of the transaction its header names, which must
        hold it); see `_read_long_record`."""
        buf = self.file.read(pos, READ_AHEAD)
        header = fmt.peek_data_header(buf, 0, self.path, pos)
        if header.length > len(buf):
            buf = self._read_long_record(pos, header, limit)
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
            buf = self._read_long_record(pos, fmt.peek_data_header(buf, 0, self.path, pos))
            got = fmt.decode_data_payload(buf, self.path, pos)
            if type(got) is int:
                raise CorruptedDataError(self.path, f"data record cut short ({len(buf)} of {got} bytes)", pos)
        roid, tid, data, back = got
        if roid != oid:
            raise CorruptedDataError(
                self.path, f"record for oid {roid.hex()} found where oid {oid.hex()} was expected", pos)
        return tid, data, back

    def records_limit(self, pos: int, tpos: int) -> int:
        """Where the records of the transaction at `tpos` end, checking that it holds `pos`.

        `tpos` comes from the (not yet checksummed) header of the record at
        `pos`; the transaction header it names is checksummed, so a damaged
        tpos fails here and a damaged length cannot reach past the records of
        the transaction that holds the record."""
        bounds = self._limits.get(tpos)
        if bounds is None:
            if not fmt.HEADER_SIZE <= tpos < pos:
                raise CorruptedDataError(
                    self.path, f"data record names transaction position {tpos}, not before it", pos)
            try:
                th = self.read_txn_header(tpos)
            except CorruptedError as exc:
                raise CorruptedDataError(
                    self.path, f"data record names transaction position {tpos}, where no valid "
                    f"transaction header is ({exc})", pos) from None
            bounds = (th.data_pos, th.records_end)
            if len(self._limits) >= LIMITS_CACHED:
                self._limits.clear()
            self._limits[tpos] = bounds
        if not bounds[0] <= pos < bounds[1]:
            raise CorruptedDataError(
                self.path, f"data record lies outside the transaction at {tpos} it names", pos)
        return bounds[1]

    def _read_long_record(self, pos: int, header: tuple, limit: int | None = None) -> bytes:
        """The bytes of the record at `pos` longer than one read-ahead, read with bounds.

        Its length must end by `limit` (default: `records_limit`); a record
        longer than BIG_READ is checksummed in chunks before it is read whole,
        so memory stays bounded whatever its length field says."""
        length = header[7]
        if limit is None:
            limit = self.records_limit(pos, header[3])
        if pos + length > limit:
            raise CorruptedDataError(
                self.path, f"data record length {length} runs past its transaction "
                f"(its records end at {limit})", pos)
        if length > BIG_READ:
            fmt.check_data_record_chunks(self.file.read_chunks(pos, pos + length, CHECK_CHUNK),
                                         header, self.path, pos)
        return self.file.read(pos, length)

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
            buf = self._read_long_txn_header(pos, buf, need, file_size)
        return fmt.decode_txn_header(buf, 0, self.path, pos, file_size)

    def _read_long_txn_header(self, pos: int, buf: bytes, need: int, file_size: int | None) -> bytes:
        """A transaction header with long metadata: its lengths checked before it is read.

        The metadata lengths (not yet checksummed) must fit in the
        transaction's length and the file; beyond BIG_READ the header is
        checksummed in chunks before it is read whole."""
        if len(buf) < fmt.TXN_HEADER_SIZE:
            return buf  # decoding raises: cut short
        _, tlen, _, _, _, _, nrec, _ = fmt.decode_txn_header_fixed(buf, 0, self.path, pos)
        end = self.file.size if file_size is None else file_size
        if need + fmt.oid_table_size(nrec) > tlen or pos + need > end:
            raise CorruptedTransactionError(
                self.path, f"transaction header metadata ({need - fmt.TXN_HEADER_SIZE} bytes) does not "
                f"fit in its transaction ({tlen} bytes) or the file", pos)
        if need > BIG_READ:
            fmt.check_txn_header_chunks(
                buf[:fmt.TXN_HEADER_SIZE],
                self.file.read_chunks(pos + fmt.TXN_HEADER_SIZE, pos + need, CHECK_CHUNK), self.path, pos)
        return self.file.read(pos, need)

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
                yield self.read_data_record(pos, limit=end)
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
                buf = b""  # a long record: read alone, bounded by its transaction
                yield self.read_data_record(pos)
                continue
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
    last_tid: bytes | None  # tid of that transaction (None if none was scanned or passed in)
    ntxn: int
    bad_pos: int | None  # where the first bad transaction starts, if any
    error: CorruptedError | None  # what was wrong there
    torn_tail: bool  # True: the bad part is only an unfinished last transaction


def scan(reader: LogReader, start: int, file_size: int, index=None, verify: bool = False,
         last_tid: bytes | None = None) -> ScanResult:
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
    (voted, never finished) counts as bad, and so does one whose tid is not
    after the one before it (`last_tid`: that of the transaction ending at
    `start`, if any).  The damage is a torn tail when no valid transaction
    starts after it (`next_valid_txn`, the rule the tools share).
    """
    path = reader.path
    ntxn = 0
    pos = start
    buf = b""
    bufpos = start
    # entries are merged into the index in large batches, in log order: the
    # index builds each block once per merge, which is slow per transaction
    # when a transaction's oids are scattered over many blocks
    # The batch holds the oid tables' raw entries (16 bytes each: oid, position).
    batch = bytearray()
    merge = getattr(index, "update_table", None) or (
        lambda raw: index.update(dict(_TABLE_ENTRY.iter_unpack(raw))))
    # the last good transaction, its entries held back from `batch` until the
    # next one is good too (see above); checked: its records were verified
    held = b""
    held_pos, held_checked, tid_before_held = None, True, last_tid
    while pos < file_size:
        try:
            off = pos - bufpos
            need = fmt.txn_header_needs(buf, off) if off < len(buf) else fmt.TXN_HEADER_SIZE
            if off + need > len(buf):
                buf = reader.file.read(pos, READ_AHEAD)
                bufpos, off = pos, 0
                need = fmt.txn_header_needs(buf, 0)
                if need > len(buf):
                    # long metadata: its lengths (not yet checksummed) must fit in
                    # the transaction and the file before it is read
                    buf = reader._read_long_txn_header(pos, buf, need, file_size)
                if need > len(buf):
                    raise CorruptedTransactionError(path, "transaction header cut short", pos)
            th = fmt.decode_txn_header(buf, off, path, pos, file_size)
            if th.status == fmt.STATUS_CHECKPOINT:
                raise CorruptedTransactionError(path, "transaction was voted but never finished", pos)
            if last_tid is not None and th.tid <= last_tid:
                raise CorruptedTransactionError(path, "transaction id does not increase", pos)
            tend = th.next_pos
            checked = verify or tend >= file_size
            if checked and tend - pos > SCAN_CHUNK:
                # a long transaction: its records are checked in bounded reads
                tstart = th.records_end
                raw = reader.file.read(tstart, tend - tstart)
                table = list(fmt.decode_oid_table(raw, 0, th.nrec, path, tstart))
                fmt.check_trailer(raw, th.end - tstart, th, path)
                for _ in _checked_records(reader, th, table, keep=False):
                    pass
                raw_table = raw[:fmt.TABLE_ENTRY_SIZE * th.nrec]
            elif checked:
                # decode every record; the last transaction is always checked
                # fully, as the only one a crash can leave half written
                if tend - bufpos > len(buf):
                    buf = reader.file.read(pos, SCAN_CHUNK)
                    bufpos = pos
                toff = th.records_end - bufpos
                table = list(fmt.decode_oid_table(buf, toff, th.nrec, path, th.records_end))
                fmt.check_trailer(buf, th.end - bufpos, th, path)
                _check_records(buf, bufpos, th, table, path)
                raw_table = buf[toff:toff + fmt.TABLE_ENTRY_SIZE * th.nrec]
            else:
                # only the oid table and the trailer are read
                tstart = th.records_end
                if tend - bufpos > len(buf):
                    buf = reader.file.read(tstart, tend - tstart)
                    bufpos = tstart
                toff = tstart - bufpos
                fmt.decode_oid_table(buf, toff, th.nrec, path, tstart)
                fmt.check_trailer(buf, th.end - bufpos, th, path)
                raw_table = buf[toff:toff + fmt.TABLE_ENTRY_SIZE * th.nrec]
            if index is not None:
                batch += held
                held = raw_table
                if len(batch) >= INDEX_BATCH * fmt.TABLE_ENTRY_SIZE:
                    merge(batch)
                    batch = bytearray()
        except CorruptedError as exc:
            error = exc
            if held_pos is not None and not held_checked:
                try:
                    check_txn(reader, held_pos, file_size)
                except CorruptedError as earlier:  # the damage starts there
                    pos, error, held = held_pos, earlier, b""
                    last_tid = tid_before_held
                    ntxn -= 1
            batch += held
            if index is not None and batch:
                merge(batch)
            torn = next_valid_txn(reader, pos, file_size, last_tid) is None
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


def _checked_records(reader: LogReader, th: fmt.TxnHeader, table, delta: int = 0,
                     keep: bool = True) -> Iterator[fmt.DataRecord | None]:
    """The records of `th`, matched to its oid `table` as `_check_records` does, read in bounded chunks.

    Positions are those the transaction was written at; the bytes are read
    ``delta`` further on (see `read_moved_txn`).  No read goes past the
    transaction's records or takes more than SCAN_CHUNK (a longer record is
    checksummed in chunks first, see `LogReader.read_data_record`).  Without
    `keep`, a record longer than SCAN_CHUNK is checked but not read whole,
    and None is yielded for it."""
    path = reader.path
    end = th.records_end
    pos = th.data_pos
    buf, bufpos = b"", pos
    n = 0
    for oid, where in table:
        if pos >= end or pos != where:
            raise CorruptedTransactionError(path, "oid table does not match the records", end)
        off = pos - bufpos
        if off + fmt.DATA_HEADER_SIZE > len(buf):
            buf, bufpos, off = reader.file.read(pos + delta, min(SCAN_CHUNK, end - pos)), pos, 0
        header = fmt.peek_data_header(buf, off, path, pos)
        length = header[7]
        if pos + length > end:
            raise CorruptedDataError(path, "data record runs past its transaction", pos)
        if off + length > len(buf) and length <= SCAN_CHUNK:
            buf, bufpos, off = reader.file.read(pos + delta, min(SCAN_CHUNK, end - pos)), pos, 0
        if off + length <= len(buf):
            rec = fmt.decode_data_record(buf, off, path, pos, header)
        elif keep:
            rec = reader.read_data_record(pos + delta, limit=end + delta)._replace(pos=pos)
        else:
            fmt.check_data_record_chunks(
                reader.file.read_chunks(pos + delta, pos + delta + length, CHECK_CHUNK), header, path, pos)
            rec = None
        if header[0] != oid or header[1] != th.tid or header[3] != th.pos:
            raise CorruptedDataError(path, "data record does not belong to its transaction", pos)
        yield rec
        pos += length
        n += 1
    if pos != end:
        raise CorruptedTransactionError(path, f"transaction holds more data than its {n} records", pos)


def _read_txn(reader: LogReader, pos: int, file_size: int):
    """(header of the transaction at pos, its checked oid table entries); records not read."""
    th = reader.read_txn_header(pos, file_size)
    raw = reader.file.read(th.records_end, th.next_pos - th.records_end)
    table = fmt.decode_oid_table(raw, 0, th.nrec, reader.path, th.records_end)  # 16 bytes an entry
    fmt.check_trailer(raw, th.end - th.records_end, th, reader.path)
    return th, table


def read_checked_txn(reader: LogReader, pos: int, file_size: int,
                     ) -> tuple[fmt.TxnHeader, list[fmt.DataRecord]]:
    """The transaction at `pos` and its records, everything checked as `scan(verify=True)` does.

    Header checksum and status, the length against `file_size`, the oid table
    (checksum, and matching the records), the trailer, and every record
    (checksum, tid and tpos).  Records are read in bounded chunks, never past
    the transaction.  Status and tid order are the caller's to judge."""
    th, table = _read_txn(reader, pos, file_size)
    return th, list(_checked_records(reader, th, table))


class CheckedRecords:
    """The records of a transaction already checked whole by `check_txn`, read again on each
    iteration (SCAN_CHUNK at a time, each record checked again): what `read_checked_txn` gives
    for a transaction too large to be held in memory (see LARGE_TXN)."""

    def __init__(self, reader: LogReader, pos: int, file_size: int, th: fmt.TxnHeader):
        self.reader, self.pos, self.file_size, self.header = reader, pos, file_size, th

    def __len__(self) -> int:
        return self.header.nrec

    def __iter__(self) -> Iterator[fmt.DataRecord]:
        th, table = _read_txn(self.reader, self.pos, self.file_size)
        return _checked_records(self.reader, th, table)


def read_checked_txn_bounded(reader: LogReader, pos: int, file_size: int,
                             ) -> tuple[fmt.TxnHeader, list[fmt.DataRecord] | CheckedRecords]:
    """`read_checked_txn`, except that the records of a transaction larger than LARGE_TXN are
    checked first (`check_txn`) and then given as a `CheckedRecords` that reads them again
    when iterated: memory does not grow with the transaction."""
    th = reader.read_txn_header(pos, file_size)
    if th.records_end - th.data_pos <= LARGE_TXN:
        return read_checked_txn(reader, pos, file_size)
    th = check_txn(reader, pos, file_size)
    return th, CheckedRecords(reader, pos, file_size, th)


def check_txn(reader: LogReader, pos: int, file_size: int) -> fmt.TxnHeader:
    """Check the transaction at `pos` as `read_checked_txn` does, keeping no record in memory."""
    th, table = _read_txn(reader, pos, file_size)
    for _ in _checked_records(reader, th, table, keep=False):
        pass
    return th


def read_moved_txn(reader: LogReader, pos: int, file_size: int,
                   ) -> tuple[fmt.TxnHeader, list[fmt.DataRecord], int]:
    """Like `read_checked_txn`, for a transaction written `delta` bytes before where it is now.

    After bytes were lost from (or inserted into) the middle of a file, the
    transactions after the gap are intact but sit at other positions than
    the ones their oid table and records' tpos name.  This accepts one whose
    table and records are consistent with a single origin ``pos - delta``.
    Returns (th, records, delta): th and each record's `pos` are where they
    are now; tpos, prev and backpointers still hold the old positions."""
    th, table = _read_txn(reader, pos, file_size)
    table = list(table)
    delta = th.data_pos - table[0][1] if table else 0
    recs = _checked_records(reader, th._replace(pos=pos - delta), table, delta)
    return th, [rec._replace(pos=rec.pos + delta) for rec in recs], delta


def valid_txn_at(reader: LogReader, pos: int, end: int, after_tid: bytes | None = None) -> bool:
    """Does a transaction that counts as valid after damage start at `pos`?

    The one rule (used by open's scan, verify, recover, dump and info): its
    header passes its checksum with a known status (a voted-but-unfinished
    'c' counts: only a commit that was finished can have been followed by
    one), it fits before `end`, its tid is after `after_tid`, and its oid
    table passes its checksum and is followed by a trailer repeating its
    length.  Its records are not read."""
    try:
        th = reader.read_txn_header(pos, end)
        if after_tid is not None and th.tid <= after_tid:
            return False
        size = fmt.oid_table_size(th.nrec)
        raw = reader.file.read(th.records_end, size + fmt.TRAILER_SIZE)
        fmt.decode_oid_table(raw, 0, th.nrec, reader.path, th.records_end)
        fmt.check_trailer(raw, size, th, reader.path)
    except CorruptedError:
        return False
    return True


SEARCH_CHUNK = 1 << 20
_CANDIDATES: dict[int, re.Pattern] = {}


def header_candidates(end: int) -> re.Pattern:
    """Status bytes of transaction headers that may fit before `end`: matches are at STATUS_OFFSET.

    The status byte is a known one and the tlen before it, less than `end`,
    has as many leading zero bytes as `end` has: a necessary condition only,
    checked in C (the status byte first, so that the byte-by-byte search costs
    little on data that cannot match)."""
    zeros = 8 - max(1, (end.bit_length() + 7) // 8)
    pat = _CANDIDATES.get(zeros)
    if pat is None:
        status = re.escape(b"".join(fmt.STATUSES))
        pat = re.compile(b"[%s](?<=\\x00{%d}[\\x00-\\xff]{%d})" % (status, zeros, 9 - zeros))
        _CANDIDATES[zeros] = pat
    return pat


def next_valid_txn(reader: LogReader, bad: int, end: int, after_tid: bytes | None = None) -> int | None:
    """The first position after `bad` where a valid transaction (`valid_txn_at`) starts, or None.

    The one implementation of "where does the log resume after damage": open
    calls the damage a torn tail exactly when this finds nothing, and verify,
    recover, dump and info resume their walks where it says.  If the
    transaction at `bad` has an intact header, the position after it is tried
    first; otherwise (or if nothing valid starts there) every byte position
    after `bad` is a candidate, in order."""
    try:
        th = reader.read_txn_header(bad, end)
    except CorruptedError:
        th = None
    if th is not None and th.next_pos < end and valid_txn_at(reader, th.next_pos, end, after_tid):
        return th.next_pos
    pattern = header_candidates(end)
    p = bad + 1
    while p + fmt.MIN_TXN_SIZE <= end:
        buf = reader.file.read(p, min(SEARCH_CHUNK + fmt.TXN_HEADER_SIZE, end - p))
        limit = len(buf) - fmt.TXN_HEADER_SIZE + 1  # candidates whose fixed header is in buf
        if limit <= 0:
            break
        for m in pattern.finditer(buf, fmt.STATUS_OFFSET):
            off = m.start() - fmt.STATUS_OFFSET
            if off >= limit:
                break
            tid, tlen, _status, ulen, dlen, elen, nrec, _ = fmt.decode_txn_header_fixed(
                buf, off, reader.path, p + off)
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
