"""The storage's own behaviour: open errors, recovery, index reuse, lock, quota, 2PC."""

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB import POSException
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, u64, z64

import refstorage
from refstorage import errors, fileio, recovery, storage
from refstorage import fileformat as fmt
from refstorage.log import LogReader, scan


def commit(st, oid_data, serials=None, user="", description=""):
    """Store {oid: data} in one transaction through the raw API; return the tid."""
    t = TransactionMetaData(user, description)
    st.tpc_begin(t)
    for oid, data in oid_data.items():
        serial = (serials or {}).get(oid)
        if serial is None:
            try:
                serial = st.getTid(oid)
            except POSException.POSKeyError:
                serial = z64
        st.store(oid, serial, data, "", t)
    st.tpc_vote(t)
    return st.tpc_finish(t)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "Data.rfs")


def make(path, n=3, per=4):
    st = refstorage.FileStorage(path)
    tids = []
    for i in range(n):
        tids.append(commit(st, {p64(j): b"data-%d-%d" % (i, j) for j in range(per)}))
    st.close()
    return tids


# -- opening -------------------------------------------------------------------------

def test_missing_file_is_created_and_reopens_empty(path):
    st = refstorage.FileStorage(path)
    assert os.path.getsize(path) == fmt.HEADER_SIZE
    assert st.lastTransaction() == z64 and len(st) == 0
    st.close()
    st = refstorage.FileStorage(path)
    assert len(st) == 0
    st.close()


def test_create_true_starts_empty(path):
    make(path)
    st = refstorage.FileStorage(path, create=True)
    assert len(st) == 0 and st.lastTransaction() == z64
    with pytest.raises(POSException.POSKeyError):
        st.load(p64(0))
    st.close()


def test_read_only_missing_file(path):
    with pytest.raises(errors.MissingFileError, match="Data.rfs"):
        refstorage.FileStorage(path, read_only=True)
    assert not os.path.exists(path)


def test_directory(tmp_path):
    with pytest.raises(errors.PathIsDirectoryError, match=str(tmp_path)):
        refstorage.FileStorage(str(tmp_path))


@pytest.mark.parametrize("content,error,message", [
    (b"", errors.EmptyFileError, "empty"),
    (b"\x89", errors.CorruptedHeaderError, "shorter than its header"),
    (b"FS30" + b"\0" * 100, errors.ForeignFormatError, "ZODB FileStorage"),
    (b"GIF89a" + os.urandom(3000), errors.NotARefStorageFileError, "bad magic"),
])
@pytest.mark.parametrize("read_only", [False, True])
def test_bad_files(path, content, error, message, read_only):
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(error, match=message) as info:
        refstorage.FileStorage(path, read_only=read_only)
    assert path in str(info.value)
    with open(path, "rb") as f:
        assert f.read() == content  # never "repaired"
    # the lock was released: a later open gets the same error, not a lock error
    with pytest.raises(error):
        refstorage.FileStorage(path)


def test_future_version(path):
    make(path, 1)
    with open(path, "r+b") as f:
        head = bytearray(f.read(fmt.HEADER_SIZE))
        head[9] = fmt.FORMAT_VERSION + 1
        f.seek(0)
        f.write(head)
    with pytest.raises(errors.FutureVersionError, match="newer"):
        refstorage.FileStorage(path)


def test_a_real_zodb_filestorage_file(path):
    from ZODB.FileStorage import FileStorage as ZFS
    ZFS(path).close()
    with pytest.raises(errors.ForeignFormatError, match="convert"):
        refstorage.FileStorage(path)


def test_errors_derive_from_storage_error():
    assert issubclass(errors.RefStorageError, POSException.StorageError)
    assert issubclass(errors.CorruptedDataError, POSException.StorageSystemError)


# -- torn tails and corruption --------------------------------------------------------

def _last_txn(path):
    f = fileio.DataFile(path, read_only=True)
    try:
        return LogReader(f).txn_ending_at(f.size)
    finally:
        f.close()


def test_truncated_tail_moves_to_side_file(path, caplog):
    tids = make(path, 3)
    size = os.path.getsize(path)
    last = _last_txn(path)
    with open(path, "r+b") as f:
        f.truncate(size - 5)
    with caplog.at_level(logging.WARNING, "refstorage"):
        st = refstorage.FileStorage(path)
    assert st.lastTransaction() == tids[1]
    assert st.load(p64(0))[0] == b"data-1-0"
    assert os.path.getsize(path) == last.pos
    with open(path + ".tr0", "rb") as f:
        assert len(f.read()) == size - 5 - last.pos
    assert "incomplete last transaction" in caplog.text
    commit(st, {p64(0): b"after"})  # the file is writable again
    st.close()


