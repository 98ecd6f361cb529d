"""The in-memory oid -> file position index, and the index file that caches it.

In memory
=========

`OidIndex` maps an 8-byte big-endian oid to a file position ``0 < pos < 2**48``
(position 0 is never a record: the data file starts with its 1024-byte header).
Oids are grouped in blocks of 256 by ``key = oid_int >> 8``; a dict maps each
key to one block object, in one of two forms:

* dense: a ``bytearray`` of 256 * 6 = 1536 bytes, the 6-byte big-endian
  position of suffix ``s = oid_int & 255`` at ``[6s:6s+6]`` (all zero = absent);
* sparse: a ``bytes`` of 7n bytes (1 <= n <= 219): the n suffixes in strictly
  ascending order, then their n positions (6 bytes each, same order).  A lookup
  is one ``bytes.find`` of the suffix among the first n bytes.

The two kinds are told apart by length (7 * 219 = 1533 < 1536).  A block stays
sparse while that is no bigger than dense: inserting a 220th entry makes it
dense.  So that sequentially allocated oids do not pay for 219 sparse inserts
per block, a sparse block holding exactly suffixes 0..c-1 with c >= 32 turns
dense when a higher suffix is inserted.  A delete leaving a dense block with
fewer than 128 entries makes it sparse again.  Hence every dense block holds at
least 32 entries.  There are no per-entry Python objects: a dense oid costs
about 6.5 bytes, an oid alone in its block about 100-130 bytes (dict slot, int
key, 7-byte bytes object); ZODB's fsIndex takes 8 and about 380.

Threads: `get`, `__getitem__`, `__contains__` and `len` may run in any number
of threads while ONE writer thread calls the mutating methods.  The writer
never leaves a block half-changed: a sparse block is immutable and replaced by
a new object in one dict assignment; a dense block changes in place only by one
6-byte slice assignment of the same size (atomic under the GIL); a conversion,
or `update`, builds new blocks completely before storing them (`update` stores
them all with one ``dict.update``).  `items`, `__iter__`, `max_oid`, `copy` and
`save_index` must not run concurrently with the writer (the storage calls them
under its commit lock).

The index file
==============

Written by `save_index` in one piece through `fileio.atomic_write` (temp file,
fsync, rename, directory fsync).  All integers are unsigned big-endian.  The
blocks are stored as columns so that saving and loading run at C speed, with
no Python loop per entry or per sparse block.

    offset  size     field
    0       8        magic b"\x89RFX\r\n\x1a\n" (the data file's is b"\x89RFS\r\n\x1a\n")
    8       2        index format version: 1
    10      2        flags: 0 (a reader rejects any other value)
    12      16       file_id: the data file generation the index belongs to
    28      8        pos: end of the last transaction the index covers
    36      8        tid: tid of that transaction (8 zero bytes if none)
    44      8        count: number of entries (oids)
    52      4        D: number of dense blocks
    56      4        P: number of sparse blocks
    60      8*D      dense block keys (oid >> 8)
            1536*D   dense block payloads, same order: 256 positions of 6
                     bytes, suffix s at 6s; 0 means absent
            8*P      sparse block keys
            2*P      sparse block entry counts n_i, 1 <= n_i <= 256
            S        suffixes of the sparse blocks, block after block, each
                     block's strictly ascending (S = sum of the n_i)
            6*S      positions of the sparse blocks, same order
    end-4   4        crc32 (zlib.crc32) of every byte before it

Block keys are < 2**56, in any order, and no key appears twice (in either
list).  Every block holds at least one entry; no sparse position is 0; every
position is < pos; count is the number of nonzero dense positions plus S;
nothing lies between the last column and the crc.  The oid of an entry is
``key << 8 | suffix`` as 8 bytes.  A block's kind is a representation choice:
the writer emits sparse blocks of up to 219 entries and dense blocks of at
least 32, and the reader converts a sparse block of more than 219 entries to
dense and a dense one of fewer than 128 to sparse.

`load_index` returns None when the file does not exist and raises
`IndexFileError` (path, message, offset) for any other problem: bad magic,
other version, truncation, crc mismatch, or any rule above broken.  The
storage then rebuilds the index from the data file.
"""

from __future__ import annotations

import errno as _errno
import struct
import sys
import threading
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping
from itertools import accumulate, chain, compress, islice, repeat
from operator import add, eq, floordiv, ge, is_, itemgetter, lt, mul, ne, not_, or_, rshift, sub
from sys import getsizeof

from . import fileio
from .errors import IndexFileError, StorageIOError

__all__ = [
    "OidIndex",
    "save_index",
    "load_index",
    "INDEX_MAGIC",
    "INDEX_VERSION",
    "MAX_POS",
]

