"""`refstorage inspect` through ZEO: the same pages, built from ZEO's remote iterator.

The servers are real ZEO servers on 127.0.0.1 (ZEO.server, in this process),
serving a refstorage (the demo's database) or ZODB's FileStorage.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("flask")

import ZEO  # noqa: E402
from ZODB.FileStorage import FileStorage  # noqa: E402

from refstorage.tools.common import oid_repr  # noqa: E402
from refstorage.tools.info import pack_forecast  # noqa: E402
from refstorage.webui.app import create_app  # noqa: E402
from refstorage.webui.model import Inspector, ZeoInspector  # noqa: E402
from webui_db import EVIL_MODULE, EVIL_OID, MISSING_GLOBAL_OID, demo_database, make_evil_db  # noqa: E402

TOKEN = "zeo-token-456"
BOOK = "refstorage._demo_model.Book"


def refstorage_conf(path: str) -> str:
    return f"%import refstorage\n<refstorage>\n  path {path}\n</refstorage>\n"


@pytest.fixture(scope="module")
def served_demo(tmp_path_factory):
    """(file inspector, ZEO inspector, address) of a copy of the demo database served by ZEO."""
    src, _expected = demo_database(tmp_path_factory)
    path = str(tmp_path_factory.mktemp("webui-zeo") / "library.rfs")
    shutil.copyfile(src, path)
    addr, stop = ZEO.server(storage_conf=refstorage_conf(path), port=0)
    by_file = Inspector(src)
    by_file.index()
    by_zeo = ZeoInspector(f"zeo://{addr[0]}:{addr[1]}?storage=1", wait_timeout=30)
    try:
        by_zeo.index()
        yield by_file, by_zeo, addr
    finally:
        by_zeo.close()
        by_file.close()
        stop()


def test_the_index_through_zeo_matches_the_files(served_demo):
    by_file, by_zeo, _addr = served_demo
    assert by_zeo.ready and not by_zeo.positions
    assert [(t.tid, t.description, t.user, t.records) for t in by_zeo.txns] == [
        (t.tid, t.description, t.user, t.records) for t in by_file.txns]
    assert by_zeo.objects == by_file.objects and by_zeo.records == by_file.records
    assert ({k: (v.current, v.historical) for k, v in by_zeo.classes.items()}
            == {k: (v.current, v.historical) for k, v in by_file.classes.items()})
    assert by_zeo.refs == by_file.refs and by_zeo.referrers == by_file.referrers
    assert ({k: (g.objects, g.sample) for k, g in by_zeo.garbage.items()}
            == {k: (g.objects, g.sample) for k, g in by_file.garbage.items()})
    assert by_zeo.garbage  # the demo leaves garbage: the comparison means something
    assert [list(v) for v in by_zeo.class_oids.values()] == [list(by_file.class_oids[k])
                                                            for k in by_zeo.class_oids]
    revised = next(o.to_bytes(8, "big") for o in by_file.class_oids[BOOK]
                   if len(by_file.history(o.to_bytes(8, "big"))) > 1)
    hz, hf = by_zeo.history(revised), by_file.history(revised)
    assert [(h.tid, h.data, h.class_name, h.description) for h in hz] == [
        (h.tid, h.data, h.class_name, h.description) for h in hf]
    assert by_zeo.current_data(revised).data == by_file.current_data(revised).data
    assert by_zeo.history(revised, 1, 5)[0].tid == hf[1].tid
    txn = by_zeo.txns[1]
    rows_z = by_zeo.txn_records(txn, 3, 20)
    rows_f = by_file.txn_records(by_file.txns[1], 3, 20)
    assert [(r["oid"], r["class"], r["refs"], r["current"], r["kind"]) for r in rows_z] == [
        (r["oid"], r["class"], r["refs"], r["current"], r["kind"]) for r in rows_f]


@pytest.fixture(scope="module")
def client(served_demo):
    c = create_app(served_demo[1], TOKEN).test_client()
    assert c.get(f"/?token={TOKEN}").status_code == 200  # sets the cookie
    return c


def test_every_page_answers_through_zeo(served_demo, client):
    ins = served_demo[1]
    assert create_app(ins, TOKEN).test_client().get("/classes").status_code == 403
    book = ins.class_oids[BOOK][0].to_bytes(8, "big")
    urls = ["/", "/?days=0.5", "/classes", "/classes?sort=name&order=asc", f"/class/{BOOK}",
            f"/class/{BOOK}?page=3", "/transactions", "/transactions?user=alice&q=catalogue",
            f"/transaction/{ins.txns[1].pos}", f"/transaction/{ins.txns[1].pos}?page=5",
            "/object/0x00", f"/object/{oid_repr(book)}", f"/object/{oid_repr(book)}/graph", "/garbage",
            "/static/plotly.min.js", "/status"]
    for url in urls:
        r = client.get(url)
        assert r.status_code == 200, url
    assert client.get(f"/transaction/{len(ins.txns)}").status_code == 404
    assert client.get("/object/0x7fffffff").status_code == 200  # a missing oid says so
    garbage = client.get("/garbage").get_data(as_text=True)
    assert "Verify is not available through ZEO" in garbage
    assert "not available through ZEO" not in client.get("/").get_data(as_text=True)
    assert ins.txns[1].description in client.get(f"/transaction/{ins.txns[1].pos}").get_data(as_text=True)


def test_object_page_through_zeo_shows_references_referrers_and_a_diff(served_demo, client):
    ins = served_demo[1]
    revised = next(o.to_bytes(8, "big") for o in ins.class_oids[BOOK]
                   if len(ins.history(o.to_bytes(8, "big"))) > 1)
    html = client.get(f"/object/{oid_repr(revised)}").get_data(as_text=True)
    assert BOOK in html and "&#39;title&#39;" in html
    assert ins.references(revised) and ins.referrers_of(revised)
    for r in ins.references(revised) + ins.referrers_of(revised):
        assert f'href="/object/{oid_repr(r)}"' in html
    diff = re.search(r'<div class="diff" id="diff">(.*?)</div>\n', html, re.S).group(1)
    assert 'class="add"' in diff and 'class="del"' in diff
    hist = ins.history(revised)
    same = client.get(f"/object/{oid_repr(revised)}?a={hist[-1].pos}&b={hist[-1].pos}")
    assert "the two revisions have the same state" in same.get_data(as_text=True)
    assert client.get(f"/object/{oid_repr(revised)}?a=1&b=2").status_code == 404
    for bad in (-1, 1 << 64, 10 ** 30):  # not a tid: 404, not 500 (p64 would raise)
        assert client.get(f"/object/{oid_repr(revised)}?a={bad}&b={hist[-1].pos}").status_code == 404
    graph = client.get(f"/object/{oid_repr(revised)}/graph").get_json()
    levels = {n["oid"]: n["level"] for n in graph["nodes"]}
    assert levels[oid_repr(revised)] == 0 and levels[oid_repr(ins.references(revised)[0])] == 1


# -- a FileStorage served by ZEO, holding records that would run code -------------------------

_AUDIT: list | None = None


def _audit(event, args):
    if _AUDIT is None:
        return
    watched = (EVIL_MODULE, "no_such_module_xyz")
    if event == "import" and args[0].split(".")[0] in watched:
        _AUDIT.append((event, args[0]))
    elif event == "pickle.find_class" and str(args[0]).split(".")[0] in watched:
        _AUDIT.append((event, args[:2]))  # (ZEO's own messages are pickles of its own classes)
    elif event in ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn"):
        _AUDIT.append((event, args[:2]))


sys.addaudithook(_audit)


def test_a_filestorage_through_zeo_is_shown_and_nothing_runs(tmp_path, monkeypatch):
    global _AUDIT
    marker = tmp_path / "code-ran"
    path = str(tmp_path / "evil.fs")
    make_evil_db(path, str(marker), FileStorage)
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / f"{EVIL_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "def run(path):\n    open(path, 'w').write('called')\n\nclass Boom:\n    pass\n")
    monkeypatch.syspath_prepend(str(mods))  # importable now: any import would write the marker
    addr, stop = ZEO.server(path=path, port=0)
    _AUDIT = []
    try:
        ins = ZeoInspector(f"{addr[0]}:{addr[1]}", wait_timeout=30)
        try:
            ins.index()
            c = create_app(ins, TOKEN).test_client()
            pages = {}
            for url in ("/", "/classes", "/transactions", f"/transaction/{ins.txns[-1].pos}",
                        "/object/0x00", f"/object/{oid_repr(EVIL_OID)}",
                        f"/object/{oid_repr(MISSING_GLOBAL_OID)}", f"/object/{oid_repr(EVIL_OID)}/graph",
                        "/object/0x00/graph", "/garbage", f"/class/{EVIL_MODULE}.Boom"):
                r = c.get(url + ("&" if "?" in url else "?") + f"token={TOKEN}")
                assert r.status_code == 200, url
                pages[url] = r.get_data(as_text=True)
        finally:
            ins.close()
        events = list(_AUDIT)
    finally:
        _AUDIT = None
        stop()
    assert events == []
    assert not marker.exists()
    assert EVIL_MODULE not in sys.modules
    evil = pages[f"/object/{oid_repr(EVIL_OID)}"]
    assert f"{EVIL_MODULE}.Boom" in evil and f"{EVIL_MODULE}.run" in evil and str(marker) in evil
    assert "no_such_module_xyz.Nope" in pages[f"/object/{oid_repr(MISSING_GLOBAL_OID)}"]
    root = pages["/object/0x00"]
    assert f'href="/object/{oid_repr(EVIL_OID)}"' in root
    assert f'href="/object/{oid_repr(MISSING_GLOBAL_OID)}"' in root
    # the referrers of the evil record: the root, from the references computed from the pickles
    assert ins.referrers_of(EVIL_OID) == [b"\0" * 8]
    assert '<a class="oid" href="/object/0x00">' in evil or 'href="/object/0x00"' in evil
    assert collections.Counter(t.records for t in ins.txns) == collections.Counter([1, 2, 3])
    assert {k for k, g in ins.garbage.items()} == {"persistent.mapping.PersistentMapping"}  # the old note


# -- the command ----------------------------------------------------------------------------

def test_command_serves_a_zeo_uri(served_demo):
    _f, _z, addr = served_demo
    proc = subprocess.Popen([sys.executable, "-m", "refstorage", "inspect", "--no-browser", "--port", "0",
                             f"zeo://{addr[0]}:{addr[1]}?storage=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{20,}", url), url
        body = ""
        for _ in range(300):  # the index is built in the background; pages answer 503 meanwhile
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    body = r.read().decode()
                break
            except urllib.error.HTTPError as e:
                assert e.code == 503
                time.sleep(0.1)
        assert "Overview" in body and f"zeo://{addr[0]}:{addr[1]}" in body
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_command_refuses_other_uris_and_reports_an_unreachable_server():
    r = subprocess.run([sys.executable, "-m", "refstorage", "inspect", "--no-browser",
                        "memory://x"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "zeo://HOST:PORT" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "refstorage", "inspect", "--no-browser", "--wait-timeout",
                        "0.5", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach the ZEO server at 127.0.0.1:1" in r.stderr
    assert "Traceback" not in r.stderr


def test_undo_and_an_undone_creation_through_zeo(tmp_path):
    import transaction
    from persistent.mapping import PersistentMapping

    addr, stop = ZEO.server(path=str(tmp_path / "undo.fs"), port=0)
    try:
        db = ZEO.DB(addr, wait_timeout=30)
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            root = conn.root()
            root["a"] = a = PersistentMapping({"v": 1})
            tm.commit()
            a["v"] = 2
            tm.get().note("change a")
            tm.commit()
            db.undo(db.undoLog(0, 1)[0]["id"], tm.get())  # a back to v=1: a backpointer
            tm.get().note("undo the change")
            tm.commit()
            root["b"] = PersistentMapping()
            tm.get().note("create b")
            tm.commit()
            b = root["b"]._p_oid
            db.undo(db.undoLog(0, 1)[0]["id"], tm.get())  # b's creation undone: b has no data
            tm.commit()
            a_oid = a._p_oid
            conn.close()
        finally:
            db.close()
        ins = ZeoInspector(f"zeo://{addr[0]}:{addr[1]}", wait_timeout=30)
        try:
            ins.index()
            assert ins.object_state(b) == "deleted" and ins.object_state(a_oid) == "current"
            assert ins.objects == 2 and ins.deleted == {b}
            assert ins.references(b"\0" * 8) == [a_oid] and ins.referrers_of(a_oid) == [b"\0" * 8]
            assert ins.dangling_count == 0
            hist = ins.history(a_oid)
            assert len(hist) == 3 and hist[0].data == hist[2].data != hist[1].data
            undo = next(t for t in ins.txns if t.description == "undo the change")
            rows = ins.txn_records(undo, 0, 10)
            assert {r["oid"]: r["kind"] for r in rows}[a_oid] == "backpointer (undo)"
            last = ins.txn_records(ins.txns[-1], 0, 10)
            assert {r["oid"]: r["kind"] for r in last}[b] == "deletion"
            c = create_app(ins, TOKEN).test_client()
            for url in (f"/object/{oid_repr(b)}", f"/object/{oid_repr(a_oid)}",
                        f"/transaction/{undo.pos}", f"/transaction/{ins.txns[-1].pos}", "/garbage"):
                r = c.get(f"{url}?token={TOKEN}")
                assert r.status_code == 200, url
            assert 'id="object-state">deleted<' in c.get(f"/object/{oid_repr(b)}").get_data(as_text=True)
        finally:
            ins.close()
    finally:
        stop()


# -- the pack forecast through ZEO ---------------------------------------------------------

def _contents(path: str) -> tuple[int, int, set, int]:
    """(transactions, records, oids, bytes of data as the iterator sends it) of a refstorage file."""
    import refstorage
    st = refstorage.FileStorage(path, read_only=True)
    try:
        txns = records = size = 0
        oids = set()
        for t in st.iterator():
            txns += 1
            for r in t:
                records += 1
                oids.add(r.oid)
                size += len(r.data) if r.data is not None else 0
        return txns, records, oids, size
    finally:
        st.close()


def _packed_copy(src: str, dest: str, pack_time: float) -> tuple[int, int, int, int, int]:
    """(bytes, revisions, transactions, objects, data bytes) an actual pack of a copy of src frees."""
    import os

    import refstorage
    shutil.copyfile(src, dest)
    before = _contents(dest)
    size = os.path.getsize(dest)
    st = refstorage.FileStorage(dest)
    try:
        st.pack(pack_time)
    finally:
        st.close()
    after = _contents(dest)
    return (size - os.path.getsize(dest), before[1] - after[1], before[0] - after[0],
            len(before[2]) - len(after[2]), before[3] - after[3])


def test_the_pack_forecast_through_zeo_is_what_a_pack_frees(served_demo, client, tmp_path):
    by_file, by_zeo, _addr = served_demo
    txns = by_file.txns
    # a pack now (the overview's `days` 0), and to three times inside the history (between
    # two transactions: the demo writes its history within a second)
    cases = [(by_zeo.forecast(0), by_file.forecast(0))]
    for i in (len(txns) // 4, len(txns) // 2, 3 * len(txns) // 4):
        t = (txns[i].time + txns[i + 1].time) / 2
        cases.append((by_zeo.pack_forecast(t), pack_forecast(by_file.log, by_file.built, t)))
    checked = set()
    for fz, ff in cases:
        assert not isinstance(fz, str) and not isinstance(ff, str), (fz, ff)
        assert fz.reason == ff.reason and fz.pack_tid == ff.pack_tid
        if fz.reason:
            continue
        real = _packed_copy(by_file.path, str(tmp_path / f"packed-{len(checked)}.rfs"), fz.pack_time)
        assert (ff.bytes_freed, ff.revisions_removed, ff.transactions_removed, ff.objects_removed) == real[:4]
        assert (fz.revisions_removed, fz.transactions_removed, fz.objects_removed,
                fz.bytes_freed) == real[1:]
        assert fz.bytes_before == _contents(by_file.path)[3]
        checked.add(real)
    assert len(checked) >= 3 and by_zeo.forecast(0).objects_removed > 0  # the demo leaves garbage
    # the pages show it, labelled as pickle data, no longer "not available"
    home = client.get("/?days=0").get_data(as_text=True)
    f0 = by_zeo.forecast(0)
    assert "not available" not in home and "Pack forecast" not in home
    assert re.search(r'frees <b class="freed">[^<]+</b> of pickle data', home)
    assert f"{f0.objects_removed:,} objects" in home
    garbage = client.get("/garbage").get_data(as_text=True)
    assert f"remove {f0.objects_removed:,} objects" in garbage and "of pickle data" in garbage


def _undo_history(path: str, unreadable: bool) -> None:
    """A refstorage file with undo records (backpointers), an undone creation (a deletion),
    garbage, and with `unreadable`, a reachable record whose references cannot be read."""
    import transaction
    import ZODB
    from persistent.mapping import PersistentMapping
    from ZODB.Connection import TransactionMetaData

    import refstorage
    st = refstorage.FileStorage(path)
    db = ZODB.DB(st)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        root["a"] = a = PersistentMapping({"v": 1})
        root["g"] = PersistentMapping({"garbage": 1})
        tm.commit()
        a["v"] = 2
        tm.commit()
        db.undo(db.undoLog(0, 1)[0]["id"], tm.get())  # a back to v=1: a backpointer
        tm.commit()
        root["b"] = PersistentMapping({"w": 1})
        tm.commit()
        db.undo(db.undoLog(0, 1)[0]["id"], tm.get())  # b's creation undone
        tm.commit()
        a["v"] = 3
        tm.commit()
        db.undo(db.undoLog(0, 1)[0]["id"], tm.get())  # the last change of a undone again
        tm.commit()
        del root["g"]  # garbage from now on
        tm.commit()
        a_oid = a._p_oid
        conn.close()
        if unreadable:  # a new state of a (reachable) that no reference reader can decode
            t = TransactionMetaData(description="unreadable")
            st.tpc_begin(t)
            st.store(a_oid, st.load(a_oid)[1], b"this is not a pickle", "", t)
            st.tpc_vote(t)
            st.tpc_finish(t)
    finally:
        db.close()


@pytest.mark.parametrize("unreadable", [False, True])
def test_the_pack_forecast_through_zeo_follows_undo_and_unreadable_references(tmp_path, unreadable):
    path = str(tmp_path / "undo.rfs")
    _undo_history(path, unreadable)
    addr, stop = ZEO.server(storage_conf=refstorage_conf(path), port=0)
    by_file = Inspector(path)
    by_zeo = ZeoInspector(f"zeo://{addr[0]}:{addr[1]}", wait_timeout=30)
    try:
        by_file.index()
        by_zeo.index()
        assert by_zeo.refs_unknown if unreadable else not by_zeo.refs_unknown
        txns = by_file.txns
        results = []
        for i in range(len(txns)):  # a pack to just after each transaction
            t = (txns[i].time + txns[i + 1].time) / 2 if i + 1 < len(txns) else txns[i].time + 1
            fz, ff = by_zeo.pack_forecast(t), pack_forecast(by_file.log, by_file.built, t)
            assert fz.reason == ff.reason, i
            if ff.reason:
                continue
            real = _packed_copy(path, str(tmp_path / f"packed-{i}.rfs"), t)
            assert (ff.bytes_freed, ff.revisions_removed, ff.transactions_removed,
                    ff.objects_removed) == real[:4], i
            assert (fz.revisions_removed, fz.transactions_removed, fz.objects_removed,
                    fz.bytes_freed) == real[1:], i
            results.append(real)
        assert len(results) >= 3
        # without unreadable references g, garbage, goes; with one, pack keeps every object
        assert results[-1][3] == (1 if unreadable else 2)  # b (undone creation); g unless no gc
    finally:
        by_zeo.close()
        by_file.close()
        stop()


def test_the_zeo_inspector_never_writes(tmp_path_factory):
    """Its ClientStorage is read-only (the server refuses a commit from it), none of its writing
    methods is called by the index, the pages or the forecast, and the served file is unchanged."""
    import hashlib

    from ZODB.Connection import TransactionMetaData
    from ZODB.POSException import ReadOnlyError
    src, _expected = demo_database(tmp_path_factory)
    path = str(tmp_path_factory.mktemp("webui-zeo-ro") / "library.rfs")
    shutil.copyfile(src, path)

    def digest() -> str:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    before = digest()
    addr, stop = ZEO.server(storage_conf=refstorage_conf(path), port=0)
    try:
        ins = ZeoInspector(f"zeo://{addr[0]}:{addr[1]}?storage=1", wait_timeout=30)
        try:
            assert ins.storage.isReadOnly()
            with pytest.raises(ReadOnlyError):
                ins.storage.tpc_begin(TransactionMetaData())
            calls = []
            for name in ("tpc_begin", "store", "restore", "storeBlob", "deleteObject", "undo", "pack",
                         "new_oid", "tpc_vote", "tpc_finish", "tpc_abort", "checkCurrentSerialInTransaction",
                         "copyTransactionsFrom", "record_iternext"):
                setattr(ins.storage, name, lambda *a, _n=name, **k: calls.append(_n))
            ins.index()
            book = ins.class_oids[BOOK][0].to_bytes(8, "big")
            c = create_app(ins, TOKEN).test_client()
            for url in ("/", "/?days=0.001", "/classes", f"/class/{BOOK}", "/transactions",
                        f"/transaction/{ins.txns[-1].pos}", "/object/0x00", f"/object/{oid_repr(book)}",
                        f"/object/{oid_repr(book)}/graph", "/garbage", "/status"):
                assert c.get(url + ("&" if "?" in url else "?") + f"token={TOKEN}").status_code == 200, url
            assert not isinstance(ins.forecast(0), str) and not isinstance(ins.forecast(0.001), str)
            assert calls == []
        finally:
            ins.close()
    finally:
        stop()
    assert digest() == before


def test_a_transactions_page_through_zeo_reads_only_what_it_shows(served_demo, monkeypatch):
    """From the index, not ZEO's iterator (one round trip per record before the page's): the
    rows of a late page are the file source's, with a loadSerial per non-current record."""
    by_file, by_zeo, _addr = served_demo
    j = max(range(len(by_file.txns)), key=lambda i: by_file.txns[i].records)
    assert by_file.txns[j].records > 300
    loads = []
    real_load_serial = by_zeo.storage.loadSerial
    monkeypatch.setattr(by_zeo.storage, "iterator", lambda *a: pytest.fail("iterator called"))
    monkeypatch.setattr(by_zeo.storage, "loadSerial", lambda *a: loads.append(a) or real_load_serial(*a))
    rows_z = by_zeo.txn_records(by_zeo.txns[j], 200, 100)
    rows_f = by_file.txn_records(by_file.txns[j], 200, 100)
    assert len(rows_z) == len(rows_f) > 0
    assert [(r["oid"], r["class"], r["refs"], r["current"], r["kind"]) for r in rows_z] == [
        (r["oid"], r["class"], r["refs"], r["current"], r["kind"]) for r in rows_f]
    assert len(loads) == sum(1 for r in rows_z if not r["current"] and r["kind"] != "deletion")
