"""Teacher training (symmetric metric learning), Budnik & Avrithis 2021: the teacher g is trained with the contrastive loss
ℓ_C(a) = Σ_{n∈N(a)} [s(a,n) − m]_+ − Σ_{p∈P(a)} s(a,p) on m-per-class batches with in-batch hard negatives,
optionally plus the same loss against a cross-batch memory of recent embeddings (XBM).

What a run does: m-per-class batches; AdamW with two parameter groups (the new head at `lr`, the pretrained
backbone at `backbone_lr`); linear warm-up then cosine decay per step; float16 autocast + gradient scaling on
CUDA; after every epoch, validation Recall@1 on held-out training classes, a line in `OUT.log.jsonl` and the
full training state in `OUT.state.pt` (model, optimiser, scheduler, scaler, memory, RNG, history), from which
`resume=OUT.state.pt` continues exactly. With `tune_units=N`, only the backbone's last N units and the head
train, on the frozen trunk's maps computed once and cached (`training.trunk`: partial fine-tuning on a CPU).
`loss=ms` trains with Budnik & Avrithis 2021's multi-similarity loss instead of ℓ_C. The checkpoint written to OUT holds the
weights of the epoch with the best validation Recall@1 (the last epoch when validation is disabled).
`epochs=0` writes the model untrained: with `head=gap` and ImageNet weights, the zero-shot baseline for `asymsearch export` / `asymsearch eval`.
The training add-ons (config `addons`: `addons.metrix`, `addons.osm_caa`, `addons.message_passing`; `training.addons`,
docs/addons.md) compose with the loss of each step; their modules are kept in the resumable state, never in the checkpoint.
`ema=D` validates, keeps and writes an exponential moving average of the weights (`common.weight_average`).
`init_seed=S` starts the head and the proxies as the run of seed S does while `seed` draws the rest, so that runs
sharing a start can be averaged (`training.soup`).
Every epoch runs through the one training loop (`training.engine.Engine`); this module chooses its pieces.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.core.spread import check_spread
from asymsearch.training.addons import TrainingAddOns
from asymsearch.training.backbones import freeze_batch_norm
from asymsearch.training.checkpoint import make_checkpoint, save_checkpoint
from asymsearch.training.common import embed_dataset, loader_kwargs, output_path, prepare_data, resolve_device, \
    seed_everything
from asymsearch.training.config import TeacherConfig
from asymsearch.training.data import ImageDataset, eval_transform, train_transform
from asymsearch.training.distributed import DistContext, DistributedMPerClassSampler
from asymsearch.training.floor import WISE_ALPHAS, choose, decide, format_metrics, starts_zero_shot, zero_shot_model
from asymsearch.training.inputs import check_training_items
from asymsearch.training.engine import (Engine, EpochLog, OnEpochDone, OnEpochStart, SymmetricObjective,
                                        WeightAverage, read_training_state, save_training_state)
from asymsearch.training.losses import create_loss, negative_miner
from asymsearch.training.models import backbone_preprocessing, build_model
from asymsearch.training.proxies import ProxyAnchorLoss  # noqa: F401 - registers the proxy-anchor loss
from asymsearch.training.margins import ArcFaceLoss  # noqa: F401 - registers the arcface and cosface losses
from asymsearch.training.registry import check_loss_config, loss_entry, loss_names, loss_parameter_groups
from asymsearch.training.schedule import make_scheduler, parameter_groups
from asymsearch.training.trunk import MapsDataset, TailNet, check_trunk_views, trunk_maps
from asymsearch.training.xbm import CrossBatchMemory, MemoryLoss

def teacher_preprocessing(cfg: TeacherConfig) -> Preprocessing:
    """The config's size and normalisation, each defaulting to the backbone's own (`backbone_preprocessing`)."""
    own = backbone_preprocessing(cfg.backbone)
    size = int(cfg.image_size or own["image_size"])
    if size < 16:
        raise UserError(f"image_size must be at least 16 pixels, not {size}")
    mean, std = tuple(cfg.mean) or tuple(own["mean"]), tuple(cfg.std) or tuple(own["std"])
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"mean and std need three values each, std positive (got {mean}, {std})")
    return Preprocessing(resize=cfg.resize or size, crop=size, mean=mean, std=std)


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.pt") if out.suffix != ".pt" else out.with_suffix(".state.pt")


def log_path(out: Path) -> Path:
    return out.with_suffix(".log.jsonl")


def check_teacher_config(cfg: TeacherConfig) -> None:
    """Refuse, before anything is computed, a config that cannot train (one-line `UserError`s)."""
    if cfg.schedule not in ("cosine", "constant"):
        raise UserError(f"schedule must be cosine or constant, not {cfg.schedule!r}")
    if cfg.epochs < 0 or cfg.lr <= 0 or (cfg.backbone_lr is not None and cfg.backbone_lr < 0):
        raise UserError("epochs must be >= 0 (0 writes the untrained model), lr positive, backbone_lr >= 0")
    if cfg.xbm < 0 or cfg.warmup_epochs < 0 or cfg.max_steps_per_epoch < 0:
        raise UserError("xbm, warmup_epochs and max_steps_per_epoch must be >= 0")
    if cfg.loss not in loss_names("teacher"):
        raise UserError(f"a teacher trains with loss {', '.join(loss_names('teacher'))}, not {cfg.loss!r}")
    check_loss_config(cfg.loss, cfg, role="teacher")
    if loss_entry(cfg.loss, "teacher").per_class and (cfg.xbm or cfg.addons.metrix != "off"):
        raise UserError(f"{cfg.loss} compares the batch with learned class weights, not with pairs: it takes neither "
                        "--xbm nor --metrix")
    if cfg.tune_units < 0:
        raise UserError(f"tune_units must be >= 0 (0 trains the whole backbone), not {cfg.tune_units}")
    if cfg.tune_units and not cfg.pretrained:
        raise UserError("tune_units trains the last units of a pretrained backbone: give --pretrained")
    check_trunk_views(cfg.tune_units, cfg.trunk_views)
    if cfg.tune_units and cfg.backbone_lr == 0:
        raise UserError("tune_units with backbone_lr 0 leaves nothing of the backbone to tune; drop one of them")
    if not 0 <= cfg.ema < 1:
        raise UserError(f"ema is the averaging decay per step, in [0, 1) (0 disables), not {cfg.ema}")
    cfg.addons.check()
    if cfg.addons.osm_caa and cfg.loss != "contr":
        raise UserError("OSM + CAA weights the pairs of the contrastive loss: use it with --loss contr")


def train_teacher(cfg: TeacherConfig, ctx: DistContext | None = None) -> Path:
    """Train a teacher with ℓ_C (Budnik & Avrithis 2021, symmetric contrastive, in-batch hard negatives); return the checkpoint.

    `ctx` (training.distributed; None: one process on cfg.device): under torchrun each rank trains on its share of
    every batch, the loss runs over the gathered global batch, and rank 0 alone validates and writes."""
    check_teacher_config(cfg)
    ctx = ctx if ctx is not None else DistContext(device=resolve_device(cfg.device))
    if ctx.distributed and cfg.addons.batch_wide:
        raise UserError("--metrix and --message-passing work inside one process's batch: not under torchrun yet")
    init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
    seed_everything(init_seed)
    device = ctx.device
    out = output_path(cfg.out, "teacher")
    spec = teacher_preprocessing(cfg)
    train_items, val_items, class_to_idx = prepare_data(cfg.data, cfg.classes, cfg.val_fraction)
    check_training_items(train_items, val_items, per_class=cfg.per_class,
                         classes_per_batch=cfg.classes_per_batch, role="teacher")
    arch = {"backbone": cfg.backbone, "head": cfg.head, "dim": cfg.dim, "pretrained": cfg.pretrained}
    model = build_model(arch).to(device)
    # a model that starts as the zero-shot one: the floor also tries WiSE-FT interpolations with that start
    wise_start = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                  if cfg.floor and cfg.pretrained and starts_zero_shot(cfg.head) else None)
    # Metrix / OSM + CAA / message passing (training.addons): their modules train beside the model, never in it
    addons = TrainingAddOns(cfg.addons, dim=cfg.dim, num_classes=len(class_to_idx), seed=cfg.seed).to(device)

    workers = cfg.workers
    if cfg.tune_units:  # train tail + head on the frozen trunk's cached maps (training.trunk)
        net = TailNet(model, cfg.tune_units)
        workers = 0  # the maps are in memory: worker processes would only copy them

        def maps_set(items, flip):
            maps = trunk_maps(items, cfg.backbone, cfg.pretrained, spec, cfg.tune_units, cfg.trunk_cache, device,
                              log=tqdm.write, views=cfg.trunk_views if flip else 1)
            return MapsDataset(maps, [class_to_idx[it.label] for it in items], flip=flip)
        train_set = maps_set(train_items, True)
        val_set = maps_set(val_items, False) if val_items else None
    else:
        net = model
        train_set = ImageDataset(train_items, class_to_idx, train_transform(spec))
        val_set = ImageDataset(val_items, class_to_idx, eval_transform(spec)) if val_items else None
    compat = None  # --compatible-with: BCT's compatibility term with the frozen old teacher (training.compat)
    if cfg.compatible_with:
        from asymsearch.training.compat import compatibility_term
        compat = compatibility_term(cfg, train_items, train_set.labels, len(class_to_idx), device, log=tqdm.write)
    sampler = DistributedMPerClassSampler(train_set.labels, cfg.per_class, cfg.classes_per_batch, seed=cfg.seed,
                                          rank=ctx.rank, world_size=ctx.world_size)  # this rank's share
    loader = DataLoader(compat.indexed(train_set) if compat else train_set, batch_sampler=sampler,
                        **loader_kwargs(workers, ctx.data_seed(cfg.seed), device))

    # the loss, from the registry; its own parameters (Proxy-Anchor's proxies), like the add-ons, train beside the
    # model and stay out of its checkpoint
    criterion = create_loss(cfg.loss, cfg, role="teacher", num_classes=len(class_to_idx), dim=cfg.dim).to(device)
    if init_seed != cfg.seed:  # model and proxies start as in the runs of seed init_seed; the rest follows seed
        seed_everything(cfg.seed)
    backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else (cfg.lr / 10 if cfg.pretrained else cfg.lr)
    groups = parameter_groups(model, cfg.lr, backbone_lr, cfg.weight_decay) + addons.optimizer_group(cfg.lr,
                                                                                                      cfg.weight_decay)
    groups += loss_parameter_groups(cfg.loss, criterion, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = min(len(sampler), cfg.max_steps_per_epoch or len(sampler))
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = make_scheduler(optimizer, total, warmup) if cfg.schedule == "cosine" else \
        make_scheduler(optimizer, 10 ** 12, warmup)  # constant after warm-up (the cosine never starts to fall)
    miner = negative_miner(cfg.loss, cfg.num_negatives)

    handlers = [OnEpochStart(lambda epoch: _backbone_mode(model, backbone_lr, cfg.freeze_bn))]
    if cfg.xbm:
        handlers.append(MemoryLoss(CrossBatchMemory(cfg.xbm, cfg.dim, device), criterion, miner, cfg.xbm_weight))
    if compat is not None:
        handlers.append(compat)
    # with ema, the averaged weights are the ones validated, kept as the best epoch and written out
    kept, eval_net = model, net
    if cfg.ema:
        handlers.append(ema := WeightAverage(model, cfg.ema))
        kept = ema.module
        eval_net = TailNet(kept, cfg.tune_units) if cfg.tune_units else kept
    # one log line and one state file per epoch, rank 0 (`_save_state` looked up at each call)
    handlers += [EpochLog(log_path(out)), OnEpochDone(lambda engine, entry: _save_state(out, cfg, entry["epoch"],
                                                                                        engine))]

    def validate():
        if val_set is None:
            return None
        emb_val = embed_dataset(eval_net, val_set, device, workers)
        return retrieval_metrics(emb_val, val_set.labels, emb_val, val_set.labels, exclude_self=True)

    # zero-shot is the floor (training.floor): measured on the validation classes before the first step
    floor = None
    use_floor = cfg.floor and cfg.pretrained and val_set is not None and cfg.epochs > 0 and ctx.is_main
    if use_floor:
        zs_model, zs_arch = zero_shot_model(cfg.backbone, cfg.pretrained)
        zs_model = zs_model.to(device)
        zs_net = TailNet(zs_model, cfg.tune_units) if cfg.tune_units else zs_model
        emb = embed_dataset(zs_net, val_set, device, workers, progress="zero-shot floor")
        floor = retrieval_metrics(emb, val_set.labels, emb, val_set.labels, exclude_self=True)
        tqdm.write(f"zero-shot floor ({cfg.backbone}, pretrained, average pooling) on {len(set(val_set.labels))} "
                   f"validation classes: {format_metrics(floor)}")
    elif cfg.floor and ctx.is_main and cfg.epochs > 0:
        tqdm.write("zero-shot floor not measured: it needs --pretrained weights and validation classes "
                   "(--val-fraction > 0)")

    engine = Engine(model=model, net=net, objective=SymmetricObjective(criterion, miner, addons), optimizer=optimizer,
                    scheduler=scheduler, loader=loader, sampler=sampler, addons=addons, beside={"proxies": criterion},
                    handlers=handlers, validate=validate, kept=kept, ctx=ctx, amp=cfg.amp,
                    max_steps=cfg.max_steps_per_epoch, name="teacher")
    if cfg.resume:
        engine.load_state_dict(read_training_state(cfg.resume, kind=STATE_KIND, config=cfg,
                                                   resumable=_RESUMABLE_CHANGES))
    history = engine.run(cfg.epochs)

    best_epoch = engine.restore_best()  # epochs=0: the untrained (e.g. ImageNet, zero-shot) model as it is
    model.eval()
    config = dataclasses.asdict(cfg)
    config.update(best_epoch=best_epoch, **training_classes(train_items, val_items))
    kept_model, kept_arch, kept_net = model, arch, (TailNet(model, cfg.tune_units) if cfg.tune_units else model)
    if floor is not None:
        best = next((h for h in history if h["epoch"] == best_epoch), {})
        verdict = decide(floor, {"recall@1": best.get("val_recall@1"), "map": best.get("val_map")})
        if wise_start is not None:  # WiSE-FT (training.floor.choose): the mix of start and trained weights
            verdict = _wise_ft(model, wise_start, kept_net, val_set, floor, device, workers)
        config["zero_shot_floor"] = verdict.to_dict()
        if verdict.keep == "zero-shot":
            tqdm.write(f"teacher: {verdict.reason}; writing the zero-shot teacher ({cfg.backbone}, pretrained, average "
                       f"pooling, dim {zs_arch['dim']}) instead of the trained one")
            kept_model, kept_arch, kept_net = zs_model.eval(), zs_arch, zs_net
        else:
            tqdm.write(f"teacher: trained {format_metrics(verdict.trained)} {verdict.reason} "
                       f"({format_metrics(verdict.zero_shot)})")
    if compat is not None and kept_model is model:  # what export records as the manifest's compatible_with
        config["compatible_with_teacher"] = compat.old_teacher_id
    if ctx.is_main:  # the collapse guard (core.spread) on held-out images before the checkpoint is written
        config["spread"] = check_spread(embed_dataset(kept_net, _guard_set(val_set, train_set), device,
                                                      workers), "teacher").to_dict()
    ckpt = make_checkpoint(kept_model, role="teacher", arch=kept_arch, preprocessing=spec, config=config,
                           history=history)
    if ctx.is_main:
        save_checkpoint(ckpt, out)
    ctx.barrier()  # every rank returns once the checkpoint is there
    return out


def _wise_ft(model, start: dict, net, val_set, floor: dict, device, workers: int):
    """Measure the WiSE-FT interpolations (training.soup.interpolate) of `model`'s trained weights with its
    zero-shot `start` on the validation classes, leave `model` holding the chosen one (the trained weights when
    none beats the zero-shot floor: the caller then writes the zero-shot model) and return the verdict."""
    from asymsearch.training.soup import interpolate
    end = {k: v.detach().clone() for k, v in model.state_dict().items()}
    candidates = {}
    for alpha in WISE_ALPHAS:
        model.load_state_dict(interpolate(start, end, alpha))
        model.eval()
        emb = embed_dataset(net, val_set, device, workers)
        m = retrieval_metrics(emb, val_set.labels, emb, val_set.labels, exclude_self=True)
        candidates[alpha] = {"recall@1": m["recall@1"], "map": m["map"]}
        tqdm.write(f"WiSE-FT alpha {alpha:g} (0: zero-shot, 1: trained): {format_metrics(candidates[alpha])}")
    verdict = choose(floor, candidates)
    model.load_state_dict(interpolate(start, end, verdict.alpha) if verdict.alpha is not None else end)
    model.eval()
    return verdict


def training_classes(train_items, val_items) -> dict:
    """What a checkpoint records of its data: the classes it trained on and validated on (eval warns when it
    evaluates on either)."""
    return {"train_classes": sorted({it.label for it in train_items}),
            "val_classes": sorted({it.label for it in val_items})}


GUARD_IMAGES = 256  # images the collapse guard embeds at the end of a training (the validation ones first)


def _guard_set(val_set, train_set):
    """Up to GUARD_IMAGES images of different classes for the collapse guard: the validation set's, else the
    training set's, evenly spread through it."""
    from torch.utils.data import Subset
    source = val_set if val_set is not None and len(val_set) >= 2 else train_set
    step = max(1, len(source) // GUARD_IMAGES)
    subset = Subset(source, list(range(0, len(source), step))[:GUARD_IMAGES])
    subset.labels = [source.labels[i] for i in subset.indices]
    return subset


def _backbone_mode(model, backbone_lr: float, freeze_bn: bool) -> None:
    """At each epoch's start: a frozen backbone (lr 0) in eval mode, its batch-norm statistics the pretrained ones
    too; with `freeze_bn` the weights train and batch norm normalises with the pretrained statistics."""
    if backbone_lr == 0:
        model.backbone.eval()
    elif freeze_bn:
        freeze_batch_norm(model.backbone)


STATE_KIND = "asymsearch-teacher-state"


def _save_state(out: Path, cfg: TeacherConfig, epoch: int, engine: Engine) -> None:
    """The resumable state after `epoch` at OUT.state.pt: the engine's (model, optimiser, schedule, scaler,
    memory, add-ons, proxies, weight average, RNG, history, best epoch) with the config."""
    save_training_state(state_path(out), engine, kind=STATE_KIND, config=cfg)


# what may differ between the interrupted run and the resumed one
_RESUMABLE_CHANGES = {"resume", "epochs", "workers", "device", "out"}
