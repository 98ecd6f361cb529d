"""The referrer index (`refstorage.referrers`, `refstorage refs`): same answers as the scan, always.

Randomized files (references, duplicates, self references, refs-unknown
records, deletions, undo backpointers, unreadable backpointers) are grown in
steps and queried for every oid through the index (built, then updated) and by
the scan; every damage shape of the cache file makes it rebuilt, never trusted;
pack, a concurrent writer and an unwritable directory are handled.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import threading
import time

import pytest
import transaction
import ZODB
from click.testing import CliRunner
from persistent.mapping import PersistentMapping
from ZODB.serialize import referencesf

import refstorage
from refstorage import fileformat as fmt
from refstorage import fileio, referrers
from refstorage.cli import main as cli
from refstorage.errors import ReferrerIndexError
from refstorage.tools.common import Log
from refstorage.tools.info import refs_many
from tools_db import add_txns, make_db

DATA = pathlib.Path(__file__).parent / "data"
GOLDEN_RFS = DATA / "golden-v1.rfs"


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def tid(n: int) -> bytes:
    return (0x03E5A0D4D0000000 + n).to_bytes(8, "big")


def write_file(path, spec, file_id: bytes = bytes(range(16))) -> None:
    """A data file from spec: a list of transactions, each a list of
    (oid, kind, refs, back) with kind data/unknown/back; back is an index into the
    earlier records of the same oid (or 0 for no data, or -1 for a bad position)."""
    out = bytearray(fmt.encode_file_header(file_id))
    current: dict[bytes, int] = {}
    history: dict[bytes, list[int]] = {}
    for n, records in enumerate(spec):
        tpos = len(out)
        t = tid(n + 1)
        pos = tpos + fmt.txn_header_len(b"u", b"d", b"")
        body, table = [], []
        for o, kind, refs, back in records:
            prev = current.get(o, 0)
            if kind == "back":
                earlier = history.get(o, [])
                if back == -1:
                    back_pos = tpos - 8  # inside the previous transaction's trailer: unreadable
                elif back == 0 or not earlier:
                    back_pos = 0
                else:
                    back_pos = earlier[back % len(earlier)]
                rec = fmt.encode_data_record(o, t, prev, tpos, b"", None, back_pos)
            else:
                rec = fmt.encode_data_record(o, t, prev, tpos, b"".join(refs) if kind == "data" else b"",
                                             b"data " + o, refs_known=kind == "data")
            table.append((o, pos))
            history.setdefault(o, []).append(pos)
            current[o] = pos
            pos += len(rec)
            body.append(rec)
        tlen = pos - tpos + fmt.oid_table_size(len(records))
        out += fmt.encode_txn_header(t, tlen, b" ", b"u", b"d", b"", len(records))
        for rec in body:
            out += rec
        out += fmt.encode_oid_table(table) + fmt.encode_trailer(tlen)
    pathlib.Path(path).write_bytes(bytes(out))


def random_spec(rng: random.Random, ntxns: int, noids: int) -> list:
    spec = []
    for _ in range(ntxns):
        oids = rng.sample(range(noids), rng.randint(1, min(8, noids)))
        records = []
        for o in oids:
            r = rng.random()
            if r < 0.65:
                refs = [oid(rng.randrange(noids + 3)) for _ in range(rng.randint(0, 6))]  # some missing
                if refs and rng.random() < 0.2:
                    refs.append(refs[0])  # a duplicate
                if rng.random() < 0.05:
                    refs.append(oid(o))  # itself
                records.append((oid(o), "data", refs, 0))
            elif r < 0.75:
                records.append((oid(o), "unknown", [], 0))
            elif r < 0.85:
                records.append((oid(o), "back", [], 0))  # no data (deletion, undone creation)
            elif r < 0.97:
                records.append((oid(o), "back", [], rng.randint(1, 5)))  # undo: an earlier revision
            else:
                records.append((oid(o), "back", [], -1))  # unreadable
        spec.append(records)
    return spec


def answers(path, oids: list[bytes], use_index: bool) -> tuple[list[dict], list[str]]:
    reports = refs_many(str(path), oids, use_index=use_index)
    out = []
    for r in reports:
        d = r.to_json()
        d.pop("method")
        d.pop("method_note")
        out.append(d)
    return out, [r.method + ":" + r.method_note for r in reports]


def check_same(path, noids: int) -> str:
    """Index and scan agree for every oid (and a few missing ones); the index's method note."""
    oids = [oid(i) for i in range(noids + 3)]
    by_index, how = answers(path, oids, True)
    by_scan, scan_how = answers(path, oids, False)
    assert by_index == by_scan
    assert all(h.startswith("index:") for h in how), how[0]
    assert all(h.startswith("scan:") for h in scan_how)
    return how[0].split(":", 1)[1]


