"""Batched SGD training (the field's retraining protocol) against PyTorch's own SGD, one model at a time."""

from __future__ import annotations

import functools

import numpy as np
import torch

from influencekit.evaluation import subset_outputs
from influencekit.evaluation.sgd_training import SGDSettings, SGDSubsetTrainer, mask_seed, stacked_losses, train_models, unstack_state
from influencekit.models.mlp import dattri_mnist_mlp

TINY = functools.partial(dattri_mnist_mlp, dropout=0.0, hidden=(6, 5), inputs=12, num_classes=3)


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :3] + 0.5 * torch.randn(n, 3, generator=g)).argmax(1)


def _reference(x, y, subset, seed, settings):
    """torch.optim.SGD on one model, same initialisation and data order as the batched trainer."""
    torch.manual_seed(seed)
    model = TINY()
    optimiser = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    index = torch.as_tensor(subset)
    for _ in range(settings.epochs):
        order = index[torch.randperm(len(index), generator=generator)]
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimiser.step()
    return dict(model.named_parameters())


def test_batched_sgd_equals_pytorch_sgd_per_model():
    x, y = _data()
    settings = SGDSettings(epochs=3, lr=0.05, momentum=0.9, batch_size=8, weight_decay=0.01)
    rng = np.random.default_rng(0)
    subsets = [np.sort(rng.choice(len(y), 25, replace=False)) for _ in range(3)]
    seeds = [11, 12, 13]
    stacked = train_models(TINY, x, y, subsets, seeds, settings)
    for j in range(3):
        expected = _reference(x, y, subsets[j], seeds[j], settings)
        for name, value in unstack_state(stacked, j).items():
            torch.testing.assert_close(value, expected[name].detach(), rtol=1e-5, atol=1e-6)
    # the models differ (own seeds, own subsets)
    assert float((stacked["0.weight"][0] - stacked["0.weight"][1]).abs().max()) > 1e-2


def test_subset_trainer_seeds_follow_the_mask_and_warm_start_starts_at_theta():
    x, y = _data(seed=1)
    settings = SGDSettings(epochs=2, lr=0.05, momentum=0.9, batch_size=8)
    masks = np.random.default_rng(1).random((4, len(y))) < 0.5
    masks[3] = masks[0]  # the same subset twice: the same seed, the same model
    masks[1, :] = False
    masks[1, :30] = True  # another size: trained in its own group
    trainer = SGDSubsetTrainer(TINY, x, y, x[:7], y[:7], settings, seed=5)
    together = trainer(masks)
    assert together.shape == (4, 7)
    np.testing.assert_allclose(together[0], together[3], rtol=1e-6)
    np.testing.assert_allclose(trainer(masks[[2]])[0], together[2], rtol=1e-5)  # independent of the batch
    assert mask_seed(5, masks[0]) != mask_seed(5, masks[2]) and mask_seed(5, masks[0]) != mask_seed(6, masks[0])
    # through the retraining engine (cached) the outputs are the same
    np.testing.assert_allclose(subset_outputs(trainer, masks, batch_size=2).T, together, rtol=1e-5)
    # zero epochs from theta: the outputs are theta's losses
    torch.manual_seed(0)
    theta = {n: p.detach() for n, p in TINY().named_parameters()}
    warm = SGDSubsetTrainer(TINY, x, y, x[:7], y[:7], SGDSettings(epochs=0), initial=theta)(masks[:1])
    expected = stacked_losses(TINY(), {n: v.unsqueeze(0) for n, v in theta.items()}, x[:7], y[:7])
    np.testing.assert_allclose(warm, expected.numpy(), rtol=1e-6)
