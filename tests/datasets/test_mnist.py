"""Tests for influencekit.datasets.mnist.

Loading, checksums and the downloader run on the synthetic MNIST-format set of conftest.py (the
downloader against local http servers on 127.0.0.1, with the expected checksums set to the
synthetic files'). Properties of the real files (official checksums, published digit counts) use
``real_mnist_dir`` and skip without it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import influencekit.datasets.mnist as mnist_module
from influencekit.datasets import (
    MNIST,
    DatasetCorruptError,
    DatasetError,
    DatasetNotFoundError,
    default_data_dir,
    download_mnist,
    koh_liang_split,
    koh_liang_validation,
    load_mnist,
    load_or_download_mnist,
    write_mnist_format,
)
from influencekit.datasets.mnist import CHECKSUM_MANIFEST, MIRRORS_ENV, MNIST_MD5, parse_idx

NAMES = list(MNIST_MD5)

# Published per-digit counts of the official MNIST training and test sets.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _raw(directory: Path, name: str) -> bytes:
    """Uncompressed content of ``directory/name`` or ``directory/name.gz``, read without the library."""
    plain = directory / name
    return plain.read_bytes() if plain.is_file() else gzip.decompress((directory / f"{name}.gz").read_bytes())


def _copy_all(source: Path, target: Path, *, gz: bool, manifest: Path | None = None) -> None:
    """Copy the four files of ``source`` (gzipped if ``gz``) and ``manifest``'s MD5SUMS into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        if gz and (source / f"{name}.gz").is_file():
            shutil.copyfile(source / f"{name}.gz", target / f"{name}.gz")
        elif gz:
            (target / f"{name}.gz").write_bytes(gzip.compress(_raw(source, name), compresslevel=1))
        else:
            (target / name).write_bytes(_raw(source, name))
    if manifest is not None:
        shutil.copyfile(manifest / CHECKSUM_MANIFEST, target / CHECKSUM_MANIFEST)


# ------------------------------------------------------------------ the real MNIST files


@pytest.fixture(scope="module")
def mnist(real_mnist_dir: Path) -> MNIST:
    return load_mnist(real_mnist_dir)  # verifies the official checksums


def test_shapes_dtypes_and_pixel_range(mnist: MNIST) -> None:
    assert mnist.train_images.shape == (60000, 784)
    assert mnist.test_images.shape == (10000, 784)
    assert mnist.train_images.dtype == mnist.test_images.dtype == torch.float64
    assert mnist.train_labels.shape == (60000,) and mnist.train_labels.dtype == torch.int64
    assert mnist.test_labels.shape == (10000,) and mnist.test_labels.dtype == torch.int64
    for images in (mnist.train_images, mnist.test_images):
        assert images.min().item() == 0.0 and images.max().item() == 1.0
    assert torch.bincount(mnist.train_labels).tolist() == TRAIN_COUNTS
    assert torch.bincount(mnist.test_labels).tolist() == TEST_COUNTS
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_koh_liang_split_has_their_sizes_and_order(mnist: MNIST, real_mnist_dir: Path) -> None:
    x_train, y_train, x_test, y_test = koh_liang_split(mnist)
    x_val, y_val = koh_liang_validation(mnist)
    assert x_train.shape == (55000, 784) and y_train.shape == (55000,)
    assert x_val.shape == (5000, 784) and y_val.shape == (5000,)
    assert x_test.shape == (10000, 784) and y_test.shape == (10000,)

    raw_labels = np.frombuffer(_raw(real_mnist_dir, "train-labels-idx1-ubyte"), np.uint8, offset=8)
    val_counts = np.bincount(raw_labels[:5000], minlength=10)
    train_counts = torch.bincount(y_train, minlength=10)
    assert train_counts.sum().item() == 55000
    assert train_counts.tolist() == (np.array(TRAIN_COUNTS) - val_counts).tolist()
    assert torch.bincount(y_val, minlength=10).tolist() == val_counts.tolist()

    raw_images = np.frombuffer(_raw(real_mnist_dir, "train-images-idx3-ubyte"), np.uint8, offset=16)
    assert torch.equal(x_train[0], torch.from_numpy(raw_images[5000 * 784 : 5001 * 784] / 255.0))
    assert torch.equal(x_val[-1], torch.from_numpy(raw_images[4999 * 784 : 5000 * 784] / 255.0))
    assert torch.equal(y_train, mnist.train_labels[5000:])


