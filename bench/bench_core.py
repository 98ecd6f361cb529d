#!/usr/bin/env python
"""Side-by-side benchmark: ZODB's FileStorage against refstorage.FileStorage.

    python bench/bench_core.py [--quick] [--objects N] [--rounds R] [--json OUT]

Both storages run the same workloads in the same process, on the same data
(pickles and oids generated once), in the same temporary directory, with the
order of the two alternating from round to round; a ratio is the median of the
per-round ratios (a round runs both back to back).  Building the data files is
not timed; `gc.collect()` runs before every timed section (the collector stays
enabled, as in normal use).  Every commit fsyncs on both sides; the number of
fsync calls each side makes is counted and reported.  See bench/README.md.

Workloads (sizes for the default --objects 1000000; --quick divides by 10):

1. single-object commits through the raw storage API       target: >= 1.0x
2. one commit of 100,000 new objects                       target: >= 1.0x
3. 20,000 random loads from a freshly opened 200,000-object file  >= 1.3x
   (3b: the same with the data file evicted from the OS page cache; info)
4. reopen a 1,000,000-object file with its index file (info) and without
   it (the index is deleted before each timed open)   target: <= 0.35x time
5. index memory per oid of the reopened file, measured in a fresh process as
   the growth of the malloc heap (glibc mallinfo2) over the open; tracemalloc
   and RSS are reported too                       target: refstorage <= 8 B/oid
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

Z64 = b"\0" * 8
NTXN_BIG = 100  # the big reopen file is built in this many transactions
TXN_SIZE_MAX = 10_000  # objects per transaction when building the load file
POOL = 100  # distinct oids the single-object commits cycle through
WARMUP_COMMITS = 20

now = time.perf_counter


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the two storages -------------------------------------------------------------


@dataclass
class Backend:
    key: str  # "fs" or "rs"
    label: str
    factory: Callable[..., Any]
    suffix: str

    def open(self, path: str, **kw: Any) -> Any:
        return self.factory(path, **kw)


def load_backends(self_test: bool) -> dict[str, Backend]:
    from ZODB.FileStorage import FileStorage as ZFileStorage

    fs = Backend("fs", "FileStorage", ZFileStorage, ".fs")
    if self_test:
        # A/A run: ZODB's FileStorage on both sides, to check the harness is fair.
        rs = Backend("rs", "refstorage[self-test=ZODB FileStorage]", ZFileStorage, ".fs2")
    else:
        try:
            import refstorage

            factory = refstorage.FileStorage
        except (ImportError, AttributeError) as exc:
            sys.exit(f"bench_core: refstorage.FileStorage is not available ({exc}); "
                     "use --self-test to run ZODB's FileStorage on both sides")
        rs = Backend("rs", "refstorage", factory, ".rfs")
    return {"fs": fs, "rs": rs}


def storage_index(storage: Any) -> Any:
    """The in-memory oid index: `_index` (ZODB), or `_state.index` (refstorage)."""
    index = getattr(storage, "_index", None)
    if index is None:
        index = getattr(getattr(storage, "_state", None), "index", None)
    return index


def index_memory_bytes(storage: Any) -> int | None:
    """refstorage's own account of its index (`OidIndex.memory_bytes()`)."""
    fn = getattr(storage_index(storage), "memory_bytes", None)
    if fn is None:
        return None
    try:
        return int(fn())
    except Exception:  # noqa: BLE001 - informational only
        return None


# -- sizes ------------------------------------------------------------------------


