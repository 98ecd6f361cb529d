"""Helpers shared by the subcommands: one parser per concept, opening storages, errors, progress, output.

The vocabulary of the command lives here, so that every subcommand spells,
parses, validates and documents a concept the same way:

- a database file argument (`DatabaseFile`): must exist and be a file (a
  missing path is never created, except by ``serve --create``);
- a new file to write (`NewFile`) and a backup directory (`BackupDir`): their
  directory must exist and be writable;
- a point in time, ``WHEN`` (`WHEN`): a tid (16 hex digits, or 0x...) or an
  ISO 8601 time, UTC unless a zone is given; ``--days DAYS`` (`DAYS`) is a
  point in time too (now minus DAYS);
- an oid (`OID`) and a count (`COUNT`);
- ``-v/--verbose`` and ``-q/--quiet`` accepted before or after the subcommand.

Exit statuses (documented in ``refstorage --help``): 0 success; 1 a problem
found in the data, or the command could not run (a missing, unreadable or
foreign file, a destination that cannot be written, an unreachable server);
2 a bad command line (an unknown option, a malformed oid, time or count).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import click

from ..errors import RefStorageError, StorageLockedError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for a ZEO server (ZEO's own default is 30)."""


class CliError(click.ClickException):
    """A one-line error about an input or the data; exit status 1."""

    exit_code = EXIT_PROBLEM


# -- points in time -----------------------------------------------------------------------

@dataclass(frozen=True)
class Moment:
    """A point in time given on the command line, as both a tid and seconds since the epoch."""

    tid: bytes
    time: float
    text: str


def _moment_from_time(t: float, text: str) -> Moment:
    from ..tools import common
    try:
        tid = common.tid_for_time(t)
        back = common.tid_time(tid)
    except (common.ToolError, ValueError, OverflowError, OSError):
        back = None
    # a tid holds the minutes since 1900 in 32 bits: past about 9900 it wraps
    if back is None or abs(back - t) > 61 or t < -2208988800:
        raise ValueError(f"{text!r} is outside the times a tid can hold (1900 to 9000)")
    return Moment(tid, t, text)


def parse_when(text: str) -> Moment:
    """A tid (16 hex digits, or 0x...) or an ISO 8601 time (UTC unless a zone is given)."""
    from ..fileformat import p64
    from ..tools import common
    s = text.strip()
    hexdigits = s[2:] if s[:2].lower() == "0x" else s
    if s[:2].lower() == "0x" or (len(s) == 16 and all(c in "0123456789abcdefABCDEF" for c in s)):
        try:
            n = int(hexdigits, 16)
        except ValueError:
            n = -1
        if not 0 <= n < 1 << 64:
            raise ValueError(f"{text!r} is not a tid (16 hex digits, or 0x followed by hex digits)")
        tid = p64(n)
        return Moment(tid, common.tid_time(tid), text)
    try:
        t = common.parse_time(s)
    except common.ToolError:
        raise ValueError(f"{text!r} is neither a time (ISO 8601: 2024-05-01 or 2024-05-01T12:30:00, "
                         "UTC unless a zone such as +02:00 is given) nor a tid (16 hex digits)") from None
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is not a valid time") from None
    return _moment_from_time(t, text)


def moment_for_days(days: float, now: float | None = None) -> Moment:
    """The point in time `days` days before now."""
    if not math.isfinite(days) or days < 0:
        raise ValueError(f"{days!r} is not a number of days (give a number >= 0, such as 7 or 0.5)")
    t = (time.time() if now is None else now) - days * 86400
    try:
        return _moment_from_time(t, f"{days:g} days ago")
    except ValueError:
        raise ValueError(f"{days:g} days ago is before 1900, the earliest time a tid can hold") from None


