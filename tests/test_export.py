"""Export: ONNX against torch on fresh random inputs, the manifest, and the OnnxEmbedder round trip."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from asymsearch.cli.main import main
from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import ModelManifest, Preprocessing, manifest_path_for, sha256_file
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image
from asymsearch.export.onnx_export import ExportMismatch, export_checkpoint
from asymsearch.training.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from asymsearch.training.data import eval_transform
from asymsearch.training.models import BACKBONES, HEADS, build_model
from asymsearch.training.config import StudentConfig, TeacherConfig
from asymsearch.training.student import train_student
from asymsearch.training.teacher import train_teacher


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: a second torch thread buys nothing and, on a busy machine, costs seconds per test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoints(image_folder, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ckpt")
    teacher = train_teacher(TeacherConfig(data=str(image_folder), out=str(out / "teacher.pt"), backbone="tiny_cnn",
                                          dim=24, image_size=32, resize=36, epochs=1, workers=0))
    student = train_student(StudentConfig(data=str(image_folder), teacher=str(teacher), out=str(out / "student.pt"),
                                          backbone="tiny_cnn_narrow", epochs=1, batch_size=16, workers=0))
    return {"teacher": teacher, "student": student}


def torch_embed(ckpt: dict, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model_from_checkpoint(ckpt)(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_export_round_trip(checkpoints, image_folder, tmp_path, role):
    ckpt = load_checkpoint(checkpoints[role])
    out = tmp_path / "models" / f"{role}.onnx"
    manifest = export_checkpoint(checkpoints[role], out)

    assert out.is_file() and not list(out.parent.glob(".*tmp"))
    assert ModelManifest.load(manifest_path_for(out)) == manifest
    assert manifest.role == role and manifest.dim == 24 and manifest.input_size == 32
    assert manifest.architecture == ckpt["arch"]
    assert manifest.preprocessing == Preprocessing(resize=36, crop=32)
    assert manifest.opset == 17 and manifest.sha256 == sha256_file(out)
    assert manifest.model_id == ckpt["model_id"] and manifest.teacher_id == ckpt["teacher_id"]
    assert manifest.extra["checkpoint"] == str(checkpoints[role])
    assert manifest.variant == "fp32" and manifest.parent_sha256 is None
    assert 0.0 <= manifest.extra["max_abs_diff"] <= 1e-4
    graph = onnx.load(out).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["embeddings"]

    embedder = OnnxEmbedder(out, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(123)
    for shape in [(1, 3, 32, 32), (4, 3, 32, 32), (2, 3, 48, 40)]:
        x = rng.normal(size=shape).astype(np.float32)
        got = embedder.embed_arrays(x)
        assert got.shape == (shape[0], 24)
        np.testing.assert_allclose(got, torch_embed(ckpt, x), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # real images through the serving preprocessing equal torch on the evaluation transform
    items = list_image_folder(image_folder)[:3]
    images = [decode_image(it.path) for it in items]
    pixels = torch.stack([eval_transform(manifest.preprocessing)(im) for im in images]).numpy()
    np.testing.assert_allclose(embedder.embed_images(images), torch_embed(ckpt, pixels), atol=1e-5)


def test_export_at_another_image_size(checkpoints, image_folder, tmp_path, capsys):
    """--image-size changes only the manifest's crop (resize in proportion): the served embedding of a real image
    is torch's on that preprocessing, not the trained one's, and the ids stay the checkpoint's."""
    ckpt = load_checkpoint(checkpoints["teacher"])
    trained = export_checkpoint(checkpoints["teacher"], tmp_path / "t32.onnx")
    m = export_checkpoint(checkpoints["teacher"], tmp_path / "t48.onnx", image_size=48)
    assert m.input_size == 48 and m.preprocessing == Preprocessing(resize=54, crop=48)  # 36 * 48 / 32
    assert m.extra["trained_preprocessing"] == trained.preprocessing.to_dict()
    assert "trained_preprocessing" not in trained.extra
    assert (m.model_id, m.teacher_id) == (trained.model_id, trained.teacher_id) == (ckpt["model_id"],) * 2
    images = [decode_image(it.path) for it in list_image_folder(image_folder)[:3]]
    pixels = torch.stack([eval_transform(Preprocessing(resize=54, crop=48))(im) for im in images]).numpy()
    assert pixels.shape[-2:] == (48, 48)
    got = OnnxEmbedder(tmp_path / "t48.onnx", providers=["CPUExecutionProvider"]).embed_images(images)
    np.testing.assert_allclose(got, torch_embed(ckpt, pixels), atol=1e-5)
    at_trained = OnnxEmbedder(tmp_path / "t32.onnx", providers=["CPUExecutionProvider"]).embed_images(images)
    assert np.abs(got - at_trained).max() > 1e-3  # the size reached the pixels

    with pytest.raises(UserError, match="at least 32"):
        export_checkpoint(checkpoints["teacher"], tmp_path / "tiny.onnx", image_size=8)
    assert not (tmp_path / "tiny.onnx").exists()
    assert main(["export", "--checkpoint", str(checkpoints["teacher"]), "--out", str(tmp_path / "cli.onnx"),
                 "--image-size", "40"]) == 0
    assert "40 px" in capsys.readouterr().out
    assert ModelManifest.load(manifest_path_for(tmp_path / "cli.onnx")).preprocessing.crop == 40


