"""`asymsearch experiment heads`: train every pooling head on one pretrained backbone (frozen, or its last units
tuned too) over several seeds and write a Markdown + JSON table into docs/results/."""
from __future__ import annotations

import argparse

from asymsearch.cli.options import Commands, add_cached_maps_options, seeds
from asymsearch.core.errors import UserError

# = training.experiments.heads.DEFAULT_HEADS (repeated here so that --help does not import numpy)
_DEFAULT_HEADS = ("gem", "glam:channels=256", "glam:channels=256,global=false", "glam:channels=256,local=false",
                  "glap", "diablo:channels=256", "diablo:channels=256,select=feature,attention=post")


def register(commands: Commands) -> None:
    p = commands.add("heads", group="experiment",
                     help="compare the pooling heads (gem, glam, glap, diablo) on a pretrained backbone",
                     description="Compare pooling heads on one pretrained backbone: its feature maps are "
                                 "computed once and cached, each head trains on them for every seed (with "
                                 "--tune-units, together with the backbone's last units), and the zero-shot (GAP) "
                                 "figures are measured in the same run. Writes OUT.md and OUT.json. Each finished "
                                 "(head, seed) run is kept at once in OUT.runs.jsonl: rerun the same command after a "
                                 "crash or Ctrl-C and only the missing runs train (delete that file to retrain them "
                                 "all); it is deleted once the table is written.")
    p.add_argument("--data", help="image folder with one subfolder per class (first half trains, "
                                                  "second half evaluates)")
    p.add_argument("--out", default="docs/results/heads", help="results path without suffix (default: %(default)s)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default: %(default)s)")
    p.add_argument("--pretrained", default="imagenet", help="backbone weights (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's own)")
    p.add_argument("--head", dest="heads", action="append", default=None,
                   help="a head spec such as glam:channels=512,local=false; repeat for several "
                        f"(default: {' '.join(_DEFAULT_HEADS)})")
    p.add_argument("--seeds", type=seeds, default=(0, 1, 2), help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per head and seed (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--xbm", type=int, default=0, help="cross-batch memory size, 0 disables (default: %(default)s)")
    p.add_argument("--classes-per-batch", type=int, default=8, help="classes per batch (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=4, help="images per class in a batch (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up epochs before the cosine decay (default: %(default)s)")
    tuned = p.add_argument_group(
        "partial fine-tuning", "With --tune-units N each head trains as `asymsearch train teacher --tune-units N` "
        "does: the backbone's last N units train with it on the frozen trunk's cached maps (see docs/heads.md).")
    tuned.add_argument("--tune-units", type=int, default=0,
                       help="the backbone's last N units train with each head (0: the head alone on the frozen "
                            "backbone's maps) (default: %(default)s)")
    tuned.add_argument("--trunk-views", type=int, default=1,
                       help="cached views of each training image (train teacher --trunk-views) "
                            "(default: %(default)s)")
    tuned.add_argument("--backbone-lr", type=float, default=None,
                       help="learning rate of the tuned units (default: lr / 10)")
    tuned.add_argument("--loss", default="contr", choices=("contr", "proxy-anchor"),
                       help="contr (Budnik & Avrithis 2021) or proxy-anchor; the latter needs --tune-units (default: %(default)s)")
    tuned.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: auto)")
    add_cached_maps_options(p, "head")
    p.add_argument("--recost", action="store_true",
                   help="only re-measure the cost columns (params, GFLOPs, images/s) of the results at --out, side "
                        "by side, and rewrite them (no training; --data is then not needed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.training.experiments.heads import HeadsExperimentConfig, main_from_cli, recost

    if args.recost:
        recost(args.out, args.threads)
        print(f"rewrote {args.out}.md and {args.out}.json")
        return 0
    if not args.data:
        raise UserError("--data is required (except with --recost)")

    cfg = HeadsExperimentConfig(data=args.data, out=args.out, backbone=args.backbone, pretrained=args.pretrained,
                                image_size=args.image_size, heads=tuple(args.heads or _DEFAULT_HEADS),
                                seeds=args.seeds, dim=args.dim, epochs=args.epochs, lr=args.lr, xbm=args.xbm,
                                val_fraction=args.val_fraction, cache_dir=args.cache_dir, threads=args.threads,
                                jobs=args.jobs, classes_per_batch=args.classes_per_batch, per_class=args.per_class,
                                warmup_epochs=args.warmup_epochs, tune_units=args.tune_units,
                                trunk_views=args.trunk_views, backbone_lr=args.backbone_lr, loss=args.loss,
                                device=args.device)
    result = main_from_cli(cfg)
    print(f"wrote {cfg.out}.md and {cfg.out}.json ({len(result['rows'])} rows)")
    return 0