INDEX_MAGIC = b"\x89RFX\r\n\x1a\n"
INDEX_VERSION = 1
_DATA_MAGIC = b"\x89RFS\r\n\x1a\n"
MAX_POS = 2**48 - 1
"""The largest position an index entry can hold (6 bytes)."""

_KEY_LIMIT = 1 << 56
_DENSE_SIZE = 256 * 6                # bytes of a dense block: 256 positions
_SPARSE_MAX = _DENSE_SIZE // 7       # 219: most entries a sparse block holds
_DENSE_MIN = 128                     # a delete leaving fewer makes a dense block sparse
_EARLY_DENSE = 32                    # a sparse block holding suffixes 0..c-1, c >= this,
                                     # turns dense when one is appended (sequential oids)
_SMALL = 16                          # below this, plain loops beat the C-level tricks

_Z6 = bytes(6)
_BYTE = tuple(bytes((i,)) for i in range(256))
_R256 = range(256)
_ZEROS256 = (0,) * 256
_LITTLE = sys.byteorder == "little"
_fb = int.from_bytes
_join = b"".join

_HEADER = struct.Struct(">8sHH16sQ8sQII")
_HEADER_SIZE = _HEADER.size  # 60

if array("Q").itemsize != 8 or array("H").itemsize != 2:  # pragma: no cover
    raise ImportError("refstorage.index needs 8-byte array('Q') and 2-byte array('H')")


# -- packing helpers (C-speed: a fixed number of Python steps per call) --------------


def _pack6(values: Iterable[int]) -> bytearray:
    """The values (each < 2**48, not checked) as 6-byte big-endian."""
    a = array("Q", values)
    if _LITTLE:
        a.byteswap()
    raw = a.tobytes()
    n6 = 6 * len(a)
    out = bytearray(n6)
    for k in range(6):
        out[k:n6:6] = raw[k + 2::8]
    return out


