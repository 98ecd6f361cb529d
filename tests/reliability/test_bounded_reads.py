"""Reads stay bounded on damaged input: one test per damaged length field (issue 11, part 3).

A data record's length and reference count are read before its checksum can
be checked (the checksum is at the record's end), as are the metadata lengths
of a transaction header.  A flipped bit there must not make a reader read
past the transaction that holds the record (whose header is checksummed), nor
allocate the damaged length: every operation -- load, loadBefore, history,
iteration, open, verify -- either refuses with a CorruptedError naming the
file and an offset in the damaged record, or (open) treats the damage as the
file's rules say, and no positioned read that starts inside the damaged
transaction reaches past its end, nor asks for more than CHECK_CHUNK bytes.

The file has a long transaction after the damage (tens of MB), so a read
bounded only by the file size (what the reader did before) is caught.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest
from ZODB.POSException import POSKeyError
from ZODB.utils import p64

import refstorage
from refstorage import fileformat as fmt
from refstorage import fileio, log
from refstorage.errors import CorruptedDataError, CorruptedError, CorruptedTransactionError
from refstorage.tools import walk
from refstorage.tools.verify import verify

from .helpers import capture_log, commit, no_fsync, temp_dir

pytestmark = pytest.mark.reliability

BIG_TAIL = 24 << 20  # a record this long, after the damage, makes the file large
IN_BIG_TXN = 3 << 20  # a record longer than BIG_READ, in the same transaction as a damaged one


class ReadLog(fileio.Ops):
    """Records every positioned read (position, length asked)."""

    def __init__(self):
        self.reads: list[tuple[int, int]] = []

    def pread(self, fd, n, pos):
        self.reads.append((pos, n))
        return super().pread(fd, n, pos)


@pytest.fixture(scope="module")
def base_db():
    """Transactions: A (small records, one long), B (oid 1 again), C (a small record
    before a 3 MB one), D (one 24 MB record), E (small, the last).  Returns
    (dir, path, {name: (txn start, txn next_pos)}, {(name, oid): record pos})."""
    with temp_dir("rfs-bounded-") as d, no_fsync():
        path = os.path.join(d, "base.rfs")
        st = refstorage.FileStorage(path, create=True)
        commit(st, {p64(1): b"one-a" * 10, p64(2): b"two-a", p64(6): b"L" * 5000},
               user="alice", description="A")
        commit(st, {p64(1): b"one-b" * 10}, description="B")
        commit(st, {p64(8): b"small in a big txn", p64(7): b"M" * IN_BIG_TXN}, description="C")
        commit(st, {p64(9): b"T" * BIG_TAIL}, description="D")
        commit(st, {p64(10): b"last" * 20, p64(11): b"L" * 6000}, description="E")
        reader = st._state.reader
        txns, recs = {}, {}
        for name, th in zip("ABCDE", reader.iter_txns(fmt.HEADER_SIZE, st._end), strict=True):
            txns[name] = (th.pos, th.next_pos)
            for rec in reader.txn_records(th):
                recs[(name, rec.oid)] = rec.pos
        st._saved_end = st._end  # no index file: open always scans
        st.close()
        yield d, path, txns, recs


# (where, oid, field offset in the record, bit): record fields
RECORD_SHAPES = {
    "dlen-high-bit-small-record": ("A", 2, 38, 31),
    "dlen-high-bit-long-record": ("A", 6, 38, 31),
    "dlen-bit-20-long-record": ("A", 6, 38, 20),
    "dlen-high-bit-old-revision": ("A", 1, 38, 31),
    "dlen-bit-21-in-a-big-txn": ("C", 8, 38, 21),
    "dlen-high-bit-in-a-big-txn": ("C", 8, 38, 31),
    "nrefs-high-bit": ("A", 2, 34, 31),
    "nrefs-bit-20-long-record": ("A", 6, 34, 20),
    "nrefs-bit-18-in-a-big-txn": ("C", 8, 34, 18),
    "flags-backpointer-long-record": ("A", 6, 32, 0),
    "tpos-bit-30-long-record": ("A", 6, 24, 30),
    "dlen-high-bit-last-txn": ("E", 10, 38, 31),
    "dlen-high-bit-last-txn-long-record": ("E", 11, 38, 31),
}
# (txn, field offset in the transaction header, width, bit); the header is
# tid(8) tlen(8) status(1) ulen(4) dlen(4) elen(4) nrec(4) hcrc(4)
HEADER_SHAPES = {
    "txn-tlen-high-bit": ("B", 8, 8, 62),
    "txn-ulen-high-bit": ("B", 17, 4, 31),
    "txn-dlen-bit-24": ("B", 21, 4, 24),
    "txn-elen-high-bit": ("B", 25, 4, 31),
    "txn-nrec-high-bit": ("B", 29, 4, 31),
    "txn-ulen-high-bit-last-txn": ("E", 17, 4, 31),
}


def _flip(path: str, pos: int, width: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        raw = f.read(width)
        value = int.from_bytes(raw, "big") ^ (1 << bit)
        f.seek(pos)
        f.write(value.to_bytes(width, "big"))


def _check_reads(reads, start: int, end: int, file_size: int) -> None:
    """No read that starts in the damaged transaction [start, end) goes past its end, except
    the fixed-size reads with which verify looks for the next valid transaction."""
    for pos, n in reads:
        if start <= pos < end:
            assert min(pos + n, file_size) <= end or n <= walk.SEARCH_CHUNK + fmt.TXN_HEADER_SIZE, (
                f"a read of {n} bytes at {pos} goes past the damaged transaction [{start}, {end})")


def _expect_corrupt(fn, path: str, lo: int, hi: int):
    """fn() raises a CorruptedError naming `path` and an offset in [lo, hi)."""
    with pytest.raises(CorruptedError) as info:
        fn()
    exc = info.value
    assert exc.path == path, exc
    assert exc.offset is not None and lo <= exc.offset < hi, (exc, lo, hi)
    return exc


def _damaged_copy(base_db, tmp_path, name: str) -> tuple[str, dict, dict]:
    d, path, txns, recs = base_db
    copy = str(tmp_path / f"{name}.rfs")
    shutil.copyfile(path, copy)
    return copy, txns, recs


def _run_everything(path: str, txns: dict, where: str, oid: bytes | None, lo: int, hi: int) -> ReadLog:
    """load/loadBefore/history/iterate on a read-only open, then verify, then a read-write open."""
    start, end = txns[where]
    ops = ReadLog()
    last = where == "E"
    with fileio.injected(ops), capture_log():
        if oid is None:  # a damaged transaction header
            reader = log.LogReader(fileio.DataFile(path, read_only=True))
            size = os.path.getsize(path)
            if not last:
                _expect_corrupt(lambda: reader.read_txn_header(start, size), path, start, end)
                _expect_corrupt(lambda: list(reader.iter_txns(fmt.HEADER_SIZE, size)), path, start, end)
            with contextlib.suppress(CorruptedError):  # (a read-only open may refuse damage)
                st = refstorage.FileStorage(path, read_only=True)
                assert st.load(p64(2))[0] == b"two-a"
                st.close()
        else:
            _storage_reads(path, where, oid, lo, hi, start, end)
        report = verify(path)
        assert not report.ok
        assert any(p.offset is not None and start <= p.offset < end for p in report.problems), \
            [str(p) for p in report.problems]
        try:
            st = refstorage.FileStorage(path)
        except CorruptedError as exc:  # damage followed by valid transactions
            assert not last and exc.path == path and exc.offset is not None
        else:
            st.close()
    _check_reads(ops.reads, start, end, os.path.getsize(path))
    return ops


def _storage_reads(path: str, where: str, oid: bytes, lo: int, hi: int, start: int, end: int) -> None:
    """load, loadBefore, history and iteration of a read-only open refuse the damaged record."""
    last = where == "E"
    st = refstorage.FileStorage(path, read_only=True)
    try:
        if last:  # the damaged last transaction is a torn tail: it is not served
            assert st.lastTransaction() != b"\0" * 8
            with pytest.raises(POSKeyError):
                st.load(oid)
        else:
            if where == "A" and oid == p64(1):  # an old revision: loadBefore, history
                tid_b = st.getTid(p64(1))
                _expect_corrupt(lambda: st.loadBefore(p64(1), tid_b), path, lo, hi)
                _expect_corrupt(lambda: st.history(p64(1), size=5), path, lo, hi)
            else:
                _expect_corrupt(lambda: st.load(oid), path, lo, hi)
                _expect_corrupt(lambda: st.history(oid), path, lo, hi)

        def iterate():
            for t in st.iterator():
                for _ in t:
                    pass
        if not last:
            _expect_corrupt(iterate, path, start, end)
        else:
            iterate()
        if where == "A":  # undamaged records still load
            assert st.load(p64(8))[0] == b"small in a big txn"
        else:
            assert st.load(p64(2))[0] == b"two-a"
    finally:
        st.close()


def test_damaged_trailer_length(base_db, tmp_path):
    """The redundant tlen at a transaction's end: stepping back from there reads one header."""
    path, txns, recs = _damaged_copy(base_db, tmp_path, "trailer")
    start, end = txns["B"]
    _flip(path, end - 8, 8, 40)
    ops = ReadLog()
    reader = log.LogReader(fileio.DataFile(path, read_only=True))
    with fileio.injected(ops):
        _expect_corrupt(lambda: reader.txn_ending_at(end), path, start, end)
    assert sum(n for _, n in ops.reads) <= 8 + log.READ_AHEAD
    report = verify(path)
    assert not report.ok


