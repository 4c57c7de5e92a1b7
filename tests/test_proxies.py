"""Proxy-Anchor (training.proxies): equation (4) of Kim et al. 2020 against a plain loop over proxies and
examples, and the teacher trainer with it (the proxies train, the checkpoint leaves them out, incompatible options
are refused; resume is covered in tests/test_teacher.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asymsearch.core.errors import UserError
from asymsearch.training.checkpoint import load_checkpoint
from asymsearch.training.config import AddOnOptions, TeacherConfig
from asymsearch.training.proxies import ProxyAnchorLoss
from asymsearch.training import teacher as teacher_module
from asymsearch.training.teacher import state_path, train_teacher


def reference_loss(x, labels, proxies, alpha, delta) -> float:
    """Equation (4), one proxy and one example at a time, in Python floats."""
    x = [[float(v) for v in row] for row in x]
    num_classes = len(proxies)
    p = [[float(v) / math.sqrt(sum(float(u) ** 2 for u in row)) for v in row] for row in proxies]
    sim = [[sum(a * b for a, b in zip(xi, pc)) for pc in p] for xi in x]
    with_positive = sorted(set(labels))
    pos = sum(math.log(1 + sum(math.exp(-alpha * (sim[i][c] - delta)) for i in range(len(x)) if labels[i] == c))
              for c in with_positive) / len(with_positive)
    neg = sum(math.log(1 + sum(math.exp(alpha * (sim[i][c] + delta)) for i in range(len(x)) if labels[i] != c))
              for c in range(num_classes)) / num_classes
    return pos + neg


@pytest.mark.parametrize("alpha,delta", [(32.0, 0.1), (4.0, 0.3)])
def test_proxy_anchor_matches_equation_4(alpha, delta):
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(num_classes=5, dim=6, alpha=alpha, delta=delta).double()
    x = F.normalize(torch.randn(9, 6, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 3, 3, 4, 0])  # class 2 has no example: only its negative term counts
    got = loss(x, labels)
    want = reference_loss(x.tolist(), labels.tolist(), loss.proxies.tolist(), alpha, delta)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_proxy_anchor_is_finite_at_large_alpha_and_moves_proxies_and_embeddings():
    torch.manual_seed(1)
    loss = ProxyAnchorLoss(num_classes=3, dim=4, alpha=500.0)  # e^{500} overflows float32: must stay finite
    x = F.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    value = loss(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    value.backward()
    assert torch.isfinite(value)
    assert x.grad.abs().sum() > 0 and loss.proxies.grad.abs().sum() > 0


def cfg(data, out, **kw) -> TeacherConfig:
    base = dict(backbone="tiny_cnn_narrow", dim=8, image_size=32, epochs=3, lr=1e-3, workers=0, classes_per_batch=4,
                warmup_epochs=0.5, loss="proxy-anchor")
    return TeacherConfig(data=str(data), out=str(out), **{**base, **kw})


def test_teacher_trains_the_proxies_and_leaves_them_out_of_the_checkpoint(image_folder, tmp_path, monkeypatch):
    """(Resume restores them exactly: tests/test_teacher.py::test_resume_continues_exactly[proxy-anchor].)"""
    saved = []
    original = teacher_module._save_state

    def save_and_keep(out, cfg_, epoch, *rest):
        original(out, cfg_, epoch, *rest)
        saved.append(torch.load(state_path(out), weights_only=False)["proxies"]["proxies"])

    monkeypatch.setattr(teacher_module, "_save_state", save_and_keep)
    ckpt = load_checkpoint(train_teacher(cfg(image_folder, tmp_path / "t.pt", epochs=2)))
    assert len(saved) == 2 and saved[0].shape[1] == 8
    assert not torch.allclose(saved[0], saved[1])  # the proxies train
    assert not any("prox" in k for k in ckpt["state_dict"])  # the checkpoint is the network alone


@pytest.mark.parametrize("bad,match", [({"xbm": 16}, "neither --xbm"),
                                       ({"addons": AddOnOptions(metrix="embedding")}, "neither --xbm"),
                                       ({"loss": "triplet"}, "contr, ms, proxy-anchor")])
def test_teacher_refuses_what_proxy_anchor_cannot_take(image_folder, tmp_path, bad, match):
    with pytest.raises(UserError, match=match):
        train_teacher(cfg(image_folder, tmp_path / "t.pt", **bad))
    assert not (tmp_path / "t.pt").exists()
