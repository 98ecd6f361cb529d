"""Concurrency: writers, readers and a packer on one storage; one writer process per file.

8 writer and 8 reader threads share one storage through ZODB.DB connections
for a bounded time (3 s in CI, 30 s with ``--long``), racetest-style: every
committed state keeps invariants that each reader checks in every snapshot
it sees --

- the accounts always sum to the same total (writers move amounts between
  two random accounts);
- obj1 == obj2 (writers increment both in one transaction);
- a conflict-resolving counter (BTrees.Length), bumped by every writer
  transaction, never goes down between one reader's snapshots, and at the end
  equals the number of writer commits (so every resolved conflict counted);

while a packer thread packs (with GC) every half second.  Half of each
reader's objects are reloaded from the storage each time, half come from the
connection cache, so both stale caches and bad loads would show.  Conflicts
are retried.  Then the storage's invariants are checked, and again after a
reopen.

A second process that opens the file for writing while one holds it fails at
once naming the holder's pid; after the holder is killed with SIGKILL, the
file opens again.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import transaction
import ZODB
from BTrees.Length import Length
from ZODB import POSException
from ZODB.tests.MinPO import MinPO

import refstorage
from refstorage import errors

from .helpers import capture_log, check_storage, child_env, commit, report, scaled

pytestmark = pytest.mark.reliability

WRITERS = READERS = 8
SECONDS = scaled(3.0, 30.0)
ACCOUNTS = 20
START = 1000


def _init(db) -> None:
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    for i in range(ACCOUNTS):
        root[f"a{i}"] = MinPO(START)
    root["obj1"] = MinPO(0)
    root["obj2"] = MinPO(0)
    root["counter"] = Length(0)
    tm.commit()
    conn.close()


def _check_state(root, seen_counter: int) -> tuple[list[str], int]:
    problems = []
    total = sum(root[f"a{i}"].value for i in range(ACCOUNTS))
    if total != ACCOUNTS * START:
        problems.append(f"accounts sum to {total}, not {ACCOUNTS * START}")
    if root["obj1"].value != root["obj2"].value:
        problems.append(f"obj1 {root['obj1'].value} != obj2 {root['obj2'].value}")
    counter = root["counter"].value
    if counter < seen_counter:
        problems.append(f"counter went back from {seen_counter} to {counter}")
    return problems, counter


class Run:
    def __init__(self, db, deadline: float):
        self.db = db
        self.deadline = deadline
        self.lock = threading.Lock()
        self.violations: list[str] = []
        self.commits = self.conflicts = self.snapshots = self.packs = 0

    def fail(self, msg: str) -> None:
        with self.lock:
            self.violations.append(msg)

    def guard(self, fn, *args):
        try:
            fn(*args)
        except BaseException as exc:  # any escape is a violation
            import traceback

            self.fail(f"{fn.__name__} died: {exc!r}\n{traceback.format_exc()}")

    def writer(self, seed: int) -> None:
        rng = random.Random(seed)
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        commits = conflicts = 0
        while time.monotonic() < self.deadline:
            tm.begin()
            root = conn.root()
            if rng.random() < 0.5:
                a, b = rng.sample(range(ACCOUNTS), 2)
                amount = rng.randint(1, 50)
                root[f"a{a}"].value -= amount
                root[f"a{b}"].value += amount
            else:
                root["obj1"].value += 1
                root["obj2"].value += 1
            root["counter"].change(1)
            try:
                tm.commit()
                commits += 1
            except POSException.ConflictError:
                tm.abort()
                conflicts += 1
        conn.close()
        with self.lock:
            self.commits += commits
            self.conflicts += conflicts

    def reader(self, seed: int) -> None:
        rng = random.Random(seed)
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        seen = 0
        snapshots = 0
        while time.monotonic() < self.deadline:
            tm.begin()
            root = conn.root()
            for i in range(ACCOUNTS):  # half the objects come from the storage, half from the cache
                if rng.random() < 0.5:
                    root[f"a{i}"]._p_invalidate()
            problems, seen = _check_state(root, seen)
            for p in problems:
                self.fail(f"reader snapshot at {conn._storage.lastTransaction().hex()}: {p}")
            tm.abort()
            snapshots += 1
            time.sleep(0.0005)  # leave the writers some of the GIL
        conn.close()
        with self.lock:
            self.snapshots += snapshots

    def packer(self) -> None:
        while time.monotonic() < self.deadline - 0.3:
            time.sleep(0.5)
            self.db.pack(time.time())
            self.packs += 1


def _final_check(db, expected_counter: int | None) -> int:
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    problems, counter = _check_state(conn.root(), 0)
    assert not problems, problems
    if expected_counter is not None:
        assert counter == expected_counter, f"counter {counter} != {expected_counter} commits"
    conn.close()
    check_storage(db.storage)
    return counter


def test_writers_readers_and_packer(tmp_path):
    path = str(tmp_path / "Data.rfs")
    with capture_log():
        db = ZODB.DB(refstorage.FileStorage(path), pool_size=WRITERS + READERS + 2)
        try:
            _init(db)
            run = Run(db, time.monotonic() + SECONDS)
            threads = [threading.Thread(target=run.guard, args=(run.writer, i), name=f"writer{i}")
                       for i in range(WRITERS)]
            threads += [threading.Thread(target=run.guard, args=(run.reader, 100 + i), name=f"reader{i}")
                        for i in range(READERS)]
            threads.append(threading.Thread(target=run.guard, args=(run.packer,), name="packer"))
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(SECONDS + 120)
                assert not t.is_alive(), f"{t.name} hangs"
            elapsed = time.monotonic() - started
            assert not run.violations, "\n".join(run.violations[:10])
            assert run.commits > 0 and run.snapshots > 0
            counter = _final_check(db, run.commits)
        finally:
            db.close()
        db = ZODB.DB(refstorage.FileStorage(path))
        try:
            _final_check(db, counter)
        finally:
            db.close()
    report("concurrency", threads=WRITERS + READERS, seconds=round(elapsed, 1),
           thread_seconds=round((WRITERS + READERS) * elapsed, 1), commits=run.commits,
           conflicts_retried=run.conflicts, reader_snapshots=run.snapshots, packs=run.packs,
           violations=len(run.violations))


HOLDER = textwrap.dedent("""
    import sys, time
    import refstorage
    st = refstorage.FileStorage(sys.argv[1])
    print("ready", flush=True)
    time.sleep(120)
""")


def test_second_writer_process_fails_at_once_until_the_holder_is_killed(tmp_path):
    path = str(tmp_path / "Data.rfs")
    st = refstorage.FileStorage(path)
    tid = commit(st, {b"\0" * 8: b"before"})
    st.close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "ready"
        started = time.monotonic()
        with pytest.raises(errors.StorageLockedError, match=f"pid {holder.pid}") as info:
            refstorage.FileStorage(path)
        waited = time.monotonic() - started
        assert waited < 2.0, f"the second writer waited {waited:.1f} s"
        assert path in str(info.value)
        ro = refstorage.FileStorage(path, read_only=True)  # readers may open beside the writer
        assert ro.lastTransaction() == tid
        ro.close()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=60)
        holder.stdout.close()
    st = refstorage.FileStorage(path)  # the kernel dropped the dead holder's lock
    assert st.load(b"\0" * 8) == (b"before", tid)
    commit(st, {b"\0" * 8: b"after"})
    st.close()
    report("lock", refused_after_seconds=round(waited, 4))
