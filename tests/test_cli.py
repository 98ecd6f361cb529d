"""The `refstorage` command's inspection tools: dump, verify, info, tail, history, refs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import refstorage
from refstorage import fileformat as fmt
from refstorage.cli import main
from refstorage.index import OidIndex
from refstorage.indexfile import load_index, save_index
from refstorage.tools import common
from refstorage.tools.info import info
from refstorage.tools.verify import verify
from tools_db import GOLDEN, build_file, cut, flip_bit, layout, make_db, oid, truncate

T1, T2, T3 = (bytes.fromhex(h) for h in ("03e5a0d4d5555555", "03e5a0d4d6666666", "03e5a0d4d7777777"))
COMMANDS = ["dump", "verify", "info", "tail", "history", "refs", "recover", "backup", "restore"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def golden(tmp_path):
    path = tmp_path / "golden.rfs"
    shutil.copy(GOLDEN, path)
    return path


@pytest.fixture(scope="module")
def db_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "Data.rfs"
    make_db(path)
    return path


@pytest.fixture
def db(tmp_path, db_template):
    path = tmp_path / "Data.rfs"
    shutil.copy(db_template, path)
    shutil.copy(str(db_template) + ".index", str(path) + ".index")
    return path


# -- the command itself ---------------------------------------------------------------------

def test_python_m_refstorage_help_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "refstorage", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_help(name):
    r = run(name, "--help")
    assert r.exit_code == 0
    assert "Usage:" in r.output and "--json" in r.output


def test_missing_file_is_a_clean_error(tmp_path):
    for name in ("dump", "verify", "info", "tail"):
        r = run(name, tmp_path / "nope.rfs")
        assert r.exit_code == 1
        assert "Error:" in r.output and "Traceback" not in r.output
        assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)


def test_foreign_and_empty_files_are_clean_errors(tmp_path):
    fs = tmp_path / "Data.fs"
    fs.write_bytes(b"FS21" + b"\0" * 100)
    empty = tmp_path / "empty.rfs"
    empty.write_bytes(b"")
    for path in (fs, empty):
        for name in ("dump", "verify", "info"):
            r = run(name, path)
            assert r.exit_code == 1, r.output
            assert "Error:" in r.output
            assert isinstance(r.exception, SystemExit)
    assert "convert" in run("verify", fs).output


# -- oids, tids, times ----------------------------------------------------------------------

@pytest.mark.parametrize("text,n", [("0x1a", 26), ("1a", 26), ("000000000000001a", 26), ("26", 26),
                                    ("0", 0), ("0x00", 0), ("10", 10), ("0000000000000010", 16),
                                    ("FF", 255)])
def test_parse_oid(text, n):
    assert common.parse_oid(text) == oid(n)


@pytest.mark.parametrize("text", ["", "xyz", "-1", "0x" + "f" * 17])
def test_parse_oid_rejects(text):
    with pytest.raises(common.ToolError):
        common.parse_oid(text)


def test_parse_tid_and_time():
    assert common.parse_tid("03e5a0d4d5555555") == T1
    assert common.parse_tid("0x3e5a0d4d5555555") == T1
    t = common.parse_time("2022-01-20T04:04:50Z")
    assert t == common.parse_time("2022-01-20 04:04:50") == common.parse_time("2022-01-20T05:04:50+01:00")
    tid = common.parse_tid("2022-01-20T04:04:50.100")
    assert T1 < tid < T2
    assert common.oid_repr(oid(0)) == "0x00" and common.oid_repr(oid(26)) == "0x1a"
    with pytest.raises(common.ToolError):
        common.parse_time("yesterday")


def test_class_names_without_unpickling():
    import pickle

    from persistent.mapping import PersistentMapping

    from refstorage.tools.common import ClassNames, first_pickle_class
    for proto in (1, 2, 3, 4, 5):
        data = pickle.dumps(PersistentMapping, proto) + pickle.dumps({"a": 1}, proto)
        assert first_pickle_class(data)[0] == "persistent.mapping.PersistentMapping"
    names = ClassNames()
    assert names(b"ROOT") == ClassNames.NOT_A_PICKLE
    assert names(b"") == ClassNames.NOT_A_PICKLE
    data = pickle.dumps((PersistentMapping, None), 3) + pickle.dumps({}, 3)
    assert names(data) == names(data) == "persistent.mapping.PersistentMapping"


# -- the golden file -------------------------------------------------------------------------

def test_dump_golden_key_lines(golden):
    r = run("dump", golden)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "format version 1, file id 000102030405060708090a0b0c0d0e0f, pack tid 0000000000000000" in out
    assert ("transaction at 1024: tid 03e5a0d4d5555555 (2022-01-20 04:04:50.000Z) tlen 191 status 'p' "
            "user 'alice' description 'create' extension b'' nrec 2") in out
    assert ("record at 1072: oid 0x00 tid 03e5a0d4d5555555 prev 0 tpos 1024 flags 0x0 nrefs 1 refs [0x01] "
            "length 58 dlen 4 data b'ROOT'") in out
    assert "record at 1267: oid 0x01 tid 03e5a0d4d6666666 prev 1130 tpos 1223 flags 0x2 (REFS_UNKNOWN)" in out
    assert "refs [0x00 0x01]" in out and "extension b'EXT'" in out
    assert "record at 1472: oid 0x01" in out and "flags 0x1 (BACKPOINTER)" in out
    assert "backpointer 1130" in out and "backpointer 0" in out
    assert "oid table at 1580: 2 entries; trailer at 1616: tlen 188; next transaction at 1624" in out
    assert sum(line.startswith("transaction at ") for line in out.splitlines()) == 3


def test_dump_golden_classes_range_and_json(golden):
    r = run("dump", golden, "--classes")
    assert r.exit_code == 0
    assert "class (not a pickle)" in r.output and "class (no data: deleted)" in r.output
    r = run("dump", golden, "--from", "03e5a0d4d6666666", "--to", "03e5a0d4d6666666")
    assert r.exit_code == 0
    assert "transaction at 1223" in r.output
    starts = [line.split(":")[0] for line in r.output.splitlines() if line.startswith("transaction at")]
    assert starts == ["transaction at 1223"]
    r = run("dump", golden, "--json", "--from", "0x3e5a0d4d6666666")
    items = [json.loads(line) for line in r.output.splitlines()]
    assert [i["type"] for i in items] == ["header", "transaction", "transaction"]
    rec = items[1]["records"][0]
    assert rec["pos"] == 1267 and rec["flag_names"] == ["REFS_UNKNOWN"] and rec["data"] == b"ONE-v2".hex()
    assert items[2]["records"][1]["backpointer"] == 0


def test_verify_golden(golden):
    r = run("verify", golden)
    assert r.exit_code == 0, r.output
    assert "3 transactions, 6 records, 3 objects (1 deleted), 2 backpointers" in r.output
    assert "references unknown: 1 record (0 current" in r.output
    assert "OK: no problems found" in r.output
    r = run("verify", golden, "--json")
    d = json.loads(r.output)
    assert d["ok"] and d["refs_unknown"]["records"] == 1 and d["problems"] == []


def test_info_tail_history_refs_golden(golden):
    r = run("info", golden)
    assert r.exit_code == 0, r.output
    assert "transactions:  3" in r.output and "objects:       3 (1 deleted)" in r.output
    assert "03e5a0d4d5555555 (2022-01-20 04:04:50.000Z)" in r.output
    assert "(not a pickle)" in r.output and "(deleted)" in r.output
    d = json.loads(run("info", golden, "--json").output)
    assert d["size"] == 1624 and d["first"]["tid"] == T1.hex() and d["last"]["tid"] == T3.hex()
    assert d["current_bytes"] + d["history_bytes"] + d["overhead_bytes"] == 1624
    r = run("tail", golden, "-n", "2")
    lines = r.output.splitlines()
    assert len(lines) == 2 and lines[0].startswith(T3.hex()) and "user 'bob'" in lines[0]
    assert "description 'edit'" in lines[1] and "2 records" in lines[1]
    for form in ("1", "0x01", "0000000000000001", "0x1"):
        r = run("history", golden, form)
        assert r.exit_code == 0, r.output
        assert "oid 0x01: 3 revisions" in r.output
        assert "backpointer to 1130 (the data of tid 03e5a0d4d5555555" in r.output
    h = json.loads(run("history", golden, "2", "--json").output)
    assert [x["kind"] for x in h] == ["no data (deleted, or its creation undone)", "data"]
    r = run("refs", golden, "1")
    assert r.exit_code == 0, r.output
    assert "referenced by (1 current object)" in r.output and "0x00 (record at 1072)" in r.output
    r = run("refs", golden, "0")
    assert "0x01 current" in r.output


def test_history_of_a_missing_oid_is_a_clean_error(golden):
    r = run("history", golden, "0x99")
    assert r.exit_code == 1 and "oid 0x99 has no record" in r.output
    r = run("history", golden, "zz")
    assert r.exit_code == 2 and "not an oid" in r.output


# -- a real database -------------------------------------------------------------------------

def test_verify_a_real_database(db):
    r = run("verify", db)
    assert r.exit_code == 0, r.output
    assert "index file: checked" in r.output
    d = json.loads(run("verify", db, "--json").output)
    assert d["ok"] and d["backpointers"] >= 2 and d["deleted"] >= 1 and d["transactions"] == 8


def test_info_pack_forecast_equals_the_real_pack(db):
    time.sleep(0.01)
    t = time.time()
    refstorage.FileStorage(str(db)).close()
    forecast = info(str(db), pack_time=t).pack
    assert forecast is not None and not forecast.reason
    storage = refstorage.FileStorage(str(db))
    try:
        storage.pack(t)
        report = storage.last_pack_report
    finally:
        storage.close()
    assert report.packed
    assert forecast.bytes_freed == report.bytes_freed > 0
    assert forecast.revisions_removed == report.revisions_removed
    assert forecast.transactions_removed == report.transactions_removed
    assert forecast.objects_removed == report.objects_removed
    assert run("verify", db).exit_code == 0
    again = info(str(db), pack_time=t).pack
    assert again.reason and again.bytes_freed == 0
    r = run("info", db, "--days", "0")
    assert r.exit_code == 0 and "pack to " in r.output


def test_info_classes_of_a_real_database(db):
    d = json.loads(run("info", db, "--json").output)
    assert "persistent.mapping.PersistentMapping" in d["classes"]
    assert "BTrees.OOBTree.OOBucket" in d["classes"] or "BTrees.OOBTree.OOBTree" in d["classes"]
    assert d["history_bytes"] > 0 and d["current_bytes"] > 0
    assert d["objects"] > 100


def test_refs_tail_and_dump_on_a_real_database(db):
    r = run("refs", db, "0")
    assert r.exit_code == 0, r.output
    assert "class persistent.mapping.PersistentMapping" in r.output
    assert "references (2):" in r.output and "0x01 current BTrees.OOBTree.OOBTree" in r.output
    assert len(run("tail", db, "-n", "3").output.splitlines()) == 3
    tails = json.loads(run("tail", db, "--json", "-n", "100").output)
    assert len(tails) == 8 and tails[-2]["description"] == "fill" and tails[-2]["user"].endswith("alice")
    r = run("dump", db, "--classes")
    assert r.exit_code == 0 and "class BTrees.OOBTree" in r.output


# -- damage -----------------------------------------------------------------------------------

def test_flipped_bit_in_a_record(db):
    txns = layout(db)
    rec = txns[2]["records"][0]
    flip_bit(db, rec["pos"] + rec["length"] - 10)  # in its data: only the checksum notices
    r = run("verify", db)
    assert r.exit_code == 1
    assert f"PROBLEM damage at offset {txns[2]['pos']}" in r.output
    assert f"data record checksum mismatch (oid {rec['oid']})" in r.output
    assert f"the next valid transaction starts at {txns[3]['pos']}" in r.output
    r = run("dump", db)
    assert r.exit_code == 1 and f"DAMAGE: bytes [{txns[2]['pos']}, {txns[3]['pos']})" in r.output
    assert f"transaction at {txns[3]['pos']}" in r.output  # resynchronised after it


def test_flipped_bit_in_a_transaction_header(db):
    txns = layout(db)
    flip_bit(db, txns[1]["pos"] + 3)  # in the tid: header checksum
    d = json.loads(run("verify", db, "--json").output)
    assert not d["ok"]
    damage = [p for p in d["problems"] if p["kind"] == "damage"]
    assert damage and damage[0]["offset"] == txns[1]["pos"]
    assert "header checksum mismatch" in damage[0]["message"]
    assert f"starts at {txns[2]['pos']}" in damage[0]["message"]


def test_truncated_tail(db):
    txns = layout(db)
    truncate(db, txns[-1]["pos"] + 30)  # the index file still covers the lost transaction
    r = run("verify", db)
    assert r.exit_code == 1
    assert f"PROBLEM torn-tail at offset {txns[-1]['pos']}" in r.output
    assert "index" in r.output
    r = run("tail", db, "-n", "1")
    assert r.exit_code == 0 and r.output.startswith(txns[-2]["tid"])


def test_cut_in_the_middle(db):
    txns = layout(db)
    cut(db, txns[1]["pos"] + 100, txns[2]["pos"] + 50)
    gap = txns[2]["pos"] + 50 - (txns[1]["pos"] + 100)
    d = json.loads(run("verify", db, "--json").output)
    assert d["problem_counts"]["damage"] == d["problem_counts"]["moved"] == 1, d["problems"]
    # objects created in the lost part are referenced, and the index file no longer matches
    assert set(d["problem_counts"]) == {"damage", "moved", "dangling", "index"}
    (damage,) = [p for p in d["problems"] if p["kind"] == "damage"]
    (moved,) = [p for p in d["problems"] if p["kind"] == "moved"]
    # the rest of txn 1 and the start of txn 2 are gone; txn 3 and later are intact but moved
    assert damage["offset"] == txns[1]["pos"] and f"starts at {txns[3]['pos'] - gap}" in damage["message"]
    assert moved["offset"] == txns[3]["pos"] - gap and f"{gap} bytes are missing" in moved["message"]
    assert d["transactions"] == len(txns) - 2
    r = run("dump", db)
    assert r.exit_code == 1 and f"(MOVED: written at {txns[3]['pos']})" in r.output


def test_damaged_file_header(golden):
    flip_bit(golden, 20)  # in the file id
    r = run("verify", golden)
    assert r.exit_code == 1 and "PROBLEM header at offset 1020: file header checksum mismatch" in r.output
    assert "3 transactions" in r.output
    assert run("info", golden).exit_code == 1


def test_prev_backpointer_and_dangling_problems(tmp_path):
    path = tmp_path / "bad.rfs"
    tids = [fmt.p64(0x03E5A0D4D5555555 + i) for i in range(4)]

    def spec(prev_of_1=None, back_of_3=0):
        return [
            (tids[0], [(oid(0), b"root", [oid(1), oid(2)], 0, None), (oid(1), b"one", [], 0, None),
                       (oid(2), b"two", [], 0, None)]),
            (tids[1], [(oid(1), b"one-2", [oid(9)], 0, None), (oid(2), None, [], 0, None)]),
            # oid 1's prev skips its revision in txn 1; oid 3's backpointer points at oid 2's record
            (tids[2], [(oid(1), b"one-3", [], 0, prev_of_1), (oid(3), None, [], back_of_3, None)]),
        ]

    pos = build_file(path, spec())
    pos = build_file(path, spec(prev_of_1=pos[1], back_of_3=pos[2]))
    d = verify(str(path)).to_json()
    assert not d["ok"]
    by_kind = {}
    for p in d["problems"]:
        by_kind.setdefault(p["kind"], []).append(p)
    assert set(by_kind) == {"prev", "backpointer", "dangling"}
    assert "is not the oid's previous record" in by_kind["prev"][0]["message"]
    assert by_kind["prev"][0]["offset"] == pos[5]
    assert "does not lead to a record of this oid" in by_kind["backpointer"][0]["message"]
    dangling = sorted(p["message"] for p in by_kind["dangling"])
    assert any("references oid 0x02, which is deleted" in m for m in dangling)
    r = run("refs", path, "2")
    assert r.exit_code == 1 and "DELETED" in r.output and "0x00 (record at" in r.output
    r = run("refs", path, "9")  # a missing oid is a problem, as for history (it used to exit 0)
    assert r.exit_code == 1 and "MISSING" in r.output


def test_dangling_reference_to_a_missing_oid(tmp_path):
    path = tmp_path / "dangling.rfs"
    tid = fmt.p64(0x03E5A0D4D5555555)
    (p,) = build_file(path, [(tid, [(oid(0), b"root", [oid(7)], 0, None)])])
    r = run("verify", path)
    assert r.exit_code == 1
    assert f"PROBLEM dangling at offset {p}: oid 0x00 (record at {p}) references oid 0x07, which does " \
           "not exist" in r.output
    r = run("refs", path, "7")
    assert r.exit_code == 1 and "MISSING" in r.output and f"0x00 (record at {p})" in r.output


def test_index_file_problems(db):
    ipath = str(db) + ".index"
    index, file_id, pos, tid = load_index(ipath)
    bad = OidIndex(index.items())
    bad[oid(0)] = bad[oid(0)] + 1
    save_index(ipath, bad, file_id=file_id, pos=pos, tid=tid)
    r = run("verify", db)
    assert r.exit_code == 1 and "PROBLEM index" in r.output
    assert "differs from the index a scan builds" in r.output
    save_index(ipath, index, file_id=b"x" * 16, pos=pos, tid=tid)
    r = run("verify", db)
    assert r.exit_code == 1 and "belongs to another data file" in r.output
    with open(ipath, "r+b") as f:
        f.seek(30)
        f.write(b"\xff")
    r = run("verify", db)
    assert r.exit_code == 1 and "PROBLEM index" in r.output


def test_info_pack_forecast_with_unreadable_references_equals_the_pack(tmp_path):
    """A current record whose references are not stored and whose data is no pickle:
    info forecasts what pack does (keep every object, drop old revisions)."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64

    path = str(tmp_path / "Data.rfs")
    storage = refstorage.FileStorage(path)
    for value in (b"one", b"two"):
        t = TransactionMetaData()
        storage.tpc_begin(t)
        for n in (0, 1):  # not pickles: stored with references unknown
            serial = storage.getTid(p64(n)) if value == b"two" else b"\0" * 8
            storage.store(p64(n), serial, b"not a pickle " + value, "", t)
        storage.tpc_vote(t)
        storage.tpc_finish(t)
    storage.close()
    time.sleep(0.01)
    t = time.time()
    forecast = info(path, pack_time=t).pack
    assert forecast.refs_unreadable and not forecast.reason
    storage = refstorage.FileStorage(path)
    storage.pack(t)
    report = storage.last_pack_report
    storage.close()
    assert report.packed and report.gc_skipped
    assert (forecast.bytes_freed, forecast.revisions_removed, forecast.objects_removed) == (
        report.bytes_freed, report.revisions_removed, report.objects_removed)
    assert report.objects_removed == 0 and report.revisions_removed == 2


