"""The on-disk format: the golden file decoded field by field, and each decoder's errors."""

import importlib.util
import os
import pathlib
import struct

import pytest

from refstorage import errors
from refstorage import fileformat as fmt

DATA = pathlib.Path(__file__).parent / "data"
GOLDEN = DATA / "golden-v1.rfs"
T1, T2, T3 = (bytes.fromhex(h) for h in ("03e5a0d4d5555555", "03e5a0d4d6666666", "03e5a0d4d7777777"))


def oid(n):
    return n.to_bytes(8, "big")


@pytest.fixture(scope="module")
def golden():
    return GOLDEN.read_bytes()


def test_golden_file_header(golden):
    assert len(golden) == 1624
    assert golden[:8] == b"\x89RFS\r\n\x1a\n"
    assert struct.unpack(">HHI", golden[8:16]) == (1, 1024, 0)
    h = fmt.decode_file_header(golden, "golden")
    assert h == fmt.FileHeader(1, bytes(range(16)), b"\0" * 8)
    assert golden[40:1020] == b"\0" * 980


def test_golden_transactions_field_by_field(golden):
    a = fmt.decode_txn_header(golden, 1024, "golden", 1024, len(golden))
    assert (a.pos, a.tid, a.tlen, a.status, a.user, a.description, a.extension, a.nrec) == (
        1024, T1, 191, b"p", b"alice", b"create", b"", 2)
    assert a.header_len == 37 + 11
    assert golden[a.end:a.next_pos] == struct.pack(">Q", 191)
    assert a.records_end == 1179
    assert list(fmt.decode_oid_table(golden, a.records_end, 2, "golden", a.records_end)) == [
        (oid(0), 1072), (oid(1), 1130)]
    b = fmt.decode_txn_header(golden, a.next_pos, "golden", a.next_pos, len(golden))
    assert (b.pos, b.tid, b.tlen, b.status, b.user, b.description, b.extension, b.nrec) == (
        1223, T2, 197, b" ", b"", b"edit", b"EXT", 2)
    assert list(fmt.decode_oid_table(golden, b.records_end, 2, "golden", b.records_end)) == [
        (oid(1), 1267), (oid(2), 1319)]
    c = fmt.decode_txn_header(golden, b.next_pos, "golden", b.next_pos, len(golden))
    assert (c.pos, c.tid, c.tlen, c.status, c.user, c.description, c.extension, c.nrec) == (
        1428, T3, 188, b" ", b"bob", b"undo", b"", 2)
    assert list(fmt.decode_oid_table(golden, c.records_end, 2, "golden", c.records_end)) == [
        (oid(1), 1472), (oid(2), 1526)]
    assert c.next_pos == len(golden)


def test_golden_data_records_field_by_field(golden):
    def rec(pos):
        return fmt.decode_data_record(golden, pos, "golden", pos)

    r = rec(1072)  # txn A, oid 0
    assert (r.oid, r.tid, r.prev, r.tpos, r.flags, r.refs, r.data, r.back, r.length) == (
        oid(0), T1, 0, 1024, 0, oid(1), b"ROOT", 0, 42 + 8 + 4 + 4)
    r = rec(1130)  # txn A, oid 1
    assert (r.oid, r.prev, r.tpos, r.flags, r.refs, r.data, r.length) == (
        oid(1), 0, 1024, 0, b"", b"ONE", 49)
    r = rec(1267)  # txn B, oid 1: refs unknown, prev -> A's record
    assert (r.oid, r.tid, r.prev, r.tpos, r.flags, r.data, r.refs_known) == (
        oid(1), T2, 1130, 1223, fmt.FLAG_REFS_UNKNOWN, b"ONE-v2", False)
    r = rec(1319)  # txn B, oid 2
    assert (r.oid, r.prev, r.refs, r.data) == (oid(2), 0, oid(0) + oid(1), b"TWO")
    assert r.ref_oids() == [oid(0), oid(1)]
    r = rec(1472)  # txn C, oid 1: backpointer to A's record
    assert (r.oid, r.tid, r.prev, r.tpos, r.flags, r.data, r.back, r.length) == (
        oid(1), T3, 1267, 1428, fmt.FLAG_BACKPOINTER, None, 1130, 54)
    r = rec(1526)  # txn C, oid 2: creation undone
    assert (r.oid, r.prev, r.flags, r.data, r.back, r.is_backpointer) == (
        oid(2), 1319, fmt.FLAG_BACKPOINTER, None, 0, True)


