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
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from asymsearch.core.errors import UserError
from asymsearch.core.manifest import Preprocessing
from asymsearch.core.metrics import retrieval_metrics
from asymsearch.training.backbones import freeze_batch_norm
from asymsearch.training.checkpoint import make_checkpoint, save_checkpoint
from asymsearch.training.common import (BestEpoch, check_history_entry, embed_dataset, loader_kwargs, output_path,
                                        prepare_data, report_epoch, resolve_device, seed_everything, weight_average)
from asymsearch.training.addons import TrainingAddOns
from asymsearch.training.config import AddOnOptions, TeacherConfig
from asymsearch.training.data import ImageDataset, eval_transform, train_transform
from asymsearch.training.distributed import DistContext, DistributedMPerClassSampler
from asymsearch.training.losses import create_loss, negative_miner
from asymsearch.training.models import backbone_preprocessing, build_model
from asymsearch.training.proxies import ProxyAnchorLoss  # noqa: F401 - registers the proxy-anchor loss
from asymsearch.training.registry import loss_names, loss_parameter_groups
from asymsearch.training.schedule import make_scheduler, parameter_groups
from asymsearch.training.trunk import MapsDataset, TailNet, check_trunk_views, trunk_maps
from asymsearch.training.xbm import CrossBatchMemory, xbm_loss

