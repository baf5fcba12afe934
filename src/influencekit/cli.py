"""Command-line entry point: ``influencekit <group> <name> [options]``.

Each command lives in its own module exposing ``configure(parser)`` and
``run(args) -> int``; modules are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, dict[str, tuple[str, str]]] = {
    "reproduce": {
        "koh-liang-fig2": ("influencekit.experiments.koh_liang_fig2", "Koh & Liang (2017) Figure 2: predicted vs. actual leave-one-out loss change"),
        "koh-liang-fig2-cnn": ("influencekit.experiments.koh_liang_fig2_cnn", "Koh & Liang (2017) Figure 2, right panel: small CNN, influence vs. retraining in three modes"),
    },
    "experiment": {
        "tracin-mnist": ("influencekit.experiments.tracin_mnist", "TracIn on an MLP trained with SGD on MNIST vs. influence functions"),
        "fastif-recall": ("influencekit.experiments.fastif_recall", "FastIF kNN pre-selection: recall@m and speed-up of top-k search"),
    },
    "download": {
        "mnist": ("influencekit.datasets.mnist", "Download MNIST (checksum-verified) into --data-dir"),
    },
}


def build_parser(command: tuple[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported to add its options."""
    parser = argparse.ArgumentParser(prog="influencekit", description="Which training examples made my model predict this?")
    groups = parser.add_subparsers(dest="group", required=True)
    for group, commands in COMMANDS.items():
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
    parser = build_parser((argv[0], argv[1]) if len(argv) >= 2 else None)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args.module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
