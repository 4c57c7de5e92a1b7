"""`asymsearch query`: send images (files, folders searched recursively, or http(s) URLs) to a running server.

Exit codes (also in `--help` and docs/clients.md), for scripts:
    0  every query answered
    1  some images failed (unreadable, a URL that could not be fetched, refused by the server); each is one line
       on stderr, the rest answered
    2  usage or bad input: a bad option, a missing path, no images found, an unreadable token or CA file
    3  server unavailable: down, not answering in time, busy, or failing
    4  not authorised: a missing or wrong token, or a certificate the server refused
    5  pairing mismatch: the --on-device student belongs to another teacher than the served index
  130  interrupted
Every failure is one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from asymsearch.cli.options import Commands, add_connection_options, connection_kwargs, existing_path, server_addresses
from asymsearch.core.errors import UserError

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_AUTHORISED = 4
EXIT_PAIRING = 5
CHUNK = 16  # queries per BatchSearch call
BATCH_BYTES = 8 * 1024 * 1024  # at most this much image data per call
CSV_FIELDS = ("query", "rank", "id", "score", "label", "path", "error")
URL_MAX_BYTES = 16 * 1024 * 1024  # largest image fetched from a URL (the server's default message limit)
URL_SCHEMES = ("http://", "https://")

EXIT_CODES_HELP = """exit codes:
  0  every query answered
  1  some images failed (unreadable, URL not fetched; each reported on stderr, the others answered)
  2  usage or bad input (bad option, missing path, no images, unreadable token/CA file)
  3  server unavailable (down, timed out, busy or failing)
  4  not authorised (missing or wrong token, refused certificate)
  5  pairing mismatch (the --on-device student belongs to another teacher)
130  interrupted"""


def register(commands: Commands) -> None:
    p = commands.add("query", help="send images to a running server and print the ranked results",
                     description="Search with image files, folders of images (searched recursively) or "
                                 "http(s):// image URLs (fetched here, at most 16 MiB each). "
                                 "Prints a table by default, JSON lines with --json, or writes JSONL/CSV with "
                                 "--output.",
                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=_image_source, metavar="IMAGE_FOLDER_OR_URL")
    p.add_argument("--server", action="append", metavar="HOST:PORT",
                   help="server address; repeat it (or separate by commas) for replicas, which are used round "
                        "robin (default: localhost:50051)")
    p.add_argument("-k", type=int, default=5, help="results per query (default: %(default)s)")
    p.add_argument("--tier", default="",
                   help="the server's student tier that embeds the images (see its Info; default: its first); "
                        "with --on-device, the tier whose space the vectors are in")
    p.add_argument("--filter", default="", metavar="EXPR",
                   help="only database items matching EXPR, e.g. 'label in (\"Blue_Jay\", \"Cardinal\") and "
                        "shop = \"north\"': comparisons (= != < <= > >=) of a field with a quoted string or a "
                        "number, FIELD in (...), and, or, not, parentheses; the fields are label and the index's "
                        "metadata columns (the server's Info lists them). k results whenever k items match")
    p.add_argument("--on-device", type=existing_path("student ONNX model"), metavar="S.onnx",
                   help="embed locally with this student and send only the vector (its teacher must be the "
                        "served index's)")
    add_connection_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per query on stdout")
    p.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="write the results to FILE: CSV if it ends in .csv, else JSON lines")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown on stderr only when stderr is a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The typed errors of the SDK and of the input each become one line and their exit code; anything else is a
    bug and keeps its traceback."""
    from asymsearch.clients.client import InvalidRequest, NotAuthorised, SearchError
    from asymsearch.core.errors import PairingError
    try:
        return _run(args)
    except PairingError as e:
        return _fail(str(e), EXIT_PAIRING)
    except (UserError, InvalidRequest) as e:
        return _fail(str(e), EXIT_USAGE)
    except NotAuthorised as e:
        return _fail(f"{e} (check --token / --token-file)", EXIT_NOT_AUTHORISED)
    except SearchError as e:  # unavailable, timed out, busy, or failing
        return _fail(str(e), EXIT_UNAVAILABLE)


