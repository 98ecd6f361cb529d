"""`refstorage verify`: check a whole file, and the references between current objects.

One pass over the log (`walk`) decodes and checksums every transaction and
record and checks

- the file header, every transaction header, oid table and trailer, every
  record's checksum, length, tid and transaction position;
- that tids increase and no transaction was left unfinished;
- each record's prev: the position of the same oid's newest record in an
  earlier transaction (0 if there is none) -- which is exactly what the
  storage, pack and restore write, so "an earlier record of the same oid";
- each backpointer: an earlier transaction's record of the same oid;
- the index file, if there is one: usable by the rule open applies
  (`recovery.check_saved_index`), and its entries equal to the index a scan
  builds up to the position it covers;
- with the database's blob directory: that every committed blob file
  belongs to a record of its oid and tid (one that does not was left by a
  transaction that never committed, e.g. after a crash; the next pack
  removes it), and that every blob revision has its file (for an undo's
  backpointer, the current one).

Then every current record is read once more (in file order) for its stored
references: a reference to an oid with no current revision, or to a deleted
object, is a dangling reference (a POSKeyError waiting to happen).  Records
whose references are not stored (REFS_UNKNOWN) are counted, not judged.

Speed and memory: with the C extension, a transaction up to FAST_TXN is read
whole and its records checked in C (`_refscan.check_records`, the same checks
as `log._checked_records`); only a transaction that fails them is decoded in
Python, which names the error.  The records are then judged from arrays, and
the references pass reads the current records through `_refscan.gc_refs`.  The
walk's oid -> position map is `_refscan.OidMap`, a hash table in C (16 bytes a
slot, at most 3/4 full): one `swap_table` call per transaction gives its
records' expected prevs and sets them, and the index file is compared with
`OidMap.same_as` (an OidIndex is built from the map only to list differences).
Without the extension, its twin `common.PyOidMap` keeps an OidIndex fed in dict
batches of at most INDEX_BATCH entries.  A decoded transaction's records go to
the map RECORD_BATCH at a time, so memory does not grow with a transaction.
"""

from __future__ import annotations

import os
import time
from array import array
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import and_, ne

from .. import fileformat as fmt
from .. import fileio
from ..errors import CorruptedError
from ..index import OidIndex
from ..recovery import check_saved_index
from .common import Log, Progress, PyOidMap, oid_repr, phase, tid_repr
from .common import OidMap as _OidMap
from .walk import Damage, walk

try:
    from .._refscan import check_records as _check_records
    from .._refscan import gc_refs as _gc_refs
    from .._refscan import sort_positions as _sort_positions
except ImportError:  # pragma: no cover - depends on the build (the extension is optional)
    _check_records = _gc_refs = _sort_positions = None
if _OidMap is PyOidMap:  # pragma: no cover - depends on the build
    _OidMap = None

MAX_PROBLEMS = 10_000  # problems kept in the report (all are counted)
MAX_LISTED = 20
FAST_TXN = 8 << 20  # a transaction up to this size is read whole and its records checked in C
INDEX_BATCH = 1 << 18  # Python path: index entries merged at once (PyOidMap): a dict of at most this many
RECORD_BATCH = 1 << 16  # a transaction with more records goes to the index this many at a time
WINDOW = 1 << 20  # reads of the references pass
_NO_PACK_POS = (1 << 63) - 1


@dataclass
class Problem:
    kind: str  # header, damage, torn-tail, moved, prev, backpointer, index, dangling
    message: str
    offset: int | None = None
    oid: bytes | None = None
    referrer: bytes | None = None  # dangling: the oid whose record holds the reference

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        return f"{self.kind}{where}: {self.message}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "message": self.message, "offset": self.offset,
                "oid": self.oid.hex() if self.oid is not None else None}


