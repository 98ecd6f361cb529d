"""Helpers for the tests of the `refstorage` tools: small databases, damage, comparisons."""

from __future__ import annotations

import pathlib

import transaction
import ZODB
from BTrees.IOBTree import IOBTree
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping

import refstorage
from refstorage import fileformat as fmt
from refstorage.tools.dump import dump

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden-v1.rfs"


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def make_db(path, extra_txns: int = 0) -> None:
    """A refstorage database with BTrees, updates, a deletion, extensions and undo (backpointers)."""
    db = ZODB.DB(refstorage.FileStorage(str(path), create=True))
    conn = db.open()
    root = conn.root()
    root["tree"] = tree = OOBTree()
    root["ints"] = ints = IOBTree()
    for i in range(120):
        tree[f"k{i:04d}"] = PersistentMapping(n=i)
        ints[i] = f"v{i}"
    t = transaction.get()
    t.note("fill")
    t.setUser("alice")
    t.setExtendedInfo("ticket", 42)
    transaction.commit()
    for i in range(0, 120, 7):
        tree[f"k{i:04d}"]["n"] = -i
    transaction.get().note("update")
    transaction.commit()
    del tree["k0003"]
    transaction.commit()
    root["doomed"] = PersistentMapping(x=1)
    transaction.commit()
    db.undo(db.undoLog(0, 1)[0]["id"])  # undo a creation: a backpointer 0 record
    transaction.get().note("undo")
    transaction.commit()
    tree["k0010"]["n"] = "changed"
    transaction.commit()
    db.undo(db.undoLog(0, 1)[0]["id"])  # a backpointer to an older revision
    transaction.commit()
    for j in range(extra_txns):
        ints[1000 + j] = f"late {j}"
        transaction.get().note(f"late {j}")
        transaction.commit()
    conn.close()
    db.close()


def add_txns(path, n: int, note: str = "more") -> None:
    db = ZODB.DB(refstorage.FileStorage(str(path)))
    conn = db.open()
    root = conn.root()
    for j in range(n):
        root["ints"][5000 + j] = f"{note} {j}"
        root.setdefault("counter", PersistentMapping(n=0))["n"] = j
        transaction.get().note(f"{note} {j}")
        transaction.commit()
    conn.close()
    db.close()


def txns(path) -> list:
    """Every transaction and record of a file, as the storage's iterator reports them."""
    st = refstorage.FileStorage(str(path), read_only=True)
    try:
        return [(t.tid, t.status, t.user, t.description, t.extension_bytes,
                 [(r.oid, r.tid, r.data, r.data_txn) for r in t]) for t in st.iterator()]
    finally:
        st.close()


def loads(path) -> dict:
    """oid -> (data, tid) of every current object (None for a deleted one)."""
    from ZODB.POSException import POSKeyError
    st = refstorage.FileStorage(str(path), read_only=True)
    try:
        out = {}
        index = st._state.index
        for o, _pos in index.items():
            try:
                out[o] = st.load(o)
            except POSKeyError:
                out[o] = None
        return out
    finally:
        st.close()


def layout(path) -> list[dict]:
    """The transactions of a file with their records' positions (from the dump tool)."""
    return [item for item in dump(str(path)) if item["type"] == "transaction"]


def flip_bit(path, pos: int, bit: int = 0) -> None:
    p = pathlib.Path(path)
    data = bytearray(p.read_bytes())
    data[pos] ^= 1 << bit
    p.write_bytes(bytes(data))


def cut(path, start: int, end: int) -> None:
    """Remove bytes [start, end) from the file."""
    p = pathlib.Path(path)
    data = p.read_bytes()
    p.write_bytes(data[:start] + data[end:])


def truncate(path, size: int) -> None:
    p = pathlib.Path(path)
    p.write_bytes(p.read_bytes()[:size])


def build_file(path, txns_spec, file_id: bytes = bytes(range(16))) -> list[int]:
    """Write a file with the format's encoders: txns_spec is a list of (tid, records), each record
    (oid, data or None, refs list, back, prev or None); prev None means the oid's previous record.
    Returns the positions of the records, in order."""
    out = bytearray(fmt.encode_file_header(file_id))
    index: dict[bytes, int] = {}
    positions = []
    for tid, records in txns_spec:
        tpos = len(out)
        user, desc, ext = b"u", b"d", b""
        pos = tpos + fmt.txn_header_len(user, desc, ext)
        body, table, local = [], [], {}
        for o, data, refs, back, prev in records:
            if prev is None:
                prev = index.get(o, 0)
            rec = fmt.encode_data_record(o, tid, prev, tpos, fmt.pack_refs(refs) if data is not None else b"",
                                         data, back)
            table.append((o, pos))
            local[o] = pos
            positions.append(pos)
            pos += len(rec)
            body.append(rec)
        index.update(local)
        tlen = pos - tpos + fmt.oid_table_size(len(records))
        out += fmt.encode_txn_header(tid, tlen, b" ", user, desc, ext, len(records))
        for rec in body:
            out += rec
        out += fmt.encode_oid_table(table) + fmt.encode_trailer(tlen)
    pathlib.Path(path).write_bytes(bytes(out))
    return positions
