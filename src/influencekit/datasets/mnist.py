"""MNIST: IDX parsing, checksum-verified loading, download, and Koh & Liang's split.

The four original IDX files are read from a data directory, each either gzipped
(``<name>.gz``) or uncompressed (``<name>``). Every file is checked against the
MD5 of its *uncompressed* content, so a truncated or corrupted copy is reported
instead of silently producing wrong data (hashing all four files costs about
0.1 s, small next to the ~0.25 s it takes to decompress them).

Where the files are: ``data_dir`` if given (``--data-dir``), else
``$INFLUENCEKIT_DATA``, else the user cache ``~/.cache/influencekit/mnist``
(:func:`default_data_dir`).

Getting the files: the experiment commands call :func:`load_or_download_mnist`,
which downloads MNIST into that directory when it is absent (``--no-download``
refuses instead); ``influencekit download mnist --data-dir DIR`` or, from Python,
``download_mnist(DIR)`` does it explicitly. Each file is tried on the mirrors of
:data:`MIRRORS` in order (``$INFLUENCEKIT_MNIST_MIRRORS``, comma-separated URLs,
replaces that list, e.g. for a local mirror), checked against :data:`MNIST_MD5`
before it is written, and written atomically.

Other data sets in MNIST's format (same four file names and shapes, e.g. a
synthetic set for tests, or Fashion-MNIST) load when their directory holds a
checksum manifest, :data:`CHECKSUM_MANIFEST` (``MD5SUMS``, ``md5sum`` format:
``<md5 of the uncompressed file>  <name>`` per line), which
:func:`write_mnist_format` writes. The files are then verified against the
manifest instead of the official checksums; a directory without a manifest must
hold the official MNIST files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import os
import sys
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from influencekit.persistence import atomic_write

__all__ = [
    "DEFAULT_MIRROR",
    "GCS_MIRROR",
    "LECUN_MIRROR",
    "MIRRORS",
    "MIRRORS_ENV",
    "DATA_DIR_ENV",
    "CHECKSUM_MANIFEST",
    "MNIST_MD5",
    "KOH_LIANG_VALIDATION_SIZE",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetCorruptError",
    "MNIST",
    "Split",
    "default_data_dir",
    "resolve_data_dir",
    "parse_idx",
    "load_mnist",
    "koh_liang_split",
    "koh_liang_validation",
    "default_mirrors",
    "download_mnist",
    "load_or_download_mnist",
    "write_mnist_format",
    "add_data_arguments",
]

DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
"""Default download location (the mirror used by torchvision)."""

GCS_MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"
"""Google Cloud Storage copy (the one TensorFlow's tutorials used)."""

LECUN_MIRROR = "http://yann.lecun.com/exdb/mnist/"
"""The original MNIST site."""

MIRRORS: tuple[str, ...] = (DEFAULT_MIRROR, GCS_MIRROR, LECUN_MIRROR)
"""Mirrors :func:`download_mnist` tries, in this order, for each file."""

MIRRORS_ENV = "INFLUENCEKIT_MNIST_MIRRORS"
"""Environment variable: comma-separated mirror URLs replacing :data:`MIRRORS`."""

CHECKSUM_MANIFEST = "MD5SUMS"
"""Name of the manifest that marks a directory as a non-official MNIST-format set."""

DATA_DIR_ENV = "INFLUENCEKIT_DATA"
"""Environment variable naming the MNIST directory when ``data_dir`` is not given."""

MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
"""MD5 of the *uncompressed* content of each MNIST file."""

_EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}

KOH_LIANG_VALIDATION_SIZE = 5000
"""Koh & Liang (2017) hold out the first 5,000 training images for validation."""

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(Exception):
    """Base class for problems with a dataset's files."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A required dataset file is absent."""


class DatasetCorruptError(DatasetError):
    """A dataset file is present but has the wrong checksum or is malformed."""


