"""Bit flips: flip every bit of a small database, one at a time; no wrong answer, ever.

The database (helpers.build_small_db) is three transactions of a few small
records -- plain data, a pickle with a reference, an undo's backpointers, a
"no data" record -- and no index file, 1,842 bytes: 14,736 flips.  For each
flip the file is opened read-only and read-write, and everything is read:
load, loadBefore and loadSerial of every revision, the iterator (every record
of every transaction), undoLog, a verifying scan, and `refstorage dump`.

Required, for every flip:
- no read returns data other than what was written (0 silent corruptions);
- every CorruptedError names an offset inside the damaged transaction (or
  the file header);
- damage followed by valid transactions is refused read-write with a
  corruption error, or (a data record in the middle, which open does not
  read) opens with every transaction and is reported when that record is
  read and by a verifying scan -- never a truncation;
- damage in the last transaction is moved to a side file holding exactly the
  removed bytes, with a warning;
- a damaged file header is refused, read-only and read-write, with its specific error.

The outcome of each flip is counted by class; docs/reliability.md has the table.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from ZODB import POSException
from ZODB.utils import p64, u64, z64

import refstorage
from refstorage import errors
from refstorage import fileformat as fmt
from refstorage.log import scan

try:
    from refstorage.tools import dump as dump_tool
except ImportError:  # the tools are optional here
    dump_tool = None

from .helpers import TxnModel, build_small_db, capture_log, close_quickly, no_fsync, report, temp_dir

pytestmark = pytest.mark.reliability

HEADER_ERRORS = (errors.CorruptedHeaderError, errors.NotARefStorageFileError, errors.FutureVersionError)


class Damage:
    """Where the flipped bit is: the file header, or transaction i's byte range."""

    def __init__(self, byte: int, ranges: list[tuple[int, int]]):
        self.byte = byte
        if byte < fmt.HEADER_SIZE:
            self.txn = None
            self.lo, self.hi = 0, fmt.HEADER_SIZE
        else:
            self.txn = next(i for i, (lo, hi) in enumerate(ranges) if lo <= byte < hi)
            self.lo, self.hi = ranges[self.txn]

    def region(self) -> str:
        return "file header" if self.txn is None else f"transaction {self.txn + 1}"

    def check_offset(self, exc: errors.CorruptedError) -> None:
        assert exc.offset is not None and self.lo <= exc.offset < self.hi, (
            f"{type(exc).__name__} names offset {exc.offset}, outside the damaged "
            f"range [{self.lo}, {self.hi}) of byte {self.byte}: {exc}")


def read_everything(st, model: TxnModel, damage: Damage) -> tuple[int, int]:
    """Read all a storage serves; assert every answer is right or a CorruptedError at the
    damage.  Returns (reads that raised CorruptedError, 1 if a verifying scan found damage)."""
    last = st.lastTransaction()
    tids = model.tids
    assert last == z64 or last in tids, f"lastTransaction {last.hex()} was never committed"
    n = tids.index(last) + 1 if last != z64 else 0
    state = model.state(n)
    sub = TxnModel()
    sub.txns = model.txns[:n]
    detected = 0

    def attempt(fn, *args):
        nonlocal detected
        try:
            return True, fn(*args)
        except errors.CorruptedError as exc:
            damage.check_offset(exc)
            detected += 1
            return False, None

    for oid in model.oids():
        want = state.get(oid)
        try:
            ok, got = attempt(st.load, oid)
        except POSException.POSKeyError:
            assert want is None, f"oid {u64(oid)} missing (POSKeyError) but it has data"
            continue
        if ok:
            assert want is not None and got == (want, _tid_of(sub, oid)), (
                f"load(oid {u64(oid)}) returned {got!r}, expected {want!r}")
    for tid, writes in sub.txns:
        following = p64(u64(tid) + 1)
        for oid, data in writes.items():
            if data is None:
                continue
            ok, got = attempt(st.loadBefore, oid, following)
            if ok:
                assert got == sub.revision_before(oid, following), f"loadBefore(oid {u64(oid)}): {got!r}"
            ok, got = attempt(st.loadSerial, oid, tid)
            if ok:
                assert got == data, f"loadSerial(oid {u64(oid)}): {got!r}"
    try:
        for i, t in enumerate(st.iterator()):
            assert t.tid == tids[i]
            got = {}
            for r in t:
                got[r.oid] = r.data
            assert got == model.txns[i][1], f"iterator: transaction {i + 1} holds other records"
    except errors.CorruptedError as exc:
        damage.check_offset(exc)
        detected += 1
    ok, log = attempt(st.undoLog, 0, 10)
    if ok:
        assert [e["id"] for e in log] == [refstorage.undo.undo_id(t) for t in reversed(tids[:n])]
    result = scan(st._state.reader, fmt.HEADER_SIZE, st._end, None, verify=True)
    if result.bad_pos is not None:
        damage.check_offset(result.error)
    return detected, int(result.bad_pos is not None)


