"""core.ort: providers, thread counts, warm-up, and the files refused at load (each message names file and mismatch)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from asymsearch.core import ort as core_ort
from asymsearch.core.errors import ManifestError, UserError
from asymsearch.core.manifest import ModelManifest, manifest_path_for, sha256_file
from asymsearch.core.ort import ModelLoadError, OnnxEmbedder, available_providers, session_options


def copy_model(src: Path, dst: Path, **manifest_changes) -> Path:
    """Copy a model and its manifest, applying `manifest_changes` to the manifest's JSON."""
    dst.write_bytes(src.read_bytes())
    data = json.loads(manifest_path_for(src).read_text())
    data.update(manifest_changes)
    manifest_path_for(dst).write_text(json.dumps(data))
    return dst


def test_providers_follow_what_is_installed(monkeypatch):
    monkeypatch.setattr(core_ort.ort, "get_available_providers",
                        lambda: ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"])
    assert available_providers() == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert available_providers(tensorrt=False) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert available_providers(prefer_gpu=False) == ["CPUExecutionProvider"]
    monkeypatch.setattr(core_ort.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert available_providers() == ["CPUExecutionProvider"]


def test_thread_counts_from_arguments_and_environment(monkeypatch):
    monkeypatch.delenv(core_ort.INTRA_OP_ENV, raising=False)
    assert session_options().intra_op_num_threads == 0
    assert session_options(3, 2).intra_op_num_threads == 3 and session_options(3, 2).inter_op_num_threads == 2
    monkeypatch.setenv(core_ort.INTRA_OP_ENV, "2")
    assert session_options().intra_op_num_threads == 2
    assert session_options(1).intra_op_num_threads == 1  # an explicit argument wins
    monkeypatch.setenv(core_ort.INTRA_OP_ENV, "many")
    with pytest.raises(UserError, match=core_ort.INTRA_OP_ENV):
        session_options()
    with pytest.raises(UserError, match=">= 0"):
        session_options(-1)


def test_embedder_uses_cpu_and_threads(tiny_models):
    emb = OnnxEmbedder(tiny_models["teacher"], intra_op_threads=1, inter_op_threads=1)
    assert emb.providers[-1] == "CPUExecutionProvider"
    assert emb.session.get_session_options().intra_op_num_threads == 1


def _nan_on_zeros_model(path: Path, crop: int = 16, dim: int = 4) -> Path:
    """embeddings = proj / ||proj|| with no epsilon: an image of zeros gives 0/0 = NaN."""
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["proj"]),
             helper.make_node("ReduceL2", ["proj", "axes"], ["norm"], keepdims=1),
             helper.make_node("Div", ["proj", "norm"], ["embeddings"])]
    graph = helper.make_graph(
        nodes, "nan", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(np.ones((3, dim), np.float32), "W"),
                     numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_warmup_runs_at_load(tiny_models, tmp_path):
    path = _nan_on_zeros_model(tmp_path / "nan.onnx")
    base = json.loads(manifest_path_for(tiny_models["teacher"]).read_text())
    base.update(dim=4, input_size=16, sha256=sha256_file(path))
    manifest_path_for(path).write_text(json.dumps(base))
    with pytest.raises(ModelLoadError, match=r"nan\.onnx returns non-finite"):
        OnnxEmbedder(path)
    emb = OnnxEmbedder(path, warmup=False)  # the same model loads when the warm-up is skipped
    x = np.random.default_rng(0).uniform(0.1, 1.0, size=(2, 3, 16, 16)).astype(np.float32)
    # every column of W is ones, so each of the 4 entries is sum(channel means) and the unit vector is all 0.5
    np.testing.assert_allclose(emb.embed_arrays(x), np.full((2, 4), 0.5), rtol=1e-5)


def test_tampered_file_is_refused_naming_the_file(tiny_models, tmp_path):
    path = copy_model(tiny_models["teacher"], tmp_path / "t.onnx")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"t\.onnx does not match its manifest .*t\.json \(sha256"):
        OnnxEmbedder(path)


def test_truncated_file_is_refused_even_when_its_manifest_agrees(tiny_models, tmp_path):
    path = copy_model(tiny_models["teacher"], tmp_path / "t.onnx")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ManifestError, match=r"t\.onnx does not match its manifest"):
        OnnxEmbedder(path)
    copy_model(path, tmp_path / "u.onnx")
    m = json.loads(manifest_path_for(path).read_text())
    manifest_path_for(tmp_path / "u.onnx").write_text(json.dumps({**m, "sha256": sha256_file(path)}))
    with pytest.raises(ModelLoadError, match=r"u\.onnx is not a model onnxruntime can load"):
        OnnxEmbedder(tmp_path / "u.onnx")
    with pytest.raises(ModelLoadError, match=r"t\.onnx is not a model onnxruntime can load"):
        OnnxEmbedder(path, verify_hash=False)


@pytest.mark.parametrize("change, message", [
    ({"input_name": "pixels"}, "the model's input is 'images', the manifest says 'pixels'"),
    ({"output_name": "vectors"}, "the model has no output 'vectors'"),
    ({"dim": 7}, "the model embeds into 16 dimensions, the manifest says 7"),
    ({"input_size": 64}, "the model.s input height is fixed at 32, the manifest's crop is 64"),
])
def test_manifest_that_contradicts_the_model_is_refused(tiny_models, tmp_path, change, message):
    path = copy_model(tiny_models["teacher"], tmp_path / "t.onnx", **change)
    with pytest.raises(ModelLoadError, match=r"t\.onnx does not match its manifest .*t\.json: " + message):
        OnnxEmbedder(path)


def test_student_manifest_without_teacher_id_is_refused(tiny_models, tmp_path):
    path = copy_model(tiny_models["student"], tmp_path / "s.onnx", teacher_id="")
    with pytest.raises(ManifestError, match=r"s\.json: a student manifest needs teacher_id"):
        OnnxEmbedder(path)
    data = json.loads(manifest_path_for(path).read_text())
    del data["teacher_id"]
    manifest_path_for(path).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"s\.json lacks teacher_id"):
        OnnxEmbedder(path)
    manifest_path_for(path).write_text("[1, 2]")
    with pytest.raises(ManifestError, match=r"s\.json is not a JSON object"):
        OnnxEmbedder(path)


def test_old_manifests_load_as_fp32_and_variants_are_checked(tiny_models, tmp_path):
    data = json.loads(manifest_path_for(tiny_models["student"]).read_text())
    for key in ("variant", "parent_sha256"):
        data.pop(key, None)
    data["a_key_from_the_future"] = 1
    (tmp_path / "old.json").write_text(json.dumps(data))
    m = ModelManifest.load(tmp_path / "old.json")
    assert m.variant == "fp32" and m.parent_sha256 is None and m.teacher_id == "teacher-a"
    (tmp_path / "bad.json").write_text(json.dumps({**data, "variant": "int3"}))
    with pytest.raises(ManifestError, match=r"bad\.json: manifest variant must be one of"):
        ModelManifest.load(tmp_path / "bad.json")
