"""The ground floor: metrics against a plain loop, preprocessing, manifests, the ONNX wrapper."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from asymsearch.core.errors import InvalidImage, ManifestError, PairingError
from asymsearch.core.manifest import IndexManifest, ModelManifest, check_pairing, manifest_path_for
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.core.data import list_image_folder, split_classes
from conftest import loop_metrics


@pytest.mark.parametrize("exclude_self", [True, False])
def test_retrieval_metrics_match_a_plain_loop(exclude_self):
    rng = np.random.default_rng(3)
    db = rng.normal(size=(40, 5)).astype(np.float32)
    dl = rng.integers(0, 4, size=40)
    if exclude_self:
        q, ql = db, dl
    else:
        q, ql = rng.normal(size=(12, 5)).astype(np.float32), rng.integers(0, 4, size=12)
    got = retrieval_metrics(q, ql, db, dl, exclude_self=exclude_self)
    want = loop_metrics(q, ql, db, dl, exclude_self)
    assert want.keys() <= got.keys()  # tests/test_metrics.py covers the added keys (precision@1, map@r)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_perfect_and_worst_rankings():
    db = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]]
    labels = ["a", "a", "b", "b"]
    assert retrieval_metrics(db, labels, db, labels, exclude_self=True)["map"] == pytest.approx(1.0)
    assert retrieval_metrics(db, labels, -db, labels)["recall@1"] == 0.0


def test_decode_rejects_garbage_truncated_and_huge(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
    data = buf.getvalue()
    assert decode_image(data).size == (40, 30)
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"")
    with pytest.raises(InvalidImage, match="not a readable image"):
        decode_image(b"definitely not an image")
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2])
    with pytest.raises(InvalidImage, match="exceeds"):
        decode_image(data, max_pixels=100)


def test_preprocess_resizes_shorter_side_crops_centre_and_normalises():
    from asymsearch.core.manifest import Preprocessing
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    spec = Preprocessing(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = preprocess(img, spec)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], 1.0)
    np.testing.assert_allclose(x[1], -1.0)


def test_manifest_round_trip_and_pairing(tiny_models):
    m = ModelManifest.load(manifest_path_for(tiny_models["student"]))
    assert ModelManifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    index = IndexManifest(teacher_id="teacher-a", dim=m.dim, metric="inner_product", factory="Flat", count=3,
                          teacher_model={}, build={})
    check_pairing(m, index)
    foreign = ModelManifest.load(manifest_path_for(tiny_models["foreign_student"]))
    with pytest.raises(PairingError, match="teacher-b.*teacher-a"):
        check_pairing(foreign, index)


def test_embedder_checks_hash_and_embeds(tiny_models, tmp_path, image_folder):
    emb = OnnxEmbedder(tiny_models["teacher"])
    items = list_image_folder(image_folder)[:5]
    out = emb.embed_images([decode_image(i.path) for i in items])
    assert out.shape == (5, emb.dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    tampered = tmp_path / "teacher.onnx"
    tampered.write_bytes(tiny_models["teacher"].read_bytes() + b"\0")
    manifest_path_for(tampered).write_text(manifest_path_for(tiny_models["teacher"]).read_text())
    with pytest.raises(ManifestError, match="does not match its manifest"):
        OnnxEmbedder(tampered)


def test_split_classes_takes_first_half_for_training(image_folder):
    train, evaluation = split_classes(image_folder)
    assert train == [f"class_{i:02d}" for i in range(4)]
    assert evaluation == [f"class_{i:02d}" for i in range(4, 8)]
    assert {i.label for i in list_image_folder(image_folder, evaluation)} == set(evaluation)


def test_select_classes(image_folder):
    from asymsearch.core.data import select_classes
    from asymsearch.core.errors import UserError
    assert select_classes(image_folder, "second-half") == split_classes(image_folder)[1]
    assert select_classes(image_folder, "class_03,class_01") == ["class_03", "class_01"]
    with pytest.raises(UserError, match="unknown class folder"):
        select_classes(image_folder, "nope")
