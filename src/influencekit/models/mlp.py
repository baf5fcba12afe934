"""Fully connected networks: tanh MLPs (from multinomial logistic regression upwards) and dattri's MNIST MLP."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

# dattri normalises MNIST pixels in [0, 1] with these (torchvision's Normalize((0.1307,), (0.3081,)))
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


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


def dattri_mnist_mlp(dropout: float = 0.1, hidden: tuple[int, int] = (128, 64), inputs: int = 784, num_classes: int = 10) -> nn.Sequential:
    """784-128-64-10 with ReLU and dropout after each hidden layer, all with biases: 109,386 parameters
    (dattri's ``MLPMnist``; trained there by SGD, lr 0.01, momentum 0.9, batch 64, 50 epochs)."""
    return nn.Sequential(
        nn.Linear(inputs, hidden[0]), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden[1], num_classes),
    )
