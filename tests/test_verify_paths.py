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
            m.setattr(verify_mod, "_index_lookup", None)
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

    if verify_mod._index_lookup is None:
        pytest.skip("refstorage._refscan is not built")
    r = random.Random(1)
    keys = {r.randrange(1 << 20).to_bytes(8, "big") for _ in range(3000)}
    keys |= {i.to_bytes(8, "big") for i in range(600)}  # dense blocks
    keys |= {r.randrange(1 << 64).to_bytes(8, "big") for _ in range(100)}
    index = OidIndex({k: r.randrange(1, 1 << 48) for k in keys})
    stats = index.block_stats()
    assert stats["dense"] and stats["sparse"]
    asked = list(keys) + [r.randrange(1 << 21).to_bytes(8, "big") for _ in range(5000)]
    got = verify_mod._index_lookup(index.blocks(), b"".join(asked))
    assert got.tolist() == [index.get(k, 0) for k in asked]
    assert verify_mod._index_lookup(index.blocks(), b"").tolist() == []
