"""Extracting the oids a record's pickle references, for many records at once.

The result is the record's refs field (`format.pack_refs`) of what
``ZODB.serialize.referencesf`` finds: ordinary persistent references only
(weak and cross-database references are skipped), without loading any class
or building any object (the unpickler's `noload`); or None when the
references cannot be found (not a pickle, an oid that is not 8 bytes), which
the record then says with its REFS_UNKNOWN flag.

Creating an unpickler costs more than reading a small record, so a
transaction's records are read by ONE unpickler over their concatenation: a
ZODB record is two pickles (class, then state), each of which only refers to
memo entries it made itself, so two `noload()` calls consume exactly one
record.  The stream position is checked after every record; anything that
does not line up, or fails, is redone record by record with a fresh unpickler,
and a record whose references cannot be found at all gets None.

When the optional C extension `refstorage._refscan` is built (setup.py; it
needs a C compiler at install time), records are first handed to its opcode
walker, which answers about 20 times faster and declines (None) whatever it
does not model exactly; declined records take the path above.  Setting
REFSTORAGE_PURE_PYTHON=1 in the environment turns the extension off.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence

from zodbpickle.pickle import Unpickler

from .fileformat import pack_refs

logger = logging.getLogger(__name__)

_scan_many: Callable[[Sequence[bytes]], list[bytes | None]] | None
try:
    from ._refscan import scan_many as _scan_many
except ImportError:  # not compiled: the pure-Python path gives the same answers
    _scan_many = None
if os.environ.get("REFSTORAGE_PURE_PYTHON"):
    _scan_many = None


def scanner() -> str:
    """Which reference extractor is active: "c" or "python"."""
    return "python" if _scan_many is None else "c"


def _oids(refs: list) -> list[bytes]:
    out = []
    for ref in refs:
        t = type(ref)
        if t is tuple:
            ref = ref[0]
        elif t is list:  # weak or cross-database reference
            continue
        if type(ref) is not bytes:
            if not isinstance(ref, str):
                raise ValueError(f"unexpected persistent id {ref!r}")
            ref = ref.encode("ascii")
        if len(ref) != 8:
            raise ValueError(f"an oid of {len(ref)} bytes")
        out.append(ref)
    return out


def references_one(data: bytes) -> bytes | None:
    """The packed refs of one record, or None if they cannot be found."""
    if _scan_many is not None:
        found = _scan_many((data,))[0]
        if found is not None:
            return found
    return _references_one_python(data)


def _references_one_python(data: bytes) -> bytes | None:
    try:
        found: list = []
        unpickler = Unpickler(io.BytesIO(data))
        unpickler.persistent_load = found.append
        unpickler.noload()
        unpickler.noload()
        return pack_refs(_oids(found))
    except Exception:
        logger.debug("could not compute the references of a record", exc_info=True)
        return None


def references_many(datas: Sequence[bytes],
                    untransform: Callable[[bytes], bytes] | None = None) -> list[bytes | None]:
    """references_one() of each record, in order."""
    if untransform is not None:
        datas = [untransform(d) for d in datas]
    if _scan_many is not None:
        found = _scan_many(datas)
        for i, refs in enumerate(found):
            if refs is None:
                found[i] = _references_one_python(datas[i])
        return found
    return _references_many_python(datas)


def _references_many_python(datas: Sequence[bytes]) -> list[bytes | None]:
    if len(datas) < 4:
        return [_references_one_python(d) for d in datas]
    stream = io.BytesIO(b"".join(datas))
    found: list = []
    unpickler = Unpickler(stream)
    unpickler.persistent_load = found.append
    noload = unpickler.noload
    tell = stream.tell
    result: list[bytes | None] = []
    end = 0
    for i, data in enumerate(datas):
        end += len(data)
        try:
            noload()
            noload()
            ok = tell() == end
        except Exception:
            ok = False
        if not ok:  # resynchronise: redo the rest one by one
            result.extend(_references_one_python(d) for d in datas[i:])
            return result
        if found:
            try:
                result.append(pack_refs(_oids(found)))
            except ValueError:
                result.append(_references_one_python(data))
            found.clear()
        else:
            result.append(b"")
    return result
