"""Write tests/data/golden-referrers.rfs and golden-v<N>.referrers (its referrer index, current version).

Run once when the referrer index format version changes (never to "fix" a failing golden
test: tests/test_referrers.py::test_golden_referrers exists to fail when the format moves
by accident).  The data file is written with the format's encoders from SPEC below: data
records with references (a duplicate, a self reference, a missing target), a record with
unknown references, a deletion, an undo backpointer and an unreadable backpointer.  The
index is written with blocks of BLOCK = 3 pairs, so it has several blocks.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from refstorage import fileformat as fmt  # noqa: E402
from refstorage import referrers  # noqa: E402
from refstorage.tools.common import Log  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FILE_ID = bytes(range(16))
BLOCK = 3
DATA = os.path.join(HERE, "golden-referrers.rfs")


def o(n: int) -> bytes:
    return n.to_bytes(8, "big")


# transactions of (oid, refs or "unknown" or ("back", n): n-th earlier record of the oid, 0: none,
# -1: an unreadable position)
SPEC = [
    [(0, [1, 2, 3]), (1, [2, 2, 9]), (2, [2]), (3, [])],
    [(4, "unknown"), (5, [1, 4]), (6, [0, 1, 2, 3, 4, 5])],
    [(1, [3]), (3, ("back", 0)), (7, [1])],
    [(1, ("back", 1)), (8, ("back", -1)), (9, [5, 6, 7])],
]


def write_data(path: str) -> None:
    out = bytearray(fmt.encode_file_header(FILE_ID))
    current: dict[bytes, int] = {}
    history: dict[bytes, list[int]] = {}
    for n, records in enumerate(SPEC):
        tpos = len(out)
        tid = (0x03E5A0D4D0000000 + n + 1).to_bytes(8, "big")
        pos = tpos + fmt.txn_header_len(b"u", b"d", b"")
        body, table = [], []
        for num, what in records:
            oid = o(num)
            prev = current.get(oid, 0)
            if isinstance(what, tuple):
                k = what[1]
                back = tpos - 8 if k == -1 else history[oid][k - 1] if k else 0
                rec = fmt.encode_data_record(oid, tid, prev, tpos, b"", None, back)
            elif what == "unknown":
                rec = fmt.encode_data_record(oid, tid, prev, tpos, b"", b"data", refs_known=False)
            else:
                rec = fmt.encode_data_record(oid, tid, prev, tpos, b"".join(map(o, what)), b"data")
            table.append((oid, pos))
            history.setdefault(oid, []).append(pos)
            current[oid] = pos
            pos += len(rec)
            body.append(rec)
        tlen = pos - tpos + fmt.oid_table_size(len(records))
        out += fmt.encode_txn_header(tid, tlen, b" ", b"u", b"d", b"", len(records))
        for rec in body:
            out += rec
        out += fmt.encode_oid_table(table) + fmt.encode_trailer(tlen)
    with open(path, "wb") as f:
        f.write(bytes(out))


def write_index(data: str, out: str) -> None:
    saved, referrers.BLOCK = referrers.BLOCK, BLOCK
    try:
        with Log(data) as log:
            built = log.build_index()
            positions = sorted(p for _o, p in built.index.items())
            referrers.build(out, log.reader, log.header.file_id, positions, built.end, built.last_tid)
    finally:
        referrers.BLOCK = saved


if __name__ == "__main__":
    write_data(DATA)
    out = os.path.join(HERE, f"golden-v{referrers.VERSION}.referrers")
    write_index(DATA, out)
    print(DATA, out)
