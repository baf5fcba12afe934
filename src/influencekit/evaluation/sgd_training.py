"""Train many copies of a PyTorch model at once by mini-batch SGD: the field's retraining protocol.

TRAK and dattri retrain each subset *from scratch with a fresh seed*: a new random
initialisation, a new data order and new dropout masks, then a fixed schedule of
mini-batch SGD with momentum. :class:`SGDSubsetTrainer` is that protocol as a
:class:`~influencekit.evaluation.retrain.SubsetTrainer`, so
:func:`~influencekit.evaluation.retrain.subset_outputs` runs it on Dask, cached and
resumable.

The k models of one call are trained in lockstep: their parameters are stacked
along a leading axis and every step is one ``torch.func.vmap`` of the gradient
over the k models (each on its own mini-batch), so the layers' products are
batched GEMMs instead of k small ones. Each step is, per model (PyTorch's SGD):

    g = grad of the mean loss on the mini-batch (+ weight_decay theta),
    b = momentum b + g (b = g at the first step),   theta = theta - lr b.

Seeds: subset j's seed is derived from ``seed`` and the bytes of its mask, so a
subset gets the same model whatever else is in its batch, and different subsets
get different seeds. The seed fixes the initialisation (``model_fn`` called under
``torch.manual_seed``) and the data order. Dropout masks come from torch's
global generator under ``vmap(randomness="different")``, seeded from the seeds of
the whole call: a model with dropout therefore also depends on which subsets share
its call (the cache fixes those batches; ``dropout`` in :attr:`SGDSettings` is
only for the record).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


@dataclass(frozen=True)
class SGDSettings:
    """One training run: ``epochs`` passes of mini-batches of ``batch_size`` (the last one smaller), SGD with momentum."""

    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    weight_decay: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def mask_seed(seed: int, mask: np.ndarray) -> int:
    """A 63-bit seed from ``seed`` and the subset ``mask`` (n,) bool: the same subset, the same seed."""
    digest = hashlib.sha256(np.int64(seed).tobytes() + np.packbits(np.asarray(mask, dtype=bool)).tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stack_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {name: torch.stack([s[name] for s in states]) for name in states[0]}


def unstack_state(stacked: dict[str, Tensor], j: int) -> dict[str, Tensor]:
    return {name: value[j] for name, value in stacked.items()}


def train_models(
    model_fn: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    subsets: list[np.ndarray],
    seeds: list[int],
    settings: SGDSettings,
    *,
    initial: dict[str, Tensor] | None = None,
    checkpoint_epochs: tuple[int, ...] = (),
) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Train one model per training-index set in ``subsets`` (all of one size), k at once.

    Args:
        model_fn: builds the (untrained) model; called once per model under ``torch.manual_seed(seed)``.
        x, y: the whole training set; model j sees the rows ``subsets[j]``.
        subsets: k index arrays of equal length.
        seeds: one per model (initialisation, data order).
        settings: the SGD schedule.
        initial: start every model here (warm start) instead of at its random initialisation.
        checkpoint_epochs: also return copies of the stacked parameters after these epochs (1-based).
    Returns:
        the trained parameters, stacked: {name: (k, *shape)}; with ``checkpoint_epochs``
        also the list of checkpoints (for TracInCP).
    """
    sizes = {len(s) for s in subsets}
    if len(sizes) != 1:
        raise ValueError(f"train_models trains subsets of one size together, got sizes {sorted(sizes)}")
    k = len(subsets)
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(model_fn())
    model = models[0].to(x.dtype).train()
    if initial is not None:
        params = {name: value.detach().to(x.dtype).expand(k, *value.shape).clone() for name, value in initial.items()}
    else:
        params = stack_states([{n: p.detach().to(x.dtype) for n, p in m.named_parameters()} for m in models])
    buffers = {n: b for n, b in model.named_buffers()}
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    index = torch.as_tensor(np.stack(subsets), dtype=torch.long)  # (k, size)
    torch.manual_seed(int(np.random.SeedSequence(seeds).generate_state(1)[0]))  # dropout masks

    def loss(theta: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        outputs = functional_call(model, {**theta, **buffers}, (xb,))
        value = nn.functional.cross_entropy(outputs, yb)
        if settings.weight_decay:
            value = value + 0.5 * settings.weight_decay * sum((t * t).sum() for t in theta.values())
        return value

    step = vmap(grad(loss), randomness="different")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small GEMMs: extra threads only add synchronisation (50x slower on a loaded machine)
    try:
        return _sgd_loop(step, params, index, generators, x, y, settings, checkpoint_epochs)
    finally:
        torch.set_num_threads(threads)


def _sgd_loop(step, params, index, generators, x, y, settings: SGDSettings, checkpoint_epochs):
    size = index.shape[1]
    momentum = {name: torch.zeros_like(value) for name, value in params.items()}
    first = True
    checkpoints: list[dict[str, Tensor]] = []
    with torch.no_grad():
        for epoch in range(1, settings.epochs + 1):
            order = torch.stack([index[j, torch.randperm(size, generator=g)] for j, g in enumerate(generators)])
            for start in range(0, size, settings.batch_size):
                rows = order[:, start : start + settings.batch_size]
                with torch.enable_grad():
                    grads = step(params, x[rows], y[rows])
                for name, value in params.items():
                    buffer = momentum[name]
                    if first:
                        buffer.copy_(grads[name])
                    else:
                        buffer.mul_(settings.momentum).add_(grads[name])
                    value.sub_(settings.lr * buffer)
                first = False
            if epoch in checkpoint_epochs:
                checkpoints.append({name: value.clone() for name, value in params.items()})
    return (params, checkpoints) if checkpoint_epochs else params


def stacked_outputs(model: nn.Module, params: dict[str, Tensor], x: Tensor, chunk: int = 2048) -> Tensor:
    """Outputs of each stacked model on ``x`` in eval mode: (k, m, ...)."""
    model = model.to(x.dtype).eval()
    buffers = dict(model.named_buffers())
    call = vmap(lambda theta, xb: functional_call(model, {**theta, **buffers}, (xb,)), in_dims=(0, None))
    with torch.no_grad():
        return torch.cat([call(params, x[s : s + chunk]) for s in range(0, len(x), chunk)], dim=1)


def stacked_losses(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of each stacked model at each test point (eval mode): (k, m)."""
    logits = stacked_outputs(model, params, x)
    return -torch.log_softmax(logits, dim=-1).gather(-1, y.expand(len(logits), -1).unsqueeze(-1)).squeeze(-1)


class SGDSubsetTrainer:
    """:class:`~influencekit.evaluation.retrain.SubsetTrainer`: test losses (k, m) of models trained by SGD on each mask.

    Each subset is trained from scratch with its own seed (:func:`mask_seed`), or, with
    ``initial``, warm-started from those parameters (same seed for the data order).
    Masks of different sizes are trained in groups of one size. Picklable (``model_fn``
    must be a module-level callable) so it runs on Dask workers.
    """

    def __init__(self, model_fn: Callable[[], nn.Module], x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor,
                 settings: SGDSettings, *, seed: int = 0, initial: dict[str, Tensor] | None = None):
        self.model_fn, self.x, self.y, self.x_test, self.y_test = model_fn, x, y, x_test, y_test
        self.settings, self.seed, self.initial = settings, seed, initial

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        outputs = np.empty((len(masks), len(self.y_test)))
        sizes = masks.sum(axis=1)
        for size in np.unique(sizes):
            rows = np.flatnonzero(sizes == size)
            params = train_models(self.model_fn, self.x, self.y, [np.flatnonzero(masks[j]) for j in rows],
                                  [mask_seed(self.seed, masks[j]) for j in rows], self.settings, initial=self.initial)
            outputs[rows] = stacked_losses(self.model_fn(), params, self.x_test, self.y_test).double().numpy()
        return outputs
