"""Many ZEO clients while the server is killed with SIGKILL and restarted.

`refstorage serve` (a subprocess, 127.0.0.1, one fixed port) serves one file.
Client processes (zeo_client_child.py; 3 for 8 s in CI, 6 for 120 s with
``--long``) commit and check snapshots through it without pause.  Meanwhile
the test kills the server with SIGKILL at random moments (0.4 to 2 s of
uptime) and restarts it; the clients reconnect by themselves (ZEO's client,
with its cache verification), nothing restarts them.

After each kill, before the restart, the test reads what every client has
acknowledged so far (its ack file); once the server is back it opens the file
read-only beside it, and every acknowledged counter must be there (a and b of
each client equal, and at least the acknowledged value).  The clients check
their own snapshots (see zeo_client_child.py).  At the end the server stops
cleanly and the file is checked once more: each client's counter is its last
acknowledged value or a commit that was in doubt, and the storage's
invariants hold (helpers.check_storage).  Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
import ZODB
from persistent.mapping import PersistentMapping

import refstorage

from .helpers import check_storage, child_env, report, scaled

pytestmark = pytest.mark.reliability

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zeo_client_child.py")
# Errors a client may see while the server is down or just restarted.
EXPECTED_ERRORS = {"ClientDisconnected", "ConflictError", "ReadConflictError", "ClientStorageError"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(path: str, port: int, log) -> tuple[subprocess.Popen, float]:
    """The server, once it listens (its first stdout line); returns it and the seconds it took."""
    began = time.monotonic()
    deadline = began + 60
    while True:
        proc = subprocess.Popen([sys.executable, "-m", "refstorage", "serve", path, "--port", str(port)],
                                env=child_env(), stdout=subprocess.PIPE, stderr=log, text=True)
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        if line.startswith("serving "):
            return proc, time.monotonic() - began
        # e.g. the port not free yet after the kill: try again, bounded
        proc.kill()
        proc.wait(10)
        if time.monotonic() > deadline:
            raise AssertionError(f"server did not start: {line!r}")
        time.sleep(0.2)


def _last_ack(path: str) -> int:
    with open(path) as f:
        lines = f.read().split()
    return int(lines[-1]) if lines else 0


def _counters(path: str, clients: int) -> list[tuple[int, int]]:
    """(a, b) of each client, read from the file (read-only, beside the server)."""
    st = refstorage.FileStorage(path, read_only=True)
    db = ZODB.DB(st)
    try:
        conn = db.open()
        root = conn.root()
        return [(root[f"a{i}"]["n"], root[f"b{i}"]["n"]) for i in range(clients)]
    finally:
        db.close()


def test_many_clients_while_the_server_is_killed(tmp_path):
    clients = scaled(3, 6)
    seconds = scaled(8.0, 120.0)
    rng = random.Random(20261130)
    path = str(tmp_path / "Data.rfs")
    db = ZODB.DB(refstorage.FileStorage(path, create=True))
    with db.transaction() as conn:
        for i in range(clients):
            conn.root()[f"a{i}"] = PersistentMapping(n=0)
            conn.root()[f"b{i}"] = PersistentMapping(n=0)
    db.close()

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server, _ = _start_server(path, port, log)
    acks = [str(tmp_path / f"acks-{i}") for i in range(clients)]
    procs = [subprocess.Popen([sys.executable, CHILD, str(port), str(i), str(clients), str(seconds), acks[i],
                               str(rng.randrange(1 << 30))],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(clients)]
    kills = 0
    restart_times = []
    checked_after_restart = 0
    try:
        end = time.monotonic() + seconds - 1.0
        while time.monotonic() < end and kills < 500:
            time.sleep(rng.uniform(0.4, 2.0))
            if any(p.poll() is not None for p in procs):
                break
            server.send_signal(signal.SIGKILL)
            server.wait(30)
            kills += 1
            acked = [_last_ack(a) for a in acks]  # nothing can be acknowledged while it is down
            time.sleep(rng.uniform(0, 0.3))
            server, took = _start_server(path, port, log)
            restart_times.append(took)
            for i, (a, b) in enumerate(_counters(path, clients)):
                assert a == b, f"after restart {kills}: client {i} has a={a}, b={b}"
                assert a >= acked[i], f"restart {kills}: client {i} acknowledged {acked[i]}, file has {a}"
                checked_after_restart += 1
        results = []
        for p in procs:
            out, err = p.communicate(timeout=seconds + 120)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        log.close()
    assert server.returncode == 0, "the server did not stop cleanly on SIGTERM"
    assert kills >= scaled(3, 40), f"only {kills} kills"

    final = _counters(path, clients)
    for r in sorted(results, key=lambda r: r["index"]):
        i = r["index"]
        assert r["violations"] == [], (i, r["violations"])
        assert set(r["errors"]) <= EXPECTED_ERRORS, r["errors"]
        assert r["acked"] == _last_ack(acks[i])
        a, b = final[i]
        assert a == b and (a == r["acked"] or a in r["doubt"]), (i, final[i], r)
        assert r["figures"].get("commits acknowledged", 0) > 0
    st = refstorage.FileStorage(path, read_only=True)
    try:
        check_storage(st)
    finally:
        st.close()

    total = lambda key: sum(r["figures"].get(key, 0) for r in results)
    errors = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    report("zeo_faults", clients=clients, seconds=seconds, kills=kills,
           restart_s_median=round(sorted(restart_times)[len(restart_times) // 2], 2),
           acknowledged=total("commits acknowledged"), in_doubt=total("commits in doubt"),
           snapshots_checked=total("snapshots checked"), reconnections=total("reconnections"),
           counters_checked_after_restarts=checked_after_restart, client_errors=errors,
           lost=0, violations=0)
