"""The paper forms of GLAM (Song, Han & Avrithis, WACV 2022) and DIABLO (Jacob et al. 2020), tested from the papers'
equations: every expected value here is computed with plain Python loops over tiny explicit tensors whose weights
are set to known values (nothing is shared with the implementation), and for each head one case shows the
project's earlier form (glam form=gate, diablo form=light; the defaults are the paper forms) giving a different
answer on the same input, so that these tests fail on it. Plus: where the paper-form DIABLO cuts each backbone,
parameters, ONNX export, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from asymsearch.core.errors import UserError
from asymsearch.training.models import build_model, create_head


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def set_weights(module: nn.Module, seed: int) -> None:
    """Known, non-trivial values: N(0, 0.6²) drawn from a fixed seed (fusion logits included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=torch.float64).float())


def fmap(x: torch.Tensor) -> list[list[list[float]]]:
    """(c,h,w) tensor -> nested lists [c][y][x] of floats."""
    return x.double().tolist()


def conv1d_same(taps: list[float], v: list[float]) -> list[float]:
    k = len(taps)
    return [sum(taps[t] * v[i + t - k // 2] for t in range(k) if 0 <= i + t - k // 2 < len(v)) for i in range(len(v))]


def conv1x1(conv: nn.Conv2d, f: list) -> list:
    w, b = conv.weight.double()[:, :, 0, 0].tolist(), conv.bias.double().tolist()
    h, wd = len(f[0]), len(f[0][0])
    return [[[sum(w[o][c] * f[c][y][x] for c in range(len(f))) + b[o] for x in range(wd)] for y in range(h)]
            for o in range(len(w))]


def conv3x3_dilated(conv: nn.Conv2d, f: list, d: int) -> list:
    w, b = conv.weight.double().tolist(), conv.bias.double().tolist()
    h, wd = len(f[0]), len(f[0][0])
    out = []
    for o in range(len(w)):
        plane = []
        for y in range(h):
            row = []
            for x in range(wd):
                s = b[o]
                for c in range(len(f)):
                    for i in range(3):
                        for j in range(3):
                            yy, xx = y + d * (i - 1), x + d * (j - 1)
                            if 0 <= yy < h and 0 <= xx < wd:
                                s += w[o][c][i][j] * f[c][yy][xx]
                row.append(s)
            plane.append(row)
        out.append(plane)
    return out


def positions(f: list) -> list[tuple[int, int]]:
    return [(y, x) for y in range(len(f[0])) for x in range(len(f[0][0]))]


# ---------------------------------------------------------------------------------------------------- GLAM


def paper_local_stream(head, f: list) -> list:
    """F^l_c = F ⊙ σ(conv1d(GAP F)) + F;  A^l_s = σ(W_s [R; D1 R; D3 R; D5 R]), R = W_r F^l_c;  F^l = F^l_c ⊙ A^l_s + F^l_c."""
    c, pos = len(f), positions(f)
    gap = [sum(f[i][y][x] for y, x in pos) / len(pos) for i in range(c)]
    a_c = [sigmoid(v) for v in conv1d_same(head.lc_conv.weight.double().flatten().tolist(), gap)]
    f_c = [[[f[i][y][x] * a_c[i] + f[i][y][x] for x in range(len(f[0][0]))] for y in range(len(f[0]))]
           for i in range(c)]
    r = conv1x1(head.ls_reduce, f_c)  # on the channel-attended map
    cat = r + sum((conv3x3_dilated(conv, r, d) for conv, d in zip(head.ls_dilated, (1, 3, 5))), [])
    a_s = conv1x1(head.ls_out, cat)[0]
    return [[[f_c[i][y][x] * sigmoid(a_s[y][x]) + f_c[i][y][x] for x in range(len(f[0][0]))]
             for y in range(len(f[0]))] for i in range(c)]


def paper_global_stream(head, f: list) -> list:
    """Q_c, K_c = σ(conv1d(GAP F)); A^g_c = softmax(K_cᵀ Q_c) (c×c, over i); G_c = V_c A^g_c; F^g_c = F ⊙ G_c + F;
    Q_s, K_s, V_s = 1x1 convs of F^g_c; A^g_s = softmax(K_sᵀ Q_s) (hw×hw, over u); G_s = W_o(V_s A^g_s);
    F^g = F^g_c ⊙ G_s + F^g_c."""
    c, pos = len(f), positions(f)
    gap = [sum(f[i][y][x] for y, x in pos) / len(pos) for i in range(c)]
    q = [sigmoid(v) for v in conv1d_same(head.gc_q.weight.double().flatten().tolist(), gap)]
    k = [sigmoid(v) for v in conv1d_same(head.gc_k.weight.double().flatten().tolist(), gap)]
    a_c = [[0.0] * c for _ in range(c)]  # a_c[i][j]
    for j in range(c):
        z = sum(math.exp(k[i] * q[j]) for i in range(c))
        for i in range(c):
            a_c[i][j] = math.exp(k[i] * q[j]) / z
    f_c = [[[0.0] * len(f[0][0]) for _ in f[0]] for _ in range(c)]
    for j in range(c):
        for y, x in pos:
            g = sum(f[i][y][x] * a_c[i][j] for i in range(c))  # (V_c A^g_c)[u, j]
            f_c[j][y][x] = f[j][y][x] * g + f[j][y][x]
    qs, ks, vs = conv1x1(head.gs_q, f_c), conv1x1(head.gs_k, f_c), conv1x1(head.gs_v, f_c)
    cr = len(qs)
    logits = [[sum(ks[t][u[0]][u[1]] * qs[t][v[0]][v[1]] for t in range(cr)) for v in pos] for u in pos]  # [u][v]
    a_s = [[0.0] * len(pos) for _ in pos]
    for vi in range(len(pos)):
        z = sum(math.exp(logits[ui][vi]) for ui in range(len(pos)))
        for ui in range(len(pos)):
            a_s[ui][vi] = math.exp(logits[ui][vi]) / z  # softmax over u: each column sums to 1
    va = [[[0.0] * len(f[0][0]) for _ in f[0]] for _ in range(cr)]
    for t in range(cr):
        for vi, (y, x) in enumerate(pos):
            va[t][y][x] = sum(vs[t][u[0]][u[1]] * a_s[ui][vi] for ui, u in enumerate(pos))
    g_s = conv1x1(head.gs_out, va)
    return [[[f_c[i][y][x] * g_s[i][y][x] + f_c[i][y][x] for x in range(len(f[0][0]))] for y in range(len(f[0]))]
            for i in range(c)]


def paper_glam_descriptor(head, f: list) -> list[float]:
    """F^gl = w F + w_l F^l + w_g F^g (softmax weights), GeM with p, W· + b, L2."""
    streams = [f] + ([paper_local_stream(head, f)] if head.use_local else []) \
        + ([paper_global_stream(head, f)] if head.use_global else [])
    logits = head.fusion.double().tolist()
    wts = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
    pos, p = positions(f), float(head.pool.p)
    pooled = [(sum(max(sum(w * s[i][y][x] for w, s in zip(wts, streams)), 1e-6) ** p for y, x in pos) / len(pos))
              ** (1 / p) for i in range(len(f))]
    w, b = head.proj.weight.double().tolist(), head.proj.bias.double().tolist()
    e = [sum(w[o][i] * pooled[i] for i in range(len(pooled))) + b[o] for o in range(len(w))]
    n = math.sqrt(sum(v * v for v in e))
    return [v / n for v in e]


@pytest.fixture
def glam_pair():
    """(paper form, gate form) with the same known weights, and a 3-channel 2x3 map."""
    paper = create_head("glam:form=paper,reduction=3", 3, 4).eval()
    gate = create_head("glam:form=gate,reduction=3", 3, 4).eval()
    set_weights(paper, 7)
    gate.load_state_dict(paper.state_dict())  # same parameter names: the forms differ only in their equations
    x = torch.tensor([[[0.2, 1.0, 0.5], [0.9, 0.1, 0.4]],
                      [[0.7, 0.3, 0.8], [0.0, 0.6, 1.2]],
                      [[1.1, 0.5, 0.2], [0.3, 0.9, 0.6]]])
    return paper, gate, x


def test_glam_paper_global_spatial_attention_is_hw_by_hw_on_the_channel_attended_map(glam_pair):
    paper, gate, x = glam_pair
    want = paper_global_stream(paper, fmap(x))
    with torch.no_grad():
        got = paper.global_stream(x[None])[0].double().tolist()
        old = gate.global_attention(x[None])[0].double().tolist()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.array(old) - np.array(want)).max() > 1e-2  # the gate form: attention on F, σ gate, F + G_c


def test_glam_paper_local_spatial_attention_reads_the_channel_attended_map(glam_pair):
    paper, gate, x = glam_pair
    want = paper_local_stream(paper, fmap(x))
    with torch.no_grad():
        got = paper.local_stream(x[None])[0].double().tolist()
        old = gate.local_attention(x[None])[0].double().tolist()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.array(old) - np.array(want)).max() > 1e-3  # the gate form's spatial attention reads F


@pytest.mark.parametrize("options", ["", ",local=false", ",global=false"])
def test_glam_paper_descriptor_and_its_ablations(options):
    head = create_head(f"glam:form=paper,reduction=3{options}", 3, 4).eval()
    set_weights(head, 11)
    with torch.no_grad():
        head.pool.p.fill_(2.0)
    x = torch.rand(2, 3, 2, 3, generator=torch.Generator().manual_seed(3)) + 0.05
    with torch.no_grad():
        got = head(x).double().tolist()
    for n in range(2):
        np.testing.assert_allclose(got[n], paper_glam_descriptor(head, fmap(x[n])), rtol=1e-5, atol=1e-5)


def test_glam_paper_gradients_and_any_size():
    head = create_head("glam:form=paper,channels=8", 6, 8).train()
    for h, w in [(1, 1), (3, 5), (7, 7)]:
        out = head(torch.rand(2, 6, h, w))
        assert out.shape == (2, 8) and torch.isfinite(out).all()
    (head(torch.rand(2, 6, 4, 4)) * torch.randn(2, 8)).sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# -------------------------------------------------------------------------------------------------- DIABLO


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))


