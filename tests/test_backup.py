"""`refstorage backup` and `refstorage restore`: full and incremental backups of a live file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import pytest
import transaction
from click.testing import CliRunner
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, z64

import refstorage
from refstorage.cli import main
from refstorage.tools.backup import MANIFEST, backup, load_manifest, restore
from refstorage.tools.common import ToolError
from tools_db import add_txns, flip_bit, layout, loads, make_db, truncate, txns


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "Data.rfs"
    make_db(path)
    return path


def same_database(a, b) -> None:
    assert txns(a) == txns(b)
    assert loads(a) == loads(b)


def test_full_then_incremental_then_restore(db, tmp_path):
    bdir = tmp_path / "backups"
    r = run("backup", db, bdir)
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"full backup of {db}: bytes [0, {os.path.getsize(db)})")
    add_txns(db, 3)
    r = run("backup", db, bdir, "--json")
    d = json.loads(r.output)
    assert d["kind"] == "incremental" and d["transactions"] == 3 and d["end"] == os.path.getsize(db)
    r = run("backup", db, bdir)
    assert r.exit_code == 0 and "no new transactions since the last backup; nothing written" in r.output
    manifest = load_manifest(str(bdir))
    (chain,) = manifest["chains"]
    assert [p["kind"] for p in chain["pieces"]] == ["full", "incremental"]
    for p in chain["pieces"]:
        assert hashlib.sha256((bdir / p["file"]).read_bytes()).hexdigest() == p["sha256"]
    assert chain["pieces"][1]["start"] == chain["pieces"][0]["end"]
    dest = tmp_path / "Restored.rfs"
    r = run("restore", bdir, dest)
    assert r.exit_code == 0, r.output
    assert "from 2 backup pieces" in r.output
    assert dest.read_bytes() == db.read_bytes()
    same_database(db, dest)
    assert run("verify", dest).exit_code == 0


def test_restore_as_of_a_tid_or_a_time(db, tmp_path):
    bdir = tmp_path / "backups"
    backup(str(db), str(bdir))
    add_txns(db, 2, "first")
    backup(str(db), str(bdir))
    time.sleep(0.05)
    middle = time.time()
    time.sleep(0.05)
    add_txns(db, 2, "second")
    backup(str(db), str(bdir))
    all_txns = txns(db)
    # as of a tid in the middle of the second piece
    cut_tid = all_txns[-3][0]
    dest = tmp_path / "AtTid.rfs"
    r = run("restore", bdir, dest, "--tid", cut_tid.hex(), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["last_tid"] == cut_tid.hex() and len(d["pieces"]) == 2
    assert txns(dest) == all_txns[:-2]
    assert run("verify", dest).exit_code == 0
    # as of a time between the second and the third backups
    dest = tmp_path / "AtTime.rfs"
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(middle)) + f".{int(middle % 1 * 1e6):06d}Z"
    r = run("restore", bdir, dest, "--time", iso)
    assert r.exit_code == 0, r.output
    assert txns(dest) == all_txns[:-2]
    # before the first transaction: nothing to restore
    r = run("restore", bdir, tmp_path / "Never.rfs", "--time", "2001-01-01")
    assert r.exit_code == 1 and "no backup holds the state" in r.output
    assert not (tmp_path / "Never.rfs").exists()


def test_pack_forces_a_full_backup_and_old_states_stay_restorable(db, tmp_path):
    bdir = tmp_path / "backups"
    backup(str(db), str(bdir))
    add_txns(db, 2)
    backup(str(db), str(bdir))
    before_pack = txns(db)
    st = refstorage.FileStorage(str(db))
    try:
        st.pack(time.time())
        assert st.last_pack_report.packed
    finally:
        st.close()
    add_txns(db, 1, "after")
    r = run("backup", db, bdir)
    assert r.exit_code == 0 and "full because the file id changed" in r.output
    manifest = load_manifest(str(bdir))
    assert len(manifest["chains"]) == 2
    latest = tmp_path / "Latest.rfs"
    assert run("restore", bdir, latest).exit_code == 0
    same_database(db, latest)
    # a state before the pack time comes from the first chain, with its whole history
    old = tmp_path / "Old.rfs"
    r = run("restore", bdir, old, "--tid", before_pack[-2][0].hex())
    assert r.exit_code == 0, r.output
    assert txns(old) == before_pack[:-1]


def test_replaced_file_with_the_same_id_forces_a_full_backup(db, tmp_path):
    bdir = tmp_path / "backups"
    lay = layout(db)
    backup(str(db), str(bdir))
    truncate(db, lay[-2]["pos"])  # drop the last two transactions, write others
    os.remove(str(db) + ".index")
    add_txns(db, 3)
    report = backup(str(db), str(bdir))
    assert report.kind == "full" and "changed" in report.reason
    dest = tmp_path / "R.rfs"
    restore(str(bdir), str(dest))
    same_database(db, dest)


def test_a_commit_in_progress_is_left_out(db, tmp_path):
    bdir = tmp_path / "backups"
    st = refstorage.FileStorage(str(db))
    try:
        backup(str(db), str(bdir))
        t = TransactionMetaData(b"me", b"in progress")
        st.tpc_begin(t)
        st.store(st.new_oid(), z64, b"some data that is not a pickle", "", t)
        st.tpc_vote(t)  # appended with status 'c'
        r = run("backup", db, bdir)
        assert r.exit_code == 0
        assert "nothing written" in r.output and "note: an unfinished transaction" in r.output
        tid = st.tpc_finish(t)
    finally:
        st.close()
    report = backup(str(db), str(bdir))
    assert report.kind == "incremental" and report.transactions == 1 and report.last_tid == tid
    dest = tmp_path / "R.rfs"
    restore(str(bdir), str(dest))
    same_database(db, dest)


def test_live_storage_committing_during_backups(db, tmp_path):
    import ZODB
    bdir = tmp_path / "backups"
    conn_db = ZODB.DB(refstorage.FileStorage(str(db)))
    try:
        conn = conn_db.open()
        root = conn.root()
        for i in range(5):
            root["ints"][10_000 + i] = "x"
            transaction.commit()
            backup(str(db), str(bdir))
        conn.close()
    finally:
        conn_db.close()
    backup(str(db), str(bdir))
    dest = tmp_path / "R.rfs"
    restore(str(bdir), str(dest))
    same_database(db, dest)


def test_damaged_piece_is_refused(db, tmp_path):
    bdir = tmp_path / "backups"
    backup(str(db), str(bdir))
    add_txns(db, 1)
    backup(str(db), str(bdir))
    piece = bdir / load_manifest(str(bdir))["chains"][0]["pieces"][0]["file"]
    flip_bit(piece, 5000)
    dest = tmp_path / "R.rfs"
    r = run("restore", bdir, dest)
    assert r.exit_code == 1 and "sha256 mismatch" in r.output
    assert not dest.exists()
    os.remove(piece)
    r = run("restore", bdir, dest)
    assert r.exit_code == 1 and "Error:" in r.output and not dest.exists()


def test_damaged_source_is_refused(db, tmp_path):
    lay = layout(db)
    flip_bit(db, lay[2]["pos"] + 1)
    r = run("backup", db, tmp_path / "b")
    assert r.exit_code == 1 and "damaged at offset" in r.output
    assert load_manifest(str(tmp_path / "b")) is None


def test_restore_arguments(db, tmp_path):
    bdir = tmp_path / "backups"
    backup(str(db), str(bdir))
    dest = tmp_path / "R.rfs"
    dest.write_bytes(b"x")
    r = run("restore", bdir, dest)
    assert r.exit_code == 1 and "exists" in r.output
    assert run("restore", bdir, dest, "--force").exit_code == 0
    same_database(db, dest)
    r = run("restore", bdir, dest, "--force", "--tid", p64(1).hex(), "--time", "2020-01-01")
    assert r.exit_code == 2
    (tmp_path / "empty").mkdir()
    r = run("restore", tmp_path / "empty", tmp_path / "X.rfs")
    assert r.exit_code == 1 and MANIFEST in r.output
    (bdir / MANIFEST).write_text("{not json")
    with pytest.raises(ToolError):
        restore(str(bdir), str(tmp_path / "Y.rfs"))
    (bdir / MANIFEST).write_text('{"format": "refstorage-backup", "version": 1, "chains": [{"pieces": 3}]}')
    r = run("restore", bdir, tmp_path / "Y.rfs")
    assert r.exit_code == 1 and "damaged backup manifest" in r.output
    r = run("backup", db, bdir)
    assert r.exit_code == 1 and "damaged backup manifest" in r.output


def test_empty_database(tmp_path):
    path = tmp_path / "Empty.rfs"
    refstorage.FileStorage(str(path), create=True).close()
    bdir = tmp_path / "b"
    report = backup(str(path), str(bdir))
    assert report.kind == "full" and report.end == 1024 and report.transactions == 0
    assert backup(str(path), str(bdir)).kind == "none"
    add_txns_db = tmp_path / "copy.rfs"
    shutil.copy(path, add_txns_db)
    dest = tmp_path / "R.rfs"
    restore(str(bdir), str(dest))
    assert dest.read_bytes() == path.read_bytes()
