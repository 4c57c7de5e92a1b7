"""Every loss formula against its source's equation, written out here with explicit numbers.

Each expected value is computed in this file from the equation as the source prints it (plain `math` on
literals; no helper of the implementation), so a reading that departs from the source fails here even if the
code and a loop written from the same reading agree (tests/test_losses.py, tests/test_addons.py check those
loops). Sources: Budnik & Avrithis, "Asymmetric Metric Learning for Knowledge Transfer", CVPR 2021 (the AML slides,
seed 001: Contr, Contr+, Triplet, MS, Reg, RKD, DarkRank); Wang et al., "Deep Metric Learning by Online Soft
Mining and Class-Aware Attention", AAAI 2019 (the poster, seed 004); Deng et al., "ArcFace: Additive Angular
Margin Loss for Deep Face Recognition", CVPR 2019; Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face
Recognition", CVPR 2018.

For OSM + CAA, RKD and DarkRank one case also computes the earlier (legacy) form and checks that the default
differs from it: those tests would fail on the old form.
"""
from __future__ import annotations

import math

import pytest
import torch

from asymsearch.core.errors import UserError
from asymsearch.training.addons import OSMCAA
from asymsearch.training.losses import (ContrastiveLoss, ContrastivePlusLoss, DarkRankLoss, MultiSimilarityLoss,
                                        RegressionLoss, RKDLoss, TripletLoss, create_loss)
from asymsearch.training.margins import ArcFaceLoss, CosFaceLoss

# four unit vectors in the plane, at these angles (radians): two of class 0, two of class 1
ANGLES = [0.0, 0.5, 1.3, 2.2]
LABELS = [0, 0, 1, 1]
# the "teacher" of the same four images, at other angles
TEACHER_ANGLES = [0.2, 0.9, 1.1, 2.9]


def circle(angles):
    return [[math.cos(t), math.sin(t)] for t in angles]


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


def dot(u, v):
    return u[0] * v[0] + u[1] * v[1]


def dist(u, v):
    return math.hypot(u[0] - v[0], u[1] - v[1])


def huber(z):  # RKD's ℓ_δ with δ = 1
    return 0.5 * z * z if abs(z) < 1 else abs(z) - 0.5


def cosine(u, v):
    return dot(u, v) / (math.hypot(*u) * math.hypot(*v))


def minus(u, v):
    return [u[0] - v[0], u[1] - v[1]]


F = circle(ANGLES)
G = circle(TEACHER_ANGLES)


# ------------------------------------------------------------------------------------------ AML: pair losses


def test_contrastive_is_the_slide_equation():
    # ℓ_C(a) = Σ_{n ∈ N(a)} [s(a, n) − m]_+ − Σ_{p ∈ P(a)} s(a, p), mean over the 4 anchors, symmetric, m = 0.5
    # s = cos of the angle difference: s(0,1) = cos 0.5, s(0,2) = cos 1.3, s(0,3) = cos 2.2, s(1,2) = cos 0.8,
    # s(1,3) = cos 1.7, s(2,3) = cos 0.9
    m = 0.5
    pos = {0: [math.cos(0.5)], 1: [math.cos(0.5)], 2: [math.cos(0.9)], 3: [math.cos(0.9)]}
    neg = {0: [math.cos(1.3), math.cos(2.2)], 1: [math.cos(0.8), math.cos(1.7)],
           2: [math.cos(1.3), math.cos(0.8)], 3: [math.cos(2.2), math.cos(1.7)]}
    want = sum(sum(max(0.0, s - m) for s in neg[a]) - sum(pos[a]) for a in range(4)) / 4
    assert float(ContrastiveLoss(m)(tensor(F), torch.tensor(LABELS))) == pytest.approx(want, abs=1e-9)


def test_contrastive_plus_and_regression_are_the_slide_equations():
    # asymmetric: s(a, x) = f(a)·g(x); reference = g of the 4 images, g(a) at row a (self_idx)
    # ℓ_R(a) = −f(a)·g(a);  ℓ_C+(a) = Σ_n [f(a)·g(n) − m]_+ − Σ_p f(a)·g(p) − f(a)·g(a)
    m = 0.3
    reg = [-math.cos(ANGLES[a] - TEACHER_ANGLES[a]) for a in range(4)]
    contr = []
    for a in range(4):
        p = [x for x in range(4) if LABELS[x] == LABELS[a] and x != a]
        n = [x for x in range(4) if LABELS[x] != LABELS[a]]
        contr.append(sum(max(0.0, math.cos(ANGLES[a] - TEACHER_ANGLES[x]) - m) for x in n)
                     - sum(math.cos(ANGLES[a] - TEACHER_ANGLES[x]) for x in p))
    args = (tensor(F), torch.tensor(LABELS), None, tensor(G), torch.tensor(LABELS))
    self_idx = torch.arange(4)
    assert float(RegressionLoss()(*args, self_idx=self_idx)) == pytest.approx(sum(reg) / 4, abs=1e-9)
    assert float(ContrastivePlusLoss(m)(*args, self_idx=self_idx)) == pytest.approx(
        sum(c + r for c, r in zip(contr, reg)) / 4, abs=1e-9)


