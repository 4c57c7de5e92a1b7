"""`python -m experiments heads`: every pooling head on the same pretrained backbone, over several seeds.

Protocol (stated in the table it writes):
- data: class folders sorted; the first half trains, the second half is the evaluation set (each image queries
  all the others, itself excluded). Of the training classes, `val_fraction` are held out (evenly spaced) to
  pick each run's best epoch by validation Recall@1; the evaluation classes are never seen before the end.
- backbone: pretrained and *frozen*; its feature map of every image (serving preprocessing, centre crop) is
  computed once and cached (`featcache`), so a head trains for many epochs in minutes on a CPU. The only
  augmentation is a random horizontal flip of the cached map.
- zero-shot: global average pooling of the same cached maps, no training (the ImageNet bar).
- each head: m-per-class batches, contrastive loss with in-batch hard negatives (+ cross-batch memory when
  `xbm > 0`), AdamW, warm-up + cosine schedule; evaluated with the best-validation epoch's weights.
- with `tune_units = N` (> 0) each head instead trains the way `asymsearch train teacher --tune-units N` does
  (`training.trunk`: the backbone's last N units train with the head on the frozen trunk's cached maps, K cached
  views per image, `loss` contrastive or Proxy-Anchor), through `training.teacher.train_teacher` itself, and is
  evaluated on the evaluation half's cached trunk maps (float16, serving crop) through its tail and head.
- cost columns: head parameters; GFLOPs of backbone + head on one image at the experiment's size
  (torch.utils.flop_counter, multiply-adds x 2); images/s of backbone + head in eval mode on CPU, batch 16,
  measured side by side in this run (ratios between rows are meaningful, absolute values depend on the load).
- journal: each finished (head, seed) run is appended at once, as one JSON line, to `OUT.runs.jsonl` beside
  OUT.md / OUT.json, keyed by a fingerprint of everything that determines its result (`run_fingerprint`). A rerun
  after a crash or Ctrl-C reuses the runs whose fingerprint is there and trains only the others. Once the table
  is written the journal is deleted (only lines of other settings stay): OUT.json then holds every run, and a
  later rerun of the same command retrains from scratch, as it must after a change to the training code, which
  no fingerprint sees. Delete the journal by hand to retrain an interrupted experiment's finished runs too.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from asymsearch.core.errors import UserError
from asymsearch.training.heads import explicit_head_spec, recorded_head_spec

from experiments.common import MapsExperimentConfig, cache_maps, embed_maps, train_on_maps

# glam: the paper's form (the default); diablo: its light form, the one that reads the final map these heads train
# on (the paper form holds the backbone's later units: `python -m experiments.heads orderings --mid-head`)
DEFAULT_HEADS = ("gem", "glam:channels=256", "glam:channels=256,global=false", "glam:channels=256,local=false",
                 "glap", "diablo:form=light,channels=256",
                 "diablo:form=light,channels=256,select=feature,attention=post")


@dataclass(kw_only=True)
class HeadsExperimentConfig(MapsExperimentConfig):
    out: str = "docs/results/heads"  # writes OUT.md and OUT.json
    heads: tuple = DEFAULT_HEADS
    xbm: int = 0  # cross-batch memory size (0: off)
    xbm_weight: float = 1.0
    # partial fine-tuning (0: the head alone on the frozen backbone's maps, contrastive loss)
    tune_units: int = 0  # N: the backbone's last N units train too, as `train teacher --tune-units N` does
    trunk_views: int = 1  # tune_units: cached views per training image (train teacher --trunk-views)
    backbone_lr: float | None = None  # tune_units: the tail's learning rate (None: lr / 10)
    loss: str = "contr"  # contr | proxy-anchor (the latter with tune_units)
    device: str = "auto"  # tune_units: where the runs train (train teacher --device)


def _metrics(emb: np.ndarray, labels: list) -> dict:
    from asymsearch.core.metrics import retrieval_metrics
    m = retrieval_metrics(emb, labels, emb, labels, exclude_self=True)
    return {k: float(m[k]) for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map")}


def train_head_on_maps(spec: str, cfg, channels: int, train_maps: np.ndarray,
                       train_labels: list[int], val_maps: np.ndarray, val_labels: list[int], seed: int,
                       log=print, addons=None, name: str | None = None, head=None) -> tuple[object, list[dict]]:
    """Train head `spec` on cached maps; return (head with the best-validation weights, per-epoch history).
    `head`: train this module (built by the caller, e.g. a head holding backbone units) instead of building `spec`.

    `cfg` is a `HeadsExperimentConfig` or any config with its training fields (`xbm` may be absent: off);
    `addons` the training add-ons' options (`training.addons.AddOnOptions`, default all off: plain ℓ_C)."""
    from asymsearch.training.addons import AddOnOptions, TrainingAddOns
    from asymsearch.training.common import seed_everything
    from asymsearch.training.engine import SymmetricObjective
    from asymsearch.training.losses import ContrastiveLoss, HardNegativeMiner
    from asymsearch.training.models import create_head
    from asymsearch.training.xbm import CrossBatchMemory, MemoryLoss

    seed_everything(seed)
    name = name or spec
    head = (create_head(spec, channels, cfg.dim) if head is None else head).train()
    extras = TrainingAddOns(addons or AddOnOptions(), dim=cfg.dim, num_classes=int(max(train_labels)) + 1,
                            seed=seed).train()
    miner, criterion = HardNegativeMiner(cfg.num_negatives), ContrastiveLoss(cfg.margin)
    xbm = getattr(cfg, "xbm", 0)
    handlers = [MemoryLoss(CrossBatchMemory(xbm, cfg.dim), criterion, miner, cfg.xbm_weight)] if xbm else []

    def report(entry, epochs):
        val = entry["val_recall@1"]
        log(f"  {name} seed {seed} epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4f} "
            f"val R@1 {val if val is None else round(val, 4)} ({entry['seconds']:.0f} s)")

    history = train_on_maps(
        head, SymmetricObjective(criterion, miner, extras), train_maps, train_labels, per_class=cfg.per_class,
        classes_per_batch=cfg.classes_per_batch, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_epochs=cfg.warmup_epochs, seed=seed, addons=extras, handlers=handlers, flip=cfg.flip, report=report,
        validate=lambda: _metrics(embed_maps(head, val_maps), val_labels)["recall@1"] if len(val_maps) else None)
    return head.eval(), history  # the best validation epoch's weights (without validation: the last epoch's)


