"""fileformat.py describes each record layout once; the decoders' named results and
offsets derive from that description."""

import struct

import pytest

from refstorage import errors
from refstorage import fileformat as fmt

OID, TID = b"\0" * 7 + b"\x05", b"\x03" * 8


def _records():
    yield fmt.encode_data_record(OID, TID, 1024, 2048, b"", b"x" * 200)
    yield fmt.encode_data_record(OID, TID, 0, 2048, OID * 3, b"with refs")
    yield fmt.encode_data_record(OID, TID, 0, 2048, b"", b"refs unknown", refs_known=False)
    yield fmt.encode_data_record(OID, TID, 4096, 2048, b"", None, back=5000)
    yield fmt.encode_data_record(OID, TID, 4096, 2048, b"", None, back=0)


@pytest.mark.parametrize("raw", list(_records()))
def test_peek_data_header_has_named_fields_agreeing_with_the_full_decoder(raw):
    h = fmt.peek_data_header(raw + b"tail", 0, "f", 9000)
    assert h._fields == ("oid", "tid", "prev", "tpos", "flags", "nrefs", "dlen", "length")
    rec = fmt.decode_data_record(raw, 0, "f", 9000, h)
    assert (h.oid, h.tid, h.prev, h.tpos, h.flags, h.length) == (
        rec.oid, rec.tid, rec.prev, rec.tpos, rec.flags, rec.length)
    assert h.length == len(raw) == fmt.record_length(h.nrefs, h.flags, h.dlen)
    assert h.nrefs * fmt.REF_SIZE == len(rec.refs)
    assert tuple(h) == tuple(getattr(h, f) for f in h._fields)  # still a tuple


def test_the_layout_constants_are_the_struct_layout():
    raw = fmt.encode_data_record(OID, TID, 0x0102, 0x0304, OID, b"data")
    assert raw[:8] == OID and raw[8:16] == TID
    flags_at = fmt.DATA_FLAGS_OFFSET
    assert struct.unpack_from(">HII", raw, flags_at) == (0, 1, 4)
    assert fmt.DATA_HEADER_SIZE == flags_at + 2 + 4 + 4
    assert raw[fmt.DATA_HEADER_SIZE:fmt.DATA_HEADER_SIZE + fmt.REF_SIZE] == OID
    assert len(raw) == fmt.DATA_HEADER_SIZE + fmt.REF_SIZE + 4 + fmt.CRC_SIZE
    back = fmt.encode_data_record(OID, TID, 0, 0, b"", None, back=77)
    assert len(back) == fmt.DATA_HEADER_SIZE + fmt.BACKPOINTER_SIZE + fmt.CRC_SIZE
    th = fmt.encode_txn_header(TID, 0x1122, fmt.STATUS_CHECKPOINT, b"u", b"d", b"e", 3)
    assert th[fmt.TLEN_OFFSET:fmt.TLEN_OFFSET + 8] == (0x1122).to_bytes(8, "big")
    assert th[fmt.STATUS_OFFSET:fmt.STATUS_OFFSET + 1] == fmt.STATUS_CHECKPOINT
    assert fmt.encode_trailer(5) == (5).to_bytes(fmt.TRAILER_SIZE, "big")


def test_bad_flags_are_reported_at_the_flags_field():
    raw = bytearray(fmt.encode_data_record(OID, TID, 0, 0, b"", b"data"))
    raw[fmt.DATA_FLAGS_OFFSET + 1] |= 0x80
    with pytest.raises(errors.CorruptedDataError) as exc:
        fmt.peek_data_header(bytes(raw), 0, "f", 9000)
    assert exc.value.offset == 9000 + fmt.DATA_FLAGS_OFFSET


def test_decode_txn_header_fixed_has_named_fields():
    th = fmt.encode_txn_header(TID, 500, fmt.STATUS_COMMITTED, b"user", b"desc", b"", 7)
    fixed = fmt.decode_txn_header_fixed(th, 0, "f", 1024)
    assert (fixed.tid, fixed.tlen, fixed.status, fixed.ulen, fixed.dlen, fixed.elen, fixed.nrec) == (
        TID, 500, fmt.STATUS_COMMITTED, 4, 4, 0, 7)
    assert len(th) == fmt.TXN_HEADER_SIZE + fixed.ulen + fixed.dlen + fixed.elen


def test_a_too_short_transaction_length_is_reported_at_the_tlen_field():
    th = fmt.encode_txn_header(TID, 10, fmt.STATUS_COMMITTED, b"", b"", b"", 0)
    with pytest.raises(errors.CorruptedTransactionError) as exc:
        fmt.decode_txn_header(th, 0, "f", 1024)
    assert exc.value.offset == 1024 + fmt.TLEN_OFFSET


def test_constants_are_written_once():
    from refstorage import indexfile, pack
    from refstorage.tools import backup, common

    assert fmt.Z64 == bytes(8)
    for module in (pack, backup):
        assert "Z64" not in vars(module)
    assert common.Z64 is fmt.Z64
    assert not hasattr(fmt, "MAX_POS")  # the index's limit, defined by index.py alone
    assert indexfile._DATA_MAGIC is fmt.MAGIC
