"""`refstorage pack PATH`: pack a database file offline."""

from __future__ import annotations

import dataclasses
import time

import click

from ..storage import FileStorage
from ..tools.common import ToolError, parse_tid, parse_time, tid_time
from . import main
from .common import emit_json, failing_cleanly, progress_bar


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--days", type=float, default=None,
              help="Keep this many days of history (pack time = now - DAYS).")
@click.option("--before", "before", default=None,
              help="Pack time: an ISO date/time (UTC) or a tid in hex.  Default: now.")
@click.option("--gc/--no-gc", default=True, show_default=True,
              help="Remove objects unreachable from the root (else only old revisions).")
@click.option("--keep-old/--no-keep-old", default=True, show_default=True,
              help="Keep the previous file as PATH.old.")
@click.option("--blob-dir", default=None, help="The database's blob directory, if it has blobs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def pack(path: str, days: float | None, before: str | None, gc: bool, keep_old: bool,
         blob_dir: str | None, as_json: bool) -> None:
    """Remove the revisions not needed as of the pack time.

    Every revision current at the pack time and reachable from the root is
    kept, with everything written after it; reachability comes from the
    references stored in the records, nothing is unpickled.  The file must not
    be open for writing by another process.
    """
    if days is not None and before is not None:
        raise click.UsageError("give --days or --before, not both")
    if days is not None:
        t = time.time() - days * 86400
    elif before is not None:
        try:
            t = tid_time(parse_tid(before)) if _is_tid(before) else parse_time(before)
        except (ValueError, ToolError) as exc:
            raise click.BadParameter(str(exc), param_hint="--before") from exc
    else:
        t = time.time()
    with failing_cleanly():
        storage = FileStorage(path, pack_keep_old=keep_old, pack_gc=gc, blob_dir=blob_dir)
        try:
            with progress_bar(None, "packing", unit="") as bar:
                def progress(phase: str, done: int, total: int) -> None:
                    bar.set_description(phase)
                    bar.total = total
                    bar.n = done
                    bar.refresh()
                storage.pack(t, progress=progress)
            report = storage.last_pack_report
        finally:
            storage.close()
    if as_json:
        emit_json({**dataclasses.asdict(report), "bytes_freed": report.bytes_freed})
    else:
        click.echo(str(report))


def _is_tid(text: str) -> bool:
    t = text.lower().removeprefix("0x")
    return len(t) == 16 and all(c in "0123456789abcdef" for c in t)
