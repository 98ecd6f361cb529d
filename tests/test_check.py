"""FileStorage._check(): the storage-level invariant check the stress and model tests use."""

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, z64

import refstorage
from refstorage import fileformat as fmt


def _commit(st, oid_data):
    t = TransactionMetaData()
    st.tpc_begin(t)
    for oid, data in oid_data.items():
        try:
            serial = st.getTid(oid)
        except Exception:
            serial = z64
        st.store(oid, serial, data, "", t)
    st.tpc_vote(t)
    return st.tpc_finish(t)


@pytest.fixture
def st(tmp_path):
    st = refstorage.FileStorage(str(tmp_path / "Data.rfs"))
    for i in range(3):
        _commit(st, {p64(j): b"v%d-%d" % (i, j) for j in range(4)})
    yield st
    st.close()


def test_a_sound_storage_passes(st):
    result = st._check()
    assert result.end == st._end and result.bad_pos is None
    assert result.last_tid == st.lastTransaction()


def test_an_empty_storage_passes(tmp_path):
    st = refstorage.FileStorage(str(tmp_path / "Empty.rfs"))
    try:
        assert st._check().end == fmt.HEADER_SIZE
    finally:
        st.close()


def test_an_index_entry_pointing_at_an_older_record_fails(st):
    pos = st._state.index.get(p64(1))
    older = st._state.reader.read_data_record(pos, p64(1)).prev
    st._state.index.update({p64(1): older})
    with pytest.raises(AssertionError, match="differs from a fresh scan"):
        st._check()


def test_a_missing_index_entry_fails(st):
    st._state.index.update({p64(9): st._state.index.get(p64(0))})
    with pytest.raises(AssertionError):
        st._check()


def test_bytes_past_the_committed_end_fail_only_when_idle(st):
    st._state.file.write_at(st._end, b"leftover")
    with pytest.raises(AssertionError, match="8 bytes past the committed end"):
        st._check()
    st._check(idle=False)
    st._state.file.truncate(st._end)
    st._check()


def test_an_oid_above_new_oid_fails(st):
    st._oid = z64
    with pytest.raises(AssertionError, match="new_oid"):
        st._check()


def test_damage_in_the_file_fails(st):
    pos = st._state.index.get(p64(2))
    rec = st._state.reader.read_data_record(pos, p64(2))
    st._state.file.write_at(pos + rec.length - 3, b"\xff\xff\xff")
    with pytest.raises(AssertionError, match="damage"):
        st._check()
