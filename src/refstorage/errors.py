"""The exception hierarchy of refstorage.

Every error the package raises on purpose derives from `RefStorageError`, which
derives from ZODB's `StorageError`, so code that catches ZODB storage errors
catches ours too.  Errors about a file carry `path` and, where it applies,
`offset`, and both appear in the message.
"""

from __future__ import annotations

from ZODB.POSException import ReadOnlyError, StorageError, StorageSystemError

__all__ = [
    "RefStorageError",
    "FileError",
    "PathIsDirectoryError",
    "EmptyFileError",
    "NotARefStorageFileError",
    "ForeignFormatError",
    "FutureVersionError",
    "CorruptedError",
    "CorruptedHeaderError",
    "CorruptedTransactionError",
    "CorruptedDataError",
    "IndexFileError",
    "ReferrerIndexError",
    "StorageIOError",
    "FilePermissionError",
    "MissingFileError",
    "StorageBrokenError",
    "QuotaError",
    "StorageLockedError",
    "FileSizeLimitError",
    "PackError",
    "BlobDirectoryError",
    "URIError",
    "ReplicationError",
    "HistoryDivergedError",
    "ReadOnlyError",
]


class RefStorageError(StorageError):
    """Base class of every error refstorage raises deliberately."""


class FileError(RefStorageError):
    """A problem with a named file, optionally at an offset in it."""

    def __init__(self, path: str, message: str, offset: int | None = None):
        self.path = str(path)
        self.offset = offset
        self.detail = message
        where = self.path if offset is None else f"{self.path} at offset {offset}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # keep the attributes across pickling (ZEO sends errors)
        return (type(self), (self.path, self.detail, self.offset))


class PathIsDirectoryError(FileError):
    """The path names a directory, not a storage file."""


class EmptyFileError(FileError):
    """The file exists but holds no bytes at all."""


class NotARefStorageFileError(FileError):
    """The file does not start with refstorage's magic."""


class ForeignFormatError(NotARefStorageFileError):
    """The file is another storage's format (ZODB's FileStorage, say)."""


class FutureVersionError(FileError):
    """The file was written by a newer format version than this code reads."""


class CorruptedError(FileError, StorageSystemError):
    """Bytes on disk fail a checksum or a structural check."""


class CorruptedHeaderError(CorruptedError):
    """The file's metadata header is damaged."""


class CorruptedTransactionError(CorruptedError):
    """A transaction record is damaged or cut short."""


class CorruptedDataError(CorruptedError):
    """A data record is damaged or cut short."""


class IndexFileError(FileError):
    """The saved index file cannot be used (it is rebuilt from the data file)."""


class ReferrerIndexError(FileError):
    """The referrer index file (`<name>.referrers`) cannot be used: it is a cache, rebuilt."""


class StorageIOError(FileError):
    """The operating system refused a read, write or sync."""

    def __init__(self, path: str, message: str, offset: int | None = None,
                 errno: int | None = None):
        self.errno = errno
        super().__init__(path, message, offset)

    def __reduce__(self):
        return (type(self), (self.path, self.detail, self.offset, self.errno))


class FilePermissionError(StorageIOError):
    """The operating system denied access to the file."""


class MissingFileError(FileError):
    """The file does not exist (and may not be created: read-only open)."""


class StorageBrokenError(FileError):
    """A sync failed earlier; the storage refuses writes until it is reopened.

    After a failed fsync the kernel may have dropped the dirty pages, so a retry
    that succeeds proves nothing.  Reopening re-reads what is really on disk.
    """


class QuotaError(FileError, StorageSystemError):
    """Writing the transaction would take the file past its quota."""


class FileSizeLimitError(FileError, StorageSystemError):
    """Writing the transaction would take the file past what the format can address."""


class StorageLockedError(FileError):
    """Another process holds the storage open for writing."""


class PackError(RefStorageError):
    """Pack cannot run (a pack is already running, or it failed)."""


class BlobDirectoryError(FileError):
    """The blob directory cannot be used (not a directory, not writable, another layout)."""


class URIError(RefStorageError, ValueError):
    """A refstorage: URI that cannot be understood (see refstorage.uri)."""


class ReplicationError(RefStorageError):
    """Replication cannot go on (source unreachable, replica unfit; see refstorage.replicate)."""


class HistoryDivergedError(ReplicationError, FileError):
    """The replica's history is not a prefix of the source's: `tid` is the first that differs."""

    def __init__(self, path: str, tid: bytes, message: str, offset: int | None = None):
        self.tid = tid
        FileError.__init__(self, path, f"history diverges from the source at transaction "
                                       f"{tid.hex()}: {message}", offset)
        self.detail = message

    def __reduce__(self):
        return (type(self), (self.path, self.tid, self.detail, self.offset))
