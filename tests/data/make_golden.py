"""Write tests/data/golden-v1.rfs: a tiny, fully deterministic format-1 file.

Run once when the format version changes (never to "fix" a failing golden
test: that test exists to fail when the format moves by accident).

    file header   file id 00 01 .. 0f, pack tid 0
    txn A (status 'p') tid 0x03e5a0d4d5555555: user "alice", description "create", no extension
        oid 0: data b"ROOT", refs [oid 1]
        oid 1: data b"ONE", no refs
    txn B (status ' ') tid 0x03e5a0d4d6666666: user "", description "edit", extension b"EXT"
        oid 1: data b"ONE-v2", refs unknown (flag 2)
        oid 2: data b"TWO", refs [oid 0, oid 1]
    txn C (status ' ') tid 0x03e5a0d4d7777777: user "bob", description "undo", no extension
        oid 1: backpointer to txn A's record of oid 1
        oid 2: backpointer 0 (creation undone)
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from refstorage import fileformat as fmt  # noqa: E402

TIDS = [bytes.fromhex("03e5a0d4d5555555"), bytes.fromhex("03e5a0d4d6666666"),
        bytes.fromhex("03e5a0d4d7777777")]


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def build() -> bytes:
    out = bytearray(fmt.encode_file_header(bytes(range(16))))
    index: dict[bytes, int] = {}

    def txn(tid, status, user, desc, ext, records):
        tpos = len(out)
        hlen = fmt.txn_header_len(user, desc, ext)
        pos = tpos + hlen
        body = []
        table = []
        for o, data, refs, known, back in records:
            rec = fmt.encode_data_record(o, tid, index.get(o, 0), tpos, refs, data, back, known)
            index[o] = pos
            table.append((o, pos))
            pos += len(rec)
            body.append(rec)
        tlen = pos - tpos + fmt.oid_table_size(len(records))
        out.extend(fmt.encode_txn_header(tid, tlen, status, user, desc, ext, len(records)))
        for rec in body:
            out.extend(rec)
        out.extend(fmt.encode_oid_table(table))
        out.extend(fmt.encode_trailer(tlen))
        return tpos

    txn(TIDS[0], b"p", b"alice", b"create", b"",
        [(oid(0), b"ROOT", oid(1), True, 0), (oid(1), b"ONE", b"", True, 0)])
    a_oid1 = index[oid(1)]
    txn(TIDS[1], b" ", b"", b"edit", b"EXT",
        [(oid(1), b"ONE-v2", b"", False, 0), (oid(2), b"TWO", oid(0) + oid(1), True, 0)])
    txn(TIDS[2], b" ", b"bob", b"undo", b"",
        [(oid(1), None, b"", True, a_oid1), (oid(2), None, b"", True, 0)])
    return bytes(out)


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(__file__), "golden-v1.rfs")
    with open(path, "wb") as f:
        f.write(build())
    print(path)