@dataclass
class Sizes:
    objects: int  # objects in the big reopen file (workloads 4 and 5)
    commits: int  # single-object commits (workload 1)
    bulk: int  # objects in the one big commit (workload 2)
    load_file: int  # objects in the file of workload 3
    loads: int  # random loads timed in workload 3
    rounds: int
    sparse: int = 0  # objects with spread-out oids (workload 6)
    big_txn: int = field(init=False)
    load_txn: int = field(init=False)

    def __post_init__(self) -> None:
        self.big_txn = max(1, -(-self.objects // NTXN_BIG))
        self.load_txn = max(1, min(TXN_SIZE_MAX, self.load_file))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sizes:
        n = args.objects or (100_000 if args.quick else 1_000_000)
        if n < 100:
            raise SystemExit("--objects must be at least 100")
        return cls(
            objects=n,
            commits=args.commits or max(20, n // 500),
            bulk=args.bulk or max(100, n // 10),
            load_file=args.load_file or max(200, n // 5),
            loads=args.loads or max(50, n // 50),
            rounds=args.rounds or (1 if args.quick else 7),
            sparse=max(100, n // 10),
        )

    @property
    def max_objects(self) -> int:
        return max(self.objects, self.bulk, self.load_file, POOL)


# -- data -------------------------------------------------------------------------


def p64(i: int) -> bytes:
    return i.to_bytes(8, "big")


def make_pickles(n: int) -> list[bytes]:
    """Realistic ZODB record pickles (class pickle + state pickle, as
    ZODB.serialize writes them) of PersistentMappings of ~190 bytes.  Object i
    references oids i // 2 and i - 1 (persistent references with the class),
    so every prefix 0..k of the oids is closed under references."""
    from persistent.mapping import PersistentMapping
    from ZODB.serialize import ObjectWriter

    writer = ObjectWriter()
    obj, parent, prev = PersistentMapping(), PersistentMapping(), PersistentMapping()
    out = []
    for i in range(n):
        state: dict[str, Any] = {"name": f"object-{i:08d}", "n": i, "note": "benchmark data"}
        if i:
            parent._p_oid = p64(i // 2)
            prev._p_oid = p64(i - 1)
            state["parent"] = parent
            state["prev"] = prev
        obj.data = state
        out.append(writer.serialize(obj))
    return out


class Data:
    def __init__(self, n: int):
        t = now()
        self.oids = [p64(i) for i in range(n)]
        self.pickles = make_pickles(n)
        self.seconds = now() - t
        sample = self.pickles[n // 2]
        self.mean_pickle = sum(map(len, self.pickles)) / n
        from ZODB.serialize import referencesf

        self.sample_refs = len(referencesf(sample))


# -- measurement helpers ----------------------------------------------------------


class SyncCounter:
    """Counts fsync/fdatasync calls made while active, including through
    module-level aliases (ZODB.FileStorage does `fsync = os.fsync`)."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0  # wall time spent inside fsync
        self._patched: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> SyncCounter:
        for name in ("fsync", "fdatasync"):
            orig = getattr(os, name, None)
            if orig is None:
                continue

            def wrapper(fd: int, _orig: Any = orig) -> None:
                self.count += 1
                t0 = now()
                try:
                    _orig(fd)
                finally:
                    self.seconds += now() - t0

            mods = [os] + [m for n, m in list(sys.modules.items())
                           if m is not None and n.split(".")[0] in ("ZODB", "refstorage")]
            for mod in mods:
                for attr, value in list(vars(mod).items()):
                    if value is orig:
                        self._patched.append((mod, attr, orig))
                        setattr(mod, attr, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, attr, orig in reversed(self._patched):
            setattr(mod, attr, orig)
        self._patched.clear()


def evict_page_cache(*paths: str) -> bool:
    """Drop the OS page cache of the given (clean, fsynced) files."""
    ok = True
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def prepare() -> None:
    gc.collect()


class Clock:
    """Wall time (the figure reported) and this process's CPU time (a cross-check
    that is less disturbed by other processes on a shared machine)."""

    wall = cpu = 0.0

    def __enter__(self) -> Clock:
        self._c0 = time.process_time()
        self._t0 = now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = now() - self._t0
        self.cpu = time.process_time() - self._c0


def attach_cpu(row: Row, cpu: dict[str, list[float]]) -> None:
    """Record CPU seconds per round and the ratio they give, oriented like `row.ratio`."""
    fs, rs = statistics.median(cpu["fs"]), statistics.median(cpu["rs"])
    row.extra["cpu_s"] = {"fs": fs, "rs": rs, "fs_samples": cpu["fs"], "rs_samples": cpu["rs"]}
    ratio = paired_ratio(cpu["fs"], cpu["rs"])  # rs/fs CPU seconds
    if ratio:
        row.extra["cpu_ratio"] = 1 / ratio if row.better == "higher" else ratio


def txn(desc: str = "bench") -> Any:
    from ZODB.Connection import TransactionMetaData

    return TransactionMetaData(user="", description=desc)


def commit(storage: Any, oids: list[bytes], pickles: list[bytes], lo: int, hi: int) -> bytes:
    t = txn()
    storage.tpc_begin(t)
    store = storage.store
    for i in range(lo, hi):
        store(oids[i], Z64, pickles[i], "", t)
    storage.tpc_vote(t)
    return storage.tpc_finish(t)


def build(backend: Backend, path: str, data: Data, count: int, txn_size: int) -> dict[str, float]:
    t0 = now()
    s = backend.open(path, create=True)
    try:
        for lo in range(0, count, txn_size):
            commit(s, data.oids, data.pickles, lo, min(count, lo + txn_size))
    finally:
        t1 = now()
        s.close()
    return {"build_s": t1 - t0, "close_s": now() - t1,
            "file_bytes": os.path.getsize(path),
            "index_file_bytes": os.path.getsize(path + ".index") if os.path.exists(path + ".index") else 0}


def verify(storage: Any, data: Data, count: int, sample: list[int]) -> None:
    n = len(storage)
    if n != count:
        raise AssertionError(f"len(storage) is {n}, expected {count}")
    for i in sample:
        got, _tid = storage.load(data.oids[i])
        if got != data.pickles[i]:
            raise AssertionError(f"load(oid {i}) returned the wrong data")


def orders(rounds: int, backends: dict[str, Backend]) -> Iterator[tuple[int, Backend]]:
    """FS, RS in even rounds, RS, FS in odd ones."""
    for r in range(rounds):
        keys = ("fs", "rs") if r % 2 == 0 else ("rs", "fs")
        for k in keys:
            yield r, backends[k]


def remove_storage_files(path: str) -> None:
    for suffix in ("", ".index", ".lock", ".tmp", ".index_tmp", ".old", ".pack"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


# -- results ----------------------------------------------------------------------


@dataclass
class Row:
    key: str
    title: str
    unit: str  # unit of `fs` and `rs`
    better: str  # "higher" or "lower": which value of the unit is better
    target: str = "-"
    # ratio: for "higher" rows rs/fs, for "lower" rows rs/fs too (then lower is better)
    fs: float | None = None
    rs: float | None = None
    fs_samples: list[float] = field(default_factory=list)
    rs_samples: list[float] = field(default_factory=list)
    ratio: float | None = None
    ratio_kind: str = ""  # how to read the ratio
    result: str = "info"
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def paired_ratio(fs_vals: list[float], rs_vals: list[float]) -> float | None:
    """Median of the per-round ratios rs/fs.  Round i of both storages ran back
    to back, so a pair shares the machine's state (on a shared VM the speed of
    the CPU drifts by tens of percent over a minute; the medians of the two
    columns can land on different sides of such a step, the pairs do not)."""
    pairs = [r / f for f, r in zip(fs_vals, rs_vals, strict=True) if f > 0]
    return statistics.median(pairs) if pairs else None


def throughput_row(row: Row, fs_vals: list[float], rs_vals: list[float], minimum: float | None) -> Row:
    """`fs_vals`/`rs_vals` are per-second rates; ratio rs/fs, >1 is better."""
    row.better = "higher"
    row.fs_samples, row.rs_samples = fs_vals, rs_vals
    row.fs, row.rs = statistics.median(fs_vals), statistics.median(rs_vals)
    row.ratio = paired_ratio(fs_vals, rs_vals)
    row.ratio_kind = "throughput rs/fs, >1 = refstorage better"
    if minimum is not None and row.ratio is not None:
        row.target = f">= {minimum:g}x"
        row.result = "PASS" if row.ratio >= minimum else "MISS"
    return row


def cost_row(row: Row, fs_vals: list[float], rs_vals: list[float], maximum: float | None) -> Row:
    """`fs_vals`/`rs_vals` are costs (seconds, bytes); ratio rs/fs, lower is better."""
    row.better = "lower"
    row.fs_samples, row.rs_samples = fs_vals, rs_vals
    row.fs, row.rs = statistics.median(fs_vals), statistics.median(rs_vals)
    row.ratio = paired_ratio(fs_vals, rs_vals)
    row.ratio_kind = "rs/fs, lower is better"
    if maximum is not None and row.ratio is not None:
        row.target = f"<= {maximum:g}x"
        row.result = "PASS" if row.ratio <= maximum else "MISS"
    return row


# -- workloads --------------------------------------------------------------------


class Bench:
    def __init__(self, sizes: Sizes, backends: dict[str, Backend], data: Data, tmp: str,
                 self_test: bool, cold_reopen: bool):
        self.sizes = sizes
        self.backends = backends
        self.data = data
        self.tmp = tmp
        self.self_test = self_test
        self.cold_reopen = cold_reopen
        self.big_files: dict[str, str] = {}

    def path(self, backend: Backend, name: str) -> str:
        return os.path.join(self.tmp, name + backend.suffix)

    # 1 ------------------------------------------------------------------------
    def w1_single_commits(self) -> list[Row]:
        sz, d = self.sizes, self.data
        row = Row("1", f"1. single-object commits ({sz.commits:,} fsynced commits)", "commits/s", "higher")
        rates: dict[str, list[float]] = {"fs": [], "rs": []}
        syncs: dict[str, list[float]] = {"fs": [], "rs": []}
        cpu: dict[str, list[float]] = {"fs": [], "rs": []}
        sync_s: dict[str, list[float]] = {"fs": [], "rs": []}
        non_sync: dict[str, list[float]] = {"fs": [], "rs": []}
        for r, b in orders(sz.rounds, self.backends):
            path = self.path(b, f"w1-{r}")
            s = b.open(path, create=True)
            try:
                serials = [Z64] * POOL
                store = s.store

                def one(k: int, s: Any = s, store: Any = store, serials: list[bytes] = serials) -> None:
                    j = k % POOL
                    t = txn()
                    s.tpc_begin(t)
                    store(d.oids[j], serials[j], d.pickles[j], "", t)
                    s.tpc_vote(t)
                    serials[j] = s.tpc_finish(t)

                for k in range(WARMUP_COMMITS):
                    one(k)
                prepare()
                with SyncCounter() as counter, Clock() as clock:
                    for k in range(WARMUP_COMMITS, WARMUP_COMMITS + sz.commits):
                        one(k)
                rates[b.key].append(sz.commits / clock.wall)
                cpu[b.key].append(clock.cpu)
                sync_s[b.key].append(counter.seconds / sz.commits)
                non_sync[b.key].append((clock.wall - counter.seconds) / sz.commits)
                syncs[b.key].append(counter.count / sz.commits)
                for j in range(POOL):
                    if serials[j] != Z64 and s.load(d.oids[j])[1] != serials[j]:
                        raise AssertionError(f"{b.label}: serial of oid {j} does not match")
            finally:
                s.close()
            remove_storage_files(path)
        throughput_row(row, rates["fs"], rates["rs"], 1.0)
        attach_cpu(row, cpu)
        row.extra["fsyncs_per_commit"] = {k: statistics.median(v) for k, v in syncs.items()}
        row.extra["fsync_s_per_commit"] = {k: statistics.median(v) for k, v in sync_s.items()}
        row.extra["other_s_per_commit"] = {k: statistics.median(v) for k, v in non_sync.items()}
        return [row]

    # 2 ------------------------------------------------------------------------
    def w2_bulk_commit(self) -> list[Row]:
        sz, d = self.sizes, self.data
        row = Row("2", f"2. one commit of {sz.bulk:,} objects", "s", "lower")
        secs: dict[str, list[float]] = {"fs": [], "rs": []}
        syncs: dict[str, list[int]] = {"fs": [], "rs": []}
        cpu: dict[str, list[float]] = {"fs": [], "rs": []}
        for r, b in orders(sz.rounds, self.backends):
            path = self.path(b, f"w2-{r}")
            s = b.open(path, create=True)
            try:
                prepare()
                with SyncCounter() as counter, Clock() as clock:
                    commit(s, d.oids, d.pickles, 0, sz.bulk)
                secs[b.key].append(clock.wall)
                cpu[b.key].append(clock.cpu)
                syncs[b.key].append(counter.count)
                verify(s, d, sz.bulk, random.Random(r).sample(range(sz.bulk), 100))
            finally:
                s.close()
            remove_storage_files(path)
        # Report seconds, judge on throughput (fs_time / rs_time).
        throughput_row(row, [sz.bulk / x for x in secs["fs"]], [sz.bulk / x for x in secs["rs"]], 1.0)
        row.unit = "objects/s"
        attach_cpu(row, cpu)
        row.extra["seconds"] = {k: statistics.median(v) for k, v in secs.items()}
        row.extra["seconds_samples"] = secs
        row.extra["fsyncs_per_commit"] = {k: statistics.median(v) for k, v in syncs.items()}
        return [row]

    # 6 ------------------------------------------------------------------------
    def w6_sparse_iternext(self) -> list[Row]:
        """A full record_iternext pass (ZODB's current-record iteration, used by
        zodbupdate-style tools) over oids 2**20 apart: one object per index block."""
        sz, d = self.sizes, self.data
        n = sz.sparse
        row = Row("6", f"6. record_iternext pass over {n:,} sparse oids", "objects/s", "higher")
        oids = [p64((i + 1) << 20) for i in range(n)]
        files = {}
        for b in self.backends.values():
            files[b.key] = self.path(b, "w6")
            s = b.open(files[b.key], create=True)
            try:
                for lo in range(0, n, 10_000):
                    commit(s, oids, d.pickles, lo, min(n, lo + 10_000))
            finally:
                s.close()
        rates: dict[str, list[float]] = {"fs": [], "rs": []}
        cpu: dict[str, list[float]] = {"fs": [], "rs": []}
        for _r, b in orders(sz.rounds, self.backends):
            s = b.open(files[b.key])
            try:
                prepare()
                count, nxt = 0, None
                with Clock() as clock:
                    while True:
                        _oid, _tid, _data, nxt = s.record_iternext(nxt)
                        count += 1
                        if nxt is None:
                            break
                if count != n:
                    raise AssertionError(f"{b.label}: record_iternext returned {count} of {n} objects")
                rates[b.key].append(n / clock.wall)
                cpu[b.key].append(clock.cpu)
            finally:
                s.close()
        for path in files.values():
            remove_storage_files(path)
        throughput_row(row, rates["fs"], rates["rs"], None)
        attach_cpu(row, cpu)
        return [row]

    # 3 ------------------------------------------------------------------------
    def w3_random_loads(self) -> list[Row]:
        sz, d = self.sizes, self.data
        files = {}
        build_info = {}
        for b in self.backends.values():
            files[b.key] = self.path(b, "w3")
            log(f"  building {sz.load_file:,}-object file for {b.label}")
            build_info[b.key] = build(b, files[b.key], d, sz.load_file, sz.load_txn)

        def run(evict: bool) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
            rates: dict[str, list[float]] = {"fs": [], "rs": []}
            cpu: dict[str, list[float]] = {"fs": [], "rs": []}
            for r, b in orders(sz.rounds, self.backends):
                rng = random.Random(1000 + r)
                idx = [rng.randrange(sz.load_file) for _ in range(sz.loads)]
                oids = [d.oids[i] for i in idx]
                s = b.open(files[b.key])
                try:
                    if evict:
                        evict_page_cache(files[b.key])
                    prepare()
                    load = s.load
                    with Clock() as clock:
                        got = [load(oid) for oid in oids]
                    for i, (p, _tid) in zip(idx, got, strict=True):
                        if p != d.pickles[i]:
                            raise AssertionError(f"{b.label}: load(oid {i}) returned wrong data")
                    del got
                    rates[b.key].append(sz.loads / clock.wall)
                    cpu[b.key].append(clock.cpu)
                finally:
                    s.close()
            return rates, cpu

        warm, warm_cpu = run(evict=False)
        row = throughput_row(
            Row("3", f"3. {sz.loads:,} random loads, fresh instance, {sz.load_file:,}-object file",
                "loads/s", "higher"),
            warm["fs"], warm["rs"], 1.3)
        attach_cpu(row, warm_cpu)
        row.extra["build"] = build_info
        row.extra["page_cache"] = "warm (file just written)"
        cold, cold_cpu = run(evict=True)
        row_b = throughput_row(
            Row("3b", "3b. same, data file evicted from the OS page cache", "loads/s", "higher"),
            cold["fs"], cold["rs"], None)
        attach_cpu(row_b, cold_cpu)
        row_b.extra["page_cache"] = "evicted with posix_fadvise(DONTNEED) after open"
        for b in self.backends.values():
            remove_storage_files(files[b.key])
        return [row, row_b]

    # 4 ------------------------------------------------------------------------
    def w4_reopen(self) -> list[Row]:
        sz, d = self.sizes, self.data
        build_info = {}
        for b in self.backends.values():
            path = self.big_files[b.key] = self.path(b, "big")
            log(f"  building {sz.objects:,}-object file for {b.label} "
                f"({NTXN_BIG} transactions of {sz.big_txn:,})")
            build_info[b.key] = build(b, path, d, sz.objects, sz.big_txn)
            if not os.path.exists(path + ".index"):
                raise AssertionError(f"{b.label} wrote no {path}.index on close")

        rng = random.Random(4)
        sample = [0, sz.objects - 1] + rng.sample(range(sz.objects), 20)
        probe_oid = d.oids[sz.objects // 3]
        times: dict[str, dict[str, list[float]]] = {m: {"fs": [], "rs": []} for m in ("index", "noindex")}
        ctor: dict[str, dict[str, list[float]]] = {m: {"fs": [], "rs": []} for m in ("index", "noindex")}
        cpu: dict[str, dict[str, list[float]]] = {m: {"fs": [], "rs": []} for m in ("index", "noindex")}
        for _r, b in orders(sz.rounds, self.backends):
            path = self.big_files[b.key]
            for mode in ("index", "noindex"):
                if mode == "noindex":
                    os.remove(path + ".index")
                elif not os.path.exists(path + ".index"):
                    raise AssertionError(f"{b.label}: no {path}.index after close")
                if self.cold_reopen:
                    evict_page_cache(path, path + ".index")
                prepare()
                with Clock() as clock:
                    s = b.open(path)
                    t1 = now()
                    s.load(probe_oid)  # forces anything opened lazily
                try:
                    times[mode][b.key].append(clock.wall)
                    ctor[mode][b.key].append(t1 - clock._t0)
                    cpu[mode][b.key].append(clock.cpu)
                    verify(s, d, sz.objects, sample)
                finally:
                    s.close()
        rows = []
        for mode, key, title, target in (
            ("index", "4a", f"4a. reopen {sz.objects:,}-object file with its index", None),
            ("noindex", "4b", f"4b. reopen {sz.objects:,}-object file without index", 0.35),
        ):
            row = cost_row(Row(key, title, "s", "lower"), times[mode]["fs"], times[mode]["rs"], target)
            attach_cpu(row, cpu[mode])
            row.extra["constructor_only_s"] = {k: statistics.median(v) for k, v in ctor[mode].items()}
            row.extra["page_cache"] = "evicted before each open" if self.cold_reopen else "warm"
            rows.append(row)
        rows[0].extra["build"] = build_info
        return rows

    # 5 ------------------------------------------------------------------------
    def w5_index_memory(self) -> list[Row]:
        sz = self.sizes
        if not self.big_files:
            raise AssertionError("workload 4 did not build the big files")
        res: dict[str, dict[str, dict[str, Any]]] = {}
        for mode in ("heap", "tracemalloc", "rebuilt"):  # "rebuilt" deletes the index: keep it last
            res[mode] = {b.key: self.probe(b, mode) for b in self.backends.values()}
        n = sz.objects
        primary = "heap" if res["heap"]["fs"].get("heap") is not None else "tracemalloc"

        def per(mode: str, what: str) -> list[list[float]]:
            return [[res[mode][k][what] / n] for k in ("fs", "rs")]

        label = "malloc heap in use" if primary == "heap" else "tracemalloc"
        row = cost_row(Row("5", f"5. index bytes/oid, {n:,} dense oids ({label})", "B/oid", "lower"),
                       *per("heap", primary), None)
        row.target = "rs <= 8 B/oid"
        row.result = "PASS" if row.rs is not None and row.rs <= 8 else "MISS"
        mb = res["heap"]["rs"].get("memory_bytes")
        row.extra["memory_bytes_per_oid"] = None if mb is None else mb / n
        row.extra["probes"] = res
        rows = [row]
        if primary == "heap":
            rows.append(cost_row(Row("5b", f"5b. same after a rebuild without the index file ({label})",
                                     "B/oid", "lower"), *per("rebuilt", "heap"), None))
        rows.append(cost_row(Row("5c", "5c. RSS growth of the open / oid (includes mmap, allocator slack)",
                                 "B/oid", "lower"), *per("heap", "rss"), None))
        rows.append(cost_row(Row("5d", "5d. tracemalloc / oid (misses C-level malloc, e.g. BTrees buckets)",
                                 "B/oid", "lower"), *per("tracemalloc", "tracemalloc"), None))
        return rows

    def probe(self, b: Backend, mode: str) -> dict[str, Any]:
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", b.key, self.big_files[b.key], mode]
        if self.self_test:
            cmd.append("--self-test")
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"probe {b.key} {mode} failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_counters() -> tuple[int, int, int] | None:
    """(busy, steal, total) jiffies of the whole machine from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def machine_share(before: tuple[int, int, int] | None) -> dict[str, float] | None:
    """Machine-wide busy and steal shares since `before` (other processes and
    the hypervisor taking CPU are the main noise on a shared VM)."""
    after = cpu_counters()
    if before is None or after is None or after[2] == before[2]:
        return None
    total = after[2] - before[2]
    return {"busy": (after[0] - before[0]) / total, "steal": (after[1] - before[1]) / total}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_heap_bytes() -> int | None:
    """Bytes the C allocator has handed out and not got back (glibc mallinfo2:
    uordblks + hblkhd).  This sees everything malloc'ed, Python objects (whose
    pymalloc arenas come from it) and C extension memory alike, unlike
    tracemalloc, which misses e.g. the arrays inside BTrees buckets (fsIndex)."""
    import ctypes
    import ctypes.util

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = Mallinfo2
    m = fn()
    return m.uordblks + m.hblkhd


def run_probe(key: str, path: str, mode: str, self_test: bool) -> int:
    """In a fresh process: memory retained by opening the storage (and loading one object)."""
    import tracemalloc

    b = load_backends(self_test)[key]
    if mode == "rebuilt":
        os.remove(path + ".index")
    malloc_heap_bytes()  # load ctypes before measuring
    gc.collect()
    result: dict[str, Any] = {}
    if mode == "tracemalloc":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    else:
        heap0, rss0 = malloc_heap_bytes(), rss_bytes()
    t0 = now()
    s = b.open(path)
    s.load(Z64)
    result["open_s"] = now() - t0
    gc.collect()
    if mode == "tracemalloc":
        result["tracemalloc"] = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    else:
        heap1 = malloc_heap_bytes()
        result["heap"] = None if heap0 is None or heap1 is None else heap1 - heap0
        result["rss"] = rss_bytes() - rss0
    result.update(len=len(s), memory_bytes=index_memory_bytes(s),
                  index_type=type(storage_index(s)).__name__)
    s.close()
    print(json.dumps(result))
    return 0


# -- reporting --------------------------------------------------------------------


def machine_info(backends: dict[str, Backend], tmp: str) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    fs_type = None
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        best = ""
        real = os.path.realpath(tmp)
        for line in f:
            parts = line.split()
            if len(parts) > 2 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) >= len(best):
                best, fs_type = parts[1], f"{parts[2]} on {parts[0]} (mounted at {parts[1]})"
    src_hash = None
    mod_file = getattr(sys.modules.get("refstorage"), "__file__", None)
    if mod_file:  # ties the figures to the exact source (the tree may be uncommitted)
        h = hashlib.sha1()
        pkg = os.path.dirname(mod_file)
        for name in sorted(os.listdir(pkg)):
            if name.endswith((".py", ".c")):
                with open(os.path.join(pkg, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        src_hash = h.hexdigest()[:12]
    scanner = None
    with contextlib.suppress(ImportError):
        from refstorage.refs import scanner as _scanner

        scanner = _scanner()
    git = None
    with contextlib.suppress(Exception):
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    return {
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "python_build": " ".join(platform.python_build()),
        "ZODB": version("ZODB"),
        "persistent": version("persistent"),
        "BTrees": version("BTrees"),
        "refstorage": version("refstorage") or getattr(sys.modules.get("refstorage"), "__version__", None),
        "refstorage_module": getattr(sys.modules.get("refstorage"), "__file__", None),
        "rs_class": f"{backends['rs'].factory.__module__}.{backends['rs'].factory.__qualname__}",
        "git_head": git or None,
        "refstorage_src_sha1": src_hash,
        "refstorage_reference_scanner": scanner,
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "nproc_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "tmp_dir": tmp,
        "tmp_filesystem": fs_type,
        "loadavg_at_start": os.getloadavg(),
        "gc_enabled": gc.isenabled(),
        "gc_threshold": gc.get_threshold(),
    }


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if value < 100 else f"{value:.1f} s"
    if unit == "B/oid":
        return f"{value:.2f} B/oid"
    return f"{value:,.0f} {unit}"


def row_cells(row: Row) -> list[str]:
    fs, rs = fmt(row.fs, row.unit), fmt(row.rs, row.unit)
    secs = row.extra.get("seconds")
    if secs:  # workload 2 reports its seconds next to the throughput
        fs = f"{secs['fs']:.3f} s ({fs})"
        rs = f"{secs['rs']:.3f} s ({rs})"
    if row.error:
        return [row.title, fs, rs, "-", row.target, "ERROR"]
    if row.ratio is None:
        ratio = "-"
    elif row.better == "higher":
        ratio = f"{row.ratio:.2f}x (>1 better)"
    else:
        ratio = f"{row.ratio:.2f}x rs/fs (lower better)"
    return [row.title, fs, rs, ratio, row.target, row.result]


def markdown_table(rows: list[Row]) -> str:
    head = ["workload", "FileStorage", "refstorage", "ratio", "target", "result"]
    body = [row_cells(r) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *map(line, body)])


def notes(rows: list[Row]) -> list[str]:
    """Fairness checks and remarks printed under the table."""
    out = []
    for r in rows:
        fsy = r.extra.get("fsyncs_per_commit")
        if fsy:
            out.append(f"workload {r.key}: fsync calls per commit: FileStorage {fsy['fs']:g}, "
                       f"refstorage {fsy['rs']:g}")
            if fsy["rs"] < 1 or fsy["fs"] < 1:
                out.append(f"  WARNING: a storage did not fsync every commit in workload {r.key}; "
                           "the comparison is not fair")
        if "fsync_s_per_commit" in r.extra:
            fss, other = r.extra["fsync_s_per_commit"], r.extra["other_s_per_commit"]
            out.append(f"workload {r.key}: per commit, inside fsync: FileStorage {fss['fs'] * 1e6:.0f} us, "
                       f"refstorage {fss['rs'] * 1e6:.0f} us; everything else: FileStorage "
                       f"{other['fs'] * 1e6:.0f} us, refstorage {other['rs'] * 1e6:.0f} us")
        ctor = r.extra.get("constructor_only_s")
        if ctor:
            out.append(f"workload {r.key}: constructor alone (without the first load): "
                       f"FileStorage {ctor['fs']:.3f} s, refstorage {ctor['rs']:.3f} s")
        if "memory_bytes_per_oid" in r.extra and r.extra["memory_bytes_per_oid"] is not None:
            out.append(f"workload {r.key}: refstorage _index.memory_bytes() = "
                       f"{r.extra['memory_bytes_per_oid']:.2f} B/oid")
        if len(r.fs_samples) > 1 and r.fs and r.rs:
            best = max if r.better == "higher" else min
            spread = max(max(v) / min(v) for v in (r.fs_samples, r.rs_samples) if min(v) > 0)
            best_ratio = best(r.rs_samples) / best(r.fs_samples)
            out.append(f"workload {r.key}: ratio of the best rounds {best_ratio:.2f}x; "
                       f"max/min over rounds {spread:.2f}" + ("  (NOISY)" if spread > 1.25 else ""))
        bi = r.extra.get("build")
        if bi:
            out.append(f"workload {r.key} files (building them is not timed): FileStorage "
                       f"{bi['fs']['build_s']:.1f} s, {bi['fs']['file_bytes']:,} bytes + index "
                       f"{bi['fs']['index_file_bytes']:,}; refstorage {bi['rs']['build_s']:.1f} s, "
                       f"{bi['rs']['file_bytes']:,} bytes + index {bi['rs']['index_file_bytes']:,}")
        if "cpu_ratio" in r.extra:
            c = r.extra["cpu_s"]
            out.append(f"workload {r.key}: CPU time of this process FileStorage {c['fs']:.3f} s, refstorage "
                       f"{c['rs']:.3f} s, ratio {r.extra['cpu_ratio']:.2f}x (read like the ratio column)")
        if r.error:
            out.append(f"workload {r.key}: ERROR {r.error.strip().splitlines()[-1]}")
    return out


# -- main -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark ZODB's FileStorage against refstorage.FileStorage, side by side.")
    p.add_argument("--quick", action="store_true", help="scale everything down ~10x (smoke run)")
    p.add_argument("--objects", type=int, metavar="N",
                   help="objects in the reopen file (default 1,000,000, --quick 100,000); the other "
                        "sizes scale from it: commits N/500, bulk N/10, load file N/5, loads N/50")
    p.add_argument("--commits", type=int, help="override: single-object commits (workload 1)")
    p.add_argument("--bulk", type=int, help="override: objects in the big commit (workload 2)")
    p.add_argument("--load-file", type=int, help="override: objects in the load file (workload 3)")
    p.add_argument("--loads", type=int, help="override: random loads timed (workload 3)")
    p.add_argument("--rounds", type=int, help="timed rounds per storage (default 7, --quick 1); "
                                              "medians are reported")
    p.add_argument("--only", help="comma-separated workloads to run, e.g. 1,2 (5 needs 4)")
    p.add_argument("--cold-reopen", action="store_true",
                   help="evict the files from the OS page cache before each timed reopen (workload 4)")
    p.add_argument("--tmpdir", default="/tmp", help="where to create the scratch directory (default /tmp)")
    p.add_argument("--keep", action="store_true", help="do not delete the scratch directory")
    p.add_argument("--json", metavar="OUT", help="write all raw numbers to this JSON file")
    p.add_argument("--self-test", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", nargs=3, metavar=("KEY", "PATH", "MODE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


WORKLOADS = [
    ("1", "w1_single_commits", ["1"]),
    ("2", "w2_bulk_commit", ["2"]),
    ("3", "w3_random_loads", ["3", "3b"]),
    ("4", "w4_reopen", ["4a", "4b"]),
    ("5", "w5_index_memory", ["5", "5b", "5c", "5d"]),
    ("6", "w6_sparse_iternext", ["6"]),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        return run_probe(*args.probe, self_test=args.self_test)
    sizes = Sizes.from_args(args)
    only = set(args.only.split(",")) if args.only else {w[0] for w in WORKLOADS}
    if "5" in only:
        only.add("4")
    backends = load_backends(args.self_test)
    tmp = tempfile.mkdtemp(prefix="refstorage-bench-", dir=args.tmpdir)
    rows: list[Row] = []
    started = time.time()
    run_counters = cpu_counters()
    try:
        info = machine_info(backends, tmp)
        print("# refstorage vs ZODB FileStorage: core benchmark")
        print()
        for k in ("python", "ZODB", "refstorage", "rs_class", "git_head", "refstorage_src_sha1",
                  "refstorage_reference_scanner",
                  "platform", "nproc", "nproc_usable", "cpu_model", "mem_total_bytes", "tmp_filesystem",
                  "loadavg_at_start"):
            print(f"- {k}: {info[k]}")
        print(f"- sizes: {asdict(sizes)}")
        print(f"- command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
        if args.self_test:
            print("- SELF-TEST: ZODB FileStorage on both sides (an A/A run; ratios should be ~1)")
        print(flush=True)

        log(f"generating {sizes.max_objects:,} pickles ...")
        data = Data(sizes.max_objects)
        log(f"  {data.seconds:.1f} s, mean pickle {data.mean_pickle:.0f} bytes, "
            f"{data.sample_refs} references each")
        bench = Bench(sizes, backends, data, tmp, args.self_test, args.cold_reopen)
        for key, method, row_keys in WORKLOADS:
            if key not in only:
                continue
            log(f"workload {key} ...")
            t0 = now()
            counters = cpu_counters()
            try:
                new_rows = getattr(bench, method)()
            except Exception:  # noqa: BLE001 - report it as an ERROR row and go on
                err = traceback.format_exc()
                log(err)
                new_rows = [Row(k, f"{k}. {method}", "", "higher", error=err) for k in row_keys]
            share = machine_share(counters)
            for r in new_rows:
                r.extra["workload_wall_s"] = now() - t0
                r.extra["machine_cpu_share"] = share
            rows.extend(new_rows)
            for r in new_rows:
                log("  " + " | ".join(row_cells(r)))

        print(markdown_table(rows))
        print()
        print("Ratios: for throughput rows (1, 2, 3, 3b) refstorage/FileStorage throughput, >1 means "
              "refstorage is faster; for time and byte rows (4a, 4b, 5*) refstorage/FileStorage, "
              "lower is better.  Values are medians over rounds; a ratio is the median of the per-round "
              "ratios (both storages run back to back in each round, in alternating order).")
        for n in notes(rows):
            print(f"- {n}")
        print(f"- load average at the end: {os.getloadavg()}")
        share = machine_share(run_counters)
        if share:
            nproc = os.cpu_count() or 1
            print(f"- machine CPU during the run: {share['busy'] * 100:.0f}% busy of {nproc} CPUs "
                  f"(this benchmark alone keeps ~{100 / nproc:.0f}% busy), "
                  f"{share['steal'] * 100:.1f}% stolen "
                  "by the hypervisor")
        print(f"- mean pickle {data.mean_pickle:.0f} bytes with {data.sample_refs} persistent references; "
              f"data generated in {data.seconds:.1f} s (not timed); total wall time "
              f"{time.time() - started:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "sizes": asdict(sizes), "argv": sys.argv,
                           "self_test": args.self_test, "cold_reopen": args.cold_reopen,
                           "mean_pickle_bytes": data.mean_pickle, "data_gen_s": data.seconds,
                           "total_wall_s": time.time() - started,
                           "rows": [asdict(r) for r in rows]}, f, indent=2, default=str)
            print(f"- raw numbers written to {args.json}")
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
