"""Tests of refstorage.index: the in-memory OidIndex and the index file."""

from __future__ import annotations

import gc
import random
import struct
import sys
import tempfile
import threading
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from refstorage import indexfile as ix_mod
from refstorage.errors import IndexFileError
from refstorage.index import MAX_POS, OidIndex
from refstorage.indexfile import INDEX_MAGIC, load_index, save_index

FILE_ID = bytes(range(16))
TID = b"\x03\x04" * 4


def p64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def build(oid_ints, *, bulk: bool, base: int = 1024) -> tuple[OidIndex, dict[bytes, int]]:
    model = {p64(n): base + 7 * i for i, n in enumerate(oid_ints)}
    index = OidIndex()
    if bulk:
        index.update(model)
    else:
        for oid, pos in model.items():
            index[oid] = pos
    return index, model


def assert_same(index: OidIndex, model: dict[bytes, int]) -> None:
    index._check()
    assert len(index) == len(model)
    assert list(index) == sorted(model)
    assert list(index.items()) == sorted(model.items())
    assert index.max_oid() == (max(model) if model else None)
    for oid, pos in model.items():
        assert index[oid] == pos
        assert index.get(oid) == pos
        assert oid in index


def traced_bytes_per_oid(make) -> tuple[float, object]:
    """Bytes per oid allocated (and kept) by make(), measured with tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        obj, n = make()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / n, obj


# -- basic behaviour ----------------------------------------------------------------------


def test_empty_index():
    index = OidIndex()
    assert len(index) == 0
    assert not index
    assert list(index) == []
    assert list(index.items()) == []
    assert index.max_oid() is None
    assert index.get(p64(1)) is None
    assert index.get(p64(1), 0) == 0
    assert p64(1) not in index
    with pytest.raises(KeyError):
        index[p64(1)]
    with pytest.raises(KeyError):
        del index[p64(1)]
    index._check()
    assert "0 oids" in repr(index)


def test_set_get_delete_one():
    index = OidIndex()
    index[p64(5)] = 1024
    assert index[p64(5)] == 1024
    assert len(index) == 1
    index[p64(5)] = 2048  # overwrite keeps the count
    assert index[p64(5)] == 2048
    assert len(index) == 1
    assert index.max_oid() == p64(5)
    del index[p64(5)]
    assert len(index) == 0
    assert index.max_oid() is None
    index._check()


@pytest.mark.parametrize("pos", [0, -1, MAX_POS + 1, 2**64, 1.5, None, "1024", b"\0" * 6])
def test_bad_positions_are_refused(pos):
    index = OidIndex()
    with pytest.raises(ValueError):
        index[p64(1)] = pos
    with pytest.raises(ValueError):
        index.update({p64(1): pos})
    with pytest.raises(ValueError):
        index.update({p64(i): 1024 + i for i in range(100)} | {p64(1000): pos})
    assert len(index) == 0
    index._check()


@pytest.mark.parametrize("oid", [b"", b"\0" * 7, b"\0" * 9, "abcdefgh", 5, bytearray(8),
                                 memoryview(b"\0" * 8)])
def test_bad_oids_are_refused(oid):
    index = OidIndex()
    with pytest.raises(ValueError):
        index[oid] = 1024
    if isinstance(oid, bytearray):  # unhashable: dict() itself refuses it
        with pytest.raises(TypeError):
            index.update([(oid, 1024)])
        return
    with pytest.raises(ValueError):
        index.update([(oid, 1024)])
    with pytest.raises(ValueError):
        index.update([(p64(i), 1024 + i) for i in range(1, 101)] + [(oid, 1024)])
    assert len(index) == 0


def test_lookups_of_malformed_oids():
    index, _ = build(range(300), bulk=True)
    # A 7-byte oid must not alias an 8-byte one.
    assert index.get(b"\0" * 7) is None
    assert index.get(b"\0" * 7, 0) == 0
    assert b"\0" * 7 not in index
    assert "abcdefgh" not in index
    assert None not in index
    with pytest.raises(KeyError):
        index[b"\0" * 7]
    with pytest.raises(KeyError):
        del index[b"\0" * 9]


def test_int_subclass_positions_and_keys():
    class Pos(int):
        pass

    index, _ = build(range(300), bulk=True)
    index[p64(1)] = Pos(5000)
    assert type(index[p64(1)]) is int and index[p64(1)] == 5000
    assert list(index.keys()) == list(index)
    del index[p64(7)]
    assert index.block_stats()["dense"] == 1
    with pytest.raises(KeyError):
        del index[p64(7)]  # in a dense block, absent
    with pytest.raises(KeyError):
        del index[p64(0x1005)]  # no such block
    index._check()


def test_extreme_oids_and_positions():
    index = OidIndex()
    top = b"\xff" * 8
    index[top] = MAX_POS
    index[p64(0)] = 1
    assert index[top] == MAX_POS
    assert index[p64(0)] == 1
    assert index.max_oid() == top
    assert list(index) == [p64(0), top]
    index._check()


def test_update_accepts_mappings_pairs_generators_and_indexes():
    pairs = [(p64(i * 3), 1024 + i) for i in range(500)]
    a = OidIndex()
    a.update(dict(pairs))
    b = OidIndex()
    b.update(pairs)
    c = OidIndex()
    c.update(iter(pairs))
    d = OidIndex(a)
    for x in (a, b, c, d):
        assert_same(x, dict(pairs))
    # Later pairs win, as with dict.update.
    e = OidIndex()
    e.update([(p64(1), 5000), (p64(1), 6000)] * 20)
    assert e[p64(1)] == 6000
    assert len(e) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 2**48 - 1)), max_size=300),
                max_size=5), st.booleans())
def test_update_log_order_is_dict_semantics(batches, ascending_runs):
    """Entries in log order, as an index rebuild merges them: the last of an oid wins."""
    index, model = build(range(0, 3000, 7), bulk=True)
    for batch in batches:
        if ascending_runs:  # the bulk-load shape: distinct oids, increasing
            batch = sorted(dict(batch).items())
        entries = [(p64(o), p) for o, p in batch]
        index.update_log_order(entries)
        model.update(entries)
        assert_same(index, model)


@pytest.mark.parametrize("bad", [(b"short", 5), (p64(1), 0), (p64(2), 2**48), (p64(3), "x")])
def test_update_log_order_refuses_bad_entries(bad):
    index, model = build(range(100), bulk=True)
    entries = [(p64(i), 100 + i) for i in range(200, 240)]
    entries[20] = bad
    with pytest.raises(ValueError):
        index.update_log_order(sorted(entries, key=lambda e: e[0]) if bad[0] != b"short" else entries)
    assert_same(index, model)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 2**48 - 1)), max_size=300),
                max_size=5), st.booleans())
def test_update_table_is_dict_semantics(batches, ascending_runs):
    """The scan's batch of raw oid-table entries (16 bytes each), in log order: the last wins."""
    index, model = build(range(0, 3000, 7), bulk=True)
    for batch in batches:
        if ascending_runs:
            batch = sorted(dict(batch).items())
        entries = [(p64(o), p) for o, p in batch]
        index.update_table(b"".join(o + p.to_bytes(8, "big") for o, p in entries))
        model.update(entries)
        assert_same(index, model)
    index._check()


