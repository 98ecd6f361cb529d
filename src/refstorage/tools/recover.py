"""`refstorage recover SRC DST`: salvage everything intact of a damaged file, record by record.

The source is walked forward (`walk`).  Each transaction that passes all its
checks is copied whole.  At a damaged stretch (from a bad transaction to
where `log.next_valid_txn` says the log resumes) `walk.salvage` keeps every
record that passes its own checksum:

- a damaged transaction whose header is intact keeps its tid, status and
  metadata; with its oid table intact, exactly the records that fail are
  lost, and they are known by oid; damage to the redundant parts (oid
  table, trailing length, status byte) loses nothing;
- one whose header is damaged is rebuilt from its intact records (they
  carry its tid) as a clearly marked recovered transaction: no user, a
  description saying so, and the extension key ``refstorage-recovered``;
  if its records' tid does not fit between its neighbours, the next free
  tid after the previous transaction is used;
- a transaction left unfinished (status 'c': voted, never acknowledged) is
  not copied, and is not a loss.

Everything is written to a new file through `FileStorage`'s restore API
(tpc_begin with the original tid and status, restore() per record), so every
position -- prev pointers, backpointers, transaction positions -- is the new
file's own and all the encoding stays in the storage.

Backpointers: one whose target record can still be read (even in a damaged
stretch, if that record itself passes its checksum) is written with the
target's data; the new file turns it back into a backpointer when the
target was copied too.  One whose target is lost is written as a deletion
(backpointer 0) and reported as lost: loading that object then raises
POSKeyError instead of quietly serving an older revision.  Transactions
that are intact but moved (bytes lost or inserted before them, see
`walk.Txn.delta`) are copied too: their backpointers are followed with the
shift applied.

The report lists every lost revision as (oid, tid) -- with whether it was
the object's newest, so that the new file serves an older revision or none
-- and the references left dangling in the new file, which is verified at
the end.  `outcome` (and the command's exit status) says which of these
happened: a clean copy (0), damage repaired with nothing lost (3), salvaged
with losses (4), nothing salvageable (5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ZODB.Connection import TransactionMetaData

from .. import fileformat as fmt
from .. import fileio
from ..errors import CorruptedDataError, CorruptedError
from .common import Log, Progress, ToolError, oid_repr
from .verify import VerifyReport, verify
from .walk import Damage, Piece, salvage, walk

EXIT_STATUS = {"clean": 0, "repaired": 3, "losses": 4, "nothing": 5}
RECOVERED_KEY = "refstorage-recovered"


@dataclass
class Skipped:
    """A damaged stretch of the source, and what was salvaged from it."""

    start: int
    end: int
    error: str
    transactions: int = 0  # written to DST from this stretch (whole, partial or rebuilt)
    records: int = 0  # records salvaged from it
    lost: int = 0  # records known to be lost in it
    unknown: list[tuple[int, int]] = field(default_factory=list)  # ranges whose records are not known
    unfinished: int = 0  # transactions never finished (status 'c'), not copied, not a loss

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "bytes": self.end - self.start, "error": self.error,
                "transactions": self.transactions, "records": self.records, "lost": self.lost,
                "unknown": [{"start": a, "end": b} for a, b in self.unknown], "unfinished": self.unfinished}


@dataclass
class LostRecord:
    """An object revision of the source that is not in DST."""

    oid: bytes | None  # None: the oid is not known (the record's own header is damaged)
    pos: int  # in the source
    tid: bytes | None
    back: int  # for kind "backpointer": the target position that was lost
    reason: str
    kind: str = "backpointer"  # "damaged": the record failed its checks; "backpointer": its data is lost
    oid_certain: bool = True  # False: the oid was read from the damaged record itself
    newest: bool = False  # it was the newest revision of its oid: DST serves an older one, or none

    def __str__(self) -> str:
        oid = "?" if self.oid is None else oid_repr(self.oid) + ("" if self.oid_certain else "?")
        tid = "?" if self.tid is None else self.tid.hex()
        if self.kind == "backpointer":
            text = (f"oid {oid} (record at {self.pos}, tid {tid}): backpointer "
                    f"target {self.back} lost ({self.reason}); written as deleted")
        else:
            text = f"oid {oid} (record at {self.pos}, tid {tid}): {self.reason}"
        if self.newest:
            text += "; it was the newest revision: the new file has an older one, or none"
        return text

    def to_json(self) -> dict:
        return {"oid": self.oid.hex() if self.oid is not None else None, "pos": self.pos,
                "tid": self.tid.hex() if self.tid is not None else None, "backpointer": self.back,
                "reason": self.reason, "kind": self.kind, "oid_certain": self.oid_certain,
                "newest": self.newest}


@dataclass
class RecoverReport:
    src: str
    dst: str
    header_error: str | None = None
    transactions: int = 0
    records: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    lost: list[LostRecord] = field(default_factory=list)
    rebuilt: list[tuple[int, bytes]] = field(default_factory=list)  # (pos, tid) of rebuilt transactions
    rescued: int = 0  # backpointers whose target was in a skipped stretch but still readable
    moved: list[tuple[int, int]] = field(default_factory=list)  # (position, delta) of moved stretches
    dangling: list[tuple[bytes, bytes, bool]] = field(default_factory=list)  # (referrer, target, target lost)
    verify: VerifyReport | None = None

    @property
    def bytes_skipped(self) -> int:
        return sum(s.end - s.start for s in self.skipped)

    @property
    def clean(self) -> bool:
        """Nothing was damaged: DST holds everything SRC held."""
        return not self.skipped and not self.lost and not self.moved and self.header_error is None

    @property
    def unknown(self) -> list[tuple[int, int]]:
        """Ranges of damaged stretches whose records could not be told apart (what they held is lost)."""
        return [r for s in self.skipped for r in s.unknown]

    @property
    def outcome(self) -> str:
        """clean, repaired (damage, nothing lost), losses, or nothing (damage, nothing salvaged)."""
        if self.clean:
            return "clean"
        if not self.transactions:
            return "nothing"
        if self.lost or self.unknown or any(d < 0 for _p, d in self.moved):
            return "losses"
        return "repaired"

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.outcome]

    def to_json(self) -> dict:
        return {"src": self.src, "dst": self.dst, "clean": self.clean, "outcome": self.outcome,
                "exit_status": self.exit_status, "header_error": self.header_error,
                "transactions": self.transactions, "records": self.records,
                "bytes_skipped": self.bytes_skipped, "skipped": [s.to_json() for s in self.skipped],
                "lost": [x.to_json() for x in self.lost], "rescued": self.rescued,
                "rebuilt": [{"pos": p, "tid": t.hex()} for p, t in self.rebuilt],
                "dangling": [{"referrer": r.hex(), "target": t.hex(), "target_lost": lost}
                             for r, t, lost in self.dangling],
                "moved": [{"pos": p, "delta": d} for p, d in self.moved],
                "verify": self.verify.to_json() if self.verify is not None else None}


def recover(src: str, dst: str, progress: Progress | None = None, force: bool = False) -> RecoverReport:
    """Write everything intact of `src` into a new file `dst`, record by record."""
    from ..storage import FileStorage

    src, dst = str(src), str(dst)
    if fileio.exists(dst):
        if not force:
            raise ToolError(f"{dst} exists; recover writes a new file (give another name, or --force)")
        if fileio.same_file(src, dst):
            raise ToolError(f"{dst} is the damaged file itself; recover writes a new file")
    report = RecoverReport(src, dst)
    # Written under a temporary name and renamed when complete: an interrupted
    # recover never leaves a partial file under DST's name (it would verify clean).
    tmp = dst + ".recovering"
    _remove_storage_files(tmp)
    with Log(src, allow_bad_header=True) as log:
        if log.header_error is not None:
            report.header_error = str(log.header_error)
        storage = FileStorage(tmp, create=True)
        done = False
        try:
            copier = _Copier(storage, log.reader, report)
            for item in walk(log.reader, fmt.HEADER_SIZE, log.size, True, progress):
                if isinstance(item, Damage):
                    copier.damage(item, log.size)
                    continue
                if item.delta not in copier.deltas:
                    copier.deltas.append(item.delta)
                    report.moved.append((item.header.pos, item.delta))
                th = item.header
                copier.copy(th.tid, th.status, TransactionMetaData(th.user, th.description, th.extension),
                            item.records)
            # whether each lost record was its oid's newest revision: the new file's index
            # says which revision is (no oid -> tid map held over the whole copy)
            for lost in report.lost:
                if lost.oid is not None and lost.tid is not None:
                    lost.newest = _newest_tid(storage, lost.oid) < lost.tid
            done = True
        finally:
            storage.close()
            if not done:
                _remove_storage_files(tmp)
    fileio.replace_durably(tmp, dst)
    if fileio.exists(tmp + ".index"):
        fileio.replace_durably(tmp + ".index", dst + ".index")
    else:
        fileio.remove_if_exists(dst + ".index")
    fileio.remove_if_exists(tmp + ".lock")
    report.verify = verify(dst)
    lost_oids = {x.oid for x in report.lost}
    report.dangling = [(p.referrer, p.oid, p.oid in lost_oids) for p in report.verify.problems
                       if p.kind == "dangling" and p.referrer is not None and p.oid is not None]
    return report


def _newest_tid(storage, oid: bytes) -> bytes:
    """The tid of the newest revision of `oid` written to `storage` (b"" if none)."""
    snap = storage.read_snapshot()
    pos = snap.index.get(oid)
    if not pos:
        return b""
    return snap.reader.read_data_record(pos, oid).tid


def _remove_storage_files(path: str) -> None:
    for suffix in ("", ".index", ".lock", ".tmp"):
        fileio.remove_if_exists(path + suffix)


class _Copier:
    """Writes transactions and salvaged pieces to the new storage, in tid order."""

    def __init__(self, storage, reader, report: RecoverReport):
        self.storage = storage
        self.reader = reader
        self.report = report
        self.damaged: list[tuple[int, int]] = []
        self.deltas = [0]  # shifts of the moved stretches met so far (see walk.Txn.delta)
        self.last_tid = fmt.Z64
        self.last_status = fmt.STATUS_COMMITTED

    def damage(self, d: Damage, size: int) -> None:
        report = self.report
        self.damaged.append((d.start, d.end))
        skipped = Skipped(d.start, d.end, str(d.error))
        report.skipped.append(skipped)
        next_tid, next_status = None, None
        if d.end < size:
            try:
                th = self.reader.read_txn_header(d.end, size)
                next_tid, next_status = th.tid, th.status
            except CorruptedError:
                pass
        for piece in salvage(self.reader, d):
            self._piece(piece, skipped, next_tid, next_status)

    def _piece(self, piece: Piece, skipped: Skipped, next_tid: bytes | None,
               next_status: bytes | None) -> None:
        report = self.report
        if piece.unfinished:
            skipped.unfinished += 1
            return
        if not piece.complete:
            skipped.unknown.append((piece.start, piece.end))
        lost = [LostRecord(x.oid, x.pos, x.tid, 0, x.reason, "damaged", x.oid_certain) for x in piece.lost]
        if piece.records:
            tid = piece.tid
            if tid is None or not (self.last_tid < tid and (next_tid is None or tid < next_tid)):
                free = fmt.p64(fmt.u64(self.last_tid) + 1)
                tid = free if next_tid is None or free < next_tid else None
            if tid is None:
                lost += [LostRecord(r.oid, r.pos, r.tid, 0, "no tid left between the transactions around "
                                    "it", "damaged") for r in piece.records]
            else:
                th = piece.header
                if th is not None:
                    meta = TransactionMetaData(th.user, th.description, th.extension)
                    status = _status(th.status, self.last_status, next_status)
                else:
                    meta = TransactionMetaData(
                        b"", f"recovered by refstorage recover: the transaction at offset {piece.start} "
                        "had a damaged header; these are its intact records".encode(),
                        {RECOVERED_KEY: f"header damaged at offset {piece.start}"})
                    status = _status(b"", self.last_status, next_status)
                    report.rebuilt.append((piece.start, tid))
                self.copy(tid, status, meta, piece.records)
                skipped.transactions += 1
                skipped.records += len(piece.records)
        for x in lost:
            if x.tid is None and piece.tid is not None:
                x.tid = piece.tid
        skipped.lost += len(lost)
        report.lost += lost

    def copy(self, tid: bytes, status: bytes, meta, recs: list[fmt.DataRecord]) -> None:
        storage, report = self.storage, self.report
        storage.tpc_begin(meta, tid, status)
        try:
            for rec in recs:
                if not rec.is_backpointer:
                    storage.restore(rec.oid, tid, rec.data, "", None, meta)
                elif not rec.back:
                    storage.restore(rec.oid, tid, None, "", None, meta)
                else:
                    try:
                        target = _resolve(self.reader, rec, self.deltas)
                    except CorruptedError as exc:
                        report.lost.append(LostRecord(rec.oid, rec.pos, rec.tid, rec.back, exc.detail))
                        storage.restore(rec.oid, tid, None, "", None, meta)
                    else:
                        if target is None:
                            storage.restore(rec.oid, tid, None, "", None, meta)
                        else:
                            if any(a <= target.pos < b for a, b in self.damaged):
                                report.rescued += 1
                            storage.restore(rec.oid, tid, target.data, "", target.tid, meta)
            storage.tpc_vote(meta)
            storage.tpc_finish(meta)
        except BaseException:
            storage.tpc_abort(meta)
            raise
        self.last_tid, self.last_status = tid, status
        report.transactions += 1
        report.records += len(recs)


def _status(raw: bytes, before: bytes, after: bytes | None) -> bytes:
    """The status to write for a salvaged transaction whose status byte reads `raw`.

    A valid one is kept.  A flipped one (the header checksum skips it) is the
    finished status nearest in bits; where ' ' and 'p' are equally near, or
    the header is lost, 'p' only between two packed transactions."""
    if raw in (fmt.STATUS_COMMITTED, fmt.STATUS_PACKED):
        return raw
    if len(raw) == 1:
        dist = {s: bin(raw[0] ^ s[0]).count("1") for s in (fmt.STATUS_COMMITTED, fmt.STATUS_PACKED)}
        if dist[fmt.STATUS_COMMITTED] != dist[fmt.STATUS_PACKED]:
            return min(dist, key=dist.__getitem__)
    if before == fmt.STATUS_PACKED and after == fmt.STATUS_PACKED:
        return fmt.STATUS_PACKED
    return fmt.STATUS_COMMITTED


def _resolve(reader, rec: fmt.DataRecord, deltas: list[int]) -> fmt.DataRecord | None:
    """Follow backpointers to the data, as LogReader.resolve does, also into moved stretches.

    A backpointer holds the position its target was written at; a target in
    a stretch that moved since is found at that position plus the stretch's
    shift.  The target must be a record of the same oid with an earlier tid."""
    hops = 0
    while rec.is_backpointer:
        if not rec.back:
            return None
        found = None
        for delta in deltas:
            if rec.back + delta < fmt.HEADER_SIZE:
                continue
            try:
                # a moved target names its old transaction position: bound it by the file
                target = reader.read_data_record(rec.back + delta, rec.oid,
                                                 limit=reader.file.size if delta else None)
            except CorruptedError:
                continue
            if target.tid < rec.tid:
                found = target
                break
        hops += 1
        if found is None or hops > 1000:
            raise CorruptedDataError(reader.path, f"no earlier record of oid {rec.oid.hex()} at backpointer "
                                     f"{rec.back}", rec.pos)
        rec = found
    return rec
