"""Pooling heads: each against a direct, unvectorised computation of its equations on a tiny input; the registry
contract (shape, unit norm, finite, every parameter gets a gradient, any input size, ONNX with dynamic batch and
spatial axes matching onnxruntime) over every registered head; bad options fail with one clear line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asymsearch.core.errors import UserError
from asymsearch.training.models import HEADS, build_model, create_head, parse_head_spec

C = 6  # channels of the contract tests' feature maps


def dim_for(spec: str, channels: int = C) -> int:
    return channels if parse_head_spec(spec)[0] == "gap" else 8


# every registered head, plus the variants the seeds ablate
CONTRACT_SPECS = sorted(HEADS) + ["glam:local=false", "glam:global=false", "glam:channels=4", "glap:scale=1,heads=2",
                                  "diablo:select=feature,attention=post", "diablo:select=dimension,attention=post",
                                  "diablo:select=feature,attention=pre", "diablo:channels=4"]


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


def glam_reference(head, x: torch.Tensor) -> list[float]:
    c, h, w = x.shape
    f = as_dict(x)
    pos = [(y, z) for y in range(h) for z in range(w)]
    gap = [sum(f[(i, y, z)] for y, z in pos) / len(pos) for i in range(c)]
    streams = [f]
    if head.use_local:
        a_c = [sig(v) for v in conv1d_same(head.lc_conv.weight, gap)]
        f_c = {(i, y, z): f[(i, y, z)] * a_c[i] + f[(i, y, z)] for (i, y, z) in f}
        r = conv1x1(head.ls_reduce.weight, head.ls_reduce.bias, f)
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
        for i in range(c):
            a = softmax([q[i] * k[j] for j in range(c)])
            for y, z in pos:
                f_c[(i, y, z)] = f[(i, y, z)] + sum(a[j] * f[(j, y, z)] for j in range(c))
        qs, ks, vs = (conv1x1(m.weight, m.bias, f) for m in (head.gs_q, head.gs_k, head.gs_v))
        cr = head.gs_q.weight.shape[0]
        o = {}
        for u in pos:
            a = softmax([sum(qs[(t, *u)] * ks[(t, *v)] for t in range(cr)) / math.sqrt(cr) for v in pos])
            for t in range(cr):
                o[(t, *u)] = sum(a[n] * vs[(t, *v)] for n, v in enumerate(pos))
        g_s = conv1x1(head.gs_out.weight, head.gs_out.bias, o)
        streams.append({key: f_c[key] * sig(g_s[key]) + f_c[key] for key in f})
    wts = softmax(head.fusion.detach().double().tolist())
    fused = {key: sum(wt * s[key] for wt, s in zip(wts, streams)) for key in f}
    p = float(head.pool.p.detach())
    pooled = [gem([fused[(i, y, z)] for y, z in pos], p) for i in range(c)]
    return linear_l2(head.proj, pooled)


@pytest.mark.parametrize("spec", ["glam", "glam:local=false", "glam:global=false"])
def test_glam_matches_its_equations(spec):
    head = create_head(spec, 4, 3, reduction=2).eval()
    randomise(head, 0)
    x = torch.rand(2, 4, 2, 3) + 0.1
    got = head(x)
    for n in range(2):
        assert got[n].tolist() == pytest.approx(glam_reference(head, x[n]), abs=1e-4)


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
def test_diablo_matches_equations_5_to_13(select, attention):
    head = create_head(f"diablo:words=2,select={select},attention={attention},alpha=3,m=3,width=3", 4, 4).eval()
    randomise(head, 2)
    x = torch.rand(2, 4, 2, 2)
    got = head(x)
    for n in range(2):
        assert got[n].tolist() == pytest.approx(diablo_reference(head, x[n]), abs=1e-4)


# ------------------------------------------------------------------------------------------ registry contract


@pytest.mark.parametrize("spec", CONTRACT_SPECS)
def test_every_head_contract_at_any_size(spec):
    torch.manual_seed(0)
    dim = dim_for(spec)
    head = create_head(spec, C, dim).train()
    for h, w in [(1, 1), (3, 5), (6, 4)]:
        x = torch.rand(3, C, h, w)
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
    head = create_head(spec, C, dim_for(spec)).eval()
    path = tmp_path / "head.onnx"
    torch.onnx.export(head, (torch.rand(2, C, 4, 5),), str(path), dynamo=False, opset_version=17,
                      input_names=["maps"], output_names=["emb"],
                      dynamic_axes={"maps": {0: "batch", 2: "height", 3: "width"}, "emb": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, C, 3, 7), (4, C, 9, 6)]:
        x = torch.rand(*shape)
        got = sess.run(None, {"maps": x.numpy()})[0]
        with torch.no_grad():
            want = head(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("spec", ["gem", "glam", "glap", "diablo"])
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
