"""TLS (server certificate, client certificates) and the bearer token, over real channels. The certificates are
made here, at test time, with the `cryptography` package: a CA, a server certificate for localhost/127.0.0.1,
a client certificate, and a second CA nobody trusts."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest

from asymsearch.clients.client import NotAuthorised, SearchClient, ServerUnavailable, TlsOptions
from asymsearch.core.errors import UserError
from asymsearch.index.build import build_index
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import ServeOptions, create_server

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKEN = "tok-" + "x" * 28


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pki")
    files = {}

    def write(name: str, obj) -> None:
        path = out / f"{name}.pem"
        if isinstance(obj, x509.Certificate):
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        files[name] = path

    for ca_name in ("ca", "other_ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        write(ca_name, _cert(f"asymsearch test {ca_name}", ca_key, _name(f"asymsearch test {ca_name}"), ca_key,
                             ca=True))
        write(f"{ca_name}_key", ca_key)
        for role in ("server", "client"):
            key = ec.generate_private_key(ec.SECP256R1())
            prefix = "" if ca_name == "ca" else "rogue_"
            write(f"{prefix}{role}", _cert(f"{role}.test", key, _name(f"asymsearch test {ca_name}"), ca_key,
                                           server=role == "server"))
            write(f"{prefix}{role}_key", key)
    return files


@pytest.fixture(scope="module")
def engine(tmp_path_factory, image_folder, tiny_models):
    out = tmp_path_factory.mktemp("security") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    with QueryEngine.open(out, tiny_models["student"]) as engine:
        yield engine


def _serve(engine, **options):
    return create_server(engine, max_workers=4, **options)


def test_tls_server_certificate(engine, pki):
    server, port = _serve(engine, tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]))
    try:
        with SearchClient(f"127.0.0.1:{port}", tls=TlsOptions(root_ca=pki["ca"]), timeout=10) as client:
            assert client.info()["count"] == 80
            assert len(client.search_vector([1.0] * 16, k=3)) == 3
        with SearchClient(f"localhost:{port}", tls=TlsOptions(root_ca=pki["ca"].read_bytes()), timeout=10) as c:
            assert c.info()["count"] == 80
        # a client that trusts another CA, or speaks plaintext, gets nothing
        for kw in ({"tls": TlsOptions(root_ca=pki["other_ca"])}, {}):
            with SearchClient(f"127.0.0.1:{port}", timeout=2, retries=0, **kw) as client:
                with pytest.raises(ServerUnavailable):
                    client.info()
    finally:
        server.stop(None)


def test_tls_with_client_certificates(engine, pki):
    server, port = _serve(engine, tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]),
                          tls_client_ca=str(pki["ca"]))
    try:
        good = TlsOptions(root_ca=pki["ca"], cert=pki["client"], key=pki["client_key"])
        with SearchClient(f"127.0.0.1:{port}", tls=good, timeout=10) as client:
            assert client.info()["count"] == 80
        for tls in (TlsOptions(root_ca=pki["ca"]),  # no client certificate
                    TlsOptions(root_ca=pki["ca"], cert=pki["rogue_client"], key=pki["rogue_client_key"])):
            with SearchClient(f"127.0.0.1:{port}", tls=tls, timeout=2, retries=0) as client:
                with pytest.raises(ServerUnavailable):
                    client.info()
    finally:
        server.stop(None)


def test_admin_needs_the_token_and_search_does_not_unless_asked(engine):
    server, port = _serve(engine, admin=True, token=TOKEN)
    try:
        with SearchClient(f"127.0.0.1:{port}", timeout=10) as anonymous:
            assert anonymous.info()["admin_enabled"] is True
            assert len(anonymous.search_vector([1.0] * 16, k=2)) == 2  # Search is open
            with pytest.raises(NotAuthorised, match="missing bearer token"):
                anonymous.reload()
        with SearchClient(f"127.0.0.1:{port}", timeout=10, token="not-it") as wrong:
            with pytest.raises(NotAuthorised, match="invalid bearer token"):
                wrong.reload()
        with SearchClient(f"127.0.0.1:{port}", timeout=10, token=TOKEN) as admin:
            assert admin.reload() == {"index_version": "", "count": 80, "changed": False, "message": ""}
            with pytest.raises(Exception) as e:  # no updater configured: a clear UNIMPLEMENTED
                admin.remove_images([1])
            assert "not available on this server" in str(e.value)
        assert 'asymsearch_requests_total{code="UNAUTHENTICATED",method="Reload"} 2.0' in server.metrics.text()
    finally:
        server.stop(None)


def test_search_token_when_required(engine):
    server, port = _serve(engine, token=TOKEN, search_requires_token=True)
    try:
        with SearchClient(f"127.0.0.1:{port}", timeout=10) as anonymous:
            with pytest.raises(NotAuthorised):
                anonymous.search_vector([1.0] * 16, k=2)
            anonymous.wait_ready(5)  # health stays open for probes
        with SearchClient(f"127.0.0.1:{port}", timeout=10, token=TOKEN) as client:
            assert len(client.search_vector([1.0] * 16, k=2)) == 2
            assert [r for _, r in client.stream_search([[1.0] * 16], k=2)][0][0].id >= 0
    finally:
        server.stop(None)


def test_admin_is_off_by_default_and_never_without_a_token(engine):
    server, port = _serve(engine, token=TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                search_pb2_grpc.AdminStub(ch).Reload(search_pb2.ReloadRequest(), timeout=10,
                                                     metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)
    with pytest.raises(UserError, match="needs an admin-scope bearer token"):
        ServeOptions(admin=True)
    with pytest.raises(UserError, match="both a certificate and its private key"):
        ServeOptions(tls_cert="x.pem")


def test_cli_refuses_admin_without_token(tmp_path, tiny_models, capsys, engine):
    from asymsearch.cli.main import main
    code = main(["serve", "--index", str(engine.index.folder), "--student", str(tiny_models["student"]),
                 "--admin", "--port", "0", "--host", "127.0.0.1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("asymsearch: error: the admin service needs an admin-scope bearer token (--token-file "
                       "with a line 'admin TOKEN'); it never runs without one")