def diablo_head(select: str, attention: str, words: int = 2):
    """A paper-form head on a 3-channel map with explicit stages: φ = 1x1 conv 3→2, ψ = 1x1 conv 3→2 + ReLU."""
    from asymsearch.training.diablo import BackboneStages, DIABLOPaperHead

    phi, psi = nn.Conv2d(3, 2, 1), nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
    head = DIABLOPaperHead(3, 2 * words, BackboneStages(phi, psi, 2, 2), words=words, select=select,
                           attention=attention, alpha=2.0).eval()
    set_weights(head, 5)
    return head


def diablo_attention(head, f: list) -> dict:
    """Eq. 5-7 (feature-wise: one weight per entry n and position u) or eq. 10-11 (dimension-wise: per n, k, u):
    A^(n) = exp(α s_n) / Σ_l exp(α s_l), s = cos(φ(f_u), d)."""
    phi = conv1x1(head.phi, f)
    d = head.dictionary.double().tolist()
    kdim = len(d[0]) if head.select == "dimension" else 1
    out = {}
    for u in positions(f):
        pv = [phi[t][u[0]][u[1]] for t in range(len(phi))]
        for k in range(kdim):
            s = [cos(pv, d[n][k] if head.select == "dimension" else d[n]) for n in range(head.words)]
            z = sum(math.exp(head.alpha * v) for v in s)
            for n in range(head.words):
                out[(n, k, u)] = math.exp(head.alpha * s[n]) / z
    return out


