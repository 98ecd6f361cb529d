"""ZConfig: ``%import refstorage`` and the ``<refstorage>`` section."""

from __future__ import annotations

import io
import os

import pytest
import ZConfig
import ZODB.config
from ZODB.blob import Blob
from ZODB.interfaces import IBlobStorage

import refstorage
from refstorage.config import RefStorageConfig


def _db(text: str) -> ZODB.DB:
    return ZODB.config.databaseFromString("%import refstorage\n" + text)


def _zodb(**keys) -> str:
    """A <zodb> section holding a <refstorage> section with these keys (a_b -> a-b)."""
    lines = [f"{name.replace('_', '-')} {value}" for name, value in keys.items()]
    return "<zodb>\n<refstorage>\n" + "\n".join(lines) + "\n</refstorage>\n</zodb>\n"


def test_every_key(tmp_path):
    path = tmp_path / "Data.rfs"
    blobs = tmp_path / "blobs"
    db = _db(f"""
        <zodb main>
          cache-size 5000
          <refstorage>
            path {path}
            blob-dir {blobs}
            create true
            read-only false
            quota 2MB
            pack-gc false
            pack-keep-old false
          </refstorage>
        </zodb>
        """)
    try:
        st = db.storage
        assert isinstance(st, refstorage.FileStorage)
        assert st.getName() == str(path)
        assert st.blob_dir == str(blobs)
        assert IBlobStorage.providedBy(st)
        assert st._quota == 2 * 1024 * 1024
        assert st._pack_gc is False
        assert st._pack_keep_old is False
        assert not st.isReadOnly()
        assert db.database_name == "main"
        with db.transaction() as conn:
            conn.root()["b"] = Blob(b"configured")
    finally:
        db.close()
    # create true starts over; the defaults: read-write, gc on, old file kept, no blobs
    db = _db(_zodb(path=path, create="true"))
    try:
        st = db.storage
        assert st.blob_dir is None and not IBlobStorage.providedBy(st)
        assert st._quota is None and st._pack_gc is True and st._pack_keep_old is True
        with db.transaction() as conn:
            assert "b" not in conn.root()
    finally:
        db.close()


def test_read_only(tmp_path):
    path = tmp_path / "Data.rfs"
    db = _db(_zodb(path=path))
    with db.transaction() as conn:
        conn.root()["x"] = 1
    db.close()
    db = _db(_zodb(path=path, read_only="true"))
    try:
        assert db.storage.isReadOnly()
        with db.transaction() as conn:
            assert conn.root()["x"] == 1
    finally:
        db.close()


def test_storage_from_string_and_section_name(tmp_path):
    st = ZODB.config.storageFromString(
        f"%import refstorage\n<refstorage named>\npath {tmp_path / 'Data.rfs'}\n</refstorage>\n")
    try:
        assert isinstance(st, refstorage.FileStorage)
    finally:
        st.close()


def test_section_object(tmp_path):
    schema = ZConfig.loadSchemaFile(io.StringIO(SCHEMA))
    text = f"%import refstorage\n<refstorage one>\npath {tmp_path / 'Data.rfs'}\nquota 10KB\n</refstorage>\n"
    config, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
    section = config.storage
    assert isinstance(section, RefStorageConfig)
    assert section.name == "one"
    st = section.open()
    try:
        assert st._quota == 10 * 1024
    finally:
        st.close()


SCHEMA = """
<schema>
  <import package="ZODB"/>
  <section type="ZODB.storage" name="*" attribute="storage" required="yes"/>
</schema>
"""


def test_missing_path_key_and_missing_directory(tmp_path):
    with pytest.raises(ZConfig.ConfigurationError):
        _db(_zodb(quota="1MB"))
    with pytest.raises(ZConfig.ConfigurationError):
        _db(_zodb(path=tmp_path / "no" / "such" / "Data.rfs"))


def test_bad_value_is_refused(tmp_path):
    with pytest.raises(ZConfig.ConfigurationError):
        _db(_zodb(path=tmp_path / "Data.rfs", quota="lots"))


def test_zodburi_zconfig_scheme(tmp_path):
    import zodburi
    conf = tmp_path / "db.conf"
    conf.write_text(f"%import refstorage\n<zodb>\n<refstorage>\npath {tmp_path / 'Data.rfs'}\n"
                    f"blob-dir {tmp_path / 'blobs'}\n</refstorage>\n</zodb>\n")
    factory, dbkw = zodburi.resolve_uri(f"zconfig://{conf}")
    st = factory()
    try:
        assert isinstance(st, refstorage.FileStorage)
        assert st.blob_dir == os.path.join(str(tmp_path), "blobs")
    finally:
        st.close()


def test_component_is_package_data():
    import importlib.resources
    xml = importlib.resources.files("refstorage").joinpath("component.xml").read_text()
    assert 'implements="ZODB.storage"' in xml and 'sectiontype name="refstorage"' in xml
