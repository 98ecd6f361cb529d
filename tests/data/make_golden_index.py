"""Write tests/data/golden-v<N>.index: a tiny, deterministic index file of the current version.

Run once when the index format version changes (never to "fix" a failing golden test:
that test exists to fail when the format moves by accident).  golden-v1.index was written
by the version-1 writer (git a85a946) with the same entries; version-2 readers still read it.

    file_id 00 01 .. 0f, pos 100000, tid 0x03e5a0d4d7777777
    oids 0..255: positions 1024 + 100 * oid    (one dense block, key 0)
    oids 0x500, 0x5ff: positions 9000, 9001   (a sparse block of 2, key 5)
    oid 0x907: position 99999                  (a sparse block of 1, key 9)
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from refstorage.index import OidIndex  # noqa: E402
from refstorage.indexfile import INDEX_VERSION, save_index  # noqa: E402

FILE_ID = bytes(range(16))
POS = 100000
TID = bytes.fromhex("03e5a0d4d7777777")


def entries() -> dict[bytes, int]:
    d = {i.to_bytes(8, "big"): 1024 + 100 * i for i in range(256)}
    d[(0x500).to_bytes(8, "big")] = 9000
    d[(0x5FF).to_bytes(8, "big")] = 9001
    d[(0x907).to_bytes(8, "big")] = 99999
    return d


def write(path: str) -> None:
    index = OidIndex()
    index.update(entries())
    save_index(path, index, file_id=FILE_ID, pos=POS, tid=TID)


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(__file__), f"golden-v{INDEX_VERSION}.index")
    write(out)
    print(out)
