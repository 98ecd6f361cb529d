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
                             "first_tid", "last_tid", "transactions", "sha256", "created",
                             "compression" (optional: "gzip")}]}]}

A chain is one generation of the data file: a full backup and the
incrementals after it.  A new chain (a full backup) starts when the data
file's id changed (a pack or a restore wrote a new file), when the bytes at
the end of the last backup no longer match the file, or on request.  Each
piece is written with `fileio.atomic_write`, then read back and its sha256
checked, before the manifest (also written atomically) names it.  A piece
written with `compress` is a gzip file (``.rfsb.gz``); its sha256 is that of
the bytes it holds, so compressed and plain pieces are checked alike.

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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from .. import fileformat as fmt
from .. import fileio
from ..errors import CorruptedError, RefStorageError, StorageIOError
from ..log import LogReader, scan
from .common import Log, Progress, ToolError, phase, tid_repr

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


def _gzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The gzip stream of `chunks` (repozo's -z writes gzip files too)."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    for chunk in chunks:
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def piece_chunks(backup_dir: str, piece: dict, progress: Progress | None = None,
                 base: int = 0) -> Iterator[bytes]:
    """The bytes a piece holds (decompressed if it was written with --compress), in chunks;
    progress(base + position in the piece's range)."""
    ppath = os.path.join(str(backup_dir), piece["file"])
    f = fileio.DataFile(ppath, read_only=True)
    try:
        if piece.get("compression") != "gzip":
            yield from _read_range(f, 0, f.size, progress, base)
            return
        z = zlib.decompressobj(31)
        pos = 0
        for chunk in _read_range(f, 0, f.size):
            try:
                data = z.decompress(chunk)
            except zlib.error as exc:
                raise ToolError(f"{ppath}: not a valid gzip stream ({exc}): the backup piece is damaged") \
                    from None
            if data:
                pos += len(data)
                yield data
                if progress is not None:
                    progress(base + pos)
        if not z.eof:
            raise ToolError(f"{ppath}: the gzip stream ends early: the backup piece is damaged")
    finally:
        f.close()


def _piece_digest(backup_dir: str, piece: dict, progress: Progress | None = None,
                  base: int = 0) -> tuple[str, int]:
    """(sha256, length) of the bytes a piece holds."""
    h = hashlib.sha256()
    n = 0
    for chunk in piece_chunks(backup_dir, piece, progress, base):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


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
    if piece.get("compression") == "gzip":
        ours = b""
        for chunk in piece_chunks(backup_dir, piece):
            ours = (ours + chunk)[-TAIL_CHECK:]
        n = len(ours)
    else:
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


def backup(path: str, backup_dir: str, full: bool = False, progress: Progress | None = None,
           compress: bool = False) -> BackupReport:
    """Back up the file at `path` into `backup_dir`: incrementally if possible.

    With `compress` the piece is written as a gzip file (its sha256 is still
    that of the data it holds)."""
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
        if compress:
            name += ".gz"
        ppath = os.path.join(backup_dir, name)
        h = hashlib.sha256()

        def chunks() -> Iterator[bytes]:
            for chunk in _read_range(log.file, start, end, progress):
                h.update(chunk)
                yield chunk

        fileio.atomic_write(ppath, _gzip(chunks()) if compress else chunks())
    digest = h.hexdigest()
    piece = {"file": name, "kind": kind, "start": start, "end": end, "first_tid": _hex(report.first_tid),
             "last_tid": _hex(report.last_tid), "transactions": report.transactions, "sha256": digest,
             "created": _now()}
    if compress:
        piece["compression"] = "gzip"
    again, size = _piece_digest(backup_dir, piece)
    if again != digest or size != end - start:
        fileio.remove_if_exists(ppath)
        raise ToolError(f"{ppath}: the backup piece read back differs from what was written "
                        f"(sha256 {again}, expected {digest}); nothing was recorded")
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


def _cut(backup_dir: str, piece: dict, tid: bytes, scratch: str) -> int:
    """Where the state as of `tid` ends in `piece`: after its last transaction <= tid.

    A compressed piece is first decompressed into the file `scratch` (removed after)."""
    if piece["last_tid"] is None or bytes.fromhex(piece["last_tid"]) <= tid:
        return piece["end"]
    ppath = os.path.join(backup_dir, piece["file"])
    if piece.get("compression") == "gzip":
        fileio.atomic_write(scratch, piece_chunks(backup_dir, piece))
        ppath = scratch
    try:
        pf = _PieceFile(ppath, piece["start"])
    finally:
        if ppath == scratch:
            fileio.remove_if_exists(scratch)  # the open file stays readable
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
    cut = pieces[-1]["end"] if tid is None else _cut(backup_dir, pieces[-1], tid, dest + ".cut.tmp")
    report = RestoreReport(backup_dir, dest, chain["file_id"], [p["file"] for p in pieces], asked_tid=tid)
    expected_pos = 0
    for p in pieces:
        if p["start"] != expected_pos:
            raise ToolError(f"{backup_dir}: backup pieces do not join: {p['file']} starts at "
                            f"{p['start']}, the one before ends at {expected_pos}")
        expected_pos = p["end"]

    phase(progress, "restore", pieces[-1]["end"], "B")

    def chunks() -> Iterator[bytes]:
        for p in pieces:
            ppath = os.path.join(backup_dir, p["file"])
            size = p["end"] - p["start"]
            if p.get("compression") != "gzip":
                f = fileio.DataFile(ppath, read_only=True)
                try:
                    if f.size != size:
                        raise ToolError(f"{ppath}: {f.size} bytes, the manifest says {size}")
                finally:
                    f.close()
            h = hashlib.sha256()
            n = 0
            for chunk in piece_chunks(backup_dir, p, progress, p["start"]):
                n += len(chunk)
                if n > size:
                    raise ToolError(f"{ppath}: holds more than the {size} bytes the manifest says")
                h.update(chunk)
                yield chunk
            if n != size:
                raise ToolError(f"{ppath}: {n} bytes, the manifest says {size}")
            if h.hexdigest() != p["sha256"]:
                raise ToolError(f"{ppath}: sha256 mismatch: the backup piece is damaged")

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


# -- checking and pruning the backups ---------------------------------------------------------

@dataclass
class ChainCheck:
    file_id: str
    pieces: int
    size: int
    last_tid: bytes | None
    problems: list[str]

    def to_json(self) -> dict:
        return {"file_id": self.file_id, "pieces": self.pieces, "size": self.size,
                "last_tid": _hex(self.last_tid), "problems": self.problems, "ok": not self.problems}


def check(backup_dir: str, progress: Progress | None = None) -> list[ChainCheck]:
    """Check every piece of every chain: present, of the size and sha256 the manifest records,
    and joined to the piece before it.  Nothing is written."""
    backup_dir = str(backup_dir)
    manifest = load_manifest(backup_dir)
    if manifest is None:
        raise ToolError(f"{backup_dir}: no {MANIFEST}; not a backup directory")
    total = sum(p["end"] - p["start"] for c in manifest["chains"] for p in c["pieces"])
    phase(progress, "backup: checking", total, "B")
    done = 0
    out = []
    for chain in manifest["chains"]:
        pieces = chain["pieces"]
        result = ChainCheck(chain["file_id"], len(pieces), pieces[-1]["end"] if pieces else 0,
                            _unhex(pieces[-1]["last_tid"]) if pieces else None, [])
        expected = 0
        for p in pieces:
            ppath = os.path.join(backup_dir, p["file"])
            if p["start"] != expected:
                result.problems.append(f"{p['file']} starts at {p['start']}, the piece before ends at "
                                       f"{expected}")
            expected = p["end"]
            if not fileio.exists(ppath):
                result.problems.append(f"{ppath}: missing")
                done += p["end"] - p["start"]
                continue
            try:
                digest, size = _piece_digest(backup_dir, p, progress, done)
            except RefStorageError as exc:
                result.problems.append(str(exc))
                continue
            finally:
                done += p["end"] - p["start"]
            if size != p["end"] - p["start"]:
                result.problems.append(f"{ppath}: {size} bytes, the manifest says {p['end'] - p['start']}")
            elif digest != p["sha256"]:
                result.problems.append(f"{ppath}: sha256 mismatch: the backup piece is damaged")
        out.append(result)
    return out


def prune(backup_dir: str, keep: int) -> list[str]:
    """Remove every chain but the newest `keep` ones (each a full backup and its incrementals).

    The manifest is rewritten first, then the pieces it no longer names are
    deleted; returns their file names."""
    if keep < 1:
        raise ToolError(f"keep {keep}: at least the newest full backup is kept")
    backup_dir = str(backup_dir)
    manifest = load_manifest(backup_dir)
    if manifest is None:
        raise ToolError(f"{backup_dir}: no {MANIFEST}; not a backup directory")
    chains = [c for c in manifest["chains"] if c["pieces"]]
    if len(chains) <= keep:
        return []
    dropped = chains[:-keep]
    manifest["chains"] = chains[-keep:]
    _save_manifest(backup_dir, manifest)
    removed = []
    for chain in dropped:
        for p in chain["pieces"]:
            fileio.remove_if_exists(os.path.join(backup_dir, p["file"]))
            removed.append(p["file"])
    return removed
