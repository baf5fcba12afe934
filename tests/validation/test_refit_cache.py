"""Tests for influencekit.validation.refit_cache."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from influencekit.validation.parallel import run_refits
from influencekit.validation.refit_cache import RefitCache, fingerprint_of


def _result(seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return {
        "theta": rng.standard_normal((3, 4)),
        "grad": torch.from_numpy(rng.standard_normal(5)).to(torch.float32),
        "half": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
        "counts": np.arange(6, dtype=np.int32).reshape(2, 3)[:, ::2],  # non-contiguous view
        "big_endian": np.array([1.0, 2.0], dtype=">f8"),
        "scalar_array": np.array(7.5),
        "loss": float(rng.standard_normal()),
        "np_loss": np.float64(0.1),
        "iterations": np.int64(12),
        "converged": True,
        "solver": "cholesky",
        "note": None,
        "history": [1.0, 0.5, 0.25],
    }


def _assert_same(got: dict[str, object], expected: dict[str, object]) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(got[name], torch.Tensor), name
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
        elif isinstance(value, np.ndarray):
            assert isinstance(got[name], np.ndarray), name
            assert got[name].dtype == value.dtype.newbyteorder("="), name
            np.testing.assert_array_equal(got[name], value)
        else:  # JSON values come back as plain Python objects
            plain = value.item() if isinstance(value, np.generic) else value
            assert got[name] == plain and type(got[name]) is type(plain), name


def test_put_then_get_returns_equal_arrays_and_json_values(tmp_path: Path) -> None:
    cache = RefitCache(tmp_path, "setting-a")
    assert cache.get(3) is None and 3 not in cache and cache.done_indices() == []
    expected = _result(0)
    stored = cache.put(3, expected)
    cache.put(11, _result(1))
    cache.put(0, {})

    reopened = RefitCache(tmp_path, "setting-a")
    assert reopened.done_indices() == [0, 3, 11]
    assert 3 in reopened and np.int64(11) in reopened and 4 not in reopened and -1 not in reopened
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = reopened.get(3)
    assert got is not None
    _assert_same(got, expected)
    _assert_same(stored, expected)
    assert reopened.get(0) == {}
    # Results of another setting live apart.
    other = RefitCache(tmp_path, "setting-b")
    assert other.done_indices() == [] and other.get(3) is None
    # Overwriting replaces the entry.
    cache.put(3, {"loss": 2.0})
    assert reopened.get(3) == {"loss": 2.0}


def test_put_rejects_unstorable_values(tmp_path: Path) -> None:
    cache = RefitCache(tmp_path, "f")
    with pytest.raises(TypeError, match=r"result\['s'\] must be JSON-serializable"):
        cache.put(0, {"s": {1, 2}})
    with pytest.raises(TypeError, match="dtype object"):
        cache.put(0, {"a": np.array([object()])})
    with pytest.raises(TypeError, match="keys must be strings"):
        cache.put(0, {1: 2.0})
    with pytest.raises(TypeError, match="mapping"):
        cache.put(0, [1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        cache.put(-1, {})
    with pytest.raises(ValueError, match="fingerprint"):
        RefitCache(tmp_path, "../escape")
    assert cache.done_indices() == [] and os.listdir(cache.path) == []


def _corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_flip_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # last tensor's payload
    path.write_bytes(bytes(data))


def _corrupt_edit_scalar(path: Path) -> None:
    data = path.read_bytes()
    assert data.count(b"cholesky") == 1
    path.write_bytes(data.replace(b"cholesky", b"cholesko"))


def _corrupt_wrong_index(path: Path) -> None:
    path.write_bytes((path.parent / "8.safetensors").read_bytes())


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_corrupt_truncate, "unreadable"),
        (_corrupt_flip_tensor_byte, "checksum mismatch"),
        (_corrupt_edit_scalar, "checksum mismatch"),
        (_corrupt_wrong_index, "index 8 instead of"),
    ],
    ids=["truncated", "flipped-tensor-byte", "edited-metadata", "moved-entry"],
)
def test_corrupt_entry_is_discarded(tmp_path: Path, corrupt, reason: str) -> None:
    cache = RefitCache(tmp_path, "f")
    cache.put(7, _result(7))
    cache.put(8, _result(8))
    path = cache.path / "7.safetensors"
    corrupt(path)
    assert cache.done_indices() == [7, 8]  # listing does not read files
    with pytest.warns(RuntimeWarning, match=reason):
        assert cache.get(7) is None
    assert not path.exists()
    assert cache.done_indices() == [8]
    _assert_same(cache.get(8), _result(8))


def _loo_means(shared: np.ndarray, batch: list[int]) -> list[dict[str, object]]:
    return [{"mean": float(np.delete(shared, i).mean())} for i in batch]


def test_corrupt_and_partial_entries_are_recomputed(tmp_path: Path) -> None:
    values = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    cache = RefitCache(tmp_path, fingerprint_of(values))
    computed: list[int] = []

    def refit(shared: np.ndarray, batch: list[int]) -> list[dict[str, object]]:
        computed.extend(batch)
        return _loo_means(shared, batch)

    run_refits(refit, range(6), cache, shared=values, workers=0, batch_size=4, progress=False)
    assert computed == [0, 1, 2, 3, 4, 5]
    _corrupt_flip_tensor_byte(cache.path / "2.safetensors")  # no tensors: hits the header
    _corrupt_truncate(cache.path / "4.safetensors")
    # What a crash between write and rename leaves behind: never read.
    (cache.path / "5.safetensors").unlink()
    (cache.path / ".5.k3j2h1.tmp").write_bytes(b"partial")
    assert cache.done_indices() == [0, 1, 2, 3, 4]
    assert 5 not in cache

    computed.clear()
    with pytest.warns(RuntimeWarning, match="corrupt refit cache entry"):
        results = run_refits(refit, range(6), cache, shared=values, workers=0, progress=False)
    assert sorted(computed) == [2, 4, 5]
    expected = [(63.0 - v) / 5 for v in values]  # sum is 63, five values remain
    assert [results[i]["mean"] for i in range(6)] == pytest.approx(expected, rel=1e-15)
    assert cache.done_indices() == [0, 1, 2, 3, 4, 5]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RefitCache(tmp_path, "f")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.put(1, _result(1))
    assert os.listdir(cache.path) == []


def test_fingerprint_depends_on_data_and_settings_not_their_order() -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    y = np.array([0, 1, 1])
    base = fingerprint_of(x, y, l2=0.01, solver="lbfgs")
    assert len(base) == 64 and int(base, 16) >= 0
    assert fingerprint_of(x.copy(), y, solver="lbfgs", l2=0.01) == base  # settings order irrelevant
    assert fingerprint_of(torch.from_numpy(x), torch.from_numpy(y), l2=0.01, solver="lbfgs") == base
    # Memory layout and byte order are irrelevant.
    assert fingerprint_of(x.T.copy().T, y, l2=0.01, solver="lbfgs") == base
    assert fingerprint_of(x.astype(">f8"), y, l2=0.01, solver="lbfgs") == base
    changed = x.copy()
    changed[2, 3] = np.nextafter(11.0, 12.0)
    different = {
        fingerprint_of(changed, y, l2=0.01, solver="lbfgs"),
        fingerprint_of(x.reshape(4, 3), y, l2=0.01, solver="lbfgs"),
        fingerprint_of(x.astype(np.float32), y, l2=0.01, solver="lbfgs"),
        fingerprint_of(x, y, l2=0.02, solver="lbfgs"),
        fingerprint_of(x, y, l2=0.01),
        fingerprint_of(y, x, l2=0.01, solver="lbfgs"),
        fingerprint_of(x, l2=0.01, solver="lbfgs"),
    }
    assert base not in different and len(different) == 7
    # Pins the hashing scheme (changing it would orphan every existing cache),
    # recomputed independently for one array and no settings.
    v = np.array([1.5, -2.0])
    expected = hashlib.sha256(b"influencekit.fingerprint/1\0")
    expected.update(b'{"dtype":"float64","shape":[2]}\0' + v.tobytes())
    expected.update(b"{}")
    assert fingerprint_of(v) == expected.hexdigest()
    with pytest.raises(TypeError, match="JSON"):
        fingerprint_of(x, bad={1, 2})
    with pytest.raises(TypeError, match="argument 0 is list"):
        fingerprint_of([1.0, 2.0])  # type: ignore[arg-type]