def test_damaged_last_commit_followed_by_leftover_bytes_is_a_torn_tail(path, caplog):
    """A power loss can leave the last commit partly written (its fsync never
    finished) with the bytes of an aborted transaction after it, where that
    one stood before.  The last *good-looking* transaction is then checked
    record by record too, and goes to the side file with the leftovers."""
    tids = make(path, 3)
    os.remove(path + ".index")  # a crash: no index saved at close (a saved one covers synced data only)
    last = _last_txn(path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(last.data_pos + fmt.DATA_HEADER_SIZE + 2)  # inside its first record's data
        byte = f.read(1)
        f.seek(last.data_pos + fmt.DATA_HEADER_SIZE + 2)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.seek(size)
        f.write(b"\x17" * 300)  # an earlier, aborted transaction's remains
    with caplog.at_level(logging.WARNING, "refstorage"):
        st = refstorage.FileStorage(path)
    assert st.lastTransaction() == tids[1]
    assert st.load(p64(0))[0] == b"data-1-0"
    assert os.path.getsize(path) == last.pos
    with open(path + ".tr0", "rb") as f:
        assert len(f.read()) == size + 300 - last.pos
    assert "incomplete last transaction" in caplog.text
    commit(st, {p64(0): b"after"})
    st.close()


def test_damage_before_a_good_transaction_is_still_refused(path):
    """The extra check only moves a torn tail back; damage in the middle still refuses."""
    make(path, 4)
    os.remove(path + ".index")  # so that open scans the whole file
    f = fileio.DataFile(path, read_only=True)
    reader = LogReader(f)
    second = reader.read_txn_header(fmt.HEADER_SIZE)
    third = reader.read_txn_header(second.next_pos)
    f.close()
    with open(path, "r+b") as fh:
        fh.seek(third.pos + 1)  # the third transaction's header: fails its checksum
        b = fh.read(1)
        fh.seek(third.pos + 1)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(errors.CorruptedError) as info:
        refstorage.FileStorage(path)
    assert info.value.offset == third.pos


def test_unfinished_transaction_is_removed(path):
    tids = make(path, 2)
    st = refstorage.FileStorage(path)
    t = TransactionMetaData()
    st.tpc_begin(t)
    st.store(p64(0), tids[1], b"voted only", "", t)
    st.tpc_vote(t)
    # simulate a crash: the process dies here (no finish, no abort)
    st._state.file.close()
    st._release_lock_file()
    st = refstorage.FileStorage(path)
    assert st.lastTransaction() == tids[1]
    assert st.load(p64(0))[0] == b"data-1-0"
    assert os.path.exists(path + ".tr0")
    st.close()


def test_damage_before_the_last_transaction_is_refused(path):
    make(path, 3)
    first = 1024
    with open(path, "r+b") as f:
        f.seek(first + 3)
        b = f.read(1)
        f.seek(first + 3)
        f.write(bytes([b[0] ^ 0x10]))
    os.remove(path + ".index")
    with pytest.raises(errors.CorruptedError, match="offset 1024") as info:
        refstorage.FileStorage(path)
    assert "followed by valid" in str(info.value)
    assert not os.path.exists(path + ".tr0")
    # read-only refuses too: serving the prefix would present an old state as current
    with pytest.raises(errors.CorruptedError, match="offset 1024") as ro_info:
        refstorage.FileStorage(path, read_only=True)
    assert type(ro_info.value) is type(info.value)
    # ... unless asked for explicitly: then it serves the prefix (here: nothing)
    ro = refstorage.FileStorage(path, read_only=True, serve_valid_prefix=True)
    assert ro.lastTransaction() == z64
    ro.close()
    with pytest.raises(ValueError, match="read_only"):
        refstorage.FileStorage(path, serve_valid_prefix=True)


def test_serve_valid_prefix_from_zconfig_and_uri(path):
    import ZODB.config

    from refstorage import uri
    tids = make(path, 3)
    with open(path, "r+b") as f:
        f.seek(1024 + 3)
        b = f.read(1)
        f.seek(1024 + 3)
        f.write(bytes([b[0] ^ 0x10]))
    os.remove(path + ".index")
    conf = f"%import refstorage\n<refstorage>\n path {path}\n read-only true\n</refstorage>\n"
    with pytest.raises(errors.CorruptedError):
        ZODB.config.storageFromString(conf)
    conf = conf.replace("</refstorage>", " serve-valid-prefix true\n</refstorage>")
    st = ZODB.config.storageFromString(conf)
    assert st.lastTransaction() == z64 and tids
    st.close()
    factory, _ = uri.resolve(f"refstorage://{path}?read_only=1&serve_valid_prefix=1")
    st = factory()
    assert st.lastTransaction() == z64
    st.close()


def test_damage_in_a_middle_data_record(path):
    """Open reads oid tables, not every record: the damage is reported when
    the record is read, and by a verifying scan -- never truncated."""
    tids = make(path, 3)
    th = _last_txn(path)
    f = fileio.DataFile(path, read_only=True)
    second = LogReader(f).txn_ending_at(th.pos)
    f.close()
    with open(path, "r+b") as fh:
        fh.seek(second.data_pos + fmt.DATA_HEADER_SIZE + 2)
        fh.write(b"X")
    os.remove(path + ".index")
    size = os.path.getsize(path)
    st = refstorage.FileStorage(path)
    assert st.lastTransaction() == tids[2] and os.path.getsize(path) == size
    with pytest.raises(errors.CorruptedDataError, match=f"offset {second.data_pos}"):
        st.loadSerial(p64(0), tids[1])
    result = scan(st._state.reader, fmt.HEADER_SIZE, size, None, verify=True)
    assert result.bad_pos == second.pos and not result.torn_tail
    assert isinstance(result.error, errors.CorruptedDataError)
    st.close()


def test_damaged_record_is_an_error_at_load_time(path):
    make(path, 1)
    st = refstorage.FileStorage(path)
    pos = st._state.index[p64(2)]
    st.close()
    with open(path, "r+b") as f:
        f.seek(pos + fmt.DATA_HEADER_SIZE + 1)
        f.write(b"Z")
    st = refstorage.FileStorage(path)  # the index is valid: no scan of that record
    with pytest.raises(errors.CorruptedDataError, match=f"offset {pos}"):
        st.load(p64(2))
    assert st.load(p64(1))[0] == b"data-0-1"
    st.close()


# -- the saved index --------------------------------------------------------------------

def test_index_is_saved_on_close_and_reused(path, monkeypatch):
    make(path, 3)
    assert os.path.exists(path + ".index")
    scanned = []
    real_scan = recovery.scan

    def spy(reader, start, size, index=None, verify=False, **kw):
        scanned.append((start, size))
        return real_scan(reader, start, size, index, verify, **kw)

    monkeypatch.setattr(recovery, "scan", spy)
    st = refstorage.FileStorage(path)
    assert scanned == [(os.path.getsize(path), os.path.getsize(path))]
    assert st.load(p64(3))[0] == b"data-2-3"
    st.close()


@pytest.mark.parametrize("damage", ["garbage", "truncate", "other-file"])
def test_bad_index_is_rebuilt(path, damage, caplog, tmp_path):
    tids = make(path, 3)
    if damage == "garbage":
        with open(path + ".index", "wb") as f:
            f.write(b"not an index")
    elif damage == "truncate":
        with open(path + ".index", "r+b") as f:
            f.truncate(os.path.getsize(path + ".index") - 3)
    elif damage == "other-file":
        other = str(tmp_path / "Other.rfs")
        make(other, 3)
        os.replace(other + ".index", path + ".index")
    with caplog.at_level(logging.WARNING, "refstorage"):
        st = refstorage.FileStorage(path)
    assert "index" in caplog.text
    assert st.lastTransaction() == tids[2]
    assert st.load(p64(3))[0] == b"data-2-3"
    st.close()


def test_index_describing_more_than_the_file(path, caplog):
    make(path, 3)
    th = _last_txn(path)
    saved = open(path + ".index", "rb").read()
    with open(path, "r+b") as f:
        f.truncate(th.pos)  # lose the last transaction, keep the newer index
    with caplog.at_level(logging.WARNING, "refstorage"):
        st = refstorage.FileStorage(path)
    assert "ignoring the saved index" in caplog.text
    assert st.load(p64(0))[0] == b"data-1-0"
    st.close()
    assert open(path + ".index", "rb").read() != saved


def test_index_is_saved_while_running(path, monkeypatch):
    monkeypatch.setattr(storage, "INDEX_SAVE_BYTES", 2000)
    st = refstorage.FileStorage(path)
    for i in range(20):
        commit(st, {p64(i): b"x" * 300})
    assert os.path.exists(path + ".index")
    # crash: no close
    end_saved = st._saved_end
    assert os.path.getsize(path) - end_saved < 2000
    st._state.file.close()
    st._release_lock_file()
    st = refstorage.FileStorage(path)
    assert [st.load(p64(i))[0] for i in range(20)] == [b"x" * 300] * 20
    st.close()


def test_index_save_interval_grows_with_the_index(path, monkeypatch):
    """Past INDEX_SAVE_SCALE objects a running storage saves its index less often (in
    proportion to the index), so saving stays a bounded share of the writes; a reopen
    after a crash still finds every object (the log after the save is scanned)."""
    assert storage.index_save_interval(0) == storage.INDEX_SAVE_BYTES
    assert storage.index_save_interval(storage.INDEX_SAVE_SCALE) == storage.INDEX_SAVE_BYTES
    assert storage.index_save_interval(4 * storage.INDEX_SAVE_SCALE) == 4 * storage.INDEX_SAVE_BYTES
    monkeypatch.setattr(storage, "INDEX_SAVE_BYTES", 2000)
    monkeypatch.setattr(storage, "INDEX_SAVE_SCALE", 10)
    saves = []
    real = storage.save_index
    monkeypatch.setattr(storage, "save_index", lambda *a, **k: saves.append(len(a[1])) or real(*a, **k))
    st = refstorage.FileStorage(path)
    for i in range(40):
        commit(st, {p64(i): b"x" * 300})  # ~370 bytes a transaction
    # without the scaling: a save every 6 transactions (2000 bytes); with it the
    # interval is 200 bytes per object once past 10 objects
    assert 2 <= len(saves) <= 4, saves
    assert all(b - a >= 5 for a, b in zip(saves, saves[1:], strict=False)), saves
    assert os.path.getsize(path) - st._saved_end < storage.index_save_interval(40)
    st._state.file.close()  # crash: no close
    st._release_lock_file()
    st = refstorage.FileStorage(path)
    assert [st.load(p64(i))[0] for i in range(40)] == [b"x" * 300] * 40
    st.close()


KILL_SCRIPT = textwrap.dedent("""
    import sys, os
    import refstorage
    from refstorage import storage
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64, z64
    storage.INDEX_SAVE_BYTES = 5000
    st = refstorage.FileStorage(sys.argv[1])
    n = 0
    while True:
        t = TransactionMetaData()
        st.tpc_begin(t)
        for j in range(5):
            oid = p64(n * 5 + j)
            st.store(oid, z64, b"v%d" % n, "", t)
        st.tpc_vote(t)
        tid = st.tpc_finish(t)
        print(n, tid.hex(), flush=True)
        n += 1
""")


def test_reopen_after_kill_9_loses_nothing_acknowledged(path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, path], stdout=subprocess.PIPE,
                            env=env, text=True)
    acked = []
    for line in proc.stdout:
        acked.append(line.split())
        if len(acked) >= 150:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for line in proc.stdout:  # anything printed before the kill was acknowledged
        acked.append(line.split())
    st = refstorage.FileStorage(path)
    assert u64(st.lastTransaction()) >= int(acked[-1][1], 16)
    for n, _tid in acked:
        assert st.load(p64(int(n) * 5))[0] == b"v%d" % int(n)
    st.close()


