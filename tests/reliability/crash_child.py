"""Child side of the process-crash tests (test_crash.py): a fork server and its workers.

Run as a script, this is a *fork server*: it imports refstorage and ZODB once,
then reads one JSON spec per line on stdin and, for each, forks a worker that
opens the storage and runs a short random workload (stores, undos, aborted
transactions, packs).  The worker writes its pid, then one line per finished
step on stdout ("ack <step> <tid>" only after tpc_finish returned), so
everything the parent has read was acknowledged.  It may be killed with
SIGKILL at any moment: by the parent, at a random time, or by itself, at the
n-th occurrence of a named event (a fault point of the I/O layer, or
before/after the n-th write, fsync, truncate, rename, link or directory
fsync).  After the worker ends the server writes "exit <code>" (negative:
killed by that signal).

Forking from a process that has everything imported makes a kill cost a few
milliseconds instead of a Python start-up.

`plan()` is imported by the parent too: the workload is a pure function of
(seed, round), so the parent knows what every step writes.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter

if __package__ in (None, ""):  # run as a script: make the sibling helpers importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ZODB.blob import Blob  # noqa: E402
from ZODB.Connection import TransactionMetaData  # noqa: E402
from ZODB.utils import p64, u64  # noqa: E402

import refstorage  # noqa: E402
from refstorage import fileio, storage  # noqa: E402
from reliability.helpers import current_serial, value_data  # noqa: E402

OID_POOL = 24


def plan(seed: int, round_: int, nsteps: int, pack: bool) -> list[dict]:
    """The steps of one worker run: a pure function of its arguments.

    Kinds: "store" {oid: data}, "undo" (the previous step, always a store),
    "abort" (votes a transaction, then aborts it), "pack" (gc=False, to now).
    Every stored value is unique, so a model can tell revisions apart."""
    rng = random.Random(f"{seed}/{round_}")
    steps: list[dict] = []
    for i in range(nsteps):
        r = rng.random()
        prev = steps[-1]["kind"] if steps else None
        if pack and i >= 3 and r < 0.2:
            steps.append({"kind": "pack"})
            continue
        if prev == "store" and r < 0.32:
            steps.append({"kind": "undo"})
            continue
        n = rng.choice((1, 1, 2, 3, 5))
        oids = rng.sample(range(OID_POOL), n)
        writes = {}
        for oid in oids:
            size = rng.choice((0, 10, 50, 200, 700, 2500))
            writes[oid] = f"{seed}.{round_}.{i}.{oid}." + "x" * size
        kind = "abort" if r > 0.9 else "store"
        steps.append({"kind": kind, "writes": writes})
    return steps


BLOB_OIDS = range(30, 36)  # the blob mode's objects


def blob_data(value: str) -> bytes:
    """A blob record's data: the Blob class pickle (what ZODB.blob.is_blob_record looks for),
    then a unique state, so a model can tell revisions apart."""
    return pickle.dumps(Blob, 3) + pickle.dumps(value, 3)


def blob_content(value: str) -> bytes:
    return f"blob file of {value}\n".encode() * 3


def plan_blobs(seed: int, round_: int, nsteps: int) -> list[dict]:
    """The steps of one blob-mode run (a pure function of its arguments).

    Kinds: "blob" {oid: value} (storeBlob each), "restoreblob" {oid: value}
    (restoreBlob each, in a transaction with an explicit tid), "undo" (the
    previous step, always a blob or restoreblob), "abortblob" (storeBlob,
    vote, abort), "pack" (gc=False, to now: drops older revisions' files)."""
    rng = random.Random(f"blobs/{seed}/{round_}")
    steps: list[dict] = []
    for i in range(nsteps):
        r = rng.random()
        prev = steps[-1]["kind"] if steps else None
        if i >= 3 and r < 0.15 or i == nsteps - 3 and all(s["kind"] != "pack" for s in steps):
            steps.append({"kind": "pack"})  # (every run packs at least once)
            continue
        if prev in ("blob", "restoreblob") and r < 0.4:
            steps.append({"kind": "undo"})
            continue
        oids = rng.sample(list(BLOB_OIDS), rng.choice((1, 1, 2)))
        writes = {oid: f"{seed}.{round_}.{i}.{oid}" for oid in oids}
        kind = "abortblob" if r > 0.9 else "restoreblob" if r > 0.75 else "blob"
        steps.append({"kind": kind, "writes": writes})
    return steps


class KillOps(fileio.Ops):
    """Counts I/O events; SIGKILLs its own process at the n-th occurrence of one of them."""

    def __init__(self, target: str | None = None, nth: int = 0):
        self.target = target
        self.nth = nth
        self.counts: Counter[str] = Counter()

    def event(self, name: str) -> None:
        self.counts[name] += 1
        if name == self.target and self.counts[name] == self.nth:
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)  # never reached

    def _around(self, name, fn, *args):
        self.event(name + ".before")
        result = fn(*args)
        self.event(name + ".after")
        return result

    def pwrite(self, fd, data, pos):
        return self._around("pwrite", super().pwrite, fd, data, pos)

    def fsync(self, fd):
        return self._around("fsync", super().fsync, fd)

    def ftruncate(self, fd, size):
        return self._around("ftruncate", super().ftruncate, fd, size)

    def replace(self, src, dst):
        return self._around("replace", super().replace, src, dst)

    def link(self, src, dst):
        return self._around("link", super().link, src, dst)

    def fsync_dir(self, path):
        return self._around("fsync_dir", super().fsync_dir, path)

    def point(self, name):
        self.event("point:" + name)


