"""`refstorage replicate SOURCE REPLICA`: keep a refstorage replica of a ZEO-served storage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import click

from ..replicate import PackSchedule, ReplicationStats, Replicator, open_source, tid_time
from . import main
from .common import emit_json, failing_cleanly, progress_bar


def open_replica(path: str, blob_dir: str | None):
    """The replica storage (created if missing), writable."""
    from ..storage import FileStorage
    for what, value in (("REPLICA", path), ("--blob-dir", blob_dir)):
        if value and not os.path.isdir(os.path.dirname(os.path.abspath(value))):
            raise click.ClickException(f"{what}: the directory that should hold {value} does not exist")
    return FileStorage(path, create=not os.path.exists(path), blob_dir=blob_dir)


class _Stopper:
    """Remembers a stop request made before the replicator exists."""

    def __init__(self) -> None:
        self.requested = False
        self.replicator: Replicator | None = None

    def attach(self, replicator: Replicator) -> None:
        self.replicator = replicator
        if self.requested:
            replicator.stop()

    def __call__(self, signum, frame) -> None:
        self.requested = True
        if self.replicator is not None:
            self.replicator.stop()


@contextmanager
def stopping_on_signals() -> Iterator[_Stopper]:
    """SIGTERM and SIGINT end the run after the transaction being copied."""
    stopper = _Stopper()
    old = {sig: signal.signal(sig, stopper) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopper
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class StatusLine:
    """A progress bar while catching up, then one status line while following.

    The bar counts seconds of the source's history: its total runs to the
    source's last transaction (as its ZEO client knows it, so it moves while
    commits go on), and tqdm shows the rate and the ETA.  With `as_json`,
    the same figures go to stderr as JSON lines instead: one a second at most
    while catching up ("catching up"), one when caught up, then one every
    10 s while following ("following")."""

    def __init__(self, replicator: Replicator, source: str, enabled: bool, as_json: bool = False):
        self.replicator = replicator
        self.source = source
        self.enabled = enabled
        self.as_json = as_json and enabled
        self.tty = enabled and not self.as_json and sys.stderr.isatty()
        self.bar = progress_bar(None, "catching up", unit="s") if enabled and not self.as_json else None
        self._last_line = 0.0
        self._caught_up = False

    def __call__(self, stats: ReplicationStats) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.replicator.following:
            progress = self.replicator.progress()
            if self.as_json:
                if now - self._last_line >= 1.0:
                    self._last_line = now
                    self._json_line("catching up", progress.as_dict())
                return
            if self.bar is not None:
                total = round(progress.total, 2)
                if self.bar.total != total:
                    self.bar.total = total
                self.bar.n = round(progress.done, 2)
                self.bar.set_postfix_str(f"{progress.transactions} txn", refresh=False)
                self.bar.update(0)
            return
        if not self._caught_up:
            self._caught_up = True
            self.caught_up()
        if not self.tty and now - self._last_line < 10.0:
            return
        self._last_line = now
        lag = stats.lags[-1] if stats.lags else 0.0
        if self.as_json:
            self._json_line("following", {"transactions": stats.transactions,
                                          "replica_last_tid": stats.last_tid.hex(),
                                          "lag_s": round(lag, 4)})
            return
        line = (f"following {self.source}: {stats.transactions} transactions copied, last "
                f"{stats.last_tid.hex()} ({time.strftime('%H:%M:%S', time.gmtime(tid_time(stats.last_tid)))} "
                f"UTC), lag {lag:.3f} s")
        if self.tty:
            sys.stderr.write("\r" + line[:200] + "\x1b[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def caught_up(self) -> None:
        """The first catch-up is done: close the bar (with --json: say so)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.as_json:
            self._json_line("caught up", self.replicator.progress().as_dict())

    def _json_line(self, phase: str, fields: dict) -> None:
        sys.stderr.write(json.dumps({"phase": phase, **fields}) + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and not self._caught_up:
            self._caught_up = True
            self.caught_up()
        if self.bar is not None:
            self.bar.close()
        if self.tty:
            sys.stderr.write("\n")


def summary(stats: ReplicationStats, seconds: float) -> dict:
    return {"transactions": stats.transactions, "records": stats.records, "blobs": stats.blobs,
            "bytes": stats.bytes, "last_tid": stats.last_tid, "reconnects": stats.reconnects,
            "seconds": round(seconds, 3), "lag": stats.lag_summary()}


@main.command()
@click.argument("source")
@click.argument("replica", type=click.Path(dir_okay=False))
@click.option("--blob-dir", type=click.Path(file_okay=False), default=None,
              help="The replica's blob directory (needed when the source has blobs).")
@click.option("--storage", default=None, help="ZEO storage name on the source [default: 1].")
@click.option("--once", is_flag=True, help="Catch up, then exit (a backup or a migration step).")
@click.option("--poll", type=click.FloatRange(0.05, 3600), default=5.0, show_default=True,
              help="Look for new commits at least this often (seconds); invalidations wake it sooner.")
@click.option("--wait-timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="Seconds to wait for the source at start.")
@click.option("--pack-days", type=click.FloatRange(0), default=None,
              help="While following, pack the replica every --pack-every hours, keeping this many "
                   "days of history (the replica's own schedule).")
@click.option("--pack-every", type=click.FloatRange(0.0001), default=24.0, show_default=True,
              help="Hours between the replica's packs (with --pack-days).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or status line.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON when it ends, and (without -q) the progress as JSON "
                   "lines on stderr.")
def replicate(source: str, replica: str, blob_dir: str | None, storage: str | None, once: bool,
              poll: float, wait_timeout: float, pack_days: float | None, pack_every: float,
              quiet: bool, as_json: bool) -> None:
    """Copy the transactions of the ZEO server SOURCE into the refstorage file REPLICA.

    SOURCE is HOST:PORT or zeo://HOST:PORT?storage=NAME, serving any storage
    (refstorage, ZODB's FileStorage, another replica).  REPLICA is created if
    missing.  Each transaction keeps its tid, status, user, description,
    extension, records, backpointers and blobs.  It resumes after the
    replica's last transaction and refuses a replica whose history diverges
    from the source's.  Without --once it then follows new commits until
    SIGTERM or Ctrl-C.
    """
    with failing_cleanly(), stopping_on_signals() as stopper:
        t0 = time.perf_counter()
        dest = open_replica(replica, blob_dir)
        cache = tempfile.mkdtemp(prefix="refstorage-replicate-") if blob_dir else None
        try:
            src = open_source(source, blob_cache=cache, wait_timeout=wait_timeout, storage=storage)
            try:
                replicator = Replicator(src, dest, replica_name=os.path.abspath(replica),
                                        poll_interval=poll)
                status = StatusLine(replicator, source, enabled=not quiet, as_json=as_json)
                replicator.on_progress = status
                stopper.attach(replicator)
                schedule = None
                if pack_days is not None and not once:
                    schedule = PackSchedule(dest, pack_days, pack_every * 3600)
                    schedule.start()
                try:
                    stats = replicator.run(follow=not once)
                finally:
                    if schedule is not None:
                        schedule.stop()
                    status.close()
            finally:
                src.close()
        finally:
            dest.close()
            if cache:
                shutil.rmtree(cache, ignore_errors=True)
    result = summary(stats, time.perf_counter() - t0)
    if as_json:
        emit_json(result)
    else:
        lag = result["lag"]
        lag_text = (f"; lag p50 {lag['p50']:.3f} s, p99 {lag['p99']:.3f} s, max {lag['max']:.3f} s"
                    if lag["count"] else "")
        click.echo(f"copied {stats.transactions} transactions, {stats.records} records, "
                   f"{stats.blobs} blobs ({stats.bytes} bytes of data) in {result['seconds']:.2f} s; "
                   f"replica at {stats.last_tid.hex()}{lag_text}")
