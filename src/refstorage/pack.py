"""Pack: drop every revision not needed as of a pack time, from the stored references.

What a pack keeps
=================

The pack time t becomes a pack tid (as ZODB's FileStorage computes it); a
transaction with ``tid <= pack tid`` is *before* t, any other one *after* t.

* Every transaction after t is copied whole, status kept.
* Before t, a data record is kept if it is
  - the revision current at t of an object reachable at t (with gc), or of any
    object (without gc) -- unless that revision is a deletion (a backpointer 0);
  - the target of a backpointer written after t (by undo or restore).
  Every other record before t is dropped, and a transaction left without
  records with it (except the last one of the file, which stays, empty, so the
  last tid does not go back).  Kept transactions get status 'p'.
* *Reachable at t*: from the root (oid 0) and from everything a record written
  after t references (its data's references, or those of the data its
  backpointer stands for), through the revisions current at t.  So an object
  unreachable at t but referenced again later survives, and every snapshot at
  or after t stays complete.  A deleted object references nothing.

References come from the records (the format stores them); no pickle is
loaded.  Only a record written with REFS_UNKNOWN is handed to `referencesf`.

Rewriting: prev pointers point to the previous *kept* record of the object,
tpos to the new transaction.  A backpointer is remapped to its target's new
position; a kept record whose target was dropped gets the data (and refs)
inline; a backpointer 0 stays 0.

How, and what is locked
=======================

1. Under the readers' lock: the end of the log (and, without gc, a copy of
   the index; gc only looks oids up in the live one).
2. GC, no lock: find the first transaction after t by stepping back from the
   end, read the records after t, then mark breadth-first from the roots,
   reading one record header per reachable object, each level in file order
   through a growing window (the history before t is not scanned; only records
   with references are decoded).  The common record (before t, references
   stored, no backpointer) is read in C (``_refscan.gc_refs``: header and
   checksum checked, references appended); the others, and any record failing
   a check, go through the Python path, which raises the error.  Marks are bitmaps over file positions: a
   record takes at least 46 bytes, so ``pos // 46`` is unique -- one bit per
   46 bytes of file.
3. Copy, no lock, into ``<name>.pack`` (new file id, header pack tid): the
   history before t in large sequential reads, a transaction without any kept
   record skipped at C speed (one count over its bitmap bytes), in the others
   only the kept records checked and rewritten (the oid table says where each
   starts) by ``fileformat.relocate_kept`` (a C loop when the extension is
   built; its Python twin names any error); then the transactions after t.
   Each transaction is streamed: its header written first and patched with its
   length at the end, its records handed to the writer 1 MiB at a time, its oid
   table spooled (to a temporary file past 1 MiB), a large one's oid table
   checked and read in batches: memory does not grow with a transaction.  If
   nothing would be removed, stop: nothing changes.
4. Under the commit lock: copy the transactions committed meanwhile (refusing,
   with PackError and nothing changed, if one references an object the pack
   removed: a concurrent undo or a stale cache resurrected it), fsync,
   hard-link the current file to ``<name>.old`` (if kept), replace the file
   (so the name always holds one complete database), install the new file
   and index in the storage, save the index.  The old file stays open for
   loads and iterators still using it and closes when they let go.

Fault points (``fileio.point``): pack.after-gc, pack.after-copy,
pack.after-fsync, pack.after-link-old, pack.after-replace,
pack.after-index-save.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import tempfile
import threading
import time
import uuid
import weakref
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice, repeat
from operator import and_, floordiv, itemgetter, lt, rshift

from persistent.TimeStamp import TimeStamp

from . import fileformat as fmt
from . import fileio
from .core import StorageCore
from .errors import CorruptedDataError, CorruptedTransactionError, PackError, StorageIOError
from .index import OidIndex
from .log import LogReader

try:
    from ._refscan import count_kept as _count_kept_c
    from ._refscan import gc_refs as _gc_refs
    from ._refscan import index_lookup as _index_lookup
except ImportError:  # pragma: no cover - depends on the build (the extension is optional)
    _count_kept_c = _gc_refs = _index_lookup = None

__all__ = ["PackReport", "Progress", "pack_storage", "pack_tid_for"]

logger = logging.getLogger("refstorage.pack")

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): phase "gc" counts objects, "copy" bytes read."""

READ_CHUNK = 1 << 20  # sequential reads of the old file ...
WHOLE_TXN = 4 << 20  # ... or a whole transaction up to this size at once
WRITE_CHUNK = 256 << 10  # writes to the new file
MIN_RECORD = fmt.record_length(0, 0, 0)  # 46: no two records share pos // MIN_RECORD
PROGRESS_EVERY = 1 << 16
PEEK_SIZE = 512  # bytes read to look at a record's header ...
MAX_WINDOW = 64 << 10  # ... or more while the reads are close to each other
OUT_LIMIT = 1 << 20  # records of one transaction handed to the writer at once
SPOOL_MEMORY = 1 << 20  # a transaction's oid table kept in memory up to this, then in a file
TABLE_BATCH = 1 << 16  # oid-table entries of a large transaction handled at once (1 MiB)
_TABLE_ENTRY = struct.Struct(">8sQ")
_CRC = struct.Struct(">I")


@dataclass
class PackReport:
    """What a pack did (returned by FileStorage.pack, logged, printed by the CLI)."""

    path: str
    pack_tid: bytes
    packed: bool = False  # True: a packed file replaced the storage's file
    reason: str = ""  # why nothing was done, when packed is False
    bytes_before: int = 0
    bytes_after: int = 0
    transactions_removed: int = 0
    revisions_removed: int = 0
    objects_removed: int = 0
    transactions_during_pack: int = 0  # committed while the pack ran, copied at the end
    seconds: float = 0.0
    # Why garbage collection was skipped ("" if it was not): a record whose
    # references are not stored could not be decoded.  `unreadable` lists
    # (oid, position) of such records.
    gc_skipped: str = ""
    unreadable: list[tuple[bytes, int]] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return self.bytes_before - self.bytes_after if self.packed else 0

    def __str__(self) -> str:
        when = TimeStamp(self.pack_tid) if self.pack_tid != fmt.Z64 else "?"
        note = f"; garbage collection skipped: {self.gc_skipped}" if self.gc_skipped else ""
        if not self.packed:
            return f"{self.path}: not packed to {when} ({self.reason}){note}; {self.seconds:.2f} s"
        ratio = 100.0 * self.bytes_freed / self.bytes_before if self.bytes_before else 0.0
        return (f"{self.path}: packed to {when}: {self.bytes_before:,} -> {self.bytes_after:,} bytes "
                f"({ratio:.1f}% freed); removed {self.revisions_removed:,} revisions, "
                f"{self.objects_removed:,} objects, {self.transactions_removed:,} transactions"
                f"{note}; {self.seconds:.2f} s")