@pytest.mark.parametrize("bad", [0, 2**48])
def test_update_table_refuses_bad_positions(bad):
    index, model = build(range(100), bulk=True)
    entries = [(p64(i), 100 + i) for i in range(200, 240)]
    entries[20] = (entries[20][0], bad)
    with pytest.raises(ValueError, match="position"):
        index.update_table(b"".join(o + p.to_bytes(8, "big") for o, p in entries))
    with pytest.raises(ValueError, match="16-byte"):
        index.update_table(b"x" * 17)
    assert_same(index, model)


def test_scan_batch_holds_no_object_per_entry(tmp_path, monkeypatch):
    """The open-time scan's batch is raw bytes: its peak memory is a fraction of a tuple per entry."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64 as zp64

    from refstorage import log as log_mod
    from refstorage.storage import FileStorage

    path = str(tmp_path / "d.rfs")
    st_ = FileStorage(path)
    n = 40_000
    for start in range(0, n, 10_000):
        t = TransactionMetaData()
        st_.tpc_begin(t)
        for i in range(start, start + 10_000):
            st_.store(zp64(i), zp64(0), b"x", "", t)
        st_.tpc_vote(t)
        st_.tpc_finish(t)
    st_.close()
    Path(path + ".index").unlink()
    monkeypatch.setattr(log_mod, "INDEX_BATCH", 1 << 20)
    monkeypatch.setattr(log_mod, "SCAN_CHUNK", 1 << 19)  # the reads' buffer is not the subject
    gc.collect()
    tracemalloc.start()
    st_ = FileStorage(path, read_only=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(st_) == n
    assert st_.load(zp64(n - 1))[0] == b"x"
    st_.close()
    # measured: ~70 bytes an entry (raw entries, then arrays); with a tuple per entry
    # (the batch before) ~240
    assert peak < 110 * n, peak


def test_update_is_all_or_nothing():
    index, model = build(range(1000), bulk=True)
    bad = {p64(i): 9999 for i in range(2000, 2100)}
    bad[p64(2050)] = 0
    with pytest.raises(ValueError):
        index.update(bad)
    assert_same(index, model)


def test_copy_is_independent():
    index, model = build(list(range(600)) + [2**40, 2**50 + 3], bulk=True)
    other = index.copy()
    other[p64(1)] = 99999
    del other[p64(2**40)]
    other[p64(7 << 30)] = 12345
    assert_same(index, model)
    other._check()
    assert other[p64(1)] == 99999
    assert len(other) == len(model)


def test_clear():
    index, _ = build(range(1000), bulk=True)
    index.clear()
    assert len(index) == 0
    assert list(index) == []
    assert index.max_oid() is None
    index[p64(3)] = 4000
    assert_same(index, {p64(3): 4000})


def test_block_conversions_both_ways():
    index = OidIndex()
    model = {}
    # Fill one block in a scattered order: sparse until 219 entries, dense from 220.
    order = list(range(256))
    random.Random(3).shuffle(order)
    for n, s in enumerate(order, 1):
        index[p64(0x4200 | s)] = 1024 + s
        model[p64(0x4200 | s)] = 1024 + s
        stats = index.block_stats()
        assert stats == ({"dense": 0, "sparse": 1, "entries": n} if n <= 219
                         else {"dense": 1, "sparse": 0, "entries": n})
        if n in (1, 2, 100, 219, 220, 256):
            assert_same(index, model)
    # Delete: dense until fewer than 128 entries, then sparse, then gone.
    for n, s in enumerate(order, 1):
        del index[p64(0x4200 | s)]
        del model[p64(0x4200 | s)]
        left = 256 - n
        kind = "dense" if left >= 128 else "sparse"
        if left:
            assert index.block_stats()[kind] == 1
        if left in (200, 128, 127, 10, 1, 0):
            assert_same(index, model)
    assert index.block_stats() == {"dense": 0, "sparse": 0, "entries": 0}


def test_sequential_oids_turn_dense_early():
    index = OidIndex()
    for i in range(32):
        index[p64(i)] = 1024 + i
    assert index.block_stats()["sparse"] == 1
    index[p64(32)] = 5000
    assert index.block_stats()["dense"] == 1
    index._check()
    # Not contiguous from 0: no early conversion.
    for i in range(1, 100):
        index[p64(0x100 | (2 * i))] = 1024 + i
    assert index.block_stats() == {"dense": 1, "sparse": 1, "entries": 33 + 99}
    index._check()


def test_update_merges_into_existing_blocks():
    rnd = random.Random(7)
    index = OidIndex()
    model = {}
    for round_ in range(6):
        batch = {}
        for _ in range(rnd.choice([1, 5, 20, 300, 2000])):
            n = rnd.choice([rnd.randrange(0, 2048), rnd.getrandbits(64), rnd.randrange(2**20, 2**20 + 600)])
            batch[p64(n)] = rnd.randrange(1, MAX_POS)
        index.update(batch)
        model.update(batch)
        assert_same(index, model)
        assert len(index) == len(model), round_


def test_iteration_is_ascending_and_max_oid_follows_deletes():
    rnd = random.Random(11)
    nums = sorted({rnd.getrandbits(64) for _ in range(300)} | set(range(0, 300)) | {2**64 - 1})
    index, model = build(rnd.sample(nums, len(nums)), bulk=False)
    assert list(index) == sorted(model)
    for n in sorted(nums, reverse=True)[:50]:
        del index[p64(n)]
        del model[p64(n)]
        assert index.max_oid() == max(model)
    index._check()


def test_check_catches_broken_invariants():
    def broken(words, mutate) -> None:
        index, _ = build(list(range(300)) + [0x500, 0x505, 0x5FF, 2**40], bulk=False)
        index._check()
        mutate(index)
        with pytest.raises(AssertionError, match=words):
            index._check()

    def set_block(key, block):
        return lambda index: index._blocks.__setitem__(key, block)

    one = (1).to_bytes(6, "big")
    broken("running count", lambda index: setattr(index, "_len", index._len + 1))
    broken("max key", lambda index: setattr(index, "_maxkey", 3))
    broken("ascending", set_block(5, b"\x05\x01" + one + one))
    broken("ascending", set_block(5, b"\x05\x05" + one + one))
    broken("zero position", set_block(5, b"\x00\x05" + one + bytes(6)))
    broken("multiple of 7", set_block(5, b"\x00\x05" + bytes(11)))
    broken("entries, not", set_block(5, bytes(range(220)) + one * 220))
    broken("< 32 entries", set_block(5, bytearray(1536)))
    broken("bytes, not 1536", set_block(5, bytearray(1537)))
    broken("is a list", set_block(5, [1, 2]))
    broken("bad block key", set_block(2**56, b"\x01" + one))


# -- memory -----------------------------------------------------------------------------


@pytest.mark.parametrize("n, bulk", [(1_000, False), (1_000, True), (30_000, False), (100_000, True)])
def test_dense_memory_at_most_8_bytes_per_oid(n, bulk):
    oids = [p64(i) for i in range(1, n + 1)]

    def make():
        index = OidIndex()
        if bulk:
            index.update(dict.fromkeys(oids, 4096))
        else:
            for oid in oids:
                index[oid] = 4096
        return index, n

    per_oid, index = traced_bytes_per_oid(make)
    assert len(index) == n
    if n >= 30_000:
        assert index.memory_bytes() / n <= 6.8
        assert per_oid <= 6.8
    else:
        assert index.memory_bytes() / n <= 8
        assert per_oid <= 8
    index._check()


_RANDOM = random.Random(1)
SPARSE_CASES = {
    "one per block": lambda i: i << 8,
    "stride 2**16 (fsIndex's worst case)": lambda i: i << 16,
    "stride 2**20": lambda i: i << 20,
    "stride 2**40": lambda i: (i + 1) << 40,
    "random 64-bit": lambda i: _RANDOM.getrandbits(64),
}


@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
@pytest.mark.parametrize("bulk", [False, True])
def test_sparse_memory_is_bounded(case, bulk):
    n = 10_000
    nums = [SPARSE_CASES[case](i) for i in range(n)]
    model = {p64(x): 1024 + i for i, x in enumerate(nums)}
    n = len(model)

    def make():
        index = OidIndex()
        if bulk:
            index.update(model)
        else:
            for oid, pos in model.items():
                index[oid] = pos
        return index, n

    per_oid, index = traced_bytes_per_oid(make)
    # Measured about 100-130 bytes; ZODB's fsIndex takes about 380 here.
    assert per_oid <= 150
    assert index.memory_bytes() / n <= 150
    assert len(index) == n
    index._check()


def test_dense_memory_of_100k_oids_set_one_by_one():
    index, _ = build(range(1, 100_001), bulk=False)
    assert index.memory_bytes() / len(index) <= 6.8


def test_memory_bounded_for_every_spacing():
    for stride in (1, 2, 3, 8, 37, 100, 255, 256, 257, 4096, 2**16 + 1):
        index, _ = build(range(0, 20_000 * stride, stride), bulk=False)
        per_oid = index.memory_bytes() / len(index)
        limit = 7 if stride == 1 else 8.2 if stride == 2 else 150
        assert per_oid <= limit, (stride, per_oid)
        index._check()


def test_early_dense_worst_case_is_bounded():
    # 33 sequential oids at the start of each block: each block turns dense.
    index, _ = build([(k << 8) | s for k in range(600) for s in range(33)], bulk=False)
    assert index.block_stats()["dense"] == 600
    assert index.memory_bytes() / len(index) <= 60


def test_smaller_than_fsindex():
    from ZODB.fsIndex import fsIndex

    n = 5000
    sparse = {p64(i << 16): 1024 + i for i in range(n)}

    def make(cls):
        def inner():
            index = cls()
            index.update(sparse)
            return index, n
        return inner

    ours, _ = traced_bytes_per_oid(make(OidIndex))
    # tracemalloc sees only fsIndex's Python objects (BTrees malloc() their
    # arrays directly), so this understates fsIndex.
    theirs, _ = traced_bytes_per_oid(make(fsIndex))
    assert ours < theirs


# -- random operations against a dict -----------------------------------------------------

KEYS = [0, 1, 2, 0x1234, 2**56 - 1]
oids_st = st.builds(lambda k, s: p64((k << 8) | s), st.sampled_from(KEYS), st.integers(0, 255))
pos_st = st.integers(1, MAX_POS)


class IndexMachine(RuleBasedStateMachine):
    """Random operations on an OidIndex mirrored on a dict, concentrated on a few
    blocks so that blocks fill up, empty out and change kind both ways."""

    @initialize()
    def start(self):
        self.index = OidIndex()
        self.model: dict[bytes, int] = {}

    @rule(oid=oids_st, pos=pos_st)
    def set_one(self, oid, pos):
        self.index[oid] = pos
        self.model[oid] = pos

    @rule(oid=oids_st)
    def delete_one(self, oid):
        if oid in self.model:
            del self.index[oid]
            del self.model[oid]
        else:
            with pytest.raises(KeyError):
                del self.index[oid]

    @rule(key=st.sampled_from(KEYS), start=st.integers(0, 255), count=st.integers(1, 256),
          step=st.sampled_from([1, 1, 2, 3, 7]), pos=pos_st, bulk=st.booleans())
    def set_run(self, key, start, count, step, pos, bulk):
        run = {p64((key << 8) | s): max(1, (pos + s) % MAX_POS)
               for s in range(start, min(256, start + count * step), step)}
        if bulk:
            self.index.update(run)
        else:
            for oid, p in run.items():
                self.index[oid] = p
        self.model.update(run)

    @rule(key=st.sampled_from(KEYS), start=st.integers(0, 255), count=st.integers(1, 256),
          step=st.sampled_from([1, 1, 2, 5]))
    def delete_run(self, key, start, count, step):
        for s in range(start, min(256, start + count * step), step):
            oid = p64((key << 8) | s)
            if oid in self.model:
                del self.index[oid]
                del self.model[oid]

    @rule(batch=st.dictionaries(st.one_of(oids_st, st.binary(min_size=8, max_size=8)), pos_st,
                                max_size=40))
    def update_random(self, batch):
        self.index.update(batch)
        self.model.update(batch)

    @rule(oid=st.one_of(oids_st, st.binary(min_size=8, max_size=8)))
    def read(self, oid):
        expected = self.model.get(oid)
        assert self.index.get(oid) == expected
        assert self.index.get(oid, -1) == (-1 if expected is None else expected)
        assert (oid in self.index) == (expected is not None)
        if expected is None:
            with pytest.raises(KeyError):
                self.index[oid]
        else:
            assert self.index[oid] == expected

    @rule()
    def iterate(self):
        assert list(self.index) == sorted(self.model)
        assert list(self.index.items()) == sorted(self.model.items())

    @rule()
    def copy_and_clear(self):
        other = self.index.copy()
        other.clear()
        assert len(other) == 0
        assert len(self.index) == len(self.model)

    @rule()
    def save_and_load(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "Data.rfs.index")
            save_index(path, self.index, file_id=FILE_ID, pos=2**48, tid=TID)
            loaded, file_id, pos, tid = load_index(path)
        assert (file_id, pos, tid) == (FILE_ID, 2**48, TID)
        loaded._check()
        assert list(loaded.items()) == sorted(self.model.items())
        self.index = loaded  # go on with the loaded one

    @invariant()
    def consistent(self):
        if hasattr(self, "index"):
            self.index._check()
            assert len(self.index) == len(self.model)
            assert self.index.max_oid() == (max(self.model) if self.model else None)


IndexMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestIndexMachine = IndexMachine.TestCase


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), pos_st), max_size=300), st.booleans())
def test_any_content_round_trips(pairs, bulk):
    model = {p64(n): p for n, p in pairs}
    index = OidIndex()
    if bulk:
        index.update([(p64(n), p) for n, p in pairs])
    else:
        for oid, p in model.items():
            index[oid] = p
    assert_same(index, model)
    data = encode(index, pos=2**48)
    loaded = decode(data)
    assert_same(loaded, model)


# -- the index file -----------------------------------------------------------------------


def encode(index: OidIndex, pos: int = 2**48, file_id: bytes = FILE_ID, tid: bytes = TID) -> bytes:
    """The bytes save_index writes (through a temporary file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.index"
        save_index(str(path), index, file_id=file_id, pos=pos, tid=tid)
        return path.read_bytes()


def decode(data: bytes, path: str = "x.index") -> OidIndex:
    index, file_id, pos, tid = ix_mod._decode(path, data)
    return index


def with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "big")


