"""`python -m experiments heads|losses|addons`: the command line of the comparison experiments (run from a checkout).

A `UserError` from an experiment becomes one line on stderr and exit status 2, as with `asymsearch`.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from asymsearch.core.errors import UserError
from asymsearch.training.config import AddOnOptions

from experiments.addons import BASE_OPTIONS, DEFAULT_VARIANTS
from experiments.heads import DEFAULT_HEADS
from experiments.losses import VARIANTS

ADDON_FIELDS = tuple(f.name for f in dataclasses.fields(AddOnOptions))
EXIT_USER_ERROR = 2
PROG = "python -m experiments"


def seeds(text: str) -> tuple[int, ...]:
    """argparse type of `--seeds 0,1,2`."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, not {text!r}") from None


def add_cached_maps_options(p: argparse.ArgumentParser, unit: str) -> None:
    """The options of an experiment that trains heads on cached frozen-backbone maps, one run per (`unit`, seed):
    validation split, cache folder, threads and parallel jobs."""
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="training classes held out to pick the best epoch (default: %(default)s)")
    p.add_argument("--cache-dir", default="~/.cache/asymsearch/featmaps",
                   help="feature-map cache folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per job (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1,
                   help=f"({unit}, seed) runs trained in parallel processes (default: %(default)s)")


# ------------------------------------------------------------------------------------------------------- heads


def add_heads(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heads", help="compare the pooling heads (gem, glam, glap, diablo) on a pretrained backbone",
                       description="Compare pooling heads on one pretrained backbone: its feature maps are computed "
                                   "once and cached, each head trains on them for every seed (with --tune-units, "
                                   "together with the backbone's last units, as `asymsearch train teacher "
                                   "--tune-units` does), and the zero-shot (GAP) figures are measured in the same run. "
                                   "Writes OUT.md and OUT.json. Each finished (head, seed) run is kept at once in "
                                   "OUT.runs.jsonl: rerun the same command after a crash or Ctrl-C and only the "
                                   "missing runs train (delete that file to retrain them all); it is deleted once the "
                                   "table is written.")
    p.add_argument("--data", help="image folder with one subfolder per class (first half trains, second half "
                                  "evaluates); required except with --recost")
    p.add_argument("--out", default="docs/results/heads",
                   help="results path without suffix, relative to the current folder (default: %(default)s)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default: %(default)s)")
    p.add_argument("--pretrained", default="imagenet", help="backbone weights (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's own)")
    p.add_argument("--head", dest="heads", action="append", default=None,
                   help="a head spec such as glam:channels=512,local=false; repeat for several "
                        f"(default: {' '.join(DEFAULT_HEADS)})")
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
                       help="cached views of each training image (train teacher --trunk-views) (default: %(default)s)")
    tuned.add_argument("--backbone-lr", type=float, default=None,
                       help="learning rate of the tuned units (default: lr / 10)")
    tuned.add_argument("--loss", default="contr", choices=("contr", "proxy-anchor"),
                       help="contr (Budnik & Avrithis 2021) or proxy-anchor; the latter needs --tune-units "
                            "(default: %(default)s)")
    tuned.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: auto)")
    add_cached_maps_options(p, "head")
    p.add_argument("--recost", action="store_true",
                   help="only re-measure the cost columns (params, GFLOPs, images/s) of the results at --out, side "
                        "by side, and rewrite them (no training; --data is then not needed)")
    p.set_defaults(func=run_heads)


def run_heads(args: argparse.Namespace) -> int:
    from experiments.heads import HeadsExperimentConfig, main_from_cli, recost

    if args.recost:
        recost(args.out, args.threads)
        print(f"rewrote {args.out}.md and {args.out}.json")
        return 0
    if not args.data:
        raise UserError("--data is required (except with --recost)")
    cfg = HeadsExperimentConfig(data=args.data, out=args.out, backbone=args.backbone, pretrained=args.pretrained,
                                image_size=args.image_size, heads=tuple(args.heads or DEFAULT_HEADS),
                                seeds=args.seeds, dim=args.dim, epochs=args.epochs, lr=args.lr, xbm=args.xbm,
                                val_fraction=args.val_fraction, cache_dir=args.cache_dir, threads=args.threads,
                                jobs=args.jobs, classes_per_batch=args.classes_per_batch, per_class=args.per_class,
                                warmup_epochs=args.warmup_epochs, tune_units=args.tune_units,
                                trunk_views=args.trunk_views, backbone_lr=args.backbone_lr, loss=args.loss,
                                device=args.device)
    result = main_from_cli(cfg)
    print(f"wrote {cfg.out}.md and {cfg.out}.json ({len(result['rows'])} rows)")
    return 0


