"""`asymsearch experiment losses`: one student per AML loss (Budnik & Avrithis 2021) against the same teacher; writes a table of
symmetric and asymmetric Recall@K / mAP with the student's relative cost into docs/results/."""
from __future__ import annotations

import argparse
import shlex
import sys

from asymsearch.cli.options import Commands

# = training.experiments.losses.VARIANTS (names only; the CLI does not import torch at start-up)
_VARIANTS = ("Contr (student alone)", "Contr+", "Contr", "Triplet", "MS", "Reg", "RKD", "DarkRank", "RKD (asym)",
             "DarkRank (asym)")


def register(commands: Commands) -> None:
    p = commands.add("losses", group="experiment",
                     help="train one student per AML loss against one teacher; table of sym/asym R@K and mAP",
                     description="Seed 001's loss comparison on your data: a teacher (frozen pretrained backbone + "
                                 "trained GeM head) and, per loss, a student (cheaper frozen pretrained backbone + "
                                 "trained GeM head) trained with that loss; feature maps are computed once and "
                                 "cached. Writes OUT.md and OUT.json.")
    p.add_argument("--data", required=True, help="image folder with one subfolder per class (first half trains, "
                                                  "second half tests)")
    p.add_argument("--out", default="docs/results/losses", help="results path without suffix (default: %(default)s)")
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
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the student heads (default: %(default)s)")
    p.add_argument("--num-negatives", type=int, default=5, help="mined negatives per anchor (default: %(default)s)")
    p.add_argument("--variant", dest="variants", action="append", choices=_VARIANTS, default=None,
                   help="a table row to train; repeat for several (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="~/.cache/asymsearch/featmaps",
                   help="feature-map cache folder (default: %(default)s)")
    p.add_argument("--workdir", default="~/.cache/asymsearch/experiment-losses",
                   help="where the teacher checkpoint and its cached embeddings go (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.training.experiments.losses import LossesExperimentConfig, run_losses_experiment, write_results

    cfg = LossesExperimentConfig(
        data=args.data, out=args.out, teacher_backbone=args.teacher_backbone, teacher_size=args.teacher_size,
        student_backbone=args.student_backbone, student_size=args.student_size, pretrained=args.pretrained,
        dim=args.dim, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs, lr=args.lr,
        teacher_lr=args.teacher_lr,
        num_negatives=args.num_negatives, variants=tuple(args.variants or _VARIANTS), seed=args.seed,
        cache_dir=args.cache_dir, workdir=args.workdir, threads=args.threads,
        command="asymsearch " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "")
    result = run_losses_experiment(cfg)
    md, js = write_results(result, cfg.out)
    print(f"wrote {md} and {js} ({len(result['rows'])} students)")
    return 0
