"""verify's C checks (`_refscan.check_records`, `gc_refs`) give exactly the report of the Python
path, on sound files and on every damage shape: a bit flipped in each field of a record, of a
transaction header, oid table and trailer, bytes cut out (moved transactions), a torn tail, bad
prev and backpointers, dangling references, deleted objects referenced."""

from __future__ import annotations

import shutil

import pytest

from refstorage.tools import verify as verify_mod
from tools_db import build_file, cut, flip_bit, layout, make_db, oid, truncate

T = [bytes([0, 0, 0, 0, 0, 0, 1, i]) for i in range(1, 10)]


def report(path, python: bool, monkeypatch: pytest.MonkeyPatch) -> dict:
    with monkeypatch.context() as m:
        if python:
            m.setattr(verify_mod, "_check_records", None)
            m.setattr(verify_mod, "_gc_refs", None)
            m.setattr(verify_mod, "_sort_positions", None)
            m.setattr(verify_mod, "_OidMap", None)
        elif verify_mod._check_records is None:
            pytest.skip("refstorage._refscan is not built")
        out = verify_mod.verify(str(path)).to_json()
    out.pop("seconds")
    return out


def same(path, monkeypatch) -> dict:
    c = report(path, False, monkeypatch)
    assert c == report(path, True, monkeypatch)
    return c


def test_sound_database(tmp_path, monkeypatch):
    path = tmp_path / "d.rfs"
    make_db(path, extra_txns=3)
    if verify_mod._check_records is None:
        pytest.skip("refstorage._refscan is not built")
    passed = []
    real = verify_mod._check_records

    def counting(*args):
        got = real(*args)
        passed.append(got[1])
        return got

    monkeypatch.setattr(verify_mod, "_check_records", counting)
    assert same(path, monkeypatch)["ok"]
    assert passed and all(passed)  # every transaction went through the C check


