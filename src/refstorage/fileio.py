"""The I/O layer: the only module of refstorage that touches the file system.

Everything goes through the module-level `ops` object, an instance of `Ops`.
Tests swap it (``with fileio.injected(MyOps()): ...``) to inject short writes,
ENOSPC, EIO, lost renames or a crash at a named point, without patching the
rest of the package.  `Ops.point(name)` is called at the named steps of a
commit, an index save and a pack; the real implementation does nothing there.

Errors from the operating system are turned into `StorageIOError`, naming the
file and the offset.  After a failed fsync a `DataFile` refuses further writes
(`StorageBrokenError`): the kernel may have dropped the dirty pages, so a later
sync that succeeds would pretend a durability that does not exist.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import mmap
import os
from collections.abc import Iterable, Iterator

from .errors import (
    FilePermissionError,
    PathIsDirectoryError,
    StorageBrokenError,
    StorageIOError,
)

__all__ = [
    "Ops",
    "ops",
    "injected",
    "DataFile",
    "atomic_write",
    "fsync_dir",
    "sync_path",
    "replace_durably",
    "link_durably",
    "read_whole",
    "save_side_file",
    "remove_if_exists",
    "point",
    "make_dirs",
    "same_file",
    "map_whole",
]


# Reads longer than this are first cut to what the file holds: os.pread allocates
# the whole length it is asked for before reading.
READ_CLAMP = 1 << 20


class Ops:
    """The operating-system calls refstorage makes; subclass to inject faults."""

    def open(self, path: str, flags: int, mode: int = 0o666) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pread(self, fd: int, n: int, pos: int) -> bytes:
        return os.pread(fd, n, pos)

    def pwrite(self, fd: int, data: bytes | memoryview, pos: int) -> int:
        return os.pwrite(fd, data, pos)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsize(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def point(self, name: str) -> None:
        """A named step (e.g. ``"commit.after-data-write"``); a hook for tests."""

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst)

    def map_read(self, fd: int, size: int) -> mmap.mmap:
        """A read-only shared mapping of the first `size` bytes (> 0) of `fd`, its pages
        mapped at once where the system can (MAP_POPULATE: no fault per page later)."""
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)


ops: Ops = Ops()


@contextlib.contextmanager
def injected(new_ops: Ops) -> Iterator[Ops]:
    """Use `new_ops` for all file I/O inside the block."""
    global ops
    old, ops = ops, new_ops
    try:
        yield new_ops
    finally:
        ops = old


def point(name: str) -> None:
    ops.point(name)


def _io_error(path: str, what: str, exc: OSError, offset: int | None = None) -> StorageIOError:
    if isinstance(exc, PermissionError):
        return FilePermissionError(path, f"{what} failed: permission denied", offset, exc.errno)
    return StorageIOError(path, f"{what} failed: {exc.strerror or exc}", offset, exc.errno)


def _dir_of(path: str) -> str:
    return os.path.dirname(os.path.abspath(path)) or "."


class DataFile:
    """An open storage file, read with positioned reads and written at its end.

    Positioned reads need no shared file offset, so loads run while a commit
    writes.  `size` is the logical end of the file as this process sees it.
    """

    def __init__(self, path: str, read_only: bool = False, create: bool = False):
        self.path = str(path)
        self.read_only = read_only
        self.broken: str | None = None
        if os.path.isdir(self.path):
            raise PathIsDirectoryError(self.path, "is a directory, not a storage file")
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create and not read_only:
            flags |= os.O_CREAT
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = ops.open(self.path, flags)
        except IsADirectoryError:
            raise PathIsDirectoryError(self.path, "is a directory, not a storage file") from None
        except OSError as exc:
            raise _io_error(self.path, "open", exc) from exc
        try:
            self.size = ops.fsize(self.fd)
        except OSError as exc:
            ops.close(self.fd)
            raise _io_error(self.path, "stat", exc) from exc

    # -- reading ---------------------------------------------------------------

    def read(self, pos: int, n: int) -> bytes:
        """Read up to `n` bytes at `pos`; fewer only at the end of the file."""
        try:
            if n > READ_CLAMP:  # a damaged length field must not make pread allocate n bytes
                n = max(0, min(n, ops.fsize(self.fd) - pos))
            data = ops.pread(self.fd, n, pos)
            if len(data) < n and data:
                parts = [data]
                got = len(data)
                while got < n:
                    more = ops.pread(self.fd, n - got, pos + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            return data
        except OSError as exc:
            raise _io_error(self.path, "read", exc, pos) from exc

    def read_chunks(self, pos: int, end: int, chunk: int = READ_CLAMP) -> Iterator[bytes]:
        """The bytes in [pos, end) as reads of at most `chunk` bytes (stops early at the end of the file)."""
        while pos < end:
            data = self.read(pos, min(chunk, end - pos))
            if not data:
                return
            yield data
            pos += len(data)

    def physical_size(self) -> int:
        try:
            return ops.fsize(self.fd)
        except OSError as exc:
            raise _io_error(self.path, "stat", exc) from exc

    # -- writing ---------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.broken:
            raise StorageBrokenError(self.path, self.broken)
        if self.read_only:
            raise StorageIOError(self.path, "file is open read-only")

    def write_at(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` at `pos`, looping over short writes."""
        self._check_writable()
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                n = ops.pwrite(self.fd, view[done:], pos + done)
                if n <= 0:
                    raise OSError(_errno.EIO, "write returned no progress")
                done += n
        except OSError as exc:
            raise _io_error(self.path, "write", exc, pos + done) from exc
        if pos + done > self.size:
            self.size = pos + done

    def mark_broken(self, reason: str) -> None:
        """Refuse every later write and truncate (StorageBrokenError naming `reason`)."""
        if not self.broken:
            self.broken = reason

    def sync(self) -> None:
        """fsync; on failure the file refuses all later writes."""
        self._check_writable()
        try:
            ops.fsync(self.fd)
        except OSError as exc:
            self.broken = f"an earlier fsync failed ({exc.strerror or exc}); reopen the storage"
            raise _io_error(self.path, "fsync", exc) from exc

    def truncate(self, size: int) -> None:
        """Cut the file back to `size` bytes (used to drop an aborted or torn tail)."""
        if self.broken:
            raise StorageBrokenError(self.path, self.broken)
        try:
            ops.ftruncate(self.fd, size)
        except OSError as exc:
            raise _io_error(self.path, "truncate", exc, size) from exc
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                ops.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        # A file nobody references any more closes itself: pack swaps in a new
        # file while loads and iterators may still read the old one, so the old
        # one is not closed explicitly.  close() clears fd first, so a file
        # closed explicitly is never closed twice.
        if getattr(self, "fd", -1) >= 0:
            try:
                self.close()
            except Exception:  # interpreter shutdown: nothing useful to do
                pass


