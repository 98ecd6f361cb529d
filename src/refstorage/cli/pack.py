"""`refstorage pack PATH`: pack a database file offline."""

from __future__ import annotations

import dataclasses

import click

from ..storage import FileStorage
from . import main
from .common import (
    DATABASE,
    WHEN,
    WHEN_HELP,
    DaysType,
    Moment,
    emit_json,
    failing_cleanly,
    moment_for_days,
    one_moment,
    phased_progress,
    plural,
    size_repr,
)

PHASES = {"gc": ("pack: marking reachable objects", "objects"), "copy": ("pack: copying", "B")}


@main.command(epilog="""\b
Examples:
  refstorage pack Data.rfs --days 7              # keep a week of history
  refstorage pack Data.rfs --time 2024-05-01     # drop what was replaced before then
  refstorage pack Data.rfs --no-gc --no-keep-old

\b
The file must not be open for writing by another process.  A database that
a ZEO server (refstorage serve) holds open is packed through the server,
with ZEO's own zeopack script (zeopack -d 7 127.0.0.1:8100), or from a
client: ZEO.DB((host, port)).pack(days=7).""")
@click.argument("path", type=DATABASE)
@click.option("--days", type=DaysType(), default=None,
              help="Keep this many days of history (pack to now - DAYS).")
@click.option("--time", "at", type=WHEN, default=None,
              help=f"Pack to WHEN, {WHEN_HELP}.  Default: now (keep no history).")
@click.option("--before", type=WHEN, default=None, hidden=True)
@click.option("--gc/--no-gc", default=True, show_default=True,
              help="Remove objects unreachable from the root (else only old revisions).")
@click.option("--keep-old/--no-keep-old", default=True, show_default=True,
              help="Keep the previous file as PATH.old.")
@click.option("--blob-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="The database's blob directory, if it has blobs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def pack(path: str, days: Moment | None, at: Moment | None, before: Moment | None, gc: bool,
         keep_old: bool, blob_dir: str | None, as_json: bool) -> None:
    """Remove the revisions of PATH not needed as of the pack time.

    Every revision current at the pack time and reachable from the root is
    kept, with everything written after it; reachability comes from the
    references stored in the records, nothing is unpickled.
    """
    when = one_moment(days=days, time=at, before=before) or moment_for_days(0)
    with failing_cleanly(path, locked_hint="or, if it is a ZEO server, pack through the server "
                         "(ZEO's zeopack -d DAYS HOST:PORT)"):
        storage = FileStorage(path, pack_keep_old=keep_old, pack_gc=gc, blob_dir=blob_dir)
        try:
            with phased_progress(PHASES) as progress:
                storage.pack(when.time, progress=progress)
            report = storage.last_pack_report
        finally:
            storage.close()
    if as_json:
        emit_json({**dataclasses.asdict(report), "bytes_freed": report.bytes_freed})
    else:
        click.echo(pack_text(report))


def pack_text(report) -> str:
    """The pack report in the command's words: tids with their UTC time, plurals, sizes."""
    from ..tools.common import Z64, tid_repr
    when = tid_repr(report.pack_tid) if report.pack_tid != Z64 else "?"
    if not report.packed:
        return f"{report.path}: not packed to {when} ({report.reason}); {report.seconds:.2f} s"
    ratio = 100.0 * report.bytes_freed / report.bytes_before if report.bytes_before else 0.0
    return (f"{report.path}: packed to {when}: {size_repr(report.bytes_before)} -> "
            f"{size_repr(report.bytes_after)} ({ratio:.1f}% freed); removed "
            f"{plural(report.revisions_removed, 'revision')}, {plural(report.objects_removed, 'object')}, "
            f"{plural(report.transactions_removed, 'transaction')}; {report.seconds:.2f} s")
