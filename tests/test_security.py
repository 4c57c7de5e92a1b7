"""Secure by default, over real channels and real subprocesses: loopback unless told, plaintext elsewhere only with
--insecure, admin only over TLS or loopback; scoped tokens (rotation, SIGHUP reload, search never implies admin);
no server paths in replies unless exposed; images pushed over the wire, path-based adds confined to admin roots,
Reload confined to the served root; no message echoing a file's content. Each refusal is followed by a good
request that succeeds."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from asymsearch.cli.main import main
from asymsearch.clients.client import SearchClient
from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import UserError
from asymsearch.core.synthetic import make_synthetic_dataset
from asymsearch.index.build import build_index
from asymsearch.server.admin import TeacherUpdater
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import ServeOptions, create_server
from asymsearch.server.tokens import read_token_file
from conftest import wait_until

SEARCH_A, SEARCH_B, ADMIN = "search-token-aaaa", "search-token-bbbb", "admin-token-cccc"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, image_folder, tiny_models):
    out = tmp_path_factory.mktemp("sec") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    return out


@pytest.fixture()
def root(tmp_path, index_dir):
    """A versioned root of its own (admin updates publish into it)."""
    out = tmp_path / "root"
    (out / "versions").mkdir(parents=True)
    shutil.copytree(index_dir, out / "versions" / "v000001")
    (out / "CURRENT").write_text("v000001\n")
    return out


@pytest.fixture(scope="module")
def items(image_folder):
    return list_image_folder(image_folder)


@pytest.fixture()
def token_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text(f"# search clients (two during a rotation) and the operator\nsearch {SEARCH_A}\nsearch {SEARCH_B}\n"
                 f"admin {ADMIN}\n")
    return f


def code_of(excinfo) -> grpc.StatusCode:
    return excinfo.value.code


# -- safe defaults -----------------------------------------------------------------------------------------------

def test_loopback_by_default_and_plaintext_elsewhere_only_when_asked():
    assert ServeOptions().host == "127.0.0.1"
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        with pytest.raises(UserError, match="without TLS needs --insecure"):
            ServeOptions(host=host)
        assert ServeOptions(host=host, insecure=True).insecure
        with pytest.raises(UserError, match="admin service over plaintext is only served on a loopback"):
            ServeOptions(host=host, insecure=True, admin=True, token=ADMIN)
    for host in ("127.0.0.1", "localhost", "::1", "127.5.6.7"):
        assert ServeOptions(host=host, admin=True, token=ADMIN).admin


def test_cli_refuses_a_reachable_plaintext_bind_in_one_line(index_dir, tiny_models, capsys):
    code = main(["serve", "--index", str(index_dir), "--student", str(tiny_models["student"]),
                 "--host", "0.0.0.0", "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--insecure" in err[0] and "--tls-cert" in err[0], err


def test_replies_carry_no_server_path_unless_exposed(index_dir, tiny_models, items):
    with QueryEngine.open(index_dir, tiny_models["student"]) as engine:
        for expose in (False, True):
            server, port = create_server(engine, expose_paths=expose)
            try:
                with SearchClient(f"127.0.0.1:{port}") as client:
                    hits = client.search_image(items[5].path, k=4)
                    batch = client.batch_search([items[5].path], k=4)[0]
                    streamed = [r for _, r in client.stream_search([items[5].path], k=4)][0]
                for result in (hits, batch, streamed):
                    assert [h.label for h in result] == [items[h.id].label for h in result]
                    assert [h.path for h in result] == ([items[h.id].path for h in result] if expose else [""] * 4)
            finally:
                server.stop(None)


# -- scoped tokens -----------------------------------------------------------------------------------------------

def test_token_file_format_and_errors_never_echo_a_token(tmp_path):
    f = tmp_path / "t"
    f.write_text("search abc\nadmin def\nlegacy-token-alone\n")
    tokens = read_token_file(f)
    assert tokens.scopes_of("abc") == {"search"} and tokens.scopes_of("def") == {"search", "admin"}
    assert tokens.scopes_of("legacy-token-alone") == {"search", "admin"} and tokens.scopes_of("abd") == set()
    f.write_text("search ok\nsuperuser s3cret-value\n")
    with pytest.raises(UserError) as e:
        read_token_file(f)
    assert "line 2" in str(e.value) and "s3cret" not in str(e.value) and "superuser" not in str(e.value)
    f.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="holds no token"):
        read_token_file(f)


def test_scopes_over_the_wire(root, tiny_models, items, token_file):
    """Search needs a search or admin token; Admin an admin token: a search token there is PERMISSION_DENIED, an
    unknown one UNAUTHENTICATED; both search tokens work (rotation)."""
    with QueryEngine.open(root, tiny_models["student"]) as engine:
        server, port = create_server(engine, token_file=str(token_file), search_requires_token=True, admin=True)
        address = f"127.0.0.1:{port}"
        try:
            for token in (SEARCH_A, SEARCH_B, ADMIN):
                with SearchClient(address, token=token) as client:
                    assert len(client.search_image(items[1].path, k=3)) == 3
            for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("nope", grpc.StatusCode.UNAUTHENTICATED),
                                (SEARCH_A, grpc.StatusCode.PERMISSION_DENIED)):
                with SearchClient(address, token=token, retries=0) as client:
                    with pytest.raises(Exception) as refused:
                        client.reload()
                    assert code_of(refused) == code, token
                    if token == SEARCH_A:
                        assert "needs a token of scope admin" in str(refused.value)
            with pytest.raises(Exception) as refused, SearchClient(address, retries=0) as client:
                client.search_image(items[1].path, k=3)
            assert code_of(refused) == grpc.StatusCode.UNAUTHENTICATED
            with SearchClient(address, token=ADMIN) as client:
                assert client.reload()["index_version"] == "v000001"
        finally:
            server.stop(None)


def _serve_process(args: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "asymsearch.cli.main", "serve", *args, "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, lines = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(r"serving \d+ items on 127\.0\.0\.1:(\d+)", line):
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError("".join(lines))


def _works(address: str, token: str, path: str) -> bool:
    try:
        with SearchClient(address, token=token, retries=0) as client:
            return len(client.search_image(path, k=2)) == 2
    except Exception:  # noqa: BLE001 - refused or not yet: the caller waits
        return False


def test_sighup_reloads_the_token_file_and_a_broken_file_keeps_the_old_tokens(index_dir, tiny_models, items,
                                                                             token_file):
    """A real `asymsearch serve`: rotate by editing the file and sending SIGHUP; an unparsable file is refused
    (logged by line number) and the tokens in use stay."""
    proc, port = _serve_process(["--index", str(index_dir), "--student", str(tiny_models["student"]),
                                 "--token-file", str(token_file), "--search-requires-token"])
    address, path = f"127.0.0.1:{port}", items[2].path
    try:
        assert _works(address, SEARCH_A, path) and _works(address, SEARCH_B, path)
        token_file.write_text(f"search {SEARCH_B}\nsearch fresh-token-dddd\nadmin {ADMIN}\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: not _works(address, SEARCH_A, path)), "the removed token still works"
        assert _works(address, "fresh-token-dddd", path) and _works(address, SEARCH_B, path)
        token_file.write_text("search\tok x y\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # give it the chance to (wrongly) drop the tokens
        assert _works(address, "fresh-token-dddd", path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
        assert "token file not reloaded" in log and "line 1" in log and "ok x y" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# -- admin confined ----------------------------------------------------------------------------------------------

@pytest.fixture()
def admin_server(root, tiny_models, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    engine = QueryEngine.open(root, tiny_models["student"], max_k=200)
    server, port = create_server(engine, admin=True, token=ADMIN, admin_roots=(str(allowed),), expose_paths=True,
                                 updater=TeacherUpdater(tiny_models["teacher"]))
    yield f"127.0.0.1:{port}", allowed, root
    server.stop(None)
    engine.close()


def test_images_pushed_over_the_wire_with_metadata(admin_server, tmp_path):
    address, _, root = admin_server
    new = make_synthetic_dataset(tmp_path / "new", num_classes=2, per_class=3, size=48, seed=9)
    first = sorted(new.rglob("*.jpg"))[0]
    (tmp_path / "meta.csv").write_text(f"path,sku\n{first.relative_to(new)},A-17\n")
    with SearchClient(address, token=ADMIN) as client:
        reply = client.push_folder(new, tmp_path / "meta.csv")
        assert (reply["index_version"], reply["count"], reply["changed"]) == ("v000002", 86, True)
        assert "6 image(s) received" in reply["message"]
        hit = client.search_image(first, k=1)[0]
        assert hit.id >= 80 and hit.label == first.parent.name and hit.metadata == {"sku": "A-17"}
        assert Path(hit.path).is_relative_to(root / "uploads")  # kept by the server, under its root
    # the command line does the same
    more = make_synthetic_dataset(tmp_path / "more", num_classes=1, per_class=2, size=48, seed=11)
    assert main(["index", "push", str(more), "--server", address, "--token", ADMIN]) == 0
    with SearchClient(address) as client:
        assert client.info()["count"] == 88


@pytest.mark.parametrize("name, label, rule", [
    ("../escape.jpg", "a", "plain name"), ("sub/x.jpg", "a", "plain name"), (".hidden.jpg", "a", "plain name"),
    ("x.jpg", "..", "plain name"), ("x.jpg", "a/b", "plain name"), ("notes.txt", "a", "image suffix"),
    ("x.jpg", "", "plain name")])
def test_hostile_upload_names_are_refused_and_nothing_is_kept(admin_server, items, name, label, rule):
    address, _, root = admin_server
    data = Path(items[0].path).read_bytes()
    from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
    with grpc.insecure_channel(address) as channel:
        stub = search_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.UploadImages(iter([search_pb2.UploadImage(name="ok.jpg", label="a", data=data),
                                    search_pb2.UploadImage(name=name, label=label, data=data)]),
                              timeout=30, metadata=(("authorization", f"Bearer {ADMIN}"),))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and rule in refused.value.details()
    assert not list((root / "uploads").glob("*/*")) and not (root.parent / "escape.jpg").exists()
    with SearchClient(address, token=ADMIN) as client:
        assert client.push_images([(items[0].path, "a", None)])["count"] == 81


def test_path_adds_only_under_admin_roots(admin_server, tmp_path, image_folder):
    address, allowed, _ = admin_server
    outside = make_synthetic_dataset(tmp_path / "outside", num_classes=1, per_class=2, size=48, seed=3)
    inside = make_synthetic_dataset(allowed / "inside", num_classes=1, per_class=2, size=48, seed=4)
    (allowed / "sneaky").mkdir()
    os.symlink(outside, allowed / "sneaky" / "link")  # a folder link inside the root pointing out
    links = allowed / "links" / "c"
    links.mkdir(parents=True)
    os.symlink(next(outside.rglob("*.jpg")), links / "x.jpg")  # a file link pointing out
    with SearchClient(address, token=ADMIN, retries=0) as client:
        messages = set()
        for folder in (outside, Path("/etc"), Path("/no/such/folder"), allowed / "sneaky" / "link", allowed / ".."):
            with pytest.raises(Exception) as refused:
                client.add_images(folder)
            assert code_of(refused) == grpc.StatusCode.PERMISSION_DENIED, folder
            messages.add(str(refused.value).split(": ", 1)[1])
        assert len(messages) == 1 and "not under one of this server's --admin-root folders" in messages.pop()
        with pytest.raises(Exception) as refused:
            client.add_images(allowed / "links")
        assert code_of(refused) == grpc.StatusCode.PERMISSION_DENIED and "links to files outside" in str(refused.value)
        with pytest.raises(Exception) as refused:
            client.add_images(inside, metadata_csv="/etc/passwd")
        assert code_of(refused) == grpc.StatusCode.PERMISSION_DENIED
        secret = allowed / "secret.csv"
        secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
        with pytest.raises(Exception) as refused:
            client.add_images(inside, metadata_csv=secret)
        assert code_of(refused) == grpc.StatusCode.INVALID_ARGUMENT and "root:x" not in str(refused.value)
        assert "needs a 'path' column" in str(refused.value)
        assert client.add_images(inside)["count"] == 82


def test_path_adds_are_off_without_an_admin_root(root, tiny_models, image_folder):
    with QueryEngine.open(root, tiny_models["student"]) as engine:
        server, port = create_server(engine, admin=True, token=ADMIN, updater=TeacherUpdater(tiny_models["teacher"]))
        try:
            with SearchClient(f"127.0.0.1:{port}", token=ADMIN, retries=0) as client:
                with pytest.raises(Exception) as refused:
                    client.add_images(image_folder)
                assert code_of(refused) == grpc.StatusCode.PERMISSION_DENIED
                assert "index push" in str(refused.value)
                assert client.reload()["index_version"] == "v000001"
        finally:
            server.stop(None)
