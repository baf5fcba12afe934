"""Task definitions: everything a score matrix needs, built by one function.

A *task function* ``fn(data_dir: Path, cache_dir: Path) -> Task`` returns the
trained model, its per-example loss, the training and test data and the weight
decay of the training objective (like kronfluence's task definition). It runs in
every process that computes a part of a score matrix, so it must be
deterministic; anything expensive (training) belongs in ``cache_dir``, which the
``influencekit score`` command keeps next to its output and shares between runs
and workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from influencekit.data import Batch
from influencekit.losses import LossFn
from influencekit.objectives.base import Objective

W1_WEIGHT_DECAY = 0.01
W1_GRADIENT_TOLERANCE = 1e-10


@dataclass
class Task:
    """A trained model and its data.

    Attributes:
        model: the trained ``nn.Module`` (evaluation mode).
        loss: per-example training loss (name or callable, see ``influencekit.losses``).
        train_data: the n training examples as one batch (leading dimension n).
        test_data: the test examples as one batch; score rows follow their order.
        weight_decay: lambda of the (lambda/2)||theta||^2 term of the training objective.
        objective_factory: optional fast path ``(task, dtype) -> Objective`` equal to
            the generic :class:`~influencekit.torch_objective.TorchObjective` (e.g. the
            closed form of softmax regression).
    """

    model: nn.Module
    loss: str | LossFn
    train_data: Batch
    test_data: Batch
    weight_decay: float = 0.0
    objective_factory: Callable[["Task", torch.dtype], Objective] | None = None

    def objective(self, dtype: torch.dtype = torch.float64) -> Objective:
        """The training objective at the trained parameters, computed in ``dtype``."""
        if self.objective_factory is not None:
            return self.objective_factory(self, dtype)
        from copy import deepcopy

        from influencekit.objectives.torch_objective import TorchObjective

        return TorchObjective(deepcopy(self.model).to(dtype).eval(), self.loss, self.train_data, weight_decay=self.weight_decay)


def _softmax_objective(task: Task, dtype: torch.dtype) -> Objective:
    from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective

    x, y = task.train_data
    return SoftmaxRegressionObjective(task.model.weight.detach().to(dtype), x.to(dtype), y, task.weight_decay)


def mnist_logistic_regression(data_dir: Path | None, cache_dir: Path) -> Task:
    """W1: Koh & Liang's MNIST logistic regression, at its verified optimum.

    Training set: MNIST training images 5,000..59,999 (n = 55,000), pixels / 255;
    test set: all 10,000 MNIST test images. Model ``nn.Linear(784, 10,
    bias=False)`` in float64, objective mean cross-entropy + (0.01/2)||W||^2,
    fitted by Newton-CG to ||grad R|| <= 1e-10 (cached in ``cache_dir``; the
    gradient norm is re-checked on every load). Scores use the closed-form
    softmax-regression objective (tested equal to the generic one).
    """
    from influencekit.datasets import koh_liang_split, load_or_download_mnist
    from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression

    split = koh_liang_split(load_or_download_mnist(data_dir))  # None: $INFLUENCEKIT_DATA or the user cache
    x, y = split.x_train.double(), split.y_train
    path = Path(cache_dir) / "mnist_logistic_regression_weights.pt"
    if path.exists():
        weights = torch.load(path)
    else:
        weights = fit_softmax_regression(x, y, W1_WEIGHT_DECAY, num_classes=10, tol=W1_GRADIENT_TOLERANCE).weights
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save(weights, partial)
        os.replace(partial, path)
    norm = float(SoftmaxRegressionObjective(weights, x, y, W1_WEIGHT_DECAY).objective_gradient().norm())
    if norm > 100 * W1_GRADIENT_TOLERANCE:
        raise ValueError(f"cached W1 weights {path} are not at the optimum (||grad R|| = {norm:.3g} > {100 * W1_GRADIENT_TOLERANCE:g}); delete the file to refit")
    model = nn.Linear(784, 10, bias=False).double().eval()
    with torch.no_grad():
        model.weight.copy_(weights)
    test = (split.x_test.double(), split.y_test)
    return Task(model, "cross_entropy", (x, y), test, W1_WEIGHT_DECAY, objective_factory=_softmax_objective)


def load_task(spec: str) -> Callable[[Path, Path], Task]:
    """The task function named ``"package.module:function"``."""
    import importlib

    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"--task must look like MODULE:FUNCTION (e.g. influencekit.tasks:mnist_logistic_regression), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import task module {module_name!r} ({error}); is it on PYTHONPATH?") from error
    if not callable(getattr(module, function_name, None)):
        raise ValueError(f"module {module_name!r} has no function {function_name!r}")
    return getattr(module, function_name)
