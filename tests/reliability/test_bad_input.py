"""Bad input: every kind of wrong file gets its own error; fuzzed files never escape the package's errors.

Part one is a table: each bad input, opened read-only and read-write, raises
its specific error (type and message, naming the path) and is left unchanged.
(The basic cases -- an empty file, one byte, FS30 and GIF magics, a future
version without a valid checksum, a real ZODB FileStorage opened read-write,
a directory opened read-write, a missing file, a garbage, truncated or
foreign index file -- are in tests/test_storage.py.)

Part two fuzzes the small database of helpers.build_small_db with hypothesis:
random byte changes, bit flips, big integers written over length fields,
insertions, deletions and truncations.  Each mutated file is opened read-only
and read-write and read completely (loads, loadBefore, the iterator, a
verifying scan; after a read-write open, one more commit and a reopen), and
dumped with `refstorage dump` (every field, classes, text formatting).  Only
refstorage's errors (RefStorageError subclasses, POSKeyError for a missing
object) may escape; a hard per-example timer turns a hang into a failure; and
tracemalloc checks that no example allocates much more than the file's size.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ZODB.utils import p64, u64

import refstorage
from refstorage import errors, log
from refstorage import fileformat as fmt
from refstorage.index import OidIndex
from refstorage.indexfile import save_index

try:
    from refstorage.tools import dump as dump_tool
except ImportError:  # the tools are optional here
    dump_tool = None

from .helpers import (
    LONG,
    build_small_db,
    capture_log,
    check_model,
    child_env,
    close_quickly,
    commit,
    is_package_error,
    no_fsync,
    report,
    scaled,
    temp_dir,
)

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def small_db():
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        model, ranges = build_small_db(path)
        with open(path, "rb") as f:
            yield f.read(), model, ranges


def _header(version=fmt.FORMAT_VERSION, hsize=fmt.HEADER_SIZE, fix_crc=True) -> bytes:
    body = bytearray(fmt.encode_file_header(b"\x01" * 16))
    struct.pack_into(">HH", body, 8, version, hsize)
    if fix_crc:
        struct.pack_into(">I", body, fmt.HEADER_SIZE - 4, zlib.crc32(body[:fmt.HEADER_SIZE - 4]))
    return bytes(body)


def _bad_files(valid: bytes) -> dict[str, tuple[bytes, type, str]]:
    crc_broken = bytearray(valid)
    crc_broken[100] ^= 0x40
    mangled = valid.replace(b"\r\n", b"\n")  # a text-mode transfer
    index = b"\x89RFX\r\n\x1a\n" + bytes(200)
    return {
        "one wrong byte": (b"x", errors.NotARefStorageFileError, "bad magic"),
        "magic prefix only": (fmt.MAGIC[:5], errors.CorruptedHeaderError, "shorter than its header"),
        "FS21 magic": (b"FS21" + bytes(100), errors.ForeignFormatError, "FS21.*convert"),
        "text-mode mangled": (mangled, errors.NotARefStorageFileError, "bad magic"),
        "header cut at 500 bytes": (valid[:500], errors.CorruptedHeaderError, "500 bytes, shorter"),
        "header checksum": (bytes(crc_broken), errors.CorruptedHeaderError, "header checksum mismatch"),
        "version 0": (_header(version=0) + valid[1024:], errors.CorruptedHeaderError, "version 0"),
        "header size 512": (_header(hsize=512) + valid[1024:], errors.CorruptedHeaderError,
                            "header size 512"),
        "future version, valid checksum": (_header(version=2) + valid[1024:], errors.FutureVersionError,
                                           "version 2 is newer.*upgrade"),
        "random garbage": (random.Random(7).randbytes(65536), errors.NotARefStorageFileError,
                           "bad magic"),
        "an index file": (index, errors.NotARefStorageFileError, "bad magic"),
        "zeros": (bytes(4096), errors.NotARefStorageFileError, "bad magic"),
    }


def test_bad_files_get_specific_errors(small_db):
    valid, _model, _ranges = small_db
    cases = _bad_files(valid)
    with temp_dir() as d:
        for name, (content, error, message) in cases.items():
            path = os.path.join(d, "Data.rfs")
            with open(path, "wb") as f:
                f.write(content)
            for read_only in (True, False):
                with pytest.raises(error, match=message) as info:
                    refstorage.FileStorage(path, read_only=read_only)
                assert path in str(info.value), name
                with open(path, "rb") as f:
                    assert f.read() == content, f"{name}: the file was changed"
            assert set(os.listdir(d)) <= {"Data.rfs", "Data.rfs.lock"}, name
    report("bad_input_table", cases=len(cases), opens=2 * len(cases))


def test_zodb_filestorage_file_read_only(tmp_path):
    from ZODB.FileStorage import FileStorage as ZFS

    path = str(tmp_path / "Data.fs")
    ZFS(path).close()
    with pytest.raises(errors.ForeignFormatError, match="ZODB FileStorage.*convert"):
        refstorage.FileStorage(path, read_only=True)


def test_directory_read_only(tmp_path):
    with pytest.raises(errors.PathIsDirectoryError, match="is a directory"):
        refstorage.FileStorage(str(tmp_path), read_only=True)


# -- damaged index files: a warning, then the index is rebuilt from the data file ----------

def _index_cases(path: str, valid_index: bytes) -> dict[str, tuple[bytes | None, str]]:
    flipped = bytearray(valid_index)
    flipped[len(flipped) // 2] ^= 0x01
    future = bytearray(valid_index)
    future[9] = 9
    with open(path, "rb") as f:
        data_file = f.read(4096)
    return {
        "a flipped bit": (bytes(flipped), "checksum mismatch"),
        "another version": (bytes(future), "index format version 9"),
        "a data file": (data_file, "is a refstorage data file"),
        "empty": (b"", "bad magic|truncated"),
        "cut in half": (valid_index[: len(valid_index) // 2], "checksum mismatch|truncated"),
    }


def test_damaged_index_files_are_rebuilt(small_db):
    valid, model, _ranges = small_db
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        with open(path, "wb") as f:
            f.write(valid)
        refstorage.FileStorage(path).close()
        with open(path + ".index", "rb") as f:
            good = f.read()
        for name, (content, message) in _index_cases(path, good).items():
            with open(path + ".index", "wb") as f:
                f.write(content)
            for read_only in (True, False):
                with capture_log() as records:
                    s = refstorage.FileStorage(path, read_only=read_only)
                try:
                    check_model(s, model)
                finally:
                    s.close()
                warnings = [r.getMessage() for r in records if r.levelname == "WARNING"]
                assert any("rebuilding the index" in w for w in warnings), (name, warnings)
                assert any(re.search(message, w) for w in warnings), (name, message, warnings)
            with open(path + ".index", "rb") as f:
                assert f.read() == good, f"{name}: the read-write open did not save a good index"
        # an index directory: ignored with a warning, and saving it on close fails with a log entry
        os.remove(path + ".index")
        os.mkdir(path + ".index")
        with capture_log() as records:
            s = refstorage.FileStorage(path)
            check_model(s, model)
            s.close()
        text = "\n".join(r.getMessage() for r in records)
        assert "rebuilding the index" in text and "could not save the index" in text


def test_index_with_a_valid_checksum_but_wrong_positions(small_db):
    """An index file that passes its checks but maps an oid to another oid's record
    (a bug in whatever wrote it): loads report the mismatch, never the wrong data."""
    valid, _model, _ranges = small_db
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        with open(path, "wb") as f:
            f.write(valid)
        s = refstorage.FileStorage(path)
        positions = dict(s._state.index.items())
        file_id, end, last = s._file_id, s._end, s.lastTransaction()
        close_quickly(s)
        swapped = dict(positions)
        swapped[p64(0)], swapped[p64(2)] = positions[p64(2)], positions[p64(0)]
        save_index(path + ".index", OidIndex(swapped), file_id=file_id, pos=end, tid=last)
        s = refstorage.FileStorage(path, read_only=True)
        try:
            for oid in (p64(0), p64(2)):
                with pytest.raises(errors.CorruptedDataError, match="found where oid"):
                    s.load(oid)
            assert s.load(p64(1))[0] == b"one-1"
        finally:
            s.close()


# -- no permission ----------------------------------------------------------------------------------

PERMISSION_SCRIPT = textwrap.dedent("""
    import json, os, sys, traceback
    import refstorage  # before dropping privileges: the interpreter may live in /root
    import refstorage.storage, refstorage.index, refstorage.fileio, socket
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    out = {}
    for name, path, read_only in json.loads(sys.argv[1]):
        try:
            refstorage.FileStorage(path, read_only=read_only).close()
            out[name] = ["ok", ""]
        except BaseException as exc:
            out[name] = [type(exc).__module__ + "." + type(exc).__name__, str(exc)]
    print(json.dumps(out))
