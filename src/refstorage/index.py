"""The in-memory oid -> file position index (`OidIndex`).

In memory
=========

`OidIndex` maps an 8-byte big-endian oid to a file position ``0 < pos < 2**48``
(position 0 is never a record: the data file starts with its 1024-byte header).
Oids are grouped in blocks of 256 by ``key = oid_int >> 8``; a dict maps each
key to one block object, in one of two forms:

* dense: a ``bytearray`` of 256 * 6 = 1536 bytes, the 6-byte big-endian
  position of suffix ``s = oid_int & 255`` at ``[6s:6s+6]`` (all zero = absent);
  or, as loaded from the index file (`indexfile.load_index`), a read-only
  ``memoryview`` of those 1536 bytes inside the file's memory map, never
  changed: the first change of such a block stores a ``bytearray`` copy of it
  in its place (copy on write, so an open copies nothing);
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
6-byte slice assignment of the same size (atomic under the GIL), and a
read-only dense view is replaced by its changed copy in one dict assignment; a conversion,
or `update`, builds new blocks completely before storing them (`update` stores
them all with one ``dict.update``).  `items`, `__iter__`, `max_oid`, `copy`,
`blocks` and `indexfile.save_index` must not run concurrently with the writer
(the storage calls them under its commit lock or its readers' lock).

The index file that caches it is read and written by `refstorage.indexfile`
(its format is in docs/format.md).
"""

from __future__ import annotations

import sys
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain, compress, islice, repeat
from operator import eq, ge, itemgetter, lt, ne, not_, rshift, sub
from sys import getsizeof

__all__ = ["OidIndex", "MAX_POS"]

MAX_POS = 2**48 - 1
"""The largest position an index entry can hold (6 bytes)."""

# The block representation (also used by the index-file codec, indexfile.py):
KEY_LIMIT = 1 << 56                  # block keys (oid >> 8) are below this
DENSE_SIZE = 256 * 6                 # bytes of a dense block: 256 positions
SPARSE_MAX = DENSE_SIZE // 7         # 219: most entries a sparse block holds
DENSE_MIN = 128                      # a delete leaving fewer makes a dense block sparse
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

if array("Q").itemsize != 8 or array("H").itemsize != 2:  # pragma: no cover
    raise ImportError("refstorage.index needs 8-byte array('Q') and 2-byte array('H')")


# -- packing helpers (C-speed: a fixed number of Python steps per call) --------------


def pack6(values: Iterable[int]) -> bytearray:
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


