"""Milvus as the index store: a Milvus cluster (`milvus://HOST:PORT/NAME`) or a Milvus Lite file
(`milvus-lite:///path/db.db`, or `milvus-lite:///path/db.db/NAME`), through pymilvus' `MilvusClient`.

The optional extra `milvus` (`pip install 'asymsearch[milvus]'`: pymilvus, milvus-lite); nothing imports this
module unless a location names Milvus (`asymsearch.index.backend.open_index`).

Layout. NAME (default `asymsearch` for a Lite file) is an **alias**; every build writes a new collection
`NAME__v000001`, `NAME__v000002`, ... and then points the alias at it in one `alter_alias` (atomic on the Milvus
side), so a reader resolving the alias sees the old collection or the new one, complete. Rollback points the alias
back at an older collection. `index add` / `index remove` change the live collection in place (insert / delete)
and then rewrite its manifest; a server following the alias sees the new manifest id and swaps to a fresh handle of
the same collection.

Each collection holds `id` (INT64, primary key: the database's stable id, the image's position in the build's
listing, then `build.next_id` onwards), `vector` (FLOAT_VECTOR, inner product), `path`, `label` (VARCHAR), and the
user's metadata columns as dynamic fields (so a filter can name them). Its properties hold the `IndexManifest` as
JSON (`asymsearch.manifest`): teacher id, dimension, the teacher's preprocessing, the factory, the Milvus index type
and parameters, search parameters, count and history. A collection without it is not an asymsearch index and is
refused.

Probe set (`asymsearch.index.probe`, the students' quality gate): the build chooses it among the rows it wrote (as
a faiss build does, with the vectors read back from the collection) and stores the same .npz bytes a faiss index
keeps in meta.sqlite in a side collection `NAME__v000001__probe` (rows of base64 text, a 2-d dummy vector because
Milvus needs one), written before the alias names the version; the manifest's `build.probe` records its
collection, size and SHA-256, checked on every read. `index add` / `remove` leave it as it is (the gate does not
depend on the index's other images); pruning a version drops its side collection with it.

Factories map onto Milvus index types: `Flat` -> FLAT, `IVF<n>,Flat` -> IVF_FLAT (nlist n), `IVF<n>,SQ8` ->
IVF_SQ8, `HNSW<M>` -> HNSW (M, efConstruction 40, faiss's default); search parameters `nprobe` -> nprobe,
`efSearch` -> ef.

Filters: a FLAT collection scores every row the filter keeps (exact, k results whenever k rows match). IVF and
HNSW with a filter follow faiss's rule (`asymsearch.index.store`): Milvus searches only nprobe lists / the graph
and drops what the filter rejects, so it can miss matches (IVF) or return fewer than k (HNSW, measured at 1%
selectivity); a filter keeping at most `store.SUBSET_EXACT_MAX` rows is searched exactly (IVF with every list
probed; HNSW over the kept rows' vectors, read once per expression and cached), a larger one approximately and each
query that came back short again exactly. The match count per expression is one `count(*)` query, cached.

Errors: an address that does not answer is `MilvusUnavailable` (a `UserError`) naming the address, after
`CONNECT_ATTEMPTS` tries with doubling back-off; a search that fails because Milvus went away is also
`MilvusUnavailable` (the server answers UNAVAILABLE).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from asymsearch.core.errors import ManifestError, UserError
from asymsearch.core.manifest import IndexManifest
from asymsearch.index.backend import StoreUnavailable

log = logging.getLogger("asymsearch.index")

SCHEMES = ("milvus://", "milvus-lite://")
DEFAULT_LITE_NAME = "asymsearch"
MANIFEST_PROPERTY = "asymsearch.manifest"
VERSION_SEP = "__v"
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
CONNECT_ATTEMPTS = 4  # tries to reach a Milvus address: 0.5 + 1 + 2 s of back-off between them, then an error
BACKOFF_S = 0.5
INSERT_BATCH = 4096  # rows per insert call
MAX_PATH, MAX_LABEL = 4096, 1024
SKIPPED_KEPT = 1000  # skipped paths kept in the manifest (the count is always kept)
MILVUS_FIELDS = ("id", "path", "label")
NUMBERS_FIELD = "asym_num"  # dynamic field: the row's values that count as numbers (`core.filters` Milvus layout)
HIDDEN_FIELDS = ("vector", NUMBERS_FIELD)
PROBE_SUFFIX = "__probe"  # the side collection of a version's probe set: NAME__v000001__probe
PROBE_CHUNK = 60_000  # base64 characters of the probe .npz per side-collection row (a VARCHAR holds 65,535)
PROBE_ROWS_PER_CALL = 64  # side-collection rows per insert / query call (about 4 MB)
FILTER_CACHE_BYTES = 64 * 2**20  # per filter expression: match counts and (HNSW) the matching rows' vectors
FILTER_CACHE_ENTRIES = 64


def row_of(i: int, vector: np.ndarray, path: str, label: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """One Milvus row: id, vector, path, label, the user's columns as text (dynamic fields), and under
    `NUMBERS_FIELD` those of label and the columns that count as numbers, which numeric filters compare
    (`asymsearch.core.filters.Filter.to_milvus`)."""
    row = {k: str(v) for k, v in (extra or {}).items() if k not in MILVUS_FIELDS and k not in HIDDEN_FIELDS}
    try:
        from asymsearch.core.filters import numeric_metadata
    except ImportError:  # pragma: no cover - filters not installed: only text comparisons can match
        numbers = {}
    else:
        numbers = numeric_metadata({**row, "label": str(label)})
    row.update(id=int(i), vector=np.asarray(vector, np.float32).tolist(), path=str(path), label=str(label))
    row[NUMBERS_FIELD] = numbers
    return row


class MilvusUnavailable(StoreUnavailable):
    """Milvus at an address does not answer (or stopped answering)."""


def is_milvus_location(location: Any) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


@dataclasses.dataclass(frozen=True)
class MilvusLocation:
    """A parsed location: `uri` for `MilvusClient`, `name` the alias, `address` for messages."""

    uri: str
    name: str
    lite: bool
    text: str

    @property
    def address(self) -> str:
        return self.uri if not self.lite else f"Milvus Lite {self.uri}"

    def __str__(self) -> str:
        return self.text


def parse_location(text: str) -> MilvusLocation:
    """`milvus://HOST:PORT/NAME` or `milvus-lite://PATH.db[/NAME]` (PATH absolute with three slashes, else relative
    to the working folder); `UserError` naming the expected forms otherwise."""
    forms = "milvus://HOST:PORT/NAME or milvus-lite:///path/to/file.db[/NAME]"
    if text.startswith("milvus-lite://"):
        rest = text[len("milvus-lite://"):]
        m = re.match(r"^(.+?\.db)(?:/([^/]+))?/?$", rest)
        if not m:
            raise UserError(f"Milvus Lite location {text!r}: the file must end in .db ({forms})")
        path, name = m.group(1), m.group(2) or DEFAULT_LITE_NAME
        _check_name(name, text)
        return MilvusLocation(str(Path(path).resolve()), name, True, text)
    if text.startswith("milvus://"):
        m = re.match(r"^milvus://([^/:]+):(\d{1,5})/([^/]+)/?$", text)
        if not m:
            raise UserError(f"Milvus location {text!r} is not of the form {forms}")
        _check_name(m.group(3), text)
        return MilvusLocation(f"http://{m.group(1)}:{m.group(2)}", m.group(3), False, text)
    raise UserError(f"not a Milvus location: {text!r} ({forms})")


def _check_name(name: str, text: str) -> None:
    if not NAME_RE.match(name) or VERSION_SEP in name:
        raise UserError(f"Milvus location {text!r}: the name {name!r} must be letters, digits and underscores, "
                        f"starting with a letter or underscore, without {VERSION_SEP!r}")


# -- connecting ---------------------------------------------------------------------------------------------------

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def connect(location: MilvusLocation, *, attempts: int = CONNECT_ATTEMPTS) -> Any:
    """A `MilvusClient` for `location` (one per URI in this process: Milvus Lite allows one opener of a file),
    retried with doubling back-off; `MilvusUnavailable` naming the address when it never answers."""
    with _clients_lock:
        client = _clients.get(location.uri)
        if client is not None:
            return client
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
        delay = BACKOFF_S
        for attempt in range(attempts):
            try:
                if location.lite:
                    Path(location.uri).parent.mkdir(parents=True, exist_ok=True)
                client = MilvusClient(uri=location.uri, timeout=30)
                break
            except MilvusException as e:
                if attempt == attempts - 1:
                    raise MilvusUnavailable(f"Milvus at {location.address} does not answer after {attempts} tries "
                                            f"over {BACKOFF_S * (2 ** (attempts - 1) - 1):.1f} s: "
                                            f"{getattr(e, 'message', e)}") from None
                log.warning("Milvus at %s does not answer (try %d of %d); retrying in %.1f s", location.address,
                            attempt + 1, attempts, delay)
                time.sleep(delay)
                delay *= 2
        _clients[location.uri] = client
        return client


def _call(location: MilvusLocation, what: str, fn, *args, **kw):
    """A client call; a lost connection becomes `MilvusUnavailable`, a refusal a `UserError` naming `what`."""
    from pymilvus.exceptions import MilvusException
    try:
        return fn(*args, **kw)
    except MilvusException as e:
        text = str(getattr(e, "message", "") or e)
        if any(s in text.lower() for s in ("unavailable", "connect", "deadline", "timeout")):
            raise MilvusUnavailable(f"Milvus at {location.address} did not answer {what}: {text}") from None
        raise UserError(f"Milvus at {location.address} refused {what}: {text}") from None


# -- factories ----------------------------------------------------------------------------------------------------

def milvus_index(factory: str, search_params: Mapping[str, float]) -> tuple[str, dict, dict]:
    """(Milvus index type, build params, search params) for a faiss factory string and its search parameters."""
    f = factory.replace(" ", "")
    if f == "Flat":
        kind, build = "FLAT", {}
    elif m := re.fullmatch(r"IVF(\d+),(Flat|SQ8)", f):
        kind, build = ("IVF_FLAT" if m.group(2) == "Flat" else "IVF_SQ8"), {"nlist": int(m.group(1))}
    elif m := re.fullmatch(r"HNSW(\d+)(,Flat)?", f):
        kind, build = "HNSW", {"M": int(m.group(1)), "efConstruction": 40}
    else:
        raise UserError(f"factory {factory!r} has no Milvus counterpart here; use Flat, IVF<n>,Flat, IVF<n>,SQ8 or "
                        f"HNSW<M>")
    search = {}
    for name, value in search_params.items():
        if name == "nprobe" and kind.startswith("IVF"):
            search["nprobe"] = int(value)
        elif name == "efSearch" and kind == "HNSW":
            search["ef"] = int(value)
        else:
            raise UserError(f"search parameter {name}={value} does not apply to a Milvus {kind} index "
                            f"(factory {factory!r}); IVF takes nprobe, HNSW efSearch")
    return kind, build, search


def _index_params(client: Any, kind: str, build: dict) -> Any:
    params = client.prepare_index_params()
    # pymilvus 3 flattens `params` into top-level keys; Milvus Lite 3.2 reads only a JSON `params` key (the form
    # older clients sent, which Milvus servers accept too): send both
    params.add_index("vector", index_type=kind, metric_type="IP", params={**build, "params": dict(build)})
    return params


# -- versions: collections behind an alias -----------------------------------------------------------------------

def version_collections(client: Any, location: MilvusLocation) -> list[str]:
    """The version collections of `location`, oldest first."""
    prefix = location.name + VERSION_SEP
    names = [n for n in _call(location, "list_collections", client.list_collections)
             if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return sorted(names, key=lambda n: int(n[len(prefix):]))


def live_collection(client: Any, location: MilvusLocation) -> str | None:
    """The collection the alias names, None when there is no alias yet."""
    aliases = _call(location, "list_aliases", client.list_aliases).get("aliases", [])
    if location.name not in aliases:
        return None
    return _call(location, "describe_alias", client.describe_alias, location.name)["collection_name"]


def read_manifest(client: Any, location: MilvusLocation, collection: str) -> IndexManifest:
    props = _call(location, f"describe_collection {collection}", client.describe_collection, collection)
    text = (props.get("properties") or {}).get(MANIFEST_PROPERTY)
    if not text:
        raise ManifestError(f"Milvus collection {collection} at {location.address} has no asymsearch manifest "
                            f"(property {MANIFEST_PROPERTY}); it was not written by `asymsearch index build`")
    try:
        return IndexManifest.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise ManifestError(f"the manifest of Milvus collection {collection} is malformed: {e}") from None


def write_manifest(client: Any, location: MilvusLocation, collection: str, manifest: IndexManifest) -> None:
    _call(location, "alter_collection_properties", client.alter_collection_properties, collection,
          properties={MANIFEST_PROPERTY: json.dumps(manifest.to_dict(), sort_keys=True)})


def manifest_digest(manifest: IndexManifest) -> str:
    """Like `store.manifest_id` for a folder: 16 hex digits of the SHA-256 of the manifest's JSON."""
    return hashlib.sha256(json.dumps(manifest.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def current_id(location: str | MilvusLocation) -> str:
    """`collection:manifest digest` of what the alias names now (what a follower compares with the served one)."""
    loc = parse_location(location) if isinstance(location, str) else location
    client = connect(loc)
    collection = live_collection(client, loc)
    if collection is None:
        raise UserError(f"{loc} holds no index yet (no alias {loc.name!r} at {loc.address})")
    return f"{collection}:{manifest_digest(read_manifest(client, loc, collection))}"


def new_collection(client: Any, location: MilvusLocation, dim: int, manifest: IndexManifest) -> str:
    """Create the next version collection (empty, no index yet) with `manifest` in its properties."""
    from pymilvus import DataType
    existing = version_collections(client, location)
    number = int(existing[-1].rsplit(VERSION_SEP, 1)[1]) + 1 if existing else 1
    name = f"{location.name}{VERSION_SEP}{number:06d}"
    schema = client.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
    schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL)
    _call(location, f"create_collection {name}", client.create_collection, name, schema=schema,
          properties={MANIFEST_PROPERTY: json.dumps(manifest.to_dict(), sort_keys=True)},
          consistency_level="Strong")
    return name


def insert_rows(client: Any, location: MilvusLocation, collection: str, ids: np.ndarray, vectors: np.ndarray,
                records: Sequence[tuple[str, str, Mapping[str, Any] | None]]) -> None:
    """Insert (id, vector, path, label, user columns) rows in batches of `INSERT_BATCH`."""
    vectors = np.asarray(vectors, np.float32)
    for lo in range(0, len(ids), INSERT_BATCH):
        rows = [row_of(int(ids[i]), vectors[i], *records[i]) for i in range(lo, min(len(ids), lo + INSERT_BATCH))]
        _call(location, f"insert into {collection}", client.insert, collection, rows)


def row_count(client: Any, location: MilvusLocation, collection: str) -> int:
    """The rows `collection` holds, deletes applied (`count(*)`; a server's collection statistics may still count
    deleted rows until compaction)."""
    rows = _call(location, f"count(*) of {collection}", client.query, collection, filter="",
                 output_fields=["count(*)"])
    return int(rows[0]["count(*)"])


def finish_collection(client: Any, location: MilvusLocation, collection: str, kind: str, build: dict) -> None:
    """Flush, build the vector index, load: the collection is searchable."""
    _call(location, f"flush {collection}", client.flush, collection)
    _call(location, f"create_index on {collection}", client.create_index, collection, _index_params(client, kind,
                                                                                                     build))
    _call(location, f"load {collection}", client.load_collection, collection)


def switch_alias(client: Any, location: MilvusLocation, collection: str) -> str | None:
    """Point the alias at `collection` (one atomic Milvus call); the collection it named before, or None."""
    before = live_collection(client, location)
    if before is None:
        _call(location, "create_alias", client.create_alias, collection, location.name)
    else:
        _call(location, "alter_alias", client.alter_alias, collection, location.name)
    return before


def prune(client: Any, location: MilvusLocation, keep: int | None) -> list[str]:
    """Drop version collections older than the live one beyond `keep` (None: keep all); the names dropped."""
    if keep is None:
        return []
    live = live_collection(client, location)
    names = version_collections(client, location)
    if live not in names:
        return []
    older = names[:names.index(live)]
    drop = older[:max(0, len(older) - max(0, keep - 1))]
    for name in drop:
        _drop_version(client, location, name)
    return drop


# -- the probe set: a side collection per version ----------------------------------------------------------------

def probe_collection(collection: str) -> str:
    return collection + PROBE_SUFFIX


def write_probe(client: Any, location: MilvusLocation, collection: str, data: bytes) -> dict[str, Any]:
    """Store the probe set's .npz bytes `data` in the side collection of `collection` (replacing one there);
    what the manifest records of it: {collection, bytes, sha256, rows}."""
    import base64
    from pymilvus import DataType
    side = probe_collection(collection)
    if _call(location, f"has_collection {side}", client.has_collection, side):
        _call(location, f"drop_collection {side}", client.drop_collection, side)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field; unused
    schema.add_field("data", DataType.VARCHAR, max_length=PROBE_CHUNK)
    _call(location, f"create_collection {side}", client.create_collection, side, schema=schema,
          index_params=_index_params(client, "FLAT", {}), consistency_level="Strong")
    text = base64.b64encode(data).decode("ascii")
    chunks = [text[lo:lo + PROBE_CHUNK] for lo in range(0, len(text), PROBE_CHUNK)]
    for lo in range(0, len(chunks), PROBE_ROWS_PER_CALL):
        rows = [{"id": i, "vector": [0.0, 0.0], "data": chunks[i]}
                for i in range(lo, min(len(chunks), lo + PROBE_ROWS_PER_CALL))]
        _call(location, f"insert into {side}", client.insert, side, rows)
    _call(location, f"flush {side}", client.flush, side)
    return {"collection": side, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": len(chunks)}


def read_probe(client: Any, location: MilvusLocation, recorded: Mapping[str, Any]) -> bytes | None:
    """The probe set's .npz bytes from the side collection the manifest records (`write_probe`'s dict); None when
    that collection is gone; `UserError` when what it holds is not what was written."""
    import base64
    side = str(recorded["collection"])
    if not _call(location, f"has_collection {side}", client.has_collection, side):
        log.warning("the probe set's side collection %s is missing at %s", side, location.address)
        return None
    _call(location, f"load {side}", client.load_collection, side)
    rows, parts = int(recorded["rows"]), []
    for lo in range(0, rows, PROBE_ROWS_PER_CALL):
        hi = min(rows, lo + PROBE_ROWS_PER_CALL)
        got = _call(location, f"query of {side}", client.query, side, filter=f"id >= {lo} and id < {hi}",
                    output_fields=["id", "data"])
        parts += sorted(((int(r["id"]), r["data"]) for r in got))
    data = base64.b64decode("".join(chunk for _, chunk in parts)) if [i for i, _ in parts] == list(range(rows)) \
        else b""
    if len(data) != int(recorded["bytes"]) or hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        raise UserError(f"the probe set in {side} at {location.address} is not the one its index recorded "
                        f"({len(parts)} of {rows} rows, {len(data)} of {recorded['bytes']} bytes or another "
                        f"SHA-256); rebuild the index")
    return data


def probe_from_rows(client: Any, location: MilvusLocation, collection: str, items: Sequence[Any],
                    teacher_id: str) -> bytes | None:
    """The probe set of a build, chosen among the rows `collection` holds (id = position in the build's listing
    `items`, so label and path come from there) as a faiss build chooses it (`probe.select_probe`), with the
    vectors the collection holds for them; None when too few images (`probe.probe_npz`)."""
    from asymsearch.index.probe import probe_npz, select_probe
    held = sorted(iter_ids(client, location, collection))
    labels = [items[i].label for i in held]
    positions, _ = select_probe(labels)
    chosen = [held[p] for p in positions]
    vectors: dict[int, list] = {}
    for lo in range(0, len(chosen), 1024):
        for row in _call(location, f"query of {collection}", client.query, collection,
                         filter=f"id in {json.dumps(chosen[lo:lo + 1024])}", output_fields=["id", "vector"]):
            vectors[int(row["id"])] = row["vector"]
    if not chosen:
        return None
    return probe_npz([items[i].path for i in chosen], [items[i].label for i in chosen],
                     np.asarray([vectors[i] for i in chosen], np.float32), teacher_id=teacher_id, ids=chosen,
                     chosen=True)


def _drop_version(client: Any, location: MilvusLocation, name: str) -> None:
    """Drop a version collection and its probe set's side collection."""
    _call(location, f"drop_collection {name}", client.drop_collection, name)
    side = probe_collection(name)
    if _call(location, f"has_collection {side}", client.has_collection, side):
        _call(location, f"drop_collection {side}", client.drop_collection, side)


# -- the read side ------------------------------------------------------------------------------------------------

class MilvusIndex:
    """One version collection, opened: the same read interface as `asymsearch.index.store.SearchIndex`.

    `folder` and `root` are the location text, `version` the collection's name. The collection is pinned at open
    time: a later build switching the alias does not change what this handle searches (the server's follower opens
    a new handle and swaps)."""

    def __init__(self, location: MilvusLocation, client: Any, collection: str, manifest: IndexManifest) -> None:
        self.location = location
        self.folder = self.root = str(location)
        self.version = collection
        self.manifest = manifest
        self.manifest_id = f"{collection}:{manifest_digest(manifest)}"
        self._client = client
        self._kind, self._build, self._search = milvus_index(manifest.factory, manifest.search_params)
        self._closed = False
        self._cache: OrderedDict[tuple, Any] = OrderedDict()  # per filter expression: match counts, subsets
        self._cache_lock = threading.Lock()
        # what a filter may name: label and the user metadata columns the builds and adds recorded
        self.filter_fields: tuple[str, ...] = ("label", *(str(c) for c in manifest.build.get("metadata_columns", [])
                                                          if c not in MILVUS_FIELDS))
        self.backend = "milvus"

    @classmethod
    def open(cls, location: str | MilvusLocation, *, collection: str | None = None,
             attempts: int = CONNECT_ATTEMPTS) -> "MilvusIndex":
        """The collection the alias names (or `collection`), loaded; `MilvusUnavailable` when the address does
        not answer, `UserError` when nothing is there, `ManifestError` for a collection that is not an index."""
        loc = parse_location(location) if isinstance(location, str) else location
        client = connect(loc, attempts=attempts)
        collection = collection or live_collection(client, loc)
        if collection is None:
            raise UserError(f"{loc} holds no index (no alias {loc.name!r} at {loc.address}); build one with "
                            f"`asymsearch index build --out {loc}`")
        manifest = read_manifest(client, loc, collection)
        _call(loc, f"load {collection}", client.load_collection, collection)
        held = row_count(client, loc, collection)
        if held != manifest.count:
            raise ManifestError(f"Milvus collection {collection} holds {held} rows but its manifest says "
                                f"{manifest.count}; rebuild the index")
        return cls(loc, client, collection, manifest)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def teacher_id(self) -> str:
        return self.manifest.teacher_id

    def search(self, vectors: np.ndarray, k: int, *, filter: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Query vectors (Q, dim) -> scores (Q, k') and ids (Q, k'), k' = min(k, count), best first, padded with
        id -1 where Milvus finds fewer. `filter` is an `asymsearch.core.filters.Filter` (translated with its
        `to_milvus()`, never raw text) or None."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (Q, {self.dim}) for this index, got {vectors.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if self._closed:
            raise ValueError(f"index {self.location} ({self.version}) is closed")
        kk = min(int(k), self.count)
        expr = ""
        if filter is not None:
            unknown = [f for f in getattr(filter, "fields", ()) if f not in self.filter_fields]
            if unknown:  # parsed against another index (e.g. before a swap): parse again, for the position
                from asymsearch.core.filters import parse_filter
                parse_filter(filter.text, self.filter_fields)
                raise UserError(f"filter field {unknown[0]!r} is not in this index; the fields are: "
                                f"{', '.join(self.filter_fields)}")
            expr = filter.to_milvus()
        vectors = np.asarray(vectors, np.float32)
        if not expr or self._kind == "FLAT":  # FLAT scores every row the filter keeps: exact, k whenever k match
            return self._raw_search(vectors, kk, expr, self._search)
        # IVF / HNSW with a filter: Milvus searches its lists / graph and drops what the filter rejects, which can
        # miss matches or come back with fewer than k; the same rule as faiss's (`index.store`): a subset of at
        # most SUBSET_EXACT_MAX is searched exactly, a larger one approximately and its short queries again exactly
        from asymsearch.index.store import SUBSET_EXACT_MAX
        matches = self._count(expr)
        want = min(kk, matches)
        if want == 0:
            return np.full((len(vectors), kk), -np.inf, np.float32), np.full((len(vectors), kk), -1, np.int64)
        if matches <= SUBSET_EXACT_MAX:
            return self._exact(vectors, kk, expr)
        scores, ids = self._raw_search(vectors, kk, expr, self._search)
        short = np.flatnonzero((ids >= 0).sum(axis=1) < want)
        if len(short):
            log.info("filtered search on %s: %d of %d queries found fewer than %d of the %d matches; searched again "
                     "exactly", self.version, len(short), len(vectors), want, matches)
            scores[short], ids[short] = self._exact(vectors[short], kk, expr)
        return scores, ids

    def _raw_search(self, vectors: np.ndarray, kk: int, expr: str, params: Mapping[str, Any]
                    ) -> tuple[np.ndarray, np.ndarray]:
        rows = _call(self.location, f"search in {self.version}", self._client.search, self.version,
                     data=vectors.tolist(), limit=max(kk, 1), filter=expr,
                     output_fields=[], search_params={"metric_type": "IP", "params": dict(params)})
        scores = np.full((len(vectors), kk), -np.inf, np.float32)
        ids = np.full((len(vectors), kk), -1, np.int64)
        for q, hits in enumerate(rows):
            for j, hit in enumerate(list(hits)[:kk]):
                ids[q, j], scores[q, j] = int(hit["id"]), float(hit["distance"])
        return scores, ids

    def _exact(self, vectors: np.ndarray, kk: int, expr: str) -> tuple[np.ndarray, np.ndarray]:
        """Exact over the rows `expr` keeps: IVF with every list probed (Milvus scores every kept row), HNSW over
        the kept rows' vectors read from the collection (cached per expression) and scored here."""
        if self._kind.startswith("IVF"):
            return self._raw_search(vectors, kk, expr, {**self._search, "nprobe": int(self._build["nlist"])})
        ids, stored = self._subset(expr)
        scores = vectors @ stored.T
        k = min(kk, len(ids))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        out_s = np.full((len(vectors), kk), -np.inf, np.float32)
        out_i = np.full((len(vectors), kk), -1, np.int64)
        out_s[:, :k], out_i[:, :k] = np.take_along_axis(scores, top, 1), ids[top]
        return out_s, out_i

    def _cached(self, key: tuple, make):
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = make()
        with self._cache_lock:
            self._cache[key] = value
            size = lambda v: sum(getattr(a, "nbytes", 8) for a in (v if isinstance(v, tuple) else (v,)))  # noqa: E731
            while len(self._cache) > 1 and (len(self._cache) > FILTER_CACHE_ENTRIES or
                                            sum(size(v) for v in self._cache.values()) > FILTER_CACHE_BYTES):
                self._cache.popitem(last=False)
        return value

    def _count(self, expr: str) -> int:
        """How many rows `expr` keeps (cached per expression: this handle's collection only changes in place by
        `index add` / `remove`, after which the server opens a new handle)."""
        return self._cached(("count", expr), lambda: int(_call(
            self.location, f"count(*) of {self.version}", self._client.query, self.version, filter=expr,
            output_fields=["count(*)"])[0]["count(*)"]))

    def _subset(self, expr: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the rows `expr` keeps (cached per expression, least recently used dropped)."""
        def read() -> tuple[np.ndarray, np.ndarray]:
            it = _call(self.location, f"query_iterator of {self.version}", self._client.query_iterator,
                       self.version, batch_size=INSERT_BATCH, filter=expr, output_fields=["id", "vector"])
            ids, vecs = [], []
            try:
                while rows := it.next():
                    ids += [int(r["id"]) for r in rows]
                    vecs += [r["vector"] for r in rows]
            finally:
                it.close()
            return np.asarray(ids, np.int64), np.asarray(vecs, np.float32).reshape(len(ids), self.dim)
        return self._cached(("subset", expr), read)

    def lookup_records(self, ids: Sequence[int], *, skip_missing: bool = False) -> list[dict[str, Any]]:
        """{"id", "path", "label", plus the user's metadata columns} per id, in order; `KeyError` for an id the
        collection does not hold (left out instead with `skip_missing`: an in-place removal can land between a
        search and its lookup)."""
        wanted = [int(i) for i in ids]
        if not wanted:
            return []
        found: dict[int, dict] = {}
        unique = sorted(set(wanted))
        for lo in range(0, len(unique), INSERT_BATCH):
            chunk = unique[lo:lo + INSERT_BATCH]
            for row in _call(self.location, f"query of {self.version}", self._client.query, self.version,
                             filter=f"id in {json.dumps(chunk)}", output_fields=["*"]):
                rec = {k: v for k, v in dict(row).items() if k not in HIDDEN_FIELDS}
                rec = {**{k: v for k, v in rec.items() if k not in MILVUS_FIELDS},
                       "id": int(rec["id"]), "path": rec["path"], "label": rec["label"]}
                found[rec["id"]] = rec
        missing = [i for i in wanted if i not in found]
        if missing and not skip_missing:
            raise KeyError(f"ids not in index {self.location} ({self.version}): {missing[:10]}")
        return [dict(found[i]) for i in wanted if i in found]

    def lookup(self, ids: Sequence[int]) -> list[tuple[str, str]]:
        return [(r["path"], r["label"]) for r in self.lookup_records(ids)]

    @property
    def probe_where(self) -> str:
        return f"side collection {probe_collection(self.version)}"

    def read_probe(self) -> Any:
        """The probe set of this version (`asymsearch.index.probe.ProbeSet`) from its side collection, None when
        the build wrote none (`asymsearch.index.probe.find_probe` calls this)."""
        recorded = self.manifest.build.get("probe")
        if not recorded:
            return None
        data = read_probe(self._client, self.location, recorded)
        if data is None:
            return None
        from asymsearch.index.probe import ProbeSet
        return ProbeSet.from_bytes(data, f"{self.location} ({recorded['collection']})")

    def ids(self) -> np.ndarray:
        """Every id the collection holds, ascending."""
        return np.sort(np.asarray(list(iter_ids(self._client, self.location, self.version)), np.int64))

    def close(self) -> None:
        self._closed = True  # the client is shared by every handle of this URI in the process

    def __enter__(self) -> "MilvusIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"MilvusIndex({str(self.location)!r}, version={self.version!r}, factory={self.manifest.factory!r}, "
                f"count={self.count}, dim={self.dim}, teacher_id={self.teacher_id!r})")


def metadata_columns(columns: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The user's metadata column names over all rows of a `read_metadata_csv` result, sorted."""
    return sorted({str(k) for row in columns.values() for k in row if k not in MILVUS_FIELDS})


def iter_ids(client: Any, location: MilvusLocation, collection: str, batch: int = INSERT_BATCH) -> Iterator[int]:
    it = _call(location, f"query_iterator of {collection}", client.query_iterator, collection, batch_size=batch,
               filter="", output_fields=["id"])
    try:
        while True:
            rows = it.next()
            if not rows:
                return
            yield from (int(r["id"]) for r in rows)
    finally:
        it.close()


def existing(client: Any, location: MilvusLocation, collection: str, field: str,
             values: Sequence[Any]) -> list[Any]:
    """Those of `values` that `field` (id or path) holds in `collection`."""
    out = []
    values = list(values)
    for lo in range(0, len(values), 1024):
        chunk = values[lo:lo + 1024]
        for row in _call(location, f"query of {collection}", client.query, collection,
                         filter=f"{field} in {json.dumps(chunk, ensure_ascii=False)}", output_fields=[field]):
            out.append(row[field])
    return out


# -- the write side: build, add, remove, rollback ----------------------------------------------------------------

def publish_blocks(location: str | MilvusLocation, manifest: IndexManifest,
                   blocks: Iterable[tuple[np.ndarray, np.ndarray, Sequence[tuple[str, str, Mapping | None]]]], *,
                   keep: int | None = None, writer=None, probe=None) -> tuple[IndexManifest, str]:
    """Write a new version collection from (ids, vectors, records) blocks (or, with `writer(client, collection)`,
    let it insert the rows itself, e.g. from Ray workers), index it, store the probe set `probe(client,
    collection)` gives (.npz bytes or None, `write_probe`), record `manifest` (its count from what the collection
    holds) and switch the alias to it. Returns (manifest, collection)."""
    loc = parse_location(location) if isinstance(location, str) else location
    kind, build, _ = milvus_index(manifest.factory, manifest.search_params)
    client = connect(loc)
    collection = new_collection(client, loc, manifest.dim, manifest)
    try:
        if writer is not None:
            writer(client, collection)
        for ids, vectors, records in blocks:
            insert_rows(client, loc, collection, ids, vectors, records)
        finish_collection(client, loc, collection, kind, build)
        count = row_count(client, loc, collection)
        if count == 0:
            raise UserError(f"nothing was written to {collection}; no index published")
        manifest = dataclasses.replace(manifest, count=count,
                                       build={**manifest.build, "milvus": {"collection": collection,
                                                                           "index_type": kind, "params": build}})
        data = probe(client, collection) if probe is not None else None
        if data is not None:
            manifest = dataclasses.replace(manifest, build={**manifest.build,
                                                            "probe": write_probe(client, loc, collection, data)})
        write_manifest(client, loc, collection, manifest)
    except BaseException:
        try:
            _drop_version(client, loc, collection)  # never published: nobody can be reading it
        except Exception:  # noqa: BLE001 - the original error is the one to report
            log.warning("could not drop the unfinished collection %s at %s", collection, loc.address)
        raise
    before = switch_alias(client, loc, collection)
    dropped = prune(client, loc, keep)
    log.info("index %s: alias %s now names %s (was %s)%s", loc, loc.name, collection, before,
             f"; dropped {', '.join(dropped)}" if dropped else "")
    return manifest, collection


def open_live(location: str | MilvusLocation) -> tuple[MilvusLocation, Any, str, IndexManifest]:
    loc = parse_location(location) if isinstance(location, str) else location
    client = connect(loc)
    collection = live_collection(client, loc)
    if collection is None:
        raise UserError(f"{loc} holds no index (no alias {loc.name!r} at {loc.address})")
    manifest = read_manifest(client, loc, collection)
    _call(loc, f"load {collection}", client.load_collection, collection)  # queries need it (a no-op when loaded)
    return loc, client, collection, manifest


def _record_change(manifest: IndexManifest, change: dict, count: int, next_id: int, collection: str) -> IndexManifest:
    from asymsearch.index.update import HISTORY_LIMIT
    history = list(manifest.build.get("history", []))[-(HISTORY_LIMIT - 1):]
    change.update(collection=collection, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    build = {**manifest.build, "next_id": int(next_id), "history": history + [change]}
    return dataclasses.replace(manifest, count=int(count), build=build)


def add_rows(location: str | MilvusLocation, ids_vectors_records: tuple[np.ndarray, np.ndarray, list],
             change: dict) -> tuple[IndexManifest, str]:
    """Insert rows into the live collection and record the change in its manifest (in place, no new version)."""
    loc, client, collection, manifest = open_live(location)
    ids, vectors, records = ids_vectors_records
    insert_rows(client, loc, collection, ids, vectors, records)
    _call(loc, f"flush {collection}", client.flush, collection)
    count = row_count(client, loc, collection)
    next_id = max(int(manifest.build.get("next_id", manifest.count)), int(ids.max()) + 1 if len(ids) else 0)
    new = _record_change(manifest, change, count, next_id, collection)
    if "metadata_columns" in change:
        new = dataclasses.replace(new, build={**new.build, "metadata_columns": change["metadata_columns"]})
    write_manifest(client, loc, collection, new)
    return new, collection


def remove_rows(location: str | MilvusLocation, ids: Sequence[int]) -> tuple[IndexManifest, str, bool]:
    """Delete `ids` from the live collection (every id must be there, else `UserError` and nothing changes);
    (manifest, collection, changed)."""
    loc, client, collection, manifest = open_live(location)
    wanted = sorted({int(i) for i in ids})
    if not wanted:
        raise UserError("no ids given to remove")
    held = set(existing(client, loc, collection, "id", wanted))
    unknown = [i for i in wanted if i not in held]
    last = (manifest.build.get("history") or [{}])[-1]
    if len(unknown) == len(wanted) and last.get("op") == "remove" and last.get("ids") == wanted[:1000]:
        return manifest, collection, False
    if unknown:
        raise UserError(f"{len(unknown)} id(s) are not in the index {loc}: {', '.join(map(str, unknown[:10]))}"
                        f"{' ...' if len(unknown) > 10 else ''}; nothing removed")
    if len(wanted) == manifest.count:
        raise UserError(f"removing all {manifest.count} images would leave the index empty; build a new one")
    _call(loc, f"delete from {collection}", client.delete, collection, ids=wanted)
    _call(loc, f"flush {collection}", client.flush, collection)
    count = row_count(client, loc, collection)
    new = _record_change(manifest, {"op": "remove", "count": len(wanted), "ids": wanted[:1000]}, count,
                         int(manifest.build.get("next_id", manifest.count)), collection)
    write_manifest(client, loc, collection, new)
    return new, collection, True


def rollback(location: str | MilvusLocation, version: str) -> tuple[IndexManifest, str, str | None]:
    """Point the alias at the existing version collection `version` (`NAME__v000002`, `v000002` or `2`);
    (manifest, collection, the collection named before)."""
    loc = parse_location(location) if isinstance(location, str) else location
    client = connect(loc)
    text = str(version).strip()
    number = text[1:] if text.startswith("v") and text[1:].isdigit() else text
    name = f"{loc.name}{VERSION_SEP}{int(number):06d}" if number.isdigit() else text
    available = version_collections(client, loc)
    if name not in available:
        raise UserError(f"{loc} has no version {text!r}; its versions are {', '.join(available) or 'none'}")
    manifest = read_manifest(client, loc, name)
    before = switch_alias(client, loc, name)
    return manifest, name, before


def describe(location: str | MilvusLocation) -> dict[str, Any]:
    """What `asymsearch index info` prints for a Milvus location."""
    loc, client, collection, m = open_live(location)
    return {"location": str(loc), "address": loc.address, "alias": loc.name, "version": collection,
            "versions": version_collections(client, loc), "count": m.count, "dim": m.dim, "factory": m.factory,
            "milvus": m.build.get("milvus"), "search_params": m.search_params, "teacher_id": m.teacher_id,
            "preprocessing": m.build.get("preprocessing"), "next_id": m.build.get("next_id"),
            "probe": m.build.get("probe"),
            "history": m.build.get("history", [])[-5:]}


def release(location: str | MilvusLocation) -> None:
    """Forget the client of `location` (tests; a Lite file's server keeps running until the process exits)."""
    loc = parse_location(location) if isinstance(location, str) else location
    with _clients_lock:
        client = _clients.pop(loc.uri, None)
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001
            pass


__all__ = ["MilvusIndex", "MilvusLocation", "MilvusUnavailable", "parse_location", "is_milvus_location",
           "publish_blocks", "add_rows", "remove_rows", "rollback", "describe", "current_id", "milvus_index",
           "write_probe", "read_probe", "probe_from_rows"]


# -- build and add from images ------------------------------------------------------------------------------------

def build_into_milvus(config: Any, *, progress: bool = True) -> IndexManifest:
    """`asymsearch index build --out milvus://...`: embed as a local build does (or on Ray, the workers inserting
    their rows into Milvus themselves), write a new version collection and switch the alias to it. Ids are the
    images' positions in the listing (an unreadable file leaves its id unused). The embedding shards live in a
    temporary folder: a Milvus build does not resume (`--resume` is refused)."""
    import shutil
    import tempfile
    from asymsearch.index.build import METRIC, plan_build, report_skipped
    from asymsearch.index.shards import ShardStore
    start = time.perf_counter()
    loc = parse_location(config.out)
    for flag, on in (("--auto", config.auto), ("--on-disk", config.on_disk), ("--resume", config.resume),
                     ("--versioned", config.versioned)):
        if on:
            raise UserError(f"{flag} does not apply to a Milvus location ({loc}); every Milvus build is a new "
                            f"version behind the alias")
    kind, _, _ = milvus_index(config.factory, config.search_params)
    client = connect(loc)
    live = live_collection(client, loc)
    if live is not None and not config.overwrite:
        raise UserError(f"{loc} already holds an index ({live}); pass overwrite to publish a rebuilt version "
                        f"(or use `index add` / `index remove` to change it)")
    work = Path(tempfile.mkdtemp(prefix="asymsearch-milvus-build-"))
    try:
        plan = plan_build(dataclasses.replace(config, out=str(work / "out")), check_out=False)
        e = plan.embedder
        manifest = IndexManifest(
            teacher_id=e.teacher_id, dim=e.dim, metric=METRIC, factory=config.factory, count=0,
            teacher_model={"path": str(plan.teacher), "sha256": e.manifest.sha256, "model_id": e.manifest.model_id},
            build={"images": str(plan.images), "classes": config.classes, "batch_size": config.batch_size,
                   "shard_size": config.shard_size, "engine": config.engine, "scales": list(plan.scales),
                   "preprocessing": e.manifest.preprocessing.to_dict(), "next_id": len(plan.items),
                   "backend": "milvus", "metadata_columns": metadata_columns(plan.columns),
                   **({"flip": True} if config.flip else {}),
                   **({"metadata": config.metadata} if config.metadata else {})},
            search_params=dict(config.search_params))
        items, columns = plan.items, plan.columns

        def records(rows) -> list:
            return [(items[r].path, items[r].label, columns.get(items[r].path)) for r in rows]

        skipped: list = []
        if config.engine == "ray":
            from asymsearch.index.ray_engine import embed_into_milvus

            def writer(client_, collection):
                skipped.extend(embed_into_milvus(items, plan.teacher, loc, collection, columns,
                                                 batch_size=config.batch_size, shard_size=config.shard_size,
                                                 address=config.address, progress=progress))
            blocks: Iterable = ()
        else:
            from asymsearch.index.build import embed_database
            store = ShardStore.open(work / "build", plan.work, resume=False)
            embed_database(plan, store, progress=progress)
            skipped = list(store.kept_rows()[1])
            blocks = ((np.asarray(rows, np.int64), vectors, records(rows)) for rows, vectors, _ in store.iter_shards())
            writer = None
        manifest, collection = publish_blocks(
            loc, manifest, blocks, keep=config.keep, writer=writer,
            probe=lambda client_, collection_: probe_from_rows(client_, loc, collection_, items, e.teacher_id))
        report_skipped(skipped)
        build = {**manifest.build, "skipped": [p for p, _ in skipped][:SKIPPED_KEPT], "skipped_count": len(skipped),
                 "seconds": round(time.perf_counter() - start, 3)}
        manifest = dataclasses.replace(manifest, build=build)
        write_manifest(client, loc, collection, manifest)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_images(location: str, teacher: str | os.PathLike, images: str | os.PathLike, *,
               metadata: str | os.PathLike | None = None, batch_size: int = 64, shard_size: int = 4096,
               workers: int | None = None, progress: bool = True) -> tuple[IndexManifest, str, bool]:
    """`asymsearch index add --index milvus://...`: embed the images below `images` (label: parent folder) with
    `teacher` (which must be the index's: same teacher id and dimension) and insert them into the live collection
    with ids from `build.next_id`. (manifest, collection, changed)."""
    import shutil
    import tempfile
    from asymsearch.core.data import list_images_flat
    from asymsearch.core.manifest import check_pairing, require_teacher
    from asymsearch.core.multiscale import index_flip, index_scales, with_scales
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.index.build import report_skipped
    from asymsearch.index.metadata import match_metadata, read_metadata_csv
    from asymsearch.index.pipeline import embed_into_shards
    from asymsearch.index.shards import ShardStore, listing_digest
    images = Path(images).resolve()
    loc, client, collection, manifest = open_live(location)
    model = OnnxEmbedder(teacher)
    require_teacher(model, str(teacher))
    check_pairing(model, manifest, query_name=str(teacher), database_name=f"the index {loc}")
    embedder = with_scales(model, index_scales(manifest), index_flip(manifest))
    items = list_images_flat(images)
    dupes = existing(client, loc, collection, "path", [item.path for item in items])
    if dupes:
        raise UserError(f"{len(dupes)} of the images are already in the index {loc}, e.g. {dupes[0]}; remove them "
                        f"first or leave them out")
    columns = read_metadata_csv(metadata, images) if metadata else {}
    match_metadata(columns, [item.path for item in items], str(metadata))
    work = Path(tempfile.mkdtemp(prefix="asymsearch-milvus-add-"))
    try:
        plan = {"images": str(images), "teacher_sha256": model.manifest.sha256, "dim": embedder.dim,
                "count": len(items), "listing_sha256": listing_digest(items), "shard_size": shard_size,
                "batch_size": batch_size}
        store = ShardStore.open(work / "add", plan, resume=False)
        embed_into_shards(items, embedder, store, batch_size=batch_size, workers=workers, progress=progress,
                          desc="embedding new images")
        rows, skipped = store.kept_rows()
        report_skipped(skipped)
        if len(rows) == 0:
            raise UserError(f"none of the {len(items)} image files in {images} could be read; nothing added")
        next_id = int(manifest.build.get("next_id", manifest.count))
        ids = np.arange(next_id, next_id + len(rows), dtype=np.int64)
        vectors = np.concatenate([v for _, v, _ in store.iter_shards(mmap=False)])
        kept = [items[r] for r in rows]
        records = [(item.path, item.label, columns.get(item.path)) for item in kept]
        known = list(manifest.build.get("metadata_columns", []))
        change = {"op": "add", "images": str(images), "count": int(len(rows)), "first_id": next_id,
                  "metadata_columns": sorted(set(known) | set(metadata_columns(columns))),
                  "scales": list(index_scales(manifest)), "skipped": [p for p, _ in skipped][:SKIPPED_KEPT]}
        new, collection = add_rows(loc, (ids, vectors, records), change)
        return new, collection, True
    finally:
        shutil.rmtree(work, ignore_errors=True)
