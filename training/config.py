"""Training configurations: plain dataclasses, importable without torch (the CLI builds its options from them).

Every field is a command-line option of `asymsearch train teacher` / `train student` (a nested dataclass's fields
too: `--metrix` for the key `addons.metrix`); the whole config is saved in the checkpoint, so every model says how it
was made.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace

from asymsearch.core.errors import UserError

METRIX_MODES = ("off", "input", "feature", "embedding")


def _opt(default, help: str):
    """A field with its command-line help (`asymsearch.cli.options` reads `metadata["help"]`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AddOnOptions:
    """The training add-ons (`training.addons`; docs/addons.md), one nested config of every trainer (`addons.*` keys,
    flags `--metrix` ...) and of the add-ons experiment. None changes the exported model."""

    metrix: str = _opt("off", "Metrix mixup (Venkataramanan et al. 2022), training only: off, input, feature or "
                              "embedding; see docs/addons.md")
    metrix_alpha: float = _opt(2.0, "Metrix: the interpolation factor is drawn from Beta(alpha, alpha)")
    metrix_weight: float = _opt(1.0, "Metrix: weight of the mixed-example loss")
    osm_caa: bool = _opt(False, "online soft mining + class-aware attention pair weights (Wang et al. 2019), "
                                "training only")
    osm_sigma: float = _opt(0.8, "OSM: sigma of the positive-pair weight exp(-d^2/sigma^2)")
    osm_alpha: float | None = _opt(None, "OSM: alpha of the negative-pair weight max(0, alpha - d) (unset: "
                                         "sqrt(2 - 2 margin))")
    osm_form: str = _opt("paper", "OSM + CAA pair terms: paper (d^2 and max(0, alpha - d)^2, the poster's "
                                  "contrastive loss) or legacy (the contrastive loss's -s and [s - m]_+)")
    caa_weight: float = _opt(1.0, "CAA: weight of the class-centre cross-entropy")
    message_passing: int = _opt(0, "intra-batch message-passing layers (Seidenschwarz et al. 2021), training only; "
                                   "0 disables")
    mp_weight: float = _opt(1.0, "message passing: weight of its cross-entropy")

    def with_overrides(self, **kw) -> AddOnOptions:
        return replace(self, **kw)

    @property
    def any(self) -> bool:
        return self.metrix != "off" or self.osm_caa or self.message_passing > 0

    @property
    def batch_wide(self) -> bool:
        """An add-on that works inside one process's batch (Metrix's pairs, the message-passing graph)."""
        return self.metrix != "off" or self.message_passing > 0

    def check(self) -> None:
        """`UserError` for a value that has no meaning."""
        if self.metrix not in METRIX_MODES:
            raise UserError(f"metrix must be one of {', '.join(METRIX_MODES)}, not {self.metrix!r}")
        if not (self.metrix_alpha > 0 and math.isfinite(self.metrix_alpha)):
            raise UserError(f"metrix_alpha (of Beta(α, α)) must be positive, not {self.metrix_alpha}")
        if not self.osm_sigma > 0:
            raise UserError(f"osm_sigma must be positive, not {self.osm_sigma}")
        if self.osm_alpha is not None and not self.osm_alpha > 0:
            raise UserError(f"osm_alpha must be positive (or unset), not {self.osm_alpha}")
        if self.osm_form not in ("paper", "legacy"):
            raise UserError(f"osm_form must be paper or legacy, not {self.osm_form!r}")
        if not 0 <= self.message_passing <= 16:
            raise UserError(f"message_passing is a number of layers in 0..16 (0: off), not {self.message_passing}")
        for name in ("metrix_weight", "caa_weight", "mp_weight"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be >= 0, not {getattr(self, name)}")

    def describe(self) -> str:
        parts = []
        if self.metrix != "off":
            parts.append(f"Metrix ({self.metrix}, α={self.metrix_alpha:g}, weight {self.metrix_weight:g})")
        if self.osm_caa:
            parts.append(f"OSM+CAA (σ={self.osm_sigma:g}, α={self.osm_alpha if self.osm_alpha else '√(2−2m)'}, "
                         f"{self.osm_form} form, CE weight {self.caa_weight:g})")
        if self.message_passing:
            parts.append(f"message passing ({self.message_passing} layers, CE weight {self.mp_weight:g})")
        return ", ".join(parts) or "none"


@dataclass
class TeacherConfig:
    data: str
    out: str
    backbone: str = "resnet50"
    head: str = "gem"  # a head spec: name[:key=value,...], e.g. diablo:words=8 (training.models)
    dim: int = 512
    pretrained: str | None = None  # None, "imagenet", a torchvision weights name, or a .pth path
    image_size: int | None = None  # None -> the backbone's own (backbone_preprocessing); else this square crop
    resize: int | None = None  # None -> image_size: shorter side resized to this, then centre crop image_size
    mean: tuple = ()  # () -> the backbone's own normalisation (backbone_preprocessing)
    std: tuple = ()
    classes: str = _opt("first-half", "class folders to train on: first-half (which keeps the evaluation half, "
                                      "second-half, unseen), second-half, all, or a comma-separated list; the "
                                      "halves split the folder names in Python's sorted() order (by code point: "
                                      "case-sensitive, 'Zebra' before 'ant'), the first len // 2 train")
    epochs: int = 10
    classes_per_batch: int = 8
    per_class: int = 4
    lr: float = 1e-4  # the new layers' (head's) learning rate
    backbone_lr: float | None = None  # None -> lr / 10 with pretrained weights, lr without; 0 freezes the backbone
    tune_units: int = 0  # 0: the whole backbone trains; N: only its last N units, on cached trunk maps (training.trunk)
    trunk_cache: str = "~/.cache/asymsearch/trunk"  # where tune_units keeps the frozen trunk's maps
    trunk_views: int = 1  # tune_units: cached views per training image (1: serving crop; more: + augmented views)
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0  # linear warm-up, then cosine decay to 0 (schedule="cosine")
    schedule: str = "cosine"  # cosine | constant
    loss: str = "contr"  # contr (Budnik & Avrithis 2021's teacher loss) | ms (multi-similarity; num_negatives >= batch: all)
    # | proxy-anchor (training.proxies: one learned proxy per class, no mining)
    margin: float = 0.5
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    proxy_alpha: float = 32.0  # Proxy-Anchor's scale α
    proxy_delta: float = 0.1  # Proxy-Anchor's margin δ
    proxy_lr: float = 1e-2  # the proxies' learning rate (AdamW, no weight decay; the paper's 100 × 1e-4)
    arcface_scale: float = _opt(64.0, "ArcFace (Deng et al. 2019) scale s; the class weights learn at --proxy-lr")
    arcface_margin: float = _opt(0.5, "ArcFace additive angular margin m, radians in (0, pi/2)")
    cosface_scale: float = _opt(64.0, "CosFace (Wang et al. 2018) scale s; the class weights learn at --proxy-lr")
    cosface_margin: float = _opt(0.35, "CosFace cosine margin m, in [0, 1)")
    num_negatives: int = 5
    xbm: int = 0  # cross-batch memory: recent embeddings kept to mine negatives from (0 disables)
    xbm_weight: float = 1.0
    compatible_with: str | None = _opt(None, "train compatible with an old teacher (Shen et al. 2020, BCT): its .onnx "
                                             "or an index it embedded; students of the new teacher can then query "
                                             "the old index (training.compat)")
    compat_weight: float = _opt(1.0, "with compatible_with: weight of BCT's influence loss through the old "
                                     "teacher's class means")
    compat_regression: float = _opt(0.0, "with compatible_with: weight of the regression onto the old teacher's "
                                         "embedding of the same image")
    compat_scale: float = _opt(16.0, "with compatible_with: scale of the cosine logits of the influence loss")
    val_fraction: float = 0.2  # every k-th selected class held out for per-epoch validation Recall@1; 0 disables
    floor: bool = _opt(True, "zero-shot is the floor: with pretrained weights and validation classes, measure the "
                             "pretrained backbone with average pooling on the validation classes first and write it "
                             "instead of the trained model unless training beats it there on Recall@1 and mAP")
    resume: str | None = None  # training state (OUT.state.pt) to continue from
    amp: bool = True  # mixed precision (float16 autocast) when training on CUDA; ignored on CPU
    freeze_bn: bool = False  # the backbone's batch-norm layers keep their pretrained statistics while it trains
    ema: float = 0.0  # decay of an exponential moving average of the weights per step (0: off); validation, best
    # epoch and checkpoint then use the averaged weights
    max_steps_per_epoch: int = 0  # 0: full epochs; N: stop each epoch after N batches (timing, smoke runs)
    # training add-ons (training.addons; docs/addons.md): none changes the exported model
    addons: AddOnOptions = field(default_factory=AddOnOptions)
    seed: int = 0
    init_seed: int | None = None  # None: seed; else head and proxies start as with this seed (runs to average)
    workers: int = 2
    device: str = "auto"  # auto -> cuda if available else cpu


@dataclass
class StudentConfig:
    data: str
    teacher: str
    out: str
    backbone: str = "mobilenet_v3_small"
    head: str = "gem"
    pretrained: str | None = None
    from_teacher: bool = False  # start as a copy of the teacher (same backbone and head), e.g. at a smaller image_size
    dim: int | None = None  # None: the teacher's; anything else must equal it (a clear error otherwise)
    image_size: int | None = None  # None: the teacher's preprocessing; else the student's own square input size
    backbone_lr: float | None = None  # None: lr (the whole student at one rate); 0 freezes the backbone
    tune_units: int = 0  # 0: the whole student trains; N: only its backbone's last N units and the head, on cached
    trunk_cache: str = "~/.cache/asymsearch/trunk"  # trunk maps (training.trunk); N > 0 needs pretrained weights
    trunk_views: int = 1  # tune_units: cached views per training image (1: serving crop; more: + augmented views)
    loss: str = "reg"  # training.losses.LOSSES: reg, contr, contr+, triplet, ms, rkd, darkrank
    asymmetric: bool = True  # compare student anchors with teacher embeddings (AML); False: student-student
    margin: float = 0.5  # contr, contr+ (m); triplet uses its own margin below
    triplet_margin: float = 0.1
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    rkd_distance_weight: float = 1.0
    rkd_angle_weight: float = 2.0
    rkd_form: str = _opt("paper", "RKD form: paper (per-anchor sums of Huber terms on raw distances and angles, as "
                                  "Budnik & Avrithis 2021 write it) or legacy (Huber means, distances over their "
                                  "batch mean)")
    darkrank_form: str = _opt("paper", "DarkRank form: paper (no similarity scale, as Budnik & Avrithis 2021 write "
                                       "it) or legacy (scale 10)")
    darkrank_scale: float | None = _opt(None, "DarkRank similarity scale (unset: the form's, 1 for paper, 10 for "
                                              "legacy)")
    # training add-ons (training.addons; docs/addons.md): none changes the exported model
    addons: AddOnOptions = field(default_factory=AddOnOptions)
    num_negatives: int = 5  # hard negatives per anchor, mined among the teacher's training-set embeddings
    per_class: int = 4  # images per class in a batch of batch_size (class-balanced batches)
    cache_dir: str | None = None  # teacher-embedding cache; None: teacher-cache/ beside the output checkpoint
    classes: str = _opt("first-half", "class folders to train on: first-half (which keeps the evaluation half, "
                                      "second-half, unseen), second-half, all, or a comma-separated list; the "
                                      "halves split the folder names in Python's sorted() order (by code point: "
                                      "case-sensitive, 'Zebra' before 'ant'), the first len // 2 train")
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    keep_start: bool = _opt(False, "write the student as it started (pretrained, or the teacher at its size) "
                                   "instead of the trained one when the start is better on the validation classes "
                                   "(student->teacher Recall@1, then mAP): the student's own floor")
    seed: int = 0
    workers: int = 2
    device: str = "auto"


def flat_config(config: dict, prefix: str = "") -> dict:
    """A saved config as dotted keys (`addons.metrix`); a config saved before the add-ons were one nested config had
    their fields at the top level (`metrix`): they are read as the nested keys."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    if not prefix:
        for name in (f.name for f in dataclasses.fields(AddOnOptions)):
            if name in flat:
                flat[f"addons.{name}"] = flat.pop(name)
    return flat
