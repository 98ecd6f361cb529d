"""Opening a data file: reuse or rebuild the index, and deal with damage.

The saved index is a cache: it is used only when it belongs to this file
(same file id) and the file has a finished transaction with its tid ending
exactly where the index says it stops; then only the log after it is
scanned.  Anything else is logged and the index is rebuilt from the log.

What the scan finds wrong is classified (see `log.scan`):

- a torn tail -- an unfinished or cut-short last transaction, which no
  commit ever acknowledged: read-write, its bytes are copied to the first
  free ``<name>.tr<N>`` side file and the file is truncated, with a warning;
  read-only, it is ignored;
- damage followed by valid transactions: read-write open refuses with the
  corruption error naming the offset (never a silent truncation); read-only
  open serves the transactions before it, with an error logged.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from ZODB.utils import z64

from . import fileformat as fmt
from . import fileio
from .errors import CorruptedError, IndexFileError
from .index import OidIndex
from .indexfile import load_index
from .log import LogReader, ScanResult, scan

logger = logging.getLogger("refstorage")


class Opened(NamedTuple):
    index: OidIndex
    end: int  # end of the last good, finished transaction
    last_tid: bytes | None
    saved_end: int  # where the saved index we used stops (0: none was usable)


def open_log(file: fileio.DataFile, index_path: str, file_id: bytes, read_only: bool) -> Opened:
    """The index and the end of the good log of `file`, repairing a torn tail."""
    reader = LogReader(file)
    size = file.size
    index, start, last_tid = _saved_index(reader, index_path, file_id, size)
    saved_end = start if index is not None else 0
    if index is None:
        index, start, last_tid = OidIndex(), fmt.HEADER_SIZE, None
    result = scan(reader, start, size, index)
    if result.last_tid is not None:
        last_tid = result.last_tid
    end = result.end
    if result.bad_pos is not None:
        end = _handle_damage(file, result, read_only)
    return Opened(index, end, last_tid, saved_end)


def _saved_index(reader: LogReader, index_path: str, file_id: bytes, size: int):
    try:
        loaded = load_index(index_path)
    except IndexFileError as exc:
        logger.warning("%s; rebuilding the index from the data file", exc)
        return None, 0, None
    if loaded is None:
        return None, 0, None
    index, saved_id, pos, tid = loaded
    why = None
    if saved_id != file_id:
        why = "it belongs to another data file"
    elif pos == fmt.HEADER_SIZE:
        if tid != z64:
            why = "it describes transactions the data file does not hold"
    elif not fmt.HEADER_SIZE < pos <= size:
        why = f"it covers {pos} bytes but the data file has {size}"
    else:
        try:
            th = reader.txn_ending_at(pos, size)
            if th.tid != tid or th.status == fmt.STATUS_CHECKPOINT:
                why = "its last transaction does not match the data file"
        except CorruptedError as exc:
            why = f"its end position is not a transaction boundary ({exc})"
    if why:
        logger.warning("%s: ignoring the saved index (%s); rebuilding it", index_path, why)
        return None, 0, None
    return index, pos, (tid if tid != z64 else None)


def _handle_damage(file: fileio.DataFile, result: ScanResult, read_only: bool) -> int:
    path = file.path
    bad = result.bad_pos
    error = result.error
    if not result.torn_tail:
        if not read_only:
            raise type(error)(
                path, f"damaged transaction followed by valid ones: {error.detail}; "
                "open read-only to read the data before it, or run 'refstorage recover'",
                error.offset)
        logger.error("%s: damage at offset %s (%s); serving only the %d bytes before it",
                     path, error.offset, error.detail, bad)
        return bad
    if read_only:
        logger.warning("%s: ignoring an incomplete last transaction at %d (%s)", path, bad, error.detail)
        return bad
    tail = file.read(bad, file.size - bad)
    side = fileio.save_side_file(path, tail)
    file.truncate(bad)
    file.sync()
    logger.warning("%s: moved an incomplete last transaction (%d bytes at offset %d: %s) to %s",
                   path, len(tail), bad, error.detail, side)
    return bad