def unpack6(buf: bytes | bytearray) -> array:
    """6-byte big-endian values (len(buf) must be a multiple of 6) as array('Q')."""
    n6 = len(buf)
    raw = bytearray(n6 // 6 * 8)
    for k in range(6):
        raw[k + 2::8] = buf[k:n6:6]
    a = array("Q", raw)
    if _LITTLE:
        a.byteswap()
    return a








def single_blocks(sufs: bytes, packed: bytes | bytearray) -> Iterator[bytes]:
    """One-entry sparse blocks (7 bytes each) from m suffixes and m packed 6-byte positions."""
    m = len(sufs)
    buf = bytearray(7 * m)
    buf[0::7] = sufs
    for k in range(6):
        buf[k + 1::7] = packed[k::6]
    raw = bytes(buf)
    return map(raw.__getitem__, map(slice, range(0, 7 * m, 7), range(7, 7 * m + 7, 7)))


def dense_block(m: Mapping[int, int]) -> bytearray:
    """A dense block holding suffix -> position map `m` (1 <= len(m) <= 256)."""
    return pack6(map(m.get, _R256, _ZEROS256))


def sparse_block(m: Mapping[int, int]) -> bytes:
    """A sparse block holding suffix -> position map `m` (1 <= len(m) <= 219)."""
    sufs = sorted(m)
    if len(sufs) < _SMALL:
        return bytes(sufs) + b"".join([m[s].to_bytes(6, "big") for s in sufs])
    return bytes(sufs) + pack6(map(m.__getitem__, sufs))


def _make_block(m: Mapping[int, int]) -> bytes | bytearray:
    return dense_block(m) if len(m) > SPARSE_MAX else sparse_block(m)


def block_map(block: bytes) -> dict[int, int]:
    """The suffix -> position map a sparse block holds."""
    c = len(block) // 7
    if c < _SMALL:
        return {block[j]: _fb(block[c + 6 * j:c + 6 * j + 6], "big") for j in range(c)}
    return dict(zip(block[:c], unpack6(block[c:]), strict=True))


def _merge(old: bytes | bytearray, gs: bytes, gp: list[int]) -> tuple[bytes | bytearray, int]:
    """A new block: `old` with suffixes `gs` set to positions `gp`; and how many entries it gained."""
    if len(old) == DENSE_SIZE:
        old_arr = unpack6(old)
        full = array("Q", map(dict(zip(gs, gp, strict=True)).get, _R256, old_arr))
        return pack6(full), old_arr.count(0) - full.count(0)
    m = block_map(old)
    before = len(m)
    m.update(zip(gs, gp, strict=True))
    return _make_block(m), len(m) - before


def _bad_pos(pos: object) -> bool:
    return not (isinstance(pos, int) and 0 < pos <= MAX_POS)


def _first_from(b: bytes | bytearray | None, low: int) -> int:
    """The smallest suffix >= `low` present in block `b`, or -1."""
    if b is None:
        return -1
    if len(b) == DENSE_SIZE:
        for s, p in enumerate(unpack6(b)[low:], low):
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
        if len(b) == DENSE_SIZE:
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
                if len(b) == DENSE_SIZE:
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
        if len(b) == DENSE_SIZE:
            i = s * 6
            if type(b) is bytearray:
                added = b.startswith(_Z6, i)
                b[i:i + 6] = pb
            else:  # a read-only view loaded from the index file: changed in a copy
                added = b[i:i + 6] == _Z6
                b = bytearray(b)
                b[i:i + 6] = pb
                blocks[key] = b
            if added:
                self._len += 1
            return
        c = len(b) // 7
        j = bisect_left(b, s, 0, c)
        i = c + 6 * j
        if j < c and b[j] == s:
            blocks[key] = _join((b[:i], pb, b[i + 6:]))
            return
        if c >= SPARSE_MAX or (c >= _EARLY_DENSE and j == c and b[c - 1] == c - 1):
            m = block_map(b)
            m[s] = pos
            blocks[key] = dense_block(m)
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
        if len(b) == DENSE_SIZE:
            i = s * 6
            if b[i:i + 6] == _Z6:
                raise KeyError(oid)
            arr = unpack6(b)
            if 255 - arr.count(0) < DENSE_MIN:
                arr[s] = 0
                blocks[key] = sparse_block(dict(zip(compress(_R256, arr), compress(arr, arr), strict=True)))
            elif type(b) is bytearray:
                b[i:i + 6] = _Z6
            else:  # a read-only view loaded from the index file: changed in a copy
                b = bytearray(b)
                b[i:i + 6] = _Z6
                blocks[key] = b
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

    def update_table(self, raw: bytes | bytearray) -> None:
        """Set the entries of `raw`, oid tables' entries in log order (where an oid repeats, the last wins).

        `raw` is the concatenation of 16-byte entries, an 8-byte oid then its
        8-byte big-endian position (the data file's oid table, see
        docs/format.md): the open-time scan's batch.  The entries are handled
        as arrays (8 bytes an oid, 8 a position, plus transient lists of ints
        when the oids are not ascending), never as a Python tuple per entry.
        ValueError (index untouched) for a position not in 1..2**48-1."""
        n, rest = divmod(len(raw), 16)
        if rest:
            raise ValueError(f"a table of {len(raw)} bytes is not made of 16-byte entries")
        if n < _SMALL:
            self.update_log_order([(bytes(raw[i:i + 8]), _fb(raw[i + 8:i + 16], "big"))
                                   for i in range(0, 16 * n, 16)])
            return
        joined = bytearray(8 * n)
        packed = bytearray(8 * n)
        for k in range(8):
            joined[k::8] = raw[k::16]
            packed[k::8] = raw[8 + k::16]
        oa = array("Q", joined)
        poss = array("Q", packed)
        del packed
        if _LITTLE:
            oa.byteswap()
            poss.byteswap()
        if not (min(poss) > 0 and max(poss) <= MAX_POS):
            i = next(i for i, p in enumerate(poss) if not 0 < p <= MAX_POS)
            oid = joined[8 * i:8 * i + 8].hex()
            raise ValueError(f"position {poss[i]} of oid {oid} is not in 1..2**48-1")
        if not all(map(lt, oa, islice(oa, 1, None))):
            # sort by oid (stable: an oid's entries stay in log order), keep each run's last
            order = sorted(range(n), key=oa.__getitem__)
            so = array("Q", map(oa.__getitem__, order))
            order = list(compress(order, chain(map(ne, so, islice(so, 1, None)), (True,))))
            del so
            oa = array("Q", map(oa.__getitem__, order))
            poss = array("Q", map(poss.__getitem__, order))
            del order
            be = array("Q", oa)
            if _LITTLE:
                be.byteswap()
            joined = be.tobytes()
            del be
        keys = array("Q", map(rshift, oa, repeat(8)))
        del oa
        self._bulk_update(None, bytes(joined), poss, ascending=True, keys=keys)

    def _bulk_update(self, oids: list[bytes] | None, joined: bytes, poss: list[int] | array,
                     ascending: bool = False, keys: array | None = None) -> None:
        """Set `oids` (distinct, 8 bytes; `joined` is their concatenation) to `poss`.

        `ascending`: the caller has checked that the oids strictly increase.
        `keys`: their block keys, given by a caller that has them (then `oids`
        may be None, and `ascending` must be true).

        Per entry only C-level passes (map, zip, compress...) run; Python code
        runs per block.  Every block is built completely, then stored.
        """
        total = len(poss)
        if keys is None:
            keys = list(map(rshift, map(_fb, oids or (), repeat("big")), repeat(8)))
        sufs = joined[7::8]
        if not ascending and oids is not None and not all(map(lt, oids, islice(oids, 1, None))):
            # The sparse case: no two oids share a block, so each makes a block alone.
            singles = dict(zip(keys, single_blocks(sufs, pack6(poss)), strict=True))
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
                       single_blocks(bytes(map(sufs.__getitem__, single_at)),
                                      pack6(map(poss.__getitem__, single_at))),
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
            elif c <= SPARSE_MAX:
                new[k] = gs + (pack6(gp) if c >= _SMALL else _join(map(int.to_bytes, gp, repeat(6),
                                                                       repeat("big"))))
                added += c
            elif c == 256:
                new[k] = pack6(gp)
                added += c
            else:
                new[k] = dense_block(dict(zip(gs, gp, strict=True)))
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
            if len(b) == DENSE_SIZE:
                arr = unpack6(b)
                for s, p in zip(compress(_R256, arr), compress(arr, arr), strict=True):
                    yield (base | s).to_bytes(8, "big"), p
            else:
                c = len(b) // 7
                if c == 1:
                    yield (base | b[0]).to_bytes(8, "big"), _fb(b[1:], "big")
                else:
                    for s, p in zip(b[:c], unpack6(b[c:]), strict=True):
                        yield (base | s).to_bytes(8, "big"), p

    def __iter__(self) -> Iterator[bytes]:
        """The oids in ascending order."""
        for key, b in self._sorted_blocks():
            base = key << 8
            if len(b) == DENSE_SIZE:
                sufs: Iterable[int] = compress(_R256, unpack6(b))
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
        if len(b) == DENSE_SIZE:
            s = max(compress(_R256, unpack6(b)))
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
        """An independent copy (sparse blocks and read-only dense views are immutable and shared)."""
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
        dense = sum(map(eq, map(len, self._blocks.values()), repeat(DENSE_SIZE)))
        return {"dense": dense, "sparse": len(self._blocks) - dense, "entries": self._len}

    def _check(self) -> None:
        """Verify every internal invariant; AssertionError naming the first violation."""

        def fail(msg: str) -> None:
            raise AssertionError(msg)

        total = 0
        for key, b in self._blocks.items():
            if type(key) is not int or not 0 <= key < KEY_LIMIT:
                fail(f"bad block key {key!r}")
            if type(b) is bytearray or type(b) is memoryview:
                if type(b) is memoryview and not (b.readonly and b.contiguous and b.format == "B"):
                    fail(f"dense block {key:#x} is a memoryview that is not read-only bytes")
                if len(b) != DENSE_SIZE:
                    fail(f"dense block {key:#x} has {len(b)} bytes, not {DENSE_SIZE}")
                count = 256 - unpack6(b).count(0)
                if count < _EARLY_DENSE:
                    fail(f"dense block {key:#x} holds {count} < {_EARLY_DENSE} entries")
            elif type(b) is bytes:
                if len(b) % 7:
                    fail(f"sparse block {key:#x} has {len(b)} bytes, not a multiple of 7")
                count = len(b) // 7
                if not 1 <= count <= SPARSE_MAX:
                    fail(f"sparse block {key:#x} holds {count} entries, not 1..{SPARSE_MAX}")
                sufs = b[:count]
                if any(map(ge, sufs, sufs[1:])):
                    fail(f"sparse block {key:#x} suffixes not strictly ascending: {sufs.hex()}")
                if 0 in unpack6(b[count:]):
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

    # -- the block representation, for the index-file codec (indexfile.py) ---------------

    def blocks(self) -> dict[int, bytes | bytearray]:
        """The blocks themselves, key -> dense or sparse block (see the module docstring).

        Read-only: for a reader that must not run concurrently with the writer
        (`indexfile.save_index`)."""
        return self._blocks

    @classmethod
    def from_blocks(cls, blocks: dict[int, bytes | bytearray], count: int) -> OidIndex:
        """An index made of `blocks` (well formed, holding `count` entries in all), not copied."""
        new = cls()
        new._blocks = blocks
        new._len = count
        new._maxkey = None
        new._skeys = None
        return new
