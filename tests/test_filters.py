"""Metadata filters (issue 24 item 4): the grammar (valid, invalid, hostile) against the plain-Python reference;
SQLite evaluation against that reference on random filters; filtered search on Flat, IVF and HNSW against brute
force over the matching subset (min(k, matches) results, also for a filter matching very few); and every Search RPC
over a real channel to an in-process server, each hostile filter followed by a good filtered request."""
from __future__ import annotations

import csv
import json
import random

import faiss
import grpc
import numpy as np
import pytest

from asymsearch.core.filters import FilterError, as_number, milvus_string, numeric_metadata, parse_filter
from asymsearch.core.manifest import IndexManifest
from asymsearch.index import store as store_module
from asymsearch.index.faiss_index import add_blocks, new_index, train_index
from asymsearch.index.metadata import write_metadata
from asymsearch.index.store import SearchIndex

FIELDS = ["label", "shop", "price", "year"]

RECORDS = [
    {"label": "Blue_Jay", "shop": "north", "price": "9.5", "year": "2023"},
    {"label": "Cardinal", "shop": "south", "price": "12", "year": "2024"},
    {"label": "Cardinal", "shop": "north", "price": "n/a", "year": "2025"},
    {"label": "Wren", "price": " 10 ", "year": "2024"},  # no shop; a price with blanks still reads as 10
    {"label": "Wren", "shop": "so'uth\"; DROP TABLE items; --", "price": "1e1", "year": "x"},
    {"label": "10", "shop": "é北", "price": "-3", "year": ""},
]


def ids_matching(text: str, records=RECORDS) -> list[int]:
    f = parse_filter(text, FIELDS)
    return [i for i, r in enumerate(records) if f.matches(r)]


# -- grammar -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('label = "Cardinal"', [1, 2]),
    ("label == 'Cardinal'", [1, 2]),
    ('label in ("Blue_Jay", "Wren") and shop = "north"', [0]),
    ("LABEL IN ('Wren',) OR shop = 'south'", None),  # keywords in any case; the field name is case-sensitive
    ("price < 10", [0, 5]),  # "n/a" and missing are not numbers; " 10 " and "1e1" are 10
    ("price <= 10", [0, 3, 4, 5]),
    ("price = 10", [3, 4]),
    ('price = "10"', []),  # text comparison: " 10 " and "1e1" are not the text "10"
    ("price != 12", [0, 3, 4, 5]),  # a missing / non-number value fails every numeric comparison
    ("not price = 12", [0, 2, 3, 4, 5]),  # ... and `not` makes it true
    ('shop != "north"', [1, 4, 5]),  # item 3 has no shop: false
    ('not shop = "north"', [1, 3, 4, 5]),
    ('shop not in ("north", "south")', [3, 4, 5]),
    ("year >= 2024 and not (shop = 'south' or price > 100)", [2, 3]),
    ('label > "C" and label < "D"', [1, 2]),  # code-point order
    ("label = 10", [5]),
    ('shop = "é北"', [5]),
    ('shop = "so\'uth\\"; DROP TABLE items; --"', [4]),  # hostile text inside a string is only data
    ("(((label = 'Wren')))", [3, 4]),
    ("`price` < 0", [5]),
])
def test_valid_filters_match_the_reference(text, expected):
    if expected is None:
        with pytest.raises(FilterError, match="unknown field 'LABEL'"):
            parse_filter(text, FIELDS)
        return
    assert ids_matching(text) == expected
    f = parse_filter(text, FIELDS)
    again = parse_filter(str(f), FIELDS)  # the canonical text parses to the same filter
    assert again == f and str(again) == str(f)


