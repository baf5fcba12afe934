"""Data sets for the tests: a synthetic MNIST-format set everywhere, the real MNIST where available.

The pipeline tests (Figure 2, TracIn, FastIF) run on :func:`synthetic_mnist_arrays`, written by
:func:`influencekit.datasets.write_mnist_format` with its ``MD5SUMS`` manifest, so they need no
download and no data beside the checkout. Tests of properties of the real MNIST files (official
checksums, published digit counts) use the ``real_mnist_dir`` fixture: ``$INFLUENCEKIT_DATA`` or the
user cache ``~/.cache/influencekit/mnist``, and they skip with a one-line reason when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from influencekit.datasets import write_mnist_format
from influencekit.datasets.mnist import DATA_DIR_ENV, MNIST_MD5, resolve_data_dir

SYNTHETIC_SEED = 0
SHIFT = 1
NOISE = 30.0


def _prototypes(rng: np.random.Generator, count: int) -> np.ndarray:
    """``(count, 28, 28)`` float images in ``[0, 255]``: a few Gaussian strokes each, inside the central 20 x 20."""
    grid = np.arange(28, dtype=np.float64)
    images = np.zeros((count, 28, 28))
    for image in images:
        for _ in range(5):
            cy, cx = rng.uniform(6, 22, size=2)
            sy, sx = rng.uniform(1.0, 4.0, size=2)
            image += np.exp(-((grid[:, None] - cy) ** 2) / (2 * sy**2) - ((grid[None, :] - cx) ** 2) / (2 * sx**2))
    return (255 * images / images.max(axis=(1, 2), keepdims=True)).astype(np.float32)


def synthetic_mnist_arrays(seed: int = SYNTHETIC_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A learnable stand-in for MNIST with its shapes: ``(60000, 28, 28)``, ``(60000,)``, ``(10000, 28, 28)``, ``(10000,)`` uint8.

    Each of the 10 classes has 3 prototypes (sums of Gaussian strokes); an image is one of its class's
    prototypes at a random contrast in [0.5, 1], shifted by up to 2 pixels, plus N(0, 40^2) pixel
    noise, clipped to [0, 255]. 2% of the labels are replaced by uniformly random ones, so, as in MNIST,
    a few training points are mislabelled and strongly influential. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    modes = 3
    prototypes = _prototypes(rng, 10 * modes)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, size=n)
        images = np.empty((n, 28, 28), dtype=np.uint8)
        chosen = labels * modes + rng.integers(0, modes, size=n)
        shifts = rng.integers(-SHIFT, SHIFT + 1, size=(n, 2))
        for start in range(0, n, 10_000):
            rows = slice(start, start + 10_000)
            batch = prototypes[chosen[rows]] * rng.uniform(0.5, 1.0, size=(len(chosen[rows]), 1, 1)).astype(np.float32)
            for dy in range(-SHIFT, SHIFT + 1):
                for dx in range(-SHIFT, SHIFT + 1):
                    hit = (shifts[rows, 0] == dy) & (shifts[rows, 1] == dx)
                    batch[hit] = np.roll(batch[hit], (dy, dx), axis=(1, 2))
            batch += np.float32(NOISE) * rng.standard_normal(size=batch.shape, dtype=np.float32)
            images[rows] = np.clip(np.rint(batch), 0, 255).astype(np.uint8)
        flipped = rng.random(n) < 0.02
        labels[flipped] = rng.integers(0, 10, size=int(flipped.sum()))
        return images, labels.astype(np.uint8)

    train_images, train_labels = draw(60_000)
    test_images, test_labels = draw(10_000)
    return train_images, train_labels, test_images, test_labels


@pytest.fixture(scope="session")
def synthetic_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding :func:`synthetic_mnist_arrays` in MNIST's format (uncompressed, with ``MD5SUMS``)."""
    return write_mnist_format(tmp_path_factory.mktemp("synthetic-mnist"), *synthetic_mnist_arrays())


@pytest.fixture(scope="session")
def real_mnist_dir() -> Path:
    """The official MNIST files from ``$INFLUENCEKIT_DATA`` or the user cache; skips the test when absent."""
    directory = resolve_data_dir()
    if not all((directory / name).is_file() or (directory / f"{name}.gz").is_file() for name in MNIST_MD5):
        pytest.skip(
            f"real MNIST not in {directory}: run `influencekit download mnist --data-dir {directory}` "
            f"or set {DATA_DIR_ENV} to a directory holding it"
        )
    return directory


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors: intra-op threads only add overhead (and contend on shared CPUs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
