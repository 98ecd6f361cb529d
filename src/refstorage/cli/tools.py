"""The inspection and repair commands: dump, verify, info, tail, history, refs, recover, backup, restore.

Thin click wrappers around `refstorage.tools`: parse arguments, show
progress (on stderr, only on a terminal), print text or --json, and exit
with status 1 when a problem was found.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from ..tools import backup as backup_mod
from ..tools import common
from ..tools import dump as dump_mod
from ..tools import info as info_mod
from ..tools import recover as recover_mod
from ..tools import verify as verify_mod
from . import main
from .common import emit_json, failing_cleanly, progress_bar

PATH = click.Path(dir_okay=False)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@contextmanager
def _byte_progress(total: int | None, desc: str) -> Iterator[Callable[[int], None]]:
    """A progress bar over bytes; yields update(position)."""
    with progress_bar(total, desc, unit="B") as bar:
        bar.unit_scale = True
        bar.unit_divisor = 1024

        def update(pos: int) -> None:
            if pos > bar.n:
                bar.update(pos - bar.n)
        yield update


def _size_of(path: str) -> int | None:
    try:
        with common.Log(path, allow_bad_header=True) as log:
            return log.size
    except Exception:
        return None


def _fail() -> None:
    click.get_current_context().exit(1)


def _oid_arg(_ctx, _param, value: str) -> bytes:
    try:
        return common.parse_oid(value)
    except common.ToolError as exc:
        raise click.BadParameter(str(exc)) from None


def _tid_arg(_ctx, _param, value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return common.parse_tid(value)
    except common.ToolError as exc:
        raise click.BadParameter(str(exc)) from None


def _time_arg(_ctx, _param, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return common.parse_time(value)
    except common.ToolError as exc:
        raise click.BadParameter(str(exc)) from None


def _n(x: int) -> str:
    return f"{x:,}"


# -- dump ---------------------------------------------------------------------------------

@main.command()
@click.argument("path", type=PATH)
@click.option("--from", "start", callback=_tid_arg, metavar="TID",
              help="First transaction: a tid (16 hex digits) or a time (ISO 8601, UTC).")
@click.option("--to", "stop", callback=_tid_arg, metavar="TID", help="Last transaction (inclusive).")
@click.option("--classes", is_flag=True, help="Show each record's class, read from the pickle's opcodes.")
@click.option("--data", "full_data", is_flag=True, help="Show all the data, not only its first bytes.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON lines: one object for the header, each transaction and each damage.")
def dump(path: str, start: bytes | None, stop: bytes | None, classes: bool, full_data: bool,
         as_json: bool) -> None:
    """Print every field of every transaction and data record of PATH, with positions.

    Nothing is unpickled: --classes reads the class name from the pickle's
    opcodes.  Damaged stretches are shown where they are met, and make the
    exit status 1.
    """
    damaged = False
    with failing_cleanly(), _byte_progress(_size_of(path), "dump") as progress:
        for item in dump_mod.dump(path, start, stop, classes, full_data, progress):
            damaged |= item["type"] == "damage" or item.get("written_at", 0) != item.get("pos", 0)
            if as_json:
                click.echo(json.dumps(item, sort_keys=True))
            else:
                for line in dump_mod.format_item(item):
                    click.echo(line)
    if damaged:
        _fail()


# -- verify -------------------------------------------------------------------------------

@main.command()
@click.argument("path", type=PATH)
@JSON_OPTION
def verify(path: str, as_json: bool) -> None:
    """Check the whole file PATH and the references between its current objects.

    Every header, checksum, length and oid table; tids; every prev and
    backpointer; the index file if present; and dangling references (a
    current object referencing an oid with no current revision, or a deleted
    one).  Records whose references are not stored are counted as
    "references unknown" (not an error).  Exit status 1 if anything is wrong.
    The file may be in use meanwhile; only what it holds when verify starts
    is read (a commit in progress at its end shows as an incomplete last
    transaction).
    """
    with failing_cleanly(), _byte_progress(_size_of(path), "verify") as progress:
        report = verify_mod.verify(path, progress)
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(f"{report.path}: {_n(report.size)} bytes, {_n(report.transactions)} transactions, "
                   f"{_n(report.records)} records, {_n(report.objects)} objects ({_n(report.deleted)} "
                   f"deleted), {_n(report.backpointers)} backpointers")
        click.echo(f"index file: {report.index_file}")
        if report.refs_unknown or report.refs_unknown_current_count:
            click.echo(f"references unknown: {_n(report.refs_unknown)} records "
                       f"({_n(report.refs_unknown_current_count)} current; their references were not "
                       "checked)")
            for oid, pos in report.refs_unknown_current[:verify_mod.MAX_LISTED]:
                click.echo(f"  references unknown: oid {common.oid_repr(oid)} at offset {pos}")
        for problem in report.problems:
            click.echo(f"PROBLEM {problem}")
        if report.ok:
            click.echo(f"OK: no problems found ({report.seconds:.1f} s)")
        else:
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(report.counts.items()))
            listed = "" if len(report.problems) == report.problem_count else \
                f"; the first {len(report.problems)} listed"
            click.echo(f"{_n(report.problem_count)} problems found: {counts}{listed} "
                       f"({report.seconds:.1f} s)")
    if not report.ok:
        _fail()


# -- info ---------------------------------------------------------------------------------

@main.command()
@click.argument("path", type=PATH)
@click.option("--pack-time", callback=_time_arg, metavar="TIME",
              help="Also show what a pack to TIME (ISO 8601, UTC unless a zone is given) would free.")
@click.option("--days", type=click.FloatRange(min=0), default=None,
              help="Also show what a pack keeping DAYS days of history would free.")
@JSON_OPTION
def info(path: str, pack_time: float | None, days: float | None, as_json: bool) -> None:
    """Size, counts, history share and space per class of PATH; what a pack would free.

    The pack forecast runs pack's own garbage collection (reachability over
    the stored references) without changing anything.
    """
    if pack_time is not None and days is not None:
        raise click.UsageError("give --pack-time or --days, not both")
    if days is not None:
        pack_time = time.time() - days * 86400
    with failing_cleanly(), _byte_progress(_size_of(path), "info") as progress:
        report = info_mod.info(path, pack_time, progress)
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
    click.echo(f"size:          {_n(r.size)} bytes" + ("" if r.end == r.size else
                                                         f" (good transactions end at {_n(r.end)})"))
    click.echo(f"file id:       {r.file_id.hex()}")
    packed = "never" if r.pack_tid == common.Z64 else common.tid_repr(r.pack_tid)
    click.echo(f"packed to:     {packed}")
    click.echo(f"transactions:  {_n(r.transactions)}")
    click.echo(f"first:         {when(r.first_tid)}")
    click.echo(f"last:          {when(r.last_tid)}")
    click.echo(f"records:       {_n(r.records)}")
    click.echo(f"objects:       {_n(r.objects)} ({_n(r.deleted_objects)} deleted)")
    click.echo(f"current data:  {_n(r.current_bytes)} bytes")
    click.echo(f"history:       {_n(r.history_bytes)} bytes ({100 * r.history_share:.1f}% of the records)")
    click.echo(f"overhead:      {_n(r.overhead_bytes)} bytes (file and transaction headers, trailers)")
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
            click.echo(f"{head} would free {_n(p.bytes_freed)} bytes ({share:.1f}%): "
                       f"{_n(p.bytes_before)} -> {_n(p.bytes_after)} bytes; removes "
                       f"{_n(p.revisions_removed)} revisions, {_n(p.objects_removed)} objects, "
                       f"{_n(p.transactions_removed)} transactions")
        if p.refs_unreadable:
            click.echo(f"  note: {len(p.refs_unreadable)} reachable records have no stored references and "
                       "their data is not a ZODB pickle: the pack would refuse (PackError)")


# -- tail, history, refs ------------------------------------------------------------------

@main.command()
@click.argument("path", type=PATH)
@click.option("-n", "--count", "n", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many transactions.")
@JSON_OPTION
def tail(path: str, n: int, as_json: bool) -> None:
    """The last N transactions of PATH, newest first: tid, time, user, description, size, records."""
    with failing_cleanly():
        rows = info_mod.tail(path, n)
    if as_json:
        emit_json(rows)
        return
    for t in rows:
        click.echo(f"{t['tid']} {t['time']} status {t['status']!r} user {t['user']!r} "
                   f"description {t['description']!r} {_n(t['size'])} bytes {t['records']} records "
                   f"(at {t['pos']})")


@main.command()
@click.argument("path", type=PATH)
@click.argument("oid", callback=_oid_arg)
@click.option("-n", "--count", "n", type=click.IntRange(min=1), default=None,
              help="At most this many revisions (newest first).")
@JSON_OPTION
def history(path: str, oid: bytes, n: int | None, as_json: bool) -> None:
    """Every revision of OID in PATH, newest first.

    OID is hex (0x1a, 1a, 000000000000001a) or decimal (26): hex if it
    starts with 0x, has 16 digits or contains a letter a-f.
    """
    with failing_cleanly():
        rows = info_mod.history(path, oid, n)
    if as_json:
        emit_json(rows)
        return
    click.echo(f"oid {common.oid_repr(oid)}: {len(rows)} revisions")
    for h in rows:
        line = (f"{h['tid']} {h['time']} record at {h['pos']} status {h['status']!r} user {h['user']!r} "
                f"description {h['description']!r}: ")
        if h["kind"] == "data":
            line += f"{_n(h['size'])} bytes, class {h['class']}"
        elif h["kind"] == "backpointer":
            line += (f"backpointer to {h['backpointer']} (the data of tid {h['data_tid']}, "
                     f"{_n(h['size'])} bytes, class {h['class']})")
        else:
            line += h["kind"]
        click.echo(line)


@main.command()
@click.argument("path", type=PATH)
@click.argument("oid", callback=_oid_arg)
@JSON_OPTION
def refs(path: str, oid: bytes, as_json: bool) -> None:
    """What OID references, and which current objects reference OID, in PATH.

    From the stored references (nothing is unpickled).  Exit status 1 if a
    reference dangles: OID references a missing or deleted object, or OID is
    missing or deleted and referenced.
    """
    with failing_cleanly(), _byte_progress(_size_of(path), "refs") as progress:
        report = info_mod.refs(path, oid, progress)
    if as_json:
        emit_json(report.to_json())
    else:
        o = common.oid_repr(oid)
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
        click.echo(f"referenced by ({len(report.referrers)} current objects):")
        for r in report.referrers:
            click.echo(f"  {common.oid_repr(bytes.fromhex(r['oid']))} (record at {r['pos']}) {r['class']}")
        if report.unreadable_referrers:
            click.echo(f"  ({report.unreadable_referrers} current records whose data is unreadable "
                       "were not searched)")
        if report.unknown_referrers:
            click.echo(f"  ({report.unknown_referrers} current records with unknown references "
                       "were not searched)")
    if report.dangling:
        _fail()


# -- recover ------------------------------------------------------------------------------

@main.command()
@click.argument("src", type=PATH)
@click.argument("dst", type=PATH)
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
    with failing_cleanly(), _byte_progress(_size_of(src), "recover") as progress:
        report = recover_mod.recover(src, dst, progress, force)
    v = report.verify
    structural = {k: n for k, n in v.counts.items() if k != "dangling"} if v else {}
    if as_json:
        emit_json(report.to_json())
    else:
        if report.header_error:
            click.echo(f"file header damaged: {report.header_error}; went on from the first transaction")
        for s in report.skipped:
            click.echo(f"skipped bytes [{s.start}, {s.end}) ({_n(s.end - s.start)} bytes): {s.error}")
            if s.records or s.lost:
                click.echo(f"  salvaged {_n(s.records)} intact records in {_n(s.transactions)} transactions; "
                           f"{_n(s.lost)} records lost")
            for a, b in s.unknown:
                click.echo(f"  [{a}, {b}): could not tell which records these bytes held; they are lost")
            if s.unfinished:
                click.echo(f"  {s.unfinished} transaction(s) never finished (status 'c'): not copied")
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
            click.echo(f"{report.rescued} backpointers into skipped stretches: their data was still "
                       "readable and was written in full")
        click.echo(f"recovered {_n(report.transactions)} transactions ({_n(report.records)} records) "
                   f"from {src} into {dst}; {_n(report.bytes_skipped)} bytes skipped")
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
                    "losses": f"result: salvaged with losses ({len(report.lost)} revisions lost"
                              + (", and what the unreadable bytes held" if report.unknown else "") + ")",
                    "nothing": "result: nothing could be salvaged"}[report.outcome])
    if structural:
        _fail()
    if report.exit_status:
        click.get_current_context().exit(report.exit_status)


# -- backup and restore -------------------------------------------------------------------

@main.command()
@click.argument("path", type=PATH)
@click.argument("backup_dir", type=click.Path(file_okay=False))
@click.option("--full", is_flag=True, help="Start a new full backup even if an incremental one would do.")
@JSON_OPTION
def backup(path: str, backup_dir: str, full: bool, as_json: bool) -> None:
    """Back up the (possibly live) file PATH into BACKUP_DIR.

    The first backup is full; later ones copy only the transactions written
    since (the log is append-only).  A pack since the last backup is
    detected and forces a full one.  Each piece is checked by sha256 after
    writing and listed in BACKUP_DIR/manifest.json.
    """
    with failing_cleanly(), _byte_progress(_size_of(path), "backup") as progress:
        report = backup_mod.backup(path, backup_dir, full, progress)
    if as_json:
        emit_json(report.to_json())
        return
    if report.kind == "none":
        click.echo(f"{path}: {report.reason}; nothing written")
    else:
        upto = common.tid_repr(report.last_tid) if report.last_tid else "no transaction"
        click.echo(f"{report.kind} backup of {path}: bytes [{report.start}, {report.end}) "
                   f"({_n(report.bytes)} bytes, {_n(report.transactions)} transactions, up to {upto}) "
                   f"-> {backup_dir}/{report.piece}, sha256 {report.sha256}"
                   + (f"; full because {report.reason}" if report.kind == "full" else ""))
    if report.note:
        click.echo(f"note: {report.note}")


@main.command()
@click.argument("backup_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("dest", type=PATH)
@click.option("--time", "at_time", callback=_time_arg, metavar="TIME",
              help="Restore the state as of TIME (ISO 8601, UTC unless a zone is given).")
@click.option("--tid", callback=_tid_arg, metavar="TID", help="Restore the state as of transaction TID.")
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
@JSON_OPTION
def restore(backup_dir: str, dest: str, at_time: float | None, tid: bytes | None, force: bool,
            as_json: bool) -> None:
    """Rebuild a data file DEST from the backups in BACKUP_DIR.

    The latest state, or with --time/--tid the state as of then (cut after
    the last transaction at or before it).  Every piece's sha256 is checked.
    """
    if at_time is not None and tid is not None:
        raise click.UsageError("give --time or --tid, not both")
    if at_time is not None:
        with failing_cleanly():
            tid = common.tid_for_time(at_time)
    with failing_cleanly(), _byte_progress(None, "restore") as progress:
        report = backup_mod.restore(backup_dir, dest, tid, force, progress)
    if as_json:
        emit_json(report.to_json())
        return
    upto = common.tid_repr(report.last_tid) if report.last_tid else "no transaction"
    click.echo(f"restored {dest} from {len(report.pieces or [])} backup pieces: {_n(report.size)} bytes, "
               f"{_n(report.transactions)} transactions, up to {upto}")