def small_index() -> tuple[OidIndex, dict[bytes, int]]:
    """Dense, multi-entry sparse and one-entry sparse blocks."""
    nums = list(range(1, 300)) + [0x1000, 0x1003, 0x10FF] + [2**40, 2**63 + 5]
    return build(nums, bulk=False)


def test_save_load_round_trip(tmp_path):
    index, model = small_index()
    path = tmp_path / "Data.rfs.index"
    save_index(str(path), index, file_id=FILE_ID, pos=10**9, tid=TID)
    loaded, file_id, pos, tid = load_index(str(path))
    assert (file_id, pos, tid) == (FILE_ID, 10**9, TID)
    assert_same(loaded, model)
    assert path.read_bytes().startswith(INDEX_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["Data.rfs.index"]  # no temp file left
    # Saving again replaces the file.
    index[p64(5000)] = 12345
    save_index(str(path), index, file_id=FILE_ID, pos=10**9 + 1, tid=TID)
    loaded, _, pos, _ = load_index(str(path))
    assert pos == 10**9 + 1
    assert loaded[p64(5000)] == 12345


def test_save_load_empty_index(tmp_path):
    path = str(tmp_path / "i")
    save_index(path, OidIndex(), file_id=FILE_ID, pos=1024, tid=b"\0" * 8)
    loaded, file_id, pos, tid = load_index(path)
    assert len(loaded) == 0 and loaded.max_oid() is None
    assert (file_id, pos, tid) == (FILE_ID, 1024, b"\0" * 8)
    loaded[p64(1)] = 2000
    loaded._check()


@pytest.mark.parametrize("bulk", [False, True])
def test_save_load_large(tmp_path, bulk):
    nums = list(range(50_000)) + [i << 24 for i in range(1, 20_000)] + [(7 << 40) + 3 * i for i in range(500)]
    index, model = build(nums, bulk=bulk)
    path = str(tmp_path / "i")
    save_index(path, index, file_id=FILE_ID, pos=2**40, tid=TID)
    loaded, *_ = load_index(path)
    loaded._check()
    assert len(loaded) == len(model)
    # (A dense block of fewer than 128 entries may come back sparse.)
    assert loaded.block_stats()["entries"] == len(model)
    assert list(loaded.items()) == sorted(model.items())
    # Loading can be followed by normal use.
    loaded.update({p64(n): 99 for n in range(49_990, 50_100)})
    loaded._check()


def test_missing_file_gives_none(tmp_path):
    assert load_index(str(tmp_path / "nothing.index")) is None


def test_directory_gives_index_file_error(tmp_path):
    with pytest.raises(IndexFileError):
        load_index(str(tmp_path))


def test_save_refuses_bad_arguments(tmp_path):
    index, _ = small_index()
    path = str(tmp_path / "i")
    with pytest.raises(ValueError):
        save_index(path, index, file_id=b"short", pos=2**40, tid=TID)
    with pytest.raises(ValueError):
        save_index(path, index, file_id=FILE_ID, pos=2**40, tid=b"x")
    with pytest.raises(ValueError):
        save_index(path, index, file_id=FILE_ID, pos=-1, tid=TID)
    # Every position must lie before the end the index claims to cover.
    top = max(pos for _, pos in index.items())
    with pytest.raises(ValueError):
        save_index(path, index, file_id=FILE_ID, pos=top, tid=TID)
    save_index(path, index, file_id=FILE_ID, pos=top + 1, tid=TID)
    assert not any(p.name != "i" for p in tmp_path.iterdir())


def test_every_truncation_is_an_index_file_error(tmp_path):
    index, _ = small_index()
    data = encode(index)
    for n in range(len(data)):
        with pytest.raises(IndexFileError):
            decode(data[:n])
    # A few through the file system too.
    path = tmp_path / "i"
    for n in (0, 1, 8, 63, 64, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:n])
        with pytest.raises(IndexFileError) as info:
            load_index(str(path))
        assert info.value.path == str(path)


