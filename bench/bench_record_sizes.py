"""Loads of one record of each size, repeated: the cost of the load path by record size.

    PYTHONPATH=src python bench/bench_record_sizes.py

Records of 200 B (one read), 8 KB and 256 KB (a second read, bounded by the
record's transaction) and 4 MB; the best of 5 rounds, in microseconds per
load (warm page cache).  Used to check that bounding reads on damaged input
(issue 11, part 3) costs nothing measurable on valid records.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, z64

import refstorage

SIZES = {1: 200, 2: 8000, 3: 256 * 1024, 4: 4 << 20}


def main() -> None:
    d = tempfile.mkdtemp()
    try:
        path = os.path.join(d, "sizes.rfs")
        st = refstorage.FileStorage(path, create=True)
        t = TransactionMetaData()
        st.tpc_begin(t)
        for oid, n in SIZES.items():
            st.store(p64(oid), z64, b"x" * n, "", t)
        st.tpc_vote(t)
        st.tpc_finish(t)
        st.close()
        st = refstorage.FileStorage(path, read_only=True)
        for oid, n in SIZES.items():
            reps = max(20, min(20000, (200 << 20) // n))
            st.load(p64(oid))
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(reps):
                    st.load(p64(oid))
                best = min(best, (time.perf_counter() - started) / reps)
            print(f"{n:>9,} bytes: {best * 1e6:9.1f} us/load")
        st.close()
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
