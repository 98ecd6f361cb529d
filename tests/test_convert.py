"""`refstorage convert` and copyTransactionsFrom: whole histories in and out."""

import os
import subprocess
import sys

import pytest
import transaction
import ZODB
from BTrees.IOBTree import IOBTree
from BTrees.OOBTree import OOBTree
from click.testing import CliRunner
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage as ZFS

import refstorage
from refstorage.cli import main


def make_zodb_fs(path, extra_txns=0):
    """A ZODB FileStorage with BTrees, updates, deletions, extensions and undo."""
    db = ZODB.DB(ZFS(path))
    conn = db.open()
    root = conn.root()
    root["tree"] = tree = OOBTree()
    root["ints"] = ints = IOBTree()
    for i in range(300):
        tree[f"k{i:04d}"] = PersistentMapping(n=i)
        ints[i] = f"v{i}"
    t = transaction.get()
    t.note("fill")
    t.setUser("alice")
    t.setExtendedInfo("ticket", 42)
    transaction.commit()
    for i in range(0, 300, 7):
        tree[f"k{i:04d}"]["n"] = -i
    transaction.get().note("update")
    transaction.commit()
    del tree["k0003"]
    transaction.commit()
    root["doomed"] = PersistentMapping(x=1)
    transaction.commit()
    undo_id = db.undoLog(0, 1)[0]["id"]
    db.undo(undo_id)  # undo the creation of "doomed": a backpointer 0 record
    transaction.get().note("undo")
    transaction.commit()
    tree["k0010"]["n"] = "changed"
    transaction.commit()
    db.undo(db.undoLog(0, 1)[0]["id"])  # a backpointer to an older revision
    transaction.commit()
    for j in range(extra_txns):
        ints[1000 + j] = "late"
        transaction.commit()
    conn.close()
    db.close()


def txns(storage):
    out = []
    for t in storage.iterator():
        out.append((t.tid, t.status, t.user, t.description, t.extension_bytes,
                    [(r.oid, r.tid, r.data, r.data_txn) for r in t]))
    return out


def run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_round_trip_through_refstorage_keeps_everything(tmp_path):
    src = str(tmp_path / "Data.fs")
    make_zodb_fs(src)
    mid = str(tmp_path / "Data.rfs")
    back = str(tmp_path / "Back.fs")
    r = run("convert", src, mid)
    assert r.exit_code == 0, r.output
    assert "copied 8 transactions" in r.output
    r = run("convert", mid, back)
    assert r.exit_code == 0, r.output
    a, m, b = ZFS(src, read_only=True), refstorage.FileStorage(mid, read_only=True), ZFS(back, read_only=True)
    try:
        assert txns(a) == txns(m) == txns(b)
        # undo records stayed backpointers all the way (data_txn is set)
        assert any(rec[3] is not None for t in txns(m) for rec in t[5])
    finally:
        a.close(), m.close(), b.close()


def test_converted_file_opens_and_its_btrees_check(tmp_path):
    src = str(tmp_path / "Data.fs")
    make_zodb_fs(src)
    dst = str(tmp_path / "Data.rfs")
    assert run("convert", src, dst).exit_code == 0
    db = ZODB.DB(refstorage.FileStorage(dst, read_only=True))
    try:
        root = db.open().root()
        root["tree"]._check()
        root["ints"]._check()
        assert len(root["tree"]) == 299 and "doomed" not in root
        assert root["tree"]["k0010"]["n"] == 10 and root["tree"]["k0007"]["n"] == -7
        st = db.storage
        oid = b"\0" * 8
        while oid is not None:  # every current object loads
            oid, _tid, _data, oid = st.record_iternext(oid)
    finally:
        db.close()


def test_incremental_copies_only_newer_transactions(tmp_path):
    src = str(tmp_path / "Data.fs")
    make_zodb_fs(src)
    dst = str(tmp_path / "Data.rfs")
    assert run("convert", src, dst).exit_code == 0
    db = ZODB.DB(ZFS(src))
    conn = db.open()
    conn.root()["ints"][5000] = "new"
    transaction.commit()
    db.close()
    r = run("convert", src, dst)
    assert r.exit_code != 0 and "not empty" in r.output
    r = run("convert", "--incremental", "--json", src, dst)
    assert r.exit_code == 0, r.output
    assert '"transactions": 1' in r.output
    a, b = ZFS(src, read_only=True), refstorage.FileStorage(dst, read_only=True)
    try:
        assert txns(a) == txns(b)
    finally:
        a.close(), b.close()


def test_source_as_zconfig_and_uri(tmp_path):
    src = str(tmp_path / "Data.fs")
    make_zodb_fs(src)
    conf = tmp_path / "src.conf"
    conf.write_text(f"<filestorage>\n  path {src}\n  read-only true\n</filestorage>\n")
    dst1 = str(tmp_path / "a.rfs")
    dst2 = str(tmp_path / "b.rfs")
    assert run("convert", str(conf), dst1).exit_code == 0
    assert run("convert", f"file://{src}", dst2).exit_code == 0
    a, b = refstorage.FileStorage(dst1, read_only=True), refstorage.FileStorage(dst2, read_only=True)
    try:
        assert txns(a) == txns(b)
        assert len(txns(a)) == 8
    finally:
        a.close(), b.close()