def test_every_flipped_byte_is_an_index_file_error():
    index, _ = small_index()
    data = encode(index)
    for i in range(len(data)):
        for mask in (0xFF, 0x01):
            bad = bytearray(data)
            bad[i] ^= mask
            with pytest.raises(IndexFileError):
                decode(bytes(bad))


def test_flipped_bytes_with_a_fixed_crc_never_escape():
    """Corruption the crc does not catch still gives IndexFileError or a sound index."""
    index, _ = small_index()
    body = encode(index)[:-4]
    nd = int.from_bytes(body[52:56], "big")
    # Version 2 trusts the per-dense-block counts and maxima (written from the blocks, covered
    # by the crc) and does not read the payloads at open: damage there gives no error.
    trusted = range(60 + 8 * nd, 60 + 16 * nd + 1536 * nd)
    for i in range(len(body)):
        for mask in (0xFF, 0x01, 0x80):
            bad = bytearray(body)
            bad[i] ^= mask
            try:
                loaded = decode(with_crc(bytes(bad)))
            except IndexFileError:
                continue
            if i not in trusted:
                loaded._check()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_damage_with_a_fixed_crc_never_escapes(data):
    index, _ = small_index()
    body = bytearray(encode(index)[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(body)))
        body = body[:cut] + data.draw(st.binary(max_size=20))
    try:
        loaded = decode(with_crc(bytes(body)))
    except IndexFileError:
        return
    list(loaded.items())  # usable (its counts may be off: version 2 trusts the dense columns)


