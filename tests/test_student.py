"""Student training: the teacher-embedding cache (never stale), the per-batch objective against a plain loop, the
dimension rule, and one short training run per loss family."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.training.checkpoint import load_checkpoint
from asymsearch.training.config import StudentConfig, TeacherConfig
from asymsearch.training.data import ImageDataset, eval_transform
from asymsearch.training.losses import ContrastiveLoss, RegressionLoss
from asymsearch.training.student import StudentObjective, student_preprocessing, train_student
from asymsearch.training.teacher import train_teacher
from asymsearch.training.teacher_cache import cached_array, teacher_embeddings


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


# ------------------------------------------------------------------------------------------------ the cache


class CountingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return F.normalize(x.flatten(1)[:, :8], dim=1)


def test_teacher_cache_is_reused_and_never_stale(image_folder, tmp_path):
    items = list_image_folder(image_folder)[:10]
    spec = Preprocessing(resize=16, crop=16)
    dataset = ImageDataset(items, {label: i for i, label in enumerate(sorted({it.label for it in items}))},
                           eval_transform(spec))
    net = CountingNet()
    first = teacher_embeddings(net, "aaaa", spec, items, dataset, tmp_path, torch.device("cpu"), batch_size=4)
    calls = net.calls
    assert calls == 3 and first.shape == (10, 8) and first.dtype == np.float32
    again = teacher_embeddings(net, "aaaa", spec, items, dataset, tmp_path, torch.device("cpu"), batch_size=4)
    assert net.calls == calls and np.array_equal(first, again)  # read from disk, the teacher did not run
    teacher_embeddings(net, "bbbb", spec, items, dataset, tmp_path, torch.device("cpu"), batch_size=4)
    assert net.calls == 2 * calls  # another teacher id: recomputed
    os.utime(items[3].path, ns=(1, 1))  # an image changed on disk
    teacher_embeddings(net, "aaaa", spec, items, dataset, tmp_path, torch.device("cpu"), batch_size=4)
    assert net.calls == 3 * calls


def test_cached_array_recomputes_a_damaged_or_foreign_file(tmp_path):
    made = []

    def compute():
        made.append(1)
        return np.arange(4)
    cached_array(tmp_path, "x", {"a": 1}, compute)
    (path,) = tmp_path.glob("x-*.npz")
    path.write_bytes(b"garbage")
    assert cached_array(tmp_path, "x", {"a": 1}, compute).tolist() == [0, 1, 2, 3] and len(made) == 2
    cached_array(tmp_path, "x", {"a": 1}, compute)
    assert len(made) == 2
    assert not list(tmp_path.glob(".*tmp"))


# ------------------------------------------------------------------------------------------- the objective


def test_asymmetric_objective_matches_a_loop_over_explicit_pairs():
    """Contr with the reference built by the objective: P(a) = same-label teacher items of the batch (not g(a))
    and of the mined items; N(a) = a's own mined items, k nearest by f(a)·g(x) among other classes, one per class."""
    pool = unit(30, 5, 0)
    pool_labels = torch.tensor([i % 6 for i in range(30)])
    idx = torch.tensor([0, 6, 1, 7])  # labels 0, 0, 1, 1
    labels = pool_labels[idx]
    anchors = unit(4, 5, 1)
    k, m = 2, 0.1
    got = float(StudentObjective("contr", ContrastiveLoss(m), asymmetric=True, num_negatives=k)(
        anchors, labels, idx, pool, pool_labels))

    def mined_for(a):
        best = {}
        for j in range(30):
            c = int(pool_labels[j])
            if c != int(labels[a]):
                s = float(anchors[a] @ pool[j])
                if c not in best or s > best[c][0]:
                    best[c] = (s, j)
        return [j for _, j in sorted(best.values(), reverse=True)[:k]]
    mined = [mined_for(a) for a in range(4)]
    items = [(int(i), i_pos) for i_pos, i in enumerate(idx)] + [(j, None) for row in mined for j in row]
    want = 0.0
    for a in range(4):
        for j, batch_pos in items:
            if int(pool_labels[j]) == int(labels[a]) and batch_pos != a:
                want -= float(anchors[a] @ pool[j])
        want += sum(max(float(anchors[a] @ pool[j]) - m, 0.0) for j in mined[a])
    assert got == pytest.approx(want / 4, abs=1e-9)
    reg = StudentObjective("reg", RegressionLoss(), asymmetric=True, num_negatives=k)(anchors, labels, idx, pool,
                                                                                       pool_labels)
    assert float(reg) == pytest.approx(-sum(float(anchors[a] @ pool[idx[a]]) for a in range(4)) / 4)


def test_objective_rejects_what_has_no_meaning():
    with pytest.raises(UserError, match="no symmetric form"):
        StudentObjective("reg", RegressionLoss(), asymmetric=False, num_negatives=1)
    with pytest.raises(UserError, match="choose one of"):
        StudentObjective("arcface", RegressionLoss(), asymmetric=True, num_negatives=1)


def test_student_preprocessing_scales_with_the_input_size():
    spec = Preprocessing(resize=256, crop=224)
    assert student_preprocessing(spec, None) is spec
    small = student_preprocessing(spec, 112)
    assert (small.resize, small.crop, small.mean) == (128, 112, spec.mean)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def teacher_ckpt(image_folder, tmp_path_factory):
    cfg = TeacherConfig(data=str(image_folder), out=str(tmp_path_factory.mktemp("t") / "teacher.pt"),
                        backbone="tiny_cnn", dim=16, image_size=32, epochs=2, lr=1e-3, workers=0, classes_per_batch=4)
    return train_teacher(cfg)


@pytest.mark.parametrize("loss,asymmetric", [("contr+", True), ("triplet", False), ("rkd", True)])
def test_train_student_with_a_loss(teacher_ckpt, image_folder, tmp_path, loss, asymmetric):
    path = train_student(StudentConfig(data=str(image_folder), teacher=str(teacher_ckpt), out=str(tmp_path),
                                       backbone="tiny_cnn_narrow", loss=loss, asymmetric=asymmetric, epochs=2,
                                       batch_size=16, workers=0, image_size=24))
    ckpt, teacher = load_checkpoint(path), load_checkpoint(teacher_ckpt)
    assert ckpt["teacher_id"] == teacher["model_id"] and ckpt["arch"]["dim"] == 16
    assert ckpt["config"]["loss"] == loss and ckpt["preprocessing"]["crop"] == 24
    assert all(np.isfinite(h["loss"]) for h in ckpt["history"])
    assert list((tmp_path / "teacher-cache").glob("teacher-*.npz"))  # the teacher's embeddings were cached


def test_student_dimension_must_be_the_teachers(teacher_ckpt, image_folder, tmp_path):
    with pytest.raises(UserError, match="dim must be 16"):
        train_student(StudentConfig(data=str(image_folder), teacher=str(teacher_ckpt), out=str(tmp_path),
                                    backbone="tiny_cnn_narrow", dim=32, workers=0))
