"""The refstorage file format, version 1: the only encoder and decoder of it.

docs/format.md is the specification; this module implements exactly that.
Summary (all integers big-endian, unsigned):

    file        := file_header transaction*
    file_header := 1024 bytes: magic, version, header size, flags, file id,
                   pack tid, zero padding, crc32 of the first 1020 bytes
    transaction := txn_header user description extension data_record* oid_table tlen
    txn_header  := tid(8) tlen(8) status(1) ulen(4) dlen(4) elen(4) nrec(4) hcrc(4)
    oid_table   := (oid(8) position(8)){nrec} tcrc(4)   position of each record in the file
    data_record := oid(8) tid(8) prev(8) tpos(8) flags(2) nrefs(4) dlen(4)
                   refs(8 * nrefs) payload crc(4)
    payload     := data (dlen bytes), or a backpointer (8 bytes) if flags & BACK

`tlen` counts a transaction's bytes from its tid up to, not including, the
trailing redundant copy of tlen, so `pos + tlen + 8` is the next transaction
and a reader can step backwards from any boundary.  The oid table lists each
record's oid and position, so rebuilding the index reads one table per
transaction instead of every record.  The transaction header's
crc covers every header byte but the status, so finishing a commit flips 'c'
to ' ' in place without touching a checksum.  A data record's crc covers the
whole record before it.

Decoders take a buffer, an offset in it, the file's path and the file position
of the buffer's start, and raise `CorruptedError` subclasses naming the path
and the exact offset; they never let struct.error or an assertion escape.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from .errors import (
    CorruptedDataError,
    CorruptedHeaderError,
    CorruptedTransactionError,
    EmptyFileError,
    ForeignFormatError,
    FutureVersionError,
    NotARefStorageFileError,
)

crc32 = zlib.crc32

# -- file header -----------------------------------------------------------------

MAGIC = b"\x89RFS\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER_SIZE = 1024
Z64 = b"\0" * 8

_FILE_HEADER = struct.Struct(">8sHHI16s8s")  # magic version hsize flags file_id pack_tid
_FOREIGN_MAGICS = {
    b"FS21": "ZODB FileStorage (Python 2, FS21)",
    b"FS30": "ZODB FileStorage (FS30)",
}


class FileHeader(NamedTuple):
    version: int
    file_id: bytes
    pack_tid: bytes


def encode_file_header(file_id: bytes, pack_tid: bytes = Z64) -> bytes:
    if len(file_id) != 16 or len(pack_tid) != 8:
        raise ValueError("file_id takes 16 bytes and pack_tid 8")
    head = _FILE_HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, 0, file_id, pack_tid)
    body = head + b"\0" * (HEADER_SIZE - 4 - len(head))
    return body + struct.pack(">I", crc32(body))


def decode_file_header(buf: bytes, path: str) -> FileHeader:
    """Check and decode the first bytes of a file (pass at least HEADER_SIZE)."""
    if not buf:
        raise EmptyFileError(path, "file is empty (0 bytes); not a refstorage file")
    for magic, name in _FOREIGN_MAGICS.items():
        if buf.startswith(magic):
            raise ForeignFormatError(
                path, f"is a {name} file, not a refstorage file; "
                "convert it with 'refstorage convert'", 0)
    if not buf.startswith(MAGIC[: len(buf)]) or len(buf) < len(MAGIC):
        if buf.startswith(MAGIC[: len(buf)]):
            raise CorruptedHeaderError(path, f"file is {len(buf)} bytes, shorter than its header", 0)
        raise NotARefStorageFileError(path, f"bad magic {bytes(buf[:8])!r}; not a refstorage file", 0)
    if len(buf) < _FILE_HEADER.size:
        raise CorruptedHeaderError(path, f"file is {len(buf)} bytes, shorter than its header", 0)
    _, version, hsize, _flags, file_id, pack_tid = _FILE_HEADER.unpack_from(buf, 0)
    if version > FORMAT_VERSION:
        raise FutureVersionError(
            path, f"format version {version} is newer than this refstorage reads "
            f"(up to {FORMAT_VERSION}); upgrade refstorage", 8)
    if version == 0 or hsize != HEADER_SIZE:
        raise CorruptedHeaderError(path, f"bad header: version {version}, header size {hsize}", 8)
    if len(buf) < HEADER_SIZE:
        raise CorruptedHeaderError(path, f"file is {len(buf)} bytes, shorter than its header", 0)
    (stored,) = struct.unpack_from(">I", buf, HEADER_SIZE - 4)
    if crc32(buf[: HEADER_SIZE - 4]) != stored:
        raise CorruptedHeaderError(path, "file header checksum mismatch", HEADER_SIZE - 4)
    return FileHeader(version, file_id, pack_tid)


# -- transactions ----------------------------------------------------------------

STATUS_COMMITTED = b" "
STATUS_CHECKPOINT = b"c"  # written at vote, flipped to ' ' at finish
STATUS_PACKED = b"p"  # copied by a pack from before the pack time
STATUSES = (STATUS_COMMITTED, STATUS_CHECKPOINT, STATUS_PACKED)

# The transaction header's layout, described once: tid tlen status ulen dlen elen nrec hcrc.
_TXN_HEADER = struct.Struct(">8sQcIIIII")
TXN_HEADER_SIZE = _TXN_HEADER.size  # 37
TLEN_OFFSET = struct.calcsize(">8s")  # 8
STATUS_OFFSET = struct.calcsize(">8sQ")  # 16
_TLEN = struct.Struct(">Q")
TRAILER_SIZE = _TLEN.size  # 8
MIN_TXN_SIZE = TXN_HEADER_SIZE + TRAILER_SIZE


class TxnHeader(NamedTuple):
    pos: int  # file position of the transaction
    tid: bytes
    tlen: int
    status: bytes
    user: bytes
    description: bytes
    extension: bytes
    nrec: int

    @property
    def header_len(self) -> int:
        return TXN_HEADER_SIZE + len(self.user) + len(self.description) + len(self.extension)

    @property
    def data_pos(self) -> int:
        """Position of the first data record."""
        return self.pos + self.header_len

    @property
    def end(self) -> int:
        """Position of the trailer (the redundant tlen)."""
        return self.pos + self.tlen

    @property
    def records_end(self) -> int:
        """Position after the last data record (where the oid table starts)."""
        return self.pos + self.tlen - oid_table_size(self.nrec)

    @property
    def next_pos(self) -> int:
        return self.pos + self.tlen + TRAILER_SIZE


def txn_header_len(user: bytes, description: bytes, extension: bytes) -> int:
    return TXN_HEADER_SIZE + len(user) + len(description) + len(extension)


def encode_txn_header(tid: bytes, tlen: int, status: bytes, user: bytes,
                      description: bytes, extension: bytes, nrec: int) -> bytes:
    fixed = _TXN_HEADER.pack(tid, tlen, status, len(user), len(description),
                             len(extension), nrec, 0)
    crc = crc32(fixed[STATUS_OFFSET + 1: TXN_HEADER_SIZE - 4], crc32(fixed[:STATUS_OFFSET]))
    crc = crc32(extension, crc32(description, crc32(user, crc)))
    return b"".join((fixed[:-4], struct.pack(">I", crc), user, description, extension))


def encode_trailer(tlen: int) -> bytes:
    return _TLEN.pack(tlen)


def decode_trailer(buf: bytes, offset: int = 0) -> int:
    return _TLEN.unpack_from(buf, offset)[0]


class TxnHeaderFixed(NamedTuple):
    """The fixed part of a transaction header, as stored (`decode_txn_header_fixed`)."""

    tid: bytes
    tlen: int
    status: bytes
    ulen: int
    dlen: int
    elen: int
    nrec: int
    hcrc: int


def decode_txn_header_fixed(buf, offset: int, path: str, pos: int) -> TxnHeaderFixed:
    """Decode the fixed part only (no checksum check)."""
    if len(buf) - offset < TXN_HEADER_SIZE:
        raise CorruptedTransactionError(
            path, f"transaction header cut short ({len(buf) - offset} of "
            f"{TXN_HEADER_SIZE} bytes)", pos)
    return tuple.__new__(TxnHeaderFixed, _TXN_HEADER.unpack_from(buf, offset))


def decode_txn_header(buf, offset: int, path: str, pos: int, file_size: int | None = None) -> TxnHeader:
    """Decode and check a transaction header that starts at buf[offset].

    `pos` is its file position.  The buffer must hold the variable part too
    (the caller reads more when `txn_header_needs` says so).  With `file_size`
    the length is also checked against the end of the file.
    """
    if len(buf) - offset < TXN_HEADER_SIZE:
        decode_txn_header_fixed(buf, offset, path, pos)  # raises: cut short
    tid, tlen, status, ulen, dlen, elen, nrec, hcrc = _TXN_HEADER.unpack_from(buf, offset)
    hlen = TXN_HEADER_SIZE + ulen + dlen + elen
    if len(buf) - offset < hlen:
        raise CorruptedTransactionError(
            path, f"transaction header cut short ({len(buf) - offset} of {hlen} bytes)", pos)
    var_start = offset + TXN_HEADER_SIZE
    crc = crc32(buf[offset + STATUS_OFFSET + 1: offset + TXN_HEADER_SIZE - 4],
                crc32(buf[offset: offset + STATUS_OFFSET]))
    crc = crc32(buf[var_start: offset + hlen], crc)
    if crc != hcrc:
        raise CorruptedTransactionError(path, "transaction header checksum mismatch", pos)
    if status not in STATUSES:
        raise CorruptedTransactionError(path, f"invalid transaction status {status!r}", pos + STATUS_OFFSET)
    if tlen < hlen + oid_table_size(nrec):
        raise CorruptedTransactionError(
            path, f"transaction length {tlen} too short for its header and {nrec} records",
            pos + TLEN_OFFSET)
    if file_size is not None and pos + tlen + TRAILER_SIZE > file_size:
        raise CorruptedTransactionError(
            path, f"transaction length {tlen} runs past the end of the file ({file_size})",
            pos + TLEN_OFFSET)
    user = bytes(buf[var_start: var_start + ulen])
    desc = bytes(buf[var_start + ulen: var_start + ulen + dlen])
    ext = bytes(buf[var_start + ulen + dlen: offset + hlen])
    return TxnHeader(pos, tid, tlen, status, user, desc, ext, nrec)


def txn_header_needs(buf, offset: int) -> int:
    """How many bytes from `offset` the whole header needs (0 if not yet known)."""
    if len(buf) - offset < TXN_HEADER_SIZE:
        return TXN_HEADER_SIZE
    _, _, _, ulen, dlen, elen, _, _ = _TXN_HEADER.unpack_from(buf, offset)
    return TXN_HEADER_SIZE + ulen + dlen + elen


_TABLE_ENTRY = struct.Struct(">8sQ")
TABLE_ENTRY_SIZE = _TABLE_ENTRY.size  # 16


def oid_table_size(nrec: int) -> int:
    return TABLE_ENTRY_SIZE * nrec + CRC_SIZE


def encode_oid_table(entries: list[tuple[bytes, int]]) -> bytes:
    """The oid table: (oid, file position of its record) for each record."""
    return encode_oid_table_entries([_TABLE_ENTRY.pack(oid, off) for oid, off in entries])


def oid_table_entry(oid: bytes, pos: int) -> bytes:
    """One packed oid-table entry (see `encode_oid_table_entries`)."""
    return _TABLE_ENTRY.pack(oid, pos)


def encode_oid_table_entries(entries: list[bytes]) -> bytes:
    """The oid table from its entries already packed (`encode_data_records` makes them)."""
    body = b"".join(entries)
    return body + _CRC.pack(crc32(body))


def oid_table_crc(body: bytes | bytearray) -> bytes:
    """The checksum that ends an oid table whose entries are `body` (for a table written in
    pieces: `body` then this is `encode_oid_table_entries` of the same entries)."""
    return _CRC.pack(crc32(body))


def iter_oid_table_entries(body: bytes | bytearray) -> Iterator[tuple[bytes, int]]:
    """The (oid, position) entries of packed oid-table entries (no checksum, unchecked)."""
    return _TABLE_ENTRY.iter_unpack(body)


def decode_oid_table(buf, offset: int, nrec: int, path: str, pos: int) -> Iterator[tuple[bytes, int]]:
    """The checked (oid, position) entries of the table at buf[offset] (file position pos).

    `dict()` of the result is the transaction's oid -> position map, built at C speed."""
    size = oid_table_size(nrec)
    if len(buf) - offset < size:
        raise CorruptedTransactionError(path, "oid table cut short", pos)
    body_end = offset + size - CRC_SIZE
    if crc32(buf[offset:body_end]) != _CRC.unpack_from(buf, body_end)[0]:
        raise CorruptedTransactionError(path, "oid table checksum mismatch", pos)
    return _TABLE_ENTRY.iter_unpack(buf[offset:body_end])