HEADER = struct.Struct(">8sHH16sQ8sQII")


def craft(*, dense=(), sparse=(), count=None, pos=2**48, version=2, flags=0, magic=INDEX_MAGIC,
          extra=b"", dcounts=None, dmax=None) -> bytes:
    """An index file from parts: dense = [(key, {suffix: pos})], sparse = [(key, [(suffix, pos)])].

    Version 2 (the default) has the per-dense-block counts and maxima (`dcounts`, `dmax`:
    computed from `dense` unless given); version 1 does not."""
    dkeys = b"".join(k.to_bytes(8, "big") for k, _ in dense)
    dpay = b"".join(b"".join(m.get(s, 0).to_bytes(6, "big") for s in range(256)) for _, m in dense)
    if version >= 2:
        if dcounts is None:
            dcounts = [sum(1 for p in m.values() if p) for _, m in dense]
        if dmax is None:
            dmax = [max(m.values(), default=0) for _, m in dense]
        dkeys += b"".join(c.to_bytes(2, "big") for c in dcounts)
        dkeys += b"".join(p.to_bytes(6, "big") for p in dmax)
    skeys = b"".join(k.to_bytes(8, "big") for k, _ in sparse)
    scounts = b"".join(len(es).to_bytes(2, "big") for _, es in sparse)
    ssufs = bytes(s for _, es in sparse for s, _ in es)
    spos = b"".join(p.to_bytes(6, "big") for _, es in sparse for _, p in es)
    if count is None:
        count = sum(1 for _, m in dense for p in m.values() if p) + len(ssufs)
    header = HEADER.pack(magic, version, flags, FILE_ID, pos, TID, count, len(dense), len(sparse))
    return with_crc(header + dkeys + dpay + skeys + scounts + ssufs + spos + extra)


def full_map(n=256, base=5000):
    return {s: base + s for s in range(n)}


@pytest.mark.parametrize("version", [1, 2])
def test_crafted_valid_file_loads(version):
    data = craft(dense=[(3, full_map())], sparse=[(9, [(1, 100), (7, 200)]), (2**56 - 1, [(255, 300)])],
                 version=version)
    index = decode(data)
    index._check()
    assert index[p64(0x907)] == 200
    assert index[p64(3 << 8 | 17)] == 5017
    assert index.max_oid() == b"\xff" * 8
    assert len(index) == 259


