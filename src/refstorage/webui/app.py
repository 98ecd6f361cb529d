"""The Flask application of `refstorage inspect`: read-only pages over an `Inspector`.

Every request must carry the token: as `?token=...` (the URL printed at
start), or as the cookie the first such request sets.  Without it the answer
is 403 -- for the static assets too (Jupyter serves its /static/ without the
token; here the cookie carries it to them at no cost, and a stranger learns
nothing, not even that an inspector is listening).  The cookie is named after
the port, as Jupyter's is: browsers keep cookies per host, not per port, so
two inspectors on one host would otherwise overwrite each other's token.  Only
GET is routed: nothing here can write to the database.
Scripts and styles come from the package (plotly.min.js from plotly's own
package data): the UI works offline.
"""

from __future__ import annotations

import difflib
import hmac
import math
import os
import secrets
import threading
from importlib import resources

from flask import Flask, Response, abort, jsonify, redirect, render_template, request, send_file, url_for
from markupsafe import Markup

from .. import fileformat as fmt
from ..errors import CorruptedError
from ..tools.common import ToolError, oid_repr, parse_oid, parse_time, time_repr
from . import pickletree
from .model import Model

COOKIE = "refstorage_inspect_token"
PAGE = 50
HISTORY = 100  # revisions per page of an object's history
MAX_REFS = 500  # references listed on an object's page (its state shows them all)


