"""record_iternext: every live object once, in oid order, beside concurrent commits, in O(n log n)."""

from __future__ import annotations

import threading

import pytest
from ZODB.utils import p64, u64

import refstorage
from refstorage import fileio
from refstorage.index import OidIndex

from .helpers import commit


def _full_pass(st) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    nxt = None
    while True:
        oid, tid, data, nxt = st.record_iternext(nxt)
        out.append((oid, tid, data))
        if nxt is None:
            return out


class CountReads(fileio.Ops):
    def __init__(self):
        self.reads = 0

    def pread(self, fd, n, pos):
        self.reads += 1
        return super().pread(fd, n, pos)


def test_sparse_oids_one_read_per_object(tmp_path):
    """Oids 2**20 apart (one per index block): a pass reads each record once.

    Before the fix the gap search scanned every block key (22,000 oids took 17 s)
    and each oid was read three times."""
    st = refstorage.FileStorage(str(tmp_path / "Data.rfs"))
    oids = [p64((i + 1) << 20) for i in range(3000)]
    for i in range(0, len(oids), 500):
        commit(st, {oid: b"v%d" % u64(oid) for oid in oids[i:i + 500]})
    counter = CountReads()
    with fileio.injected(counter):
        got = _full_pass(st)
    assert [o for o, _, _ in got] == oids
    assert all(data == b"v%d" % u64(oid) for oid, _, data in got)
    assert counter.reads <= len(oids) + 2, f"{counter.reads} reads for {len(oids)} objects"
    st.close()


def test_deleted_objects_are_skipped_even_last(tmp_path):
    st = refstorage.FileStorage(str(tmp_path / "Data.rfs"))
    commit(st, {p64(i): b"x" for i in range(1, 8)} | {p64(1 << 40): b"far"})
    commit(st, {p64(3): None, p64(7): None, p64(1 << 40): None})
    got = [u64(o) for o, _, _ in _full_pass(st)]
    assert got == [1, 2, 4, 5, 6]
    with pytest.raises(ValueError):
        st.record_iternext(p64(8))
    st.close()


def test_min_key_sparse_is_logarithmic():
    """min_key over a gap never walks the block dict: it bisects the sorted block keys."""
    index = OidIndex((p64(i << 16), 100 + i) for i in range(1, 5000))
    index._check()
    assert index.min_key(p64(1)) == p64(1 << 16)
    assert index.min_key(p64((4999 << 16) + 1)) is None
    # a key added below the last one (out of order) invalidates and rebuilds the sorted keys
    index[p64(5)] = 7
    index._check()
    assert index.min_key(p64(0)) == p64(5)
    index[p64(1 << 50)] = 9
    index._check()
    assert index.min_key(p64((4999 << 16) + 1)) == p64(1 << 50)
    del index[p64(5)]
    assert index.min_key(p64(0)) == p64(1 << 16)


def test_full_passes_beside_a_concurrent_writer(tmp_path):
    """A writer adds objects (new index blocks, dense and sparse) while passes run:
    no exception, oids strictly increase, and every object committed before a pass
    began is returned with data at least as new as when the pass began."""
    st = refstorage.FileStorage(str(tmp_path / "Data.rfs"))
    commit(st, {p64(i): b"0" for i in range(1, 300)})
    stop = threading.Event()
    errors: list[BaseException] = []
    written: dict[bytes, int] = {}
    lock = threading.Lock()

    def writer():
        n = 1
        try:
            while not stop.is_set() and n < 400:
                batch = {p64(1000 * n + k): b"%d" % n for k in range(3)}  # dense-ish
                batch[p64((n + 7) << 24)] = b"%d" % n                     # a new sparse block
                batch[p64(1 + n % 299)] = b"%d" % n                       # an update
                commit(st, batch)
                with lock:
                    for oid in batch:
                        written[oid] = n
                n += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    th = threading.Thread(target=writer)
    th.start()
    try:
        for _ in range(20):
            with lock:
                before = set(written) | {p64(i) for i in range(1, 300)}
            got = _full_pass(st)
            oids = [o for o, _, _ in got]
            assert all(a < b for a, b in zip(oids, oids[1:], strict=False)), "not in oid order"
            missing = before - set(oids)
            assert not missing, f"{len(missing)} objects committed before the pass were skipped"
    finally:
        stop.set()
        th.join(60)
    assert not errors, errors
    st._state.index._check()
    st.close()