def _emit(line: str) -> None:
    data = (line + "\n").encode()
    while data:
        n = os.write(1, data)
        data = data[n:]


def _store(st, writes: dict, user: str) -> bytes:
    t = TransactionMetaData(user, "crash test")
    st.tpc_begin(t)
    for oid_int, value in writes.items():
        oid = p64(oid_int)
        st.store(oid, current_serial(st, oid), value_data(value), "", t)
    st.tpc_vote(t)
    return st.tpc_finish(t)


def _blob_upload(st, value: str) -> str:
    """The application's new blob file, in the storage's temporary directory."""
    fd, name = tempfile.mkstemp(dir=st.temporaryDirectory(), suffix=".upload")
    with os.fdopen(fd, "wb") as f:
        f.write(blob_content(value))
    return name


def _store_blobs(st, writes: dict, user: str, restore: bool = False, finish: bool = True):
    t = TransactionMetaData(user, "crash test, blobs")
    if restore:  # as a copy would: an explicit tid after the last one
        tid = p64(u64(st.lastTransaction()) + 1)
        st.tpc_begin(t, tid)
    else:
        st.tpc_begin(t)
    for oid_int, value in writes.items():
        oid = p64(oid_int)
        upload = _blob_upload(st, value)
        if restore:
            st.restoreBlob(oid, tid, blob_data(value), upload, None, t)
        else:
            st.storeBlob(oid, current_serial(st, oid), blob_data(value), upload, "", t)
    st.tpc_vote(t)
    if not finish:
        st.tpc_abort(t)
        return None
    got = st.tpc_finish(t)
    return tid if restore else got


def run_worker(spec: dict) -> None:
    storage.INDEX_SAVE_BYTES = spec["index_save_bytes"]
    storage.WRITE_CHUNK = spec["write_chunk"]
    kill = spec.get("kill")
    ops = KillOps(kill["event"], kill["nth"]) if kill else KillOps()
    fileio.ops = ops
    if spec.get("blobs"):
        steps = plan_blobs(spec["seed"], spec["round"], spec["steps"])
        st = refstorage.FileStorage(spec["path"], blob_dir=spec["path"] + ".blobs")
    else:
        steps = plan(spec["seed"], spec["round"], spec["steps"], spec["pack"])
        st = refstorage.FileStorage(spec["path"])
    last_store_tid = None
    for i, step in enumerate(steps):
        kind = step["kind"]
        if kind in ("blob", "restoreblob"):
            tid = _store_blobs(st, step["writes"], f"step {i}", restore=kind == "restoreblob")
            last_store_tid = tid
            _emit(f"ack {i} {tid.hex()}")
        elif kind == "abortblob":
            _store_blobs(st, step["writes"], f"step {i}", finish=False)
            _emit(f"aborted {i}")
        elif kind == "store":
            tid = _store(st, step["writes"], f"step {i}")
            last_store_tid = tid
            _emit(f"ack {i} {tid.hex()}")
        elif kind == "undo":
            t = TransactionMetaData("", "undo")
            st.tpc_begin(t)
            st.undo(last_store_tid, t)
            st.tpc_vote(t)
            tid = st.tpc_finish(t)
            last_store_tid = None
            _emit(f"ack {i} {tid.hex()}")
        elif kind == "abort":
            t = TransactionMetaData("", "aborted")
            st.tpc_begin(t)
            for oid_int, value in step["writes"].items():
                oid = p64(oid_int)
                st.store(oid, current_serial(st, oid), value_data(value), "", t)
            st.tpc_vote(t)
            st.tpc_abort(t)
            _emit(f"aborted {i}")
        elif kind == "pack":
            st.pack(time.time(), gc=False)
            _emit(f"packed {i}")
    st.close()
    _emit("counts " + json.dumps(dict(ops.counts)))


def serve() -> None:
    _emit("ready")
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        spec = json.loads(line)
        if spec.get("quit"):
            return
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _emit(f"pid {os.getpid()}")  # the worker says it first: its lines follow in order
                run_worker(spec)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        _emit(f"exit {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    serve()
