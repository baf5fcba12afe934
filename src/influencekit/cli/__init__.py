"""Command-line entry point: ``influencekit <group> <name> [options]``.

Each command lives in its own module exposing ``configure(parser)`` and
``run(args) -> int``; modules are imported only when their command runs.

Expected failures print one line, ``influencekit: error: <what went wrong and
what to do>``, on stderr and exit with status 2, without a traceback: a bad
argument, and the exception types of :func:`expected_errors` (missing or corrupt
data that could not be downloaded, a rejected input, a curvature that is not
positive definite, a diverging LiSSA recursion). ``influencekit --debug ...``
shows their traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

Command = tuple[str, str]
"""(module, help text) of one command."""

COMMANDS: dict[str, Command | dict[str, Command]] = {
    "reproduce": {
        "koh-liang-fig2": ("influencekit.experiments.koh_liang_fig2", "Koh & Liang (2017) Figure 2: predicted vs. actual leave-one-out loss change"),
        "koh-liang-fig2-cnn": ("influencekit.experiments.koh_liang_fig2_cnn", "Koh & Liang (2017) Figure 2, right panel: small CNN, influence vs. retraining in three modes"),
    },
    "experiment": {
        "tracin-mnist": ("influencekit.experiments.tracin_mnist", "TracIn on an MLP trained with SGD on MNIST vs. influence functions"),
        "fastif-recall": ("influencekit.experiments.fastif_recall", "FastIF kNN pre-selection: recall@m and speed-up of top-k search"),
        "fragility": ("influencekit.experiments.fragility", "Basu et al. (2021): influence vs. retraining across model depth and weight decay"),
    },
    "evaluate": ("influencekit.experiments.evaluate", "Rank every attribution method on one workload: LDS, LOO correlation, mislabel AUC"),
    "score": ("influencekit.scores.matrix", "I_up,loss of every training point for many test points into a zarr matrix (Dask, resumable)"),
    "download": {
        "mnist": ("influencekit.cli.download", "Download MNIST (checksum-verified) into --data-dir"),
    },
}


EXIT_EXPECTED_ERROR = 2
"""Exit status of an expected failure (argparse's status for a usage error)."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exception types reported as one line and exit status 2 (imported only once a command failed).

    ``DatasetError`` (MNIST absent with ``--no-download``, download failed on every
    mirror, corrupt file), ``ValueError`` (rejected inputs, including
    ``NotPositiveDefiniteError``), ``LiSSADivergenceError`` (scale too small).
    Their messages name the fix.
    """
    from influencekit.datasets.mnist import DatasetError
    from influencekit.solvers.lissa import LiSSADivergenceError

    return (DatasetError, ValueError, LiSSADivergenceError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``--help`` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_EXPECTED_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _command(argv: Sequence[str]) -> tuple[str, ...]:
    """The command's words (``(group, name)``, or ``(name,)``) once a global ``--debug`` is set aside."""
    words = [a for a in argv if a != "--debug"]
    if words and isinstance(COMMANDS.get(words[0]), tuple):
        return (words[0],)
    return tuple(words[:2])


_DEBUG_HELP = "show the traceback of an expected error too"


def _add_command(subparsers: Any, name: str, command: Command, selected: bool) -> None:
    module, help_text = command
    sub = subparsers.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(module=module)
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)  # also after the command
    if selected:
        importlib.import_module(module).configure(sub)


def build_parser(command: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported to add its options.

    A ``COMMANDS`` entry is a group of named commands (``influencekit reproduce koh-liang-fig2``)
    or one command without a second word (``influencekit score``).
    """
    parser = _Parser(prog="influencekit", description="Which training examples made my model predict this?")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    groups = parser.add_subparsers(dest="group", required=True)
    for group, entry in COMMANDS.items():
        if isinstance(entry, tuple):
            _add_command(groups, group, entry, command == (group,))
            continue
        names = groups.add_parser(group).add_subparsers(dest="name", required=True)
        for name, named in entry.items():
            _add_command(names, name, named, command == (group, name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; an expected failure prints one line on stderr and returns 2 (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except Exception as error:
        if args.debug or not isinstance(error, expected_errors()):
            raise
        print(f"influencekit: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_EXPECTED_ERROR
