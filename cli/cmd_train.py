"""`asymsearch train teacher` and `asymsearch train student`."""
from __future__ import annotations

import argparse

from asymsearch.cli.options import Commands, add_config_options, config_from_args
from asymsearch.training.config import StudentConfig, TeacherConfig  # torch-free


def register(commands: Commands) -> None:
    p = commands.add("teacher", group="train",
                     help="symmetric metric learning: contrastive loss, in-batch hard negatives, GeM")
    add_config_options(p, TeacherConfig, required=("data", "out"))
    p.set_defaults(func=run_teacher)
    p = commands.add("student", group="train",
                     help="asymmetric metric learning against the frozen teacher (--loss reg by default; see docs/losses.md)")
    add_config_options(p, StudentConfig, required=("data", "teacher", "out"))
    p.set_defaults(func=run_student)


def run_teacher(args: argparse.Namespace) -> int:
    from asymsearch.training.teacher import train_teacher
    print(f"teacher checkpoint: {train_teacher(config_from_args(TeacherConfig, args))}")
    return 0


def run_student(args: argparse.Namespace) -> int:
    from asymsearch.training.student import train_student
    print(f"student checkpoint: {train_student(config_from_args(StudentConfig, args))}")
    return 0
