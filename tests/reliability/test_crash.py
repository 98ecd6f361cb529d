"""Process crash: SIGKILL a committing process anywhere; nothing acknowledged is lost.

A fork server (crash_child.py) runs short random workloads -- stores, undos,
aborted transactions, and in the "pack" mode packs -- against one file, and
reports every step only after it finished (a store or undo after tpc_finish
returned).  Each worker is killed once, with SIGKILL:

- at the n-th occurrence of a named event: the fault points of a commit
  (after the data write, after the status flip, after the fsync), of an index
  save and of a pack, of creating the file, or before/after the n-th write,
  fsync, truncate, rename, link or directory fsync;
- or at a random moment chosen by the parent.

Then the parent reopens the file, read-only and read-write, and checks: the
reopen succeeds; no acknowledged transaction is lost; the state is the model
after *some* prefix of the attempted commits (the acknowledged ones, or those
plus the one in flight); a full verifying scan finds no damage; the index
equals a fresh scan; every object loads its model value.  A file goes through
several kill rounds (so recovery is followed by more commits and kills)
before a fresh one starts.

CI: at least 200 kills; ``--long``: 2,000.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from ZODB.utils import p64

from refstorage import fileformat as fmt

from . import crash_child
from .helpers import (
    TxnModel,
    capture_log,
    check_model,
    check_storage,
    child_env,
    open_storage,
    report,
    scaled,
    temp_dir,
    value_data,
)

pytestmark = [pytest.mark.reliability,
              pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")]

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_child.py")
KILLS = scaled(200, 2000)
TIME_LIMIT = scaled(240, 3600)  # seconds; the loop stops (and fails) past this
STEPS = 10
ROUNDS = 3  # kill rounds per file before a fresh file
WORKER_TIMEOUT = 60

# Events at which a worker kills itself ("random": the parent kills it at a random time).
EVENTS = [
    "point:commit.after-data-write", "point:commit.after-status-flip", "point:commit.after-fsync",
    "pwrite.before", "pwrite.after", "fsync.before", "fsync.after",
    "ftruncate.before", "ftruncate.after",
    "point:index.save.after-write", "point:index.save.after-fsync", "point:index.save.after-replace",
    "replace.before", "replace.after", "fsync_dir.before", "fsync_dir.after",
    "point:create.after-write", "point:create.after-fsync", "point:create.after-replace",
    "point:pack.after-gc", "point:pack.after-copy", "point:pack.after-fsync",
    "point:pack.after-link-old", "point:pack.after-replace", "point:pack.after-index-save",
    "link.before", "link.after",
]
RANDOM_SHARE = 0.3


class ForkServer:
    """The crash_child.py fork server, driven over pipes with deadlines."""

    def __init__(self, workdir: str):
        self.err_path = os.path.join(workdir, "server.stderr")
        self.err = open(self.err_path, "w+b")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen([sys.executable, CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, env=child_env())
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)
        self.buf = b""
        assert self.readline(time.monotonic() + 60) == "ready", self.stderr()

    def stderr(self) -> str:
        self.err.flush()
        with open(self.err_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def readline(self, deadline: float) -> str | None:
        """The next line, or None if none came before `deadline`."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"fork server died:\n{self.stderr()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def run(self, spec: dict, kill_after: float | None = None) -> tuple[list[str], int]:
        """Run one worker; SIGKILL it `kill_after` seconds after it started, if given."""
        self.proc.stdin.write((json.dumps(spec) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + WORKER_TIMEOUT
        line = self.readline(deadline)
        assert line and line.startswith("pid "), (line, self.stderr())
        pid = int(line.split()[1])
        kill_at = None if kill_after is None else time.monotonic() + kill_after
        lines = []
        while True:
            until = deadline if kill_at is None else min(deadline, kill_at)
            line = self.readline(until)
            if line is None:
                if kill_at is not None and time.monotonic() >= kill_at:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:  # it just ended (its "exit" line is on the way)
                        pass
                    kill_at = None
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"worker {spec} did not finish in {WORKER_TIMEOUT} s")
            if line.startswith("exit "):
                return lines, int(line.split()[1])
            lines.append(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(b'{"quit": true}\n')
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stdin.close()
        self.err.close()


def _spec(path: str, seed: int, round_: int, pack: bool, kill: dict | None = None) -> dict:
    return {"path": path, "seed": seed, "round": round_, "steps": STEPS, "pack": pack,
            "index_save_bytes": 3000, "write_chunk": 700, "kill": kill}


def _side_files(path: str) -> set[str]:
    d, base = os.path.split(path)
    return {n for n in os.listdir(d) if n.startswith(os.path.basename(base) + ".tr")}


class Chain:
    """One data file through several kill rounds, with the model of what it must hold."""

    def __init__(self, path: str, seed: int, pack: bool):
        self.path = path
        self.seed = seed
        self.pack = pack
        self.round = 0
        self.model = TxnModel()

    def check(self, steps: list[dict], lines: list[str], code: int, stats: Counter) -> None:
        """Reopen after a worker ended (killed or not) and check everything."""
        done: dict[int, tuple[str, str | None]] = {}
        for line in lines:
            word, *rest = line.split()
            if word == "counts":
                continue
            i = int(rest[0])
            done[i] = (word, rest[1] if len(rest) > 1 else None)
        assert sorted(done) == list(range(len(done))), f"steps reported out of order: {lines}"
        model = self.model
        last_store: tuple[bytes, dict] | None = None
        for i in range(len(done)):
            word, tid_hex = done[i]
            step = steps[i]
            if word == "ack":
                writes = self._writes(step, last_store)
                model.add(bytes.fromhex(tid_hex), writes)
                last_store = (bytes.fromhex(tid_hex), writes) if step["kind"] == "store" else None
                stats["acked"] += 1
            elif word == "packed":
                stats["packs completed"] += 1
                last_store = None
            else:
                last_store = None
        in_flight = None
        if code != 0 and len(done) < len(steps) and steps[len(done)]["kind"] in ("store", "undo"):
            in_flight = self._writes(steps[len(done)], last_store)
        before = _side_files(self.path)
        with capture_log() as log:
            ro_last = None
            if os.path.exists(self.path):
                ro = open_storage(self.path, read_only=True)
                ro_last = ro.lastTransaction()
                ro.close()
            st = open_storage(self.path)
        try:
            last = st.lastTransaction()
            if last != model.last_tid():
                assert in_flight is not None and last > model.last_tid(), (
                    f"lastTransaction {last.hex()} is neither the last acknowledged "
                    f"{model.last_tid().hex()} nor an in-flight commit after it")
                model.add(last, in_flight)
                stats["in-flight commit kept"] += 1
            elif in_flight is not None:
                stats["in-flight commit dropped"] += 1
            assert ro_last in (None, last), "read-only open serves another prefix"
            # a pack killed after its rename has packed the file without saying so
            after = st._pack_tid
            assert after == fmt.Z64 or (self.pack and after <= model.last_tid())
            check_model(st, model, oids=[p64(i) for i in range(crash_child.OID_POOL)],
                        history=True, after_tid=after)
            self._check_iterator(st, after)
            check_storage(st)
        finally:
            st.close()
        new = _side_files(self.path) - before
        if new:
            stats["torn tails moved to a side file"] += 1
            assert any("incomplete last transaction" in r.getMessage() for r in log), \
                "a side file was written without a warning"
        self.round += 1

    def _writes(self, step: dict, last_store) -> dict[bytes, bytes | None]:
        if step["kind"] == "store":
            return {p64(o): value_data(v) for o, v in step["writes"].items()}
        assert last_store is not None
        # undo of the previous (store) transaction: each oid goes back to before it
        before = self.model.state(len(self.model) - 1)
        assert self.model.last_tid() == last_store[0]
        return {oid: before.get(oid) for oid in last_store[1]}

    def _check_iterator(self, st, after: bytes) -> None:
        txns = {tid: writes for tid, writes in self.model.txns}
        seen = []
        for t in st.iterator():
            seen.append(t.tid)
            records = {r.oid: r.data for r in t}
            if t.tid > after:
                assert records == txns[t.tid], f"transaction {t.tid.hex()} holds other records"
            else:  # packed: what is left must be what was written
                for oid, data in records.items():
                    assert data == txns[t.tid][oid]
        if after == fmt.Z64:
            assert seen == self.model.tids
        else:
            assert [t for t in self.model.tids if t > after] == [t for t in seen if t > after]
            assert set(seen) <= set(txns)


def _calibrate(server: ForkServer, workdir: str) -> dict:
    """Event counts and run time of whole (unkilled) runs, per mode and first/later round."""
    counts: dict[tuple[bool, bool], Counter] = {}
    seconds = []
    for pack in (False, True):
        path = os.path.join(workdir, f"calibrate-{int(pack)}.rfs")
        chain = Chain(path, 999, pack)
        for round_ in range(2):
            spec = _spec(path, 999, round_, pack)
            started = time.monotonic()
            lines, code = server.run(spec)
            seconds.append(time.monotonic() - started)
            assert code == 0, server.stderr()
            got = Counter(json.loads(lines[-1].split(" ", 1)[1]))
            counts.setdefault((pack, round_ == 0), Counter()).update(got)
            chain.check(crash_child.plan(999, round_, STEPS, pack), lines, code, Counter())
    return {"counts": counts, "seconds": max(seconds)}


def test_sigkill_never_loses_an_acknowledged_transaction():
    rng = random.Random(20240607)
    stats: Counter = Counter()
    kills_by_event: Counter = Counter()
    started = time.monotonic()
    with temp_dir() as workdir:
        server = ForkServer(workdir)
        try:
            cal = _calibrate(server, workdir)
            kills = cases = 0
            chain = None
            nfile = 0
            while kills < KILLS:
                assert time.monotonic() - started < TIME_LIMIT, (
                    f"only {kills} kills in {TIME_LIMIT} s: {dict(kills_by_event)}")
                if chain is None or chain.round >= ROUNDS:
                    if chain is not None:
                        for name in os.listdir(workdir):
                            if name.startswith("Data"):
                                os.remove(os.path.join(workdir, name))
                    nfile += 1
                    chain = Chain(os.path.join(workdir, "Data.rfs"), rng.randrange(1 << 30),
                                  pack=nfile % 3 == 0)
                counts = cal["counts"][(chain.pack, chain.round == 0)]
                kill = None
                kill_after = None
                if rng.random() < RANDOM_SHARE:
                    event = "random"
                    kill_after = rng.uniform(0, cal["seconds"])
                else:
                    # the eligible event killed least so far: every one gets its share
                    eligible = [e for e in EVENTS if counts[e]]
                    fewest = min(kills_by_event[e] for e in eligible)
                    event = rng.choice([e for e in eligible if kills_by_event[e] == fewest])
                    kill = {"event": event, "nth": rng.randint(1, counts[event])}
                spec = _spec(chain.path, chain.seed, chain.round, chain.pack, kill)
                lines, code = server.run(spec, kill_after)
                cases += 1
                if code not in (0, -signal.SIGKILL):
                    raise AssertionError(f"worker failed (exit {code}) for {spec}:\n{server.stderr()}")
                steps = crash_child.plan(chain.seed, chain.round, STEPS, chain.pack)
                try:
                    chain.check(steps, lines, code, stats)
                except BaseException as exc:
                    raise AssertionError(f"after {spec} (kill after {kill_after}): {exc}") from exc
                if code == -signal.SIGKILL:
                    kills += 1
                    kills_by_event[event] += 1
                else:
                    stats["runs finished before the kill"] += 1
        finally:
            server.close()
    elapsed = time.monotonic() - started
    report("crash", kills=kills, cases=cases, files=nfile, seconds=round(elapsed, 1),
           kills_by_event=dict(sorted(kills_by_event.items())), **{k: v for k, v in stats.items()})
    assert kills >= KILLS
    # every event that occurs in a workload killed a worker at least once
    occurring = {e for c in cal["counts"].values() for e in EVENTS if c[e]}
    assert occurring - set(kills_by_event) == set()
