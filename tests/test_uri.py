"""zodburi: the ``refstorage:`` scheme (refstorage.uri)."""

from __future__ import annotations

import os
from importlib.metadata import entry_points

import pytest
import ZODB
import zodburi
from ZODB.blob import Blob

import refstorage
from refstorage.errors import RefStorageError, URIError
from refstorage.uri import parse, resolve


def test_entry_point_is_registered():
    eps = [ep for ep in entry_points(group="zodburi.resolvers") if ep.name == "refstorage"]
    assert len(eps) == 1
    assert eps[0].load() is resolve


def test_every_storage_option(tmp_path):
    path = tmp_path / "Data.rfs"
    uri = (f"refstorage://{path}?create=true&read_only=false&quota=5MB&pack_gc=off"
           f"&pack_keep_old=0&blob_dir={tmp_path / 'blobs'}")
    factory, dbkw = zodburi.resolve_uri(uri)
    st = factory()
    try:
        assert isinstance(st, refstorage.FileStorage)
        assert st.getName() == str(path)
        assert not st.isReadOnly()
        assert st._quota == 5 * 1024 * 1024
        assert st._pack_gc is False and st._pack_keep_old is False
        assert st.blob_dir == str(tmp_path / "blobs")
    finally:
        st.close()
    assert dbkw == {"cache_size": 10000, "pool_size": 7, "database_name": "unnamed"}  # zodburi's defaults


def test_parse_values():
    assert parse("refstorage:///srv/Data.rfs") == ("/srv/Data.rfs", {}, {})
    path, kw, others = parse("refstorage:///srv/Data.rfs?create=1&read_only=yes&pack_gc=true"
                             "&pack_keep_old=no&quota=1024&blob_dir=/srv/blobs/")
    assert kw == {"create": True, "read_only": True, "pack_gc": True, "pack_keep_old": False,
                  "quota": 1024, "blob_dir": "/srv/blobs"}
    assert parse("refstorage:///srv/Data.rfs?quota=2kb")[1] == {"quota": 2048}
    assert parse("refstorage:///srv/Data.rfs?quota=1GB")[1] == {"quota": 1 << 30}
    # an empty blob_dir means no blobs, as in ZConfig
    assert parse("refstorage:///srv/Data.rfs?blob_dir=")[1] == {}
    # relative paths, percent-escapes, no //
    assert parse("refstorage://var/Data.rfs")[0] == os.path.join("var", "Data.rfs")
    assert parse("refstorage:///srv/my%20app/Data.rfs")[0] == "/srv/my app/Data.rfs"
    assert parse("refstorage:/srv/Data.rfs")[0] == "/srv/Data.rfs"


def test_database_keywords_pass_through(tmp_path):
    uri = (f"refstorage://{tmp_path / 'Data.rfs'}?blob_dir={tmp_path / 'blobs'}"
           "&connection_cache_size=20000&connection_pool_size=3&database_name=main"
           "&connection_cache_size_bytes=1mb")
    factory, dbkw = zodburi.resolve_uri(uri)
    assert dbkw == {"cache_size": 20000, "pool_size": 3, "database_name": "main",
                    "cache_size_bytes": 1 << 20}
    db = ZODB.DB(factory(), **dbkw)
    try:
        assert db.getCacheSize() == 20000
        assert db.database_name == "main"
        with db.transaction() as conn:
            conn.root()["b"] = Blob(b"via uri")
        with db.transaction() as conn:
            with conn.root()["b"].open() as f:
                assert f.read() == b"via uri"
    finally:
        db.close()


def test_unknown_parameter_is_refused_by_zodburi(tmp_path):
    with pytest.raises(KeyError, match="no_such_option"):
        zodburi.resolve_uri(f"refstorage://{tmp_path / 'Data.rfs'}?no_such_option=1")


@pytest.mark.parametrize("uri", [
    "refstorage://",
    "refstorage:///srv/Data.rfs?create=maybe",
    "refstorage:///srv/Data.rfs?quota=lots",
    "file:///srv/Data.fs",
])
def test_bad_uris(uri):
    with pytest.raises(URIError) as info:
        resolve(uri)
    assert isinstance(info.value, RefStorageError) and isinstance(info.value, ValueError)


def test_factory_opens_lazily(tmp_path):
    path = tmp_path / "Data.rfs"
    factory, _ = resolve(f"refstorage://{path}")
    assert not path.exists()
    st = factory()
    st.close()
    assert path.exists()
    factory, _ = resolve(f"refstorage://{path}?read_only=1")
    st = factory()
    try:
        assert st.isReadOnly()
    finally:
        st.close()