@pytest.mark.parametrize("kind", ["refstorage", "file", "zconfig"])
def test_convert_never_creates_a_mistyped_source(tmp_path, kind):
    """Found by an outside review: a mistyped source URI or ZConfig path made convert
    create an empty database there (and an empty destination) and exit 0."""
    if kind == "refstorage":
        spec = f"refstorage://{tmp_path}/typo.rfs"
    elif kind == "file":
        spec = f"file://{tmp_path}/typo.fs"
    else:
        spec = str(tmp_path / "source.conf")
        with open(spec, "w") as f:
            f.write(f"<filestorage>\n  path {tmp_path}/typo.fs\n</filestorage>\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run("convert", spec, tmp_path / "out.rfs")
    assert r.exit_code == 1 and "typo" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_convert_refusals_leave_the_destination_alone(db, tmp_path):
    """Found by an outside review: a refused convert into a non-empty destination still
    wrote that destination's index and lock files; a destination without restore
    (memory://) ended in an internal error."""
    import shutil as _shutil

    dst = tmp_path / "Existing.rfs"
    _shutil.copy(db, dst)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run("convert", db, dst)
    assert r.exit_code == 1 and "is not empty" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    r = run("convert", db, "memory://")
    assert r.exit_code == 1 and "cannot be a convert destination" in r.output, r.output
    assert "unexpected" not in r.output
