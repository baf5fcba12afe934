"""A reduced task for the score-matrix tests: softmax regression on 37 synthetic points, generic TorchObjective path."""

from pathlib import Path

import torch
from torch import nn

from influencekit.objectives.softmax_regression import fit_softmax_regression
from influencekit.tasks import Task

WEIGHT_DECAY = 0.05


def tiny_softmax_task(data_dir: Path, cache_dir: Path) -> Task:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(48, generator=gen, dtype=torch.float64) > 0).long() + (x[:, 1] > 1).long()
    weights = fit_softmax_regression(x[:37], y[:37], WEIGHT_DECAY, num_classes=3).weights
    model = nn.Linear(5, 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(weights)
    return Task(model, "cross_entropy", (x[:37], y[:37]), (x[37:], y[37:]), WEIGHT_DECAY)
