"""`refstorage recover`: salvaging the good transactions of damaged files."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
from click.testing import CliRunner
from ZODB.POSException import POSKeyError
from ZODB.utils import p64

import refstorage
from refstorage import fileformat as fmt
from refstorage.cli import main
from refstorage.tools.recover import recover
from tools_db import GOLDEN, cut, flip_bit, layout, loads, make_db, truncate, txns


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "Data.rfs"
    make_db(path, extra_txns=3)
    return path, layout(path), txns(path), loads(path)


@pytest.fixture
def src(tmp_path, template):
    path = tmp_path / "Data.rfs"
    shutil.copy(template[0], path)
    return path


def structural(report):
    return {k: n for k, n in report.verify.counts.items() if k != "dangling"}


def without(all_txns, *tids):
    lost = {bytes.fromhex(t) for t in tids}
    return [t for t in all_txns if t[0] not in lost]


def undo_backpointer(lay):
    """The last undo's backpointer record and the position it points to."""
    for t in reversed(lay):
        for r in t["records"]:
            if r.get("backpointer"):
                return t, r
    raise AssertionError("no backpointer")


def test_a_clean_file_is_copied_whole(src, template, tmp_path):
    dst = tmp_path / "New.rfs"
    r = run("recover", src, dst)
    assert r.exit_code == 0, r.output
    assert f"{dst} verifies clean" in r.output and "0 bytes skipped" in r.output
    assert txns(dst) == template[2]
    assert loads(dst) == template[3]


