"""What the tools share: a log opened read-only, oids, tids, times and class names."""

from __future__ import annotations

import datetime as _dt
import pickletools
import re
import struct
import time
from array import array
from collections.abc import Callable
from operator import itemgetter
from typing import NamedTuple

from persistent.TimeStamp import TimeStamp

from .. import fileformat as fmt
from .. import fileio
from ..errors import (
    CorruptedError,
    CorruptedHeaderError,
    RefStorageError,
    StorageIOError,
)
from ..index import MAX_POS, OidIndex
from ..log import LogReader, ScanResult, scan
from ..recovery import check_saved_index

try:
    from .._refscan import OidMap as _COidMap
except ImportError:  # pragma: no cover - depends on the build (the extension is optional)
    _COidMap = None

Z64 = fmt.Z64  # (re-exported for the cli)

Progress = Callable[[int], None]
"""progress(position): how far into the file a tool has got, in bytes.

A display may also have `phase(label, total, unit)`: the tools call it (via
`phase`) when a new phase of work starts, after which progress(n) counts in
that phase's unit ("B" for bytes, or "records", "objects"...)."""


def phase(progress: Progress | None, label: str, total: int | None, unit: str = "B") -> None:
    """Tell `progress` that a new phase starts, if it displays phases."""
    start = getattr(progress, "phase", None)
    if start is not None:
        start(label, total, unit)


class ToolError(RefStorageError):
    """A tool cannot do what was asked (bad argument, missing object...)."""


# -- oids, tids and times ----------------------------------------------------------------

_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+")


def parse_oid(text: str) -> bytes:
    """An oid from hex (0x1a, 1a, 000000000000001a) or decimal (26).

    Hex if it starts with 0x, has 16 digits or contains a letter a-f;
    otherwise decimal."""
    s = text.strip().replace("_", "")
    try:
        if s[:2].lower() == "0x":
            n = int(s[2:], 16)
        elif len(s) == 16 and _HEX_DIGITS.fullmatch(s) or _HEX_DIGITS.fullmatch(s) and not s.isdigit():
            n = int(s, 16)
        else:
            n = int(s, 10)
    except ValueError:
        raise ToolError(f"{text!r} is not an oid (give it in hex, 0x1a, or decimal, 26)") from None
    if not 0 <= n < 1 << 64:
        raise ToolError(f"{text!r} is out of range for an oid")
    return fmt.p64(n)


def oid_repr(oid: bytes) -> str:
    """0x00, 0x1a, ... (as ZODB.utils.oid_repr)."""
    s = f"{fmt.u64(oid):x}"
    return "0x" + ("0" + s if len(s) % 2 else s)


def tid_time(tid: bytes) -> float:
    return TimeStamp(tid).timeTime()


def time_repr(t: float) -> str:
    """An instant as UTC, ISO 8601 (ZODB's tids are UTC)."""
    try:
        d = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "?"
    return d.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def tid_repr(tid: bytes) -> str:
    return f"{tid.hex()} ({time_repr(tid_time(tid))})"


