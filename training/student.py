"""Student training (asymmetric metric learning, Budnik & Avrithis 2021): the teacher g is frozen, the student f_θ trains with one
of the AML losses (`training.losses.LOSSES`) so that its queries land in the teacher's space and search a database
the teacher embedded.

One training step (`StudentObjective`), for a class-balanced batch B of training images:

- asymmetric (AML, the default): anchors f_θ(a), a ∈ B; the reference is g(B) (the anchors' own teacher
  embeddings, so Reg / Contr⁺ find g(a)) followed by the hard negatives mined for each anchor among the teacher
  embeddings of the **whole training set** (k nearest of non-matching classes, at most one per class, by
  f_θ(a)·g(x): `training.mining.mine_hard_negatives`, re-mined at every step with the current student). RKD and
  DarkRank compare with the random pool g(B).
- symmetric: anchors and reference are f_θ(B) (labels only, in-batch hard negatives, one per class); RKD and
  DarkRank match the teacher's relations g(B) inside the student's space, as the seed trains them.

The teacher's embeddings of the training set come from `training.teacher_cache` (computed once, on disk, keyed
by the teacher id). So that they are exactly the targets of what the student sees, the student trains on the
serving preprocessing of each image (no random augmentation), at its own input size; with `tune_units` and
`trunk_views` K > 1, it also sees K − 1 cached augmented views of each image (`training.trunk`), each regressed
onto the teacher's embedding of the serving view, the one a database holds. With `from_teacher`, the student
starts as a copy of the teacher (same backbone and head, its own input size): at a smaller size it is, before
any step, the teacher at a cheaper resolution, already close to the teacher's space. The training add-ons
(`metrix`, `osm_caa`, `message_passing`; `training.addons`, docs/addons.md) compose with the objective: its
`reference` (the mined teacher items) is shared with them.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.core.spread import check_spread
from asymsearch.training.checkpoint import freeze, load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from asymsearch.training.common import embed_dataset, loader_kwargs, output_path, prepare_data, resolve_device, \
    seed_everything
from asymsearch.training.config import StudentConfig
from asymsearch.training.addons import TrainingAddOns
from asymsearch.training.data import ImageDataset, eval_transform
from asymsearch.training.distributed import DistContext, DistributedMPerClassSampler
from asymsearch.training.engine import Engine, StudentStepObjective
from asymsearch.training.floor import format_metrics
from asymsearch.training.heads import explicit_head_spec
from asymsearch.training.inputs import check_training_items
from asymsearch.training.losses import (ASYMMETRIC_ONLY, LOSSES, MINED_LOSSES, RELATIONAL_LOSSES, AMLLoss,
                                        create_loss)
from asymsearch.training.mining import HardNegativeMiner, mine_hard_negatives
from asymsearch.training.models import build_model
from asymsearch.training.schedule import parameter_groups
from asymsearch.training.teacher_cache import teacher_embeddings
from asymsearch.training.trunk import MapsDataset, TailNet, check_trunk_views, trunk_maps


class StudentObjective:
    """The loss of one batch: builds the reference (teacher or student embeddings), mines, calls the loss.

    `__call__(anchors, labels, idx, teacher_pool, pool_labels)`: anchors = f_θ of the batch (B, d); idx (B,) the
    batch's rows in the training set; teacher_pool (M, d) = g of the whole training set, pool_labels (M,).
    """

    def __init__(self, name: str, loss: AMLLoss, *, asymmetric: bool, num_negatives: int) -> None:
        if name not in LOSSES:
            raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
        if name in ASYMMETRIC_ONLY and not asymmetric:
            raise UserError(f"the {name} loss compares the student with the teacher's embedding of the same image; "
                            f"it has no symmetric form (use --asymmetric)")
        if num_negatives < 1:
            raise UserError(f"num_negatives must be at least 1, not {num_negatives}")
        self.name, self.loss, self.asymmetric, self.k = name, loss, asymmetric, num_negatives

    def __call__(self, anchors: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, teacher_pool: torch.Tensor,
                 pool_labels: torch.Tensor) -> torch.Tensor:
        return self.loss(anchors, labels, **self.reference(anchors, labels, idx, teacher_pool, pool_labels))

    def reference(self, anchors: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, teacher_pool: torch.Tensor,
                  pool_labels: torch.Tensor) -> dict:
        """The keyword arguments of the loss call for this batch (negatives_idx, reference, reference_labels,
        self_idx / teacher_anchors), mined as the module doc says; the training add-ons reuse them."""
        b = anchors.shape[0]
        own = teacher_pool[idx]  # g(a) for the batch, from the cache
        if not self.asymmetric:
            if self.name in MINED_LOSSES:
                return {"negatives_idx": HardNegativeMiner(self.k, one_per_class=True)(anchors, labels)}
            return {"teacher_anchors": own}
        self_idx = torch.arange(b, device=anchors.device)
        if self.name not in MINED_LOSSES:
            return {"reference": own, "reference_labels": labels, "self_idx": self_idx}
        mined = mine_hard_negatives(anchors, labels, teacher_pool, pool_labels, self.k, one_per_class=True)
        flat = mined.reshape(-1)
        reference = torch.cat([own, teacher_pool[flat.clamp(min=0)]])
        reference_labels = torch.cat([labels, pool_labels[flat.clamp(min=0)]])
        negatives = torch.arange(b, b + flat.numel(), device=anchors.device).reshape(b, self.k)
        negatives = negatives.masked_fill(mined < 0, -1)
        return {"negatives_idx": negatives, "reference": reference, "reference_labels": reference_labels,
                "self_idx": self_idx}


class _Indexed(Dataset):
    """(image, label, index) so a batch can fetch its rows of the cached teacher embeddings."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, label, i


