"""The quality gate: the probe set `index build` keeps, its figures recomputed independently (onnxruntime on the
probe images + the plain-loop metrics of conftest), `asymsearch student check`, and its bad inputs, each followed by
a good check that passes."""
from __future__ import annotations

import io
import json
import shutil
import sqlite3

import numpy as np
import onnxruntime as ort
import pytest
from conftest import loop_metrics, make_linear_onnx
from PIL import Image

from asymsearch.cli.main import main
from asymsearch.core.manifest import ModelManifest, manifest_path_for
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.index.build import build_index
from asymsearch.index.probe import (PROBE_TABLE, GateRefused, NoProbeSet, ProbeSet, check_student, find_probe,
                                    require_probe, score, select_probe)
from asymsearch.index.store import SearchIndex
from asymsearch.index.update import add_images
from asymsearch.core.ort import OnnxEmbedder


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("gate-models")
    w = np.random.default_rng(7).normal(size=(48, 16))
    return {**tiny_models,
            "random": make_linear_onnx(out / "random.onnx", role="student", teacher_id="teacher-a", weight=w,
                                       model_id="random-student")}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, image_folder, tiny_models):
    out = tmp_path_factory.mktemp("gate") / "index"
    build_index(tiny_models["teacher"], image_folder, out, progress=False)
    return out


def ort_embed(onnx_path, images: list[bytes]) -> np.ndarray:
    """Reference embedding: a bare onnxruntime session on the pixels the server would prepare."""
    spec = ModelManifest.load(manifest_path_for(onnx_path)).preprocessing
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.stack([preprocess(decode_image(b, min_side=spec.resize), spec) for b in images])
    v = session.run(None, {"images": x.astype(np.float32)})[0]
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_the_build_keeps_a_probe_set_of_the_index_own_vectors(index_dir, image_folder):
    with SearchIndex.open(index_dir) as index:
        probe = require_probe(index)
        assert len(probe) == 80 and probe.mode == "labels" and probe.teacher_id == "teacher-a"
        records = {int(r["id"]): r for r in index.lookup_records(list(probe.ids))}
        for row, i in enumerate(probe.ids):  # each probe image is database item i: same label, same vector, same bytes
            assert records[i]["label"] == probe.labels[row]
            assert probe.images[row] == open(records[i]["path"], "rb").read()
        stored = np.stack([index._index.reconstruct(int(i)) for i in probe.ids])  # a Flat index holds them exactly
        assert np.allclose(stored, probe.teacher, atol=1e-6)


def test_gate_figures_equal_an_independent_computation(index_dir, models):
    with SearchIndex.open(index_dir) as index:
        probe = require_probe(index)
    labels = list(probe.labels)
    for name in ("student", "random", "teacher"):
        got = check_student(OnnxEmbedder(models[name]), probe)
        queries = ort_embed(models[name], list(probe.images))
        ref = loop_metrics(queries, labels, probe.teacher, labels, exclude_self=True, ks=(1,))
        teacher = loop_metrics(probe.teacher, labels, probe.teacher, labels, exclude_self=True, ks=(1,))
        assert got.recall_at_1 == pytest.approx(ref["recall@1"]) and got.map == pytest.approx(ref["map"], abs=1e-6)
        assert got.teacher_recall_at_1 == pytest.approx(teacher["recall@1"])
        assert got.teacher_map == pytest.approx(teacher["map"], abs=1e-6)
    # the bad student is far below the good one, and the gate says so with both figures
    good, bad = check_student(OnnxEmbedder(models["student"]), probe), check_student(OnnxEmbedder(models["random"]), probe)
    assert good.ratio >= 0.95 > bad.ratio
    good.require(0.95)
    with pytest.raises(GateRefused, match=rf"{bad.recall_at_1:.4f}.*{bad.teacher_recall_at_1:.4f}"):
        bad.require(0.95)


def test_teacher_topk_mode_without_usable_labels():
    """All labels distinct: the teacher's own top-5 is the ground truth (the teacher scores 1 by definition)."""
    rng = np.random.default_rng(3)
    teacher = rng.normal(size=(30, 8)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    positions, mode = select_probe([f"c{i}" for i in range(30)], 300)
    assert mode == "teacher_topk" and positions == list(range(30))
    probe = ProbeSet(None, "t", 8, (b"",) * 30, tuple(f"c{i}" for i in range(30)), teacher, "teacher_topk")
    student = teacher + 0.3 * rng.normal(size=teacher.shape).astype(np.float32)
    student /= np.linalg.norm(student, axis=1, keepdims=True)
    got = score(student, probe)
    assert got.teacher_recall_at_1 == 1.0 and got.teacher_map == pytest.approx(1.0)
    hits, aps = [], []  # reference: plain loops
    for i in range(30):
        tsims = sorted(((float(teacher[i] @ teacher[j]), j) for j in range(30) if j != i), reverse=True)
        truth = {j for _, j in tsims[:5]}
        ranked = [j for _, j in sorted(((float(student[i] @ teacher[j]), j) for j in range(30) if j != i),
                                       reverse=True)]
        hits.append(ranked[0] in truth)
        found, precisions = 0, []
        for rank, j in enumerate(ranked, 1):
            if j in truth:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / 5)
    assert got.recall_at_1 == pytest.approx(np.mean(hits)) and got.map == pytest.approx(np.mean(aps))