def test_an_interrupted_recover_leaves_no_partial_file(src, template, tmp_path, monkeypatch):
    """Found by an outside review: Ctrl-C during recover left the first transactions
    under DST's name, a file that verified clean.  Now DST appears only when complete."""
    import refstorage.tools.recover as recover_mod

    real_walk = recover_mod.walk

    def interrupted(*args, **kwargs):
        for n, item in enumerate(real_walk(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(recover_mod, "walk", interrupted)
    dst = tmp_path / "New.rfs"
    with pytest.raises(KeyboardInterrupt):
        recover(str(src), str(dst))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Data.rfs"], "a partial or temporary file stayed"
    monkeypatch.setattr(recover_mod, "walk", real_walk)
    report = recover(str(src), str(dst))
    assert report.verify.ok and txns(dst) == template[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Data.rfs", "New.rfs", "New.rfs.index"]


def test_flipped_bit_in_a_record_loses_only_that_record(src, template, tmp_path):
    lay = template[1]
    bad = lay[4]
    rec = bad["records"][0]
    flip_bit(src, rec["pos"] + rec["length"] - 6, 3)
    dst = tmp_path / "New.rfs"
    r = run("recover", src, dst)
    assert r.exit_code == 4, r.output
    assert f"skipped bytes [{bad['pos']}, {lay[5]['pos']})" in r.output
    assert "data record checksum mismatch" in r.output
    assert f"lost: oid 0x{int(rec['oid'], 16):02x} (record at {rec['pos']}, tid {bad['tid']})" in r.output
    assert "result: salvaged with losses (1 revision lost)" in r.output
    report = recover(str(src), str(tmp_path / "Again.rfs"))
    assert [(s.start, s.end) for s in report.skipped] == [(bad["pos"], lay[5]["pos"])]
    assert report.transactions == len(lay) and not structural(report)
    assert [(x.oid.hex(), x.tid.hex(), x.kind, x.oid_certain) for x in report.lost] == [
        (rec["oid"], bad["tid"], "damaged", True)]
    # the transaction is kept, with its tid and metadata, minus the one record
    want = [t if t[0].hex() != bad["tid"] else t[:5] + ([x for x in t[5] if x[0].hex() != rec["oid"]],)
            for t in template[2]]
    assert txns(dst) == want


def test_damage_to_redundant_parts_loses_nothing(src, template, tmp_path):
    lay = template[1]
    bad = lay[4]
    end = lay[5]["pos"]
    for where, byte in (("oid table", end - 8 - 4 - 3), ("trailer", end - 2), ("status", bad["pos"] + 16)):
        shutil.copy(template[0], src)
        flip_bit(src, byte, 2)
        dst = tmp_path / f"New-{where}.rfs"
        r = run("recover", src, dst, "--json")
        d = json.loads(r.output)
        assert r.exit_code == 3 and d["outcome"] == "repaired", (where, r.output)
        assert d["lost"] == [] and d["skipped"][0]["records"] == len(bad["records"]), where
        assert txns(dst) == template[2], where


def test_damaged_transaction_header_is_rebuilt_from_its_records(src, template, tmp_path):
    lay = template[1]
    bad = lay[3]
    flip_bit(src, bad["pos"] + 3)  # the tid in the header: its checksum fails
    dst = tmp_path / "New.rfs"
    r = run("recover", src, dst, "--json")
    d = json.loads(r.output)
    assert r.exit_code == 3 and d["lost"] == [], r.output
    assert d["rebuilt"] == [{"pos": bad["pos"], "tid": bad["tid"]}]
    got = txns(dst)
    assert [t[0] for t in got] == [t[0] for t in template[2]]
    for g, w in zip(got, template[2], strict=True):
        if g[0].hex() == bad["tid"]:
            assert g[2] == b"" and b"recovered by refstorage recover" in g[3]
            assert b"refstorage-recovered" in g[4]
            assert g[5] == w[5]
        else:
            assert g == w


def test_truncated_tail(src, template, tmp_path):
    lay = template[1]
    size = pathlib.Path(src).stat().st_size
    truncate(src, lay[-1]["pos"] + 77)
    report = recover(str(src), str(tmp_path / "New.rfs"))
    assert [(s.start, s.end) for s in report.skipped] == [(lay[-1]["pos"], lay[-1]["pos"] + 77)]
    assert size > lay[-1]["pos"] + 77
    assert report.verify.ok
    assert txns(tmp_path / "New.rfs") == template[2][:-1]


def test_cut_in_the_middle_moves_the_rest_and_loses_a_backpointer_target(src, template, tmp_path):
    lay = template[1]
    start, end = lay[1]["pos"] + 100, lay[2]["pos"] + 50  # most of "fill", the start of "update"
    cut(src, start, end)
    dst = tmp_path / "New.rfs"
    r = run("recover", src, dst, "--json")
    assert r.exit_code == 4
    d = json.loads(r.output)
    assert [(s["start"], s["end"]) for s in d["skipped"]] == [(lay[1]["pos"], lay[3]["pos"] - (end - start))]
    assert d["moved"] == [{"pos": lay[3]["pos"] - (end - start), "delta": start - end}]
    # both undos pointed into "fill" (the root's revision and a mapping's): lost, written as deleted
    t, rec = undo_backpointer(lay)
    assert [x["oid"] for x in d["lost"] if x["kind"] == "backpointer"] == ["0000000000000000", rec["oid"]]
    assert set(d["verify"]["problem_counts"]) <= {"dangling"}
    assert d["dangling"] and any(x["target_lost"] for x in d["dangling"])
    # what is left of "update" after the cut (its records but the first) is rebuilt under its tid
    assert d["rebuilt"] == [{"pos": d["skipped"][0]["unknown"][-1]["start"], "tid": lay[2]["tid"]}]
    kept = without(template[2], lay[1]["tid"], lay[2]["tid"])
    got = txns(dst)
    rebuilt = [g for g in got if g[0].hex() == lay[2]["tid"]]
    update = next(x for x in template[2] if x[0].hex() == lay[2]["tid"])
    assert len(rebuilt) == 1 and rebuilt[0][5] == update[5][1:]
    got = [g for g in got if g[0].hex() != lay[2]["tid"]]
    assert [x[0] for x in got] == [x[0] for x in kept]
    lost = {(bytes.fromhex(x["tid"]), bytes.fromhex(x["oid"])) for x in d["lost"]}
    for g, k in zip(got, kept, strict=True):
        assert g[:5] == k[:5]
        want = [(o, tid, None, None) if (tid, o) in lost else (o, tid, data, data_txn)
                for o, tid, data, data_txn in k[5]]
        assert g[5] == want
    with pytest.raises(POSKeyError):
        refstorage.FileStorage(str(dst), read_only=True).load(bytes.fromhex(rec["oid"]))


def test_backpointer_into_a_skipped_transaction_is_rescued(src, template, tmp_path):
    lay = template[1]
    t, rec = undo_backpointer(lay)
    target_txn = next(x for x in lay if any(r["pos"] == rec["backpointer"] for r in x["records"]))
    flip_bit(src, target_txn["pos"] + 2)  # its header: the transaction is skipped, its records are intact
    report = recover(str(src), str(tmp_path / "New.rfs"))
    assert len(report.skipped) == 1 and report.skipped[0].start == target_txn["pos"]
    # the last undo's target and the root's revision the first undo went back to are both in "fill"
    assert report.rescued == 2 and not report.lost
    oid = bytes.fromhex(rec["oid"])
    assert loads(tmp_path / "New.rfs")[oid] == (template[3][oid][0], bytes.fromhex(t["tid"]))


def test_backpointer_whose_target_is_damaged_becomes_a_deletion(src, template, tmp_path):
    lay = template[1]
    t, rec = undo_backpointer(lay)
    target_txn = next(x for x in lay if any(r["pos"] == rec["backpointer"] for r in x["records"]))
    flip_bit(src, rec["backpointer"] + 50)  # inside the target record
    dst = tmp_path / "New.rfs"
    r = run("recover", src, dst)
    assert r.exit_code == 4
    assert f"lost: oid 0x{int(rec['oid'], 16):02x} (record at {rec['pos']}" in r.output
    assert "written as deleted" in r.output
    report = recover(str(src), str(tmp_path / "Again.rfs"))
    assert report.skipped[0].start == target_txn["pos"]
    assert [(x.kind, x.pos) for x in report.lost] == [("damaged", rec["backpointer"]),
                                                      ("backpointer", rec["pos"])]
    with pytest.raises(POSKeyError):
        refstorage.FileStorage(str(dst), read_only=True).load(bytes.fromhex(rec["oid"]))


def test_inserted_garbage_is_skipped_and_the_rest_moved(src, template, tmp_path):
    lay = template[1]
    data = pathlib.Path(src).read_bytes()
    junk = b"junk \x00 p " * 20
    pos = lay[4]["pos"]
    pathlib.Path(src).write_bytes(data[:pos] + junk + data[pos:])
    report = recover(str(src), str(tmp_path / "New.rfs"))
    assert [(s.start, s.end) for s in report.skipped] == [(pos, pos + len(junk))]
    assert report.moved == [(pos + len(junk), len(junk))]
    assert not report.lost and report.verify.ok
    assert txns(tmp_path / "New.rfs") == template[2]


def test_damaged_file_header(src, template, tmp_path):
    flip_bit(src, 100)
    r = run("recover", src, tmp_path / "New.rfs")
    assert r.exit_code == 3 and "file header damaged" in r.output
    assert txns(tmp_path / "New.rfs") == template[2]


def test_golden_file(tmp_path):
    dst = tmp_path / "golden.rfs"
    report = recover(str(GOLDEN), str(dst))
    assert report.clean and report.verify.ok and report.transactions == 3
    got = txns(dst)
    want = txns(GOLDEN)
    assert got == want
    assert [t[1] for t in got] == ["p", " ", " "]


def test_destination_must_be_new(src, tmp_path):
    dst = tmp_path / "New.rfs"
    dst.write_bytes(b"x")
    r = run("recover", src, dst)
    assert r.exit_code == 1 and "exists" in r.output
    r = run("recover", src, src, "--force")
    assert r.exit_code == 1 and "damaged file itself" in r.output
    r = run("recover", src, dst, "--force")
    assert r.exit_code == 0, r.output


def test_unrecoverable_source_is_a_clean_error(tmp_path):
    r = run("recover", tmp_path / "missing.rfs", tmp_path / "New.rfs")
    assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output


def test_p64_helper_sanity():
    assert p64(1) == b"\0" * 7 + b"\1"


def test_nothing_salvageable_has_its_own_exit_status(tmp_path):
    path = tmp_path / "Junk.rfs"
    path.write_bytes(fmt.encode_file_header(bytes(16)) + b"junk, no transaction here " * 40)
    r = run("recover", path, tmp_path / "New.rfs", "--json")
    d = json.loads(r.output)
    assert r.exit_code == 5 and d["outcome"] == "nothing" and d["transactions"] == 0
    assert d["skipped"][0]["unknown"] == [{"start": 1024, "end": path.stat().st_size}]
    r = run("recover", path, tmp_path / "Again.rfs")
    assert r.exit_code == 5 and "result: nothing could be salvaged" in r.output


def test_exit_statuses_are_documented():
    r = run("recover", "--help")
    for line in ("0  clean copy", "3  repaired", "4  salvaged with losses", "5  nothing could be salvaged"):
        assert line in r.output


def test_bytes_inserted_inside_a_transaction_keep_its_records_under_its_tid(src, template, tmp_path):
    """Regression (found by fuzzing): the records after the insertion were split off into a
    second piece of the same transaction and written under a new tid."""
    lay = template[1]
    update = lay[2]
    at = update["records"][5]["pos"]
    data = pathlib.Path(src).read_bytes()
    pathlib.Path(src).write_bytes(data[:at] + bytes(range(7, 57)) + data[at:])
    report = recover(str(src), str(tmp_path / "New.rfs"))
    assert report.outcome == "losses" and not report.rebuilt
    assert all(x.oid is None or not x.oid_certain for x in report.lost)
    assert txns(tmp_path / "New.rfs") == template[2]


def test_lost_record_says_whether_it_was_the_newest_revision(tmp_path):
    """LostRecord.newest comes from the new file's index (recover holds no oid -> tid map)."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import z64

    path = tmp_path / "n.rfs"
    st = refstorage.FileStorage(str(path), create=True)
    serials = {}
    for rev in range(2):
        t = TransactionMetaData()
        st.tpc_begin(t)
        for i in (1, 2):
            st.store(p64(i), serials.get(i, z64), b"rev %d of %d " % (rev, i) * 20, "", t)
        st.tpc_vote(t)
        tid = st.tpc_finish(t)
        serials = {1: tid, 2: tid}
    st.close()
    recs = {(r["oid"], t["tid"]): r for t in layout(path) for r in t["records"]}
    first, second = sorted({tid for _oid, tid in recs})
    old1 = recs[(p64(1).hex(), first)]
    new2 = recs[(p64(2).hex(), second)]
    for rec in (old1, new2):
        flip_bit(path, rec["pos"] + rec["length"] - 10)
    report = recover(str(path), str(tmp_path / "out.rfs"))
    got = {(x.oid, x.newest) for x in report.lost}
    assert got == {(p64(1), False), (p64(2), True)}
