"""`refstorage convert SRC DST`: copy a whole history between storages."""

from __future__ import annotations

import os
import time

import click
from ZODB.utils import p64, u64, z64

from .. import fileio
from ..copying import copy_transactions
from . import main
from .common import (
    DEFAULT_TIMEOUT,
    CliError,
    check_database,
    check_existing_file,
    check_new_file,
    emit_json,
    failing_cleanly,
    is_config,
    is_uri,
    open_storage,
    plural,
    progress_bar,
    size_repr,
)

FS_MAGICS = (b"FS21", b"FS30")


def _check_source(src: str) -> int | None:
    """Refuse a source path that is not a database; the number of transactions of a refstorage file."""
    if is_uri(src):
        return None
    check_existing_file(src)
    if is_config(src):
        return None
    from ..fileformat import MAGIC
    with failing_cleanly(src):
        head = fileio.read_whole(src, max(len(MAGIC), 4))
    if head.startswith(MAGIC) or not head:
        check_database(src)
        from .. import fileformat as fmt
        from ..log import scan
        from ..tools.common import Log
        with failing_cleanly(src), Log(src) as log:  # headers and oid tables only: fast
            return scan(log.reader, fmt.HEADER_SIZE, log.size).ntxn or None
    if not head.startswith(FS_MAGICS):
        raise CliError(f"{src}: neither a refstorage file nor a ZODB FileStorage file")
    return -1  # a FileStorage file: counted once open (its iterator reads transaction headers only)


def _check_dest(dst: str) -> bool:
    """Refuse a destination path that cannot be written or is not a database; True if it exists."""
    if is_uri(dst):
        return True
    if is_config(dst):
        check_existing_file(dst)
        return True
    check_new_file(dst)
    if not os.path.exists(dst):
        return False
    from ..fileformat import MAGIC
    with failing_cleanly(dst):
        head = fileio.read_whole(dst, max(len(MAGIC), 4))
    if head.startswith(MAGIC) or not head:
        check_database(dst)
    elif not head.startswith(FS_MAGICS):
        raise CliError(f"{dst}: exists and is neither a refstorage file nor a ZODB FileStorage file")
    return True


@main.command(epilog="""\b
Examples:
  refstorage convert Data.fs Data.rfs                  # ZODB FileStorage -> refstorage
  refstorage convert Data.rfs Data.fs --blob-dir blobs --dest-blob-dir fs-blobs
  refstorage convert Data.rfs zeo://127.0.0.1:8100 --dry-run
  refstorage convert Data.fs Data.rfs --incremental    # only the newer transactions""")
@click.argument("src")
@click.argument("dst")
@click.option("--incremental", is_flag=True,
              help="Copy only the transactions after DST's last one (DST must exist).")
@click.option("--blob-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="SRC's blob directory, when SRC is a path (URIs and configurations name their own).")
@click.option("--dest-blob-dir", type=click.Path(file_okay=False), default=None,
              help="DST's blob directory, when DST is a path (created if missing).")
@click.option("--dry-run", is_flag=True,
              help="Open both sides and count what would be copied; write nothing.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT,
              show_default=True, metavar="SECONDS", help="How long to wait for a ZEO server (zeo:// URIs).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(src: str, dst: str, incremental: bool, blob_dir: str | None, dest_blob_dir: str | None,
            dry_run: bool, timeout: float, as_json: bool) -> None:
    """Copy every transaction of SRC into DST.

    SRC and DST are refstorage files (*.rfs), ZODB FileStorage files (*.fs),
    zodburi URIs (refstorage://, file://, zeo://...) or ZConfig files
    (*.conf).  Each transaction keeps its tid, status, user, description and
    extension; undo records stay backpointers; blobs are copied when both
    sides have a blob directory.  DST is created if it is a path that does
    not exist; it must be empty unless --incremental is given.
    """
    total = _check_source(src)
    dst_exists = _check_dest(dst)
    if incremental and not dst_exists:
        raise CliError(f"{dst}: no such file (--incremental adds to an existing database)")
    if dst_exists and not incremental and not is_uri(dst) and not is_config(dst):
        # refuse a non-empty destination before opening it for writing (which
        # would leave an index and a lock file beside it)
        probe = open_storage(dst, read_only=True, timeout=timeout)
        try:
            last = probe.lastTransaction()
        finally:
            probe.close()
        if last != z64:
            raise CliError(f"{dst} is not empty (last transaction {last.hex()}); "
                           "use --incremental to add only newer transactions")
    source = open_storage(src, read_only=True, timeout=timeout, blob_dir=blob_dir)
    try:
        dest = None
        if dst_exists or not dry_run:
            dest = open_storage(dst, read_only=dry_run, timeout=timeout, blob_dir=dest_blob_dir)
            if not dry_run and not _restores(dest):
                dest.close()
                dest = None
                raise CliError(f"{dst}: this storage cannot be a convert destination (it cannot "
                               "take transactions with their own tids: no restore)")
        try:
            with failing_cleanly(src):
                last = dest.lastTransaction() if dest is not None else z64
                start = None
                if incremental:
                    start = p64(u64(last) + 1) if last != z64 else None
                    total = None
                elif last != z64:
                    raise CliError(
                        f"{dst} is not empty (last transaction {last.hex()}); "
                        "use --incremental to add only newer transactions")
                if total == -1:
                    total = _count_txns(source, start) if not incremental else None
                t0 = time.perf_counter()
                with progress_bar(total, "convert" + (" (dry run)" if dry_run else ""),
                                  unit="txn") as bar:
                    if dry_run:
                        report = _count(source, start, bar)
                    else:
                        try:
                            report = copy_transactions(source, dest, start, lambda r: bar.update(1))
                        except KeyboardInterrupt:
                            done = dest.lastTransaction()
                            raise CliError(
                                f"interrupted: {dst} holds only the transactions copied so far (up to "
                                f"{done.hex()}); run the same command with --incremental to go on, "
                                "or remove it") from None
                seconds = time.perf_counter() - t0
        finally:
            if dest is not None:
                dest.close()
    finally:
        source.close()
    result = {"transactions": report.transactions, "records": report.records,
              "bytes": report.bytes, "last_tid": report.last_tid, "seconds": round(seconds, 3),
              "dry_run": dry_run}
    if as_json:
        emit_json(result)
    else:
        verb = "would copy" if dry_run else "copied"
        click.echo(f"{verb} {plural(report.transactions, 'transaction')}, "
                   f"{plural(report.records, 'record')} ({size_repr(report.bytes)} of data) "
                   f"in {seconds:.2f} s")


def _restores(storage) -> bool:
    """Whether `storage` can take copied transactions (tpc_begin with a tid, restore)."""
    from ZODB.interfaces import IStorageRestoreable
    return IStorageRestoreable.providedBy(storage) or hasattr(storage, "restore")


def _count(source, start: bytes | None, bar):
    """What copy_transactions would copy, without a destination."""
    from ..copying import CopyReport
    report = CopyReport()
    it = source.iterator(start) if start is not None else source.iterator()
    try:
        for txn in it:
            for rec in txn:
                report.records += 1
                report.bytes += len(rec.data or b"")
            report.transactions += 1
            report.last_tid = txn.tid
            bar.update(1)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return report


def _count_txns(source, start: bytes | None) -> int | None:
    """How many transactions a FileStorage source holds (for the progress bar's total)."""
    it = source.iterator(start) if start is not None else source.iterator()
    try:
        return sum(1 for _txn in it) or None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
