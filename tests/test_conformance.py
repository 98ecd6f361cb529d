"""ZODB's own storage conformance suites, run against refstorage.FileStorage.

The mixins come from ``ZODB.tests`` and are wired the way ZODB's
``tests/testFileStorage.py`` wires them for its FileStorage: one class for the
storage itself and one for the storage wrapped in ``ZODB.tests.hexstorage``'s
HexStorage (a record-transforming IStorageWrapper).  Their test methods are
named ``test*`` and the classes are unittest.TestCase subclasses, so pytest
collects them without extra configuration.

Tests that need a feature not built yet are listed in NEEDS_UNDO /
NEEDS_PACK below (found by reading the mixins) and are marked
``xfail(strict=True)``: they must fail for now, and an unexpected pass fails
the run.  Remove names from the lists as the features land.

RecoveryStorage (copyTransactionsFrom and restore) runs in three directions:
refstorage to refstorage, ZODB's FileStorage to refstorage, and refstorage to
ZODB's FileStorage, each also through HexStorage.
"""

import functools

import pytest

try:
    import zope.testing  # noqa: F401  (ZODB.tests.util needs it)
except ImportError as exc:  # pragma: no cover - a setup problem, not a test failure
    raise ImportError(
        "ZODB's conformance mixins import zope.testing, which ZODB does not install; "
        "add 'zope.testing' to the [test] extra in pyproject.toml"
    ) from exc

from ZODB.tests import (
    BasicStorage,
    ConflictResolution,
    HistoryStorage,
    IteratorStorage,
    MTStorage,
    PackableStorage,
    PersistentStorage,
    ReadOnlyStorage,
    RecoveryStorage,
    RevisionStorage,
    StorageTestBase,
    Synchronization,
    TransactionalUndoStorage,
)
from ZODB.tests.hexstorage import HexStorage

import refstorage

UNDO_REASON = "needs undo (issue 3)"
PACK_REASON = "needs pack (issue 4)"

# Tests that need undo (issue 3): all pass now.
NEEDS_UNDO: list[str] = []

# Tests that need pack (issue 4): all pass now.
NEEDS_PACK: list[str] = []


def _mark_pending_features(cls):
    """Override each listed test in `cls` with an xfail(strict=True) wrapper.

    The mixin functions themselves stay untouched.  A test in both lists is
    expected to fail until both features exist.
    """
    for name in sorted(set(NEEDS_UNDO) | set(NEEDS_PACK)):
        inherited = getattr(cls, name, None)
        if inherited is None:
            raise AttributeError(f"{cls.__name__} has no test {name!r}; fix NEEDS_UNDO/NEEDS_PACK")
        reasons = [reason for reason, names in ((UNDO_REASON, NEEDS_UNDO), (PACK_REASON, NEEDS_PACK))
                   if name in names]
        setattr(cls, name, pytest.mark.xfail(reason=" and ".join(reasons), strict=True)(_wrap(inherited)))
    return cls


def _wrap(func):
    @functools.wraps(func)
    def wrapper(self, *args, **kwargs):  # some tests call others with arguments
        return func(self, *args, **kwargs)

    return wrapper


@_mark_pending_features
class RefStorageTests(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    RevisionStorage.RevisionStorage,
    PackableStorage.PackableStorageWithOptionalGC,
    PackableStorage.PackableUndoStorage,
    Synchronization.SynchronizedStorage,
    ConflictResolution.ConflictResolvingStorage,
    ConflictResolution.ConflictResolvingTransUndoStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
    IteratorStorage.ExtendedIteratorStorage,
    PersistentStorage.PersistentStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
):
    """refstorage.FileStorage under ZODB's storage conformance suites."""

    file_name = "RefStorageTests.rfs"

    # Like ZODB's FileStorage we keep the transaction extension as the bytes
    # TransactionMetaData serialized, and the iterator hands them back as is.
    use_extension_bytes = True

    def open(self, **kwargs):
        self._storage = refstorage.FileStorage(self.file_name, **kwargs)

    def setUp(self):
        # StorageTestBase.setUp chdirs into a fresh temporary directory.
        StorageTestBase.StorageTestBase.setUp(self)
        self.open(create=True)

    def _new_storage_client(self):
        # BasicStorage's race tests test_race_load_vs_external_invalidate and
        # test_race_external_invalidate_vs_disconnect need several *clients of
        # one storage*, each committing and receiving the others'
        # invalidations: that is a storage server (ZEO, NEO, RelStorage).  A
        # second FileStorage on the same file is not one (read-only, it
        # neither commits nor sees later commits), so, like ZODB's own
        # FileStorage tests, we don't run them here: tests/test_zeo_suite.py
        # runs them (plain and through HexStorage) against a real ZEO server
        # over refstorage.  test_race_loadopen_vs_local_invalidate needs no
        # second client and does run.
        self.skipTest("needs several clients of one storage server (run through ZEO in test_zeo_suite.py); "
                      "refstorage.FileStorage is an embedded, single-process storage")


class RefStorageHexTests(RefStorageTests):
    """The same suites through HexStorage, which transforms every record.

    It checks that the storage works under an IStorageWrapper: the records it
    is given are not plain pickles (HexStorage stores b".h" + hex(pickle) and
    registers itself with the storage as its DB, offering
    transform_record_data/untransform_record_data).
    """

    testInterfaces = BasicStorage.BasicStorage.testInterfaces

    def open(self, **kwargs):
        self._storage = HexStorage(refstorage.FileStorage(self.file_name, **kwargs))


RECOVERY_NEEDS_PACK: list[str] = []


def _mark_recovery(cls):
    for name in RECOVERY_NEEDS_PACK:
        setattr(cls, name, pytest.mark.xfail(reason=PACK_REASON, strict=True)(_wrap(getattr(cls, name))))
    return cls


def _zodb_fs(name):
    from ZODB.FileStorage import FileStorage
    return FileStorage(name, create=True)


def _rfs(name):
    return refstorage.FileStorage(name, create=True)


class _Recovery(StorageTestBase.StorageTestBase, RecoveryStorage.RecoveryStorage):
    """copyTransactionsFrom/restore from self._storage into self._dst."""

    __test__ = False  # only the concrete classes below run

    source = staticmethod(_rfs)
    dest = staticmethod(_rfs)
    wrap = staticmethod(lambda storage: storage)

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._storage = self.wrap(self.source("Source.data"))
        self._dst = self.wrap(self.dest("Dest.data"))

    def tearDown(self):
        self._dst.close()
        StorageTestBase.StorageTestBase.tearDown(self)


@_mark_recovery
class RecoveryRefToRef(_Recovery):
    __test__ = True


@_mark_recovery
class RecoveryZODBFileStorageToRef(_Recovery):
    __test__ = True
    source = staticmethod(_zodb_fs)


class RecoveryRefToZODBFileStorage(_Recovery):
    __test__ = True
    dest = staticmethod(_zodb_fs)


class RecoveryRefToRefHex(RecoveryRefToRef):
    wrap = staticmethod(HexStorage)


class RecoveryZODBFileStorageToRefHex(RecoveryZODBFileStorageToRef):
    wrap = staticmethod(HexStorage)


class RecoveryRefToZODBFileStorageHex(RecoveryRefToZODBFileStorage):
    wrap = staticmethod(HexStorage)
