"""``influencekit evaluate --workload mnist-mlp | mnist-cnn`` on reduced workloads (synthetic MNIST, few points and epochs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from influencekit.cli import main
from influencekit.datasets import koh_liang_split, load_mnist
from influencekit.evaluation import linear_datamodeling_score
from influencekit.models.mlp import MNIST_MEAN, MNIST_STD
from influencekit.models.small_cnn import koh_liang_cnn
from influencekit.persistence import load_tensors


def test_evaluate_command_reduced_mnist_mlp(tmp_path, synthetic_mnist_dir):
    out = tmp_path / "eval"
    argv = ["evaluate", "--workload", "mnist-mlp", "--data-dir", str(synthetic_mnist_dir), "--out", str(out), "--workers", "0",
            "--train-size", "160", "--test-size", "16", "--num-subsets", "12", "--val-subsets", "4", "--val-test-size", "8",
            "--epochs", "20", "--warm-epochs", "2", "--ensemble-size", "2", "--n-bootstrap", "50",
            "--methods", "kfac", "tracin", "ensemble-kfac", "trak", "ensemble-trak"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["workload"] == "mnist-mlp" and results["complete"]
    assert results["test_accuracy"] > 0.5  # the network learnt the synthetic digits
    assert results["retrain"]["sgd"] == {"epochs": 20, "lr": 0.01, "momentum": 0.9, "batch_size": 64, "weight_decay": 0.0}
    methods = results["methods"]
    assert set(methods) == {"kfac", "tracin", "ensemble-kfac", "trak", "ensemble-trak"}
    for r in methods.values():
        for key in ("lds", "lds_ci", "lds_warm", "loo_pearson", "mislabel_auc", "seconds", "peak_mb", "settings"):
            assert key in r
        assert r["lds_ci"][0] <= r["lds"] <= r["lds_ci"][1]
    # self-influence ranks the flipped labels for TracIn; K-FAC's n solves at p = 109,386 are skipped, and say why
    assert methods["tracin"]["mislabel_auc"] > 0.5
    assert methods["kfac"]["mislabel_auc"] is None and "n solves" in methods["kfac"]["mislabel_skipped"]
    assert methods["ensemble-kfac"]["mislabel_auc"] is None
    # TRAK's self-influence is the diagonal of its (cheap) ridge solve; k = 2048 > n = 160 leaves Phi^T Phi singular
    assert methods["trak"]["mislabel_auc"] is not None
    trak_tuning = methods["trak"]["tuning"]
    assert all("relative_damping >=" in t["error"] for t in trak_tuning if t["setting"]["relative_damping"] == 0.0)
    assert methods["trak"]["settings"]["relative_damping"] > 0
    # ensemble-trak keeps trak's k and chooses its ridge again, for the ensemble, on the held-out data
    ensemble_tuning = methods["ensemble-trak"]["tuning"]
    assert {t["setting"]["relative_damping"] for t in ensemble_tuning} == {0.0, 0.1, 0.3, 1.0, 3.0}
    best = max((t for t in ensemble_tuning if t["val_lds"] is not None), key=lambda t: t["val_lds"])["setting"]
    assert methods["ensemble-trak"]["settings"] == {**best, "members": 2, "method": "trak"}
    assert best["projection_dim"] == methods["trak"]["settings"]["projection_dim"]

    # the damping was chosen on the held-out subsets and validation images: the best recorded validation LDS
    tuning = methods["kfac"]["tuning"]
    assert [t["setting"]["damping"] for t in tuning] == [3e-3, 1e-2, 3e-2, 1e-1]
    valid = [t for t in tuning if t["val_lds"] is not None]  # K-FAC refuses a damping that leaves it singular
    assert valid and all("singular" in t["error"] for t in tuning if t["val_lds"] is None)
    assert methods["kfac"]["settings"] == max(valid, key=lambda t: t["val_lds"])["setting"]
    assert methods["ensemble-kfac"]["settings"]["damping"] == methods["kfac"]["settings"]["damping"]
    arrays = np.load(out / "subsets.npz")
    masks, val_masks, actual = arrays["masks"], arrays["val_masks"], arrays["actual"]
    assert masks.shape == (12, 160) and val_masks.shape == (4, 160) and arrays["actual_val"].shape == (8, 4)
    assert not any((val == masks).all(axis=1).any() for val in val_masks)  # no held-out subset is an evaluation subset

    # the scores beat random scores on the same retrained subsets (recomputed from the saved arrays)
    rng = np.random.default_rng(0)
    random = [linear_datamodeling_score(rng.standard_normal((16, 160)), masks, actual, n_bootstrap=0).lds for _ in range(30)]
    best = max(methods.values(), key=lambda r: r["lds"])
    assert best["lds"] > max(random) + 0.05
    scores = np.load(out / "scores" / "kfac.npy")
    assert scores.shape == (16, 160)
    np.testing.assert_allclose(linear_datamodeling_score(scores, masks, actual, n_bootstrap=0).lds, methods["kfac"]["lds"])
    assert "| kfac |" in (out / "results.md").read_text()


def test_unset_ensemble_and_batch_sizes_take_the_workloads_defaults(tmp_path):
    from influencekit.experiments.evaluate import EvaluateConfig, with_workload_defaults
    from influencekit.experiments.evaluate_network import WORKLOADS

    mlp = WORKLOADS["mnist-mlp"]
    filled = with_workload_defaults(EvaluateConfig(out=tmp_path, workload="mnist-mlp"), ensemble_size=mlp.ensemble_size,
                                    retrain_batch_size=mlp.retrain_batch_size)
    assert (filled.ensemble_size, filled.retrain_batch_size) == (20, 30)
    given = with_workload_defaults(EvaluateConfig(out=tmp_path, ensemble_size=2, retrain_batch_size=5), ensemble_size=20,
                                   retrain_batch_size=30)
    assert (given.ensemble_size, given.retrain_batch_size) == (2, 5)


def _datainf_scores(model: torch.nn.Module, train: tuple, tests: tuple, damping: float | None) -> np.ndarray:
    """DataInf's I_up,loss written out (Kwon et al. 2023), one block per parameter tensor, from per-example
    gradients taken here with torch.func: for each block, R b = (1/lambda)(b - (1/n) sum_j g_j (g_j . b) / (lambda
    + ||g_j||^2)) and score[t, i] = -sum_blocks g_t^T R g_i; lambda = 0.1 x mean squared gradient entry when None."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(theta, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, theta, (x[None],)), y[None])

    def gradients(x, y):
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    g_train, g_test = gradients(*train), gradients(*tests)
    n = len(train[1])
    scores = torch.zeros(len(tests[1]), n, dtype=torch.float64)
    for name in params:
        b = g_train[name].reshape(n, -1).double()
        a = g_test[name].reshape(len(tests[1]), -1).double()
        lam = 0.1 * float((b**2).mean()) if damping is None else damping
        ab = a @ b.T
        scores -= (ab - (ab / (lam + (b**2).sum(1))) @ (b @ b.T) / n) / lam
    return scores.numpy()


