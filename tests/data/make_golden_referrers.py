"""Write tests/data/golden-v<N>.referrers: the referrer index of golden-v1.rfs, current version.

Run once when the referrer index format version changes (never to "fix" a failing golden
test: tests/test_referrers.py::test_golden_referrers exists to fail when the format moves
by accident).  The data file is tests/data/golden-v1.rfs, whose references, deletions and
backpointers give a few blocks' worth of pairs.
"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from refstorage import referrers  # noqa: E402
from refstorage.tools.common import Log  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def write(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "golden.rfs")
        shutil.copy(os.path.join(HERE, "golden-v1.rfs"), data)
        with Log(data) as log:
            built = log.build_index()
            positions = sorted(p for _o, p in built.index.items())
            referrers.build(referrers.referrers_path(data), log.reader, log.header.file_id, positions,
                            built.end, built.last_tid)
        shutil.copy(referrers.referrers_path(data), out)


if __name__ == "__main__":
    out = os.path.join(HERE, f"golden-v{referrers.VERSION}.referrers")
    write(out)
    print(out)
