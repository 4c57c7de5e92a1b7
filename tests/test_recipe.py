"""The demo's real recipe (cli.demo TEACHER_RECIPE / STUDENT_RECIPE / RECIPE_SIZES) on a few CUB-100 classes, end to
end through export and the built index: the served student (Lite0 at 160 px, started from the 288 px teacher)
searching the teacher's index must beat its floor, the zero-shot model at the student's own size searching a
database it embedded itself (ImageNet Lite0 with average pooling at 160 px, no training): what serving at that
cost gives without any of this. Both are measured on classes no model trained or validated on. The fast tests
check the pieces of the teacher's floor against values written out by hand.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import shared_data_or_skip

TRAIN, EVAL, PER_CLASS = 10, 8, 12  # classes of each half, images per class


# ---- the pieces of the teacher's floor (fast) ---------------------------------------------------------------------

def test_gem_head_started_as_zero_shot_is_average_pooling():
    """gem:init=zero-shot is p = 1 and the identity projection: on non-negative maps (the backbones' outputs end
    in a ReLU), exactly L2(mean over h, w) as the gap head computes it, written out here."""
    import torch

    from asymsearch.core.errors import UserError
    from asymsearch.training.models import create_head
    x = torch.rand(3, 16, 5, 7) * 4
    got = create_head("gem:init=zero-shot", 16, 16)(x)
    mean = x.sum(dim=(2, 3)) / 35
    want = mean / mean.pow(2).sum(1, keepdim=True).sqrt()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert create_head("gem", 16, 16).pool.p.item() == 3.0  # the default head unchanged
    with pytest.raises(UserError, match="must equal the backbone's 16 channels"):
        create_head("gem:init=zero-shot", 16, 8)
    with pytest.raises(UserError, match="random or zero-shot"):
        create_head("gem:init=pca", 16, 16)


def test_wise_ft_interpolation_is_the_weighted_mean_of_the_two_models():
    import torch

    from asymsearch.training.soup import interpolate
    start = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    end = {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor(7)}
    mixed = interpolate(start, end, 0.25)
    torch.testing.assert_close(mixed["w"], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2]))
    assert int(mixed["n"]) == 7  # counters: the end model's
    torch.testing.assert_close(interpolate(start, end, 0.0)["w"], start["w"])
    torch.testing.assert_close(interpolate(start, end, 1.0)["w"], end["w"])
    with pytest.raises(ValueError):
        interpolate({"w": torch.zeros(3), "n": torch.tensor(0)}, end, 0.5)


def test_floor_keeps_the_mix_whose_weaker_gain_over_zero_shot_is_largest():
    from asymsearch.training.floor import choose
    zs = {"recall@1": 0.90, "map": 0.60}
    cands = {0.25: {"recall@1": 0.91, "map": 0.62},  # gains +0.01 / +0.02: weaker +0.01
             0.5: {"recall@1": 0.92, "map": 0.63},  # +0.02 / +0.03: weaker +0.02  <- kept
             0.75: {"recall@1": 0.93, "map": 0.61},  # +0.03 / +0.01
             1.0: {"recall@1": 0.89, "map": 0.70}}  # R@1 below zero-shot: never kept
    v = choose(zs, cands)
    assert (v.keep, v.alpha, v.trained) == ("trained", 0.5, cands[0.5])
    assert v.to_dict()["candidates"]["1.0"] == cands[1.0]
    worse = {a: {"recall@1": 0.89, "map": 0.7} for a in (0.5, 1.0)} | {0.25: {"recall@1": 0.9, "map": 0.6}}
    v = choose(zs, worse)  # below on R@1, or only tied: the zero-shot model
    assert v.keep == "zero-shot" and v.alpha is None


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
@pytest.mark.xfail(strict=True, reason="issue 23: not met yet. Measured 2026-12-04 (288/160 px recipe, WiSE-FT "
                                       "floor): served student R@1 0.917 / mAP 0.778 against the floor's (zero-shot "
                                       "Lite0 at 160 px) 0.963 / 0.781; flip to a plain test when the recipe beats both")
def test_served_student_beats_its_zero_shot_floor(tmp_path):
    from asymsearch.cli.demo import RECIPE_SIZES, STUDENT_RECIPE, TEACHER_RECIPE
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
                                          image_size=RECIPE_SIZES["teacher"],
                                          trunk_cache=cache, device="cpu",
                                          **{**TEACHER_RECIPE, "classes_per_batch": 4, "val_fraction": 0.3}))
    arch = load_checkpoint(teacher)["arch"]
    student = train_student(StudentConfig(data=str(data), teacher=str(teacher), out=str(tmp_path / "student.pt"),
                                          backbone=arch["backbone"], head=arch["head"],
                                          image_size=RECIPE_SIZES["student"],
                                          classes="first-half", epochs=3, workers=0, trunk_cache=cache, device="cpu",
                                          **{**STUDENT_RECIPE, "batch_size": 16, "val_fraction": 0.3}))
    for name in ("teacher", "student"):
        export_checkpoint(tmp_path / f"{name}.pt", tmp_path / f"{name}.onnx")
    build_index(tmp_path / "teacher.onnx", data, tmp_path / "index", classes="second-half", progress=False)
    served = evaluate(data, tmp_path / "teacher.onnx", tmp_path / "student.onnx", index=tmp_path / "index",
                      classes="second-half", progress=False)["student_teacher"]

    # the floor: zero-shot Lite0 + average pooling at the student's own size, queries and database alike
    model, zs_arch = zero_shot_model("efficientnet_lite0", "imagenet")
    small = Preprocessing.from_dict(load_checkpoint(student)["preprocessing"])
    save_checkpoint(make_checkpoint(model, role="teacher", arch=zs_arch, preprocessing=small), tmp_path / "zs.pt")
    export_checkpoint(tmp_path / "zs.pt", tmp_path / "zs.onnx")
    floor = evaluate_pair(data, tmp_path / "zs.onnx", tmp_path / "zs.onnx", classes="second-half", progress=False)
    print("served", served, "floor", floor)
    assert served["recall@1"] > floor["recall@1"] and served["map"] > floor["map"]

