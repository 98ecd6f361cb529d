"""Databases shared by the tests of `refstorage inspect` (tests/test_webui*.py)."""

from __future__ import annotations

import json
import sys

import pytest
import transaction
from persistent.mapping import PersistentMapping

import refstorage
from refstorage import demo

EVIL_MODULE = "refstorage_evil_probe"
EVIL_OID = b"\0" * 7 + b"\x07"
MISSING_GLOBAL_OID = b"\0" * 7 + b"\x08"


_DEMO: tuple[str, dict] | None = None


def demo_database(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """(path, expectations) of the demo's library database, written once per test session."""
    global _DEMO
    if _DEMO is None:
        d = tmp_path_factory.mktemp("webui-demo")
        path = demo.write(str(d), log=lambda *a: None)
        with open(path + demo.EXPECTED_SUFFIX) as f:
            _DEMO = path, json.load(f)
    return _DEMO


def _global_pickle_bytes(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _dumps_meta(module: str, name: str) -> bytes:
    """pickle of (module.name, None), protocol 3, written by hand."""
    return b"\x80\x03" + _global_pickle_bytes(module, name) + b"q\x00N\x86q\x01."


def make_evil_db(path: str, marker: str, storage_class=None) -> None:
    """A database (refstorage, or `storage_class(path)`: ZODB's FileStorage) whose root references
    two records that would run code if loaded."""
    evil_state = (b"\x80\x03}q\x00(X\x07\x00\x00\x00payloadq\x01c" + EVIL_MODULE.encode() + b"\nrun\nq\x02"
                  b"X" + len(marker).to_bytes(4, "little") + marker.encode() + b"q\x03\x85q\x04Rq\x05"
                  b"X\x01\x00\x00\x00xq\x06]q\x07(K\x01K\x02eu.")
    evil = _dumps_meta(EVIL_MODULE, "Boom") + evil_state
    missing = _dumps_meta("no_such_module_xyz", "Nope") + b"\x80\x03cno_such_module_xyz\nfactory\n)R."
    storage = (storage_class or refstorage.FileStorage)(path)
    try:
        import ZODB
        db = ZODB.DB(storage)
        conn = db.open()
        root = conn.root()
        root["note"] = PersistentMapping({"hello": "world"})
        transaction.commit()
        conn.close()
        # raw records, written through the storage API (never unpickled here)
        from ZODB.Connection import TransactionMetaData
        t = TransactionMetaData(description="evil records")
        storage.tpc_begin(t)
        storage.store(EVIL_OID, b"\0" * 8, evil, "", t)
        storage.store(MISSING_GLOBAL_OID, b"\0" * 8, missing, "", t)
        # the root now references both (a persistent id (oid, None) each)
        root_data, root_tid = storage.load(b"\0" * 8)
        meta = _dumps_meta("persistent.mapping", "PersistentMapping")
        state = (b"\x80\x03}q\x00X\x04\x00\x00\x00dataq\x01}q\x02(X\x04\x00\x00\x00evilq\x03C\x08"
                 + EVIL_OID + b"q\x04N\x86q\x05Q"
                 + b"X\x07\x00\x00\x00missingq\x06C\x08" + MISSING_GLOBAL_OID + b"q\x07N\x86q\x08Q"
                 + b"us.")
        storage.store(b"\0" * 8, root_tid, meta + state, "", t)
        storage.tpc_vote(t)
        storage.tpc_finish(t)
        db.close()
    finally:
        storage.close()
    assert EVIL_MODULE not in sys.modules
