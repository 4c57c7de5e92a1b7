"""`asymsearch`: one command, a subcommand per stage.

The top floor: it imports the stages (lazily, inside each command, so `asymsearch serve` never imports torch) and
nothing imports it. Each `cmd_*` module registers its subcommands and calls one stage function. A `UserError` from
any stage becomes one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from asymsearch.cli.options import Commands
from asymsearch.core.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# Modules under asymsearch.cli, each with `register(commands)`; the order is the order of --help.
# The comparison experiments are not commands of the product: `python -m experiments ...` from a checkout.
COMMAND_MODULES = ("cmd_train", "cmd_export", "cmd_index", "cmd_transform", "cmd_push", "cmd_student", "cmd_serve",
                   "cmd_query", "cmd_web", "cmd_eval", "cmd_info", "cmd_demo", "cmd_bench_embed", "cmd_bench_serve", "cmd_bench_index")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymsearch",
        description="Image retrieval with asymmetric metric learning: a teacher embeds the database once, a small "
                    "student embeds each query into the same space.",
        epilog="Pipeline: train teacher -> train student -> export (both) -> index build -> serve -> query / eval. "
               "`asymsearch demo --workdir DIR` runs all of it on generated data.")
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for name in COMMAND_MODULES:
        importlib.import_module(f"asymsearch.cli.{name}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    binding = getattr(args, "config_binding", None)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")] if binding is not None else []
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if binding is not None:  # defaults < --config < KEY=VALUE < flags, checked before any work
            binding.apply(args, overrides)
        status = args.func(args)
        if binding is not None and status == 0:
            binding.save_beside_artifact(args)
        return status
    except UserError as e:
        print(f"asymsearch: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("asymsearch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
