"""Training and test data as the library sees it.

A *batch* is a tensor, a tuple/list of tensors or a dict of tensors, all sharing
a leading batch dimension. :class:`DataSource` wraps either such a batch holding
the whole data set (split into chunks of ``chunk_size`` rows) or a DataLoader /
re-iterable of batches (of any, possibly uneven, sizes). Every full pass in the
library sums over examples and divides by the true number of examples ``n``, so
the batching never changes a result.

Checks (see :mod:`influencekit.checks`): the data set must not be empty nor hold a
NaN/inf in a floating tensor (checked once, on construction: for a loader during the
pass that counts its examples); a DataLoader must read its data set in order; and a
loader must give the same batches on every pass: a fingerprint of each batch taken on
the first pass is compared on every later one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, Union

import torch
from torch import Tensor

from influencekit.checks import (
    batch_fingerprint,
    check_finite_batch,
    check_not_empty,
    check_same_batch,
    check_sequential_sampler,
)

Batch = Union[Tensor, Sequence[Any], Mapping[str, Any]]


def map_batch(fn: Callable[[Tensor], Tensor], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor of a batch, keeping its structure."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {key: map_batch(fn, value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_batch(fn, value) for value in batch)
    return batch


def batch_tensors(batch: Batch) -> list[Tensor]:
    """All tensors of a batch, in a fixed order."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for value in batch.values() for t in batch_tensors(value)]
    if isinstance(batch, (tuple, list)):
        return [t for value in batch for t in batch_tensors(value)]
    return []


def batch_size(batch: Batch) -> int:
    """Leading dimension of a batch; raises if its tensors disagree."""
    tensors = batch_tensors(batch)
    if not tensors:
        raise ValueError("a batch must contain at least one tensor")
    sizes = {t.shape[0] if t.dim() > 0 else None for t in tensors}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"the tensors of a batch must share a leading batch dimension, got sizes {sorted(map(str, sizes))}")
    return sizes.pop()


def index_batch(batch: Batch, index: Tensor | slice) -> Batch:
    """Rows ``index`` of every tensor of the batch."""
    return map_batch(lambda t: t[index], batch)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches of the same structure along the batch dimension."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches))
    if isinstance(first, Mapping):
        return {key: concat_batches([b[key] for b in batches]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([b[i] for b in batches]) for i in range(len(first)))
    return first


def reshape_leading(batch: Batch, shape: tuple[int, ...]) -> Batch:
    """Reshape the leading dimension of every tensor to ``shape`` (e.g. (k, B))."""
    return map_batch(lambda t: t.reshape(*shape, *t.shape[1:]), batch)


class DataSource:
    """A data set of ``n`` examples that can be swept in chunks and sampled.

    Args:
        data: a batch holding all examples (tensors with leading dimension n),
            a ``torch.utils.data.DataLoader``, or any re-iterable of batches.
        chunk_size: rows per chunk when ``data`` is a single batch. Bounds the
            memory of per-example computations.
        role: what the data is, for error messages (e.g. "training data").

    Raises:
        EmptyDataError, NonFiniteError, NonSequentialSamplerError (on construction);
        NondeterministicDataError (on a later pass whose batches differ from the first).
    """

    def __init__(self, data: Batch | Iterable[Batch], chunk_size: int = 1024, role: str = "data"):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.role = role
        self._loader: Iterable[Batch] | None = None
        self._tensors: Batch | None = None
        self._fingerprints: list[Tensor] = []
        if isinstance(data, (Tensor, Mapping, tuple, list)) and _is_batch(data):
            self._tensors = data
            self.n = batch_size(data)
            check_finite_batch(data, role)
        elif isinstance(data, Iterable):
            check_sequential_sampler(data)
            self._loader = data
            self.n = 0
            for batch in data:  # the first pass: count, check and fingerprint every batch
                check_finite_batch(batch, role, self.n)
                self._fingerprints.append(batch_fingerprint(batch))
                self.n += batch_size(batch)
        else:
            raise TypeError(f"data must be a batch of tensors or an iterable of batches, got {type(data).__name__}")
        check_not_empty(self.n, role)

    @classmethod
    def wrap(cls, data: "DataSource | Batch | Iterable[Batch]", chunk_size: int = 1024, role: str = "data") -> "DataSource":
        return data if isinstance(data, DataSource) else cls(data, chunk_size, role)

    def __len__(self) -> int:
        return self.n

    def chunks(self, size: int | None = None) -> Iterator[Batch]:
        """Yield the data set as consecutive batches covering every example once.

        In-memory data comes in views of ``size`` rows (default ``chunk_size``); a
        loader yields its own batches whatever ``size`` says.
        """
        if self._tensors is not None:
            size = size or self.chunk_size
            for start in range(0, self.n, size):
                yield index_batch(self._tensors, slice(start, start + size))
        else:
            start, count = 0, 0
            for batch in self._loader:  # type: ignore[union-attr]
                first = self._fingerprints[count] if count < len(self._fingerprints) else None
                check_same_batch(batch_fingerprint(batch), first, self.role, count, start)
                start, count = start + batch_size(batch), count + 1
                yield batch
            if count != len(self._fingerprints):  # the loader ended early
                check_same_batch(torch.zeros(0), None, self.role, count, start)

    def gather(self, indices: Tensor) -> Batch:
        """The examples at ``indices`` (1-D int tensor) as one batch, in that order."""
        return index_batch(self.materialize(), indices.reshape(-1))

    def resident(self) -> Batch:
        """The tensors this source keeps in memory for its whole life (empty for a loader not yet materialized)."""
        return () if self._tensors is None else self._tensors

    def materialize(self) -> Batch:
        """All examples as one batch (a loader is concatenated once and cached)."""
        if self._tensors is None:
            self._tensors = concat_batches(list(self.chunks()))
            self._loader = None
        return self._tensors


def _is_batch(data: Any) -> bool:
    if isinstance(data, Tensor):
        return True
    if isinstance(data, Mapping):
        return all(isinstance(v, Tensor) for v in data.values())
    return all(isinstance(v, Tensor) for v in data)