def test_golden_file_is_what_the_encoders_write(golden):
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build() == golden


def test_status_flip_keeps_checksums_valid():
    head = fmt.encode_txn_header(T1, 100, b"c", b"u", b"d", b"e", 0)
    for status in fmt.STATUSES:
        flipped = head[:fmt.STATUS_OFFSET] + status + head[fmt.STATUS_OFFSET + 1:]
        assert fmt.decode_txn_header(flipped, 0, "f", 0).status == status


@pytest.mark.parametrize("buf,error", [
    (b"", errors.EmptyFileError),
    (b"FS30" + b"\0" * 2000, errors.ForeignFormatError),
    (b"FS21" + b"\0" * 2000, errors.ForeignFormatError),
    (b"hello world" * 200, errors.NotARefStorageFileError),
    (b"\x89RFS", errors.CorruptedHeaderError),
])
def test_file_header_errors(buf, error):
    with pytest.raises(error) as info:
        fmt.decode_file_header(buf, "/x/Data.rfs")
    assert "/x/Data.rfs" in str(info.value)


def test_future_version_and_header_checksum():
    good = fmt.encode_file_header(bytes(16))
    future = bytearray(good)
    future[8:10] = struct.pack(">H", fmt.FORMAT_VERSION + 1)
    with pytest.raises(errors.FutureVersionError, match="offset 8"):
        fmt.decode_file_header(bytes(future), "p")
    damaged = bytearray(good)
    damaged[100] ^= 1
    with pytest.raises(errors.CorruptedHeaderError, match="checksum"):
        fmt.decode_file_header(bytes(damaged), "p")
    with pytest.raises(errors.CorruptedHeaderError, match="shorter"):
        fmt.decode_file_header(good[:500], "p")


def test_every_bit_of_a_data_record_is_covered():
    rec = fmt.encode_data_record(oid(7), T1, 1234, 1024, oid(1) + oid(2), b"payload")
    assert fmt.decode_data_record(rec, 0, "f", 5000).data == b"payload"
    for i in range(len(rec) * 8):
        bad = bytearray(rec)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(errors.CorruptedDataError) as info:
            fmt.decode_data_record(bytes(bad), 0, "f", 5000)
        assert info.value.offset is not None and info.value.offset >= 5000


def test_every_bit_of_a_txn_header_but_the_status_is_covered():
    head = fmt.encode_txn_header(T1, 200, b" ", b"user", b"desc", b"ext", 3)
    assert fmt.decode_txn_header(head, 0, "f", 0).nrec == 3
    for i in range(len(head) * 8):
        if i // 8 == fmt.STATUS_OFFSET:
            continue
        bad = bytearray(head)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(errors.CorruptedTransactionError):
            fmt.decode_txn_header(bytes(bad), 0, "f", 0)


def test_single_bit_flips_of_the_status_never_give_a_valid_status():
    for status in fmt.STATUSES:
        for bit in range(8):
            assert bytes([status[0] ^ (1 << bit)]) not in fmt.STATUSES


def test_cut_short_records_name_their_offset():
    rec = fmt.encode_data_record(oid(7), T1, 0, 1024, b"", b"x" * 50)
    for n in range(len(rec)):
        with pytest.raises(errors.CorruptedDataError, match="offset 9000"):
            fmt.decode_data_record(rec[:n], 0, "f", 9000)
    head = fmt.encode_txn_header(T1, 200, b" ", b"user", b"", b"", 0)
    for n in range(len(head)):
        with pytest.raises(errors.CorruptedTransactionError, match="offset 77"):
            fmt.decode_txn_header(head[:n], 0, "f", 77)


def test_backpointer_records_carry_no_refs():
    with pytest.raises(ValueError):
        fmt.encode_data_record(oid(1), T1, 0, 1024, oid(2), None, 1100)
    rec = fmt.encode_data_record(oid(1), T1, 0, 1024, b"", None, 1100)
    assert len(rec) == fmt.record_length(0, fmt.FLAG_BACKPOINTER, 0) == 54


def test_refs_are_deduplicated_in_order():
    assert fmt.pack_refs([oid(3), oid(1), oid(3)]) == oid(3) + oid(1)
    assert fmt.split_refs(oid(3) + oid(1)) == [oid(3), oid(1)]
    assert fmt.pack_refs([]) == b""


