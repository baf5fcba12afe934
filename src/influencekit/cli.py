"""Command-line entry point: ``influencekit <group> <name> [options]``.

Each command lives in its own module exposing ``configure(parser)`` and
``run(args) -> int``; modules are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, dict[str, tuple[str, str]] | tuple[str, str]] = {
    "reproduce": {
        "koh-liang-fig2": ("influencekit.experiments.koh_liang_fig2", "Koh & Liang (2017) Figure 2: predicted vs. actual leave-one-out loss change"),
    },
    "experiment": {
        "tracin-mnist": ("influencekit.experiments.tracin_mnist", "TracIn on an MLP trained with SGD on MNIST vs. influence functions"),
        "fastif-recall": ("influencekit.experiments.fastif_recall", "FastIF kNN pre-selection: recall@m and speed-up of top-k search"),
    },
    "download": {
        "mnist": ("influencekit.datasets.mnist", "Download MNIST (checksum-verified) into --data-dir"),
    },
    "score": ("influencekit.scores.matrix", "I_up,loss of every training point for many test points into a zarr matrix (Dask, resumable)"),
}


def build_parser(command: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported to add its options.

    A ``COMMANDS`` entry is a group of named commands, or (module, help) for a
    command without a second word (``influencekit score ...``).
    """
    parser = argparse.ArgumentParser(prog="influencekit", description="Which training examples made my model predict this?")
    groups = parser.add_subparsers(dest="group", required=True)
    for group, commands in COMMANDS.items():
        if isinstance(commands, tuple):
            sub = groups.add_parser(group, help=commands[1], description=commands[1])
            sub.set_defaults(module=commands[0])
            if command is not None and command[:1] == (group,):
                importlib.import_module(commands[0]).configure(sub)
            continue
        group_parser = groups.add_parser(group)
        names = group_parser.add_subparsers(dest="name", required=True)
        for name, (module, help_text) in commands.items():
            sub = names.add_parser(name, help=help_text, description=help_text)
            sub.set_defaults(module=module)
            if command == (group, name):
                importlib.import_module(module).configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(tuple(argv[:2]) if argv else None)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args.module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