def parse_time(text: str) -> float:
    """Seconds since the epoch from ISO 8601 (2024-05-01, 2024-05-01T12:00:00+02:00).

    Without a time zone the time is UTC, as in ZODB's tids."""
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        d = _dt.datetime.fromisoformat(s)
    except ValueError:
        raise ToolError(f"{text!r} is not a time (give it as ISO 8601: 2024-05-01T12:30:00, UTC "
                        "unless a zone is given)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.timestamp()


def tid_for_time(t: float) -> bytes:
    """The largest tid of an instant: every transaction committed at or before `t` has tid <= it."""
    try:
        g = time.gmtime(t)
        return TimeStamp(*g[:5] + (g[5] + t % 1,)).raw()
    except (TypeError, ValueError, OverflowError, OSError) as exc:
        raise ToolError(f"invalid time {t!r}: {exc}") from None


def parse_tid(text: str) -> bytes:
    """A tid from 16 hex digits (or 0x...), else from a time (see parse_time)."""
    s = text.strip()
    if s[:2].lower() == "0x" or (len(s) == 16 and _HEX_DIGITS.fullmatch(s)):
        try:
            n = int(s, 16)
        except ValueError:
            raise ToolError(f"{text!r} is not a tid") from None
        if not 0 <= n < 1 << 64:
            raise ToolError(f"{text!r} is out of range for a tid")
        return fmt.p64(n)
    return tid_for_time(parse_time(s))


def text(b: bytes) -> str:
    """User names and descriptions for display: UTF-8, undecodable bytes escaped."""
    return b.decode("utf-8", "backslashreplace")


# -- class names, read from the pickle without loading it -----------------------------------

_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
                         "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
MAX_CLASS_OPCODES = 200


def first_pickle_class(data: bytes) -> tuple[str | None, int]:
    """(module.name of the first class global in the first pickle of `data`, that pickle's length).

    A ZODB record is two pickles, the class then the state.  Only the opcodes
    are read (pickletools.genops): no module is imported and nothing runs.
    (None, 0) if the data does not start with a pickle."""
    found = None
    memo: dict = {}
    strings: list = []
    last = None
    n = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name == "STOP":
                return found, pos + 1
            if name in _STRING_OPS:
                last = arg.decode("latin-1") if isinstance(arg, bytes) else arg
                strings.append(last)
                continue
            if name in _PUT_OPS:
                memo[arg] = last
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = last
                continue
            if name in _GET_OPS:
                last = memo.get(arg)
                strings.append(last)
                continue
            if found is None:
                if name == "GLOBAL":
                    found = ".".join(str(arg).split(" ", 1))
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    found = f"{strings[-2]}.{strings[-1]}"
            last = None
            n += 1
            if n > MAX_CLASS_OPCODES:
                break
    except Exception:  # not a pickle, or a damaged one: genops raises ValueError and others
        pass
    return None, 0


class ClassNames:
    """class_of(data) for many records, caching each distinct class pickle.

    A record whose data starts with a class pickle seen before has that class
    (a pickle ends at its STOP opcode), so most records cost one startswith."""

    NOT_A_PICKLE = "(not a pickle)"

    def __init__(self) -> None:
        self._cache: dict[bytes, list[tuple[bytes, str]]] = {}

    def __call__(self, data: bytes | None) -> str:
        if data is None:
            return "(no data)"
        key = data[:12]
        entries = self._cache.get(key)
        if entries:
            for prefix, name in entries:
                if data.startswith(prefix):
                    return name
        name, length = first_pickle_class(data)
        name = name or self.NOT_A_PICKLE
        if length:
            entries = self._cache.setdefault(key, [])
            if len(entries) < 256:
                entries.append((data[:length], name))
        return name


# -- a log opened read-only ---------------------------------------------------------------

class IndexBuild(NamedTuple):
    index: OidIndex  # oid -> newest record before `end`
    end: int  # end of the last good transaction
    last_tid: bytes | None
    scan: ScanResult  # of the part scanned (after the saved index, if one was used)


class Log:
    """A refstorage data file opened read-only (it may be in use by a storage meanwhile).

    `size` is the file's size when opened; the tools look no further.  With
    `allow_bad_header` a header that fails its checksum is recorded in
    `header_error` instead of raised (verify and recover go on from the first
    transaction)."""

    def __init__(self, path: str, allow_bad_header: bool = False):
        self.path = str(path)
        self.file = fileio.DataFile(self.path, read_only=True)
        self.size = self.file.size
        self.reader = LogReader(self.file)
        self.header: fmt.FileHeader | None = None
        self.header_error: CorruptedHeaderError | None = None
        try:
            self.header = fmt.decode_file_header(self.file.read(0, fmt.HEADER_SIZE), self.path)
        except CorruptedHeaderError as exc:
            if not allow_bad_header or self.size < fmt.HEADER_SIZE:
                self.file.close()
                raise
            self.header_error = exc
        except BaseException:
            self.file.close()
            raise
        self._end: int | None = None
        self._index: IndexBuild | None = None

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def file_id(self) -> bytes | None:
        return self.header.file_id if self.header else None

    def end(self) -> int:
        """The end of the last finished transaction: the file's end, or before a torn tail."""
        if self._end is None:
            try:
                th = self.reader.txn_ending_at(self.size, self.size)
                if th.status == fmt.STATUS_CHECKPOINT:
                    raise CorruptedError(self.path, "unfinished", th.pos)
                self._end = self.size
            except CorruptedError:
                self._end = self.build_index().end
        return self._end

    def build_index(self) -> IndexBuild:
        """The current oid index: the saved index file if it matches, then a scan of the rest.

        A scan reads only transaction headers, oid tables and trailers."""
        if self._index is None:
            index, start, last_tid = self._saved_index()
            result = scan(self.reader, start, self.size, index, last_tid=last_tid)
            if result.last_tid is not None:
                last_tid = result.last_tid
            self._index = IndexBuild(index, result.end, last_tid, result)
            self._end = result.end
        return self._index

    def _saved_index(self) -> tuple[OidIndex, int, bytes | None]:
        """The saved index if open would use it (`recovery.check_saved_index`), else a fresh one."""
        try:
            saved = check_saved_index(self.reader, self.path + ".index", self.file_id, self.size)
        except StorageIOError:
            saved = None
        if saved is None or saved.index is None:
            return OidIndex(), fmt.HEADER_SIZE, None
        return saved.index, saved.pos, saved.tid


class BatchedIndex:
    """An OidIndex fed through a dict: updates are merged in large batches.

    OidIndex.update costs about the same for 50 entries spread over 50 blocks
    as for thousands in them, so a walk updating it per transaction spends its
    time merging; this keeps the newest entries in a dict and merges them
    every `batch` entries, for the memory of an OidIndex at the speed of a dict."""

    def __init__(self, batch: int = 1 << 20):
        self.index = OidIndex()
        self.recent: dict[bytes, int] = {}
        self.batch = batch

    def get(self, oid: bytes, default=None):
        pos = self.recent.get(oid)
        if pos is None:
            return self.index.get(oid, default)
        return pos

    def __contains__(self, oid: bytes) -> bool:
        return oid in self.recent or oid in self.index

    def update(self, entries: dict[bytes, int]) -> None:
        self.recent.update(entries)
        if len(self.recent) >= self.batch:
            self.flush()

    def flush(self) -> OidIndex:
        if self.recent:
            self.index.update(self.recent)
            self.recent = {}
        return self.index

    def __len__(self) -> int:
        return len(self.flush())


_TABLE_ENTRY = struct.Struct(">8sQ")


class PyOidMap:
    """verify's oid -> position map for its walk: the Python twin of `_refscan.OidMap`.

    The same methods with the same answers (tests/test_verify_paths.py), kept in
    an OidIndex fed through a dict batch (BatchedIndex): a dict of more than
    `direct` entries goes to the OidIndex at once."""

    def __init__(self, batch: int = 1 << 18, direct: int = 1 << 16):
        self._index = BatchedIndex(batch)
        self._direct = direct

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, oid: object) -> bool:
        return type(oid) is bytes and len(oid) == 8 and oid in self._index

    def get(self, oid: bytes, default=None):
        """The position of `oid`, or `default`."""
        if type(oid) is not bytes or len(oid) != 8:
            return default
        return self._index.get(oid, default)

    def swap_table(self, table: bytes | bytearray) -> array:
        """Each oid-table entry's oid's position before the call (0 if absent), then set them."""
        if len(table) % 16:
            raise ValueError("an oid table is made of 16-byte entries")
        entries = list(_TABLE_ENTRY.iter_unpack(table))
        get = self._index.get
        before = array("Q", [get(oid, 0) for oid, _pos in entries])
        self.update(dict(entries))
        return before

    def update(self, entries: dict[bytes, int]) -> None:
        """Set every oid -> position of `entries` (ValueError, nothing changed, for a bad one)."""
        if not isinstance(entries, dict):
            raise TypeError("OidMap.update() needs a dict")
        for oid, pos in entries.items():
            if type(oid) is not bytes or len(oid) != 8:
                raise ValueError(f"an oid is 8 bytes, not {oid!r}")
            if not isinstance(pos, int) or not 0 < pos <= MAX_POS:
                raise ValueError(f"position {pos!r} is not in 1..2**48-1")
        if len(entries) >= self._direct:
            self._index.flush().update(entries)
        else:
            self._index.update(entries)

    def lookup(self, oids: bytes | bytearray) -> array:
        """The position of each 8-byte oid of `oids` (joined), 0 for an absent one."""
        get = self._index.get
        return array("Q", [get(bytes(oids[i:i + 8]), 0) for i in range(0, len(oids) - 7, 8)])

    def positions(self) -> array:
        """Every entry's position, in no particular order."""
        return array("Q", map(itemgetter(1), self._index.flush().items()))

    def table(self) -> bytes:
        """Every entry as an oid-table entry (oid, 8-byte big-endian position), oids ascending."""
        return b"".join([oid + pos.to_bytes(8, "big") for oid, pos in self._index.flush().items()])

    def same_as(self, index: OidIndex) -> bool:
        """Whether this map holds exactly the entries of `index`."""
        if len(index) != len(self):
            return False
        get = self._index.get
        return all(get(oid) == pos for oid, pos in index.items())

    def to_index(self) -> OidIndex:
        """An OidIndex of the entries (this map's own: do not change it)."""
        return self._index.flush()


def index_of_table(table: bytes | bytearray, chunk: int = 1 << 16) -> OidIndex:
    """An OidIndex of oid-table entries given in ascending oid order (as `OidMap.table()`),
    built `chunk` entries at a time."""
    index = OidIndex()
    step = 16 * chunk
    for i in range(0, len(table), step):
        index.update_table(table[i:i + step])
    return index


if _COidMap is not None:

    class OidMap(_COidMap):
        """verify's oid -> position map: `_refscan.OidMap` (a hash table in C), or PyOidMap."""

        def to_index(self) -> OidIndex:
            """An OidIndex of the entries."""
            return index_of_table(self.table())

else:  # pragma: no cover - depends on the build (the extension is optional)
    OidMap = PyOidMap  # type: ignore[assignment,misc]
