"""Crash-safe on-disk cache of leave-one-out refit results.

Each finished result is one safetensors file, ``<directory>/<fingerprint>/<index>.safetensors``,
written atomically (temporary file in the same directory, ``fsync``, ``os.replace``),
so a run killed at any moment leaves every entry either complete or absent.
Temporary files a crash leaves behind (``.<index>.*.tmp``) are never read.

A result is a mapping from names to numpy arrays, torch tensors, or JSON-able
values (numbers, strings, booleans, ``None``, lists and dicts of these). Tensors
go in the safetensors payload; JSON values and bookkeeping go in its metadata,
together with a SHA-256 over all of it. An entry that cannot be parsed or whose
checksum does not match is reported with a :class:`RuntimeWarning`, deleted,
and treated as missing, so it gets recomputed.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from influencekit.persistence import atomic_write

__all__ = ["RefitCache", "fingerprint_of"]

_FORMAT = "influencekit.refit-cache/1"
_METADATA_KEY = "influencekit"
_SUFFIX = ".safetensors"
_FINGERPRINT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serializable: {exc}") from exc


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw bytes of a contiguous CPU tensor (any dtype, including bfloat16)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def fingerprint_of(*arrays: np.ndarray | torch.Tensor, **settings: Any) -> str:
    """Identify a refit setting: the data it was computed from and its parameters.

    Args:
        *arrays: numpy arrays or torch tensors (e.g. training inputs and
            labels). Their dtype, shape and values all enter the hash; a torch
            tensor and a numpy array holding the same values with the same
            dtype give the same fingerprint.
        **settings: JSON-serializable parameters (regularization, solver
            tolerances, ...), hashed with sorted keys so their order is irrelevant.

    Returns:
        A 64-character lowercase hex SHA-256 digest, usable as the
        ``fingerprint`` of a :class:`RefitCache`.

    Raises:
        TypeError: an argument is not an array/tensor, or a setting is not
            JSON-serializable.
    """
    digest = hashlib.sha256(b"influencekit.fingerprint/1\0")
    for position, array in enumerate(arrays):
        if isinstance(array, torch.Tensor):
            tensor = array.detach().cpu().contiguous()
            dtype_name = str(tensor.dtype).removeprefix("torch.")
        elif isinstance(array, np.ndarray):
            if array.dtype.hasobject:
                raise TypeError(f"array {position} has dtype object, which cannot be hashed.")
            native = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
            tensor = torch.from_numpy(native.view(np.uint8).reshape(-1))
            dtype_name = array.dtype.name
        else:
            raise TypeError(
                f"positional arguments must be numpy arrays or torch tensors; "
                f"argument {position} is {type(array).__name__}."
            )
        header = {"dtype": dtype_name, "shape": list(array.shape)}
        digest.update(_to_json(header, "header").encode() + b"\0")
        digest.update(_tensor_bytes(tensor))
    digest.update(_to_json(settings, "settings").encode())
    return digest.hexdigest()


def _checksum(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(_to_json(dict(meta), "metadata").encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        header = {"name": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
        digest.update(b"\0" + _to_json(header, "header").encode() + b"\0")
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


class _CorruptEntry(Exception):
    pass


class RefitCache:
    """Persistent store of per-index refit results for one setting.

    Args:
        directory: root directory; entries live in ``directory / fingerprint``
            (created if needed), so several settings can share a root.
        fingerprint: identifies the model/data/settings the results belong to,
            typically :func:`fingerprint_of`; 1-128 characters from
            ``[A-Za-z0-9_.-]``, not starting with ``.``, ``_`` or ``-``.

    Safe against crashes of the writing process at any point. Concurrent
    writers of the same index do not corrupt entries (the last write wins).
    """

    def __init__(self, directory: str | os.PathLike[str], fingerprint: str) -> None:
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(
                f"fingerprint must be 1-128 characters from [A-Za-z0-9_.-] starting "
                f"with a letter or digit, got {fingerprint!r}."
            )
        self.fingerprint = fingerprint
        self.path = Path(directory) / fingerprint
        self.path.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RefitCache({str(self.path.parent)!r}, {self.fingerprint!r})"

    @staticmethod
    def _check_index(index: int) -> int:
        if isinstance(index, bool):
            raise TypeError("index must be an integer, got bool.")
        index = operator.index(index)
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}.")
        return index

    def _file(self, index: int) -> Path:
        return self.path / f"{index}{_SUFFIX}"

    def put(self, index: int, result: Mapping[str, Any]) -> dict[str, Any]:
        """Store the result for ``index`` atomically, replacing any previous one.

        Args:
            index: the removed training point (non-negative integer).
            result: names to numpy arrays, torch tensors (stored as contiguous
                CPU copies; gradients detached) or JSON-able values. numpy
                scalars are stored as Python numbers.

        Returns:
            The result exactly as :meth:`get` will return it.

        Raises:
            TypeError: ``result`` is not a mapping with string keys, or holds a
                value that is neither an array/tensor nor JSON-serializable.
        """
        index = self._check_index(index)
        path = self._file(index)
        if not isinstance(result, Mapping):
            raise TypeError(f"result must be a mapping, got {type(result).__name__}.")
        tensors: dict[str, torch.Tensor] = {}
        kinds: dict[str, str] = {}
        values: dict[str, Any] = {}
        for name, value in result.items():
            if not isinstance(name, str):
                raise TypeError(f"result keys must be strings, got {name!r}.")
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().to("cpu", copy=True).contiguous()
                kinds[name] = "torch"
            elif isinstance(value, np.ndarray):
                if value.dtype.hasobject:
                    raise TypeError(f"result[{name!r}] has dtype object, which cannot be stored.")
                native = np.array(value, dtype=value.dtype.newbyteorder("="), order="C")
                try:
                    tensors[name] = torch.from_numpy(native)
                except TypeError as exc:
                    raise TypeError(
                        f"result[{name!r}]: dtype {value.dtype} is not storable: {exc}"
                    ) from exc
                kinds[name] = "numpy"
            else:
                values[name] = json.loads(_to_json(value, f"result[{name!r}]"))
                kinds[name] = "json"
        meta = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "index": index,
            "kinds": kinds,
            "order": list(kinds),
            "values": values,
        }
        meta["sha256"] = _checksum(meta, tensors)
        metadata = {_METADATA_KEY: _to_json(meta, "metadata")}
        payload = safetensors.torch.save(tensors, metadata=metadata)
        atomic_write(path, payload)
        return self._assemble(meta, tensors)

    def get(self, index: int) -> dict[str, Any] | None:
        """Return the stored result for ``index``, or ``None`` if there is none.

        A corrupt or truncated entry is deleted with a :class:`RuntimeWarning`
        and reported as missing (``None``).
        """
        index = self._check_index(index)
        path = self._file(index)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return self._decode(data, index)
        except _CorruptEntry as exc:
            warnings.warn(
                f"Discarding corrupt refit cache entry {path} ({exc}); it will be recomputed.",
                RuntimeWarning,
                stacklevel=2,
            )
            path.unlink(missing_ok=True)
            return None

    def _decode(self, data: bytes, index: int) -> dict[str, Any]:
        # Any failure to parse this untrusted file means it is corrupt, whatever
        # the exception type the parsers raise for it.
        try:
            tensors = safetensors.torch.load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            meta = json.loads(header["__metadata__"][_METADATA_KEY])
            stored_sum = meta.pop("sha256")
            actual_sum = _checksum(meta, tensors)
        except Exception as exc:
            raise _CorruptEntry(f"unreadable: {type(exc).__name__}: {exc}") from exc
        if stored_sum != actual_sum:
            raise _CorruptEntry("checksum mismatch")
        if meta.get("format") != _FORMAT:
            raise _CorruptEntry(f"unknown format {meta.get('format')!r}")
        if meta["fingerprint"] != self.fingerprint or meta["index"] != index:
            raise _CorruptEntry(
                f"holds fingerprint {meta['fingerprint']!r}, index {meta['index']!r} "
                f"instead of {self.fingerprint!r}, {index}"
            )
        return self._assemble(meta, tensors)

    @staticmethod
    def _assemble(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name in meta["order"]:
            kind = meta["kinds"][name]
            if kind == "json":
                result[name] = meta["values"][name]
            elif kind == "numpy":
                result[name] = tensors[name].numpy()
            else:
                result[name] = tensors[name]
        return result

    def done_indices(self) -> list[int]:
        """Sorted indices that have a committed entry.

        This only lists files; an entry found corrupt later, by :meth:`get`, is
        then discarded.
        """
        found = []
        for entry in os.scandir(self.path):
            stem, suffix = entry.name[: -len(_SUFFIX)], entry.name[-len(_SUFFIX) :]
            if suffix == _SUFFIX and stem.isdigit() and entry.is_file():
                found.append(int(stem))
        return sorted(found)

    def __contains__(self, index: object) -> bool:
        """Whether a valid result for ``index`` is stored (verifies it, as :meth:`get`)."""
        try:
            checked = self._check_index(index)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return self.get(checked) is not None
