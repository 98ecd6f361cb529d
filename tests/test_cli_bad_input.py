"""Every `refstorage` subcommand on bad input: a one-line message naming the input, no traceback.

The table below walks each subcommand through missing, directory, empty,
random-bytes and FileStorage inputs, bad oids, bad times and counts,
unreachable servers and unwritable destinations.  Each case must exit with a
non-zero status (1 for a bad file or destination, 2 for a bad option value, as
documented in ``refstorage --help``), print no traceback, name the input, and
leave no new file behind where it refused to work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import transaction
import ZODB
from click.testing import CliRunner
from ZODB.FileStorage import FileStorage as ZFS

from refstorage.cli import main
from tools_db import make_db

DB_COMMANDS = ["dump", "verify", "info", "tail", "history", "refs", "recover", "backup", "pack",
               "convert", "serve"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    db = d / "Data.rfs"
    make_db(db)
    (d / "empty.rfs").write_bytes(b"")
    (d / "random.rfs").write_bytes(os.urandom(4096))
    (d / "adir.rfs").mkdir()
    zdb = ZODB.DB(ZFS(str(d / "Data.fs"), create=True))
    with zdb.transaction() as conn:
        conn.root()["x"] = 1
    zdb.close()
    transaction.abort()
    shutil.copy(d / "Data.fs", d / "fs.rfs")  # a FileStorage file under refstorage's suffix
    (d / "plainfile").write_bytes(b"x")
    (d / "bad.conf").write_text("<filestorage>\n  path\n")
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def check(r, *names, status=None):
    out = r.output
    assert "Traceback" not in out, out
    assert isinstance(r.exception, SystemExit), (r.exception, out)
    assert r.exit_code != 0, out
    if status is not None:
        assert r.exit_code == status, out
    for name in names:
        assert str(name) in out, (name, out)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) <= 3, out


def argv(cmd, src, d):
    """The command line of `cmd` with `src` as its database (the other arguments valid)."""
    return {
        "history": [cmd, src, "0"],
        "refs": [cmd, src, "0"],
        "recover": [cmd, src, d / "out-recover.rfs"],
        "backup": [cmd, src, d / "out-backups"],
        "convert": [cmd, src, d / "out-convert.rfs"],
        "serve": [cmd, src, "--port", "0"],
    }.get(cmd, [cmd, src])


SOURCES = {
    "missing": ("nope.rfs", "no such file"),
    "directory": ("adir.rfs", "directory"),
    "empty": ("empty.rfs", "empty"),
    "random": ("random.rfs", None),
    "filestorage": ("fs.rfs", None),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
@pytest.mark.parametrize("cmd", DB_COMMANDS)
def test_bad_database(files, cmd, kind):
    name, cause = SOURCES[kind]
    if cmd == "convert" and kind == "filestorage":
        pytest.skip("convert reads FileStorage files: not bad input")
    before = set(os.listdir(files))
    r = run(*argv(cmd, files / name, files))
    check(r, files / name, status=1)
    if cause:
        assert cause in r.output.lower(), r.output
    assert set(os.listdir(files)) == before, "a refused command left files behind"


@pytest.mark.parametrize("cmd", ["convert", "recover"])
def test_bad_database_as_destination(files, cmd, tmp_path):
    for name in ("adir.rfs", "random.rfs", "empty.rfs"):
        dst = tmp_path / name
        if name == "adir.rfs":
            dst.mkdir()
        else:
            shutil.copy(files / name, dst)
        r = run(cmd, files / "Data.rfs", dst, *(["--force"] if cmd == "recover" and name != "adir.rfs"
                                                 else []))
        if cmd == "recover" and name != "adir.rfs":
            assert r.exit_code == 0, r.output  # --force: overwritten
            continue
        check(r, dst)


UNWRITABLE = {
    "missing directory": lambda d: d / "nodir" / "x.rfs",
    "under a file": lambda d: d / "plainfile" / "x.rfs",
}


@pytest.mark.parametrize("where", sorted(UNWRITABLE))
@pytest.mark.parametrize("cmd", ["recover", "convert", "restore", "backup"])
def test_unwritable_destination(files, tmp_path, cmd, where):
    dst = UNWRITABLE[where](files)
    if cmd == "restore":
        bdir = tmp_path / "b"
        assert run("backup", files / "Data.rfs", bdir).exit_code == 0
        r = run("restore", bdir, dst)
    elif cmd == "backup":
        r = run("backup", files / "Data.rfs", dst.parent / "backups")
        dst = dst.parent / "backups"
    else:
        r = run(cmd, files / "Data.rfs", dst)
    check(r, dst, status=1)
    assert not os.path.exists(dst)


def test_read_only_destination_directory(files, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        for cmd in ("recover", "convert"):
            check(run(cmd, files / "Data.rfs", ro / "x.rfs"), ro, status=1)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("cmd", ["history", "refs"])
@pytest.mark.parametrize("bad", ["zz", "-1", "0x1ffffffffffffffff", ""])
def test_bad_oid(files, cmd, bad):
    r = run(cmd, files / "Data.rfs", bad)
    check(r, repr(bad), status=2)


BAD_TIMES = ["yesterday", "123", "2024-13-01", "0x", "10000-01-01"]


@pytest.mark.parametrize("bad", BAD_TIMES)
@pytest.mark.parametrize("cmd,opt", [("dump", "--from"), ("dump", "--to"), ("info", "--time"),
                                     ("pack", "--time"), ("restore", "--time"),
                                     ("info", "--pack-time"), ("pack", "--before"),
                                     ("restore", "--tid")])
def test_bad_time(files, tmp_path, cmd, opt, bad):
    if cmd == "restore":
        args = [cmd, files / "nobackups", tmp_path / "x.rfs", opt, bad]
    else:
        args = [cmd, files / "Data.rfs", opt, bad]
    size = os.path.getsize(files / "Data.rfs")
    r = run(*args)
    check(r, repr(bad), status=2)
    assert os.path.getsize(files / "Data.rfs") == size


@pytest.mark.parametrize("bad", ["-1", "1e9", "nan", "inf", "x"])
@pytest.mark.parametrize("cmd", ["info", "pack"])
def test_bad_days(files, cmd, bad):
    size = os.path.getsize(files / "Data.rfs")
    r = run(cmd, files / "Data.rfs", "--days", bad)
    check(r, "--days", status=2)
    assert os.path.getsize(files / "Data.rfs") == size


@pytest.mark.parametrize("bad", ["0", "-3", "x"])
@pytest.mark.parametrize("cmd", ["tail", "history"])
def test_bad_count(files, cmd, bad):
    args = [cmd, files / "Data.rfs"] + (["0"] if cmd == "history" else []) + ["-n", bad]
    check(run(*args), "-n", status=2)


def test_bad_backup_directory(files, tmp_path):
    for bdir in (files / "nope", files / "plainfile", files / "adir.rfs"):
        r = run("restore", bdir, tmp_path / "x.rfs")
        check(r, bdir, status=1)
        assert not (tmp_path / "x.rfs").exists()
    r = run("backup", files / "Data.rfs", files / "plainfile")
    check(r, files / "plainfile", status=1)


@pytest.mark.parametrize("side", ["src", "dst"])
def test_unreachable_server(files, tmp_path, side):
    uri = "zeo://127.0.0.1:1"
    args = [uri, tmp_path / "x.rfs"] if side == "src" else [files / "Data.rfs", uri]
    t0 = time.monotonic()
    r = run("convert", *args, "--timeout", "1")
    check(r, uri, status=1)
    assert "cannot reach" in r.output
    assert time.monotonic() - t0 < 15


def test_bad_configuration_and_uri(files, tmp_path):
    check(run("convert", files / "bad.conf", tmp_path / "x.rfs"), files / "bad.conf", status=1)
    check(run("convert", "nosuchscheme://x", tmp_path / "y.rfs"), "nosuchscheme://x", status=1)


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid"])
def test_serve_bad_host(files, tmp_path, host):
    db = tmp_path / "Data.rfs"
    shutil.copy(files / "Data.rfs", db)
    r = run("serve", db, "--host", host, "--port", "0")
    check(r, host, status=1)


def test_serve_and_pack_do_not_create_a_missing_file(tmp_path):
    for cmd in ("pack", "serve"):
        r = run(cmd, tmp_path / "typo.rfs")
        check(r, tmp_path / "typo.rfs", status=1)
        assert "--create" in r.output or cmd == "pack"
        assert os.listdir(tmp_path) == []


def test_serve_on_a_port_in_use(files, tmp_path):
    import socket
    db = tmp_path / "Data.rfs"
    shutil.copy(files / "Data.rfs", db)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", db, "--port", port)
    check(r, str(port), status=1)
    assert "cannot listen" in r.output


def test_a_database_open_for_writing_says_what_to_run_instead(files, tmp_path):
    import refstorage
    db = tmp_path / "Data.rfs"
    shutil.copy(files / "Data.rfs", db)
    storage = refstorage.FileStorage(str(db))
    try:
        r = run("pack", db)
        check(r, db, status=1)
        assert "open for writing by another process" in r.output and "zeopack" in r.output
        assert "read_only=True" not in r.output
        # in a subprocess: runzeo sets up logging for the process it runs in
        proc = subprocess.run([sys.executable, "-m", "refstorage", "serve", str(db), "--port", "0"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert str(db) in last and "--read-only" in last and "read_only=True" not in last
    finally:
        storage.close()


def test_an_unexpected_error_is_one_line_and_vv_shows_the_traceback(files, monkeypatch):
    from refstorage.tools import info as info_mod

    def broken(*a, **k):
        raise KeyError("boom")

    monkeypatch.setattr(info_mod, "tail", broken)
    r = run("tail", files / "Data.rfs")
    check(r, "boom", status=1)
    assert "unexpected error" in r.output and "-vv" in r.output
    r = CliRunner().invoke(main, ["tail", str(files / "Data.rfs"), "-vv"])
    assert r.exit_code == 1 and "Traceback" in r.output and "KeyError" in r.output


def test_a_closed_pipe_stops_quietly(tmp_path):
    """refstorage dump Data.rfs | head -1: no 'Broken pipe' error, no traceback."""
    db = tmp_path / "Data.rfs"
    make_db(db, extra_txns=200)  # a dump of several times the 64 KiB a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "refstorage", "dump", str(db), "--data"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(60)
    assert err == "" and proc.returncode == 1


def test_no_python_api_advice_on_the_command_line(files, tmp_path, monkeypatch):
    """The storage's messages suggest read_only=True to Python callers; the command says otherwise."""
    import zc.lockfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    db = tmp_path / "Data.rfs"
    shutil.copy(files / "Data.rfs", db)
    monkeypatch.setattr(zc.lockfile, "LockFile", denied)
    r = run("pack", db)
    check(r, f"{db}.lock", status=1)
    assert "read_only=True" not in r.output and "verify, info and dump" in r.output


@pytest.mark.parametrize("name", ["", "a b", "x(1)"])
def test_serve_refuses_a_storage_name_zeo_cannot_carry(files, tmp_path, name):
    """An empty name was served as ZEO's default '1' while the banner announced ''."""
    db = tmp_path / "Data.rfs"
    shutil.copy(files / "Data.rfs", db)
    check(run("serve", db, "--name", name, "--port", "0"), "--name", status=2)
