"""`refstorage info`, `tail`, `history` and `refs`: what a file holds, from its stored references.

- `info`: size, counts, first and last transaction, how much of the file is
  history, space per class (current and historical), and what a pack to a
  given time would free (computed with pack's own GC: the same reachability
  from the root and from everything written after the pack time).
- `tail`: the last transactions, newest first.
- `history`: every revision of one object.
- `refs`: what an object references and which current objects reference it
  -- the question behind every POSKeyError.

Class names are read from the pickles' opcodes; nothing is unpickled.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from .. import fileformat as fmt
from .. import fileio, referrers
from .. import pack as packmod
from ..errors import CorruptedError, ReferrerIndexError, StorageIOError
from ..refs import references_one
from .common import (
    BatchedIndex,
    ClassNames,
    IndexBuild,
    Log,
    Progress,
    ToolError,
    oid_repr,
    phase,
    text,
    tid_time,
    time_repr,
)
from .walk import Damage, walk

# -- info ---------------------------------------------------------------------------------


@dataclass
class ClassSpace:
    current: int = 0  # records
    current_bytes: int = 0
    historical: int = 0
    historical_bytes: int = 0


@dataclass
class PackForecast:
    pack_time: float
    pack_tid: bytes
    bytes_before: int = 0
    bytes_after: int = 0
    revisions_removed: int = 0
    transactions_removed: int = 0
    objects_removed: int = 0
    reason: str = ""  # why a pack would do nothing, if so
    refs_unreadable: list[bytes] = field(default_factory=list)  # oids: pack would skip gc

    @property
    def bytes_freed(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_json(self) -> dict:
        return {"pack_time": time_repr(self.pack_time), "pack_tid": self.pack_tid.hex(),
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "bytes_freed": self.bytes_freed, "revisions_removed": self.revisions_removed,
                "transactions_removed": self.transactions_removed, "objects_removed": self.objects_removed,
                "reason": self.reason, "refs_unreadable": [o.hex() for o in self.refs_unreadable]}


@dataclass
class InfoReport:
    path: str
    size: int = 0
    end: int = 0  # end of the last good transaction
    file_id: bytes = b""
    pack_tid: bytes = b""
    transactions: int = 0
    records: int = 0
    objects: int = 0
    deleted_objects: int = 0
    first_tid: bytes | None = None
    last_tid: bytes | None = None
    current_bytes: int = 0  # records and their oid table entries
    history_bytes: int = 0
    overhead_bytes: int = 0  # file header, transaction headers, table checksums, trailers
    classes: dict[str, ClassSpace] = field(default_factory=dict)
    damage: str | None = None
    pack: PackForecast | None = None

    @property
    def history_share(self) -> float:
        total = self.current_bytes + self.history_bytes
        return self.history_bytes / total if total else 0.0

    def to_json(self) -> dict:
        def tid(t):
            return None if t is None else {"tid": t.hex(), "time": time_repr(tid_time(t))}
        return {
            "path": self.path, "size": self.size, "end": self.end, "file_id": self.file_id.hex(),
            "pack_tid": self.pack_tid.hex(), "transactions": self.transactions, "records": self.records,
            "objects": self.objects, "deleted_objects": self.deleted_objects,
            "first": tid(self.first_tid), "last": tid(self.last_tid),
            "current_bytes": self.current_bytes, "history_bytes": self.history_bytes,
            "overhead_bytes": self.overhead_bytes, "history_share": round(self.history_share, 4),
            "classes": {k: vars(v) for k, v in sorted(self.classes.items())},
            "damage": self.damage, "pack": self.pack.to_json() if self.pack else None,
        }


def info(path: str, pack_time: float | None = None, progress: Progress | None = None) -> InfoReport:
    """Read the whole file once; with `pack_time`, also forecast a pack to that time."""
    with Log(path) as log:
        report = InfoReport(log.path, size=log.size, file_id=log.header.file_id,
                            pack_tid=log.header.pack_tid)
        built = log.build_index()
        index = built.index
        report.end = built.end
        if built.scan.error is not None and not built.scan.torn_tail:
            report.damage = (f"damaged at offset {built.scan.error.offset} ({built.scan.error.detail}); "
                             f"these figures cover the {built.end} bytes before it")
        elif built.scan.error is not None:
            report.damage = (f"incomplete last transaction at {built.end} ({built.scan.error.detail}); "
                             "not counted")
        report.overhead_bytes = fmt.HEADER_SIZE
        names = ClassNames()
        reader = log.reader
        index_get = index.get
        classes = report.classes
        back_names: dict[int, str] = {}
        for item in walk(reader, fmt.HEADER_SIZE, built.end, True, progress):
            if isinstance(item, Damage):  # the scan just passed it: it changed under us
                raise item.error
            th, recs, _delta = item
            report.transactions += 1
            if report.first_tid is None:
                report.first_tid = th.tid
            report.last_tid = th.tid
            report.overhead_bytes += th.header_len + fmt.CRC_SIZE + fmt.TRAILER_SIZE
            report.records += len(recs)
            for rec in recs:
                size = rec.length + fmt.TABLE_ENTRY_SIZE
                if rec.flags & fmt.FLAG_BACKPOINTER:
                    name = _backpointer_class(reader, rec, names, back_names)
                else:
                    name = names(rec.data)
                space = classes.get(name)
                if space is None:
                    space = classes[name] = ClassSpace()
                if index_get(rec.oid) == rec.pos:
                    space.current += 1
                    space.current_bytes += size
                    report.current_bytes += size
                    if rec.flags & fmt.FLAG_BACKPOINTER and not rec.back:
                        report.deleted_objects += 1
                else:
                    space.historical += 1
                    space.historical_bytes += size
                    report.history_bytes += size
        report.objects = len(index)
        if pack_time is not None:
            report.pack = pack_forecast(log, built, pack_time, progress)
    return report


DELETED = "(deleted)"


def _backpointer_class(reader, rec: fmt.DataRecord, names: ClassNames, cache: dict[int, str]) -> str:
    if not rec.back:
        return DELETED
    name = cache.get(rec.back)
    if name is None:
        try:
            target = reader.resolve(rec)
            name = DELETED if target is None else names(target.data)
        except CorruptedError:
            name = "(backpointer target unreadable)"
        cache[rec.back] = name
    return name


def pack_forecast(log: Log, built: IndexBuild, pack_time: float,
                  progress: Progress | None = None) -> PackForecast:
    """What packing the file to `pack_time` would remove, with gc, as FileStorage.pack does it.

    Runs pack's GC (reachability from the root and from every record after
    the pack time, over the stored references) on a snapshot of the index,
    then adds up the transactions a pack would write."""
    pack_tid = packmod.pack_tid_for(pack_time)
    end = built.end
    f = PackForecast(pack_time, pack_tid, bytes_before=end, bytes_after=end)
    if end <= fmt.HEADER_SIZE or built.last_tid is None:
        f.reason = "the storage is empty"
        return f
    if pack_tid <= log.header.pack_tid:
        f.reason = "already packed to a time not earlier than this one"
        return f
    pack_tid = f.pack_tid = min(pack_tid, built.last_tid)
    reader = log.reader

    def refs_of(rec: fmt.DataRecord) -> bytes:
        refs = references_one(rec.data)
        if refs is None:
            f.refs_unreadable.append(rec.oid)
            return b""
        return refs

    # with gc the GC only looks oids up in the index
    gc_progress = None
    if progress is not None and hasattr(progress, "phase"):
        phase(progress, "info: pack forecast", len(built.index), "objects")

        def gc_progress(_phase: str, done: int, _total: int) -> None:
            progress(done)
    no_root = built.index.get(fmt.Z64) is None
    gc, reason = packmod.run_gc(reader, built.index, end, pack_tid, not no_root, refs_of, gc_progress)
    if f.refs_unreadable and not reason and not no_root:
        # pack's own decision: anything could be reachable from such a record,
        # so it packs without garbage collection
        gc, reason = packmod.run_gc(reader, built.index, end, pack_tid, False, refs_of)
    if reason:
        f.reason = reason
        return f
    after = fmt.HEADER_SIZE + (end - gc.pack_pos)
    kept_oids = BatchedIndex()
    keep_last = gc.pack_pos == end

    keep, unit = gc.keep, packmod.MIN_RECORD

    def kept(pos: int) -> bool:
        # GC.keep: one bit per MIN_RECORD bytes of file, bit s & 7 of byte s >> 3, s = pos // MIN_RECORD
        s = pos // unit
        return bool(keep[s >> 3] >> (s & 7) & 1)

    for th in reader.iter_txns(fmt.HEADER_SIZE, gc.pack_pos):
        size = 0
        nkept = 0
        local = {}
        for rec in reader.txn_records(th):
            if not kept(rec.pos):
                continue
            nkept += 1
            local[rec.oid] = rec.pos
            length = rec.length
            if rec.is_backpointer and rec.back and not kept(rec.back):
                target = reader.resolve(rec)  # the pack writes its data inline
                if target is not None:
                    length = fmt.record_length(len(target.refs) // 8, 0, len(target.data))
            size += length
        f.revisions_removed += th.nrec - nkept
        if nkept or (keep_last and th.next_pos == gc.pack_pos):
            after += th.header_len + size + fmt.oid_table_size(nkept) + fmt.TRAILER_SIZE
            kept_oids.update(local)
        else:
            f.transactions_removed += 1
    if not f.revisions_removed and not f.transactions_removed:
        f.reason = "nothing to remove"
        return f
    for th in reader.iter_txns(gc.pack_pos, end):
        kept_oids.update({rec.oid: rec.pos for rec in reader.txn_records(th)})
    f.bytes_after = after
    f.objects_removed = len(built.index) - len(kept_oids)
    return f


# -- tail ---------------------------------------------------------------------------------

def tail(path: str, n: int = 10) -> list[dict]:
    """The last `n` finished transactions, newest first."""
    out = []
    if n <= 0:
        return out
    with Log(path) as log:
        for th in log.reader.iter_txns_backward(log.end()):
            out.append({"pos": th.pos, "tid": th.tid.hex(), "time": time_repr(tid_time(th.tid)),
                        "status": th.status.decode("latin-1"), "user": text(th.user),
                        "description": text(th.description), "size": th.next_pos - th.pos,
                        "records": th.nrec})
            if len(out) >= n:
                break
    return out


# -- history ------------------------------------------------------------------------------

def history(path: str, oid: bytes, limit: int | None = None) -> list[dict]:
    """Every revision of `oid`, newest first (following the prev chain from its current record)."""
    with Log(path) as log:
        built = log.build_index()
        pos = built.index.get(oid)
        if pos is None:
            raise ToolError(f"{log.path}: oid {oid_repr(oid)} has no record")
        reader = log.reader
        names = ClassNames()
        out = []
        while pos and (limit is None or len(out) < limit):
            rec = reader.read_data_record(pos, oid)
            th = reader.read_txn_header(rec.tpos)
            d = {"pos": rec.pos, "tid": rec.tid.hex(), "time": time_repr(tid_time(rec.tid)),
                 "status": th.status.decode("latin-1"), "user": text(th.user),
                 "description": text(th.description), "record_length": rec.length}
            if rec.is_backpointer:
                d["backpointer"] = rec.back
                if not rec.back:
                    d.update(size=0, kind="no data (deleted, or its creation undone)", data_tid=None)
                else:
                    target = reader.resolve(rec)
                    if target is None:
                        d.update(size=0, kind="no data (backpointer to a deletion)", data_tid=None)
                    else:
                        d.update(size=len(target.data), kind="backpointer", data_tid=target.tid.hex(),
                                 data_pos=target.pos, refs=[r.hex() for r in target.ref_oids()],
                                 refs_known=target.refs_known, **{"class": names(target.data)})
            else:
                d.update(size=len(rec.data), kind="data", refs=[r.hex() for r in rec.ref_oids()],
                         refs_known=rec.refs_known, **{"class": names(rec.data)})
            out.append(d)
            pos = rec.prev
        return out


# -- refs ---------------------------------------------------------------------------------

@dataclass
class RefsReport:
    oid: bytes
    pos: int | None = None  # its current record
    state: str = "missing"  # current, deleted, missing, unreadable
    class_name: str | None = None
    refs_known: bool = True
    references: list[dict] = field(default_factory=list)  # oid, state, class
    referrers: list[dict] = field(default_factory=list)  # oid, pos, class
    unknown_referrers: int = 0  # current records whose references are not stored
    unreadable_referrers: int = 0  # current backpointers whose data cannot be read
    method: str = "scan"  # how the referrers were found: "index" (the referrer index) or "scan"
    method_note: str = ""  # what happened to the referrer index (built, updated...) or why it was not used

    @property
    def dangling(self) -> list[dict]:
        """Problems: references from OID to missing/deleted objects, or references to OID if it is gone."""
        out = [r for r in self.references if r["state"] != "current"]
        if self.state != "current":
            out += self.referrers
        return out

    def to_json(self) -> dict:
        return {"oid": self.oid.hex(), "pos": self.pos, "state": self.state, "class": self.class_name,
                "refs_known": self.refs_known, "references": self.references,
                "referrers": self.referrers, "unknown_referrers": self.unknown_referrers,
                "unreadable_referrers": self.unreadable_referrers,
                "dangling": len(self.dangling), "method": self.method, "method_note": self.method_note}


def _state(reader, index, oid: bytes) -> tuple[str, fmt.DataRecord | None]:
    """(current/deleted/missing, the record holding its data)."""
    pos = index.get(oid)
    if pos is None:
        return "missing", None
    try:
        rec = reader.resolve(reader.read_data_record(pos, oid))
    except CorruptedError:
        return "unreadable", None
    return ("deleted", None) if rec is None else ("current", rec)


def refs(path: str, oid: bytes, progress: Progress | None = None, use_index: bool = True) -> RefsReport:
    """What `oid` references, and which current objects reference it."""
    return refs_many(path, [oid], progress, use_index)[0]


def refs_many(path: str, oids: list[bytes], progress: Progress | None = None,
              use_index: bool = True) -> list[RefsReport]:
    """`refs` for each of `oids`: referrers from the referrer index, or one pass over the current records.

    With `use_index` the referrer index beside the file (`refstorage.referrers`)
    answers, built or brought up to date first if needed; if it cannot be had
    (a read-only directory) or fails in any way, the scan answers, with the
    same result.  Each report's `method` says which answered."""
    with Log(path) as log:
        built = log.build_index()
        index = built.index
        reader = log.reader
        names = ClassNames()
        reports = []
        for oid in oids:
            report = RefsReport(oid)
            report.pos = index.get(oid)
            report.state, data_rec = _state(reader, index, oid)
            if data_rec is not None:
                report.class_name = names(data_rec.data)
                report.refs_known = data_rec.refs_known
                for ref in data_rec.ref_oids():
                    state, target = _state(reader, index, ref)
                    report.references.append({"oid": ref.hex(), "state": state,
                                              "class": names(target.data) if target is not None else None})
            reports.append(report)
        note = "--scan" if not use_index else ""
        if use_index:
            found, note = _referrers_from_index(log, built, reports, names, progress)
            if found:
                return reports
        for report in reports:
            report.method, report.method_note = "scan", note
        positions = array("Q", sorted(pos for _o, pos in index.items()))
        phase(progress, "refs: searching referrers", len(positions), "objects")
        listening = progress is not None and hasattr(progress, "phase")
        done = 0
        for rec in reader.read_data_records(positions):
            done += 1
            if progress is not None and not done % 4096:
                progress(done if listening else rec.pos)
            if rec.is_backpointer:
                if not rec.back:
                    continue
                try:
                    target = reader.resolve(rec)
                except CorruptedError:
                    for report in reports:
                        report.unreadable_referrers += 1
                    continue
                if target is None:
                    continue
            else:
                target = rec
            if not target.refs_known:
                for report in reports:
                    report.unknown_referrers += 1
                continue
            for report in reports:
                if _refs_contain(target.refs, report.oid):
                    report.referrers.append({"oid": rec.oid.hex(), "pos": rec.pos,
                                             "class": names(target.data)})
        return reports


