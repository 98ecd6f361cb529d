"""`refstorage backup` and `refstorage restore`: full and incremental backups of a live file.

The log is append-only, so a backup is a copy of a byte range: a full
backup copies [0, end), an incremental one [end of the last backup, end).
`end` is the end of the last finished transaction that passes its checks
(a scan from where the copy starts: every header, oid table and trailer,
and the last transaction's records), so a commit in progress -- or a torn
tail -- is never copied, and the storage may keep writing meanwhile.

A backup directory holds the pieces (one file per backup, the raw bytes of
its range) and ``manifest.json``::

    {"format": "refstorage-backup", "version": 1,
     "chains": [{"file_id": ..., "pack_tid": ...,
                 "pieces": [{"file", "kind": "full" | "incremental", "start", "end",
                             "first_tid", "last_tid", "transactions", "sha256", "created"}]}]}

A chain is one generation of the data file: a full backup and the
incrementals after it.  A new chain (a full backup) starts when the data
file's id changed (a pack or a restore wrote a new file), when the bytes at
the end of the last backup no longer match the file, or on request.  Each
piece is written with `fileio.atomic_write`, then read back and its sha256
checked, before the manifest (also written atomically) names it.

Restore concatenates the pieces of one chain, checking each sha256, and
cuts at the last transaction at or before the requested tid: the state as
of that time.  Older chains stay in the directory, so a state from before a
pack can still be restored.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .. import fileformat as fmt
from .. import fileio
from ..errors import CorruptedError, StorageIOError
from ..log import LogReader, scan
from .common import Log, Progress, ToolError, tid_repr

MANIFEST = "manifest.json"
FORMAT = "refstorage-backup"
VERSION = 1
CHUNK = 8 << 20
TAIL_CHECK = 64 << 10  # bytes compared at the end of the last backup


# -- the manifest ---------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def load_manifest(backup_dir: str) -> dict | None:
    path = os.path.join(str(backup_dir), MANIFEST)
    if not fileio.exists(path):
        return None
    raw = fileio.read_whole(path)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ToolError(f"{path}: not a backup manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ToolError(f"{path}: not a refstorage backup manifest")
    if manifest.get("version") != VERSION:
        raise ToolError(f"{path}: backup manifest version {manifest.get('version')!r} is not supported")
    keys = ("file", "kind", "start", "end", "first_tid", "last_tid", "transactions", "sha256")
    chains = manifest.get("chains")
    if not isinstance(chains, list) or not all(
            isinstance(c, dict) and isinstance(c.get("file_id"), str) and isinstance(c.get("pack_tid"), str)
            and isinstance(c.get("pieces"), list)
            and all(isinstance(p, dict) and all(k in p for k in keys) for p in c["pieces"])
            for c in chains):
        raise ToolError(f"{path}: damaged backup manifest (chains or pieces malformed)")
    return manifest


def _save_manifest(backup_dir: str, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8") + b"\n"
    fileio.atomic_write(os.path.join(str(backup_dir), MANIFEST), [data])


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(s: str | None) -> bytes | None:
    return None if s is None else bytes.fromhex(s)


# -- reading files in chunks ----------------------------------------------------------------

def _read_range(file: fileio.DataFile, start: int, end: int, progress: Progress | None = None,
                base: int = 0) -> Iterator[bytes]:
    pos = start
    while pos < end:
        data = file.read(pos, min(CHUNK, end - pos))
        if not data:
            raise StorageIOError(file.path, "file ended early", pos)
        yield data
        pos += len(data)
        if progress is not None:
            progress(base + pos)


def _sha256_of(path: str, progress: Progress | None = None, base: int = 0) -> tuple[str, int]:
    f = fileio.DataFile(path, read_only=True)
    try:
        h = hashlib.sha256()
        for chunk in _read_range(f, 0, f.size, progress, base):
            h.update(chunk)
        return h.hexdigest(), f.size
    finally:
        f.close()


# -- backup -------------------------------------------------------------------------------

@dataclass
class BackupReport:
    path: str
    backup_dir: str
    kind: str = "none"  # full, incremental, none (nothing new)
    reason: str = ""  # why a full backup, or why nothing
    piece: str | None = None
    start: int = 0
    end: int = 0
    first_tid: bytes | None = None
    last_tid: bytes | None = None
    transactions: int = 0
    sha256: str | None = None
    note: str | None = None  # e.g. an unfinished last transaction was left out

    @property
    def bytes(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict:
        return {"path": self.path, "backup_dir": self.backup_dir, "kind": self.kind, "reason": self.reason,
                "piece": self.piece, "start": self.start, "end": self.end, "bytes": self.bytes,
                "first_tid": _hex(self.first_tid), "last_tid": _hex(self.last_tid),
                "transactions": self.transactions, "sha256": self.sha256, "note": self.note}


def _tail_matches(log: Log, backup_dir: str, piece: dict) -> str | None:
    """None if the file holds the last piece's final bytes where the piece says; else why not."""
    end = piece["end"]
    if log.size < end:
        return f"the file ({log.size} bytes) is shorter than the last backup's end ({end})"
    ppath = os.path.join(backup_dir, piece["file"])
    if not fileio.exists(ppath):
        return f"the last backup piece {piece['file']} is missing"
    pf = fileio.DataFile(ppath, read_only=True)
    try:
        n = min(TAIL_CHECK, pf.size, end - piece["start"])
        ours = pf.read(pf.size - n, n)
    finally:
        pf.close()
    if log.file.read(end - n, n) != ours:
        return "the data at the end of the last backup changed (the file was replaced)"
    try:
        th = log.reader.txn_ending_at(end, log.size) if end > fmt.HEADER_SIZE else None
    except CorruptedError:
        return "the last backup's end is no longer a transaction boundary"
    if th is not None and th.tid.hex() != piece["last_tid"]:
        return "the transaction at the last backup's end changed"
    return None


