"""Training: losses and mining against plain loops, the backbone/head contracts, the sampler, both stages."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from asymsearch.core.data import list_image_folder
from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.preprocess import decode_image, preprocess
from asymsearch.training.checkpoint import REQUIRED_KEYS, state_dict_id
from asymsearch.training.data import ImageDataset, MPerClassSampler, eval_transform, train_transform
from asymsearch.training.losses import ContrastiveLoss, HardNegativeMiner, RegressionLoss
from asymsearch.training.models import BACKBONES, GeM, build_model, create_backbone, create_head
from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint
from asymsearch.training.common import split_train_val
from asymsearch.training.config import StudentConfig, TeacherConfig
from asymsearch.training.student import train_student
from asymsearch.training.teacher import train_teacher


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- mining, losses


def loop_negatives(emb, labels, ref, ref_labels, k):
    """Reference miner: sort every different-label reference item by similarity, keep k, pad with -1."""
    out = []
    for i in range(len(emb)):
        cands = sorted(((dot(emb[i], ref[j]), j) for j in range(len(ref)) if ref_labels[j] != labels[i]),
                       key=lambda t: -t[0])
        row = [j for _, j in cands[:k]]
        out.append(row + [-1] * (k - len(row)))
    return out


@pytest.mark.parametrize("k", [1, 3, 20])
def test_miner_matches_brute_force_in_batch(k):
    emb, labels = unit(12, 5, 0), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    got = HardNegativeMiner(k)(emb, labels)
    assert got.dtype == torch.long and got.shape == (12, k)
    assert got.tolist() == loop_negatives(emb, labels.tolist(), emb, labels.tolist(), k)


def test_miner_against_a_reference_set_pads_short_rows():
    emb, labels = unit(5, 4, 1), torch.tensor([0, 0, 1, 1, 2])
    ref, ref_labels = unit(7, 4, 2), torch.tensor([0, 0, 0, 0, 0, 1, 2])  # class 0 sees only 2 negatives
    got = HardNegativeMiner(4)(emb, labels, ref, ref_labels)
    assert got.tolist() == loop_negatives(emb, labels.tolist(), ref, ref_labels.tolist(), 4)
    assert got[0].tolist()[2:] == [-1, -1]


def test_miner_takes_no_gradient():
    emb = unit(6, 3, 3).requires_grad_(True)
    idx = HardNegativeMiner(2)(emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert not idx.requires_grad


def loop_contrastive(anchors, labels, neg_idx, ref, ref_labels, margin, exclude_self):
    """ℓ_C(a) = Σ_p −s(a,p) + Σ_n [s(a,n) − m]_+, averaged over anchors, one explicit pair at a time."""
    total = 0.0
    for a in range(len(anchors)):
        la = 0.0
        for p in range(len(ref)):
            if ref_labels[p] == labels[a] and not (exclude_self and p == a):
                la -= dot(anchors[a], ref[p])
        for n in neg_idx[a]:
            if n >= 0:
                la += max(0.0, dot(anchors[a], ref[n]) - margin)
        total += la
    return total / len(anchors)


@pytest.mark.parametrize("margin", [0.0, 0.5, -0.3])
def test_contrastive_symmetric_matches_loop(margin):
    emb, labels = unit(10, 6, 4), torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    neg = HardNegativeMiner(3)(emb, labels)
    got = ContrastiveLoss(margin)(emb, labels, neg)
    want = loop_contrastive(emb, labels.tolist(), neg.tolist(), emb, labels.tolist(), margin, exclude_self=True)
    assert math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-12)


def test_contrastive_ignores_padded_negatives_and_uses_explicit_indices():
    emb, labels = unit(4, 3, 5), torch.tensor([0, 0, 1, 1])
    neg = torch.tensor([[2, -1, 3], [-1, -1, -1], [0, 1, -1], [1, -1, -1]])
    got = ContrastiveLoss(-1.0)(emb, labels, neg)  # margin -1: every listed negative contributes
    want = loop_contrastive(emb, labels.tolist(), neg.tolist(), emb, labels.tolist(), -1.0, exclude_self=True)
    assert math.isclose(float(got), want, rel_tol=1e-9)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_contrastive_asymmetric_matches_loop(exclude_self):
    """AML: anchors from the student, reference = teacher embeddings of the same batch (Contr⁺ / Contr)."""
    student, teacher = unit(9, 5, 6), unit(9, 5, 7)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    neg = HardNegativeMiner(4)(student, labels, teacher, labels)
    got = ContrastiveLoss(0.2)(student, labels, neg, teacher, labels, exclude_self=exclude_self)
    want = loop_contrastive(student, labels.tolist(), neg.tolist(), teacher, labels.tolist(), 0.2, exclude_self)
    assert math.isclose(float(got), want, rel_tol=1e-9)
    if not exclude_self:  # Contr⁺ = Contr − mean s(a, a)
        plain = ContrastiveLoss(0.2)(student, labels, neg, teacher, labels, exclude_self=True)
        self_sim = float((student * teacher).sum(1).mean())
        assert math.isclose(float(got), float(plain) - self_sim, rel_tol=1e-9)


def test_contrastive_gradient_flows_to_anchors_only_through_the_loss():
    emb = unit(6, 4, 8).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = ContrastiveLoss(-1.0)(emb, labels, HardNegativeMiner(2)(emb, labels))
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_regression_matches_loop():
    s, t = unit(7, 5, 9), unit(7, 5, 10)
    labels = torch.arange(7)
    got = RegressionLoss()(s, labels, None, t, labels, self_idx=labels)  # tests/test_losses.py has every loss
    want = sum(-dot(s[i], t[i]) for i in range(7)) / 7
    assert math.isclose(float(got), want, rel_tol=1e-9)
    assert float(RegressionLoss()(s, labels, None, s, labels, self_idx=labels)) == pytest.approx(-1.0)


# -------------------------------------------------------------------------------------- backbones and heads


KNOWN_CHANNELS = {"tiny_cnn": 256, "tiny_cnn_narrow": 128, "resnet18": 512, "resnet34": 512, "resnet50": 2048,
                  "resnet101": 2048, "mobilenet_v3_small": 576, "mobilenet_v3_large": 960, "efficientnet_b0": 1280,
                  "efficientnet_b1": 1280, "efficientnet_b2": 1408, "efficientnet_b3": 1536, "efficientnet_lite0": 1280,
                  "efficientnet_lite1": 1280, "efficientnet_lite2": 1280}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_contract(name):
    torch.manual_seed(0)
    model = build_model({"backbone": name, "head": "gem", "dim": 8, "pretrained": None}).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    (out * torch.randn(2, 8)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    if name in KNOWN_CHANNELS:
        assert model.head.proj.in_features == KNOWN_CHANNELS[name]


def test_unknown_backbone_and_head_list_the_valid_names():
    with pytest.raises(UserError) as e:
        create_backbone("resnet9000")
    assert ", ".join(sorted(BACKBONES)) in str(e.value)
    with pytest.raises(UserError, match="gem"):
        create_head("netvlad", 16, 8)


def test_pretrained_from_a_local_file(tmp_path):
    import torchvision

    ref = torchvision.models.mobilenet_v3_small(weights=None)
    torch.save(ref.state_dict(), tmp_path / "mnv3.pth")
    backbone, channels = create_backbone("mobilenet_v3_small", pretrained=str(tmp_path / "mnv3.pth"))
    assert channels == 576
    for k, v in ref.features.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v)
    tiny, _ = create_backbone("tiny_cnn")
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    loaded, _ = create_backbone("tiny_cnn", pretrained=str(tmp_path / "tiny.pth"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tiny.state_dict().items())


def test_pretrained_errors_without_downloading(tmp_path):
    with pytest.raises(UserError, match="not found"):
        create_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        create_backbone("resnet18", pretrained="NOT_A_WEIGHTS_NAME")
    with pytest.raises(UserError, match="no published weights"):
        create_backbone("tiny_cnn", pretrained="DEFAULT")
    torch.save({"nonsense": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="do not fit"):
        create_backbone("tiny_cnn", pretrained=str(tmp_path / "bad.pth"))


def test_gem_head_matches_formula_at_any_size():
    head = create_head("gem", 6, 4)
    with torch.no_grad():
        head.pool.p.fill_(2.5)
    for h, w in [(1, 1), (3, 5), (7, 7)]:
        x = torch.randn(2, 6, h, w)
        pooled = torch.tensor([[(sum(max(float(v), 1e-6) ** 2.5 for v in x[n, c].flatten()) / (h * w)) ** (1 / 2.5)
                                for c in range(6)] for n in range(2)])
        want = F.normalize(pooled @ head.proj.weight.detach().T + head.proj.bias.detach(), dim=1)
        got = head(x)
        assert got.shape == (2, 4)
        assert torch.allclose(got, want, atol=1e-5)
    assert GeM().p.detach().tolist() == [3.0]


# -------------------------------------------------------------------------------------------------- data


def test_m_per_class_sampler():
    labels = [0] * 10 + [1] * 10 + [2] * 2 + [3] * 8  # class 2 is smaller than m
    s = MPerClassSampler(labels, m=4, classes_per_batch=3, seed=7)
    assert len(s) == 30 // 12
    s.set_epoch(1)
    first = list(s)
    assert len(first) == len(s)
    for batch in first:
        assert len(batch) == 12
        classes = [labels[i] for i in batch]
        assert len(set(classes)) == 3 and all(classes.count(c) == 4 for c in set(classes))
    assert list(s) == first  # deterministic for (seed, epoch)
    many = []
    for epoch in range(2, 12):
        s.set_epoch(epoch)
        many += list(s)
    assert any(b != first[0] for b in many)  # epochs differ
    assert {labels[i] for b in many for i in b} == {0, 1, 2, 3}
    assert len(MPerClassSampler(labels, m=2, classes_per_batch=10, seed=0).__iter__().__next__()) == 8


def test_eval_transform_is_the_serving_preprocessing(image_folder):
    spec = Preprocessing(resize=40, crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    item = list_image_folder(image_folder)[3]
    want = preprocess(decode_image(item.path), spec)
    ds = ImageDataset([item], {item.label: 5}, eval_transform(spec))
    x, label = ds[0]
    assert label == 5 and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), want)
    aug = train_transform(spec)(Image.open(item.path).convert("RGB"))
    assert aug.shape == (3, 32, 32)


def test_split_train_val():
    classes = [f"c{i}" for i in range(10)]
    train, val = split_train_val(classes, 0.2)
    assert len(val) == 2 and sorted(train + val) == classes and not set(train) & set(val)
    assert split_train_val(classes, 0.0) == (classes, [])
    with pytest.raises(UserError, match="val_fraction=0"):
        split_train_val(classes[:3], 0.2)


# ---------------------------------------------------------------------------------------------- training


def teacher_cfg(data, out, **kw) -> TeacherConfig:
    base = dict(backbone="tiny_cnn", dim=16, image_size=32, epochs=3, lr=1e-3, workers=0, classes_per_batch=4)
    return TeacherConfig(data=str(data), out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def teacher_ckpt(image_folder, tmp_path_factory) -> Path:
    return train_teacher(teacher_cfg(image_folder, tmp_path_factory.mktemp("teacher") / "sub" / "teacher.pt"))


def test_train_teacher_writes_a_complete_checkpoint(teacher_ckpt, image_folder):
    assert teacher_ckpt.name == "teacher.pt" and teacher_ckpt.is_file()
    assert not list(teacher_ckpt.parent.glob(".*tmp"))
    ckpt = load_checkpoint(teacher_ckpt)
    assert set(REQUIRED_KEYS) <= set(ckpt)
    assert ckpt["format"] == 1 and ckpt["role"] == "teacher"
    assert ckpt["arch"] == {"backbone": "tiny_cnn", "head": "gem", "dim": 16, "pretrained": None}
    assert ckpt["preprocessing"] == Preprocessing(resize=32, crop=32).to_dict()
    assert len(ckpt["model_id"]) == 16 and int(ckpt["model_id"], 16) >= 0
    assert ckpt["teacher_id"] == ckpt["model_id"] == state_dict_id(ckpt["state_dict"])
    assert ckpt["config"]["data"] == str(image_folder) and ckpt["config"]["epochs"] == 3
    hist = ckpt["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert all(0.0 <= h["val_recall@1"] <= 1.0 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    model = model_from_checkpoint(ckpt)
    assert not model.training
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_train_teacher_is_deterministic_and_honours_the_seed(image_folder, tmp_path):
    a = load_checkpoint(train_teacher(teacher_cfg(image_folder, tmp_path / "a.pt", epochs=1, val_fraction=0)))
    b = load_checkpoint(train_teacher(teacher_cfg(image_folder, tmp_path / "b.pt", epochs=1, val_fraction=0)))
    c = load_checkpoint(train_teacher(teacher_cfg(image_folder, tmp_path / "c.pt", epochs=1, val_fraction=0,
                                                  seed=1)))
    assert a["model_id"] == b["model_id"] != c["model_id"]
    assert a["history"][0]["val_recall@1"] is None


def test_train_student_inherits_from_the_teacher(teacher_ckpt, image_folder, tmp_path):
    teacher = load_checkpoint(teacher_ckpt)
    before = {k: v.clone() for k, v in teacher["state_dict"].items()}
    path = train_student(StudentConfig(data=str(image_folder), teacher=str(teacher_ckpt), out=str(tmp_path),
                                       backbone="tiny_cnn_narrow", epochs=3, batch_size=16, workers=0))
    assert path == tmp_path / "student.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["role"] == "student"
    assert ckpt["teacher_id"] == teacher["model_id"] != ckpt["model_id"]
    assert ckpt["model_id"] == state_dict_id(ckpt["state_dict"])
    assert ckpt["arch"]["dim"] == teacher["arch"]["dim"] and ckpt["arch"]["backbone"] == "tiny_cnn_narrow"
    assert ckpt["preprocessing"] == teacher["preprocessing"]
    assert ckpt["history"][-1]["loss"] < ckpt["history"][0]["loss"]
    assert all(torch.equal(load_checkpoint(teacher_ckpt)["state_dict"][k], v) for k, v in before.items())


def test_training_errors_are_user_errors(teacher_ckpt, image_folder, tmp_path):
    with pytest.raises(UserError, match="data folder not found"):
        train_teacher(teacher_cfg(tmp_path / "nope", tmp_path / "t.pt"))
    with pytest.raises(UserError, match="tiny_cnn"):
        train_teacher(teacher_cfg(image_folder, tmp_path / "t.pt", backbone="resnet9000"))
    student = train_student(StudentConfig(data=str(image_folder), teacher=str(teacher_ckpt), out=str(tmp_path / "s.pt"),
                                          backbone="tiny_cnn_narrow", epochs=1, workers=0, val_fraction=0))
    with pytest.raises(UserError, match="student checkpoint"):
        train_student(StudentConfig(data=str(image_folder), teacher=str(student), out=str(tmp_path / "s2.pt"),
                                    backbone="tiny_cnn_narrow", epochs=1, workers=0))
    with pytest.raises(UserError, match="not found"):
        train_student(StudentConfig(data=str(image_folder), teacher=str(tmp_path / "none.pt"),
                                    out=str(tmp_path / "s3.pt")))


def test_load_checkpoint_rejects_missing_corrupt_and_foreign_files(teacher_ckpt, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint(tmp_path / "garbage.pt")
    data = teacher_ckpt.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not an asymsearch checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
