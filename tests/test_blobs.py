"""Blobs: ZODB's generic blob suites against refstorage, and our own checks.

ZODB ships its blob conformance tests as doctest/unittest *suites*
(``ZODB.tests.testblob.storage_reusable_suite`` and
``ZODB.tests.PackableStorage.IExternalGC_suite``).  pytest does not collect a
suite returned by a function, so each case of the suite becomes one
parametrized pytest test here, run inside the suite's layer (a temporary
working directory, and time that increases monotonically per test) the way
zope.testrunner would.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import unittest

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.interfaces import IBlobStorage, IBlobStorageRestoreable
from ZODB.POSException import POSKeyError, UndoError, Unsupported
from ZODB.tests.hexstorage import HexStorage
from ZODB.tests.PackableStorage import IExternalGC_suite
from ZODB.tests.testblob import storage_reusable_suite
from ZODB.utils import p64, u64, z64

import refstorage
from refstorage.blobs import pack_blobs
from refstorage.copying import copy_transactions
from refstorage.errors import BlobDirectoryError, RefStorageError

# -- ZODB's generic suites -------------------------------------------------------------


def _refstorage(name, blob_dir):
    return refstorage.FileStorage(name + ".rfs", blob_dir=blob_dir)


def _hex_refstorage(name, blob_dir):
    return HexStorage(refstorage.FileStorage(name + ".rfs", blob_dir=blob_dir))


def _flatten(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _flatten(test)
        else:
            yield test


# As root every file is writable, so the one example that checks that a
# committed blob file cannot be opened for writing would fail (and truncate
# the file, failing a later example).  As root, check the file's mode instead.
_ROOT_ADAPTED_SOURCE = "open(blob.committed(), 'w')"
_ROOT_CHECK = ("if not __import__('os').stat(blob.committed()).st_mode & 0o222:\n"
               "    print('Error raised.')\n")


def _adapt_for_root(test) -> None:
    if os.geteuid() != 0:
        return
    dt = getattr(test, "_dt_test", None)
    for example in getattr(dt, "examples", ()):
        if _ROOT_ADAPTED_SOURCE in example.source:
            example.source = _ROOT_CHECK


def _cases(prefix, suite):
    cases = []
    for test in _flatten(suite):
        _adapt_for_root(test)
        cases.append(pytest.param(suite.layer if hasattr(suite, "layer") else None, test,
                                  id=f"{prefix}-{test.id().rsplit('.', 1)[-1]}"))
    return cases


_SUITE_CASES = (
    _cases("refstorage", storage_reusable_suite(
        "RefStorage", _refstorage, test_blob_storage_recovery=True, test_packing=True))
    + _cases("hex", storage_reusable_suite(
        "RefStorageHex", _hex_refstorage, test_blob_storage_recovery=True, test_packing=True))
    + _cases("externalgc", IExternalGC_suite(
        lambda: refstorage.FileStorage("data.rfs", blob_dir="blobs", pack_gc=False)))
)


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("layer", "case"), _SUITE_CASES)
def test_zodb_blob_suite(in_tmp_dir, layer, case):
    result = unittest.TestResult()
    if layer is None:
        case(result)
    else:
        layer.testSetUp()
        try:
            case(result)
        finally:
            layer.testTearDown()
    problems = result.errors + result.failures
    assert not problems, "\n".join(traceback for _test, traceback in problems)
    assert not result.skipped, result.skipped


# -- our own ---------------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path):
    return str(tmp_path / "Data.rfs"), str(tmp_path / "blobs")


def _read(blob: Blob) -> bytes:
    with blob.open("r") as f:
        return f.read()


def _files(blob_dir: str) -> list[str]:
    found = []
    for path, dirs, files in os.walk(blob_dir):
        if path == blob_dir and "tmp" in dirs:
            dirs.remove("tmp")
        found.extend(os.path.relpath(os.path.join(path, f), blob_dir) for f in files if f.endswith(".blob"))
    return sorted(found)


def test_interfaces_only_with_blob_dir(paths):
    path, blob_dir = paths
    st = refstorage.FileStorage(path)
    try:
        assert st.blob_dir is None
        assert not IBlobStorage.providedBy(st)
        with pytest.raises(Unsupported):
            st.loadBlob(z64, z64)
        with pytest.raises(Unsupported):
            st.temporaryDirectory()
    finally:
        st.close()
    st = refstorage.FileStorage(path, blob_dir=blob_dir)
    try:
        assert st.blob_dir == os.path.abspath(blob_dir)
        assert IBlobStorage.providedBy(st)
        assert IBlobStorageRestoreable.providedBy(st)
        assert st.temporaryDirectory() == os.path.join(os.path.abspath(blob_dir), "tmp")
        assert os.path.isdir(st.temporaryDirectory())
    finally:
        st.close()
    # the class itself does not claim blobs
    assert not IBlobStorage.implementedBy(refstorage.FileStorage)


def test_blob_dir_that_is_a_file_is_refused(paths, tmp_path):
    path, _ = paths
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"x")
    with pytest.raises(BlobDirectoryError) as info:
        refstorage.FileStorage(path, blob_dir=str(not_a_dir))
    assert isinstance(info.value, RefStorageError)
    assert str(not_a_dir) in str(info.value)
    # the data file was closed and unlocked again: a read-write open works
    refstorage.FileStorage(path).close()


def test_blob_survives_reopen(paths):
    path, blob_dir = paths
    db = ZODB.DB(refstorage.FileStorage(path, blob_dir=blob_dir))
    with db.transaction() as conn:
        conn.root()["b"] = Blob(b"first")
    with db.transaction() as conn:
        with conn.root()["b"].open("w") as f:
            f.write(b"second")
    db.close()

    st = refstorage.FileStorage(path, blob_dir=blob_dir)
    db = ZODB.DB(st)
    try:
        with db.transaction() as conn:
            blob = conn.root()["b"]
            assert _read(blob) == b"second"
            history = st.history(blob._p_oid, size=10)
            assert len(history) == 2
            older = history[1]["tid"]
            with open(st.loadBlob(blob._p_oid, older), "rb") as f:
                assert f.read() == b"first"
            committed = st.loadBlob(blob._p_oid, blob._p_serial)
            assert not os.stat(committed).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    finally:
        db.close()


def test_read_only_open_serves_blobs(paths):
    path, blob_dir = paths
    db = ZODB.DB(refstorage.FileStorage(path, blob_dir=blob_dir))
    with db.transaction() as conn:
        conn.root()["b"] = Blob(b"data")
    db.close()
    db = ZODB.DB(refstorage.FileStorage(path, blob_dir=blob_dir, read_only=True))
    try:
        with db.transaction() as conn:
            assert _read(conn.root()["b"]) == b"data"
    finally:
        db.close()


def test_undo_of_a_blob_change_restores_the_old_blob(paths):
    path, blob_dir = paths
    st = refstorage.FileStorage(path, blob_dir=blob_dir)
    db = ZODB.DB(st)
    with db.transaction() as conn:
        conn.root()["b"] = Blob(b"old")
    with db.transaction() as conn:
        with conn.root()["b"].open("w") as f:
            f.write(b"new")
    db.undo(db.undoLog(0, 1)[0]["id"])
    transaction.commit()
    with db.transaction() as conn:
        blob = conn.root()["b"]
        assert _read(blob) == b"old"
        oid, serial = blob._p_oid, blob._p_serial
    db.close()
    # the undo transaction has its own blob file, still there after a reopen
    st = refstorage.FileStorage(path, blob_dir=blob_dir, read_only=True)
    try:
        assert st.load(oid)[1] == serial
        with st.openCommittedBlobFile(oid, serial) as f:
            assert f.read() == b"old"
    finally:
        st.close()


def test_abort_removes_the_transactions_blob_files(paths, tmp_path):
    path, blob_dir = paths
    ZODB.DB(refstorage.FileStorage(path, blob_dir=blob_dir)).close()  # creates the root
    st = refstorage.FileStorage(path, blob_dir=blob_dir)
    try:
        oid = st.new_oid()
        upload = tmp_path / "upload"
        upload.write_bytes(b"gone soon")
        t = TransactionMetaData()
        st.tpc_begin(t)
        st.storeBlob(oid, z64, b"not really a pickle", str(upload), "", t)
        st.tpc_vote(t)
        target = st.fshelper.getBlobFilename(oid, st._pending.tid)
        assert os.path.exists(target) and not upload.exists()
        st.tpc_abort(t)
        assert not os.path.exists(target)
        with pytest.raises(POSKeyError):
            st.load(oid)
    finally:
        st.close()


def test_create_starts_an_empty_blob_dir(paths):
    path, blob_dir = paths
    db = ZODB.DB(refstorage.FileStorage(path, blob_dir=blob_dir))
    with db.transaction() as conn:
        conn.root()["b"] = Blob(b"data")
    db.close()
    assert _files(blob_dir)
    st = refstorage.FileStorage(path, blob_dir=blob_dir, create=True)
    st.close()
    assert _files(blob_dir) == []


def _make_blob_history(db) -> dict[str, bytes]:
    with db.transaction() as conn:
        conn.root()["a"] = Blob(b"a1")
        conn.root()["b"] = Blob(b"b1")
    with db.transaction() as conn:
        with conn.root()["a"].open("w") as f:
            f.write(b"a2")
    db.undo(db.undoLog(0, 1)[0]["id"])  # back to a1, through a backpointer
    transaction.commit()
    with db.transaction() as conn:
        conn.root()["c"] = Blob(b"c1" * 50_000)
    return {"a": b"a1", "b": b"b1", "c": b"c1" * 50_000}


def _check_all_revisions(storage) -> int:
    """Every blob record of every transaction has its file, with the same bytes."""
    count = 0
    for txn in storage.iterator():
        for rec in txn:
            if rec.data and storage.is_blob_record(rec.data):
                with open(storage.loadBlob(rec.oid, rec.tid), "rb") as f:
                    f.read()
                count += 1
    return count


def test_convert_to_zodb_filestorage_and_back_keeps_blobs(tmp_path):
    src = refstorage.FileStorage(str(tmp_path / "a.rfs"), blob_dir=str(tmp_path / "a-blobs"))
    db = ZODB.DB(src)
    expected = _make_blob_history(db)
    db.close()

    src = refstorage.FileStorage(str(tmp_path / "a.rfs"), blob_dir=str(tmp_path / "a-blobs"), read_only=True)
    zfs = ZODB.FileStorage.FileStorage(str(tmp_path / "b.fs"), blob_dir=str(tmp_path / "b-blobs"))
    report = copy_transactions(src, zfs)
    assert report.transactions == 5
    zfs.close()

    zfs = ZODB.FileStorage.FileStorage(str(tmp_path / "b.fs"), blob_dir=str(tmp_path / "b-blobs"),
                                       read_only=True)
    back = refstorage.FileStorage(str(tmp_path / "c.rfs"), blob_dir=str(tmp_path / "c-blobs"))
    back.copyTransactionsFrom(zfs)
    n_src = _check_all_revisions(src)
    assert _check_all_revisions(zfs) == n_src == _check_all_revisions(back) == 5
    assert _files(str(tmp_path / "a-blobs")) == _files(str(tmp_path / "c-blobs"))
    zfs.close()
    src.close()

    db = ZODB.DB(back)
    try:
        with db.transaction() as conn:
            assert {k: _read(conn.root()[k]) for k in expected} == expected
        assert len(db.undoLog(0, 10)) == 5
    finally:
        db.close()


def _write_conf(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_cli_convert_with_blobs_through_uri_and_zconfig(tmp_path):
    db = ZODB.DB(refstorage.FileStorage(str(tmp_path / "a.rfs"), blob_dir=str(tmp_path / "a-blobs")))
    expected = _make_blob_history(db)
    db.close()
    zconf = _write_conf(tmp_path / "fs.conf", f"""
        <filestorage>
          path {tmp_path / 'b.fs'}
          blob-dir {tmp_path / 'b-blobs'}
        </filestorage>
        """)
    src_uri = f"refstorage://{tmp_path / 'a.rfs'}?blob_dir={tmp_path / 'a-blobs'}&read_only=true"
    cmd = [sys.executable, "-m", "refstorage", "convert", src_uri, zconf]
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "copied 5 transactions" in done.stdout

    zfs = ZODB.FileStorage.FileStorage(str(tmp_path / "b.fs"), blob_dir=str(tmp_path / "b-blobs"))
    db = ZODB.DB(zfs)
    try:
        with db.transaction() as conn:
            assert {k: _read(conn.root()[k]) for k in expected} == expected
    finally:
        db.close()


def test_pack_removes_blob_files_of_dropped_revisions(paths):
    path, blob_dir = paths
    st = refstorage.FileStorage(path, blob_dir=blob_dir, pack_keep_old=False)
    db = ZODB.DB(st)
    try:
        with db.transaction() as conn:
            conn.root()["keep"] = Blob(b"v1")
            conn.root()["drop"] = Blob(b"x")
        with db.transaction() as conn:
            with conn.root()["keep"].open("w") as f:
                f.write(b"v2")
            del conn.root()["drop"]
        assert len(_files(blob_dir)) == 3
        time.sleep(0.01)
        db.pack(time.time())
        remaining = _files(blob_dir)
        assert len(remaining) == 1
        with db.transaction() as conn:
            assert _read(conn.root()["keep"]) == b"v2"
        assert not os.path.exists(blob_dir + ".old")
    finally:
        db.close()


def test_pack_blobs_keeps_old_blob_dir(paths, tmp_path):
    path, blob_dir = paths
    st = refstorage.FileStorage(path, blob_dir=blob_dir)
    db = ZODB.DB(st)
    try:
        with db.transaction() as conn:
            conn.root()["b"] = Blob(b"v1")
        with db.transaction() as conn:
            with conn.root()["b"].open("w") as f:
                f.write(b"v2")
            oid = conn.root()["b"]._p_oid
        first, second = [h["tid"] for h in reversed(st.history(oid, size=2))]
        before = _files(blob_dir)
        # a pack that dropped the first revision of b (named explicitly)
        assert pack_blobs(st, [(oid, first)], keep_old=True) == 1
        assert not os.path.exists(st.fshelper.getBlobFilename(oid, first))
        assert os.path.exists(st.fshelper.getBlobFilename(oid, second))
        assert _files(blob_dir + ".old") == before  # removed ones moved, the rest linked
        # the sweep finds nothing more to remove: both revisions are still in the log
        assert pack_blobs(st, keep_old=False) == 0
        assert not os.path.exists(blob_dir + ".old")
    finally:
        db.close()


def test_copy_to_a_storage_without_blobs_warns(tmp_path, caplog):
    db = ZODB.DB(refstorage.FileStorage(str(tmp_path / "a.rfs"), blob_dir=str(tmp_path / "a-blobs")))
    with db.transaction() as conn:
        conn.root()["b"] = Blob(b"data")
    db.close()
    src = refstorage.FileStorage(str(tmp_path / "a.rfs"), blob_dir=str(tmp_path / "a-blobs"), read_only=True)
    dest = refstorage.FileStorage(str(tmp_path / "b.rfs"))
    try:
        with caplog.at_level("WARNING", logger="refstorage.blobs"):
            report = copy_transactions(src, dest)
        assert report.transactions == 2
        assert "blob files will not be copied" in caplog.text
    finally:
        dest.close()
        src.close()


def test_undo_needs_the_old_blob_file(paths):
    path, blob_dir = paths
    st = refstorage.FileStorage(path, blob_dir=blob_dir)
    db = ZODB.DB(st)
    try:
        with db.transaction() as conn:
            conn.root()["b"] = Blob(b"old")
        with db.transaction() as conn:
            oid = conn.root()["b"]._p_oid
            with conn.root()["b"].open("w") as f:
                f.write(b"new")
        first = st.history(oid, size=2)[1]["tid"]
        os.remove(st.fshelper.getBlobFilename(oid, first))
        db.undo(db.undoLog(0, 1)[0]["id"])
        with pytest.raises(UndoError, match="blob file"):
            transaction.commit()
        transaction.abort()
        with db.transaction() as conn:
            assert _read(conn.root()["b"]) == b"new"
    finally:
        db.close()


def test_verify_reports_blob_files_without_a_record_and_missing_ones(paths, tmp_path):
    """A blob file left by a transaction that never committed (a crash after storeBlob
    moved it in), and a current blob record whose file is gone: verify --blob-dir names both."""
    from click.testing import CliRunner

    from refstorage.cli import main
    from refstorage.tools.verify import verify

    path, blob_dir = paths
    db = ZODB.DB(refstorage.FileStorage(path, blob_dir=blob_dir))
    with db.transaction() as conn:
        conn.root()["a"] = Blob(b"kept")
        conn.root()["b"] = Blob(b"lost")
    with db.transaction() as conn:
        a_oid, b_oid = conn.root()["a"]._p_oid, conn.root()["b"]._p_oid
    db.close()
    assert verify(path, blob_dir=blob_dir).ok
    assert CliRunner().invoke(main, ["verify", path, "--blob-dir", blob_dir]).exit_code == 0
    st = refstorage.FileStorage(path, blob_dir=blob_dir)
    orphan = st.fshelper.getBlobFilename(a_oid, p64(u64(st.lastTransaction()) + 5))
    b_file = st.loadBlob(b_oid, st.getTid(b_oid))
    st.close()
    with open(orphan, "wb") as f:
        f.write(b"from a transaction that never committed")
    os.chmod(b_file, 0o644)
    os.remove(b_file)
    report = verify(path, blob_dir=blob_dir)
    blob = [p for p in report.problems if p.kind == "blob"]
    assert len(blob) == 2 and report.counts == {"blob": 2}, [str(p) for p in report.problems]
    assert any(orphan in p.message and "no record" in p.message for p in blob)
    assert any(p.oid == b_oid and "missing" in p.message for p in blob)
    assert verify(path).ok  # without --blob-dir the data file alone is fine
    result = CliRunner().invoke(main, ["verify", path, "--blob-dir", blob_dir])
    assert result.exit_code == 1 and orphan in result.output and "2 blob" in result.output


def test_verify_reports_a_missing_file_of_an_older_blob_revision(paths):
    """Found by an outside review: only current revisions were checked, yet
    loadBlob(oid, older tid) fails when that file is gone."""
    from refstorage.tools.verify import verify

    path, blob_dir = paths
    db = ZODB.DB(refstorage.FileStorage(path, blob_dir=blob_dir))
    with db.transaction() as conn:
        conn.root()["a"] = Blob(b"one")
    with db.transaction() as conn:
        with conn.root()["a"].open("w") as f:
            f.write(b"two")
    with db.transaction() as conn:
        oid = conn.root()["a"]._p_oid
    db.close()
    st = refstorage.FileStorage(path, blob_dir=blob_dir)
    old_tid = st.history(oid, 2)[1]["tid"]
    old_file = st.loadBlob(oid, old_tid)
    st.close()
    assert verify(path, blob_dir=blob_dir).ok
    os.chmod(old_file, 0o644)
    os.remove(old_file)
    report = verify(path, blob_dir=blob_dir)
    assert report.counts == {"blob": 1}, [str(p) for p in report.problems]
    assert report.problems[0].oid == oid and old_tid.hex() in report.problems[0].message
