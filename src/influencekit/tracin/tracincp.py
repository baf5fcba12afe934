"""TracInCP: training-data influence by tracing gradient descent over checkpoints.

TracInCP (Pruthi et al., 2020) scores a training example ``z'`` against a test
example ``z`` with the checkpoints ``w_1 .. w_C`` saved during training and the
learning rate ``eta_c`` in force at each of them::

    score(z, z') = sum_c eta_c * <grad_w l(w_c, z), grad_w l(w_c, z')>

Sign convention and units
-------------------------
A plain SGD step on ``z'`` at ``w_c`` (``w <- w - eta_c grad l(w_c, z')``)
changes the loss on ``z`` by ``-eta_c <grad l(w_c, z), grad l(w_c, z')>`` to
first order. A **positive** score therefore means that the steps on ``z'``
*reduced* the loss on ``z`` (``z'`` is a *proponent*, helpful); a **negative**
score means they increased it (``z'`` is an *opponent*, harmful). The score is
measured in units of the loss (a first-order loss decrease, summed over one
step per checkpoint).

Two scorers share that definition:

* :class:`TracInCP` uses exact per-example gradients (``torch.func``:
  ``vmap(grad(...))`` over ``functional_call``) with respect to all trainable
  parameters or a chosen subset of named parameters.
* :class:`LastLayerTracIn` restricts the gradient to the weight and bias of one
  ``nn.Linear`` layer and uses the factorisation
  ``grad_W l = g a^T`` (``g = dl/d(layer output)``, ``a`` = layer input with a
  1 appended for the bias), so that per checkpoint
  ``<grad l(z), grad l(z')> = (g . g') (a . a')``. The products are formed per
  checkpoint and then summed over checkpoints -- not the product of the sums.

Data conventions
----------------
Batches follow :mod:`influencekit.data`: a tensor, a tuple/list or a dict of
tensors sharing the leading batch dimension ``B``. ``loss_fn(model_call,
batch)`` must return the per-example losses, shape ``(B,)``; ``model_call``
runs the model (with a checkpoint's weights) on whatever positional/keyword
inputs ``loss_fn`` passes it, e.g.::

    def loss_fn(model_call, batch):
        x, y = batch
        return F.cross_entropy(model_call(x), y, reduction="none")

Floating-point batch tensors are cast to the model's dtype (integer targets
stay). Data sets (test or training) are a batch, a :class:`~influencekit.data.DataSource`,
or a *re-iterable* collection of batches (a non-shuffling ``DataLoader``, a
list of batches): they are traversed once per checkpoint, so one-shot
iterators are rejected, and example ``i`` is the ``i``-th in iteration order.
Losses must be per-example independent (no train-mode batch norm, no dropout:
put the model in ``eval()`` mode).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, TypeAlias, Union

import torch
from safetensors.torch import load_file as _load_safetensors
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from influencekit.data import Batch, DataSource, batch_size, index_batch, map_batch
from influencekit.losses import cast_floats
from influencekit.parameters import ParameterSpace

__all__ = [
    "Checkpoint",
    "LastLayerTracIn",
    "TracInCP",
    "TracInData",
    "TracInLossFn",
    "TracInTopK",
    "as_data_source",
    "load_checkpoint",
]

TracInData: TypeAlias = Union[DataSource, Batch, Iterable[Batch]]
"""A batch, a :class:`DataSource`, or a re-iterable collection of batches (e.g. a ``DataLoader``)."""

TracInLossFn: TypeAlias = Callable[[Callable[..., Tensor], Batch], Tensor]
"""``loss_fn(model_call, batch) -> (B,)`` per-example losses."""

Checkpoint: TypeAlias = Union[str, "os.PathLike[str]", Mapping[str, Tensor]]
"""A state dict in memory, or a path to a ``torch.save``'d or ``.safetensors`` state dict."""


class TracInTopK(NamedTuple):
    """Top-k training examples per test example; every field has shape ``(n_test, k)``.

    ``proponent_*``: the ``k`` largest scores, in descending order (most helpful
    first). ``opponent_*``: the ``k`` smallest scores, in ascending order (most
    harmful first). If fewer than ``k`` scores are positive (negative), the
    proponent (opponent) list is completed with the next-ranked scores, whatever
    their sign. Indices index the training data in iteration order.
    """

    proponent_indices: Tensor
    proponent_scores: Tensor
    opponent_indices: Tensor
    opponent_scores: Tensor


# ---------------------------------------------------------------------------- data


