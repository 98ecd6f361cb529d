"""Open and `refstorage verify` agree: every truncation and every bit flip of a small file.

Both decide where the good log ends by the same rules (`log.next_valid_txn`:
is damage a torn tail, or followed by a valid transaction; and
`recovery.check_saved_index`: is the saved index usable).  For each damaged
copy of helpers.build_small_db's file, `verify` runs first; then the file is
opened read-only and read-write, and what they do must be what verify's
report says:

- verify cannot read the file header (it raises): both opens raise the same error;
  verify reports a damaged header: both opens refuse the file;
- no damage reported: both opens serve the whole file, nothing is moved;
- the first damage is a torn tail at s: both serve exactly the bytes before s,
  and read-write moves the rest, byte for byte, to the side file;
- the first damage is damage at s followed by valid transactions: if the
  transaction at s is valid by the shared rule (only its records are bad, which
  open does not read outside the last transaction), both opens serve the whole
  file; otherwise read-write refuses with a corruption error at or after s,
  and read-only either refuses the same way or serves the bytes before s;
- with a saved index: open uses it exactly when verify does not report it.

Truncations: every length, with and without the index saved for the whole
file.  Bit flips: every byte, one bit each (bit = byte mod 8); all 8 bits of
every byte under --long.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

import refstorage
from refstorage import errors
from refstorage import fileformat as fmt
from refstorage.fileio import DataFile
from refstorage.log import LogReader, valid_txn_at
from refstorage.tools.verify import verify

from .helpers import LONG, build_small_db, capture_log, close_quickly, no_fsync, report, temp_dir

pytestmark = pytest.mark.reliability

HEADER_ERRORS = (errors.CorruptedHeaderError, errors.NotARefStorageFileError, errors.FutureVersionError,
                 errors.EmptyFileError)


def _write(path: str, content: bytes, index: bytes | None) -> None:
    for suffix in (".tr0", ".tr1", ".index"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    with open(path, "wb") as f:
        f.write(content)
    if index is not None:
        with open(path + ".index", "wb") as f:
            f.write(index)


def _records_only(path: str, s: int, size: int) -> bool:
    """Is the transaction at s valid by the shared rule (header, oid table, trailer, tid order)?"""
    f = DataFile(path, read_only=True)
    try:
        reader = LogReader(f)
        before = reader.txn_ending_at(s, size).tid if s > fmt.HEADER_SIZE else None
        return valid_txn_at(reader, s, size, before)
    finally:
        f.close()


def check(path: str, content: bytes, index: bytes | None) -> str:
    """Verify, then open read-only and read-write; assert they agree.  Returns the case's class."""
    size = len(content)
    _write(path, content, index)
    try:
        v = verify(path)
    except HEADER_ERRORS as exc:
        for read_only in (True, False):
            with pytest.raises(type(exc)):
                refstorage.FileStorage(path, read_only=read_only)
        return f"both refuse the file: {type(exc).__name__}"
    if v.counts.get("header"):
        for read_only in (True, False):
            with pytest.raises(HEADER_ERRORS):
                refstorage.FileStorage(path, read_only=read_only)
        return "verify: damaged header; both opens refuse"
    damage = sorted((p for p in v.problems if p.kind in ("damage", "torn-tail")), key=lambda p: p.offset)
    index_ok = index is not None and not v.counts.get("index")
    first = damage[0] if damage else None
    # read-only
    try:
        ro = refstorage.FileStorage(path, read_only=True)
    except errors.CorruptedError as exc:
        assert first is not None and first.kind == "damage", f"read-only refused: {exc}; verify: {damage}"
        assert not _records_only(path, first.offset, size)
        assert first.offset <= exc.offset < size
        ro_end = None
    else:
        ro_end = ro._end
        if index is not None:
            assert bool(ro._index_saved_end) == index_ok, (
                f"open {'used' if ro._index_saved_end else 'ignored'} the saved index; verify says "
                f"{v.index_file}")
        ro.close()
    with open(path, "rb") as f:
        assert f.read() == content, "a read-only open changed the file"
    # read-write
    try:
        rw = refstorage.FileStorage(path)
    except errors.CorruptedError as exc:
        assert first is not None and first.kind == "damage", f"read-write refused: {exc}; verify: {damage}"
        assert not _records_only(path, first.offset, size), "open refused what it does not read"
        assert first.offset <= exc.offset < size, (exc.offset, first.offset)
        assert ro_end in (None, first.offset), (ro_end, first.offset)
        return "verify: damage followed by valid data; read-write open refuses it"
    rw_end = rw._end
    close_quickly(rw)
    if first is None:
        assert ro_end == rw_end == size and not os.path.exists(path + ".tr0"), (ro_end, rw_end, size)
        return "verify: no damage; both serve everything"
    if first.kind == "torn-tail":
        s = first.offset
        assert ro_end == rw_end == s, (ro_end, rw_end, s)
        assert os.path.getsize(path) == s
        with open(path + ".tr0", "rb") as f:
            assert f.read() == content[s:]
        return "verify: torn tail; both serve the prefix, read-write moves the tail aside"
    assert _records_only(path, first.offset, size), f"read-write open accepted damage at {first.offset}"
    assert ro_end == rw_end == size and not os.path.exists(path + ".tr0")
    return "verify: damaged records in a middle transaction; both serve everything (loads report them)"