def teacher_config(cfg: HeadsExperimentConfig, spec: str, seed: int, out: str):
    """The `train teacher` config of one (head, seed) run of a `tune_units` experiment: the training half, the
    experiment's validation split, every training choice the experiment's."""
    from asymsearch.training.config import TeacherConfig

    pretrained = None if str(cfg.pretrained).lower() in ("", "none") else cfg.pretrained
    return TeacherConfig(data=cfg.data, out=out, backbone=cfg.backbone, head=spec, dim=cfg.dim,
                         pretrained=pretrained, image_size=cfg.image_size, classes="first-half",
                         epochs=cfg.epochs, classes_per_batch=cfg.classes_per_batch, per_class=cfg.per_class,
                         lr=cfg.lr, backbone_lr=cfg.backbone_lr, tune_units=cfg.tune_units,
                         trunk_cache=cfg.cache_dir, trunk_views=cfg.trunk_views, weight_decay=cfg.weight_decay,
                         warmup_epochs=cfg.warmup_epochs, loss=cfg.loss, margin=cfg.margin,
                         num_negatives=cfg.num_negatives, xbm=cfg.xbm, xbm_weight=cfg.xbm_weight,
                         val_fraction=cfg.val_fraction, seed=seed, workers=0, device=cfg.device)


def _train_tuned(spec: str, seed: int, cfg: HeadsExperimentConfig, eval_trunk: np.ndarray) -> tuple[np.ndarray, list]:
    """Train (head, seed) with `train_teacher` (partial fine-tuning); return (the evaluation half's embeddings
    through the trained tail + head, the run's epoch log)."""
    import tempfile

    import torch

    from asymsearch.training.checkpoint import load_checkpoint, model_from_checkpoint
    from asymsearch.training.teacher import train_teacher
    from asymsearch.training.trunk import TailNet

    with tempfile.TemporaryDirectory(prefix="asymsearch-heads-") as tmp:
        ckpt = load_checkpoint(train_teacher(teacher_config(cfg, spec, seed, f"{tmp}/teacher.pt")))
    net = TailNet(model_from_checkpoint(ckpt), cfg.tune_units).eval()
    with torch.no_grad():
        emb = np.concatenate([net(torch.from_numpy(np.asarray(eval_trunk[lo:lo + 64], np.float32))).numpy()
                              for lo in range(0, len(eval_trunk), 64)])
    return emb, ckpt["history"]


_SHARED: tuple | None = None  # the data of the current experiment, inherited by forked job processes


