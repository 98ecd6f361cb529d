"""ZEO's own server test suite (ZEO.tests.testZEO), served by refstorage.

Every FileStorage-backed class of ``ZEO/tests/testZEO.py`` is subclassed here
with a ``<refstorage>`` configuration in place of ``<filestorage>`` (or of
``<blobstorage><filestorage>``) and is otherwise unchanged: ZEO's forker
starts a real ZEO server (a subprocess) over refstorage for each test, and the
test talks to it through ClientStorage.  ZEO's ``test_suite()`` loads both the
``check*`` and the ``test*`` methods of these classes; pytest collects only
``test*`` methods, so each ``checkX`` is also exposed as ``test_checkX``.

The whole set (about 660 tests) takes minutes, so the default run keeps a fast
subset (FAST below).  ``.ci/run`` runs the whole set (REFSTORAGE_ZEO_SUITE=full),
as does ``pytest --long``; it includes the four BasicStorage race tests that
need several clients of one storage (test_race_load_vs_external_invalidate and
test_race_external_invalidate_vs_disconnect, plain and through HexStorage),
skipped in tests/test_conformance.py, which has no server.
"""

from __future__ import annotations

import functools
import os
import unittest

import pytest

pytest.importorskip("zope.testing")

from ZEO.tests import testZEO  # noqa: E402

FULL_ENV = "REFSTORAGE_ZEO_SUITE"
FULL = os.environ.get(FULL_ENV) == "full" or os.environ.get("REFSTORAGE_TEST_LONG") == "1"  # --long

REFSTORAGE = """\
%import refstorage
<refstorage 1>
  path {path}
  {extra}
</refstorage>
"""


def _refstorage(path: str = "Data.fs", blob_dir: str | None = None) -> str:
    return REFSTORAGE.format(path=path, extra=f"blob-dir {blob_dir}" if blob_dir else "")


def _hex(section: str) -> str:
    return f"%import ZODB.tests\n{_refstorage()}".replace(
        "<refstorage 1>", f"<{section}>\n<refstorage 1>").replace(
        "</refstorage>", f"</refstorage>\n</{section}>")


# The fast subset (default run), per ZEO class: test names as exposed to
# pytest.  The interfaces the server reports (FileStorage's providedBy order),
# undo errors that must reach clients as UndoError (MultipleUndoErrors), the
# BasicStorage race test of several clients (the plain and hex ones: its
# sibling test_race_external_invalidate_vs_disconnect takes 20 s, so it runs
# in the full set only), and one of each kind: commits, iteration, pack, blobs,
# recovery, TLS.
FAST = {
    "FileStorageTests": {"test_checkInterfaceFromRemoteStorage", "testTwoObjectUndoAgain", "testNotUndoable",
                         "testUndoUnresolvable", "test_race_load_vs_external_invalidate",
                         "testSimpleIteration", "testPackAllRevisions"},
    "FileStorageSSLTests": {"testUndoUnresolvable"},
    "FileStorageHexTests": {"test_checkInterfaceFromRemoteStorage", "test_race_load_vs_external_invalidate"},
    "FileStorageClientHexTests": {"testUndoConflictResolution"},
    "FileStorageRecoveryTests": {"testRestoreAcrossPack"},
    "BlobAdaptedFileStorageTests": {"test_checkStoreBlob"},
    "BlobWritableCacheTests": {"test_checkLoadBlob"},
}


def _zeo_test_names(cls: type) -> list[str]:
    """The test methods ZEO's test_suite() runs for cls (prefixes check and test)."""
    names = []
    for prefix in ("check", "test"):
        loader = unittest.TestLoader()
        loader.testMethodPrefix = prefix
        names.extend(loader.getTestCaseNames(cls))
    return names


def _skip(func, reason: str):
    # unittest.skip marks the method itself, so that neither unittest nor pytest
    # runs setUp (which starts a ZEO server) for it
    @functools.wraps(func)
    def skipped(self):
        return func(self)
    return unittest.skip(reason)(skipped)


def _served_by_refstorage(base: type, get_config) -> type:
    """A subclass of ZEO's test class `base` whose server serves refstorage."""
    ns: dict = {"getConfig": get_config, "__module__": __name__,
                "__doc__": f"ZEO.tests.testZEO.{base.__name__}, served by refstorage."}
    cls = type("RefStorage" + base.__name__, (base,), ns)
    for name in _zeo_test_names(cls):
        exposed = name if name.startswith("test") else "test_" + name
        func = getattr(cls, name)
        if not FULL and exposed not in FAST[base.__name__]:
            func = _skip(func, f"full ZEO suite: set {FULL_ENV}=full (as .ci/run does) or use --long")
        if exposed != name or func is not getattr(cls, name):
            setattr(cls, exposed, func)
    return cls