def test_triplet_and_multi_similarity_are_the_slide_equations():
    # ℓ_T(a) = Σ_{(p, n) ∈ P(a) × N(a)} [s(a, n) − s(a, p) + m]_+
    # ℓ_MS(a) = 1/α log(1 + Σ_p e^{−α(s(a,p) − m)}) + 1/β log(1 + Σ_n e^{β(s(a,n) − m)})
    def s(i, j):
        return math.cos(ANGLES[i] - ANGLES[j])
    tm, alpha, beta, msm = 0.4, 2.0, 10.0, 0.5
    trip = ms = 0.0
    for a in range(4):
        p = [x for x in range(4) if LABELS[x] == LABELS[a] and x != a]
        n = [x for x in range(4) if LABELS[x] != LABELS[a]]
        trip += sum(max(0.0, s(a, j) - s(a, i) + tm) for i in p for j in n)
        ms += (math.log(1 + sum(math.exp(-alpha * (s(a, i) - msm)) for i in p)) / alpha
               + math.log(1 + sum(math.exp(beta * (s(a, j) - msm)) for j in n)) / beta)
    f, y = tensor(F), torch.tensor(LABELS)
    assert float(TripletLoss(tm)(f, y)) == pytest.approx(trip / 4, abs=1e-9)
    assert float(MultiSimilarityLoss(alpha, beta, msm)(f, y)) == pytest.approx(ms / 4, abs=1e-9)


# ------------------------------------------------------------------------------------------------ OSM + CAA

CENTRES = [[1.0, 0.2], [-0.3, 0.9]]  # the class-aware attention's class centres c_0, c_1


def osm_terms(alpha, sigma=0.8, margin=None):
    """The poster's weighted contrastive loss over every ordered pair i ≠ j of F, and the legacy form's."""
    def attention(i):  # a_i = exp(f_iᵀ c_{y_i}) / Σ_k exp(f_iᵀ c_k)
        e = [math.exp(dot(F[i], c)) for c in CENTRES]
        return e[LABELS[i]] / sum(e)
    pos_w = pos_paper = pos_legacy = neg_w = neg_paper = neg_legacy = 0.0
    for i in range(4):
        for j in range(4):
            if i == j:
                continue
            d, a = dist(F[i], F[j]), min(attention(i), attention(j))
            if LABELS[i] == LABELS[j]:
                w = math.exp(-d * d / sigma ** 2) * a  # w⁺ = s⁺ a_ij, s⁺ = exp(−d²/σ²)
                pos_w += w
                pos_paper += w * d * d  # y d²
                pos_legacy += w * -dot(F[i], F[j])  # ρ⁺(s) = −s
            else:
                w = max(0.0, alpha - d) * a  # w⁻ = s⁻ a_ij, s⁻ = max(0, α − d)
                neg_w += w
                neg_paper += w * max(0.0, alpha - d) ** 2  # (1 − y) max(0, α − d)²
                if margin is not None:
                    neg_legacy += w * max(0.0, dot(F[i], F[j]) - margin)  # ρ⁻(s) = [s − m]_+
    return (pos_paper / pos_w, neg_paper / neg_w if neg_w else 0.0,
            pos_legacy / pos_w, neg_legacy / neg_w if neg_w else 0.0)


def make_osm(**kw):
    osm = OSMCAA(num_classes=2, dim=2, sigma=0.8, **kw).double()
    with torch.no_grad():
        osm.centres.copy_(tensor(CENTRES))
    return osm


