"""Truncation at every byte: the longest complete prefix, and the cut bytes kept aside.

The small database of helpers.build_small_db is cut at every length from 0 to
its full size.  For each length:

- read-only open serves exactly the longest complete prefix: lastTransaction
  is the last complete transaction's tid and all of its data loads (load,
  loadBefore, loadSerial of every revision);
- read-write open does the same and moves the bytes after that prefix to the
  side file ``<name>.tr0`` -- whose content is exactly the removed bytes --
  with a warning, leaving the file ending at the prefix;
- a file shorter than its header is refused (EmptyFileError at 0 bytes,
  CorruptedHeaderError below 1024), read-only and read-write, and left as is.

Each length is tried without an index file and with the index saved for the
whole file (which then describes more than the file holds and is ignored).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

import refstorage
from refstorage import errors
from refstorage import fileformat as fmt

from .helpers import (
    build_small_db,
    capture_log,
    check_model,
    check_storage,
    close_quickly,
    no_fsync,
    report,
    temp_dir,
)

pytestmark = pytest.mark.reliability


def _write(path: str, content: bytes, index: bytes | None) -> None:
    for suffix in (".tr0", ".tr1", ".index"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    with open(path, "wb") as f:
        f.write(content)
    if index is not None:
        with open(path + ".index", "wb") as f:
            f.write(index)


def test_truncation_at_every_byte():
    stats: Counter = Counter()
    with temp_dir() as d:
        path = os.path.join(d, "Data.rfs")
        model, ranges = build_small_db(path)
        with open(path, "rb") as f:
            original = f.read()
        st = refstorage.FileStorage(path)
        st.close()  # saves the index of the whole file
        with open(path + ".index", "rb") as f:
            full_index = f.read()
        with no_fsync():  # durability is not under test here
            for size in range(len(original) + 1):
                cut = original[:size]
                for index in (None, full_index):
                    try:
                        outcome = _check(path, cut, index, model, ranges)
                    except BaseException as exc:
                        raise AssertionError(f"cut at {size} bytes (index file: {index is not None}): "
                                             f"{exc!r}") from exc
                    stats[outcome] += 1
    report("truncate", file_bytes=len(original), cuts=len(original) + 1,
           opens=2 * sum(n for outcome, n in stats.items() if outcome != "skipped"),
           outcomes={k: v for k, v in stats.items() if k != "skipped"})


def _check(path: str, cut: bytes, index: bytes | None, model, ranges) -> str:
    size = len(cut)
    if size < fmt.HEADER_SIZE:
        if index is not None:
            return "skipped"
        error = errors.EmptyFileError if size == 0 else errors.CorruptedHeaderError
        message = "empty" if size == 0 else "shorter than its header"
        for read_only in (True, False):
            _write(path, cut, None)
            with pytest.raises(error, match=message):
                refstorage.FileStorage(path, read_only=read_only)
            with open(path, "rb") as f:
                assert f.read() == cut
        return f"refused: {error.__name__}"
    complete = sum(1 for _lo, hi in ranges if hi <= size)
    end = ranges[complete - 1][1] if complete else fmt.HEADER_SIZE
    _write(path, cut, index)
    with capture_log() as log:
        ro = refstorage.FileStorage(path, read_only=True)
        try:
            check_model(ro, model, complete)
            assert ro._end == end
        finally:
            ro.close()
        with open(path, "rb") as f:
            assert f.read() == cut, "a read-only open changed the file"
        st = refstorage.FileStorage(path)
        try:
            check_model(st, model, complete)
            check_storage(st)
        finally:
            close_quickly(st)
    assert os.path.getsize(path) == end
    assert not os.path.exists(path + ".tr1")
    if size == end:
        assert not os.path.exists(path + ".tr0")
        return "complete prefix, nothing to move"
    with open(path + ".tr0", "rb") as f:
        assert f.read() == cut[end:], "the side file does not hold exactly the removed bytes"
    assert any("incomplete last transaction" in r.getMessage() and r.levelname == "WARNING" for r in log)
    return "torn tail moved to the side file"
