"""The collapse and mismatch guards and the bad-input checks of issue 23: each refuses in one line what it names,
and the good case right after it still goes through."""
from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asymsearch.core.errors import UserError
from asymsearch.core.spread import DegenerateEmbeddings, check_spread, spread
from asymsearch.training.config import TeacherConfig
from asymsearch.training.floor import decide
from asymsearch.training.teacher import train_teacher
from conftest import make_linear_onnx


def loop_mean_cosine(x: np.ndarray) -> float:
    """The independent reference: the mean over ordered pairs of distinct rows, one pair at a time."""
    values = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
              for (i, a), (j, b) in itertools.product(enumerate(x), repeat=2) if i != j]
    return sum(values) / len(values)


def test_spread_matches_a_loop_over_pairs():
    rng = np.random.default_rng(0)
    for x in (rng.normal(size=(7, 5)), rng.normal(size=(4, 3)) + 3.0, np.abs(rng.normal(size=(9, 6)))):
        assert spread(x).mean_cosine == pytest.approx(loop_mean_cosine(x), abs=1e-12)


def test_check_spread_refuses_collapse_and_passes_a_real_spread():
    rng = np.random.default_rng(1)
    constant = np.tile(rng.normal(size=(1, 16)), (40, 1))
    with pytest.raises(DegenerateEmbeddings, match="one constant vector"):
        check_spread(constant, "student")
    with pytest.raises(DegenerateEmbeddings, match="one constant vector"):  # the student: every row 1e-8
        check_spread(np.full((40, 16), 1e-8, np.float32), "student")
    parallel = np.ones((40, 16)) + 1e-3 * rng.normal(size=(40, 16))  # nearly parallel, not constant
    with pytest.raises(DegenerateEmbeddings, match="nearly parallel"):
        check_spread(parallel, "teacher")
    with pytest.raises(DegenerateEmbeddings, match="NaN"):
        check_spread(np.full((3, 4), np.nan), "teacher")
    good = rng.normal(size=(40, 16))
    assert check_spread(good, "teacher").mean_cosine < 0.2
    assert check_spread(good[:1], "teacher") is None  # one row: nothing to judge


def test_floor_keeps_the_trained_model_only_when_it_beats_zero_shot():
    z = {"recall@1": 0.8, "map": 0.5}
    assert decide(z, {"recall@1": 0.81, "map": 0.5}).keep == "trained"
    assert decide(z, {"recall@1": 0.9, "map": 0.49}).keep == "zero-shot"  # worse on mAP: not kept
    assert decide(z, {"recall@1": 0.8, "map": 0.5}).keep == "zero-shot"  # a tie is not a gain
    assert decide(z, {"recall@1": 0.9, "map": None}).keep == "zero-shot"


def _collapsed_checkpoint(good: Path, out: Path) -> Path:
    """`good` with every weight of the backbone zeroed: its output no longer depends on the image."""
    ckpt = torch.load(good, map_location="cpu", weights_only=False)
    ckpt["state_dict"] = {k: (torch.zeros_like(v) if k.startswith("backbone.") and v.is_floating_point() else v)
                          for k, v in ckpt["state_dict"].items()}
    ckpt["config"].pop("spread", None)  # as a checkpoint written before the guard existed
    torch.save(ckpt, out)
    return out


