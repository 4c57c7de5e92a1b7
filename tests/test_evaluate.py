"""Evaluation: the three settings against a plain-loop reference, and the index path against the in-memory one."""
from __future__ import annotations

import numpy as np
import pytest

from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import PairingError, UserError
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image
from asymsearch.index.build import build_index
from asymsearch.index.evaluate import evaluate, format_table
from asymsearch.index.store import SearchIndex
from conftest import loop_average_precision, make_linear_onnx

KEYS = {"recall@1", "recall@2", "recall@4", "recall@8", "map", "precision@1", "map@r"}


def loop_metrics(queries, database, labels, rankings=None, ks=(1, 2, 4, 8)):
    """Leave-one-out reference, one query at a time. `rankings[q]` (database ids, best first, may be truncated)
    replaces the exhaustive sort when given; AP's denominator is always every other item of the query's label."""
    recalls, aps, p1, map_r = {k: [] for k in ks}, [], [], []
    for q in range(len(queries)):
        if rankings is None:
            cands = sorted((j for j in range(len(database)) if j != q), key=lambda j: -float(queries[q] @ database[j]))
        else:
            cands = [int(j) for j in rankings[q] if j != q and j >= 0]
        rel = [labels[j] == labels[q] for j in cands]
        total = sum(labels[j] == labels[q] for j in range(len(database)) if j != q)
        if total == 0:
            continue
        for k in ks:
            recalls[k].append(any(rel[:k]))
        hits, precision_sum, within_r = 0, 0.0, 0.0
        for rank, r in enumerate(rel, start=1):
            if r:
                hits += 1
                precision_sum += hits / rank
                within_r += hits / rank if rank <= total else 0.0
        aps.append(precision_sum / total)
        p1.append(float(bool(rel) and rel[0]))
        map_r.append(within_r / total)  # MAP@R: precision at the hits among the first R = total ranks
    return {**{f"recall@{k}": float(np.mean(v)) for k, v in recalls.items()}, "map": float(np.mean(aps)),
            "precision@1": float(np.mean(p1)), "map@r": float(np.mean(map_r))}


@pytest.fixture(scope="module")
def embedded(tiny_models, image_folder):
    items = list_image_folder(image_folder)
    images = [decode_image(item.path) for item in items]
    return {"labels": [item.label for item in items],
            "teacher": OnnxEmbedder(tiny_models["teacher"]).embed_images(images),
            "student": OnnxEmbedder(tiny_models["student"]).embed_images(images)}


@pytest.fixture(scope="module")
def in_memory(tiny_models, image_folder):
    return evaluate(image_folder, tiny_models["teacher"], tiny_models["student"], batch_size=9, progress=False)


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, tiny_models, image_folder):
    out = tmp_path_factory.mktemp("eval") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    return out


def test_result_shape(in_memory):
    assert list(in_memory) == ["teacher_teacher", "student_student", "student_teacher"]
    for metrics in in_memory.values():
        assert set(metrics) == KEYS
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values())


def test_settings_match_a_plain_loop(in_memory, embedded):
    t, s, labels = embedded["teacher"], embedded["student"], embedded["labels"]
    for setting, (q, db) in {"teacher_teacher": (t, t), "student_student": (s, s), "student_teacher": (s, t)}.items():
        want = loop_metrics(q, db, labels)
        for key in KEYS:
            assert in_memory[setting][key] == pytest.approx(want[key], abs=1e-6), (setting, key)
    # the synthetic classes are separable enough that a poor pipeline shows: chance R@1 is 9/79
    assert in_memory["teacher_teacher"]["recall@1"] > 0.3


def test_index_path_equals_in_memory(in_memory, tiny_models, image_folder, flat_index):
    with_index = evaluate(image_folder, tiny_models["teacher"], tiny_models["student"], index=flat_index,
                          progress=False)
    assert list(with_index) == list(in_memory)
    for setting in in_memory:
        for key in KEYS:
            assert with_index[setting][key] == pytest.approx(in_memory[setting][key], abs=1e-6), (setting, key)


def test_truncated_rankings_of_an_approximate_index(tmp_path, tiny_models, image_folder, embedded):
    """IVF with nprobe=1 returns only the probed list (-1 ids after it): misses, not a smaller denominator."""
    out = tmp_path / "index"
    build_index(tiny_models["teacher"], image_folder, out, factory="IVF4,Flat", progress=False)
    with SearchIndex.open(out) as index:
        _, rankings = index.search(embedded["student"], index.count)
    assert (rankings == -1).any()  # the case this test is about
    got = evaluate(image_folder, tiny_models["teacher"], tiny_models["student"], index=out, progress=False)
    want = loop_metrics(embedded["student"], embedded["teacher"], embedded["labels"], rankings=rankings)
    for key in KEYS:
        assert got["student_teacher"][key] == pytest.approx(want[key], abs=1e-6), key


def test_queries_from_classes_the_index_does_not_hold(tmp_path, tiny_models, image_folder):
    out = tmp_path / "index"
    build_index(tiny_models["teacher"], image_folder, out, classes="second-half", progress=False)
    with pytest.raises(UserError, match="no query label"):
        evaluate(image_folder, tiny_models["teacher"], tiny_models["student"], index=out, classes="first-half",
                 progress=False)


