"""What the web UI shows, computed from a refstorage file opened read-only, or through ZEO.

`Inspector(path)` opens the file read-only (a storage may be writing it
meanwhile; the inspector looks no further than the size it saw at opening)
and `Inspector.index()` reads it once: the transaction log, space per class,
growth per day, every current record's stored references (so referrers are a
dictionary look-up), reachability from the root (what a pack would collect)
and dangling references.  Pages then answer from these tables and from
positioned reads of single records.  Nothing is unpickled: class names and
states come from the pickles' opcodes (`pickletree`).

`ZeoInspector(spec)` is the other source behind the same `Model` interface: a
storage served by ZEO, indexed once from ZEO's remote iterator (references
computed from the pickles by `refs`), its objects read through loadBefore,
history and loadSerial.  Its pack forecast runs pack's garbage collection
over a compact table of every record the iterator sent (oid, transaction,
previous revision, pickle size, references), so it counts what a pack would
remove as the file source does, in pickle bytes; what needs file positions
(damage, verify) answers that it is not available through ZEO.
"""

from __future__ import annotations

import bisect
import threading
import time
from array import array
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from .. import fileformat as fmt
from ..errors import CorruptedError, RefStorageError
from ..refs import references_many
from ..tools import info as info_mod
from ..tools import verify as verify_mod
from ..tools.common import ClassNames, Log, Progress, oid_repr, text, tid_time, time_repr
from ..tools.walk import Damage, walk
from . import pickletree

Z64 = b"\0" * 8
DAY = 86400.0


@dataclass
class Txn:
    pos: int
    tid: bytes
    time: float
    user: str
    description: str
    records: int
    size: int

    @property
    def time_text(self) -> str:
        return time_repr(self.time)


@dataclass
class Revision:
    pos: int
    tid: bytes
    time: float
    tpos: int
    user: str
    description: str
    kind: str  # data, backpointer, deleted
    size: int
    class_name: str | None
    data: bytes | None = None


@dataclass
class GarbageClass:
    objects: int = 0
    bytes: int = 0
    sample: list[bytes] = field(default_factory=list)


