"""`python -m experiments addons`: each training add-on (training.addons) off and on, over several seeds.

Protocol (stated in the table it writes): the heads experiment's (experiments.heads) -- frozen pretrained
backbone whose feature maps are cached once (`featcache`), first half of the classes trains (a fifth of them held
out to pick the best epoch), second half evaluates -- with one pooling head trained per (variant, seed) by the
teacher's objective: contrastive loss with in-batch hard negatives, composed with the add-ons exactly as
`train teacher` composes them (`TrainingAddOns.embed` / `teacher_loss`). The baseline row is the same run with
every add-on off, so for a seed it reproduces the heads experiment's row of the same head.

On cached maps the trained network is the head alone, so Metrix's "input" mixup mixes the cached backbone maps:
it is feature mixup of the full network (g_m = the frozen backbone). Mixing images would need the backbone to
run at every step and is not measured here.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from asymsearch.core.errors import UserError
from asymsearch.training.common import best_epoch
from asymsearch.training.config import AddOnOptions

from experiments.common import MapsExperimentConfig, cache_maps, embed_maps

DEFAULT_VARIANTS = ("baseline", "metrix=input", "metrix=embedding", "osm_caa=true", "message_passing=2")
# the add-on options a variant switches on; the others are the hyper-parameters every variant starts from (flags)
SWITCHES = ("metrix", "osm_caa", "message_passing")
BASE_OPTIONS = tuple(f.name for f in fields(AddOnOptions) if f.name not in SWITCHES)


@dataclass(kw_only=True)
class AddonsExperimentConfig(MapsExperimentConfig):
    out: str = "docs/results/addons"  # writes OUT.md and OUT.json
    head: str = "gem"
    variants: tuple = DEFAULT_VARIANTS  # "baseline" or add-on options key=value[,key=value]; the first is the reference
    addons: AddOnOptions = field(default_factory=AddOnOptions)  # the add-on options every variant starts from


def parse_variant(spec: str, cfg: AddonsExperimentConfig):
    """"baseline" or "key=value[,key=value]" over the `AddOnOptions` fields -> AddOnOptions (checked)."""
    base = cfg.addons
    spec = spec.strip()
    if spec in ("baseline", "off", ""):
        return base
    hints = typing.get_type_hints(AddOnOptions)
    known = {f.name for f in fields(AddOnOptions)}
    overrides = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in known:
            raise UserError(f"variant {spec!r}: {part!r} is not key=value with key one of {', '.join(sorted(known))}")
        kind = hints[key]
        base_type = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        value = value.strip()
        try:
            if base_type is bool:
                if value.lower() not in ("true", "false", "1", "0", "on", "off"):
                    raise ValueError(value)
                overrides[key] = value.lower() in ("true", "1", "on")
            elif base_type in (int, float):
                overrides[key] = base_type(value)
            else:
                overrides[key] = value
        except ValueError:
            raise UserError(f"variant {spec!r}: {key} cannot be {value!r}") from None
    options = base.with_overrides(**overrides)
    options.check()
    if options.metrix == "feature":
        raise UserError("on cached backbone maps the trained network is the head alone: use metrix=input (it mixes "
                        "the cached maps, i.e. feature mixup of the whole network) or metrix=embedding")
    return options


def train_with_addons(cfg: AddonsExperimentConfig, options, channels: int, train_maps: np.ndarray,
                      train_labels: list[int], val_maps: np.ndarray, val_labels: list[int], seed: int,
                      log=print) -> tuple[object, list[dict]]:
    """Train head `cfg.head` on cached maps with the add-ons `options`; return (head at its best validation epoch,
    per-epoch history): `heads.train_head_on_maps`, the add-ons switched on."""
    from experiments.heads import train_head_on_maps

    return train_head_on_maps(cfg.head, cfg, channels, train_maps, train_labels, val_maps, val_labels, seed,
                              log=log, addons=options, name=options.describe())


_SHARED: tuple | None = None  # the data of the current experiment, inherited by forked job processes


def _run_one(task: tuple[str, int]) -> dict:
    import torch
    from experiments.heads import _metrics

    spec, seed = task
    cfg, channels, fit_maps, fit_labels, val_maps, val_labels, eval_maps, eval_labels = _SHARED
    torch.set_num_threads(max(1, cfg.threads))
    start = time.perf_counter()
    head, history = train_with_addons(cfg, parse_variant(spec, cfg), channels, fit_maps, fit_labels, val_maps,
                                      val_labels, seed, log=lambda msg: print(msg, flush=True))
    metrics = _metrics(embed_maps(head, eval_maps), eval_labels)
    print(f"{spec} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    return {"seed": seed, "metrics": metrics, "history": history, "train_seconds": time.perf_counter() - start}


KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map")


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def verdict(deltas: list[float], baseline_std: float) -> str:
    """"gain" / "loss" when every seed moves the same way and the mean change exceeds the baseline's spread over
    seeds; "within noise" otherwise."""
    mean = statistics.fmean(deltas)
    if all(d > 0 for d in deltas) and mean > baseline_std:
        return "gain"
    if all(d < 0 for d in deltas) and -mean > baseline_std:
        return "loss"
    return "within noise"


def summarize(rows: list[dict]) -> None:
    """Per row: mean ± std of each metric over seeds; for every row after the first (the reference), the per-seed
    paired change against it (same seed), mean ± std, and the verdict."""
    ref = rows[0]
    for row in rows:
        row["summary"] = {k: _stats([r["metrics"][k] for r in row["runs"]]) for k in KEYS}
        row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in row["runs"])
        row["best_epochs"] = [best_epoch(r.get("history", [])) for r in row["runs"]]
        if row is ref:
            continue
        ref_by_seed = {r["seed"]: r["metrics"] for r in ref["runs"]}
        row["delta"] = {}
        for k in ("recall@1", "map"):
            deltas = [r["metrics"][k] - ref_by_seed[r["seed"]][k] for r in row["runs"]]
            row["delta"][k] = {**_stats(deltas), "per_seed": deltas,
                               "verdict": verdict(deltas, ref["summary"][k]["std"])}


def run_addons_experiment(cfg: AddonsExperimentConfig, log=print) -> dict:
    import torch
    from asymsearch.training.models import create_head

    torch.set_num_threads(max(1, cfg.threads))
    if not Path(cfg.data).is_dir():
        raise UserError(f"data folder not found: {cfg.data}")
    if len(cfg.variants) < 2 or not cfg.seeds:
        raise UserError("give a reference variant and at least one more, and at least one seed")
    if cfg.epochs < 1 or cfg.jobs < 1:
        raise UserError("epochs and jobs must be at least 1")
    options = [parse_variant(v, cfg) for v in cfg.variants]  # fail before any computation
    create_head(cfg.head, 16, cfg.dim)
    t0 = time.perf_counter()
    data = cache_maps(cfg, log)
    size, spec_pre, maps, channels = data.size, data.spec, data.maps, data.channels
    (fit_maps, fit_labels), (val_maps, val_labels), (eval_maps, eval_labels) = data.fit, data.val, data.eval
    global _SHARED
    _SHARED = (cfg, channels, fit_maps, fit_labels, val_maps, val_labels, eval_maps, eval_labels)
    tasks = [(v, seed) for v in cfg.variants for seed in cfg.seeds]
    if cfg.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(min(cfg.jobs, len(tasks))) as pool:
            done = pool.map(_run_one, tasks, chunksize=1)
    else:
        done = [_run_one(t) for t in tasks]
    by_task = dict(zip(tasks, done))
    rows = [{"variant": v, "addons": opt.describe(), "options": asdict(opt),
             "runs": [by_task[(v, seed)] for seed in cfg.seeds]} for v, opt in zip(cfg.variants, options)]
    summarize(rows)
    result = {"config": {k: v for k, v in asdict(cfg).items() if k != "results"}, "image_size": size,
              "preprocessing": spec_pre.to_dict(), "feature_map": list(maps.shape[1:]),
              "split": data.split(),
              "seconds": time.perf_counter() - t0,
              "machine": f"{platform.machine()} torch {torch.__version__}, {cfg.threads} thread(s) x {cfg.jobs} job(s)",
              "rows": rows}
    write_results(result, Path(cfg.out))
    return result


def _fmt(s: dict, scale: float = 100.0, sign: bool = False) -> str:
    return f"{s['mean'] * scale:{'+' if sign else ''}.1f} ± {s['std'] * scale:.1f}"


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.with_suffix(".json"), out.with_suffix(".md")
    js.write_text(json.dumps(result, indent=1) + "\n")
    cfg, sp = result["config"], result["split"]
    ref = result["rows"][0]
    lines = [
        f"# Training add-ons on and off ({cfg['data']})", "",
        f"Command: `{cfg['command']}`", "",
        (f"Protocol: backbone `{cfg['backbone']}` with `{cfg['pretrained']}` weights, **frozen**; "
        f"{result['image_size']} px centre crop; feature map {result['feature_map']} computed once and cached. "
        f"Train on the first {sp['train_classes'] + sp['val_classes']} classes ({sp['train']} images; "
        f"{sp['val_classes']} of them, {sp['val']} images, held out to pick the best epoch by validation "
        f"Recall@1), evaluate on the last {sp['eval_classes']} classes ({sp['eval']} images, each querying all "
        f"others). One `{cfg['head']}` head (dim {cfg['dim']}) per variant and seed: {cfg['epochs']} epochs, "
        f"batches of {cfg['classes_per_batch']} classes x {cfg['per_class']}, contrastive loss (margin "
        f"{cfg['margin']}) with {cfg['num_negatives']} in-batch hard negatives, AdamW lr {cfg['lr']}, warm-up "
        f"{cfg['warmup_epochs']} epoch + cosine, "
        f"{'random horizontal flip of the cached map' if cfg['flip'] else 'no augmentation'}; "
        "the add-ons compose with that loss exactly as `asymsearch train teacher` composes them "
        "(`training.addons`). On cached maps the trained network is the head alone, so Metrix `input` mixes the "
        "cached backbone maps (feature mixup of the whole network, g_m = the frozen backbone); mixing images is "
        "not measured here. No add-on changes the model that is evaluated (or exported): same head, same cost."), "",
        (f"Mean ± std over seeds {', '.join(map(str, cfg['seeds']))}, in percent. Δ = the per-seed paired change "
        f"against `{ref['variant']}` (same seed, same batches), mean ± std over seeds. Verdict: *gain* (*loss*) when "
        "every seed improves (worsens) and the mean change exceeds the reference's std over seeds; otherwise "
        "*within noise*. Train s / run: wall seconds of one run's training with its per-epoch validation, on a "
        "machine shared with other jobs: indicative only. Best epoch: the epoch whose weights were evaluated "
        "(best validation Recall@1)."), "",
        "| variant | add-ons | R@1 | mAP | ΔR@1 | ΔmAP | verdict R@1 / mAP | best epoch per seed | train s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        s = row["summary"]
        if "delta" in row:
            d = row["delta"]
            delta = (f"{_fmt(d['recall@1'], sign=True)} | {_fmt(d['map'], sign=True)} | "
                     f"{d['recall@1']['verdict']} / {d['map']['verdict']}")
        else:
            delta = "– | – | reference"
        best = ", ".join(str(e) for e in row.get("best_epochs", []))
        lines.append(f"| `{row['variant']}` | {row['addons']} | {_fmt(s['recall@1'])} | {_fmt(s['map'])} | {delta} | "
                     f"{best} | {row['train_seconds']:.0f} |")
    lines += ["", (f"Total time {result['seconds'] / 60:.1f} min on {result['machine']}. Per-seed figures, "
                   f"R@2/4/8 and per-epoch logs: `{js.name}`."), ""]
    md.write_text("\n".join(lines))
    return md, js


def canonical_command(cfg: AddonsExperimentConfig) -> str:
    """The full command line that reproduces `cfg` (every option spelled out)."""
    import shlex
    parts = ["python", "-m", "experiments", "addons", "--data", cfg.data, "--out", cfg.out, "--backbone", cfg.backbone,
             "--pretrained", str(cfg.pretrained), "--head", cfg.head]
    if cfg.image_size:
        parts += ["--image-size", str(cfg.image_size)]
    for v in cfg.variants:
        parts += ["--variant", v]
    parts += ["--seeds", ",".join(map(str, cfg.seeds)), "--dim", str(cfg.dim), "--epochs", str(cfg.epochs),
              "--lr", str(cfg.lr)]
    for name in BASE_OPTIONS:  # the add-on options the variants start from
        value = getattr(cfg.addons, name)
        if value is not None:
            parts += ["--" + name.replace("_", "-"), str(value)]
    parts += ["--val-fraction", str(cfg.val_fraction), "--cache-dir", cfg.cache_dir, "--threads", str(cfg.threads),
              "--jobs", str(cfg.jobs)]
    return " ".join(shlex.quote(p) for p in parts)


def main_from_cli(cfg: AddonsExperimentConfig) -> dict:
    cfg.command = cfg.command or canonical_command(cfg)
    return run_addons_experiment(cfg)
