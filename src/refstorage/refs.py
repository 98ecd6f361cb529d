"""Extracting the oids a record's pickle references, for many records at once.

The result equals ``ZODB.serialize.referencesf`` for each record: ordinary
persistent references only (weak and cross-database references are skipped),
without loading any class or building any object (the unpickler's `noload`).

Creating an unpickler costs more than reading a small record, so a
transaction's records are read by ONE unpickler over their concatenation: a
ZODB record is two pickles (class, then state), each of which only refers to
memo entries it made itself, so two `noload()` calls consume exactly one
record.  The stream position is checked after every record; anything that
does not line up, or fails, is redone record by record with `referencesf`,
and a record whose references cannot be found at all is marked unknown.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence

from ZODB.serialize import referencesf
from zodbpickle.pickle import Unpickler

from .format import pack_refs

logger = logging.getLogger(__name__)


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
        out.append(ref)
    return out


def references_one(data: bytes) -> tuple[bytes, bool]:
    """(packed refs, known) for one record."""
    try:
        return pack_refs(referencesf(data)), True
    except Exception:
        logger.debug("could not compute the references of a record", exc_info=True)
        return b"", False


def references_many(datas: Sequence[bytes],
                    untransform: Callable[[bytes], bytes] | None = None) -> list[tuple[bytes, bool]]:
    """(packed refs, known) for each record, in order."""
    if untransform is not None:
        datas = [untransform(d) for d in datas]
    if len(datas) < 4:
        return [references_one(d) for d in datas]
    stream = io.BytesIO(b"".join(datas))
    found: list = []
    unpickler = Unpickler(stream)
    unpickler.persistent_load = found.append
    noload = unpickler.noload
    tell = stream.tell
    result: list[tuple[bytes, bool]] = []
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
            result.extend(references_one(d) for d in datas[i:])
            return result
        if found:
            try:
                result.append((pack_refs(_oids(found)), True))
            except ValueError:
                result.append(references_one(data))
            found.clear()
        else:
            result.append((b"", True))
    return result