def pack_tid_for(t: float) -> bytes:
    """The pack tid of time `t` (seconds since the epoch), as ZODB's FileStorage computes it."""
    try:
        tid = TimeStamp(*time.gmtime(t)[:5] + (t % 60,)).raw()
    except (TypeError, ValueError, OverflowError) as exc:
        raise PackError(f"invalid pack time {t!r} (seconds since 1970): {exc}") from None
    if tid == fmt.Z64:
        raise PackError(f"invalid pack time {t!r} (seconds since 1970): "
                        "not after the first time a tid can hold (1900-01-01)")
    return tid


# -- one pack at a time per storage ----------------------------------------------------

_running: weakref.WeakSet = weakref.WeakSet()
_running_lock = threading.Lock()


@contextlib.contextmanager
def _exclusive(storage) -> Iterator[None]:
    with _running_lock:
        if storage in _running:
            raise PackError(f"{storage.getName()}: a pack of this storage is already running; "
                            "wait for it to finish")
        _running.add(storage)
    try:
        yield
    finally:
        with _running_lock:
            _running.discard(storage)


def _set_bit(bits: bytearray, pos: int) -> None:
    s = pos // MIN_RECORD
    bits[s >> 3] |= 1 << (s & 7)


def _count_kept(starts: array, n: int, keep: bytearray) -> int:
    """How many of the record positions `starts[:n]` have their bit set in `keep`."""
    if _count_kept_c is not None:
        return _count_kept_c(starts, n, keep)
    slots = array("Q", map(floordiv, islice(starts, n), repeat(MIN_RECORD)))
    return sum(map(and_, map(rshift, map(keep.__getitem__, map(rshift, slots, repeat(3))),
                             map(and_, slots, repeat(7))), repeat(1)))