""")


def _run_unprivileged(cases: list) -> dict:
    out = subprocess.run([sys.executable, "-c", PERMISSION_SCRIPT, json.dumps(cases)],
                         capture_output=True, text=True, env=child_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def unprivileged_dirs(small_db):
    if os.geteuid() == 0:
        try:  # can we become nobody at all?
            subprocess.run([sys.executable, "-c", "import os; os.setgroups([]); os.setgid(65534); "
                            "os.setuid(65534)"],
                           check=True, timeout=60, capture_output=True)
        except (subprocess.CalledProcessError, OSError):
            pytest.skip("cannot switch to uid 65534 to test permissions")
    valid = small_db[0]
    with temp_dir() as d:
        os.chmod(d, 0o755)
        made = {}
        for name, dmode, fmode in [("closed-dir", 0o755, 0o600), ("open-dir", 0o777, 0o600),
                                   ("readable", 0o777, 0o644), ("readable-closed-dir", 0o755, 0o644)]:
            sub = os.path.join(d, name)
            os.mkdir(sub)
            path = os.path.join(sub, "Data.rfs")
            with open(path, "wb") as f:
                f.write(valid)
            os.chmod(path, fmode)
            os.chmod(sub, dmode)
            made[name] = path
        yield made


def test_no_permission(unprivileged_dirs):
    p = unprivileged_dirs
    got = _run_unprivileged([
        ["unreadable, read-only", p["open-dir"], True],
        ["unreadable, read-write", p["open-dir"], False],
        ["unwritable, read-write", p["readable"], False],
        ["readable, read-only", p["readable"], True],
        ["unreadable in a closed dir, read-only", p["closed-dir"], True],
    ])
    perm = "refstorage.errors.FilePermissionError"
    assert got["unreadable, read-only"][0] == perm
    assert "permission denied" in got["unreadable, read-only"][1]
    assert p["open-dir"] in got["unreadable, read-only"][1]
    assert got["unreadable, read-write"][0] == perm
    assert got["unwritable, read-write"][0] == perm
    assert p["readable"] in got["unwritable, read-write"][1]
    assert got["readable, read-only"][0] == "ok"
    assert got["unreadable in a closed dir, read-only"][0] == perm


def test_no_permission_for_the_lock_file(unprivileged_dirs):
    """A read-write open where the lock file cannot be created names the lock file."""
    p = unprivileged_dirs
    got = _run_unprivileged([["lock file", p["readable-closed-dir"], False]])
    kind, message = got["lock file"]
    assert kind == "refstorage.errors.FilePermissionError", (kind, message)
    assert p["readable-closed-dir"] + ".lock" in message


# -- fuzzing --------------------------------------------------------------------------------------

INTERESTING = [0, 1, 7, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**48, 2**63, 2**64 - 1]


def _mutations(n: int):
    # most changes after the file header: a changed header byte only ever meets its checksum
    # (one_of would merge equal strategies, so the weight is drawn explicitly)
    anywhere, body = st.integers(0, n - 1), st.integers(fmt.HEADER_SIZE, n - 1)
    pos = st.integers(0, 5).flatmap(lambda c: anywhere if c == 0 else body)
    one = st.one_of(
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("u32"), pos, st.sampled_from(INTERESTING[:10])),
        st.tuples(st.just("u64"), pos, st.sampled_from(INTERESTING)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=24)),
        st.tuples(st.just("delete"), pos, st.integers(1, 80)),
        st.tuples(st.just("truncate"), st.integers(0, n), st.just(0)),
    )
    return st.lists(one, min_size=1, max_size=4)


def _mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in mutations:
        pos = min(pos, max(len(b) - 1, 0))
        if kind == "set" and b:
            b[pos] = arg
        elif kind == "flip" and b:
            b[pos] ^= 1 << arg
        elif kind in ("u32", "u64"):
            size = 4 if kind == "u32" else 8
            if len(b) >= size:
                pos = min(pos, len(b) - size)
                b[pos:pos + size] = (arg & ((1 << 8 * size) - 1)).to_bytes(size, "big")
        elif kind == "insert":
            b[pos:pos] = arg
        elif kind == "delete":
            del b[pos:pos + arg]
        elif kind == "truncate":
            del b[pos:]
    return bytes(b)


class ExampleTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise ExampleTimeout("an example ran for more than its time limit: a hang")


class Fuzz:
    """Runs one mutated file through open, reads and verify; counts what happened."""

    TIME_LIMIT = 20.0  # seconds per example: generous, only a hang gets there

    def __init__(self, d: str):
        self.dir = d
        self.path = os.path.join(d, "Data.rfs")
        self.stats: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def write(self, content: bytes) -> None:
        for name in os.listdir(self.dir):
            os.remove(os.path.join(self.dir, name))
        with open(self.path, "wb") as f:
            f.write(content)

    def guarded(self, fn, *args) -> None:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self.TIME_LIMIT)
        try:
            with capture_log(), no_fsync():
                fn(*args)
        except ExampleTimeout:
            raise
        except BaseException as exc:
            if not is_package_error(exc):
                raise
            self.count(f"{fn.__name__}: {type(exc).__name__}")
        else:
            self.count(f"{fn.__name__}: ok")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def read_all(self, s) -> None:
        """Everything a storage serves; package errors are fine, nothing else is."""
        reader = s._state.reader
        for oid in list(s._state.index.keys()):
            for fn in (s.load, s.getTid, s.history):
                try:
                    fn(oid)
                except (errors.RefStorageError, KeyError):
                    pass
            try:
                s.loadBefore(oid, p64(u64(s.lastTransaction()) + 1))
            except (errors.RefStorageError, KeyError):
                pass
        try:
            for t in s.iterator():
                for _r in t:
                    pass
        except errors.RefStorageError:
            pass
        try:
            s.undoLog(0, 100)
        except errors.RefStorageError:
            pass
        log.scan(reader, fmt.HEADER_SIZE, s._end, OidIndex(), verify=True)
        log.scan(reader, fmt.HEADER_SIZE, s._state.file.size, None, verify=True)

    def open_read_only(self) -> None:
        s = refstorage.FileStorage(self.path, read_only=True)
        try:
            self.read_all(s)
        finally:
            s.close()

    def open_read_write(self) -> None:
        s = refstorage.FileStorage(self.path)
        try:
            self.read_all(s)
            tid = commit(s, {p64(7): b"after the damage"})
        finally:
            close_quickly(s)
        s = refstorage.FileStorage(self.path)
        try:
            assert s.lastTransaction() == tid and s.load(p64(7)) == (b"after the damage", tid)
        finally:
            close_quickly(s)

    def dump(self) -> None:
        for item in dump_tool.dump(self.path, full_data=True, classes=True):
            dump_tool.format_item(item)

    def scan_raw(self) -> None:
        f = refstorage.fileio.DataFile(self.path, read_only=True)
        try:
            log.scan(log.LogReader(f), fmt.HEADER_SIZE, f.size, OidIndex(), verify=True)
        finally:
            f.close()


FUZZ_EXAMPLES = scaled(10_000, 100_000)
FUZZ_SETTINGS = dict(deadline=None, derandomize=not LONG, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz(small_db):
    with temp_dir() as d:
        fz = Fuzz(d)
        yield fz
        report("fuzz", examples_per_test=_FUZZ_COUNTS, outcomes=dict(sorted(fz.stats.items())))


_FUZZ_COUNTS: dict[str, int] = {}


def _counted(name: str) -> None:
    _FUZZ_COUNTS[name] = _FUZZ_COUNTS.get(name, 0) + 1


def test_fuzz_open_read_only(small_db, fuzz):
    valid = small_db[0]

    @settings(max_examples=FUZZ_EXAMPLES * 4 // 10, **FUZZ_SETTINGS)
    @given(_mutations(len(valid)))
    def run(mutations):
        _counted("read-only open, reads, verify")
        fuzz.write(_mutate(valid, mutations))
        fuzz.guarded(fuzz.open_read_only)
        fuzz.guarded(fuzz.scan_raw)
        if dump_tool is not None:
            fuzz.guarded(fuzz.dump)

    run()


def test_fuzz_open_read_write(small_db, fuzz):
    valid = small_db[0]

    @settings(max_examples=FUZZ_EXAMPLES * 3 // 10, **FUZZ_SETTINGS)
    @given(_mutations(len(valid)))
    def run(mutations):
        _counted("read-write open, reads, commit, reopen")
        fuzz.write(_mutate(valid, mutations))
        fuzz.guarded(fuzz.open_read_write)

    run()


def test_fuzz_memory_is_bounded_by_the_file_size(small_db, fuzz):
    """No garbage length makes a read allocate more than a small multiple of the file
    (plus the largest read that is not first cut to the file's size)."""
    valid = small_db[0]
    worst = [0, None]

    @settings(max_examples=FUZZ_EXAMPLES * 3 // 10, **FUZZ_SETTINGS)
    @given(_mutations(len(valid)))
    def run(mutations):
        _counted("memory")
        content = _mutate(valid, mutations)
        fuzz.write(content)
        tracemalloc.start()  # only around the example: tracing hypothesis itself is slow
        try:
            fuzz.guarded(fuzz.open_read_only)
            fuzz.guarded(fuzz.scan_raw)
            if dump_tool is not None:
                fuzz.guarded(fuzz.dump)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        bound = 16 * len(content) + 2 * refstorage.fileio.READ_CLAMP
        if peak > worst[0]:
            worst[:] = [peak, mutations]
        assert peak < bound, f"{peak:,} bytes allocated for a {len(content):,}-byte file"

    run()
    report("fuzz_memory", worst_peak_bytes=worst[0], file_bytes=len(valid))
