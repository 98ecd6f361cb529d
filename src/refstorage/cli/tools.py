"""The inspection and repair commands: dump, verify, info, tail, history, refs, recover, backup, restore.

Thin click wrappers around `refstorage.tools`: parse arguments, show
progress (on stderr, only on a terminal), print text or --json, and exit
with status 1 when a problem was found.
"""

from __future__ import annotations

import json
import os

import click

from ..tools import backup as backup_mod
from ..tools import common
from ..tools import dump as dump_mod
from ..tools import info as info_mod
from ..tools import recover as recover_mod
from ..tools import verify as verify_mod
from . import main
from .common import (
    COUNT,
    DATABASE,
    EXIT_PROBLEM,
    NEW_FILE,
    OID,
    WHEN,
    WHEN_HELP,
    BackupDir,
    DatabaseFile,
    DaysType,
    Moment,
    byte_progress,
    emit_json,
    failing_cleanly,
    one_moment,
    plural,
    size_repr,
)

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def _fail() -> None:
    click.get_current_context().exit(EXIT_PROBLEM)


def _n(x: int) -> str:
    return f"{x:,}"


# -- dump ---------------------------------------------------------------------------------

LOOSE_DATABASE = DatabaseFile(header=False)  # the command reports a damaged header itself


def _size_of(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


@main.command(epilog="""\b
Examples:
  refstorage dump Data.rfs --from 2024-05-01 --to 2024-05-02 --classes
  refstorage dump Data.rfs --json | head""")
@click.argument("path", type=LOOSE_DATABASE)
@click.option("--from", "start", type=WHEN, help=f"First transaction: {WHEN_HELP}.")
@click.option("--to", "stop", type=WHEN, help="Last transaction (inclusive): a tid or a time, as --from.")
@click.option("--classes", is_flag=True, help="Show each record's class, read from the pickle's opcodes.")
@click.option("--data", "full_data", is_flag=True, help="Show all the data, not only its first bytes.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON lines: one object for the header, each transaction and each damage.")
def dump(path: str, start: Moment | None, stop: Moment | None, classes: bool, full_data: bool,
         as_json: bool) -> None:
    """Print every field of every transaction and data record of PATH, with positions.

    Nothing is unpickled: --classes reads the class name from the pickle's
    opcodes.  Damaged stretches are shown where they are met, and make the
    exit status 1.
    """
    damaged = False
    with failing_cleanly(path), byte_progress(_size_of(path), "dump") as progress:
        for item in dump_mod.dump(path, start and start.tid, stop and stop.tid, classes, full_data,
                                  progress):
            damaged |= item["type"] == "damage" or item.get("written_at", 0) != item.get("pos", 0)
            if as_json:
                click.echo(json.dumps(item, sort_keys=True))
            else:
                for line in dump_mod.format_item(item):
                    click.echo(line)
    if damaged:
        _fail()


# -- verify -------------------------------------------------------------------------------

@main.command(epilog="""\b
Examples:
  refstorage verify Data.rfs
  refstorage verify Data.rfs --all      # every problem, not the first of each kind
  refstorage verify Data.rfs --blob-dir blobs""")
@click.argument("path", type=LOOSE_DATABASE)
@click.option("--blob-dir", type=click.Path(file_okay=False, exists=True), default=None,
              metavar="DIRECTORY",
              help="The database's blob directory: check its files against the records too.")
@click.option("--all", "show_all", is_flag=True,
              help=f"List every problem found (else the first {verify_mod.MAX_LISTED} of each kind, and "
                   "dangling references grouped by the oid they point to).")
@JSON_OPTION
def verify(path: str, blob_dir: str | None, show_all: bool, as_json: bool) -> None:
    """Check the whole file PATH and the references between its current objects.

    Every header, checksum, length and oid table; tids; every prev and
    backpointer; the index file if present; and dangling references (a
    current object referencing an oid with no current revision, or a deleted
    one).  Records whose references are not stored are counted as
    "references unknown" (not an error).  Exit status 1 if anything is wrong.
    The file may be in use meanwhile; only what it holds when verify starts
    is read (a commit in progress at its end shows as an incomplete last
    transaction).  With --blob-dir, a blob file with no record (left by a
    transaction that never committed) and a current blob record without
    its file are reported too.
    """
    with failing_cleanly(path), byte_progress(_size_of(path), "verify") as progress:
        report = verify_mod.verify(path, progress, blob_dir=blob_dir)
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(f"{report.path}: {size_repr(report.size)}, {plural(report.transactions, 'transaction')}, "
                   f"{plural(report.records, 'record')}, {plural(report.objects, 'object')} "
                   f"({_n(report.deleted)} deleted), {plural(report.backpointers, 'backpointer')}")
        click.echo(f"index file: {report.index_file}")
        if report.refs_unknown or report.refs_unknown_current_count:
            click.echo(f"references unknown: {plural(report.refs_unknown, 'record')} "
                       f"({_n(report.refs_unknown_current_count)} current; their references were not "
                       "checked)")
            for oid, pos in report.refs_unknown_current[:verify_mod.MAX_LISTED]:
                click.echo(f"  references unknown: oid {common.oid_repr(oid)} at offset {pos:,}")
        listed = _print_problems(report, show_all)
        if report.ok:
            click.echo(f"OK: no problems found ({report.seconds:.1f} s)")
        else:
            counts = ", ".join(f"{_n(n)} {kind}" for kind, n in sorted(report.counts.items()))
            more = "" if listed >= report.problem_count else \
                f"; {_n(listed)} listed" + ("" if show_all else ", --all lists every one")
            click.echo(f"{plural(report.problem_count, 'problem')} found: {counts}{more} "
                       f"({report.seconds:.1f} s)")
    if not report.ok:
        _fail()


def _print_problems(report: verify_mod.VerifyReport, show_all: bool) -> int:
    """Print the problems: all, or the first few of each kind with dangling ones grouped by target."""
    if show_all:
        for problem in report.problems:
            click.echo(f"PROBLEM {problem}")
        return len(report.problems)
    cap = verify_mod.MAX_LISTED
    shown: dict[str, int] = {}
    listed = 0
    dangling: dict[bytes, list] = {}
    for problem in report.problems:
        if problem.kind == "dangling" and problem.oid is not None:
            dangling.setdefault(problem.oid, []).append(problem)
            continue
        if shown.get(problem.kind, 0) < cap:
            click.echo(f"PROBLEM {problem}")
            listed += 1
        shown[problem.kind] = shown.get(problem.kind, 0) + 1
    for kind, n in sorted(shown.items()):
        if n > cap:
            click.echo(f"  ... and {_n(n - cap)} more {kind} problems")
    targets = sorted(dangling.items(), key=lambda kv: -len(kv[1]))
    for target, problems in targets[:cap]:
        why = problems[0].message.rsplit(", ", 1)[-1]
        if len(problems) == 1:
            click.echo(f"PROBLEM {problems[0]}")
        else:
            froms = ", ".join(p.message.split(" ", 2)[1] for p in problems[:5])
            rest = f" and {_n(len(problems) - 5)} more" if len(problems) > 5 else ""
            click.echo(f"PROBLEM dangling: {plural(len(problems), 'current object')} reference oid "
                       f"{common.oid_repr(target)}, {why}: {froms}{rest}")
        listed += len(problems)
    if len(targets) > cap:
        rest = sum(len(p) for _t, p in targets[cap:])
        click.echo(f"  ... and {plural(rest, 'dangling reference')} to "
                   f"{plural(len(targets) - cap, 'other oid')}")
    return listed


# -- info ---------------------------------------------------------------------------------

@main.command(epilog="""\b
Examples:
  refstorage info Data.rfs
  refstorage info Data.rfs --days 7            # and what a pack keeping a week would free
  refstorage info Data.rfs --time 2024-05-01   # and what a pack to that time would free""")
@click.argument("path", type=DATABASE)
@click.option("--time", "at", type=WHEN,
              help=f"Also show what a pack to WHEN would free; WHEN is {WHEN_HELP}.")
@click.option("--pack-time", "pack_time", type=WHEN, hidden=True)
@click.option("--days", type=DaysType(),
              help="Also show what a pack keeping DAYS days of history would free (pack to now - DAYS).")
@JSON_OPTION
def info(path: str, at: Moment | None, pack_time: Moment | None, days: Moment | None,
         as_json: bool) -> None:
    """Size, counts, history share and space per class of PATH; what a pack would free.

    The pack forecast runs pack's own garbage collection (reachability over
    the stored references) without changing anything.
    """
    when = one_moment(time=at, pack_time=pack_time, days=days)
    with failing_cleanly(path), byte_progress(_size_of(path), "info: reading") as progress:
        report = info_mod.info(path, when and when.time, progress)
    if as_json:
        emit_json(report.to_json())
    else:
        _print_info(report)
    if report.damage is not None:
        _fail()


def _print_info(r: info_mod.InfoReport) -> None:
    def when(tid: bytes | None) -> str:
        return "-" if tid is None else common.tid_repr(tid)

    click.echo(f"file:          {r.path}")
    click.echo(f"size:          {size_repr(r.size)}" + ("" if r.end == r.size else
                                                         f"; good transactions end at {_n(r.end)}"))
    click.echo(f"file id:       {r.file_id.hex()}")
    packed = "never" if r.pack_tid == common.Z64 else common.tid_repr(r.pack_tid)
    click.echo(f"packed to:     {packed}")
    click.echo(f"transactions:  {_n(r.transactions)}")
    click.echo(f"first:         {when(r.first_tid)}")
    click.echo(f"last:          {when(r.last_tid)}")
    click.echo(f"records:       {_n(r.records)}")
    click.echo(f"objects:       {_n(r.objects)} ({_n(r.deleted_objects)} deleted)")
    click.echo(f"current data:  {size_repr(r.current_bytes)}")
    click.echo(f"history:       {size_repr(r.history_bytes)}, {100 * r.history_share:.1f}% of the records")
    click.echo(f"overhead:      {size_repr(r.overhead_bytes)}: file and transaction headers, trailers")
    if r.damage:
        click.echo(f"DAMAGE:        {r.damage}")
    click.echo("space per class:")
    rows = sorted(r.classes.items(), key=lambda kv: -(kv[1].current_bytes + kv[1].historical_bytes))
    width = max([len(k) for k, _ in rows] + [5])
    click.echo(f"  {'class':<{width}} {'current':>10} {'bytes':>14} {'historical':>10} {'bytes':>14}")
    for name, s in rows:
        click.echo(f"  {name:<{width}} {_n(s.current):>10} {_n(s.current_bytes):>14} "
                   f"{_n(s.historical):>10} {_n(s.historical_bytes):>14}")
    p = r.pack
    if p is not None:
        head = f"pack to {common.time_repr(p.pack_time)}:"
        if p.reason:
            click.echo(f"{head} would free nothing ({p.reason})")
        else:
            share = 100.0 * p.bytes_freed / p.bytes_before if p.bytes_before else 0.0
            click.echo(f"{head} would free {size_repr(p.bytes_freed)}, {share:.1f}%: "
                       f"{size_repr(p.bytes_before)} -> {size_repr(p.bytes_after)}; removes "
                       f"{plural(p.revisions_removed, 'revision')}, {plural(p.objects_removed, 'object')}, "
                       f"{plural(p.transactions_removed, 'transaction')}")
        if p.refs_unreadable:
            click.echo(f"  note: {plural(len(p.refs_unreadable), 'reachable record')} with no stored "
                       "references and data that is not a ZODB pickle: the pack would keep every object "
                       "(no garbage collection) and only drop old revisions")


# -- tail, history, refs ------------------------------------------------------------------

@main.command(epilog="""\b
Examples:
  refstorage tail Data.rfs
  refstorage tail Data.rfs -n 50 --json""")
@click.argument("path", type=DATABASE)
@click.option("-n", "--count", "n", type=COUNT, default=10, show_default=True,
              help="How many transactions.")
@JSON_OPTION
def tail(path: str, n: int, as_json: bool) -> None:
    """The last N transactions of PATH, newest first: tid, time, user, description, size, records."""
    with failing_cleanly(path):
        rows = info_mod.tail(path, n)
    if as_json:
        emit_json(rows)
        return
    for t in rows:
        click.echo(f"{t['tid']} {t['time']} status {t['status']!r} user {t['user']!r} "
                   f"description {t['description']!r} {plural(t['size'], 'byte')} "
                   f"{plural(t['records'], 'record')} (at {t['pos']:,})")


@main.command(epilog="""\b
Examples:
  refstorage history Data.rfs 0x1a
  refstorage history Data.rfs 0x1a 0x2b -n 5""")
@click.argument("path", type=DATABASE)
@click.argument("oids", metavar="OID...", nargs=-1, required=True, type=OID)
@click.option("-n", "--count", "n", type=COUNT, default=None,
              help="At most this many revisions of each oid (newest first).")
@JSON_OPTION
def history(path: str, oids: tuple[bytes, ...], n: int | None, as_json: bool) -> None:
    """Every revision of each OID in PATH, newest first.

    OID is hex (0x1a, 1a, 000000000000001a) or decimal (26): hex if it
    starts with 0x, has 16 digits or contains a letter a-f.  With one OID,
    --json prints its list of revisions; with several, a list of
    {"oid", "revisions"} (or "error").  Exit status 1 if an OID has no record.
    """
    results = []
    missing = []
    with failing_cleanly(path):
        for oid in oids:
            try:
                results.append((oid, info_mod.history(path, oid, n), None))
            except common.ToolError as exc:
                if len(oids) == 1:
                    raise
                missing.append(oid)
                results.append((oid, None, str(exc)))
    if as_json:
        if len(oids) == 1:
            emit_json(results[0][1])
        else:
            emit_json([{"oid": oid.hex(), "revisions": rows} if error is None else
                       {"oid": oid.hex(), "error": error} for oid, rows, error in results])
    else:
        for oid, rows, error in results:
            if error is not None:
                click.echo(f"oid {common.oid_repr(oid)}: MISSING ({error})")
                continue
            _print_history(oid, rows)
    if missing:
        _fail()


def _print_history(oid: bytes, rows: list[dict]) -> None:
    click.echo(f"oid {common.oid_repr(oid)}: {plural(len(rows), 'revision')}")
    for h in rows:
        line = (f"{h['tid']} {h['time']} record at {h['pos']} status {h['status']!r} user {h['user']!r} "
                f"description {h['description']!r}: ")
        if h["kind"] == "data":
            line += f"{plural(h['size'], 'byte')}, class {h['class']}"
        elif h["kind"] == "backpointer":
            line += (f"backpointer to {h['backpointer']} (the data of tid {h['data_tid']}, "
                     f"{plural(h['size'], 'byte')}, class {h['class']})")
        else:
            line += h["kind"]
        click.echo(line)


@main.command(epilog="""\b
Examples:
  refstorage refs Data.rfs 0x1a
  refstorage refs Data.rfs 0x1a 0x2b --json
  refstorage refs Data.rfs 0x1a --path      # why is it still alive: a path from the root
  refstorage refs Data.rfs 0x1a --scan      # without the referrer index""")
@click.argument("path", type=DATABASE)
@click.argument("oids", metavar="OID...", nargs=-1, required=True, type=OID)
@click.option("--path", "show_path", is_flag=True,
              help="Also show a shortest chain of references from the root (oid 0x00) to each OID: "
                   "why a pack keeps it.")
@click.option("--scan", "scan", is_flag=True,
              help="Find the referrers by reading every current record, without the referrer index.")
@JSON_OPTION
def refs(path: str, oids: tuple[bytes, ...], show_path: bool, scan: bool, as_json: bool) -> None:
    """What each OID references, and which current objects reference it, in PATH.

    From the stored references (nothing is unpickled).  The referrers come from
    the referrer index PATH.referrers, built by a scan the first time and
    brought up to date with the transactions written since on later runs; if it
    cannot be written (a read-only directory), or with --scan, a scan of every
    current record finds them (same answer; --json says which in "method").
    Exit status 1 if an OID is missing or deleted, or if a reference dangles:
    OID references a missing or deleted object.  With one OID, --json prints
    its report; with several, a list of them.
    """
    with failing_cleanly(path), byte_progress(None, "refs") as progress:
        reports = info_mod.refs_many(path, list(oids), progress, use_index=not scan)
        paths = info_mod.paths_from_root(path, list(oids)) if show_path else None
    if reports and not scan and reports[0].method == "scan":
        click.echo(f"refs: {reports[0].method_note}", err=True)
    problem = False
    out = []
    for i, report in enumerate(reports):
        problem |= bool(report.dangling) or report.state != "current"
        if as_json:
            d = report.to_json()
            if paths is not None:
                d["path_from_root"] = _path_json(paths[i])
            out.append(d)
        else:
            _print_refs(report, paths[i] if paths is not None else None)
    if as_json:
        emit_json(out[0] if len(out) == 1 else out)
    if problem:
        _fail()


def _path_json(p: info_mod.RootPath) -> dict:
    return {"reachable": p.chain is not None,
            "chain": [{"oid": o.hex(), "class": c} for o, c in p.chain] if p.chain else None,
            "unknown_references": p.unknown}


def _print_refs(report: info_mod.RefsReport, root_path: info_mod.RootPath | None) -> None:
    o = common.oid_repr(report.oid)
    if report.state == "current":
        click.echo(f"oid {o}: current record at {report.pos}, class {report.class_name}")
    elif report.state == "deleted":
        click.echo(f"oid {o}: DELETED (its current record at {report.pos} holds no data)")
    elif report.state == "unreadable":
        click.echo(f"oid {o}: UNREADABLE (its current record at {report.pos} or the data it stands "
                   "for is damaged)")
    else:
        click.echo(f"oid {o}: MISSING (no record at all)")
    if report.state == "current":
        if not report.refs_known:
            click.echo("references: unknown (not stored for this record)")
        else:
            click.echo(f"references ({len(report.references)}):")
            for r in report.references:
                state = r["state"] if r["state"] == "current" else r["state"].upper()
                click.echo(f"  {common.oid_repr(bytes.fromhex(r['oid']))} {state}"
                           + (f" {r['class']}" if r["class"] else ""))
    click.echo(f"referenced by ({plural(len(report.referrers), 'current object')}):")
    for r in report.referrers:
        click.echo(f"  {common.oid_repr(bytes.fromhex(r['oid']))} (record at {r['pos']}) {r['class']}")
    if report.unreadable_referrers:
        click.echo(f"  ({plural(report.unreadable_referrers, 'current record')} whose data is unreadable "
                   "were not searched)")
    if report.unknown_referrers:
        click.echo(f"  ({plural(report.unknown_referrers, 'current record')} with unknown references "
                   "were not searched)")
    if root_path is not None:
        if root_path.chain is None:
            extra = (f" (but {plural(root_path.unknown, 'reachable record')} with unknown references "
                     "could lead to it)") if root_path.unknown else ""
            click.echo(f"path from the root: none, {o} is not reachable: a pack with garbage "
                       f"collection removes it{extra}")
        else:
            chain = " -> ".join(f"{common.oid_repr(oid)} ({cls})" for oid, cls in root_path.chain)
            click.echo(f"path from the root ({plural(len(root_path.chain) - 1, 'reference')}): {chain}")


# -- recover ------------------------------------------------------------------------------

@main.command(epilog="""\b
Examples:
  refstorage recover Data.rfs Recovered.rfs
  refstorage verify Recovered.rfs && mv Recovered.rfs Data.rfs   # once the server is stopped""")
@click.argument("src", type=LOOSE_DATABASE)
@click.argument("dst", type=NEW_FILE)
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
@JSON_OPTION
def recover(src: str, dst: str, force: bool, as_json: bool) -> None:
    """Salvage everything intact of the damaged file SRC into a new file DST.

    Every transaction that passes its checks is copied; of a damaged one,
    every record that passes its own checksum is kept (under its tid and
    metadata if its header is intact, else in a transaction marked as
    recovered).  Lost revisions are listed as (oid, tid), with the
    references they leave dangling; a backpointer whose target is lost is
    written as a deletion.  DST is verified at the end.

    \b
    Exit status:
      0  clean copy: SRC had no damage, DST holds all of it
      3  repaired: SRC was damaged, but no object revision was lost
      4  salvaged with losses (listed), DST written
      5  nothing could be salvaged (DST is an empty database)
      1  error: recover could not run, or DST does not verify
    """
    with failing_cleanly(src), byte_progress(_size_of(src), "recover") as progress:
        report = recover_mod.recover(src, dst, progress, force)
    v = report.verify
    structural = {k: n for k, n in v.counts.items() if k != "dangling"} if v else {}
    if as_json:
        emit_json(report.to_json())
    else:
        if report.header_error:
            click.echo(f"file header damaged: {report.header_error}; went on from the first transaction")
        for s in report.skipped:
            click.echo(f"skipped bytes [{s.start}, {s.end}) ({plural(s.end - s.start, 'byte')}): {s.error}")
            if s.records or s.lost:
                click.echo(f"  salvaged {plural(s.records, 'intact record')} in "
                           f"{plural(s.transactions, 'transaction')}; {plural(s.lost, 'record')} lost")
            for a, b in s.unknown:
                click.echo(f"  [{a}, {b}): could not tell which records these bytes held; they are lost")
            if s.unfinished:
                click.echo(f"  {plural(s.unfinished, 'transaction')} never finished (status 'c'): not copied")
        for pos, tid in report.rebuilt:
            click.echo(f"rebuilt: the transaction at {pos} had a damaged header; its intact records were "
                       f"written as tid {tid.hex()}, marked as recovered")
        for pos, delta in report.moved:
            click.echo(f"moved: the transactions from {pos} on were written at {pos - delta} "
                       f"({abs(delta)} bytes {'missing' if delta < 0 else 'inserted'} before them); "
                       "salvaged with their positions rewritten")
        for lost in report.lost:
            click.echo(f"lost: {lost}")
        for referrer, target, lost_target in report.dangling:
            click.echo(f"dangling: oid {common.oid_repr(referrer)} references oid {common.oid_repr(target)}"
                       + (", a lost revision" if lost_target else ""))
        if report.rescued:
            click.echo(f"{plural(report.rescued, 'backpointer')} into skipped stretches: their data was "
                       "still readable and was written in full")
        click.echo(f"recovered {plural(report.transactions, 'transaction')} "
                   f"({plural(report.records, 'record')}) from {src} into {dst}; "
                   f"{plural(report.bytes_skipped, 'byte')} skipped")
        if v is not None:
            if v.ok:
                click.echo(f"{dst} verifies clean")
            else:
                counts = ", ".join(f"{n} {kind}" for kind, n in sorted(v.counts.items()))
                click.echo(f"{dst} verify: {counts}" + (" (references to objects lost with the skipped "
                                                         "data)" if not structural else ""))
                for problem in v.problems[:verify_mod.MAX_LISTED]:
                    click.echo(f"  {problem}")
        click.echo({"clean": "result: clean copy",
                    "repaired": "result: damage repaired, no object revision lost",
                    "losses": f"result: salvaged with losses ({plural(len(report.lost), 'revision')} lost"
                              + (", and what the unreadable bytes held" if report.unknown else "") + ")",
                    "nothing": "result: nothing could be salvaged"}[report.outcome])
    if structural:
        _fail()
    if report.exit_status:
        click.get_current_context().exit(report.exit_status)


# -- backup and restore -------------------------------------------------------------------

@main.command(epilog="""\b
Examples:
  refstorage backup Data.rfs /backups/app          # full the first time, then incremental
  refstorage backup Data.rfs /backups/app --full --compress --keep 2
  refstorage restore /backups/app Restored.rfs""")
@click.argument("path", type=DATABASE)
@click.argument("backup_dir", type=BackupDir(exists=False))
@click.option("--full", is_flag=True, help="Start a new full backup even if an incremental one would do.")
@click.option("-z", "--compress", is_flag=True, help="Write the new piece gzip-compressed (as repozo -z).")
@click.option("--keep", type=COUNT, default=None, metavar="N",
              help="Then remove the older backups: keep only the newest N full backups, each with its "
                   "incrementals (as repozo's cleanup; --keep 1 after --full keeps just the new one).")
@JSON_OPTION
def backup(path: str, backup_dir: str, full: bool, compress: bool, keep: int | None, as_json: bool) -> None:
    """Back up the (possibly live) file PATH into BACKUP_DIR.

    The first backup is full; later ones copy only the transactions written
    since (the log is append-only).  A pack since the last backup is
    detected and forces a full one.  Each piece is checked by sha256 after
    writing and listed in BACKUP_DIR/manifest.json.  BACKUP_DIR is created
    if missing (its parent directory must exist).
    """
    with failing_cleanly(path), byte_progress(_size_of(path), "backup") as progress:
        report = backup_mod.backup(path, backup_dir, full, progress, compress)
    removed: list[str] = []
    if keep is not None:
        with failing_cleanly(backup_dir):
            removed = backup_mod.prune(backup_dir, keep)
    if as_json:
        emit_json({**report.to_json(), **({"removed": removed} if keep is not None else {})})
        return
    if report.kind == "none":
        click.echo(f"{path}: {report.reason}; nothing written")
    else:
        upto = common.tid_repr(report.last_tid) if report.last_tid else "no transaction"
        click.echo(f"{report.kind} backup of {path}: bytes [{report.start}, {report.end}) "
                   f"({size_repr(report.bytes)}, {plural(report.transactions, 'transaction')}, "
                   f"up to {upto}) -> {os.path.join(backup_dir, report.piece)}, sha256 {report.sha256}"
                   + (f"; full because {report.reason}" if report.kind == "full" else ""))
    if report.note:
        click.echo(f"note: {report.note}")
    if removed:
        click.echo(f"removed {plural(len(removed), 'older backup piece')} (kept the newest "
                   f"{plural(keep, 'full backup')} and their incrementals): {', '.join(removed)}")


@main.command(epilog="""\b
Examples:
  refstorage restore /backups/app Restored.rfs
  refstorage restore /backups/app Restored.rfs --time 2024-05-01T12:00
  refstorage restore /backups/app Restored.rfs --time 03e5a0d4d5555555   # as of a tid
  refstorage restore /backups/app --check     # check every backup piece, write nothing""")
@click.argument("backup_dir", type=BackupDir(exists=True))
@click.argument("dest", type=NEW_FILE, required=False)
@click.option("--time", "at", type=WHEN, help=f"Restore the state as of WHEN: {WHEN_HELP}.")
@click.option("--tid", type=WHEN, hidden=True)
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
@click.option("--check", "check_only", is_flag=True,
              help="Check every piece of every backup (present, size, sha256, joined); write nothing "
                   "(as repozo -V).  No DEST then.")
@JSON_OPTION
def restore(backup_dir: str, dest: str | None, at: Moment | None, tid: Moment | None, force: bool,
            check_only: bool, as_json: bool) -> None:
    """Rebuild a data file DEST from the backups in BACKUP_DIR.

    The latest state, or with --time the state as of then (cut after the
    last transaction at or before it).  Every piece's sha256 is checked.
    With --check, only check the backups.
    """
    when = one_moment(time=at, tid=tid)
    if check_only:
        if dest is not None or when is not None or force:
            raise click.UsageError("--check takes only BACKUP_DIR (it writes nothing)")
        _check_backups(backup_dir, as_json)
        return
    if dest is None:
        raise click.UsageError("missing argument DEST (the file to write), or give --check")
    with failing_cleanly(backup_dir), byte_progress(None, "restore") as progress:
        report = backup_mod.restore(backup_dir, dest, when and when.tid, force, progress)
    if as_json:
        emit_json(report.to_json())
        return
    upto = common.tid_repr(report.last_tid) if report.last_tid else "no transaction"
    click.echo(f"restored {dest} from {plural(len(report.pieces or []), 'backup piece')}: "
               f"{size_repr(report.size)}, {plural(report.transactions, 'transaction')}, up to {upto}")


def _check_backups(backup_dir: str, as_json: bool) -> None:
    with failing_cleanly(backup_dir), byte_progress(None, "backup: checking") as progress:
        chains = backup_mod.check(backup_dir, progress)
    if as_json:
        emit_json([c.to_json() for c in chains])
    else:
        for i, c in enumerate(chains, 1):
            upto = common.tid_repr(c.last_tid) if c.last_tid else "no transaction"
            state = "OK" if not c.problems else plural(len(c.problems), "problem")
            click.echo(f"backup {i} (file id {c.file_id}): {plural(c.pieces, 'piece')}, {size_repr(c.size)}, "
                       f"up to {upto}: {state}")
            for problem in c.problems:
                click.echo(f"  {problem}")
        if not chains:
            click.echo(f"{backup_dir}: no backups listed")
    if any(c.problems for c in chains):
        _fail()
