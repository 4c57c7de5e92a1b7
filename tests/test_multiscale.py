"""Multi-scale and flip-averaged descriptors in index build, index add, eval and serve, against a plain numpy loop
over the scales (and the mirrored crops).

The conftest models fix their input size (32x32); these tests build a tiny ONNX model with dynamic height and
width (3x3 conv, ReLU, global average pooling, a linear map, L2), which every `asymsearch export` has too.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import faiss
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from asymsearch.cli.main import main
from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import ModelManifest, Preprocessing, manifest_path_for, sha256_file
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.core.multiscale import MULTISCALE_SCALES
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.index.build import build_index
from asymsearch.index.versions import resolve_index_folder

CROP, RESIZE, DIM = 32, 36, 8
# scale 1, 1/√2, 1/2 of (resize 36, crop 32), written out by hand: the reference does not use scaled_preprocessing
REFERENCE_SPECS = [Preprocessing(resize=36, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3),
                   Preprocessing(resize=25, crop=23, mean=(0.5,) * 3, std=(0.5,) * 3),
                   Preprocessing(resize=18, crop=16, mean=(0.5,) * 3, std=(0.5,) * 3)]


def make_dynamic_onnx(path: Path, *, role: str, teacher_id: str, seed: int) -> Path:
    """(N,3,H,W), any H and W -> conv3x3 -> ReLU -> global average pool -> @W -> L2, with its manifest."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["images", "K", "B"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["proj"]),
        helper.make_node("ReduceL2", ["proj", "axes"], ["norm"], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe"]),
        helper.make_node("Div", ["proj", "safe"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_dynamic",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", DIM])],
        initializer=[numpy_helper.from_array(rng.normal(size=(12, 3, 3, 3)).astype(np.float32), "K"),
                     numpy_helper.from_array(rng.normal(size=12).astype(np.float32) * 0.1, "B"),
                     numpy_helper.from_array(rng.normal(size=(12, DIM)).astype(np.float32), "W"),
                     numpy_helper.from_array(np.array([1], np.int64), "axes"),
                     numpy_helper.from_array(np.array(1e-12, np.float32), "eps")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    ModelManifest(role=role, architecture={"backbone": "tiny_conv", "head": "gap", "dim": DIM}, dim=DIM,
                  input_size=CROP, preprocessing=REFERENCE_SPECS[0], opset=18, sha256=sha256_file(path),
                  teacher_id=teacher_id,
                  model_id=teacher_id if role == "teacher" else f"student-of-{teacher_id}",
                  ).save(manifest_path_for(path))
    return path


@pytest.fixture(scope="module")
def dynamic_models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dynamic")
    return {"teacher": make_dynamic_onnx(out / "teacher.onnx", role="teacher", teacher_id="dyn", seed=0),
            "student": make_dynamic_onnx(out / "student.onnx", role="student", teacher_id="dyn", seed=1)}


def reference(model: Path, paths: list[str], specs=tuple(REFERENCE_SPECS), flip: bool = False) -> np.ndarray:
    """One image and one scale at a time: embed (and embed the crop mirrored), sum, L2-normalise."""
    plain = OnnxEmbedder(model)
    out = []
    for path in paths:
        image = decode_image(path)
        total = 0
        for spec in specs:
            crop = preprocess(image, spec)
            total = total + plain.embed_arrays(crop[None])[0]
            if flip:
                total = total + plain.embed_arrays(np.ascontiguousarray(crop[:, :, ::-1])[None])[0]
        out.append(total / np.linalg.norm(total))
    return np.asarray(out, np.float32)


def stored_vectors(index_path: Path, ids) -> np.ndarray:
    folder, _ = resolve_index_folder(index_path)
    index = faiss.read_index(str(folder / "index.faiss"))
    return np.stack([index.reconstruct(int(i)) for i in ids])


@pytest.fixture(scope="module")
def reference_vectors(dynamic_models, image_folder) -> dict[str, np.ndarray]:
    paths = [item.path for item in list_image_folder(image_folder)]
    return {"teacher": reference(dynamic_models["teacher"], paths),
            "student": reference(dynamic_models["student"], paths)}


def test_build_multiscale_matches_reference_and_decodes_once(dynamic_models, image_folder, reference_vectors,
                                                              tmp_path, monkeypatch):
    from asymsearch.index import pipeline
    decoded = []
    real_decode = pipeline.decode_image
    monkeypatch.setattr(pipeline, "decode_image", lambda path: decoded.append(path) or real_decode(path))
    out = tmp_path / "ms"
    m = build_index(dynamic_models["teacher"], image_folder, out, multiscale=True, batch_size=7, shard_size=30,
                    workers=2, progress=False)
    assert m.count == 80 and m.build["scales"] == list(MULTISCALE_SCALES)
    assert sorted(decoded) == sorted(item.path for item in list_image_folder(image_folder))  # once per image
    assert json.loads((out / "manifest.json").read_text())["build"]["scales"] == list(MULTISCALE_SCALES)
    np.testing.assert_allclose(stored_vectors(out, range(80)), reference_vectors["teacher"], atol=1e-5)

    single = build_index(dynamic_models["teacher"], image_folder, tmp_path / "single", batch_size=7,
                         progress=False)
    assert single.build["scales"] == [1.0]
    one = stored_vectors(tmp_path / "single", range(80))
    assert np.abs(one - reference_vectors["teacher"]).max() > 1e-3  # the other scales do change the vectors


def test_add_embeds_at_the_scales_of_the_index(dynamic_models, image_folder, reference_vectors, tmp_path, capsys):
    listing = list_image_folder(image_folder)
    classes = sorted({item.label for item in listing})
    root = tmp_path / "grown"
    build_index(dynamic_models["teacher"], image_folder, root, classes=",".join(classes[:6]), multiscale=True,
                batch_size=16, progress=False)
    new = tmp_path / "new"
    for c in classes[6:]:
        shutil.copytree(image_folder / c, new / c)
    code = main(["index", "add", "--index", str(root), "--teacher", str(dynamic_models["teacher"]),
                 "--images", str(new), "--batch-size", "5"])
    out = capsys.readouterr().out
    assert code == 0 and "added 20 images" in out and "multi-scale (1, 0.707, 0.5)" in out
    folder, _ = resolve_index_folder(root)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["count"] == 80 and manifest["build"]["scales"] == list(MULTISCALE_SCALES)
    assert manifest["build"]["history"][-1]["scales"] == list(MULTISCALE_SCALES)
    added = [i for i, item in enumerate(listing) if item.label in classes[6:]]
    np.testing.assert_allclose(stored_vectors(root, range(60, 80)), reference_vectors["teacher"][added], atol=1e-5)
    np.testing.assert_allclose(stored_vectors(root, range(60)), reference_vectors["teacher"][:60], atol=1e-5)


def test_eval_multiscale_against_reference(dynamic_models, image_folder, reference_vectors, tmp_path, capsys):
    labels = [item.label for item in list_image_folder(image_folder)]
    t, s = reference_vectors["teacher"], reference_vectors["student"]
    teacher, student = str(dynamic_models["teacher"]), str(dynamic_models["student"])

    assert main(["eval", "--data", str(image_folder), "--query-model", teacher, "--database-model", teacher,
                 "--multiscale", "--batch-size", "9", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["query_database"]
    want = retrieval_metrics(t, labels, t, labels, exclude_self=True)
    assert got == pytest.approx(want, abs=1e-6)

    assert main(["eval", "--data", str(image_folder), "--teacher", teacher, "--student", student, "--multiscale",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["teacher_teacher"] == pytest.approx(want, abs=1e-6)
    assert got["student_student"] == pytest.approx(retrieval_metrics(s, labels, s, labels, exclude_self=True),
                                                   abs=1e-6)
    assert got["student_teacher"] == pytest.approx(retrieval_metrics(s, labels, t, labels, exclude_self=True),
                                                   abs=1e-6)

    index = tmp_path / "ms"  # the asymmetric setting against a multi-scale index: the same figure
    build_index(teacher, image_folder, index, multiscale=True, progress=False)
    assert main(["eval", "--data", str(image_folder), "--teacher", teacher, "--student", student, "--index",
                 str(index), "--multiscale", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["student_teacher"] == pytest.approx(got["student_teacher"], abs=1e-6)
    assert "note:" not in captured.err
    assert main(["eval", "--data", str(image_folder), "--teacher", teacher, "--student", student, "--index",
                 str(index), "--json"]) == 0
    assert "embedded at scales 1, 0.707, 0.5; the queries here are embedded at 1" in capsys.readouterr().err

    assert main(["eval", "--data", str(image_folder), "--query-model", teacher, "--database-model", teacher,
                 "--json"]) == 0  # single scale: a different figure from the same images
    single = json.loads(capsys.readouterr().out)["query_database"]
    assert single != pytest.approx(want, abs=1e-6)


def test_fixed_size_model_and_ray_are_refused_in_one_line(tiny_models, dynamic_models, image_folder, tmp_path,
                                                          capsys):
    code = main(["index", "build", "--teacher", str(tiny_models["teacher"]), "--images", str(image_folder),
                 "--out", str(tmp_path / "x"), "--multiscale"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fixed 32x32 input" in err[0] and "--multiscale" in err[0]
    assert not (tmp_path / "x").exists()
    code = main(["eval", "--data", str(image_folder), "--teacher", str(tiny_models["teacher"]),
                 "--student", str(tiny_models["student"]), "--multiscale"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fixed 32x32 input" in err[0]
    with pytest.raises(UserError, match="--engine ray"):
        build_index(dynamic_models["teacher"], image_folder, tmp_path / "y", multiscale=True, engine="ray")


def test_server_serves_a_multiscale_index_and_logs_it(dynamic_models, image_folder, tmp_path, caplog):
    from asymsearch.server.engine import QueryEngine
    out = tmp_path / "ms"
    build_index(dynamic_models["teacher"], image_folder, out, classes="class_00,class_01", multiscale=True,
                progress=False)
    image = Path(list_image_folder(image_folder)[0].path).read_bytes()
    with caplog.at_level(logging.INFO, logger="asymsearch.server.engine"), \
            QueryEngine.open(out, dynamic_models["student"]) as engine:
        hits = engine.search_image(image, 3).hits
    assert len(hits) == 3
    events = [r for r in caplog.records if getattr(r, "event", None) == "index_multiscale"]
    assert len(events) == 1 and events[0].scales == list(MULTISCALE_SCALES)

    assert events[0].flip is False


def test_flip_averaged_build_add_eval_and_serve_against_reference(dynamic_models, image_folder, tmp_path, capsys,
                                                                  caplog):
    from asymsearch.server.engine import QueryEngine
    listing = list_image_folder(image_folder)
    paths, labels = [item.path for item in listing], [item.label for item in listing]
    teacher = str(dynamic_models["teacher"])
    flipped = reference(dynamic_models["teacher"], paths, REFERENCE_SPECS[:1], flip=True)
    assert np.abs(flipped - reference(dynamic_models["teacher"], paths, REFERENCE_SPECS[:1])).max() > 1e-3

    classes = sorted(set(labels))
    root = tmp_path / "flip"
    assert main(["index", "build", "--teacher", teacher, "--images", str(image_folder), "--out", str(root),
                 "--classes", ",".join(classes[:6]), "--flip", "--versioned"]) == 0
    assert "flip-averaged" in capsys.readouterr().out
    new = tmp_path / "new"
    for c in classes[6:]:
        shutil.copytree(image_folder / c, new / c)
    assert main(["index", "add", "--index", str(root), "--teacher", teacher, "--images", str(new)]) == 0
    assert "flip-averaged" in capsys.readouterr().out
    folder, _ = resolve_index_folder(root)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["build"]["flip"] is True and manifest["build"]["history"][-1]["flip"] is True
    order = [i for i, label in enumerate(labels) if label in classes[:6]] + \
        [i for i, label in enumerate(labels) if label in classes[6:]]
    np.testing.assert_allclose(stored_vectors(root, range(80)), flipped[order], atol=1e-5)

    assert main(["eval", "--data", str(image_folder), "--query-model", teacher, "--database-model", teacher,
                 "--flip", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["query_database"]
    assert got == pytest.approx(retrieval_metrics(flipped, labels, flipped, labels, exclude_self=True), abs=1e-6)
    both = reference(dynamic_models["teacher"], paths, flip=True)  # every scale, each with its mirror
    assert main(["eval", "--data", str(image_folder), "--query-model", teacher, "--database-model", teacher,
                 "--flip", "--multiscale", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["query_database"]
    assert got == pytest.approx(retrieval_metrics(both, labels, both, labels, exclude_self=True), abs=1e-6)
    assert main(["eval", "--data", str(image_folder), "--teacher", teacher, "--student",
                 str(dynamic_models["student"]), "--index", str(root), "--json"]) == 0
    assert "scales 1 with flip; the queries here are embedded at 1" in capsys.readouterr().err

    with caplog.at_level(logging.INFO, logger="asymsearch.server.engine"), \
            QueryEngine.open(root, dynamic_models["student"]) as engine:
        assert len(engine.search_image(Path(paths[0]).read_bytes(), 3).hits) == 3
    events = [r for r in caplog.records if getattr(r, "event", None) == "index_multiscale"]
    assert len(events) == 1 and events[0].flip is True and events[0].scales == [1.0]
    with pytest.raises(UserError, match="--flip is not available with --engine ray"):
        build_index(teacher, image_folder, tmp_path / "ray", flip=True, engine="ray")
