"""refstorage: a file-based, append-only, transactional ZODB storage.

Every data record stores the oids its pickle references, so pack, reference
checks and tools never unpickle anything.

    import ZODB, refstorage
    db = ZODB.DB(refstorage.FileStorage("Data.rfs"))
"""

from .storage import FileStorage

__all__ = ["FileStorage"]