@pytest.mark.parametrize("text, position, words", [
    ('label = "x" ; DROP TABLE items', 12, "unexpected character ';'"),
    ("label = 'x' -- comment", 12, "unexpected character '-'"),
    ("1=1 or label = 'x'", 0, "expected a field name"),
    ("label = 'x' or 1=1", 15, "expected a field name"),
    ("label = 'x' or", 14, "found the end of the filter"),
    ('label = "unterminated', 8, "unterminated string"),
    ("label === 'a'", 8, "expected a quoted string or a number"),
    ("label = 'a' label = 'b'", 12, "expected 'and', 'or'"),
    ("label in ()", 10, "expected a quoted string or a number"),
    ("label in ('a' 'b')", 14, "expected ',' or ')'"),
    ("(label = 'a'", 12, "expected ')'"),
    ("label = 'a')", 11, "expected 'and', 'or'"),
    ("colour = 'red'", 0, "unknown field 'colour'; the fields are: label, shop, price, year"),
    ("shop = 'x' and id = 3", 15, "unknown field 'id'"),
    ("path like '%x%'", 0, "unknown field 'path'"),
    ("label like 'a%'", 6, "expected a comparison"),  # a Milvus keyword is not in this grammar
    ("label = 'a' && shop = 'b'", 12, "unexpected character '&'"),
    ("label = 'a' || true", 12, "unexpected character '|'"),
    ("json_contains(label, 'a')", 0, "unknown field 'json_contains'"),
    ("label = a", 8, "expected a quoted string or a number, found 'a'"),
    ("label = 'a\\x'", 10, "backslash"),
    ("label = 'a\x00b'", 10, "control character U+0000"),
    ("price < 1e999", 8, "out of range"),
    ("price < 10abc", 8, "malformed number"),
    ("größe = 1", 2, "unexpected character 'ö'"),
    ("label = 'a' !", 12, "'!' must be followed by '='"),
    ("`` = 1", 0, "`field name`"),
    ("in = 'a'", 0, "expected a field name"),
])
def test_invalid_filters_name_the_position(text, position, words):
    with pytest.raises(FilterError) as e:
        parse_filter(text, FIELDS)
    assert e.value.position == position, str(e.value)
    assert f"position {position}" in str(e.value) and words in str(e.value), str(e.value)


def test_caps_and_blank():
    assert parse_filter("", FIELDS) is None and parse_filter("  \n", FIELDS) is None
    with pytest.raises(FilterError, match="longer than 4096"):
        parse_filter("label = '" + "a" * 5000 + "'", FIELDS)
    with pytest.raises(FilterError, match="nested more than 32"):
        parse_filter("(" * 40 + "label = 'a'" + ")" * 40, FIELDS)
    with pytest.raises(FilterError, match="nested more than 32"):
        parse_filter("not " * 40 + "label = 'a'", FIELDS)
    with pytest.raises(FilterError, match="more than 256 comparisons"):
        parse_filter(" or ".join(["label=1"] * 300), FIELDS)
    with pytest.raises(FilterError, match="more than 1024 values"):
        parse_filter("label in (" + ",".join(["1"] * 1100) + ")", FIELDS)
    assert parse_filter(" or ".join(["label=1"] * 256), FIELDS) is not None


def test_numbers_rule():
    assert [as_number(v) for v in ("9.5", " 10 ", "1e1", "-0", "10 EUR", "", ".5", "0x10", "+1", "nan", None)] == \
        [9.5, 10.0, 10.0, 0.0, None, None, None, None, None, None, None]
    assert numeric_metadata({"label": "7", "price": "9.5", "shop": "north"}) == {"label": 7.0, "price": 9.5}


# -- SQLite against the reference --------------------------------------------------------------------------------

def random_filter(rng: random.Random, depth: int = 0) -> str:
    values = ['"north"', '"south"', "'Cardinal'", '"Wren"', "10", "9.5", "2024", '"10"', "-3", '"é北"', "1e1"]
    r = rng.random()
    if depth < 3 and r < 0.2:
        return f"({random_filter(rng, depth + 1)} {rng.choice(['and', 'or'])} {random_filter(rng, depth + 1)})"
    if depth < 3 and r < 0.3:
        return f"not {random_filter(rng, depth + 1)}"
    field = rng.choice(FIELDS)
    if r < 0.45:
        return f"{field} {rng.choice(['not in', 'in'])} ({', '.join(rng.sample(values, rng.randint(1, 4)))})"
    return f"{field} {rng.choice(['=', '!=', '<', '<=', '>', '>='])} {rng.choice(values)}"