@dataclass
class VerifyReport:
    path: str
    size: int = 0
    transactions: int = 0
    records: int = 0
    objects: int = 0  # oids with a current record (deleted ones included)
    deleted: int = 0  # of which the current record is a deletion
    backpointers: int = 0
    bytes_skipped: int = 0  # in damaged stretches
    refs_unknown: int = 0  # records whose references are not stored
    refs_unknown_current: list[tuple[bytes, int]] = field(default_factory=list)  # (oid, pos)
    refs_unknown_current_count: int = 0
    index_file: str = "absent"  # absent, checked, ignored (why)
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.counts

    @property
    def problem_count(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, message: str, offset: int | None = None, oid: bytes | None = None,
            referrer: bytes | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(kind, message, offset, oid, referrer))

    def to_json(self) -> dict:
        return {
            "path": self.path, "ok": self.ok, "size": self.size, "transactions": self.transactions,
            "records": self.records, "objects": self.objects, "deleted": self.deleted,
            "backpointers": self.backpointers, "bytes_skipped": self.bytes_skipped,
            "refs_unknown": {"records": self.refs_unknown, "current": self.refs_unknown_current_count,
                             "current_records": [{"oid": o.hex(), "offset": p}
                                                 for o, p in self.refs_unknown_current]},
            "index_file": self.index_file, "problem_counts": dict(self.counts),
            "problems": [p.to_json() for p in self.problems], "seconds": round(self.seconds, 3),
        }


class _SavedIndex:
    def __init__(self, index: OidIndex, pos: int, tid: bytes):
        self.index = index
        self.pos = pos
        self.tid = tid


def verify(path: str, progress: Progress | None = None, blob_dir: str | None = None) -> VerifyReport:
    """Check the file at `path` (read-only; a storage may have it open meanwhile).

    With `blob_dir`, the blob files are checked against the records too."""
    started = time.perf_counter()
    report = VerifyReport(str(path))
    with Log(path, allow_bad_header=True) as log:
        report.size = log.size
        if log.header_error is not None:
            report.add("header", log.header_error.detail, log.header_error.offset)
        _Verifier(log, report, _blob_files(blob_dir, report) if blob_dir else None).run(progress)
    report.seconds = time.perf_counter() - started
    return report


class _BlobFiles:
    """The committed blob files of a blob directory: {oid: {tid: path}}."""

    def __init__(self, fshelper, files: dict[bytes, dict[bytes, str]]):
        self.fshelper = fshelper
        self.files = files
        self.unmatched = {oid: dict(tids) for oid, tids in files.items()}


def _blob_files(blob_dir: str, report: VerifyReport) -> _BlobFiles | None:
    from ZODB.blob import BLOB_SUFFIX, FilesystemHelper

    if not os.path.isdir(blob_dir):
        report.add("blob", f"blob directory {blob_dir} does not exist")
        return None
    try:
        fshelper = FilesystemHelper(os.path.abspath(blob_dir))
        files: dict[bytes, dict[bytes, str]] = {}
        for oid, oid_path in fshelper.listOIDs():
            for name in os.listdir(oid_path):
                if name.endswith(BLOB_SUFFIX):
                    blob = os.path.join(oid_path, name)
                    files.setdefault(oid, {})[fshelper.splitBlobFilename(blob)[1]] = blob
    except (OSError, ValueError) as exc:
        report.add("blob", f"blob directory {blob_dir} cannot be read: {exc}")
        return None
    return _BlobFiles(fshelper, files)