def _fail(message: str, code: int) -> int:
    print(f"asymsearch: error: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    from asymsearch.clients.client import OnDeviceClient, SearchClient
    from asymsearch.core.data import IMAGE_SUFFIXES
    if args.k < 1:
        raise UserError(f"-k must be at least 1, got {args.k}")
    kw = connection_kwargs(args)
    addresses = server_addresses(args.server or ["localhost:50051"])
    queries = list(_expand(args.images, IMAGE_SUFFIXES))
    if not queries:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in "
                        f"{', '.join(str(p) for p in args.images)}")
    client = OnDeviceClient(args.on_device, addresses, **kw) if args.on_device else SearchClient(addresses, **kw)
    failed = 0
    with client, _Writer(args) as writer:
        info = client.check() if args.on_device else client.info()  # pairing checked before any image is read
        if info.get("max_k") and args.k > info["max_k"]:
            raise UserError(f"-k {args.k} exceeds the server's max_k of {info['max_k']}")
        if args.filter and info.get("filter_fields"):  # a malformed filter is one line and exit 2, not N failures
            from asymsearch.core.filters import parse_filter
            parse_filter(args.filter, info["filter_fields"])
        from tqdm import tqdm
        with tqdm(total=len(queries), unit="img", file=sys.stderr, disable=True if args.no_progress else None,
                  leave=False) as bar:
            for start in range(0, len(queries), CHUNK):
                chunk = queries[start:start + CHUNK]
                for path, result in zip(chunk, _search_chunk(client, chunk, args.k, bool(args.on_device),
                                                             args.tier, args.filter)):
                    if isinstance(result, Exception):
                        failed += 1
                        bar.clear()
                        print(f"asymsearch: {path}: {_reason(result)}", file=sys.stderr)
                        writer.write(str(path), None, _reason(result))
                    else:
                        writer.write(str(path), [dataclasses.asdict(h) for h in result], None)
                    bar.update(1)
    if args.output:
        print(f"asymsearch: wrote {len(queries) - failed} results ({failed} failed) to {args.output}",
              file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _search_chunk(client: Any, chunk: list[Path | str], k: int, on_device: bool, tier: str = "",
                  filter: str = "") -> list[Any]:
    """One BatchSearch call for up to CHUNK images; an image that cannot be read or embedded fails alone. On device
    the vectors carry the local student's id, so a server that never paired that student refuses them."""
    from asymsearch.clients.client import _read_file
    prepared: list[Any] = []
    for path in chunk:
        try:
            source = _fetch_url(path, client) if isinstance(path, str) else path  # a URL's bytes, or the file
            if on_device:
                prepared.append(client.embed(source))
            else:
                prepared.append(source if isinstance(source, bytes) else _read_file(source))
        except UserError as e:
            prepared.append(e)
    sendable = [q for q in prepared if not isinstance(q, Exception)]
    if on_device:
        search = functools.partial(client.client.batch_search, tier=tier, student_id=client.embedder.student_id,
                                   filter=filter)
    else:
        search = functools.partial(client.batch_search, tier=tier, filter=filter)
    answers: list[Any] = []
    group: list[Any] = []
    size = 0
    for q in sendable + [None]:  # calls of at most BATCH_BYTES of images (the server's message limit is 16 MiB)
        n = len(q) if isinstance(q, bytes) else 4096
        if group and (q is None or size + n > BATCH_BYTES):
            answers.extend(search(group, k=k))
            group, size = [], 0
        if q is not None:
            group.append(q)
            size += n
    it = iter(answers)
    return [q if isinstance(q, Exception) else next(it) for q in prepared]


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text


def _image_source(value: str) -> Path | str:
    """An argparse type: an http(s) URL (kept as text) or a path that must exist."""
    if value.lower().startswith(URL_SCHEMES):
        from urllib.parse import urlsplit
        try:
            host = urlsplit(value).hostname
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a valid URL: {value} ({e})") from None
        if not host:
            raise argparse.ArgumentTypeError(f"a URL without a host: {value}")
        return value
    return existing_path("image or folder")(value)


def _fetch_url(url: str, client: Any = None, limit: int | None = None) -> bytes:
    """The bytes at an http(s) `url`, at most `limit` (default URL_MAX_BYTES) of them, within the client's
    deadline; any failure is a one-line `UserError` (its message leaves the URL to the caller's prefix)."""
    import http.client
    import urllib.error
    import urllib.request
    limit = URL_MAX_BYTES if limit is None else limit
    timeout = getattr(getattr(client, "client", client), "timeout", 10.0)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "asymsearch-query"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise UserError(f"cannot fetch: {int(length)} bytes, over the {limit / 2**20:g} MiB limit")
            data = response.read(limit + 1)
    except urllib.error.HTTPError as e:
        raise UserError(f"cannot fetch: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise UserError(f"cannot fetch: {getattr(e.reason, 'strerror', None) or e.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, resets, bad replies or URLs
        raise UserError(f"cannot fetch: {getattr(e, 'strerror', None) or e or type(e).__name__}") from None
    if len(data) > limit:
        raise UserError(f"cannot fetch: over the {limit / 2**20:g} MiB limit")
    if not data:
        raise UserError("cannot fetch: empty response")
    return data


def _expand(paths: list[Path | str], suffixes: frozenset[str]) -> Iterator[Path | str]:
    """Files and URLs as given (any suffix: the server judges them); folders: their image files, recursively,
    sorted."""
    for p in paths:
        if isinstance(p, str):
            yield p
        elif p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        else:
            yield p


class _Writer:
    """Results to stdout (a table, or JSON lines with --json) or to --output (JSONL or CSV)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json, self.output, self._file, self._csv = args.json, args.output, None, None

    def __enter__(self) -> "_Writer":
        if self.output is not None:
            try:
                self._file = open(self.output, "w", newline="", encoding="utf-8")
            except OSError as e:
                raise UserError(f"cannot write {self.output}: {e.strerror or e}") from None
            if self.output.suffix.lower() == ".csv":
                self._csv = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
                self._csv.writeheader()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, query: str, hits: list[dict] | None, error: str | None) -> None:
        record = {"query": query, "hits": hits or []}
        if error is not None:
            record["error"] = error
        if self._csv is not None:
            if error is not None:
                self._csv.writerow({"query": query, "error": error})
            for rank, h in enumerate(hits or [], start=1):
                self._csv.writerow({"query": query, "rank": rank, "id": h["id"], "score": f"{h['score']:.6f}",
                                    "label": h["label"], "path": h["path"], "error": ""})
            self._file.flush()
        elif self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._file is not None and not self.json:
            return
        if self.json:
            print(json.dumps(record), flush=True)
        elif error is None:
            print(query)
            for rank, h in enumerate(hits or [], start=1):
                print(f"  {rank:>3}  {h['score']:.4f}  {h['id']:>8}  {h['label']:<24}  {h['path']}")