@pytest.mark.parametrize("version", [1, 2])
def test_loader_normalizes_block_kinds(version):
    data = craft(dense=[(3, {5: 1000, 6: 1001})],
                 sparse=[(4, [(s, 2000 + s) for s in range(240)])], version=version)
    index = decode(data)
    index._check()
    assert index.block_stats() == {"dense": 1, "sparse": 1, "entries": 242}
    assert index[p64(0x305)] == 1000 and index[p64(0x4EF)] == 2000 + 239


@pytest.mark.parametrize("data, words", [
    (craft(magic=b"\x89RFS\r\n\x1a\n"), "data file"),
    (craft(magic=b"FS30\0\0\0\0"), "magic"),
    (craft(version=3), "version"),
    (craft(version=0), "version"),
    (craft(flags=1), "flags"),
    (craft(sparse=[(1, [(2, 100)])], count=2), "counts"),
    (craft(sparse=[(1, [(2, 0)])]), "position 0"),
    (craft(sparse=[(1, [(2, 100), (2, 200)])]), "ascending"),
    (craft(sparse=[(1, [(3, 100), (2, 200)])]), "ascending"),
    (craft(sparse=[(1, [(2, 100)]), (1, [(3, 100)])]), "twice"),
    (craft(dense=[(1, full_map())], sparse=[(1, [(3, 100)])]), "twice"),
    (craft(dense=[(1, full_map())] * 2), "twice"),
    (craft(sparse=[(2**56, [(3, 100)])]), "2**56"),
    (craft(dense=[(2**56, full_map())]), "2**56"),
    (craft(dense=[(1, {})], count=0, version=1), "empty dense"),
    (craft(dense=[(1, {})], count=0), "1..256"),
    (craft(dense=[(1, full_map())], dcounts=[257], count=257), "1..256"),
    (craft(dense=[(1, full_map())], dcounts=[255]), "counts"),
    (craft(dense=[(1, full_map())], pos=5000 + 255), "not below"),
    (craft(dense=[(1, full_map())], pos=5000 + 255, version=1), "not below"),
    (craft(dense=[(1, full_map())], dmax=[10**6], pos=10**6), "not below"),
    (craft(dense=[(1, full_map())])[:-4 - 1536 - 4], "checksum"),
    (craft(sparse=[(1, [(2, 100)])], extra=b"\0"), "unexpected"),
    (craft(sparse=[(1, [(2, 100)])], pos=100), "not below"),
    (craft(sparse=[(1, [])], count=0), "1..256"),
    (with_crc(HEADER.pack(INDEX_MAGIC, 1, 0, FILE_ID, 2**48, TID, 1, 0, 1) + b"\0\0\0\0\0\0\0\1"),
     "needed"),
    (with_crc(HEADER.pack(INDEX_MAGIC, 1, 0, FILE_ID, 2**48, TID, 0, 2**32 - 1, 0)), "needed"),
    (with_crc(HEADER.pack(INDEX_MAGIC, 2, 0, FILE_ID, 2**48, TID, 0, 2**32 - 1, 0)), "needed"),
    (with_crc(HEADER.pack(INDEX_MAGIC, 2, 0, FILE_ID, 2**48, TID, 0, 1, 0) + bytes(16)), "needed"),
])
def test_crafted_bad_files(data, words):
    with pytest.raises(IndexFileError) as info:
        decode(data, path="/x/Data.rfs.index")
    assert words in str(info.value)
    assert info.value.path == "/x/Data.rfs.index"
    assert "/x/Data.rfs.index" in str(info.value)


def test_sparse_block_with_257_entries_is_refused():
    data = craft(sparse=[(1, [(s % 256, 100 + s) for s in range(257)])])
    with pytest.raises(IndexFileError):
        decode(data)


# -- threads ------------------------------------------------------------------------------


def test_readers_never_see_a_wrong_position():
    """Readers run while a writer inserts, updates and deletes around fixed oids,
    converting their blocks between the two kinds over and over."""
    stable = [p64(k << 8 | s) for k in (1, 2, 3) for s in (0, 77, 200, 255)]

    def pos_of(oid: bytes, version: int) -> int:
        return int.from_bytes(oid, "big") * 1000 + version % 1000 + 1

    index = OidIndex()
    for oid in stable:
        index[oid] = pos_of(oid, 0)
    stop = threading.Event()
    errors: list[str] = []

    def reader():
        get = index.get
        while not stop.is_set():
            for oid in stable:
                p = get(oid)
                if p is None or (p - 1) // 1000 != int.from_bytes(oid, "big"):
                    errors.append(f"{oid.hex()} -> {p}")
                    return

    def writer():
        rnd = random.Random(5)
        fillers = [p64(k << 8 | s) for k in (1, 2, 3) for s in range(256) if p64(k << 8 | s) not in stable]
        version = 0
        while not stop.is_set():
            version += 1
            rnd.shuffle(fillers)
            if version % 2:
                for oid in fillers:
                    index[oid] = 5
            else:
                index.update(dict.fromkeys(fillers, 6))
            for oid in stable:
                index[oid] = pos_of(oid, version)
            index.update({oid: pos_of(oid, version + 1) for oid in stable})
            for oid in fillers:
                del index[oid]

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=reader) for _ in range(2)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        stop.wait(1.0)
        stop.set()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors
    index._check()


# -- format versions and the golden index files (docs/format.md, "The index file") -------

GOLDEN_DIR = Path(__file__).parent / "data"


def _golden_entries() -> dict[bytes, int]:
    d = {p64(i): 1024 + 100 * i for i in range(256)}
    d.update({p64(0x500): 9000, p64(0x5FF): 9001, p64(0x907): 99999})
    return d