@pytest.fixture
def small_big_read(monkeypatch):
    """Long records are checksummed in chunks from 1 MiB on (the 3 MB record's transaction
    then exercises that path)."""
    monkeypatch.setattr(log, "BIG_READ", 1 << 20)


@pytest.mark.parametrize("shape", sorted(RECORD_SHAPES))
def test_damaged_record_length_field(base_db, tmp_path, shape, small_big_read):
    where, oid_int, off, bit = RECORD_SHAPES[shape]
    path, txns, recs = _damaged_copy(base_db, tmp_path, shape)
    pos = recs[(where, p64(oid_int))]
    width = {38: 4, 34: 4, 32: 2, 24: 8}[off]
    _flip(path, pos + off, width, bit)
    _run_everything(path, txns, where, p64(oid_int), pos, txns[where][1])


@pytest.mark.parametrize("shape", sorted(HEADER_SHAPES))
def test_damaged_transaction_length_field(base_db, tmp_path, shape, small_big_read):
    where, off, width, bit = HEADER_SHAPES[shape]
    path, txns, recs = _damaged_copy(base_db, tmp_path, shape)
    start, end = txns[where]
    _flip(path, (end if off < 0 else start) + off, width, bit)
    _run_everything(path, txns, where, None, start, end)


def test_load_of_a_damaged_long_record_reads_only_its_transaction(base_db, tmp_path):
    """The plain load path (read_data), measured: the bytes read for the refusal."""
    path, txns, recs = _damaged_copy(base_db, tmp_path, "measured")
    pos = recs[("A", p64(6))]
    _flip(path, pos + 38, 4, 31)
    with capture_log():
        st = refstorage.FileStorage(path, read_only=True)
    ops = ReadLog()
    try:
        with fileio.injected(ops):
            exc = _expect_corrupt(lambda: st.load(p64(6)), path, pos, pos + 1)
    finally:
        st.close()
    assert isinstance(exc, CorruptedDataError)
    assert "runs past its transaction" in str(exc)
    assert sum(n for _, n in ops.reads) <= 3 * log.READ_AHEAD, ops.reads