@pytest.mark.parametrize("seed", range(10))
def test_random_files_index_equals_scan(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    if seed % 2:  # many small blocks and runs: merges, splits and block edges get exercised
        monkeypatch.setattr(referrers, "BLOCK", rng.choice([2, 3, 5]))
        monkeypatch.setattr(referrers, "RUN_PAIRS", rng.choice([3, 7, 20]))
    noids = rng.choice([5, 20, 60])
    spec = random_spec(rng, 60, noids)
    path = tmp_path / "D.rfs"
    steps = sorted(rng.sample(range(1, 60), 5)) + [60]
    notes = []
    for n, k in enumerate(steps):
        file_id = bytes(range(16)) if n < 4 else bytes(16)  # then another generation (as a pack makes)
        write_file(path, spec[:k], file_id)
        notes.append(check_same(path, noids))
    assert notes[0] == "built"
    assert notes[1] == notes[2] == notes[3] == "updated"
    assert notes[4].startswith("rebuilt") and "generation" in notes[4]
    assert notes[5] == "updated"


def test_unchanged_file_uses_index_without_writing(tmp_path):
    path = tmp_path / "D.rfs"
    make_db(path)
    assert check_same(path, 300) == "built"
    before = os.stat(referrers.referrers_path(path))
    assert check_same(path, 300) == "used"
    after = os.stat(referrers.referrers_path(path))
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_incremental_update_after_commits(tmp_path, monkeypatch):
    path = tmp_path / "D.rfs"
    make_db(path)
    check_same(path, 300)
    add_txns(path, 10)

    def no_build(*args, **kw):
        raise AssertionError("an update must not rebuild")
    monkeypatch.setattr(referrers, "build", no_build)
    assert check_same(path, 300) == "updated"
    # the counter object, created by add_txns: referenced by the root alone
    reports = refs_many(str(path), [oid(0)])
    assert reports[0].method == "index"


def test_after_pack(tmp_path):
    path = tmp_path / "D.rfs"
    make_db(path)
    check_same(path, 300)
    st = refstorage.FileStorage(str(path))
    st.pack(time.time(), referencesf)
    st.close()
    note = check_same(path, 300)
    assert note.startswith("rebuilt") and "generation" in note


def _damaged(path, how: str) -> None:
    rpath = referrers.referrers_path(path)
    raw = bytearray(pathlib.Path(rpath).read_bytes())
    if how == "truncated":
        del raw[-10:]
    elif how == "flipped-trailer":
        raw[-30] ^= 0x40
    elif how == "flipped-block":
        raw[20] ^= 0x01  # inside the first block: found when a query reads it
    elif how == "flipped-magic":
        raw[1] ^= 0x01
    elif how == "version":
        raw[8:10] = (99).to_bytes(2, "big")
    elif how == "empty":
        raw = bytearray()
    elif how in ("generation", "beyond", "mismatch"):
        with Log(str(path)) as log:
            built = log.build_index()
            ri = referrers.open_referrers(rpath, log.reader, log.header.file_id, built.end)
            assert ri is not None
            pairs = []
            for i in range(len(ri.firsts)):
                pairs += ri.block_keys(i)
            unknown, unreadable = ri.lists()
            file_id, pos, t = ri.file_id, ri.pos, ri.tid
            ri.close()
        if how == "generation":
            file_id = bytes(16)
        elif how == "beyond":
            pos += 1000
        else:
            t = fmt.p64(fmt.u64(t) + 1)
        referrers.write_file(rpath, file_id, pos, t, pairs, unknown, unreadable)
        return
    pathlib.Path(rpath).write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "flipped-trailer", "flipped-block", "flipped-magic",
                                 "version", "empty", "generation", "beyond", "mismatch"])
def test_damaged_cache_is_rebuilt(tmp_path, how):
    path = tmp_path / "D.rfs"
    make_db(path)
    check_same(path, 300)
    _damaged(path, how)
    note = check_same(path, 300)
    assert note.startswith("rebuilt"), note
    expect = {"truncated": "checksum", "flipped-trailer": "checksum", "flipped-block": "block 0",
              "flipped-magic": "bad magic", "version": "version 99", "empty": "bad magic",
              "generation": "generation", "beyond": "covers", "mismatch": "does not match"}[how]
    assert expect in note
    assert check_same(path, 300) == "used"


