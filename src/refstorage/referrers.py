"""The referrer index file (`<name>.referrers`): which current objects reference an oid.

A cache beside the data file, derived from it: the inverted reference graph of
the current records, as sorted (target oid, referrer oid) pairs in blocks, so a
query reads the file's trailer, its block table and the one or two blocks
holding its target (a binary search), never the whole file.  It also lists the
current records whose references are unknown (REFS_UNKNOWN) or unreadable (a
backpointer whose data cannot be read), which no query can search, so a report
says how many were not searched, as the scan does.  The layout and what a
reader checks are in docs/format.md ("The referrer index file").

- `build` writes it from one pass over the current records, in bounded memory
  (sorted runs of at most `RUN_PAIRS` pairs spilled to temporary files, then
  merged);
- `update` brings one that covers a prefix of the same data file up to date,
  reading only the transactions after it: each changed oid's pairs from its
  record before (found through the first new record's prev pointer) are
  removed and those of its newest record added; the blocks no change falls in
  are copied;
- `open_referrers` opens one for queries (`ReferrerIndex.lookup`); it raises
  `ReferrerIndexError` (path, offset) for anything it cannot use: bad magic,
  another version, a checksum mismatch, another data file generation, a
  position the data file does not end a transaction at;
- `up_to_date` is the policy: use, update, or (re)build, and report which.

Every write goes through `fileio.atomic_write` (temp file, fsync, rename,
directory fsync).  Only stored references are read; nothing is unpickled.
"""

from __future__ import annotations

import errno as _errno
import heapq
import os
import struct
import sys
import tempfile
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from . import fileformat as fmt
from . import fileio
from .errors import CorruptedError, ReferrerIndexError, StorageIOError
from .log import LogReader

__all__ = ["MAGIC", "VERSION", "SUFFIX", "ReferrerIndex", "build", "update", "open_referrers",
           "up_to_date", "referrers_path"]

MAGIC = b"\x89RFR\r\n\x1a\n"
VERSION = 1
READ_VERSIONS = (1,)
SUFFIX = ".referrers"
BLOCK = 4096  # pairs a block holds when written whole (64 KiB); an update may leave 1..2*BLOCK
RUN_PAIRS = 1 << 21  # pairs sorted in memory before a run is spilled (about 100 MB of ints)
UPDATE_MAX = 1 << 20  # changed oids above which an update rebuilds instead

_PREFIX = struct.Struct(">8sHH")  # magic, version, flags
_TRAILER = struct.Struct(">16sQ8sQIQQII")  # file_id pos tid npairs nblocks nunknown nunreadable 2 crcs
_TRAILER_SIZE = _TRAILER.size + 4  # + its own crc: 72
_ENTRY = struct.Struct(">QQII")  # a block's first pair (target, source), pair count, crc32
_MIN_SIZE = _PREFIX.size + _TRAILER_SIZE
_LITTLE = sys.byteorder == "little"
_M64 = (1 << 64) - 1

# what a current record contributes (`classify`)
NO_DATA, REFS, UNKNOWN, UNREADABLE = range(4)


def referrers_path(data_path: str) -> str:
    """The referrer index file of a data file."""
    return str(data_path) + SUFFIX


def classify(reader: LogReader, rec: fmt.DataRecord) -> tuple[int, bytes]:
    """(NO_DATA | REFS | UNKNOWN | UNREADABLE, refs) for a current record, as `refs` reads it."""
    if rec.is_backpointer:
        if not rec.back:
            return NO_DATA, b""
        try:
            target = reader.resolve(rec)
        except CorruptedError:
            return UNREADABLE, b""
        if target is None:
            return NO_DATA, b""
    else:
        target = rec
    if not target.refs_known:
        return UNKNOWN, b""
    return REFS, target.refs


def _u64s(raw: bytes) -> array:
    a = array("Q", raw)
    if _LITTLE:
        a.byteswap()
    return a


