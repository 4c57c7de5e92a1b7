"""`asymsearch bench index` at toy scale: the teacher part against its own raw-ORT figures, the faiss part against
brute force (Flat and an IVF visiting every list are exact), provenance, and no overwriting of a non-result."""
from __future__ import annotations

import json

import pytest

from asymsearch.cli.main import main


def test_bench_index_command_writes_its_tables(tmp_path, tiny_models, image_folder, capsys):
    out = tmp_path / "bench.md"
    assert main(["bench", "index", "--teacher", str(tiny_models["teacher"]), "--images", str(image_folder),
                 "--limit", "24", "--batch-size", "8", "--reps", "1", "--sizes", "2000", "--queries", "50",
                 "--factories", "Flat;IVF16,Flat", "--dim", "32", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    teacher = result["teacher"]
    assert teacher["images"] == 24 and teacher["ratio"] == pytest.approx(
        teacher["pipeline_img_s"] / teacher["raw_ort_img_s"], rel=0.01, abs=1e-3)
    rows = {(r["factory"], json.dumps(r["search_params"])): r for r in result["ann"]}
    assert rows[("Flat", "{}")]["recall@10"] == 1.0  # exact search against the brute-force reference
    assert rows[("IVF16,Flat", json.dumps({"nprobe": 16}))]["recall@10"] == 1.0  # every list visited: exact
    assert 0 < rows[("IVF16,Flat", json.dumps({"nprobe": 8}))]["recall@10"] <= 1.0
    assert "| 2,000 | IVF16,Flat | nprobe=8 |" in out.read_text()
    pair = rows[("Flat", "{}")]["batch_vs_single"]  # ids checked equal inside; both costs measured
    assert pair["batch"] == 16 and pair["single_cpu_ms_per_query"] > 0 and pair["batched_cpu_ms_per_query"] > 0
    assert "one search of 16 queries vs 16 single searches" in out.read_text()
    assert result["provenance"]["command"] and result["provenance"]["machine"]["cores"]
    # the results never overwrite a JSON that is not a bench result (e.g. the model's manifest)
    manifest = tiny_models["teacher"].with_suffix(".json")
    before = manifest.read_text()
    assert main(["bench", "index", "--sizes", "", "--out", str(manifest.with_suffix(".md"))]) == 2
    assert manifest.read_text() == before


def test_batch_vs_single_refuses_a_batched_search_that_answers_otherwise():
    import faiss
    import numpy as np

    from asymsearch.bench.index import batch_vs_single

    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(data)
    assert batch_vs_single(index, data[:16], rounds=1)["batch"] == 16

    class Wrong:  # batches come back shifted by one id
        def search(self, q, k):
            scores, ids = index.search(q, k)
            return scores, ids + (len(q) > 1)
    with pytest.raises(AssertionError, match="other ids than 16 single searches"):
        batch_vs_single(Wrong(), data[:16], rounds=1)