def test_osm_caa_positive_term_is_the_posters_d_squared():
    # α = 0.5: every negative pair of F is farther than 0.5 (closest: angles 0.5 and 1.3, d = 2 sin 0.4 = 0.78),
    # so w⁻ = 0 and the loss is the positive term alone, Σ w⁺ d² / Σ w⁺
    pos_paper, neg_paper, pos_legacy, _ = osm_terms(alpha=0.5)
    assert neg_paper == 0.0
    got = float(make_osm(alpha=0.5).loss(ContrastiveLoss(0.5), tensor(F), torch.tensor(LABELS)))
    assert got == pytest.approx(pos_paper, abs=1e-9)
    assert got != pytest.approx(pos_legacy, abs=1e-3)  # the legacy −s term: d²/2 − 1 on the sphere


def test_osm_caa_negative_term_is_the_posters_squared_hinge_not_the_legacy_one():
    # margin m = 0.28 -> α = √(2 − 2m) = 1.2 (alpha unset). The negative pairs are 1.3, 2.2, 0.8 and 1.7 rad
    # apart, d = 2 sin(gap / 2) = 1.21, 1.78, 0.78, 1.51: the pair at d = 0.78 is inside the hinge, where the paper
    # term is max(0, α − d)² = 0.18 and the legacy [s − m]_+ = ½[α² − d²]_+ = 0.42
    m = 0.28
    alpha = math.sqrt(2 - 2 * m)
    assert alpha == pytest.approx(1.2)
    pos_paper, neg_paper, pos_legacy, neg_legacy = osm_terms(alpha, margin=m)
    assert neg_paper > 0 and neg_legacy > 0
    paper = float(make_osm().loss(ContrastiveLoss(m), tensor(F), torch.tensor(LABELS)))
    legacy = float(make_osm(form="legacy").loss(ContrastiveLoss(m), tensor(F), torch.tensor(LABELS)))
    assert paper == pytest.approx(pos_paper + neg_paper, abs=1e-9)
    assert legacy == pytest.approx(pos_legacy + neg_legacy, abs=1e-9)
    assert abs(paper - legacy) > 0.1
    # the negative term alone (distinct from the legacy one): drop the positives' share
    assert paper - pos_paper == pytest.approx(neg_paper, abs=1e-9)
    assert neg_paper != pytest.approx(neg_legacy, abs=1e-3)


def test_osm_caa_is_the_default_form_of_the_add_on():
    from asymsearch.training.addons import AddOnOptions, TrainingAddOns

    addons = TrainingAddOns(AddOnOptions(osm_caa=True), dim=2, num_classes=2)
    assert addons.osm.form == "paper"
    with pytest.raises(UserError, match="paper or legacy"):
        AddOnOptions(osm_caa=True, osm_form="poster").check()


# ---------------------------------------------------------------------------------------------------- RKD


def rkd_terms(student, teacher, reference=None, teacher_reference=None):
    """Per-anchor sums of the slide's ℓ_RKD (−sim read as Huber), mean over anchors; and RKD's legacy means.
    reference: r(x) (default: the student itself, symmetric); teacher_reference: g(x) (default: teacher)."""
    ref = reference or student
    tref = teacher_reference or teacher
    n = len(student)
    pool = [[x for x in range(len(ref)) if x != a] for a in range(n)]
    dist_sum = sum(huber(dist(student[a], ref[x]) - dist(teacher[a], tref[x])) for a in range(n) for x in pool[a])
    angle_sum = sum(huber(cosine(minus(student[a], ref[x]), minus(student[a], ref[y]))
                          - cosine(minus(teacher[a], tref[x]), minus(teacher[a], tref[y])))
                    for a in range(n) for x in pool[a] for y in pool[a] if x != y)
    pairs = [(a, x) for a in range(n) for x in pool[a]]
    mu_s = sum(dist(student[a], ref[x]) for a, x in pairs) / len(pairs)
    mu_t = sum(dist(teacher[a], tref[x]) for a, x in pairs) / len(pairs)
    legacy_dist = sum(huber(dist(student[a], ref[x]) / mu_s - dist(teacher[a], tref[x]) / mu_t)
                      for a, x in pairs) / len(pairs)
    triples = sum(len(p) * (len(p) - 1) for p in pool)
    return dist_sum / n, angle_sum / n, legacy_dist, angle_sum / triples


