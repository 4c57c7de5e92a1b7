"""Every AML loss of Budnik & Avrithis 2021 against a plain Python loop over explicit pairs / triplets, symmetric and asymmetric."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asymsearch.core.errors import UserError
from asymsearch.training.losses import (LOSSES, ContrastiveLoss, ContrastivePlusLoss, DarkRankLoss,
                                        MultiSimilarityLoss, RegressionLoss, RKDLoss, TripletLoss, create_loss)
from asymsearch.training.mining import HardNegativeMiner


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def dot(u, v):
    return sum(float(a) * float(b) for a, b in zip(u, v))


def norm(u):
    return math.sqrt(sum(float(a) ** 2 for a in u))


def huber(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


LABELS = [0, 0, 1, 1, 1, 2, 2, 3]


@pytest.fixture(params=["symmetric", "asymmetric"])
def setting(request):
    """(anchors, labels, reference, reference_labels, self_idx) as lists for the loop and kwargs for the loss.

    Asymmetric: the reference is g(batch) (rows 0..N-1, so self_idx = arange) plus 3 extra teacher items, as
    the student trainer builds it (mined negatives appended)."""
    student, teacher = unit(8, 6, 1), unit(11, 6, 2)
    labels = torch.tensor(LABELS)
    if request.param == "symmetric":
        return dict(anchors=student, labels=labels, reference=None, reference_labels=None, self_idx=None,
                    ref=student, ref_labels=LABELS, self_rows=list(range(8)), teacher=teacher[:8])
    ref_labels = LABELS + [4, 1, 2]
    return dict(anchors=student, labels=labels, reference=teacher, reference_labels=torch.tensor(ref_labels),
                self_idx=torch.arange(8), ref=teacher, ref_labels=ref_labels, self_rows=list(range(8)), teacher=None)


def call(loss, st, negatives=None, **kw):
    return float(loss(st["anchors"], st["labels"], negatives, st["reference"], st["reference_labels"],
                      self_idx=st["self_idx"], **kw))


def positives_of(st, a):
    return [p for p in range(len(st["ref"])) if st["ref_labels"][p] == LABELS[a] and p != st["self_rows"][a]]


def negatives_of(st, a, neg):
    if neg is None:
        return [n for n in range(len(st["ref"])) if st["ref_labels"][n] != LABELS[a]]
    return [int(n) for n in neg[a] if n >= 0]


def sim(st, a, x):
    return dot(st["anchors"][a], st["ref"][x])


def mined(st, k=3):
    ref = st["anchors"] if st["reference"] is None else st["reference"]
    ref_labels = st["labels"] if st["reference"] is None else st["reference_labels"]
    return HardNegativeMiner(k)(st["anchors"], st["labels"], ref, ref_labels)


@pytest.mark.parametrize("use_miner", [True, False])
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_contrastive_matches_loop(setting, use_miner, margin):
    neg = mined(setting) if use_miner else None
    want = 0.0
    for a in range(8):
        want += sum(-sim(setting, a, p) for p in positives_of(setting, a))
        want += sum(max(sim(setting, a, n) - margin, 0.0) for n in negatives_of(setting, a, neg))
    assert call(ContrastiveLoss(margin), setting, neg) == pytest.approx(want / 8, abs=1e-9)


def test_contrastive_plus_is_contrastive_minus_self_similarity(setting):
    neg = mined(setting)
    if setting["reference"] is None:
        with pytest.raises(ValueError, match="asymmetric only"):
            call(ContrastivePlusLoss(0.3), setting, neg)
        return
    want = 0.0
    for a in range(8):
        want += sum(-sim(setting, a, p) for p in positives_of(setting, a))
        want += sum(max(sim(setting, a, n) - 0.3, 0.0) for n in negatives_of(setting, a, neg))
        want -= sim(setting, a, setting["self_rows"][a])
    assert call(ContrastivePlusLoss(0.3), setting, neg) == pytest.approx(want / 8, abs=1e-9)


@pytest.mark.parametrize("use_miner", [True, False])
def test_triplet_matches_loop(setting, use_miner):
    neg = mined(setting) if use_miner else None
    want = 0.0
    for a in range(8):
        for p in positives_of(setting, a):
            for n in negatives_of(setting, a, neg):
                want += max(sim(setting, a, n) - sim(setting, a, p) + 0.2, 0.0)
    assert call(TripletLoss(0.2), setting, neg) == pytest.approx(want / 8, abs=1e-9)


@pytest.mark.parametrize("use_miner", [True, False])
def test_multi_similarity_matches_loop(setting, use_miner):
    neg = mined(setting) if use_miner else None
    alpha, beta, m = 2.0, 7.0, 0.4
    want = 0.0
    for a in range(8):
        pos = sum(math.exp(-alpha * (sim(setting, a, p) - m)) for p in positives_of(setting, a))
        negs = sum(math.exp(beta * (sim(setting, a, n) - m)) for n in negatives_of(setting, a, neg))
        want += math.log(1 + pos) / alpha + math.log(1 + negs) / beta
    got = call(MultiSimilarityLoss(alpha=alpha, beta=beta, margin=m), setting, neg)
    assert got == pytest.approx(want / 8, abs=1e-9)


def test_regression_matches_loop(setting):
    if setting["reference"] is None:
        with pytest.raises(ValueError, match="asymmetric only"):
            call(RegressionLoss(), setting)
        return
    want = sum(-dot(setting["anchors"][a], setting["ref"][a]) for a in range(8)) / 8
    assert call(RegressionLoss(), setting) == pytest.approx(want, abs=1e-9)
    s = setting["anchors"]
    assert float(RegressionLoss()(s, setting["labels"], None, s, setting["labels"],
                                  self_idx=torch.arange(8))) == pytest.approx(-1.0)


def teacher_rows(setting):
    """g(a) and g(x) as the loop sees them."""
    if setting["reference"] is None:
        return setting["teacher"], setting["teacher"]
    return setting["ref"][:8], setting["ref"]


def test_rkd_legacy_form_matches_loop(setting):
    ga, gx = teacher_rows(setting)
    f, r = setting["anchors"], setting["ref"]
    others = [[x for x in range(len(r)) if x != setting["self_rows"][a]] for a in range(8)]
    pairs = [(a, x) for a in range(8) for x in others[a]]
    ds = {(a, x): norm(f[a] - r[x]) for a, x in pairs}
    dt = {(a, x): norm(ga[a] - gx[x]) for a, x in pairs}
    mean_s, mean_t = sum(ds.values()) / len(pairs), sum(dt.values()) / len(pairs)
    dist = sum(huber(ds[p] / mean_s, dt[p] / mean_t) for p in pairs) / len(pairs)

    def cos(u, v):
        return dot(u, v) / (norm(u) * norm(v))
    triples = [(a, x, y) for a in range(8) for x in others[a] for y in others[a] if x != y]
    ang = sum(huber(cos(f[a] - r[x], f[a] - r[y]), cos(ga[a] - gx[x], ga[a] - gx[y])) for a, x, y in triples)
    ang /= len(triples)
    kw = {"teacher_anchors": setting["teacher"]} if setting["reference"] is None else {}
    # the legacy form (Huber means, distances over their batch mean); the paper form: tests/test_losses_paper.py
    assert call(RKDLoss(1.0, 0.0, form="legacy"), setting, **kw) == pytest.approx(dist, abs=1e-9)
    assert call(RKDLoss(0.0, 1.0, form="legacy"), setting, **kw) == pytest.approx(ang, abs=1e-9)
    assert call(RKDLoss(1.5, 2.0, form="legacy"), setting, **kw) == pytest.approx(1.5 * dist + 2.0 * ang, abs=1e-9)


def test_rkd_is_zero_when_the_student_is_the_teacher():
    g = unit(6, 4, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert float(RKDLoss()(g, labels, teacher_anchors=g)) == pytest.approx(0.0, abs=1e-12)
    assert float(RKDLoss()(g, labels, None, g, labels, self_idx=torch.arange(6))) == pytest.approx(0.0, abs=1e-12)


def test_darkrank_matches_loop(setting):
    ga, gx = teacher_rows(setting)
    scale = 3.0
    want = 0.0
    for a in range(8):
        pool = [x for x in range(len(setting["ref"])) if x != setting["self_rows"][a]]
        ranked = sorted(pool, key=lambda x: -dot(ga[a], gx[x]))  # the teacher's ranking, closest first
        for i, x in enumerate(ranked):
            tail = sum(math.exp(scale * sim(setting, a, y)) for y in ranked[i:])
            want -= scale * sim(setting, a, x) - math.log(tail)
    kw = {"teacher_anchors": setting["teacher"]} if setting["reference"] is None else {}
    assert call(DarkRankLoss(scale), setting, **kw) == pytest.approx(want / 8, abs=1e-9)


def test_darkrank_prefers_the_teachers_order():
    g = unit(6, 4, 7)
    labels = torch.arange(6)
    right = float(DarkRankLoss(5.0)(g, labels, teacher_anchors=g))
    wrong = float(DarkRankLoss(5.0)(g, labels, teacher_anchors=unit(6, 4, 8)))  # another ranking
    assert right < wrong


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_gives_finite_gradients_to_the_anchors_only(name):
    student = unit(8, 6, 3).float().requires_grad_(True)
    teacher = unit(8, 6, 4).float()
    labels = torch.tensor(LABELS)
    neg = HardNegativeMiner(3)(student, labels, teacher, labels)
    loss = create_loss(name)(student, labels, neg, teacher, labels, self_idx=torch.arange(8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_legacy_contrastive_keywords():
    """Teacher training's call shape, and `exclude_self` (reference row i = anchor i) keep their meaning."""
    student, teacher = unit(8, 6, 1), unit(8, 6, 2)
    labels = torch.tensor(LABELS)
    neg = HardNegativeMiner(2)(student, labels, teacher, labels)
    loss = ContrastiveLoss(0.2)
    assert float(loss(student, labels, neg, teacher, labels, exclude_self=True)) == pytest.approx(
        float(loss(student, labels, neg, teacher, labels, self_idx=torch.arange(8))))
    with_self = float(loss(student, labels, neg, teacher, labels))  # g(a) counts as a positive: Contr⁺
    assert with_self == pytest.approx(float(ContrastivePlusLoss(0.2)(student, labels, neg, teacher, labels,
                                                                     self_idx=torch.arange(8))))