def test_long_metadata_is_checked_in_chunks(tmp_path, small_big_read):
    """A transaction whose extension is longer than BIG_READ reads back; damaged, it is refused."""
    path = str(tmp_path / "meta.rfs")
    with no_fsync():
        st = refstorage.FileStorage(path, create=True)
        commit(st, {p64(1): b"x"}, extension={"blob": "e" * (2 * log.BIG_READ)})
        commit(st, {p64(1): b"y"})
        st.close()
    with no_fsync(), capture_log():
        st = refstorage.FileStorage(path, read_only=True)
        hist = st.history(p64(1), size=2)
        st.close()
    assert len(hist) == 2 and len(hist[1]["blob"]) == 2 * log.BIG_READ
    th = next(iter(log.LogReader(fileio.DataFile(path, read_only=True)).iter_txns(
        fmt.HEADER_SIZE, os.path.getsize(path))))
    _flip(path, th.pos + fmt.TXN_HEADER_SIZE + 100, 1, 0)  # inside the extension
    ops = ReadLog()
    reader = log.LogReader(fileio.DataFile(path, read_only=True))
    with fileio.injected(ops):
        with pytest.raises(CorruptedTransactionError, match="checksum"):
            reader.read_txn_header(th.pos)
    assert max(n for _, n in ops.reads) <= log.CHECK_CHUNK


def test_format_chunk_checkers():
    rec = fmt.encode_data_record(p64(1), p64(2), 0, 1024, b"", b"d" * 1000)
    header = fmt.peek_data_header(rec, 0, "f", 5000)
    chunks = [rec[i:i + 7] for i in range(0, len(rec), 7)]
    fmt.check_data_record_chunks(chunks, header, "f", 5000)
    with pytest.raises(CorruptedDataError, match="cut short"):
        fmt.check_data_record_chunks(chunks[:-1], header, "f", 5000)
    bad = bytearray(rec)
    bad[500] ^= 1
    with pytest.raises(CorruptedDataError, match="checksum"):
        fmt.check_data_record_chunks([bytes(bad)], header, "f", 5000)
    h = fmt.encode_txn_header(p64(3), 500, b" ", b"u" * 10, b"d" * 10, b"e" * 10, 1)
    fixed, var = h[:fmt.TXN_HEADER_SIZE], h[fmt.TXN_HEADER_SIZE:]
    fmt.check_txn_header_chunks(fixed, [var[:3], var[3:]], "f", 9)
    with pytest.raises(CorruptedTransactionError, match="cut short"):
        fmt.check_txn_header_chunks(fixed, [var[:3]], "f", 9)
    with pytest.raises(CorruptedTransactionError, match="checksum"):
        fmt.check_txn_header_chunks(fixed, [var[:-1] + b"x"], "f", 9)
