"""`refstorage serve PATH`: serve a refstorage database to ZEO clients.

This runs ZEO's own server (ZEO.runzeo) in this process, configured the way
a hand-written runzeo configuration would be::

    %import refstorage
    <zeo>
      address 127.0.0.1:8100
    </zeo>
    <refstorage 1>
      path /srv/app/Data.rfs
      blob-dir /srv/app/blobs
    </refstorage>

so everything runzeo does (signal handling: SIGTERM/SIGINT stop it cleanly,
closing the storage; logging to stderr) applies.  Clients connect with
``ZEO.client(("127.0.0.1", 8100), blob_dir=...)`` or ``ZEO.DB(...)``.

With --tls-cert/--tls-key the server speaks only TLS (`server_ssl_context`);
with --tls-client-ca too, it accepts only clients presenting a certificate
signed by that CA (or listed in that directory), as runzeo's ``<ssl>`` section
with ``authenticate`` does.  Clients pass ``ssl=ssl.SSLContext`` to ZEO.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import ssl
import tempfile

import click

from . import main
from .common import CliError, check_database, check_new_file, failing_cleanly

DEFAULT_PORT = 8100


def _zconfig_value(value: str) -> str:
    """A value as ZConfig reads it back ($ starts a substitution; $$ is a $)."""
    if "\n" in value:
        raise click.BadParameter(f"{value!r}: a line break cannot appear in a configuration value")
    return value.replace("$", "$$")


def _storage_name(value: str) -> str:
    """A storage name as ZEO's configuration can carry it: no spaces, no parentheses."""
    if not re.fullmatch(r"[^\s()]+", value):
        raise click.BadParameter(f"{value!r}: a storage name is one or more characters, without spaces "
                                 "or parentheses", param_hint="'--name'")
    return value


def server_config(path: str, host: str, port: int, blob_dir: str | None = None,
                  read_only: bool = False, name: str = "1", invalidation_queue_size: int = 1000,
                  storage_writable: bool = False) -> str:
    """The runzeo (ZConfig) configuration that serves `path` as storage `name`.

    `storage_writable` opens the storage read-write even when the server is
    read-only for its clients (a replica: its replicator writes to it)."""
    lines = [
        "%import refstorage",
        "<zeo>",
        f"  address {_zconfig_value(host)}:{port}",
        f"  read-only {'true' if read_only else 'false'}",
        f"  invalidation-queue-size {invalidation_queue_size}",
        "</zeo>",
        f"<refstorage {_zconfig_value(name)}>",
        f"  path {_zconfig_value(os.path.abspath(path))}",
    ]
    if blob_dir:
        lines.append(f"  blob-dir {_zconfig_value(os.path.abspath(blob_dir))}")
    if read_only and not storage_writable:
        lines.append("  read-only true")
    lines.append("</refstorage>")
    return "\n".join(lines) + "\n"


def server_ssl_context(cert: str, key: str | None = None, client_ca: str | None = None) -> ssl.SSLContext:
    """The server's TLS context: its certificate and key, and, given a CA file
    or a directory of (hashed) CA/client certificates, required client
    certificates verified against it (what runzeo's ``<ssl>`` section builds).
    Without client_ca any client may connect, over TLS only."""
    cafile = capath = None
    if client_ca is not None:
        if os.path.isdir(client_ca):
            capath = client_ca
        else:
            cafile = client_ca
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cafile, capath=capath)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED if client_ca is not None else ssl.CERT_NONE
    if client_ca is not None:
        # as ZEO's own <ssl> section: strict X.509, and revocation lists honoured
        # when the CA file holds them (a revoked client is refused)
        context.verify_flags |= ssl.VERIFY_X509_STRICT | (
            ssl.VERIFY_CRL_CHECK_LEAF if context.cert_store_stats()["crl"] else 0)
        # a client certificate listed itself (not only its CA) is trusted too
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def run_server(config_text: str, ready=None, ssl_context: ssl.SSLContext | None = None,
               started=None) -> None:
    """Run ZEO's server with this configuration until SIGTERM/SIGINT.

    `ready(address)` is called once the server listens (address is the bound
    (host, port), useful with port 0); `ssl_context`, if given, makes it
    serve over TLS only.  `started(zeo_server, storages)`, if given, is called
    then too and may return an object with `stop()` (called before the
    storages close) and `promote()` (called on SIGUSR1)."""
    from ZEO.runzeo import ZEOOptions, ZEOServer

    class _Server(ZEOServer):
        extra = None

        def create_server(self) -> None:
            super().create_server()
            if started is not None:
                self.extra = started(self.server, self.storages)
            if ready is not None:
                ready(self.server.acceptor.addr)

        def close_server(self) -> None:
            if self.extra is not None:
                self.extra.stop()
            super().close_server()

        def handle_sigusr1(self) -> None:
            if self.extra is not None and hasattr(self.extra, "promote"):
                self.extra.promote()

    fd, conf_path = tempfile.mkstemp(prefix="refstorage-zeo-", suffix=".conf")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(config_text)
        options = ZEOOptions()
        options.realize(["-C", conf_path])
    finally:
        os.unlink(conf_path)
    if ssl_context is not None:
        options.ssl = ssl_context
    _Server(options).main()


def _check_host(host: str, port: int) -> None:
    """A one-line error unless the server can listen on (host, port)."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        cause = getattr(exc, "strerror", None) or str(exc)
        raise CliError(f"--host {host}: not an address to listen on ({cause})") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind(address)
        except OSError as exc:
            raise CliError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") \
                from None


@main.command(epilog="""\b
Examples:
  refstorage serve Data.rfs                          # on 127.0.0.1:8100
  refstorage serve Data.rfs --blob-dir blobs --port 8200
  refstorage serve New.rfs --create --port 0 --json  # a new database, on a free port""")