STATE_FORMAT = 1


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
    if cfg.loss == "proxy-anchor" and (cfg.xbm or cfg.addons.metrix != "off"):
        raise UserError("proxy-anchor compares the batch with class proxies, not with pairs: it takes neither --xbm "
                        "nor --metrix")
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


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


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
    arch = {"backbone": cfg.backbone, "head": cfg.head, "dim": cfg.dim, "pretrained": cfg.pretrained}
    model = build_model(arch).to(device)
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
    sampler = DistributedMPerClassSampler(train_set.labels, cfg.per_class, cfg.classes_per_batch, seed=cfg.seed,
                                          rank=ctx.rank, world_size=ctx.world_size)  # this rank's share
    loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs(workers, ctx.data_seed(cfg.seed), device))

    # the loss, from the registry; its own parameters (Proxy-Anchor's proxies), like the add-ons, train beside the
    # model and stay out of its checkpoint
    criterion = create_loss(cfg.loss, cfg, role="teacher", num_classes=len(class_to_idx), dim=cfg.dim).to(device)
    if init_seed != cfg.seed:  # model and proxies start as in the runs of seed init_seed; the rest follows seed
        seed_everything(cfg.seed)
    ctx.broadcast_module(criterion, addons)  # outside DDP: every rank starts from rank 0's
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
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    miner = negative_miner(cfg.loss, cfg.num_negatives)
    memory = CrossBatchMemory(cfg.xbm, cfg.dim, device)
    # with ema, the averaged weights are the ones validated, kept as the best epoch and written out
    ema = weight_average(model, cfg.ema)
    kept, eval_net = model, net
    if ema is not None:
        kept = ema.module
        eval_net = TailNet(kept, cfg.tune_units) if cfg.tune_units else kept

    history: list[dict] = []
    best, start_epoch = BestEpoch(), 1
    if cfg.resume:
        start_epoch, history, best = _resume(cfg, model, optimizer, scheduler, scaler, memory, addons, criterion,
                                             ema)
    train_net = ctx.wrap(net)  # DistributedDataParallel under torchrun (net itself otherwise)
    logfile = log_path(out)
    if start_epoch == 1 and ctx.is_main:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        logfile.write_text("")
    for epoch in range(start_epoch, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        net.train()
        addons.train()
        if backbone_lr == 0:
            model.backbone.eval()  # frozen: batch-norm statistics stay the pretrained ones too
        elif cfg.freeze_bn:  # the weights train; batch norm normalises with the pretrained statistics
            freeze_batch_norm(model.backbone)
        losses, seen, t0 = [], 0, time.perf_counter()
        bar = tqdm(loader, desc=f"teacher {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   total=steps_per_epoch, disable=not ctx.is_main)
        for step, (images, labels) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                emb, mixed, plan = addons.embed(train_net, images, labels)  # (and Metrix's mixed examples)
            emb, labels = ctx.gather(emb.float()), ctx.all_gather(labels)  # the global batch (one process: as is)
            loss = addons.teacher_loss(criterion, miner, emb, labels, mixed, plan)
            if cfg.xbm:
                loss = loss + cfg.xbm_weight * xbm_loss(criterion, miner, emb, labels, memory)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            ctx.sync_gradients(criterion, addons)  # DDP averages the model's
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            memory.enqueue(emb, labels)
            losses.append(loss.item())
            seen += len(labels)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        seconds = time.perf_counter() - t0
        val = {"recall@1": None, "map": None}
        if val_set is not None and ctx.is_main:
            emb_val = embed_dataset(eval_net, val_set, device, workers)
            val = retrieval_metrics(emb_val, val_set.labels, emb_val, val_set.labels, exclude_self=True)
        val = ctx.broadcast_object(val)  # rank 0 validates; every rank keeps the same best epoch
        entry = check_history_entry(epoch, float(np.mean(losses)), val["recall@1"])
        entry.update(val_map=val["map"], seconds=seconds, images_per_s=seen / seconds if seconds > 0 else None,
                     lr=[g["lr"] for g in optimizer.param_groups])
        history.append(entry)
        best.offer(kept, entry)
        if ctx.is_main:  # one log, one state
            report_epoch("teacher", entry, cfg.epochs)
            with logfile.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            _save_state(out, cfg, epoch, model, optimizer, scheduler, scaler, memory, history, best, addons,
                        criterion, ema)

    best_epoch = best.restore(model, history)  # epochs=0: the untrained (e.g. ImageNet, zero-shot) model as it is
    model.eval()
    config = dataclasses.asdict(cfg)
    config["best_epoch"] = best_epoch
    ckpt = make_checkpoint(model, role="teacher", arch=arch, preprocessing=spec, config=config, history=history)
    if ctx.is_main:
        save_checkpoint(ckpt, out)
    ctx.barrier()  # every rank returns once the checkpoint is there
    return out


def _save_state(out, cfg, epoch, model, optimizer, scheduler, scaler, memory, history, best, addons=None,
                proxies=None, ema=None):
    state = {"format": STATE_FORMAT, "kind": "asymsearch-teacher-state", "epoch": epoch,
             "config": dataclasses.asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "memory": memory.state_dict(),
             "history": history, "best_recall": best.score, "best_state": best.state, "rng": _rng_state(),
             "addons": addons.state_dict() if addons is not None else {},
             "proxies": proxies.state_dict() if proxies is not None else {},
             "ema": ema.state_dict() if ema is not None else {}}
    save_checkpoint(state, state_path(out))


# what may differ between the interrupted run and the resumed one
_RESUMABLE_CHANGES = {"resume", "epochs", "workers", "device", "out"}


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


def _resume(cfg, model, optimizer, scheduler, scaler, memory, addons, proxies=None, ema=None):
    path = Path(cfg.resume)
    if not path.is_file():
        raise UserError(f"resume state not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - an unreadable file is the user's to fix
        raise UserError(f"cannot read resume state {path}: {e.__class__.__name__}") from None
    if not isinstance(state, dict) or state.get("kind") != "asymsearch-teacher-state":
        raise UserError(f"{path} is not a teacher training state (OUT.state.pt)")
    # a field that a state saved before it existed lacks (add-ons, trunk views, Proxy-Anchor) had its default
    absent = flat_config(dataclasses.asdict(TeacherConfig(data="", out="")))
    saved = flat_config(state["config"])
    changed = sorted(k for k, v in flat_config(dataclasses.asdict(cfg)).items()
                     if k not in _RESUMABLE_CHANGES and saved.get(k, absent.get(k)) != v)
    if changed:
        raise UserError(f"cannot resume {path}: the config differs in {', '.join(changed)}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    memory.load_state_dict(state["memory"])
    addons.load_state_dict(state.get("addons", {}))
    if proxies is not None:
        proxies.load_state_dict(state["proxies"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    _set_rng_state(state["rng"])
    return state["epoch"] + 1, list(state["history"]), BestEpoch(state["best_recall"], state["best_state"])
