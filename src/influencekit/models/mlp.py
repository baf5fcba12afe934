"""Fully connected tanh networks, from multinomial logistic regression (no hidden layer) upwards."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def tanh_mlp(inputs: int, hidden: Sequence[int] = (), num_classes: int = 10) -> nn.Sequential:
    """Linear layers (with biases) of widths ``inputs -> hidden... -> num_classes``, tanh between them.

    ``hidden=()`` is multinomial logistic regression (``inputs * num_classes + num_classes``
    parameters). tanh rather than ReLU: the loss is then twice differentiable everywhere, so
    Newton steps, the Hessian and its eigenvalues are defined at every parameter vector.
    """
    widths = [inputs, *hidden, num_classes]
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if k < len(widths) - 2 else [])
    return nn.Sequential(*layers)