def psi_explicit(head, f: list) -> list:
    return [[[max(v, 0.0) for v in row] for row in plane] for plane in conv1x1(head.psi[0], f)]


def diablo_descriptor(head, f: list) -> list[float]:
    """Pre (eq. 3-4): H^(n) = ψ(A^(n) ⊙ F); post (eq. 1-2): H^(n) = A^(n) ⊙ ψ(F); e_n = L2(W_n GAP(H^(n)) + b_n),
    e = [e_1; ...; e_N] / √N."""
    att, pos = diablo_attention(head, f), positions(f)
    feature = head.select == "feature"
    out = []
    for n in range(head.words):
        if head.attention == "pre":
            g = [[[att[(n, 0 if feature else k, (y, x))] * f[k][y][x] for x in range(len(f[0][0]))]
                  for y in range(len(f[0]))] for k in range(len(f))]
            hmap = psi_explicit(head, g)
        else:
            g = psi_explicit(head, f)
            hmap = [[[att[(n, 0 if feature else k, (y, x))] * g[k][y][x] for x in range(len(f[0][0]))]
                     for y in range(len(f[0]))] for k in range(len(g))]
        pooled = [sum(plane[y][x] for y, x in pos) / len(pos) for plane in hmap]
        w, b = head.embed_w[n].double().tolist(), head.embed_b[n].double().tolist()
        e = [sum(pooled[j] * w[j][o] for j in range(len(pooled))) + b[o] for o in range(len(b))]
        norm = math.sqrt(sum(v * v for v in e))
        out += [v / norm / math.sqrt(head.words) for v in e]
    return out


