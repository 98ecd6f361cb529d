"""Helpers shared by the subcommands: opening storages, progress, output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from ..errors import RefStorageError


def open_storage(spec: str, read_only: bool, create: bool = False):
    """A storage named by a path (.rfs: refstorage, else ZODB FileStorage), a
    zodburi URI (scheme://...) or a ZConfig file (.conf/.cfg/.xml)."""
    if "://" in spec or spec.startswith(("file:", "refstorage:", "zeo:", "memory:")):
        import zodburi
        factory, _dbkw = zodburi.resolve_uri(spec)
        return factory()
    if spec.endswith((".conf", ".cfg", ".zcml", ".xml")) and os.path.isfile(spec):
        import ZODB.config
        return ZODB.config.storageFromFile(open(spec))
    if is_refstorage_path(spec, create):
        from ..storage import FileStorage
        return FileStorage(spec, read_only=read_only, create=create)
    from ZODB.FileStorage import FileStorage as ZFS
    return ZFS(spec, read_only=read_only, create=create)


def is_refstorage_path(path: str, create: bool = False) -> bool:
    from ..fileformat import MAGIC
    if os.path.exists(path) and os.path.getsize(path) > 0 and not create:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    return not path.endswith(".fs")


@contextmanager
def failing_cleanly() -> Iterator[None]:
    """Turn the package's errors into a one-line message and exit status 1."""
    try:
        yield
    except RefStorageError as exc:
        raise click.ClickException(str(exc)) from exc


def progress_bar(total: int | None, desc: str, unit: str = "txn"):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr, leave=False)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o):
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"cannot encode {type(o).__name__}")