def _run_one(task: tuple[str, int]) -> tuple[tuple[str, int], dict]:
    """Train and score one (head spec, seed) run; return (the task, its result)."""
    import torch

    spec, seed = task
    cfg, channels, fit_maps, fit_labels, val_maps, val_labels, eval_maps, eval_labels, eval_trunk = _SHARED
    torch.set_num_threads(max(1, cfg.threads))
    start = time.perf_counter()
    if cfg.tune_units:
        emb, history = _train_tuned(spec, seed, cfg, eval_trunk)
    else:
        head, history = train_head_on_maps(spec, cfg, channels, fit_maps, fit_labels, val_maps, val_labels, seed,
                                           log=lambda msg: print(msg, flush=True))
        emb = embed_maps(head, eval_maps)
    metrics = _metrics(emb, eval_labels)
    print(f"{spec} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    return task, {"seed": seed, "metrics": metrics, "history": history, "train_seconds": time.perf_counter() - start}


def _train_runs(tasks: list[tuple[str, int]], jobs: int):
    """Yield (task, result) of every task as soon as its run finishes (in `jobs` forked processes when > 1), so
    that the caller, the parent process alone, journals each one."""
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
            yield from pool.imap_unordered(_run_one, tasks)
    else:
        for task in tasks:
            yield _run_one(task)


def journal_path(out: Path) -> Path:
    """OUT.runs.jsonl, beside the OUT.md and OUT.json that `write_results` writes."""
    return out.with_suffix(".runs.jsonl")


# Config fields that do not change a run's result, hence left out of its fingerprint: where the results go (out,
# command, results), how fast the runs go (threads, jobs; each run seeds itself), which runs the experiment holds
# (heads, seeds: each run's own spec and seed are in its fingerprint, so adding a seed keeps the others), where the
# maps are cached (cache_dir: the same maps wherever they are kept) and how the data folder is spelled (data: its
# images, by resolved path, size and modification time, are in the fingerprint through `data_key`). Every other
# field is in, and so is any field added later, unless it is named here.
_NOT_IN_FINGERPRINT = frozenset({"out", "command", "results", "threads", "jobs", "heads", "seeds", "cache_dir", "data"})


def run_fingerprint(cfg: HeadsExperimentConfig, data_key: str, spec: str, seed: int) -> str:
    """A digest of everything that determines the result of run (spec, seed): the config's result-bearing fields,
    `data_key` (the feature-map cache key: backbone, weights, preprocessing and every image) and the run's own
    spec and seed."""
    what = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    what.update(data_key=data_key, spec=explicit_head_spec(spec), seed=seed)  # `glam` is not what it was
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def read_journal(path: Path) -> dict[str, dict]:
    """fingerprint -> journalled run (its `_run_one` result plus `spec`) of every whole line at `path`; a line cut
    short by a crash mid-write is skipped. Empty when there is no journal."""
    runs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            runs[entry.pop("fingerprint")] = entry
    return runs


def append_journal(path: Path, fingerprint: str, spec: str, run: dict) -> None:
    """Append one run as one line, flushed to the file before this returns."""
    line = json.dumps({"fingerprint": fingerprint, "spec": spec, **run}) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab+") as f:  # append mode: every write goes to the end
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # the last line was cut short by a crash: start a line of our own
                line = "\n" + line
        f.write(line.encode())


def drop_from_journal(path: Path, fingerprints: set[str]) -> None:
    """Remove the runs `fingerprints` from the journal, and the journal when no other run is left in it."""
    keep = [json.dumps({"fingerprint": k, **run}) + "\n" for k, run in read_journal(path).items()
            if k not in fingerprints]
    if not keep:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _journalled_runs(cfg: HeadsExperimentConfig, data_key: str, log) -> tuple[dict, int]:
    """(spec, seed) -> result of every run of the experiment, each trained unless the journal has it; and how many
    came from the journal."""
    tasks = [(spec, seed) for spec in cfg.heads for seed in cfg.seeds]
    keys = {task: run_fingerprint(cfg, data_key, *task) for task in tasks}
    journal = journal_path(Path(cfg.out))
    journalled = read_journal(journal)
    done = {task: {k: v for k, v in journalled[key].items() if k != "spec"}
            for task, key in keys.items() if key in journalled}
    if done:
        log(f"reusing {len(done)} of {len(tasks)} runs, finished before with the same settings, from {journal} "
            "(delete it to retrain them)")
    reused = len(done)
    for task, run in _train_runs([t for t in tasks if t not in done], cfg.jobs):
        append_journal(journal, keys[task], task[0], run)
        done[task] = run
    return done, reused


def measure_costs(cfg: HeadsExperimentConfig, specs: list[str], size: int, channels: int,
                  rounds: int = 3, batch: int = 16) -> list[dict]:
    """Parameters, GFLOPs and CPU images/s of backbone + head for every spec, eval mode, random weights (speed
    does not depend on them). Timing is side by side: `rounds` rounds, each timing one batch of every model in
    turn, and each model keeps its fastest round, so that load changes during the run hit every row alike."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from asymsearch.training.models import build_model

    models, out = [], []
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        for spec in specs:
            model = build_model({"backbone": cfg.backbone, "head": spec, "pretrained": None,
                                 "dim": channels if spec == "gap" else cfg.dim}).eval()
            counter = FlopCounterMode(display=False)
            with counter:
                model(x[:1])
            model(x)  # warm-up
            models.append(model)
            out.append({"head_params": sum(p.numel() for p in model.head.parameters()),
                        "gflops": counter.get_total_flops() / 1e9, "images_per_s": 0.0})
        for _ in range(rounds):
            for model, row in zip(models, out):
                start = time.perf_counter()
                model(x)
                row["images_per_s"] = max(row["images_per_s"], batch / (time.perf_counter() - start))
    return out


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map"):
        vals = [r["metrics"][key] for r in runs]
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}
    return out


def _cache_trunk_maps(cfg: HeadsExperimentConfig, items: list, labels: np.ndarray, fit: list[int], val: list[int],
                      evaluation: list[int], log) -> np.ndarray:
    """Compute (or find cached) the trunk maps every tuned run reads, once, before the runs fork: the training
    classes' `trunk_views` views, the validation classes' and the evaluation half's serving crops. Returns the
    evaluation half's, in the order of its labels."""
    from asymsearch.training.common import resolve_device
    from asymsearch.training.teacher import teacher_preprocessing
    from asymsearch.training.trunk import trunk_maps

    tcfg = teacher_config(cfg, cfg.heads[0], cfg.seeds[0], "unused.pt")
    spec = teacher_preprocessing(tcfg)
    device = resolve_device(cfg.device)
    out = None
    for classes, views in ((set(fit), cfg.trunk_views), (set(val), 1), (set(evaluation), 1)):
        subset = [it for it, label in zip(items, labels) if label in classes]
        if subset:
            out = trunk_maps(subset, cfg.backbone, tcfg.pretrained, spec, cfg.tune_units, cfg.cache_dir, device,
                             log=log, views=views)[0]
    return out


def run_heads_experiment(cfg: HeadsExperimentConfig, log=print) -> dict:
    import torch

    from asymsearch.training.featcache import cache_key
    from asymsearch.training.models import HEADS, create_head, lookup, parse_head_spec

    # the maps are computed before the jobs fork: with every job's threads; each job then sets its own
    torch.set_num_threads(max(1, cfg.threads) * max(1, cfg.jobs))
    if not Path(cfg.data).is_dir():
        raise UserError(f"data folder not found: {cfg.data}")
    if not cfg.heads or not cfg.seeds:
        raise UserError("give at least one head and one seed")
    for spec in cfg.heads:  # fail before any computation
        base, options = parse_head_spec(spec)
        adopt = getattr(lookup(HEADS, "head", base), "adopt_backbone", None)
        if adopt is not None and adopt(cfg.backbone, None, cfg.dim, **options) is not None:
            raise UserError(f"--head {spec}: this experiment trains heads on the backbone's final map, and {spec} "
                            "holds the backbone's units after a mid-level split (DIABLO's paper form, the default): "
                            f"use diablo:form=light here, or python -m experiments.heads orderings --mid-head {spec}")
        create_head(spec, 16, 1280 if base == "gap" else cfg.dim)
    if cfg.tune_units:
        from asymsearch.training.teacher import check_teacher_config
        check_teacher_config(teacher_config(cfg, cfg.heads[0], cfg.seeds[0], "unused.pt"))
    elif cfg.loss != "contr":
        raise UserError(f"heads on frozen maps train with the contrastive loss; --loss {cfg.loss} needs --tune-units")
    t0 = time.perf_counter()
    data = cache_maps(cfg, log)
    size, spec_pre, pretrained, items, labels, cls_index = (data.size, data.spec, data.pretrained, data.items,
                                                           data.labels, data.cls_index)
    fm, maps, channels = data.features, data.maps, data.channels
    (fit_maps, fit_labels), (val_maps, val_labels), (eval_maps, eval_labels) = data.fit, data.val, data.eval
    fit_classes, val_classes, eval_classes = (data.classes[k] for k in ("fit", "val", "eval"))
    eval_trunk = _cache_trunk_maps(cfg, items, labels, [cls_index[c] for c in fit_classes],
                                   [cls_index[c] for c in val_classes], [cls_index[c] for c in eval_classes],
                                   log) if cfg.tune_units else None
    global _SHARED
    _SHARED = (cfg, channels, fit_maps, fit_labels, val_maps, val_labels, eval_maps, eval_labels, eval_trunk)

    zero = create_head("gap", channels, channels)
    zero_metrics = _metrics(embed_maps(zero, eval_maps), eval_labels)
    torch.set_num_threads(max(1, cfg.threads))  # the runs and the cost columns: cfg.threads each
    log(f"zero-shot GAP: {zero_metrics}")
    rows = [{"head": "gap (zero-shot, no training)", "spec": "gap", "runs": [{"seed": None, "metrics": zero_metrics}],
             "summary": _summary([{"metrics": zero_metrics}])}]
    data_key = cache_key(cfg.backbone, pretrained, spec_pre, items)
    by_task, reused = _journalled_runs(cfg, data_key, log)
    for spec in cfg.heads:
        runs = [by_task[(spec, seed)] for seed in cfg.seeds]
        rows.append({"head": spec, "spec": explicit_head_spec(spec), "runs": runs, "summary": _summary(runs)})
    for row, cost in zip(rows, measure_costs(cfg, [r["spec"] for r in rows], size, channels)):
        row.update(cost)
    result = {"config": {k: v for k, v in asdict(cfg).items() if k != "results"}, "image_size": size,
              "preprocessing": spec_pre.to_dict(), "feature_map": list(maps.shape[1:]),
              "split": data.split(),
              "backbone_images_per_s_caching": fm.images_per_s, "seconds": time.perf_counter() - t0,
              "reused_runs": reused,
              "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
                         f"{cfg.threads} thread(s)", "rows": rows}
    write_results(result, Path(cfg.out))
    drop_from_journal(journal_path(Path(cfg.out)), {run_fingerprint(cfg, data_key, spec, seed)
                                                   for spec in cfg.heads for seed in cfg.seeds})
    return result


def _fmt(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.with_suffix(".json"), out.with_suffix(".md")
    js.write_text(json.dumps(result, indent=1) + "\n")
    cfg = result["config"]
    sp = result["split"]
    tuned = cfg.get("tune_units", 0)
    split = (f"Train on the first {sp['train_classes'] + sp['val_classes']} classes ({sp['train']} images; "
             f"{sp['val_classes']} of them, {sp['val']} images, held out to pick the best epoch by validation "
             f"Recall@1), evaluate on the last {sp['eval_classes']} classes ({sp['eval']} images, each querying all "
             "others).")
    if cfg.get("loss", "contr") == "proxy-anchor":
        loss = "Proxy-Anchor loss (alpha 32, delta 0.1, proxies at lr 0.01)"
    else:
        loss = (f"contrastive loss (margin {cfg['margin']}) with {cfg['num_negatives']} in-batch hard negatives"
                f"{', cross-batch memory ' + str(cfg['xbm']) if cfg['xbm'] else ''}")
    schedule = (f"{cfg['epochs']} epochs, batches of {cfg['classes_per_batch']} classes x {cfg['per_class']}, {loss}, "
                f"AdamW lr {cfg['lr']}")
    if tuned:
        backbone_lr = cfg.get("backbone_lr") if cfg.get("backbone_lr") is not None else cfg["lr"] / 10
        protocol = (
            f"Protocol: backbone `{cfg['backbone']}` with `{cfg['pretrained']}` weights, its **last {tuned} units "
            f"trained with each head** (`asymsearch train teacher --tune-units {tuned}`, batch norm at the pretrained "
            f"statistics) on the frozen trunk's maps, cached: {cfg['trunk_views']} view(s) of each training image "
            "(the serving crop + random resized crops with flips, drawn once), one per epoch at random, plus a "
            f"random flip; {result['image_size']} px, mean/std {result['preprocessing']['mean']}/"
            f"{result['preprocessing']['std']}. {split} Each run: {schedule} (tuned units at {backbone_lr}), warm-up "
            f"{cfg['warmup_epochs']} epoch + cosine, dim {cfg['dim']}; evaluated through its tail and head on the "
            "evaluation half's cached trunk maps (float16). "
            f"Mean ± std over seeds {', '.join(map(str, cfg['seeds']))}. The zero-shot row pools the whole "
            "untrained backbone's maps with global average pooling.")
    else:
        protocol = (
            f"Protocol: backbone `{cfg['backbone']}` with `{cfg['pretrained']}` weights, **frozen**; "
            f"{result['image_size']} px centre crop, mean/std {result['preprocessing']['mean']}/"
            f"{result['preprocessing']['std']}; feature map {result['feature_map']} computed once and cached. "
            f"{split} Heads: {schedule}, warm-up {cfg['warmup_epochs']} epoch + cosine, dim {cfg['dim']}, "
            f"{'random horizontal flip of the cached map' if cfg['flip'] else 'no augmentation'}. "
            f"Mean ± std over seeds {', '.join(map(str, cfg['seeds']))}. The zero-shot row pools the same cached "
            "maps with global average pooling, no training.")
    title = f"trained with the last {tuned} units of a pretrained backbone" if tuned else \
        "on a frozen pretrained backbone"
    lines = [
        f"# Pooling heads {title} ({cfg['data']})", "",
        f"Command: `{cfg['command']}`", "",
        protocol, "",
        "GFLOPs (one image) and images/s (batches of 16) are for backbone + head at the experiment's size, eval "
        f"mode, CPU ({result['machine']}), measured side by side after training (3 rounds over all rows, best "
        "round each): compare rows, not machines. Head parameters exclude the backbone.", "",
        "| head | R@1 | R@2 | R@4 | R@8 | mAP | head params | GFLOPs | images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        s = row["summary"]
        lines.append(f"| `{row['head']}` | {_fmt(s['recall@1'])} | {_fmt(s['recall@2'])} | {_fmt(s['recall@4'])} | "
                     f"{_fmt(s['recall@8'])} | {_fmt(s['map'])} | {row['head_params'] / 1e6:.2f} M | "
                     f"{row['gflops']:.2f} | {row['images_per_s']:.1f} |")
    reused = (f" ({result['reused_runs']} runs finished by an earlier, interrupted invocation were reused)"
              if result.get("reused_runs") else "")
    lines += ["", f"Total time {result['seconds'] / 60:.1f} min{reused}. Per-seed numbers and per-epoch logs: "
              f"`{js.name}`."]
    if result.get("recost_command"):
        lines += ["", f"The cost columns were re-measured, side by side, by `{result['recost_command']}`."]
    lines.append("")
    md.write_text("\n".join(lines))
    return md, js


def recost(out: str | Path, threads: int = 1, log=print) -> dict:
    """Re-measure the cost columns (parameters, GFLOPs, images/s) of the results at OUT.json side by side, keep
    every accuracy figure, and rewrite OUT.md / OUT.json (which record that the costs were re-measured)."""
    import torch

    out = Path(out)
    path = out.with_suffix(".json")
    if not path.is_file():
        raise UserError(f"no results to re-measure: {path} not found")
    result = json.loads(path.read_text())
    torch.set_num_threads(max(1, threads))
    fields = {f for f in HeadsExperimentConfig.__dataclass_fields__}
    cfg = HeadsExperimentConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                   for k, v in result["config"].items() if k in fields})
    channels = result["feature_map"][0]
    log(f"re-measuring the costs of {len(result['rows'])} rows side by side")
    # a row's spec without its form was written before the paper forms became the defaults: the earlier form
    specs = [recorded_head_spec(r["spec"]) for r in result["rows"]]
    for row, cost in zip(result["rows"], measure_costs(cfg, specs, result["image_size"], channels)):
        row.update(cost)
    result["machine"] = result["machine"].rsplit(",", 1)[0] + f", {threads} thread(s)"
    result["recost_command"] = f"python -m experiments heads --recost --out {out} --threads {threads}"
    write_results(result, out)
    return result


def canonical_command(cfg: HeadsExperimentConfig) -> str:
    """The full command line that reproduces `cfg` (every option spelled out)."""
    import shlex
    parts = ["python", "-m", "experiments", "heads", "--data", cfg.data, "--out", cfg.out, "--backbone", cfg.backbone,
             "--pretrained", str(cfg.pretrained)]
    if cfg.image_size:
        parts += ["--image-size", str(cfg.image_size)]
    for spec in cfg.heads:
        parts += ["--head", spec]
    parts += ["--seeds", ",".join(map(str, cfg.seeds)), "--dim", str(cfg.dim), "--epochs", str(cfg.epochs),
              "--lr", str(cfg.lr), "--xbm", str(cfg.xbm), "--val-fraction", str(cfg.val_fraction),
              "--cache-dir", cfg.cache_dir, "--threads", str(cfg.threads), "--jobs", str(cfg.jobs),
              "--classes-per-batch", str(cfg.classes_per_batch), "--per-class", str(cfg.per_class),
              "--warmup-epochs", str(cfg.warmup_epochs)]
    if cfg.tune_units:
        parts += ["--tune-units", str(cfg.tune_units), "--trunk-views", str(cfg.trunk_views), "--loss", cfg.loss,
                  "--device", cfg.device]
        if cfg.backbone_lr is not None:
            parts += ["--backbone-lr", str(cfg.backbone_lr)]
    return " ".join(shlex.quote(p) for p in parts)


def main_from_cli(cfg: HeadsExperimentConfig) -> dict:
    cfg.command = cfg.command or canonical_command(cfg)
    return run_heads_experiment(cfg)


# ------------------------------------------------------------------------------- the sources' orderings
#
# `python -m experiments.heads orderings --data A --data B ...`: the orderings GLAM's, GLAP's and DIABLO's papers
# report, re-measured on a frozen pretrained backbone over several datasets and seeds, with the DIABLO paper's model
# selection protocol: for each seed a *random* split of the training half's classes into fit and validation
# classes (Jacob et al. 2020, §4.2: random train/val class splits of the training set), the best epoch chosen on
# the validation classes, the evaluation half scored once per run. Heads on the final map train on its cached
# maps; the paper-form DIABLO heads (which hold the backbone's units after their split point) train on the cached
# mid-level maps. All map sets come from one pass of the backbone: the earliest split's maps are computed by the
# feature cache, the later ones (and the final map) by running the next units over them (float16 in between).

ORDERING_HEADS = ("gem", "glam:form=paper,channels=256", "glam:form=paper,channels=256,global=false",
                  "glam:form=paper,channels=256,local=false", "glam:form=gate,channels=256", "glap",
                  "diablo:form=light,channels=256")
ORDERING_MID_HEADS = ("diablo:form=paper,words=1,attention=post", "diablo:form=paper,attention=post")


@dataclass(kw_only=True)
class OrderingsConfig:
    data: tuple = ()  # image folders (class subfolders; first half trains, second half evaluates)
    out: str = "docs/results/heads_paper"
    backbone: str = "efficientnet_lite0"
    pretrained: str = "imagenet"
    image_size: int | None = None
    heads: tuple = ORDERING_HEADS  # heads on the final map
    mid_heads: tuple = ORDERING_MID_HEADS  # diablo:form=paper heads, on the mid-level maps
    mid_data: tuple | None = None  # the folders (among data) the mid heads run on (None: all)
    seeds: tuple = (0, 1, 2)
    dim: int = 512
    epochs: int = 4
    mid_epochs: int | None = None  # epochs of the mid heads (None: epochs)
    mid_seeds: tuple | None = None  # seeds of the mid heads (None: seeds)
    classes_per_batch: int = 8
    per_class: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    margin: float = 0.5
    num_negatives: int = 5
    val_fraction: float = 0.2
    flip: bool = True
    xbm: int = 0
    xbm_weight: float = 1.0
    cache_dir: str = "~/.cache/asymsearch/featmaps"
    threads: int = 1
    cache_threads: int | None = None  # torch threads while the maps are computed (None: threads)
    argv: tuple = ()


def random_class_split(classes: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(fit, val) classes: round(val_fraction * n) (at least 2) drawn at random with `seed` (the DIABLO paper's
    random train/val class splits), both lists in the sorted order."""
    import random

    n_val = max(2, round(val_fraction * len(classes)))
    if len(classes) - n_val < 2:
        raise UserError(f"{len(classes)} training classes are too few to hold out {n_val} for validation")
    val = set(random.Random(f"class-split-{seed}").sample(sorted(classes), n_val))
    return [c for c in classes if c not in val], [c for c in classes if c in val]


def _derived_maps(source: np.ndarray, units: list, key: str, cache_dir: Path, log, batch: int = 64) -> np.ndarray:
    """units(source maps), float16, cached as CACHE/<key>.npy (computed once, in eval mode)."""
    import torch
    from torch import nn

    path = cache_dir / f"{key}.npy"
    if path.is_file():
        log(f"derived maps: cached {path}")
        return np.load(path, mmap_mode="r")
    net = nn.Sequential(*units).eval()
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp.npy"
    start, out = time.perf_counter(), None
    with torch.no_grad():
        for lo in range(0, len(source), batch):
            y = net(torch.from_numpy(np.asarray(source[lo:lo + batch], np.float32))).numpy()
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(source), *y.shape[1:]))
            out[lo:lo + len(y)] = y.astype(np.float16)
    out.flush()
    del out
    os.replace(tmp, path)
    log(f"derived maps {key}: {len(source)} in {time.perf_counter() - start:.0f} s")
    return np.load(path, mmap_mode="r")


def _dataset_maps(cfg: OrderingsConfig, data: str, splits: list[int], log) -> dict:
    """Items, labels, the class lists and {split unit index (or "final"): maps} of one folder."""
    from asymsearch.core.data import list_image_folder, select_classes
    from asymsearch.core.manifest import Preprocessing
    from asymsearch.training.backbones import backbone_units
    from asymsearch.training.featcache import cache_key, feature_maps
    from asymsearch.training.models import backbone_preprocessing, create_backbone

    pre = backbone_preprocessing(cfg.backbone)
    size = cfg.image_size or pre["image_size"]
    spec = Preprocessing(resize=size, crop=size, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    train_classes, eval_classes = select_classes(data, "first-half"), select_classes(data, "second-half")
    items = list_image_folder(data, train_classes + eval_classes)
    pretrained = None if str(cfg.pretrained).lower() in ("", "none") else cfg.pretrained
    backbone, _ = create_backbone(cfg.backbone, pretrained)
    units = backbone_units(backbone.eval())
    cuts = sorted(set(splits)) + [len(units)]
    cache = Path(cfg.cache_dir).expanduser()
    first = feature_maps(items, cfg.backbone, pretrained, spec, cache, log=log, tail_units=len(units) - cuts[0])
    maps = {cuts[0]: first.maps}
    key = cache_key(cfg.backbone, pretrained, spec, items, len(units) - cuts[0])
    for a, b in zip(cuts, cuts[1:]):
        maps[b] = _derived_maps(maps[a], units[a:b], f"{key}-units{a}-{b}", cache, log)
    maps["final"] = maps.pop(len(units))
    labels = np.array([{c: i for i, c in enumerate(train_classes + eval_classes)}[it.label] for it in items])
    return {"items": items, "labels": labels, "train_classes": train_classes, "eval_classes": eval_classes,
            "maps": maps, "size": size, "spec": spec.to_dict(), "data_key": cache_key(cfg.backbone, pretrained, spec,
                                                                                        items),
            "backbone_seconds": first.seconds}


def _subset(maps: np.ndarray, labels: np.ndarray, class_ids: set[int]) -> tuple[np.ndarray, list[int]]:
    """The rows of those classes, float16 as cached (batches are made float32 as they are read)."""
    idx = np.array([i for i in range(len(labels)) if labels[i] in class_ids])
    return np.asarray(maps[idx]), labels[idx].tolist()


def _mid_split(cfg: OrderingsConfig, spec: str) -> int:
    from asymsearch.training.backbones import mid_level_split
    from asymsearch.training.models import parse_head_spec

    return mid_level_split(cfg.backbone, parse_head_spec(spec)[1].get("attention", "pre"))[0]


def _ordering_run(cfg: OrderingsConfig, ds: dict, spec: str, seed: int, mid: bool, log) -> dict:
    """Train one (head, seed) run on its random class split; score the evaluation half once."""
    from asymsearch.training.common import seed_everything
    from asymsearch.training.models import build_model

    cls = {c: i for i, c in enumerate(ds["train_classes"] + ds["eval_classes"])}
    fit_classes, val_classes = random_class_split(ds["train_classes"], cfg.val_fraction, seed)
    maps = ds["maps"][_mid_split(cfg, spec)] if mid else ds["maps"]["final"]
    fit = _subset(maps, ds["labels"], {cls[c] for c in fit_classes})
    val = _subset(maps, ds["labels"], {cls[c] for c in val_classes})
    evaluation = _subset(maps, ds["labels"], {cls[c] for c in ds["eval_classes"]})
    head = None
    if mid:  # the head with its backbone units, from the pretrained backbone (the trunk is not needed: maps are)
        seed_everything(seed)
        head = build_model({"backbone": cfg.backbone, "head": spec, "dim": cfg.dim, "pretrained": cfg.pretrained}).head
    run_cfg = cfg if not (mid and cfg.mid_epochs) else _with(cfg, epochs=cfg.mid_epochs)
    start = time.perf_counter()
    head, history = train_head_on_maps(spec, run_cfg, fit[0].shape[1], fit[0], fit[1], val[0], val[1], seed,
                                       log=log, head=head)
    metrics = _metrics(embed_maps(head, evaluation[0]), evaluation[1])
    log(f"{spec} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"seed": seed, "val_classes": val_classes, "metrics": metrics, "history": history,
            "train_seconds": time.perf_counter() - start}


def _with(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


def _ordering_costs(cfg: OrderingsConfig, specs: list[str], size: int) -> dict[str, dict]:
    """Parameters (whole model, and beyond the backbone) and GFLOPs (torch.utils.flop_counter, one image at `size`,
    multiply-adds x 2) of backbone + head for every spec, eval mode, random weights."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from asymsearch.training.models import build_model, create_backbone

    backbone, channels = create_backbone(cfg.backbone)
    backbone_params = sum(p.numel() for p in backbone.parameters())
    out = {}
    for spec in specs:
        model = build_model({"backbone": cfg.backbone, "head": spec, "pretrained": None,
                             "dim": channels if spec == "gap" else cfg.dim}).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, size, size))
        total = sum(p.numel() for p in model.parameters())
        out[spec] = {"params": total, "params_beyond_backbone": total - backbone_params,
                     "gflops": counter.get_total_flops() / 1e9}
    return out


