"""`refstorage convert SRC DST`: copy a whole history between storages."""

from __future__ import annotations

import time

import click
from ZODB.utils import p64, u64, z64

from ..copying import copy_transactions
from . import main
from .common import emit_json, failing_cleanly, open_storage, progress_bar


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--incremental", is_flag=True,
              help="Copy only the transactions after DST's last one (DST must exist).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(src: str, dst: str, incremental: bool, as_json: bool) -> None:
    """Copy every transaction of SRC into DST.

    SRC and DST are refstorage files (*.rfs), ZODB FileStorage files (*.fs),
    zodburi URIs or ZConfig files.  Each transaction keeps its tid, status,
    user, description and extension; undo records stay backpointers.  DST must
    be empty unless --incremental is given.
    """
    with failing_cleanly():
        source = open_storage(src, read_only=True)
        try:
            dest = open_storage(dst, read_only=False)
            try:
                last = dest.lastTransaction()
                start = None
                if incremental:
                    start = p64(u64(last) + 1) if last != z64 else None
                elif last != z64:
                    raise click.ClickException(
                        f"{dst} is not empty (last transaction {last.hex()}); "
                        "use --incremental to add only newer transactions")
                t0 = time.perf_counter()
                with progress_bar(None, "copying") as bar:
                    report = copy_transactions(source, dest, start, lambda r: bar.update(1))
                seconds = time.perf_counter() - t0
            finally:
                dest.close()
        finally:
            source.close()
    result = {"transactions": report.transactions, "records": report.records,
              "bytes": report.bytes, "last_tid": report.last_tid, "seconds": round(seconds, 3)}
    if as_json:
        emit_json(result)
    else:
        click.echo(f"copied {report.transactions} transactions, {report.records} records "
                   f"({report.bytes} bytes of data) in {seconds:.2f} s")