def test_student_and_teacher_manifests_pair(checkpoints, tmp_path):
    t = export_checkpoint(checkpoints["teacher"], tmp_path / "t.onnx")
    s = export_checkpoint(checkpoints["student"], tmp_path / "s.onnx")
    assert s.teacher_id == t.teacher_id == t.model_id != s.model_id
    assert s.dim == t.dim and s.preprocessing == t.preprocessing


SMALLEST_OF_FAMILY = ("resnet18", "efficientnet_b0", "efficientnet_lite0", "mobilenet_v3_small")


def _family(name: str) -> str:
    return re.sub(r"(\d+|small|large)$", "", name)


def backbones_to_export() -> list[str]:
    """Every backbone when ASYMSEARCH_EXPORT_EVERY_BACKBONE=1; otherwise one per family (the smallest; a family
    added later is covered by its first name), since a family's members share their code and differ in width and
    depth, and exporting all of them takes minutes on 2 cores."""
    names = sorted(BACKBONES)
    if os.environ.get("ASYMSEARCH_EXPORT_EVERY_BACKBONE") == "1":
        return names
    chosen = {_family(n): n for n in SMALLEST_OF_FAMILY if n in BACKBONES}
    for n in names:
        chosen.setdefault(_family(n), n)
    return sorted(chosen.values())


@pytest.mark.parametrize("name", backbones_to_export())
def test_every_backbone_exports_and_matches_onnxruntime(name, tmp_path):
    torch.manual_seed(0)
    arch = {"backbone": name, "head": "gem", "dim": 8, "pretrained": None}
    ckpt = make_checkpoint(build_model(arch).eval(), role="teacher", arch=arch,
                           preprocessing=Preprocessing(resize=32, crop=32))
    path = save_checkpoint(ckpt, tmp_path / "m.pt")
    manifest = export_checkpoint(path, tmp_path / "m.onnx", samples=2)
    assert manifest.extra["max_abs_diff"] <= 1e-4
    x = np.random.default_rng(0).normal(size=(3, 3, 40, 48)).astype(np.float32)  # another size than exported
    got = OnnxEmbedder(tmp_path / "m.onnx", providers=["CPUExecutionProvider"]).embed_arrays(x)
    np.testing.assert_allclose(got, torch_embed(ckpt, x), atol=1e-4)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_exports_through_export_checkpoint(head, tmp_path):
    from asymsearch.training.heads import explicit_head_spec

    torch.manual_seed(0)
    arch = {"backbone": "tiny_cnn_narrow", "head": head, "dim": 128, "pretrained": None}  # gap: dim = channels
    ckpt = make_checkpoint(build_model(arch).eval(), role="teacher", arch=arch,
                           preprocessing=Preprocessing(resize=32, crop=32))
    manifest = export_checkpoint(save_checkpoint(ckpt, tmp_path / "m.pt"), tmp_path / "m.onnx", samples=1)
    assert manifest.architecture["head"] == explicit_head_spec(head)  # glam, diablo: with the form they were built as
    x = np.random.default_rng().normal(size=(2, 3, 48, 40)).astype(np.float32)  # fresh, another size
    got = OnnxEmbedder(tmp_path / "m.onnx", providers=["CPUExecutionProvider"]).embed_arrays(x)
    np.testing.assert_allclose(got, torch_embed(ckpt, x), atol=1e-4)


def test_mismatch_leaves_nothing_behind(checkpoints, tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportMismatch, match="differs from torch"):
        export_checkpoint(checkpoints["teacher"], out, tolerance=-1.0)  # any difference exceeds it
    assert list(tmp_path.iterdir()) == []
    assert issubclass(ExportMismatch, UserError)


def test_export_errors(checkpoints, tmp_path):
    with pytest.raises(UserError, match="not found"):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "m.onnx")
    (tmp_path / "corrupt.pt").write_bytes(checkpoints["teacher"].read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot read"):
        export_checkpoint(tmp_path / "corrupt.pt", tmp_path / "m.onnx")
    with pytest.raises(UserError, match="NAME.onnx"):
        export_checkpoint(checkpoints["teacher"], tmp_path / "m.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pt"]


def test_manifest_is_plain_json(checkpoints, tmp_path):
    export_checkpoint(checkpoints["student"], tmp_path / "s.onnx")
    data = json.loads(manifest_path_for(tmp_path / "s.onnx").read_text())
    assert data["role"] == "student" and data["input_name"] == "images" and data["output_name"] == "embeddings"
    assert isinstance(data["extra"]["max_abs_diff"], float)
