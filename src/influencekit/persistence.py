"""Saving fitted approximations: tensors in safetensors, arguments in JSON.

A saved approximation is a directory holding two files:

* ``tensors.safetensors``: the fitted tensors (eigenvectors, diagonals, factors ...),
  by name; they are stored contiguous and on the CPU, with their dtype.
* ``arguments.json``: the constructor arguments and other small metadata
  (numbers, strings, lists, dicts: anything JSON can hold).

Each file is written to a temporary file in the same directory and moved into
place with :func:`os.replace`, so a reader never sees a half-written file and
an interrupted save leaves any previous version of that file intact. The two
files are replaced one after the other (tensors first): saving over an existing
directory while another process reads it can pair new tensors with old
arguments for a moment; save to a fresh directory when that matters.

Savers put their class name under ``arguments["class"]``; :func:`load_saved`
checks it, so loading a directory as the wrong kind fails clearly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

TENSORS_FILE = "tensors.safetensors"
ARGUMENTS_FILE = "arguments.json"


def atomic_write(target: str | os.PathLike[str], content: bytes | str | Callable[[str], None]) -> Path:
    """Write ``target`` so that a reader sees the old file or the new one, never a part; returns it.

    The content (bytes, text as UTF-8, or ``write(temporary_path)`` for writers that want a path)
    goes to a temporary file in the same directory, is flushed to disk, moved onto ``target``
    with :func:`os.replace`, and the directory is synced, so the rename survives a crash too. The
    file gets the usual permissions (0666 less the umask), not mkstemp's 0600. An interrupted write
    leaves no temporary file behind.
    """
    target = Path(target)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        if callable(content):
            os.close(handle)
            content(temporary)
            with open(temporary, "rb+") as stream:
                os.fsync(stream.fileno())
        else:
            with os.fdopen(handle, "wb") as stream:
                stream.write(content.encode("utf-8") if isinstance(content, str) else content)
                stream.flush()
                os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def save_tensors(directory: str | os.PathLike[str], tensors: dict[str, Tensor], arguments: dict[str, Any]) -> Path:
    """Write ``tensors`` (safetensors) and ``arguments`` (JSON) into ``directory``, atomically per file.

    Args:
        directory: created (with parents) if missing; existing files of the same names are replaced.
        tensors: name -> tensor; moved to the CPU and made contiguous before writing.
        arguments: JSON-serialisable metadata (raises ``TypeError`` otherwise).

    Returns:
        The directory as a :class:`~pathlib.Path`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"tensor {name!r} is a {type(value).__name__}, not a torch.Tensor")
    text = json.dumps(arguments, indent=2, sort_keys=True)  # fails before anything is written

    cpu = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    atomic_write(directory / TENSORS_FILE, lambda path: save_file(cpu, path))
    atomic_write(directory / ARGUMENTS_FILE, text)
    return directory


def load_tensors(directory: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read what :func:`save_tensors` wrote: ``(tensors, arguments)``, tensors on the CPU.

    Raises:
        FileNotFoundError: when either file is missing from ``directory``.
    """
    directory = Path(directory)
    tensors_path, arguments_path = directory / TENSORS_FILE, directory / ARGUMENTS_FILE
    for path in (tensors_path, arguments_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} does not hold a saved approximation")
    with open(arguments_path, encoding="utf-8") as stream:
        arguments = json.load(stream)
    return load_file(tensors_path), arguments


def load_saved(directory: str | os.PathLike[str], class_name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """:func:`load_tensors`, checking that ``arguments["class"]`` (written by the saver) is ``class_name``."""
    tensors, arguments = load_tensors(directory)
    found = arguments.get("class")
    if found != class_name:
        raise ValueError(f"{directory} holds a saved {found!r}, not a {class_name!r}")
    return tensors, arguments


def load_checked(
    directory: str | os.PathLike[str], class_name: str, operator: Any
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """:func:`load_saved`, then :func:`check_dimension` of ``operator`` against the saved ``arguments["dim"]``."""
    tensors, arguments = load_saved(directory, class_name)
    check_dimension(directory, arguments["dim"], operator)
    return tensors, arguments


def check_dimension(directory: str | os.PathLike[str], saved_dim: int, operator: Any) -> None:
    """Raise ``ValueError`` unless ``operator.dim`` (a curvature or objective, or None) equals ``saved_dim``."""
    if operator is not None and operator.dim != saved_dim:
        raise ValueError(f"{directory} was fitted for p = {saved_dim} parameters, but the given operator has p = {operator.dim}")
