"""Pooling heads: (N,C,h,w) feature map -> (N,dim) unit-norm embedding, at any h, w (no size is baked in, so
multi-scale inference and ONNX dynamic spatial axes work).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asymsearch.core.errors import UserError
from asymsearch.training.registry import register_head


class GeM(nn.Module):
    """Generalised-mean pooling: f_c = (mean_{h,w} max(x_chw, eps)^p)^(1/p), with a learnable p (Radenović et al.)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over the spatial dims (not avg_pool2d with a traced kernel) keeps any input size exportable
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class GeMHead(nn.Module):
    """(N,C,h,w) -> GeM -> Linear(C, dim) -> L2 normalisation -> (N,dim) unit vectors.

    Option `init=zero-shot` (spec `gem:init=zero-shot`, dim = C) starts it as global average pooling: p = 1 and
    the identity projection, so the untrained model is the zero-shot one and a trained one can be interpolated
    with it weight by weight (`training.soup.interpolate`)."""

    OPTIONS = "init=random|zero-shot"

    def __init__(self, in_channels: int, dim: int, init: str = "random") -> None:
        super().__init__()
        if init not in ("random", "zero-shot"):
            raise UserError(f"head gem: init is random or zero-shot, not {init!r}")
        if init == "zero-shot" and dim != in_channels:
            raise UserError(f"head gem:init=zero-shot starts as average pooling: --dim must equal the backbone's "
                            f"{in_channels} channels, not {dim}")
        self.pool = GeM(p=1.0 if init == "zero-shot" else 3.0)
        self.proj = nn.Linear(in_channels, dim)
        if init == "zero-shot":
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(dim))
                self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.pool(x)), p=2, dim=1)


