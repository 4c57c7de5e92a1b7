"""`asymsearch query` against in-process servers on port 0: folders, JSONL/CSV output, round robin, tokens, and
one line plus a documented exit code for every failure."""
from __future__ import annotations

import csv
import json
import shutil
import socket

import pytest

from asymsearch.cli.cmd_query import (EXIT_NOT_AUTHORISED, EXIT_OK, EXIT_PAIRING, EXIT_SOME_FAILED,
                                      EXIT_UNAVAILABLE, EXIT_USAGE)
from asymsearch.cli.main import main
from asymsearch.clients.client import SearchClient
from asymsearch.core.data import list_image_folder
from asymsearch.index.build import build_index
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import create_server

TOKEN = "cli-token-123"


@pytest.fixture(scope="module")
def servers(tmp_path_factory, image_folder, tiny_models):
    """Two open replicas and one that needs the token for searches."""
    out = tmp_path_factory.mktemp("query_cli") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    engines = [QueryEngine.open(out, tiny_models["student"], max_k=50) for _ in range(3)]
    started = [create_server(engines[0], max_workers=4), create_server(engines[1], max_workers=4),
               create_server(engines[2], max_workers=4, token=TOKEN, search_requires_token=True)]
    yield [(s, f"127.0.0.1:{port}") for s, port in started]
    for (s, _), e in zip(started, engines):
        s.stop(None)
        e.close()


@pytest.fixture(scope="module")
def items(image_folder):
    return list_image_folder(image_folder)


@pytest.fixture(scope="module")
def queries(tmp_path_factory, items):
    """A folder tree of 5 images (nested) plus a text file that is not an image and must be skipped."""
    root = tmp_path_factory.mktemp("queries")
    for n, i in enumerate((0, 11, 23, 47, 79)):
        sub = root / ("a" if n < 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(items[i].path, sub / f"q{n}.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asymsearch: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


def test_folder_to_jsonl_and_csv_equal_the_sdk(servers, queries, tmp_path, capsys):
    address = servers[0][1]
    files = sorted(p for p in queries.rglob("*.jpg"))
    with SearchClient(address, timeout=10) as client:
        expected = {str(p): client.search_image(p, k=4) for p in files}
    out = tmp_path / "r.jsonl"
    assert main(["query", str(queries), "--server", address, "-k", "4", "--output", str(out)]) == EXIT_OK
    assert "wrote 5 results (0 failed)" in capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query"] for r in records] == [str(p) for p in files]
    for r in records:
        assert [(h["id"], h["label"], h["path"]) for h in r["hits"]] == \
            [(h.id, h.label, h.path) for h in expected[r["query"]]]
        assert [h["score"] for h in r["hits"]] == pytest.approx([h.score for h in expected[r["query"]]], abs=1e-6)

    out_csv = tmp_path / "r.csv"
    assert main(["query", str(queries), "--server", address, "-k", "4", "-o", str(out_csv)]) == EXIT_OK
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 5 * 4
    first = [r for r in rows if r["query"] == str(files[0])]
    assert [int(r["rank"]) for r in first] == [1, 2, 3, 4]
    assert [int(r["id"]) for r in first] == [h.id for h in expected[str(files[0])]]


def test_table_by_default_and_json_for_scripts(servers, items, capsys):
    address = servers[0][1]
    with SearchClient(address, timeout=10) as client:
        expected = client.search_image(items[5].path, k=3)
    capsys.readouterr()
    assert main(["query", items[5].path, "--server", address, "-k", "3"]) == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0] == items[5].path and len(table) == 4
    for line, hit in zip(table[1:], expected):
        assert f"{hit.score:.4f}" in line and hit.label in line and hit.path in line
    assert main(["query", items[5].path, "--server", f"grpc://{address}", "-k", "3", "--json"]) == EXIT_OK
    record = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in record["hits"]] == [h.id for h in expected]