# -- lock, read-only, quota ----------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder(path):
    st = refstorage.FileStorage(path)
    code = f"import refstorage; refstorage.FileStorage({path!r})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode != 0
    assert "StorageLockedError" in out.stderr
    assert f"pid {os.getpid()}" in out.stderr
    ro = refstorage.FileStorage(path, read_only=True)  # read-only beside the writer
    ro.close()
    st.close()
    refstorage.FileStorage(path).close()  # released


def test_read_only_refuses_writes(path):
    make(path, 1)
    st = refstorage.FileStorage(path, read_only=True)
    assert st.isReadOnly()
    with pytest.raises(POSException.ReadOnlyError):
        st.tpc_begin(TransactionMetaData())
    with pytest.raises(POSException.ReadOnlyError):
        st.new_oid()
    assert st.load(p64(0))[0] == b"data-0-0"
    st.close()


def test_quota(path):
    st = refstorage.FileStorage(path, quota=5000)
    commit(st, {p64(0): b"x" * 1000})
    t = TransactionMetaData()
    st.tpc_begin(t)
    with pytest.raises(errors.QuotaError, match="quota of 5000"):
        st.store(p64(1), z64, b"y" * 5000, "", t)
    st.tpc_abort(t)
    commit(st, {p64(1): b"small"})
    st.close()


