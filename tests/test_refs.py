"""Batched reference extraction gives exactly what ZODB's referencesf gives."""

import random

import transaction
import ZODB
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef
from ZODB.MappingStorage import MappingStorage
from ZODB.serialize import referencesf

from refstorage.refs import references_many, references_one


def _pickles():
    transaction.abort()
    databases = {}
    db = ZODB.DB(MappingStorage(), databases=databases, database_name="main")
    other = ZODB.DB(MappingStorage(), databases=databases, database_name="other")
    conn = db.open()
    root = conn.root()
    objs = [PersistentMapping(n=i) for i in range(30)]
    root["objs"] = objs[:]
    for i, o in enumerate(objs):
        o["next"] = objs[(i + 1) % len(objs)]
        if i % 3 == 0:
            o["weak"] = WeakRef(objs[(i + 7) % len(objs)])
        if i % 5 == 0:
            o["again"] = [o["next"], o["next"]]  # one oid twice
        if i % 4 == 0:
            o["payload"] = "x" * random.Random(i).randint(0, 3000)
    transaction.commit()
    foreign = conn.get_connection("other").root()
    foreign["thing"] = PersistentMapping()
    transaction.commit()
    root["cross"] = PersistentMapping(ref=foreign["thing"])
    transaction.commit()
    st = db.storage
    out = [st.load(o._p_oid)[0] for o in objs + [root["cross"], root]]
    conn.close()
    db.close()
    other.close()
    return out


def test_batch_equals_referencesf():
    pickles = _pickles()
    expected = [b"".join(dict.fromkeys(referencesf(p))) for p in pickles]
    assert references_many(pickles) == expected
    assert [references_one(p) for p in pickles] == expected
    assert any(expected)


def test_bad_records_in_a_batch_are_redone_one_by_one():
    pickles = _pickles()
    mixed = pickles[:5] + [b"not a pickle", pickles[0][:20]] + pickles[5:10]
    got = references_many(mixed)
    assert got[5] is None and got[6] is None
    assert got[:5] == references_many(pickles[:5])
    assert got[7:] == references_many(pickles[5:10])


def test_untransform_is_applied():
    pickles = _pickles()
    hexed = [p.hex().encode() for p in pickles]
    assert references_many(hexed, lambda d: bytes.fromhex(d.decode())) == references_many(pickles)