def test_pairing_is_enforced(tmp_path, tiny_models, image_folder, flat_index):
    with pytest.raises(PairingError, match="teacher-b"):
        evaluate(image_folder, tiny_models["teacher"], tiny_models["foreign_student"], progress=False)
    # the index check on its own: teacher-b's own teacher with its student, against an index embedded by teacher-a
    teacher_b = make_linear_onnx(tmp_path / "teacher_b.onnx", role="teacher", teacher_id="teacher-b",
                                 weight=np.random.default_rng(5).normal(size=(48, 16)))
    with pytest.raises(PairingError, match="index was embedded by teacher teacher-a"):
        evaluate(image_folder, teacher_b, tiny_models["foreign_student"], index=flat_index, progress=False)
    with pytest.raises(UserError, match="not a teacher"):
        evaluate(image_folder, tiny_models["student"], tiny_models["student"], progress=False)


def test_format_table(in_memory):
    table = format_table(in_memory).splitlines()
    assert table[0].split() == ["setting", "R@1", "R@2", "R@4", "R@8", "mAP", "P@1", "MAP@R"]
    assert [line.split()[0] for line in table[1:]] == ["teacher_teacher", "student_student", "student_teacher"]
    assert float(table[1].split()[1]) == pytest.approx(in_memory["teacher_teacher"]["recall@1"], abs=5e-5)
    assert len({len(line) for line in table}) == 1  # aligned


def test_any_query_database_pair(tiny_models, image_folder, embedded):
    from asymsearch.index.evaluate import evaluate_pair
    t, s, labels = embedded["teacher"], embedded["student"], embedded["labels"]
    for q_model, db_model, q, db in [("student", "teacher", s, t), ("teacher", "student", t, s),
                                     ("student", "student", s, s)]:
        got = evaluate_pair(image_folder, tiny_models[q_model], tiny_models[db_model], batch_size=7, progress=False)
        want = loop_metrics(q, db, labels)
        assert set(got) == KEYS
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (q_model, db_model, key)
    with pytest.raises(PairingError, match="not comparable"):
        evaluate_pair(image_folder, tiny_models["foreign_student"], tiny_models["teacher"], progress=False)


def test_revisited_protocol_end_to_end(tmp_path, tiny_models, image_folder, embedded):
    """A revisited-style data set made of the synthetic images: the ONNX path equals core.roxford on the same
    embeddings (queries cropped to the full image, so their embeddings are those of the plain images)."""
    import pickle
    import shutil

    from PIL import Image

    from asymsearch.core.roxford import evaluate_embeddings
    from asymsearch.index.evaluate import evaluate_revisited
    items = list_image_folder(image_folder)
    names = []
    for i, item in enumerate(items):
        names.append(f"img{i:03d}")
        shutil.copy(item.path, tmp_path / f"{names[-1]}.jpg")
    labels = embedded["labels"]
    queries = [0, 15, 40]
    gnd = []
    for q in queries:
        same = [j for j in range(len(items)) if labels[j] == labels[q] and j != q]
        w, h = Image.open(items[q].path).size
        gnd.append({"easy": same[: len(same) // 2], "hard": same[len(same) // 2:], "junk": [q], "bbx": [0, 0, w, h]})
    (tmp_path / "gnd_toy.pkl").write_bytes(pickle.dumps({"imlist": names, "qimlist": [names[q] for q in queries],
                                                         "gnd": gnd}))
    got = evaluate_revisited(tmp_path, tmp_path / "gnd_toy.pkl", tiny_models["student"], tiny_models["teacher"],
                             progress=False)
    want = evaluate_embeddings(embedded["student"][queries], embedded["teacher"], gnd)
    for protocol in ("easy", "medium", "hard"):
        for key in want[protocol]:
            assert got[protocol][key] == pytest.approx(want[protocol][key], abs=1e-6), (protocol, key)


def test_eval_command_pair_mode(tiny_models, image_folder, capsys):
    import json

    from asymsearch.cli.main import main
    from asymsearch.index.evaluate import evaluate_pair
    assert main(["eval", "--data", str(image_folder), "--query-model", str(tiny_models["student"]),
                 "--database-model", str(tiny_models["teacher"]), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = evaluate_pair(image_folder, tiny_models["student"], tiny_models["teacher"], progress=False)
    assert got == {"query_database": pytest.approx(want)}
    with pytest.raises(SystemExit) as e:
        main(["eval", "--data", str(image_folder), "--query-model", str(tiny_models["student"])])
    assert e.value.code == 2 and "go together" in capsys.readouterr().err


def test_index_with_removed_ids_scores_the_images_it_still_holds(tmp_path, tiny_models, image_folder, embedded):
    """After `remove_ids` the ids have gaps; the index path must score against exactly the remaining images."""
    import shutil

    from asymsearch.index.update import remove_ids
    root = tmp_path / "root"
    build_index(tiny_models["teacher"], image_folder, root, progress=False)
    removed = {0, 1, 2, 35, 79}
    remove_ids(root, sorted(removed))
    got = evaluate(image_folder, tiny_models["teacher"], tiny_models["student"], index=root,
                   progress=False)["student_teacher"]

    labels, q, db = embedded["labels"], embedded["student"], embedded["teacher"]
    kept = [j for j in range(len(labels)) if j not in removed]
    recall1, aps = [], []
    for i in range(len(labels)):
        cands = sorted((j for j in kept if j != i), key=lambda j: -float(q[i] @ db[j]))
        rel = [labels[j] == labels[i] for j in cands]
        if not any(rel):
            continue
        recall1.append(rel[0])
        aps.append(loop_average_precision(rel))
    assert got["recall@1"] == pytest.approx(np.mean(recall1), abs=1e-9)
    assert got["map"] == pytest.approx(np.mean(aps), abs=1e-9)
    shutil.rmtree(root)
