"""Pooling heads: each against a direct, unvectorised computation of its equations on a tiny input -- the defaults
`glam` and `diablo` against their papers' equations (Song, Han & Avrithis, "All the attention you need: global-local,
spatial-channel attention for image retrieval", WACV 2022; Jacob, Picard, Histace & Klein, "DIABLO: Dictionary-based
attention block for deep metric learning", Pattern Recognition Letters 2020), the earlier forms under their explicit
`form=gate` / `form=light`; the registry contract (shape, unit norm, finite, every parameter gets a gradient, any
input size, ONNX with dynamic batch and spatial axes matching onnxruntime) over every registered head; checkpoints
that recorded a plain `glam` / `diablo` before the paper forms became the defaults load as the form they were
trained as; bad options fail with one clear line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asymsearch.core.errors import UserError
from asymsearch.training.models import HEADS, build_model, create_head, feature_channels, parse_head_spec

C = 6  # channels of the contract tests' feature maps
BACKBONE = "tiny_cnn_narrow"  # for a head that holds the backbone's later units (DIABLO's paper form)


def dim_for(spec: str, channels: int = C) -> int:
    return channels if parse_head_spec(spec)[0] == "gap" else 8


def holds_backbone_units(spec: str) -> bool:
    base, options = parse_head_spec(spec)
    adopt = getattr(HEADS[base], "adopt_backbone", None)
    return adopt is not None and adopt(BACKBONE, None, dim_for(spec), **options) is not None


def contract_head(spec: str) -> tuple[torch.nn.Module, int]:
    """(head, the channels of the map it reads): a head on a C-channel map, or one that holds the backbone's later
    units with the map of the trunk `build_model` cut for it."""
    if not holds_backbone_units(spec):
        return create_head(spec, C, dim_for(spec)), C
    model = build_model({"backbone": BACKBONE, "head": spec, "dim": dim_for(spec), "pretrained": None})
    return model.head, feature_channels(model.backbone)


# every registered head (the defaults: glam and diablo in their papers' forms), plus the variants the seeds ablate
# and the earlier forms
CONTRACT_SPECS = sorted(HEADS) + ["glam:local=false", "glam:global=false", "glam:channels=4", "glam:form=gate",
                                  "glam:form=gate,local=false", "glam:form=gate,channels=4", "glap:scale=1,heads=2",
                                  "diablo:select=feature,attention=post", "diablo:words=1",
                                  "diablo:form=light", "diablo:form=light,select=feature,attention=post",
                                  "diablo:form=light,select=dimension,attention=post",
                                  "diablo:form=light,select=feature,attention=pre", "diablo:form=light,channels=4"]


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def softmax(vals: list[float]) -> list[float]:
    mx = max(vals)
    ex = [math.exp(v - mx) for v in vals]
    return [e / sum(ex) for e in ex]


def l2(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def conv1x1(weight: torch.Tensor, bias: torch.Tensor | None, fmap: dict) -> dict:
    """fmap: {(c, y, x): value} with channels 0..Cin-1 -> {(o, y, x): Σ_c W[o,c] f[c,y,x] + b[o]}."""
    w = weight.detach().double()
    cout, cin = w.shape[:2]
    pos = {(y, x) for (_, y, x) in fmap}
    return {(o, y, x): sum(float(w[o, c, 0, 0]) * fmap[(c, y, x)] for c in range(cin))
            + (float(bias.detach()[o]) if bias is not None else 0.0) for o in range(cout) for (y, x) in pos}


def conv3x3(weight, bias, fmap: dict, h: int, w: int, dilation: int = 1) -> dict:
    wt = weight.detach().double()
    cout, cin = wt.shape[:2]
    out = {}
    for o in range(cout):
        for y in range(h):
            for x in range(w):
                s = float(bias.detach()[o]) if bias is not None else 0.0
                for c in range(cin):
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            yy, xx = y + dilation * dy, x + dilation * dx
                            if 0 <= yy < h and 0 <= xx < w:
                                s += float(wt[o, c, dy + 1, dx + 1]) * fmap[(c, yy, xx)]
                out[(o, y, x)] = s
    return out


def conv1d_same(weight, values: list[float]) -> list[float]:
    taps = weight.detach().double().flatten().tolist()
    k = len(taps)
    return [sum(taps[t] * values[i + t - k // 2] for t in range(k) if 0 <= i + t - k // 2 < len(values))
            for i in range(len(values))]


def as_dict(x: torch.Tensor) -> dict:
    c, h, w = x.shape
    return {(i, y, z): float(x[i, y, z]) for i in range(c) for y in range(h) for z in range(w)}


def gem(values: list[float], p: float, eps: float = 1e-6) -> float:
    return (sum(max(v, eps) ** p for v in values) / len(values)) ** (1 / p)


def linear_l2(lin: torch.nn.Linear, v: list[float]) -> list[float]:
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    return l2([sum(float(w[o, i]) * v[i] for i in range(len(v))) + float(b[o]) for o in range(w.shape[0])])


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter (zero-initialised fusion weights would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("p"):
                p.fill_(2.5)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------------- GLAM


def glam_reference(head, x: torch.Tensor, form: str) -> list[float]:
    """The descriptor of `head` on one (c,h,w) map, in plain loops. form="paper": Song, Han & Avrithis 2022 --
    each stream channel attention, then spatial attention computed on the channel-attended map:
        F^l_c = F ⊙ σ(conv1d(GAP F)) + F,  A^l_s = σ(W_s [R; D_1 R; D_3 R; D_5 R]), R = W_r F^l_c,
        F^l = F^l_c ⊙ A^l_s + F^l_c;
        A^g_c[i, j] = softmax_i(k_i q_j), G_c[j] = Σ_i A^g_c[i, j] F[i],  F^g_c = F ⊙ G_c + F;
        A^g_s[u, v] = softmax_u(K_s[:, u] · Q_s[:, v]) with Q_s, K_s, V_s = W F^g_c,  G_s = W_o (V_s A^g_s),
        F^g = F^g_c ⊙ G_s + F^g_c.
    form="gate": this project's earlier form -- R = W_r F; A^g_c[i, j] = softmax_j(q_i k_j), F^g_c = F + G_c;
    Q, K, V = W F, A^g_s[u, v] = softmax_v(Q_u · K_v / √c'), F^g = F^g_c ⊙ σ(G_s) + F^g_c.
    Both: F^gl = softmax(w) · (F, F^l, F^g), GeM, Linear, L2."""
    paper = form == "paper"
    c, h, w = x.shape
    f = as_dict(x)
    pos = [(y, z) for y in range(h) for z in range(w)]
    gap = [sum(f[(i, y, z)] for y, z in pos) / len(pos) for i in range(c)]
    streams = [f]
    if head.use_local:
        a_c = [sig(v) for v in conv1d_same(head.lc_conv.weight, gap)]
        f_c = {(i, y, z): f[(i, y, z)] * a_c[i] + f[(i, y, z)] for (i, y, z) in f}
        r = conv1x1(head.ls_reduce.weight, head.ls_reduce.bias, f_c if paper else f)
        cr = head.ls_reduce.weight.shape[0]
        cat = dict(r)
        for j, (conv, d) in enumerate(zip(head.ls_dilated, (1, 3, 5))):
            for (o, y, z), v in conv3x3(conv.weight, conv.bias, r, h, w, d).items():
                cat[((j + 1) * cr + o, y, z)] = v
        a_s = {(y, z): sig(v) for (_, y, z), v in conv1x1(head.ls_out.weight, head.ls_out.bias, cat).items()}
        streams.append({(i, y, z): f_c[(i, y, z)] * a_s[(y, z)] + f_c[(i, y, z)] for (i, y, z) in f})
    if head.use_global:
        q = [sig(v) for v in conv1d_same(head.gc_q.weight, gap)]
        k = [sig(v) for v in conv1d_same(head.gc_k.weight, gap)]
        f_c = {}
        for j in range(c):  # output channel j
            if paper:
                a = softmax([k[i] * q[j] for i in range(c)])  # column j of softmax(K_cᵀ Q_c), over i
            else:
                a = softmax([q[j] * k[i] for i in range(c)])  # row j of softmax_j(q_i k_j)
            for y, z in pos:
                g = sum(a[i] * f[(i, y, z)] for i in range(c))
                f_c[(j, y, z)] = f[(j, y, z)] * g + f[(j, y, z)] if paper else f[(j, y, z)] + g
        src = f_c if paper else f
        qs, ks, vs = (conv1x1(m.weight, m.bias, src) for m in (head.gs_q, head.gs_k, head.gs_v))
        cr = head.gs_q.weight.shape[0]
        o = {}
        for v in pos:  # output position v
            if paper:
                a = softmax([sum(ks[(t, *u)] * qs[(t, *v)] for t in range(cr)) for u in pos])  # over u
            else:
                a = softmax([sum(qs[(t, *v)] * ks[(t, *u)] for t in range(cr)) / math.sqrt(cr) for u in pos])
            for t in range(cr):
                o[(t, *v)] = sum(a[n] * vs[(t, *u)] for n, u in enumerate(pos))
        g_s = conv1x1(head.gs_out.weight, head.gs_out.bias, o)
        streams.append({key: f_c[key] * (g_s[key] if paper else sig(g_s[key])) + f_c[key] for key in f})
    wts = softmax(head.fusion.detach().double().tolist())
    fused = {key: sum(wt * s[key] for wt, s in zip(wts, streams)) for key in f}
    p = float(head.pool.p.detach())
    pooled = [gem([fused[(i, y, z)] for y, z in pos], p) for i in range(c)]
    return linear_l2(head.proj, pooled)


@pytest.mark.parametrize("spec,form", [("glam", "paper"), ("glam:local=false", "paper"),
                                       ("glam:global=false", "paper"), ("glam:form=gate", "gate"),
                                       ("glam:form=gate,local=false", "gate"), ("glam:form=gate,global=false", "gate")])
def test_glam_matches_its_equations(spec, form):
    head = create_head(spec, 4, 3, reduction=2).eval()
    randomise(head, 0)
    x = torch.rand(2, 4, 2, 3) + 0.1
    got = head(x)
    for n in range(2):
        assert got[n].tolist() == pytest.approx(glam_reference(head, x[n], form), abs=1e-4)


def test_glam_default_is_the_papers_form_not_the_gate_form():
    from asymsearch.training.glam import GLAMPaperHead

    head = create_head("glam", 4, 3, reduction=2).eval()
    assert isinstance(head, GLAMPaperHead)
    assert not isinstance(create_head("glam:form=gate", 4, 3), GLAMPaperHead)
    randomise(head, 0)
    x = torch.rand(1, 4, 2, 3) + 0.1
    got, old = head(x)[0].tolist(), glam_reference(head, x[0], "gate")
    assert max(abs(a - b) for a, b in zip(got, old)) > 1e-2  # the two forms differ on this input


# ---------------------------------------------------------------------------------------------------- GLAP


def bilinear_up(f: dict, c: int, h: int, w: int, s: int) -> tuple[dict, int, int]:
    """align_corners=False: source coordinate (dst + 0.5)/s - 0.5, clamped at 0, edges replicated."""
    def taps(dst, size):
        src = max((dst + 0.5) / s - 0.5, 0.0)
        i0 = min(int(math.floor(src)), size - 1)
        i1 = min(i0 + 1, size - 1)
        return i0, i1, src - i0
    out = {}
    for i in range(c):
        for y in range(h * s):
            y0, y1, ly = taps(y, h)
            for z in range(w * s):
                x0, x1, lx = taps(z, w)
                out[(i, y, z)] = ((1 - ly) * ((1 - lx) * f[(i, y0, x0)] + lx * f[(i, y0, x1)])
                                  + ly * ((1 - lx) * f[(i, y1, x0)] + lx * f[(i, y1, x1)]))
    return out, h * s, w * s


def glap_reference(head, x: torch.Tensor) -> list[float]:
    c, h, w = x.shape
    p, dim, heads, s = float(head.p.detach()), head.value.weight.shape[0], head.heads, head.scale
    z = conv1x1(head.value.weight, head.value.bias, as_dict(x))
    a = conv3x3(head.attn.weight, head.attn.bias, as_dict(x), h, w)
    if s > 1:
        z, _, _ = bilinear_up(z, dim, h, w, s)
        a, h, w = bilinear_up(a, heads, h, w, s)
    pos = [(y, z_) for y in range(h) for z_ in range(w)]
    out = []
    for t in range(heads):
        alpha = softmax([a[(t, *q)] for q in pos])
        for j in range(t * dim // heads, (t + 1) * dim // heads):
            out.append(sum(al * max(z[(j, *q)], 1e-6) ** p for al, q in zip(alpha, pos)) ** (1 / p))
    return l2(out)


@pytest.mark.parametrize("spec", ["glap", "glap:scale=1,heads=1", "glap:scale=3,heads=2"])
def test_glap_matches_its_equations(spec):
    head = create_head(spec, 3, 4).eval()
    randomise(head, 1)
    with torch.no_grad():
        head.value.bias.add_(1.0)  # mostly positive values, so the power mean is not all ε
    x = torch.rand(2, 3, 2, 3)
    got = head(x)
    for n in range(2):
        assert got[n].tolist() == pytest.approx(glap_reference(head, x[n]), abs=1e-4)


# -------------------------------------------------------------------------------------------------- DIABLO


def diablo_reference(head, x: torch.Tensor) -> list[float]:
    """The light form: φ = 1x1 conv, ReLU, 1x1 conv; ψ = 1x1 conv + ReLU; eq. 1-13 in loops."""
    c, h, w = x.shape
    f = as_dict(x)
    pos = [(y, z) for y in range(h) for z in range(w)]
    phi1 = conv1x1(head.phi[0].weight, head.phi[0].bias, f)
    phi = conv1x1(head.phi[2].weight, head.phi[2].bias, {k: max(v, 0.0) for k, v in phi1.items()})
    m = head.phi[2].weight.shape[0]
    words, alpha = head.words, head.alpha
    d = head.dictionary.detach().double()

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))

    def psi(fm):
        return {k: max(v, 0.0) for k, v in conv1x1(head.psi[0].weight, head.psi[0].bias, fm).items()}

    pre = head.attention == "pre"
    g = f if pre else psi(f)
    kdim = c if pre else head.psi[0].weight.shape[0]
    att = {}  # (n, k, y, z) -> A, eq. 5-7 / 10-11
    for q in pos:
        phiv = [phi[(t, *q)] for t in range(m)]
        for k in range(kdim):
            if head.select == "dimension":
                s = [cos(phiv, d[n, k].tolist()) for n in range(words)]
            else:
                s = [cos(phiv, d[n].tolist()) for n in range(words)]
            for n, a in enumerate(softmax([alpha * v for v in s])):
                att[(n, k, *q)] = a
    out = []
    for n in range(words):
        merged = {(k, *q): att[(n, k, *q)] * g[(k, *q)] for k in range(kdim) for q in pos}  # eq. 8 / 12
        hmap = psi(merged) if pre else merged  # eq. 4 (pre) / eq. 2 (post)
        width = head.embed_w.shape[1]
        pooled = [sum(hmap[(j, *q)] for q in pos) / len(pos) for j in range(width)]
        wn, bn = head.embed_w[n].detach().double(), head.embed_b[n].detach().double()
        e = l2([sum(pooled[j] * float(wn[j, o]) for j in range(width)) + float(bn[o]) for o in range(wn.shape[1])])
        out += [v / math.sqrt(words) for v in e]
    return out


@pytest.mark.parametrize("select", ["dimension", "feature"])
@pytest.mark.parametrize("attention", ["pre", "post"])
def test_diablo_light_form_matches_equations_5_to_13(select, attention):
    head = create_head(f"diablo:form=light,words=2,select={select},attention={attention},alpha=3,m=3,width=3",
                       4, 4).eval()
    randomise(head, 2)
    x = torch.rand(2, 4, 2, 2)
    got = head(x)
    for n in range(2):
        assert got[n].tolist() == pytest.approx(diablo_reference(head, x[n]), abs=1e-4)


def diablo_paper_reference(head, f: torch.Tensor) -> list[float]:
    """Jacob et al. 2020 on the trunk's mid-level map f (c,h,w): φ and ψ are the backbone's later units (§4.1), run
    as the modules they are; the rest in loops. s_n(u) = cos(φ(f_u), d^(n)) (eq. 5, feature-wise) or
    s_{n,k}(u) = cos(φ(f_u), d^(n)_k) (eq. 10, dimension-wise); A^(n) = softmax_n(α s_n) (eq. 7 / 11);
    pre (eq. 3-4): H^(n) = ψ(A^(n) ⊙ F); post (eq. 1-2): H^(n) = A^(n) ⊙ ψ(F); e_n = L2(W_n GAP(H^(n)) + b_n),
    e = [e_1; ...; e_N] / √N. N = 1: e = L2(W GAP(ψ(F)) + b), no attention."""
    def psi(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head.psi(t[None].float())[0].double()

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))

    words, pre = head.words, head.attention == "pre"
    if words == 1:
        hmaps = [psi(f)]
    else:
        with torch.no_grad():
            phi = head.phi(f[None])[0].double()
        d = head.dictionary.detach().double()
        g = f.double() if pre else psi(f)
        kdim, h, w = g.shape
        assert phi.shape[1:] == g.shape[1:]
        hmaps = []
        att = {}
        for y in range(h):
            for x in range(w):
                pv = phi[:, y, x].tolist()
                for k in range(kdim if head.select == "dimension" else 1):
                    dn = [d[n, k] if head.select == "dimension" else d[n] for n in range(words)]
                    for n, a in enumerate(softmax([head.alpha * cos(pv, v.tolist()) for v in dn])):
                        att[(n, k, y, x)] = a
        for n in range(words):
            merged = torch.zeros(kdim, h, w, dtype=torch.float64)
            for k in range(kdim):
                for y in range(h):
                    for x in range(w):
                        merged[k, y, x] = att[(n, k if head.select == "dimension" else 0, y, x)] * float(g[k, y, x])
            hmaps.append(psi(merged) if pre else merged)
    out = []
    for n, hmap in enumerate(hmaps):
        width, h, w = hmap.shape
        pooled = [sum(float(hmap[j, y, x]) for y in range(h) for x in range(w)) / (h * w) for j in range(width)]
        wn, bn = head.embed_w[n].detach().double(), head.embed_b[n].detach().double()
        e = l2([sum(pooled[j] * float(wn[j, o]) for j in range(width)) + float(bn[o]) for o in range(wn.shape[1])])
        out += [v / math.sqrt(words) for v in e]
    return out


@pytest.mark.parametrize("options", ["words=2", "words=2,select=feature", "words=2,attention=post",
                                     "words=2,select=feature,attention=post", "words=1"])
def test_diablo_default_is_the_papers_form_and_matches_its_equations(options):
    """`diablo` (no form) cuts the backbone at its mid-level split and holds φ (a copy of the next units) and ψ
    (the backbone's own later units); its descriptor follows the paper's equations on the trunk's map."""
    from asymsearch.training.diablo import DIABLOPaperHead

    torch.manual_seed(3)
    model = build_model({"backbone": BACKBONE, "head": f"diablo:{options}", "dim": 4, "pretrained": None}).eval()
    assert isinstance(model.head, DIABLOPaperHead)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        maps = model.backbone(images)
        got = model(images)
    assert maps.shape[1] == (64 if "post" not in options else 128)  # the mid-level map, not the final 128 @ stride 16
    for n in range(2):
        assert got[n].tolist() == pytest.approx(diablo_paper_reference(model.head, maps[n]), abs=1e-4)


def test_diablo_light_options_on_the_default_say_which_form_takes_them():
    with pytest.raises(UserError, match=r"does not take option\(s\) channels, m \(channels, m: option\(s\) of "
                                        r"the light form, diablo:form=light"):
        build_model({"backbone": BACKBONE, "head": "diablo:channels=4,m=3", "dim": 8, "pretrained": None})
    with pytest.raises(UserError, match="on a bare feature map use diablo:form=light"):
        create_head("diablo", 16, 8)
    assert create_head("diablo:form=light,channels=4", 16, 8)(torch.rand(2, 16, 3, 3)).shape == (2, 8)


# ------------------------------------------------------------------------------------------ registry contract


@pytest.mark.parametrize("spec", CONTRACT_SPECS)
def test_every_head_contract_at_any_size(spec):
    torch.manual_seed(0)
    dim = dim_for(spec)
    head, channels = contract_head(spec)
    head.train()
    for h, w in [(1, 1), (3, 5), (6, 4)]:
        x = torch.rand(3, channels, h, w)
        out = head(x)
        assert out.shape == (3, dim) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    if not list(head.parameters()):
        return
    (out * torch.randn(3, dim)).sum().backward()
    no_grad = [n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{spec}: parameters without a non-zero finite gradient: {no_grad}"


@pytest.mark.parametrize("spec", CONTRACT_SPECS)
def test_every_head_exports_to_onnx_with_dynamic_spatial_axes(spec, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(1)
    head, channels = contract_head(spec)
    head.eval()
    path = tmp_path / "head.onnx"
    torch.onnx.export(head, (torch.rand(2, channels, 4, 5),), str(path), dynamo=False, opset_version=17,
                      input_names=["maps"], output_names=["emb"],
                      dynamic_axes={"maps": {0: "batch", 2: "height", 3: "width"}, "emb": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, channels, 3, 7), (4, channels, 9, 6)]:
        x = torch.rand(*shape)
        got = sess.run(None, {"maps": x.numpy()})[0]
        with torch.no_grad():
            want = head(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("spec", ["gem", "glam", "glam:form=gate", "glap", "diablo", "diablo:form=light"])
def test_any_backbone_with_any_head(spec):
    model = build_model({"backbone": "tiny_cnn_narrow", "head": spec, "dim": 8, "pretrained": None}).eval()
    out = model(torch.rand(2, 3, 48, 40))
    assert out.shape == (2, 8) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_head_spec_parsing():
    assert parse_head_spec("diablo:words=4,select=feature,alpha=2.5,local=false") == (
        "diablo", {"words": 4, "select": "feature", "alpha": 2.5, "local": False})
    assert parse_head_spec("gem") == ("gem", {})
    with pytest.raises(UserError, match="key=value"):
        parse_head_spec("glam:local")


def test_bad_head_options_are_one_line_user_errors():
    with pytest.raises(UserError, match="choose one of: diablo, gap, gem, glam, glap"):
        create_head("netvlad", 16, 8)
    with pytest.raises(UserError, match="words=3 must divide --dim 8"):
        create_head("diablo:words=3", 16, 8)
    with pytest.raises(UserError, match="select must be dimension or feature"):
        create_head("diablo:select=channel", 16, 8)
    with pytest.raises(UserError, match="heads=3 must divide"):
        create_head("glap:heads=3", 16, 8)
    with pytest.raises(UserError, match="local=true or global=true"):
        create_head("glam:local=false,global=false", 16, 8)
    with pytest.raises(UserError, match="does not take option.*its options"):
        create_head("gem:p=4", 16, 8)
    with pytest.raises(UserError, match="--dim must equal"):
        create_head("gap", 16, 8)
    with pytest.raises(UserError, match="words=3 must divide"):  # before any backbone is built
        build_model({"backbone": "tiny_cnn", "head": "diablo:words=3", "dim": 8, "pretrained": "/no/such.pth"})


# ---------------------------------------------------------------------------- specs recorded before the defaults


def test_head_specs_name_their_form_when_recorded_and_old_ones_read_as_the_earlier_form():
    from asymsearch.training.heads import explicit_head_spec, recorded_head_spec

    assert explicit_head_spec("glam") == "glam:form=paper"
    assert explicit_head_spec("diablo:words=4,select=feature") == "diablo:form=paper,words=4,select=feature"
    assert recorded_head_spec("glam:channels=256,local=false") == "glam:form=gate,channels=256,local=false"
    assert recorded_head_spec("diablo:words=2") == "diablo:form=light,words=2"
    for spec in ("glam:form=paper", "diablo:words=2,form=light", "gem", "gem:init=zero-shot", "glap:heads=2"):
        assert explicit_head_spec(spec) == recorded_head_spec(spec) == spec


@pytest.mark.parametrize("old_spec,legacy_class,new_spec", [
    ("glam:reduction=2", "GLAMHead", "glam:reduction=2"),
    ("diablo:words=2,m=3,width=4", "DIABLOHead", "diablo:words=2")])
def test_a_checkpoint_that_recorded_a_plain_spec_loads_as_the_form_it_was_trained_as(tmp_path, old_spec, legacy_class,
                                                                                      new_spec):
    """Before the paper forms became the defaults, `glam` meant form=gate and `diablo` form=light, and checkpoints
    recorded the spec as given. Such a checkpoint must still build that form (GLAM's paper form has the very same
    parameter names, so it would load the weights and compute something else). New checkpoints name the form."""
    from asymsearch.core.manifest import Preprocessing
    from asymsearch.training import heads as heads_module
    from asymsearch.training.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
    from asymsearch.training.ensemble import ensemble_arch
    from asymsearch.training.heads import recorded_head_spec
    from asymsearch.training.models import EnsembleNet

    torch.manual_seed(0)
    legacy_spec = recorded_head_spec(old_spec)
    arch = {"backbone": BACKBONE, "head": legacy_spec, "dim": 8, "pretrained": None}
    trained = build_model(arch).eval()
    randomise(trained.head, 5)
    pre = Preprocessing(resize=40, crop=40)
    ckpt = make_checkpoint(trained, role="teacher", arch=arch, preprocessing=pre)
    assert ckpt["arch"]["head"] == legacy_spec
    ckpt["arch"]["head"] = old_spec  # as the code before the change recorded it
    save_checkpoint(ckpt, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["arch"]["head"] == legacy_spec
    model = model_from_checkpoint(loaded)
    assert type(model.head) is getattr(heads_module, legacy_class)
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained(x)
        assert torch.allclose(model(x), want, atol=1e-6)
        if legacy_class == "GLAMHead":  # read as today's default, the same weights load and give another model
            now = build_model({**arch, "head": old_spec}).eval()
            now.load_state_dict(ckpt["state_dict"])
            assert not torch.allclose(now(x), want, atol=1e-3)

    # an ensemble's members too
    ens = make_checkpoint(EnsembleNet([trained, trained]), role="teacher", arch=ensemble_arch([arch, arch]),
                          preprocessing=pre)
    for member in ens["arch"]["members"]:
        member["head"] = old_spec
    save_checkpoint(ens, tmp_path / "ens.pt")
    assert [m["head"] for m in load_checkpoint(tmp_path / "ens.pt")["arch"]["members"]] == [legacy_spec] * 2

    # a checkpoint written now names the default form, and loads as it
    paper_arch = {**arch, "head": new_spec}
    new = make_checkpoint(build_model(paper_arch), role="teacher", arch=paper_arch, preprocessing=pre)
    assert new["arch"]["head"] == new_spec.replace(":", ":form=paper,")
    save_checkpoint(new, tmp_path / "new.pt")
    assert type(model_from_checkpoint(load_checkpoint(tmp_path / "new.pt")).head).__name__.endswith("PaperHead")


def test_student_from_teacher_takes_the_teachers_head_as_spelled_then_or_now(image_folder, tmp_path):
    """A teacher checkpoint written now records `glam:form=paper`: `--from-teacher --head glam` is the same head. An
    old one that recorded a plain `glam` was the gate form: `--head glam` now means another head, refused in one line
    that names the one to give."""
    from asymsearch.core.manifest import Preprocessing
    from asymsearch.training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from asymsearch.training.config import StudentConfig
    from asymsearch.training.student import train_student

    torch.manual_seed(0)
    arch = {"backbone": BACKBONE, "head": "glam:reduction=4", "dim": 8, "pretrained": None}
    pre = Preprocessing(resize=32, crop=32)
    save_checkpoint(make_checkpoint(build_model(arch).eval(), role="teacher", arch=arch, preprocessing=pre),
                    tmp_path / "new.pt")
    cfg = dict(data=str(image_folder), backbone=BACKBONE, head="glam:reduction=4", from_teacher=True, epochs=1,
               batch_size=16, workers=0, image_size=24)
    student = load_checkpoint(train_student(StudentConfig(teacher=str(tmp_path / "new.pt"),
                                                          out=str(tmp_path / "s.pt"), **cfg)))
    assert student["arch"]["head"] == "glam:form=paper,reduction=4"
    gate = {**arch, "head": "glam:form=gate,reduction=4"}
    old = make_checkpoint(build_model(gate).eval(), role="teacher", arch=gate, preprocessing=pre)
    old["arch"]["head"] = "glam:reduction=4"  # as recorded before the paper form became the default
    save_checkpoint(old, tmp_path / "old.pt")
    with pytest.raises(UserError, match="--head glam:form=gate,reduction=4\\), not"):
        train_student(StudentConfig(teacher=str(tmp_path / "old.pt"), out=str(tmp_path / "t.pt"), **cfg))


def test_experiment_heads_recosts_old_plain_specs_as_earlier_forms_and_refuses_the_paper_diablo(image_folder,
                                                                                                 tmp_path):
    """`python -m experiments heads --recost` rebuilds every row's head from its recorded spec: a row written before
    the paper forms became the defaults (`diablo:words=2,m=3`, the light form) must be re-costed as that form. The
    experiment trains heads on cached final maps: the default `diablo`, which holds backbone units, is refused."""
    import json

    from experiments.heads import HeadsExperimentConfig, recost, run_heads_experiment

    cfg = HeadsExperimentConfig(data=str(image_folder), out=str(tmp_path / "heads"), backbone=BACKBONE,
                                pretrained="none", image_size=32, epochs=1, cache_dir=str(tmp_path / "cache"),
                                val_fraction=0.5, heads=("diablo:form=light,words=2,m=3",), seeds=(0,))
    result = run_heads_experiment(cfg, log=lambda *a: None)
    light = result["rows"][1]
    assert light["spec"] == "diablo:form=light,words=2,m=3"
    path = tmp_path / "heads.json"
    old = json.loads(path.read_text())
    old["rows"][1]["spec"] = old["rows"][1]["head"] = "diablo:words=2,m=3"  # as a run before the change recorded it
    old["config"]["heads"] = ["diablo:words=2,m=3"]
    path.write_text(json.dumps(old))
    again = recost(tmp_path / "heads", log=lambda *a: None)
    assert again["rows"][1]["head_params"] == light["head_params"]
    with pytest.raises(UserError, match="trains heads on the backbone's final map.*use diablo:form=light here"):
        run_heads_experiment(HeadsExperimentConfig(**{**cfg.__dict__, "heads": ("diablo:words=2",)}))  # the default


def test_orderings_pair_heads_by_their_form_not_their_spelling():
    from experiments.heads import _ordering_verdicts

    def row(r1):
        return {"runs": [{"seed": 0, "metrics": {"recall@1": r1, "map": r1}}]}

    rows = {"glam:channels=256": row(0.5), "glam:form=gate,channels=256": row(0.4), "diablo:attention=post": row(0.3),
            "diablo:form=paper,words=1,attention=post": row(0.35)}
    got = {v["ordering"]: v["verdict"] for v in _ordering_verdicts(rows)}
    assert got == {"GLAM paper form ≥ the earlier gate form": "holds",
                   "DIABLO paper form (dimension-wise, post-attention, N=8) ≥ its baseline (same units, N=1) (Jacob et "
                   "al. 2020)": "does not hold"}


# ------------------------------------------------------------------------------------------------ multi-scale


def test_multiscale_onnx_descriptor_matches_torch(tmp_path, image_folder):
    """core.multiscale (onnxruntime only) against torch: the re-normalised mean over scales 1, 1/√2, 1/2."""
    from asymsearch.core.data import list_image_folder
    from asymsearch.core.manifest import ModelManifest, Preprocessing, manifest_path_for, sha256_file
    from asymsearch.core.multiscale import MULTISCALE_SCALES, MultiScaleEmbedder, scaled_preprocessing
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.core.preprocess import decode_image, preprocess_batch

    torch.manual_seed(0)
    model = build_model({"backbone": "tiny_cnn_narrow", "head": "glap", "dim": 8, "pretrained": None}).eval()
    path = tmp_path / "t.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 48, 48),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["embeddings"],
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "embeddings": {0: "batch"}})
    spec = Preprocessing(resize=56, crop=48)
    ModelManifest(role="teacher", architecture={"backbone": "tiny_cnn_narrow", "head": "glap", "dim": 8}, dim=8,
                  input_size=48, preprocessing=spec, opset=17, sha256=sha256_file(path), teacher_id="t",
                  model_id="t").save(manifest_path_for(path))
    ms = MultiScaleEmbedder(OnnxEmbedder(path))
    assert [s.crop for s in ms.specs] == [48, 34, 24] and [s.resize for s in ms.specs] == [56, 40, 28]
    assert scaled_preprocessing(spec, 0.1).crop == 16
    images = [decode_image(it.path) for it in list_image_folder(image_folder)[:3]]
    got = ms.embed_images(images)
    with torch.no_grad():
        want = sum(model(torch.from_numpy(preprocess_batch(images, scaled_preprocessing(spec, s))))
                   for s in MULTISCALE_SCALES)
    want = torch.nn.functional.normalize(want, dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    single = OnnxEmbedder(path).embed_images(images)
    assert not np.allclose(got, single, atol=1e-3)  # the other scales do change the descriptor
    arrays = ms.embed_arrays(preprocess_batch(images, spec))  # resampled pixels: close to, not equal to, the above
    assert arrays.shape == got.shape and (arrays * got).sum(axis=1).min() > 0.9
    assert ms.embed_images([]).shape == (0, 8)
    exact = ms.embed_scaled([preprocess_batch(images, s) for s in ms.specs])
    np.testing.assert_allclose(exact, got, atol=1e-6)