def backup(path: str, backup_dir: str, full: bool = False, progress: Progress | None = None) -> BackupReport:
    """Back up the file at `path` into `backup_dir`: incrementally if possible."""
    path, backup_dir = str(path), str(backup_dir)
    report = BackupReport(path, backup_dir)
    fileio.make_dirs(backup_dir)
    manifest = load_manifest(backup_dir) or {"format": FORMAT, "version": VERSION, "chains": []}
    chains = manifest["chains"]
    with Log(path) as log:
        chain = chains[-1] if chains else None
        reason = None
        if full:
            reason = "a full backup was asked for"
        elif chain is None or not chain["pieces"]:
            reason = "no earlier backup"
        elif chain["file_id"] != log.file_id.hex():
            reason = "the file id changed (the file was packed or replaced)"
        else:
            reason = _tail_matches(log, backup_dir, chain["pieces"][-1])
        start = 0 if reason else chain["pieces"][-1]["end"]
        scan_from = max(start, fmt.HEADER_SIZE)
        result = scan(log.reader, scan_from, log.size)
        if result.error is not None and not result.torn_tail:
            raise ToolError(f"{path} is damaged at offset {result.error.offset} ({result.error.detail}); "
                            "backup does not copy damage: run 'refstorage verify' and 'refstorage recover'")
        if result.error is not None:
            report.note = (f"an unfinished transaction at {result.end} was left out "
                           f"({result.error.detail})")
        end = result.end
        report.start, report.end = start, end
        report.transactions = result.ntxn
        report.last_tid = result.last_tid
        if result.ntxn:
            report.first_tid = log.reader.read_txn_header(scan_from, log.size).tid
        if not reason and end == start:
            report.reason = "no new transactions since the last backup"
            return report
        kind = "full" if reason else "incremental"
        report.kind, report.reason = kind, reason or ""
        seq = sum(len(c["pieces"]) for c in chains) + 1
        name = f"{seq:05d}-{kind}-{result.last_tid.hex() if result.last_tid else 'empty'}.rfsb"
        ppath = os.path.join(backup_dir, name)
        h = hashlib.sha256()

        def chunks() -> Iterator[bytes]:
            for chunk in _read_range(log.file, start, end, progress):
                h.update(chunk)
                yield chunk

        fileio.atomic_write(ppath, chunks())
    digest = h.hexdigest()
    again, size = _sha256_of(ppath)
    if again != digest or size != end - start:
        fileio.remove_if_exists(ppath)
        raise ToolError(f"{ppath}: the backup piece read back differs from what was written "
                        f"(sha256 {again}, expected {digest}); nothing was recorded")
    piece = {"file": name, "kind": kind, "start": start, "end": end, "first_tid": _hex(report.first_tid),
             "last_tid": _hex(report.last_tid), "transactions": report.transactions, "sha256": digest,
             "created": _now()}
    if reason:
        chains.append({"file_id": log.file_id.hex(), "pack_tid": log.header.pack_tid.hex(),
                       "pieces": [piece]})
    else:
        chain["pieces"].append(piece)
    _save_manifest(backup_dir, manifest)
    report.piece, report.sha256 = name, digest
    return report


# -- restore ------------------------------------------------------------------------------

@dataclass
class RestoreReport:
    backup_dir: str
    dest: str
    file_id: str = ""
    pieces: list[str] | None = None
    size: int = 0
    transactions: int = 0
    last_tid: bytes | None = None
    asked_tid: bytes | None = None

    def to_json(self) -> dict:
        return {"backup_dir": self.backup_dir, "dest": self.dest, "file_id": self.file_id,
                "pieces": self.pieces, "size": self.size, "transactions": self.transactions,
                "last_tid": _hex(self.last_tid), "asked_tid": _hex(self.asked_tid)}