@dataclass(frozen=True, eq=False)
class MNIST:
    """The full MNIST dataset as tensors.

    Attributes:
        train_images: ``(60000, 784)`` floating tensor, pixel intensities divided
            by 255 so they lie in ``[0, 1]``; rows are 28x28 images flattened
            row-major.
        train_labels: ``(60000,)`` int64 tensor of digits ``0..9``.
        test_images: ``(10000, 784)``, as ``train_images``.
        test_labels: ``(10000,)`` int64.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


class Split(NamedTuple):
    """Training and test arrays, unpackable as ``x_train, y_train, x_test, y_test``.

    ``x_*`` are ``(n, 784)`` floating tensors in ``[0, 1]``; ``y_*`` are ``(n,)`` int64.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def default_data_dir() -> Path:
    """Return the default MNIST directory, ``~/.cache/influencekit/mnist``."""
    return Path.home() / ".cache" / "influencekit" / "mnist"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The MNIST directory: ``data_dir`` if given, else ``$INFLUENCEKIT_DATA`` if set, else :func:`default_data_dir`."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return default_data_dir()


def _download_hint(data_dir: Path) -> str:
    return (
        f"Download the MNIST files with `influencekit download mnist "
        f"--data-dir {data_dir}` or, in Python, "
        f"`influencekit.datasets.download_mnist({str(data_dir)!r})`."
    )


class _Checksums(NamedTuple):
    """Expected MD5 per file name, where they come from, and how to get good copies of the files."""

    md5: dict[str, str]
    source: str
    remedy: str


def _read_manifest(path: Path) -> dict[str, str]:
    md5: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        name = name.strip().lstrip("*")
        if name not in MNIST_MD5 or len(digest) != 32 or not all(c in "0123456789abcdef" for c in digest):
            raise DatasetCorruptError(
                f"{path}, line {number}: expected '<32 hex digits>  <name>' with name one of "
                f"{', '.join(MNIST_MD5)}, got {line!r}."
            )
        md5[name] = digest
    if missing := [name for name in MNIST_MD5 if name not in md5]:
        raise DatasetCorruptError(f"{path}: no checksum for {', '.join(missing)}.")
    return md5