def test_golden_index_v2_is_what_the_writer_writes(tmp_path):
    """The writer's bytes are pinned: a format change must come with a new version."""
    golden = (GOLDEN_DIR / "golden-v2.index").read_bytes()
    index = OidIndex()
    index.update(_golden_entries())
    assert encode(index, pos=100000, tid=bytes.fromhex("03e5a0d4d7777777")) == golden
    assert ix_mod.INDEX_VERSION == 2
    assert golden[8:10] == b"\0\2"
    # D = 1 dense block: key, count 256, max 1024 + 25500, then its payload
    assert golden[60:68] == p64(0) and golden[68:70] == (256).to_bytes(2, "big")
    assert golden[70:76] == (1024 + 25500).to_bytes(6, "big")


@pytest.mark.parametrize("version", [1, 2])
def test_golden_index_files_of_every_version_load(tmp_path, version):
    path = GOLDEN_DIR / f"golden-v{version}.index"
    loaded, file_id, pos, tid = load_index(str(path))
    assert (file_id, pos, tid) == (bytes(range(16)), 100000, bytes.fromhex("03e5a0d4d7777777"))
    loaded._check()
    assert_same(loaded, _golden_entries())


def test_version_1_index_is_used_and_replaced_by_version_2(tmp_path):
    """A storage whose index file is version 1 opens from it; a changed index is saved as version 2."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64 as zp64

    from refstorage.storage import FileStorage

    path = str(tmp_path / "d.rfs")
    s = FileStorage(path)
    t = TransactionMetaData()
    s.tpc_begin(t)
    for i in range(300):
        s.store(zp64(i), zp64(0), b"v%d" % i, "", t)
    s.tpc_vote(t)
    s.tpc_finish(t)
    s.close()
    index, file_id, pos, tid = load_index(path + ".index")
    # rewrite it in version 1 (the columns without counts and maxima)
    data = Path(path + ".index").read_bytes()
    nd = int.from_bytes(data[52:56], "big")
    v1 = data[:8] + b"\0\1" + data[10:60 + 8 * nd] + data[60 + 16 * nd:-4]
    Path(path + ".index").write_bytes(with_crc(v1))
    assert decode(with_crc(v1)).block_stats() == index.block_stats()
    s = FileStorage(path, read_only=True)
    assert s.load(zp64(299))[0] == b"v299" and len(s) == 300
    s.close()
    s = FileStorage(path)
    t = TransactionMetaData()
    s.tpc_begin(t)
    s.store(zp64(300), zp64(0), b"new", "", t)
    s.tpc_vote(t)
    s.tpc_finish(t)
    s.close()  # a changed index is saved in the current version
    assert Path(path + ".index").read_bytes()[8:10] == b"\0\2"
    assert len(load_index(path + ".index")[0]) == 301


@pytest.mark.parametrize("where", ["past the end", "another record"])
def test_a_wrong_dense_position_is_never_served(tmp_path, where):
    """Version 2 does not read dense payloads at open; a position there is checked on use."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64 as zp64

    from refstorage.errors import CorruptedDataError
    from refstorage.storage import FileStorage

    path = str(tmp_path / "d.rfs")
    s = FileStorage(path)
    t = TransactionMetaData()
    s.tpc_begin(t)
    for i in range(256):
        s.store(zp64(i), zp64(0), b"v%d" % i, "", t)
    s.tpc_vote(t)
    s.tpc_finish(t)
    s.close()
    data = bytearray(Path(path + ".index").read_bytes()[:-4])
    nd = int.from_bytes(data[52:56], "big")
    assert nd == 1 and data[60:68] == p64(0)
    pay = 60 + 16 * nd
    wrong = (Path(path).stat().st_size + 100 if where == "past the end"
             else int.from_bytes(data[pay + 6 * 6:pay + 6 * 7], "big"))  # oid 6's record
    data[pay + 6 * 5:pay + 6 * 6] = wrong.to_bytes(6, "big")  # oid 5, maxima left as they are
    Path(path + ".index").write_bytes(with_crc(bytes(data)))
    if where == "past the end":  # above the block's stored maximum: refused at open
        with pytest.raises(IndexFileError, match="do not match its entries"):
            load_index(path + ".index")
    s = FileStorage(path, read_only=True)
    try:
        assert s.load(zp64(4))[0] == b"v4"
        if where == "past the end":  # the index was rebuilt from the data file
            assert s.load(zp64(5))[0] == b"v5"
            return
        with pytest.raises(CorruptedDataError) as info:
            s.load(zp64(5))
        assert info.value.offset == wrong and path in str(info.value)
    finally:
        s.close()


@pytest.mark.parametrize("shape", ["entries zeroed", "middle zeroed", "whole block zeroed",
                                   "extra entry"])