X3 = torch.tensor([[[0.5, 1.0], [0.2, 0.8]], [[0.9, 0.1], [0.7, 0.3]], [[0.4, 0.6], [1.1, 0.0]]])


@pytest.mark.parametrize("select", ["feature", "dimension"])
def test_diablo_selection_weights_follow_equations_5_to_7_and_10_to_11(select):
    head = diablo_head(select, "pre")
    want = diablo_attention(head, fmap(X3))
    with torch.no_grad():
        got = head.attention_maps(X3[None])[0]  # (N, k, hw)
    assert got.shape == ((2, 3, 4) if select == "dimension" else (2, 1, 4))
    for (n, k, (y, x)), a in want.items():
        assert float(got[n, k, y * 2 + x]) == pytest.approx(a, abs=1e-6)
    assert torch.allclose(got.sum(dim=0), torch.ones(got.shape[1:]))  # a soft assignment over the N entries


@pytest.mark.parametrize("select", ["feature", "dimension"])
@pytest.mark.parametrize("attention", ["pre", "post"])
def test_diablo_paper_descriptor_follows_equations_1_to_13(select, attention):
    head = diablo_head(select, attention)
    with torch.no_grad():
        got = head(X3[None])[0].double().tolist()
    np.testing.assert_allclose(got, diablo_descriptor(head, fmap(X3)), rtol=1e-5, atol=1e-6)


def save_tiny(tmp_path, seed: int = 0) -> str:
    from asymsearch.training.backbones import TinyCNN
    torch.manual_seed(seed)
    net = TinyCNN(16)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so the copies are seen to carry them
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "tiny.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_diablo_paper_attends_on_the_mid_level_map_and_its_stages_are_the_backbones(tmp_path):
    """Tiny CNN (4 stages, output stride 16): F is the map after stage 3's strided conv (64 channels, stride 8),
    φ a copy of stage 3's second conv, ψ the backbone's own units after F. With N = 1 (the paper's baseline)
    the descriptor is L2(W GAP(backbone(x)) + b) of the uncut backbone -- so ψ is exactly the rest of it. The light
    form reads the final map instead (128 channels, stride 16)."""
    from asymsearch.training.backbones import TinyCNN

    weights = save_tiny(tmp_path)
    full = TinyCNN(16)
    full.load_state_dict(torch.load(weights))
    full.eval()
    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    base = build_model({"backbone": "tiny_cnn_narrow", "head": "diablo:form=paper,words=1", "dim": 8,
                        "pretrained": weights}).eval()
    with torch.no_grad():
        assert base.backbone(x).shape == (2, 64, 6, 5)
        pooled = full(x).mean(dim=(-2, -1))
        want = torch.nn.functional.normalize(pooled @ base.head.embed_w[0] + base.head.embed_b[0], dim=1)
        assert torch.allclose(base(x), want, atol=1e-5)
    model = build_model({"backbone": "tiny_cnn_narrow", "head": "diablo:form=paper", "dim": 8,
                         "pretrained": weights})
    assert model.head.phi[0].weight.data_ptr() != model.head.psi[0].weight.data_ptr()  # a copy, trained apart
    assert torch.equal(model.head.phi[0].weight, full[15].weight)  # ... from the backbone's weights
    assert torch.equal(model.head.psi[-3].weight, full[21].weight)
    model.train()
    assert not model.head.psi[1].training and model.backbone.training  # ψ's batch norms keep their statistics
    light = build_model({"backbone": "tiny_cnn_narrow", "head": "diablo:form=light", "dim": 8,
                         "pretrained": weights})
    assert light.backbone(x).shape == (2, 128, 3, 3)