def fsync_dir(dirpath: str) -> None:
    try:
        ops.fsync_dir(dirpath)
    except OSError as exc:
        raise _io_error(dirpath, "directory fsync", exc) from exc


def _open_read(path: str) -> int:
    """A read-only descriptor of `path` (StorageIOError naming it if it cannot be opened)."""
    try:
        return ops.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _io_error(path, "open", exc) from exc


def sync_path(path: str) -> None:
    """fsync the file at `path` (opened read-only for it)."""
    path = str(path)
    fd = _open_read(path)
    try:
        ops.fsync(fd)
    except OSError as exc:
        raise _io_error(path, "fsync", exc) from exc
    finally:
        try:
            ops.close(fd)
        except OSError:
            pass


def replace_durably(src: str, dst: str) -> None:
    """os.replace(src, dst), then fsync the directory so the rename survives."""
    try:
        ops.replace(src, dst)
    except OSError as exc:
        raise _io_error(dst, f"rename from {src}", exc) from exc
    fsync_dir(_dir_of(dst))


def link_durably(src: str, dst: str) -> None:
    """Give the file `src` the second name `dst` (a hard link), then fsync the directory.

    `dst` must not exist.  Pack uses it to keep the previous database as
    ``<name>.old`` while ``<name>`` is replaced, so the name never goes missing."""
    try:
        ops.link(str(src), str(dst))
    except OSError as exc:
        raise _io_error(str(dst), f"hard link to {src}", exc) from exc
    fsync_dir(_dir_of(str(dst)))