# ------------------------------------------------------- loading, on the synthetic set


@pytest.fixture(scope="module")
def synthetic(synthetic_mnist_dir: Path) -> MNIST:
    return load_mnist(synthetic_mnist_dir)


def test_values_match_raw_idx_bytes(synthetic: MNIST, synthetic_mnist_dir: Path) -> None:
    # Independent parse: 16-byte image header, 8-byte label header, uint8 payload.
    for split, n in (("train", 60000), ("t10k", 10000)):
        raw_images = np.frombuffer(_raw(synthetic_mnist_dir, f"{split}-images-idx3-ubyte"), np.uint8, offset=16)
        raw_labels = np.frombuffer(_raw(synthetic_mnist_dir, f"{split}-labels-idx1-ubyte"), np.uint8, offset=8)
        images, labels = (synthetic.train_images, synthetic.train_labels) if split == "train" else (synthetic.test_images, synthetic.test_labels)
        assert torch.equal(images, torch.from_numpy(raw_images.reshape(n, 784).astype(np.float64) / 255.0))
        assert torch.equal(labels, torch.from_numpy(raw_labels.astype(np.int64)))
    x_train, y_train, x_test, _ = koh_liang_split(synthetic)
    assert x_train.shape == (55000, 784) and x_test.shape == (10000, 784)
    assert torch.equal(y_train, synthetic.train_labels[5000:])