def test_sqlite_equals_the_reference_on_random_filters(tmp_path):
    write_metadata(tmp_path / "m.sqlite", [(i, f"/p/{i}", r["label"], {k: v for k, v in r.items() if k != "label"})
                                           for i, r in enumerate(RECORDS)])
    import sqlite3
    con = sqlite3.connect(tmp_path / "m.sqlite")
    rng = random.Random(0)
    for _ in range(400):
        text = random_filter(rng)
        f = parse_filter(text, FIELDS)
        where, params = f.to_sqlite()
        assert "DROP" not in where and "north" not in where  # values are parameters, never in the SQL text
        got = [r[0] for r in con.execute(f"SELECT id FROM items WHERE {where} ORDER BY id", params)]
        assert got == ids_matching(text), text
    hostile = parse_filter('shop = "so\'uth\\"; DROP TABLE items; --"', FIELDS)
    where, params = hostile.to_sqlite()
    assert [r[0] for r in con.execute(f"SELECT id FROM items WHERE {where}", params)] == [4]
    assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == len(RECORDS)  # still there
    con.close()


def test_milvus_strings_are_escaped():
    for value in ['a"b', "a\\b", 'x" or id >= 0 or label == "', "line\nbreak\ttab\r", "é北😀", "'"]:
        literal = milvus_string(value)
        assert json.loads(literal) == value  # the escapes Milvus takes are JSON's, so this decodes it back
        inner = literal[1:-1].replace("\\\\", "").replace('\\"', "")
        assert '"' not in inner  # no unescaped quote can end the literal early
    with pytest.raises(ValueError, match="U\\+0001"):
        milvus_string("a\x01")
    f = parse_filter('shop = "x\\" or id >= 0" and price < 10', FIELDS)
    assert f.to_milvus() == ('((exists $meta["shop"] and $meta["shop"] == "x\\" or id >= 0") and '
                             '(exists $meta["asym_num"]["price"] and $meta["asym_num"]["price"] < 10))')


# -- filtered search against brute force -------------------------------------------------------------------------

N, DIM = 3000, 16


def vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_index(folder, factory: str, params: dict) -> tuple[SearchIndex, np.ndarray, list[dict]]:
    """An index folder of N vectors with ids 0, 2, 4, ... (gaps, as after removals) and metadata columns."""
    folder.mkdir()
    x = vectors(N, 0)
    ids = np.arange(N, dtype=np.int64) * 2
    index = train_index(new_index(DIM, factory), x, factory)
    add_blocks(index, [(ids, x)], factory)
    faiss.write_index(index, str(folder / store_module.INDEX_FILE))
    records = [{"label": f"class_{i % 50:02d}", "shop": ["north", "south", "east"][i % 3], "price": str(i % 97)}
               for i in range(N)]
    write_metadata(folder / store_module.META_FILE,
                   [(int(i), f"/img/{i}.jpg", r["label"], {"shop": r["shop"], "price": r["price"]})
                    for i, r in zip(ids, records)])
    IndexManifest(teacher_id="t", dim=DIM, metric="inner_product", factory=factory, count=N, teacher_model={},
                  build={}, search_params=params).save(folder / store_module.MANIFEST_FILE)
    return SearchIndex.open(folder, gpu=False), x, records


def brute_force(x: np.ndarray, records: list[dict], q: np.ndarray, k: int, text: str):
    f = parse_filter(text, ["label", "price", "shop"])
    rows = np.array([i for i, r in enumerate(records) if f.matches(r)], dtype=np.int64)
    if len(rows) == 0:
        return np.zeros((len(q), 0)), np.zeros((len(q), 0), np.int64)
    s = q @ x[rows].T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), rows[order] * 2


FILTERS = ['shop = "north"',  # a third: on IVF/HNSW above SUBSET_EXACT_MAX when it is patched low
           'label = "class_07" and price < 50',  # ~0.6%
           'label in ("class_01", "class_02") and shop = "east"',
           'price = 13 and shop = "north"',  # ~10 items
           'label = "class_03" and price = 3 and shop = "north"',  # exactly 1 item (i = 3)
           'label = "nothing"']


@pytest.fixture(scope="module", params=[("Flat", {}), ("IVF32,Flat", {"nprobe": 2}), ("HNSW16", {"efSearch": 16})],
                ids=["Flat", "IVF", "HNSW"])
