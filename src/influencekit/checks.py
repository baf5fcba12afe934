"""Cheap input checks, run inside passes over the data that already happen.

Each check raises an :mod:`influencekit.errors` exception whose one-line message
names the problem, where it is (example index in the data set, parameter name,
batch number) and the fix. None of them sweeps the data set on its own: the
data checks run on the batches a pass is already holding.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from influencekit.errors import (
    DtypeCastWarning,
    EmptyDataError,
    LabelRangeError,
    NondeterministicDataError,
    NonFiniteError,
    NonSequentialSamplerError,
    TrainModeError,
)

Positions = int | Tensor  # the data-set index of row 0 of a batch, or the index of every row


def named_tensors(batch: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """The tensors of a batch with readable names: ``inputs``/``targets`` for (inputs, targets, ...)
    tuples and bare tensors, the key for dicts, ``batch[i]`` beyond the second tuple entry."""
    if isinstance(batch, Tensor):
        return [(prefix or "inputs", batch)]
    if isinstance(batch, Mapping):
        return [pair for key, value in batch.items() for pair in named_tensors(value, f"{prefix}{key}")]
    if isinstance(batch, (tuple, list)):
        out = []
        for i, value in enumerate(batch):
            name = f"{prefix}[{i}]" if prefix else ({0: "inputs", 1: "targets"}.get(i, f"batch[{i}]"))
            out.extend(named_tensors(value, name))
        return out
    return []


def example_index(positions: Positions, row: int) -> int:
    """Index in the data set of row ``row`` of a batch."""
    return positions + row if isinstance(positions, int) else int(positions.reshape(-1)[row])


def check_not_empty(n: int, role: str) -> None:
    if n == 0:
        raise EmptyDataError(f"the {role} has no examples; pass at least one example")


def check_finite_batch(batch: Any, role: str, positions: Positions = 0) -> None:
    """Raise :class:`NonFiniteError` naming the tensor and example index of the first NaN/inf."""
    for name, tensor in named_tensors(batch):
        if not tensor.is_floating_point() or tensor.dim() == 0:
            continue
        if bool(torch.isfinite(tensor.sum())):  # NaN and inf propagate through a sum: one read, no mask
            continue
        finite = torch.isfinite(tensor)  # the sum was not finite: find where (or it merely overflowed)
        if bool(finite.all()):
            continue
        row = int((~finite.reshape(tensor.shape[0], -1).all(dim=1)).nonzero()[0])
        value = float(tensor[row][~finite[row]].reshape(-1)[0])
        raise NonFiniteError(
            f"the {role} has a non-finite value ({value}) in {name} of example {example_index(positions, row)}; "
            "remove or repair that example (e.g. torch.nan_to_num) before computing influence"
        )


def parameter_location(column: int, names: tuple[str, ...] | None, numels: tuple[int, ...] | None) -> str:
    """``parameter 'fc.weight' (entry 12)`` for a column of the flat parameter vector."""
    if names is None or numels is None:
        return f"parameter coordinate {column}"
    start = 0
    for name, size in zip(names, numels):
        if column < start + size:
            return f"parameter {name!r} (entry {column - start})"
        start += size
    return f"parameter coordinate {column}"


def check_finite_rows(matrix: Tensor, what: str, row_label: str, space: Any = None, positions: Positions = 0) -> None:
    """Raise :class:`NonFiniteError` naming the first row and parameter of a non-finite entry of ``matrix`` (k, p).

    ``space`` (a :class:`ParameterSpace` or None) names the parameter of the column;
    ``positions`` the data-set index of the rows (as in :func:`example_index`).
    """
    finite = torch.isfinite(matrix)
    if bool(finite.all()):
        return
    row, column = (int(i) for i in (~finite).nonzero()[0])
    names = getattr(space, "names", None)
    numels = getattr(space, "numels", None)
    raise NonFiniteError(
        f"the {what} of {row_label} {example_index(positions, row)} is not finite ({float(matrix[row, column])}) at "
        f"{parameter_location(column, names, numels)}; check the loss for log(0) or overflow at that example "
        "(and the model's parameters)"
    )


def check_finite_parameters(module: nn.Module) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter or floating buffer that holds a NaN/inf."""
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in named:
            if not tensor.is_floating_point():
                continue
            bad = ~torch.isfinite(tensor.detach().reshape(-1))
            if bool(bad.any()):
                entry = int(bad.nonzero()[0])
                raise NonFiniteError(
                    f"model {kind} {name!r} is not finite at entry {entry} ({float(tensor.detach().reshape(-1)[entry])}); "
                    "the model diverged in training: retrain it (lower learning rate) or load a finite checkpoint"
                )