def test_select_probe_spreads_over_classes_with_two_each():
    labels = [f"c{i // 7:03d}" for i in range(7 * 200)]  # 200 classes of 7
    positions, mode = select_probe(labels, 300)
    chosen = [labels[p] for p in positions]
    assert mode == "labels" and len(positions) <= 300 and positions == sorted(set(positions))
    counts = {c: chosen.count(c) for c in set(chosen)}
    assert min(counts.values()) >= 2 and len(counts) == 150


def test_the_probe_set_follows_the_index_through_added_versions(tmp_path, image_folder, tiny_models):
    root = tmp_path / "root"
    build_index(tiny_models["teacher"], image_folder, root, classes="first-half", versioned=True, progress=False)
    with SearchIndex.open(root) as index:
        before = require_probe(index)
    extra = tmp_path / "extra" / "new_class"
    extra.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (30 * i, 200, 10)).save(extra / f"{i}.png")
    add_images(root, tiny_models["teacher"], tmp_path / "extra", progress=False)
    with SearchIndex.open(root) as index:
        assert index.version == "v000002" and index.count == 43
        after = find_probe(index)
    assert after is not None and after.images == before.images and np.array_equal(after.teacher, before.teacher)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_student_check_cli(capsys, index_dir, models, tmp_path):
    code, out, err = run_cli(capsys, "student", "check", "--index", index_dir, "--student", models["student"],
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    with SearchIndex.open(index_dir) as index:
        probe = require_probe(index)
    ref = loop_metrics(ort_embed(models["student"], list(probe.images)), list(probe.labels), probe.teacher,
                       list(probe.labels), exclude_self=True, ks=(1,))
    assert report["passed"] and report["recall_at_1"] == pytest.approx(ref["recall@1"])
    assert report["map"] == pytest.approx(ref["map"], abs=1e-6) and report["min_ratio"] == 0.95

    # below the gate: exit 1, one line on stderr with both figures; then a good check still passes
    code, out, err = run_cli(capsys, "student", "check", "--index", index_dir, "--student", models["random"])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "REFUSED" in out
    assert "fails the quality gate" in err and err.count("0.") >= 2
    # a lower bar lets it through
    code, _, err = run_cli(capsys, "student", "check", "--index", index_dir, "--student", models["random"],
                           "--min-ratio", "0.01")
    assert code == 0, err

    # a student of another teacher: one line naming both teacher ids, exit 2
    code, _, err = run_cli(capsys, "student", "check", "--index", index_dir, "--student",
                           models["foreign_student"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "teacher-b" in err and "teacher-a" in err

    # an index without a probe set: one line naming what is missing, exit 2
    bare = tmp_path / "bare"
    shutil.copytree(index_dir, bare)
    con = sqlite3.connect(bare / "meta.sqlite")
    with con:
        con.execute(f"DROP TABLE {PROBE_TABLE}")
    con.close()
    with SearchIndex.open(bare) as index, pytest.raises(NoProbeSet):
        require_probe(index)
    code, _, err = run_cli(capsys, "student", "check", "--index", bare, "--student", models["student"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no probe set" in err

    code, _, err = run_cli(capsys, "student", "check", "--index", index_dir, "--student", models["student"])
    assert code == 0, err


def test_large_images_are_kept_as_smaller_copies(tmp_path, tiny_models):
    """An image file over the copy limit is stored re-encoded with its shorter side at 512, still decodable."""
    from asymsearch.index.probe import MAX_COPY_BYTES, STORED_SIDE
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in range(2):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8)).save(data / f"c{c}" / f"{i}.png")
    assert (data / "c0" / "0.png").stat().st_size > MAX_COPY_BYTES
    build_index(tiny_models["teacher"], data, tmp_path / "idx", progress=False)
    with SearchIndex.open(tmp_path / "idx") as index:
        probe = require_probe(index)
    assert len(probe) == 4
    assert all(min(Image.open(io.BytesIO(b)).size) == STORED_SIDE for b in probe.images)


def test_a_student_of_a_compatible_teacher_is_gated_not_refused(tmp_path, index_dir):
    """A student whose teacher was trained compatible with the index's teacher pairs (core.manifest) and the gate
    measures it; one of an unrelated teacher is refused before any figure."""
    w = np.random.default_rng(0).normal(size=(48, 16))  # the conftest teacher's weights
    path = make_linear_onnx(tmp_path / "compat.onnx", role="student", teacher_id="teacher-c", weight=w,
                            model_id="compat-student")
    with SearchIndex.open(index_dir) as index:
        probe = require_probe(index)
    with pytest.raises(Exception, match="teacher-c"):
        check_student(OnnxEmbedder(path), probe)
    manifest = json.loads(manifest_path_for(path).read_text())
    manifest["extra"] = {"compatible_with": ["teacher-a"]}
    manifest_path_for(path).write_text(json.dumps(manifest))
    result = check_student(OnnxEmbedder(path), probe)
    assert result.ratio == pytest.approx(1.0)  # the teacher's own weights: the teacher's figures