def _unpack6(buf: bytes | bytearray) -> array:
    """6-byte big-endian values (len(buf) must be a multiple of 6) as array('Q')."""
    n6 = len(buf)
    raw = bytearray(n6 // 6 * 8)
    for k in range(6):
        raw[k + 2::8] = buf[k:n6:6]
    a = array("Q", raw)
    if _LITTLE:
        a.byteswap()
    return a


def _single_blocks(sufs: bytes, packed: bytes | bytearray) -> Iterator[bytes]:
    """One-entry sparse blocks (7 bytes each) from m suffixes and m packed 6-byte positions."""
    m = len(sufs)
    buf = bytearray(7 * m)
    buf[0::7] = sufs
    for k in range(6):
        buf[k + 1::7] = packed[k::6]
    raw = bytes(buf)
    return map(raw.__getitem__, map(slice, range(0, 7 * m, 7), range(7, 7 * m + 7, 7)))


def _be_array(code: str, raw: bytes) -> array:
    a = array(code, raw)
    if _LITTLE:
        a.byteswap()
    return a


def _be_bytes(code: str, values: Iterable[int]) -> bytes:
    a = array(code, values)
    if _LITTLE:
        a.byteswap()
    return a.tobytes()


def _dense_block(m: Mapping[int, int]) -> bytearray:
    """A dense block holding suffix -> position map `m` (1 <= len(m) <= 256)."""
    return _pack6(map(m.get, _R256, _ZEROS256))


def _sparse_block(m: Mapping[int, int]) -> bytes:
    """A sparse block holding suffix -> position map `m` (1 <= len(m) <= 219)."""
    sufs = sorted(m)
    if len(sufs) < _SMALL:
        return bytes(sufs) + b"".join([m[s].to_bytes(6, "big") for s in sufs])
    return bytes(sufs) + _pack6(map(m.__getitem__, sufs))


def _make_block(m: Mapping[int, int]) -> bytes | bytearray:
    return _dense_block(m) if len(m) > _SPARSE_MAX else _sparse_block(m)


def _block_map(block: bytes) -> dict[int, int]:
    """The suffix -> position map a sparse block holds."""
    c = len(block) // 7
    if c < _SMALL:
        return {block[j]: _fb(block[c + 6 * j:c + 6 * j + 6], "big") for j in range(c)}
    return dict(zip(block[:c], _unpack6(block[c:]), strict=True))


def _merge(old: bytes | bytearray, gs: bytes, gp: list[int]) -> tuple[bytes | bytearray, int]:
    """A new block: `old` with suffixes `gs` set to positions `gp`; and how many entries it gained."""
    if len(old) == _DENSE_SIZE:
        old_arr = _unpack6(old)
        full = array("Q", map(dict(zip(gs, gp, strict=True)).get, _R256, old_arr))
        return _pack6(full), old_arr.count(0) - full.count(0)
    m = _block_map(old)
    before = len(m)
    m.update(zip(gs, gp, strict=True))
    return _make_block(m), len(m) - before


def _bad_pos(pos: object) -> bool:
    return not (isinstance(pos, int) and 0 < pos <= MAX_POS)


def _first_from(b: bytes | bytearray | None, low: int) -> int:
    """The smallest suffix >= `low` present in block `b`, or -1."""
    if b is None:
        return -1
    if len(b) == _DENSE_SIZE:
        for s, p in enumerate(_unpack6(b)[low:], low):
            if p:
                return s
        return -1
    for s in b[:len(b) // 7]:
        if s >= low:
            return s
    return -1


class OidIndex:
    """A compact map from 8-byte oids to file positions (``0 < pos < 2**48``).

    Behaves like a dict restricted to those keys and values; iteration is in
    ascending oid order.  See the module docstring for layout and threading.
    """

    __slots__ = ("_blocks", "_len", "_maxkey", "_skeys", "_skeys_lock")

    def __init__(self, pairs: Mapping[bytes, int] | Iterable[tuple[bytes, int]] | None = None):
        self._blocks: dict[int, bytes | bytearray] = {}
        self._len = 0
        # Largest block key; -1 when empty; None when unknown (recomputed on demand).
        self._maxkey: int | None = -1
        # The block keys in ascending order, for min_key; None when unknown (built
        # on demand).  Only ever extended at its end in place, so a reader holding
        # the list sees a consistent, ascending snapshot.  May hold keys whose
        # block has since been deleted (min_key skips them).
        self._skeys: list[int] | None = []
        self._skeys_lock = threading.Lock()
        if pairs is not None:
            self.update(pairs)

    # -- reading (safe from any thread) ------------------------------------------------

    def get(self, oid: bytes, default=None):
        """The position of `oid`, or `default` if it is absent."""
        if len(oid) != 8:
            return default
        n = _fb(oid, "big")
        b = self._blocks.get(n >> 8)
        if b is None:
            return default
        if len(b) == _DENSE_SIZE:
            i = (n & 255) * 6
            p = _fb(b[i:i + 6], "big")
            return p if p else default
        c = len(b) // 7
        j = b.find(n & 255, 0, c)
        if j < 0:
            return default
        i = c + 6 * j
        return _fb(b[i:i + 6], "big")

    def __getitem__(self, oid: bytes) -> int:
        """The position of `oid`; KeyError if it is absent."""
        if len(oid) == 8:
            n = _fb(oid, "big")
            b = self._blocks.get(n >> 8)
            if b is not None:
                if len(b) == _DENSE_SIZE:
                    i = (n & 255) * 6
                    p = _fb(b[i:i + 6], "big")
                    if p:
                        return p
                else:
                    c = len(b) // 7
                    j = b.find(n & 255, 0, c)
                    if j >= 0:
                        i = c + 6 * j
                        return _fb(b[i:i + 6], "big")
        raise KeyError(oid)

    def __contains__(self, oid: object) -> bool:
        try:
            return self.get(oid) is not None  # type: ignore[arg-type]
        except TypeError:
            return False

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"<OidIndex of {self._len} oids in {len(self._blocks)} blocks>"

    # -- writing (one writer thread) -----------------------------------------------------

    def __setitem__(self, oid: bytes, pos: int) -> None:
        """Map `oid` (8 bytes) to `pos` (``0 < pos < 2**48``); ValueError otherwise."""
        if type(oid) is not bytes or len(oid) != 8:
            raise ValueError(f"an oid is 8 bytes, not {oid!r}")
        if type(pos) is not int or not 0 < pos <= MAX_POS:
            if not isinstance(pos, int) or not 0 < pos <= MAX_POS:
                raise ValueError(f"position {pos!r} of oid {oid.hex()} is not in 1..2**48-1")
            pos = int(pos)
        n = _fb(oid, "big")
        key = n >> 8
        s = n & 255
        pb = pos.to_bytes(6, "big")
        blocks = self._blocks
        b = blocks.get(key)
        if b is None:
            blocks[key] = _BYTE[s] + pb
            self._len += 1
            mk = self._maxkey
            if mk is not None and key > mk:
                self._maxkey = key
            self._note_new_keys((key,))
            return
        if len(b) == _DENSE_SIZE:
            i = s * 6
            added = b.startswith(_Z6, i)
            b[i:i + 6] = pb
            if added:
                self._len += 1
            return
        c = len(b) // 7
        j = bisect_left(b, s, 0, c)
        i = c + 6 * j
        if j < c and b[j] == s:
            blocks[key] = _join((b[:i], pb, b[i + 6:]))
            return
        if c >= _SPARSE_MAX or (c >= _EARLY_DENSE and j == c and b[c - 1] == c - 1):
            m = _block_map(b)
            m[s] = pos
            blocks[key] = _dense_block(m)
        else:
            blocks[key] = _join((b[:j], _BYTE[s], b[j:i], pb, b[i:]))
        self._len += 1

    def __delitem__(self, oid: bytes) -> None:
        """Remove `oid`; KeyError if it is absent."""
        if type(oid) is not bytes or len(oid) != 8:
            raise KeyError(oid)
        n = _fb(oid, "big")
        key = n >> 8
        s = n & 255
        blocks = self._blocks
        b = blocks.get(key)
        if b is None:
            raise KeyError(oid)
        if len(b) == _DENSE_SIZE:
            i = s * 6
            if b[i:i + 6] == _Z6:
                raise KeyError(oid)
            arr = _unpack6(b)
            if 255 - arr.count(0) < _DENSE_MIN:
                arr[s] = 0
                blocks[key] = _sparse_block(dict(zip(compress(_R256, arr), compress(arr, arr), strict=True)))
            else:
                b[i:i + 6] = _Z6
        else:
            c = len(b) // 7
            j = b.find(s, 0, c)
            if j < 0:
                raise KeyError(oid)
            if c == 1:
                del blocks[key]
                if key == self._maxkey:
                    self._maxkey = None
            else:
                i = c + 6 * j
                blocks[key] = _join((b[:j], b[j + 1:i], b[i + 6:]))
        self._len -= 1

    def update(self, pairs: Mapping[bytes, int] | Iterable[tuple[bytes, int]]) -> None:
        """Set many entries: a mapping or an iterable of (oid, pos) pairs (later pairs win).

        Everything is checked before anything changes: on ValueError the index
        is untouched.  From 16 entries on, the entries are grouped per block and
        each block is built once, with C-level passes over the entries: for
        dense oids about 3 times faster than setting them one by one.
        """
        if isinstance(pairs, dict):
            if len(pairs) == 1:  # the common single-object commit: __setitem__ checks it
                for oid, pos in pairs.items():
                    self[oid] = pos
                return
            d = pairs
        elif hasattr(pairs, "items"):
            d = dict(pairs.items())  # type: ignore[union-attr]
        else:
            d = dict(pairs)
        if not d:
            return
        oids = list(d)
        if set(map(type, oids)) != {bytes} or set(map(len, oids)) != {8}:
            bad = next(o for o in oids if type(o) is not bytes or len(o) != 8)
            raise ValueError(f"an oid is 8 bytes, not {bad!r}")
        try:
            poss = array("Q", d.values())
            ok = min(poss) > 0 and max(poss) <= MAX_POS
        except (TypeError, OverflowError):
            ok = False
        if not ok:
            oid, pos = next((o, p) for o, p in d.items() if _bad_pos(p))
            raise ValueError(f"position {pos!r} of oid {oid.hex()} is not in 1..2**48-1")
        if len(d) < _SMALL:
            for oid, pos in zip(oids, poss, strict=True):
                self[oid] = pos
            return
        self._bulk_update(oids, _join(oids), poss.tolist())

    def update_log_order(self, entries: list[tuple[bytes, int]]) -> None:
        """Set (oid, pos) entries given in log order: where an oid repeats, the last wins.

        An index rebuild's path.  When the oids strictly increase (a bulk load:
        no repeats), the entries go to the block builder without the dict
        `update` would make of them first."""
        oids = list(map(itemgetter(0), entries))
        if len(oids) < _SMALL or not all(map(lt, oids, islice(oids, 1, None))):
            self.update(dict(entries))
            return
        if set(map(type, oids)) != {bytes} or set(map(len, oids)) != {8}:
            self.update(dict(entries))  # raises ValueError naming the bad oid
            return
        try:
            poss = array("Q", map(itemgetter(1), entries))
            ok = min(poss) > 0 and max(poss) <= MAX_POS
        except (TypeError, OverflowError):
            ok = False
        if not ok:
            self.update(dict(entries))  # raises ValueError naming the bad position
            return
        self._bulk_update(oids, _join(oids), poss.tolist(), ascending=True)

    def _bulk_update(self, oids: list[bytes], joined: bytes, poss: list[int],
                     ascending: bool = False) -> None:
        """Set `oids` (distinct, 8 bytes; `joined` is their concatenation) to `poss`.

        `ascending`: the caller has checked that the oids strictly increase.

        Per entry only C-level passes (map, zip, compress...) run; Python code
        runs per block.  Every block is built completely, then stored.
        """
        total = len(oids)
        keys = list(map(rshift, map(_fb, oids, repeat("big")), repeat(8)))
        sufs = joined[7::8]
        if not ascending and not all(map(lt, oids, islice(oids, 1, None))):
            # The sparse case: no two oids share a block, so each makes a block alone.
            singles = dict(zip(keys, _single_blocks(sufs, _pack6(poss)), strict=True))
            if len(singles) == total:
                self._add_blocks(singles, total)
                return
            del singles
            order = sorted(range(total), key=oids.__getitem__)
            keys = list(map(keys.__getitem__, order))
            sufs = bytes(map(sufs.__getitem__, order))
            poss = list(map(poss.__getitem__, order))
        # The entries of a block are now adjacent: runs of equal keys.
        starts = list(compress(range(total), map(ne, keys, chain((-1,), keys))))
        ends = [*islice(starts, 1, None), total]
        gkeys = list(map(keys.__getitem__, starts))
        single = list(map(eq, map(sub, ends, starts), repeat(1)))
        single_at = list(compress(starts, single))
        new = dict(zip(compress(gkeys, single),
                       _single_blocks(bytes(map(sufs.__getitem__, single_at)),
                                      _pack6(map(poss.__getitem__, single_at))),
                       strict=True))
        added = len(new)
        blocks = self._blocks
        for k, st, en in compress(zip(gkeys, starts, ends, strict=True), map(not_, single)):
            gs = sufs[st:en]
            gp = poss[st:en]
            c = en - st
            if k in blocks:
                new[k], delta = _merge(blocks[k], gs, gp)
                added += delta
            elif c <= _SPARSE_MAX:
                new[k] = gs + (_pack6(gp) if c >= _SMALL else _join(map(int.to_bytes, gp, repeat(6),
                                                                       repeat("big"))))
                added += c
            elif c == 256:
                new[k] = _pack6(gp)
                added += c
            else:
                new[k] = _dense_block(dict(zip(gs, gp, strict=True)))
                added += c
        self._add_blocks(new, added)

    def _add_blocks(self, new: dict[int, bytes | bytearray], added: int) -> None:
        """Store finished blocks; one-entry blocks whose key is taken are merged first."""
        blocks = self._blocks
        if blocks:
            for k in new.keys() & blocks.keys():
                b = new[k]
                if len(b) == 7:  # a one-entry block built without looking at `blocks`
                    new[k], delta = _merge(blocks[k], b[:1], [_fb(b[1:], "big")])
                    added += delta - 1
            fresh = new.keys() - blocks.keys()
        else:
            fresh = new.keys()
        if blocks:
            blocks.update(new)  # one C-level step: readers see each block old or new
        else:
            self._blocks = new
        self._len += added
        mk = self._maxkey
        if mk is not None:
            top = max(new)
            if top > mk:
                self._maxkey = top
        if fresh:
            self._note_new_keys(fresh)

    def _note_new_keys(self, fresh: Iterable[int]) -> None:
        """Block keys `fresh` were just added to the blocks: keep the sorted keys true.

        Called after the blocks were stored, so a reader that rebuilt the list
        meanwhile may hold them already: the list is extended only with keys
        above its last one, otherwise dropped (rebuilt by the next min_key)."""
        with self._skeys_lock:
            skeys = self._skeys
            if skeys is None:
                return
            fresh = sorted(fresh)
            if not skeys or fresh[0] > skeys[-1]:
                skeys.extend(fresh)
            else:
                self._skeys = None

    def _sorted_keys(self) -> list[int]:
        """The block keys in ascending order (a snapshot that only grows at its end)."""
        skeys = self._skeys
        if skeys is None:
            with self._skeys_lock:
                skeys = self._skeys
                if skeys is None:
                    # sorted() copies the keys in one C-level step (no other
                    # thread runs meanwhile: int keys hash and compare in C)
                    skeys = self._skeys = sorted(self._blocks)
        return skeys

    def clear(self) -> None:
        """Remove every entry."""
        self._blocks = {}
        self._len = 0
        self._maxkey = -1
        with self._skeys_lock:
            self._skeys = []

    # -- whole-index queries (writer thread, or no writer running) ---------------------

    def _sorted_blocks(self) -> Iterator[tuple[int, bytes | bytearray]]:
        blocks = self._blocks
        for key in sorted(blocks):
            b = blocks.get(key)
            if b is not None:
                yield key, b

    def items(self) -> Iterator[tuple[bytes, int]]:
        """(oid, pos) pairs in ascending oid order."""
        for key, b in self._sorted_blocks():
            base = key << 8
            if len(b) == _DENSE_SIZE:
                arr = _unpack6(b)
                for s, p in zip(compress(_R256, arr), compress(arr, arr), strict=True):
                    yield (base | s).to_bytes(8, "big"), p
            else:
                c = len(b) // 7
                if c == 1:
                    yield (base | b[0]).to_bytes(8, "big"), _fb(b[1:], "big")
                else:
                    for s, p in zip(b[:c], _unpack6(b[c:]), strict=True):
                        yield (base | s).to_bytes(8, "big"), p

    def __iter__(self) -> Iterator[bytes]:
        """The oids in ascending order."""
        for key, b in self._sorted_blocks():
            base = key << 8
            if len(b) == _DENSE_SIZE:
                sufs: Iterable[int] = compress(_R256, _unpack6(b))
            else:
                sufs = b[:len(b) // 7]
            for s in sufs:
                yield (base | s).to_bytes(8, "big")

    def keys(self) -> Iterator[bytes]:
        """The oids in ascending order (same as iterating)."""
        return iter(self)

    def max_oid(self) -> bytes | None:
        """The largest oid present, or None if the index is empty."""
        blocks = self._blocks
        mk = self._maxkey
        if mk is None:
            mk = self._maxkey = max(blocks, default=-1)
        if mk < 0:
            return None
        b = blocks[mk]
        if len(b) == _DENSE_SIZE:
            s = max(compress(_R256, _unpack6(b)))
        else:
            s = b[len(b) // 7 - 1]
        return ((mk << 8) | s).to_bytes(8, "big")

    def min_key(self, oid: bytes) -> bytes | None:
        """The smallest oid present that is >= `oid`, or None (record_iternext).

        Safe beside a writer thread: it never iterates the live block dict,
        and finds the next block by bisection (O(log n) per gap)."""
        n = _fb(oid, "big")
        blocks = self._blocks
        key, low = n >> 8, n & 255
        found = _first_from(blocks.get(key), low)
        if found >= 0:
            return ((key << 8) | found).to_bytes(8, "big")
        skeys = self._sorted_keys()
        for i in range(bisect_right(skeys, key), len(skeys)):
            k = skeys[i]
            found = _first_from(blocks.get(k), 0)
            if found >= 0:
                return ((k << 8) | found).to_bytes(8, "big")
        return None

    def copy(self) -> OidIndex:
        """An independent copy (sparse blocks are immutable and shared)."""
        new = OidIndex()
        new._blocks = {k: (bytearray(b) if type(b) is bytearray else b) for k, b in self._blocks.items()}
        new._len = self._len
        new._maxkey = self._maxkey
        new._skeys = None
        return new

    def memory_bytes(self) -> int:
        """Memory used: sys.getsizeof of the dict, its int keys and every block."""
        blocks = self._blocks
        return getsizeof(blocks) + sum(map(getsizeof, blocks)) + sum(map(getsizeof, blocks.values()))

    def block_stats(self) -> dict[str, int]:
        """Numbers of dense and sparse blocks (for tests and diagnostics)."""
        dense = sum(map(is_, map(type, self._blocks.values()), repeat(bytearray)))
        return {"dense": dense, "sparse": len(self._blocks) - dense, "entries": self._len}

    def _check(self) -> None:
        """Verify every internal invariant; AssertionError naming the first violation."""

        def fail(msg: str) -> None:
            raise AssertionError(msg)

        total = 0
        for key, b in self._blocks.items():
            if type(key) is not int or not 0 <= key < _KEY_LIMIT:
                fail(f"bad block key {key!r}")
            if type(b) is bytearray:
                if len(b) != _DENSE_SIZE:
                    fail(f"dense block {key:#x} has {len(b)} bytes, not {_DENSE_SIZE}")
                count = 256 - _unpack6(b).count(0)
                if count < _EARLY_DENSE:
                    fail(f"dense block {key:#x} holds {count} < {_EARLY_DENSE} entries")
            elif type(b) is bytes:
                if len(b) % 7:
                    fail(f"sparse block {key:#x} has {len(b)} bytes, not a multiple of 7")
                count = len(b) // 7
                if not 1 <= count <= _SPARSE_MAX:
                    fail(f"sparse block {key:#x} holds {count} entries, not 1..{_SPARSE_MAX}")
                sufs = b[:count]
                if any(map(ge, sufs, sufs[1:])):
                    fail(f"sparse block {key:#x} suffixes not strictly ascending: {sufs.hex()}")
                if 0 in _unpack6(b[count:]):
                    fail(f"sparse block {key:#x} stores a zero position")
            else:
                fail(f"block {key:#x} is a {type(b).__name__}")
            total += count
        if total != self._len:
            fail(f"blocks hold {total} entries but the running count says {self._len}")
        if self._maxkey is not None and self._maxkey != max(self._blocks, default=-1):
            fail(f"cached max key {self._maxkey} != {max(self._blocks, default=-1)}")
        skeys = self._skeys
        if skeys is not None:
            if any(a >= b for a, b in zip(skeys, skeys[1:], strict=False)):
                fail("the sorted block keys do not strictly increase")
            missing = self._blocks.keys() - set(skeys)
            if missing:
                fail(f"blocks {sorted(missing)[:5]} are missing from the sorted block keys")

    @classmethod
    def _from_blocks(cls, blocks: dict[int, bytes | bytearray], count: int) -> OidIndex:
        new = cls()
        new._blocks = blocks
        new._len = count
        new._maxkey = None
        new._skeys = None
        return new


# -- the index file ---------------------------------------------------------------------


def save_index(path: str, index: OidIndex, *, file_id: bytes, pos: int, tid: bytes) -> None:
    """Write `index` to `path` atomically (see the module docstring for the format).

    `pos` is the end of the last transaction the index covers and `tid` its tid.
    The index must not change meanwhile.  ValueError if an argument is malformed
    or an entry's position is not below `pos` (a caller bug: the file would be
    refused on load).
    """
    if type(file_id) is not bytes or len(file_id) != 16:
        raise ValueError(f"file_id is 16 bytes, not {file_id!r}")
    if type(tid) is not bytes or len(tid) != 8:
        raise ValueError(f"tid is 8 bytes, not {tid!r}")
    if not isinstance(pos, int) or not 0 <= pos < 1 << 64:
        raise ValueError(f"pos {pos!r} is not a u64")
    blocks = index._blocks
    keys = list(blocks)
    bl = list(blocks.values())
    isdense = list(map(is_, map(type, bl), repeat(bytearray)))
    if any(isdense):
        isparse = list(map(not_, isdense))
        dkeys = list(compress(keys, isdense))
        dpay = _join(compress(bl, isdense))
        skeys = list(compress(keys, isparse))
        sparse = list(compress(bl, isparse))
    else:
        dkeys, dpay, skeys, sparse = [], b"", keys, bl
    del keys, bl, isdense
    scounts = list(map(floordiv, map(len, sparse), repeat(7)))
    if len(sparse) * 7 == sum(map(len, sparse)):
        # One entry per sparse block: split the 7-byte blocks into the two columns.
        raw = _join(sparse)
        ssufs = raw[0::7]
        out = bytearray(6 * len(ssufs))
        for k in range(6):
            out[k::6] = raw[k + 1::7]
        spos: bytes | bytearray = out
    else:
        ssufs = _join(map(bytes.__getitem__, sparse, map(slice, scounts)))
        spos = _join(map(bytes.__getitem__, sparse, map(slice, scounts, repeat(None))))
    darr = _unpack6(dpay)
    count = len(darr) - darr.count(0) + len(ssufs)
    top = max(max(darr, default=0), max(_unpack6(spos), default=0))
    if count and top >= pos:
        raise ValueError(f"the index holds position {top}, not below its end position {pos}")
    header = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 0, file_id, pos, tid, count, len(dkeys), len(skeys))
    chunks = [header, _be_bytes("Q", dkeys), dpay, _be_bytes("Q", skeys), _be_bytes("H", scounts),
              ssufs, spos]
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    chunks.append(crc.to_bytes(4, "big"))
    fileio.atomic_write(path, chunks, point_prefix="index.save")


def load_index(path: str) -> tuple[OidIndex, bytes, int, bytes] | None:
    """Read an index file: (index, file_id, pos, tid), or None if it does not exist.

    Any other problem (unreadable, damaged, another format or version) raises
    IndexFileError; the caller then rebuilds the index from the data file.
    """
    path = str(path)
    try:
        data = fileio.read_whole(path)
    except StorageIOError as exc:
        if exc.errno == _errno.ENOENT:
            return None
        raise IndexFileError(path, f"cannot read the index file: {exc.detail}", exc.offset) from exc
    try:
        return _decode(path, data)
    except IndexFileError:
        raise
    except (ArithmeticError, LookupError, ValueError, TypeError, struct.error, AssertionError) as exc:
        # Every check above should have caught the problem; never let a raw error escape.
        raise IndexFileError(path, f"undecodable index file ({exc!r})") from exc


def _decode(path: str, data: bytes) -> tuple[OidIndex, bytes, int, bytes]:
    def bad(message: str, offset: int | None = None) -> IndexFileError:
        return IndexFileError(path, message, offset)

    size = len(data)
    if data[:8] != INDEX_MAGIC[:size]:
        if data.startswith(_DATA_MAGIC):
            raise bad("is a refstorage data file, not an index file", 0)
        raise bad("not a refstorage index file (bad magic)", 0)
    if size < _HEADER_SIZE + 4:
        raise bad(f"truncated: {size} bytes, shorter than the {_HEADER_SIZE + 4}-byte minimum", size)
    magic, version, flags, file_id, pos, tid, count, nd, ns = _HEADER.unpack_from(data)
    if version != INDEX_VERSION:
        raise bad(f"index format version {version}, this code reads {INDEX_VERSION}", 8)
    end = size - 4
    if zlib.crc32(memoryview(data)[:end]) != _fb(data[end:], "big"):
        raise bad("checksum mismatch (the file is truncated or damaged)", end)
    if flags:
        raise bad(f"unknown flags {flags:#x}", 10)

    off = _HEADER_SIZE

    def take(n: int, what: str) -> bytes:
        nonlocal off
        if n > end - off:
            raise bad(f"{what}: {n} bytes needed, {end - off} left before the checksum", off)
        start = off
        off += n
        return data[start:off]

    dkeys = _be_array("Q", take(8 * nd, "dense block keys"))
    dpay_at = off
    dpay = take(_DENSE_SIZE * nd, "dense block payloads")
    skeys_at = off
    skeys = _be_array("Q", take(8 * ns, "sparse block keys"))
    scounts_at = off
    scounts = _be_array("H", take(2 * ns, "sparse block counts"))
    if scounts and not (min(scounts) >= 1 and max(scounts) <= 256):
        raise bad("a sparse block count is not in 1..256", scounts_at)
    nsp = sum(scounts)
    ssufs_at = off
    ssufs = take(nsp, "sparse suffixes")
    spos_at = off
    spos = take(6 * nsp, "sparse positions")
    if off != end:
        raise bad(f"{end - off} unexpected bytes before the checksum", off)
    if max(dkeys, default=0) >= _KEY_LIMIT:
        raise bad("a dense block key is not below 2**56", _HEADER_SIZE)
    if max(skeys, default=0) >= _KEY_LIMIT:
        raise bad("a sparse block key is not below 2**56", skeys_at)

    # Dense blocks: per-block entry counts, none empty.
    darr = _unpack6(dpay)
    dcounts = [256 - darr[i:i + 256].count(0) for i in range(0, 256 * nd, 256)]
    if dcounts and min(dcounts) == 0:
        raise bad("an empty dense block", dpay_at + _DENSE_SIZE * dcounts.index(0))

    sarr = _unpack6(spos)
    if 0 in sarr:
        raise bad("a sparse entry has position 0", spos_at + 6 * sarr.index(0))
    total = sum(dcounts) + nsp
    if total != count:
        raise bad(f"the header counts {count} entries but the blocks hold {total}", 44)
    top = max(max(darr, default=0), max(sarr, default=0))
    if total and top >= pos:
        raise bad(f"position {top} is not below the index's end position {pos}", 28)

    if nsp == ns:
        # Every sparse block holds one entry (the common sparse case).
        sparse: Iterable[bytes] = _single_blocks(ssufs, spos)
    else:
        # Within each block the suffixes strictly ascend: every entry but a block's
        # first is above the one before it.
        firsts = chain.from_iterable(map(chain, repeat((True,)), map(repeat, repeat(False),
                                                                     map(sub, scounts, repeat(1)))))
        if not all(map(or_, islice(firsts, 1, None), map(lt, ssufs, islice(ssufs, 1, None)))):
            raise bad("sparse block suffixes are not strictly ascending", ssufs_at)
        ends = list(accumulate(scounts))
        starts = [0, *islice(ends, len(ends) - 1)]
        pslices = map(slice, map(mul, starts, repeat(6)), map(mul, ends, repeat(6)))
        sparse = map(add, map(ssufs.__getitem__, map(slice, starts, ends)), map(spos.__getitem__, pslices))
    blocks: dict[int, bytes | bytearray] = dict(zip(skeys.tolist(), sparse, strict=True))
    if scounts and max(scounts) > _SPARSE_MAX:
        for key, c in zip(skeys.tolist(), scounts, strict=True):
            if c > _SPARSE_MAX:
                blocks[key] = _dense_block(_block_map(blocks[key]))
    for i, (key, c) in enumerate(zip(dkeys.tolist(), dcounts, strict=True)):
        if c < _DENSE_MIN:
            arr = darr[256 * i:256 * (i + 1)]
            blocks[key] = _sparse_block(dict(zip(compress(_R256, arr), compress(arr, arr), strict=True)))
        else:
            blocks[key] = bytearray(dpay[_DENSE_SIZE * i:_DENSE_SIZE * (i + 1)])
    if len(blocks) != nd + ns:
        raise bad("a block key appears twice", _HEADER_SIZE)
    return OidIndex._from_blocks(blocks, total), file_id, pos, tid