# (name, better spec, worse spec): "better ≥ worse" is what the source reports
ORDERINGS = (
    ("GLAM local+global ≥ local only (Song et al. 2022)", "glam:form=paper,channels=256",
     "glam:form=paper,channels=256,global=false"),
    ("GLAM local+global ≥ global only (Song et al. 2022)", "glam:form=paper,channels=256",
     "glam:form=paper,channels=256,local=false"),
    ("GLAP ≥ GeM (Roig et al. 2020)", "glap", "gem"),
    ("DIABLO paper form (dimension-wise, post-attention, N=8) ≥ its baseline (same units, N=1) (Jacob et al. "
     "2020)", "diablo:form=paper,attention=post", "diablo:form=paper,words=1,attention=post"),
    ("DIABLO paper form (dimension-wise, pre-attention, N=8) ≥ its baseline (same units, N=1) (Jacob et al. "
     "2020)", "diablo:form=paper", "diablo:form=paper,words=1"),
    ("DIABLO light form (dimension-wise, pre-attention) ≥ GeM on the same final map",
     "diablo:form=light,channels=256", "gem"),
    ("GLAM paper form ≥ the earlier gate form", "glam:form=paper,channels=256", "glam:form=gate,channels=256"),
)


def _ordering_verdicts(rows: dict[str, dict]) -> list[dict]:
    """Each ordering whose two heads ran: the mean Recall@1 (and mAP) difference, how many seeds it holds on
    (paired by seed, i.e. by class split), and a verdict: holds (mean difference ≥ 0 and ≥ 0 on every seed), does
    not hold (< 0 on every seed), or unsettled."""
    out = []
    rows = {explicit_head_spec(spec): row for spec, row in rows.items()}  # `glam:channels=256` is the paper form
    for name, better, worse in ORDERINGS:
        better, worse = explicit_head_spec(better), explicit_head_spec(worse)
        if better not in rows or worse not in rows:
            continue
        a = {r["seed"]: r["metrics"] for r in rows[better]["runs"]}
        b = {r["seed"]: r["metrics"] for r in rows[worse]["runs"]}
        seeds = sorted(set(a) & set(b))
        d1 = [a[s]["recall@1"] - b[s]["recall@1"] for s in seeds]
        dm = [a[s]["map"] - b[s]["map"] for s in seeds]
        verdict = "holds" if min(d1) >= 0 else ("does not hold" if max(d1) < 0 else "unsettled")
        out.append({"ordering": name, "better": better, "worse": worse, "seeds": seeds,
                    "recall@1_diff": {"mean": statistics.fmean(d1), "min": min(d1), "max": max(d1)},
                    "map_diff": {"mean": statistics.fmean(dm), "min": min(dm), "max": max(dm)},
                    "holds_on_seeds": sum(d >= 0 for d in d1), "verdict": verdict})
    return out