def test_rkd_distance_and_angle_terms_are_the_slide_sums():
    # symmetric: student F against itself, teacher G of the same images; the teacher is scaled by 0.6 so that
    # raw distances differ from mean-normalised ones (a unit-norm teacher is what the trainer gives; the
    # equation holds for any vectors)
    g = [[0.6 * u for u in v] for v in G]
    dist_term, angle_term, legacy_dist, legacy_angle = rkd_terms(F, g)
    f, y, t = tensor(F), torch.tensor(LABELS), tensor(g)
    got_d = float(RKDLoss(1.0, 0.0)(f, y, teacher_anchors=t))
    got_a = float(RKDLoss(0.0, 1.0)(f, y, teacher_anchors=t))
    assert got_d == pytest.approx(dist_term, abs=1e-9)
    assert got_a == pytest.approx(angle_term, abs=1e-9)
    assert float(RKDLoss()(f, y, teacher_anchors=t)) == pytest.approx(dist_term + 2 * angle_term, abs=1e-9)
    # the legacy form (means; distances over their mean) gives other values, and the default is not it
    legacy = RKDLoss(1.0, 0.0, form="legacy")
    assert float(legacy(f, y, teacher_anchors=t)) == pytest.approx(legacy_dist, abs=1e-9)
    assert float(RKDLoss(0.0, 1.0, form="legacy")(f, y, teacher_anchors=t)) == pytest.approx(legacy_angle,
                                                                                            abs=1e-9)
    assert abs(got_d - legacy_dist) > 1e-2 and abs(got_a - legacy_angle) > 1e-2


def test_rkd_asymmetric_compares_student_anchors_with_teacher_items():
    # asymmetric: ψ(f(a), g(x)) against ψ(g(a), g(x)); reference = g of the images, g(a) at row a
    dist_term, angle_term, _, _ = rkd_terms(F, G, reference=G, teacher_reference=G)
    got = float(RKDLoss(1.0, 2.0)(tensor(F), torch.tensor(LABELS), None, tensor(G), torch.tensor(LABELS),
                                  self_idx=torch.arange(4)))
    assert got == pytest.approx(dist_term + 2 * angle_term, abs=1e-9)


def test_rkd_huber_linear_branch_is_used_where_the_gap_exceeds_one():
    # two anchors far apart in the student (d = 2) and together in the teacher (d = 0.2): h(1.8) = 1.3
    student, teacher = [[1.0, 0.0], [-1.0, 0.0]], [[1.0, 0.0], [math.cos(0.2), math.sin(0.2)]]
    d_t = 2 * math.sin(0.1)
    want = huber(2.0 - d_t)  # per anchor one pair, both anchors the same: mean = the value
    assert 2.0 - d_t > 1
    got = float(RKDLoss(1.0, 0.0)(tensor(student), torch.tensor([0, 1]), teacher_anchors=tensor(teacher)))
    assert got == pytest.approx(want, abs=1e-9)


# ----------------------------------------------------------------------------------------------- DarkRank


def darkrank_value(student, teacher, scale):
    """−Σ_{x ∈ U(a)} (σ s(a, x) − log Σ_{y ∈ V(a, x)} e^{σ s(a, y)}), V(a, x) = the items the teacher ranks at or
    after x; mean over anchors (σ = 1 is the slide's equation)."""
    total = 0.0
    n = len(student)
    for a in range(n):
        pool = [x for x in range(n) if x != a]
        ranked = sorted(pool, key=lambda x: -dot(teacher[a], teacher[x]))
        for i, x in enumerate(ranked):
            total -= scale * dot(student[a], student[x]) - math.log(
                sum(math.exp(scale * dot(student[a], student[y])) for y in ranked[i:]))
    return total / n


def test_darkrank_is_the_slide_equation_without_a_scale():
    want = darkrank_value(F, G, 1.0)
    legacy = darkrank_value(F, G, 10.0)
    f, y, t = tensor(F), torch.tensor(LABELS), tensor(G)
    got = float(DarkRankLoss()(f, y, teacher_anchors=t))
    assert got == pytest.approx(want, abs=1e-9)
    assert float(DarkRankLoss(form="legacy")(f, y, teacher_anchors=t)) == pytest.approx(legacy, abs=1e-9)
    assert abs(got - legacy) > 0.1
    # the registry builds the paper form from a default student config
    from asymsearch.training.config import StudentConfig
    loss = create_loss("darkrank", StudentConfig(data="d", teacher="t", out="o"))
    assert loss.scale == 1.0 and loss.form == "paper"
    assert create_loss("rkd", StudentConfig(data="d", teacher="t", out="o")).form == "paper"


def test_loss_forms_refuse_unknown_names():
    with pytest.raises(UserError, match="paper, legacy"):
        RKDLoss(form="huber")
    with pytest.raises(UserError, match="paper, legacy"):
        DarkRankLoss(form="sigma")


