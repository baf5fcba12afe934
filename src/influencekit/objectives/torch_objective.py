"""The generic objective: any ``nn.Module`` and per-example loss, via ``torch.func``."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from influencekit.checks import (
    check_eval_mode,
    check_finite_parameters,
    check_labels,
    named_tensors,
    warn_lossy_cast,
)
from influencekit.data import Batch, DataSource, batch_size, batch_tensors, index_batch, map_batch, reshape_leading
from influencekit.errors import DtypeError
from influencekit.linalg import check_directions, check_mini_batches
from influencekit.losses import ForwardFn, LossFn, batch_targets, cast_floats, cross_entropy, default_forward, resolve_loss
from influencekit.parameters import ParameterSpace


#: Rows per retained gradient graph when all of them fit in ``hvp_cache_mb`` (see ``TorchObjective.hvp``).
HVP_GRAPH_ROWS = 32768


class TorchObjective:
    """R(theta) = (1/n) sum_i loss(model(z_i)) + (weight_decay/2) ||theta||^2 for a PyTorch model.

    Dtype rule: the attributed parameters' dtype (all must share one, else
    :class:`~influencekit.errors.DtypeError`) is the dtype of every computation;
    floating-point tensors of every batch are cast to it, integer tensors (class
    labels, token ids) stay integer. A cast that loses precision (float64 data,
    float32 model) warns once with :class:`~influencekit.errors.DtypeCastWarning`;
    call ``model.double()`` to compute in float64.

    Checks on construction: the model's parameters and buffers are finite; no
    dropout or batch-norm module is in train mode (unless ``allow_train_mode``);
    the training data is non-empty and finite (see :class:`DataSource`). On every
    pass with the built-in "cross_entropy" loss or measurement (for training
    data, until one full pass has checked them all): labels lie in [0, number
    of outputs). Each failure is an
    :class:`~influencekit.errors.InfluenceInputError` naming the example or parameter.

    Args:
        model: the trained model, evaluated in its current mode (call ``.eval()``
            first if it has dropout or batch norm).
        loss: per-example training loss ``loss(outputs, batch) -> (B,)`` or the
            name of a built-in ("cross_entropy", "squared_error").
        train_data: training set: a batch of tensors (tuple/dict, leading dim n),
            a DataLoader (not shuffling) or a re-iterable of batches.
        weight_decay: lambda of the L2 term (lambda/2)||theta||^2 that is part
            of the training objective, on the attributed parameters.
        measurement: per-example quantity whose change is attributed at test
            points, same signature as ``loss``; default: ``loss`` (without L2).
        params: names of the attributed parameters (default: all trainable);
            the others stay fixed.
        forward: ``forward(model_call, batch) -> outputs``; default calls the
            model on ``batch[0]`` / ``batch["inputs"]``.
        chunk_size: rows per chunk for per-example work (bounds memory).
        allow_train_mode: accept a model whose dropout / batch-norm modules are in
            train mode (every pass then sees different or batch-dependent outputs).
        hvp_cache_mb: memory budget (MB) for keeping, per training chunk (or per
            group of chunks, up to ``HVP_GRAPH_ROWS`` rows, when the whole training
            set fits), the autograd graph of its gradient g_c = grad sum_{i in c} l_i (made
            with ``create_graph``). ``hvp`` then differentiates g_c once more
            (H_c v = grad <g_c, v>, reverse-over-reverse) instead of redoing the
            forward and backward passes at every product: on W1 about 4x fewer
            operations per Hessian-vector product. Chunks beyond the budget use
            forward-over-reverse ``jvp(grad)``; 0 disables the cache.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn,
        train_data: DataSource | Batch | Iterable[Batch],
        *,
        weight_decay: float = 0.0,
        measurement: str | LossFn | None = None,
        params: Sequence[str] | None = None,
        forward: ForwardFn = default_forward,
        chunk_size: int = 1024,
        allow_train_mode: bool = False,
        hvp_cache_mb: float = 1024.0,
    ):
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.model = model
        self.loss = resolve_loss(loss)
        self.measurement = self.loss if measurement is None else resolve_loss(measurement)
        self.forward = forward
        self.weight_decay = float(weight_decay)
        check_eval_mode(model, allow_train_mode)
        check_finite_parameters(model)
        self.space = ParameterSpace.from_module(model, params)
        named = dict(model.named_parameters())
        dtypes = {named[n].dtype for n in self.space.names}
        if len(dtypes) != 1:
            raise DtypeError(
                f"the attributed parameters mix dtypes {sorted(map(str, dtypes))}; convert the model to one "
                "(model.double() or model.float())"
            )
        self.theta = self.space.flatten({n: named[n].detach() for n in self.space.names})
        self._fixed = {n: p.detach() for n, p in named.items() if n not in self.space.names}
        self._fixed.update(dict(model.named_buffers()))
        self.train = DataSource.wrap(train_data, chunk_size, role="training data")
        self.n_train = len(self.train)
        self.chunk_size = chunk_size
        self._warned_cast = False
        self._num_classes: int | None = None
        self._train_labels_checked = False
        self.hvp_cache_mb = float(hvp_cache_mb)
        self._gradient_graphs: list[Tensor] | None = None
        self._graph_chunks = 1  # chunks per retained gradient graph
        self._theta_leaf = self.theta.detach().requires_grad_()

    # -- basic functional pieces -------------------------------------------------
    @property
    def dim(self) -> int:
        return self.space.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    def parameters_vector(self) -> Tensor:
        return self.theta

    def _prepare(self, batch: Batch, role: str = "training data", positions: int | Tensor = 0) -> Batch:
        """Cast the batch's floats to the parameter dtype and check its class labels.

        ``positions``: data-set index of the batch's first row, or of every row (for error messages).
        """
        if not self._warned_cast:
            for name, tensor in named_tensors(batch):
                if warn_lossy_cast(tensor, self.dtype, f"{name} of the {role}"):
                    self._warned_cast = True
                    break
        batch = cast_floats(batch, self.dtype)
        training = role == "training data"
        if (self.loss if training else self.measurement) is cross_entropy and not (training and self._train_labels_checked):
            if self._num_classes is None:
                with torch.no_grad():
                    self._num_classes = int(self.outputs(self.theta, index_batch(batch, slice(0, 1))).shape[1])
            check_labels(batch_targets(batch), self._num_classes, role, positions)
        return batch

    def _train_chunks(self):
        """The training set in chunks, prepared and checked."""
        start = 0
        for chunk in self.train.chunks():
            yield self._prepare(chunk, "training data", start)
            start += batch_size(chunk)
        self._train_labels_checked = True  # every training label passed; the data cannot change (see DataSource)

    def outputs(self, theta: Tensor, batch: Batch) -> Any:
        """Model outputs for ``batch`` at parameters ``theta`` (differentiable in theta)."""
        state = {**self._fixed, **self.space.unflatten(theta)}
        return self.forward(lambda *args, **kwargs: functional_call(self.model, state, args, kwargs), batch)

    def losses(self, theta: Tensor, batch: Batch) -> Tensor:
        """Per-example training losses (without L2), shape (B,)."""
        return self.loss(self.outputs(theta, batch), batch)

    def _per_example_gradients(self, fn: LossFn, batch: Batch) -> Tensor:
        def single(theta: Tensor, example: Batch) -> Tensor:
            one = map_batch(lambda t: t.unsqueeze(0), example)
            return fn(self.outputs(theta, one), one)[0]

        return vmap(grad(single), in_dims=(None, 0))(self.theta, batch)

    def _chunked(self, batch: Batch):
        return self._split(self._prepare(batch, "test data"))

    def _split(self, batch: Batch):
        n = batch_size(batch)
        for start in range(0, n, self.chunk_size):
            yield map_batch(lambda t: t[start : start + self.chunk_size], batch)

    # -- Objective protocol --------------------------------------------------------
    def objective_value(self) -> float:
        total = sum(float(self.losses(self.theta, chunk).sum()) for chunk in self._train_chunks())
        return total / self.n_train + 0.5 * self.weight_decay * float(self.theta @ self.theta)

    def objective_gradient(self) -> Tensor:
        total = torch.zeros_like(self.theta)
        for chunk in self._train_chunks():
            total += grad(lambda t: self.losses(t, chunk).sum())(self.theta)
        return total / self.n_train + self.weight_decay * self.theta

    def train_gradients(self, indices: Tensor) -> Tensor:
        indices = torch.as_tensor(indices).reshape(-1)
        batch = self._prepare(self.train.gather(indices), "training data", indices)
        rows = [self._per_example_gradients(self.loss, chunk) for chunk in self._split(batch)]
        return torch.cat(rows) + self.weight_decay * self.theta

    def train_gradient_dots(self, directions: Tensor) -> Tensor:
        directions = check_directions(directions, self.dim, "directions").to(self.dtype)

        def dots(v: Tensor, chunk: Batch) -> Tensor:
            return jvp(lambda t: self.losses(t, chunk), (self.theta,), (v,))[1]

        columns = [vmap(dots, in_dims=(0, None))(directions, chunk) for chunk in self._train_chunks()]
        return torch.cat(columns, dim=1) + self.weight_decay * (directions @ self.theta).unsqueeze(1)

    def measurement_gradients(self, batch: Batch) -> Tensor:
        return torch.cat([self._per_example_gradients(self.measurement, chunk) for chunk in self._chunked(batch)])

    def measurement_values(self, batch: Batch) -> Tensor:
        with torch.no_grad():
            return torch.cat([self.measurement(self.outputs(self.theta, c), c) for c in self._chunked(batch)])

    def _hvp_of(self, batch: Batch, vectors: Tensor) -> Tensor:
        """(hess of sum_{i in batch} l_i) v for every row v of ``vectors``."""

        def one(v: Tensor) -> Tensor:
            return jvp(grad(lambda t: self.losses(t, batch).sum()), (self.theta,), (v,))[1]

        return vmap(one)(vectors)

    def _retained_gradient(self, chunk: Batch) -> tuple[Tensor, int]:
        """g_c = grad of sum_{i in chunk} l_i with its graph kept, and the bytes that graph holds.

        The bytes count every tensor autograd saved for the double backward,
        except the parameters and storage shared with the training set itself.
        """
        saved: dict[int, int] = {}

        def pack(tensor: Tensor) -> Tensor:
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            (gradient,) = torch.autograd.grad(self.losses(self._theta_leaf, chunk).sum(), self._theta_leaf, create_graph=True)
        resident = {t.untyped_storage().data_ptr() for t in batch_tensors(self.train.resident())}
        resident.add(self._theta_leaf.untyped_storage().data_ptr())
        return gradient, sum(nbytes for ptr, nbytes in saved.items() if ptr not in resident)

    def _cached_gradients(self) -> list[Tensor]:
        """Retained gradients g_c for the leading row groups that fit in ``hvp_cache_mb`` (built once).

        A group is one chunk, or, when the first chunk's graph shows that the whole
        in-memory training set fits in the budget, ``HVP_GRAPH_ROWS`` rows: fewer,
        larger kernels (W1: 55,000 rows in one group take half the time of 4,096-row chunks).
        """
        if self._gradient_graphs is None:
            self._gradient_graphs, self._graph_chunks, used = [], 1, 0
            budget = self.hvp_cache_mb * 2**20
            if budget > 0 and self.train.resident():
                first = next(self.train.chunks())
                _, nbytes = self._retained_gradient(self._prepare(first))
                if nbytes / batch_size(first) * self.n_train <= budget:
                    self._graph_chunks = max(1, HVP_GRAPH_ROWS // self.chunk_size)
            for chunk in self.train.chunks(self._graph_chunks * self.chunk_size) if budget > 0 else ():
                gradient, nbytes = self._retained_gradient(self._prepare(chunk))
                used += nbytes
                if used > budget:
                    break
                self._gradient_graphs.append(gradient)
        return self._gradient_graphs

    def hvp(self, vectors: Tensor) -> Tensor:
        vectors = check_directions(vectors, self.dim).to(self.dtype)
        cached = self._cached_gradients()
        total = torch.zeros_like(vectors)
        for gradient in cached:
            # one vector: a plain backward; several: one batched (vmapped) backward
            if len(vectors) == 1:
                (product,) = torch.autograd.grad(gradient, self._theta_leaf, vectors[0], retain_graph=True)
            else:
                (product,) = torch.autograd.grad(gradient, self._theta_leaf, vectors, retain_graph=True, is_grads_batched=True)
            total += product
        for chunk in itertools.islice(self.train.chunks(), len(cached) * self._graph_chunks, None):
            total += self._hvp_of(self._prepare(chunk), vectors)
        return total / self.n_train + self.weight_decay * vectors

    def sampled_hvp(self, indices: Tensor, vectors: Tensor) -> Tensor:
        vectors = check_directions(vectors, self.dim).to(self.dtype)
        indices = check_mini_batches(indices, vectors.shape[0])
        k, b = indices.shape
        batches = reshape_leading(self._prepare(self.train.gather(indices), "training data", indices), (k, b))

        # One copy of theta per vector: the gradient of sum_j mean_{B_j} l(theta_j) has rows grad R_{B_j},
        # and differentiating sum_j <grad R_{B_j}, v_j> again gives the rows H_{B_j} v_j. Only the forward
        # pass is vmapped: 1.5-4x faster per LiSSA step than vmap(jvp(grad)), whose transforms cost more
        # than the few FLOPs of a mini-batch.
        thetas = self.theta.detach().expand(k, -1).clone().requires_grad_()
        with torch.enable_grad():
            if k == 1:  # one vector: plain matrix products, which beat a vmapped batch of one
                means = self.losses(thetas[0], map_batch(lambda t: t[0], batches)).mean().reshape(1)
            else:
                means = vmap(lambda theta, batch: self.losses(theta, batch).mean())(thetas, batches)
            (gradients,) = torch.autograd.grad(means.sum(), thetas, create_graph=True)
            (products,) = torch.autograd.grad((gradients * vectors).sum(), thetas)
        return products + self.weight_decay * vectors

    def hessian(self, block: int = 64) -> Tensor:
        """Explicit Hessian of R, built from HVPs with ``block`` unit vectors at a time.

        64 (benchmarks/RESULTS.md, "Issue 13, reduced CI test"): batched backward passes
        over more vectors get slower per vector on the CPU (reduced Figure 2 CNN, p = 312:
        14 s with 64, 29 s with 256; logistic regression, p = 7,850: 37 s against 45 s).
        """
        eye = torch.eye(self.dim, dtype=self.dtype)
        return torch.cat([self.hvp(eye[i : i + block]) for i in range(0, self.dim, block)])