def run_orderings(cfg: OrderingsConfig, log=print) -> dict:
    import torch

    from asymsearch.core.provenance import provenance
    from asymsearch.training.models import create_head, parse_head_spec

    torch.set_num_threads(max(1, cfg.threads))
    if not cfg.data:
        raise UserError("give at least one --data folder")
    for d in cfg.data:
        if not Path(d).is_dir():
            raise UserError(f"data folder not found: {d}")
    for spec in cfg.heads:
        create_head(spec, 16, cfg.dim)  # fails before any computation
    from asymsearch.training.diablo import adopt_backbone
    for spec in cfg.mid_heads:
        base, options = parse_head_spec(spec)
        if base != "diablo" or options.get("form", "paper") != "paper":
            raise UserError(f"--mid-head takes diablo:form=paper heads, not {spec}")
        adopt_backbone(cfg.backbone, None, cfg.dim, **options)
    out = Path(cfg.out)
    journal = journal_path(out)
    done = read_journal(journal)
    result = {"what": "the orderings the sources report, re-measured (frozen backbone, random class splits)",
              "provenance": provenance(list(cfg.argv) or None), "config": asdict(cfg), "datasets": {}}
    t0 = time.perf_counter()
    datasets, rows = {}, {}
    torch.set_num_threads(max(1, cfg.cache_threads or cfg.threads))
    for data in cfg.data:
        mid = cfg.mid_heads if cfg.mid_data is None or data in cfg.mid_data else ()
        ds = datasets[data] = _dataset_maps(cfg, data, [_mid_split(cfg, s) for s in mid], log)
        final = ds["maps"]["final"]
        eval_idx = np.flatnonzero(ds["labels"] >= len(ds["train_classes"]))
        zero_shot = embed_maps(create_head("gap", final.shape[1], final.shape[1]), np.asarray(final[eval_idx]))
        rows[data] = {"gap": {"runs": [{"seed": None, "metrics": _metrics(zero_shot,
                                                                          ds["labels"][eval_idx].tolist())}]}}
    torch.set_num_threads(max(1, cfg.threads))
    # the heads on the final map on every dataset first, then the (much dearer) mid-level heads; the results so
    # far are written after each head, so that an interrupted experiment still leaves its finished rows
    tasks = [(data, spec, False, cfg.seeds) for data in cfg.data for spec in cfg.heads]
    tasks += [(data, spec, True, cfg.mid_seeds or cfg.seeds) for data in cfg.data for spec in cfg.mid_heads
              if cfg.mid_data is None or data in cfg.mid_data]
    for data, spec, is_mid, seeds in tasks:
        runs = []
        for seed in seeds:
            what = {k: v for k, v in asdict(cfg).items()
                    if k not in ("out", "argv", "heads", "mid_heads", "mid_data", "seeds", "mid_seeds", "cache_dir",
                                 "data", "threads", "cache_threads")}
            if not is_mid:
                what.pop("mid_epochs")
            what.update(data_key=datasets[data]["data_key"], spec=explicit_head_spec(spec), seed=seed)
            key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
            if key in done:
                run = {k: v for k, v in done[key].items() if k != "spec"}
                log(f"{spec} seed {seed}: from the journal")
            else:
                run = _ordering_run(cfg, datasets[data], spec, seed, is_mid, log)
                append_journal(journal, key, spec, run)
            runs.append(run)
        rows[data][spec] = {"runs": runs, "on": "mid-level maps" if is_mid else "final map"}
        _collect(cfg, result, datasets, rows, t0)
        write_orderings(result, out)
    _collect(cfg, result, datasets, rows, t0, costs=True)
    write_orderings(result, out)
    journal.unlink(missing_ok=True)
    return result