def check_trailer(buf, offset: int, th: TxnHeader, path: str) -> None:
    """Check that the 8 bytes at buf[offset] repeat th.tlen."""
    if len(buf) - offset < TRAILER_SIZE:
        raise CorruptedTransactionError(path, "transaction trailer cut short", th.end)
    tlen = _TLEN.unpack_from(buf, offset)[0]
    if tlen != th.tlen:
        raise CorruptedTransactionError(
            path, f"redundant transaction length {tlen} does not match {th.tlen}", th.end)


# -- data records ----------------------------------------------------------------

FLAG_BACKPOINTER = 1  # no data: an 8-byte position follows the refs
FLAG_REFS_UNKNOWN = 2  # references could not be computed when written
KNOWN_FLAGS = FLAG_BACKPOINTER | FLAG_REFS_UNKNOWN

# The data record's layout, described once; every encoder and decoder below
# (the fast paths included, which inline it) derives its offsets from these:
#   header   _DATA_HEADER: oid tid prev tpos flags nrefs dlen    (DATA_HEADER_SIZE)
#   refs     nrefs * REF_SIZE
#   payload  dlen bytes of data, or BACKPOINTER_SIZE bytes (a position) if flags & BACKPOINTER
#   crc      CRC_SIZE bytes: crc32 of everything before it in the record
# `record_length` is the whole record's length.
_DATA_HEADER = struct.Struct(">8s8sQQHII")
DATA_HEADER_SIZE = _DATA_HEADER.size  # 42
DATA_FLAGS_OFFSET = struct.calcsize(">8s8sQQ")  # 32
REF_SIZE = 8
_Q = struct.Struct(">Q")
BACKPOINTER_SIZE = _Q.size  # 8
_CRC = struct.Struct(">I")
CRC_SIZE = _CRC.size  # 4
MAX_DATA_LEN = 0xFFFFFFFF
_FIXED_LENGTH = DATA_HEADER_SIZE + CRC_SIZE  # a record's length without refs and payload


