"""Shared fixtures: a synthetic labelled image folder and tiny hand-built ONNX teacher/student pairs.

The hand-built models (average-pool to a 4x4 grid, a fixed linear map, L2 normalisation) let the index,
server and client tests run on real ONNX files with manifests without training anything or importing torch.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from asymsearch.core.manifest import ModelManifest, Preprocessing, manifest_path_for, sha256_file
from asymsearch.core.synthetic import make_synthetic_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cub100" / "images"
TINY_CROP = 32
TINY_DIM = 16


def make_linear_onnx(path: Path, *, role: str, teacher_id: str, weight: np.ndarray, crop: int = TINY_CROP,
                     model_id: str | None = None) -> Path:
    """Write `path` (.onnx) and its manifest: images (N,3,crop,crop) -> avgpool to 4x4 -> flatten -> @weight -> L2."""
    assert weight.shape[0] == 3 * 16
    dim = weight.shape[1]
    k = crop // 4
    nodes = [
        helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["proj"]),
        helper.make_node("ReduceL2", ["proj", "axes"], ["norm"], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe"]),
        helper.make_node("Div", ["proj", "safe"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, crop, crop])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W"),
                     numpy_helper.from_array(np.array([1], np.int64), "axes"),
                     numpy_helper.from_array(np.array(1e-12, np.float32), "eps")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    onnx.save(model, path)
    ModelManifest(
        role=role, architecture={"backbone": "tiny_linear", "head": "avgpool4x4", "dim": dim}, dim=dim,
        input_size=crop, preprocessing=Preprocessing(resize=crop, crop=crop, mean=(0.5,) * 3, std=(0.5,) * 3),
        opset=18, sha256=sha256_file(path), teacher_id=teacher_id,
        model_id=model_id or (teacher_id if role == "teacher" else f"student-of-{teacher_id}"),
    ).save(manifest_path_for(path))
    return path


def loop_average_precision(rel: list[bool]) -> float:
    """AP of one ranked list of relevance flags: the mean of precision at each relevant rank."""
    hits, precisions = 0, []
    for rank, r in enumerate(rel, start=1):
        if r:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def loop_metrics(q, ql, db, dl, exclude_self, ks=(1, 2, 4, 8)):
    """Reference: one query at a time, explicit sort, AP as the mean of precision at each relevant rank."""
    recalls = {k: [] for k in ks}
    aps = []
    for i in range(len(q)):
        cands = [(float(np.dot(q[i], db[j])), j) for j in range(len(db)) if not (exclude_self and i == j)]
        cands.sort(key=lambda t: -t[0])
        rel = [dl[j] == ql[i] for _, j in cands]
        if not any(rel):
            continue
        for k in ks:
            recalls[k].append(any(rel[:k]))
        aps.append(loop_average_precision(rel))
    out = {f"recall@{k}": float(np.mean(v)) for k, v in recalls.items()}
    out["map"] = float(np.mean(aps))
    return out


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """8 classes x 10 images, 48 px: `ROOT/class_XX/NNNN.jpg`."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("images"), num_classes=8, per_class=10, size=48, seed=1)


@pytest.fixture
def tiny_weights(tmp_path) -> str:
    """A 'pretrained' tiny_cnn_narrow state dict (the tiny backbones take weights only from a file)."""
    import torch

    from asymsearch.training.models import create_backbone

    torch.manual_seed(1)
    path = tmp_path / "tiny.pth"
    torch.save(create_backbone("tiny_cnn_narrow")[0].state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Hand-built ONNX models with manifests: a teacher, a student of it, and a student of another teacher."""
    out = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, TINY_DIM))
    return {
        "teacher": make_linear_onnx(out / "teacher.onnx", role="teacher", teacher_id="teacher-a", weight=w),
        "student": make_linear_onnx(out / "student.onnx", role="student", teacher_id="teacher-a",
                                    weight=w + 0.05 * rng.normal(size=w.shape)),
        "foreign_student": make_linear_onnx(out / "foreign.onnx", role="student", teacher_id="teacher-b",
                                            weight=rng.normal(size=w.shape)),
    }


def shared_data_or_skip() -> Path:
    """The CUB-100 images beside the repo; skip when absent, unless ASYMSEARCH_REQUIRE_SHARED_DATA=1 (CI)."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if os.environ.get("ASYMSEARCH_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(f"ASYMSEARCH_REQUIRE_SHARED_DATA=1 but {SHARED_DATA} is missing")
    pytest.skip(f"shared data not found at {SHARED_DATA}")


def wait_until(condition, seconds: float = 30.0) -> bool:
    """Poll `condition` until it holds (True) or `seconds` pass (False): a bounded wait, not a timed assertion."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
