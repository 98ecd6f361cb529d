"""ZODB's IExternalGC doctest (deleteObject, then pack) against refstorage."""

import unittest

from ZODB.tests.PackableStorage import IExternalGC_suite

import refstorage


def test_iexternalgc_doctest():
    suite = IExternalGC_suite(
        lambda: refstorage.FileStorage("data.rfs", blob_dir="blobs", pack_gc=False))
    result = unittest.TextTestRunner(verbosity=0).run(suite)
    problems = [str(t) + "\n" + tb for t, tb in result.failures + result.errors]
    assert result.testsRun >= 1
    assert result.wasSuccessful(), "\n".join(problems)
