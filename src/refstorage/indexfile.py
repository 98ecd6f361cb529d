"""The index file: the saved `OidIndex` that spares a reopen the scan of the data file.

`save_index` writes it in one piece through `fileio.atomic_write` (temp file,
fsync, rename, directory fsync); `load_index` reads it back, in place: the
file is memory-mapped (`fileio.map_whole`) and the loaded index's dense blocks
are read-only views of the map, copied only when first changed (see
refstorage.index), so a load copies no payload.  Its layout and
the rules a reader checks are specified in docs/format.md ("The index file"):
a header (magic, version, flags, the data file's file_id, the position and tid
the index covers, counts), then the blocks as columns -- dense block keys and
payloads, sparse block keys, entry counts, suffixes, positions -- so that
saving and loading run at C speed, with no Python loop per entry or per sparse
block; a crc32 of everything ends it.  The block forms are `OidIndex`'s own
(see refstorage.index); a block's kind is a representation choice: the writer
emits sparse blocks of up to 219 entries and dense blocks of at least 32, and
the reader converts a sparse block of more than 219 entries to dense and a
dense one of fewer than 128 to sparse.

`load_index` returns None when the file does not exist and raises
`IndexFileError` (path, message, offset) for any other problem: bad magic,
other version, truncation, crc mismatch, or any rule of the format broken.
The storage then rebuilds the index from the data file.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable
from itertools import accumulate, chain, compress, islice, repeat
from operator import add, eq, floordiv, lt, mul, not_, or_, sub

from . import fileio
from .errors import IndexFileError, StorageIOError
from .fileformat import MAGIC as _DATA_MAGIC
from .index import (
    DENSE_MIN,
    DENSE_SIZE,
    KEY_LIMIT,
    SPARSE_MAX,
    OidIndex,
    block_map,
    dense_block,
    pack6,
    single_blocks,
    sparse_block,
    unpack6,
)

__all__ = ["save_index", "load_index", "INDEX_MAGIC", "INDEX_VERSION"]

INDEX_MAGIC = b"\x89RFX\r\n\x1a\n"
INDEX_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1 (no per-block counts and maxima) is still read

_HEADER = struct.Struct(">8sHH16sQ8sQII")
_HEADER_SIZE = _HEADER.size  # 60
_R256 = range(256)
_LITTLE = sys.byteorder == "little"
_fb = int.from_bytes
_join = b"".join


def _py_dense_check(payloads: bytes | memoryview, counts: array, maxima: array) -> int:
    """The first dense block whose count or maximum does not match its entries, or -1
    (the twin of `_refscan.dense_check`)."""
    arr = unpack6(payloads)
    for b in range(len(counts)):
        block = arr[256 * b:256 * b + 256]
        if 256 - block.count(0) != counts[b] or max(block) != maxima[b]:
            return b
    return -1


try:
    from ._refscan import dense_check as _dense_check
except ImportError:  # no C extension: the Python twin
    _dense_check = _py_dense_check
else:
    if os.environ.get("REFSTORAGE_PURE_PYTHON"):
        _dense_check = _py_dense_check


_NOT_CHECKED = -2
_CHECK_BLOCKS = 128  # dense blocks per chunk of the fused crc and block check (192 KiB)


def _crc_and_dense_check(view: memoryview, end: int, version: int, nd: int,
                         path: str) -> int | None:
    """The crc of view[:end] against the 4 bytes after it: None if it does not match.
    Otherwise, for a version-2 file, the first dense block whose stored count or maximum
    does not match its entries (-1: none), computed in the same pass; _NOT_CHECKED when
    the header's layout does not fit the file (the parse after the crc reports it)."""
    want = _fb(view[end:end + 4], "big")
    pay = _HEADER_SIZE + 16 * nd
    if version < 2 or not nd or pay + DENSE_SIZE * nd > end:
        return None if zlib.crc32(view[:end]) != want else _NOT_CHECKED
    counts = _be_array("H", bytes(view[_HEADER_SIZE + 8 * nd:_HEADER_SIZE + 10 * nd]))
    maxima = unpack6(bytes(view[_HEADER_SIZE + 10 * nd:pay]))
    crc = zlib.crc32(view[:pay])
    bad = -1
    for b in range(0, nd, _CHECK_BLOCKS):
        e = min(nd, b + _CHECK_BLOCKS)
        chunk = view[pay + DENSE_SIZE * b:pay + DENSE_SIZE * e]
        crc = zlib.crc32(chunk, crc)
        if bad < 0:
            i = _dense_check(chunk, counts[b:e], maxima[b:e])
            if i >= 0:
                bad = b + i
    crc = zlib.crc32(view[pay + DENSE_SIZE * nd:end], crc)
    return None if crc != want else bad


