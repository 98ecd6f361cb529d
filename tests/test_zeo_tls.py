"""`refstorage serve --tls-cert/--tls-key/--tls-client-ca`: ZEO over TLS.

The server is `python -m refstorage serve` on 127.0.0.1 (port 0, read from
its first line); the certificates are committed in tests/data/tls (made by
make_certs.sh there).  A client with a certificate signed by the client CA
commits and loads; a client without a certificate, with one from another CA,
or over plain TCP is refused.  A small recording proxy between client and
server shows that the bytes on the wire do not contain the pickles (and, as a
control, that they do without TLS).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import ZEO
from click.testing import CliRunner
from persistent.mapping import PersistentMapping
from ZEO.Exceptions import ClientDisconnected

from refstorage.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
TLS = os.path.join(HERE, "data", "tls")
SRC = os.path.join(HERE, "..", "src")
ENV = dict(os.environ, PYTHONPATH=os.path.abspath(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
TIMEOUT = 30.0
MARKER = "wire-marker-6b1f0c"


def _cert(name: str) -> str:
    return os.path.join(TLS, name)


def client_context(cert: str | None = "client") -> ssl.SSLContext:
    """A client context trusting the test CA, presenting `cert` (None: none)."""
    context = ssl.create_default_context(cafile=_cert("ca.pem"))
    if cert is not None:
        context.load_cert_chain(_cert(f"{cert}.pem"), _cert(f"{cert}_key.pem"))
    return context


class Server:
    def __init__(self, path: str, *options: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "refstorage", "serve", path, "--create", "--port", "0", *options],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("serving "):
            self.stop()
            raise AssertionError(f"server did not start: {line!r}")
        self.addr = ("127.0.0.1", int(line.rsplit(":", 1)[1]))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def served(tmp_path):
    made = []

    def start(*options: str) -> Server:
        server = Server(str(tmp_path / f"Data{len(made)}.rfs"), *options)
        made.append(server)
        return server
    yield start
    for server in made:
        assert server.stop() == 0


MUTUAL = ("--tls-cert", _cert("server.pem"), "--tls-key", _cert("server_key.pem"),
          "--tls-client-ca", _cert("ca.pem"))


def _commit_and_load(addr, context: ssl.SSLContext | None, key: str = "k", value: str = MARKER) -> None:
    db = ZEO.DB(addr, ssl=context, wait_timeout=TIMEOUT)
    try:
        with db.transaction() as conn:
            conn.root()[key] = PersistentMapping({"value": value})
        db.cacheMinimize()
        with db.transaction() as conn:
            assert conn.root()[key]["value"] == value
    finally:
        db.close()
    # a second client, fresh cache: the data came back from the server
    db = ZEO.DB(addr, ssl=context, wait_timeout=TIMEOUT)
    try:
        with db.transaction() as conn:
            assert conn.root()[key]["value"] == value
    finally:
        db.close()


def _refused(addr, context: ssl.SSLContext | None) -> None:
    with pytest.raises(ClientDisconnected):
        client = ZEO.client(addr, ssl=context, wait_timeout=2)
        client.close()  # not reached when refused


def test_a_client_with_a_valid_certificate_commits_and_loads(served):
    _commit_and_load(served(*MUTUAL).addr, client_context("client"))


def test_a_client_without_a_certificate_is_refused(served):
    server = served(*MUTUAL)
    _refused(server.addr, client_context(None))
    # the server is still fine for a good client
    _commit_and_load(server.addr, client_context("client"))


def test_a_client_with_an_unknown_certificate_is_refused(served):
    _refused(served(*MUTUAL).addr, client_context("stranger"))


def test_a_plain_tcp_client_is_refused(served):
    _refused(served(*MUTUAL).addr, None)


def test_a_directory_of_client_certificates(served, tmp_path):
    # --tls-client-ca DIR: OpenSSL's hashed directory (`openssl rehash DIR`, or
    # c_rehash); only the certificates found there are accepted
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", _cert("ca.pem")],
                                  capture_output=True, text=True, check=False).stdout.strip()
    if not subject_hash:
        pytest.skip("needs the openssl command to hash the directory")
    (trusted / f"{subject_hash}.0").write_bytes(open(_cert("ca.pem"), "rb").read())
    server = served("--tls-cert", _cert("server.pem"), "--tls-key", _cert("server_key.pem"),
                    "--tls-client-ca", str(trusted))
    _commit_and_load(server.addr, client_context("client"))
    _refused(server.addr, client_context("stranger"))


def test_tls_without_client_certificates(served):
    server = served("--tls-cert", _cert("server.pem"), "--tls-key", _cert("server_key.pem"))
    _commit_and_load(server.addr, client_context(None))
    _refused(server.addr, None)


class RecordingProxy:
    """Forwards 127.0.0.1:port to `target`, keeping every byte it forwards."""

    def __init__(self, target):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = self.listener.getsockname()
        self.data = bytearray()
        self.lock = threading.Lock()
        self.closing = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            upstream = socket.create_connection(self.target, timeout=TIMEOUT)
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        deadline = time.monotonic() + 120
        socks = [a, b]
        try:
            while not self.closing and time.monotonic() < deadline:
                ready, _, _ = select.select(socks, [], [], 0.2)
                for s in ready:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    with self.lock:
                        self.data += chunk
                    (b if s is a else a).sendall(chunk)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        self.closing = True
        self.thread.join(5)
        self.listener.close()


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-control"])
def test_the_bytes_on_the_wire_are_not_the_pickles(served, tls):
    server = served(*MUTUAL) if tls else served()
    proxy = RecordingProxy(server.addr)
    try:
        context = client_context("client") if tls else None
        if context is not None:
            context.check_hostname = False  # the proxy's address is 127.0.0.1 too, but be explicit
        _commit_and_load(proxy.addr, context)
    finally:
        proxy.close()
    with proxy.lock:
        data = bytes(proxy.data)
    assert len(data) > 1000
    # the pickle of the state {"value": MARKER} holds MARKER as is
    assert (MARKER.encode() in data) is (not tls)
    assert (b"persistent.mapping" in data) is (not tls)


def test_tls_options_are_checked(tmp_path):
    runner = CliRunner()
    data = str(tmp_path / "Data.rfs")
    result = runner.invoke(main, ["serve", data, "--port", "0", "--tls-key", _cert("server_key.pem")])
    assert result.exit_code == 1 and "need --tls-cert" in result.output
    result = runner.invoke(main, ["serve", data, "--create", "--port", "0", "--tls-cert", _cert("ca.pem")])
    assert result.exit_code == 1 and "cannot use the TLS certificate" in result.output
    assert not os.path.exists(data)
    result = runner.invoke(main, ["serve", data, "--tls-cert", str(tmp_path / "missing.pem")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_a_directory_listing_a_client_certificate_itself(served, tmp_path):
    """Found by an outside review: a leaf certificate listed in the directory (not its CA)
    was refused; the help says the certificates listed there are accepted."""
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", _cert("client.pem")],
                                  capture_output=True, text=True, check=False).stdout.strip()
    if not subject_hash:
        pytest.skip("needs the openssl command to hash the directory")
    (trusted / f"{subject_hash}.0").write_bytes(open(_cert("client.pem"), "rb").read())
    server = served("--tls-cert", _cert("server.pem"), "--tls-key", _cert("server_key.pem"),
                    "--tls-client-ca", str(trusted))
    _commit_and_load(server.addr, client_context("client"))
    _refused(server.addr, client_context("stranger"))


_OPENSSL_CA_CONF = """\
[ca]
default_ca = test
[test]
dir = {d}
database = {d}/index.txt
crlnumber = {d}/crlnumber
certificate = {d}/rca.pem
private_key = {d}/rca_key.pem
default_md = sha256
default_crl_days = 30
"""


def test_a_revoked_client_certificate_is_refused(served, tmp_path):
    """Found by an outside review: with a CA file holding a revocation list, a revoked
    client was accepted (ZEO's own <ssl> section refuses it)."""
    d = tmp_path
    ext = d / "client.ext"
    ext.write_text("extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n")
    (d / "ca.cnf").write_text(_OPENSSL_CA_CONF.format(d=d))
    (d / "index.txt").write_text("")
    (d / "crlnumber").write_text("01\n")

    def openssl(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False, cwd=d)
        if proc.returncode:
            pytest.skip(f"openssl {args[0]} failed: {proc.stderr[-300:]}")

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=revoking CA",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", "rca_key.pem", "-out", "rca.pem")
    for name in ("kept", "revoked"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                f"{name}_key.pem", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "rca.pem", "-CAkey", "rca_key.pem",
                "-CAcreateserial", "-days", "30", "-extfile", "client.ext", "-out", f"{name}.pem")
    openssl("ca", "-config", "ca.cnf", "-revoke", "revoked.pem")
    openssl("ca", "-config", "ca.cnf", "-gencrl", "-out", "crl.pem")
    (d / "ca_and_crl.pem").write_text((d / "rca.pem").read_text() + (d / "crl.pem").read_text())
    server = served("--tls-cert", _cert("server.pem"), "--tls-key", _cert("server_key.pem"),
                    "--tls-client-ca", str(d / "ca_and_crl.pem"))

    def context(name: str) -> ssl.SSLContext:
        c = ssl.create_default_context(cafile=_cert("ca.pem"))
        c.load_cert_chain(str(d / f"{name}.pem"), str(d / f"{name}_key.pem"))
        return c

    _commit_and_load(server.addr, context("kept"))
    _refused(server.addr, context("revoked"))