class WhenType(click.ParamType):
    name = "WHEN"

    def convert(self, value, param, ctx):
        if isinstance(value, Moment):
            return value
        try:
            return parse_when(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class DaysType(click.ParamType):
    name = "DAYS"

    def convert(self, value, param, ctx):
        if isinstance(value, Moment):
            return value
        try:
            days = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of days (such as 7 or 0.5)", param, ctx)
        try:
            return moment_for_days(days)
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


class OidType(click.ParamType):
    name = "OID"

    def convert(self, value, param, ctx):
        if isinstance(value, bytes):
            return value
        from ..tools import common
        try:
            return common.parse_oid(str(value))
        except (common.ToolError, IndexError) as exc:
            self.fail(str(exc) if isinstance(exc, common.ToolError) else f"{value!r} is not an oid",
                      param, ctx)


WHEN = WhenType()
DAYS = DaysType()
OID = OidType()
COUNT = click.IntRange(min=1)
WHEN_HELP = "a tid (16 hex digits) or an ISO 8601 time such as 2024-05-01T12:30, UTC unless a zone is given"


def one_moment(**options: Moment | None) -> Moment | None:
    """The one point in time given among `options` (name -> value); a usage error if several."""
    given = [(name, value) for name, value in options.items() if value is not None]
    if len(given) > 1:
        names = " and ".join("--" + name.replace("_", "-") for name, _ in given)
        raise click.UsageError(f"{names} name the same point in time: give only one")
    return given[0][1] if given else None


# -- files --------------------------------------------------------------------------------

def check_existing_file(path: str) -> None:
    """A one-line error (exit 1) unless `path` is an existing file."""
    if not os.path.lexists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory, not a database file")
    if not os.path.exists(path):
        raise CliError(f"{path}: a dangling symbolic link")


def check_database(path: str) -> None:
    """A one-line error (exit 1) unless `path` is a refstorage file with a sound header."""
    check_existing_file(path)
    from ..tools.common import Log
    with failing_cleanly(path):
        Log(path).close()


def check_new_file(path: str) -> None:
    """A one-line error (exit 1) unless a file can be created at `path` (it may exist already)."""
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory; give the name of the file to write")
    parent = os.path.dirname(os.path.abspath(path))
    _check_parent(path, parent)


def _check_parent(path: str, parent: str) -> None:
    if not os.path.exists(parent):
        raise CliError(f"{path}: the directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise CliError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{path}: cannot write in {parent} (permission denied)")


class DatabaseFile(click.ParamType):
    """An existing refstorage file.  `header=False` leaves the header to the command (recover)."""

    name = "PATH"

    def __init__(self, header: bool = True):
        self.header = header

    def convert(self, value, param, ctx):
        path = os.fspath(value)
        if self.header:
            check_database(path)
        else:
            check_existing_file(path)
        return path


class NewFile(click.ParamType):
    """A file to write: its directory must exist and be writable."""

    name = "PATH"

    def convert(self, value, param, ctx):
        path = os.fspath(value)
        check_new_file(path)
        return path


class BackupDir(click.ParamType):
    """A backup directory: it must exist (`exists`), or else its parent must."""

    name = "DIRECTORY"

    def __init__(self, exists: bool):
        self.exists = exists

    def convert(self, value, param, ctx):
        path = os.fspath(value)
        if os.path.isdir(path):
            if not self.exists and not os.access(path, os.W_OK | os.X_OK):
                raise CliError(f"{path}: cannot write in this directory (permission denied)")
            return path
        if os.path.exists(path):
            raise CliError(f"{path}: not a directory")
        if self.exists:
            raise CliError(f"{path}: no such directory")
        _check_parent(path, os.path.dirname(os.path.abspath(path)))
        return path


DATABASE = DatabaseFile()
NEW_FILE = NewFile()


# -- storages named by a path, a URI or a configuration file --------------------------------

def is_uri(spec: str) -> bool:
    return "://" in spec or spec.startswith(("file:", "refstorage:", "zeo:", "memory:"))


def is_config(spec: str) -> bool:
    return spec.endswith((".conf", ".cfg", ".zcml", ".xml"))


def open_storage(spec: str, read_only: bool, create: bool = False, timeout: float | None = None,
                 blob_dir: str | None = None):
    """A storage named by a path (.rfs: refstorage, else ZODB FileStorage), a
    zodburi URI (scheme://...) or a ZConfig file (.conf/.cfg/.xml).

    `timeout` bounds the wait for a ZEO server (zeo:// URIs without their own
    wait_timeout); every failure is a `CliError` naming `spec`."""
    with failing_cleanly(spec):
        if is_uri(spec):
            import zodburi
            uri = spec
            if spec.startswith("zeo:") and timeout is not None and "wait_timeout" not in spec:
                seconds = max(1, math.ceil(timeout))
                uri += ("&" if "?" in spec else "?") + f"wait_timeout={seconds}"
            if read_only and spec.startswith(("file:", "refstorage:")) and "read_only" not in spec:
                # a source: never create a database at a mistyped path
                uri += ("&" if "?" in spec else "?") + "read_only=1"
            try:
                factory, _dbkw = zodburi.resolve_uri(uri)
            except (KeyError, ValueError) as exc:
                raise CliError(f"{spec}: {exc.args[0] if exc.args else exc}") from None
            try:
                return factory()
            except Exception as exc:
                if type(exc).__name__ == "ClientDisconnected":
                    raise CliError(f"{spec}: cannot reach the server (waited {timeout or 30:g} s)") from None
                raise
        if is_config(spec):
            check_existing_file(spec)
            import ZConfig
            import ZODB.config
            with open(spec) as f:
                config, _handler = ZConfig.loadConfigFile(ZODB.config.getStorageSchema(), f)
            section = getattr(config.storage, "config", None)
            if read_only and section is not None and hasattr(section, "read_only"):
                section.read_only = True  # a source: never create a database at a mistyped path
            return config.storage.open()
        if is_refstorage_path(spec, create):
            from ..storage import FileStorage
            return FileStorage(spec, read_only=read_only, create=create, blob_dir=blob_dir)
        from ZODB.FileStorage import FileStorage as ZFS
        return ZFS(spec, read_only=read_only, create=create, blob_dir=blob_dir)


def is_refstorage_path(path: str, create: bool = False) -> bool:
    from ..fileformat import MAGIC
    if os.path.exists(path) and os.path.getsize(path) > 0 and not create:
        from .. import fileio
        return fileio.read_whole(path, len(MAGIC)) == MAGIC
    return not path.endswith(".fs")


# -- errors ---------------------------------------------------------------------------------

# Python API advice in the storage's messages, and what to say on the command line instead
_API_ADVICE = [
    ("(open read_only=True to read without it)",
     "(the read-only subcommands, such as verify, info and dump, do not need it)"),
    ("open it read_only=True beside it, or stop that process", "stop that process first"),
]


def describe(exc: BaseException, subject: str | None = None, locked_hint: str | None = None) -> str:
    """One line for an error: names the file (or `subject`) and the cause.

    `locked_hint` says what to run instead when the file is open for writing
    by another process."""
    if isinstance(exc, StorageLockedError):
        import re
        holder = re.search(r"\((.*?)\)", exc.detail)
        by = f" ({holder.group(1)})" if holder else ""
        return (f"{exc.path} is open for writing by another process{by}: stop that process first"
                + (f", {locked_hint}" if locked_hint else ""))
    if isinstance(exc, RefStorageError):
        msg = str(exc)
        for api, cli in _API_ADVICE:
            msg = msg.replace(api, cli)
    elif isinstance(exc, OSError):
        name = exc.filename or subject
        cause = exc.strerror or str(exc)
        msg = f"{name}: {cause}" if name else cause
        if exc.filename2:
            msg += f" ({exc.filename2})"
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = text if type(exc).__name__ in text else f"{text} ({type(exc).__name__})"
    if subject and str(subject) not in msg:
        msg = f"{subject}: {msg}"
    return msg


@contextmanager
def failing_cleanly(subject: str | None = None, locked_hint: str | None = None) -> Iterator[None]:
    """Turn errors about files, storages and configurations into a one-line message and exit status 1.

    `subject` (a path, URI or configuration file) is named in the message if
    the error does not name it already; `locked_hint`: see `describe`."""
    from ZODB.POSException import POSError
    try:
        yield
    except (click.ClickException, BrokenPipeError):
        raise
    except (RefStorageError, POSError, OSError) as exc:
        raise CliError(describe(exc, subject, locked_hint)) from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("ZConfig", "zodburi", "ZEO"):
            raise CliError(describe(exc, subject, locked_hint)) from exc
        raise


# -- options shared by every subcommand -------------------------------------------------------

QUIET_KEY = "refstorage.quiet"
VERBOSE_KEY = "refstorage.verbose"


def _set_verbose(ctx: click.Context, _param, value: int) -> None:
    if not value:
        return
    total = ctx.meta.get(VERBOSE_KEY, 0) + value
    ctx.meta[VERBOSE_KEY] = total
    level = logging.WARNING - 10 * min(total, 2)
    logging.getLogger().setLevel(level)


def _set_quiet(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.meta[QUIET_KEY] = True


def shared_params() -> list[click.Parameter]:
    """-v and -q, accepted after the subcommand as well as before it."""
    return [
        click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_set_verbose,
                     help="Log more (repeat for debug output and tracebacks)."),
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_quiet,
                     help="No progress bar."),
    ]