def atomic_write(path: str, chunks: Iterable[bytes], point_prefix: str = "") -> None:
    """Write a whole file so that `path` holds either the old or the new bytes.

    Temp file, fsync, os.replace, directory fsync.  `point_prefix` names the
    fault points reached on the way (``<prefix>.after-write`` etc.).
    """
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = ops.open(tmp, flags)
    except OSError as exc:
        raise _io_error(tmp, "create", exc) from exc
    ok = False
    try:
        pos = 0
        for chunk in chunks:
            view = memoryview(chunk)
            done = 0
            while done < len(view):
                try:
                    n = ops.pwrite(fd, view[done:], pos + done)
                except OSError as exc:
                    raise _io_error(tmp, "write", exc, pos + done) from exc
                if n <= 0:
                    raise StorageIOError(tmp, "write made no progress", pos + done)
                done += n
            pos += done
        if point_prefix:
            point(point_prefix + ".after-write")
        try:
            ops.fsync(fd)
        except OSError as exc:
            raise _io_error(tmp, "fsync", exc) from exc
        if point_prefix:
            point(point_prefix + ".after-fsync")
        ok = True
    finally:
        try:
            ops.close(fd)
        except OSError:
            pass
        if not ok:
            remove_if_exists(tmp)
    replace_durably(tmp, path)
    if point_prefix:
        point(point_prefix + ".after-replace")


def _read_fd(fd: int, limit: int | None) -> bytes:
    """An open file's bytes from its start, to its end or `limit`, 1 MiB a read."""
    parts = []
    pos = 0
    while limit is None or pos < limit:
        chunk = ops.pread(fd, 1 << 20 if limit is None else min(1 << 20, limit - pos), pos)
        if not chunk:
            break
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts)


def read_whole(path: str, limit: int | None = None) -> bytes:
    """The whole content of a (small) file, or its first `limit` bytes."""
    path = str(path)
    fd = _open_read(path)
    try:
        return _read_fd(fd, limit)
    except OSError as exc:
        raise _io_error(path, "read", exc) from exc
    finally:
        ops.close(fd)


def map_whole(path: str) -> mmap.mmap | bytes:
    """The whole content of a file, read-only: a memory map of it (no copy, no read),
    or its bytes where it cannot be mapped (empty, or a file system without mmap).

    For a file that is only ever replaced by rename (`atomic_write`), never
    changed in place: the map keeps showing the file that was opened, but
    truncating that very file meanwhile would make a later access fail (SIGBUS).
    The map closes when the last buffer taken from it is released."""
    path = str(path)
    fd = _open_read(path)
    try:
        size = ops.fsize(fd)
        if size > 0:
            try:
                return ops.map_read(fd, size)
            except (OSError, ValueError, OverflowError):
                pass  # read it instead
        return _read_fd(fd, None)
    except OSError as exc:
        raise _io_error(path, "read", exc) from exc
    finally:
        ops.close(fd)


def save_side_file(path: str, data: bytes | Iterable[bytes]) -> str:
    """Keep bytes removed from a torn tail in the first free ``<path>.tr<N>``.

    `data` is the bytes, or an iterable of chunks of them (streamed: a long
    tail is never held in memory whole)."""
    n = 0
    while os.path.exists(f"{path}.tr{n}"):
        n += 1
    side = f"{path}.tr{n}"
    atomic_write(side, [data] if isinstance(data, (bytes, bytearray, memoryview)) else data)
    return side


def remove_if_exists(path: str) -> None:
    try:
        ops.unlink(str(path))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _io_error(str(path), "remove", exc) from exc


def exists(path: str) -> bool:
    return os.path.exists(str(path))


def make_dirs(path: str) -> None:
    """Create the directory `path` and any missing parents (nothing if it exists)."""
    path = str(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise _io_error(path, "create directory", exc) from exc


def same_file(a: str, b: str) -> bool:
    """Do both paths exist and name the same file?"""
    try:
        return os.path.samefile(str(a), str(b))
    except OSError:
        return False