@pytest.mark.parametrize("name,pre,post", [("efficientnet_lite0", (80, 112, 14), (192, 320, 7)),
                                           ("efficientnet_lite2", (88, 120, 14), (208, 352, 7))])
def test_lite_split_points(name, pre, post):
    """Pre-attention: F ends with the block that enters stride 16 (F, φ(F) at 14x14 for 224 px), ψ ends at the
    1280-channel head conv; post-attention: F enters stride 32, φ(F) and ψ(F) at 7x7."""
    from asymsearch.training.backbones import backbone_units, mid_level_split
    from asymsearch.training.models import create_backbone

    net, _ = create_backbone(name)
    units = backbone_units(net.eval())
    x = torch.zeros(1, 3, 224, 224)
    for attention, (c, m, size) in (("pre", pre), ("post", post)):
        split, phi_end = mid_level_split(name, attention)
        with torch.no_grad():
            f = nn.Sequential(*units[:split])(x)
            phi = nn.Sequential(*units[split:phi_end])(f)
            psi = nn.Sequential(*units[split:])(f)
        assert f.shape[1] == c and phi.shape[1:] == (m, size, size) and psi.shape[1:] == (1280, 7, 7)
        assert f.shape[2] == (14 if attention == "pre" else 7)


def test_diablo_paper_parameters():
    """Counted from the architecture: dimension-wise pre-attention on Lite0 adds the dictionary N×c×m = 8×80×112,
    φ (a copy of blocks 7-11) and the N embeddings 1280→dim/N; ψ is the backbone's own units."""
    from asymsearch.training.backbones import backbone_units
    from asymsearch.training.models import create_backbone

    model = build_model({"backbone": "efficientnet_lite0", "head": "diablo:form=paper", "dim": 512,
                         "pretrained": None})
    net, _ = create_backbone("efficientnet_lite0")
    units = backbone_units(net)
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    assert model.head.dictionary.shape == (8, 80, 112)
    assert sum(p.numel() for p in model.parameters()) == (count(units) + count(units[7:12]) + 8 * 80 * 112
                                                          + 1280 * 512 + 512)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_before_any_weights_load():
    with pytest.raises(UserError, match="known split point: one of efficientnet_lite0, .*tiny_cnn_narrow, not "
                                        "resnet18"):
        build_model({"backbone": "resnet18", "head": "diablo:form=paper", "dim": 8, "pretrained": "/no/such.pth"})
    with pytest.raises(UserError, match="words=3 must divide --dim 8"):
        build_model({"backbone": "tiny_cnn", "head": "diablo:form=paper,words=3", "dim": 8,
                     "pretrained": "/no/such.pth"})
    with pytest.raises(UserError, match="form must be paper .* or light"):
        create_head("diablo:form=heavy", 16, 8)
    with pytest.raises(UserError, match="form must be paper .* or gate"):
        create_head("glam:form=other", 16, 8)
    with pytest.raises(UserError, match="does not take option.*m"):
        build_model({"backbone": "tiny_cnn", "head": "diablo:form=paper,m=4", "dim": 8, "pretrained": None})
    with pytest.raises(UserError, match="build it with its backbone"):
        create_head("diablo:form=paper", 16, 8)
    from asymsearch.training.trunk import TailNet
    model = build_model({"backbone": "tiny_cnn_narrow", "head": "diablo:form=paper", "dim": 8, "pretrained": None})
    with pytest.raises(UserError, match="without --tune-units"):
        TailNet(model, 2)


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("spec", ["diablo:form=paper", "diablo:form=paper,select=feature,attention=post",
                                  "glam:form=paper"])
def test_paper_forms_export_and_verify(spec, tmp_path):
    from asymsearch.export.onnx_export import _export_onnx, max_abs_difference

    torch.manual_seed(0)
    model = build_model({"backbone": "tiny_cnn_narrow", "head": spec, "dim": 8, "pretrained": None}).eval()
    path = tmp_path / "m.onnx"
    _export_onnx(model, path, 48, 17)
    assert max_abs_difference(model, path, 48, samples=2) < 1e-4
    assert max_abs_difference(model, path, 64, samples=1) < 1e-4  # dynamic spatial axes