def _collect(cfg: OrderingsConfig, result: dict, datasets: dict, rows: dict, t0: float, costs: bool = False) -> None:
    """Summaries, verdicts (and with `costs`, the cost columns) of every row so far, into `result`."""
    for data, ds in datasets.items():
        prices = _ordering_costs(cfg, list(rows[data]), ds["size"]) if costs else {}
        for spec, row in rows[data].items():
            row["summary"] = _summary(row["runs"])
            row.update(prices.get(spec, {}))
            row["train_seconds"] = sum(r.get("train_seconds", 0.0) for r in row["runs"])
        result["datasets"][data] = {"rows": rows[data], "verdicts": _ordering_verdicts(rows[data]),
                                    "image_size": ds["size"], "preprocessing": ds["spec"],
                                    "maps": {str(k): list(v.shape[1:]) for k, v in ds["maps"].items()},
                                    "images": {"train": int((ds["labels"] < len(ds["train_classes"])).sum()),
                                               "eval": int((ds["labels"] >= len(ds["train_classes"])).sum()),
                                               "train_classes": len(ds["train_classes"]),
                                               "eval_classes": len(ds["eval_classes"])},
                                    "backbone_seconds": ds["backbone_seconds"]}
    result["seconds"] = time.perf_counter() - t0


def write_orderings(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    cfg, prov = result["config"], result["provenance"]
    lines = [f"# The sources' head orderings, re-measured ({cfg['backbone']}, frozen)", "",
             f"Command: `{prov.get('command')}`  ", f"Commit {prov.get('commit')}"
             f"{' (with uncommitted changes)' if prov.get('dirty') else ''}, {prov.get('date')}, machine: "
             f"{json.dumps(prov.get('machine'))}.", "",
             f"Protocol: backbone `{cfg['backbone']}` with `{cfg['pretrained']}` weights, **frozen**, its maps cached "
             f"once (serving preprocessing, centre crop). For each seed the training half's classes are split at "
             f"random into fit and validation classes ({cfg['val_fraction']:.0%} validation; Jacob et al. 2020, "
             "§4.2); the model is chosen on validation classes carved from the training half (best epoch by "
             "validation Recall@1), and the evaluation half is reported once per run (each image queries all "
             f"others). {cfg['epochs']} epochs (mid-level heads: {cfg['mid_epochs'] or cfg['epochs']}), batches of "
             f"{cfg['classes_per_batch']} classes x {cfg['per_class']}, contrastive loss (margin {cfg['margin']}) "
             f"with {cfg['num_negatives']} in-batch hard negatives, AdamW lr {cfg['lr']}, warm-up "
             f"{cfg['warmup_epochs']} epoch + cosine, dim {cfg['dim']}, random flip of the cached map. Mean ± std "
             f"over seeds {', '.join(map(str, cfg['seeds']))} (each seed its own class split). Heads on the final "
             "map train on its cached maps; `diablo:form=paper` heads hold the backbone's units after their split "
             "point (φ a copy, ψ the units themselves, batch norm at the pretrained statistics) and train them, "
             "on the cached mid-level maps. GFLOPs: backbone + head, one image, multiply-adds x 2; params: the "
             "whole model, and beyond the backbone's own.", ""]
    for data, ds in result["datasets"].items():
        im = ds["images"]
        lines += [f"## {data}", "",
                  f"{im['train_classes']} training classes ({im['train']} images), {im['eval_classes']} evaluation "
                  f"classes ({im['eval']} images); {ds['image_size']} px; maps {ds['maps']}.", "",
                  "| head | on | R@1 | R@2 | R@4 | R@8 | mAP | params | beyond backbone | GFLOPs | train s (all seeds) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for spec, row in ds["rows"].items():
            s = row["summary"]
            name = "gap (zero-shot, no training)" if spec == "gap" else spec
            lines.append(f"| `{name}` | {row.get('on', 'final map')} | {_fmt(s['recall@1'])} | {_fmt(s['recall@2'])} | "
                         f"{_fmt(s['recall@4'])} | {_fmt(s['recall@8'])} | {_fmt(s['map'])} | "
                         + (f"{row['params'] / 1e6:.2f} M | {row['params_beyond_backbone'] / 1e6:.2f} M | "
                            f"{row['gflops']:.2f} |" if "params" in row else " | | |")
                         + f" {row['train_seconds']:.0f} |")
        lines += ["", "| ordering | R@1 difference, mean (min, max over seeds) | mAP difference, mean (min, max) | "
                  "holds on seeds | verdict |", "|---|---|---|---|---|"]
        for v in ds["verdicts"]:
            r, m = v["recall@1_diff"], v["map_diff"]
            lines.append(f"| {v['ordering']} | {r['mean']:+.4f} ({r['min']:+.4f}, {r['max']:+.4f}) | "
                         f"{m['mean']:+.4f} ({m['min']:+.4f}, {m['max']:+.4f}) | {v['holds_on_seeds']} of "
                         f"{len(v['seeds'])} | {v['verdict']} |")
        lines.append("")
    lines += [f"Total {result['seconds'] / 60:.1f} min. Per-seed figures, class splits and epoch logs: "
              f"`{out.with_suffix('.json').name}`.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def _orderings_main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m experiments.heads orderings",
                                description="The sources' head orderings on a frozen backbone, random class splits.")
    p.add_argument("--data", action="append", required=True, help="image folder; repeat for several")
    p.add_argument("--out", default=OrderingsConfig.out)
    p.add_argument("--backbone", default=OrderingsConfig.backbone)
    p.add_argument("--head", dest="heads", action="append", default=None,
                   help=f"a head on the final map; repeat (default: {' '.join(ORDERING_HEADS)})")
    p.add_argument("--mid-head", dest="mid_heads", action="append", default=None,
                   help=f"a diablo:form=paper head; repeat (default: {' '.join(ORDERING_MID_HEADS)}; 'none': none)")
    p.add_argument("--mid-data", action="append", default=None, help="folders the mid heads run on (default: all)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=OrderingsConfig.epochs)
    p.add_argument("--mid-epochs", type=int, default=None)
    p.add_argument("--mid-seeds", default=None, help="seeds of the mid heads (default: --seeds)")
    p.add_argument("--cache-dir", default=OrderingsConfig.cache_dir)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-threads", type=int, default=None, help="threads while the maps are computed")
    args = p.parse_args(argv)
    mid = () if args.mid_heads == ["none"] else tuple(args.mid_heads or ORDERING_MID_HEADS)
    cfg = OrderingsConfig(data=tuple(args.data), out=args.out, backbone=args.backbone,
                          heads=tuple(args.heads or ORDERING_HEADS), mid_heads=mid,
                          mid_data=tuple(args.mid_data) if args.mid_data else None,
                          seeds=tuple(int(s) for s in args.seeds.split(",")), epochs=args.epochs,
                          mid_epochs=args.mid_epochs,
                          mid_seeds=tuple(int(v) for v in args.mid_seeds.split(",")) if args.mid_seeds else None,
                          cache_dir=args.cache_dir, threads=args.threads,
                          cache_threads=args.cache_threads,
                          argv=tuple(["python", "-m", "experiments.heads", "orderings"] + list(
                              sys.argv[2:] if argv is None else argv)))
    try:
        run_orderings(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


COST_VARIANTS = ("gem", "glam:form=gate,channels=256", "glam:form=paper,channels=256", "glam:form=gate",
                 "glam:form=paper", "glap", "diablo:form=light,channels=256", "diablo:form=light",
                 "diablo:form=paper,words=1", "diablo:form=paper",
                 "diablo:form=paper,words=16", "diablo:form=paper,select=feature",
                 "diablo:form=paper,words=1,attention=post", "diablo:form=paper,attention=post",
                 "diablo:form=paper,select=feature,attention=post")


def _costs_main(argv: list[str]) -> int:
    """`python -m experiments.heads costs [--backbone B ...] [--out OUT]`: params and GFLOPs of every variant."""
    import argparse

    from asymsearch.core.provenance import provenance
    from asymsearch.training.models import backbone_preprocessing

    p = argparse.ArgumentParser(prog="python -m experiments.heads costs")
    p.add_argument("--backbone", action="append", default=None)
    p.add_argument("--out", default="docs/results/heads_paper_costs")
    args = p.parse_args(argv)
    backbones = args.backbone or ["efficientnet_lite0", "efficientnet_lite2"]
    result = {"what": "parameters and GFLOPs of backbone + head per head variant (torch.utils.flop_counter, one "
                      "image at the backbone's own size, multiply-adds x 2; random weights)",
              "provenance": provenance(["python", "-m", "experiments.heads", "costs", *argv]), "backbones": {}}
    for name in backbones:
        size = backbone_preprocessing(name)["image_size"]
        result["backbones"][name] = {"image_size": size,
                                     "rows": _ordering_costs(OrderingsConfig(backbone=name), list(COST_VARIANTS), size)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    prov = result["provenance"]
    lines = ["# Cost of each head variant, paper forms and earlier forms", "",
             f"Command: `{prov.get('command')}`; commit {prov.get('commit')}, {prov.get('date')}.", "",
             result["what"] + ". *Beyond backbone*: the model's parameters minus the backbone's own (for "
             "`diablo:form=paper` ψ is the backbone's own units, φ a copy of some: the copy, the dictionary and the "
             "embeddings count).", ""]
    for name, b in result["backbones"].items():
        lines += [f"## {name} at {b['image_size']} px", "", "| head | params | beyond backbone | GFLOPs |",
                  "|---|---|---|---|"]
        for spec, row in b["rows"].items():
            lines.append(f"| `{spec}` | {row['params'] / 1e6:.2f} M | {row['params_beyond_backbone'] / 1e6:.2f} M | "
                         f"{row['gflops']:.2f} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    import sys
    commands = {"orderings": _orderings_main, "costs": _costs_main}
    if sys.argv[1:2] and sys.argv[1] in commands:
        sys.exit(commands[sys.argv[1]](sys.argv[2:]))
    print("usage: python -m experiments.heads orderings --data DIR [--data DIR ...] | costs [--backbone B] "
          "(python -m experiments heads: the head comparison)", file=sys.stderr)
    sys.exit(2)
