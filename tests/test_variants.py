"""Export variants (optimized, fp16, int8-dynamic, int8-static, ORT format), --verify and --report (bench embed:
tests/test_bench_embed.py).

The models are tiny CNNs whose batch-norm statistics were set by a few forward passes on random images, so their
outputs depend on the input (a freshly initialised deep net often maps every input to nearly the same vector,
which no comparison can tell from a broken one). Every variant is compared with the checkpoint's torch output.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from asymsearch.cli.main import main
from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import ManifestError, UserError
from asymsearch.core.manifest import ModelManifest, Preprocessing, manifest_path_for, sha256_file
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.export.onnx_export import ExportMismatch, export_checkpoint
from asymsearch.export.report import ReportConfig, variant_report
from asymsearch.export.variants import (Calibration, VariantError, calibration_batches, make_variant, parse_variants,
                                        variant_path)
from asymsearch.export.verify import verify_model
from asymsearch.training.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from asymsearch.training.models import build_model

SPEC = Preprocessing(resize=36, crop=32)
DIM = 16


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: a second torch thread buys nothing and, on a busy machine, costs seconds per test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(backbone: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model({"backbone": backbone, "head": "gem", "dim": DIM, "pretrained": None}).train()
    with torch.no_grad():  # running batch-norm statistics from random images
        for _ in range(4):
            model(torch.rand(16, 3, 32, 32) * 4 - 2)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("variants")
    arch_t = {"backbone": "tiny_cnn", "head": "gem", "dim": DIM, "pretrained": None}
    arch_s = {"backbone": "tiny_cnn_narrow", "head": "gem", "dim": DIM, "pretrained": None}
    teacher = make_checkpoint(_model("tiny_cnn", 0), role="teacher", arch=arch_t, preprocessing=SPEC)
    student = make_checkpoint(_model("tiny_cnn_narrow", 1), role="student", arch=arch_s, preprocessing=SPEC,
                              teacher_id=teacher["model_id"])
    paths = {"teacher.pt": save_checkpoint(teacher, out / "teacher.pt"),
             "student.pt": save_checkpoint(student, out / "student.pt")}
    export_checkpoint(paths["teacher.pt"], out / "teacher.onnx", samples=1)
    export_checkpoint(paths["student.pt"], out / "student.onnx", samples=1)
    return {**paths, "teacher": out / "teacher.onnx", "student": out / "student.onnx"}


@pytest.fixture(scope="module")
def made(models, image_folder) -> dict[str, ModelManifest]:
    cal = Calibration(image_folder, classes="first-half", count=24)
    return {v: make_variant(models["student"], v, calibration=cal)
            for v in ("optimized", "fp16", "int8-dynamic", "int8-static", "ort")}


def torch_embed(ckpt_path: Path, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model_from_checkpoint(load_checkpoint(ckpt_path))(torch.from_numpy(x)).numpy()


def real_pixels(image_folder: Path, n: int = 12) -> np.ndarray:
    items = list_image_folder(image_folder)[::7][:n]
    return np.stack([preprocess(decode_image(it.path), SPEC) for it in items])


@pytest.mark.parametrize("variant, atol", [("optimized", 1e-4), ("ort", 1e-4), ("fp16", 2e-2)])
def test_float_variants_match_torch_on_fresh_inputs(models, made, variant, atol):
    path = variant_path(models["student"], variant)
    emb = OnnxEmbedder(path)
    assert emb.manifest.variant == variant
    x = np.random.default_rng().normal(size=(3, 3, 40, 48)).astype(np.float32)  # fresh, and another size
    np.testing.assert_allclose(emb.embed_arrays(x), torch_embed(models["student.pt"], x), atol=atol)


@pytest.mark.parametrize("variant", ["int8-dynamic", "int8-static"])
def test_int8_variants_are_close_to_torch_on_real_images_and_smaller(models, made, image_folder, variant):
    path = variant_path(models["student"], variant)
    x = real_pixels(image_folder)
    got, expected = OnnxEmbedder(path).embed_arrays(x), torch_embed(models["student.pt"], x)
    cosine = np.sum(got * expected, axis=1)
    assert cosine.min() > 0.95, cosine
    assert np.abs(got - expected).max() > 1e-6  # it really is quantised, not a copy
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ops & {"QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "QLinearConv"}
    assert path.stat().st_size * 3 < models["student"].stat().st_size


def _proj_reads_dequantized(path: Path) -> bool:
    """Does the head's projection (Gemm/MatMul under /head/) take an input produced by DequantizeLinear?"""
    graph = onnx.load(path).graph
    producer = {o: n for n in graph.node for o in n.output}
    proj = [n for n in graph.node if n.name.startswith("/head/") and n.op_type in ("Gemm", "MatMul")]
    assert proj, "the head's projection was not found by name"
    return any(i in producer and producer[i].op_type == "DequantizeLinear" for n in proj for i in n.input)