def test_every_bit_of_the_oid_table_is_covered():
    table = fmt.encode_oid_table([(oid(1), 1044), (oid(9), 2100)])
    assert len(table) == fmt.oid_table_size(2) == 36
    assert list(fmt.decode_oid_table(table, 0, 2, "f", 0)) == [(oid(1), 1044), (oid(9), 2100)]
    for i in range(len(table) * 8):
        bad = bytearray(table)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(errors.CorruptedTransactionError, match="offset 500"):
            fmt.decode_oid_table(bytes(bad), 0, 2, "f", 500)
    with pytest.raises(errors.CorruptedTransactionError, match="cut short"):
        fmt.decode_oid_table(table[:-1], 0, 2, "f", 500)


# -- the fast paths: the commit loop, the load decoder, pack's relocation --------------

def _records():
    """(oid, data or None, back, prev) records and their refs, with every shape."""
    recs, refs = [], []
    for i in range(40):
        if i % 7 == 3:
            recs.append((oid(i), None, 1024 + i if i % 2 else 0, 5000 + i))
        else:
            recs.append((oid(i), bytes([i]) * (i * 3), 0, 0 if i % 3 else 2000 + i))
            refs.append(None if i % 5 == 0 else b"".join(oid(j) for j in range(i % 4)))
    return recs, refs


def test_encode_data_records_is_encode_data_record_one_by_one():
    recs, refs = _records()
    expected, pos, entries = [], 7000, []
    it = iter(refs)
    for o, data, back, prev in recs:
        if data is None:
            raw = fmt.encode_data_record(o, T1, prev, 6000, b"", None, back)
        else:
            r = next(it)
            raw = fmt.encode_data_record(o, T1, prev, 6000, r or b"", data, 0, r is not None)
        expected.append(raw)
        entries.append((o, pos))
        pos += len(raw)
    for limit in (1, 100, 1 << 20):  # in chunks of about `limit` bytes
        chunks, table, positions, k, at, it = [], [], {}, 0, 7000, iter(refs)
        while k < len(recs):
            chunk, k = fmt.encode_data_records(T1, 6000, at, recs, k, limit, it, table, positions)
            chunks.append(chunk)
            at += len(chunk)
        assert b"".join(chunks) == b"".join(expected)
        assert fmt.encode_oid_table_entries(table) == fmt.encode_oid_table(entries)
        assert positions == dict(entries)