# ------------------------------------------------------------------------------------------------------ losses


def add_losses(sub: argparse._SubParsersAction) -> None:
    names = tuple(v[0] for v in VARIANTS)
    p = sub.add_parser("losses", help="train one student per AML loss against one teacher; table of sym/asym R@K "
                                      "and mAP",
                       description="The loss comparison of Budnik & Avrithis 2021 on your data: a teacher (frozen "
                                   "pretrained backbone + trained GeM head) and, per loss, a student (cheaper frozen "
                                   "pretrained backbone + trained GeM head) trained with that loss; feature maps are "
                                   "computed once and cached. Writes OUT.md and OUT.json.")
    p.add_argument("--data", required=True, help="image folder with one subfolder per class (first half trains, "
                                                  "second half tests)")
    p.add_argument("--out", default="docs/results/losses",
                   help="results path without suffix, relative to the current folder (default: %(default)s)")
    p.add_argument("--teacher-backbone", default="efficientnet_lite0", help="(default: %(default)s)")
    p.add_argument("--teacher-size", type=int, default=None, help="teacher input size (default: the backbone's own)")
    p.add_argument("--student-backbone", default="efficientnet_lite0", help="(default: %(default)s)")
    p.add_argument("--student-size", type=int, default=128, help="student input size (default: %(default)s)")
    p.add_argument("--pretrained", default="imagenet", help="backbone weights (default: %(default)s)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default: %(default)s)")
    p.add_argument("--teacher-epochs", type=int, default=5, help="(default: %(default)s)")
    p.add_argument("--student-epochs", type=int, default=10, help="per loss (default: %(default)s)")
    p.add_argument("--teacher-lr", type=float, default=1e-4,
                   help="AdamW learning rate of the teacher's head (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate of the student heads (default: %(default)s)")
    p.add_argument("--num-negatives", type=int, default=5, help="mined negatives per anchor (default: %(default)s)")
    p.add_argument("--variant", dest="variants", action="append", choices=names, default=None,
                   help="a table row to train; repeat for several (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--cache-dir", default="~/.cache/asymsearch/featmaps",
                   help="feature-map cache folder (default: %(default)s)")
    p.add_argument("--workdir", default="~/.cache/asymsearch/experiment-losses",
                   help="where the teacher checkpoint and its cached embeddings go (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.set_defaults(func=run_losses)


def run_losses(args: argparse.Namespace) -> int:
    from experiments.losses import LossesExperimentConfig, run_losses_experiment, write_results

    cfg = LossesExperimentConfig(
        data=args.data, out=args.out, teacher_backbone=args.teacher_backbone, teacher_size=args.teacher_size,
        student_backbone=args.student_backbone, student_size=args.student_size, pretrained=args.pretrained,
        dim=args.dim, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs, lr=args.lr,
        teacher_lr=args.teacher_lr, num_negatives=args.num_negatives,
        variants=tuple(args.variants or (v[0] for v in VARIANTS)), seed=args.seed, cache_dir=args.cache_dir,
        workdir=args.workdir, threads=args.threads, command=f"{PROG} " + " ".join(shlex.quote(a) for a in args.argv))
    result = run_losses_experiment(cfg)
    md, js = write_results(result, cfg.out)
    print(f"wrote {md} and {js} ({len(result['rows'])} students)")
    return 0


def add_losses_orderings(sub: argparse._SubParsersAction) -> None:
    from experiments.losses import STUDENT_VARIANTS, TEACHER_LOSSES

    p = sub.add_parser("losses-orderings", help="teacher and student losses over several seeds and data sets: the "
                                                "orderings the sources report, re-measured",
                       description="Per data set and seed: a random split of the training half's classes into fit "
                                   "and validation classes, one teacher head per teacher loss and one student head "
                                   "per student loss (against the seed's contrastive teacher) on cached frozen "
                                   "backbone maps, each chosen on its validation classes and evaluated once on the "
                                   "evaluation half. Writes OUT.md and OUT.json (rewritten after each data set).")
    p.add_argument("--data", action="append", required=True, help="image folder; repeat for several data sets")
    p.add_argument("--out", default="docs/results/losses_paper",
                   help="results path without suffix (default: %(default)s)")
    p.add_argument("--seeds", type=seeds, default=(0, 1, 2), help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--teacher-loss", dest="teacher_losses", action="append", choices=TEACHER_LOSSES, default=None,
                   help=f"repeat for several (default: {' '.join(TEACHER_LOSSES)}); contr is always trained: the "
                        "students' teacher")
    p.add_argument("--student-variant", dest="student_variants", action="append",
                   choices=[v[0] for v in STUDENT_VARIANTS], default=None, help="repeat for several (default: all)")
    p.add_argument("--teacher-epochs", type=int, default=5, help="(default: %(default)s)")
    p.add_argument("--student-epochs", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--student-size", type=int, default=128, help="student input size (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="training classes drawn per seed for validation (default: %(default)s)")
    p.add_argument("--cache-dir", default="~/.cache/asymsearch/featmaps",
                   help="feature-map cache folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.set_defaults(func=run_losses_orderings)


def run_losses_orderings(args: argparse.Namespace) -> int:
    from experiments.losses import STUDENT_VARIANTS, TEACHER_LOSSES, OrderingsConfig, run_orderings

    teacher_losses = tuple(args.teacher_losses or TEACHER_LOSSES)
    if "contr" not in teacher_losses:
        teacher_losses = ("contr",) + teacher_losses
    cfg = OrderingsConfig(data=tuple(args.data), out=args.out, seeds=args.seeds, teacher_losses=teacher_losses,
                          student_variants=tuple(args.student_variants or (v[0] for v in STUDENT_VARIANTS)),
                          teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
                          student_size=args.student_size, val_fraction=args.val_fraction, cache_dir=args.cache_dir,
                          threads=args.threads, argv=(PROG.split()[0], "-m", "experiments", *args.argv))
    result = run_orderings(cfg)
    print(f"wrote {cfg.out}.md and {cfg.out}.json ({len(result['tables'])} data sets)")
    return 0


# ------------------------------------------------------------------------------------------------------ addons


def add_addons(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("addons", help="ablation of the training add-ons (Metrix, OSM + CAA, message passing) on a "
                                      "frozen backbone",
                       description="Train one pooling head per variant and seed on the cached feature maps of a "
                                   "frozen pretrained backbone (first half of the classes trains, second half "
                                   "evaluates), with each training add-on off and on; report mean ± std Recall@1 / "
                                   "mAP and the per-seed paired change against the first variant. Writes OUT.md and "
                                   "OUT.json.")
    p.add_argument("--data", required=True, help="image folder with one subfolder per class")
    p.add_argument("--out", default="docs/results/addons",
                   help="results path without suffix, relative to the current folder (default: %(default)s)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default: %(default)s)")
    p.add_argument("--pretrained", default="imagenet", help="backbone weights (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's own)")
    p.add_argument("--head", default="gem", help="pooling head spec (default: %(default)s)")
    p.add_argument("--variant", dest="variants", action="append", default=None,
                   help=f"baseline, or add-on options key=value[,key=value] ({', '.join(ADDON_FIELDS)}); repeat for "
                        f"several, the first is the reference (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--seeds", type=seeds, default=(0, 1, 2), help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per variant and seed (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    base = p.add_argument_group("add-on hyper-parameters", "the values every variant starts from (a variant may "
                                "set them too)")
    for f in dataclasses.fields(AddOnOptions):  # the one list of add-on options (training.config.AddOnOptions)
        if f.name in BASE_OPTIONS:
            base.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                              type=type(f.default) if isinstance(f.default, str) else float,
                              help=f.metadata["help"] + " (default: %(default)s)")
    add_cached_maps_options(p, "variant")
    p.set_defaults(func=run_addons)


def run_addons(args: argparse.Namespace) -> int:
    from experiments.addons import AddonsExperimentConfig, main_from_cli

    cfg = AddonsExperimentConfig(
        data=args.data, out=args.out, backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
        head=args.head, variants=tuple(args.variants or DEFAULT_VARIANTS), seeds=args.seeds, dim=args.dim,
        epochs=args.epochs, lr=args.lr, addons=AddOnOptions(**{name: getattr(args, name) for name in BASE_OPTIONS}),
        val_fraction=args.val_fraction, cache_dir=args.cache_dir, threads=args.threads, jobs=args.jobs)
    result = main_from_cli(cfg)
    print(f"wrote {cfg.out}.md and {cfg.out}.json ({len(result['rows'])} rows)")
    return 0


# --------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Comparison experiments beside the product: each trains with `asymsearch.training` "
                               "and writes a Markdown + JSON result table (default: into docs/results/ of the "
                               "current folder, the checkout). Run from a checkout of the repository.")
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    add_heads(sub)
    add_losses(sub)
    add_losses_orderings(sub)
    add_addons(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
