"""`refstorage dump`: every field of every transaction and data record, with its position.

`dump` yields plain dicts (the file header, each transaction with its
records, each damaged stretch); `format_item` turns one into text lines.
With `classes`, each record's class is read from its pickle's opcodes
(nothing is imported or run); a backpointer shows the class of the data it
stands for.
"""

from __future__ import annotations

from collections.abc import Iterator

from .. import fileformat as fmt
from ..errors import CorruptedError
from .common import ClassNames, Log, Progress, oid_repr, text, tid_time, time_repr
from .walk import Damage, walk

DATA_PREVIEW = 48


def _flags(flags: int) -> list[str]:
    names = []
    if flags & fmt.FLAG_BACKPOINTER:
        names.append("BACKPOINTER")
    if flags & fmt.FLAG_REFS_UNKNOWN:
        names.append("REFS_UNKNOWN")
    return names


def record_dict(rec: fmt.DataRecord, full_data: bool = False) -> dict:
    data = rec.data
    d = {"pos": rec.pos, "oid": rec.oid.hex(), "tid": rec.tid.hex(), "prev": rec.prev, "tpos": rec.tpos,
         "flags": rec.flags, "flag_names": _flags(rec.flags), "length": rec.length,
         "refs": [r.hex() for r in fmt.split_refs(rec.refs)]}
    if rec.is_backpointer:
        d["backpointer"] = rec.back
        d["dlen"] = 0
    else:
        d["dlen"] = len(data)
        shown = data if full_data else data[:DATA_PREVIEW]
        d["data"] = shown.hex()
        d["data_truncated"] = len(shown) < len(data)
    return d


def txn_dict(th: fmt.TxnHeader) -> dict:
    return {"pos": th.pos, "tid": th.tid.hex(), "time": time_repr(tid_time(th.tid)), "tlen": th.tlen,
            "status": th.status.decode("latin-1"), "user": text(th.user),
            "description": text(th.description), "extension": th.extension.hex(), "nrec": th.nrec,
            "header_length": th.header_len, "oid_table_pos": th.records_end, "trailer_pos": th.end,
            "next_pos": th.next_pos}


def dump(path: str, start: bytes | None = None, stop: bytes | None = None, classes: bool = False,
         full_data: bool = False, progress: Progress | None = None) -> Iterator[dict]:
    """The header, then each transaction with start <= tid <= stop (and any damage met), in order.

    Items have "type": "header", "transaction" (with "records") or "damage".  A transaction
    whose "written_at" differs from its "pos" was moved by lost or inserted bytes before it."""
    with Log(path, allow_bad_header=True) as log:
        if log.header is not None:
            yield {"type": "header", "path": log.path, "size": log.size, "version": log.header.version,
                   "file_id": log.header.file_id.hex(), "pack_tid": log.header.pack_tid.hex()}
        else:
            yield {"type": "damage", "start": 0, "end": fmt.HEADER_SIZE, "error": str(log.header_error)}
        names = ClassNames() if classes else None
        reader = log.reader

        def wanted(th: fmt.TxnHeader) -> bool:
            return (start is None or th.tid >= start) and (stop is None or th.tid <= stop)

        for item in walk(reader, fmt.HEADER_SIZE, log.size, wanted, progress):
            if isinstance(item, Damage):
                yield {"type": "damage", "start": item.start, "end": item.end, "error": str(item.error)}
                continue
            th, recs, delta = item
            if stop is not None and th.tid > stop:
                break
            if recs is None:
                continue
            d = txn_dict(th)
            d["type"] = "transaction"
            d["written_at"] = th.pos - delta
            out = []
            for rec in recs:
                r = record_dict(rec, full_data)
                if names is not None:
                    r["class"] = _class_of(reader, rec, names)
                out.append(r)
            d["records"] = out
            yield d


def _class_of(reader, rec: fmt.DataRecord, names: ClassNames) -> str:
    if not rec.is_backpointer:
        return names(rec.data)
    if not rec.back:
        return "(no data: deleted)"
    try:
        target = reader.resolve(rec)
    except CorruptedError as exc:
        return f"(backpointer target unreadable: {exc.detail})"
    return "(no data: deleted)" if target is None else names(target.data)


def format_item(item: dict) -> list[str]:
    """Text lines for one item of `dump`."""
    kind = item["type"]
    if kind == "header":
        return [f"file {item['path']}: {item['size']} bytes, format version {item['version']}, "
                f"file id {item['file_id']}, pack tid {item['pack_tid']}"]
    if kind == "damage":
        return [f"DAMAGE: bytes [{item['start']}, {item['end']}) ({item['end'] - item['start']} bytes) "
                f"hold no valid transaction: {item['error']}"]
    moved = "" if item["written_at"] == item["pos"] else f" (MOVED: written at {item['written_at']})"
    lines = [f"transaction at {item['pos']}{moved}: tid {item['tid']} ({item['time']}) tlen {item['tlen']} "
             f"status {item['status']!r} user {item['user']!r} description {item['description']!r} "
             f"extension {bytes.fromhex(item['extension'])!r} nrec {item['nrec']}"]
    for r in item["records"]:
        flags = f"{r['flags']:#x}" + (f" ({'|'.join(r['flag_names'])})" if r["flag_names"] else "")
        refs = "[" + " ".join(oid_repr(bytes.fromhex(x)) for x in r["refs"]) + "]"
        line = (f"  record at {r['pos']}: oid {oid_repr(bytes.fromhex(r['oid']))} tid {r['tid']} "
                f"prev {r['prev']} tpos {r['tpos']} flags {flags} nrefs {len(r['refs'])} refs {refs} "
                f"length {r['length']}")
        if "backpointer" in r:
            line += f" backpointer {r['backpointer']}"
        else:
            data = bytes.fromhex(r["data"])
            line += f" dlen {r['dlen']} data {data!r}{'...' if r['data_truncated'] else ''}"
        if "class" in r:
            line += f" class {r['class']}"
        lines.append(line)
    lines.append(f"  oid table at {item['oid_table_pos']}: {item['nrec']} entries; "
                 f"trailer at {item['trailer_pos']}: tlen {item['tlen']}; "
                 f"next transaction at {item['next_pos']}")
    return lines