def plotly_js_path() -> str:
    """plotly.min.js as shipped inside the plotly Python package."""
    return str(resources.files("plotly") / "package_data" / "plotly.min.js")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def create_app(inspector: Model, token: str) -> Flask:
    app = Flask(__name__)
    app.config["inspector"] = inspector
    app.config["token"] = token

    @app.before_request
    def check_token():
        given = request.args.get("token") or request.cookies.get(cookie_name()) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403)

    @app.after_request
    def remember_token(resp: Response) -> Response:
        if request.args.get("token") == token:
            resp.set_cookie(cookie_name(), token, httponly=True, samesite="Strict")
        resp.headers["Referrer-Policy"] = "no-referrer"  # URLs carrying the token go nowhere
        # the assets are the package's and do not change while it runs; the pages are live
        resp.headers["Cache-Control"] = ("private, max-age=3600" if request.path.startswith("/static/")
                                         else "no-store")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp

    def cookie_name() -> str:
        port = "".join(c for c in str(request.environ.get("SERVER_PORT", "")) if c.isdigit())
        return f"{COOKIE}_{port or 0}"

    @app.errorhandler(403)
    def forbidden(_e):
        return Response("403 Forbidden: this URL needs the token printed by `refstorage inspect`.\n",
                        403, mimetype="text/plain")

    @app.errorhandler(404)
    def not_found(_e):
        return render_template("notfound.html", path=request.path,
                               oid=request.args.get("oid")), 404

    @app.context_processor
    def helpers():
        return {"ins": inspector, "oid_repr": oid_repr, "time_repr": time_repr, "human": human,
                "obj_url": obj_url, "page_links": page_links}

    def obj_url(oid: bytes) -> str:
        return url_for("object_page", oid=oid_repr(oid))

    def needs_index():
        if not inspector.ready:
            return render_template("indexing.html"), 503
        return None

    # -- assets and status ----------------------------------------------------------------

    @app.route("/static/plotly.min.js")
    def plotly_js():
        return send_file(plotly_js_path(), mimetype="application/javascript", max_age=0)

    @app.route("/status")
    def status():
        return jsonify(state=inspector.state, position=inspector.progress_pos, size=inspector.size,
                       error=inspector.error, seconds=round(inspector.index_seconds, 3))

    # -- overview ---------------------------------------------------------------------------

    @app.route("/")
    def overview():
        if (r := needs_index()) is not None:
            return r
        try:
            days = float(request.args.get("days", "7"))
            if not math.isfinite(days) or days < 0:
                raise ValueError
        except ValueError:
            days = 7.0
        return render_template("overview.html", growth=inspector.growth(),
                               now=inspector.forecast(0, wait=False),
                               later=inspector.forecast(days, wait=False), days=days)

    # -- classes ----------------------------------------------------------------------------

    SORT_KEYS = {"name": None, "current": "current", "current_bytes": "current_bytes",
                 "historical": "historical", "historical_bytes": "historical_bytes"}

    @app.route("/classes")
    def classes():
        if (r := needs_index()) is not None:
            return r
        sort = request.args.get("sort", "current_bytes")
        if sort not in SORT_KEYS:
            sort = "current_bytes"
        desc = request.args.get("order", "desc" if sort != "name" else "asc") == "desc"
        rows = list(inspector.classes.items())
        if sort == "name":
            rows.sort(key=lambda kv: kv[0], reverse=desc)
        else:
            rows.sort(key=lambda kv: (getattr(kv[1], sort), kv[0]), reverse=desc)
        top = sorted(inspector.classes.items(),
                     key=lambda kv: -(kv[1].current_bytes + kv[1].historical_bytes))[:25]
        plot = {"names": [k for k, _ in top][::-1], "current": [v.current_bytes for _, v in top][::-1],
                "historical": [v.historical_bytes for _, v in top][::-1]}
        return render_template("classes.html", rows=rows, sort=sort, desc=desc, plot=plot)

    @app.route("/class/<path:name>")
    def class_objects(name: str):
        if (r := needs_index()) is not None:
            return r
        if name not in inspector.classes:
            abort(404)
        oids = inspector.class_oids.get(name, ())  # none if all its records are history
        page = _page()
        shown = [fmt.p64(n) for n in oids[page * PAGE * 2:(page + 1) * PAGE * 2]]
        return render_template("class.html", name=name, oids=shown, total=len(oids), page=page,
                               pages=_pages(len(oids), PAGE * 2), space=inspector.classes.get(name))

    # -- transactions -----------------------------------------------------------------------

    @app.route("/transactions")
    def transactions():
        if (r := needs_index()) is not None:
            return r
        f = {k: request.args.get(k, "").strip() for k in ("since", "until", "user", "q")}
        errors = []
        bounds = {}
        for k in ("since", "until"):
            if f[k]:
                try:
                    bounds[k] = parse_time(f[k])
                except ToolError as exc:
                    errors.append(str(exc))
        found = inspector.transactions(bounds.get("since"), bounds.get("until"), f["user"], f["q"])
        page = _page()
        return render_template("transactions.html", txns=found[page * PAGE:(page + 1) * PAGE],
                               total=len(found), page=page, pages=_pages(len(found), PAGE), f=f,
                               errors=errors)

    @app.route("/transaction/<int:pos>")
    def transaction(pos: int):
        if (r := needs_index()) is not None:
            return r
        txn = inspector.txn_at(pos)
        if txn is None:
            abort(404)
        page = _page()
        rows = inspector.txn_records(txn, page * PAGE * 2, PAGE * 2)
        return render_template("transaction.html", txn=txn, rows=rows, page=page,
                               pages=_pages(txn.records, PAGE * 2))

    # -- objects ----------------------------------------------------------------------------

    @app.route("/object")
    def object_lookup():
        try:
            oid = parse_oid(request.args.get("oid", ""))
        except ToolError:
            abort(404)  # the page says the oid could not be read
        return redirect(url_for("object_page", oid=oid_repr(oid)))

    @app.route("/object/<oid>")
    def object_page(oid: str):
        if (r := needs_index()) is not None:
            return r
        try:
            o = parse_oid(oid)
        except ToolError:
            abort(404)
        state = inspector.object_state(o)
        rec = inspector.current_data(o)
        parsed = inspector.parse(rec.data) if rec is not None else None
        tree = (pickletree.to_html(parsed.state, obj_url) if parsed is not None else None)
        last = inspector.history(o, 0, 1) if state != "missing" else []
        last_written = last[0].time if last else None
        hpage = _page("hpage")
        history = inspector.history(o, hpage * HISTORY, HISTORY + 1) if state != "missing" else []
        hpages = hpage + 1 + (len(history) > HISTORY)  # at least; more if there is a next page
        history = history[:HISTORY]
        diff, a, b = _diff(o, history)
        all_refs = inspector.references(o)
        refs = [(r, inspector.object_state(r), inspector.class_of(r)) for r in all_refs[:MAX_REFS]]
        referrers = inspector.referrers_of(o)
        page = _page()
        shown = [(r, inspector.class_of(r)) for r in referrers[page * PAGE:(page + 1) * PAGE]]
        return render_template("object.html", oid=o, state=state, rec=rec, parsed=parsed, tree=tree,
                               history=history, hpage=hpage, hpages=hpages, last_written=last_written,
                               diff=diff, a=a, b=b, refs=refs, refs_total=len(all_refs),
                               referrers=shown,
                               referrers_total=len(referrers), page=page,
                               pages=_pages(len(referrers), PAGE),
                               refs_unknown=o in inspector.refs_unknown)

    def _diff(oid: bytes, history) -> tuple[Markup | None, int | None, int | None]:
        with_data = [h for h in history if h.data is not None]
        try:
            a = int(request.args["a"]) if "a" in request.args else None
            b = int(request.args["b"]) if "b" in request.args else None
        except ValueError:
            a = b = None
        if any(x is not None and not 0 <= x < 1 << 64 for x in (a, b)):
            abort(404)  # no revision is there (a file position or a tid: 64 bits unsigned)
        if a is None or b is None:
            if len(with_data) < 2:
                return None, None, None
            a, b = with_data[1].pos, with_data[0].pos
        try:
            older, newer = inspector.revision(oid, a), inspector.revision(oid, b)
        except (CorruptedError, KeyError):  # no such revision (KeyError: through ZEO, POSKeyError)
            abort(404)

        def lines(h):
            if h.data is None:
                return ["(no data: deleted)"]
            p = pickletree.parse_record(h.data)
            return [f"class: {p.class_name}"] + pickletree.to_lines(p.state)
        out = []
        for line in difflib.unified_diff(lines(older), lines(newer), "older", "newer", lineterm="",
                                         n=3):
            css = ("add" if line.startswith("+") else "del" if line.startswith("-") else
                   "hunk" if line.startswith("@@") else "")
            out.append(Markup('<div class="{}">{}</div>').format(css, line))
        if not out:
            out.append(Markup('<div class="muted">(the two revisions have the same state)</div>'))
        return Markup("").join(out), a, b

    @app.route("/object/<oid>/graph")
    def object_graph(oid: str):
        if (r := needs_index()) is not None:
            return r
        try:
            o = parse_oid(oid)
        except ToolError:
            abort(404)
        g = inspector.graph(o)
        for n in g["nodes"]:
            n["url"] = url_for("object_page", oid=n["oid"])
        return jsonify(g)

    # -- garbage and damage -----------------------------------------------------------------

    @app.route("/garbage")
    def garbage():
        if (r := needs_index()) is not None:
            return r
        rows = sorted(inspector.garbage.items(), key=lambda kv: -kv[1].bytes)
        return render_template("garbage.html", rows=rows, forecast=inspector.forecast(0, wait=False),
                               verify=inspector.verify_report(wait=False))

    def _page(name: str = "page") -> int:
        try:
            return max(0, int(request.args.get(name, "0")))
        except ValueError:
            return 0

    return app