def _bitmap(end: int) -> bytearray:
    return bytearray((end // MIN_RECORD >> 3) + 1)


class _Level:
    """Record positions to visit, grouped by 4 MiB region of the file (8 bytes each)."""

    __slots__ = ("regions",)

    def __init__(self) -> None:
        self.regions: dict[int, array] = {}

    def __bool__(self) -> bool:
        return bool(self.regions)

    def ascending_regions(self) -> Iterator[array]:
        """The positions in file order, a region at a time (each sorted when reached, then freed)."""
        regions = self.regions
        for key in sorted(regions):
            yield array("Q", sorted(regions.pop(key)))


# -- which records before the pack time to keep ------------------------------------------

class GC:
    """Decides which records before the pack time a pack keeps.

    `index` maps each oid to its newest record: the storage's live index (gc:
    only looked up, so commits may go on) or a snapshot (no gc: iterated).
    After run(): `pack_pos` is where the first transaction after the pack
    time starts (or `end`), `keep` the bitmap of kept positions before it,
    `targets` the positions a kept backpointer points to, and `future_oids`
    the oids that may have more than one kept record before the pack time.
    """

    def __init__(self, reader: LogReader, index: OidIndex, end: int, pack_tid: bytes, gc: bool,
                 refs_of: Callable[[fmt.DataRecord], bytes], progress: Progress | None = None):
        self.reader = reader
        self.index = index
        self.end = end
        self.pack_tid = pack_tid
        self.gc = gc
        self.refs_of = refs_of
        self.progress = progress
        self.pack_pos = end
        self.keep = bytearray()
        self.targets: set[int] = set()
        self.future_oids: set[bytes] = set()
        self.redundant = False  # the file was already packed to a later time
        self._visited = bytearray()  # objects whose newest record is after pack_pos
        self._marked = 0

    def run(self) -> None:
        self.pack_pos = self._find_pack_pos()
        if self.redundant:
            return
        self.keep = _bitmap(self.pack_pos)
        if self.gc:
            self._mark([fmt.Z64])
        self._scan_after()
        if not self.gc:
            self._keep_all_current()
        self._keep_deletions_under_future()
        self._visited = bytearray()
        self.index = OidIndex()  # not needed any more

    def kept(self) -> int:
        """How many records before the pack time are kept."""
        return sum(map(int.bit_count, self.keep))

    def _find_pack_pos(self) -> int:
        pos = self.end
        first_after = None
        for th in self.reader.iter_txns_backward(self.end):
            if th.tid <= self.pack_tid:
                break
            pos, first_after = th.pos, th
        if first_after is not None and first_after.status == fmt.STATUS_PACKED:
            self.redundant = True
        return pos

    def _keep_deletions_under_future(self) -> None:
        """Keep a deletion current at the pack time when a later backpointer
        keeps an older revision of that object: dropping it would make that
        older revision look current in the snapshots between the two."""
        read_record = self.reader.read_data_record
        for oid in self.future_oids:
            pos = self.index.get(oid)
            found = self._at_pack_time(pos, oid) if pos is not None else None
            if found is not None and found[1] & fmt.FLAG_BACKPOINTER:
                if not read_record(found[0], oid).back:
                    _set_bit(self.keep, found[0])

    def _keep(self, rec: fmt.DataRecord) -> None:
        _set_bit(self.keep, rec.pos)
        if rec.is_backpointer and rec.back:
            self.targets.add(rec.back)

    def _at_pack_time(self, pos: int, oid: bytes) -> tuple[int, int, int] | None:
        """(position, flags, nrefs) of oid's revision current at the pack time, from its
        record at `pos` (headers only); None if the object was created later."""
        read = self.reader.file.read
        path = self.reader.path
        pack_tid = self.pack_tid
        while True:
            buf = read(pos, PEEK_SIZE)
            h = fmt.peek_data_header(buf, 0, path, pos)
            if h.oid != oid:
                raise CorruptedDataError(path, f"record for oid {h.oid.hex()} found where oid "
                                         f"{oid.hex()} was expected", pos)
            if h.tid <= pack_tid:
                return pos, h.flags, h.nrefs
            if not h.prev:
                return None
            pos = h.prev

    def _mark(self, roots: list[bytes]) -> None:
        """Keep the revisions at the pack time of everything reachable from `roots`.

        Breadth first: each level's records are read in file order, through a
        window that grows while the reads stay close (one read for many small
        records); a level holds 8 bytes per object.  The keep bitmap doubles as
        the visited set (an object whose newest record is before pack_pos has
        it as its revision at the pack time).  A record without references is
        kept from its header alone (the copy checksums every kept record); only
        records with references or backpointers are decoded."""
        level = self._discover(roots, _Level())
        while level:
            level = self._visit(level)

    def _discover(self, oids: Iterable[bytes], found: _Level) -> _Level:
        """Add to `found` the newest record positions of the not yet visited `oids`."""
        return self._add_positions(map(self.index.get, oids, repeat(0)), found)

    def _discover_joined(self, joined: bytes, found: _Level) -> _Level:
        """`_discover` of the 8-byte oids joined in `joined`: their positions looked up in
        one C pass over the index's blocks when the extension is built (the GIL is held
        throughout, so a commit's change to the live index is seen whole or not at all)."""
        if _index_lookup is None:
            return self._discover(fmt.split_refs(joined), found)
        return self._add_positions(_index_lookup(self.index.blocks(), joined), found)

    def _add_positions(self, positions: Iterable[int], found: _Level) -> _Level:
        """Add to `found` the not yet visited `positions` (0: no record, skipped)."""
        keep, visited = self.keep, self._visited
        pack_pos = self.pack_pos
        regions = found.regions
        for pos in positions:
            if not pos:
                continue  # a dangling reference, or an object created after the pack started
            if pos < pack_pos:
                s = pos // MIN_RECORD
                byte, bit = s >> 3, 1 << (s & 7)
                if keep[byte] & bit:
                    continue
                keep[byte] |= bit
            else:
                s = (pos - pack_pos) // MIN_RECORD
                byte, bit = s >> 3, 1 << (s & 7)
                if byte >= len(visited):
                    visited.extend(bytes(byte + 1 - len(visited) + 4096))
                if visited[byte] & bit:
                    continue
                visited[byte] |= bit
            region = regions.get(pos >> 22)
            if region is None:
                region = regions[pos >> 22] = array("Q")
            region.append(pos)
        return found

    def _visit(self, level: _Level) -> _Level:
        """Keep the revisions at the pack time of the objects at `level`; the next level."""
        pack_pos = self.pack_pos
        read = self.reader.file.read
        hsize = fmt.DATA_HEADER_SIZE
        wbuf, wpos, wsize = b"", 0, PEEK_SIZE
        following = _Level()
        marked = 0
        gc_refs = _gc_refs
        found_refs = bytearray()
        for positions in level.ascending_regions():
            i, n = 0, len(positions)
            slow = False  # positions[i] is for the Python path
            while i < n:
                pos = positions[i]
                off = pos - wpos
                if off < 0 or off + hsize > len(wbuf):
                    near = 0 <= off < 2 * MAX_WINDOW
                    wsize = min(wsize * 2, MAX_WINDOW) if near else max(wsize // 2, PEEK_SIZE)
                    wbuf, wpos, off = read(pos, wsize), pos, 0
                if gc_refs is not None and not slow:
                    # the common records in C (see _refscan.gc_refs): stops where this loop is needed
                    j, status = gc_refs(wbuf, wpos, positions, i, n, pack_pos, found_refs)
                    marked += j - i
                    i = j
                    if found_refs:
                        self._discover_joined(bytes(found_refs), following)
                        found_refs = bytearray()
                    slow = status == fmt.RELOC_STOP
                    continue
                slow = False
                marked += 1
                i += 1
                self._visit_one(pos, wbuf, off, following)
        self._marked += marked
        if self.progress is not None:
            self.progress("gc", self._marked, len(self.index))
        return following

    def _visit_one(self, pos: int, wbuf: bytes, off: int, following: _Level) -> None:
        """Keep oid's revision at the pack time from its record at `pos` (header at wbuf[off])
        and add what it references to `following` (the Python path of `_visit`)."""
        keep = self.keep
        pack_pos = self.pack_pos
        path = self.reader.path
        simple = fmt.FLAG_BACKPOINTER | fmt.FLAG_REFS_UNKNOWN
        h = fmt.peek_data_header(wbuf, off, path, pos)
        oid, flags, nrefs, length = h.oid, h.flags, h.nrefs, h.length
        if pos >= pack_pos:  # changed after the pack time: find its revision then
            found = self._at_pack_time(pos, oid)
            if found is None:
                return  # created after the pack time
            pos, flags, nrefs = found
            s = pos // MIN_RECORD
            byte, bit = s >> 3, 1 << (s & 7)
            if keep[byte] & bit:
                return
            keep[byte] |= bit
            off = -1
        if not nrefs and not flags & simple:
            return  # no references: kept, nothing to follow
        if 0 <= off and off + length <= len(wbuf):
            rec = fmt.decode_data_record(wbuf, off, path, pos, h)
        else:
            rec = self.reader.read_data_record(pos, oid)
        if rec.is_backpointer:
            if not rec.back:  # deleted at the pack time: nothing to keep or follow
                s = pos // MIN_RECORD
                keep[s >> 3] &= ~(1 << (s & 7)) & 0xFF
                return
            self.targets.add(rec.back)
            rec = self.reader.resolve(rec)
            if rec is None:
                return
        refs = rec.refs if rec.refs_known else self.refs_of(rec)
        if refs:
            self._discover(fmt.split_refs(refs), following)

    def _scan_after(self) -> None:
        """The records after the pack time: more roots, and backpointer targets to keep."""
        reader = self.reader
        roots = _Level()
        for th in reader.iter_txns(self.pack_pos, self.end):
            for rec in reader.txn_records(th):
                if not rec.is_backpointer:
                    if not self.gc:
                        continue
                    refs = rec.refs if rec.refs_known else self.refs_of(rec)
                elif rec.back and rec.back < self.pack_pos:
                    target = reader.read_data_record(rec.back, rec.oid)
                    self._keep(target)
                    self.targets.add(rec.back)
                    self.future_oids.add(rec.oid)
                    data_rec = reader.resolve(target)
                    if data_rec is None or not self.gc:
                        continue
                    refs = data_rec.refs if data_rec.refs_known else self.refs_of(data_rec)
                else:
                    continue  # its target is after the pack time: scanned as well
                if refs:
                    self._discover(fmt.split_refs(refs), roots)
        while roots:
            roots = self._visit(roots)

    def _keep_all_current(self) -> None:
        """No gc: keep the revision at the pack time of every object (but deletions)."""
        done = 0
        read_record = self.reader.read_data_record
        for oid, pos in self.index.items():
            found = self._at_pack_time(pos, oid)
            if found is not None:
                pos, flags, _nrefs = found
                if not flags & fmt.FLAG_BACKPOINTER:
                    _set_bit(self.keep, pos)
                else:
                    rec = read_record(pos, oid)
                    if rec.back:
                        self._keep(rec)
            done += 1
            if self.progress is not None and not done % PROGRESS_EVERY:
                self.progress("gc", done, len(self.index))


# -- writing the packed copy ------------------------------------------------------------

class _Writer:
    """Appends to the new file through a buffer; `patch` rewrites bytes already written."""

    def __init__(self, file: fileio.DataFile, header: bytes):
        self.file = file
        self.buf = bytearray(header)
        self.flushed = 0
        self.pos = len(header)  # logical end, buffered bytes included

    def write(self, data: bytes | bytearray) -> None:
        self.pos += len(data)
        if len(data) >= WRITE_CHUNK:  # large: no copy into the buffer
            self.flush()
            self.file.write_at(self.flushed, data)
            self.flushed += len(data)
            return
        self.buf += data
        if len(self.buf) >= WRITE_CHUNK:
            self.flush()

    def patch(self, pos: int, data: bytes) -> None:
        """Overwrite the bytes at [pos, pos + len(data)), written already (flushed or not)."""
        end = pos + len(data)
        if end > self.pos:
            raise ValueError("patch past the end of what was written")
        if pos < self.flushed:
            self.file.write_at(pos, data[:min(end, self.flushed) - pos])
        if end > self.flushed:
            start = max(pos, self.flushed)
            self.buf[start - self.flushed:end - self.flushed] = data[start - pos:]

    def flush(self) -> None:
        if self.buf:
            data, self.buf = self.buf, bytearray()
            self.file.write_at(self.flushed, data)
            self.flushed += len(data)


class _Spool:
    """Bytes appended in order, held in memory up to SPOOL_MEMORY, then in a temporary file
    (a huge transaction's oid table, written after its records)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.mem = bytearray()
        self.file = None
        self.size = 0
        self.crc = 0

    def append(self, data: bytes | bytearray) -> None:
        self.crc = fmt.crc32(data, self.crc)
        self.size += len(data)
        self.mem += data
        if len(self.mem) >= SPOOL_MEMORY:
            if self.file is None:
                self.file = tempfile.TemporaryFile(dir=self.directory, prefix=".pack-table-")
            self.file.write(self.mem)
            self.mem = bytearray()

    def chunks(self) -> Iterator[bytes | bytearray]:
        if self.file is not None:
            self.file.seek(0)
            while chunk := self.file.read(SPOOL_MEMORY):
                yield chunk
        yield self.mem

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.mem = bytearray()


class _TxnOut:
    """One transaction being written to the new file, streamed: its header first (its length
    patched in at the end), the records as they come, its oid table spooled then appended.
    Memory does not grow with the transaction (but for the new index)."""

    def __init__(self, copier: _Copier, th: fmt.TxnHeader, status: bytes):
        self.copier = copier
        self.writer = w = copier.writer
        self.th = th
        self.status = status
        self.tpos = w.pos
        w.write(self._header(0, 0))  # placeholder: same length
        self.pos = w.pos  # where the next record goes
        self.out = bytearray()  # records not yet handed to the writer
        self.table = _Spool(copier.spool_dir)
        self.pending = bytearray()  # oid-table entries not yet in the new index
        self.nrec = 0

    def _header(self, tlen: int, nrec: int) -> bytes:
        th = self.th
        return fmt.encode_txn_header(th.tid, tlen, self.status, th.user, th.description, th.extension,
                                     nrec)

    def add(self, oid: bytes, raw: bytes) -> None:
        """Append one encoded record (written at self.pos)."""
        entry = fmt.oid_table_entry(oid, self.pos)
        self.out += raw
        self.pending += entry
        self.pos += len(raw)
        self.nrec += 1
        if len(self.out) >= OUT_LIMIT:
            self.flush()

    def added(self, table: bytearray, count: int, end: int) -> None:
        """`count` records were appended to self.out by relocate_kept, their entries to `table`."""
        self.pending += table
        self.nrec += count
        self.pos = end
        if len(self.out) >= OUT_LIMIT:
            self.flush()

    def flush(self) -> None:
        if self.out:
            self.writer.write(self.out)
            self.out = bytearray()
        if self.pending:
            pending, self.pending = self.pending, bytearray()
            self.table.append(pending)

    def finish(self) -> None:
        """Write the oid table and trailer, patch the header; then, and only then, the new
        index gets the transaction's entries: until its end, a lookup (a record's prev) sees
        the index as it was before the transaction, also for an oid stored twice in it."""
        self.flush()
        w = self.writer
        tlen = self.pos - self.tpos + fmt.oid_table_size(self.nrec)
        update = self.copier.index.update_log_order
        rest = b""  # the spool's chunks need not end on an entry's boundary
        try:
            for chunk in self.table.chunks():
                w.write(chunk)
                data = rest + chunk if rest else chunk
                cut = len(data) - len(data) % _TABLE_ENTRY.size
                if cut:
                    update(list(_TABLE_ENTRY.iter_unpack(memoryview(data)[:cut])))
                rest = bytes(data[cut:])
        finally:
            self.table.close()
        if rest:
            raise ValueError("oid table spool holds a partial entry")  # cannot happen
        w.write(_CRC.pack(self.table.crc))
        w.write(fmt.encode_trailer(tlen))
        w.patch(self.tpos, self._header(tlen, self.nrec))


class _Copier:
    """Copies transactions from the old file into the new one, rewriting positions."""

    def __init__(self, reader: LogReader, writer: _Writer, gc: GC,
                 refs_of: Callable[[fmt.DataRecord], bytes], progress: Progress | None = None):
        self.reader = reader
        self.path = reader.path
        self.writer = writer
        self.gc = gc
        self.refs_of = refs_of
        self.progress = progress
        self.index = OidIndex()  # oid -> newest position in the new file
        self.spool_dir = os.path.dirname(os.path.abspath(writer.file.path))
        # old -> new position of the records a backpointer may point to (kept
        # backpointer targets before the pack time, every record after it),
        # appended in increasing old position
        self._moved_old = array("Q")
        self._moved_new = array("Q")
        self.removed_records = 0
        self.removed_txns = 0
        self._buf = b""
        self._buf_pos = 0
        self._limit = 0
        self._targets_sorted: array | None = None

    def release(self) -> None:
        """Drop what only the copy needed (the read buffer, the gc's bitmaps)."""
        self._region(0)
        self.gc.keep = bytearray()
        self.gc.targets = set()

    # -- reading the old file sequentially, in large chunks

    def _region(self, stop: int) -> None:
        """Read only below `stop` from now on: the file may grow beyond it meanwhile."""
        self._limit = stop
        self._buf, self._buf_pos = b"", 0

    def _view(self, pos: int, n: int) -> tuple[bytes, int]:
        """A buffer holding the file's bytes [pos, pos + n) from offset off: (buffer, off)."""
        off = pos - self._buf_pos
        if off < 0 or off + n > len(self._buf):
            if pos + n > self._limit:
                raise CorruptedTransactionError(self.path, "transaction runs past the end of the log", pos)
            self._buf = b""  # let the old chunk go before reading the next one
            self._buf = self.reader.file.read(pos, min(max(n, READ_CHUNK), self._limit - pos))
            self._buf_pos, off = pos, 0
            if len(self._buf) < n:
                raise CorruptedTransactionError(self.path, "file ends inside a transaction", pos)
            if self.progress is not None:
                self.progress("copy", pos, self.gc.end)
        return self._buf, off

    def _txn_header(self, pos: int) -> fmt.TxnHeader:
        buf, off = self._view(pos, fmt.TXN_HEADER_SIZE)
        need = fmt.txn_header_needs(buf, off)
        if off + need > len(buf):
            buf, off = self._view(pos, need)
        return fmt.decode_txn_header(buf, off, self.path, pos)

    def _check_trailer(self, th: fmt.TxnHeader) -> None:
        buf, off = self._view(th.end, fmt.TRAILER_SIZE)
        fmt.check_trailer(buf, off, th, self.path)

    def _whole(self, th: fmt.TxnHeader) -> bool:
        """Whether `th` is small enough to be read whole into the buffer."""
        return th.tlen + fmt.TRAILER_SIZE <= WHOLE_TXN

    def _table(self, th: fmt.TxnHeader) -> array:
        """Record starts + records end of a whole (small) `th`, from its checked oid table;
        the whole transaction is in the read buffer after it."""
        path = self.path
        rend = th.records_end
        self._view(th.pos, th.tlen + fmt.TRAILER_SIZE)
        tbuf, toff = self._view(rend, fmt.oid_table_size(th.nrec) + fmt.TRAILER_SIZE)
        starts = array("Q", map(itemgetter(1), fmt.decode_oid_table(tbuf, toff, th.nrec, path, rend)))
        fmt.check_trailer(tbuf, toff + fmt.oid_table_size(th.nrec), th, path)
        starts.append(rend)
        if starts[0] != th.data_pos or not all(map(lt, starts, islice(starts, 1, None))):
            raise CorruptedTransactionError(path, "oid table does not match the records", rend)
        return starts

    def _read(self, pos: int, n: int, txn_pos: int) -> bytes:
        """n bytes of the old file at `pos` (inside the transaction at `txn_pos`), unbuffered."""
        if pos + n > self._limit:
            raise CorruptedTransactionError(self.path, "transaction runs past the end of the log", txn_pos)
        data = self.reader.file.read(pos, n)
        if len(data) < n:
            raise CorruptedTransactionError(self.path, "file ends inside a transaction", txn_pos)
        return data

    def _table_batch(self, th: fmt.TxnHeader, j: int) -> array:
        """Record starts of records [j, j + TABLE_BATCH) of a large `th`, and the next start."""
        count = min(TABLE_BATCH, th.nrec - j)
        more = j + count < th.nrec
        data = self._read(th.records_end + fmt.TABLE_ENTRY_SIZE * j,
                          fmt.TABLE_ENTRY_SIZE * (count + more), th.pos)
        starts = array("Q", map(itemgetter(1), _TABLE_ENTRY.iter_unpack(data)))
        if not more:
            starts.append(th.records_end)
        return starts

    def _check_large_table(self, th: fmt.TxnHeader, keep: bytearray | None) -> int:
        """Check the oid table and trailer of a large `th` in batches, as `_table` does;
        how many of its records have their bit set in `keep`."""
        path, rend, nrec = self.path, th.records_end, th.nrec
        if th.next_pos > self._limit:
            raise CorruptedTransactionError(path, "transaction runs past the end of the log", th.pos)
        crc = 0
        ordered = True
        last = th.data_pos - 1
        kept = 0
        for j in range(0, nrec, TABLE_BATCH):
            count = min(TABLE_BATCH, nrec - j)
            data = self._read(rend + fmt.TABLE_ENTRY_SIZE * j, fmt.TABLE_ENTRY_SIZE * count, th.pos)
            crc = fmt.crc32(data, crc)
            starts = array("Q", map(itemgetter(1), _TABLE_ENTRY.iter_unpack(data)))
            ordered = (ordered and (starts[0] == th.data_pos if not j else starts[0] > last)
                       and all(map(lt, starts, islice(starts, 1, None))))
            last = starts[-1]
            if ordered and keep is not None and last // MIN_RECORD >> 3 < len(keep):
                kept += _count_kept(starts, len(starts), keep)
            if self.progress is not None:
                self.progress("copy", th.pos, self.gc.end)
        tail = self._read(rend + fmt.TABLE_ENTRY_SIZE * nrec, fmt.CRC_SIZE + fmt.TRAILER_SIZE, th.pos)
        if crc != _CRC.unpack_from(tail)[0]:
            raise CorruptedTransactionError(path, "oid table checksum mismatch", rend)
        fmt.check_trailer(tail, fmt.CRC_SIZE, th, path)
        if not ordered or last >= rend:
            raise CorruptedTransactionError(path, "oid table does not match the records", rend)
        return kept

    def _record(self, th: fmt.TxnHeader, starts: array, i: int) -> fmt.DataRecord:
        """Record i of `starts`, checked against its oid table entry."""
        pos = starts[i]
        length = starts[i + 1] - pos
        buf, off = self._view(pos, length)
        rec = fmt.decode_data_record(buf, off, self.path, pos)
        if rec.length != length or rec.tid != th.tid or rec.tpos != th.pos:
            raise CorruptedDataError(self.path, "data record does not match its transaction", pos)
        return rec

    def _records(self, th: fmt.TxnHeader) -> Iterator[fmt.DataRecord]:
        """Every record of `th`, checked (a large one's table first, then in batches)."""
        if self._whole(th):
            starts = self._table(th)
            for i in range(th.nrec):
                yield self._record(th, starts, i)
            return
        self._check_large_table(th, None)
        for j in range(0, th.nrec, TABLE_BATCH):
            starts = self._table_batch(th, j)
            for i in range(len(starts) - 1):
                yield self._record(th, starts, i)

    def _copy_kept(self, th: fmt.TxnHeader, keep: bytearray, keep_empty: bool) -> bool:
        """Copy the records of `th` (before the pack time) whose bit is set in `keep`.

        The oid table says where each record starts: a record not kept is not
        even looked at; kept ones are checked and rewritten with the new tpos
        by `fmt.relocate_kept` (in C when the extension is built), streamed to
        the new file.  Before the pack time an object has one kept record,
        unless a later backpointer kept more (gc.future_oids): prev is 0
        without a lookup.  Returns False if nothing was written."""
        whole = self._whole(th)
        if whole:
            starts = self._table(th)
            chosen = _count_kept(starts, th.nrec, keep)
        else:
            chosen = self._check_large_table(th, keep)
        self.removed_records += th.nrec - chosen
        if not chosen and not keep_empty:
            return False
        txn = _TxnOut(self, th, fmt.STATUS_PACKED)
        if whole:
            self._relocate(th, txn, starts, keep, self._buf, self._buf_pos)
        else:
            for j in range(0, th.nrec, TABLE_BATCH):
                self._relocate(th, txn, self._table_batch(th, j), keep, b"", 0)
        txn.finish()
        return True

    def _relocate(self, th: fmt.TxnHeader, txn: _TxnOut, starts: array, keep: bytearray,
                  buf, base: int) -> None:
        """Write the kept records of `starts` (all but its last item start one) to `txn`.

        `buf` holds the old file from `base`; a record outside it is read (with
        those after it, READ_CHUNK at least) when reached."""
        path = self.path
        future, targets = self.gc.future_oids, self.gc.targets
        index_get = self.index.get
        sorted_targets = self._sorted_targets() if targets else None
        tid, old_tpos, tpos = th.tid, th.pos, txn.tpos
        moved = bytearray()
        prev_of = (lambda oid: index_get(oid, 0) if oid in future else 0) if future else None
        i, n = 0, len(starts) - 1
        relocate = fmt.relocate_kept
        while i < n:
            table = bytearray()
            i, end, count, status = relocate(buf, base, starts, i, n, keep, tid, old_tpos, tpos, txn.pos,
                                             prev_of, sorted_targets, txn.out, table, moved, OUT_LIMIT,
                                             path)
            txn.added(table, count, end)
            if moved:
                pairs = array("Q", moved)
                self._moved_old.extend(pairs[0::2])
                self._moved_new.extend(pairs[1::2])
                moved = bytearray()
            if status == fmt.RELOC_OUTSIDE:  # read on from record i
                pos = starts[i]
                length = starts[i + 1] - pos
                buf = b""  # let the old window go first
                buf = self._read(pos, min(max(length, READ_CHUNK), starts[n] - pos), th.pos)
                base = pos
                if self.progress is not None:
                    self.progress("copy", pos, self.gc.end)
            elif status == fmt.RELOC_STOP:  # a backpointer
                pos = starts[i]
                rec = fmt.decode_data_record(buf, pos - base, path, pos)
                if rec.length != starts[i + 1] - pos or rec.tid != tid or rec.tpos != old_tpos:
                    raise CorruptedDataError(path, "data record does not match its transaction", pos)
                data, refs, known, back = self._backpointer(rec, None)
                if targets and pos in targets:
                    self._moved_old.append(pos)
                    self._moved_new.append(txn.pos)
                oid = rec.oid
                txn.add(oid, fmt.encode_data_record(oid, tid, prev_of(oid) if prev_of else 0, tpos,
                                                    refs, data, back, known))
                i += 1
            elif status == fmt.RELOC_FULL:
                txn.flush()

    def _sorted_targets(self) -> array:
        if self._targets_sorted is None or len(self._targets_sorted) != len(self.gc.targets):
            self._targets_sorted = array("Q", sorted(self.gc.targets))
        return self._targets_sorted

    # -- writing

    def _moved(self, old: int) -> int:
        i = bisect_left(self._moved_old, old)
        if i < len(self._moved_old) and self._moved_old[i] == old:
            return self._moved_new[i]
        return 0

    def _backpointer(self, rec: fmt.DataRecord, check: list[bytes] | None):
        """(data, refs, refs_known, back) to write for a backpointer record."""
        known = rec.refs_known
        if not rec.back:
            return None, b"", known, 0
        back = self._moved(rec.back)
        if back:
            return None, b"", known, back
        target = self.reader.resolve(rec)  # the target was dropped: write its data inline
        if target is None:
            return None, b"", known, 0
        if check is not None:
            check.append(target.refs if target.refs_known else self.refs_of(target))
        return target.data, target.refs, target.refs_known, 0

    def _write_txn(self, th: fmt.TxnHeader, recs: Iterable[fmt.DataRecord],
                   check: list[bytes] | None = None) -> None:
        """Write a whole transaction from after the pack time (status kept), streamed.

        Adds to `check` the refs of the data written."""
        txn = _TxnOut(self, th, th.status)
        tpos = txn.tpos
        encode = fmt.encode_data_record
        index_get = self.index.get
        moved_old, moved_new = self._moved_old, self._moved_new
        for rec in recs:
            oid = rec.oid
            if rec.is_backpointer:
                data, refs, known, back = self._backpointer(rec, check)
            else:
                data, refs, known, back = rec.data, rec.refs, rec.refs_known, 0
                if check is not None:
                    check.append(refs if known else self.refs_of(rec))
            moved_old.append(rec.pos)
            moved_new.append(txn.pos)
            txn.add(oid, encode(oid, rec.tid, index_get(oid, 0), tpos, refs, data, back, known))
        txn.finish()

    # -- the regions

    def copy_before(self, stop: int, keep_last: bool) -> None:
        """Copy the kept records of the transactions in [HEADER_SIZE, stop), with status 'p'.

        keep_last: the last transaction stays even if it keeps no record."""
        keep = self.gc.keep
        self._region(stop)
        pos = fmt.HEADER_SIZE
        while pos < stop:
            th = self._txn_header(pos)
            if th.next_pos > stop:
                raise CorruptedTransactionError(self.path, "transaction runs past the pack position", pos)
            lo = th.data_pos // MIN_RECORD >> 3
            hi = (max(th.records_end - 1, th.data_pos) // MIN_RECORD >> 3) + 1
            if keep.count(0, lo, hi) == hi - lo and not (keep_last and th.next_pos == stop):
                # no kept record here: skip it unread
                self.removed_records += th.nrec
                self.removed_txns += 1
                self._check_trailer(th)
            elif not self._copy_kept(th, keep, keep_last and th.next_pos == stop):
                self.removed_txns += 1
            pos = th.next_pos

    def copy_after(self, start: int, stop: int, live_index: OidIndex | None = None) -> int:
        """Copy the transactions in [start, stop) whole; return how many.

        With `live_index` (transactions committed during the pack) refuse one
        that references an object the pack removed."""
        self._region(stop)
        pos = start
        count = 0
        while pos < stop:
            th = self._txn_header(pos)
            check: list[bytes] | None = [] if live_index is not None else None
            self._write_txn(th, self._records(th), check)
            if check:
                self._check_refs(th, check, live_index)
            pos = th.next_pos
            count += 1
        return count

    def _check_refs(self, th: fmt.TxnHeader, check: list[bytes], live_index: OidIndex) -> None:
        new_get = self.index.get
        for refs in check:
            for oid in fmt.split_refs(refs):
                if new_get(oid) is not None:
                    continue
                pos = live_index.get(oid)
                if pos is None:
                    continue  # a dangling reference already
                rec = self.reader.read_data_record(pos, oid)
                if rec.is_backpointer and not rec.back:
                    continue  # a deleted object
                raise PackError(
                    f"{self.path}: transaction {th.tid.hex()}, committed during the pack, references "
                    f"object {oid.hex()}, which the pack removed (it was unreachable at the pack "
                    "time); the pack was abandoned and nothing changed: pack again")


# -- the whole pack ---------------------------------------------------------------------

def run_gc(reader: LogReader, index, end: int, pack_tid: bytes, gc: bool,
           refs_of: Callable[[fmt.DataRecord], bytes], progress: Progress | None = None
           ) -> tuple[GC, str]:
    """Decide what a pack to `pack_tid` keeps; the reason when it would do nothing.

    Shared by pack and by `refstorage info`'s forecast, so both decide alike."""
    g = GC(reader, index, end, pack_tid, gc, refs_of, progress)
    g.run()
    if g.redundant:
        return g, "already packed to a later time"
    if g.pack_pos <= fmt.HEADER_SIZE:
        return g, "no transaction before the pack time"
    return g, ""


class GCUnsafeError(PackError):
    """Garbage collection cannot tell what is reachable; internal to pack,
    which then goes on without it (keeping every object)."""

    records: list[tuple[bytes, int, str]] = []

    def skipped(self) -> str:
        """Why collection was skipped, for the report."""
        return str(self)


class NoRootError(GCUnsafeError):
    """The database has no root object (oid 0): nothing is reachable."""

    def skipped(self) -> str:
        return (f"{self}: no object was collected (ZODB's FileStorage refuses to pack it; "
                "collecting would remove every object)")


class UnreadableReferencesError(GCUnsafeError):
    """Records whose references are not stored have data that cannot be decoded.

    `records` lists (oid, position, why) of each such record met."""

    def __init__(self, records: list[tuple[bytes, int, str]]):
        oid, pos, why = records[0]
        more = f" (and {len(records) - 1:,} more)" if len(records) > 1 else ""
        super().__init__(f"the references of oid {oid.hex()} (record at {pos}){more} are not "
                         f"stored and its data cannot be decoded ({why})")
        self.records = records

    def skipped(self) -> str:
        return f"{self}: no object was collected, since anything could be reachable from them"


class _RefsReader:
    """refs_of(record) for records whose references are not stored.

    A record `referencesf` cannot decode counts as referencing nothing and is
    listed in `unreadable`: the caller must not collect garbage then (right
    only without gc, where references cannot cause an object's removal)."""

    def __init__(self, referencesf: Callable):
        self.referencesf = referencesf
        self.unreadable: list[tuple[bytes, int, str]] = []

    def __call__(self, rec: fmt.DataRecord) -> bytes:
        try:
            return fmt.pack_refs(self.referencesf(rec.data))
        except Exception as exc:
            self.unreadable.append((rec.oid, rec.pos, repr(exc)))
            return b""

    def check(self) -> None:
        """UnreadableReferencesError if a record could not be decoded."""
        if self.unreadable:
            raise UnreadableReferencesError(self.unreadable)


def _chunks(file: fileio.DataFile, end: int) -> Iterator[bytes]:
    pos = 0
    while pos < end:
        data = file.read(pos, min(READ_CHUNK, end - pos))
        if not data:
            raise StorageIOError(file.path, "file ended early while copying it", pos)
        yield data
        pos += len(data)


def _keep_old(path: str, old_path: str, file: fileio.DataFile) -> None:
    """`old_path` becomes a second name of the current file (a copy if hard links fail)."""
    try:
        fileio.link_durably(path, old_path)
    except StorageIOError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS,
                             errno.EXDEV):
            raise
        logger.info("%s: cannot hard-link (%s); copying the file to %s instead", path, exc, old_path)
        fileio.atomic_write(old_path, _chunks(file, file.size))


def pack_storage(storage: StorageCore, t: float, referencesf: Callable, gc: bool,
                 progress: Progress | None = None) -> PackReport:
    """Pack a refstorage FileStorage to time `t` (see the module docstring)."""
    started = time.perf_counter()
    pack_tid = pack_tid_for(t)
    with _exclusive(storage):
        try:
            report = _Pack(storage, pack_tid, _RefsReader(referencesf), gc, progress).run()
        except GCUnsafeError as exc:
            # Collect nothing, but still drop the old revisions (ZODB's pack
            # aborts here).
            logger.warning("%s: %s; packing without garbage collection", storage.getName(), exc)
            report = _Pack(storage, pack_tid, _RefsReader(referencesf), False, progress).run()
            report.gc_skipped = exc.skipped()
            report.unreadable = [(oid, pos) for oid, pos, _why in exc.records]
        if report.packed and getattr(storage, "blob_dir", None):
            # the blob files of the revisions the packed file no longer holds
            from .blobs import pack_blobs
            pack_blobs(storage)
    report.seconds = time.perf_counter() - started
    logger.info("%s", report)
    return report


class _Pack:
    def __init__(self, storage: StorageCore, pack_tid: bytes, refs_of: _RefsReader, gc: bool,
                 progress: Progress | None):
        self.storage = storage
        self.pack_tid = pack_tid
        self.refs_of = refs_of
        self.gc = gc
        self.progress = progress
        self.path = storage.getName()

    def run(self) -> PackReport:
        s = self.storage
        if s.closed:
            raise PackError(f"{self.path}: the storage is closed")
        # gc only looks oids up, which is safe while commits go on; without
        # gc every oid is visited: that needs a copy of the index
        snap = s.read_snapshot(copy_index=not self.gc)
        reader, end, index = snap.reader, snap.end, snap.index
        last_tid, old_pack_tid = snap.last_tid, snap.pack_tid
        del snap
        report = PackReport(self.path, self.pack_tid, bytes_before=end, bytes_after=end)
        if end <= fmt.HEADER_SIZE:
            report.reason = "the storage is empty"
            return report
        if self.pack_tid <= old_pack_tid:
            report.reason = f"already packed to {TimeStamp(old_pack_tid)}, not earlier than this time"
            return report
        # Never record a pack time later than the last transaction: later
        # transactions would look packed.
        pack_tid = report.pack_tid = min(self.pack_tid, last_tid)
        logger.info("%s: packing to %s (%d bytes)", self.path, TimeStamp(pack_tid), end)
        if self.gc and index.get(fmt.Z64) is None:
            raise NoRootError(f"{self.path} has no root object (oid 0)")
        gc, reason = run_gc(reader, index, end, pack_tid, self.gc, self.refs_of, self.progress)
        if self.gc:
            self.refs_of.check()
        del index  # (no reference to the old state is kept: it goes as soon as it is replaced)
        if reason:
            report.reason = reason
            return report
        fileio.point("pack.after-gc")
        return self._copy_and_swap(reader, end, gc, report)

    def _copy_and_swap(self, reader: LogReader, end: int, gc: GC, report: PackReport) -> PackReport:
        s = self.storage
        pack_path = self.path + ".pack"
        fileio.remove_if_exists(pack_path)
        file_id = uuid.uuid4().bytes
        out = fileio.DataFile(pack_path, create=True)
        replaced = False
        try:
            writer = _Writer(out, fmt.encode_file_header(file_id, report.pack_tid))
            copier = _Copier(reader, writer, gc, self.refs_of, self.progress)
            copier.copy_before(gc.pack_pos, keep_last=gc.pack_pos == end)
            if not copier.removed_records and not copier.removed_txns:
                report.reason = "nothing to remove"
                return report
            copier.copy_after(gc.pack_pos, end)
            with s.commit_lock:
                if s.closed:
                    raise PackError(f"{self.path}: the storage was closed during the pack")
                now = s.read_snapshot()  # stable while the commit lock is held
                if now.file is not reader.file:
                    raise PackError(f"{self.path}: the storage's file changed during the pack")
                final_end = now.end
                objects_before = len(now.index)
                report.transactions_during_pack = copier.copy_after(end, final_end, now.index)
                del now
                if self.gc:
                    self.refs_of.check()  # one committed meanwhile: nothing changed yet
                writer.flush()
                copier.release()  # the buffers and bitmaps: saving the index reuses that memory
                fileio.point("pack.after-copy")
                out.sync()
                fileio.point("pack.after-fsync")
                old_path = self.path + ".old"
                fileio.remove_if_exists(old_path)
                if s.pack_keep_old:
                    _keep_old(self.path, old_path, reader.file)
                    fileio.point("pack.after-link-old")
                fileio.replace_durably(pack_path, self.path)
                replaced = True
                out.path = self.path
                fileio.point("pack.after-replace")
                s.install_packed(out, copier.index, writer.pos, file_id, report.pack_tid)
                fileio.point("pack.after-index-save")
        finally:
            if not replaced:
                out.close()
                try:
                    fileio.remove_if_exists(pack_path)
                except StorageIOError:
                    logger.exception("%s: could not remove %s", self.path, pack_path)
        report.packed = True
        report.bytes_before = final_end
        report.bytes_after = writer.pos
        report.revisions_removed = copier.removed_records
        report.transactions_removed = copier.removed_txns
        report.objects_removed = objects_before - len(copier.index)
        return report
