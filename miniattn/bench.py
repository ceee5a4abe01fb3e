"""``miniattn bench``: the benchmarks that ship with the package, one subcommand each.

`BENCHES` maps a name to a module defining ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int`` (imported when the parser is built), like `miniattn.cli.SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["HELP", "BENCHES", "add_arguments", "run"]

HELP = "benchmarks: `miniattn bench step` (the cache write's share of a decode step)"

BENCHES = {"step": "miniattn.bench_step.cli"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, modname in BENCHES.items():
        mod = importlib.import_module(modname)
        sp = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        sp.set_defaults(_bench_run=mod.run)
    p.set_defaults(_bench_parser=p)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_bench_run", None) is None:
        args._bench_parser.print_help()
        return 2
    return args._bench_run(args)