def opened(request, tmp_path_factory):
    index, x, records = make_index(tmp_path_factory.mktemp("f") / "index", *request.param)
    yield index, x, records
    index.close()


@pytest.mark.parametrize("k", [1, 10, 40])
def test_filtered_search_equals_brute_force_over_the_subset(opened, k):
    """The subset path (every filter here matches at most SUBSET_EXACT_MAX items): exactly min(k, matches) hits,
    equal to brute force over the matching items, also where the index's own nprobe / efSearch would miss."""
    index, x, records = opened
    q = vectors(20, 1)
    for text in FILTERS:
        want_s, want_i = brute_force(x, records, q, k, text)
        got_s, got_i = index.search(q, k, filter=index.parse_filter(text))
        assert got_i.shape == want_i.shape, text
        assert (got_i >= 0).all(), text
        np.testing.assert_array_equal(got_i, want_i, err_msg=text)
        np.testing.assert_allclose(got_s, want_s, atol=1e-5, err_msg=text)
    assert index.search(q, 5, filter=index.parse_filter('label = "nothing"'))[1].shape == (20, 0)


def test_large_subset_takes_the_ann_and_still_returns_k(opened, monkeypatch):
    """Above SUBSET_EXACT_MAX the approximate search runs with the selector; a query it leaves short is searched
    again exactly: every row holds k real hits, all matching the filter; on Flat still equal to brute force."""
    index, x, records = opened
    monkeypatch.setattr(store_module, "SUBSET_EXACT_MAX", 5)
    q = vectors(30, 2)
    for text, k in (('shop = "north"', 10), ('label = "class_07" and price < 50', 40)):
        f = index.parse_filter(text)
        allowed = set(index.matching_ids(f).tolist())
        got_s, got_i = index.search(q, k, filter=f)
        want_s, want_i = brute_force(x, records, q, k, text)
        assert got_i.shape == want_i.shape and (got_i >= 0).all(), text
        assert set(got_i.ravel().tolist()) <= allowed
        assert all(len(set(row)) == len(row) for row in got_i.tolist())
        assert (got_s <= want_s[:, :1] + 1e-5).all()  # never better than the true best
        if index.manifest.factory == "Flat":
            np.testing.assert_array_equal(got_i, want_i)


def test_ids_come_from_sqlite_and_are_cached(opened):
    index, _, records = opened
    f = index.parse_filter('price = 13 and shop = "north"')
    want = [2 * i for i, r in enumerate(records) if r["price"] == "13" and r["shop"] == "north"]
    assert index.matching_ids(f).tolist() == want
    assert index.matching_ids(f) is index.matching_ids(f)
    with pytest.raises(FilterError, match="unknown field 'year'"):
        index.parse_filter("year = 1")
    assert index.filter_fields == ("label", "price", "shop")


def test_costly_filter_is_refused_and_the_index_keeps_answering(opened, monkeypatch):
    index, _, _ = opened
    monkeypatch.setattr(store_module, "FILTER_SQL_STEPS", 200_000)
    monkeypatch.setattr(store_module, "_PROGRESS_EVERY", 1000)
    costly = index.parse_filter(" or ".join(f'price = {i}' for i in range(200)))
    with pytest.raises(store_module.UserError, match="too costly"):
        index.search(vectors(1, 3), 5, filter=costly)
    monkeypatch.undo()
    assert index.search(vectors(1, 3), 5, filter=index.parse_filter('shop = "north"'))[1].shape == (1, 5)