def test_open_errors_name_file_and_offset(tmp_path):
    path = tmp_path / "D.rfs"
    make_db(path)
    check_same(path, 300)
    _damaged(path, "version")
    with Log(str(path)) as log:
        end = log.build_index().end
        with pytest.raises(ReferrerIndexError) as info:
            referrers.open_referrers(referrers.referrers_path(path), log.reader, log.header.file_id, end)
    assert info.value.path == referrers.referrers_path(path)
    assert info.value.offset == 8
    assert "D.rfs.referrers" in str(info.value) and "8" in str(info.value)


def test_data_file_truncated_below_the_cache(tmp_path):
    path = tmp_path / "D.rfs"
    make_db(path, extra_txns=5)
    check_same(path, 300)
    with Log(str(path)) as log:
        ths = list(log.reader.iter_txns(fmt.HEADER_SIZE, log.end()))
    with open(path, "r+b") as f:
        f.truncate(ths[-3].next_pos)  # as recover or a restore to an older backup leaves it
    note = check_same(path, 300)
    assert note.startswith("rebuilt") and "covers" in note


def test_unwritable_directory_answers_by_scan(tmp_path, monkeypatch):
    path = tmp_path / "D.rfs"
    make_db(path)
    monkeypatch.setattr(referrers.os, "access", lambda p, mode: False)
    by_scan, _ = answers(path, [oid(i) for i in range(300)], False)
    got, how = answers(path, [oid(i) for i in range(300)], True)
    assert got == by_scan
    assert how[0].startswith("scan:") and "not writable" in how[0]
    assert not os.path.exists(referrers.referrers_path(path))


def test_unwritable_directory_uses_a_current_index(tmp_path, monkeypatch):
    path = tmp_path / "D.rfs"
    make_db(path)
    check_same(path, 300)
    monkeypatch.setattr(referrers.os, "access", lambda p, mode: False)
    assert check_same(path, 300) == "used"
    add_txns(path, 2)  # stale now, and it cannot be updated: the scan answers
    _, how = answers(path, [oid(0)], True)
    assert how[0].startswith("scan:") and "cannot be updated" in how[0]


class _FailingWrites(fileio.Ops):
    def open(self, path, flags, mode=0o666):
        if ".referrers.tmp" in str(path):
            raise PermissionError(13, "Permission denied", path)
        return super().open(path, flags, mode)


def test_failed_write_answers_by_scan(tmp_path):
    path = tmp_path / "D.rfs"
    make_db(path)
    with fileio.injected(_FailingWrites()):
        got, how = answers(path, [oid(i) for i in range(300)], True)
    by_scan, _ = answers(path, [oid(i) for i in range(300)], False)
    assert got == by_scan
    assert how[0].startswith("scan:") and "cannot write" in how[0]
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_concurrent_writer(tmp_path):
    """refs while a storage in another thread commits: every answer is one committed state."""
    path = tmp_path / "D.rfs"
    db = ZODB.DB(refstorage.FileStorage(str(path), create=True))
    conn = db.open()
    root = conn.root()
    root["a"], root["b"], root["t"] = PersistentMapping(), PersistentMapping(), PersistentMapping()
    root["a"]["x"] = root["t"]
    transaction.commit()
    a, b, t = root["a"]._p_oid, root["b"]._p_oid, root["t"]._p_oid
    conn.close()
    stop = threading.Event()
    errors: list[BaseException] = []
    commits: list[int] = []

    def writer():
        try:
            c = db.open()
            r = c.root()
            n = 0
            while not stop.is_set():
                # the reference to t moves between a and b: exactly one of them holds it
                src, dst = (r["a"], r["b"]) if n % 2 == 0 else (r["b"], r["a"])
                dst["x"] = src.pop("x")
                r.setdefault("junk", PersistentMapping())[n] = n
                transaction.commit()
                n += 1
                commits.append(n)
            c.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    th = threading.Thread(target=writer)
    th.start()
    try:
        seen = set()
        for _ in range(15):
            before = len(commits)
            deadline = time.monotonic() + 10
            while len(commits) == before and time.monotonic() < deadline:
                time.sleep(0.01)  # let the writer commit between two queries
            report = refs_many(str(path), [t])[0]
            assert report.method == "index", report.method_note
            holders = {bytes.fromhex(r["oid"]) for r in report.referrers}
            assert holders in ({oid(0), a}, {oid(0), b}), holders  # the root holds it too
            seen.add(report.method_note)
    finally:
        stop.set()
        th.join()
    assert not errors
    db.close()
    assert "updated" in seen
    check_same(path, 12)