class _Verifier:
    def __init__(self, log: Log, report: VerifyReport, blobs: _BlobFiles | None = None):
        self.log = log
        self.blobs = blobs
        self.reader = log.reader
        self.report = report
        # oid -> position of its newest record: `_refscan.OidMap` (a hash table in C), or
        # its Python twin, an OidIndex fed in dict batches
        self.index = _OidMap() if _OidMap is not None else PyOidMap(INDEX_BATCH, RECORD_BATCH)
        self.deleted: set[bytes] = set()
        self.damaged: list[tuple[int, int]] = []
        self._checked: tuple[int, bytes, bytearray] | None = None  # see _decode
        self.saved = self._load_saved_index()

    # -- the index file ----------------------------------------------------------------

    def _load_saved_index(self) -> _SavedIndex | None:
        """The index file, judged by the rule open uses (`recovery.check_saved_index`)."""
        log, report = self.log, self.report
        ipath = log.path + ".index"
        if not fileio.exists(ipath):
            return None
        saved = check_saved_index(self.reader, ipath, log.file_id, log.size)
        if saved.state == "absent":
            return None
        if saved.index is None:
            report.index_file = saved.state
            if saved.state == "unreadable":
                report.add("index", f"{saved.why} (the storage ignores it and rebuilds the index)")
            else:
                report.add("index", f"{ipath}: {saved.why}; the storage ignores it and rebuilds the index")
            return None
        report.index_file = "not compared"
        return _SavedIndex(saved.index, saved.pos, saved.tid or b"\0" * 8)

    def _compare_saved(self, tid: bytes | None) -> None:
        saved, report = self.saved, self.report
        self.saved = None
        ipath = self.log.path + ".index"
        if self.damaged:
            report.index_file = "not compared (damage before its end)"
            return
        if (tid or b"\0" * 8) != saved.tid:
            report.index_file = "mismatch"
            report.add("index", f"{ipath} says the transaction ending at {saved.pos} has tid "
                       f"{saved.tid.hex()}, the data file's has {(tid or b'').hex() or 'none'}")
            return
        if self.index.same_as(saved.index):
            diffs, listed = 0, []
        else:
            diffs, listed = _index_diffs(saved.index, self.index.to_index())
        if diffs:
            report.index_file = "mismatch"
            report.add("index", f"{ipath} differs from the index a scan builds in {diffs} entries: "
                       + "; ".join(listed))
        else:
            report.index_file = f"checked ({len(saved.index)} entries up to {saved.pos})"

    # -- the walk -----------------------------------------------------------------------

    def _in_damage(self, pos: int) -> bool:
        return any(start <= pos < end for start, end in self.damaged)

    def run(self, progress: Progress | None) -> None:
        log, report, reader = self.log, self.report, self.reader
        last_tid = None
        moved = 0
        if self.saved is not None and self.saved.pos == fmt.HEADER_SIZE:
            self._compare_saved(None)
        for item in walk(reader, fmt.HEADER_SIZE, log.size, self._decode, progress):
            if isinstance(item, Damage):
                self._damage(item)
                continue
            th, recs, delta = item
            report.transactions += 1
            last_tid = th.tid
            if delta != moved:
                moved = delta
                self._moved(th, delta)
            if recs is None:
                self._checked_txn(th)
            else:
                self._records(th, recs, delta)
            if self.saved is not None and th.next_pos == self.saved.pos:
                self._compare_saved(last_tid)
        if self.saved is not None:
            report.index_file = "mismatch"
            report.add("index", f"{log.path}.index covers up to {self.saved.pos}, "
                       "which is not the end of a good transaction")
        report.objects = len(self.index)
        report.deleted = len(self.deleted)
        self._check_references(progress)
        if self.blobs is not None:
            for oid, tids in sorted(self.blobs.unmatched.items()):
                for tid, blob in sorted(tids.items()):
                    report.add("blob", f"blob file {blob} (oid {oid_repr(oid)}, tid {tid_repr(tid)}) "
                               "has no record in the data file: left by a transaction that never "
                               "committed (a pack removes it)", oid=oid)

    def _decode(self, th: fmt.TxnHeader) -> bool:
        """walk's question: decode this transaction's records in Python?  No when the C check
        (`_refscan.check_records`, the twin of `log._checked_records`) passes them all: the
        walk then checks the oid table and trailer, and `_checked_txn` takes what the C check
        found.  Yes when it finds anything wrong: the Python path names the error (and
        tells damage from a moved transaction)."""
        self._checked = None
        size = th.tlen + fmt.TRAILER_SIZE
        if _check_records is None or self.blobs is not None or size > FAST_TXN:
            return True
        buf = self.reader.file.read(th.pos, size)
        if len(buf) < size:
            return True
        start = th.records_end - th.pos
        table = buf[start:start + fmt.TABLE_ENTRY_SIZE * th.nrec]
        info = bytearray()
        _n, ok = _check_records(buf, th.pos, table, th.data_pos, th.records_end, th.tid, th.pos, info)
        if not ok:
            return True
        self._checked = (th.pos, table, info)
        return False

    def _checked_txn(self, th: fmt.TxnHeader) -> None:
        """What `_records` does, for a transaction whose records the C check passed: the same
        judgements from the oid table and the (prev, backpointer, flags) array, with C-level
        passes over them (a record is decoded again only to report it).  The oid map's
        `swap_table` gives every record's expected prev and sets the transaction's entries."""
        (_pos, table, raw), self._checked = self._checked, None  # set by _decode for th
        report, deleted = self.report, self.deleted
        expected = self.index.swap_table(table)
        n = len(expected)
        info = array("Q", raw)
        flags = info[2::3]
        if info[0::3] != expected:
            for k in compress(range(n), map(ne, info[0::3], expected)):
                rec = self.reader.read_data_record(_entry_pos(table, k), _entry_oid(table, k))
                self._bad_prev(rec, expected[k])
        if deleted:
            deleted.difference_update(map(_entry_oid, repeat(table, n), range(n)))
        bp, unknown = fmt.FLAG_BACKPOINTER, fmt.FLAG_REFS_UNKNOWN
        kinds = set(flags)
        if any(f & bp for f in kinds):
            backs = info[1::3]
            for k in compress(range(n), map(and_, flags, repeat(bp))):
                report.backpointers += 1
                oid = _entry_oid(table, k)
                if backs[k]:
                    self._check_backpointer(self.reader.read_data_record(_entry_pos(table, k), oid), th.pos)
                else:
                    deleted.add(oid)
        for f in kinds:
            if f & (bp | unknown) == unknown:
                report.refs_unknown += flags.count(f)
        report.records += n

    def _records(self, th: fmt.TxnHeader, recs, delta: int) -> None:
        """Judge the decoded records of `th` (prev, backpointers, deletions, blobs), put them in
        the index RECORD_BATCH at a time (memory does not grow with the transaction)."""
        report, index, deleted = self.report, self.index, self.deleted
        index_get = index.get
        tpos = th.pos
        local: dict[bytes, int] = {}
        for rec in recs:
            oid = rec.oid
            expected = index_get(oid, 0)
            if rec.prev != expected and not delta:
                self._bad_prev(rec, expected)
            if rec.flags & fmt.FLAG_BACKPOINTER:
                report.backpointers += 1
                if rec.back:
                    if not delta:
                        self._check_backpointer(rec, tpos)
                    deleted.discard(oid)
                else:
                    deleted.add(oid)
            else:
                deleted.discard(oid)
                if rec.flags & fmt.FLAG_REFS_UNKNOWN:
                    report.refs_unknown += 1
            local[oid] = rec.pos
            report.records += 1
            if len(local) >= RECORD_BATCH:
                index.update(local)
                local = {}
        index.update(local)
        if self.blobs is not None:
            for rec in recs:
                self._blob_revision(rec)

    def _blob_revision(self, rec: fmt.DataRecord) -> None:
        report, unmatched, files = self.report, self.blobs.unmatched, self.blobs.files
        tids = unmatched.get(rec.oid)
        if tids is not None:
            tids.pop(rec.tid, None)
        # every revision of a blob has its file (loadBlob(oid, tid) of an
        # older one, history and undo need it); backpointers: below, if current
        if rec.data and _is_blob_record(rec.data) and rec.tid not in files.get(rec.oid, ()):
            report.add("blob", f"oid {oid_repr(rec.oid)} (record at {rec.pos}) is a blob whose "
                       f"file for tid {tid_repr(rec.tid)} is missing", rec.pos, rec.oid)

    def _damage(self, d: Damage) -> None:
        report = self.report
        self.damaged.append((d.start, d.end))
        report.bytes_skipped += d.length
        err = d.error
        where = f" (at offset {err.offset})" if err.offset is not None and err.offset != d.start else ""
        if d.end >= self.log.size:
            report.add("torn-tail", f"the last {d.length} bytes hold no finished transaction: "
                       f"{err.detail}{where}; a read-write open moves them to a side file", d.start)
        else:
            report.add("damage", f"{d.length} bytes [{d.start}, {d.end}) hold no valid transaction: "
                       f"{err.detail}{where}; the next valid transaction starts at {d.end}", d.start)

    def _moved(self, th: fmt.TxnHeader, delta: int) -> None:
        if not delta:
            return
        what = f"{-delta} bytes are missing" if delta < 0 else f"{delta} bytes were inserted"
        self.report.add("moved", f"the transaction at {th.pos} and those after it are intact but were "
                        f"written at {th.pos - delta}: {what} before them, so their positions (tpos, prev, "
                        "backpointers, oid tables) do not match the file; 'refstorage recover' rewrites them",
                        th.pos)

    def _bad_prev(self, rec: fmt.DataRecord, expected: int) -> None:
        if self._in_damage(rec.prev):
            return  # its previous record was in a damaged stretch (reported already)
        if rec.prev == 0:
            msg = f"prev is 0, but the oid's previous record is at {expected}"
        elif rec.prev >= rec.tpos:
            msg = f"prev {rec.prev} does not point to an earlier transaction"
        elif expected == 0:
            msg = f"prev points to {rec.prev}, but the oid has no earlier record"
        else:
            msg = f"prev {rec.prev} is not the oid's previous record ({expected})"
        self.report.add("prev", f"oid {oid_repr(rec.oid)} record at {rec.pos}: {msg}", rec.pos, rec.oid)

    def _check_backpointer(self, rec: fmt.DataRecord, tpos: int) -> None:
        back = rec.back
        msg = None
        if back >= tpos:
            msg = f"backpointer {back} does not point to an earlier transaction"
        elif self._in_damage(back):
            msg = f"backpointer {back} points into a damaged stretch: the data it stands for is lost"
        else:
            try:
                target = self.reader.read_data_record(back, rec.oid)
            except CorruptedError as exc:
                msg = f"backpointer {back} does not lead to a record of this oid: {exc.detail}"
            else:
                if target.tid >= rec.tid:
                    msg = f"backpointer {back} points to a record of tid {tid_repr(target.tid)}, not earlier"
        if msg is not None:
            self.report.add("backpointer", f"oid {oid_repr(rec.oid)} record at {rec.pos}: {msg}",
                            rec.pos, rec.oid)

    # -- references between current objects --------------------------------------------

    def _check_references(self, progress: Progress | None = None) -> None:
        report, reader, index = self.report, self.reader, self.index
        positions = index.positions()
        if _sort_positions is not None:
            _sort_positions(positions)
        else:
            positions = array("Q", sorted(positions))
        phase(progress, "verify: references", len(positions), "objects")
        listening = progress is not None and hasattr(progress, "phase")
        read = reader.file.read
        lookup = index.lookup
        deleted = self.deleted
        fast = _gc_refs is not None and self.blobs is None
        found = bytearray()
        wbuf, wpos = b"", 0
        i, n = 0, len(positions)
        slow = False  # positions[i] is for the Python path
        try:
            while i < n:
                if fast and not slow:
                    # current records with stored references, in C (`_refscan.gc_refs`, every
                    # record checksummed); their references judged in bulk; a record it leaves
                    # (backpointer, references not stored, damage) or a chunk holding a
                    # dangling reference goes through the Python path below
                    pos = positions[i]
                    if pos < wpos or pos + fmt.DATA_HEADER_SIZE > wpos + len(wbuf):
                        wbuf, wpos = b"", pos
                        wbuf = read(pos, WINDOW)
                    j, status = _gc_refs(wbuf, wpos, positions, i, n, _NO_PACK_POS, found, 1)
                    if found:
                        raw = bytes(found)
                        absent = 0 in lookup(raw)
                        if absent or deleted and not deleted.isdisjoint(fmt.split_refs(raw)):
                            for k in range(i, j):
                                self._check_current(reader.read_data_record(positions[k]))
                        found = bytearray()
                    if listening and (j >> 12) != (i >> 12):
                        progress(j)
                    slow = status == fmt.RELOC_STOP or (status == fmt.RELOC_OUTSIDE and j == i
                                                        and wpos == positions[j])
                    i = j
                    continue
                slow = False
                self._check_current(reader.read_data_record(positions[i]))
                i += 1
                if listening and not i % 4096:
                    progress(i)
        except CorruptedError as exc:  # a current record the walk could not have checked
            report.add("damage", f"current record unreadable: {exc.detail}", exc.offset)

    def _check_current(self, rec: fmt.DataRecord) -> None:
        """The references of one current record (and a current backpointer's blob file)."""
        report, reader, index, deleted = self.report, self.reader, self.index, self.deleted
        data_rec = rec
        if rec.flags & fmt.FLAG_BACKPOINTER:
            if not rec.back:
                return
            try:
                data_rec = reader.resolve(rec)
            except CorruptedError:
                return  # reported by the walk
            if data_rec is None:
                return
        if (self.blobs is not None and data_rec is not rec and data_rec.data
                and _is_blob_record(data_rec.data)
                and rec.tid not in self.blobs.files.get(rec.oid, ())):
            report.add("blob", f"oid {oid_repr(rec.oid)} (record at {rec.pos}) is a blob whose "
                       f"file for tid {tid_repr(rec.tid)} is missing", rec.pos, rec.oid)
        if data_rec.flags & fmt.FLAG_REFS_UNKNOWN:
            report.refs_unknown_current_count += 1
            if len(report.refs_unknown_current) < MAX_PROBLEMS:
                report.refs_unknown_current.append((rec.oid, rec.pos))
            return
        if not data_rec.refs:
            return
        for ref in fmt.split_refs(data_rec.refs):
            if ref not in index:
                why = "which does not exist"
            elif ref in deleted:
                why = "which is deleted"
            else:
                continue
            report.add("dangling", f"oid {oid_repr(rec.oid)} (record at {rec.pos}) references "
                       f"oid {oid_repr(ref)}, {why}", rec.pos, ref, rec.oid)


