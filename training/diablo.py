"""DIABLO as its paper builds it (Jacob, Picard, Histace & Klein, "DIABLO: Dictionary-based attention block for deep
metric learning", Pattern Recognition Letters 2020): attention on *mid-level* features, with φ and ψ taken from
the backbone itself.

The paper (§4.1, GoogleNet): for pre-attention, F is GoogleNet up to the max-pooling between its third and fourth
scales; φ = the five Inception blocks of the fourth scale (ImageNet weights, a copy shared by the N dictionary
entries); ψ = the fourth and fifth scales, shared by the N attended maps and independent of φ. For post-attention,
F goes up to the pooling between the fourth and fifth scales, φ = two fifth-scale blocks and ψ = the fifth scale.
Each branch is average-pooled, embedded to dim/N and L2-normalised; the branches are concatenated.

This is what `diablo` builds by default (`diablo:form=paper`); the project's earlier, light form on the final map
(φ and ψ 1x1 convolutions, `training.heads.DIABLOHead`) is `diablo:form=light`.

Here (`training.backbones.mid_level_split`) the same cut is made in our backbones: the model's backbone becomes
the trunk F = units[:split], φ = a copy of units[split:phi_end] (with the backbone's weights), ψ = units[split:]
(the backbone's own later units, moved into the head). `adopt_backbone` makes that cut for `build_model`.

Equations (F (c,h,w), f_u its feature at position u, φ(F) (m,h,w), ψ's output width channels):
    feature-wise selection, eq. 5-7:    A^(n)_{u,k} = softmax_n(α cos(φ(f_u), d^(n)))       (the same for all k)
    dimension-wise selection, eq. 10-11: A^(n)_{u,k} = softmax_n(α cos(φ(f_u), d^(n)_k))
    merging, eq. 8 / 12-13:              M(X; A)^(n)_{u,k} = A^(n)_{u,k} X_{u,k}
    pre-attention, eq. 3-4:   G^(n) = M(F; A),  H^(n) = ψ(G^(n))      (k over F's c channels)
    post-attention, eq. 1-2:  G = ψ(F),  H^(n) = M(G; A)               (k over ψ's channels; φ(F) at ψ(F)'s size)
    branch n:                 e_n = L2(W_n GAP(H^(n)) + b_n) ∈ R^{dim/N};   e = [e_1; ...; e_N] / √N
The final 1/√N makes e unit-norm (every descriptor here is); it changes no cosine. N = 1 is the paper's baseline:
no φ, no dictionary, e = L2(W GAP(ψ(F)) + b) -- the same later stages, trained the same way, without attention.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from asymsearch.core.errors import UserError

OPTIONS = "form=paper, words=8, select=dimension|feature, attention=pre|post, alpha=10, freeze_bn=true"


@dataclass
class BackboneStages:
    """The later stages a paper-form DIABLO head owns: φ (None for N = 1), ψ, and their output channels."""

    phi: nn.Module | None
    psi: nn.Module
    phi_channels: int
    psi_channels: int


def check_options(dim: int, words: int = 8, select: str = "dimension", attention: str = "pre",
                  alpha: float = 10.0, freeze_bn: bool = True) -> None:
    """Refuse bad options in one line each (before any weights load)."""
    if not isinstance(words, int) or words < 1 or dim % words:
        raise UserError(f"head diablo: the dictionary size words={words} must divide --dim {dim} "
                        f"(a positive divisor of {dim}; words=1 is the baseline without attention)")
    if select not in ("dimension", "feature"):
        raise UserError(f"head diablo: select must be dimension or feature, not {select!r}")
    if attention not in ("pre", "post"):
        raise UserError(f"head diablo: attention must be pre or post, not {attention!r}")
    if not float(alpha) > 0:
        raise UserError(f"head diablo: alpha (the assignment hardness) must be positive, not {alpha}")
    if not isinstance(freeze_bn, bool):
        raise UserError(f"head diablo: freeze_bn must be true or false, not {freeze_bn!r}")


@torch.no_grad()
def _out_shape(module: nn.Module, x: torch.Tensor) -> torch.Size:
    was = module.training
    module.eval()
    try:
        return module(x).shape
    finally:
        module.train(was)


def cut_backbone(backbone_name: str, backbone: nn.Module, attention: str, words: int
                 ) -> tuple[nn.Module, BackboneStages, int]:
    """Split `backbone` at its mid-level point for `attention`: (trunk = units[:split], the head's stages, the
    trunk's channels c). φ is a deep copy of units[split:phi_end] (so it starts from the backbone's weights, and
    trains apart from ψ); ψ is units[split:] themselves."""
    from asymsearch.training.backbones import backbone_units, mid_level_split

    split, phi_end = mid_level_split(backbone_name, attention)
    units = backbone_units(backbone)
    trunk, psi = nn.Sequential(*units[:split]), nn.Sequential(*units[split:])
    phi = copy.deepcopy(nn.Sequential(*units[split:phi_end])) if words > 1 else None
    probe = torch.zeros(1, 3, 64, 64)
    f_shape = _out_shape(trunk, probe)
    fmap = torch.zeros(f_shape)
    psi_shape = _out_shape(psi, fmap)
    phi_shape = _out_shape(phi, fmap) if phi is not None else None
    if phi_shape is not None:
        want = f_shape[2:] if attention == "pre" else psi_shape[2:]
        if phi_shape[2:] != want:  # a split table entry that does not fit its backbone: our bug, not the user's
            raise ValueError(f"{backbone_name}: φ maps {tuple(f_shape[2:])} to {tuple(phi_shape[2:])}, "
                             f"attention needs {tuple(want)}")
    return trunk, BackboneStages(phi, psi, int(phi_shape[1]) if phi_shape else 0, int(psi_shape[1])), int(f_shape[1])


def adopt_backbone(backbone_name: str, backbone: nn.Module | None, dim: int, form: str = "paper", **options):
    """`build_model`'s hook for a head that takes over the backbone's later units: None for the light form (the
    head then reads the whole backbone's map, as every other head). For form=paper (the default), with `backbone`
    None: check the options and that `backbone_name` has a split point, before any weights load, and return
    (None, {}); with the built backbone: (trunk, the keyword arguments that give the head its stages)."""
    if form != "paper":
        return None
    unknown = set(options) - set(_PAPER_KEYS)
    if unknown:
        light = sorted(unknown & set(_LIGHT_ONLY_KEYS))
        hint = (f" ({', '.join(light)}: option(s) of the light form, diablo:form=light,...)" if light else "")
        raise UserError(f"head diablo:form=paper (the default) does not take option(s) {', '.join(sorted(unknown))}"
                        f"{hint}; its options: {OPTIONS}")
    check_options(dim, **options)
    attention, words = options.get("attention", "pre"), options.get("words", 8)
    if backbone is None:
        from asymsearch.training.backbones import mid_level_split
        mid_level_split(backbone_name, attention)
        return None, {}
    trunk, stages, _ = cut_backbone(backbone_name, backbone, attention, words)
    return trunk, {"stages": stages}


_PAPER_KEYS = ("words", "select", "attention", "alpha", "freeze_bn")
_LIGHT_ONLY_KEYS = ("m", "width", "channels")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2)


class DIABLOPaperHead(nn.Module):
    """The paper-form DIABLO head on the trunk's mid-level map F (see the module doc). `stages`: φ and ψ
    (`cut_backbone`). With `freeze_bn` (default), the batch norms of φ and ψ keep the backbone's statistics in
    training mode (eval mode), as the trainable tail of `--tune-units` does: the N attended maps of a few
    classes would skew them."""

    owns_backbone_units = True  # training.trunk.TailNet refuses --tune-units with it

    def __init__(self, in_channels: int, dim: int, stages: BackboneStages | None = None, words: int = 8,
                 select: str = "dimension", attention: str = "pre", alpha: float = 10.0,
                 freeze_bn: bool = True) -> None:
        super().__init__()
        check_options(dim, words, select, attention, alpha, freeze_bn)
        if stages is None:
            raise UserError("head diablo (form=paper, the default) takes over the backbone's later units: build it "
                            "with its backbone (asymsearch train teacher --backbone ... --head diablo); on a bare "
                            "feature map use diablo:form=light")
        if words > 1 and stages.phi is None:
            raise ValueError("words > 1 needs φ")
        self.words, self.select, self.attention, self.alpha = int(words), select, attention, float(alpha)
        self.freeze_bn = freeze_bn
        self.phi, self.psi = stages.phi, stages.psi
        width, m = stages.psi_channels, stages.phi_channels
        self.width = width
        if words > 1:
            k = in_channels if attention == "pre" else width  # the dimensions the attention selects
            shape = (words, k, m) if select == "dimension" else (words, m)
            self.dictionary = nn.Parameter(torch.randn(shape))
        self.embed_w = nn.Parameter(torch.randn(words, width, dim // words) / width ** 0.5)
        self.embed_b = nn.Parameter(torch.zeros(words, dim // words))

    def train(self, mode: bool = True) -> DIABLOPaperHead:
        super().train(mode)
        if mode and self.freeze_bn:
            from asymsearch.training.backbones import freeze_batch_norm
            freeze_batch_norm(self.psi)
            if self.phi is not None:
                freeze_batch_norm(self.phi)
        return self

    def attention_maps(self, f: torch.Tensor) -> torch.Tensor:
        """A from the trunk map f: (n, N, k, hw) dimension-wise, (n, N, 1, hw) feature-wise; hw of φ(f)."""
        phi = F.normalize(_flat(self.phi(f)), dim=1)  # (n,m,hw): φ(f_u)/||φ(f_u)||
        d = F.normalize(self.dictionary, dim=-1)
        if self.select == "dimension":
            s = torch.einsum("nkm,bmu->bnku", d, phi)  # eq. 10
        else:
            s = torch.einsum("nm,bmu->bnu", d, phi).unsqueeze(2)  # eq. 5
        return torch.softmax(self.alpha * s, dim=1)  # eq. 7 / 11: over the N entries

    def branches(self, x: torch.Tensor) -> torch.Tensor:
        """(n, N, width): GAP(H^(n)) of every branch."""
        n, c, h, w = x.shape
        if self.words == 1:
            return self.psi(x).mean(dim=(-2, -1)).unsqueeze(1)
        a = self.attention_maps(x)
        if self.attention == "pre":
            g = _flat(x).unsqueeze(1) * a  # eq. 3, 12-13: (n,N,c,hw)
            hmap = self.psi(g.reshape(n * self.words, c, h, w))  # eq. 4: ψ on each attended map, shared
            return hmap.mean(dim=(-2, -1)).reshape(n, self.words, -1)
        g = _flat(self.psi(x)).unsqueeze(1)  # eq. 1: (n,1,width,hw')
        return (g * a).mean(dim=3)  # eq. 2 then GAP: (n,N,width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.einsum("bnw,nwd->bnd", self.branches(x), self.embed_w) + self.embed_b
        return F.normalize(e, dim=2).flatten(1) / self.words ** 0.5