def test_several_servers_round_robin(servers, queries, capsys):
    (a, addr_a), (b, addr_b) = servers[0], servers[1]

    def batches(s):
        return s.metrics.registry.get_sample_value("asymsearch_requests_total",
                                                   {"method": "BatchSearch", "code": "OK"}) or 0.0

    before = batches(a), batches(b)
    slow_ok = ["--timeout", "60"]  # a loaded CI machine once took more than the default 10 s for one call
    for _ in range(4):
        assert main(["query", str(queries), "--server", addr_a, "--server", addr_b, "--json", *slow_ok]) == EXIT_OK
    # one channel per run, one BatchSearch per run: across runs the first pick varies; within one run use:
    assert main(["query", *[str(queries)] * 8, "--server", f"{addr_a},{addr_b}", "--json", *slow_ok]) == EXIT_OK
    capsys.readouterr()
    # 40 images in chunks of 16: 3 calls in the last run, 4 before; both replicas served some
    spread = batches(a) - before[0], batches(b) - before[1]
    assert sum(spread) == 7 and min(spread) >= 1, spread


def test_unreadable_image_is_one_line_and_the_rest_are_answered(servers, items, tmp_path, capsys, tiny_models):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    for extra in ([], ["--on-device", str(tiny_models["student"])]):
        capsys.readouterr()
        code = main(["query", items[0].path, str(bad), items[1].path, "--server", servers[0][1], "--json", *extra])
        assert code == EXIT_SOME_FAILED
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and "broken.jpg" in err[0] and "not a readable image" in err[0], err
        records = [json.loads(line) for line in captured.out.splitlines()]
        assert [r["query"] for r in records] == [items[0].path, str(bad), items[1].path]
        assert "error" in records[1] and len(records[0]["hits"]) == 5 and len(records[2]["hits"]) == 5


def test_server_down_exit_3(items, capsys):
    assert main(["query", items[0].path, "--server", f"127.0.0.1:{_closed_port()}", "--timeout", "2",
                 "--retries", "1"]) == EXIT_UNAVAILABLE
    assert "unavailable" in _one_error_line(capsys)