def verbosity() -> int:
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(VERBOSE_KEY, 0) if ctx is not None else 0


# -- progress and output ---------------------------------------------------------------------

def quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(QUIET_KEY))


def progress_bar(total: int | None, desc: str, unit: str = "txn"):
    """A progress bar on stderr, shown only on a terminal and not with --quiet.

    unit "B" shows bytes scaled (kB, MB) with a rate in MB/s; other units are counts."""
    from tqdm import tqdm
    scaled = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, disable=True if quiet() else None, file=sys.stderr,
                leave=False, unit_scale=scaled, unit_divisor=1000 if scaled else 1000,
                dynamic_ncols=True)


class PhasedProgress:
    """The progress display the tools report to: progress(n) and phase(label, total, unit).

    Starts as a bar over bytes labelled `label` (if `total` is given, or at
    the first progress call); each phase replaces the bar with one of its own
    label, total and unit, so no phase sits at 100% under the previous label."""

    def __init__(self, label: str, total: int | None, unit: str = "B"):
        self._next = (label, total, unit)
        self._bar = None

    def _open(self) -> None:
        label, total, unit = self._next
        self._bar = progress_bar(total, label, unit)

    def phase(self, label: str, total: int | None, unit: str = "B") -> None:
        self.close()
        self._next = (label, total, unit)
        self._open()

    def __call__(self, n: int) -> None:
        if self._bar is None:
            self._open()
        if n > self._bar.n:
            self._bar.update(n - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def byte_progress(total: int | None, desc: str) -> Iterator[PhasedProgress]:
    """A progress display over bytes (the first phase); yields the callable the tools take."""
    progress = PhasedProgress(desc, total, "B")
    if total:
        progress(0)
    try:
        yield progress
    finally:
        progress.close()


@contextmanager
def phased_progress(labels: dict[str, tuple[str, str]]) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar for work in phases; yields progress(phase, done, total).

    `labels` maps each phase to (label, unit); a new phase restarts the bar
    with its own label, unit and total, so no phase sits at 100% unlabelled."""
    state: dict = {"bar": None, "phase": None}

    def progress(phase: str, done: int, total: int) -> None:
        bar = state["bar"]
        if phase != state["phase"]:
            if bar is not None:
                bar.close()
            label, unit = labels.get(phase, (phase, ""))
            bar = state["bar"] = progress_bar(total or None, label, unit or "it")
            state["phase"] = phase
        if total and bar.total != total:
            bar.total = total
        if done > bar.n:
            bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if state["bar"] is not None:
            state["bar"].close()


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o):
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"cannot encode {type(o).__name__}")


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 record', '2,051 records'."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def size_repr(n: int) -> str:
    """'1,234,567 bytes (1.2 MB)'; small sizes without the unit in parentheses."""
    if n < 10_000:
        return plural(n, "byte")
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n:,} bytes ({n / scale:.1f} {unit})"
    return plural(n, "byte")