class DataRecord(NamedTuple):
    pos: int
    oid: bytes
    tid: bytes
    prev: int
    tpos: int
    flags: int
    refs: bytes  # 8 bytes per referenced oid
    data: bytes | None  # None for a backpointer
    back: int  # backpointer position (0: no data, object deleted/undone)
    length: int  # bytes the whole record takes in the file

    @property
    def is_backpointer(self) -> bool:
        return bool(self.flags & FLAG_BACKPOINTER)

    @property
    def refs_known(self) -> bool:
        return not self.flags & FLAG_REFS_UNKNOWN

    def ref_oids(self) -> list[bytes]:
        return split_refs(self.refs)


class DataHeader(NamedTuple):
    """A data record's header fields and the record's whole length (`peek_data_header`)."""

    oid: bytes
    tid: bytes
    prev: int
    tpos: int
    flags: int
    nrefs: int
    dlen: int
    length: int  # bytes the whole record takes in the file


_new_tuple = tuple.__new__  # builds a NamedTuple without the cost of its __new__ (hot paths)


def record_length(nrefs: int, flags: int, dlen: int) -> int:
    """The length of a data record with this header (see the layout above)."""
    payload = BACKPOINTER_SIZE if flags & FLAG_BACKPOINTER else dlen
    return DATA_HEADER_SIZE + REF_SIZE * nrefs + payload + CRC_SIZE