def _be_array(code: str, raw: bytes) -> array:
    a = array(code, raw)
    if _LITTLE:
        a.byteswap()
    return a


def _be_bytes(code: str, values: Iterable[int]) -> bytes:
    a = array(code, values)
    if _LITTLE:
        a.byteswap()
    return a.tobytes()


def save_index(path: str, index: OidIndex, *, file_id: bytes, pos: int, tid: bytes) -> None:
    """Write `index` to `path` atomically (the format is in docs/format.md).

    `pos` is the end of the last transaction the index covers and `tid` its tid.
    The index must not change meanwhile.  ValueError if an argument is malformed
    or an entry's position is not below `pos` (a caller bug: the file would be
    refused on load).
    """
    if type(file_id) is not bytes or len(file_id) != 16:
        raise ValueError(f"file_id is 16 bytes, not {file_id!r}")
    if type(tid) is not bytes or len(tid) != 8:
        raise ValueError(f"tid is 8 bytes, not {tid!r}")
    if not isinstance(pos, int) or not 0 <= pos < 1 << 64:
        raise ValueError(f"pos {pos!r} is not a u64")
    blocks = index.blocks()
    keys = list(blocks)
    bl = list(blocks.values())
    isdense = list(map(eq, map(len, bl), repeat(DENSE_SIZE)))
    if any(isdense):
        isparse = list(map(not_, isdense))
        dkeys = list(compress(keys, isdense))
        dpay = _join(compress(bl, isdense))
        skeys = list(compress(keys, isparse))
        sparse = list(compress(bl, isparse))
    else:
        dkeys, dpay, skeys, sparse = [], b"", keys, bl
    del keys, bl, isdense
    scounts = list(map(floordiv, map(len, sparse), repeat(7)))
    if len(sparse) * 7 == sum(map(len, sparse)):
        # One entry per sparse block: split the 7-byte blocks into the two columns.
        raw = _join(sparse)
        ssufs = raw[0::7]
        out = bytearray(6 * len(ssufs))
        for k in range(6):
            out[k::6] = raw[k + 1::7]
        spos: bytes | bytearray = out
    else:
        ssufs = _join(map(bytes.__getitem__, sparse, map(slice, scounts)))
        spos = _join(map(bytes.__getitem__, sparse, map(slice, scounts, repeat(None))))
    darr = unpack6(dpay)
    dcounts = [256 - darr[i:i + 256].count(0) for i in range(0, len(darr), 256)]
    dmax = [max(darr[i:i + 256]) for i in range(0, len(darr), 256)]
    del darr
    sarr = unpack6(spos)
    count = sum(dcounts) + len(ssufs)
    top = max(max(dmax, default=0), max(sarr, default=0))
    del sarr
    if count and top >= pos:
        raise ValueError(f"the index holds position {top}, not below its end position {pos}")
    header = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 0, file_id, pos, tid, count, len(dkeys), len(skeys))
    chunks = [header, _be_bytes("Q", dkeys), _be_bytes("H", dcounts), pack6(dmax), dpay,
              _be_bytes("Q", skeys), _be_bytes("H", scounts), ssufs, spos]
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    chunks.append(crc.to_bytes(4, "big"))
    fileio.atomic_write(path, chunks, point_prefix="index.save")


