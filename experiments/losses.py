"""`python -m experiments losses`: one student per AML loss of Budnik & Avrithis 2021 against the same teacher, tested
symmetrically (student queries, student database) and asymmetrically (student queries, teacher database).

Protocol (CPU-sized; the table states it):

- data: class folders sorted by name; the first half trains (minus every 5th class, held out to pick the best
  epoch), the second half is the test set: every test image queries all the other test images.
- teacher: a pretrained backbone (ImageNet weights), **frozen**, plus a GeM head trained with the symmetric
  contrastive loss (in-batch hard negatives) on its cached feature maps. Its id is the content hash of its weights.
- students: a cheaper pretrained backbone (fewer FLOPs: smaller network and/or input), **frozen**, its feature
  maps cached; only the student's GeM head (dimension = the teacher's) trains, once per loss, with
  `training.student.StudentObjective`, i.e. the same mining and loss code as `asymsearch train student`. The
  teacher's embeddings of the training images are computed once and cached on disk under the teacher's id.
- epoch selection: the validation classes' Recall@1 in the setting the student trained for (asymmetric for AML
  losses, symmetric otherwise); the test classes are never looked at before the end.
- cost: GFLOPs (torch.utils.flop_counter, multiply-adds x 2) and parameters of backbone + head for one image at
  each model's input size.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from asymsearch.core.errors import UserError

from experiments.common import embed_maps, train_on_maps

# (row name, loss, trained asymmetrically, uses the teacher): the rows of Budnik & Avrithis 2021's table, plus the asymmetric
# forms of RKD and DarkRank, and the student trained alone (no teacher) as the symmetric baseline
VARIANTS = (
    ("Contr (student alone)", "contr", False),
    ("Contr+", "contr+", True),
    ("Contr", "contr", True),
    ("Triplet", "triplet", True),
    ("MS", "ms", True),
    ("Reg", "reg", True),
    ("RKD", "rkd", False),
    ("DarkRank", "darkrank", False),
    ("RKD (asym)", "rkd", True),
    ("DarkRank (asym)", "darkrank", True),
)
METRIC_KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map", "map@r")


@dataclass
class LossesExperimentConfig:
    data: str
    out: str = "docs/results/losses"  # writes OUT.md and OUT.json
    teacher_backbone: str = "efficientnet_lite0"
    teacher_size: int | None = None  # None: the backbone's native size (224 for Lite0)
    student_backbone: str = "efficientnet_lite0"
    student_size: int | None = 128  # Lite0 at 128 px: 3.05x fewer FLOPs than at 224
    pretrained: str = "imagenet"
    dim: int = 512
    teacher_epochs: int = 5
    student_epochs: int = 10
    classes_per_batch: int = 8
    per_class: int = 4
    teacher_lr: float = 1e-4  # the teacher head overfits the training classes at 1e-3 (worse than zero-shot)
    lr: float = 1e-3  # the student heads
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    margin: float = 0.5
    num_negatives: int = 5
    val_fraction: float = 0.2
    variants: tuple = tuple(v[0] for v in VARIANTS)
    seed: int = 0
    cache_dir: str = "~/.cache/asymsearch/featmaps"
    workdir: str = "~/.cache/asymsearch/experiment-losses"  # the teacher checkpoint and its cached embeddings
    threads: int = 1
    command: str = ""
    results: list = field(default_factory=list)


def _metrics(queries: np.ndarray, database: np.ndarray, labels) -> dict:
    from asymsearch.core.metrics import retrieval_metrics
    m = retrieval_metrics(queries, labels, database, labels, exclude_self=True)
    return {k: float(m[k]) for k in METRIC_KEYS}


def train_head(cfg: LossesExperimentConfig, channels: int, maps: np.ndarray, labels: list[int], objective,
               validate, epochs: int, name: str, seed: int, lr: float, log=print):
    """A GeM head trained on cached maps with `objective` (`training.engine.Step` -> loss) through the product's
    training loop; the epoch with the best `validate(head)` is kept. Returns (head, history).

    The teacher's and the students' heads must start from *different* random weights (different seeds): with
    the same initial projection of channel-aligned features (one backbone at two resolutions) a student would
    share the teacher's space before any training, and even a student trained alone would look asymmetric-ready.
    """
    from asymsearch.training.common import seed_everything
    from asymsearch.training.models import create_head

    seed_everything(seed)
    head = create_head("gem", channels, cfg.dim)

    def report(entry, epochs):
        log(f"  {name} epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4f} val R@1 {entry['val_recall@1']:.4f} "
            f"({entry['seconds']:.1f} s)")

    history = train_on_maps(head, objective, maps, labels, per_class=cfg.per_class,
                            classes_per_batch=cfg.classes_per_batch, epochs=epochs, lr=lr,
                            weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, seed=seed,
                            validate=lambda: validate(head), report=report)
    return head.eval(), history


def backbone_spec(name: str, image_size: int | None = None):
    """The serving preprocessing for backbone `name` at `image_size` (default: its native size), with the
    normalisation its weights were trained with."""
    from asymsearch.core.manifest import Preprocessing
    from asymsearch.training.models import backbone_preprocessing
    pre = backbone_preprocessing(name)
    size = int(image_size or pre["image_size"])
    return Preprocessing(resize=size, crop=size, mean=tuple(pre["mean"]), std=tuple(pre["std"]))


def model_cost(backbone: str, size: int, dim: int) -> dict:
    """GFLOPs (multiply-adds x 2, one image) and parameters of backbone + GeM head."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from asymsearch.training.models import build_model
    model = build_model({"backbone": backbone, "head": "gem", "dim": dim, "pretrained": None}).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return {"gflops": counter.get_total_flops() / 1e9, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def run_losses_experiment(cfg: LossesExperimentConfig, log=print) -> dict:
    import torch

    from asymsearch.core.data import list_image_folder, select_classes
    from asymsearch.training.addons import AddOnOptions, TrainingAddOns
    from asymsearch.training.checkpoint import make_checkpoint, save_checkpoint
    from asymsearch.training.common import best_epoch, split_train_val
    from asymsearch.training.engine import StudentStepObjective, SymmetricObjective
    from asymsearch.training.featcache import feature_maps
    from asymsearch.training.losses import ContrastiveLoss, HardNegativeMiner, create_loss
    from asymsearch.training.models import EmbeddingNet, create_backbone
    from asymsearch.training.student import StudentObjective
    from asymsearch.training.teacher_cache import cached_array, items_fingerprint

    torch.set_num_threads(max(1, cfg.threads))
    t0 = time.perf_counter()
    if not Path(cfg.data).is_dir():
        raise UserError(f"data folder not found: {cfg.data}")
    unknown = [v for v in cfg.variants if v not in {name for name, _, _ in VARIANTS}]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; choose from: {', '.join(v[0] for v in VARIANTS)}")
    train_classes, val_classes = split_train_val(select_classes(cfg.data, "first-half"), cfg.val_fraction)
    test_classes = select_classes(cfg.data, "second-half")
    classes = select_classes(cfg.data, "all")
    items = list_image_folder(cfg.data, classes)
    class_idx = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([class_idx[it.label] for it in items])
    split = {name: np.flatnonzero(np.isin([it.label for it in items], cs))
             for name, cs in (("train", train_classes), ("val", val_classes), ("test", test_classes))}

    t_spec, s_spec = backbone_spec(cfg.teacher_backbone, cfg.teacher_size), backbone_spec(cfg.student_backbone,
                                                                                          cfg.student_size)
    t_maps = feature_maps(items, cfg.teacher_backbone, cfg.pretrained, t_spec, cfg.cache_dir, log=log).maps
    s_maps = feature_maps(items, cfg.student_backbone, cfg.pretrained, s_spec, cfg.cache_dir, log=log).maps
    t_cost, s_cost = model_cost(cfg.teacher_backbone, t_spec.crop, cfg.dim), model_cost(cfg.student_backbone,
                                                                                      s_spec.crop, cfg.dim)
    if s_cost["gflops"] * 3 > t_cost["gflops"]:
        log(f"warning: the student is only {t_cost['gflops'] / s_cost['gflops']:.2f}x cheaper than the teacher")

    # ---- the teacher: frozen backbone + GeM head, symmetric contrastive loss on its cached maps
    def maps_subset(maps, rows):
        return np.asarray(maps[rows], np.float16)

    t_train, t_val, t_test = (maps_subset(t_maps, split[n]) for n in ("train", "val", "test"))
    y_train, y_val, y_test = (labels[split[n]].tolist() for n in ("train", "val", "test"))
    miner, contrastive = HardNegativeMiner(cfg.num_negatives), ContrastiveLoss(cfg.margin)
    no_addons = TrainingAddOns(AddOnOptions(), dim=cfg.dim, num_classes=len(classes))  # the plain losses
    log(f"teacher: {cfg.teacher_backbone}@{t_spec.crop} frozen + GeM head, {len(y_train)} training images")
    teacher_head, teacher_history = train_head(
        cfg, t_maps.shape[1], t_train, y_train, SymmetricObjective(contrastive, miner, no_addons),
        lambda h: _metrics(embed_maps(h, t_val, 256), embed_maps(h, t_val, 256), y_val)["recall@1"],
        cfg.teacher_epochs, "teacher",
        cfg.seed, cfg.teacher_lr, log)
    backbone, _ = create_backbone(cfg.teacher_backbone, cfg.pretrained)
    teacher = EmbeddingNet(backbone, teacher_head, cfg.dim).eval()
    ckpt = make_checkpoint(teacher, role="teacher", arch={"backbone": cfg.teacher_backbone, "head": "gem",
                                                          "dim": cfg.dim, "pretrained": cfg.pretrained},
                           preprocessing=t_spec, config={"experiment": "losses", **_plain_config(cfg)},
                           history=teacher_history)
    teacher_id = ckpt["model_id"]
    workdir = Path(cfg.workdir).expanduser()
    save_checkpoint(ckpt, workdir / f"teacher-{teacher_id}.pt")
    key = {"kind": "teacher-embeddings", "teacher_id": teacher_id, "preprocessing": t_spec.to_dict(),
           "augmentation": "none", "items": items_fingerprint(items), "count": len(items)}
    t_all = cached_array(workdir, f"teacher-{teacher_id}", key, lambda: embed_maps(teacher_head, t_maps, 256), log=log)
    pool, pool_labels = torch.from_numpy(t_all[split["train"]]), torch.as_tensor(y_train)
    g_val, g_test = t_all[split["val"]], t_all[split["test"]]
    teacher_metrics = _metrics(g_test, g_test, y_test)
    zero_shot = {}  # no training at all: global average pooling of each backbone's maps (its own space)
    for role, maps in (("teacher", t_maps), ("student", s_maps)):
        gap = np.asarray(maps[split["test"]], np.float32).mean(axis=(2, 3))
        gap /= np.linalg.norm(gap, axis=1, keepdims=True).clip(min=1e-12)
        zero_shot[role] = _metrics(gap, gap, y_test)
    log(f"teacher {teacher_id}: test {_fmt(teacher_metrics)}")

    # ---- one student head per variant
    s_train, s_val, s_test = (maps_subset(s_maps, split[n]) for n in ("train", "val", "test"))
    rows = []
    for name, loss_name, asymmetric in VARIANTS:
        if name not in cfg.variants:
            continue
        loss_kw = {"contr": {"margin": cfg.margin}, "contr+": {"margin": cfg.margin},
                   "ms": {"margin": cfg.margin}}.get(loss_name, {})
        objective = StudentObjective(loss_name, create_loss(loss_name, **loss_kw), asymmetric=asymmetric,
                                     num_negatives=cfg.num_negatives)

        def validate(head, asymmetric=asymmetric):
            f = embed_maps(head, s_val, 256)
            return _metrics(f, g_val if asymmetric else f, y_val)["recall@1"]
        start = time.perf_counter()
        head, history = train_head(cfg, s_maps.shape[1], s_train, y_train,
                                   StudentStepObjective(objective, no_addons, pool, pool_labels), validate,
                                   cfg.student_epochs, name, cfg.seed + 1, cfg.lr, log)  # not the teacher's init
        f_test = embed_maps(head, s_test, 256)
        row = {"variant": name, "loss": loss_name, "trained_asymmetric": asymmetric,
               "symmetric": _metrics(f_test, f_test, y_test), "asymmetric": _metrics(f_test, g_test, y_test),
               "best_epoch": best_epoch(history),
               "train_seconds": time.perf_counter() - start}
        log(f"{name}: sym {_fmt(row['symmetric'])} | asym {_fmt(row['asymmetric'])}")
        rows.append(row)

    return {"config": _plain_config(cfg), "teacher_id": teacher_id,
            "teacher": {"backbone": cfg.teacher_backbone, "image_size": t_spec.crop, **t_cost,
                        "metrics": teacher_metrics, "history": teacher_history},
            "student": {"backbone": cfg.student_backbone, "image_size": s_spec.crop, **s_cost,
                        "relative_gflops": s_cost["gflops"] / t_cost["gflops"],
                        "relative_params": s_cost["params_m"] / t_cost["params_m"]},
            "zero_shot": zero_shot,
            "split": {"train": {"classes": len(train_classes), "images": int(len(split["train"]))},
                      "val": {"classes": len(val_classes), "images": int(len(split["val"]))},
                      "test": {"classes": len(test_classes), "images": int(len(split["test"]))}},
            "data": "/".join(Path(cfg.data).resolve().parts[-2:]),  # e.g. cub100/images
            "rows": rows, "seconds": time.perf_counter() - t0}


def _plain_config(cfg: LossesExperimentConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "results"}


def _fmt(m: dict) -> str:
    return " ".join(f"{k.replace('recall@', 'R@')} {m[k]:.4f}" for k in ("recall@1", "recall@8", "map"))


def render_markdown(result: dict) -> str:
    t, s, cfg, sp = result["teacher"], result["student"], result["config"], result["split"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        f"# AML losses: one student per loss against the same teacher ({result['data']})", "",
        f"Command: `{cfg['command'] or 'python -m experiments losses --data DATA'}`", "",
        f"Protocol. Data: the class folders sorted by name; the first half trains ({sp['train']['classes']} "
        f"classes, {sp['train']['images']} images; {sp['val']['classes']} more classes, {sp['val']['images']} "
        f"images, evenly spaced through the first half, are held out to pick each model's best epoch), the "
        f"second half is the test set ({sp['test']['classes']} classes, {sp['test']['images']} images), where "
        "every image queries all the other test images. "
        f"Teacher: `{t['backbone']}` at {t['image_size']} px with {cfg['pretrained']} weights, **frozen**, plus a "
        f"GeM head (d = {cfg['dim']}) trained with the symmetric contrastive loss (margin {cfg['margin']}, "
        f"{cfg['num_negatives']} in-batch hard negatives, AdamW lr {cfg['teacher_lr']}) for up to "
        f"{cfg['teacher_epochs']} epochs. "
        f"Students: `{s['backbone']}` at {s['image_size']} px with {cfg['pretrained']} weights, **frozen**; "
        f"only the student's GeM head (d = {cfg['dim']}, the teacher's) trains, up to {cfg['student_epochs']} "
        f"epochs per loss, batches of {cfg['classes_per_batch']} classes x {cfg['per_class']} images, AdamW lr "
        f"{cfg['lr']}, warm-up + cosine. Both backbones' feature maps (centre crop, serving preprocessing, no "
        "augmentation) and the teacher's training-set embeddings (keyed by its id) are computed once and cached. "
        "AML losses (asym. training): anchors f(a) against teacher embeddings; Contr/Contr+/Triplet/MS negatives "
        f"are the {cfg['num_negatives']} nearest teacher embeddings of other classes in the whole training set, "
        "at most one per class, re-mined every step with the current student; Reg compares f(a) with g(a) only; "
        "RKD/DarkRank use the batch as their random pool. Symmetric training: student-student similarities (RKD and DarkRank matching the "
        "teacher's relations, as Budnik & Avrithis 2021 trains them). Each student keeps the epoch with the best validation "
        "Recall@1 in the setting it trained for. "
        "Testing: **sym** = student queries against student-embedded test images; **asym** = student queries "
        "against the teacher-embedded test images (the query itself excluded). The *GAP, no training* rows "
        "pool each frozen backbone's own feature maps (1280-d, its own space): what the features give before "
        "any head is trained. Figures are percentages.", "",
        f"Cost (one image, backbone + head, torch.utils.flop_counter, multiply-adds x 2): teacher "
        f"{t['gflops']:.3f} GFLOPs, {t['params_m']:.2f} M parameters; student {s['gflops']:.3f} GFLOPs "
        f"({s['relative_gflops']:.2f}x the teacher's, i.e. {1 / s['relative_gflops']:.2f}x cheaper), "
        f"{s['params_m']:.2f} M parameters ({s['relative_params']:.2f}x).", "",
        "| model | loss | trained | sym R@1 | R@2 | R@4 | R@8 | mAP | MAP@R | asym R@1 | R@2 | R@4 | R@8 | mAP | "
        "MAP@R | asym R@1 / teacher | asym mAP / teacher |",
        "|---|---|---|" + "---:|" * 14,
    ]
    tm = result["teacher"]["metrics"]
    lines.append(f"| teacher {t['backbone']}@{t['image_size']} | Contr | sym | "
                 + " | ".join(pct(tm[k]) for k in METRIC_KEYS) + " | – | – | – | – | – | – | 1.00 | 1.00 |")
    for role, spec in (("teacher", t), ("student", s)):
        if role in result.get("zero_shot", {}):
            zs = result["zero_shot"][role]
            lines.append(f"| {role} backbone {spec['backbone']}@{spec['image_size']}, GAP, no training | – | – | "
                         + " | ".join(pct(zs[k]) for k in METRIC_KEYS) + " | – | – | – | – | – | – | – | – |")
    for row in result["rows"]:
        sym, asym = row["symmetric"], row["asymmetric"]
        lines.append(f"| student {s['backbone']}@{s['image_size']} | {row['variant']} | "
                     f"{'asym' if row['trained_asymmetric'] else 'sym'} | "
                     + " | ".join(pct(sym[k]) for k in METRIC_KEYS) + " | "
                     + " | ".join(pct(asym[k]) for k in METRIC_KEYS)
                     + f" | {asym['recall@1'] / tm['recall@1']:.2f} | {asym['map'] / tm['map']:.2f} |")
    chance = 100 / sp["test"]["classes"]
    lines += ["", f"Chance level: with {sp['test']['classes']} test classes of similar size, a random ranking "
              f"scores R@1 ≈ mAP ≈ {chance:.0f}%.",
              f"Teacher id `{result['teacher_id']}`; total run time {result['seconds'] / 60:.1f} min on CPU."]
    return "\n".join(lines) + "\n"


def write_results(result: dict, out: str) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    md.write_text(render_markdown(result))
    js.write_text(json.dumps(result, indent=1) + "\n")
    return md, js


# ----------------------------------------------------------------------------------- orderings over seeds and data
#
# `python -m experiments losses-orderings`: the orderings the sources report, re-measured over several seeds and
# data sets (issue 26). Per data set and seed: a random split of the training half's classes into fit / validation
# classes (drawn with the seed: the DIABLO paper's protocol of model selection on random class splits), one teacher
# head per teacher loss, then one student head per student loss against that seed's contrastive teacher (AML's
# teacher loss); every model keeps its best-validation epoch and is evaluated once on the evaluation half.

TEACHER_LOSSES = ("contr", "ms", "proxy-anchor", "arcface", "cosface")
# (row, loss, trained asymmetrically, loss options): AML's rows (RKD and DarkRank trained symmetrically with the
# teacher's relations, as AML trains them), the student trained alone, and the legacy forms of RKD and DarkRank
STUDENT_VARIANTS = (
    ("Contr (student alone)", "contr", False, {}),
    ("Reg", "reg", True, {}),
    ("Contr+", "contr+", True, {}),
    ("Contr", "contr", True, {}),
    ("Triplet", "triplet", True, {}),
    ("MS", "ms", True, {}),
    ("RKD", "rkd", False, {}),
    ("DarkRank", "darkrank", False, {}),
    ("RKD (legacy form)", "rkd", False, {"form": "legacy"}),
    ("DarkRank (legacy form)", "darkrank", False, {"form": "legacy"}),
)


@dataclass
class OrderingsConfig:
    data: tuple  # image folders, one table each
    out: str = "docs/results/losses_paper"
    teacher_backbone: str = "efficientnet_lite0"
    teacher_size: int | None = None
    student_backbone: str = "efficientnet_lite0"
    student_size: int | None = 128
    pretrained: str = "imagenet"
    dim: int = 512
    seeds: tuple = (0, 1, 2)
    teacher_losses: tuple = TEACHER_LOSSES
    student_variants: tuple = tuple(v[0] for v in STUDENT_VARIANTS)
    teacher_epochs: int = 5
    student_epochs: int = 8
    classes_per_batch: int = 8
    per_class: int = 4
    teacher_lr: float = 1e-4
    proxy_lr: float = 1e-2  # the class weights of proxy-anchor, arcface, cosface (train teacher's --proxy-lr)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    margin: float = 0.5
    num_negatives: int = 5
    val_fraction: float = 0.2
    cache_dir: str = "~/.cache/asymsearch/featmaps"
    threads: int = 1
    argv: tuple = ()


def random_class_split(classes: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(fit, validation) classes: round(val_fraction * n) (at least 2) drawn at random with `seed`."""
    import random

    n_val = max(2, round(val_fraction * len(classes)))
    if len(classes) - n_val < 2:
        raise UserError(f"{len(classes)} training classes are too few to hold out {n_val} for validation")
    val = set(random.Random(seed).sample(sorted(classes), n_val))
    return [c for c in classes if c not in val], [c for c in classes if c in val]


def _teacher_criterion(name: str, cfg: OrderingsConfig, num_classes: int):
    """(criterion, miner, optimiser groups of its own parameters) as `train teacher` builds them."""
    from asymsearch.training.config import TeacherConfig
    from asymsearch.training.losses import create_loss, negative_miner
    from asymsearch.training.registry import loss_parameter_groups

    tcfg = TeacherConfig(data="", out="", loss=name, margin=cfg.margin, proxy_lr=cfg.proxy_lr, dim=cfg.dim)
    criterion = create_loss(name, tcfg, role="teacher", num_classes=num_classes, dim=cfg.dim)
    return criterion, negative_miner(name, cfg.num_negatives), loss_parameter_groups(name, criterion, tcfg)


def run_orderings_on(data: str, cfg: OrderingsConfig, log=print) -> dict:
    """Every seed's teacher and student rows on one data set."""
    import torch

    from asymsearch.core.data import list_image_folder, select_classes
    from asymsearch.training.addons import AddOnOptions, TrainingAddOns
    from asymsearch.training.common import best_epoch, seed_everything
    from asymsearch.training.engine import StudentStepObjective, SymmetricObjective
    from asymsearch.training.featcache import feature_maps
    from asymsearch.training.losses import create_loss
    from asymsearch.training.models import create_head
    from asymsearch.training.student import StudentObjective

    if not Path(data).is_dir():
        raise UserError(f"data folder not found: {data}")
    t0 = time.perf_counter()
    first, second = select_classes(data, "first-half"), select_classes(data, "second-half")
    items = list_image_folder(data, first + second)
    class_idx = {c: i for i, c in enumerate(first + second)}
    labels = np.asarray([class_idx[it.label] for it in items])
    t_spec, s_spec = backbone_spec(cfg.teacher_backbone, cfg.teacher_size), backbone_spec(cfg.student_backbone,
                                                                                          cfg.student_size)
    t_maps = feature_maps(items, cfg.teacher_backbone, cfg.pretrained, t_spec, cfg.cache_dir, log=log).maps
    s_maps = feature_maps(items, cfg.student_backbone, cfg.pretrained, s_spec, cfg.cache_dir, log=log).maps
    maps_seconds = time.perf_counter() - t0
    eval_rows = np.flatnonzero(np.isin([it.label for it in items], second))
    y_eval = labels[eval_rows].tolist()
    t_eval, s_eval = np.asarray(t_maps[eval_rows], np.float32), np.asarray(s_maps[eval_rows], np.float32)
    no_addons = TrainingAddOns(AddOnOptions(), dim=cfg.dim, num_classes=len(class_idx))
    runs = []
    for seed in cfg.seeds:
        fit_classes, val_classes = random_class_split(first, cfg.val_fraction, seed)
        rows = {n: np.flatnonzero(np.isin([it.label for it in items], cs))
                for n, cs in (("fit", fit_classes), ("val", val_classes))}
        y_fit, y_val = labels[rows["fit"]].tolist(), labels[rows["val"]].tolist()
        # the losses with class weights index the fit classes 0..C-1
        fit_index = {c: i for i, c in enumerate(sorted(set(y_fit)))}
        y_fit_local = [fit_index[y] for y in y_fit]
        t_fit, t_val = (np.asarray(t_maps[rows[n]], np.float16) for n in ("fit", "val"))
        s_fit, s_val = (np.asarray(s_maps[rows[n]], np.float16) for n in ("fit", "val"))
        run = {"seed": seed, "val_classes": sorted(val_classes), "teachers": {}, "students": {}}
        teacher_heads = {}
        for name in cfg.teacher_losses:
            start = time.perf_counter()
            seed_everything(seed)
            head = create_head("gem", t_maps.shape[1], cfg.dim)
            criterion, miner, groups = _teacher_criterion(name, cfg, len(fit_index))
            history = train_on_maps(
                head, SymmetricObjective(criterion, miner, no_addons), t_fit, y_fit_local, per_class=cfg.per_class,
                classes_per_batch=cfg.classes_per_batch, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr,
                weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, seed=seed,
                validate=lambda h=head: _metrics(embed_maps(h, t_val, 256), embed_maps(h, t_val, 256),
                                                 y_val)["recall@1"], extra_groups=groups)
            g_eval = embed_maps(head, t_eval, 256)
            run["teachers"][name] = {"eval": _metrics(g_eval, g_eval, y_eval), "best_epoch": best_epoch(history),
                                     "val_recall@1": max(h["val_recall@1"] for h in history),
                                     "seconds": time.perf_counter() - start}
            teacher_heads[name] = head
            log(f"{Path(data).parent.name} seed {seed} teacher {name}: {_fmt(run['teachers'][name]['eval'])}")
        teacher = teacher_heads["contr"]
        g_fit, g_val, g_eval = (embed_maps(teacher, m, 256) for m in (t_fit, t_val, t_eval))
        pool, pool_labels = torch.from_numpy(g_fit), torch.as_tensor(y_fit)
        run["student_teacher"] = "contr"
        for variant, loss_name, asymmetric, options in STUDENT_VARIANTS:
            if variant not in cfg.student_variants:
                continue
            start = time.perf_counter()
            kw = {"margin": cfg.margin} if loss_name in ("contr", "contr+", "ms") else {}
            objective = StudentObjective(loss_name, create_loss(loss_name, **kw, **options), asymmetric=asymmetric,
                                         num_negatives=cfg.num_negatives)
            seed_everything(seed + 1)  # not the teacher's initial projection (see train_head)
            head = create_head("gem", s_maps.shape[1], cfg.dim)

            def validate(h=head, asym=asymmetric):
                f = embed_maps(h, s_val, 256)
                return _metrics(f, g_val if asym else f, y_val)["recall@1"]
            history = train_on_maps(head, StudentStepObjective(objective, no_addons, pool, pool_labels), s_fit, y_fit,
                                    per_class=cfg.per_class, classes_per_batch=cfg.classes_per_batch,
                                    epochs=cfg.student_epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    warmup_epochs=cfg.warmup_epochs, seed=seed + 1, validate=validate)
            f_eval = embed_maps(head, s_eval, 256)
            run["students"][variant] = {"loss": loss_name, "trained_asymmetric": asymmetric, "options": options,
                                        "symmetric": _metrics(f_eval, f_eval, y_eval),
                                        "asymmetric": _metrics(f_eval, g_eval, y_eval),
                                        "best_epoch": best_epoch(history), "seconds": time.perf_counter() - start}
            log(f"{Path(data).parent.name} seed {seed} {variant}: sym {_fmt(run['students'][variant]['symmetric'])} | "
                f"asym {_fmt(run['students'][variant]['asymmetric'])}")
        runs.append(run)
    zero_shot = {}
    for role, maps in (("teacher", t_eval), ("student", s_eval)):
        gap = maps.mean(axis=(2, 3))
        gap /= np.linalg.norm(gap, axis=1, keepdims=True).clip(min=1e-12)
        zero_shot[role] = _metrics(gap, gap, y_eval)
    return {"data": "/".join(Path(data).resolve().parts[-2:]), "runs": runs, "zero_shot": zero_shot,
            "split": {"train_classes": len(first), "val_classes": len(runs[0]["val_classes"]) if runs else 0,
                      "eval_classes": len(second), "eval_images": len(eval_rows), "images": len(items)},
            "maps_seconds": maps_seconds, "seconds": time.perf_counter() - t0}


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize_orderings(table: dict) -> dict:
    """Mean ± std over seeds of every row, and the orderings checked (per seed and on the means)."""
    runs = table["runs"]
    teachers = {n: {k: _mean_std([r["teachers"][n]["eval"][k] for r in runs]) for k in METRIC_KEYS}
                for n in runs[0]["teachers"]} if runs else {}
    students = {}
    for v in (runs[0]["students"] if runs else {}):
        students[v] = {side: {k: _mean_std([r["students"][v][side][k] for r in runs]) for k in METRIC_KEYS}
                       for side in ("symmetric", "asymmetric")}

    def asym(r, v):
        return r["students"][v]["asymmetric"]["recall@1"]

    aml = [v for v in ("Reg", "Contr+", "Contr", "Triplet", "MS", "RKD", "DarkRank") if v in students]
    checks = {}
    if runs and aml:
        per_seed_order = [sorted(aml, key=lambda v: -asym(r, v)) for r in runs]
        checks["asymmetric R@1: Reg best"] = [o[0] == "Reg" for o in per_seed_order]
        checks["asymmetric R@1: Contr+ second"] = [len(o) > 1 and o[1] == "Contr+" for o in per_seed_order]
        checks["asymmetric R@1 order per seed"] = per_seed_order
        if "Contr+" in students and "Contr" in students:
            checks["asymmetric R@1: Contr+ > Contr"] = [asym(r, "Contr+") > asym(r, "Contr") for r in runs]
        if "Contr (student alone)" in students and "Contr" in students:
            checks["symmetric R@1: Contr (asym trained) > student alone"] = [
                r["students"]["Contr"]["symmetric"]["recall@1"]
                > r["students"]["Contr (student alone)"]["symmetric"]["recall@1"] for r in runs]
    if runs and teachers:
        checks["teacher R@1 order per seed"] = [sorted(teachers, key=lambda n: -r["teachers"][n]["eval"]["recall@1"])
                                                for r in runs]
    return {"teachers": teachers, "students": students, "checks": checks}


def run_orderings(cfg: OrderingsConfig, log=print) -> dict:
    import torch

    from asymsearch.core.provenance import provenance

    torch.set_num_threads(max(1, cfg.threads))
    unknown = [v for v in cfg.student_variants if v not in {v[0] for v in STUDENT_VARIANTS}]
    if unknown:
        raise UserError(f"unknown student variant(s) {', '.join(unknown)}; choose from: "
                        f"{', '.join(v[0] for v in STUDENT_VARIANTS)}")
    result = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
              "provenance": provenance(list(cfg.argv) or None), "tables": []}
    for data in cfg.data:
        table = run_orderings_on(data, cfg, log)
        table["summary"] = summarize_orderings(table)
        result["tables"].append(table)
        write_orderings(result, cfg.out)  # what has finished, at once
    return result


def _pm(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def render_orderings(result: dict) -> str:
    cfg, prov = result["config"], result["provenance"]
    lines = ["# Loss orderings re-measured: teacher and student losses, paper forms, several seeds", "",
             f"Command: `{prov.get('command') or 'python -m experiments losses-orderings'}`  ",
             f"Commit `{prov.get('commit')}`{' (dirty)' if prov.get('dirty') else ''}, "
             f"{prov.get('date') or prov.get('time') or ''}, machine: {_machine_line(prov)}.", "",
             "Regime: **frozen backbones** (ImageNet EfficientNet-Lite0, its feature maps computed once and cached; "
             f"only a GeM head of d = {cfg['dim']} trains). The partly trained regime (the CPU recipe, "
             "`--tune-units`) was **not run** here (2 shared CPU cores; see the issue).", "",
             f"Protocol: per data set and seed ({', '.join(map(str, cfg['seeds']))}), the training half's classes are "
             f"split **at random** (seeded) into fit classes and {round(100 * cfg['val_fraction'])}% validation "
             "classes; every model is chosen on validation classes carved from the training half (its best epoch by "
             "validation Recall@1: symmetric for teachers and symmetrically trained students, asymmetric for AML "
             "students), and the evaluation half is reported once. Teachers: "
             f"`{cfg['teacher_backbone']}` at {cfg['teacher_size'] or 'its own size'} px, one head per teacher loss, "
             f"{cfg['teacher_epochs']} epochs, AdamW lr {cfg['teacher_lr']} (class weights / proxies at "
             f"{cfg['proxy_lr']}), batches of {cfg['classes_per_batch']} classes x {cfg['per_class']}. Students: "
             f"`{cfg['student_backbone']}` at {cfg['student_size']} px (about 3x fewer FLOPs), one head per loss, "
             f"{cfg['student_epochs']} epochs, lr {cfg['lr']}, against that seed's **contrastive** teacher (AML's "
             f"teacher loss); Contr/Contr+/Triplet/MS mine {cfg['num_negatives']} hard negatives among the teacher's "
             "training-set embeddings; RKD and DarkRank use the batch as their random pool and are trained "
             "symmetrically with the teacher's relations, as AML trains them. Loss forms are the defaults (the "
             "sources' equations, docs/losses.md); the *legacy form* rows are the earlier forms. Figures: "
             "percentages, mean ± std over the seeds (sample std). **sym** = student queries against "
             "student-embedded evaluation images; **asym** = student queries against the teacher-embedded ones.", ""]
    for table in result["tables"]:
        s, sp = table["summary"], table["split"]
        lines += [f"## {table['data']}", "",
                  f"{sp['images']} images; {sp['train_classes']} training classes ({sp['val_classes']} of them "
                  f"validation, drawn per seed), {sp['eval_classes']} evaluation classes ({sp['eval_images']} "
                  f"images). Chance R@1 ≈ {100 / sp['eval_classes']:.0f}%. Run time {table['seconds'] / 60:.1f} "
                  f"min (of which feature maps {table['maps_seconds'] / 60:.1f}).", "",
                  "### Teacher losses", "",
                  "| teacher loss | R@1 | R@2 | R@4 | R@8 | mAP | MAP@R |", "|---|" + "---:|" * 6]
        for role in ("teacher",):
            zs = table["zero_shot"][role]
            lines.append("| GAP, no training | " + " | ".join(f"{100 * zs[k]:.1f}" for k in METRIC_KEYS) + " |")
        for name, m in s["teachers"].items():
            lines.append(f"| {name} | " + " | ".join(_pm(m[k]) for k in METRIC_KEYS) + " |")
        lines += ["", "### Student losses (against the contrastive teacher)", "",
                  "| student loss | trained | sym R@1 | sym mAP | asym R@1 | asym R@8 | asym mAP |",
                  "|---|---|" + "---:|" * 5]
        zs = table["zero_shot"]["student"]
        lines.append(f"| GAP, no training | – | {100 * zs['recall@1']:.1f} | {100 * zs['map']:.1f} | – | – | – |")
        for v, m in s["students"].items():
            trained = next((r["students"][v]["trained_asymmetric"] for r in table["runs"]), False)
            lines.append(f"| {v} | {'asym' if trained else 'sym'} | {_pm(m['symmetric']['recall@1'])} | "
                         f"{_pm(m['symmetric']['map'])} | {_pm(m['asymmetric']['recall@1'])} | "
                         f"{_pm(m['asymmetric']['recall@8'])} | {_pm(m['asymmetric']['map'])} |")
        lines += ["", "### Orderings, seed by seed", ""]
        for check, values in s["checks"].items():
            if values and isinstance(values[0], bool):
                lines.append(f"- {check}: holds in {sum(values)} of {len(values)} seeds")
            else:
                lines.append(f"- {check}: " + "; ".join(" > ".join(o) for o in values))
        lines.append("")
    return "\n".join(lines) + "\n"


def _machine_line(prov: dict) -> str:
    m = prov.get("machine") or {}
    if isinstance(m, dict):
        return (f"{m.get('cpu')}, {m.get('usable_cores')} of {m.get('cores')} cores usable, {m.get('ram_gb')} GB RAM, "
                f"{m.get('os')}")
    return str(m)


def write_orderings(result: dict, out: str) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    md.write_text(render_orderings(result))
    js.write_text(json.dumps(result, indent=1) + "\n")
    return md, js
