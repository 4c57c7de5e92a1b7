"""`asymsearch web`: the HTTP gateway's API against in-process servers on port 0, and the page end to end in
headless Chromium (an image from the database must find its own entry first)."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from asymsearch.clients.client import SearchClient, ServerUnavailable
from asymsearch.clients.web import DEFAULT_MAX_UPLOAD_BYTES, GatewayOptions, start_gateway
from asymsearch.core.data import list_image_folder
from asymsearch.index.build import build_index
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import create_server

TOKEN = "web-token-123"
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


@pytest.fixture(scope="module")
def items(image_folder):
    return list_image_folder(image_folder)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, image_folder, tiny_models):
    """An open server and one that needs the token for searches, on one index of the fixture images."""
    out = tmp_path_factory.mktemp("web") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    engines = [QueryEngine.open(out, tiny_models["student"], max_k=50) for _ in range(2)]
    # the gateway runs beside the images here: the server tells it their paths, so it can show thumbnails
    paths = {"expose_paths": True}
    started = [create_server(engines[0], **paths),
               create_server(engines[1], token=TOKEN, search_requires_token=True, **paths)]
    yield {"open": f"127.0.0.1:{started[0][1]}", "token": f"127.0.0.1:{started[1][1]}"}
    for (s, _), e in zip(started, engines):
        s.stop(None)
        e.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gateway_for():
    """gateway_for(address, **client_kw) -> a running gateway's base URL; all stopped after the test. The SDK
    client of the last one started is `gateway_for.client` (its `attempts` count the calls sent to the server)."""
    running = []

    def start(address: str, options: GatewayOptions = GatewayOptions(), **client_kw) -> str:
        client = SearchClient(address, **{"timeout": 5, "retries": 0, **client_kw})
        gateway = start_gateway(client, port=0, options=options)
        running.append((gateway, client))
        start.client = client
        return gateway.url

    yield start
    for gateway, client in running:
        gateway.stop()
        client.close()


def _request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | bytes, str]:
    """(status, JSON or bytes, content type) of one request; 4xx/5xx answers are returned, not raised."""
    request = urllib.request.Request(url, data=data, headers=headers or {},
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            status, body, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, body, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, (json.loads(body) if ctype.startswith("application/json") else body), ctype


def _search(base: str, image: bytes, k: int | None = 5, **headers) -> tuple[int, dict]:
    status, body, _ = _request(f"{base}api/search" + (f"?k={k}" if k is not None else ""), image,
                               {"Content-Type": "application/octet-stream", **headers})
    return status, body


def _assert_error(body, fragment: str) -> str:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    line = body["error"]
    assert fragment in line and "\n" not in line and "Traceback" not in line, line
    return line


def test_search_equals_the_sdk_and_thumbnails_are_the_database_images(servers, items, gateway_for):
    from PIL import Image
    base = gateway_for(servers["open"])
    image = Path(items[13].path).read_bytes()
    with SearchClient(servers["open"]) as client:
        expected = client.search_image(image, k=4)
    status, body = _search(base, image, k=4)
    assert status == 200
    assert [(h["rank"], h["id"], h["label"], h["path"]) for h in body["hits"]] == \
        [(r, h.id, h.label, h.path) for r, h in enumerate(expected, start=1)]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-6)
    assert body["hits"][0]["id"] == 13 and body["hits"][0]["path"] == items[13].path  # its own entry
    assert body["gateway_ms"] > 0 and set(body["server_ms"]) == {"decode", "embed", "search", "queue"}

    # multipart/form-data (curl -F image=@file) gives the same answer
    boundary = "xYzBoundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    status, same, _ = _request(f"{base}api/search?k=4", multipart,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and [h["id"] for h in same["hits"]] == [h.id for h in expected]

    # the thumbnail of each hit is its database file, shrunk
    for hit in body["hits"]:
        status, jpeg, ctype = _request(base + hit["thumbnail"].lstrip("/"))
        assert status == 200 and ctype == "image/jpeg"
        import io
        thumb = Image.open(io.BytesIO(jpeg))
        assert thumb.size == Image.open(hit["path"]).size  # 48 px images: below the thumbnail size, kept
    # the default k is the gateway's
    status, body = _search(base, image, k=None)
    assert status == 200 and len(body["hits"]) == GatewayOptions().default_k


def test_info_and_the_page(servers, gateway_for):
    base = gateway_for(servers["open"])
    status, body, _ = _request(base + "api/info")
    assert status == 200 and body["info"]["count"] == 80 and body["info"]["teacher_id"] == "teacher-a"
    status, page, ctype = _request(base)
    assert status == 200 and ctype.startswith("text/html") and b'id="file"' in page


def test_bad_input_is_one_json_line_and_the_gateway_keeps_serving(servers, items, gateway_for, tmp_path):
    base = gateway_for(servers["open"], GatewayOptions(max_upload_bytes=4096))
    good = Path(items[2].path).read_bytes()
    assert len(good) < 4096
    status, body = _search(base, b"this is not an image")
    assert status == 400
    _assert_error(body, "not a readable image")
    assert _search(base, b"")[0] == 400
    # every malformed k is a 400 naming k, never a 500 (int('\u00b2') raises; 99999999999 overflows the int32)
    for k in ("0", "-1", "\u00b2", "\u0663", "1.5", "abc", "1e3", "99999999999", "%FF", "5%00", "0x10",
              "9" * 40):
        status, body = _request(f"{base}api/search?k={urllib.parse.quote(k, safe='%')}", good,
                                {"Content-Type": "application/octet-stream"})[:2]
        assert status == 400, (k, status, body)
        _assert_error(body, "k")
    status, body = _search(base, good, k=51)
    assert status == 400 and "50" in _assert_error(body, "k")  # the server's max_k
    status, body = _search(base, b"\xff" * 10_000)
    assert status == 413 and "limit" in _assert_error(body, "MiB")
    for path in ("api/nothing", "thumb/abc", "thumb/\u00b2", "thumb/" + "9" * 30):
        status, body, _ = _request(base + urllib.parse.quote(path))
        assert status == 404 and "error" in body, (path, status)
    status, body, _ = _request(base + "api/search")  # a GET where only POST is served
    assert status == 405 and "error" in body
    # after all of that, a good search on the same gateway (k repeated: the last one counts)
    status, body, _ = _request(f"{base}api/search?k=abc&k=2", good, {"Content-Type": "application/octet-stream"})
    assert status == 200 and body["hits"][0]["id"] == 2 and len(body["hits"]) == 2


def test_thumbnails_only_for_files_the_server_named(servers, items, gateway_for, tmp_path):
    base = gateway_for(servers["open"])
    secret = tmp_path / "secret.jpg"
    shutil.copy(items[0].path, secret)
    # nothing searched yet: even a real database id has no thumbnail, and no URL names a path
    for path in ("thumb/0", "thumb/999999", f"thumb/{secret}", "thumb/../../etc/passwd", "thumb/..%2F..%2Fetc%2Fpasswd",
                 "../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", f"thumb/0/..{secret}"):
        host, port = base[len("http://"):].rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)  # raw: urllib would normalise the dots
        conn.request("GET", "/" + path)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == 404, (path, r.status)
        assert r.getheader("Content-Type") == "application/json" and b"root:" not in body
    status, body = _search(base, Path(items[0].path).read_bytes(), k=1)
    assert status == 200 and body["hits"][0]["thumbnail"] == "/thumb/0"
    assert _request(base + "thumb/0")[0] == 200
    assert _request(base + "thumb/1")[0] == 404  # in the index, but not named by any answer yet


def test_server_down_is_503(items, gateway_for):
    base = gateway_for(f"127.0.0.1:{_closed_port()}", timeout=2)
    status, body = _search(base, Path(items[0].path).read_bytes())
    assert status == 503
    _assert_error(body, "unavailable")
    status, body, _ = _request(base + "api/info")
    assert status == 503 and "unavailable" in body["error"]


def test_missing_or_wrong_token_is_401(servers, items, gateway_for):
    image = Path(items[0].path).read_bytes()
    for token, fragment in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
        base = gateway_for(servers["token"], token=token)
        status, body = _search(base, image)
        assert status == 401, body
        _assert_error(body, fragment)
    base = gateway_for(servers["token"], token=TOKEN)
    status, body = _search(base, image)
    assert status == 200 and body["hits"][0]["id"] == 0


# -- hostile clients: limits, timeouts, Host and Origin; each followed by a good request ---------------------------

def _host_port(base: str) -> tuple[str, int]:
    host, port = base[len("http://"):].rstrip("/").rsplit(":", 1)
    return host, int(port)


def _raw(base: str, head: str, body: bytes = b"", *, timeout: float = 30) -> socket.socket:
    """A raw connection that has sent `head` (CRLF line ends added) and `body`, nothing more."""
    sock = socket.create_connection(_host_port(base), timeout=timeout)
    sock.sendall(head.replace("\n", "\r\n").encode() + body)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the response on `sock` (the gateway closes after a refused upload)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    status, body = response.status, response.read()
    sock.close()
    return status, json.loads(body)


def _post_head(base: str, length: int | None, host: str | None = None) -> str:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /api/search?k=3 HTTP/1.1\nHost: {'{}:{}'.format(*_host_port(base)) if host is None else host}\n"
            f"Content-Type: application/octet-stream\n{framing}\n\n")


def test_upload_limit_is_enforced_while_the_body_streams_in(servers, items, gateway_for):
    limit = 4096
    base = gateway_for(servers["open"], GatewayOptions(max_upload_bytes=limit))
    # exactly the limit is accepted: it reaches the server, which finds it is no image
    status, body = _search(base, b"\x01" * limit)
    assert status == 400 and "not a readable image" in body["error"]
    # one byte more, declared: refused from the headers alone, before a byte of the body is sent
    status, body = _answer(_raw(base, _post_head(base, limit + 1)))
    assert status == 413 and str(limit) in _assert_error(body, "limit")
    # one byte more, chunked, the body never finished: refused as soon as the count passes the limit
    sock = _raw(base, _post_head(base, None), f"{limit:x}\r\n".encode() + b"\x01" * limit + b"\r\n1\r\n\x01\r\n")
    status, body = _answer(sock)  # no terminating chunk was sent: the answer cannot have waited for it
    assert status == 413
    # a good search on the same gateway
    status, body = _search(base, Path(items[5].path).read_bytes())
    assert status == 200 and body["hits"][0]["id"] == 5


def test_the_default_limit_is_what_one_message_to_the_server_holds(servers, gateway_for):
    base = gateway_for(servers["open"])
    assert DEFAULT_MAX_UPLOAD_BYTES > 15.9 * 2**20
    status, body = _search(base, b"\x01" * DEFAULT_MAX_UPLOAD_BYTES)  # the server's answer, not a 503 from its size
    assert status == 400 and "not a readable image" in body["error"], body
    status, body = _answer(_raw(base, _post_head(base, DEFAULT_MAX_UPLOAD_BYTES + 1)))
    assert status == 413


def test_foreign_host_and_cross_site_origin_are_refused_before_the_server(servers, items, gateway_for):
    base = gateway_for(servers["open"], GatewayOptions(allow_hosts=("search.example",),
                                                       allow_origins=("https://portal.example",)))
    client = gateway_for.client
    image = Path(items[7].path).read_bytes()
    own = "http://{}:{}".format(*_host_port(base))
    port = _host_port(base)[1]
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.attacker.example:{port}", ""):
        for head in (f"GET /api/info HTTP/1.1\nHost: {host}\n\n", _post_head(base, len(image), host=host)):
            status, body = _answer(_raw(base, head, image if head.startswith("POST") else b""))
            assert status == 400, (host, head)
            _assert_error(body, "--allow-host")
    for origin in ("http://attacker.example", f"http://attacker.example:{port}", "null",
                   f"http://localhost:{port}",  # another origin than the page's own, even if on this machine
                   "https://portal.example.attacker.example"):
        status, body = _search(base, image, Origin=origin)
        assert status == 403, origin
        _assert_error(body, "--allow-origin")
    assert client.attempts == 0  # none of it reached the server
    # the page's own origin, an allowed origin, an allowed host name, a loopback name: answered
    for headers in ({"Origin": own}, {"Origin": "https://portal.example"}, {"Host": f"search.example:{port}"},
                    {"Host": f"localhost:{port}"}, {}):
        status, body = _search(base, image, **headers)
        assert status == 200 and body["hits"][0]["id"] == 7, headers


def test_slow_and_half_open_clients_are_timed_out_and_capped(servers, items, gateway_for):
    """Many connections that never finish their headers: no thread each, the cap answers 503 while they are open,
    the header timeout closes them all, then a good request is answered."""
    options = GatewayOptions(max_connections=20, header_timeout=2.5, body_timeout=1.0)  # a window to see the cap
    base = gateway_for(servers["open"], options)
    image = Path(items[9].path).read_bytes()
    assert _search(base, image)[0] == 200
    threads = threading.active_count()
    idle = [socket.create_connection(_host_port(base), timeout=30) for _ in range(20)]
    partial = [_raw(base, "GET / HTTP/1.1\nHost: 127.0.0.1\nX-Slow: 1") for _ in range(20)]  # headers unfinished
    assert threading.active_count() <= threads + 2  # a waiting connection holds no thread
    deadline = time.monotonic() + 30
    while (status := _search(base, image)[0]) != 503 and time.monotonic() < deadline:
        time.sleep(0.05)  # the cap counts connections the gateway has accepted
    assert status == 503
    for sock in idle + partial:  # each closed by the gateway: EOF, within a bounded wait
        sock.settimeout(30)
        assert sock.recv(1024) == b""
        sock.close()
    # an upload that stops halfway: 408 after the body timeout
    status, body = _answer(_raw(base, _post_head(base, len(image)), image[: len(image) // 2]))
    assert status == 408 and "did not arrive" in _assert_error(body, "s")
    # headers growing past the h11 limit, unfinished: 400 without waiting for their end, connection closed
    sock = _raw(base, f"GET / HTTP/1.1\nHost: 127.0.0.1\nX-Big: {'a' * (2 * options.max_header_bytes)}")
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 400
    sock.close()
    status, body = _search(base, image)
    assert status == 200 and body["hits"][0]["id"] == 9


def test_the_token_is_never_shown_to_the_page(servers, items, gateway_for):
    base = gateway_for(servers["token"], token=TOKEN)
    answers = [_request(base), _request(base + "api/info"), _request(base + "healthz"),
               _request(f"{base}api/search?k=3", Path(items[0].path).read_bytes()),
               _request(f"{base}api/search?k=3", b"not an image"), _request(f"{base}api/search?k=x", b"x")]
    assert [a[0] for a in answers] == [200, 200, 200, 200, 400, 400]
    for status, body, _ in answers:
        assert TOKEN not in (body.decode("utf-8", "replace") if isinstance(body, bytes) else json.dumps(body))


class _StuckServer:
    """Stands in for a SearchClient whose server never answers: each search waits until released."""

    address = "stuck.example:50051"

    def __init__(self) -> None:
        self.waiting = threading.Semaphore(0)
        self.release = threading.Event()

    def search_image_reply(self, image: bytes, k: int):
        self.waiting.release()
        self.release.wait(60)
        raise ServerUnavailable("released")


def test_stop_answers_searches_still_waiting_for_the_server_at_once(items):
    stuck = _StuckServer()
    gateway = start_gateway(stuck, port=0)  # type: ignore[arg-type]
    image = Path(items[0].path).read_bytes()
    answers: list = []
    clients = [threading.Thread(target=lambda: answers.append(_search(gateway.url, image))) for _ in range(3)]
    for c in clients:
        c.start()
    try:
        for _ in clients:
            assert stuck.waiting.acquire(timeout=30)  # all three are inside the SDK call
        stopper = threading.Thread(target=gateway.stop)
        stopper.start()
        stopper.join(10)  # bounded: the SDK calls would wait 60 s
        assert not stopper.is_alive()
        for c in clients:
            c.join(10)
        assert [status for status, _ in answers] == [503] * 3
        assert all("shutting down" in body["error"] for _, body in answers)
    finally:
        stuck.release.set()


# -- the page in a real browser ---------------------------------------------------------------------------------

def _required() -> bool:
    return os.environ.get("ASYMSEARCH_REQUIRE_SHARED_DATA") == "1" or os.environ.get("CI") == "true"


def _missing(what: str):
    if _required():
        pytest.fail(f"{what}; CI must run the browser test (.ci/run installs chromium and chromium-driver)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through chromedriver, offline: Selenium Manager is never asked for a driver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[dev]')")
    chromium = next((p for p in CHROMIUM if os.path.exists(p)), None)
    driver_path = next((p for p in CHROMEDRIVER if os.path.exists(p)), None)
    if chromium is None or driver_path is None:
        _missing("chromium or chromedriver not found (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--disable-default-apps", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _upload(driver, path: str, searches_before: int) -> str:
    """Choose `path` in the page's file input; wait until that search has ended; return the page's state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.find_element(By.ID, "file").send_keys(path)
    WebDriverWait(driver, 60).until(
        lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-searches")) > searches_before)
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def test_page_in_headless_chromium(browser, servers, items, gateway_for, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    base = gateway_for(servers["open"])
    browser.get(base)
    WebDriverWait(browser, 30).until(lambda d: "80 images" in d.find_element(By.ID, "server").text)

    query = items[37]  # a database image: its own entry (id 37, list order) must come first
    assert _upload(browser, query.path, 0) == "done"
    hits = browser.find_elements(By.CSS_SELECTOR, "#results figure.hit")
    assert len(hits) == 5
    first = hits[0]
    assert first.get_attribute("data-id") == "37"
    assert first.get_attribute("data-path") == query.path and first.get_attribute("data-label") == query.label
    assert query.label in first.text and "#1" in first.text
    latency = browser.find_element(By.ID, "latency").text
    assert latency.startswith("latency:") and "ms at the gateway" in latency
    assert browser.find_element(By.ID, "error").text == ""
    # the thumbnails loaded (the browser decoded them)
    assert browser.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    assert _upload(browser, str(bad), 1) == "error"
    error = browser.find_element(By.ID, "error").text
    assert "not a readable image" in error and "Traceback" not in error and "\n" not in error
    assert browser.find_elements(By.CSS_SELECTOR, "#results figure.hit") == []

    query = items[61]  # and the gateway still answers the next good upload
    assert _upload(browser, query.path, 2) == "done"
    first = browser.find_elements(By.CSS_SELECTOR, "#results figure.hit")[0]
    assert first.get_attribute("data-id") == "61" and browser.find_element(By.ID, "error").text == ""


def test_page_says_when_the_server_is_down(browser, items, gateway_for):
    from selenium.webdriver.common.by import By
    base = gateway_for(f"127.0.0.1:{_closed_port()}", timeout=2)
    browser.get(base)
    assert _upload(browser, items[0].path, 0) == "error"
    error = browser.find_element(By.ID, "error").text
    assert "unavailable" in error and "\n" not in error


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_cli_serves_until_a_signal_and_exits_cleanly_under_load(servers, items, stop):
    """`asymsearch web` in a subprocess: it prints its URL and serves (with --allow-host); with connections still
    sending headers and uploads half sent, SIGINT or SIGTERM ends it with status 0 and nothing alarming: the
    unfinished uploads are answered 503, the bounded wait below is far beyond the second it needs."""
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "asymsearch.cli.main", "web", "--server", servers["open"],
                             "--port", "0", "-k", "3", "--log-level", "WARNING", "--allow-host", "search.example"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("asymsearch web: serving http://127.0.0.1:"), line
        base = line.split()[3]
        image = Path(items[4].path).read_bytes()
        status, body = _search(base, image, k=None, Host=f"search.example:{_host_port(base)[1]}")
        assert status == 200 and [h["rank"] for h in body["hits"]] == [1, 2, 3] and body["hits"][0]["id"] == 4
        held = [_raw(base, "GET / HTTP/1.1\nHost: 127.0.0.1\nX-Slow: 1") for _ in range(10)]
        uploads = [_raw(base, _post_head(base, len(image)), image[:100]) for _ in range(5)]
        assert _search(base, image)[0] == 200  # all of them accepted and waiting
    finally:
        proc.send_signal(getattr(signal, stop))
        try:
            _, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    for word in ("Traceback", "ERROR", "Exception", "Cancel"):
        assert word not in err, err
    assert "serves 80 images" in err
    assert [_answer(sock)[0] for sock in uploads] == [503] * 5
    for sock in held:
        sock.settimeout(10)
        assert sock.recv(1024) == b""
        sock.close()


def test_cli_refuses_an_upload_limit_the_server_cannot_take(servers, capsys):
    from asymsearch.cli.main import main
    assert main(["web", "--server", servers["open"], "--port", "0", "--max-upload-mb", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("asymsearch: error: --max-upload-mb 16 is more than one message to the server holds")


def test_cli_port_in_use_is_one_line(servers, capsys):
    from asymsearch.cli.main import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["web", "--server", servers["open"], "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("asymsearch: error: cannot listen on 127.0.0.1:") and "Traceback" not in err[-1]


def test_a_reachable_address_needs_insecure(capsys):
    """Like `serve`, the gateway binds loopback by default; another address over plain HTTP is refused in one
    line unless --insecure says so."""
    from asymsearch.cli.main import main
    assert main(["web", "--server", "127.0.0.1:1", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--insecure" in err[0], err