def test_write_mnist_format_writes_idx_files_and_their_manifest(synthetic_mnist_dir: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in synthetic_mnist_dir.iterdir()) == sorted([*NAMES, CHECKSUM_MANIFEST])
    header = (synthetic_mnist_dir / "t10k-images-idx3-ubyte").read_bytes()[:16]
    assert header == bytes([0, 0, 8, 3]) + (10000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    manifest = (synthetic_mnist_dir / CHECKSUM_MANIFEST).read_text().splitlines()
    assert manifest == [f"{hashlib.md5((synthetic_mnist_dir / n).read_bytes()).hexdigest()}  {n}" for n in NAMES]
    images = np.zeros((60000, 28, 28), np.uint8)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: expected uint8 of shape \(10000, 28, 28\)"):
        write_mnist_format(tmp_path, images, np.zeros(60000, np.uint8), images, np.zeros(10000, np.uint8))
    with pytest.raises(ValueError, match="label 10 outside"):
        write_mnist_format(tmp_path, images, np.full(60000, 10, np.uint8), images[:10000], np.zeros(10000, np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_gzipped_and_uncompressed_files_load_identically(
    tmp_path: Path, synthetic: MNIST, synthetic_mnist_dir: Path, synthetic_gz: Path
) -> None:
    _copy_all(synthetic_gz, tmp_path, gz=True, manifest=synthetic_mnist_dir)
    assert not [p for p in tmp_path.iterdir() if p.name in NAMES]
    packed = load_mnist(tmp_path)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(packed, field), getattr(synthetic, field)), field


def test_float32_images_are_pixels_over_255(synthetic_mnist_dir: Path) -> None:
    m = load_mnist(synthetic_mnist_dir, dtype=torch.float32)
    assert m.train_images.dtype == torch.float32
    raw = np.frombuffer(_raw(synthetic_mnist_dir, "train-images-idx3-ubyte"), np.uint8, offset=16)[:784]
    assert torch.equal(m.train_images[0], torch.from_numpy(raw.astype(np.float32) / np.float32(255)))
    with pytest.raises(ValueError, match="floating"):
        load_mnist(synthetic_mnist_dir, dtype=torch.int64)


def test_missing_file_error_names_file_checksum_and_remedy(tmp_path: Path, synthetic_mnist_dir: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:  # an empty directory: the official checksums
        load_mnist(tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and MNIST_MD5["train-images-idx3-ubyte"] in message
    assert str(tmp_path) in message
    assert "influencekit download mnist --data-dir" in message and "download_mnist(" in message
    assert isinstance(info.value, DatasetError) and isinstance(info.value, FileNotFoundError)

    _copy_all(synthetic_mnist_dir, tmp_path / "set", gz=False, manifest=synthetic_mnist_dir)
    (tmp_path / "set/train-labels-idx1-ubyte").unlink()
    listed = (tmp_path / "set" / CHECKSUM_MANIFEST).read_text().splitlines()[1].split()[0]
    with pytest.raises(DatasetNotFoundError, match=f"'train-labels-idx1-ubyte' not found .*{listed}.*write_mnist_format"):
        load_mnist(tmp_path / "set")


def test_data_dir_from_environment_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_dir = tmp_path / "from-env"
    monkeypatch.setenv("INFLUENCEKIT_DATA", str(env_dir))
    with pytest.raises(DatasetNotFoundError, match=str(env_dir)):
        load_mnist()
    monkeypatch.delenv("INFLUENCEKIT_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home/.cache/influencekit/mnist"
    with pytest.raises(DatasetNotFoundError, match=str(default_data_dir())):
        load_mnist()


def test_official_checksums_guard_a_directory_without_manifest(tmp_path: Path, synthetic_mnist_dir: Path) -> None:
    _copy_all(synthetic_mnist_dir, tmp_path, gz=False)
    with pytest.raises(DatasetCorruptError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    digest = hashlib.md5((tmp_path / "train-images-idx3-ubyte").read_bytes()).hexdigest()
    assert f"MD5 of the uncompressed content is {digest}" in message
    assert f"expected {MNIST_MD5['train-images-idx3-ubyte']} (of the official MNIST file)" in message
    assert "influencekit download mnist --data-dir" in message
    assert torch.equal(load_mnist(tmp_path, verify=False).test_labels, load_mnist(synthetic_mnist_dir).test_labels)


def test_manifest_checksums_detect_a_changed_file(tmp_path: Path, synthetic_mnist_dir: Path) -> None:
    _copy_all(synthetic_mnist_dir, tmp_path, gz=False, manifest=synthetic_mnist_dir)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    labels = bytearray(path.read_bytes())
    labels[100] = (labels[100] + 1) % 10  # still a well-formed IDX file
    path.write_bytes(bytes(labels))
    with pytest.raises(DatasetCorruptError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    listed = hashlib.md5(_raw(synthetic_mnist_dir, "t10k-labels-idx1-ubyte")).hexdigest()
    assert f"{path}: MD5 of the uncompressed content is {hashlib.md5(labels).hexdigest()}" in message
    assert f"expected {listed} (listed in {tmp_path / CHECKSUM_MANIFEST})" in message


@pytest.mark.parametrize(
    ("line", "match"),
    [("0123  train-images-idx3-ubyte", "line 1: expected"), (f"{'0' * 32}  other-file", "line 1: expected"), ("", "no checksum for")],
    ids=["short-digest", "unknown-name", "empty"],
)
def test_malformed_manifest(tmp_path: Path, line: str, match: str) -> None:
    (tmp_path / CHECKSUM_MANIFEST).write_text(line + "\n")
    with pytest.raises(DatasetCorruptError, match=match):
        load_mnist(tmp_path)


def test_truncated_gzip_and_bad_idx_detected(tmp_path: Path, synthetic_mnist_dir: Path, synthetic_gz: Path) -> None:
    _copy_all(synthetic_gz, tmp_path, gz=True, manifest=synthetic_mnist_dir)
    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-100])
    with pytest.raises(DatasetCorruptError, match="not a valid gzip"):
        load_mnist(tmp_path)
    # Without checksum verification, structural checks still catch bad content.
    labels = bytearray(_raw(synthetic_mnist_dir, "t10k-labels-idx1-ubyte"))
    labels[8] = 10
    gz.write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(DatasetCorruptError, match="label 10 outside 0..9"):
        load_mnist(tmp_path, verify=False)
    gz.write_bytes(gzip.compress(bytes(labels[:-1])))
    with pytest.raises(DatasetCorruptError, match="10007 bytes"):
        load_mnist(tmp_path, verify=False)


def test_parse_idx_reads_big_endian_payloads_and_refuses_bad_headers() -> None:
    header = bytes([0, 0, 0x0B, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    values = np.array([[1, -2, 300], [-32768, 0, 32767]], dtype=">i2")
    parsed = parse_idx(header + values.tobytes())
    assert parsed.dtype == np.int16 and parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, values)
    with pytest.raises(DatasetCorruptError, match="magic"):
        parse_idx(b"\x01" + header[1:] + values.tobytes())
    with pytest.raises(DatasetCorruptError, match="type code 0x07"):
        parse_idx(bytes([0, 0, 7, 2]) + header[4:] + values.tobytes())
    with pytest.raises(DatasetCorruptError, match=r"shape \(2, 3\)"):
        parse_idx(header + values.tobytes()[:-1])
    with pytest.raises(DatasetCorruptError, match="truncated IDX header"):
        parse_idx(header[:9])


# ------------------------------------------------- downloading, from servers on 127.0.0.1


class _Server:
    """HTTP server on 127.0.0.1 serving one directory, recording request paths."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def synthetic_gz(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist_dir: Path) -> Path:
    """The synthetic files gzipped, as a mirror serves them (no manifest)."""
    directory = tmp_path_factory.mktemp("synthetic-gz")
    _copy_all(synthetic_mnist_dir, directory, gz=True)
    return directory


@pytest.fixture
def mirror_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Four small gzipped files whose checksums replace the official ones: the downloader only checks MD5s."""
    directory = tmp_path / "mirror-files"
    directory.mkdir()
    for name in NAMES:
        (directory / f"{name}.gz").write_bytes(gzip.compress(f"content of {name}".encode()))
    md5 = {name: hashlib.md5(f"content of {name}".encode()).hexdigest() for name in NAMES}
    monkeypatch.setattr(mnist_module, "MNIST_MD5", md5)
    return directory


@pytest.fixture
def synthetic_is_official(monkeypatch: pytest.MonkeyPatch, synthetic_mnist_dir: Path) -> None:
    """Expect the synthetic files' checksums where the official ones are expected (the downloader's logic does not depend on their values)."""
    md5 = {name: hashlib.md5(_raw(synthetic_mnist_dir, name)).hexdigest() for name in NAMES}
    monkeypatch.setattr(mnist_module, "MNIST_MD5", md5)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[tuple[Path, _Server]]]:
    """Two mirrors on 127.0.0.1, each serving its own (initially empty) directory ``.../mnist``."""
    running = []
    for i in range(2):
        root = tmp_path / f"www{i}"
        (root / "mnist").mkdir(parents=True)
        running.append((root / "mnist", _Server(root)))
    yield running
    for _, server in running:
        server.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"  # nothing listens there once the socket is closed


def _serve_all(served: Path, synthetic_gz: Path) -> None:
    for name in NAMES:
        shutil.copyfile(synthetic_gz / f"{name}.gz", served / f"{name}.gz")


def test_download_fetches_verifies_and_skips(tmp_path: Path, servers, mirror_files: Path) -> None:
    served, server = servers[0]
    _serve_all(served, mirror_files)
    target = tmp_path / "data"
    assert download_mnist(target, server.url, progress=False) == target
    assert sorted(server.requests) == sorted(f"/mnist/{n}.gz" for n in NAMES)
    for name in NAMES:
        assert (target / f"{name}.gz").read_bytes() == (mirror_files / f"{name}.gz").read_bytes()
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in NAMES)

    server.requests.clear()
    download_mnist(target, server.url.rstrip("/"), progress=False)
    assert server.requests == []


def test_download_replaces_corrupt_local_file(tmp_path: Path, servers, mirror_files: Path) -> None:
    served, server = servers[0]
    _serve_all(served, mirror_files)
    target = tmp_path / "data"
    _copy_all(mirror_files, target, gz=True)
    (target / "train-labels-idx1-ubyte.gz").unlink()
    (target / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01garbage")
    with pytest.warns(UserWarning, match="Replaced corrupt .*train-labels-idx1-ubyte by"):
        download_mnist(target, server.url, progress=False)
    assert server.requests == ["/mnist/train-labels-idx1-ubyte.gz"]
    assert not (target / "train-labels-idx1-ubyte").exists()
    content = gzip.decompress((target / "train-labels-idx1-ubyte.gz").read_bytes())
    assert hashlib.md5(content).hexdigest() == mnist_module.MNIST_MD5["train-labels-idx1-ubyte"]


@pytest.mark.parametrize("first", ["404", "wrong-md5", "not-gzip", "closed-port"])
def test_download_falls_back_to_the_next_mirror(tmp_path: Path, servers, mirror_files: Path, first: str) -> None:
    (bad_dir, bad), (good_dir, good) = servers
    _serve_all(good_dir, mirror_files)
    payload = {"wrong-md5": gzip.compress(b"\x00\x00\x08\x03 wrong content"), "not-gzip": b"this is not gzip at all"}
    for name in NAMES:
        if first in payload:
            (bad_dir / f"{name}.gz").write_bytes(payload[first])
    first_url = _closed_port_url() if first == "closed-port" else bad.url
    target = tmp_path / "data"
    download_mnist(target, [first_url, good.url], progress=False)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    for name in NAMES:
        assert (target / f"{name}.gz").read_bytes() == (mirror_files / f"{name}.gz").read_bytes()
    # the first mirror failed once; the one that worked is asked first for the other files
    assert bad.requests == ([] if first == "closed-port" else ["/mnist/train-images-idx3-ubyte.gz"])
    assert good.requests == [f"/mnist/{n}.gz" for n in NAMES]


@pytest.mark.usefixtures("mirror_files")
def test_download_fails_with_every_mirror_listed_and_nothing_written(tmp_path: Path, servers) -> None:
    (corrupt_dir, corrupt), (_, empty) = servers
    (corrupt_dir / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip at all")
    closed = _closed_port_url()
    target = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        download_mnist(target, [corrupt.url, empty.url, closed], progress=False)
    message = str(info.value)
    assert "could not download train-images-idx3-ubyte.gz from any of 3 mirror(s)" in message
    assert f"{corrupt.url}train-images-idx3-ubyte.gz: download is not valid gzip" in message
    assert f"{empty.url}train-images-idx3-ubyte.gz: HTTP Error 404" in message
    assert f"{closed}train-images-idx3-ubyte.gz: [Errno 111] Connection refused" in message
    assert "\n" not in message and list(target.iterdir()) == []


@pytest.mark.usefixtures("synthetic_is_official")
def test_load_or_download_downloads_into_the_user_cache(
    tmp_path: Path, servers, synthetic_gz: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (_, empty), (good_dir, good) = servers
    _serve_all(good_dir, synthetic_gz)
    monkeypatch.delenv("INFLUENCEKIT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(MIRRORS_ENV, f"{empty.url}, {good.url}")
    with pytest.raises(DatasetNotFoundError, match=r"downloading is off \(--no-download\): run `influencekit download mnist"):
        load_or_download_mnist(download=False)
    assert empty.requests == good.requests == []

    loaded = load_or_download_mnist(progress=False)
    assert f"MNIST not found in {default_data_dir()}: downloading it" in capsys.readouterr().err
    assert sorted(p.name for p in default_data_dir().iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    assert len(empty.requests) == 1 and len(good.requests) == 4
    raw = np.frombuffer(_raw(synthetic_gz, "t10k-labels-idx1-ubyte"), np.uint8, offset=8)
    assert torch.equal(loaded.test_labels, torch.from_numpy(raw.astype(np.int64)))
    load_or_download_mnist(progress=False)  # present now: nothing fetched
    assert len(empty.requests) == 1 and len(good.requests) == 4


def test_download_refuses_a_directory_with_a_manifest(tmp_path: Path, synthetic_mnist_dir: Path) -> None:
    shutil.copyfile(synthetic_mnist_dir / CHECKSUM_MANIFEST, tmp_path / CHECKSUM_MANIFEST)
    with pytest.raises(DatasetError, match="holds a non-official MNIST-format data set"):
        download_mnist(tmp_path, _closed_port_url(), progress=False)
