"""The `refstorage` command's shared vocabulary: one parser per concept, aliases, -v/-q anywhere, extras."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from refstorage.cli import main
from refstorage.cli.common import PhasedProgress, moment_for_days, parse_when, plural, size_repr
from refstorage.tools.verify import verify
from tools_db import build_file, make_db, oid

COMMANDS = ["dump", "verify", "info", "tail", "history", "refs", "recover", "backup", "restore", "pack",
            "convert", "serve"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def db_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("voc") / "Data.rfs"
    make_db(path)
    return path


@pytest.fixture
def db(tmp_path, db_template):
    path = tmp_path / "Data.rfs"
    shutil.copy(db_template, path)
    return path


def test_when_parses_tids_and_times_alike():
    m = parse_when("2024-05-01T12:30")
    assert m.time == parse_when("2024-05-01T14:30+02:00").time
    assert parse_when(m.tid.hex()).tid == m.tid
    assert parse_when("0x" + m.tid.hex()).tid == m.tid
    assert abs(parse_when(m.tid.hex()).time - m.time) < 60
    for bad in ("123", "yesterday", "0x", "10000-01-01", "1850-01-01", "9999-01-01"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_when(bad)


def test_days_are_validated_once():
    now = time.time()
    assert abs(moment_for_days(1, now).time - (now - 86400)) < 1e-3
    for bad in (-1, 1e9, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            moment_for_days(bad, now)


def test_plurals_and_sizes():
    assert plural(1, "record") == "1 record" and plural(2051, "record") == "2,051 records"
    assert size_repr(1) == "1 byte" and size_repr(1_234_567) == "1,234,567 bytes (1.2 MB)"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_takes_v_and_q_after_it_and_has_an_example(cmd):
    r = run(cmd, "--help")
    assert r.exit_code == 0
    for opt in ("-v, --verbose", "-q, --quiet", "--json", "Examples:", f"refstorage {cmd} "):
        assert opt in r.output, (cmd, opt)


def test_top_level_help_documents_exit_statuses_and_the_vocabulary():
    r = run("--help")
    assert "Exit status" in r.output and "WHEN" in r.output
    for cmd in COMMANDS:
        assert cmd in r.output


def test_readme_lists_every_subcommand():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    table = readme[readme.index("| command |"):]
    for cmd in COMMANDS:
        assert f"| `{cmd}` |" in table, cmd


def test_help_examples_run_as_written(tmp_path, db_template):
    """Every example line of every --help, run in a directory holding Data.rfs, Data.fs and blobs/."""
    shutil.copy(db_template, tmp_path / "Data.rfs")
    assert run("convert", tmp_path / "Data.rfs", tmp_path / "Data.fs").exit_code == 0
    (tmp_path / "blobs").mkdir()
    examples = []
    for cmd in COMMANDS:
        for line in run(cmd, "--help").output.splitlines():
            line = line.strip()
            if line.startswith(f"refstorage {cmd} "):
                examples.append(line.split("  #")[0].split(" && ")[0].split(" | ")[0])
    assert len(examples) >= 2 * len(COMMANDS)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for n, ex in enumerate(examples):
            argv = [a.replace("/backups/app", str(tmp_path / "backups")) for a in shlex.split(ex)[1:]]
            if argv[0] == "serve" or "zeo://" in ex:
                continue  # runs until stopped, or needs a server: test_serve_json starts one
            if argv[0] == "convert" and "--incremental" not in argv and os.path.exists(argv[2]):
                for suffix in ("", ".index"):  # convert writes into an empty destination
                    if os.path.exists(argv[2] + suffix):
                        os.rename(argv[2] + suffix, f"{argv[2]}{suffix}.{n}")
            if argv[0] == "restore" and os.path.exists(argv[2]):
                argv.append("--force")
            r = run(*argv)
            assert "Traceback" not in r.output and isinstance(r.exception, (SystemExit, type(None))), ex
            assert r.exit_code == 0 or (r.exit_code == 1 and "no backup holds" in r.output), (ex, r.output)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("cmd,new,old", [("info", "--time", "--pack-time"), ("pack", "--time", "--before")])
def test_old_spellings_are_hidden_aliases(db, tmp_path, cmd, new, old):
    when = "2001-01-01"
    a = run(cmd, db, new, when, "--json")
    if cmd == "pack":
        shutil.copy(db, tmp_path / "b.rfs")
        b = run(cmd, tmp_path / "b.rfs", old, when, "--json")
    else:
        b = run(cmd, db, old, when, "--json")
    assert a.exit_code == b.exit_code == 0, (a.output, b.output)
    ja, jb = json.loads(a.output), json.loads(b.output)
    for key in ("seconds", "path"):
        ja.pop(key, None), jb.pop(key, None)
    assert ja == jb
    assert old not in run(cmd, "--help").output
    r = run(cmd, db, new, when, old, when)
    assert r.exit_code == 2 and "only one" in r.output


def test_restore_time_takes_a_tid_and_tid_is_an_alias(db, tmp_path):
    assert run("backup", db, tmp_path / "b").exit_code == 0
    tids = [t["tid"] for t in json.loads(run("tail", db, "--json").output)]
    r1 = run("restore", tmp_path / "b", tmp_path / "r1.rfs", "--time", tids[2], "--json")
    r2 = run("restore", tmp_path / "b", tmp_path / "r2.rfs", "--tid", tids[2], "--json")
    assert r1.exit_code == r2.exit_code == 0, r1.output
    assert json.loads(r1.output)["last_tid"] == json.loads(r2.output)["last_tid"] == tids[2]


def test_pack_days_and_time_validated_like_info(db):
    for args in (["--days", "-1"], ["--days", "1e9"], ["--time", "123"]):
        a, b = run("pack", db, *args), run("info", db, *args)
        assert a.exit_code == b.exit_code == 2
        msg = lambda out: out.strip().splitlines()[-1].split(":", 1)[1]  # noqa: E731
        assert msg(a.output) == msg(b.output)


def test_verbose_after_the_subcommand(db, caplog):
    r = run("verify", db, "-vv")
    assert r.exit_code == 0
    import logging
    assert logging.getLogger().level == logging.DEBUG
    r = run("-v", "tail", db, "-v", "-q")
    assert r.exit_code == 0


def test_quiet_disables_the_progress_bar(monkeypatch):
    made = []

    class Bar:
        def __init__(self, *a, disable=None, **kw):
            made.append(disable)

    import tqdm
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    import click

    from refstorage.cli import common as clicommon

    @click.command()
    @click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=clicommon._set_quiet)
    def cmd():
        clicommon.progress_bar(10, "x")

    CliRunner().invoke(cmd, ["-q"])
    CliRunner().invoke(cmd, [])
    assert made == [True, None]


def test_phases_are_reported_with_their_units(db, monkeypatch):
    calls = []

    class Recorder:
        def __call__(self, n):
            calls.append(("n", n))

        def phase(self, label, total, unit):
            calls.append(("phase", label, total, unit))

    verify(str(db), Recorder())
    phases = [c for c in calls if c[0] == "phase"]
    assert phases == [("phase", "verify: references", phases[0][2], "objects")] and phases[0][2] > 100
    # PhasedProgress: a new bar per phase, with its label, total and unit; counts restart
    bars = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.total, self.desc, self.unit, self.n, self.closed = total, desc, unit, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    from refstorage.cli import common as clicommon
    monkeypatch.setattr(clicommon, "progress_bar", Bar)
    p = PhasedProgress("x", 100)
    p(50)
    p.phase("y", 10, "objects")
    p(3)
    p.close()
    assert [(b.desc, b.total, b.unit, b.n, b.closed) for b in bars] == [
        ("x", 100, "B", 50, True), ("y", 10, "objects", 3, True)]


def test_history_and_refs_take_several_oids(db):
    r = run("history", db, "0", "1", "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert [x["oid"] for x in d] == [oid(0).hex(), oid(1).hex()] and d[0]["revisions"]
    r = run("history", db, "0", "0x999")
    assert r.exit_code == 1 and "oid 0x00:" in r.output and "oid 0x0999: MISSING" in r.output
    r = run("refs", db, "1", "2", "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert [x["oid"] for x in d] == [oid(1).hex(), oid(2).hex()]
    one = json.loads(run("refs", db, "2", "--json").output)
    # the first run built the referrer index, the second used it
    assert (d[1].pop("method_note"), one.pop("method_note")) == ("built", "used")
    assert d[1] == one


def test_refs_path_from_the_root(db):
    r = run("refs", db, "6", "--path", "--json")
    assert r.exit_code == 0, r.output
    chain = json.loads(r.output)["path_from_root"]["chain"]
    assert [c["oid"] for c in chain] == [oid(0).hex(), oid(1).hex(), oid(6).hex()]
    assert chain[1]["class"] == "BTrees.OOBTree.OOBTree"
    r = run("refs", db, "6", "--path")
    assert "path from the root (2 references): 0x00 (persistent.mapping.PersistentMapping) -> 0x01" \
        in r.output


def test_refs_path_of_an_unreachable_object(tmp_path):
    path = tmp_path / "u.rfs"
    tid = (0x03E5A0D4D5555555).to_bytes(8, "big")
    build_file(path, [(tid, [(oid(0), b"root", [oid(1)], 0, None), (oid(1), b"a", [], 0, None),
                             (oid(2), b"orphan", [oid(1)], 0, None)])])
    r = run("refs", path, "2", "1", "--path")
    assert r.exit_code == 0, r.output
    assert "path from the root: none, 0x02 is not reachable" in r.output
    assert "path from the root (1 reference): 0x00" in r.output


def test_refs_of_a_missing_oid_exits_1_like_history(db):
    assert run("refs", db, "0x999").exit_code == 1
    assert run("history", db, "0x999").exit_code == 1


def test_verify_groups_dangling_references(tmp_path):
    path = tmp_path / "d.rfs"
    tid = (0x03E5A0D4D5555555).to_bytes(8, "big")
    recs = [(oid(0), b"root", [oid(n) for n in range(1, 61)], 0, None)]
    recs += [(oid(n), b"x", [oid(999)], 0, None) for n in range(1, 61)]
    build_file(path, [(tid, recs)])
    r = run("verify", path)
    assert r.exit_code == 1
    assert "PROBLEM dangling: 60 current objects reference oid 0x03e7, which does not exist: " \
           "0x01, 0x02, 0x03, 0x04, 0x05 and 55 more" in r.output
    assert "60 problems found: 60 dangling" in r.output
    assert len(r.output.splitlines()) < 10
    r = run("verify", path, "--all")
    assert r.output.count("PROBLEM dangling") == 60


def test_convert_dry_run_writes_nothing(db, tmp_path):
    dst = tmp_path / "new.rfs"
    r = run("convert", db, dst, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["dry_run"] and d["transactions"] == 8
    assert not dst.exists()
    r = run("convert", db, dst, "--json")
    assert json.loads(r.output)["transactions"] == 8
    r = run("convert", db, dst, "--dry-run", "--incremental")
    assert r.exit_code == 0 and "would copy 0 transactions" in r.output


def test_serve_json(db, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "refstorage", "serve", str(db), "--port", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        d = json.loads(line)
        assert d["path"] == str(db) and d["storage"] == "1" and d["port"] > 0
    finally:
        proc.terminate()
        proc.wait(15)


def test_backup_keep_prunes_older_chains_and_check_finds_damage(db, tmp_path):
    bdir = tmp_path / "b"
    for _ in range(3):
        assert run("backup", db, bdir, "--full").exit_code == 0
    pieces = sorted(p.name for p in bdir.glob("*.rfsb"))
    assert len(pieces) == 3
    r = run("backup", db, bdir, "--full", "--keep", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["removed"] == pieces[:2]
    left = sorted(p.name for p in bdir.glob("*.rfsb"))
    assert left == [pieces[2], left[-1]] and len(left) == 2
    r = run("restore", bdir, "--check")
    assert r.exit_code == 0 and r.output.count(": OK") == 2, r.output
    assert run("restore", bdir, tmp_path / "r.rfs").exit_code == 0
    victim = bdir / left[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    r = run("restore", bdir, "--check", "--json")
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert [c["ok"] for c in d] == [False, True] and "sha256 mismatch" in d[0]["problems"][0]
    assert run("backup", db, bdir, "--keep", "0").exit_code == 2
    assert run("restore", bdir).exit_code == 2  # neither DEST nor --check
    assert run("restore", bdir, tmp_path / "x.rfs", "--check").exit_code == 2


def test_compressed_backups_restore_and_mix_with_plain_ones(tmp_path):
    import transaction
    import ZODB

    import refstorage
    path = tmp_path / "Data.rfs"
    make_db(path)
    bdir = tmp_path / "b"
    r = run("backup", path, bdir, "-z", "--json")
    assert r.exit_code == 0, r.output
    full = json.loads(r.output)
    assert full["piece"].endswith(".rfsb.gz")
    assert (bdir / full["piece"]).stat().st_size < os.path.getsize(path)
    tids = []
    for i in range(3):  # incrementals after a compressed piece: its tail is compared decompressed
        db = ZODB.DB(refstorage.FileStorage(str(path)))
        with db.transaction() as conn:
            conn.root()["n"] = i
        tids.append(db.lastTransaction())
        db.close()
        transaction.abort()
        r = run("backup", path, bdir, *(["--compress"] if i != 1 else []), "--json")
        assert json.loads(r.output)["kind"] == "incremental", r.output
    assert run("restore", bdir, "--check").exit_code == 0
    r = run("restore", bdir, tmp_path / "latest.rfs")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "latest.rfs").read_bytes() == path.read_bytes()
    r = run("restore", bdir, tmp_path / "mid.rfs", "--time", tids[0].hex(), "--json")  # cut in a .gz piece
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["last_tid"] == tids[0].hex()
    assert run("verify", tmp_path / "mid.rfs").exit_code == 0
    assert not list(tmp_path.glob("*.tmp*"))
    # a damaged compressed piece: check and restore say so, in one line
    victim = bdir / full["piece"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = run("restore", bdir, "--check")
    assert r.exit_code == 1 and full["piece"] in r.output and "damaged" in r.output
    r = run("restore", bdir, tmp_path / "bad.rfs")
    assert r.exit_code == 1 and "Traceback" not in r.output and not (tmp_path / "bad.rfs").exists()
