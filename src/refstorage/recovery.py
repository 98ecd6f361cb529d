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
- damage followed by valid transactions: open refuses with the corruption
  error naming the offset (never a silent truncation), read-write and
  read-only alike: serving the transactions before it would present an old
  state as current.  Only a read-only open that asks for it
  (`serve_valid_prefix`) serves them, with an error logged.
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


def open_log(file: fileio.DataFile, index_path: str, file_id: bytes, read_only: bool,
             serve_valid_prefix: bool = False) -> Opened:
    """The index and the end of the good log of `file`, repairing a torn tail.

    `serve_valid_prefix` (read-only only): on damage before the last
    transaction, end the log at the damage instead of refusing."""
    reader = LogReader(file)
    size = file.size
    index, start, last_tid = _saved_index(reader, index_path, file_id, size)
    saved_end = start if index is not None else 0
    if index is None:
        index, start, last_tid = OidIndex(), fmt.HEADER_SIZE, None
    result = scan(reader, start, size, index, last_tid=last_tid)
    if result.last_tid is not None:
        last_tid = result.last_tid
    end = result.end
    if result.bad_pos is not None:
        end = _handle_damage(file, result, read_only, serve_valid_prefix)
    return Opened(index, end, last_tid, saved_end)


class SavedIndex(NamedTuple):
    """What `check_saved_index` found: the index to use, or why there is none."""

    index: OidIndex | None  # None: absent or not usable
    pos: int  # where it says it is complete (0 if none could be read)
    tid: bytes | None  # the tid it says ends there (None: none, or no transaction)
    state: str  # absent, usable, unreadable, another file's, out of range, mismatch
    why: str | None  # why it is not usable, as a sentence (None if usable or absent)


def check_saved_index(reader: LogReader, index_path: str, file_id: bytes | None, size: int) -> SavedIndex:
    """The one rule for trusting a saved index: used by open, the tools and verify.

    Usable only if it reads back intact, belongs to this file (`file_id`; None
    when the file header is unreadable: never usable), and the data file has
    a finished transaction with the tid it names ending exactly where it
    stops (or it stops at the file header, naming no transaction)."""
    try:
        loaded = load_index(index_path)
    except IndexFileError as exc:
        return SavedIndex(None, 0, None, "unreadable", str(exc))
    if loaded is None:
        return SavedIndex(None, 0, None, "absent", None)
    index, saved_id, pos, tid = loaded
    state = why = None
    if file_id is None:
        state, why = "another file's", "the data file's header is damaged, so it cannot be matched"
    elif saved_id != file_id:
        state, why = "another file's", (f"it belongs to another data file (file id {saved_id.hex()}, "
                                        f"the data file's is {file_id.hex()})")
    elif pos == fmt.HEADER_SIZE:
        if tid != z64:
            state, why = "mismatch", "it describes transactions the data file does not hold"
    elif not fmt.HEADER_SIZE < pos <= size:
        state, why = "out of range", f"it covers {pos} bytes but the data file has {size}"
    else:
        try:
            th = reader.txn_ending_at(pos, size)
            if th.tid != tid or th.status == fmt.STATUS_CHECKPOINT:
                state, why = "mismatch", (f"its last transaction does not match the data file (it names tid "
                                          f"{tid.hex()} at {pos}, the file has {th.tid.hex()} "
                                          f"status {th.status!r})")
        except CorruptedError as exc:
            state, why = "mismatch", f"its end position {pos} is not a transaction boundary ({exc.detail})"
    if why:
        return SavedIndex(None, pos, tid, state, why)
    return SavedIndex(index, pos, tid if tid != z64 else None, "usable", None)


def _saved_index(reader: LogReader, index_path: str, file_id: bytes, size: int):
    saved = check_saved_index(reader, index_path, file_id, size)
    if saved.state == "unreadable":
        logger.warning("%s; rebuilding the index from the data file", saved.why)
    elif saved.why:
        logger.warning("%s: ignoring the saved index (%s); rebuilding it", index_path, saved.why)
    if saved.index is None:
        return None, 0, None
    return saved.index, saved.pos, saved.tid


def _handle_damage(file: fileio.DataFile, result: ScanResult, read_only: bool,
                   serve_valid_prefix: bool) -> int:
    path = file.path
    bad = result.bad_pos
    error = result.error
    if not result.torn_tail:
        if not (read_only and serve_valid_prefix):
            raise type(error)(
                path, f"damaged transaction followed by valid ones: {error.detail}; "
                "run 'refstorage recover' to salvage it (or open it read-only with "
                "serve_valid_prefix to read the transactions before the damage)",
                error.offset)
        logger.error("%s: damage at offset %s (%s); serving only the %d bytes before it",
                     path, error.offset, error.detail, bad)
        return bad
    if read_only:
        logger.warning("%s: ignoring an incomplete last transaction at %d (%s)", path, bad, error.detail)
        return bad
    tail_len = file.size - bad
    side = fileio.save_side_file(path, file.read_chunks(bad, file.size))  # streamed, bounded memory
    file.truncate(bad)
    file.sync()
    logger.warning("%s: moved an incomplete last transaction (%d bytes at offset %d: %s) to %s",
                   path, tail_len, bad, error.detail, side)
    return bad