def test_int8_dynamic_keeps_the_head_projection_in_float(models, made):
    ops = [n.op_type for n in onnx.load(variant_path(models["student"], "int8-dynamic")).graph.node]
    assert "ConvInteger" in ops and "MatMulInteger" not in ops  # the Gemm -> MatMul rewrite did not escape


def test_int8_static_keeps_the_head_in_float_unless_asked(models, made, image_folder, tmp_path):
    assert not _proj_reads_dequantized(variant_path(models["student"], "int8-static"))
    assert made["int8-static"].extra["float_nodes"] > 0
    assert made["int8-static"].extra["calibration"]["images"] == 24
    copy = tmp_path / "s.onnx"
    copy.write_bytes(models["student"].read_bytes())
    manifest_path_for(copy).write_text(manifest_path_for(models["student"]).read_text())
    first = onnx.load(copy).graph.node[0]
    assert first.op_type == "Conv"
    prefix = first.name.rsplit("/", 1)[0] + "/"  # e.g. /backbone/backbone.0/
    m = make_variant(copy, "int8-static", calibration=Calibration(image_folder, count=8), float_head=False,
                     float_nodes=[prefix])
    quantised = variant_path(copy, "int8-static")
    assert _proj_reads_dequantized(quantised) and m.extra["float_node_prefixes"] == [prefix]
    graph = onnx.load(quantised).graph
    producer = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    weight_dq = [n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear" for n in convs]
    assert [n.name.startswith(prefix) for n in convs] == [not q for q in weight_dq]  # only that conv stays float


def test_every_variant_has_its_own_manifest_with_the_same_teacher(models, made):
    parent = ModelManifest.load(manifest_path_for(models["student"]))
    assert parent.variant == "fp32" and parent.parent_sha256 is None
    files = {variant_path(models["student"], v) for v in made}
    manifests = {manifest_path_for(f) for f in files} | {manifest_path_for(models["student"])}
    assert len(files) == len(made) and len(manifests) == 6
    for v, m in made.items():
        path = variant_path(models["student"], v)
        assert ModelManifest.load(manifest_path_for(path)) == m
        assert m.variant == v and m.sha256 == sha256_file(path) and m.parent_sha256 == parent.sha256
        assert (m.teacher_id, m.model_id, m.dim, m.preprocessing) == (parent.teacher_id, parent.model_id, parent.dim,
                                                                     parent.preprocessing)
    assert not list(models["student"].parent.glob(".*tmp*"))


def test_fp16_keeps_float32_inputs_and_outputs(models, made):
    model = onnx.load(variant_path(models["student"], "fp16"))
    elem = onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == elem
    assert model.graph.output[0].type.tensor_type.elem_type == elem
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def test_variant_errors(models, made, image_folder, tmp_path):
    with pytest.raises(VariantError, match="needs calibration images"):
        make_variant(models["student"], "int8-static")
    with pytest.raises(VariantError, match="is itself a fp16 variant"):
        make_variant(variant_path(models["student"], "fp16"), "int8-dynamic")
    with pytest.raises(UserError, match="unknown variant 'int4'"):
        parse_variants("fp16,int4")
    assert parse_variants("all") == ["optimized", "fp16", "int8-dynamic", "int8-static", "ort"]
    assert parse_variants("fp16, fp16,ort") == ["fp16", "ort"] and parse_variants("") == []
    with pytest.raises(UserError, match="calibration image folder not found"):
        Calibration(tmp_path / "nowhere").sample()
    m = ModelManifest.load(manifest_path_for(models["student"]))
    batches = list(calibration_batches(Calibration(image_folder, count=20, batch_size=8), m))
    assert [len(b) for b in batches] == [8, 8, 4] and batches[0].shape[1:] == (3, 32, 32)


def test_verify_passes_then_catches_tampering_and_a_foreign_checkpoint(models, made, tmp_path):
    for v in ("fp32", "optimized", "fp16", "int8-static", "ort"):
        r = verify_model(variant_path(models["student"], v), models["student.pt"])
        assert r["variant"] == v and r["min_cosine"] > 0.9
    assert verify_model(models["student"], models["student.pt"])["max_abs_diff"] <= 1e-4
    with pytest.raises(ManifestError, match=r"student\.onnx was not exported from .*teacher\.pt: .*model_id"):
        verify_model(models["student"], models["teacher.pt"])
    with pytest.raises(ExportMismatch, match="differs from its checkpoint's torch output"):
        verify_model(models["student"], models["student.pt"], tolerance=0.0 - 1.0)
    bad = tmp_path / "s.fp16.onnx"
    bad.write_bytes(variant_path(models["student"], "fp16").read_bytes()[:-10])
    manifest_path_for(bad).write_text(manifest_path_for(variant_path(models["student"], "fp16")).read_text())
    with pytest.raises(ManifestError, match=r"s\.fp16\.onnx does not match its manifest"):
        verify_model(bad, models["student.pt"])


def test_report_measures_every_variant_against_fp32(models, made, image_folder):
    files = {"fp32": models["student"], **{v: variant_path(models["student"], v) for v in made}}
    config = ReportConfig(data=image_folder, classes="second-half", teacher=models["teacher"], rounds=1,
                          batch_sizes=(1, 4))
    report = variant_report(files, config)
    v = report["variants"]
    assert set(v) == set(files) and report["config"]["database"] == "teacher" and report["config"]["images"] == 40
    assert v["fp32"]["recall@1_drop"] == 0 and v["fp32"]["size_ratio"] == 1 and not v["fp32"]["lossy"]
    for name, entry in v.items():
        assert entry["bytes"] == files[name].stat().st_size
        assert set(entry["speed"]) == {"batch1", "batch4"} and entry["speed"]["batch4"]["images_per_s"] > 0
        assert entry["lossy"] == (entry["recall@1_drop"] > 1.0)
    # the fp32 figures equal an independent computation from torch embeddings of the same images
    items = list_image_folder(image_folder, [f"class_{i:02d}" for i in range(4, 8)])
    x = np.stack([preprocess(decode_image(it.path), SPEC) for it in items])
    labels = [it.label for it in items]
    expected = retrieval_metrics(torch_embed(models["student.pt"], x), labels, torch_embed(models["teacher.pt"], x),
                                 labels, exclude_self=True)
    assert v["fp32"]["accuracy"]["recall@1"] == pytest.approx(expected["recall@1"])
    assert v["fp32"]["accuracy"]["map"] == pytest.approx(expected["map"], abs=1e-6)
    assert v["optimized"]["recall@1_drop"] == pytest.approx(0.0, abs=1e-9)


def test_cli_variants_report_refuses_lossy_then_keeps_with_flag(models, image_folder, tmp_path, capsys):
    out = tmp_path / "s.onnx"
    args = ["export", "--checkpoint", str(models["student.pt"]), "--out", str(out), "--variants", "fp16,int8-static",
            "--calibration-data", str(image_folder), "--calibration-images", "16", "--report", "--eval-data",
            str(image_folder), "--teacher", str(models["teacher"]), "--rounds", "1", "--max-recall-drop", "-1"]
    assert main(args) == 0  # every variant "loses" more than -1 points: all are refused and removed
    text = capsys.readouterr().out
    assert "REFUSED fp16" in text and "REFUSED int8-static" in text
    assert out.is_file() and not variant_path(out, "fp16").exists()
    assert not manifest_path_for(variant_path(out, "fp16")).exists()
    report = json.loads((tmp_path / "s.report.json").read_text())
    assert report["variants"]["int8-static"]["status"] == "refused" and report["variants"]["fp32"]["status"] == "ok"

    assert main(args + ["--keep-lossy"]) == 0
    assert "WARNING int8-static" in capsys.readouterr().out
    kept = ModelManifest.load(manifest_path_for(variant_path(out, "int8-static")))
    assert kept.extra["report"]["status"] == "kept-lossy" and kept.extra["report"]["database"] == "teacher"
    OnnxEmbedder(variant_path(out, "int8-static"))  # annotating the manifest left its sha256 valid

    assert main(["export", "--checkpoint", str(models["student.pt"]), "--out", str(out), "--verify"]) == 0
    verified = capsys.readouterr().out
    assert "verified" in verified and "(fp16)" in verified and "(int8-static)" in verified
    data = bytearray(out.read_bytes())
    data[-5] ^= 1
    out.write_bytes(bytes(data))
    assert main(["export", "--checkpoint", str(models["student.pt"]), "--out", str(out), "--verify"]) == 2
    assert "does not match its manifest" in capsys.readouterr().err


def test_cli_needs_calibration_for_int8_static(models, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(models["student.pt"]), "--out", str(tmp_path / "s.onnx"),
                 "--variants", "int8-static"]) == 2
    assert "--calibration-data" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unfused_batch_norm_and_its_slice_stay_float():
    from onnx import TensorProto, helper, numpy_helper  # noqa: I001

    from asymsearch.export.variants import _node_lists

    c = 4
    inits = [numpy_helper.from_array(np.ones((c, 3, 3, 3), np.float32), "w"),
             *[numpy_helper.from_array(np.ones(c, np.float32), k) for k in ("g", "b", "m", "v")],
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([8], np.int64), "s1"),
             numpy_helper.from_array(np.array([2], np.int64), "ax")]
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], name="/backbone/conv/Conv"),
             helper.make_node("Slice", ["c", "s0", "s1", "ax"], ["s"], name="/backbone/conv/Slice"),
             helper.make_node("BatchNormalization", ["s", "g", "b", "m", "v"], ["bn"], name="/backbone/bn/BN"),
             helper.make_node("Relu", ["bn"], ["r"], name="/backbone/act/Relu"),
             helper.make_node("ReduceMean", ["r"], ["p"], name="/head/pool", axes=[2, 3], keepdims=0),
             helper.make_node("Relu", ["p"], ["embeddings"], name="/members.1/head/act")]  # a joined student's
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [1, c])], inits)
    model = helper.make_model(graph)
    included, excluded = _node_lists(model, float_head=True)
    assert excluded == ["/backbone/bn/BN", "/backbone/conv/Slice", "/head/pool", "/members.1/head/act"]
    assert included == ["/backbone/conv/Conv", "/backbone/act/Relu"]
    included, excluded = _node_lists(model, float_head=False, float_nodes=["/backbone/act/"])
    assert excluded == ["/backbone/act/Relu", "/backbone/bn/BN", "/backbone/conv/Slice"]