def _be(values: Iterable[int]) -> bytes:
    a = array("Q", values)
    if _LITTLE:
        a.byteswap()
    return a.tobytes()


def _pairs_of(source: int, refs: bytes) -> Iterable[int]:
    """The keys (target << 64 | source) of one record's references, each target once."""
    return [t << 64 | source for t in set(_u64s(refs))]


def _encode_keys(keys: Sequence[int]) -> bytes:
    a = array("Q", bytes(16 * len(keys)))
    a[0::2] = array("Q", [k >> 64 for k in keys])
    a[1::2] = array("Q", [k & _M64 for k in keys])
    if _LITTLE:
        a.byteswap()
    return a.tobytes()


def _decode_keys(raw: bytes) -> list[int]:
    a = _u64s(raw)
    return [t << 64 | s for t, s in zip(a[0::2], a[1::2], strict=True)]


# -- reading ------------------------------------------------------------------------------

@dataclass
class ReferrerIndex:
    """An open referrer index file, checked against its data file (`open_referrers`)."""

    path: str
    file: fileio.DataFile
    file_id: bytes
    pos: int  # end of the last transaction it covers
    tid: bytes
    npairs: int
    nunknown: int  # current records with unknown references
    nunreadable: int  # current backpointers whose data cannot be read
    firsts: list[int]  # each block's first key (target << 64 | source), ascending
    counts: list[int]
    crcs: list[int]
    offsets: list[int]
    lists_at: int
    lists_crc: int

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ReferrerIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _bad(self, message: str, offset: int | None = None) -> ReferrerIndexError:
        return ReferrerIndexError(self.path, message, offset)

    def block_raw(self, i: int) -> bytes:
        """Block i's bytes, crc checked."""
        at, n = self.offsets[i], 16 * self.counts[i]
        raw = self.file.read(at, n)
        if len(raw) != n or zlib.crc32(raw) != self.crcs[i]:
            raise self._bad(f"block {i} fails its checksum (damaged)", at)
        return raw

    def block_keys(self, i: int) -> list[int]:
        """Block i's keys, checked: crc, first key, strictly ascending, below the next block's."""
        keys = _decode_keys(self.block_raw(i))
        hi = self.firsts[i + 1] if i + 1 < len(self.firsts) else 1 << 128
        ordered = all(a < b for a, b in zip(keys, keys[1:], strict=False))
        if keys[0] != self.firsts[i] or keys[-1] >= hi or not ordered:
            raise self._bad(f"block {i} is out of order", self.offsets[i])
        return keys

    def lookup(self, oid: bytes) -> list[bytes]:
        """The oids of the current records that reference `oid`, ascending."""
        t = int.from_bytes(oid, "big")
        lo, hi = t << 64, (t + 1) << 64
        firsts = self.firsts
        i = max(0, bisect_right(firsts, lo) - 1)
        out: list[bytes] = []
        while i < len(firsts) and firsts[i] < hi:
            keys = self.block_keys(i)
            out += [(k & _M64).to_bytes(8, "big") for k in keys[bisect_left(keys, lo):bisect_left(keys, hi)]]
            i += 1
        return out

    def lists(self) -> tuple[set[int], set[int]]:
        """(oids with unknown references, oids whose data is unreadable), as ints."""
        n = 8 * (self.nunknown + self.nunreadable)
        raw = self.file.read(self.lists_at, n)
        if len(raw) != n or zlib.crc32(raw) != self.lists_crc:
            raise self._bad("the unknown/unreadable lists fail their checksum", self.lists_at)
        a = _u64s(raw)
        return set(a[:self.nunknown]), set(a[self.nunknown:])


