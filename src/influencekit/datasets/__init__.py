"""Datasets used by influencekit's experiments (currently MNIST)."""

from influencekit.datasets.mnist import (
    DEFAULT_MIRROR,
    LECUN_MIRROR,
    MIRRORS,
    MNIST,
    DatasetCorruptError,
    DatasetError,
    DatasetNotFoundError,
    Split,
    default_data_dir,
    download_mnist,
    koh_liang_split,
    koh_liang_validation,
    load_mnist,
    load_or_download_mnist,
    write_mnist_format,
)

__all__ = [
    "DEFAULT_MIRROR",
    "LECUN_MIRROR",
    "MIRRORS",
    "MNIST",
    "DatasetCorruptError",
    "DatasetError",
    "DatasetNotFoundError",
    "Split",
    "default_data_dir",
    "download_mnist",
    "koh_liang_split",
    "koh_liang_validation",
    "load_mnist",
    "load_or_download_mnist",
    "write_mnist_format",
]