def check_labels(targets: Tensor, num_classes: int, role: str, positions: Positions) -> None:
    """Raise :class:`LabelRangeError` for an integer class label outside [0, num_classes)."""
    if targets.is_floating_point() or targets.is_complex() or targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= num_classes)
    if bool(bad.any()):
        row = int(bad.reshape(targets.shape[0], -1).any(dim=1).nonzero()[0])
        value = int(targets[row][bad[row]].reshape(-1)[0]) if targets.dim() > 1 else int(targets[row])
        raise LabelRangeError(
            f"the {role} has label {value} at example {example_index(positions, row)}, outside the "
            f"{num_classes} classes of the model's output (valid labels 0..{num_classes - 1}); fix the labels "
            f"or give the model {value + 1 if value >= 0 else num_classes} outputs"
        )


RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def check_eval_mode(model: nn.Module, allow_train_mode: bool) -> None:
    """Raise :class:`TrainModeError` when a module that behaves differently in training (dropout,
    batch norm) is in train mode, unless ``allow_train_mode``."""
    if allow_train_mode:
        return
    for name, module in model.named_modules():
        if module.training and isinstance(module, RANDOM_MODULES):
            raise TrainModeError(
                f"module {name or type(model).__name__!r} ({type(module).__name__}) is in train mode, so every pass "
                "gives different outputs (dropout) or batch-dependent ones (batch norm); call model.eval() "
                "or pass allow_train_mode=True"
            )


def warn_lossy_cast(tensor: Tensor, dtype: torch.dtype, where: str) -> bool:
    """Warn (:class:`DtypeCastWarning`) when a floating tensor loses precision by a cast to ``dtype``.

    Returns whether it warned.
    """
    if tensor.is_floating_point() and torch.finfo(tensor.dtype).eps < torch.finfo(dtype).eps:
        warnings.warn(
            f"{where} is {tensor.dtype} but the model's parameters are {dtype}: the data is cast down to {dtype}; "
            "call model.double() to compute in float64",
            DtypeCastWarning,
            stacklevel=4,
        )
        return True
    return False


def check_sequential_sampler(loader: Iterable[Any]) -> None:
    """Raise :class:`NonSequentialSamplerError` unless a DataLoader reads its data set in order.

    Accepted: a DataLoader whose sampler is a ``SequentialSampler`` and whose batch
    sampler (if any) is a ``BatchSampler`` over it, a DataLoader over an
    ``IterableDataset`` (its order is its own; the fingerprint check of
    :class:`DataSource` still refuses one that changes between passes), and any
    other re-iterable.
    """
    if not isinstance(loader, torch.utils.data.DataLoader):
        return
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return
    sequential = torch.utils.data.SequentialSampler
    sampler, batch_sampler = loader.sampler, loader.batch_sampler
    offender = None
    if not isinstance(sampler, sequential):
        offender = sampler
    elif batch_sampler is not None and not (
        type(batch_sampler) is torch.utils.data.BatchSampler and isinstance(batch_sampler.sampler, sequential)
    ):
        offender = batch_sampler
    if offender is not None:
        raise NonSequentialSamplerError(
            f"the DataLoader's {type(offender).__name__} does not read the examples in order; influence scores are "
            "indexed by the position of each example, so pass a loader with shuffle=False and no sampler "
            "(subset or reweight the data set itself instead)"
        )


def batch_fingerprint(batch: Any) -> Tensor:
    """A float64 summary of a batch that changes when its values or their order change.

    Per tensor: sum_{r, c} a_r b_c x[r, c] with fixed weights a, b that differ per
    row and per entry, so flips, crops, noise and reordering all change it.
    Costs one multiply-add per element, far less than the forward pass it rides along.
    """
    values = []
    for _, tensor in named_tensors(batch):
        flat = tensor.detach().reshape(tensor.shape[0] if tensor.dim() else 1, -1).to(torch.float64)
        cols = torch.arange(flat.shape[1], dtype=torch.float64, device=flat.device)
        rows = torch.arange(flat.shape[0], dtype=torch.float64, device=flat.device)
        values.append((torch.sin(rows * 0.7548) + 2.0) @ (flat @ (torch.sin(cols * 0.5698) + 2.0)))
        values.append(torch.tensor(float(flat.shape[0]), dtype=torch.float64, device=flat.device))
    return torch.stack(values).cpu()


def check_same_batch(fingerprint: Tensor, first: Tensor | None, role: str, batch_number: int, start: int) -> None:
    """Raise :class:`NondeterministicDataError` when a batch's fingerprint differs from the first pass's."""
    same = first is not None and first.shape == fingerprint.shape and torch.allclose(fingerprint, first, rtol=1e-9, atol=0.0)
    if not same:
        raise NondeterministicDataError(
            f"batch {batch_number} (from example {start}) of the {role} differs from the first pass over it: the "
            "loader is not deterministic (random augmentation or shuffling?); give a loader without random "
            "transforms, with shuffle=False"
        )