def open_referrers(path: str, reader: LogReader, file_id: bytes, end: int) -> ReferrerIndex | None:
    """Open the referrer index at `path` for the data file of `reader` (its good log ends at `end`).

    None if it does not exist; ReferrerIndexError if it cannot be used for this
    data file (damaged, another version or generation, or covering a position
    the data file has no transaction ending at with its tid); it may cover less
    than `end` (see `update`)."""
    path = str(path)
    try:
        f = fileio.DataFile(path, read_only=True)
    except StorageIOError as exc:
        if exc.errno == _errno.ENOENT:
            return None
        raise ReferrerIndexError(path, f"cannot open it: {exc.detail}", exc.offset) from exc
    try:
        return _open(path, f, reader, file_id, end)
    except BaseException:
        f.close()
        raise


def _open(path: str, f: fileio.DataFile, reader: LogReader, file_id: bytes, end: int) -> ReferrerIndex:
    def bad(message: str, offset: int | None = None) -> ReferrerIndexError:
        return ReferrerIndexError(path, message, offset)

    size = f.size
    head = f.read(0, _PREFIX.size)
    if head[:8] != MAGIC[:len(head)] or len(head) < 8:
        if head.startswith(fmt.MAGIC):
            raise bad("is a refstorage data file, not a referrer index", 0)
        raise bad("not a referrer index file (bad magic)", 0)
    if size < _MIN_SIZE:
        raise bad(f"truncated: {size} bytes, shorter than the {_MIN_SIZE}-byte minimum", size)
    _magic, version, flags = _PREFIX.unpack(head)
    if version not in READ_VERSIONS:
        raise bad(f"referrer index format version {version}, this code reads versions "
                  f"{', '.join(map(str, READ_VERSIONS))}", 8)
    if flags:
        raise bad(f"unknown flags {flags:#x}", 10)
    at = size - _TRAILER_SIZE
    trailer = f.read(at, _TRAILER_SIZE)
    if zlib.crc32(trailer[:-4], zlib.crc32(head)) != int.from_bytes(trailer[-4:], "big"):
        raise bad("trailer checksum mismatch (the file is truncated or damaged)", at)
    fid, pos, tid, npairs, nblocks, nunknown, nunreadable, table_crc, lists_crc = _TRAILER.unpack(
        trailer[:-4])
    table_at = _PREFIX.size + 16 * npairs
    lists_at = table_at + _ENTRY.size * nblocks
    if lists_at + 8 * (nunknown + nunreadable) != at:
        raise bad(f"the trailer's counts do not match the file's size {size}", at)
    if fid != file_id:
        raise bad(f"it belongs to another data file generation (file id {fid.hex()}, the data "
                  f"file's is {file_id.hex()})", at)
    if pos == fmt.HEADER_SIZE:
        if tid != fmt.Z64:
            raise bad("it describes transactions the data file does not hold", at)
    elif not fmt.HEADER_SIZE < pos <= end:
        raise bad(f"it covers {pos} bytes but the data file's log ends at {end}", at)
    else:
        try:
            th = reader.txn_ending_at(pos, end)
        except CorruptedError as exc:
            raise bad(f"its end position {pos} is not a transaction boundary of the data file "
                      f"({exc.detail})", at) from None
        if th.tid != tid or th.status == fmt.STATUS_CHECKPOINT:
            raise bad(f"its last transaction does not match the data file (it names tid {tid.hex()} "
                      f"at {pos}, the file has {th.tid.hex()})", at)
    table = f.read(table_at, _ENTRY.size * nblocks)
    if zlib.crc32(table) != table_crc:
        raise bad("block table checksum mismatch", table_at)
    firsts, counts, crcs, offsets = [], [], [], []
    off = _PREFIX.size
    for t, s, n, crc in _ENTRY.iter_unpack(table):
        firsts.append(t << 64 | s)
        counts.append(n)
        crcs.append(crc)
        offsets.append(off)
        off += 16 * n
    if off != table_at or (counts and min(counts) < 1):
        raise bad("the block table's counts do not add up to the pair count", table_at)
    if any(a >= b for a, b in zip(firsts, firsts[1:], strict=False)):
        raise bad("the block table is not in ascending order", table_at)
    return ReferrerIndex(path, f, fid, pos, tid, npairs, nunknown, nunreadable, firsts, counts, crcs,
                         offsets, lists_at, lists_crc)


