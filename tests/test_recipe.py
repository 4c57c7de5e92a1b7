"""The demo's real recipe (cli.demo TEACHER_RECIPE / STUDENT_RECIPE) on a few CUB-100 classes, end to end through
export and the built index: the served student (Lite0 at 128 px, started from the teacher) searching the
teacher's index must beat its floor, the zero-shot model at the student's own size searching a database it
embedded itself (ImageNet Lite0 with average pooling at 128 px, no training): what serving at that cost gives
without any of this. Both are measured on classes no model trained or validated on.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import shared_data_or_skip

TRAIN, EVAL, PER_CLASS = 10, 8, 12  # classes of each half, images per class


def _subset(source: Path, dst: Path) -> Path:
    """Links to PER_CLASS images of the first TRAIN and the last EVAL CUB-100 classes (sorted() order), so the
    subset's first half is training classes and its second half evaluation classes of the real split."""
    names = sorted(p.name for p in source.iterdir() if p.is_dir())
    for name in names[:TRAIN] + names[-EVAL:]:
        (dst / name).mkdir(parents=True)
        for f in sorted((source / name).iterdir())[:PER_CLASS]:
            os.symlink(f, dst / name / f.name)
    return dst


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 23: not met yet. Measured 2026-12-03 on this subset: served student "
                                       "R@1 0.852 / mAP 0.735 (with --keep-start; 0.833 / 0.699 without) against "
                                       "the floor's 0.861 / 0.726: mAP above it, Recall@1 one query below; flip to "
                                       "a plain test when the recipe beats both")
def test_served_student_beats_its_zero_shot_floor(tmp_path):
    from asymsearch.cli.demo import STUDENT_RECIPE, TEACHER_RECIPE
    from asymsearch.core.manifest import Preprocessing
    from asymsearch.export.onnx_export import export_checkpoint
    from asymsearch.index.build import build_index
    from asymsearch.index.evaluate import evaluate, evaluate_pair
    from asymsearch.training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from asymsearch.training.config import StudentConfig, TeacherConfig
    from asymsearch.training.floor import zero_shot_model
    from asymsearch.training.student import train_student
    from asymsearch.training.teacher import train_teacher

    data = _subset(shared_data_or_skip(), tmp_path / "data")
    cache = str(tmp_path / "trunk")
    teacher = train_teacher(TeacherConfig(data=str(data), out=str(tmp_path / "teacher.pt"),
                                          backbone="efficientnet_lite0", classes="first-half", epochs=2, workers=0,
                                          trunk_cache=cache, device="cpu",
                                          **{**TEACHER_RECIPE, "classes_per_batch": 4, "val_fraction": 0.3}))
    arch = load_checkpoint(teacher)["arch"]
    student = train_student(StudentConfig(data=str(data), teacher=str(teacher), out=str(tmp_path / "student.pt"),
                                          backbone=arch["backbone"], head=arch["head"], image_size=128,
                                          classes="first-half", epochs=3, workers=0, trunk_cache=cache, device="cpu",
                                          **{**STUDENT_RECIPE, "batch_size": 16, "val_fraction": 0.3}))
    for name in ("teacher", "student"):
        export_checkpoint(tmp_path / f"{name}.pt", tmp_path / f"{name}.onnx")
    build_index(tmp_path / "teacher.onnx", data, tmp_path / "index", classes="second-half", progress=False)
    served = evaluate(data, tmp_path / "teacher.onnx", tmp_path / "student.onnx", index=tmp_path / "index",
                      classes="second-half", progress=False)["student_teacher"]

    # the floor: zero-shot Lite0 + average pooling at the student's 128 px, queries and database alike
    model, zs_arch = zero_shot_model("efficientnet_lite0", "imagenet")
    small = Preprocessing.from_dict(load_checkpoint(student)["preprocessing"])
    save_checkpoint(make_checkpoint(model, role="teacher", arch=zs_arch, preprocessing=small), tmp_path / "zs.pt")
    export_checkpoint(tmp_path / "zs.pt", tmp_path / "zs.onnx")
    floor = evaluate_pair(data, tmp_path / "zs.onnx", tmp_path / "zs.onnx", classes="second-half", progress=False)
    print("served", served, "floor", floor)
    assert served["recall@1"] > floor["recall@1"] and served["map"] > floor["map"]