# -- commit protocol --------------------------------------------------------------------

def test_abort_after_vote_truncates(path):
    st = refstorage.FileStorage(path)
    commit(st, {p64(0): b"a"})
    size = os.path.getsize(path)
    t = TransactionMetaData()
    st.tpc_begin(t)
    st.store(p64(1), z64, b"b" * 1000, "", t)
    st.tpc_vote(t)
    assert os.path.getsize(path) > size
    st.tpc_abort(t)
    assert os.path.getsize(path) == size
    with pytest.raises(POSException.POSKeyError):
        st.load(p64(1))
    st.close()


class FailingOps(fileio.Ops):
    def __init__(self, fail_on, err=errno.ENOSPC):
        self.fail_on = fail_on
        self.err = err
        self.armed = True

    def pwrite(self, fd, data, pos):
        if self.armed and self.fail_on == "write":
            raise OSError(self.err, os.strerror(self.err))
        return super().pwrite(fd, data, pos)

    def fsync(self, fd):
        if self.armed and self.fail_on == "fsync":
            raise OSError(self.err, os.strerror(self.err))
        return super().fsync(fd)


def test_disk_full_at_vote_truncates_and_recovers(path):
    st = refstorage.FileStorage(path)
    commit(st, {p64(0): b"a"})
    size = os.path.getsize(path)
    t = TransactionMetaData()
    st.tpc_begin(t)
    st.store(p64(1), z64, b"b" * 1000, "", t)
    with fileio.injected(FailingOps("write")):
        with pytest.raises(errors.StorageIOError, match="No space left") as info:
            st.tpc_vote(t)
    assert info.value.errno == errno.ENOSPC
    st.tpc_abort(t)
    assert os.path.getsize(path) == size
    commit(st, {p64(1): b"fits now"})
    assert st.load(p64(1))[0] == b"fits now"
    st.close()