RefStorageFileStorageTests = _served_by_refstorage(
    testZEO.FileStorageTests, lambda self: _refstorage())
RefStorageFileStorageSSLTests = _served_by_refstorage(
    testZEO.FileStorageSSLTests, lambda self: _refstorage())
RefStorageFileStorageHexTests = _served_by_refstorage(
    testZEO.FileStorageHexTests, lambda self: _hex("hexstorage"))
RefStorageFileStorageClientHexTests = _served_by_refstorage(
    testZEO.FileStorageClientHexTests, lambda self: _hex("serverhexstorage"))
RefStorageFileStorageRecoveryTests = _served_by_refstorage(
    testZEO.FileStorageRecoveryTests,
    lambda self: _refstorage(os.path.abspath(f"Data-{os.urandom(6).hex()}.rfs")))
RefStorageBlobAdaptedFileStorageTests = _served_by_refstorage(
    testZEO.BlobAdaptedFileStorageTests, lambda self: _refstorage(blob_dir="blobs"))
RefStorageBlobWritableCacheTests = _served_by_refstorage(
    testZEO.BlobWritableCacheTests, lambda self: _refstorage(blob_dir="blobs"))

ALL_CLASSES = [RefStorageFileStorageTests, RefStorageFileStorageSSLTests, RefStorageFileStorageHexTests,
               RefStorageFileStorageClientHexTests, RefStorageFileStorageRecoveryTests,
               RefStorageBlobAdaptedFileStorageTests, RefStorageBlobWritableCacheTests]


def test_every_zeo_test_is_exposed_to_pytest():
    """Each check*/test* method ZEO's test_suite() loads is collected here."""
    total = 0
    for cls in ALL_CLASSES:
        names = _zeo_test_names(cls.__mro__[1])
        total += len(names)
        collected = set(unittest.TestLoader().getTestCaseNames(cls))
        for name in names:
            assert (name if name.startswith("test") else "test_" + name) in collected, (cls, name)
    assert total > 600
    for cls in ALL_CLASSES:
        missing = FAST[cls.__mro__[1].__name__] - set(unittest.TestLoader().getTestCaseNames(cls))
        assert not missing, f"FAST names no test of {cls.__name__}: {missing}"


def _interfaces(storage) -> list[tuple[str, str]]:
    import zope.interface
    return [(i.__module__, i.__name__) for i in zope.interface.providedBy(storage)]


@pytest.mark.parametrize("blobs", [False, True], ids=["plain", "blobs"])
def test_interfaces_in_filestorage_s_order(tmp_path, blobs):
    # ZEO servers send this list, in this order, to their clients
    import ZODB.FileStorage

    import refstorage
    kw = {"blob_dir": str(tmp_path / "fs-blobs")} if blobs else {}
    fs = ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"), **kw)
    kw = {"blob_dir": str(tmp_path / "rfs-blobs")} if blobs else {}
    rs = refstorage.FileStorage(str(tmp_path / "Data.rfs"), **kw)
    try:
        assert _interfaces(rs) == _interfaces(fs)
    finally:
        fs.close()
        rs.close()


def test_an_undo_that_cannot_be_done_raises_multiple_undo_errors(tmp_path):
    # ZEO's client rebuilds MultipleUndoErrors (an UndoError) from the server's
    # answer; any other class would reach ZEO clients as ServerException
    import transaction
    import ZODB
    from ZODB.POSException import MultipleUndoErrors, UndoError

    import refstorage
    db = ZODB.DB(refstorage.FileStorage(str(tmp_path / "Data.rfs")))
    try:
        with db.transaction() as conn:
            conn.root()["a"] = 1
        with db.transaction() as conn:
            conn.root()["a"] = 2
        with db.transaction() as conn:
            conn.root()["a"] = 3
        middle = db.undoLog(0, 2)[1]["id"]
        db.undo(middle)
        with pytest.raises(MultipleUndoErrors) as info:
            transaction.commit()
        transaction.abort()
        assert isinstance(info.value, UndoError)
        (oid, reason), = info.value._errs
        assert oid == b"\0" * 8 and "modified by a later transaction" in reason
        assert "Undo error 0x00: Some data were modified" in str(info.value)
    finally:
        db.close()
