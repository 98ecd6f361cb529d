"""Copying whole histories between storages (copyTransactionsFrom, convert).

The source is anything with iterator(): refstorage, ZODB's FileStorage, or a
storage named by a zodburi URI or a ZConfig file.  Each transaction keeps its
tid, status, user, description and extension bytes; each record goes through
the destination's restore(), so a record that repeats the data of the
revision named by data_txn becomes a backpointer again (undo history survives
the round trip).  When both sides support blobs (IBlobStorage), the blob file
of each blob record is copied too, through the destination's restoreBlob.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ZODB.POSException import StorageTransactionError

from .blobs import copies_blobs, copy_blob_to_temporary


@dataclass
class CopyReport:
    transactions: int = 0
    records: int = 0
    bytes: int = 0
    last_tid: bytes | None = None


def copy_transactions(source, dest, start: bytes | None = None,
                      progress: Callable[[CopyReport], None] | None = None) -> CopyReport:
    """Copy every transaction of `source` with tid >= start into `dest`."""
    report = CopyReport()
    with_blobs = copies_blobs(source, dest)
    # refstorage's bulk restore (storage.FileStorage.restore_records: the same records as
    # restore() one by one), unless blobs are copied
    bulk = None if with_blobs else getattr(dest, "restore_records", None)
    it = source.iterator(start) if start is not None else source.iterator()
    try:
        for txn in it:
            tid = txn.tid
            last = dest.lastTransaction()
            if tid <= last:
                raise StorageTransactionError(
                    f"source transaction {tid.hex()} is not after the destination's last "
                    f"transaction {last.hex()}")
            dest.tpc_begin(txn, tid, txn.status)
            try:
                if bulk is not None:
                    n, nbytes = bulk(txn, txn)
                    report.records += n
                    report.bytes += nbytes
                for rec in txn if bulk is None else ():
                    blob = copy_blob_to_temporary(source, dest, rec) if with_blobs else None
                    if blob is not None:
                        dest.restoreBlob(rec.oid, rec.tid, rec.data, blob, rec.data_txn, txn)
                    else:
                        dest.restore(rec.oid, rec.tid, rec.data, "", rec.data_txn, txn)
                    report.records += 1
                    report.bytes += len(rec.data or b"")
                dest.tpc_vote(txn)
                dest.tpc_finish(txn)
            except BaseException:
                dest.tpc_abort(txn)
                raise
            report.transactions += 1
            report.last_tid = tid
            if progress is not None:
                progress(report)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return report