def test_failed_fsync_breaks_the_storage(path):
    st = refstorage.FileStorage(path)
    tid = commit(st, {p64(0): b"a"})
    t = TransactionMetaData()
    st.tpc_begin(t)
    st.store(p64(0), tid, b"b", "", t)
    st.tpc_vote(t)
    with fileio.injected(FailingOps("fsync", errno.EIO)):
        with pytest.raises(errors.StorageIOError, match="fsync"):
            st.tpc_finish(t)
    assert st.lastTransaction() == tid  # not acknowledged, not published
    assert st.load(p64(0))[0] == b"a"
    t = TransactionMetaData()
    st.tpc_begin(t)
    st.store(p64(1), z64, b"c", "", t)
    with pytest.raises(errors.StorageBrokenError):
        st.tpc_vote(t)
    st.tpc_abort(t)
    st.close()
    st = refstorage.FileStorage(path)  # reopening reads what is really there
    commit(st, {p64(1): b"c"})
    st.close()


def test_tids_strictly_increase_and_explicit_tids_are_checked(path):
    st = refstorage.FileStorage(path)
    tids = [commit(st, {p64(0): b"%d" % i}) for i in range(20)]
    assert tids == sorted(set(tids))
    t = TransactionMetaData()
    with pytest.raises(POSException.StorageTransactionError):
        st.tpc_begin(t, tids[-1])
    st.close()


def test_load_before_and_serial(path):
    st = refstorage.FileStorage(path)
    tids = [commit(st, {p64(5): b"rev%d" % i}) for i in range(4)]
    assert st.loadBefore(p64(5), tids[0]) is None
    assert st.loadBefore(p64(5), tids[2]) == (b"rev1", tids[1], tids[2])
    assert st.loadBefore(p64(5), p64(u64(tids[3]) + 1)) == (b"rev3", tids[3], None)
    assert st.loadSerial(p64(5), tids[1]) == b"rev1"
    with pytest.raises(POSException.POSKeyError):
        st.loadSerial(p64(5), p64(1))
    with pytest.raises(POSException.POSKeyError):
        st.loadBefore(p64(99), tids[0])
    assert [h["tid"] for h in st.history(p64(5), 10)] == tids[::-1]
    st.close()