def test_bad_calls_are_clear():
    s = unit(4, 3, 0)
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="self_idx"):
        RegressionLoss()(s, labels, None, s, labels)
    with pytest.raises(ValueError, match="teacher_anchors"):
        RKDLoss()(s, labels)
    with pytest.raises(ValueError, match="dimension"):
        ContrastiveLoss()(s, labels, None, unit(4, 5, 0), labels)
    with pytest.raises(UserError, match="choose one of"):
        create_loss("arcface")


def test_every_registered_loss_is_built_from_a_training_config_by_name():
    """The loss registry (training.registry): each trainer's losses by name, hyper-parameters from the config's fields,
    Proxy-Anchor (per-class parameters) included; a name a trainer does not take lists the ones it does."""
    from asymsearch.training.config import StudentConfig, TeacherConfig
    from asymsearch.training.proxies import ProxyAnchorLoss
    from asymsearch.training.registry import loss_names

    teacher = TeacherConfig(data="d", out="o", margin=0.3, ms_alpha=3.0, proxy_alpha=16.0)
    assert loss_names("teacher") == ("contr", "ms", "proxy-anchor", "arcface", "cosface")
    assert create_loss("contr", teacher, role="teacher").margin == 0.3
    assert create_loss("ms", teacher, role="teacher").alpha == 3.0
    proxies = create_loss("proxy-anchor", teacher, role="teacher", num_classes=5, dim=8)
    assert isinstance(proxies, ProxyAnchorLoss) and proxies.alpha == 16.0 and proxies.proxies.shape == (5, 8)
    student = StudentConfig(data="d", teacher="t", out="o", triplet_margin=0.2, darkrank_scale=4.0)
    assert set(loss_names("student")) == set(LOSSES)
    assert create_loss("triplet", student).margin == 0.2 and create_loss("darkrank", student).scale == 4.0
    with pytest.raises(UserError, match="choose one of: contr, ms, proxy-anchor, arcface, cosface"):
        create_loss("triplet", teacher, role="teacher")
    with pytest.raises(UserError, match="unknown student loss 'proxy-anchor'"):
        create_loss("proxy-anchor", student)