def _entry_oid(table: bytes, k: int) -> bytes:
    """The oid of oid-table entry k."""
    return table[16 * k:16 * k + 8]


def _entry_pos(table: bytes, k: int) -> int:
    """The position of oid-table entry k."""
    return int.from_bytes(table[16 * k + 8:16 * k + 16], "big")


def _is_blob_record(data: bytes) -> bool:
    from ZODB.blob import is_blob_record

    return bool(is_blob_record(data))


def _index_diffs(saved: OidIndex, scanned: OidIndex) -> tuple[int, list[str]]:
    """How many entries differ between two indexes (both iterate in oid order), and a few of them."""
    diffs = 0
    listed: list[str] = []

    def note(msg: str) -> None:
        nonlocal diffs
        diffs += 1
        if len(listed) < 5:
            listed.append(msg)

    if len(saved) == len(scanned) and saved.blocks() == scanned.blocks():
        return 0, listed  # the same blocks: the same entries (different blocks may still be)
    a, b = saved.items(), scanned.items()
    x, y = next(a, None), next(b, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            note(f"oid {oid_repr(x[0])} at {x[1]} in the index file, but a scan does not find it")
            x = next(a, None)
        elif x is None or y[0] < x[0]:
            note(f"oid {oid_repr(y[0])} (at {y[1]}) is missing")
            y = next(b, None)
        else:
            if x[1] != y[1]:
                note(f"oid {oid_repr(x[0])} at {x[1]}, but its newest record is at {y[1]}")
            x, y = next(a, None), next(b, None)
    return diffs, listed