def test_tokens(servers, items, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ASYMSEARCH_TOKEN", raising=False)
    address = servers[2][1]
    assert main(["query", items[0].path, "--server", address]) == EXIT_NOT_AUTHORISED
    assert "missing bearer token" in _one_error_line(capsys)
    assert main(["query", items[0].path, "--server", address, "--token", "wrong"]) == EXIT_NOT_AUTHORISED
    assert "invalid bearer token" in _one_error_line(capsys)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert main(["query", items[0].path, "--server", address, "--token-file", str(token_file), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 5
    monkeypatch.setenv("ASYMSEARCH_TOKEN", TOKEN)
    assert main(["query", items[0].path, "--server", address, "--json"]) == EXIT_OK
    capsys.readouterr()
    assert main(["query", items[0].path, "--server", address, "--token-file", str(tmp_path / "nope")]) == EXIT_USAGE
    assert "cannot read the token file" in _one_error_line(capsys)


def test_student_of_another_teacher_exit_5(servers, items, tiny_models, capsys):
    assert main(["query", items[0].path, "--server", servers[0][1], "--on-device",
                 str(tiny_models["foreign_student"])]) == EXIT_PAIRING
    line = _one_error_line(capsys)
    assert "teacher-b" in line and "teacher-a" in line


def test_bad_input_exit_2(servers, items, tmp_path, capsys):
    address = servers[0][1]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["query", str(empty), "--server", address]) == EXIT_USAGE
    assert "no images" in _one_error_line(capsys)
    assert main(["query", items[0].path, "--server", address, "-k", "51"]) == EXIT_USAGE
    assert "max_k of 50" in _one_error_line(capsys)
    assert main(["query", items[0].path, "--server", address, "--tls-ca", str(tmp_path / "ca.pem")]) == EXIT_USAGE
    assert "cannot read" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as e:  # argparse: a path that does not exist
        main(["query", str(tmp_path / "missing.jpg"), "--server", address])
    assert e.value.code == EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["query", "--help"])
    out = capsys.readouterr().out
    for line in ("0  every query answered", "3  server unavailable", "4  not authorised", "5  pairing mismatch"):
        assert line in out


def _tls_files(out):
    """A CA and a server certificate for 127.0.0.1/localhost, made here with `cryptography`."""
    import datetime
    import ipaddress
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject, public, ca):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("cli test ca"))
             .public_key(public).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    files = {"ca": cert("cli test ca", ca_key.public_key(), True), "cert": cert("server", key.public_key(), False),
             "key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())}
    for n, data in files.items():
        (out / f"{n}.pem").write_bytes(data)
    return {n: out / f"{n}.pem" for n in files}


def test_tls_with_the_ca_and_round_robin(tmp_path, index_for_tls, tiny_models, items, capsys):
    pem = _tls_files(tmp_path)
    (tmp_path / "other").mkdir()
    other_ca = _tls_files(tmp_path / "other")["ca"]  # a CA that did not sign the server's certificate
    with QueryEngine.open(index_for_tls, tiny_models["student"]) as engine:
        started = [create_server(engine, max_workers=4, tls_cert=str(pem["cert"]), tls_key=str(pem["key"]))
                   for _ in range(2)]
        try:
            addresses = [f"127.0.0.1:{port}" for _, port in started]
            args = ["query", items[3].path, "--json", "--server", addresses[0], "--server", addresses[1]]
            assert main([*args, "--tls-ca", str(pem["ca"])]) == EXIT_OK
            assert len(json.loads(capsys.readouterr().out)["hits"]) == 5
            # plaintext against a TLS server, or TLS without trusting its CA: unavailable, one line
            assert main([*args, "--timeout", "2", "--retries", "0"]) == EXIT_UNAVAILABLE
            _one_error_line(capsys)
            assert main([*args, "--tls-ca", str(other_ca), "--timeout", "2", "--retries", "0"]) == \
                EXIT_UNAVAILABLE
            _one_error_line(capsys)
        finally:
            for s, _ in started:
                s.stop(None)


@pytest.fixture(scope="module")
def index_for_tls(tmp_path_factory, image_folder, tiny_models):
    out = tmp_path_factory.mktemp("query_cli_tls") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    return out


@pytest.fixture(scope="module")
def http_images(image_folder):
    """The fixture images served by the standard library's http.server on port 0, in a background thread."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(image_folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_image_urls_are_fetched_and_answered_like_files(servers, items, http_images, tiny_models, capsys):
    address = servers[0][1]
    item = items[29]
    url = f"{http_images}/{item.label}/{item.path.rsplit('/', 1)[1]}"
    with SearchClient(address, timeout=10) as client:
        expected = client.search_image(item.path, k=4)
    for extra in ([], ["--on-device", str(tiny_models["student"])]):
        capsys.readouterr()
        assert main(["query", url, item.path, "--server", address, "-k", "4", "--json", *extra]) == EXIT_OK
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["query"] for r in records] == [url, item.path]
        assert [h["id"] for h in records[0]["hits"]] == [h["id"] for h in records[1]["hits"]]
        assert records[0]["hits"][0]["id"] == 29
        if not extra:
            assert [h["id"] for h in records[0]["hits"]] == [h.id for h in expected]


def test_bad_urls_fail_alone_with_one_line(servers, items, http_images, capsys, monkeypatch):
    import asymsearch.cli.cmd_query as cmd_query
    address = servers[0][1]
    item = items[3]
    good = f"{http_images}/{item.label}/{item.path.rsplit('/', 1)[1]}"
    missing = f"{http_images}/nope/missing.jpg"
    refused = f"http://127.0.0.1:{_closed_port()}/x.jpg"
    capsys.readouterr()
    assert main(["query", missing, good, refused, "--server", address, "--json"]) == EXIT_SOME_FAILED
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and "Traceback" not in captured.err, err
    assert missing in err[0] and "HTTP 404" in err[0]
    assert refused in err[1] and "cannot fetch" in err[1]
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["query"] for r in records] == [missing, good, refused]
    assert records[1]["hits"][0]["id"] == 3 and "error" in records[0] and "error" in records[2]

    monkeypatch.setattr(cmd_query, "URL_MAX_BYTES", 100)  # the fixture JPEGs are larger than 100 bytes
    assert main(["query", good, "--server", address]) == EXIT_SOME_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "limit" in err[0], err