def _referrers_from_index(log: Log, built: IndexBuild, reports: list[RefsReport], names: ClassNames,
                          progress: Progress | None) -> tuple[bool, str]:
    """Fill the reports' referrers from the referrer index: (True, note) or (False, why not)."""
    index, reader = built.index, log.reader
    listening = progress is not None and hasattr(progress, "phase")

    def positions() -> array:
        return array("Q", sorted(pos for _o, pos in index.items()))

    def on_build() -> None:
        phase(progress, "refs: building the referrer index", len(index), "objects")

    def built_progress(done: int) -> None:
        if listening:
            progress(done)

    why = ""
    for attempt in range(2):
        try:
            rindex, status = referrers.up_to_date(log.path, reader, log.header.file_id, built.end,
                                                  built.last_tid, positions, built_progress, on_build)
        except (ReferrerIndexError, CorruptedError, StorageIOError) as exc:
            # (a damaged data file: the scan reports it as it always did)
            return False, f"the referrer index failed ({exc}); searched by a scan"
        if rindex is None:
            return False, f"{status.why}; searched by a scan"
        note = status.how + (f" ({status.why})" if status.why else "")
        try:
            with rindex:
                found = [_index_referrers(rindex, reader, index, names, r.oid) for r in reports]
        except ReferrerIndexError as exc:
            # damaged where only a query reads: remove it, so the next attempt rebuilds it
            why = str(exc)
            try:
                fileio.remove_if_exists(rindex.path)
            except StorageIOError:
                break
            continue
        except CorruptedError as exc:  # a referrer's record: the scan reports it as it always did
            return False, f"a referrer's record cannot be read ({exc}); searched by a scan"
        if attempt:
            note = f"rebuilt ({why})"
        for report, referrers_ in zip(reports, found, strict=True):
            report.referrers = referrers_
            report.unknown_referrers = rindex.nunknown
            report.unreadable_referrers = rindex.nunreadable
            report.method, report.method_note = "index", note
        return True, note
    return False, f"the referrer index failed ({why}); searched by a scan"


