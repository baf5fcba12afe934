"""dattri's MNIST multilayer perceptron (its ``MLPMnist``, the "MNIST-10 MLP" of its benchmark)."""

from __future__ import annotations

from torch import nn

# dattri normalises MNIST pixels in [0, 1] with these (torchvision's Normalize((0.1307,), (0.3081,)))
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def dattri_mnist_mlp(dropout: float = 0.1, hidden: tuple[int, int] = (128, 64), inputs: int = 784, num_classes: int = 10) -> nn.Sequential:
    """784-128-64-10 with ReLU and dropout after each hidden layer, all with biases: 109,386 parameters
    (dattri's ``MLPMnist``; trained there by SGD, lr 0.01, momentum 0.9, batch 64, 50 epochs)."""
    return nn.Sequential(
        nn.Linear(inputs, hidden[0]), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden[1], num_classes),
    )
