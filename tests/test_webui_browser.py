"""`refstorage inspect` in a real browser: headless Chromium driven by Selenium.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); without
them these tests are skipped, unless REFSTORAGE_REQUIRE_BROWSER=1 (set by CI),
which makes a missing browser a failure.  Screenshots of each page are saved
in $REFSTORAGE_SCREENSHOTS (default: a pytest temporary directory, printed);
those of the zeo:// source (a ZEO server over a copy of the demo database,
started by the test) are named zeo-*.png.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

pytest.importorskip("flask")
selenium = pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from refstorage.tools.common import oid_repr, parse_oid  # noqa: E402
from refstorage.webui.app import Server  # noqa: E402
from refstorage.webui.model import Inspector, ZeoInspector  # noqa: E402
from webui_db import demo_database  # noqa: E402

REQUIRE = os.environ.get("REFSTORAGE_REQUIRE_BROWSER") == "1"
WAIT = 20


def _binaries() -> tuple[str, str] | None:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chrome, driver) if chrome and driver else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path, expected = demo_database(tmp_path_factory)
    ins = Inspector(path)
    ins.index()
    srv = Server(ins, "127.0.0.1", 0)
    srv.start()
    yield srv, ins, expected
    srv.stop()
    ins.close()


@pytest.fixture(scope="module")
def browser():
    found = _binaries()
    if found is None:
        msg = ("headless Chromium tests need chromium and chromedriver "
               "(apt-get install chromium chromium-driver)")
        if REQUIRE:
            pytest.fail(msg + "; REFSTORAGE_REQUIRE_BROWSER=1 is set")
        pytest.skip(msg)
    chrome, driver_path = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    drv = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = os.environ.get("REFSTORAGE_SCREENSHOTS") or str(tmp_path_factory.mktemp("webui-screenshots"))
    os.makedirs(d, exist_ok=True)
    print(f"screenshots in {d}")
    return d


def _shot(drv, shots: str, name: str, full: bool = True) -> None:
    if full:  # the whole page, not just the window
        height = drv.execute_script("return document.documentElement.scrollHeight")
        drv.set_window_size(1280, min(max(height, 700), 2400))
    drv.save_screenshot(os.path.join(shots, f"{name}.png"))
    drv.set_window_size(1280, 1000)


def _wait(drv, css: str, n: int = 1):
    """Elements matching `css` once at least `n` exist (a plot has rendered: its SVG shapes are there)."""
    WebDriverWait(drv, WAIT).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, css)) >= n)
    return drv.find_elements(By.CSS_SELECTOR, css)


def _no_js_errors(drv) -> None:
    errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_overview_plots_and_the_way_to_an_objects_referrers(server, browser, shots):
    srv, ins, expected = server
    drv = browser
    drv.get(srv.url)
    # the plot rendered: plotly drew its SVG and a bar per day
    _wait(drv, "#growth-plot .main-svg")
    bars = _wait(drv, "#growth-plot .bars path")
    assert len(bars) == len(ins.days)
    objects = expected["objects"] - len(ins.deleted)
    assert drv.find_element(By.ID, "fact-objects").text.startswith(f"{objects:,}")
    _no_js_errors(drv)
    _shot(drv, shots, "overview")

    # classes: a plot, a sortable table, a link to the class's objects
    drv.find_element(By.ID, "nav-classes").click()
    _wait(drv, "#classes-plot .bars path", 2)
    drv.find_element(By.CSS_SELECTOR, 'a.sort[data-key="name"]').click()
    WebDriverWait(drv, WAIT).until(EC.url_contains("sort=name"))
    names = [e.text for e in drv.find_elements(By.CSS_SELECTOR, "#classes-table td.cls a")]
    assert names == sorted(names) and "refstorage._demo_model.Book" in names
    drv.find_element(By.CSS_SELECTOR, 'a.sort[data-key="current"]').click()
    WebDriverWait(drv, WAIT).until(EC.url_contains("sort=current"))
    counts = [int(e.text.replace(",", "")) for e in
              drv.find_elements(By.CSS_SELECTOR, "#classes-table tbody tr td:nth-child(2)")]
    assert counts == sorted(counts, reverse=True)
    _wait(drv, "#classes-plot .bars path", 2)
    _shot(drv, shots, "classes")
    drv.find_element(By.LINK_TEXT, "refstorage._demo_model.Book").click()

    # the class's objects -> one book
    links = _wait(drv, "#class-objects a.oid")
    book = links[0].text
    links[0].click()
    WebDriverWait(drv, WAIT).until(EC.text_to_be_present_in_element((By.ID, "oid"), book))
    assert drv.find_element(By.ID, "object-class").text == "refstorage._demo_model.Book"
    tree = drv.find_element(By.ID, "state-tree").text
    assert "'title'" in tree and "'author'" in tree
    _wait(drv, "#graph-plot .scatterlayer .point", 3)  # the neighbourhood graph rendered
    _no_js_errors(drv)
    _shot(drv, shots, "object")

    # its referrers: each is a current object whose references include the book
    referrers = drv.find_elements(By.CSS_SELECTOR, "#referrers a.oid")
    assert referrers, "a current book is referenced by its catalogue bucket"
    target = referrers[0].text
    referrers[0].click()
    WebDriverWait(drv, WAIT).until(EC.text_to_be_present_in_element((By.ID, "oid"), target))
    refs = [e.text for e in drv.find_elements(By.CSS_SELECTOR, "#references a.oid")]
    assert book in refs

    # the graph's nodes are links: a click on the central node's neighbour navigates
    _wait(drv, "#graph-plot .scatterlayer .point", 2)
    drv.execute_script(
        "document.getElementById('graph-plot').emit('plotly_click',"
        " {points: [{customdata: arguments[0]}]});", f"/object/{book}")
    WebDriverWait(drv, WAIT).until(EC.text_to_be_present_in_element((By.ID, "oid"), book))


def test_history_diff_transactions_and_garbage_pages(server, browser, shots):
    srv, ins, _expected = server
    drv = browser
    drv.get(srv.url)
    revised = next(o for o in ins.class_oids["refstorage._demo_model.Book"]
                   if len(ins.history(o.to_bytes(8, "big"))) > 1).to_bytes(8, "big")
    base = srv.url.split("?")[0].rstrip("/")
    drv.get(f"{base}/object/{oid_repr(revised)}")
    diff = drv.find_element(By.ID, "diff")
    assert diff.find_elements(By.CSS_SELECTOR, ".add") and diff.find_elements(By.CSS_SELECTOR, ".del")
    # compare the two revisions the other way round with the form
    radios_a = drv.find_elements(By.CSS_SELECTOR, 'input[name="a"]')
    radios_b = drv.find_elements(By.CSS_SELECTOR, 'input[name="b"]')
    radios_a[0].click()
    radios_b[-1].click()
    drv.find_element(By.ID, "diffbutton").click()
    WebDriverWait(drv, WAIT).until(EC.url_contains("a="))
    assert drv.find_elements(By.CSS_SELECTOR, "#diff .add")

    drv.find_element(By.ID, "nav-transactions").click()
    rows = _wait(drv, "#txn-table tbody tr")
    assert len(rows) == len(ins.txns)
    _shot(drv, shots, "transactions")
    drv.find_element(By.NAME, "user").send_keys("bob")
    drv.find_element(By.CSS_SELECTOR, "#txnfilter button").click()
    WebDriverWait(drv, WAIT).until(EC.url_contains("user=bob"))
    rows = drv.find_elements(By.CSS_SELECTOR, "#txn-table tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows] == ["desk:bob", "desk:bob"]
    rows[0].find_element(By.CSS_SELECTOR, "a.txn").click()
    records = _wait(drv, "#txn-records tbody tr")
    assert len(records) == min(ins.transactions(user="bob")[0].records, 100)

    drv.find_element(By.ID, "nav-garbage").click()
    verify = _wait(drv, "#verify-result")  # verify runs in the background; the page reloads
    assert "No problem found" in verify[0].text
    classes = [e.text for e in drv.find_elements(By.CSS_SELECTOR, "#garbage-table td.cls")]
    assert set(classes) == set(ins.garbage)
    _no_js_errors(drv)
    _shot(drv, shots, "garbage")


def test_no_token_no_page(server, browser):
    srv, _ins, _expected = server
    drv = browser
    drv.delete_all_cookies()
    drv.get(srv.url.split("?")[0] + "classes")
    assert "403" in drv.find_element(By.TAG_NAME, "body").text


# Plotly reads <a href>, <b>, <span style> in labels: a class name from the database must show
# as text.  No dots in it, so the graph's short label (the name after the last dot) holds it all.
MARKUP_NAME = '<a href="http://localhost:1/x">Evil</a><b style="font-size:90px">Big</b>'


def test_class_names_are_text_in_the_plots(tmp_path, browser):
    import refstorage
    from refstorage.tools.common import oid_repr
    from webui_db import _dumps_meta

    path = str(tmp_path / "markup.rfs")
    st = refstorage.FileStorage(path)
    try:
        import transaction as txn_mod
        oid = (1).to_bytes(8, "big")
        t = txn_mod.Transaction()
        st.tpc_begin(t)
        st.store(oid, b"\0" * 8, _dumps_meta("evil", MARKUP_NAME) + b"\x80\x03}q\x00.", "", t)
        # the root: a PersistentMapping whose data references the object
        root = (_dumps_meta("persistent.mapping", "PersistentMapping")
                + b"\x80\x03}q\x00X\x04\x00\x00\x00dataq\x01}q\x02X\x01\x00\x00\x00xq\x03C\x08"
                + oid + b"q\x04N\x86q\x05Qss.")
        st.store(b"\0" * 8, b"\0" * 8, root, "", t)
        st.tpc_vote(t)
        st.tpc_finish(t)
    finally:
        st.close()
    ins = Inspector(path)
    ins.index()
    srv = Server(ins, "127.0.0.1", 0)
    srv.start()
    drv = browser
    drv.get_log("browser")  # (what the tests before left, such as their 403: not this one's)
    try:
        drv.get(srv.url)
        drv.get(srv.url.split("?")[0] + "classes")
        _wait(drv, "#classes-plot .bars path", 2)
        labels = drv.execute_script(
            "return Array.from(document.querySelectorAll('#classes-plot .ytick text'))"
            ".map(e => e.textContent)")
        assert "evil." + MARKUP_NAME in labels
        for plot in ("#classes-plot", "#graph-plot"):
            if plot == "#graph-plot":
                drv.get(srv.url.split("?")[0] + "object/" + oid_repr(b"\0" * 8))
                _wait(drv, "#graph-plot .scatterlayer .textpoint", 2)
                texts = drv.execute_script(
                    "return Array.from(document.querySelectorAll('#graph-plot .textpoint text'))"
                    ".map(e => e.textContent)")
                assert any(MARKUP_NAME in x for x in texts), texts
            links = drv.execute_script(
                f"return document.querySelectorAll('{plot} svg a').length")
            bold = drv.execute_script(
                f"return Array.from(document.querySelectorAll('{plot} svg tspan'))"
                ".filter(e => (e.getAttribute('style') || '').includes('font-size:90px')).length")
            assert (links, bold) == (0, 0), plot
        _no_js_errors(drv)
    finally:
        srv.stop()
        ins.close()


# -- a zeo:// source: a ZEO server over a copy of the demo database ------------------------

@pytest.fixture(scope="module")
def zeo_server(tmp_path_factory):
    import ZEO
    src, expected = demo_database(tmp_path_factory)
    path = str(tmp_path_factory.mktemp("webui-browser-zeo") / "library.rfs")
    shutil.copyfile(src, path)
    addr, stop = ZEO.server(storage_conf=f"%import refstorage\n<refstorage>\n  path {path}\n</refstorage>\n",
                            port=0)
    try:
        ins = ZeoInspector(f"zeo://{addr[0]}:{addr[1]}?storage=1", wait_timeout=30)
        try:
            ins.index()
            srv = Server(ins, "127.0.0.1", 0)
            srv.start()
            try:
                yield srv, ins, expected
            finally:
                srv.stop()
        finally:
            ins.close()
    finally:
        stop()


def test_through_zeo_every_page_and_the_way_to_an_objects_referrers(zeo_server, browser, shots):
    srv, ins, expected = zeo_server
    drv = browser
    drv.delete_all_cookies()
    drv.get_log("browser")  # (what the tests before left, such as their 403: not this one's)
    drv.get(srv.url)
    # overview: the growth plot, the facts, and the pack forecast (it reloads until computed)
    _wait(drv, "#growth-plot .main-svg")
    assert len(_wait(drv, "#growth-plot .bars path")) == len(ins.days)
    assert "zeo://" in drv.find_element(By.TAG_NAME, "body").text
    objects = expected["objects"] - len(ins.deleted)
    assert drv.find_element(By.ID, "fact-objects").text.startswith(f"{objects:,}")
    freed = _wait(drv, "b.freed")  # packed now (7 days ago, the demo had not begun)
    forecast = ins.forecast(0)
    assert f"{forecast.objects_removed:,} objects" in drv.find_element(By.TAG_NAME, "body").text
    assert freed[0].text and "not available" not in drv.find_element(By.TAG_NAME, "body").text
    _wait(drv, "#growth-plot .bars path")
    _no_js_errors(drv)
    _shot(drv, shots, "zeo-overview")

    # classes (plot and table) -> a class's objects -> an object -> one of its referrers
    drv.find_element(By.ID, "nav-classes").click()
    _wait(drv, "#classes-plot .bars path", 2)
    _shot(drv, shots, "zeo-classes")
    drv.find_element(By.LINK_TEXT, "refstorage._demo_model.Book").click()
    links = _wait(drv, "#class-objects a.oid")
    book = links[0].text
    links[0].click()
    WebDriverWait(drv, WAIT).until(EC.text_to_be_present_in_element((By.ID, "oid"), book))
    assert drv.find_element(By.ID, "object-class").text == "refstorage._demo_model.Book"
    tree = drv.find_element(By.ID, "state-tree").text
    assert "'title'" in tree and "'author'" in tree
    _wait(drv, "#graph-plot .scatterlayer .point", 3)
    _no_js_errors(drv)
    _shot(drv, shots, "zeo-object")
    referrers = drv.find_elements(By.CSS_SELECTOR, "#referrers a.oid")
    expected_referrers = [oid_repr(r) for r in ins.referrers_of(parse_oid(book))]
    assert [e.text for e in referrers] == expected_referrers[:len(referrers)]
    target = referrers[0].text
    referrers[0].click()
    WebDriverWait(drv, WAIT).until(EC.text_to_be_present_in_element((By.ID, "oid"), target))
    assert book in [e.text for e in drv.find_elements(By.CSS_SELECTOR, "#references a.oid")]
    _wait(drv, "#graph-plot .scatterlayer .point", 2)

    # a revised object's history and diff, read through loadSerial
    revised = next(o for o in ins.class_oids["refstorage._demo_model.Book"]
                   if len(ins.history(o.to_bytes(8, "big"))) > 1).to_bytes(8, "big")
    base = srv.url.split("?")[0].rstrip("/")
    drv.get(f"{base}/object/{oid_repr(revised)}")
    diff = drv.find_element(By.ID, "diff")
    assert diff.find_elements(By.CSS_SELECTOR, ".add") and diff.find_elements(By.CSS_SELECTOR, ".del")

    # transactions: the log, a filter, one transaction's records
    drv.find_element(By.ID, "nav-transactions").click()
    rows = _wait(drv, "#txn-table tbody tr")
    assert len(rows) == min(len(ins.txns), 50)
    _shot(drv, shots, "zeo-transactions")
    drv.find_element(By.NAME, "user").send_keys("bob")
    drv.find_element(By.CSS_SELECTOR, "#txnfilter button").click()
    WebDriverWait(drv, WAIT).until(EC.url_contains("user=bob"))
    rows = drv.find_elements(By.CSS_SELECTOR, "#txn-table tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows] == ["desk:bob", "desk:bob"]
    rows[0].find_element(By.CSS_SELECTOR, "a.txn").click()
    records = _wait(drv, "#txn-records tbody tr")
    assert len(records) == min(ins.transactions(user="bob")[0].records, 100)

    # garbage: what a pack would collect by class, the forecast; verify needs the file
    drv.find_element(By.ID, "nav-garbage").click()
    classes = [e.text for e in _wait(drv, "#garbage-table td.cls")]
    assert set(classes) == set(ins.garbage)
    body = drv.find_element(By.TAG_NAME, "body").text
    assert re.search(rf"A pack now would free .* of pickle data and remove "
                     rf"{forecast.objects_removed:,} objects", body)
    assert "Verify is not available through ZEO" in body
    _no_js_errors(drv)
    _shot(drv, shots, "zeo-garbage")

    # the token: none (cookie dropped), no page
    drv.delete_all_cookies()
    drv.get(base + "/classes")
    assert "403" in drv.find_element(By.TAG_NAME, "body").text
