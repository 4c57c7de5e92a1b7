"""`asymsearch experiment addons`: each training add-on (Metrix, OSM + CAA, message passing) off and on, on one frozen
pretrained backbone over several seeds; writes a Markdown + JSON table into docs/results/."""
from __future__ import annotations

import argparse

from asymsearch.cli.options import Commands, add_cached_maps_options, seeds

# = training.experiments.addons.DEFAULT_VARIANTS (repeated here so that --help does not import numpy)
_DEFAULT_VARIANTS = ("baseline", "metrix=input", "metrix=embedding", "osm_caa=true", "message_passing=2")


def register(commands: Commands) -> None:
    p = commands.add("addons", group="experiment",
                     help="ablation of the training add-ons (Metrix, OSM + CAA, message passing) on a frozen backbone",
                     description="Train one pooling head per variant and seed on the cached feature maps of a frozen "
                                 "pretrained backbone (first half of the classes trains, second half evaluates), "
                                 "with each training add-on off and on; report mean ± std Recall@1 / mAP and the "
                                 "per-seed paired change against the first variant. Writes OUT.md and OUT.json.")
    p.add_argument("--data", required=True, help="image folder with one subfolder per class")
    p.add_argument("--out", default="docs/results/addons", help="results path without suffix (default: %(default)s)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default: %(default)s)")
    p.add_argument("--pretrained", default="imagenet", help="backbone weights (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's own)")
    p.add_argument("--head", default="gem", help="pooling head spec (default: %(default)s)")
    p.add_argument("--variant", dest="variants", action="append", default=None,
                   help="baseline, or add-on options key=value[,key=value] (metrix, metrix_alpha, metrix_weight, "
                        "osm_caa, osm_sigma, osm_alpha, caa_weight, message_passing, mp_weight); repeat for several, "
                        f"the first is the reference (default: {' '.join(_DEFAULT_VARIANTS)})")
    p.add_argument("--seeds", type=seeds, default=(0, 1, 2), help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per variant and seed (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--metrix-alpha", type=float, default=2.0, help="Metrix λ ~ Beta(α, α) (default: %(default)s)")
    p.add_argument("--metrix-weight", type=float, default=1.0, help="Metrix loss weight (default: %(default)s)")
    p.add_argument("--osm-sigma", type=float, default=0.8, help="OSM σ (default: %(default)s)")
    p.add_argument("--osm-alpha", type=float, default=None, help="OSM α (default: √(2 − 2·margin))")
    p.add_argument("--caa-weight", type=float, default=1.0, help="CAA cross-entropy weight (default: %(default)s)")
    p.add_argument("--mp-weight", type=float, default=1.0,
                   help="message-passing cross-entropy weight (default: %(default)s)")
    add_cached_maps_options(p, "variant")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.training.experiments.addons import (
        AddonsExperimentConfig,
        main_from_cli,
    )

    cfg = AddonsExperimentConfig(
        data=args.data, out=args.out, backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
        head=args.head, variants=tuple(args.variants or _DEFAULT_VARIANTS), seeds=args.seeds, dim=args.dim,
        epochs=args.epochs, lr=args.lr, metrix_alpha=args.metrix_alpha, metrix_weight=args.metrix_weight,
        osm_sigma=args.osm_sigma, osm_alpha=args.osm_alpha, caa_weight=args.caa_weight, mp_weight=args.mp_weight,
        val_fraction=args.val_fraction, cache_dir=args.cache_dir, threads=args.threads, jobs=args.jobs)
    result = main_from_cli(cfg)
    print(f"wrote {cfg.out}.md and {cfg.out}.json ({len(result['rows'])} rows)")
    return 0