def test_iterator_start_stop_and_extension(path):
    st = refstorage.FileStorage(path)
    tids = []
    for i in range(6):
        t = TransactionMetaData(f"user{i}", "desc", {"k": i})
        st.tpc_begin(t)
        st.store(p64(i), z64, b"d%d" % i, "", t)
        st.tpc_vote(t)
        tids.append(st.tpc_finish(t))
    got = list(st.iterator(tids[2], tids[4]))
    assert [t.tid for t in got] == tids[2:5]
    assert got[0].user == b"user2" and got[0].extension == {"k": 2}
    assert got[0].extension_bytes
    recs = list(got[0])
    assert [(r.oid, r.data, r.data_txn) for r in recs] == [(p64(2), b"d2", None)]
    assert [t.tid for t in st.iterator()] == tids
    assert list(st.iterator(p64(u64(tids[-1]) + 1))) == []
    st.close()


def test_references_are_stored(path):
    db = ZODB.DB(refstorage.FileStorage(path))
    conn = db.open()
    root = conn.root()
    root["tree"] = tree = OOBTree()
    tree["a"] = child = PersistentMapping()
    transaction.commit()
    st = db.storage
    rec = st._state.reader.read_data_record(st._state.index[z64])
    assert rec.ref_oids() == [tree._p_oid]
    assert child._p_oid in st._state.reader.read_data_record(st._state.index[tree._p_oid]).ref_oids()
    db.close()


def _history_after_undo(st) -> list[dict]:
    """Two revisions of one object, the second undone, with an extension: the history."""
    db = ZODB.DB(st)
    try:
        conn = db.open()
        conn.root()["x"] = PersistentMapping(a=1)
        transaction.get().note("first")
        transaction.get().setExtendedInfo("k", "v")
        transaction.commit()
        oid = conn.root()["x"]._p_oid
        conn.root()["x"]["a"] = 2
        transaction.commit()
        db.undo(db.undoLog(0, 1)[0]["id"])
        transaction.commit()
        conn.close()
        return st.history(oid, size=10)
    finally:
        db.close()


def test_history_matches_filestorage(tmp_path):
    """history()'s dicts have FileStorage's keys and values (size 0 for an undo's backpointer)."""
    from ZODB.FileStorage import FileStorage as ZFileStorage

    ours = _history_after_undo(refstorage.FileStorage(str(tmp_path / "a.rfs")))
    theirs = _history_after_undo(ZFileStorage(str(tmp_path / "a.fs")))
    assert len(ours) == len(theirs) == 3

    def comparable(h):
        return [{k: v for k, v in d.items() if k not in ("tid", "time")} for d in h]

    assert comparable(ours) == comparable(theirs)
    assert [sorted(d) for d in ours] == [sorted(d) for d in theirs]
    assert ours[0]["size"] == 0  # the undo wrote a backpointer


def test_reopening_an_unchanged_file_writes_and_syncs_nothing(path):
    """An open of a file whose saved index is current (read-only or read-write, then
    closed) makes no write, fsync, rename, truncation or removal of the storage's files
    (the lock file, written by zc.lockfile, aside), and maps the index file."""

    class Recorder(fileio.Ops):
        def __init__(self):
            self.calls = []

        def pwrite(self, fd, data, pos):
            self.calls.append("pwrite")
            return super().pwrite(fd, data, pos)

        def fsync(self, fd):
            self.calls.append("fsync")
            super().fsync(fd)

        def fsync_dir(self, p):
            self.calls.append("fsync_dir")
            super().fsync_dir(p)

        def ftruncate(self, fd, size):
            self.calls.append("ftruncate")
            super().ftruncate(fd, size)

        def replace(self, src, dst):
            self.calls.append("replace")
            super().replace(src, dst)

        def unlink(self, p):
            self.calls.append("unlink")
            super().unlink(p)

        def map_read(self, fd, size):
            self.calls.append("map")
            return super().map_read(fd, size)

    st = refstorage.FileStorage(path)
    for i in range(3):
        commit(st, {p64(i): b"x%d" % i})
    st.close()
    before = {name: os.path.getmtime(os.path.join(os.path.dirname(path), name))
              for name in os.listdir(os.path.dirname(path)) if not name.endswith(".lock")}
    for read_only in (True, False):
        with fileio.injected(Recorder()) as ops:
            st = refstorage.FileStorage(path, read_only=read_only)
            assert st.load(p64(2))[0] == b"x2"
            st.close()
        assert ops.calls == ["map"], (read_only, ops.calls)
    after = {name: os.path.getmtime(os.path.join(os.path.dirname(path), name))
             for name in os.listdir(os.path.dirname(path)) if not name.endswith(".lock")}
    assert after == before
