"""Training a small model to a minimum of its regularised cross-entropy, for tests whose Hessian must be positive definite."""

import torch
import torch.nn.functional as F
from torch import nn


def train_to_minimum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> nn.Module:
    """L-BFGS (strong Wolfe) on mean cross-entropy + (weight_decay / 2) ||theta||^2 until the gradient is ~1e-12."""
    optimizer = torch.optim.LBFGS(
        model.parameters(), max_iter=400, tolerance_grad=1e-12, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        value = F.cross_entropy(model(x), y) + 0.5 * weight_decay * sum((p**2).sum() for p in model.parameters())
        value.backward()
        return value

    optimizer.step(closure)
    return model