class _PieceFile:
    """A backup piece read at the data file's positions (it starts at `start`)."""

    def __init__(self, path: str, start: int):
        self.file = fileio.DataFile(path, read_only=True)
        self.path = path
        self.start = start
        self.size = start + self.file.size

    def read(self, pos: int, n: int) -> bytes:
        return self.file.read(pos - self.start, n)

    def close(self) -> None:
        self.file.close()


def _choose(manifest: dict, backup_dir: str, tid: bytes | None) -> tuple[dict, list[dict]]:
    """The chain and the pieces of it a restore to `tid` (None: the latest state) needs."""
    chains = [c for c in manifest["chains"] if c["pieces"]]
    if not chains:
        raise ToolError(f"{backup_dir}: the manifest lists no backup")
    if tid is None:
        return chains[-1], chains[-1]["pieces"]
    for chain in reversed(chains):
        first = next((p["first_tid"] for p in chain["pieces"] if p["first_tid"]), None)
        if bytes.fromhex(chain["pack_tid"]) <= tid and first is not None and bytes.fromhex(first) <= tid:
            pieces = []
            for p in chain["pieces"]:
                if p["first_tid"] is not None and bytes.fromhex(p["first_tid"]) > tid:
                    break
                pieces.append(p)
            return chain, pieces
    raise ToolError(f"{backup_dir}: no backup holds the state as of {tid_repr(tid)} (no transaction at "
                    "or before it, or every backup that old was packed after it)")


def _cut(backup_dir: str, piece: dict, tid: bytes) -> int:
    """Where the state as of `tid` ends in `piece`: after its last transaction <= tid."""
    if piece["last_tid"] is None or bytes.fromhex(piece["last_tid"]) <= tid:
        return piece["end"]
    pf = _PieceFile(os.path.join(backup_dir, piece["file"]), piece["start"])
    try:
        cut = max(piece["start"], fmt.HEADER_SIZE)
        for th in LogReader(pf).iter_txns(cut, piece["end"]):  # type: ignore[arg-type]
            if th.tid > tid:
                break
            cut = th.next_pos
        return cut
    except CorruptedError as exc:
        raise ToolError(f"backup piece {piece['file']} is damaged: {exc}") from None
    finally:
        pf.close()


def restore(backup_dir: str, dest: str, tid: bytes | None = None, force: bool = False,
            progress: Progress | None = None) -> RestoreReport:
    """Rebuild a data file at `dest` from the backups: the latest state, or the state as of `tid`."""
    backup_dir, dest = str(backup_dir), str(dest)
    manifest = load_manifest(backup_dir)
    if manifest is None:
        raise ToolError(f"{backup_dir}: no {MANIFEST}; not a backup directory")
    if fileio.exists(dest) and not force:
        raise ToolError(f"{dest} exists; restore writes a new file (give another name, or --force)")
    chain, pieces = _choose(manifest, backup_dir, tid)
    cut = pieces[-1]["end"] if tid is None else _cut(backup_dir, pieces[-1], tid)
    report = RestoreReport(backup_dir, dest, chain["file_id"], [p["file"] for p in pieces], asked_tid=tid)
    expected_pos = 0
    for p in pieces:
        if p["start"] != expected_pos:
            raise ToolError(f"{backup_dir}: backup pieces do not join: {p['file']} starts at "
                            f"{p['start']}, the one before ends at {expected_pos}")
        expected_pos = p["end"]

    def chunks() -> Iterator[bytes]:
        for p in pieces:
            ppath = os.path.join(backup_dir, p["file"])
            f = fileio.DataFile(ppath, read_only=True)
            try:
                if f.size != p["end"] - p["start"]:
                    raise ToolError(f"{ppath}: {f.size} bytes, the manifest says {p['end'] - p['start']}")
                h = hashlib.sha256()
                for chunk in _read_range(f, 0, f.size, progress, p["start"]):
                    h.update(chunk)
                    yield chunk
                if h.hexdigest() != p["sha256"]:
                    raise ToolError(f"{ppath}: sha256 mismatch: the backup piece is damaged")
            finally:
                f.close()

    fileio.atomic_write(dest, _trim(chunks(), cut))
    fileio.remove_if_exists(dest + ".index")
    # the result must be a sound log: every header, oid table and trailer
    with Log(dest) as log:
        result = scan(log.reader, fmt.HEADER_SIZE, log.size)
        if result.error is not None:
            raise ToolError(f"{dest}: the restored file is damaged: {result.error}")
        report.size, report.transactions, report.last_tid = log.size, result.ntxn, result.last_tid
    return report


def _trim(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """The first `limit` bytes of the stream; the rest is still consumed (its checksum is checked)."""
    pos = 0
    for chunk in chunks:
        if pos < limit:
            yield chunk[: limit - pos] if pos + len(chunk) > limit else chunk
        pos += len(chunk)