def test_decode_data_payload_agrees_with_decode_data_record():
    recs, refs = _records()
    it = iter(refs)
    for o, data, back, prev in recs:
        r = next(it) if data is not None else b""
        raw = fmt.encode_data_record(o, T1, prev, 6000, r or b"", data, back)
        full = fmt.decode_data_record(raw, 0, "f", 9000)
        assert fmt.decode_data_payload(raw + b"more", "f", 9000) == (o, T1, full.data, full.back)
        assert fmt.decode_data_payload(raw[:-1], "f", 9000) == len(raw)  # asks for the rest
        for i in range(len(raw) * 8):  # every bit is covered here too
            bad = bytearray(raw)
            bad[i // 8] ^= 1 << (i % 8)
            with pytest.raises(errors.CorruptedDataError) as info:
                got = fmt.decode_data_payload(bytes(bad), "f", 9000)
                if isinstance(got, int):  # a longer length: the record is cut short
                    fmt.decode_data_record(bytes(bad), 0, "f", 9000)
            assert info.value.offset >= 9000


@pytest.fixture(params=["c", "python"])
def relocate_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """relocate_kept through the C loop (if built) or the pure-Python one."""
    if request.param == "c":
        if fmt._relocate_c is None:
            if os.environ.get("REFSTORAGE_REQUIRE_SPEEDUPS"):
                raise AssertionError("refstorage._refscan is not built")
            pytest.skip("refstorage._refscan is not built")
    else:
        monkeypatch.setattr(fmt, "_relocate_c", None)
    return request.param


def _keep_bits(positions) -> bytearray:
    keep = bytearray(4096)
    for p in positions:
        s = p // fmt.MIN_RECORD
        keep[s >> 3] |= 1 << (s & 7)
    return keep


def test_relocate_kept_is_decode_and_encode(relocate_impl: str):
    from array import array

    plain = [(oid(i), bytes([i]) * (10 + i), b"".join(oid(j) for j in range(i % 3))) for i in range(12)]
    old_tpos, new_tpos = 20000, 8000
    raws = [fmt.encode_data_record(o, T1, 1234, old_tpos, r, d, 0, i % 4 != 1)
            for i, (o, d, r) in enumerate(plain)]
    raws.insert(5, fmt.encode_data_record(oid(99), T1, 0, old_tpos, b"", None, 700))
    base = 20100
    starts = [base]
    for raw in raws:
        starts.append(starts[-1] + len(raw))
    starts = array("Q", starts)
    buf = b"".join(raws)
    chosen = [0, 2, 3, 5, 6, 9, 12]  # 5 is the backpointer
    keep = _keep_bits(starts[i] for i in chosen)
    n = len(raws)
    targets = array("Q", sorted([starts[3], starts[9], 5]))
    out, table, moved = bytearray(), bytearray(), bytearray()
    i, end, kept, status = fmt.relocate_kept(buf, base, starts, 0, n, keep, T1, old_tpos, new_tpos, 9000,
                                             None, targets, out, table, moved, 1 << 20, "f")
    assert (i, kept, status) == (5, 3, fmt.RELOC_STOP)  # stopped at the backpointer
    expected, pos, entries = [], 9000, []
    for j in chosen[:3]:
        rec = fmt.decode_data_record(buf, starts[j] - base, "f", starts[j])
        expected.append(fmt.encode_data_record(rec.oid, T1, 0, new_tpos, rec.refs, rec.data, 0,
                                               rec.refs_known))
        entries.append(fmt.oid_table_entry(rec.oid, pos))
        if j == 3:
            assert array("Q", moved).tolist() == [starts[3], pos]
        pos += len(expected[-1])
    assert bytes(out) == b"".join(expected) and end == pos and bytes(table) == b"".join(entries)
    i, end, kept, status = fmt.relocate_kept(buf, base, starts, 6, n, keep, T1, old_tpos, new_tpos, end,
                                             lambda o: 4242, None, out, table, moved, 1 << 20, "f")
    assert (i, kept, status) == (n, 3, fmt.RELOC_DONE)
    rec = fmt.decode_data_record(bytes(out), len(b"".join(expected)), "f", 0)
    assert (rec.oid, rec.prev, rec.tpos) == (oid(5), 4242, new_tpos)
    # a full output buffer, a record outside the buffer
    got = fmt.relocate_kept(buf, base, starts, 0, n, keep, T1, old_tpos, new_tpos, 9000, None, None,
                            bytearray(b"x" * 10), bytearray(), bytearray(), 10, "f")
    assert (got[0], got[2], got[3]) == (0, 0, fmt.RELOC_FULL)
    got = fmt.relocate_kept(buf[:starts[3] - base + 10], base, starts, 0, n, keep, T1, old_tpos, new_tpos,
                            9000, None, None, bytearray(), bytearray(), bytearray(), 1 << 20, "f")
    assert (got[0], got[2], got[3]) == (3, 2, fmt.RELOC_OUTSIDE)
    # damage in a kept record: an error naming its position, never a bad copy
    errors_seen: list[str] = []
    for at, flip in ((starts[3] + 50, 1), (starts[3] + 24, 4), (starts[3] + 8, 1), (starts[3] + 33, 4),
                     (starts[3] + 41, 1), (starts[4] - 1, 1)):
        bad = bytearray(buf)
        bad[at - base] ^= flip
        with pytest.raises(errors.CorruptedDataError) as info:
            fmt.relocate_kept(bytes(bad), base, starts, 0, n, keep, T1, old_tpos, new_tpos, 9000,
                              None, None, bytearray(), bytearray(), bytearray(), 1 << 20, "f")
        assert starts[3] <= info.value.offset < starts[4] and info.value.path == "f"
        errors_seen.append(str(info.value))
    # the same errors, word for word, from the C loop and the Python one
    assert errors_seen == [
        "f at offset 20295: data record checksum mismatch (oid 0000000000000003)",
        "f at offset 20295: data record does not match its transaction",
        "f at offset 20295: data record does not match its transaction",
        "f at offset 20327: unknown data record flags 0x4",
        "f at offset 20295: data record does not match its transaction",
        "f at offset 20295: data record checksum mismatch (oid 0000000000000003)"]
    # a table whose starts do not increase, or claim a record shorter than a header
    for bad_starts in ([starts[0], starts[0], starts[2]], [starts[0], starts[0] + 20, starts[2]]):
        with pytest.raises(errors.CorruptedDataError) as info:
            fmt.relocate_kept(buf, base, array("Q", bad_starts), 0, 2, _keep_bits([starts[0]]), T1,
                              old_tpos, new_tpos, 9000, None, None, bytearray(), bytearray(),
                              bytearray(), 1 << 20, "f")
        assert info.value.offset == starts[0]
