"""zodburi support: the ``refstorage:`` URI scheme.

Registered in the ``zodburi.resolvers`` entry point group, so
``zodburi.resolve_uri`` (and everything built on it: pyramid_zodbconn,
``refstorage convert``, ...) understands::

    refstorage:///srv/app/Data.rfs?blob_dir=/srv/app/blobs&connection_cache_size=20000

The path follows ``refstorage://`` (three slashes for an absolute path; a
relative path is relative to the working directory); percent-escapes in it
are decoded.  Storage options, as query parameters:

==============  =====================================================
create          boolean (1/0, true/false, yes/no, on/off)
read_only       boolean
quota           bytes, with an optional KB/MB/GB suffix
pack_gc         boolean
pack_keep_old   boolean
blob_dir        directory for blob files (enables blobs)
serve_valid_prefix  boolean: with read_only, serve a damaged file up to its damage
==============  =====================================================

Every other parameter is returned for ZODB.DB, as zodburi's own resolvers do
(``database_name``, ``connection_cache_size``, ``connection_pool_size``, ...;
zodburi converts them and refuses unknown ones).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import parse_qsl, unquote

from zodburi.datatypes import convert_bytesize, convert_int

from .errors import URIError
from .storage import FileStorage

__all__ = ["SCHEME", "resolve", "parse"]

SCHEME = "refstorage"

_BOOLEANS = ("create", "read_only", "pack_gc", "pack_keep_old", "serve_valid_prefix")


def parse(uri: str) -> tuple[str, dict, dict]:
    """(path, storage keyword arguments, the other parameters) of a refstorage URI."""
    prefix = SCHEME + ":"
    if not uri.startswith(prefix):
        raise URIError(f"not a {SCHEME}: URI: {uri!r}")
    rest = uri[len(prefix):]
    if rest.startswith("//"):
        rest = rest[2:]
    rest = rest.split("#", 1)[0]
    path, _, query = rest.partition("?")
    path = unquote(path)
    if not path:
        raise URIError(f"no file path in {uri!r} (use {SCHEME}:///absolute/path/Data.rfs)")
    storage_kw: dict = {}
    others: dict = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        try:
            if name in _BOOLEANS:
                storage_kw[name] = bool(convert_int(value))
            elif name == "quota":
                storage_kw[name] = convert_bytesize(value.strip())
            elif name == "blob_dir":
                if value:
                    storage_kw[name] = os.path.normpath(value)
            else:
                others[name] = value
        except ValueError:
            raise URIError(f"{uri!r}: invalid value {value!r} for {name}") from None
    return os.path.normpath(path), storage_kw, others


def resolve(uri: str) -> tuple[Callable[[], FileStorage], dict]:
    """The zodburi resolver: (a no-argument storage factory, the DB keyword arguments)."""
    path, storage_kw, dbkw = parse(uri)

    def factory() -> FileStorage:
        return FileStorage(path, **storage_kw)

    return factory, dbkw