register_head("gem")(GeMHead)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(N,C,h,w) -> (N,C,hw), with no size baked into an exported graph."""
    return x.flatten(2)


# ----------------------------------------------------------------------------------------------------- GAP


class GAPHead(nn.Module):
    """Global average pooling then L2 normalisation, no parameters: the zero-shot ImageNet baseline.
    `dim` must equal the backbone's channel count (there is no projection)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        if dim != in_channels:
            raise UserError(f"head gap has no projection: --dim must equal the backbone's {in_channels} channels, "
                            f"not {dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _l2(x.mean(dim=(-2, -1)))


register_head("gap")(GAPHead)


# ---------------------------------------------------------------------------------------------------- GLAM


class GLAMHead(nn.Module):
    """GLAM's earlier form in this project (`glam:form=gate`), after the global-local attention module of Song, Han
    & Avrithis ("All the attention you need: global-local, spatial-channel attention for image retrieval", WACV
    2022), then GeM, a projection to `dim` and L2 normalisation. The default `glam` is the paper's form,
    `training.glam.GLAMPaperHead`, a subclass with the same parameters. F is the (c,h,w) feature map; σ the
    sigmoid; ⊙ broadcast product.

    local channel   A^l_c = σ(conv1d_k(GAP(F)))                                          (c×1×1)
    local spatial   A^l_s = σ(W_s [F'; D_1(F'); D_3(F'); D_5(F')]),  F' = W_r F            (1×h×w)
                    (W_r: 1x1 conv to c' = c/r channels; D_d: 3x3 conv with dilation d; W_s: 1x1 conv to 1)
    local map       F^l_c = F ⊙ A^l_c + F,   F^l = F^l_c ⊙ A^l_s + F^l_c
    global channel  q = σ(conv1d_q(GAP(F))), k = σ(conv1d_k'(GAP(F)));  A^g_c = softmax_j(q_i k_j)  (c×c)
                    G_c[i] = Σ_j A^g_c[i, j] F[j]   (channel i mixes every channel j)
    global spatial  Q, K, V = W_q F, W_k F, W_v F (c' channels each);  A^g_s = softmax_v(Q_u·K_v / √c') (hw×hw)
                    G_s[:, u] = W_o Σ_v A^g_s[u, v] V[:, v]   (W_o: 1x1 conv back to c channels)
    global map      F^g_c = F + G_c,   F^g = F^g_c ⊙ σ(G_s) + F^g_c   -- spatial attention applied on top of
                    the channel-attended map, mirroring the local stream
    fusion          F^gl = w_l F^l + w_g F^g + w F,  (w_l, w_g, w) = softmax of three learnable scalars
    descriptor      e = L2(W GeM(F^gl) + b)

    Options (the seed's ablation): local=true|false, global=true|false (a disabled stream leaves the fusion);
    reduction r (default 8), kernel k of the 1-D channel convolutions (default 3); channels=c0 first maps F
    to c0 channels by a 1x1 conv + ReLU (the global channel attention costs O(c²hw); 0 keeps c). Nothing
    depends on h, w.
    The seed gives the components and the fusion; the precise residual forms above are this implementation's:
    both spatial attentions read F rather than the channel-attended map, and the global one gates with σ(G_s).
    """

    OPTIONS = "local=true|false, global=true|false, reduction=8, kernel=3, channels=0"

    def __init__(self, in_channels: int, dim: int, local: bool = True, global_: bool = True,
                 reduction: int = 8, kernel: int = 3, channels: int = 0, **kw) -> None:
        super().__init__()
        global_ = kw.pop("global", global_)
        if kw:
            raise TypeError(f"unexpected keyword {', '.join(kw)}")
        if not (local or global_):
            raise UserError("head glam needs local=true or global=true (both false is plain GeM: use --head gem)")
        if kernel < 1 or kernel % 2 == 0 or reduction < 1:
            raise UserError(f"head glam: kernel must be odd and positive, reduction positive (got {kernel}, "
                            f"{reduction})")
        if channels < 0:
            raise UserError(f"head glam: channels must be 0 (keep) or positive, not {channels}")
        self.reduce = (nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=False)) if channels
                       else nn.Identity())
        c = channels or in_channels
        cr = max(1, c // reduction)
        self.use_local, self.use_global = bool(local), bool(global_)
        if self.use_local:
            self.lc_conv = nn.Conv1d(1, 1, kernel, padding=kernel // 2, bias=False)
            self.ls_reduce = nn.Conv2d(c, cr, 1)
            self.ls_dilated = nn.ModuleList(nn.Conv2d(cr, cr, 3, padding=d, dilation=d) for d in (1, 3, 5))
            self.ls_out = nn.Conv2d(4 * cr, 1, 1)
        if self.use_global:
            self.gc_q = nn.Conv1d(1, 1, kernel, padding=kernel // 2, bias=False)
            self.gc_k = nn.Conv1d(1, 1, kernel, padding=kernel // 2, bias=False)
            self.gs_q, self.gs_k, self.gs_v = (nn.Conv2d(c, cr, 1) for _ in range(3))
            self.gs_out = nn.Conv2d(cr, c, 1)
        self.fusion = nn.Parameter(torch.zeros(1 + self.use_local + self.use_global))
        self.pool = GeM()
        self.proj = nn.Linear(c, dim)

    def local_attention(self, x: torch.Tensor) -> torch.Tensor:
        a_c = torch.sigmoid(self.lc_conv(x.mean(dim=(-2, -1)).unsqueeze(1))).squeeze(1)[:, :, None, None]
        f_c = x * a_c + x
        r = self.ls_reduce(x)
        a_s = torch.sigmoid(self.ls_out(torch.cat([r] + [conv(r) for conv in self.ls_dilated], dim=1)))
        return f_c * a_s + f_c

    def global_attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        z = x.mean(dim=(-2, -1)).unsqueeze(1)  # (n,1,c)
        q, k = torch.sigmoid(self.gc_q(z)).squeeze(1), torch.sigmoid(self.gc_k(z)).squeeze(1)  # (n,c)
        a_c = torch.softmax(q.unsqueeze(2) * k.unsqueeze(1), dim=2)  # (n,c,c)
        g_c = torch.bmm(a_c, _flat(x)).view_as(x)
        f_c = x + g_c
        qs, ks, vs = _flat(self.gs_q(x)), _flat(self.gs_k(x)), _flat(self.gs_v(x))  # (n,c',hw)
        a_s = torch.softmax(torch.bmm(qs.transpose(1, 2), ks) / qs.shape[1] ** 0.5, dim=2)  # (n,hw,hw)
        g_s = self.gs_out(torch.bmm(vs, a_s.transpose(1, 2)).view(n, -1, *x.shape[2:]))
        return f_c * torch.sigmoid(g_s) + f_c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        w = torch.softmax(self.fusion, dim=0)
        streams = [x]
        if self.use_local:
            streams.append(self.local_attention(x))
        if self.use_global:
            streams.append(self.global_attention(x))
        fused = sum(w[i] * s for i, s in enumerate(streams))
        return _l2(self.proj(self.pool(fused)))


# ------------------------------------------------------------------------------------- the forms of a spec

# The heads with two forms: (the form a spec without `form=` builds, the form it built before the paper forms became
# the defaults). A spec recorded without `form=` by then (in a checkpoint, a manifest, a results file) meant the
# second; every spec recorded since names its form (`explicit_head_spec`), so a recorded spec without one is old.
HEAD_FORMS = {"glam": ("paper", "gate"), "diablo": ("paper", "light")}


def _with_form(spec: str, which: int) -> str:
    name, colon, rest = spec.partition(":")
    forms = HEAD_FORMS.get(name.strip())
    if forms is None:
        return spec
    keys = {part.partition("=")[0].strip().replace("-", "_") for part in rest.split(",") if part.strip()}
    if "form" in keys:
        return spec
    rest = rest.strip()
    return f"{name.strip()}:form={forms[which]}" + (f",{rest}" if rest else "")


def translate_head_specs(value, translate):
    """`value` (plain dicts and lists: a config, a checkpoint's arch and its ensemble members) with every head spec
    (a string under a "head" key) passed through `translate` (`explicit_head_spec` to write, `recorded_head_spec`
    to read what was written before forms were recorded)."""
    if isinstance(value, dict):
        return {k: translate(v) if k == "head" and isinstance(v, str) else translate_head_specs(v, translate)
                for k, v in value.items()}
    if isinstance(value, list):
        return [translate_head_specs(v, translate) for v in value]
    return value


def explicit_head_spec(spec: str) -> str:
    """`spec` with its form named: `glam` -> `glam:form=paper`, `diablo:words=4` -> `diablo:form=paper,words=4`;
    a spec that names its form, or of a head with one form, is returned as it is. What checkpoints record."""
    return _with_form(spec, 0)


def recorded_head_spec(spec: str) -> str:
    """The head a *recorded* spec (read from a checkpoint, manifest or results file) was built as: one without
    `form=` was written before the paper forms became the defaults and meant the earlier form (`glam` ->
    `glam:form=gate`, `diablo:words=4` -> `diablo:form=light,words=4`)."""
    return _with_form(spec, 1)


def glam_head(in_channels: int, dim: int, form: str = "paper", **options) -> nn.Module:
    """`glam`: form=paper (the default) is `training.glam.GLAMPaperHead`, the form of Song, Han & Avrithis, "All the
    attention you need: global-local, spatial-channel attention for image retrieval" (WACV 2022): each stream
    channel then spatial attention, the global spatial one an hw×hw interaction on the channel-attended map, fused
    with the input. form=gate is `GLAMHead` above, this project's earlier form (the default before; checkpoints
    that recorded a plain `glam` then load as it, `recorded_head_spec`)."""
    if form == "gate":
        return GLAMHead(in_channels, dim, **options)
    if form == "paper":
        from asymsearch.training.glam import GLAMPaperHead
        options = dict(options)
        if "global" in options:
            options["global_"] = options.pop("global")
        return GLAMPaperHead(in_channels, dim, **options)
    raise UserError(f"head glam: form must be paper (the default, Song, Han & Avrithis 2022) or gate (this "
                    f"project's earlier form), not {form!r}")


glam_head.OPTIONS = "form=paper|gate, " + GLAMHead.OPTIONS
register_head("glam")(glam_head)


# ---------------------------------------------------------------------------------------------------- GLAP


class GLAPHead(nn.Module):
    """GLAP, generalized local attention pooling (Roig et al. 2020), as implemented here.

    The seed (a poster) states the idea -- a compact representation pooled with local attention at a higher
    spatial resolution, with fewer parameters -- but no equations; this is our reading of it:

    Z = up_s(W_z F)                           1x1 conv to `dim` channels (project first, pool the compact map),
                                              then bilinear upsampling by s (default 2): the pooling resolution
    a_t = up_s(W_a^t * F)                     3x3 conv (local context), one logit map per attention head t,
                                              upsampled the same way
    α_t = softmax over positions u of a_t[u]  (T heads, default 4; head t pools the t-th slice of Z) -- over the
                                              s²·hw upsampled positions, a finer weighting than at hw
    g_t = (Σ_u α_t[u] max(Z_t[u], ε)^p)^(1/p) generalized (power) mean with learnable p -- "generalized"
                                              (p = 1: plain attention-weighted average)
    e  = L2([g_1; ...; g_T])

    Options: heads=T (must divide dim), scale=s (1 disables the upsampling), p=initial power (3).
    Nothing depends on h, w: the softmax runs over however many positions there are.
    """

    OPTIONS = "heads=4, scale=2, p=3"

    def __init__(self, in_channels: int, dim: int, heads: int = 4, scale: int = 2, p: float = 3.0) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise UserError(f"head glap: heads={heads} must divide --dim {dim}")
        if scale < 1:
            raise UserError(f"head glap: scale must be a positive integer, not {scale}")
        self.heads, self.scale, self.eps = int(heads), int(scale), 1e-6
        self.value = nn.Conv2d(in_channels, dim, 1)
        self.attn = nn.Conv2d(in_channels, heads, 3, padding=1)
        self.p = nn.Parameter(torch.full((1,), float(p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        z, logits = self.value(x), self.attn(x)
        if self.scale > 1:
            z = F.interpolate(z, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
            logits = F.interpolate(logits, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
        z = _flat(z).clamp(min=self.eps).pow(self.p)  # (n,dim,hw)
        a = torch.softmax(_flat(logits), dim=2)  # (n,T,hw)
        z = z.view(n, self.heads, -1, z.shape[-1])  # (n,T,dim/T,hw)
        g = (z * a.unsqueeze(2)).sum(dim=3).pow(1.0 / self.p)  # (n,T,dim/T)
        return _l2(g.flatten(1))


register_head("glap")(GLAPHead)


# -------------------------------------------------------------------------------------------------- DIABLO


class DIABLOHead(nn.Module):
    """DIABLO's light form in this project (`diablo:form=light`): the dictionary-based attention of Jacob et al.
    2020 on the backbone's *final* feature map F (c,h,w), with φ and ψ small 1x1 convolutions in place of the
    backbone stages the paper uses. The default `diablo` is the paper's form (`training.diablo.DIABLOPaperHead`).

    φ: 1x1 conv c→m, ReLU, 1x1 conv m→m (the non-linear function of §3.2); ψ: 1x1 conv + ReLU to `width`
    channels, shared by the N branches (§3.5). A dictionary of N words (`words`) in R^m.

    feature-wise selection (select=feature), eq. 5-7:  s_n(u) = cos(φ(f_u), d^(n)),
        A^(n)_{u,k} = softmax_n(α s_n(u))  (the same for every dimension k)
    dimension-wise selection (select=dimension), eq. 10-11: one direction d^(n)_k per word and dimension k,
        s_{n,k}(u) = cos(φ(f_u), d^(n)_k),  A^(n)_{u,k} = softmax_n(α s_{n,k}(u))
    merging, eq. 8/12/13: X^(n)_{u,k} = A^(n)_{u,k} X_{u,k}
    pre-attention (attention=pre), eq. 3-4:  G^(n) = M(F; A),  H^(n) = ψ(G^(n))   (k runs over c)
    post-attention (attention=post), eq. 1-2: G = ψ(F),  H^(n) = M(G; A)          (k runs over `width`)
    branches: e_n = L2(W_n GAP(H^(n)) + b_n) ∈ R^{dim/N};  e = [e_1; ...; e_N] / √N  (unit norm)

    Options: words=N (default 8, must divide dim), select=dimension|feature (default dimension),
    attention=pre|post (default pre: the seed's best, Table 3), alpha (hardness, default 10), m (φ width, 64),
    width (ψ width, default 128); channels=c0 first maps F to c0 channels by a 1x1 conv + ReLU (the
    dimension-wise pre-attention costs O(N·c·(m + width)·hw); 0 keeps c).
    """

    OPTIONS = "words=8, select=dimension|feature, attention=pre|post, alpha=10, m=64, width=128, channels=0"

    def __init__(self, in_channels: int, dim: int, words: int = 8, select: str = "dimension",
                 attention: str = "pre", alpha: float = 10.0, m: int = 64, width: int | None = None,
                 channels: int = 0) -> None:
        super().__init__()
        if channels < 0:
            raise UserError(f"head diablo: channels must be 0 (keep) or positive, not {channels}")
        self.reduce = (nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=False)) if channels
                       else nn.Identity())
        in_channels = channels or in_channels
        if words < 1 or dim % words:
            raise UserError(f"head diablo: the dictionary size words={words} must divide --dim {dim}")
        if select not in ("dimension", "feature"):
            raise UserError(f"head diablo: select must be dimension or feature, not {select!r}")
        if attention not in ("pre", "post"):
            raise UserError(f"head diablo: attention must be pre or post, not {attention!r}")
        if m < 1 or (width is not None and width < 1):
            raise UserError("head diablo: m and width must be positive")
        c, width = in_channels, int(width or 128)
        self.words, self.select, self.attention, self.alpha = int(words), select, attention, float(alpha)
        self.phi = nn.Sequential(nn.Conv2d(c, m, 1), nn.ReLU(inplace=False), nn.Conv2d(m, m, 1))
        self.psi = nn.Sequential(nn.Conv2d(c, width, 1), nn.ReLU(inplace=False))
        k = c if attention == "pre" else width  # the dimensions the attention selects
        self.dictionary = nn.Parameter(torch.randn(words, k, m) if select == "dimension" else torch.randn(words, m))
        self.embed_w = nn.Parameter(torch.randn(words, width, dim // words) / width ** 0.5)
        self.embed_b = nn.Parameter(torch.zeros(words, dim // words))

    def attention_maps(self, f: torch.Tensor) -> torch.Tensor:
        """A: (n, N, k, hw) for dimension-wise, (n, N, 1, hw) for feature-wise selection."""
        phi = F.normalize(_flat(self.phi(f)), dim=1)  # (n,m,hw)
        d = F.normalize(self.dictionary, dim=-1)
        if self.select == "dimension":
            s = torch.einsum("nkm,bmu->bnku", d, phi)  # eq. 10
        else:
            s = torch.einsum("nm,bmu->bnu", d, phi).unsqueeze(2)  # eq. 5
        return torch.softmax(self.alpha * s, dim=1)  # eq. 7 / 11

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        n, c, h, w = x.shape
        a = self.attention_maps(x)
        if self.attention == "pre":
            g = _flat(x).unsqueeze(1) * a  # eq. 3, 12/13: (n,N,c,hw)
            hmap = self.psi(g.reshape(n * self.words, c, h, w))  # eq. 4, ψ shared
            pooled = hmap.mean(dim=(-2, -1)).view(n, self.words, -1)
        else:
            g = _flat(self.psi(x)).unsqueeze(1)  # eq. 1: (n,1,width,hw)
            pooled = (g * a).mean(dim=3)  # eq. 2 then GAP: (n,N,width)
        e = torch.einsum("bnw,nwd->bnd", pooled, self.embed_w) + self.embed_b
        return F.normalize(e, dim=2).flatten(1) / self.words ** 0.5


def diablo_head(in_channels: int, dim: int, form: str = "paper", stages=None, **options) -> nn.Module:
    """`diablo`: form=paper (the default) is `training.diablo.DIABLOPaperHead`, the form of Jacob, Picard, Histace &
    Klein, "DIABLO: Dictionary-based attention block for deep metric learning" (Pattern Recognition Letters 2020):
    on the backbone's mid-level map, φ and ψ the backbone's later units (`build_model` cuts the backbone through
    `diablo_head.adopt_backbone`; `stages` are those units). form=light is `DIABLOHead` above (φ, ψ small 1x1
    convolutions on the backbone's final map), this project's earlier form (the default before; checkpoints that
    recorded a plain `diablo` then load as it, `recorded_head_spec`)."""
    if form == "light":
        if stages is not None:
            raise ValueError("the light DIABLO head takes no backbone stages")
        return DIABLOHead(in_channels, dim, **options)
    if form == "paper":
        from asymsearch.training.diablo import DIABLOPaperHead
        return DIABLOPaperHead(in_channels, dim, stages=stages, **options)
    raise UserError(f"head diablo: form must be paper (the default, Jacob et al. 2020) or light (this project's "
                    f"earlier form), not {form!r}")


def _adopt_backbone(*args, **kw):
    from asymsearch.training.diablo import adopt_backbone
    return adopt_backbone(*args, **kw)


diablo_head.OPTIONS = ("form=paper|light; paper: words=8, select=dimension|feature, attention=pre|post, alpha=10, "
                       "freeze_bn=true; light: " + DIABLOHead.OPTIONS)
diablo_head.adopt_backbone = _adopt_backbone
register_head("diablo")(diablo_head)