def student_preprocessing(teacher_spec: Preprocessing, image_size: int | None) -> Preprocessing:
    """The teacher's preprocessing, or the same at the student's own (square) input size."""
    if image_size is None:
        return teacher_spec
    if image_size < 16:
        raise UserError(f"image_size must be at least 16 pixels, not {image_size}")
    resize = round(teacher_spec.resize * image_size / teacher_spec.crop)
    return dataclasses.replace(teacher_spec, resize=resize, crop=image_size)


def train_student(cfg: StudentConfig, ctx: DistContext | None = None) -> Path:
    """Train a student onto a frozen teacher with the AML loss `cfg.loss`; return the checkpoint.

    The student's embedding dimension is the teacher's (asking for another is an error); its checkpoint records
    the teacher's id. Validation: asymmetric Recall@1 of student-embedded held-out images against the
    teacher-embedded same images (self excluded); the checkpoint keeps the epoch where it was best (the last
    epoch without validation). `ctx` (training.distributed; None: one process on cfg.device): under torchrun each
    rank trains on its share of every batch, the objective runs over the gathered global batch, and rank 0 alone
    computes the teacher cache first, validates and writes.
    """
    seed_everything(cfg.seed)
    ctx = ctx if ctx is not None else DistContext(device=resolve_device(cfg.device))
    if ctx.distributed and cfg.addons.batch_wide:
        raise UserError("--metrix and --message-passing work inside one process's batch: not under torchrun yet")
    device = ctx.device
    out = output_path(cfg.out, "student")
    teacher_ckpt = load_checkpoint(cfg.teacher)
    if teacher_ckpt["role"] != "teacher":
        raise UserError(f"{cfg.teacher} is a {teacher_ckpt['role']} checkpoint; a student trains against a teacher")
    teacher_dim, teacher_id = int(teacher_ckpt["arch"]["dim"]), teacher_ckpt["model_id"]
    if cfg.dim is not None and cfg.dim != teacher_dim:
        raise UserError(f"a student embeds into its teacher's space: dim must be {teacher_dim} (the teacher's), "
                        f"not {cfg.dim}")
    if cfg.from_teacher and "members" in teacher_ckpt["arch"]:
        raise UserError(f"--from-teacher copies one network, and {cfg.teacher} is an ensemble of "
                        f"{len(teacher_ckpt['arch']['members'])}: train the student from --pretrained weights")
    objective = StudentObjective(cfg.loss, create_loss(cfg.loss, cfg), asymmetric=cfg.asymmetric,
                                 num_negatives=cfg.num_negatives)
    cfg.addons.check()
    if cfg.batch_size < 2 * cfg.per_class or cfg.per_class < 1:
        raise UserError(f"batch_size ({cfg.batch_size}) must hold at least two classes of per_class "
                        f"({cfg.per_class}) images")
    train_items, val_items, class_to_idx = prepare_data(cfg.data, cfg.classes, cfg.val_fraction)
    check_training_items(train_items, val_items, per_class=cfg.per_class,
                         classes_per_batch=max(2, cfg.batch_size // cfg.per_class), role="student")
    if cfg.loss in RELATIONAL_LOSSES:
        tqdm.write(f"warning: --loss {cfg.loss} only matches the teacher's relations between images (distances, "
                   f"angles, rankings), not its embeddings: such a student does not share the teacher's space, so "
                   f"its queries cannot search a database the teacher embedded (use reg, contr or contr+ for that)")
    addons = TrainingAddOns(cfg.addons, dim=teacher_dim, num_classes=len(class_to_idx), seed=cfg.seed).to(device)
    addons.check_student_loss(cfg.loss, cfg.asymmetric)
    teacher = freeze(model_from_checkpoint(teacher_ckpt)).to(device)
    teacher_spec = Preprocessing.from_dict(teacher_ckpt["preprocessing"])
    spec = student_preprocessing(teacher_spec, cfg.image_size)
    arch = {"backbone": cfg.backbone, "head": cfg.head, "dim": teacher_dim, "pretrained": cfg.pretrained}
    if cfg.tune_units < 0 or (cfg.tune_units and not (cfg.pretrained or cfg.from_teacher)):
        raise UserError("tune_units trains the last units of a pretrained student backbone: it needs --pretrained "
                        f"(or --from-teacher) and a value >= 0 (got {cfg.tune_units})")
    if cfg.from_teacher:  # the teacher's weights, at the student's own input size
        theirs = (teacher_ckpt["arch"]["backbone"], teacher_ckpt["arch"]["head"])
        if (cfg.backbone, explicit_head_spec(cfg.head)) != theirs:
            raise UserError(f"--from-teacher starts the student as a copy of the teacher: give its backbone and head "
                            f"(--backbone {theirs[0]} --head {theirs[1]}), not {cfg.backbone} / {cfg.head}")
        arch["pretrained"] = None
        student = build_model(arch)
        student.load_state_dict(teacher_ckpt["state_dict"])
        student = student.to(device)
    else:
        student = build_model(arch).to(device)
    check_trunk_views(cfg.tune_units, cfg.trunk_views)
    net, workers = student, cfg.workers
    if cfg.tune_units:  # the student's frozen trunk runs once per image; its maps are cached (training.trunk)
        net, workers = TailNet(student, cfg.tune_units), 0

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "teacher-cache"
    log = tqdm.write
    if not ctx.is_main:
        ctx.barrier()  # rank 0 fills the teacher cache first; the others read it
    teacher_net, teacher_set = _teacher_source(teacher, teacher_ckpt, teacher_spec, class_to_idx, cfg, device)
    teacher_pool = torch.from_numpy(teacher_embeddings(
        teacher_net, teacher_id, teacher_spec, train_items, teacher_set(train_items), cache_dir, device,
        workers=cfg.workers, log=log)).to(device)
    if ctx.is_main:
        ctx.barrier()
    def student_set(items, views=1):
        if not cfg.tune_units:
            return ImageDataset(items, class_to_idx, eval_transform(spec))
        maps = trunk_maps(items, cfg.backbone, cfg.pretrained, spec, cfg.tune_units, cfg.trunk_cache, device, log=log,
                          views=views, weights=student.backbone if cfg.from_teacher else None)
        return MapsDataset(maps, [class_to_idx[it.label] for it in items])

    train_set = student_set(train_items, cfg.trunk_views)
    pool_labels = torch.as_tensor(train_set.labels, device=device)
    sampler = DistributedMPerClassSampler(train_set.labels, cfg.per_class, max(2, cfg.batch_size // cfg.per_class),
                                          seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)  # this rank's share
    loader = DataLoader(_Indexed(train_set), batch_sampler=sampler,
                        **loader_kwargs(workers, ctx.data_seed(cfg.seed), device))
    val_set, val_teacher = None, None
    if val_items and ctx.is_main:  # rank 0 alone validates
        val_set = student_set(val_items)
        val_teacher = teacher_embeddings(teacher_net, teacher_id, teacher_spec, val_items, teacher_set(val_items),
                                         cache_dir, device, workers=cfg.workers, log=log)

    if cfg.backbone_lr is not None and cfg.backbone_lr < 0:
        raise UserError(f"backbone_lr must be >= 0 (0 freezes the backbone), not {cfg.backbone_lr}")
    optimizer = torch.optim.AdamW([*parameter_groups(student, cfg.lr, cfg.backbone_lr, cfg.weight_decay),
                                   *addons.optimizer_group(cfg.lr, cfg.weight_decay)], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)

    def asymmetric():  # the student's queries against the teacher's embeddings of the same held-out images
        queries = embed_dataset(net, val_set, device, workers)
        return retrieval_metrics(queries, val_set.labels, val_teacher, val_set.labels, exclude_self=True)

    def validate():  # asymmetric Recall@1 and mAP of the student's queries against the teacher's embeddings (rank 0)
        if val_set is None:
            return None
        got = asymmetric()
        return {"recall@1": got["recall@1"], "map": got["map"]}

    start = None
    if val_set is not None:  # the student as it starts (pretrained, or the teacher at the student's size)
        start = asymmetric()
        if cfg.keep_start:
            start["weights"] = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}

    # the teacher stays in eval mode throughout, and is not run: its embeddings are cached
    engine = Engine(model=student, net=net, objective=StudentStepObjective(objective, addons, teacher_pool,
                                                                           pool_labels),
                    optimizer=optimizer, loader=loader, sampler=sampler, addons=addons, validate=validate, ctx=ctx,
                    name="student")
    history = engine.run(cfg.epochs)
    best_epoch = engine.restore_best()
    student.eval()
    config = {**dataclasses.asdict(cfg), "best_epoch": best_epoch, "train_classes": sorted({it.label for it in
                                                                                            train_items}),
              "val_classes": sorted({it.label for it in val_items}),
              # its teacher's compatibility (training.compat) carries over to the student's manifest
              "compatible_with_teacher": teacher_ckpt["config"].get("compatible_with_teacher")}
    if val_set is not None:
        config["floors"] = _floors(teacher_ckpt, val_items, val_teacher, val_set.labels, start, asymmetric)
        trained = config["floors"]["student_teacher"]
        broken = not all(math.isfinite(trained[k]) for k in ("recall@1", "map"))
        if cfg.keep_start and (broken or (start["recall@1"], start["map"]) > (trained["recall@1"], trained["map"])):
            student.load_state_dict(start["weights"])
            config["floors"]["kept"] = "start"
            tqdm.write("student: the start beats the trained student on the validation classes; writing the start")
    if ctx.is_main:  # the collapse guard (core.spread) on held-out images before the checkpoint is written
        guard = val_set if val_set is not None else train_set
        step = max(1, len(guard) // 256)
        from torch.utils.data import Subset
        config["spread"] = check_spread(embed_dataset(net, Subset(guard, range(0, len(guard), step)), device,
                                                      workers), "student").to_dict()
    ckpt = make_checkpoint(student, role="student", arch=arch, preprocessing=spec, teacher_id=teacher_id,
                           config=config, history=history)
    if ctx.is_main:
        save_checkpoint(ckpt, out)
    ctx.barrier()  # every rank returns once the checkpoint is there
    return out


def _teacher_source(teacher, teacher_ckpt: dict, spec: Preprocessing, class_to_idx: dict, cfg: StudentConfig,
                    device):
    """(module, items -> dataset) the teacher's embeddings are computed with. A teacher trained with tune_units
    (its trunk is the pretrained one, unchanged) runs its tail on its trunk's cached maps (`training.trunk`, in the
    teacher's own trunk cache, where its training computed them), which saves a pass of the whole network over
    the training images; otherwise the whole teacher on the images."""
    t_cfg, arch = teacher_ckpt.get("config", {}), teacher_ckpt["arch"]
    units = int(t_cfg.get("tune_units") or 0)
    if not units or "members" in arch or not t_cfg.get("pretrained") or not arch.get("pretrained"):
        return teacher, lambda items: ImageDataset(items, class_to_idx, eval_transform(spec))
    net = TailNet(teacher, units).eval()

    def maps(items):
        views = trunk_maps(items, arch["backbone"], t_cfg["pretrained"], spec, units,
                           t_cfg.get("trunk_cache") or cfg.trunk_cache, device, log=tqdm.write)
        return MapsDataset(views, [class_to_idx[it.label] for it in items])
    return net, maps


def _floors(teacher_ckpt: dict, val_items, val_teacher, labels, start: dict, asymmetric) -> dict:
    """The student's asymmetric figures on its validation classes against its floors, reported in one block: the
    student as it started (a warning when training made it worse there), the teacher's own teacher->teacher
    figures, and the zero-shot floor the teacher measured (when its validation classes are these)."""
    trained = asymmetric()
    start_m = {k: float(start[k]) for k in ("recall@1", "map")}
    symmetric = retrieval_metrics(val_teacher, labels, val_teacher, labels, exclude_self=True)
    worse = trained["recall@1"] < start_m["recall@1"]
    lines = [f"student->teacher {format_metrics(trained)} on {len(set(labels))} validation classes",
             f"  the student as it started: {format_metrics(start_m)}"
             + ("  (warning: better than the trained student; fewer epochs or a lower lr)" if worse else ""),
             f"  teacher->teacher: {format_metrics(symmetric)}"]
    report = {"student_teacher": {k: trained[k] for k in ("recall@1", "map")}, "start": start_m,
              "teacher_teacher": {k: symmetric[k] for k in ("recall@1", "map")}}
    t_config = teacher_ckpt.get("config", {})
    floor = t_config.get("zero_shot_floor")
    if floor and sorted(t_config.get("val_classes", [])) == sorted({it.label for it in val_items}):
        report["zero_shot_teacher"] = floor["zero_shot"]
        lines.append(f"  zero-shot teacher->teacher (the teacher's floor): {format_metrics(floor['zero_shot'])}")
    elif floor:
        lines.append("  (the teacher's zero-shot floor was measured on other validation classes: not compared)")
    tqdm.write("\n".join(lines))
    return report


__all__ = ["RELATIONAL_LOSSES", "StudentObjective", "student_preprocessing", "train_student"]