@pytest.fixture(scope="module")
def tiny_teacher(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    return train_teacher(TeacherConfig(data=str(image_folder), out=str(out), backbone="tiny_cnn", dim=16,
                                       image_size=32, epochs=1, lr=1e-3, workers=0, classes="all",
                                       classes_per_batch=4))


def test_training_records_its_classes_and_the_spread(tiny_teacher, image_folder):
    config = torch.load(tiny_teacher, map_location="cpu", weights_only=False)["config"]
    names = sorted(p.name for p in image_folder.iterdir() if p.is_dir())
    assert sorted(config["train_classes"] + config["val_classes"]) == names and config["val_classes"]
    assert config["spread"]["rows"] == 20 and config["spread"]["mean_cosine"] < 0.9999


def test_export_refuses_a_collapsed_model_then_exports_a_good_one(tiny_teacher, tmp_path):
    from asymsearch.export.onnx_export import export_checkpoint
    bad = _collapsed_checkpoint(tiny_teacher, tmp_path / "collapsed.pt")
    with pytest.raises(DegenerateEmbeddings, match="one constant vector"):
        export_checkpoint(bad, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "bad.json").exists()
    m = export_checkpoint(tiny_teacher, tmp_path / "good.onnx")
    assert (tmp_path / "good.onnx").is_file() and m.extra["train_classes"] and m.extra["val_classes"]


def test_index_build_refuses_a_collapsed_teacher_then_builds(image_folder, tmp_path):
    from asymsearch.index.build import build_index
    bad = make_linear_onnx(tmp_path / "bad.onnx", role="teacher", teacher_id="t-bad",
                           weight=np.zeros((48, 8)))  # every image -> the zero vector
    with pytest.raises(DegenerateEmbeddings, match="index build"):
        build_index(bad, image_folder, tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists()
    good = make_linear_onnx(tmp_path / "good.onnx", role="teacher", teacher_id="t-good",
                            weight=np.random.default_rng(0).normal(size=(48, 8)))
    assert build_index(good, image_folder, tmp_path / "index", progress=False).count == 80


def test_eval_warns_when_it_evaluates_on_classes_a_model_saw(tiny_teacher, image_folder, tmp_path):
    from asymsearch.cli.cmd_eval import seen_classes_warning
    from asymsearch.export.onnx_export import export_checkpoint
    onnx_path = tmp_path / "teacher.onnx"
    export_checkpoint(tiny_teacher, onnx_path)
    config = torch.load(tiny_teacher, map_location="cpu", weights_only=False)["config"]
    warning = seen_classes_warning(image_folder, "all", [onnx_path, None])
    assert warning.startswith("warning: 8 of the 8 evaluation classes") and "teacher.onnx" in warning
    unseen = seen_classes_warning(image_folder, ",".join(config["val_classes"][:1]), [onnx_path])
    assert "1 of the 1" in unseen  # validation classes were seen too (they chose the epoch)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asymsearch.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _copy(image_folder: Path, dst: Path, classes: int, per_class: int) -> Path:
    for c in sorted(p for p in image_folder.iterdir() if p.is_dir())[:classes]:
        (dst / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:per_class]:
            shutil.copy(f, dst / c.name / f.name)
    return dst


@pytest.mark.parametrize("fault", ["one class", "single image", "unreadable", "fewer than a batch"])
def test_bad_training_data_is_one_line_before_training(image_folder, tmp_path, fault):
    data = _copy(image_folder, tmp_path / "data", classes=1 if fault == "one class" else 4,
                 per_class=2 if fault == "fewer than a batch" else 10)
    if fault == "single image":
        for f in sorted((data / sorted(p.name for p in data.iterdir())[2]).iterdir())[1:]:
            f.unlink()
    if fault == "unreadable":
        (sorted(data.iterdir())[0] / "broken.jpg").write_bytes(b"not an image")
    expected = {"one class": "at least 2 training classes", "single image": "hold a single image",
                "unreadable": "cannot be read", "fewer than a batch": "fewer than one batch"}[fault]
    r = run_cli("train", "teacher", "--data", data, "--out", tmp_path / "t.pt", "--backbone", "tiny_cnn",
                "--dim", "8", "--image-size", "32", "--epochs", "1", "--workers", "0", "--classes", "all",
                "--val-fraction", "0", "--classes-per-batch", "4", "--per-class", "4" if fault != "fewer than "
                "a batch" else "3")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr
    assert not (tmp_path / "t.pt").exists() and "teacher epoch" not in r.stdout
    if fault == "fewer than a batch":  # the good case right after: enough images per class for the batch
        ok = run_cli("train", "teacher", "--data", data, "--out", tmp_path / "t.pt", "--backbone", "tiny_cnn",
                     "--dim", "8", "--image-size", "32", "--epochs", "1", "--workers", "0", "--classes", "all",
                     "--val-fraction", "0", "--classes-per-batch", "4", "--per-class", "2")
        assert ok.returncode == 0, ok.stderr
        assert (tmp_path / "t.pt").is_file()


def test_a_relation_only_student_is_warned(tiny_teacher, image_folder, tmp_path, capsys):
    from asymsearch.training.config import StudentConfig
    from asymsearch.training.student import train_student
    train_student(StudentConfig(data=str(image_folder), teacher=str(tiny_teacher), out=str(tmp_path / "s.pt"),
                                backbone="tiny_cnn", loss="rkd", classes="all", epochs=1, batch_size=16,
                                workers=0))
    out = capsys.readouterr().out
    assert "does not share the teacher's space" in out
    assert "student->teacher" in out and "the student as it started" in out


def test_user_error_is_the_cli_one_line_type():
    assert issubclass(DegenerateEmbeddings, UserError)


def test_keep_start_writes_the_start_when_training_made_the_student_worse(tiny_teacher, image_folder, tmp_path):
    from asymsearch.training.config import StudentConfig
    from asymsearch.training.student import train_student
    out = train_student(StudentConfig(data=str(image_folder), teacher=str(tiny_teacher), out=str(tmp_path / "s.pt"),
                                      backbone="tiny_cnn", from_teacher=True, image_size=32, keep_start=True,
                                      classes="all", epochs=1, batch_size=16, lr=0.5, workers=0))  # lr ruins it
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    floors = ckpt["config"]["floors"]
    assert floors["kept"] == "start"
    assert (floors["start"]["recall@1"], floors["start"]["map"]) > (floors["student_teacher"]["recall@1"],
                                                                   floors["student_teacher"]["map"])
    teacher = torch.load(tiny_teacher, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(v, teacher[k]) for k, v in ckpt["state_dict"].items())  # the start: the teacher's copy