def test_cli_method_and_scan_option(tmp_path):
    path = tmp_path / "D.rfs"
    make_db(path)
    run = CliRunner().invoke
    r = run(cli, ["refs", str(path), "0x01", "--json"])
    d = json.loads(r.output)
    assert (d["method"], d["method_note"]) == ("index", "built")
    r2 = run(cli, ["refs", str(path), "0x01", "--json", "--scan"])
    d2 = json.loads(r2.output)
    assert (d2["method"], d2["method_note"]) == ("scan", "--scan")
    for x in (d, d2):
        x.pop("method")
        x.pop("method_note")
    assert d == d2
    assert r.exit_code == r2.exit_code


def test_golden_referrers(tmp_path, monkeypatch):
    """tests/data/golden-v1.referrers pins the format: the current writer makes it byte for byte
    from golden-referrers.rfs (tests/data/make_golden_referrers.py, blocks of 3 pairs), and
    every version this code reads opens and answers as the scan does."""
    monkeypatch.setattr(referrers, "BLOCK", 3)
    data = tmp_path / "golden.rfs"
    shutil.copy(DATA / "golden-referrers.rfs", data)
    with Log(str(data)) as log:
        built = log.build_index()
        positions = sorted(p for _o, p in built.index.items())
        referrers.build(referrers.referrers_path(data), log.reader, log.header.file_id, positions,
                        built.end, built.last_tid)
    golden = DATA / f"golden-v{referrers.VERSION}.referrers"
    assert pathlib.Path(referrers.referrers_path(data)).read_bytes() == golden.read_bytes()
    for version in referrers.READ_VERSIONS:
        shutil.copy(DATA / f"golden-v{version}.referrers", referrers.referrers_path(data))
        with Log(str(data)) as log:
            ri = referrers.open_referrers(referrers.referrers_path(data), log.reader, log.header.file_id,
                                          log.build_index().end)
            assert ri is not None
            assert len(ri.firsts) > 3 and ri.nunknown == 1 and ri.nunreadable == 1
            assert ri.lookup(oid(2)) == [oid(0), oid(1), oid(2), oid(6)]  # 1: its undo, 2: itself
            ri.close()
        assert check_same(data, 10) == "used"


def test_lookup_reads_only_the_blocks_it_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(referrers, "BLOCK", 4)
    path = tmp_path / "D.rfs"
    make_db(path)
    check_same(path, 300)
    with Log(str(path)) as log:
        end = log.build_index().end
        ri = referrers.open_referrers(referrers.referrers_path(path), log.reader, log.header.file_id, end)
        assert ri is not None and len(ri.firsts) > 20
        read = []
        monkeypatch.setattr(ri, "block_raw", lambda i, orig=ri.block_raw: read.append(i) or orig(i))
        ri.lookup(oid(1))
        ri.close()
    assert 1 <= len(read) <= 3


def test_many_changes_rebuild_instead_of_update(tmp_path, monkeypatch):
    path = tmp_path / "D.rfs"
    make_db(path)
    check_same(path, 300)
    add_txns(path, 3)
    monkeypatch.setattr(referrers, "UPDATE_MAX", 1)
    note = check_same(path, 300)
    assert note.startswith("rebuilt") and "too many changes" in note


def test_wrong_pair_found_by_a_query_is_rebuilt(tmp_path):
    """A cache that passes every check but names a referrer the file does not have: the query
    notices (no current record), rebuilds, and answers as the scan does."""
    path = tmp_path / "D.rfs"
    make_db(path)
    check_same(path, 300)
    rpath = referrers.referrers_path(path)
    with Log(str(path)) as log:
        built = log.build_index()
        ri = referrers.open_referrers(rpath, log.reader, log.header.file_id, built.end)
        pairs = sorted(set(k for i in range(len(ri.firsts)) for k in ri.block_keys(i)) | {1 << 64 | 0xDEAD})
        unknown, unreadable = ri.lists()
        referrers.write_file(rpath, ri.file_id, ri.pos, ri.tid, pairs, unknown, unreadable)
        ri.close()
    reports = refs_many(str(path), [oid(1)])
    assert reports[0].method == "index" and reports[0].method_note.startswith("rebuilt")
    assert "dead" in reports[0].method_note
    assert answers(path, [oid(1)], True)[0] == answers(path, [oid(1)], False)[0]