# ----------------------------------------------------------------------------------------- ArcFace, CosFace

X = [[math.cos(0.3), math.sin(0.3)], [math.cos(2.0), math.sin(2.0)]]  # two embeddings
Y = [0, 2]
W = [[2.0, 0.0], [0.0, 0.5], [-1.0, 1.0]]  # three class weights (not unit: the loss normalises them)
W_ANGLES = [0.0, math.pi / 2, 3 * math.pi / 4]


def margin_softmax(target_logit, s):
    total = 0.0
    for x, y in zip([0.3, 2.0], Y):
        thetas = [abs(x - w) for w in W_ANGLES]  # angle between embedding and class weight j
        logits = [s * (target_logit(t) if j == y else math.cos(t)) for j, t in enumerate(thetas)]
        total -= logits[y] - math.log(sum(math.exp(v) for v in logits))
    return total / len(Y)


def set_weights(loss):
    with torch.no_grad():
        loss.weight.copy_(tensor(W))
    return loss


def test_arcface_is_equation_3():
    # L = −1/N Σ log(e^{s cos(θ_y + m)} / (e^{s cos(θ_y + m)} + Σ_{j≠y} e^{s cos θ_j})), s = 4, m = 0.5
    s, m = 4.0, 0.5
    want = margin_softmax(lambda t: math.cos(t + m), s)
    got = float(set_weights(ArcFaceLoss(3, 2, scale=s, margin=m).double())(tensor(X), torch.tensor(Y)).detach())
    assert got == pytest.approx(want, abs=1e-10)
    assert got > margin_softmax(math.cos, s)  # the margin makes the loss larger than plain normalised softmax


def test_cosface_is_equation_4():
    # L = −1/N Σ log(e^{s (cos θ_y − m)} / (e^{s (cos θ_y − m)} + Σ_{j≠y} e^{s cos θ_j})), s = 4, m = 0.35
    s, m = 4.0, 0.35
    want = margin_softmax(lambda t: math.cos(t) - m, s)
    got = float(set_weights(CosFaceLoss(3, 2, scale=s, margin=m).double())(tensor(X), torch.tensor(Y)).detach())
    assert got == pytest.approx(want, abs=1e-10)


def test_margin_losses_learn_their_class_weights_beside_the_model():
    from asymsearch.training.config import TeacherConfig
    from asymsearch.training.registry import loss_parameter_groups

    cfg = TeacherConfig(data="d", out="o", arcface_scale=30.0, arcface_margin=0.3, cosface_margin=0.2)
    arc = create_loss("arcface", cfg, role="teacher", num_classes=5, dim=8)
    cos = create_loss("cosface", cfg, role="teacher", num_classes=5, dim=8)
    assert (arc.scale, arc.margin, arc.weight.shape) == (30.0, 0.3, (5, 8))
    assert (cos.scale, cos.margin) == (64.0, 0.2)
    groups = loss_parameter_groups("arcface", arc, cfg)
    assert groups[0]["params"][0] is arc.weight and groups[0]["lr"] == cfg.proxy_lr
    x = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    x.requires_grad_(True)
    arc(x, torch.tensor([0, 1, 2, 3, 4, 0])).backward()
    assert x.grad.abs().sum() > 0 and arc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls,kw,match", [
    (ArcFaceLoss, {"margin": 0.0}, r"\(0, π/2\)"), (ArcFaceLoss, {"margin": math.pi / 2}, r"\(0, π/2\)"),
    (ArcFaceLoss, {"margin": 2.0}, r"\(0, π/2\)"), (ArcFaceLoss, {"scale": 0.0}, "positive"),
    (CosFaceLoss, {"margin": 1.0}, r"\[0, 1\)"), (CosFaceLoss, {"margin": -0.1}, r"\[0, 1\)"),
    (CosFaceLoss, {"scale": -2.0}, "positive")])
def test_margin_losses_refuse_bad_hyper_parameters_in_one_line(cls, kw, match):
    with pytest.raises(UserError, match=match) as e:
        cls(4, 3, **kw)
    assert "\n" not in str(e.value)


def test_train_teacher_refuses_a_bad_arcface_margin_before_training(image_folder, tmp_path, capsys):
    from asymsearch.cli.main import main

    out = tmp_path / "t.pt"
    assert main(["train", "teacher", "--data", str(image_folder), "--out", str(out), "--loss", "arcface",
                 "--arcface-margin", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(0, π/2)" in err[0]
    assert not out.exists()
