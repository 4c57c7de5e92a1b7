"""`asymsearch train teacher`, `asymsearch train student`, `asymsearch train soup` and `asymsearch train ensemble`."""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

from asymsearch.cli.options import Commands, add_config_options, config_from_args, existing_path
from asymsearch.training.config import StudentConfig, TeacherConfig  # torch-free


def register(commands: Commands) -> None:
    p = commands.add("teacher", group="train",
                     help="symmetric metric learning: contrastive loss, in-batch hard negatives, GeM")
    add_config_options(p, TeacherConfig, required=("data", "out"))
    _add_nproc_option(p, "teacher")
    p.set_defaults(func=run_teacher)
    p = commands.add("student", group="train",
                     help="asymmetric metric learning against the frozen teacher (--loss reg by default; see docs/losses.md)")
    add_config_options(p, StudentConfig, required=("data", "teacher", "out"))
    _add_nproc_option(p, "student")
    p.set_defaults(func=run_student)
    p = commands.add("soup", group="train",
                     help="average the weights of teachers fine-tuned from the same start into one model (uniform "
                          "model soup: same cost at inference; docs/heads.md)",
                     description="Average the weights of two or more teacher checkpoints of one architecture that "
                                 "started from the same weights (train them with the same --init-seed and different "
                                 "--seed) into one checkpoint: the uniform model soup of Wortsman et al. 2022. Refuses "
                                 "students and members of another architecture, preprocessing or starting point.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="the members (.pt)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.set_defaults(func=run_soup)
    p = commands.add("ensemble", group="train",
                     help="join trained teachers into one ensemble teacher (their embeddings concatenated: dim = the "
                          "sum, every member runs per database image), or students of its members into one student "
                          "of it (--teacher); docs/heads.md",
                     description="Join two or more teacher checkpoints with the same preprocessing into one teacher "
                                 "whose embedding is the concatenation of theirs divided by sqrt(k), so its inner "
                                 "product is the members' mean cosine similarity. Members may differ in backbone, "
                                 "head and dimension. The result is an ordinary teacher checkpoint: export it, index "
                                 "with it and train students against it (without --from-teacher). With --teacher "
                                 "ENSEMBLE.pt, join students instead, one of each of that ensemble's members in its "
                                 "order (e.g. each trained --from-teacher), into one student of the ensemble. Refuses "
                                 "a mix of roles, ensembles, repeated members, members that prepare images "
                                 "differently and students of other teachers.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="the member teachers (.pt), in order; with --teacher, a student of each of its members, in "
                        "its members' order")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--teacher", type=existing_path("ensemble teacher checkpoint"),
                   help="an ensemble teacher: join students of its members into one student of it")
    p.set_defaults(func=run_ensemble)


def _add_nproc_option(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="train on N processes of this machine with DistributedDataParallel (torchrun --standalone; "
                        "one GPU each on CUDA, gloo on the CPU), each on its share of every batch: N must divide "
                        "the batch, checked before any starts. For several machines run torchrun yourself: "
                        f"torchrun --nproc-per-node N ... -m asymsearch.cli.main train {role} ... (default: 1)")


def _launch(role: str, cfg, args: argparse.Namespace) -> int | None:
    """With --nproc-per-node N > 1 outside torchrun: check the batch rule for N, run the N workers, their status.
    None: this process trains (one process, or a torchrun worker: its world size is checked here too)."""
    from asymsearch.core.errors import UserError
    from asymsearch.training.distributed import check_launch
    if args.nproc_per_node != 1 and "WORLD_SIZE" not in os.environ:  # the workers take the branch below
        if args.nproc_per_node < 1:
            raise UserError(f"--nproc-per-node must be at least 1, not {args.nproc_per_node}")
        check_launch(cfg, {"WORLD_SIZE": str(args.nproc_per_node), "RANK": "0", "LOCAL_RANK": "0"})
        return _torchrun(args.nproc_per_node, ["train", role, *config_argv(cfg)])
    check_launch(cfg)  # under torchrun: the world size divides the batch, before any process group or data
    return None


def run_teacher(args: argparse.Namespace) -> int:
    cfg = config_from_args(TeacherConfig, args)
    if (status := _launch("teacher", cfg, args)) is not None:
        return status
    from asymsearch.training.distributed import distributed_context
    from asymsearch.training.teacher import train_teacher
    with distributed_context(cfg.device) as ctx:  # one process without torchrun
        path = train_teacher(cfg, ctx)
        if ctx.is_main:
            print(f"teacher checkpoint: {path}")
    return 0


def run_student(args: argparse.Namespace) -> int:
    cfg = config_from_args(StudentConfig, args)
    if (status := _launch("student", cfg, args)) is not None:
        return status
    from asymsearch.training.distributed import distributed_context
    from asymsearch.training.student import train_student
    with distributed_context(cfg.device) as ctx:  # one process without torchrun
        path = train_student(cfg, ctx)
        if ctx.is_main:
            print(f"student checkpoint: {path}")
    return 0


def config_argv(cfg) -> list[str]:
    """The command-line options that rebuild `cfg` (a config dataclass) through `add_config_options`: every field
    that differs from its default, and the required ones."""
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if dataclasses.is_dataclass(value):  # a nested config (the add-ons): its fields are flags of their own
            argv += config_argv(value)
            continue
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if value is None:
            from asymsearch.core.errors import UserError
            raise UserError(f"{f.name} None cannot be passed to the worker processes as an option")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (tuple, list)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _torchrun(nproc: int, argv: list[str]) -> int:
    """`torchrun --standalone --nproc-per-node N -m asymsearch.cli.main ARGV`; its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "asymsearch.cli.main", *argv]
    return subprocess.run(cmd, check=False).returncode


def run_soup(args: argparse.Namespace) -> int:
    from asymsearch.training.soup import average_checkpoints
    print(f"soup checkpoint: {average_checkpoints(args.checkpoints, args.out)}")
    return 0


def run_ensemble(args: argparse.Namespace) -> int:
    from asymsearch.training.ensemble import ensemble_checkpoints
    print(f"ensemble checkpoint: {ensemble_checkpoints(args.checkpoints, args.out, teacher=args.teacher)}")
    return 0