def _pages(total: int, per: int) -> int:
    return max(1, -(-total // per))


def page_links(endpoint: str, page: int, pages: int, **kw) -> Markup:
    if pages <= 1:
        return Markup("")
    parts = []
    if page > 0:
        parts.append(Markup('<a class="prev" href="{}">&larr; newer/previous</a>').format(
            url_for(endpoint, page=page - 1, **kw)))
    parts.append(Markup('<span class="muted">page {} of {}</span>').format(page + 1, pages))
    if page + 1 < pages:
        parts.append(Markup('<a class="next" href="{}">next &rarr;</a>').format(
            url_for(endpoint, page=page + 1, **kw)))
    return Markup('<nav class="pager">') + Markup(" ").join(parts) + Markup("</nav>")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


# -- serving ------------------------------------------------------------------------------

class Server:
    """The app on a werkzeug threaded server, in a background thread; `url` carries the token."""

    def __init__(self, inspector: Model, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None):
        from werkzeug.serving import make_server
        self.token = token or new_token()
        self.app = create_app(inspector, self.token)
        self.httpd = make_server(host, port, self.app, threaded=True)
        self.host = host
        self.port = self.httpd.server_port
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={self.token}"

    def start(self) -> None:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="refstorage-inspect",
                                       daemon=True)
        self.thread.start()

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(10)


def static_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "static")