class Model:
    """What every page reads, whatever the source (a file, or a storage through ZEO).

    A source's `_index(progress)` fills the tables below in one pass;
    `present` is the set of oids that have a current record (a deletion
    included); `positions` says whether revisions and transactions have file
    positions (the damage and verify answers need them)."""

    positions = True
    forecast_unit = ""  # what the pack forecast's bytes are: the file's (or " of pickle data")

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size
        self.names = ClassNames()
        self.lock = threading.Lock()
        # the indexing pass: status for the pages
        self.state = "waiting"  # waiting, indexing, ready, failed
        self.progress_pos = 0
        self.error: str | None = None
        self.index_seconds = 0.0
        # filled by index()
        self.txns: list[Txn] = []
        self.classes: dict[str, info_mod.ClassSpace] = {}
        self.class_oids: dict[str, array] = {}
        self.days: dict[int, list[int]] = {}  # day number -> [bytes written, new objects, records]
        self.records = 0
        self.current_bytes = 0
        self.history_bytes = 0
        self.deleted: set[bytes] = set()
        self.refs: dict[bytes, bytes] = {}  # oid -> packed refs of its current record
        self.refs_unknown: set[bytes] = set()
        self.referrers: dict[bytes, list[bytes]] = {}
        self.garbage: dict[str, GarbageClass] = {}
        self.garbage_note = ""
        self.dangling: list[tuple[bytes, bytes, str]] = []  # (from, to, missing/deleted)
        self.dangling_count = 0
        self.damage: str | None = None
        self.damages: list[Damage] = []
        # the slow answers (a pack forecast, verify: each reads the whole file again) are
        # computed in the background, one at a time; pages show them when they are done
        self._jobs: dict[tuple, Future] = {}
        self._one_job = threading.Lock()

    @property
    def present(self):
        raise NotImplementedError

    def _index(self, progress: Progress) -> None:
        raise NotImplementedError

    def _record_size(self, oid: bytes) -> int:
        raise NotImplementedError

    def close(self, wait: bool = True) -> None:
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def index(self, progress: Progress | None = None) -> None:
        """Read the whole file once (see the module's doc).  Sets `state`; raises on failure."""
        started = time.perf_counter()
        self.state = "indexing"

        def report(pos: int) -> None:
            self.progress_pos = pos
            if progress is not None:
                progress(pos)
        try:
            self._index(report)
        except Exception as exc:
            self.state = "failed"
            self.error = str(exc) if isinstance(exc, RefStorageError) else f"{type(exc).__name__}: {exc}"
            raise
        self.index_seconds = time.perf_counter() - started
        self.state = "ready"
        self.forecast(0, wait=False)  # the overview shows it: start it now

    def _references(self) -> None:
        """Referrers, dangling references and what is unreachable from the root."""
        index = self.present
        deleted = self.deleted
        referrers = self.referrers
        for oid, packed in self.refs.items():
            for i in range(0, len(packed), 8):
                target = packed[i:i + 8]
                lst = referrers.get(target)
                if lst is None:
                    referrers[target] = [oid]
                elif lst[-1] != oid:
                    lst.append(oid)
                if target in deleted or target not in index:
                    self.dangling_count += 1
                    if len(self.dangling) < 1000:
                        self.dangling.append((oid, target, "deleted" if target in deleted else "missing"))
        # reachability from the root over the stored references (pack's GC, at the last transaction)
        if Z64 not in index:
            self.garbage_note = "the database has no root object: nothing is reachable"
        reachable = {Z64} if Z64 in index else set()
        todo = deque(reachable)
        refs_get = self.refs.get
        while todo:
            packed = refs_get(todo.popleft())
            if packed:
                for i in range(0, len(packed), 8):
                    target = packed[i:i + 8]
                    if target not in reachable:
                        reachable.add(target)
                        todo.append(target)
        if self.refs_unknown & reachable:
            self.garbage_note = (f"{len(self.refs_unknown & reachable)} reachable records have no stored "
                                 "references: a pack would not collect garbage, so nothing is listed")
            return
        for name, oids in self.class_oids.items():
            for n in oids:
                oid = fmt.p64(n)
                if oid in reachable or oid in deleted:
                    continue
                g = self.garbage.get(name)
                if g is None:
                    g = self.garbage[name] = GarbageClass()
                g.objects += 1
                if len(g.sample) < 50:
                    g.sample.append(oid)
                g.bytes += self._record_size(oid)

    @property
    def objects(self) -> int:
        return len(self.present) - len(self.deleted)

    @property
    def history_share(self) -> float:
        total = self.current_bytes + self.history_bytes
        return self.history_bytes / total if total else 0.0

    def growth(self) -> dict:
        """Per day: bytes written, new objects, and the running totals (for the overview's plot)."""
        out = {"day": [], "bytes": [], "objects": [], "total_bytes": [], "total_objects": []}
        tb = to = 0
        for d in sorted(self.days):
            b, o, _r = self.days[d]
            tb += b
            to += o
            out["day"].append(time.strftime("%Y-%m-%d", time.gmtime(d * DAY)))
            out["bytes"].append(b)
            out["objects"].append(o)
            out["total_bytes"].append(tb)
            out["total_objects"].append(to)
        return out

    def _job(self, key: tuple, fn, wait: bool):
        """fn()'s result (cached under `key`), or None while it runs in the background (wait=False)."""
        with self.lock:
            fut = self._jobs.get(key)
            if fut is None:
                fut = self._jobs[key] = Future()

                def run() -> None:
                    with self._one_job:  # one at a time: each reads the whole file
                        try:
                            fut.set_result(fn())
                        except BaseException as exc:
                            fut.set_exception(exc)
                threading.Thread(target=run, name=f"refstorage-inspect-{key[0]}", daemon=True).start()
        if not wait and not fut.done():
            return None
        return fut.result()

    def transactions(self, since: float | None = None, until: float | None = None, user: str = "",
                     description: str = "") -> list[Txn]:
        """Matching transactions, newest first."""
        txns = self.txns
        lo = 0 if since is None else bisect.bisect_left(txns, since, key=lambda t: t.time)
        hi = len(txns) if until is None else bisect.bisect_right(txns, until, key=lambda t: t.time)
        user = user.lower()
        description = description.lower()
        out = []
        for i in range(hi - 1, lo - 1, -1):
            t = txns[i]
            if user and user not in t.user.lower():
                continue
            if description and description not in t.description.lower():
                continue
            out.append(t)
        return out

    def txn_at(self, pos: int) -> Txn | None:
        i = bisect.bisect_left(self.txns, pos, key=lambda t: t.pos)
        if i < len(self.txns) and self.txns[i].pos == pos:
            return self.txns[i]
        return None

    def class_of(self, oid: bytes) -> str | None:
        """The class of oid's current record, or None if it has none (deleted, missing)."""
        rec = self.current_data(oid)
        return self.names(rec.data) if rec is not None else None

    def object_state(self, oid: bytes) -> str:
        if oid in self.deleted:
            return "deleted"
        return "current" if oid in self.present else "missing"

    def references(self, oid: bytes) -> list[bytes]:
        packed = self.refs.get(oid, b"")
        return [packed[i:i + 8] for i in range(0, len(packed), 8)]

    def referrers_of(self, oid: bytes) -> list[bytes]:
        return self.referrers.get(oid, [])

    def graph(self, oid: bytes, hops: int = 2, max_nodes: int = 40) -> dict:
        """oid's neighbourhood: references (positive levels) and referrers (negative), a few hops deep."""
        level = {oid: 0}
        edges: list[tuple[bytes, bytes]] = []
        for direction in (1, -1):
            frontier = [oid]
            for hop in range(1, hops + 1):
                nxt = []
                for o in frontier:
                    around = self.references(o) if direction > 0 else self.referrers_of(o)
                    for other in around[:12]:
                        edges.append((o, other) if direction > 0 else (other, o))
                        if other not in level and len(level) < max_nodes:
                            level[other] = hop * direction
                            nxt.append(other)
                frontier = nxt
        edges = [(a, b) for a, b in dict.fromkeys(edges) if a in level and b in level]
        nodes = [{"oid": oid_repr(o), "level": lv, "class": self.class_of(o) or self.object_state(o)}
                 for o, lv in level.items()]
        return {"nodes": nodes, "edges": [[oid_repr(a), oid_repr(b)] for a, b in edges]}

    def parse(self, data: bytes) -> pickletree.Record:
        return pickletree.parse_record(data)