def test_copy_transactions_from_needs_increasing_tids(tmp_path):
    src = str(tmp_path / "Data.fs")
    make_zodb_fs(src)
    dst = refstorage.FileStorage(str(tmp_path / "x.rfs"))
    s = ZFS(src, read_only=True)
    try:
        dst.copyTransactionsFrom(s)
        with pytest.raises(Exception, match="not after"):
            dst.copyTransactionsFrom(s)
        assert len(txns(dst)) == 8  # the failed copy left nothing behind
    finally:
        s.close()
        dst.close()


def test_python_dash_m_and_missing_source(tmp_path):
    out = subprocess.run([sys.executable, "-m", "refstorage", "convert", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--incremental" in out.stdout
    r = run("convert", str(tmp_path / "nope.rfs"), str(tmp_path / "dst.rfs"))
    assert r.exit_code != 0
    assert "nope.rfs" in r.output
    assert not os.path.exists(tmp_path / "dst.rfs")


class _OneByOne:
    """A refstorage destination seen without its bulk restore (the per-record path)."""

    def __init__(self, storage):
        self._storage = storage

    def __getattr__(self, name):
        if name == "restore_records":
            raise AttributeError(name)
        return getattr(self._storage, name)


def _records(path):
    with open(path, "rb") as f:
        return f.read()[1024:]  # past the file header (its file id differs)


@pytest.mark.parametrize("batch,batch_bytes,spool", [(4096, 8 << 20, False), (3, 8 << 20, False),
                                                    (4096, 100, False), (4096, 8 << 20, True)])
def test_bulk_restore_writes_what_restore_one_by_one_writes(tmp_path, monkeypatch, batch, batch_bytes,
                                                            spool):
    """copy_transactions' bulk path (restore_records) gives the same bytes as one restore() per
    record: prev positions, backpointers of undo records, undone creations (no data),
    an oid stored twice in one transaction, across batch boundaries (records, bytes),
    and with the transaction spilling to the commit spool mid-batch."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64, z64

    from refstorage import core
    from refstorage import storage as storage_module
    from refstorage.copying import copy_transactions

    monkeypatch.setattr(storage_module, "RESTORE_BATCH", batch)
    monkeypatch.setattr(storage_module, "RESTORE_BATCH_BYTES", batch_bytes)
    if spool:
        monkeypatch.setattr(core, "SPOOL_RECORDS", 50)
    src = str(tmp_path / "Data.fs")
    make_zodb_fs(src, extra_txns=3)
    zs = ZFS(src)  # one more transaction storing an oid twice, then a new oid
    t = TransactionMetaData()
    zs.tpc_begin(t)
    zs.restore(p64(1), z64, b"first", "", None, t)
    zs.restore(p64(1), z64, b"second", "", None, t)
    zs.restore(p64(5000), z64, b"new", "", None, t)
    zs.tpc_vote(t)
    zs.tpc_finish(t)
    zs.close()
    source = ZFS(src, read_only=True)
    try:
        bulk = refstorage.FileStorage(str(tmp_path / "bulk.rfs"), create=True)
        calls = []
        real = bulk.restore_records
        monkeypatch.setattr(bulk, "restore_records", lambda recs, txn: calls.append(1) or real(recs, txn))
        rb = copy_transactions(source, bulk)
        bulk.close()
        one = refstorage.FileStorage(str(tmp_path / "one.rfs"), create=True)
        ro = copy_transactions(source, _OneByOne(one))
        one.close()
    finally:
        source.close()
    assert len(calls) == rb.transactions == ro.transactions == 12
    assert (rb.records, rb.bytes, rb.last_tid) == (ro.records, ro.bytes, ro.last_tid)
    assert _records(tmp_path / "bulk.rfs") == _records(tmp_path / "one.rfs")
    st = refstorage.FileStorage(str(tmp_path / "bulk.rfs"), read_only=True)
    try:
        assert st.load(p64(1))[0] == b"second"
        assert st._oid == p64(5000)
        backpointers = [r for t in st.iterator() for r in t if r.data_txn]
        assert backpointers  # the undo records stayed backpointers
    finally:
        st.close()


def test_bulk_restore_refuses_what_restore_refuses(tmp_path):
    from ZODB.POSException import ReadOnlyError, StorageTransactionError

    path = str(tmp_path / "d.rfs")
    st = refstorage.FileStorage(path, create=True)
    with pytest.raises(StorageTransactionError):
        st.restore_records([], object())  # no transaction begun
    st.close()
    st = refstorage.FileStorage(path, read_only=True)
    with pytest.raises(ReadOnlyError):
        st.restore_records([], object())
    st.close()
