"""`asymsearch bench embed` on tiny checkpoints: all five candidates, each at its own input size, CPU time beside
wall time, ratios from the rows, provenance, and a student paired with the wrong teacher refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asymsearch.cli.main import main
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.export.onnx_export import export_checkpoint
from asymsearch.training.checkpoint import make_checkpoint, save_checkpoint
from asymsearch.training.models import build_model

DIM = 16
TEACHER_SPEC = Preprocessing(resize=36, crop=32)
STUDENT_SPEC = Preprocessing(resize=27, crop=24)  # a smaller input, as a real student has


def _model(backbone: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model({"backbone": backbone, "head": "gem", "dim": DIM, "pretrained": None}).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bench_embed")
    arch_t = {"backbone": "tiny_cnn", "head": "gem", "dim": DIM, "pretrained": None}
    arch_s = {"backbone": "tiny_cnn_narrow", "head": "gem", "dim": DIM, "pretrained": None}
    teacher = make_checkpoint(_model("tiny_cnn", 0), role="teacher", arch=arch_t, preprocessing=TEACHER_SPEC)
    student = make_checkpoint(_model("tiny_cnn_narrow", 1), role="student", arch=arch_s, preprocessing=STUDENT_SPEC,
                              teacher_id=teacher["model_id"])
    paths = {"teacher.pt": save_checkpoint(teacher, out / "teacher.pt"),
             "student.pt": save_checkpoint(student, out / "student.pt")}
    export_checkpoint(paths["teacher.pt"], out / "teacher.onnx", samples=1)
    return {**paths, "teacher": out / "teacher.onnx"}


def test_bench_embed_times_all_five_each_at_its_own_size(checkpoints, tmp_path, capsys, monkeypatch):
    seen: dict[str, set] = {}
    real = OnnxEmbedder.embed_arrays

    def recording(self, x, *a, **kw):
        seen.setdefault(self.manifest.role, set()).add(tuple(np.shape(x)[2:]))
        return real(self, x, *a, **kw)
    monkeypatch.setattr(OnnxEmbedder, "embed_arrays", recording)
    torch.set_num_threads(1)
    out = tmp_path / "bench.json"
    assert main(["bench", "embed", "--student", str(checkpoints["student.pt"]),
                 "--teacher", str(checkpoints["teacher.pt"]), "--teacher-onnx", str(checkpoints["teacher"]),
                 "--rounds", "1", "--batch-sizes", "1,2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert sorted(rows) == sorted(["torch teacher", "ORT teacher", "torch student", "ORT student",
                                   "ORT int8 student"])
    # the ORT models were fed their own crops (the int8 student is a student too), never the other's
    assert seen == {"teacher": {(32, 32)}, "student": {(24, 24)}}
    assert result["config"]["input_sizes"] == {"torch teacher": 32, "ORT teacher": 32, "torch student": 24,
                                               "ORT student": 24, "ORT int8 student": 24}
    assert result["config"]["int8_variant"] == "int8-dynamic"
    for row in rows.values():
        for batch in ("batch1", "batch2"):
            assert row[batch]["images_per_s"] == pytest.approx(1000 / row[batch]["ms_per_image"])
            assert row[batch]["cpu_ms_per_image"] > 0
    r = result["ratios"]["torch student / ORT student"]
    assert r["batch1"] == pytest.approx(rows["torch student"]["batch1"]["ms_per_image"]
                                        / rows["ORT student"]["batch1"]["ms_per_image"])
    assert result["provenance"]["command"] and "machine" in result["provenance"]
    printed = capsys.readouterr().out
    assert "ORT int8 student | 24 |" in printed and "CPU ms/img b1" in printed
    # a student and a "teacher" that is not its teacher: one line, exit status 2
    assert main(["bench", "embed", "--student", str(checkpoints["student.pt"]),
                 "--teacher", str(checkpoints["student.pt"]), "--rounds", "1"]) == 2