def load_index(path: str) -> tuple[OidIndex, bytes, int, bytes] | None:
    """Read an index file: (index, file_id, pos, tid), or None if it does not exist.

    Any other problem (unreadable, damaged, another format or version) raises
    IndexFileError; the caller then rebuilds the index from the data file.
    """
    path = str(path)
    try:
        # Mapped, not read: the dense blocks are views of the map (no copy, no page
        # fault per page), copied by OidIndex on their first change.
        data = fileio.map_whole(path)
    except StorageIOError as exc:
        if exc.errno == _errno.ENOENT:
            return None
        raise IndexFileError(path, f"cannot read the index file: {exc.detail}", exc.offset) from exc
    try:
        return _decode(path, data)
    except IndexFileError:
        raise
    except (ArithmeticError, LookupError, ValueError, TypeError, struct.error, AssertionError) as exc:
        # Every check above should have caught the problem; never let a raw error escape.
        raise IndexFileError(path, f"undecodable index file ({exc!r})") from exc


def _decode(path: str, data: bytes) -> tuple[OidIndex, bytes, int, bytes]:
    def bad(message: str, offset: int | None = None) -> IndexFileError:
        return IndexFileError(path, message, offset)

    size = len(data)
    if data[:8] != INDEX_MAGIC[:size]:
        if data[:len(_DATA_MAGIC)] == _DATA_MAGIC:
            raise bad("is a refstorage data file, not an index file", 0)
        raise bad("not a refstorage index file (bad magic)", 0)
    if size < _HEADER_SIZE + 4:
        raise bad(f"truncated: {size} bytes, shorter than the {_HEADER_SIZE + 4}-byte minimum", size)
    magic, version, flags, file_id, pos, tid, count, nd, ns = _HEADER.unpack_from(data)
    if version not in READ_VERSIONS:
        raise bad(f"index format version {version}, this code reads versions "
                  f"{', '.join(map(str, READ_VERSIONS))}", 8)
    end = size - 4
    # Version 2's dense blocks are checked against their stored counts and maxima in the
    # same pass as the crc, a chunk at a time, while the chunk is in the CPU's cache
    # (a second pass over the file would read it from memory again: 3 ms at 2M oids).
    # A failed block check is only reported once the crc has matched.
    dense_bad = _crc_and_dense_check(memoryview(data), end, version, nd, path)
    if dense_bad is None:
        raise bad("checksum mismatch (the file is truncated or damaged)", end)
    if flags:
        raise bad(f"unknown flags {flags:#x}", 10)

    off = _HEADER_SIZE

    def take(n: int, what: str) -> bytes:
        nonlocal off
        if n > end - off:
            raise bad(f"{what}: {n} bytes needed, {end - off} left before the checksum", off)
        start = off
        off += n
        return data[start:off]

    dkeys = _be_array("Q", take(8 * nd, "dense block keys"))
    if version >= 2:
        dcounts_at = off
        dcounts_a = _be_array("H", take(2 * nd, "dense block counts"))
        dmax = unpack6(take(6 * nd, "dense block maxima"))
    dpay_at = off
    if DENSE_SIZE * nd > end - off:
        raise bad(f"dense block payloads: {DENSE_SIZE * nd} bytes needed, {end - off} left before the "
                  "checksum", off)
    off += DENSE_SIZE * nd
    skeys_at = off
    skeys = _be_array("Q", take(8 * ns, "sparse block keys"))
    scounts_at = off
    scounts = _be_array("H", take(2 * ns, "sparse block counts"))
    if scounts and not (min(scounts) >= 1 and max(scounts) <= 256):
        raise bad("a sparse block count is not in 1..256", scounts_at)
    nsp = sum(scounts)
    ssufs_at = off
    ssufs = take(nsp, "sparse suffixes")
    spos_at = off
    spos = take(6 * nsp, "sparse positions")
    if off != end:
        raise bad(f"{end - off} unexpected bytes before the checksum", off)
    if max(dkeys, default=0) >= KEY_LIMIT:
        raise bad("a dense block key is not below 2**56", _HEADER_SIZE)
    if max(skeys, default=0) >= KEY_LIMIT:
        raise bad("a sparse block key is not below 2**56", skeys_at)

    view = memoryview(data)
    if version >= 2:
        # The per-block counts and maxima are checked against the payloads below, in one
        # C pass (a writer's bug or a forged file whose crc was recomputed: len() and
        # new_oid must not trust them), without decoding the blocks into Python objects.
        dcounts: list[int] | array = dcounts_a
        if dcounts and not (min(dcounts) >= 1 and max(dcounts) <= 256):
            raise bad("a dense block count is not in 1..256", dcounts_at)
        dtop = max(dmax, default=0)
    else:
        # Version 1: per-block entry counts and the maximum from the payloads themselves.
        darr = unpack6(view[dpay_at:dpay_at + DENSE_SIZE * nd])
        dcounts = [256 - darr[i:i + 256].count(0) for i in range(0, 256 * nd, 256)]
        if dcounts and min(dcounts) == 0:
            raise bad("an empty dense block", dpay_at + DENSE_SIZE * dcounts.index(0))
        dtop = max(darr, default=0)
        del darr

    sarr = unpack6(spos)
    if 0 in sarr:
        raise bad("a sparse entry has position 0", spos_at + 6 * sarr.index(0))
    total = sum(dcounts) + nsp
    if total != count:
        raise bad(f"the header counts {count} entries but the blocks hold {total}", 44)
    top = max(dtop, max(sarr, default=0))
    if total and top >= pos:
        raise bad(f"position {top} is not below the index's end position {pos}", 28)
    if version >= 2:
        i = dense_bad if dense_bad != _NOT_CHECKED else _dense_check(
            view[dpay_at:dpay_at + DENSE_SIZE * nd], dcounts_a, dmax)
        if i >= 0:
            raise bad(f"dense block {i}: the stored counts or maximum do not match its entries",
                      dpay_at + DENSE_SIZE * i)

    if nsp == ns:
        # Every sparse block holds one entry (the common sparse case).
        sparse: Iterable[bytes] = single_blocks(ssufs, spos)
    else:
        # Within each block the suffixes strictly ascend: every entry but a block's
        # first is above the one before it.
        firsts = chain.from_iterable(map(chain, repeat((True,)), map(repeat, repeat(False),
                                                                     map(sub, scounts, repeat(1)))))
        if not all(map(or_, islice(firsts, 1, None), map(lt, ssufs, islice(ssufs, 1, None)))):
            raise bad("sparse block suffixes are not strictly ascending", ssufs_at)
        ends = list(accumulate(scounts))
        starts = [0, *islice(ends, len(ends) - 1)]
        pslices = map(slice, map(mul, starts, repeat(6)), map(mul, ends, repeat(6)))
        sparse = map(add, map(ssufs.__getitem__, map(slice, starts, ends)), map(spos.__getitem__, pslices))
    blocks: dict[int, bytes | bytearray] = dict(zip(skeys.tolist(), sparse, strict=True))
    if scounts and max(scounts) > SPARSE_MAX:
        for key, c in zip(skeys.tolist(), scounts, strict=True):
            if c > SPARSE_MAX:
                blocks[key] = dense_block(block_map(blocks[key]))
    dk = dkeys.tolist()
    bounds = range(dpay_at, dpay_at + DENSE_SIZE * nd + 1, DENSE_SIZE)
    # The dense blocks are read-only views of the file's buffer (OidIndex copies one
    # into a bytearray when it first changes it).
    blocks.update(zip(dk, map(view.__getitem__, map(slice, bounds, islice(bounds, 1, None))), strict=True))
    if nd and min(dcounts) < DENSE_MIN:
        for i in compress(range(nd), map(lt, dcounts, repeat(DENSE_MIN))):
            arr = unpack6(blocks[dk[i]])
            blocks[dk[i]] = sparse_block(dict(zip(compress(_R256, arr), compress(arr, arr), strict=True)))
    if len(blocks) != nd + ns:
        raise bad("a block key appears twice", _HEADER_SIZE)
    return OidIndex.from_blocks(blocks, total), file_id, pos, tid
