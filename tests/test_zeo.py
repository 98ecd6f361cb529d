"""refstorage behind a real ZEO server, with real client processes.

The server is ZEO's runzeo, started as a subprocess with a ZConfig file that
does ``%import refstorage`` and declares a ``<refstorage>`` section; it
listens on 127.0.0.1 only.  Two client processes (ZEO.DB, each with its own
blob cache) take commands as JSON lines on stdin and answer on stdout, so
the test can interleave them: one commits, the other must see the change
through ZEO's invalidations.  Every wait is bounded, and the processes are
stopped in teardown whatever happened.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import transaction
import ZODB
from ZODB.utils import p64

import refstorage

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
ENV = dict(os.environ, PYTHONPATH=os.path.abspath(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
TIMEOUT = 30.0

CLIENT = textwrap.dedent('''
    import json, sys, time, traceback
    import transaction, ZEO, ZODB.interfaces
    from persistent.mapping import PersistentMapping
    from ZODB.blob import Blob

    port, blob_cache = int(sys.argv[1]), sys.argv[2]
    db = ZEO.DB(("127.0.0.1", port), storage="main", blob_dir=blob_cache, wait_timeout=30)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)

    def shared():
        return conn.root()["shared"]

    def op_init():
        with tm:
            conn.root()["shared"] = PersistentMapping()

    def op_set(key, value):
        with tm:
            shared()[key] = value
        return conn.root()["shared"]._p_serial.hex()

    def op_get(key):
        tm.begin()
        try:
            return shared().get(key)
        finally:
            tm.abort()

    def op_wait_init(timeout):
        # the other client's init arrives as an invalidation, asynchronously
        deadline = time.monotonic() + timeout
        while True:
            tm.begin()
            try:
                if "shared" in conn.root():
                    return True
            finally:
                tm.abort()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def op_wait(key, value, timeout):
        # no explicit sync: the change arrives as an invalidation
        deadline = time.monotonic() + timeout
        while True:
            seen = op_get(key)
            if seen == value or time.monotonic() > deadline:
                return seen
            time.sleep(0.02)

    def op_undo_last():
        entry = db.undoLog(0, 1)[0]
        db.undo(entry["id"])
        tm2 = transaction.get()
        tm2.commit()
        return entry["description"]

    def op_history(key=None):
        tm.begin()
        try:
            return len(db.storage.history(shared()._p_oid, 100))
        finally:
            tm.abort()

    def op_pack():
        db.pack(time.time() + 1)

    def op_blob_store(key, data):
        with tm:
            if key in conn.root():
                with conn.root()[key].open("w") as f:
                    f.write(data.encode())
            else:
                conn.root()[key] = Blob(data.encode())
        return conn.root()[key]._p_serial.hex()

    def op_blob_read(key, timeout=0):
        deadline = time.monotonic() + timeout
        while True:
            tm.begin()
            try:
                blob = conn.root().get(key)
                data = None if blob is None else blob.open("r").read().decode()
            finally:
                tm.abort()
            if data is not None or time.monotonic() > deadline:
                return data
            time.sleep(0.02)

    def op_info():
        storage = db.storage
        names = sorted(i.__name__ for i in ZODB.interfaces.__dict__.values()
                       if isinstance(i, type(ZODB.interfaces.IStorage)) and i.providedBy(storage))
        return {"interfaces": names, "supportsUndo": bool(storage.supportsUndo()),
                "len": len(storage)}

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            result = globals()["op_" + op](**request)
            reply = {"ok": True, "result": result}
        except Exception as exc:
            reply = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()}
        print(json.dumps(reply), flush=True)
    db.close()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not start listening in time")


def _read_line(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no answer from process {proc.pid} within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"process {proc.pid} exited ({proc.wait(5)})")
    return line


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15) -> int | None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class Client:
    def __init__(self, script: str, port: int, blob_cache: str):
        self.proc = subprocess.Popen([sys.executable, script, str(port), blob_cache], env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(_read_line(self.proc)) == {"ready": True}

    def __call__(self, op: str, **kwargs):
        self.proc.stdin.write(json.dumps(dict(op=op, **kwargs)) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(_read_line(self.proc))
        assert reply["ok"], reply.get("traceback")
        return reply["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        _stop(self.proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """runzeo serving a refstorage (with blobs) on 127.0.0.1; yields a dict of facts."""
    tmp = tmp_path_factory.mktemp("zeo")
    port = _free_port()
    data = tmp / "Data.rfs"
    blobs = tmp / "blobs"
    conf = tmp / "zeo.conf"
    conf.write_text(textwrap.dedent(f"""\
        %import refstorage
        <zeo>
          address 127.0.0.1:{port}
        </zeo>
        <refstorage main>
          path {data}
          blob-dir {blobs}
          pack-keep-old false
        </refstorage>
        """))
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ZEO.runzeo", "-C", str(conf)], env=ENV,
                            stdout=log, stderr=subprocess.STDOUT)
    script = tmp / "client.py"
    script.write_text(CLIENT)
    try:
        _wait_listening(proc, port)
        yield {"proc": proc, "port": port, "data": str(data), "blobs": str(blobs), "tmp": tmp,
               "script": str(script)}
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def clients(server):
    made = []
    try:
        for name in ("a", "b"):
            cache = server["tmp"] / f"cache-{name}"
            made.append(Client(server["script"], server["port"], str(cache)))
        made[0]("init")
        for client in made[1:]:
            assert client("wait_init", timeout=TIMEOUT)
        yield made
    finally:
        for client in made:
            client.close()


def _blob_files(blob_dir: str) -> list[str]:
    return sorted(os.path.join(p, f) for p, _d, files in os.walk(blob_dir) for f in files
                  if f.endswith(".blob"))


def test_clients_see_the_server_storage_s_interfaces(clients):
    info = clients[0]("info")
    assert info["supportsUndo"] is True
    for name in ("IBlobStorage", "IStorageUndoable", "IStorageIteration", "IStorageRestoreable",
                 "IStorageCurrentRecordIteration", "IExternalGC"):
        assert name in info["interfaces"], info["interfaces"]


def test_commits_are_seen_through_invalidations(clients):
    a, b = clients
    assert b("get", key="x") is None
    a("set", key="x", value=1)
    assert b("wait", key="x", value=1, timeout=TIMEOUT) == 1
    b("set", key="x", value=2)
    assert a("wait", key="x", value=2, timeout=TIMEOUT) == 2
    b("set", key="y", value="from b")
    assert a("wait", key="y", value="from b", timeout=TIMEOUT) == "from b"


def test_undo_through_the_server(clients):
    a, b = clients
    a("set", key="u", value="before")
    assert b("wait", key="u", value="before", timeout=TIMEOUT) == "before"
    a("set", key="u", value="after")
    assert b("wait", key="u", value="after", timeout=TIMEOUT) == "after"
    b("undo_last")
    assert a("wait", key="u", value="before", timeout=TIMEOUT) == "before"


def test_blobs_through_the_server(clients, server):
    a, b = clients
    files_before = len(_blob_files(server["blobs"]))
    a("blob_store", key="doc", data="version 1")
    assert b("blob_read", key="doc", timeout=TIMEOUT) == "version 1"
    b("blob_store", key="doc", data="version 2")
    deadline = time.monotonic() + TIMEOUT
    while a("blob_read", key="doc") != "version 2" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a("blob_read", key="doc") == "version 2"
    # the server keeps one file per revision, in its own blob directory
    assert len(_blob_files(server["blobs"])) == files_before + 2


def test_pack_through_the_server(clients, server):
    if not hasattr(refstorage.FileStorage, "pack"):
        pytest.xfail("needs pack (issue 4)")
    a, b = clients
    for i in range(3):
        a("set", key="p", value=i)
    a("blob_store", key="packed", data="old")
    a("blob_store", key="packed", data="new")
    assert a("history") > 1
    before = _blob_files(server["blobs"])
    a("pack")
    assert a("history") == 1
    assert b("get", key="p") == 2
    after = _blob_files(server["blobs"])
    assert set(after) < set(before)  # old blob revisions went, no new file appeared
    assert b("blob_read", key="packed", timeout=TIMEOUT) == "new"


def test_stopped_server_leaves_a_complete_file(server, clients):
    a, _b = clients
    a("set", key="final", value="kept")
    a("blob_store", key="final-blob", data="kept too")
    for client in clients:
        client.close()
    assert _stop(server["proc"]) == 0, "runzeo did not stop cleanly on SIGTERM"
    st = refstorage.FileStorage(server["data"], blob_dir=server["blobs"], read_only=True)
    try:
        last = st.lastInvalidations(3)
        assert len(last) == 3
        tids = [tid for tid, _oids in last]
        assert tids == sorted(tids) and tids[-1] == st.lastTransaction()
        assert all(oids for _tid, oids in last)
        db = ZODB.DB(st)
        with db.transaction() as conn:
            assert conn.root()["shared"]["final"] == "kept"
            with conn.root()["final-blob"].open("r") as f:
                assert f.read() == b"kept too"
        db.close()
    finally:
        st.close()


def test_last_invalidations(tmp_path):
    st = refstorage.FileStorage(str(tmp_path / "Data.rfs"))
    db = ZODB.DB(st)
    try:
        assert st.lastInvalidations(5) == [(st.lastTransaction(), [p64(0)])]
        conn = db.open()
        for i in range(4):
            conn.root()[i] = i
            transaction.commit()
        last = st.lastInvalidations(2)
        assert [tid for tid, _ in last] == [h["tid"] for h in reversed(st.history(p64(0), 2))]
        assert last[-1] == (st.lastTransaction(), [p64(0)])
        assert st.lastInvalidations(0) == []
        assert len(st.lastInvalidations(100)) == 5
        conn.close()
    finally:
        db.close()


def test_refstorage_serve_command(tmp_path):
    data = tmp_path / "Data.rfs"
    blobs = tmp_path / "blobs"
    proc = subprocess.Popen([sys.executable, "-m", "refstorage", "serve", str(data), "--create",
                             "--port", "0", "--blob-dir", str(blobs)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = _read_line(proc)
        assert line.startswith(f"serving {data} as storage '1' on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        import ZEO
        from ZODB.blob import Blob
        db = ZEO.DB(("127.0.0.1", port), blob_dir=str(tmp_path / "cache"), wait_timeout=TIMEOUT)
        try:
            with db.transaction() as conn:
                conn.root()["blob"] = Blob(b"served")
            with db.transaction() as conn:
                with conn.root()["blob"].open("r") as f:
                    assert f.read() == b"served"
        finally:
            db.close()
    finally:
        assert _stop(proc) == 0
    # stopped cleanly: the file is unlocked and holds the commit, blob included
    db = ZODB.DB(refstorage.FileStorage(str(data), blob_dir=str(blobs)))
    try:
        with db.transaction() as conn:
            with conn.root()["blob"].open("r") as f:
                assert f.read() == b"served"
    finally:
        db.close()


def test_refstorage_serve_refuses_a_missing_directory(tmp_path):
    from click.testing import CliRunner

    from refstorage.cli import main
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "no" / "Data.rfs"), "--port", "0"])
    assert result.exit_code == 1
    assert "does not exist" in result.output
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "Data.rfs"), "--read-only"])
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_server_config_text(tmp_path):
    from refstorage.cli.serve import server_config
    text = server_config(str(tmp_path / "a$b.rfs"), "127.0.0.1", 8100, blob_dir=str(tmp_path / "blobs"),
                         read_only=True, name="main")
    assert text.startswith("%import refstorage\n<zeo>\n  address 127.0.0.1:8100\n  read-only true\n")
    assert f"<refstorage main>\n  path {tmp_path}/a$$b.rfs\n  blob-dir {tmp_path}/blobs\n" in text