# -- over a real channel -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory, image_folder, tiny_models):
    """An index of the 80 test images with metadata columns shop and price, served in-process on port 0."""
    from asymsearch.core.data import list_image_folder
    from asymsearch.index.build import build_index
    from asymsearch.server.engine import QueryEngine
    from asymsearch.server.service import create_server
    folder = tmp_path_factory.mktemp("served")
    items = list_image_folder(image_folder)
    with open(folder / "meta.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "shop", "price"])
        for i, item in enumerate(items):
            w.writerow([item.path, ["north", "south"][i % 2], str(i % 7)])
    build_index(tiny_models["teacher"], image_folder, folder / "index", metadata=str(folder / "meta.csv"),
                progress=False)
    engine = QueryEngine.open(folder / "index", tiny_models["student"], max_k=100)
    server, port = create_server(engine)
    yield f"127.0.0.1:{port}", engine, items
    server.stop(None)
    engine.close()


HOSTILE = [('label = "x" ; DROP TABLE items', "position 12"),
           ("shop = 'north' -- and", "position 15"),
           ("1=1 or shop = 'north'", "position 0"),
           ('colour = "red"', "the fields are: label, price, shop"),
           ('shop like "n%"', "position 5"),
           ("shop = 'north' || true", "position 15"),
           ('shop = "a\x00"', "position 9"),
           ("(" * 50 + "shop = 'north'" + ")" * 50, "nested more than 32")]
GOOD = ['shop = "north" and price < 3', 'label in ("class_01", "class_04") and not price = 2', 'price >= 6',
        'label = "class_02" and shop = "south" and price = 1']


def reference(stub, vector, k: int, text: str) -> list[int]:
    """Brute force over the matching subset, independently of the filter path: the unfiltered ranking of every
    item (a Flat index), kept where the plain-Python reference matches the hit's label and metadata."""
    from asymsearch.protos.v1 import search_pb2
    f = parse_filter(text, ["label", "price", "shop"])
    every = stub.SearchVector(search_pb2.VectorQuery(vector=vector, k=80), timeout=30).hits
    return [h.id for h in every if f.matches({"label": h.label, **dict(h.metadata)})][:k]


def test_every_rpc_refuses_hostile_filters_and_then_answers(served):
    from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
    address, engine, items = served
    q = np.random.default_rng(5).normal(size=(4, engine.dim)).astype(np.float32)
    image = open(items[3].path, "rb").read()
    with grpc.insecure_channel(address) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        assert list(stub.Info(search_pb2.InfoRequest(), timeout=10).filter_fields) == ["label", "price", "shop"]
        for text, words in HOSTILE:
            for call, request in ((stub.SearchVector, search_pb2.VectorQuery(vector=q[0], k=5, filter=text)),
                                  (stub.SearchImage, search_pb2.ImageQuery(image=image, k=5, filter=text))):
                with pytest.raises(grpc.RpcError) as refused:
                    call(request, timeout=30)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, text
                assert words in refused.value.details(), refused.value.details()
                good = GOOD[len(text) % len(GOOD)]
                got = [h.id for h in call(type(request)(**{**{f.name: getattr(request, f.name) for f in
                                                              request.DESCRIPTOR.fields}, "filter": good}),
                                          timeout=30).hits]
                want_vector = q[0] if call is stub.SearchVector else engine.embed_prepared(
                    engine.prepare_image(image)[None])[0]
                assert got == reference(stub, want_vector, 5, good), good
        # BatchSearch: hostile and good filters in one batch, each query answered for itself; the good ones with
        # different filters each equal their own reference (they cannot share one faiss call)
        queries = [search_pb2.Query(vector=search_pb2.FloatVector(values=q[i % 4]), k=4, tag=i,
                                    filter=(HOSTILE[i // 2][0] if i % 2 == 0 else GOOD[i % 4]))
                   for i in range(12)]
        results = stub.BatchSearch(search_pb2.BatchSearchRequest(queries=queries), timeout=60).results
        for i, r in enumerate(results):
            assert r.tag == i
            if i % 2 == 0:
                assert r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and HOSTILE[i // 2][1] in r.message
            else:
                assert r.code == 0, r.message
                assert [h.id for h in r.reply.hits] == reference(stub, q[i % 4], 4, GOOD[i % 4])
        # SearchStream: a hostile filter fails its own result, the stream goes on
        stream = list(stub.SearchStream(iter(queries), timeout=60))
        by_tag = {r.tag: r for r in stream}
        assert sorted(by_tag) == list(range(12))
        for i, r in by_tag.items():
            if i % 2 == 0:
                assert r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and HOSTILE[i // 2][1] in r.message
            else:
                assert r.code == 0 and [h.id for h in r.reply.hits] == reference(stub, q[i % 4], 4, GOOD[i % 4])


def test_sdk_filters_and_few_matches(served):
    """The SDK's filter= on every call; a filter matching 2 items returns both for k=10; none matching, none."""
    from asymsearch.clients.client import InvalidRequest, SearchClient
    address, engine, items = served
    q = np.random.default_rng(6).normal(size=(3, engine.dim)).astype(np.float32)
    few = 'label = "class_02" and shop = "south" and price = 1'
    with SearchClient(address, timeout=30) as client:
        hits = client.search_vector(q[0], k=10, filter=few)
        assert 1 <= len(hits) < 10 and all(h.label == "class_02" and h.metadata["shop"] == "south" and
                                           h.metadata["price"] == "1" for h in hits)
        assert client.search_vector(q[0], k=10, filter='label = "none"') == []
        assert [h.id for h in client.search_image(items[5].path, k=3, filter="price = 4")] == \
            [h.id for h in client.search_image(items[5].path, k=80) if h.metadata["price"] == "4"][:3]
        with pytest.raises(InvalidRequest, match="position 0"):
            client.search_vector(q[0], k=3, filter="= 3")
        batch = client.batch_search([q[1], items[0].path], k=5, filter='shop = "north"')
        assert all(h.metadata["shop"] == "north" for hits in batch for h in hits) and len(batch[0]) == 5
        streamed = dict(client.stream_search([q[2]], k=5, filter="price > 4"))
        assert [h.metadata["price"] for h in streamed[0]] and all(h.metadata["price"] in ("5", "6")
                                                                  for h in streamed[0])
        assert len(client.search_vector(q[0], k=5)) == 5  # and unfiltered still works


def test_cli_query_filter(served, capsys):
    """`asymsearch query --filter`: a malformed filter is one line and exit 2 before any image is sent; a good
    one answers with only matching items, as the SDK does."""
    from asymsearch.cli.main import main
    from asymsearch.clients.client import SearchClient
    address, _, items = served
    capsys.readouterr()
    assert main(["query", items[2].path, "--server", address, "-k", "4", "--filter", "shop = 'north' ;"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "position 15" in err[0] and "unexpected character ';'" in err[0], err
    assert main(["query", items[2].path, "--server", address, "-k", "4", "--filter", "colour = 1"]) == 2
    assert "the fields are: label, price, shop" in capsys.readouterr().err
    good = 'shop = "south" and price in (1, 2, 3)'
    assert main(["query", items[2].path, "--server", address, "-k", "4", "--json", "--filter", good]) == 0
    record = json.loads(capsys.readouterr().out)
    with SearchClient(address, timeout=30) as client:
        expected = client.search_image(items[2].path, k=4, filter=good)
    assert [h["id"] for h in record["hits"]] == [h.id for h in expected] and len(expected) == 4
    assert all(h.metadata["shop"] == "south" and h.metadata["price"] in "123" for h in expected)


def test_web_gateway_filter(served):
    """The web gateway's ?filter=: a malformed one is a 400 naming the position, then a good one answers with
    matching items only (as the SDK); the page carries the filter box."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from asymsearch.clients.client import SearchClient
    from asymsearch.clients.web import start_gateway
    address, _, items = served
    image = open(items[7].path, "rb").read()

    def post(text: str) -> tuple[int, dict]:
        url = f"{gateway.url}api/search?k=4&filter={urllib.parse.quote(text)}"
        request = urllib.request.Request(url, data=image, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with SearchClient(address, timeout=30) as client:
        gateway = start_gateway(client, port=0)
        try:
            with urllib.request.urlopen(gateway.url, timeout=30) as r:
                assert b'id="filter"' in r.read()
            status, body = post("shop = 'north' or 1=1")
            assert status == 400 and "position 18" in body["error"], body
            status, body = post("x" * 5000)
            assert status == 400 and "limit is 4096" in body["error"]
            status, body = post('shop = "north" and price != 3')
            assert status == 200 and body["filter"] == 'shop = "north" and price != 3'
            want = client.search_image(image, k=4, filter='shop = "north" and price != 3')
            assert [h["id"] for h in body["hits"]] == [h.id for h in want] and len(want) == 4
            assert all(h["metadata"]["shop"] == "north" and h["metadata"]["price"] != "3" for h in body["hits"])
        finally:
            gateway.stop()