class Inspector(Model):
    """One file, indexed once; every method after `index()` answers from memory or a few reads."""

    def __init__(self, path: str):
        log = Log(path)  # read-only; raises the package's errors for a file that is no refstorage
        super().__init__(log.path, log.size)
        self.log = log
        self.built: info_mod.IndexBuild | None = None

    @property
    def present(self):
        return self.built.index

    def close(self, wait: bool = True) -> None:
        """Close the file, after the background jobs (without `wait`, only if none is running:
        a process about to exit leaves the file to the system rather than wait for them)."""
        pending = [f for f in self._jobs.values() if not f.done()]
        if pending and not wait:
            return
        for f in pending:
            f.exception()
        self.log.close()

    def _index(self, progress: Progress) -> None:
        log = self.log
        built = self.built = log.build_index()
        index_get = built.index.get
        if built.scan.error is not None:
            what = "incomplete last transaction" if built.scan.torn_tail else "damage"
            self.damage = (f"{what} at offset {built.scan.error.offset} ({built.scan.error.detail}); "
                           f"only the {built.end:,} bytes before it are shown")
        reader = log.reader
        names = self.names
        back_names: dict[int, str] = {}
        classes = self.classes
        class_oids: dict[str, list[int]] = {}
        refs = self.refs
        days = self.days
        u64 = fmt.u64
        for item in walk(reader, fmt.HEADER_SIZE, built.end, True, progress):
            if isinstance(item, Damage):  # a record failing its checksum (the scan reads no data)
                self.damages.append(item)
                if self.damage is None:
                    self.damage = (f"damage at offset {item.error.offset} ({item.error.detail}); the "
                                   f"{item.length:,} bytes from {item.start:,} to {item.end:,} are "
                                   "not counted")
                continue
            th, recs, _delta = item
            t = tid_time(th.tid)
            size = th.next_pos - th.pos
            self.txns.append(Txn(th.pos, th.tid, t, text(th.user), text(th.description), th.nrec, size))
            day = days.get(int(t // DAY))
            if day is None:
                day = days[int(t // DAY)] = [0, 0, 0]
            day[0] += size
            day[2] += len(recs)
            self.records += len(recs)
            for rec in recs:
                rsize = rec.length + fmt.TABLE_ENTRY_SIZE
                if not rec.prev:
                    day[1] += 1
                data_rec = rec
                if rec.flags & fmt.FLAG_BACKPOINTER:
                    name = info_mod._backpointer_class(reader, rec, names, back_names)
                else:
                    name = names(rec.data)
                space = classes.get(name)
                if space is None:
                    space = classes[name] = info_mod.ClassSpace()
                if index_get(rec.oid) != rec.pos:
                    space.historical += 1
                    space.historical_bytes += rsize
                    self.history_bytes += rsize
                    continue
                space.current += 1
                space.current_bytes += rsize
                self.current_bytes += rsize
                class_oids.setdefault(name, []).append(u64(rec.oid))
                if rec.is_backpointer:
                    try:
                        data_rec = reader.resolve(rec)
                    except CorruptedError:
                        data_rec = None
                    if data_rec is None:
                        if not rec.back:
                            self.deleted.add(rec.oid)
                        else:
                            self.refs_unknown.add(rec.oid)
                        continue
                if not data_rec.refs_known:
                    self.refs_unknown.add(rec.oid)
                elif data_rec.refs:
                    refs[rec.oid] = data_rec.refs
        for name, oids in class_oids.items():
            oids.sort()
            self.class_oids[name] = array("Q", oids)
        self._references()

    def _record_size(self, oid: bytes) -> int:
        try:
            return self.log.reader.read_data_record(self.built.index[oid], oid).length
        except CorruptedError:
            return 0

    def forecast(self, days: float, wait: bool = True) -> info_mod.PackForecast | str | None:
        """What a pack keeping `days` days before the last transaction would free (an error
        message if it cannot be computed; None while it is computed, with wait=False)."""
        key = round(float(days), 3)

        def run() -> info_mod.PackForecast | str:
            last = tid_time(self.built.last_tid) if self.built.last_tid else time.time()
            try:
                return info_mod.pack_forecast(self.log, self.built, last - key * DAY + 1e-3)
            except RefStorageError as exc:
                return str(exc)
        return self._job(("forecast", key), run, wait)

    def verify_report(self, wait: bool = True) -> verify_mod.VerifyReport | str | None:
        """What `refstorage verify` reports on the file (None while it runs, with wait=False)."""
        def run() -> verify_mod.VerifyReport | str:
            try:
                return verify_mod.verify(self.path)
            except RefStorageError as exc:
                return str(exc)
        return self._job(("verify",), run, wait)

    def txn_records(self, txn: Txn, start: int, count: int) -> list[dict]:
        reader = self.log.reader
        th = reader.read_txn_header(txn.pos)
        out = []
        for i, rec in enumerate(reader.txn_records(th)):
            if i < start:
                continue
            if i >= start + count:
                break
            out.append(self._record_row(rec))
        return out

    def _record_row(self, rec: fmt.DataRecord) -> dict:
        kind, data_rec = "data", rec
        if rec.is_backpointer:
            try:
                data_rec = self.log.reader.resolve(rec)
            except CorruptedError:
                data_rec = None
            kind = "deletion" if data_rec is None else "backpointer (undo)"
        current = self.built.index.get(rec.oid) == rec.pos
        return {"oid": rec.oid, "kind": kind, "size": rec.length, "current": current,
                "class": self.names(data_rec.data) if data_rec is not None else None,
                "refs": len(data_rec.refs) // 8 if data_rec is not None else 0}

    def current_data(self, oid: bytes) -> fmt.DataRecord | None:
        pos = self.built.index.get(oid)
        if pos is None:
            return None
        try:
            return self.log.reader.resolve(self.log.reader.read_data_record(pos, oid))
        except CorruptedError:
            return None

    def history(self, oid: bytes, start: int = 0, limit: int = 200) -> list[Revision]:
        """oid's revisions, newest first (following the prev chain), from the `start`-th on."""
        reader = self.log.reader
        pos = self.built.index.get(oid)
        out: list[Revision] = []
        skipped = 0
        while pos and len(out) < limit:
            try:
                rec = reader.read_data_record(pos, oid)
                if skipped < start:
                    skipped += 1
                    pos = rec.prev
                    continue
                out.append(self._revision(rec))
            except CorruptedError as exc:
                out.append(Revision(pos, Z64, 0.0, 0, "", exc.detail, "unreadable", 0, None))
                break
            pos = rec.prev
        return out

    def revision(self, oid: bytes, pos: int) -> Revision:
        """oid's revision whose record is at `pos` (raises CorruptedError if there is none)."""
        return self._revision(self.log.reader.read_data_record(pos, oid))

    def _revision(self, rec: fmt.DataRecord) -> Revision:
        reader = self.log.reader
        th = reader.read_txn_header(rec.tpos)
        data_rec = rec
        kind = "data"
        if rec.is_backpointer:
            try:
                data_rec = reader.resolve(rec)
            except CorruptedError:
                data_rec = None
            kind = "deleted" if data_rec is None else "backpointer"
        data = data_rec.data if data_rec is not None else None
        return Revision(rec.pos, rec.tid, tid_time(rec.tid), rec.tpos, text(th.user), text(th.description),
                        kind, len(data) if data is not None else 0,
                        self.names(data) if data is not None else None, data)

    def revision_data(self, oid: bytes, pos: int) -> bytes | None:
        """The data of oid's record at `pos` (checked to be oid's)."""
        rec = self.log.reader.read_data_record(pos, oid)
        rec = self.log.reader.resolve(rec)
        return rec.data if rec is not None else None


# -- a storage served by ZEO ------------------------------------------------------------------

_DELETED, _UNDO, _REFS_UNKNOWN = 1, 2, 4  # ZeoInspector._rec_flags

NOT_THROUGH_ZEO = "not available through ZEO (it reads the file's positions): run it on the file itself"

TxnTuple = tuple  # (tid, status, user, description, extension, [(oid, tid, data, data_txn), ...])


def zeo_transactions(storage, start: bytes | None = None, stop: bytes | None = None):
    """The transactions of a storage's `iterator(start, stop)` as plain tuples
    (tid, status, user, description, extension, records), each record (oid, tid, data, data_txn);
    data None is a deletion."""
    it = storage.iterator(start, stop)
    try:
        for txn in it:
            records = [(r.oid, r.tid, r.data, r.data_txn) for r in txn]
            yield txn.tid, txn.status, txn.user, txn.description, txn.extension, records
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


class ZeoInspector(Model):
    """A storage served by ZEO (refstorage, ZODB's FileStorage, any), indexed once from ZEO's
    remote iterator; an object's states and history come from loadBefore, history and
    loadSerial, as of the last transaction indexed.

    There are no file positions here: a transaction's `pos` is its number in the log (from 0)
    and a revision's `pos` is its tid as an integer.  Sizes are the pickles' sizes.  Damage
    and verify need the file: they say so."""

    positions = False
    forecast_unit = " of pickle data"

    def __init__(self, spec: str, wait_timeout: float = 30.0, storage: str | None = None):
        from ..replicate import open_source  # (raises the package's ReplicationError)
        self.storage = open_source(spec, wait_timeout=wait_timeout, storage=storage)
        try:
            size = int(self.storage.getSize() or 0)
        except Exception:  # a server that does not report its size
            size = 0
        super().__init__(spec, size)
        self.current: dict[bytes, bytes] = {}  # oid -> tid of its current record
        self._current_info: dict[bytes, tuple[str, int]] = {}  # oid -> (class, size) of that record
        self.last_tid = Z64
        # every record the iterator sent, for the pack forecast (record i, oldest first)
        self._rec_oid = array("Q")
        self._rec_txn = array("L")  # its transaction's number in self.txns
        self._rec_prev = array("q")  # the same object's previous record (-1: none)
        self._rec_size = array("Q")  # len(data); 0 for a deletion
        self._rec_flags = bytearray()  # _DELETED, _UNDO (data_txn set), _REFS_UNKNOWN
        self._rec_back: dict[int, bytes] = {}  # record -> data_txn, for the undo records
        self._refs_blob = bytearray()  # the records' references, concatenated
        self._refs_at = array("Q", [0])  # record i's are _refs_blob[_refs_at[i]:_refs_at[i + 1]]
        self._txn_first = array("Q", [0])  # transaction j's records are _txn_first[j] to [j + 1]
        self._txn_packed = bytearray()  # 1 where the transaction's status is "p" (written by a pack)
        self._last_rec: dict[bytes, int] = {}  # oid -> its newest record

    @property
    def present(self):
        return self.current

    def close(self, wait: bool = True) -> None:
        self.storage.close()

    def _index(self, progress: Progress) -> None:
        self.index_transactions(zeo_transactions(self.storage), progress)

    def index_transactions(self, txns, progress: Progress | None = None) -> None:
        """Fill the tables from transactions as `zeo_transactions` gives them, oldest first."""
        names = self.names
        classes = self.classes
        days = self.days
        refs = self.refs
        current = self.current
        info = self._current_info
        read = 0
        rec_oid, rec_txn, rec_prev, rec_size = self._rec_oid, self._rec_txn, self._rec_prev, self._rec_size
        rec_flags, rec_back, last_rec = self._rec_flags, self._rec_back, self._last_rec
        refs_blob, refs_at = self._refs_blob, self._refs_at
        u64 = fmt.u64
        for tid, status, user, description, _extension, records in txns:
            ntxn = len(self.txns)
            self._txn_packed.append(status in ("p", b"p"))
            t = tid_time(tid)
            datas = [r[2] for r in records if r[2] is not None]
            found = iter(references_many(datas) if datas else ())
            size = sum(len(d) for d in datas)
            self.txns.append(Txn(len(self.txns), tid, t, text(user), text(description), len(records),
                                 size))
            day = days.get(int(t // DAY))
            if day is None:
                day = days[int(t // DAY)] = [0, 0, 0]
            day[0] += size
            day[2] += len(records)
            self.records += len(records)
            for oid, _tid, data, data_txn in records:
                rsize = len(data) if data is not None else 0
                r = len(rec_oid)
                rec_oid.append(u64(oid))
                rec_txn.append(ntxn)
                rec_prev.append(last_rec.get(oid, -1))
                rec_size.append(rsize)
                last_rec[oid] = r
                if data_txn is not None and data is not None:
                    rec_back[r] = data_txn
                prev = info.get(oid)
                if prev is None:
                    day[1] += 1
                else:  # its last record becomes history
                    old_name, old_size = prev
                    old = classes[old_name]
                    old.current -= 1
                    old.current_bytes -= old_size
                    old.historical += 1
                    old.historical_bytes += old_size
                    self.current_bytes -= old_size
                    self.history_bytes += old_size
                name = names(data)
                space = classes.get(name)
                if space is None:
                    space = classes[name] = info_mod.ClassSpace()
                space.current += 1
                space.current_bytes += rsize
                self.current_bytes += rsize
                current[oid] = tid
                info[oid] = (name, rsize)
                refs.pop(oid, None)
                self.refs_unknown.discard(oid)
                if data is None:
                    self.deleted.add(oid)
                    rec_flags.append(_DELETED)
                    refs_at.append(len(refs_blob))
                    continue
                self.deleted.discard(oid)
                packed = next(found)
                rec_flags.append((_UNDO if data_txn is not None else 0)
                                 | (_REFS_UNKNOWN if packed is None else 0))
                if packed is None:
                    self.refs_unknown.add(oid)
                elif packed:
                    refs[oid] = packed
                    refs_blob += packed
                refs_at.append(len(refs_blob))
            self._txn_first.append(len(rec_oid))
            self.last_tid = tid
            read += size
            if progress is not None:
                progress(read)
        class_oids: dict[str, list[int]] = {}
        for oid, (name, _size) in info.items():
            class_oids.setdefault(name, []).append(fmt.u64(oid))
        for name, oids in class_oids.items():
            oids.sort()
            self.class_oids[name] = array("Q", oids)
        self._references()

    def _record_size(self, oid: bytes) -> int:
        return self._current_info[oid][1]

    def forecast(self, days: float, wait: bool = True) -> info_mod.PackForecast | str | None:
        """What a pack keeping `days` days before the last transaction would remove, as the file
        source's forecast decides it (pack's GC), computed from the records indexed; sizes are
        the pickles' sizes (None while it is computed, with wait=False)."""
        key = round(float(days), 3)

        def run() -> info_mod.PackForecast | str:
            last = tid_time(self.last_tid) if self.txns else time.time()
            try:
                return self.pack_forecast(last - key * DAY + 1e-3)
            except RefStorageError as exc:
                return str(exc)
        return self._job(("forecast", key), run, wait)

    def pack_forecast(self, pack_time: float) -> info_mod.PackForecast:
        """What packing to `pack_time`, with garbage collection, would remove: pack's own
        decisions (refstorage.pack.GC) replayed on the records the iterator sent.

        `bytes_before` and `bytes_after` count the records' data as the iterator sends it (an
        undo record counts the data it points to), before and after such a pack."""
        from ..pack import pack_tid_for
        pack_tid = pack_tid_for(pack_time)
        total = sum(self._rec_size)
        f = info_mod.PackForecast(pack_time, pack_tid, bytes_before=total, bytes_after=total)
        if not self.txns:
            f.reason = "the storage is empty"
            return f
        pack_tid = f.pack_tid = min(pack_tid, self.last_tid)
        txns = self.txns
        pack_txn = bisect.bisect_right(txns, pack_tid, key=lambda t: t.tid)  # the first one after
        if pack_txn < len(txns) and self._txn_packed[pack_txn]:
            f.reason = "already packed to a later time"
            return f
        if pack_txn == 0:
            f.reason = "no transaction before the pack time"
            return f
        no_root = Z64 not in self._last_rec
        kept, unknown = self._gc(pack_txn, not no_root)
        if unknown and not no_root:  # pack's decision: anything could be reachable from them
            kept, _unknown = self._gc(pack_txn, False)
        first_after = self._txn_first[pack_txn]
        rec_oid, rec_size, txn_first = self._rec_oid, self._rec_size, self._txn_first
        kept_oids: set[int] = set()
        after = total
        for j in range(pack_txn):
            nkept = 0
            for r in range(txn_first[j], txn_first[j + 1]):
                if kept[r]:
                    nkept += 1
                    kept_oids.add(rec_oid[r])
                else:
                    after -= rec_size[r]
            f.revisions_removed += txn_first[j + 1] - txn_first[j] - nkept
            if not nkept and not (pack_txn == len(txns) and j == pack_txn - 1):
                f.transactions_removed += 1
        if not f.revisions_removed and not f.transactions_removed:
            f.reason = "nothing to remove"
            return f
        kept_oids.update(rec_oid[first_after:])
        f.bytes_after = after
        f.objects_removed = len(self._last_rec) - len(kept_oids)
        return f

    def _gc(self, pack_txn: int, gc: bool) -> tuple[bytearray, bool]:
        """(one byte per record before the pack time: 1 if a pack keeps it, whether a record
        whose references are unknown was followed), as refstorage.pack.GC decides: with `gc`,
        the revisions at the pack time of what is reachable from the root and from the records
        after it; without, the revision at the pack time of every object; in both, the records
        that undo records after the pack time point to."""
        first_after = self._txn_first[pack_txn]
        rec_prev, rec_flags = self._rec_prev, self._rec_flags
        refs_blob, refs_at = self._refs_blob, self._refs_at
        last_rec = self._last_rec
        kept = bytearray(first_after)
        seen_after: set[int] = set()  # objects changed after the pack time, already visited
        unknown = False
        todo: deque[int] = deque()

        def at_pack_time(r: int) -> int:
            while r >= first_after:
                r = rec_prev[r]
            return r

        def discover(packed: bytes) -> None:
            packed = bytes(packed)
            for i in range(0, len(packed), 8):
                r = last_rec.get(packed[i:i + 8])
                if r is None:
                    continue  # dangling
                if r < first_after:
                    if kept[r]:
                        continue
                    kept[r] = 1
                elif r in seen_after:
                    continue
                else:
                    seen_after.add(r)
                todo.append(r)

        def visit() -> None:
            nonlocal unknown
            while todo:
                r = todo.popleft()
                if r >= first_after:
                    r = at_pack_time(r)
                    if r < 0 or kept[r]:
                        continue  # created after the pack time, or kept already
                    kept[r] = 1
                flags = rec_flags[r]
                if flags & _DELETED:  # deleted at the pack time: nothing to keep or follow
                    kept[r] = 0
                    continue
                if flags & _REFS_UNKNOWN:
                    unknown = True
                discover(refs_blob[refs_at[r]:refs_at[r + 1]])

        if gc:
            discover(Z64)
            visit()
        future: list[int] = []  # newest records of objects an undo after the pack time revives
        for r in range(first_after, len(rec_prev)):
            flags = rec_flags[r]
            if flags & _DELETED:
                continue
            if flags & _UNDO:
                target = self._undo_target(r)
                if target < 0 or target >= first_after:
                    continue  # its data is after the pack time: scanned as well
                kept[target] = 1
                future.append(r)
                r = target
                flags = rec_flags[r]
            if gc:
                if flags & _REFS_UNKNOWN:
                    unknown = True
                discover(refs_blob[refs_at[r]:refs_at[r + 1]])
        visit()
        if not gc:
            for r in last_rec.values():
                r = at_pack_time(r)
                if r >= 0 and not rec_flags[r] & _DELETED:
                    kept[r] = 1
        for r in future:  # keep a deletion current at the pack time under a revived revision
            r = at_pack_time(r)
            if r >= 0 and rec_flags[r] & _DELETED:
                kept[r] = 1
        return kept, unknown

    def _undo_target(self, r: int) -> int:
        """The record an undo record `r` takes its data from (the same object's record of its
        data_txn), or -1."""
        tid = self._rec_back[r]
        rec_prev, rec_txn, txns = self._rec_prev, self._rec_txn, self.txns
        p = rec_prev[r]
        while p >= 0 and txns[rec_txn[p]].tid > tid:
            p = rec_prev[p]
        return p if p >= 0 and txns[rec_txn[p]].tid == tid else -1

    def verify_report(self, wait: bool = True) -> str:
        return f"Verify is {NOT_THROUGH_ZEO}."

    def txn_records(self, txn: Txn, start: int, count: int) -> list[dict]:
        """Records `start` to `start + count` of txn, from the records indexed (ZEO's iterator
        would send every record before them, one round trip each); the class of a record that
        is no longer current is read with loadSerial (one round trip per record shown)."""
        from ZODB.POSException import POSKeyError
        j = txn.pos
        first, end = self._txn_first[j], self._txn_first[j + 1]
        out = []
        for r in range(first + start, min(end, first + start + count)):
            oid = fmt.p64(self._rec_oid[r])
            flags = self._rec_flags[r]
            current = self._last_rec.get(oid) == r
            name = None
            if not flags & _DELETED:
                if current:
                    name = self._current_info[oid][0]
                else:
                    try:
                        name = self.names(self.storage.loadSerial(oid, txn.tid))
                    except POSKeyError:
                        name = None
            out.append({"oid": oid, "size": self._rec_size[r],
                        "kind": ("deletion" if flags & _DELETED else
                                 "backpointer (undo)" if flags & _UNDO else "data"),
                        "current": current, "class": name,
                        "refs": (self._refs_at[r + 1] - self._refs_at[r]) // 8})
        return out

    def _txn_of(self, tid: bytes) -> Txn | None:
        i = bisect.bisect_left(self.txns, tid, key=lambda t: t.tid)
        if i < len(self.txns) and self.txns[i].tid == tid:
            return self.txns[i]
        return None

    def current_data(self, oid: bytes) -> _Data | None:
        """oid's state as of the last transaction indexed (None if deleted or missing)."""
        from ZODB.POSException import POSKeyError
        if oid not in self.current or oid in self.deleted:
            return None
        try:
            found = self.storage.loadBefore(oid, fmt.p64(fmt.u64(self.last_tid) + 1))
        except POSKeyError:
            return None
        if found is None or found[0] is None:
            return None
        return _Data(found[0], found[1])

    def history(self, oid: bytes, start: int = 0, limit: int = 200) -> list[Revision]:
        """oid's revisions up to the last transaction indexed, newest first, from the `start`-th on."""
        from ZODB.POSException import POSKeyError
        if oid not in self.current:
            return []
        try:  # (revisions committed since the index are left out)
            found = self.storage.history(oid, size=start + limit + 16)
        except POSKeyError:
            return []
        found = [h for h in found if h["tid"] <= self.last_tid]
        return [self._revision(oid, h["tid"]) for h in found[start:start + limit]]

    def revision(self, oid: bytes, pos: int) -> Revision:
        """oid's revision of tid `pos` (raises POSKeyError, a KeyError, if there is none)."""
        from ZODB.POSException import POSKeyError
        tid = fmt.p64(pos)
        if tid > self.last_tid or self._txn_of(tid) is None:
            raise POSKeyError(oid)
        return self._revision(oid, tid, must_exist=True)

    def _revision(self, oid: bytes, tid: bytes, must_exist: bool = False) -> Revision:
        from ZODB.POSException import POSKeyError
        txn = self._txn_of(tid)
        try:
            data = self.storage.loadSerial(oid, tid)
        except POSKeyError:
            if must_exist:
                raise
            data = None
        return Revision(fmt.u64(tid), tid, tid_time(tid), txn.pos if txn is not None else -1,
                        txn.user if txn is not None else "", txn.description if txn is not None else "",
                        "data" if data is not None else "deleted", len(data) if data is not None else 0,
                        self.names(data) if data is not None else None, data)


@dataclass
class _Data:
    """A current state read through ZEO (what the pages read of a record: its data)."""
    data: bytes
    tid: bytes