def check_dump(path: str, model: TxnModel, damage: Damage) -> str:
    """`refstorage dump` of the damaged file: every transaction it shows is one that was
    written, every record's data is what was written; the damage shows as such."""
    written = dict(model.txns)
    damaged = 0
    for item in dump_tool.dump(path, full_data=True):
        if item["type"] == "damage":
            damaged += 1
            assert item["start"] <= damage.byte < item["end"] or item["start"] < fmt.HEADER_SIZE, (
                f"dump reports damage at [{item['start']}, {item['end']}), the flip is at {damage.byte}")
        elif item["type"] == "transaction":
            tid = bytes.fromhex(item["tid"])
            assert tid in written, f"dump shows a transaction {item['tid']} that was never written"
            for r in item["records"]:
                oid = bytes.fromhex(r["oid"])
                assert oid in written[tid], f"dump shows a record of oid {u64(oid)} never written in it"
                if "backpointer" not in r:
                    assert bytes.fromhex(r["data"]) == written[tid][oid], f"dump: wrong data for {u64(oid)}"
    return "dump reports the damage" if damaged else "dump shows no damage"


def _tid_of(model: TxnModel, oid: bytes) -> bytes:
    return [tid for tid, writes in model.txns if oid in writes][-1]


def check_flip(path: str, original: bytes, byte: int, bit: int, model: TxnModel,
               ranges: list[tuple[int, int]], dumped: Counter) -> str:
    """Flip one bit, open read-only and read-write, read everything; return the outcome class."""
    damaged = bytearray(original)
    damaged[byte] ^= 1 << bit
    for suffix in (".tr0", ".index"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    with open(path, "wb") as f:
        f.write(damaged)
    damage = Damage(byte, ranges)
    last_txn = len(ranges) - 1
    with capture_log() as log:
        if dump_tool is not None:
            try:
                dumped[check_dump(path, model, damage)] += 1
            except HEADER_ERRORS as exc:
                assert damage.txn is None, f"dump: {exc!r} for damage in {damage.region()}"
                dumped[f"dump refuses the file: {type(exc).__name__}"] += 1
        # read-only: serves the transactions before the first damage it sees
        try:
            ro = refstorage.FileStorage(path, read_only=True)
        except HEADER_ERRORS as exc:
            assert damage.txn is None, f"{exc!r} for damage in {damage.region()}"
            with pytest.raises(type(exc)):
                refstorage.FileStorage(path)
            return f"header refused: {type(exc).__name__}"
        try:
            read_everything(ro, model, damage)
        finally:
            ro.close()
        with open(path, "rb") as f:
            assert f.read() == damaged, "a read-only open changed the file"
        # read-write
        try:
            st = refstorage.FileStorage(path)
        except errors.CorruptedError as exc:
            assert damage.txn is not None and damage.txn < last_txn, (
                f"refused damage in {damage.region()}: {exc}")
            assert "followed by valid" in str(exc)
            damage.check_offset(exc)
            return "refused read-write: damage followed by valid transactions"
        try:
            last = st.lastTransaction()
            if last == model.tids[-1]:
                assert damage.txn is not None and damage.txn < last_txn, (
                    f"damage in {damage.region()} went unnoticed by open")
                assert not os.path.exists(path + ".tr0")
                detected, verified = read_everything(st, model, damage)
                assert detected or verified, f"damage at byte {byte} bit {bit} never detected"
                return ("opens; a read reports the damaged record" if detected else
                        "opens; only a verifying scan reports the damage")
            assert last == model.tids[-2] and damage.txn == last_txn, (
                f"silent truncation to {last.hex()} for damage in {damage.region()}")
            with open(path + ".tr0", "rb") as f:
                assert f.read() == bytes(damaged[ranges[-1][0]:])
            assert os.path.getsize(path) == ranges[-1][0]
            assert any("incomplete last transaction" in r.getMessage() for r in log)
            read_everything(st, model, damage)
            return "last transaction moved to a side file, with a warning"
        finally:
            close_quickly(st)


def test_every_bit_flip():
    outcomes: Counter = Counter()
    by_region: Counter = Counter()
    dumped: Counter = Counter()
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        model, ranges = build_small_db(path)
        with open(path, "rb") as f:
            original = f.read()
        with no_fsync():  # durability is not under test here: keeps the 15,000 opens fast
            for byte in range(len(original)):
                for bit in range(8):
                    try:
                        outcome = check_flip(path, original, byte, bit, model, ranges, dumped)
                    except BaseException as exc:
                        raise AssertionError(f"flip of byte {byte} bit {bit}: {exc!r}") from exc
                    outcomes[outcome] += 1
                    by_region[(Damage(byte, ranges).region(), outcome)] += 1
    total = sum(outcomes.values())
    assert total == 8 * len(original)
    report("bitflip", file_bytes=len(original), flips=total, outcomes=dict(outcomes), dump=dict(dumped),
           by_region={f"{r} | {o}": n for (r, o), n in sorted(by_region.items())})
