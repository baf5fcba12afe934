"""``influencekit download mnist``: fetch the four MNIST files into a data directory, checksum-verified."""

from __future__ import annotations

import argparse

from influencekit.datasets.mnist import MIRRORS, MIRRORS_ENV, add_data_dir_argument, download_mnist

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``influencekit download mnist``."""
    add_data_dir_argument(parser, "target directory")
    parser.add_argument(
        "--mirror",
        action="append",
        default=None,
        help=f"mirror URL to try; repeat for several, tried in order (default: ${MIRRORS_ENV} or {', '.join(MIRRORS)})",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Download and verify; a failure raises :class:`DatasetError` (the CLI prints one line, exit status 2)."""
    directory = download_mnist(args.data_dir, args.mirror, progress=False if args.no_progress else None)
    print(f"MNIST is ready in {directory}")
    return 0