def test_dense_counts_and_maxima_are_checked_against_the_entries(tmp_path, shape, monkeypatch):
    """A version-2 index whose per-block count or maximum does not match the block's entries
    (a writer's bug, or a file edited and its crc recomputed) is refused, and the storage
    rebuilds its index: no oid is lost, new_oid never reuses an existing oid (outside
    review: a new object replaced oid 240).  Both the C check and its Python twin."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64 as zp64

    from refstorage import indexfile
    from refstorage.storage import FileStorage

    for twin in (False, True):
        if twin:
            monkeypatch.setattr(indexfile, "_dense_check", indexfile._py_dense_check)
        path = str(tmp_path / f"d{twin}.rfs")
        s = FileStorage(path)
        t = TransactionMetaData()
        s.tpc_begin(t)
        for i in range(250):
            s.store(zp64(i), zp64(0), b"v%d" % i, "", t)
        s.tpc_vote(t)
        s.tpc_finish(t)
        s.close()
        data = bytearray(Path(path + ".index").read_bytes()[:-4])
        nd = int.from_bytes(data[52:56], "big")
        pay = 60 + 16 * nd
        if shape == "entries zeroed":
            data[pay + 6 * 240:pay + 6 * 250] = bytes(60)
        elif shape == "middle zeroed":
            data[pay + 6 * 50:pay + 6 * 150] = bytes(600)
        elif shape == "whole block zeroed":
            data[pay:pay + 1536] = bytes(1536)
        else:  # oid 252 gets oid 3's position, count and maximum unchanged
            data[pay + 6 * 252:pay + 6 * 253] = data[pay + 6 * 3:pay + 6 * 4]
        Path(path + ".index").write_bytes(with_crc(bytes(data)))
        with pytest.raises(IndexFileError, match="do not match its entries"):
            load_index(path + ".index")
        s = FileStorage(path)
        try:
            assert len(s) == 250
            assert [s.load(zp64(i))[0] for i in range(250)] == [b"v%d" % i for i in range(250)]
            assert int.from_bytes(s.new_oid(), "big") >= 250
        finally:
            s.close()


# -- the index file used in place: dense blocks are views of its memory map -----------


def _saved_dense(tmp_path, nums=range(1, 2000)) -> tuple[str, dict[bytes, int]]:
    index, model = build(list(nums), bulk=True)
    path = str(tmp_path / "m.index")
    save_index(path, index, file_id=FILE_ID, pos=2**40, tid=TID)
    return path, model


def test_loaded_dense_blocks_are_read_only_views_of_the_map(tmp_path):
    """An open copies no dense block: each is a read-only view of the file's memory map."""
    path, model = _saved_dense(tmp_path)
    loaded, *_ = load_index(path)
    dense = [b for b in loaded.blocks().values() if len(b) == 1536]
    assert dense and all(type(b) is memoryview and b.readonly for b in dense)
    assert all(isinstance(b.obj, __import__("mmap").mmap) for b in dense)
    assert_same(loaded, model)


def test_changing_a_loaded_index_copies_the_block_and_leaves_the_file(tmp_path):
    """Copy on write: set and delete replace the view by a bytearray; the file is untouched."""
    path, model = _saved_dense(tmp_path)
    before = Path(path).read_bytes()
    loaded, *_ = load_index(path)
    shared = loaded.copy()  # shares the read-only views
    loaded[p64(5)] = 777           # an existing entry of a loaded dense block
    loaded[p64(0)] = 778           # a new entry (suffix 0 was absent)
    del loaded[p64(300)]           # a delete in another loaded dense block
    model2 = dict(model)
    model2[p64(5)] = 777
    model2[p64(0)] = 778
    del model2[p64(300)]
    assert_same(loaded, model2)
    for key in (0, 1):
        assert type(loaded.blocks()[key]) is bytearray
    assert type(loaded.blocks()[2]) is memoryview  # untouched: still the view
    assert_same(shared, model)  # the copy taken before did not change
    assert Path(path).read_bytes() == before
    assert_same(load_index(path)[0], model)
    # Saving a loaded (partly viewed) index writes the same bytes as saving the model.
    again = str(tmp_path / "again.index")
    save_index(again, loaded, file_id=FILE_ID, pos=2**40, tid=TID)
    fresh = str(tmp_path / "fresh.index")
    save_index(fresh, build_from(model2), file_id=FILE_ID, pos=2**40, tid=TID)
    assert Path(again).read_bytes() == Path(fresh).read_bytes()


def build_from(model: dict[bytes, int]) -> OidIndex:
    index = OidIndex()
    index.update(model)
    return index


def test_a_loaded_index_outlives_the_file_being_replaced(tmp_path):
    """save_index replaces the file by rename: views of the old one stay valid."""
    path, model = _saved_dense(tmp_path)
    loaded, *_ = load_index(path)
    other = build_from({p64(n): 5000 + n for n in range(1, 2000)})
    save_index(path, other, file_id=FILE_ID, pos=2**40, tid=TID)
    gc.collect()
    assert_same(loaded, model)
    assert load_index(path)[0][p64(7)] == 5007


def test_a_damaged_dense_payload_is_caught_through_the_map(tmp_path):
    """The crc still covers the mapped dense payloads: one flipped payload byte is refused."""
    path, _ = _saved_dense(tmp_path)
    data = bytearray(Path(path).read_bytes())
    nd = int.from_bytes(data[52:56], "big")
    payload = 60 + 16 * nd
    data[payload + 1536 + 6 * 9 + 5] ^= 0x40  # a position in the second dense block
    Path(path).write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum mismatch"):
        load_index(path)


def test_load_falls_back_to_reading_when_the_file_cannot_be_mapped(tmp_path):
    from refstorage import fileio

    class NoMap(fileio.Ops):
        def __init__(self):
            self.tried = 0

        def map_read(self, fd, size):
            self.tried += 1
            raise OSError(19, "no mmap here")

    path, model = _saved_dense(tmp_path)
    with fileio.injected(NoMap()) as ops:
        loaded, *_ = load_index(path)
    assert ops.tried == 1
    assert_same(loaded, model)
    dense = [b for b in loaded.blocks().values() if len(b) == 1536]
    assert dense and all(type(b) is memoryview and b.readonly and type(b.obj) is bytes for b in dense)
    loaded[p64(3)] = 42
    assert loaded[p64(3)] == 42 and type(loaded.blocks()[0]) is bytearray
    # an empty file (which cannot be mapped) is refused as truncated
    Path(path).write_bytes(b"")
    with pytest.raises(IndexFileError, match="truncated|bad magic"):
        load_index(path)


def test_index_lookup_reads_loaded_views():
    """The C lookup (verify) reads a dense block that is a view as it reads a bytearray."""
    refscan = pytest.importorskip("refstorage._refscan")
    index, model = build(list(range(1, 2000)) + [0x10000], bulk=True)
    blocks = {k: memoryview(bytes(b)) if len(b) == 1536 else b for k, b in index.blocks().items()}
    oids = sorted(model) + [p64(2500), p64(0)]
    got = refscan.index_lookup(blocks, b"".join(oids)).tolist()
    assert got == [model.get(o, 0) for o in oids]
    assert refscan.index_lookup(index.blocks(), b"".join(oids)).tolist() == got
