"""Replication through ZEO: a replica is a ZEO client of the primary.

A `Replicator` copies the transactions of any ZEO-served storage (refstorage,
ZODB's FileStorage, another replica) into a refstorage replica, keeping each
transaction's tid, status, user, description and extension, each record's
data and backpointer (``data_txn``) and each blob file.  It uses nothing but
ZEO's public client API and the storages' public API:

* reading: ``ClientStorage.iterator(start)`` (ZEO's remote iterator), and
  ``ClientStorage.loadBlob(oid, tid)`` for blob files;
* writing: ``tpc_begin(txn, tid, status)``, ``restore``/``restoreBlob``,
  ``tpc_vote``, ``tpc_finish`` on the replica, one source transaction per
  replica transaction, so the replica's ``lastTransaction()`` is always the
  last source transaction copied whole;
* waking: the source's invalidations (the replicator registers itself as the
  ClientStorage's database), with a bounded poll as a fallback.

Resuming is therefore exact after a restart, a lost connection or a kill -9
of either side: the replica's torn tail (if any) is dropped when it is
reopened, and copying starts again after its last transaction.  Before
copying, the replicator checks that the replica's last transaction is in the
source with the same metadata (and, after each (re)connection, the same
records); otherwise the histories diverge and it raises
`HistoryDivergedError`, naming the first tid that differs.

Pack: a pack on the source keeps every transaction after the pack time and
may drop records (and emptied transactions) before it; the check tolerates a
transaction whose packed copy lost records (records present on both sides
must be equal).  The replica packs on its own schedule.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from ZODB.blob import is_blob_record
from ZODB.Connection import TransactionMetaData
from ZODB.interfaces import IBlobStorage
from ZODB.POSException import POSKeyError
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import p64, u64, z64

from .errors import HistoryDivergedError, ReplicationError

logger = logging.getLogger(__name__)

__all__ = ["Replicator", "ReplicationStats", "Follower", "PackSchedule", "parse_source", "open_source",
           "piece_ranges", "CatchUpProgress"]

DEFAULT_STORAGE = "1"


def parse_source(spec: str) -> tuple[tuple[str, int], dict[str, str]]:
    """((host, port), options) of a source: ``host:port`` or ``zeo://host:port?storage=NAME``.

    Options kept: ``storage`` (the ZEO storage name, default "1") and
    ``wait_timeout`` (seconds)."""
    options: dict[str, str] = {}
    netloc = spec
    if "://" in spec:
        parts = urlsplit(spec)
        if parts.scheme != "zeo":
            raise ReplicationError(f"{spec!r}: a replication source is a ZEO address "
                                   "(host:port or zeo://host:port)")
        netloc = parts.netloc
        for name, value in parse_qsl(parts.query):
            if name in ("storage", "wait_timeout"):
                options[name] = value
    host, sep, port = netloc.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ReplicationError(f"{spec!r}: expected HOST:PORT or zeo://HOST:PORT[?storage=NAME]")
    return (host.strip("[]"), int(port)), options


def open_source(spec: str, blob_cache: str | None = None, wait_timeout: float = 30.0,
                storage: str | None = None, wait: bool = True):
    """A read-only ZEO ClientStorage of the source `spec` (connected, with `wait`)."""
    from ZEO.ClientStorage import ClientStorage
    from ZEO.Exceptions import ClientDisconnected

    addr, options = parse_source(spec)
    name = storage or options.get("storage", DEFAULT_STORAGE)
    if "wait_timeout" in options:
        wait_timeout = float(options["wait_timeout"])
    try:
        return ClientStorage(addr, storage=name, read_only=True, blob_dir=blob_cache,
                             shared_blob_dir=False, wait=wait, wait_timeout=wait_timeout,
                             cache_size=1 << 20)
    except ClientDisconnected as exc:
        raise ReplicationError(f"cannot reach the ZEO server at {addr[0]}:{addr[1]} "
                               f"within {wait_timeout:g} s ({exc})") from exc


@dataclass
class ReplicationStats:
    """What a replicator did; `lags` holds the last lags measured while following."""
    transactions: int = 0
    records: int = 0
    blobs: int = 0
    bytes: int = 0
    last_tid: bytes = z64
    reconnects: int = 0
    lags: deque = field(default_factory=lambda: deque(maxlen=100_000))

    def lag_summary(self) -> dict[str, float | int]:
        """count, p50, p99 and max of the measured lags, in seconds."""
        values = sorted(self.lags)
        if not values:
            return {"count": 0}

        def pct(q: float) -> float:
            return round(values[min(len(values) - 1, int(q * len(values)))], 4)

        return {"count": len(values), "p50": pct(0.50), "p99": pct(0.99), "max": round(values[-1], 4)}


@dataclass
class CatchUpProgress:
    """How far a catch-up is, in seconds of the source's history (what ZEO tells for free).

    `total` spans from the first transaction this run copies (or the
    replica's last one) to the source's last transaction as its client knows
    it (ClientStorage.lastTransaction, no round trip); `done` up to the
    replica's last transaction.  `eta` (seconds, None until something was
    copied) assumes history keeps being copied at the rate so far."""
    transactions: int
    done: float
    total: float
    eta: float | None
    source_last: bytes
    replica_last: bytes

    def as_dict(self) -> dict:
        return {"transactions": self.transactions, "done_s": round(self.done, 3),
                "total_s": round(self.total, 3),
                "eta_s": None if self.eta is None else round(self.eta, 1),
                "source_last_tid": self.source_last.hex(), "replica_last_tid": self.replica_last.hex()}


class _Listener:
    """Stands in for a DB on the source ClientStorage: turns invalidations into wake-ups."""

    def __init__(self, wake: threading.Event):
        self._wake = wake
        self.connections = 0

    def invalidate(self, tid, oids, version: str = "") -> None:
        self._wake.set()

    def invalidateCache(self) -> None:  # called on every (re)connection
        self.connections += 1
        self._wake.set()

    def transform_record_data(self, data: bytes) -> bytes:
        return data

    untransform_record_data = transform_record_data

    def references(self, record, oids=None):  # pragma: no cover - not used by ClientStorage
        from ZODB.serialize import referencesf
        return referencesf(record, oids)


def tid_time(tid: bytes) -> float:
    return TimeStamp(tid).timeTime()


# A range of tids narrower than this (about 10 ms of commits) is not split.
MIN_PIECE = 10 * (1 << 32) // 60_000


def piece_ranges(start: bytes, target: bytes, pieces: int) -> list[tuple[bytes, bytes | None]]:
    """[start, target] cut into up to `pieces` consecutive (first, last) tid ranges, the last open.

    The ranges cover every tid from `start` on, in order, without overlap:
    (start, a), (a + 1, b), ..., (x + 1, None).  Tids count 2**32 per minute
    (ZODB's TimeStamp), so equal integer spans are about equal spans of
    time; a span under MIN_PIECE (or pieces=1) gives one open range."""
    lo, hi = u64(start), u64(target)
    n = min(pieces, (hi - lo) // MIN_PIECE) if hi > lo else 1
    if n <= 1:
        return [(start, None)]
    step = (hi - lo) // n
    bounds = [lo + step * i for i in range(1, n)]
    ranges: list[tuple[bytes, bytes | None]] = []
    first = lo
    for b in bounds:
        ranges.append((p64(first), p64(b)))
        first = b + 1
    ranges.append((p64(first), None))
    return ranges


def _next_tid(tid: bytes) -> bytes:
    return p64(u64(tid) + 1)


def _extension(txn) -> dict:
    ext = getattr(txn, "extension", None)
    if isinstance(ext, dict):
        return ext
    return TransactionMetaData(extension=ext or b"").extension


def _metadata(txn) -> tuple:
    def as_bytes(v):
        return v.encode("utf-8") if isinstance(v, str) else bytes(v or b"")
    return (txn.tid, as_bytes(txn.user), as_bytes(txn.description), _extension(txn))


class Replicator:
    """Copies the source's new transactions into `replica` (a writable refstorage).

    `source` is a ZEO ClientStorage (see `open_source`); `on_commit(tid, oids)`
    is called after each copied transaction (a read-only server over the
    replica uses it to send ZEO invalidations); `on_progress(stats)` after
    each transaction too.  `run()` catches up, then follows until `stop()`.
    `pieces` is how many remote iterators may read at once (see `catch_up`).
    """

    def __init__(self, source, replica, *, replica_name: str | None = None,
                 on_commit: Callable[[bytes, list[bytes]], None] | None = None,
                 on_progress: Callable[[ReplicationStats], None] | None = None,
                 poll_interval: float = 5.0, retry_interval: float = 0.5,
                 pieces: int = 8):
        self.source = source
        self.pieces = max(1, pieces)
        self.replica = replica
        self.replica_name = replica_name or str(getattr(replica, "getName", lambda: "replica")())
        self.on_commit = on_commit
        self.on_progress = on_progress
        self.poll_interval = poll_interval
        self.retry_interval = retry_interval
        self.stats = ReplicationStats(last_tid=replica.lastTransaction())
        # where this run's history starts (tid time), and when its first copy ended
        self._origin: float | None = tid_time(self.stats.last_tid) if self.stats.last_tid != z64 else None
        self._first_copied: float | None = None
        self.following = False  # lags are measured once the first catch-up is done
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._listener = _Listener(self._wake)
        self._checked_connection = -1
        self._blobs = False
        source.registerDB(self._listener)
        if source.is_connected():
            self._check_blobs()

    def _check_blobs(self) -> None:
        """The source's interfaces are known once it is connected."""
        self._blobs = IBlobStorage.providedBy(self.source)
        if self._blobs and not IBlobStorage.providedBy(self.replica):
            raise ReplicationError(
                f"the source serves blobs but the replica {self.replica_name} has no blob "
                "directory: give it one (--blob-dir)")

    # -- control -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask run()/catch_up() to return after the transaction being copied."""
        self._stop.set()
        self._wake.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self, follow: bool = True, deadline: float | None = None) -> ReplicationStats:
        """Catch up; with `follow`, keep copying new commits until stop() (or time.monotonic() > deadline).

        A lost connection is retried (ZEO's client reconnects by itself);
        without `follow`, a connection lost for more than 30 s ends the run
        with ReplicationError."""
        from ZEO.Exceptions import ClientDisconnected

        lost_since: float | None = None
        while not self.stopped:
            if deadline is not None and time.monotonic() > deadline:
                break
            self._wake.clear()
            try:
                self.catch_up()
                lost_since = None
            except (ClientDisconnected, ConnectionError, TimeoutError) as exc:
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    self.stats.reconnects += 1
                    logger.warning("lost the source (%s); retrying", exc)
                if not follow and now - lost_since > 30.0:
                    raise ReplicationError(f"the source stayed unreachable for 30 s ({exc})") from exc
                self._stop.wait(self.retry_interval)
                continue
            if not follow:
                break
            if not self.following:
                self.following = True
                if self.on_progress is not None:  # the first catch-up is done
                    self.on_progress(self.stats)
            wait = self.poll_interval
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            self._wake.wait(wait)
        return self.stats

    def progress(self) -> CatchUpProgress:
        """How far this run has come towards the source's last transaction (no round trip)."""
        stats = self.stats
        source_last = self.source.lastTransaction() or z64
        last = stats.last_tid
        if self._origin is None or source_last == z64:
            return CatchUpProgress(stats.transactions, 0.0, 0.0, None, source_last, last)
        total = max(0.0, tid_time(source_last) - self._origin)
        done = min(total, max(0.0, tid_time(last) - self._origin)) if last != z64 else 0.0
        eta = None
        if self._first_copied is not None and done > 0:
            elapsed = time.monotonic() - self._first_copied
            eta = (total - done) * elapsed / done
        return CatchUpProgress(stats.transactions, done, total, eta, source_last, last)

    # -- copying -------------------------------------------------------------------

    def catch_up(self) -> int:
        """Copy every source transaction after the replica's last one; the count copied.

        The transactions to copy are read through several remote iterators at
        once, each over its own range of tids (`piece_ranges`), each in its own
        prefetching thread, and copied in tid order: ZEO's remote iterator
        costs a round trip per transaction and per record, and overlapping
        those of several ranges lets the replica copy faster than a primary
        commits."""
        last = self.replica.lastTransaction()
        deep = self._listener.connections != self._checked_connection
        connection = self._listener.connections
        if deep:
            self._check_blobs()
        copied = 0
        # the source's last tid as its client knows it (no round trip): the
        # ranges after the first are cut up to it, and the last is open-ended
        target = self.source.lastTransaction() or z64
        ranges = piece_ranges(_next_tid(last) if last != z64 else z64, target, self.pieces)
        first_stop = ranges[0][1]
        it = self.source.iterator(last if last != z64 else None, first_stop)
        prefetchers: list[_Prefetcher] = []
        try:
            txns: Iterator = iter(it)
            if last != z64:
                first = next(txns, None)
                mine = first is not None  # in the first range, else in a later one
                if first is None and first_stop is not None:
                    first = next(iter(self.source.iterator(last)), None)
                if first is not None and first.tid > last and self._packed_away(last, first):
                    if mine:
                        txns = itertools.chain([first], txns)
                else:
                    self._check_same(last, first, deep)
                self._checked_connection = connection
            prefetchers.append(_Prefetcher(txns, self._read_records, self._stop))
            for start, stop in ranges[1:]:
                # the iterator starts in the prefetching thread (a round trip)
                prefetchers.append(_Prefetcher(_range(self.source, start, stop),
                                               self._read_records, self._stop))
            for prefetch in prefetchers:
                for txn, recs in prefetch:
                    self._copy(txn, recs)
                    copied += 1
                    if self.stopped:
                        break
                if self.stopped:
                    break
        finally:
            for prefetch in prefetchers:
                prefetch.close()
            close = getattr(it, "close", None)
            if close is not None:
                close()
        return copied

    def _read_records(self, txn) -> list[tuple]:
        """(oid, data, data_txn, blob temporary file or None) of each record of txn."""
        recs = []
        try:
            for rec in txn:
                blob = self._fetch_blob(rec) if self._blobs else None
                recs.append((rec.oid, rec.data, rec.data_txn, blob))
        except BaseException:
            _discard(recs)
            raise
        return recs

    def _copy(self, txn, recs: list[tuple]) -> None:
        replica = self.replica
        tid = txn.tid
        last = replica.lastTransaction()
        if tid <= last:
            _discard(recs)
            raise HistoryDivergedError(self.replica_name, tid, f"the source sent transaction {tid.hex()}, "
                                       f"not after the replica's last one {last.hex()}")
        meta = TransactionMetaData(txn.user, txn.description, _extension(txn))
        try:
            replica.tpc_begin(meta, tid, txn.status)
        except BaseException:
            _discard(recs)
            raise
        oids: list[bytes] = []
        nbytes = records = blobs = 0
        try:
            for i, (oid, data, data_txn, blob) in enumerate(recs):
                if blob is not None:
                    recs[i] = (oid, data, data_txn, None)  # restoreBlob takes the file
                    replica.restoreBlob(oid, tid, data, blob, data_txn, meta)
                    blobs += 1
                else:
                    replica.restore(oid, tid, data, "", data_txn, meta)
                oids.append(oid)
                records += 1
                nbytes += len(data or b"")
            replica.tpc_vote(meta)
            # as ZEO's server does for its own commits, invalidations go out
            # from tpc_finish's callback, before readers can see the transaction
            replica.tpc_finish(meta, lambda tid: self._announce(tid, oids))
        except BaseException:
            replica.tpc_abort(meta)
            _discard(recs)
            raise
        stats = self.stats
        if self._origin is None:  # an empty replica: history starts at the first copy
            self._origin = tid_time(tid)
        if self._first_copied is None:
            self._first_copied = time.monotonic()
        stats.transactions += 1
        stats.records += records
        stats.blobs += blobs
        stats.bytes += nbytes
        stats.last_tid = tid
        if self.following:
            stats.lags.append(max(0.0, time.time() - tid_time(tid)))
        if self.on_progress is not None:
            self.on_progress(stats)

    def _announce(self, tid: bytes, oids: list[bytes]) -> None:
        if self.on_commit is not None:
            try:
                self.on_commit(tid, oids)
            except Exception:
                logger.exception("on_commit failed for transaction %s", tid.hex())

    def _fetch_blob(self, rec) -> str | None:
        """A copy of rec's blob file in the replica's temporary directory, or None."""
        if not rec.data or not is_blob_record(rec.data):
            return None
        try:
            cached = self.source.loadBlob(rec.oid, rec.tid)
        except POSKeyError:
            logger.warning("the source has no blob file for oid %s tid %s; copying the record only",
                           rec.oid.hex(), rec.tid.hex())
            return None
        fd, tmp = tempfile.mkstemp(prefix="replica-", suffix=".tmp",
                                   dir=self.replica.temporaryDirectory())
        try:
            with os.fdopen(fd, "wb") as out, open(cached, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except BaseException:
            os.unlink(tmp)
            raise
        try:  # the client's blob cache is only a transit area here
            os.unlink(cached)
        except OSError:
            pass
        return tmp

    # -- history check -----------------------------------------------------------------

    def _packed_away(self, last: bytes, after) -> bool:
        """True if the source lacks our last transaction because a pack removed it.

        A pack (refstorage's or FileStorage's) drops transactions it emptied
        before the pack time and marks the ones it keeps 'p': the packed
        history is a prefix of the file.  `last` lies in it if the source's
        next transaction is packed, or if every source transaction before
        `last` is."""
        if after.status == "p":
            explained = True
        else:
            packed = None
            explained = False
            for txn in self.source.iterator(None, last):
                if txn.status != "p":
                    break
                packed = txn
            else:
                # and the last packed transaction is ours too (a source restored
                # from an older backup, then packed, must not pass)
                if packed is not None:
                    mine = next(iter(self.replica.iterator(packed.tid, packed.tid)), None)
                    explained = mine is not None and _metadata(mine) == _metadata(packed)
        if explained:
            logger.warning("the source no longer has transaction %s (a pack removed it); "
                           "continuing with %s", last.hex(), after.tid.hex())
        return explained

    def _check_same(self, last: bytes, theirs, deep: bool) -> None:
        """The source's transaction `theirs` (the first at or after `last`) must be ours."""
        mine = next(iter(self.replica.iterator(last, last)), None)
        if theirs is None or theirs.tid != last or mine is None:
            where = (f"the source has no transaction {last.hex()}" if theirs is None or theirs.tid != last
                     else f"the replica cannot read its last transaction {last.hex()}")
            raise HistoryDivergedError(self.replica_name, self._first_difference(last), where)
        if _metadata(mine) != _metadata(theirs):
            raise HistoryDivergedError(self.replica_name, self._first_difference(last),
                                       f"transaction {last.hex()} has other metadata in the source")
        if not deep:
            return
        ours = {rec.oid: rec.data for rec in mine}
        for rec in theirs:
            if rec.oid in ours and ours[rec.oid] != rec.data:
                raise HistoryDivergedError(
                    self.replica_name, self._first_difference(last),
                    f"transaction {last.hex()} has other data for oid {u64(rec.oid)} in the source")

    def _first_difference(self, last: bytes) -> bytes:
        """The first tid (up to `last`) where the two histories differ, walking both in step.

        Transactions a pack removed on one side count as differences; when
        no earlier difference shows, `last` itself is named."""
        src = iter(self.source.iterator(None, last))
        mine = iter(self.replica.iterator(None, last))
        while True:
            a = next(src, None)
            b = next(mine, None)
            if a is None and b is None:
                return last
            if a is None or b is None:
                return (a or b).tid
            if a.tid != b.tid:
                return min(a.tid, b.tid)
            if _metadata(a) != _metadata(b):
                return a.tid


def _range(source, start: bytes, stop: bytes | None) -> Iterator:
    """The source's transactions from `start` to `stop`, its remote iterator opened on first use."""
    yield from source.iterator(start, stop)


def _discard(recs: list[tuple]) -> None:
    """Remove the blob temporary files of records that will not be copied."""
    for rec in recs:
        if rec[3] is not None:
            try:
                os.unlink(rec[3])
            except OSError:
                pass


_END = object()


class _Prefetcher:
    """Reads the next transactions (records and blob files included) in a thread.

    ZEO's remote iterator costs a round trip per transaction and per record,
    the replica an fsync per transaction: overlapping the two (and the round
    trips of several ranges, see `Replicator.catch_up`) keeps the replica up
    with a primary committing as fast as it can.  At most `depth`
    transactions wait in memory."""

    def __init__(self, txns: Iterator, read: Callable, stop: threading.Event, depth: int = 64):
        self._txns = txns
        self._read = read
        self._stop = stop
        self._queue: queue.Queue = queue.Queue(depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="refstorage replicator prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        if isinstance(item, tuple):
            _discard(item[1])
        return False

    def _produce(self) -> None:
        try:
            for txn in self._txns:
                if self._closed.is_set() or self._stop.is_set():
                    break
                if not self._put((txn, self._read(txn))):
                    return
        except BaseException as exc:
            self._put(exc)
            return
        self._put(_END)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._closed.set()
        self._thread.join(60)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                _discard(item[1])


class PackSchedule:
    """Packs the replica every `every` seconds, keeping `days` days of history (a thread).

    A replica packs on its own schedule, whatever the primary does; refstorage
    packs while commits (the replicator's restores) go on.  Without `gc` (the
    default) it drops only old revisions: an object unreachable on the
    replica may still be resurrected by a later primary commit (a client
    holding it re-links it), and a replica that had collected it would then
    lack its data."""

    def __init__(self, replica, days: float, every: float, gc: bool = False):
        if days < 0 or every <= 0:
            raise ValueError("pack days must be >= 0 and the interval > 0")
        self.replica = replica
        self.days = days
        self.every = every
        self.gc = gc
        self.packs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refstorage replica pack", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.replica.pack(time.time() - self.days * 86400, gc=self.gc)
                self.packs += 1
                logger.info("packed the replica: %s", getattr(self.replica, "last_pack_report", ""))
            except Exception:
                logger.exception("packing the replica failed; trying again in %g s", self.every)

    def stop(self, timeout: float = 600.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


class Follower:
    """A Replicator running in a thread, feeding a ZEO server that serves the replica.

    `zeo_server` is the ZEO StorageServer serving `replica` as `storage_name`
    (read-only for clients); each copied transaction is announced to its
    clients as ZEO invalidations.  `on_failure(exc)` is called if the
    replicator stops on an error (a diverged history, say).  `promote()`
    stops following and lets the server accept commits.
    """

    def __init__(self, source_spec: str, replica, zeo_server, storage_name: str, *,
                 source_storage: str | None = None, poll_interval: float = 5.0,
                 wait_timeout: float = 30.0, pack_days: float | None = None,
                 pack_every: float = 86400.0,
                 on_failure: Callable[[BaseException], None] | None = None):
        from ZEO.StorageServer import StorageServerDB

        self.source_spec = source_spec
        self.replica = replica
        self.zeo_server = zeo_server
        self.storage_name = storage_name
        self.on_failure = on_failure
        self.promoted = False
        self._cache = tempfile.mkdtemp(prefix="refstorage-replica-") \
            if IBlobStorage.providedBy(replica) else None
        # the replica serves even while its source is unreachable
        self._source = open_source(source_spec, blob_cache=self._cache, wait_timeout=wait_timeout,
                                   storage=source_storage, wait=False)
        server_db = StorageServerDB(zeo_server, storage_name)
        self.replicator = Replicator(self._source, replica, on_commit=server_db.invalidate,
                                     poll_interval=poll_interval)
        self._thread = threading.Thread(target=self._run, name="refstorage replicator", daemon=True)
        self.pack_schedule = PackSchedule(replica, pack_days, pack_every) if pack_days is not None else None

    def start(self) -> None:
        self._thread.start()
        if self.pack_schedule is not None:
            self.pack_schedule.start()

    def _run(self) -> None:
        try:
            self.replicator.run(follow=True)
        except BaseException as exc:
            logger.critical("replication from %s stopped: %s", self.source_spec, exc, exc_info=True)
            if self.on_failure is not None and not self.replicator.stopped:
                self.on_failure(exc)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop following (the transaction being copied completes or is aborted)."""
        if self.pack_schedule is not None:
            self.pack_schedule.stop()
        self.replicator.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self._source.close()
        finally:
            if self._cache:
                shutil.rmtree(self._cache, ignore_errors=True)

    def promote(self) -> None:
        """Stop following and serve read-write: new connections may commit."""
        self.stop()
        self.zeo_server.read_only = False
        self.promoted = True
        # Connections made before are read-only for good: close them, so that
        # clients (with read_only_fallback) reconnect, now read-write.
        for zs in list(self.zeo_server.zeo_storages_by_storage_id.get(self.storage_name, ())):
            conn = getattr(zs, "connection", None)
            if conn is not None:
                conn.call_soon_threadsafe(conn.close)
        logger.warning("promoted: replication from %s stopped at %s; now serving read-write",
                       self.source_spec, self.replica.lastTransaction().hex())
