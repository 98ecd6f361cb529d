"""ZConfig support: the datatype of the ``<refstorage>`` section.

``%import refstorage`` in a ZODB configuration (ZODB.config.databaseFromString
and friends, zodburi's ``zconfig://``) or in a ZEO server configuration
(runzeo) loads ``component.xml`` from this package, which declares the
``refstorage`` section type as an implementation of ``ZODB.storage``::

    %import refstorage

    <zodb>
      <refstorage>
        path /srv/app/Data.rfs
        blob-dir /srv/app/blobs
      </refstorage>
    </zodb>
"""

from __future__ import annotations

from ZODB.config import BaseConfig

from .storage import FileStorage

__all__ = ["RefStorageConfig", "OPTIONS"]

# the section's keys (ZConfig turns "read-only" into read_only) that are
# FileStorage keyword arguments
OPTIONS = ("create", "read_only", "quota", "pack_gc", "pack_keep_old", "blob_dir",
           "serve_valid_prefix")


class RefStorageConfig(BaseConfig):
    """A configured refstorage.FileStorage; `name` is the section's name."""

    def open(self, database_name: str = "unnamed", databases=None) -> FileStorage:
        config = self.config
        options = {}
        for name in OPTIONS:
            value = getattr(config, name, None)
            if value is not None:
                options[name] = value
        return FileStorage(config.path, **options)