def _damages(path) -> list[tuple[str, int]]:
    txns = layout(path)
    big = max(txns, key=lambda t: len(t["records"]))
    recs = big["records"]
    out = []
    for name, rec in (("first", recs[0]), ("middle", recs[len(recs) // 2]), ("last", recs[-1])):
        p = rec["pos"]
        for field, off in (("oid", 7), ("tid", 15), ("prev", 23), ("tpos", 31), ("flags", 33),
                           ("nrefs", 37), ("dlen", 41), ("body", 44), ("crc", rec["length"] - 1)):
            out.append((f"{name}-{field}", p + off))
    pos = big["pos"]
    out += [("txn-tlen", pos + 15), ("txn-status", pos + 16), ("txn-nrec", pos + 32),
            ("table-oid", big["pos"] + big["tlen"] - 8 - 16 * 2 - 4 + 3),
            ("table-pos", big["pos"] + big["tlen"] - 4 - 1 - 16),
            ("table-crc", big["pos"] + big["tlen"] - 1), ("trailer", big["pos"] + big["tlen"] + 7)]
    return out


def test_every_damage_shape(tmp_path, monkeypatch):
    base = tmp_path / "base.rfs"
    make_db(base, extra_txns=3)
    damages = _damages(base)
    assert len(damages) > 30
    for name, at in damages:
        path = tmp_path / f"{name}.rfs"
        shutil.copyfile(base, path)
        flip_bit(path, at, 1)
        assert not same(path, monkeypatch)["ok"], name
    txns = layout(base)
    for name, change in (("cut", lambda p: cut(p, txns[2]["pos"] + 40, txns[2]["pos"] + 50)),
                         ("cut-txn", lambda p: cut(p, txns[1]["pos"], txns[2]["pos"])),
                         ("torn", lambda p: truncate(p, txns[-1]["pos"] + 60))):
        path = tmp_path / f"{name}.rfs"
        shutil.copyfile(base, path)
        change(path)
        assert not same(path, monkeypatch)["ok"], name


def test_prev_backpointer_and_reference_problems(tmp_path, monkeypatch):
    path = tmp_path / "p.rfs"
    data = b"\x80\x03}q\x00."
    positions = build_file(path, [
        (T[0], [(oid(0), data, [oid(1), oid(2)], 0, None), (oid(1), data, [], 0, None),
                (oid(2), data, [oid(9)], 0, None)]),
        (T[1], [(oid(1), data, [], 0, 5), (oid(3), None, [], 0, None)]),  # bad prev; a deletion
        (T[2], [(oid(2), None, [], 77, None), (oid(4), data, [oid(3)], 0, None)]),  # bad backpointer
        (T[3], [(oid(5), None, [], 0, None)]),
    ])
    assert positions
    got = same(path, monkeypatch)
    kinds = got["problem_counts"]
    assert kinds.get("prev") and kinds.get("backpointer") and kinds.get("dangling"), kinds
    assert any("deleted" in p["message"] for p in got["problems"])


def test_index_lookup_answers_as_oid_index_get():
    """`_refscan.index_lookup` reads OidIndex's blocks (dense and sparse) as OidIndex.get does."""
    import random

    from refstorage.index import OidIndex

    try:
        from refstorage._refscan import index_lookup
    except ImportError:
        pytest.skip("refstorage._refscan is not built")
    r = random.Random(1)
    keys = {r.randrange(1 << 20).to_bytes(8, "big") for _ in range(3000)}
    keys |= {i.to_bytes(8, "big") for i in range(600)}  # dense blocks
    keys |= {r.randrange(1 << 64).to_bytes(8, "big") for _ in range(100)}
    index = OidIndex({k: r.randrange(1, 1 << 48) for k in keys})
    stats = index.block_stats()
    assert stats["dense"] and stats["sparse"]
    asked = list(keys) + [r.randrange(1 << 21).to_bytes(8, "big") for _ in range(5000)]
    got = index_lookup(index.blocks(), b"".join(asked))
    assert got.tolist() == [index.get(k, 0) for k in asked]
    assert index_lookup(index.blocks(), b"").tolist() == []


def _c_oid_map():
    try:
        from refstorage._refscan import OidMap
    except ImportError:
        pytest.skip("refstorage._refscan is not built")
    from refstorage.tools.common import OidMap as Wrapped

    assert issubclass(Wrapped, OidMap)
    return Wrapped


def _table(pairs) -> bytes:
    return b"".join(o + p.to_bytes(8, "big") for o, p in pairs)


def test_oid_map_answers_as_its_python_twin():
    """`_refscan.OidMap` (verify's walk index) against `common.PyOidMap`: the same answers to
    every method, on dense, sparse and repeated oids, through several table growths."""
    import random

    from refstorage.index import OidIndex
    from refstorage.tools.common import PyOidMap

    COidMap = _c_oid_map()
    r = random.Random(7)
    maps = [COidMap(), PyOidMap(batch=500, direct=300)]  # small batches: merges happen
    universe = ([i.to_bytes(8, "big") for i in range(3000)]
                + [r.randrange(1 << 64).to_bytes(8, "big") for _ in range(2000)]
                + [(r.randrange(1 << 20) << 8).to_bytes(8, "big") for _ in range(500)])
    for step in range(60):
        n = r.choice([0, 1, 5, 16, 200, 700])
        pairs = [(r.choice(universe), r.randrange(1, 1 << 48)) for _ in range(n)]
        if step % 3:
            answers = [m.swap_table(_table(pairs)) for m in maps]
            assert answers[0].typecode == answers[1].typecode == "Q"
            assert answers[0] == answers[1]
        else:
            for m in maps:
                assert m.update(dict(pairs)) is None
        asked = r.sample(universe, 300) + [b"\x01" * 8]
        assert maps[0].lookup(b"".join(asked)) == maps[1].lookup(b"".join(asked))
        assert len(maps[0]) == len(maps[1])
        for o in asked[:50]:
            assert maps[0].get(o) == maps[1].get(o)
            assert maps[0].get(o, 0) == maps[1].get(o, 0)
            assert (o in maps[0]) == (o in maps[1])
    for m in maps:
        assert m.get(b"short", 5) == 5 and b"short" not in m and 3 not in m
    assert sorted(maps[0].positions()) == sorted(maps[1].positions())
    assert maps[0].table() == maps[1].table()
    c_index, py_index = maps[0].to_index(), maps[1].to_index()
    assert list(c_index.items()) == list(py_index.items())
    c_index._check()
    assert len(maps[0]) > 2000
    # same_as: equal, one position changed, one entry more, one fewer
    for m in maps:
        assert m.same_as(c_index) and m.same_as(py_index)
        other = OidIndex(c_index.items())
        first = next(iter(other))
        other[first] = other[first] + 1
        assert not m.same_as(other)
        other[first] = other[first] - 1
        assert m.same_as(other)
        other[b"\xfe" * 8] = 9
        assert not m.same_as(other)
        del other[b"\xfe" * 8]
        del other[first]
        assert not m.same_as(other)
        assert not m.same_as(OidIndex())
    empty = [COidMap(), PyOidMap()]
    for m in empty:
        assert len(m) == 0 and m.same_as(OidIndex()) and m.table() == b""
        assert list(m.positions()) == [] and list(m.lookup(b"")) == []
        assert list(m.swap_table(b"")) == []


def test_oid_map_refuses_bad_entries_unchanged():
    from refstorage.tools.common import PyOidMap

    for m in (_c_oid_map()(), PyOidMap()):
        m.update({b"\0" * 8: 5})
        for bad in ({b"\0" * 8: 6, b"\1" * 8: 0}, {b"\1" * 8: 1 << 48}, {b"\1" * 8: -1},
                    {b"abc": 5}, {b"\1" * 8: "x"}):
            with pytest.raises(ValueError):
                m.update(bad)
        for bad in (_table([(b"\1" * 8, 7), (b"\2" * 8, 0)]), _table([(b"\1" * 8, 1 << 48)]), b"x" * 17):
            with pytest.raises(ValueError):
                m.swap_table(bad)
        with pytest.raises(TypeError):
            m.update([(b"\1" * 8, 5)])
        assert len(m) == 1 and m.get(b"\0" * 8) == 5 and b"\1" * 8 not in m


def test_sort_positions_sorts_as_sorted():
    import random
    from array import array

    try:
        from refstorage._refscan import sort_positions
    except ImportError:
        pytest.skip("refstorage._refscan is not built")
    r = random.Random(3)
    for n, top in ((0, 10), (1, 10), (63, 1 << 20), (64, 1 << 20), (5000, 1 << 16), (5000, 1 << 48),
                   (20000, 1 << 64), (3000, 5)):
        values = array("Q", [r.randrange(top) for _ in range(n)])
        want = sorted(values)
        sort_positions(values)
        assert values.tolist() == want


def test_index_file_comparisons_on_both_paths(tmp_path, monkeypatch):
    """verify's comparison with the index file (equal, an entry changed, one more, one fewer,
    covering an earlier transaction than the last) gives the same report on both paths."""
    from refstorage.index import OidIndex
    from refstorage.indexfile import load_index, save_index

    base = tmp_path / "base.rfs"
    make_db(base, extra_txns=3)
    ipath = str(base) + ".index"
    index, file_id, pos, tid = load_index(ipath)
    assert same(base, monkeypatch)["index_file"].startswith("checked")
    txn_list = layout(base)
    early = txn_list[1]
    early_index = OidIndex()
    for t in txn_list[:2]:
        early_index.update({bytes.fromhex(r["oid"]): r["pos"] for r in t["records"]})
    first = next(iter(index))
    changed, more, fewer = OidIndex(index.items()), OidIndex(index.items()), OidIndex(index.items())
    changed[first] = changed[first] + 1
    more[b"\x7f" * 8] = 99
    del fewer[first]
    cases = [(changed, pos, tid), (more, pos, tid), (fewer, pos, tid),
             (early_index, early["next_pos"], bytes.fromhex(early["tid"]))]
    for k, (idx, ipos, itid) in enumerate(cases):
        path = tmp_path / f"i{k}.rfs"
        shutil.copyfile(base, path)
        save_index(str(path) + ".index", idx, file_id=file_id, pos=ipos, tid=itid)
        got = same(path, monkeypatch)
        if k < 3:
            assert got["index_file"] == "mismatch" and got["problem_counts"] == {"index": 1}, got
        else:
            assert got["index_file"].startswith("checked"), got
