"""`refstorage inspect`: the read-only web UI (refstorage.webui), started from the command line."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import webbrowser

import click

from . import main
from .common import DEFAULT_TIMEOUT, failing_cleanly, progress_bar

_HOST_PORT = re.compile(r"\[?[\w.:-]+\]?:\d{1,5}")


@main.command("inspect")
@click.argument("path", metavar="PATH_OR_URI")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but loopback exposes the database to the network).")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 picks a free one.")
@click.option("--no-browser", is_flag=True,
              help="Do not open a browser (none is opened without a desktop either); just print the URL.")
@click.option("--wait-timeout", type=click.FloatRange(0.1, 3600), default=DEFAULT_TIMEOUT,
              show_default=True, help="Seconds to wait for the ZEO server (a zeo:// URI).")
def inspect_command(path: str, host: str, port: int, no_browser: bool, wait_timeout: float) -> None:
    """Browse a database in a web browser, read-only: the refstorage file
    PATH, or the storage a ZEO server serves (zeo://HOST:PORT?storage=NAME,
    or HOST:PORT; any storage: refstorage, ZODB's FileStorage...).

    The file is opened read-only (a storage may be writing it meanwhile; the
    UI shows it as it was when opened) and indexed once; through ZEO, the
    transactions are read once with ZEO's remote iterator and the UI shows the
    database as of the last one (damage and verify need the file and are not
    offered; the pack forecast counts pickle bytes).  Nothing in it is
    unpickled: classes and states are read from the pickles' opcodes, so the
    application's code is neither needed nor run.  The server listens on
    HOST:PORT; its URL, printed as the first line, carries a random token
    that every request needs.  Stop it with Ctrl-C.
    """
    try:
        from ..webui.app import Server
        from ..webui.model import Inspector, ZeoInspector
    except ImportError as exc:  # flask or plotly missing
        raise click.ClickException(
            f"refstorage inspect needs the 'inspect' extra ({exc}); install it with: "
            "pip install 'refstorage[inspect]'") from None
    zeo = path.startswith("zeo://") or (_HOST_PORT.fullmatch(path) is not None and not os.path.exists(path))
    if "://" in path and not zeo:
        raise click.ClickException(
            f"{path}: refstorage inspect reads a refstorage file (give its path) or a ZEO server "
            "(zeo://HOST:PORT[?storage=NAME])")
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request unless -v
    with failing_cleanly():
        inspector = ZeoInspector(path, wait_timeout) if zeo else Inspector(path)
    try:
        server = Server(inspector, host, port)
    except OSError as exc:
        inspector.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    click.echo(server.url)
    sys.stdout.flush()
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"refstorage inspect: listening on {host}: whoever has the URL (with its token) can "
                   "read the whole database", err=True)

    def index() -> None:
        with progress_bar(inspector.size, "indexing", unit="B") as bar:
            bar.unit_scale = True
            bar.unit_divisor = 1024

            def update(pos: int) -> None:
                if pos > bar.n:
                    bar.update(pos - bar.n)
            try:
                inspector.index(update)
            except Exception as exc:
                click.echo(f"refstorage inspect: indexing failed: {inspector.error or exc}", err=True)
                return
        what = f"{len(inspector.txns):,} transactions" if zeo else f"{inspector.size:,} bytes"
        click.echo(f"indexed {what} in {inspector.index_seconds:.2f} s; serving until "
                   "Ctrl-C", err=True)

    threading.Thread(target=index, name="refstorage-inspect-index", daemon=True).start()
    if not no_browser and _has_display():
        threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        inspector.close(wait=False)


def _has_display() -> bool:
    """Is there a desktop to open a browser on?  (On a server, webbrowser would start a text
    browser in this terminal: there the URL printed is the way in.)"""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