@click.argument("path", type=click.Path(dir_okay=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (beyond a trusted network, only with --tls-client-ca).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port; 0 picks a free one (the address is printed).")
@click.option("--blob-dir", type=click.Path(file_okay=False), default=None,
              help="Blob directory (enables blobs; created if missing).")
@click.option("--read-only", is_flag=True, help="Serve without accepting commits.")
@click.option("--name", default="1", show_default=True,
              callback=lambda ctx, param, value: _storage_name(value), help="Storage name clients ask for.")
@click.option("--create", is_flag=True,
              help="Create PATH if it does not exist (else a missing PATH is an error).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the address as one JSON line once listening: {\"path\", \"storage\", \"host\", "
                   "\"port\"}.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Serve over TLS only, with this certificate (PEM; may hold the key too).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The private key of --tls-cert (PEM).")
@click.option("--tls-client-ca", type=click.Path(exists=True), default=None,
              help="Accept only clients with a certificate signed by this CA file "
                   "(or found in this directory of hashed certificates); needs --tls-cert.")
@click.option("--replicate", "source", default=None, metavar="SOURCE",
              help="With --read-only: keep PATH a replica of the ZEO server SOURCE (HOST:PORT or "
                   "zeo://HOST:PORT?storage=NAME) while serving it; SIGUSR1 promotes it "
                   "(stop following, accept commits).")
@click.option("--poll", type=click.FloatRange(0.05, 3600), default=5.0, show_default=True,
              help="With --replicate: look for new commits at least this often (seconds).")
@click.option("--pack-days", type=click.FloatRange(0), default=None,
              help="With --replicate: pack the replica every --pack-every hours, keeping this many "
                   "days of history.")
@click.option("--pack-every", type=click.FloatRange(0.0001), default=24.0, show_default=True,
              help="With --pack-days: hours between the replica's packs.")
def serve(path: str, host: str, port: int, blob_dir: str | None, read_only: bool, name: str,
          create: bool, as_json: bool, tls_cert: str | None, tls_key: str | None,
          tls_client_ca: str | None, source: str | None, poll: float, pack_days: float | None,
          pack_every: float) -> None:
    """Serve the refstorage database PATH over ZEO until interrupted.

    Clients: ZEO.DB((HOST, PORT), blob_dir=LOCAL_CACHE_DIR), or the zodburi
    URI zeo://HOST:PORT?blob_dir=LOCAL_CACHE_DIR.  Stop with Ctrl-C or SIGTERM.
    With --read-only --replicate SOURCE, PATH follows SOURCE (see `refstorage
    replicate`) and its clients see each copied commit as usual, through ZEO's
    invalidations; `kill -USR1` promotes it to a read-write server.
    """
    if tls_cert is None and (tls_key or tls_client_ca):
        raise click.ClickException("--tls-key and --tls-client-ca need --tls-cert")
    if source is not None and not read_only:
        raise click.UsageError("--replicate serves a replica, which is --read-only until promoted")
    if pack_days is not None and source is None:
        raise click.UsageError("--pack-days schedules a replica's packs: it needs --replicate")
    with failing_cleanly(path, locked_hint="or serve it beside that process with --read-only"):
        for what, value in (("PATH", path), ("--blob-dir", blob_dir)):
            if value and not os.path.isdir(os.path.dirname(os.path.abspath(value))):
                raise click.ClickException(f"{what}: the directory that should hold {value} does not exist")
        if read_only and source is None and not os.path.exists(path):
            raise click.ClickException(f"{path} does not exist (a read-only server does not create it)")
        if source is not None and not os.path.exists(path):
            check_new_file(path)  # a new replica: created empty, then it catches up
            from ..storage import FileStorage
            FileStorage(path, create=True).close()
        elif os.path.exists(path) or not create:
            if not os.path.lexists(path):
                raise CliError(f"{path}: no such file (give --create to start a new database)")
            check_database(path)
        else:
            check_new_file(path)
        _check_host(host, port)
        config_text = server_config(path, host, port, blob_dir, read_only, name,
                                    storage_writable=source is not None)
        ssl_context = None
        if tls_cert is not None:
            try:
                ssl_context = server_ssl_context(tls_cert, tls_key, tls_client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise click.ClickException(
                    f"cannot use the TLS certificate, key or client CA: {exc}") from exc
        # runzeo logs to stderr itself; keep one handler
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)

        def ready(address) -> None:
            host_, port_ = address[:2]
            if as_json:
                click.echo(json.dumps({"path": os.path.abspath(path), "storage": name, "host": host_,
                                       "port": port_}))
            else:
                click.echo(f"serving {os.path.abspath(path)} as storage {name!r} on {host_}:{port_}")
            click.get_text_stream("stdout").flush()

        started = None
        if source is not None:
            def started(zeo_server, storages):
                from ..replicate import Follower

                def failed(exc: BaseException) -> None:
                    # a replica that silently stopped following would be worse than none
                    os.kill(os.getpid(), signal.SIGHUP)  # runzeo exits with status 1

                follower = Follower(source, storages[name], zeo_server, name, poll_interval=poll,
                                    pack_days=pack_days, pack_every=pack_every * 3600,
                                    on_failure=failed)
                follower.start()
                return follower

        run_server(config_text, ready, ssl_context, started)