def test_open_and_verify_agree_on_every_truncation():
    outcomes: Counter = Counter()
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        build_small_db(path)
        with open(path, "rb") as f:
            original = f.read()
        st = refstorage.FileStorage(path)
        st.close()
        with open(path + ".index", "rb") as f:
            full_index = f.read()
        with no_fsync(), capture_log():
            for n in range(len(original) + 1):
                for index in (None, full_index):
                    try:
                        outcomes[check(path, original[:n], index)] += 1
                    except BaseException as exc:
                        raise AssertionError(f"cut at {n} (index: {index is not None}): {exc!r}") from exc
    assert sum(outcomes.values()) == 2 * (len(original) + 1)
    report("agreement-truncate", file_bytes=len(original), cases=sum(outcomes.values()),
           outcomes=dict(outcomes))


def test_open_and_verify_agree_on_every_bit_flip():
    outcomes: Counter = Counter()
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        build_small_db(path)
        with open(path, "rb") as f:
            original = f.read()
        with no_fsync(), capture_log():
            for byte in range(len(original)):
                for bit in range(8) if LONG else (byte % 8,):
                    damaged = bytearray(original)
                    damaged[byte] ^= 1 << bit
                    try:
                        outcomes[check(path, bytes(damaged), None)] += 1
                    except BaseException as exc:
                        raise AssertionError(f"flip of byte {byte} bit {bit}: {exc!r}") from exc
    report("agreement-bitflip", file_bytes=len(original), cases=sum(outcomes.values()),
           outcomes=dict(outcomes))


def _txn_header(content: bytes, pos: int) -> fmt.TxnHeader:
    return fmt.decode_txn_header(content[pos:], 0, "x", pos)


def test_damage_followed_by_an_unfinished_transaction_is_not_a_torn_tail():
    """Regression: open called this corruption, verify a torn tail (it skipped 'c' transactions)."""
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        _model, ranges = build_small_db(path)
        content = bytearray(open(path, "rb").read())
        content[ranges[1][0] + 3] ^= 0x10  # the second transaction's tid: its header fails
        content[ranges[2][0] + fmt.STATUS_OFFSET] = fmt.STATUS_CHECKPOINT[0]  # the last one: voted only
        with no_fsync(), capture_log():
            assert check(path, bytes(content), None) == (
                "verify: damage followed by valid data; read-write open refuses it")
        assert [p.kind for p in verify(path).problems][:2] == ["damage", "torn-tail"]


def test_damage_followed_by_an_older_transaction_is_a_torn_tail():
    """Regression: open called this corruption, verify a torn tail (it required increasing tids)."""
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        _model, ranges = build_small_db(path)
        content = bytearray(open(path, "rb").read())
        content[ranges[1][0] + 3] ^= 0x10
        th = _txn_header(bytes(content), ranges[2][0])
        old = fmt.encode_txn_header(fmt.p64(1), th.tlen, th.status, th.user, th.description, th.extension,
                                    th.nrec)
        content[th.pos:th.pos + len(old)] = old
        with no_fsync(), capture_log():
            assert check(path, bytes(content), None) == (
                "verify: torn tail; both serve the prefix, read-write moves the tail aside")