def _checksums(data_dir: Path) -> _Checksums:
    """The official MNIST checksums, or those of ``data_dir``'s manifest if it has one."""
    manifest = data_dir / CHECKSUM_MANIFEST
    if manifest.is_file():
        return _Checksums(
            _read_manifest(manifest),
            f"listed in {manifest}",
            f"Write the data set again (influencekit.datasets.write_mnist_format), or remove {manifest} "
            f"and download the official MNIST files: `influencekit download mnist --data-dir {data_dir}`.",
        )
    return _Checksums(MNIST_MD5, "of the official MNIST file", _download_hint(data_dir))


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the content of an (uncompressed) IDX file.

    The IDX format is a 4-byte magic number ``0x00 0x00 <type code> <ndim>``,
    ``ndim`` big-endian uint32 dimension sizes, then the values in big-endian,
    C order.

    Args:
        data: the complete file content.
        source: name used in error messages.

    Returns:
        An array of shape given by the header, in native byte order.

    Raises:
        DatasetCorruptError: bad magic number, unknown type code, or a payload
            whose length does not match the header's dimensions.
    """
    if len(data) < 4:
        raise DatasetCorruptError(f"{source}: {len(data)} bytes, too short for an IDX header.")
    if data[0] != 0 or data[1] != 0:
        raise DatasetCorruptError(
            f"{source}: not an IDX file (magic number starts with "
            f"{data[:2].hex()}, expected 0000)."
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise DatasetCorruptError(f"{source}: unknown IDX type code 0x{type_code:02x}.")
    if ndim == 0:
        raise DatasetCorruptError(f"{source}: IDX header declares 0 dimensions.")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetCorruptError(
            f"{source}: truncated IDX header ({len(data)} bytes, need {header_len})."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header_len + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise DatasetCorruptError(
            f"{source}: IDX header declares shape {shape} of {dtype.name} "
            f"({expected} bytes in all) but the file has {len(data)} bytes."
        )
    values = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)


def _find_file(data_dir: Path, name: str, checksums: _Checksums) -> Path:
    """Return ``data_dir/name`` or ``data_dir/name.gz`` (uncompressed preferred)."""
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"MNIST file {name!r} not found in {data_dir} (looked for {name} and "
        f"{name}.gz; expected MD5 of the uncompressed file: {checksums.md5[name]}). "
        + checksums.remedy
    )


def _read_uncompressed(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetCorruptError(f"{path}: not a valid gzip file ({exc}).") from exc


def _load_file(data_dir: Path, name: str, verify: bool, checksums: _Checksums) -> np.ndarray:
    path = _find_file(data_dir, name, checksums)
    try:
        data = _read_uncompressed(path)
        if verify:
            digest = hashlib.md5(data).hexdigest()
            if digest != checksums.md5[name]:
                raise DatasetCorruptError(
                    f"{path}: MD5 of the uncompressed content is {digest}, "
                    f"expected {checksums.md5[name]} ({checksums.source})."
                )
        array = parse_idx(data, str(path))
        if array.shape != _EXPECTED_SHAPES[name] or array.dtype != np.uint8:
            raise DatasetCorruptError(
                f"{path}: holds {array.dtype.name} data of shape {array.shape}, "
                f"expected uint8 of shape {_EXPECTED_SHAPES[name]}."
            )
        if array.ndim == 1 and array.max() > 9:
            raise DatasetCorruptError(f"{path}: label {int(array.max())} outside 0..9.")
    except DatasetCorruptError as exc:
        raise DatasetCorruptError(f"Corrupt MNIST file: {exc} Delete it. {checksums.remedy}") from None
    return array


def _images(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(array.reshape(array.shape[0], -1)).to(dtype).div_(255)


def _labels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int64))


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float64,
    *,
    verify: bool = True,
) -> MNIST:
    """Load MNIST from its four IDX files.

    Args:
        data_dir: directory holding ``train-images-idx3-ubyte``,
            ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
            ``t10k-labels-idx1-ubyte``, each possibly gzipped (``.gz``).
            Defaults to ``$INFLUENCEKIT_DATA`` if set, else
            :func:`default_data_dir`.
        dtype: floating dtype of the image tensors.
        verify: check each file's MD5 (about 0.1 s) against :data:`MNIST_MD5`,
            or, if the directory holds a :data:`CHECKSUM_MANIFEST`, against the
            manifest (a non-official MNIST-format set, see :func:`write_mnist_format`).

    Returns:
        An :class:`MNIST` with images scaled to ``[0, 1]`` (pixel / 255).

    Raises:
        DatasetNotFoundError: a file is missing.
        DatasetCorruptError: a file fails its checksum or is not a valid IDX
            file, or the manifest is malformed.
        ValueError: ``dtype`` is not a floating dtype.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    directory = resolve_data_dir(data_dir)
    checksums = _checksums(directory)
    arrays = {name: _load_file(directory, name, verify, checksums) for name in MNIST_MD5}
    return MNIST(
        train_images=_images(arrays["train-images-idx3-ubyte"], dtype),
        train_labels=_labels(arrays["train-labels-idx1-ubyte"]),
        test_images=_images(arrays["t10k-images-idx3-ubyte"], dtype),
        test_labels=_labels(arrays["t10k-labels-idx1-ubyte"]),
    )


def koh_liang_split(mnist: MNIST) -> Split:
    """Return Koh & Liang's (2017) MNIST training and test sets.

    Training: images ``5000..59999`` of the official training set (n = 55,000);
    the first 5,000 are their validation set (:func:`koh_liang_validation`).
    Test: all 10,000 official test images. The tensors are views of ``mnist``'s.
    """
    v = KOH_LIANG_VALIDATION_SIZE
    return Split(
        x_train=mnist.train_images[v:],
        y_train=mnist.train_labels[v:],
        x_test=mnist.test_images,
        y_test=mnist.test_labels,
    )


def koh_liang_validation(mnist: MNIST) -> tuple[torch.Tensor, torch.Tensor]:
    """Return Koh & Liang's validation set: the first 5,000 training images.

    Returns:
        ``(x_val, y_val)`` of shapes ``(5000, 784)`` and ``(5000,)`` (views).
    """
    v = KOH_LIANG_VALIDATION_SIZE
    return mnist.train_images[:v], mnist.train_labels[:v]


