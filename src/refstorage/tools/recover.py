"""`refstorage recover SRC DST`: salvage every good transaction of a damaged file.

The source is walked forward (`walk`); at a bad transaction the walk looks
for the next position where a valid transaction starts and the bytes in
between are reported as skipped.  Each transaction that passes all its
checks (header, oid table, trailer, every record's checksum) is written to a
new file through `FileStorage`'s restore API (tpc_begin with the original
tid and status, restore() per record), so every position -- prev pointers,
backpointers, transaction positions -- is the new file's own and all the
encoding stays in the storage.

Backpointers: one whose target record can still be read (even from a
skipped transaction, if that record itself passes its checksum) is written
with the target's data; the new file turns it back into a backpointer when
the target's transaction was salvaged too.  One whose target is lost is
written as a deletion (backpointer 0): loading that object then raises
POSKeyError instead of quietly serving an older revision.  Each such record
is reported.  Transactions that are intact but moved (bytes lost or
inserted before them, see `walk.Txn.delta`) are salvaged too: their
backpointers are followed with the shift applied.  The new file is verified
at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ZODB.Connection import TransactionMetaData

from .. import fileformat as fmt
from .. import fileio
from ..errors import CorruptedDataError, CorruptedError
from .common import Log, Progress, ToolError, oid_repr
from .verify import VerifyReport, verify
from .walk import Damage, walk


@dataclass
class Skipped:
    start: int
    end: int
    error: str

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "bytes": self.end - self.start, "error": self.error}


@dataclass
class LostRecord:
    oid: bytes
    pos: int  # in the source
    tid: bytes
    back: int
    reason: str

    def __str__(self) -> str:
        return (f"oid {oid_repr(self.oid)} (record at {self.pos}, tid {self.tid.hex()}): backpointer "
                f"target {self.back} lost ({self.reason}); written as deleted")

    def to_json(self) -> dict:
        return {"oid": self.oid.hex(), "pos": self.pos, "tid": self.tid.hex(), "backpointer": self.back,
                "reason": self.reason}


@dataclass
class RecoverReport:
    src: str
    dst: str
    header_error: str | None = None
    transactions: int = 0
    records: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    lost: list[LostRecord] = field(default_factory=list)
    rescued: int = 0  # backpointers whose target was in a skipped stretch but still readable
    moved: list[tuple[int, int]] = field(default_factory=list)  # (position, delta) of moved stretches
    verify: VerifyReport | None = None

    @property
    def bytes_skipped(self) -> int:
        return sum(s.end - s.start for s in self.skipped)

    @property
    def clean(self) -> bool:
        """Nothing was skipped or lost: DST holds everything SRC held."""
        return not self.skipped and not self.lost and not self.moved and self.header_error is None

    def to_json(self) -> dict:
        return {"src": self.src, "dst": self.dst, "clean": self.clean, "header_error": self.header_error,
                "transactions": self.transactions, "records": self.records,
                "bytes_skipped": self.bytes_skipped, "skipped": [s.to_json() for s in self.skipped],
                "lost": [x.to_json() for x in self.lost], "rescued": self.rescued,
                "moved": [{"pos": p, "delta": d} for p, d in self.moved],
                "verify": self.verify.to_json() if self.verify is not None else None}


def recover(src: str, dst: str, progress: Progress | None = None, force: bool = False) -> RecoverReport:
    """Write the good transactions of `src` into a new file `dst`."""
    from ..storage import FileStorage

    src, dst = str(src), str(dst)
    if fileio.exists(dst):
        if not force:
            raise ToolError(f"{dst} exists; recover writes a new file (give another name, or --force)")
        if fileio.same_file(src, dst):
            raise ToolError(f"{dst} is the damaged file itself; recover writes a new file")
    report = RecoverReport(src, dst)
    with Log(src, allow_bad_header=True) as log:
        if log.header_error is not None:
            report.header_error = str(log.header_error)
        storage = FileStorage(dst, create=True)
        try:
            damaged: list[tuple[int, int]] = []
            deltas = [0]  # shifts of the moved stretches met so far (see walk.Txn.delta)
            for item in walk(log.reader, fmt.HEADER_SIZE, log.size, True, progress):
                if isinstance(item, Damage):
                    damaged.append((item.start, item.end))
                    report.skipped.append(Skipped(item.start, item.end, str(item.error)))
                    continue
                if item.delta not in deltas:
                    deltas.append(item.delta)
                    report.moved.append((item.header.pos, item.delta))
                _copy_txn(storage, log.reader, item.header, item.records, damaged, deltas, report)
        finally:
            storage.close()
    report.verify = verify(dst)
    return report


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
                target = reader.read_data_record(rec.back + delta, rec.oid)
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


def _copy_txn(storage, reader, th: fmt.TxnHeader, recs: list[fmt.DataRecord],
              damaged: list[tuple[int, int]], deltas: list[int], report: RecoverReport) -> None:
    meta = TransactionMetaData(th.user, th.description, th.extension)
    storage.tpc_begin(meta, th.tid, th.status)
    try:
        for rec in recs:
            if not rec.is_backpointer:
                storage.restore(rec.oid, rec.tid, rec.data, "", None, meta)
            elif not rec.back:
                storage.restore(rec.oid, rec.tid, None, "", None, meta)
            else:
                try:
                    target = _resolve(reader, rec, deltas)
                except CorruptedError as exc:
                    report.lost.append(LostRecord(rec.oid, rec.pos, rec.tid, rec.back, exc.detail))
                    storage.restore(rec.oid, rec.tid, None, "", None, meta)
                else:
                    if target is None:
                        storage.restore(rec.oid, rec.tid, None, "", None, meta)
                    else:
                        if any(a <= target.pos < b for a, b in damaged):
                            report.rescued += 1
                        storage.restore(rec.oid, rec.tid, target.data, "", target.tid, meta)
        storage.tpc_vote(meta)
        storage.tpc_finish(meta)
    except BaseException:
        storage.tpc_abort(meta)
        raise
    report.transactions += 1
    report.records += len(recs)