def _index_referrers(rindex: referrers.ReferrerIndex, reader, index, names: ClassNames,
                     oid: bytes) -> list[dict]:
    """The referrer entries of `oid` from the referrer index, as the scan gives them (by position)."""
    out = []
    for source in rindex.lookup(oid):
        pos = index.get(source)
        if pos is None:
            raise ReferrerIndexError(rindex.path, f"it names referrer {source.hex()}, which has no record")
        target = reader.resolve(reader.read_data_record(pos, source))
        if target is None:
            raise ReferrerIndexError(rindex.path, f"it names referrer {source.hex()}, which holds no data")
        out.append({"oid": source.hex(), "pos": pos, "class": names(target.data)})
    out.sort(key=lambda r: r["pos"])
    return out


# -- a path from the root -------------------------------------------------------------------

@dataclass
class RootPath:
    """A shortest chain of references from the root (oid 0) to an oid, with each object's class.

    `chain` is None if the oid is not reachable through the stored references;
    `unknown` counts the reachable records whose references are not stored (or
    unreadable), which the search could not follow."""

    oid: bytes
    chain: list[tuple[bytes, str]] | None
    unknown: int = 0


def paths_from_root(path: str, oids: list[bytes]) -> list[RootPath]:
    """For each oid, a shortest chain of current references from the root (breadth-first)."""
    root = fmt.p64(0)
    with Log(path) as log:
        index = log.build_index().index
        reader = log.reader
        names = ClassNames()
        parent: dict[bytes, bytes | None] = {}
        klass: dict[bytes, str] = {}
        unknown = 0
        wanted = set(oids)
        frontier = [root] if root in index else []
        if frontier:
            parent[root] = None
        while frontier and not wanted.issubset(parent):
            positions = sorted((index.get(o), o) for o in frontier)
            frontier = []
            for pos, oid in positions:
                try:
                    data_rec = reader.resolve(reader.read_data_record(pos, oid))
                except CorruptedError:
                    unknown += 1
                    continue
                if data_rec is None:
                    klass[oid] = DELETED
                    continue
                klass[oid] = names(data_rec.data)
                if not data_rec.refs_known:
                    unknown += 1
                    continue
                for ref in data_rec.ref_oids():
                    if ref not in parent and ref in index:
                        parent[ref] = oid
                        frontier.append(ref)
        out = []
        for oid in oids:
            if oid not in parent:
                out.append(RootPath(oid, None, unknown))
                continue
            chain = []
            o: bytes | None = oid
            while o is not None:
                if o not in klass:
                    state, rec = _state(reader, index, o)
                    klass[o] = names(rec.data) if rec is not None else f"({state})"
                chain.append((o, klass[o]))
                o = parent[o]
            out.append(RootPath(oid, chain[::-1], unknown))
        return out


def _refs_contain(refs: bytes, oid: bytes) -> bool:
    i = refs.find(oid)
    while i != -1:
        if not i % 8:
            return True
        i = refs.find(oid, i + 1)
    return False