def write_mnist_format(
    data_dir: str | os.PathLike[str],
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> Path:
    """Write a data set in MNIST's format, with its :data:`CHECKSUM_MANIFEST`, so :func:`load_mnist` reads it.

    The four files are written uncompressed (IDX, type code 0x08 = uint8) under
    MNIST's names, each atomically, then the manifest ``MD5SUMS`` listing the MD5
    of each; :func:`load_mnist` verifies the files against the manifest instead of
    the official checksums. :func:`download_mnist` refuses such a directory.

    Args:
        data_dir: target directory (created if needed).
        train_images: ``(60000, 28, 28)`` uint8.
        train_labels: ``(60000,)`` uint8 in ``0..9``.
        test_images: ``(10000, 28, 28)`` uint8.
        test_labels: ``(10000,)`` uint8 in ``0..9``.

    Returns:
        The directory.

    Raises:
        ValueError: an array has the wrong shape or dtype, or a label lies outside ``0..9``.
    """
    directory = Path(data_dir)
    arrays = dict(zip(MNIST_MD5, (train_images, train_labels, test_images, test_labels)))
    for name, array in arrays.items():
        if array.shape != _EXPECTED_SHAPES[name] or array.dtype != np.uint8:
            raise ValueError(
                f"{name}: expected uint8 of shape {_EXPECTED_SHAPES[name]}, got {array.dtype} of shape {array.shape}."
            )
        if array.ndim == 1 and array.size and array.max() > 9:
            raise ValueError(f"{name}: label {int(array.max())} outside 0..9.")
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, array in arrays.items():
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        content = header + np.ascontiguousarray(array).tobytes()
        atomic_write(directory / name, content)
        lines.append(f"{hashlib.md5(content).hexdigest()}  {name}\n")
    atomic_write(directory / CHECKSUM_MANIFEST, "".join(lines).encode())
    return directory


def _file_is_valid(path: Path, name: str) -> bool:
    try:
        return hashlib.md5(_read_uncompressed(path)).hexdigest() == MNIST_MD5[name]
    except DatasetCorruptError:
        return False


def _fetch(url: str, timeout: float, progress: bool | None) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            chunks: list[bytes] = []
            with tqdm(
                total=int(length) if length else None,
                unit="B",
                unit_scale=True,
                desc=url.rsplit("/", 1)[-1],
                disable=None if progress is None else not progress,
                leave=False,
            ) as bar:
                while chunk := response.read(1 << 20):
                    chunks.append(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        raise DatasetError(str(reason)) from exc
    return b"".join(chunks)


def _verified_download(url: str, md5: str, timeout: float, progress: bool | None) -> bytes:
    """The gzipped payload at ``url``, after checking the MD5 of its uncompressed content."""
    payload = _fetch(url, timeout, progress)
    try:
        content = gzip.decompress(payload)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetCorruptError(f"download is not valid gzip ({exc})") from exc
    digest = hashlib.md5(content).hexdigest()
    if digest != md5:
        raise DatasetCorruptError(f"MD5 of the uncompressed download is {digest}, expected {md5}")
    return payload


def default_mirrors() -> tuple[str, ...]:
    """``$INFLUENCEKIT_MNIST_MIRRORS`` (comma-separated URLs) if set, else :data:`MIRRORS`."""
    env = [url.strip() for url in os.environ.get(MIRRORS_ENV, "").split(",") if url.strip()]
    return tuple(env) or MIRRORS


def download_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    mirrors: str | Sequence[str] | None = None,
    progress: bool | None = True,
    *,
    timeout: float = 30.0,
) -> Path:
    """Download the four gzipped MNIST files into ``data_dir``, trying mirrors in order.

    Files already present (gzipped or not) with the right checksum are skipped.
    Each file is fetched from the first mirror that serves it intact: a mirror
    that fails (HTTP error, no connection, invalid gzip, wrong MD5 of the
    uncompressed content) is skipped for the next one, and the mirror that worked
    is tried first for the remaining files. A verified download is written,
    atomically, as ``<name>.gz``; nothing is written for a failed one. Corrupt
    local copies are replaced (an uncompressed one is deleted) with a warning once
    the new file is in place.

    Args:
        data_dir: target directory (created if needed); same default as
            :func:`load_mnist`.
        mirrors: URL prefixes the file names ``<name>.gz`` are appended to, tried
            in order; one URL or several (default :func:`default_mirrors`:
            ``$INFLUENCEKIT_MNIST_MIRRORS`` or :data:`MIRRORS`).
        progress: show a byte-level tqdm progress bar per file (None: only on a terminal).
        timeout: socket timeout per request, in seconds.

    Returns:
        The data directory.

    Raises:
        DatasetError: every mirror failed for some file (the message lists each
            mirror's failure), or ``data_dir`` holds a non-official data set
            (a :data:`CHECKSUM_MANIFEST`).
    """
    directory = resolve_data_dir(data_dir)
    if (directory / CHECKSUM_MANIFEST).is_file():
        raise DatasetError(
            f"{directory} holds a non-official MNIST-format data set ({directory / CHECKSUM_MANIFEST}); "
            f"download MNIST into another directory, e.g. --data-dir {default_data_dir()}."
        )
    urls = [mirrors] if isinstance(mirrors, str) else list(mirrors if mirrors is not None else default_mirrors())
    if not urls:
        raise ValueError("mirrors is empty: give at least one URL.")
    urls = [url if url.endswith("/") else url + "/" for url in urls]
    directory.mkdir(parents=True, exist_ok=True)
    for name, md5 in MNIST_MD5.items():
        plain, packed = directory / name, directory / f"{name}.gz"
        present = [p for p in (plain, packed) if p.is_file()]
        if any(_file_is_valid(p, name) for p in present):
            continue
        failures = []
        for mirror in urls:
            try:
                payload = _verified_download(mirror + packed.name, md5, timeout, progress)
            except DatasetError as exc:
                failures.append(f"{mirror + packed.name}: {exc}")
                continue
            urls = [mirror] + [url for url in urls if url != mirror]
            break
        else:
            raise DatasetError(
                f"could not download {packed.name} from any of {len(urls)} mirror(s) [{'; '.join(failures)}]. "
                f"Check the network connection, set ${MIRRORS_ENV} to a working mirror, or copy the four "
                f"MNIST files into {directory}."
            )
        atomic_write(packed, payload)
        for corrupt in present:
            warnings.warn(
                f"Replaced corrupt {corrupt} by a fresh download, {packed}.", stacklevel=2
            )
            if corrupt == plain:  # would otherwise shadow the good .gz in load_mnist
                plain.unlink()
    return directory


def load_or_download_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float64,
    *,
    download: bool = True,
    progress: bool | None = None,
) -> MNIST:
    """Load MNIST as :func:`load_mnist` does, downloading it first if a file is missing.

    The directory is ``data_dir``, else ``$INFLUENCEKIT_DATA``, else
    :func:`default_data_dir`. When a file is missing there, MNIST is downloaded
    into it (:func:`download_mnist`, default mirrors, checksum-verified, atomic),
    announced by one line on stderr, unless ``download`` is False.

    Raises:
        DatasetNotFoundError: a file is missing and ``download`` is False; the
            message says how to get the files.
        DatasetError: the download failed on every mirror.
        DatasetCorruptError: a file present fails its checksum.
    """
    directory = resolve_data_dir(data_dir)
    try:
        return load_mnist(directory, dtype)
    except DatasetNotFoundError:
        if not download:
            raise DatasetNotFoundError(
                f"MNIST is not in {directory} and downloading is off (--no-download): run "
                f"`influencekit download mnist --data-dir {directory}`, or point --data-dir or "
                f"${DATA_DIR_ENV} at a directory holding the four files."
            ) from None
    print(f"MNIST not found in {directory}: downloading it (about 11 MB, MD5-verified) ...", file=sys.stderr, flush=True)
    download_mnist(directory, progress=progress)
    return load_mnist(directory, dtype)


def add_data_dir_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--data-dir``, with its default (``$INFLUENCEKIT_DATA``, then the user cache) in the help after ``what``."""
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"{what} (default: ${DATA_DIR_ENV} or {default_data_dir()})")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--no-download``, the options of every command that reads MNIST."""
    add_data_dir_argument(parser, "MNIST directory, downloaded there if absent")
    parser.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading MNIST when it is absent"
    )