def as_data_source(data: TracInData, chunk_size: int) -> DataSource:
    """Wrap ``data`` in a :class:`DataSource` (a loader is counted by one pass); reject one-shot iterators."""
    if isinstance(data, Iterator):
        raise TypeError(
            "data must be re-iterable (it is traversed once per checkpoint): pass a batch, a DataSource, "
            "a DataLoader or a list of batches, not a one-shot iterator/generator"
        )
    return DataSource.wrap(data, chunk_size)


def _iter_chunks(source: DataSource, chunk_size: int) -> Iterator[Batch]:
    """The examples of ``source`` in order, as batches of at most ``chunk_size``."""
    for batch in source.chunks():
        n = batch_size(batch)
        for start in range(0, n, chunk_size):
            yield index_batch(batch, slice(start, start + chunk_size))


def _check_losses(losses: object, n: int) -> Tensor:
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (n,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return per-example losses of shape ({n},) for a batch of {n}, got {shape}")
    return losses


# ----------------------------------------------------------------------- checkpoints


def load_checkpoint(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """Return the state dict behind ``checkpoint``.

    Args:
        checkpoint: a mapping ``name -> Tensor``; a path ending in
            ``.safetensors`` (read with ``safetensors``); or any other path,
            read with ``torch.load(..., map_location="cpu", weights_only=True)``,
            which must hold a plain state dict.

    Raises:
        FileNotFoundError: the path does not exist.
        TypeError: the object is not a mapping ``str -> Tensor``.
    """
    if isinstance(checkpoint, Mapping):
        state = checkpoint
    elif isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        if path.suffix == ".safetensors":
            state = _load_safetensors(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise TypeError(f"a checkpoint must be a state dict or a path, got {type(checkpoint).__name__}")
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise TypeError(f"checkpoint {checkpoint!r:.80} does not hold a state dict (mapping str -> Tensor)")
    return dict(state)


# -------------------------------------------------------------------------- scorers


class _CheckpointTracIn(ABC):
    """Shared checkpoint handling and score accumulation of the TracIn scorers.

    Subclasses define per-example *features* of a chunk at one checkpoint and
    how two feature sets combine into the per-checkpoint dot products
    ``<grad l(w_c, z), grad l(w_c, z')>``.
    """

    def __init__(self, model: nn.Module, checkpoints: Sequence[Checkpoint], learning_rates: Sequence[float],
                 loss_fn: TracInLossFn, chunk_size: int) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
            raise TypeError("checkpoints must be a sequence of state dicts or paths (one entry per checkpoint)")
        if len(checkpoints) == 0:
            raise ValueError("at least one checkpoint is required")
        rates = tuple(float(r) for r in learning_rates)
        if len(rates) != len(checkpoints):
            raise ValueError(f"got {len(checkpoints)} checkpoints but {len(rates)} learning rates")
        if not all(math.isfinite(r) and r > 0 for r in rates):
            raise ValueError(f"learning rates must be finite and > 0, got {rates}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(model_call, batch) -> (B,) losses")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.model = model
        self.checkpoints: tuple[Checkpoint, ...] = tuple(checkpoints)
        self.learning_rates: tuple[float, ...] = rates
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        for c, ckpt in enumerate(self.checkpoints):
            if isinstance(ckpt, Mapping):
                self._validate_state(ckpt, c)
            elif isinstance(ckpt, (str, os.PathLike)):
                if not Path(ckpt).is_file():
                    raise FileNotFoundError(f"checkpoint {c} not found: {ckpt}")
            else:
                raise TypeError(f"checkpoint {c} must be a state dict or a path, got {type(ckpt).__name__}")

    @property
    def num_checkpoints(self) -> int:
        """Number of checkpoints ``C``."""
        return len(self.checkpoints)

    def _validate_state(self, state: Mapping[str, Tensor], index: int) -> None:
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"checkpoint {index} does not match the model: missing keys {missing}, unexpected keys {unexpected}"
            )
        for name, ref in expected.items():
            if tuple(state[name].shape) != tuple(ref.shape):
                raise ValueError(
                    f"checkpoint {index}: '{name}' has shape {tuple(state[name].shape)}, "
                    f"the model expects {tuple(ref.shape)}"
                )

    def _state(self, index: int) -> dict[str, Tensor]:
        """Checkpoint ``index`` as tensors cast to the model's dtypes and devices (as ``load_state_dict`` would)."""
        state = load_checkpoint(self.checkpoints[index])
        self._validate_state(state, index)
        return {
            name: state[name].detach().to(device=ref.device, dtype=ref.dtype)
            for name, ref in self.model.state_dict().items()
        }

    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """Dtype and device of the model's parameters (the batches' floats are cast to them)."""
        for p in self.model.parameters():
            return p.dtype, p.device
        raise ValueError("the model has no parameters")

    # -- subclass interface ------------------------------------------------------
    @abstractmethod
    def _features(self, state: dict[str, Tensor], chunk: Batch) -> tuple[Tensor, ...]:
        """Per-example features of ``chunk`` at the checkpoint whose tensors are ``state``."""

    @staticmethod
    @abstractmethod
    def _pair_scores(test: tuple[Tensor, ...], train: tuple[Tensor, ...]) -> Tensor:
        """``(n_test, n_chunk)`` gradient dot products at one checkpoint."""

    @staticmethod
    @abstractmethod
    def _self_scores(features: tuple[Tensor, ...]) -> Tensor:
        """``(n_chunk,)`` squared gradient norms at one checkpoint."""

    # -- shared machinery --------------------------------------------------------
    def _iter_features(
        self, source: DataSource, index: int, state: dict[str, Tensor] | None = None
    ) -> Iterator[tuple[Tensor, ...]]:
        if state is None:
            state = self._state(index)
        dtype, device = self._dtype_device()
        for chunk in _iter_chunks(source, self.chunk_size):
            yield self._features(state, cast_floats(map_batch(lambda t: t.to(device), chunk), dtype))

    def _accumulate(self, n_columns: int, per_checkpoint: Callable[[int, dict[str, Tensor]], Tensor]) -> Tensor:
        total: Tensor | None = None
        for c, eta in enumerate(self.learning_rates):
            block = per_checkpoint(c, self._state(c))
            if block.shape[-1] != n_columns:
                raise RuntimeError(
                    f"checkpoint {c}: the training data yielded {block.shape[-1]} examples, expected "
                    f"{n_columns}: it changed between passes"
                )
            total = eta * block if total is None else total.add_(block, alpha=eta)
        assert total is not None  # at least one checkpoint, checked in __init__
        return total

    def scores(self, test_batch: TracInData, train_data: TracInData) -> Tensor:
        """TracInCP scores ``sum_c eta_c <grad l(w_c, z_test), grad l(w_c, z_train)>``.

        Args:
            test_batch: the ``n_test`` test examples: a batch, or any data set
                form accepted for training data.
            train_data: a batch, DataSource or re-iterable of batches, ``n_train`` examples.

        Returns:
            Tensor ``(n_test, n_train)`` in the model's dtype; positive = the
            training example is a proponent (its steps reduced the test loss),
            negative = opponent. Units: loss.

        Memory: the features of all test examples plus those of one chunk of
        ``chunk_size`` training examples, plus the score matrix.
        """
        test = as_data_source(test_batch, self.chunk_size)
        train = as_data_source(train_data, self.chunk_size)

        def per_checkpoint(c: int, state: dict[str, Tensor]) -> Tensor:
            parts = list(self._iter_features(test, c, state))
            test_features = tuple(torch.cat(fields, dim=0) for fields in zip(*parts))
            blocks = [self._pair_scores(test_features, f) for f in self._iter_features(train, c, state)]
            return torch.cat(blocks, dim=1)

        return self._accumulate(len(train), per_checkpoint)

    def self_influence(self, train_data: TracInData) -> Tensor:
        """Self-influence ``sum_c eta_c ||grad l(w_c, z)||^2`` of every training example.

        Returns:
            Tensor ``(n_train,)``, non-negative, in loss units. Large values flag
            examples that are hard to fit or mislabelled.
        """
        train = as_data_source(train_data, self.chunk_size)

        def per_checkpoint(c: int, state: dict[str, Tensor]) -> Tensor:
            return torch.cat([self._self_scores(f) for f in self._iter_features(train, c, state)])

        return self._accumulate(len(train), per_checkpoint)

    def top_k(self, test_batch: TracInData, train_data: TracInData, k: int) -> TracInTopK:
        """Proponents (``k`` largest scores) and opponents (``k`` smallest) per test example.

        Computes the full ``(n_test, n_train)`` score matrix first; for training
        sets too large for that, use the influence embeddings with a FAISS index
        (:mod:`influencekit.search.faiss_index`).

        Returns:
            :class:`TracInTopK`, each field ``(n_test, k)``.
        """
        s = self.scores(test_batch, train_data)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= s.shape[1]:
            raise ValueError(f"k must be an int in [1, n_train={s.shape[1]}], got {k!r}")
        pro_scores, pro_idx = torch.topk(s, k, dim=1, largest=True, sorted=True)
        opp_scores, opp_idx = torch.topk(s, k, dim=1, largest=False, sorted=True)
        return TracInTopK(pro_idx, pro_scores, opp_idx, opp_scores)


class TracInCP(_CheckpointTracIn):
    """TracInCP with exact per-example gradients (``torch.func``).

    ``score(z, z') = sum_c eta_c <grad_theta l(w_c, z), grad_theta l(w_c, z')>``
    where ``theta`` is the set of parameters named in ``params`` (default: every
    parameter with ``requires_grad=True``) and the other entries of the state
    dict stay fixed at the checkpoint's values. Positive = proponent (helpful),
    negative = opponent; see the module docstring.

    Args:
        model: the architecture; never modified (checkpoints are applied with
            ``torch.func.functional_call``). Put it in ``eval()`` mode.
        checkpoints: one state dict or path (``torch.save`` / ``.safetensors``)
            per checkpoint; paths are read when needed, one at a time. Tensors are
            cast to the dtype/device of the model's own entries.
        learning_rates: ``eta_c > 0``, one per checkpoint.
        loss_fn: ``loss_fn(model_call, batch) -> (B,)`` per-example losses.
        params: names of the parameters to differentiate (as in
            ``model.named_parameters()``), or ``None`` for all trainable ones.
        chunk_size: examples per ``vmap`` call; bounds memory at about
            ``chunk_size * p`` gradient entries (``p`` = number of scored parameters).
    """

    def __init__(self, model: nn.Module, checkpoints: Sequence[Checkpoint], learning_rates: Sequence[float],
                 loss_fn: TracInLossFn, params: Sequence[str] | None = None, chunk_size: int = 256) -> None:
        super().__init__(model, checkpoints, learning_rates, loss_fn, chunk_size)
        if isinstance(params, str):
            raise TypeError("params must be a sequence of parameter names, not a single string")
        self.space = ParameterSpace.from_module(model, None if params is None else list(dict.fromkeys(params)))
        self.param_names: tuple[str, ...] = self.space.names

    @property
    def num_params(self) -> int:
        """Length ``p`` of the flattened per-example gradient."""
        return self.space.dim

    def iter_gradients(self, data: TracInData, checkpoint: int) -> Iterator[Tensor]:
        """Per-example gradients at checkpoint ``checkpoint`` (not scaled by ``eta``).

        Yields, for each chunk of at most ``chunk_size`` examples of ``data`` in
        order, a tensor ``(B, p)``: the gradients with respect to
        ``param_names``, each flattened row-major and concatenated in that order
        (the layout of :attr:`space`).
        """
        if not 0 <= checkpoint < self.num_checkpoints:
            raise IndexError(f"checkpoint index {checkpoint} out of range [0, {self.num_checkpoints})")
        for (g,) in self._iter_features(as_data_source(data, self.chunk_size), checkpoint):
            yield g

    def _features(self, state: dict[str, Tensor], chunk: Batch) -> tuple[Tensor, ...]:
        names = self.param_names
        diff = {n: state[n] for n in names}
        fixed = {k: v for k, v in state.items() if k not in diff}
        model, loss_fn = self.model, self.loss_fn

        def example_loss(p: dict[str, Tensor], example: Batch) -> Tensor:
            one = map_batch(lambda t: t.unsqueeze(0), example)

            def model_call(*args: object, **kwargs: object) -> Tensor:
                return functional_call(model, (p, fixed), args, kwargs)

            return _check_losses(loss_fn(model_call, one), 1).sum()

        b = batch_size(chunk)
        grads = vmap(grad(example_loss), in_dims=(None, 0))(diff, chunk)
        return (torch.cat([grads[n].detach().reshape(b, -1) for n in names], dim=1),)

    @staticmethod
    def _pair_scores(test: tuple[Tensor, ...], train: tuple[Tensor, ...]) -> Tensor:
        return test[0] @ train[0].T

    @staticmethod
    def _self_scores(features: tuple[Tensor, ...]) -> Tensor:
        return (features[0] * features[0]).sum(dim=1)


class LastLayerTracIn(_CheckpointTracIn):
    """TracInCP restricted to one ``nn.Linear`` layer, via the gradient factorisation.

    For a linear layer ``z = W a + b`` the per-example gradient is
    ``grad_[W|b] l = g [a; 1]^T`` with ``g = dl/dz`` (shape ``(out,)``) and the
    layer input ``a`` (shape ``(in,)``). Hence per checkpoint
    ``<grad l(z), grad l(z')> = (g . g') ([a;1] . [a';1])`` and::

        score(z, z') = sum_c eta_c (g_c . g'_c) (a_c . a'_c)

    -- a sum over checkpoints of products, *not*
    ``(sum_c g_c . g'_c)(sum_c a_c . a'_c)``. This equals :class:`TracInCP` with
    ``params=[f"{layer}.weight", f"{layer}.bias"]`` at a fraction of the cost
    (one batched forward/backward to the layer output per chunk). Sign
    convention and units as in :class:`TracInCP`.

    ``a`` and ``z`` are captured with a forward hook on the layer, so the layer
    must be called exactly once per forward pass on a 2-D input ``(B, in)``, and
    losses must be per-example independent (``eval()`` mode).

    Args:
        layer: module name of the ``nn.Linear`` (as in ``model.named_modules()``),
            e.g. ``"fc2"`` or ``"head.out"``.
        Other arguments as in :class:`TracInCP`.
    """

    def __init__(self, model: nn.Module, checkpoints: Sequence[Checkpoint], learning_rates: Sequence[float],
                 loss_fn: TracInLossFn, layer: str, chunk_size: int = 256) -> None:
        super().__init__(model, checkpoints, learning_rates, loss_fn, chunk_size)
        modules = dict(model.named_modules())
        linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if layer not in modules:
            raise ValueError(f"no module named '{layer}'; nn.Linear modules of the model: {linear_names}")
        module = modules[layer]
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"module '{layer}' is a {type(module).__name__}, not nn.Linear; nn.Linear modules: {linear_names}"
            )
        self.layer = layer
        self._module = module
        self.has_bias: bool = module.bias is not None
        self.param_names: tuple[str, ...] = (f"{layer}.weight",) + ((f"{layer}.bias",) if self.has_bias else ())

    @property
    def out_features(self) -> int:
        """Width of ``g`` (the layer's output size)."""
        return self._module.out_features

    @property
    def in_features(self) -> int:
        """Width of ``a`` including the appended 1 when the layer has a bias."""
        return self._module.in_features + int(self.has_bias)

    @property
    def feature_dim(self) -> int:
        """Per-checkpoint gradient length ``out_features * in_features`` (weight and bias)."""
        return self.out_features * self.in_features

    def iter_factors(self, data: TracInData, checkpoint: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Gradient factors at checkpoint ``checkpoint`` (not scaled by ``eta``).

        Yields, per chunk of at most ``chunk_size`` examples in order, ``(g, a)``
        with ``g = dl/dz`` of shape ``(B, out_features)`` and the layer input
        ``a`` of shape ``(B, in_features)`` (a trailing column of ones if the
        layer has a bias). The per-example gradient of ``[W | b]`` is
        ``g[i][:, None] * a[i][None, :]``.
        """
        if not 0 <= checkpoint < self.num_checkpoints:
            raise IndexError(f"checkpoint index {checkpoint} out of range [0, {self.num_checkpoints})")
        for g, a in self._iter_features(as_data_source(data, self.chunk_size), checkpoint):
            yield g, a

    def _features(self, state: dict[str, Tensor], chunk: Batch) -> tuple[Tensor, ...]:
        captured: dict[str, Tensor] = {}

        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if "z" in captured:
                raise RuntimeError(f"layer '{self.layer}' was called more than once in one forward pass")
            a = args[0]
            if a.dim() != 2:
                raise ValueError(
                    f"layer '{self.layer}' received an input of shape {tuple(a.shape)}; the last-layer "
                    "factorisation needs a 2-D input (B, in_features)"
                )
            z = output.detach().requires_grad_(True)
            captured["a"], captured["z"] = a.detach(), z
            return z

        model = self.model

        def model_call(*args: object, **kwargs: object) -> Tensor:
            return functional_call(model, state, args, kwargs)

        b = batch_size(chunk)
        handle = self._module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                losses = _check_losses(self.loss_fn(model_call, chunk), b)
                if "z" not in captured:
                    raise RuntimeError(f"layer '{self.layer}' was not called by loss_fn's forward pass")
                (g,) = torch.autograd.grad(losses.sum(), captured["z"])
        finally:
            handle.remove()
        a = captured["a"]
        if self.has_bias:
            a = torch.cat([a, a.new_ones(b, 1)], dim=1)
        return g.detach(), a

    @staticmethod
    def _pair_scores(test: tuple[Tensor, ...], train: tuple[Tensor, ...]) -> Tensor:
        return (test[0] @ train[0].T) * (test[1] @ train[1].T)

    @staticmethod
    def _self_scores(features: tuple[Tensor, ...]) -> Tensor:
        g, a = features
        return (g * g).sum(dim=1) * (a * a).sum(dim=1)