def encode_data_record(oid: bytes, tid: bytes, prev: int, tpos: int, refs: bytes,
                       data: bytes | None, back: int = 0, refs_known: bool = True) -> bytes:
    """One data record: `data`, or (data None) a backpointer to `back`."""
    flags = 0 if refs_known else FLAG_REFS_UNKNOWN
    if data is None:
        if refs:
            raise ValueError("a backpointer record carries no references")
        flags |= FLAG_BACKPOINTER
        payload = _Q.pack(back)
        dlen = 0
    else:
        payload = data
        dlen = len(data)
        if dlen > MAX_DATA_LEN:
            raise ValueError(f"a record's data is limited to {MAX_DATA_LEN} bytes")
    body = b"".join((_DATA_HEADER.pack(oid, tid, prev, tpos, flags, len(refs) // REF_SIZE, dlen),
                     refs, payload))
    return body + _CRC.pack(crc32(body))


def encode_data_records(tid: bytes, tpos: int, pos: int, records: Sequence[tuple], start: int,
                        limit: int, refs: Iterator[bytes | None], table: list[bytes],
                        positions: dict[bytes, int]) -> tuple[bytes, int]:
    """Encode `records[start:]` of one transaction, stopping once `limit` bytes are done.

    A record is (oid, data or None, backpointer, prev); `refs` yields the
    packed refs (None: unknown) of each record that has data, in order.  The
    first record lands at file position `pos`.  Each record's oid-table
    entry is appended to `table` (see `encode_oid_table_entries`) and
    `positions[oid]` set to its position.  Returns (the encoded bytes, the
    index to continue from).  The bytes are exactly those
    `encode_data_record` gives one by one: this is the commit path's loop,
    kept tight (and light on the garbage collector: no tuple per record)."""
    pack_header, pack_crc, pack_entry = _DATA_HEADER.pack, _CRC.pack, _TABLE_ENTRY.pack
    parts: list[bytes] = []
    extend = parts.extend
    entry = table.append
    end = pos + limit
    i, n = start, len(records)
    while i < n and pos < end:
        oid, data, back, prev = records[i]
        i += 1
        entry(pack_entry(oid, pos))
        positions[oid] = pos
        if data is None:
            rec = encode_data_record(oid, tid, prev, tpos, b"", None, back)
            parts.append(rec)
            pos += len(rec)
            continue
        r = next(refs)
        flags = 0
        if r is None:
            r, flags = b"", FLAG_REFS_UNKNOWN
        dlen = len(data)
        if dlen > MAX_DATA_LEN:
            raise ValueError(f"a record's data is limited to {MAX_DATA_LEN} bytes")
        header = pack_header(oid, tid, prev, tpos, flags, len(r) // REF_SIZE, dlen)
        extend((header, r, data, pack_crc(crc32(data, crc32(r, crc32(header))))))
        pos += DATA_HEADER_SIZE + len(r) + dlen + CRC_SIZE
    return b"".join(parts), i


def unchecked_data_oid_tid(buf, offset: int = 0) -> tuple[bytes, bytes] | None:
    """The oid and tid a data record's header claims, unchecked (salvage reports
    which record a damaged stretch held); None if `buf` is too short."""
    if len(buf) - offset < DATA_HEADER_SIZE:
        return None
    oid, tid = _DATA_HEADER.unpack_from(buf, offset)[:2]
    return oid, tid


def peek_data_header(buf, offset: int, path: str, pos: int) -> DataHeader:
    """The header of the record at buf[offset], and the record's length.

    Checks the header's self-consistency, not the checksum (that needs the
    whole record: see `decode_data_record`).  The other decoders call it to
    raise when their inlined checks of the same rules fail."""
    if len(buf) - offset < DATA_HEADER_SIZE:
        raise CorruptedDataError(
            path, f"data record header cut short ({len(buf) - offset} of {DATA_HEADER_SIZE} bytes)", pos)
    oid, tid, prev, tpos, flags, nrefs, dlen = _DATA_HEADER.unpack_from(buf, offset)
    if flags & ~KNOWN_FLAGS:
        raise CorruptedDataError(path, f"unknown data record flags {flags:#x}", pos + DATA_FLAGS_OFFSET)
    if flags & FLAG_BACKPOINTER and (dlen or nrefs):
        raise CorruptedDataError(path, "backpointer record with data or references",
                                 pos + DATA_FLAGS_OFFSET)
    length = _FIXED_LENGTH + REF_SIZE * nrefs + (BACKPOINTER_SIZE if flags & FLAG_BACKPOINTER else dlen)
    return _new_tuple(DataHeader, (oid, tid, prev, tpos, flags, nrefs, dlen, length))


RELOC_DONE, RELOC_STOP, RELOC_BAD, RELOC_FULL, RELOC_OUTSIDE = range(5)
"""What `relocate_kept` stopped at (RELOC_BAD: only the C loop returns it, see there)."""
MIN_RECORD = _FIXED_LENGTH  # 46: the shortest record, so ``pos // MIN_RECORD`` is unique per record


def _relocate_kept_py(buf, base: int, starts, i: int, n: int, keep, tid: bytes, old_tpos: int,
                      new_tpos: int, pos: int, prev_of: Callable[[bytes], int] | None, targets,
                      out: bytearray, table: bytearray, moved: bytearray, limit: int,
                      path: str) -> tuple[int, int, int, int]:
    """The pure-Python `relocate_kept`, and the one that names what is wrong (it raises)."""
    unpack_header, pack_header, pack_crc = _DATA_HEADER.unpack_from, _DATA_HEADER.pack, _CRC.pack
    unpack_crc, pack_entry = _CRC.unpack_from, _TABLE_ENTRY.pack
    nkeep = len(keep)
    kept = 0
    status = RELOC_DONE
    while i < n:
        at = starts[i]
        s = at // MIN_RECORD
        if s >> 3 >= nkeep or not keep[s >> 3] >> (s & 7) & 1:
            i += 1
            continue
        nxt = starts[i + 1]
        length = nxt - at
        if length <= 0:
            raise CorruptedDataError(path, "data record does not match its transaction", at)
        if at < base or nxt - base > len(buf):
            status = RELOC_OUTSIDE
            break
        off = at - base
        if length < DATA_HEADER_SIZE:
            raise CorruptedDataError(path, "data record does not match its transaction", at)
        oid, rtid, _prev, rtpos, flags, nrefs, dlen = unpack_header(buf, off)
        if flags & FLAG_BACKPOINTER:
            status = RELOC_STOP
            break
        if flags & ~KNOWN_FLAGS:
            peek_data_header(buf, off, path, at)  # raises with the reason
        body_end = off + DATA_HEADER_SIZE + REF_SIZE * nrefs + dlen
        if body_end + CRC_SIZE - off != length or rtid != tid or rtpos != old_tpos:
            raise CorruptedDataError(path, "data record does not match its transaction", at)
        body = buf[off + DATA_HEADER_SIZE:body_end]
        if crc32(body, crc32(buf[off:off + DATA_HEADER_SIZE])) != unpack_crc(buf, body_end)[0]:
            raise CorruptedDataError(path, f"data record checksum mismatch (oid {oid.hex()})", at)
        if len(out) >= limit:
            status = RELOC_FULL
            break
        header = pack_header(oid, tid, prev_of(oid) if prev_of is not None else 0, new_tpos, flags,
                             nrefs, dlen)
        out += header
        out += body
        out += pack_crc(crc32(body, crc32(header)))
        table += pack_entry(oid, pos)
        if targets is not None:
            t = bisect_left(targets, at)
            if t < len(targets) and targets[t] == at:
                moved += array("Q", (at, pos)).tobytes()
        pos += length
        kept += 1
        i += 1
    return i, pos, kept, status


try:
    from ._refscan import relocate as _relocate_c
except ImportError:  # pragma: no cover - depends on the build (setup.py: the extension is optional)
    _relocate_c = None


def relocate_kept(buf, base: int, starts, i: int, n: int, keep, tid: bytes, old_tpos: int,
                  new_tpos: int, pos: int, prev_of: Callable[[bytes], int] | None, targets,
                  out: bytearray, table: bytearray, moved: bytearray, limit: int,
                  path: str) -> tuple[int, int, int, int]:
    """Copy the kept data records of one transaction to a new position, checked: pack's inner loop.

    Record i of the transaction starts at file position ``starts[i]`` (an
    ``array('Q')``) and ends at ``starts[i + 1]`` (its oid table says so);
    ``buf[p - base]`` holds file position p.  For i in ``range(i, n)`` whose
    bit ``starts[i] // MIN_RECORD`` is set in the bitmap `keep`, the record
    is checked as `decode_data_record` would (header consistency, checksum)
    and must have the length, tid and tpos (`old_tpos`) its transaction says;
    it is written again with tpos `new_tpos` and prev ``prev_of(oid)`` (0
    without `prev_of`) at file position `pos` and on: its bytes are appended
    to `out`, its oid-table entry to `table`, and if its old position is in
    `targets` (a sorted ``array('Q')`` or None) the pair (old, new) to `moved`
    (two native ``Q``).  Data and refs are copied as they are.

    Returns (i, pos, kept, status): where it stopped, the position after the
    last record written, how many it wrote, and why it stopped: RELOC_DONE
    (i == n), RELOC_STOP (record i is a backpointer: the caller decides what
    it becomes), RELOC_FULL (`out` holds `limit` bytes or more: write it out
    and call again), RELOC_OUTSIDE (record i is not wholly in `buf`).  A bad
    record raises CorruptedDataError naming `path` and its position.

    With the C extension the loop runs in C (`_refscan.relocate`), which
    returns RELOC_BAD at a record failing a check instead of raising; this
    Python loop then runs on that record and raises the error."""
    if _relocate_c is None:
        return _relocate_kept_py(buf, base, starts, i, n, keep, tid, old_tpos, new_tpos, pos, prev_of,
                                 targets, out, table, moved, limit, path)
    i, end, kept, status = _relocate_c(buf, base, starts, i, n, keep, tid, old_tpos, new_tpos, pos,
                                       prev_of, targets, out, table, moved, limit)
    if status == RELOC_BAD:
        _relocate_kept_py(buf, base, starts, i, i + 1, keep, tid, old_tpos, new_tpos, end, prev_of,
                          None, bytearray(), bytearray(), bytearray(), 1 << 62, path)
        raise CorruptedDataError(path, "data record does not match its transaction", starts[i])
    return i, end, kept, status


def decode_data_record(buf, offset: int, path: str, pos: int,
                       header: DataHeader | None = None) -> DataRecord:
    """Decode and checksum the whole data record at buf[offset] (file position `pos`).

    `header` may pass in what `peek_data_header` already returned for it."""
    oid, tid, prev, tpos, flags, nrefs, _dlen, length = header or peek_data_header(buf, offset, path, pos)
    end = offset + length
    if len(buf) < end:
        raise CorruptedDataError(path, f"data record cut short ({len(buf) - offset} of {length} bytes)", pos)
    body_end = end - CRC_SIZE
    if crc32(buf[offset:body_end]) != _CRC.unpack_from(buf, body_end)[0]:
        raise CorruptedDataError(path, f"data record checksum mismatch (oid {oid.hex()})", pos)
    refs_end = offset + DATA_HEADER_SIZE + REF_SIZE * nrefs
    refs = bytes(buf[offset + DATA_HEADER_SIZE: refs_end])
    if flags & FLAG_BACKPOINTER:
        back = _Q.unpack_from(buf, refs_end)[0]
        return DataRecord(pos, oid, tid, prev, tpos, flags, refs, None, back, length)
    return DataRecord(pos, oid, tid, prev, tpos, flags, refs, bytes(buf[refs_end:body_end]), 0, length)


def decode_data_payload(buf, path: str, pos: int) -> tuple[bytes, bytes, bytes | None, int] | int:
    """(oid, tid, data or None, backpointer) of the checked record at buf[0].

    The load path's decoder: the checks of `decode_data_record` without
    building a DataRecord or copying the refs.  If `buf` holds less than the
    whole record, returns the record's length instead (read that much)."""
    if len(buf) < DATA_HEADER_SIZE:
        peek_data_header(buf, 0, path, pos)  # raises: header cut short
    oid, tid, _prev, _tpos, flags, nrefs, dlen = _DATA_HEADER.unpack_from(buf, 0)
    if flags & ~KNOWN_FLAGS or flags & FLAG_BACKPOINTER and (dlen or nrefs):
        peek_data_header(buf, 0, path, pos)  # raises with the reason
    refs_end = DATA_HEADER_SIZE + REF_SIZE * nrefs
    body_end = refs_end + (BACKPOINTER_SIZE if flags & FLAG_BACKPOINTER else dlen)
    if len(buf) < body_end + CRC_SIZE:
        return body_end + CRC_SIZE
    if crc32(buf[:body_end]) != _CRC.unpack_from(buf, body_end)[0]:
        raise CorruptedDataError(path, f"data record checksum mismatch (oid {oid.hex()})", pos)
    if flags & FLAG_BACKPOINTER:
        return oid, tid, None, _Q.unpack_from(buf, refs_end)[0]
    return oid, tid, buf[refs_end:body_end], 0


def check_data_record_chunks(chunks: Iterable, header: DataHeader, path: str, pos: int) -> None:
    """Checksum a long record given as consecutive chunks of its bytes, in bounded memory.

    `header` is what `peek_data_header` returned for it; `chunks` yields the
    record's bytes from its start, `header.length` in all (fewer: it was cut
    short).  Readers call this before reading a long record whole, so a
    damaged length costs no allocation of that length."""
    length = header.length
    body_end = length - CRC_SIZE
    crc = 0
    got = 0
    tail = b""
    for chunk in chunks:
        if got + len(chunk) > body_end:
            keep = body_end - got
            tail += bytes(chunk[max(0, keep):])
            chunk = chunk[:max(0, keep)]
        crc = crc32(chunk, crc)
        got += len(chunk)
    if got < body_end or len(tail) < CRC_SIZE:
        raise CorruptedDataError(path, f"data record cut short ({got + len(tail)} of {length} bytes)", pos)
    if crc != _CRC.unpack_from(tail, 0)[0]:
        raise CorruptedDataError(path, f"data record checksum mismatch (oid {header.oid.hex()})", pos)


def check_txn_header_chunks(fixed, chunks: Iterable, path: str, pos: int) -> None:
    """Checksum a transaction header whose metadata is long, in bounded memory.

    `fixed` holds its TXN_HEADER_SIZE fixed bytes, `chunks` yields the
    user, description and extension bytes that follow (ulen + dlen + elen
    in all).  Raises what `decode_txn_header` would for a bad checksum or a
    header cut short."""
    h = decode_txn_header_fixed(fixed, 0, path, pos)
    need = h.ulen + h.dlen + h.elen
    crc = crc32(fixed[STATUS_OFFSET + 1: TXN_HEADER_SIZE - 4], crc32(fixed[:STATUS_OFFSET]))
    got = 0
    for chunk in chunks:
        chunk = chunk[:need - got]
        crc = crc32(chunk, crc)
        got += len(chunk)
    if got < need:
        raise CorruptedTransactionError(
            path, f"transaction header cut short ({TXN_HEADER_SIZE + got} of {TXN_HEADER_SIZE + need} bytes)",
            pos)
    if crc != h.hcrc:
        raise CorruptedTransactionError(path, "transaction header checksum mismatch", pos)


# -- references ------------------------------------------------------------------

def pack_refs(oids) -> bytes:
    """The refs field for a list of oids (duplicates dropped, order kept)."""
    if not oids:
        return b""
    return b"".join(dict.fromkeys(oids))


def split_refs(refs: bytes) -> list[bytes]:
    return [refs[i: i + REF_SIZE] for i in range(0, len(refs), REF_SIZE)]


def p64(n: int) -> bytes:
    return _Q.pack(n)


def u64(b: bytes) -> int:
    return _Q.unpack(b)[0]