def test_evaluate_command_reduced_mnist_cnn(tmp_path, synthetic_mnist_dir):
    """Every kind of method on the convolutional network, and DataInf's numbers against an independent computation.

    40 SGD steps leave this CNN barely trained (it needs a few hundred to leave its initial plateau; the
    real run's accuracy is in benchmarks/RESULTS.md): the test checks the plumbing and the numbers, not
    the quality of the attributions.
    """
    out = tmp_path / "eval"
    argv = ["evaluate", "--workload", "mnist-cnn", "--data-dir", str(synthetic_mnist_dir), "--out", str(out), "--workers", "0",
            "--train-size", "120", "--test-size", "12", "--num-subsets", "10", "--val-subsets", "4", "--val-test-size", "6",
            "--epochs", "20", "--warm-epochs", "2", "--ensemble-size", "2", "--n-bootstrap", "50",
            "--methods", "kfac", "datainf", "arnoldi", "nystrom", "tracin", "trak", "ensemble-kfac"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["workload"] == "mnist-cnn" and results["complete"] and results["parameters"] == 2616
    assert results["retrain"]["sgd"] == {"epochs": 20, "lr": 0.02, "momentum": 0.9, "batch_size": 64, "weight_decay": 0.0}
    assert {"exact", "cg, block-cg, lissa", "loo_pearson"} <= set(results["not_run"])
    methods = results["methods"]
    assert set(methods) == {"kfac", "datainf", "arnoldi", "nystrom", "tracin", "trak", "ensemble-kfac"}
    for name, r in methods.items():
        assert np.isfinite(r["lds"]) and r["lds_ci"][0] <= r["lds"] <= r["lds_ci"][1], name
        assert np.isfinite(r["lds_warm"]), name
        # p = 2,616: every single-model method's self-influence is affordable, so mislabel detection runs
        if name.startswith("ensemble-"):
            assert r["mislabel_auc"] is None and "ensemble" in r["mislabel_skipped"]
        else:
            assert 0.0 <= r["mislabel_auc"] <= 1.0, name

    # DataInf's scores of the saved theta_hat, written out independently from per-example gradients
    tensors, saved = load_tensors(out / "model")
    assert saved["workload"] == "mnist-cnn" and saved["dim"] == 2616
    model = koh_liang_cnn()
    model.load_state_dict(tensors)
    model.eval()
    split = koh_liang_split(load_mnist(synthetic_mnist_dir))
    norm = lambda images: ((images - MNIST_MEAN) / MNIST_STD).float()  # noqa: E731
    train, tests = (norm(split.x_train[:120]), split.y_train[:120]), (norm(split.x_test[:12]), split.y_test[:12])
    with torch.no_grad():
        accuracy = float((model(tests[0]).argmax(1) == tests[1]).float().mean())
    assert accuracy == pytest.approx(results["test_accuracy"])  # the saved model is the one evaluated
    expected = _datainf_scores(model, train, tests, methods["datainf"]["settings"]["damping"])
    scores = np.load(out / "scores" / "datainf.npy")
    assert scores.shape == (12, 120)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())

    # the reported LDS is the LDS of the saved scores on the saved retrained subsets
    arrays = np.load(out / "subsets.npz")
    for name in ("datainf", "ensemble-kfac"):
        saved_scores = np.load(out / "scores" / f"{name}.npy")
        lds = linear_datamodeling_score(saved_scores, arrays["masks"], arrays["actual"], n_bootstrap=0).lds
        np.testing.assert_allclose(lds, methods[name]["lds"])
    assert "| arnoldi |" in (out / "results.md").read_text()
