"""`asymsearch demo`: the whole pipeline end to end."""
from __future__ import annotations

import argparse

from asymsearch.cli.demo import DemoConfig
from asymsearch.cli.options import Commands, add_config_options


def register(commands: Commands) -> None:
    p = commands.add("demo", help="the whole pipeline end to end on generated (or given) data")
    add_config_options(p, DemoConfig, required=("workdir",))  # with --config FILE and KEY=VALUE
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymsearch.cli.demo import run_demo
    run_demo(args.config_object)
    return 0