# -- writing ------------------------------------------------------------------------------

class _Writer:
    """The file's chunks: prefix, blocks (`block`), then `finish`'s table, lists, trailer."""

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.npairs = 0
        self.table_crc = 0

    def block(self, raw: bytes, first: int, crc: int | None = None) -> bytes:
        n = len(raw) // 16
        if crc is None:
            crc = zlib.crc32(raw)
        entry = _ENTRY.pack(first >> 64, first & _M64, n, crc)
        self.entries.append(entry)
        self.table_crc = zlib.crc32(entry, self.table_crc)
        self.npairs += n
        return raw

    def blocks(self, keys: Sequence[int]) -> Iterator[bytes]:
        for i in range(0, len(keys), BLOCK):
            chunk = keys[i:i + BLOCK]
            yield self.block(_encode_keys(chunk), chunk[0])

    def finish(self, file_id: bytes, pos: int, tid: bytes, unknown: Iterable[int],
               unreadable: Iterable[int]) -> Iterator[bytes]:
        yield b"".join(self.entries)
        u, r = _be(sorted(unknown)), _be(sorted(unreadable))
        yield u
        yield r
        trailer = _TRAILER.pack(file_id, pos, tid, self.npairs, len(self.entries), len(u) // 8,
                                len(r) // 8, self.table_crc, zlib.crc32(r, zlib.crc32(u)))
        prefix = _PREFIX.pack(MAGIC, VERSION, 0)
        yield trailer + zlib.crc32(trailer, zlib.crc32(prefix)).to_bytes(4, "big")


def write_file(path: str, file_id: bytes, pos: int, tid: bytes, keys: Iterable[int],
               unknown: Iterable[int] = (), unreadable: Iterable[int] = ()) -> None:
    """Write a referrer index from ascending, distinct `keys` (target << 64 | source)."""
    fileio.atomic_write(path, _chunks(file_id, pos, tid, keys, unknown, unreadable),
                        point_prefix="referrers.save")


def _chunks(file_id: bytes, pos: int, tid: bytes, keys: Iterable[int], unknown: Iterable[int],
            unreadable: Iterable[int]) -> Iterator[bytes]:
    if type(file_id) is not bytes or len(file_id) != 16 or type(tid) is not bytes or len(tid) != 8:
        raise ValueError("file_id is 16 bytes and tid 8")
    w = _Writer()
    yield _PREFIX.pack(MAGIC, VERSION, 0)
    chunk: list[int] = []
    for k in keys:
        chunk.append(k)
        if len(chunk) == BLOCK:
            yield from w.blocks(chunk)
            chunk = []
    if chunk:
        yield from w.blocks(chunk)
    yield from w.finish(file_id, pos, tid, unknown, unreadable)


def _spill(keys: list[int], scratch_dir: str):
    keys.sort()
    f = tempfile.TemporaryFile(dir=scratch_dir, prefix="referrers-run-")
    for i in range(0, len(keys), BLOCK):
        f.write(_encode_keys(keys[i:i + BLOCK]))
    f.seek(0)
    return f


def _read_run(f) -> Iterator[int]:
    while True:
        raw = f.read(16 * BLOCK * 16)
        if not raw:
            f.close()
            return
        yield from _decode_keys(raw)


def build(path: str, reader: LogReader, file_id: bytes, positions: Sequence[int], pos: int, tid: bytes,
          progress: Callable[[int], None] | None = None, run_pairs: int | None = None) -> None:
    """Write the referrer index of the current records at `positions` (ascending) to `path`.

    `pos` and `tid` are the end and tid of the last transaction those records
    reflect (the current records as of `pos`).  Memory: at most `run_pairs`
    pairs as ints; beyond, sorted runs go to temporary files beside `path`."""
    run_pairs = run_pairs or RUN_PAIRS
    scratch_dir = os.path.dirname(os.path.abspath(path))
    keys: list[int] = []
    runs = []
    unknown: list[int] = []
    unreadable: list[int] = []
    done = 0
    try:
        for rec in reader.read_data_records(positions):
            done += 1
            if progress is not None and not done % 4096:
                progress(done)
            kind, refs = classify(reader, rec)
            if kind == REFS:
                if refs:
                    keys += _pairs_of(int.from_bytes(rec.oid, "big"), refs)
                    if len(keys) >= run_pairs:
                        runs.append(_spill(keys, scratch_dir))
                        keys = []
            elif kind == UNKNOWN:
                unknown.append(int.from_bytes(rec.oid, "big"))
            elif kind == UNREADABLE:
                unreadable.append(int.from_bytes(rec.oid, "big"))
        if runs:
            if keys:
                runs.append(_spill(keys, scratch_dir))
                keys = []
            merged: Iterable[int] = heapq.merge(*map(_read_run, runs))
        else:
            keys.sort()
            merged = keys
        write_file(path, file_id, pos, tid, merged, unknown, unreadable)
    finally:
        for f in runs:
            f.close()


def update(index: ReferrerIndex, reader: LogReader, end: int, tid: bytes) -> bool:
    """Rewrite `index`'s file to cover the data file up to `end` (the transaction ending there has `tid`).

    Reads only the transactions after `index.pos`.  False (nothing written) if
    more than UPDATE_MAX oids changed: a rebuild is then the cheaper way.
    ReferrerIndexError if the file does not agree with the data file (a pair to
    remove is not there, say): the caller rebuilds it."""
    first_prev: dict[bytes, int] = {}
    newest: dict[bytes, int] = {}
    for th in reader.iter_txns(index.pos, end):
        for rec in reader.txn_records(th):
            if rec.oid not in first_prev:
                first_prev[rec.oid] = rec.prev
            newest[rec.oid] = rec.pos
        if len(newest) > UPDATE_MAX:
            return False
    rem: set[int] = set()
    add: set[int] = set()
    rem_lists: tuple[set[int], set[int]] = (set(), set())
    add_lists: tuple[set[int], set[int]] = (set(), set())

    def collect(recs: Iterator[fmt.DataRecord], wanted: dict[int, bytes], pairs: set[int],
                lists: tuple[set[int], set[int]]) -> None:
        for rec in recs:
            if wanted.get(rec.pos) != rec.oid:
                raise index._bad(f"the record at {rec.pos} is not the one of oid {rec.oid.hex()} its "
                                 "successor names")
            kind, refs = classify(reader, rec)
            o = int.from_bytes(rec.oid, "big")
            if kind == REFS:
                pairs.update(_pairs_of(o, refs))
            elif kind == UNKNOWN:
                lists[0].add(o)
            elif kind == UNREADABLE:
                lists[1].add(o)

    old = {p: oid for oid, p in first_prev.items() if p}
    if any(p >= index.pos for p in old):
        raise index._bad("a changed object's previous record lies after the indexed part")
    collect(reader.read_data_records(sorted(old)), old, rem, rem_lists)
    new = {p: oid for oid, p in newest.items()}
    collect(reader.read_data_records(sorted(new)), new, add, add_lists)
    common = rem & add
    rem -= common
    add -= common
    unknown, unreadable = index.lists()
    for have, r, a, what in ((unknown, rem_lists[0], add_lists[0], "unknown"),
                             (unreadable, rem_lists[1], add_lists[1], "unreadable")):
        if not r <= have:
            raise index._bad(f"an oid to remove from the {what} list is not in it", index.lists_at)
        have -= r
        if have & a:
            raise index._bad(f"an oid to add to the {what} list is already in it", index.lists_at)
        have |= a
    fileio.atomic_write(index.path, _updated_chunks(index, sorted(rem), sorted(add), end, tid,
                                                    unknown, unreadable),
                        point_prefix="referrers.update")
    return True


def _updated_chunks(index: ReferrerIndex, rem: list[int], add: list[int], end: int, tid: bytes,
                    unknown: set[int], unreadable: set[int]) -> Iterator[bytes]:
    w = _Writer()
    yield _PREFIX.pack(MAGIC, VERSION, 0)
    firsts = index.firsts
    n = len(firsts)
    if not n:
        yield from w.blocks(add)
    for i in range(n):
        lo = firsts[i] if i else 0
        hi = firsts[i + 1] if i + 1 < n else 1 << 128
        r = rem[bisect_left(rem, lo):bisect_left(rem, hi)]
        a = add[bisect_left(add, lo):bisect_left(add, hi)]
        if not r and not a:
            yield w.block(index.block_raw(i), firsts[i], index.crcs[i])
            continue
        keys = set(index.block_keys(i))
        if not keys.issuperset(r):
            raise index._bad(f"block {i} lacks a pair the update removes", index.offsets[i])
        keys.difference_update(r)
        if not keys.isdisjoint(a):
            raise index._bad(f"block {i} already holds a pair the update adds", index.offsets[i])
        keys.update(a)
        merged = sorted(keys)
        if len(merged) <= 2 * BLOCK:
            if merged:
                yield w.block(_encode_keys(merged), merged[0])
        else:
            yield from w.blocks(merged)
    yield from w.finish(index.file_id, end, tid, unknown, unreadable)


# -- the policy ---------------------------------------------------------------------------

@dataclass
class Status:
    """What `up_to_date` did: `how` is used, updated, built or rebuilt; `why` explains a rebuild or a None."""

    how: str
    why: str = ""


def up_to_date(data_path: str, reader: LogReader, file_id: bytes, end: int, tid: bytes | None,
               positions: Callable[[], Sequence[int]],
               progress: Callable[[int], None] | None = None,
               on_build: Callable[[], None] | None = None) -> tuple[ReferrerIndex | None, Status]:
    """The referrer index of the data file's log up to `end`: used as is, updated, or (re)built.

    (None, status) when it cannot be had (its directory is not writable, a
    write failed): the caller then scans.  `positions()` gives the current
    records' positions, ascending, for a build; `on_build` is called before
    one starts (to show progress)."""
    path = referrers_path(data_path)
    tid = tid or fmt.Z64
    why = ""
    try:
        index = open_referrers(path, reader, file_id, end)
    except ReferrerIndexError as exc:
        index, why = None, str(exc)
    except StorageIOError as exc:
        index, why = None, str(exc)
    if index is not None and index.pos == end:
        return index, Status("used")
    writable = os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK)
    if not writable:
        if index is not None:
            index.close()
        return None, Status("unavailable", f"{os.path.dirname(os.path.abspath(path))} is not writable, so "
                                           f"{path} cannot be {'updated' if index else 'written'}"
                                           + (f" ({why})" if why else ""))
    try:
        if index is not None:
            try:
                with index:
                    if update(index, reader, end, tid):
                        return _reopen(path, reader, file_id, end, Status("updated"))
                    why = "too many changes for an update"
            except ReferrerIndexError as exc:
                why = str(exc)
            except CorruptedError as exc:
                why = f"the data file after the indexed part cannot be read ({exc})"
        if on_build is not None:
            on_build()
        build(path, reader, file_id, positions(), end, tid, progress)
        return _reopen(path, reader, file_id, end, Status("rebuilt" if why else "built", why))
    except StorageIOError as exc:
        return None, Status("unavailable", f"cannot write {path}: {exc}")


def _reopen(path: str, reader: LogReader, file_id: bytes, end: int,
            status: Status) -> tuple[ReferrerIndex | None, Status]:
    try:
        index = open_referrers(path, reader, file_id, end)
    except (ReferrerIndexError, StorageIOError) as exc:  # replaced meanwhile by another process
        return None, Status("unavailable", f"{path} changed while being read: {exc}")
    if index is None or index.pos != end:
        if index is not None:
            index.close()
        return None, Status("unavailable", f"{path} was replaced by another process meanwhile")
    return index, status
