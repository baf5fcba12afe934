"""``experiment fragility``, reduced: its numbers against retraining and against an explicit Hessian built independently."""

import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, hessian

from influencekit.cli import build_parser
from influencekit.datasets import koh_liang_split, load_or_download_mnist
from influencekit.persistence import load_tensors
from influencekit.experiments.fragility import (
    FragilityConfig,
    _config_from_args,
    build_model,
    model_inputs,
    sweep,
)


def _tiny(out: Path, data_dir: Path, **settings) -> FragilityConfig:
    tiny = dict(train_size=60, test_index=0, num_points=10, pool=7, hidden=4, adam_epochs=5, max_newton_steps=4,
                lbfgs_max_iter=200, workers=0, progress=False)
    return FragilityConfig(out=out, data_dir=data_dir, download=False, **{**tiny, **settings})


@pytest.fixture(scope="module")
def logistic_run(tmp_path_factory, synthetic_mnist_dir):
    config = _tiny(tmp_path_factory.mktemp("fragility-logistic"), synthetic_mnist_dir, models=["logistic"], weight_decays=[1e-2])
    return config, sweep(config)


@pytest.fixture(scope="module")
def indefinite_run(tmp_path_factory, synthetic_mnist_dir):
    """A one-hidden-layer MLP without weight decay, stopped early: not at an optimum, H indefinite."""
    config = _tiny(tmp_path_factory.mktemp("fragility-mlp"), synthetic_mnist_dir, models=["mlp1"], weight_decays=[0.0],
                   adam_epochs=1, lbfgs_max_iter=3, max_newton_steps=0)
    return config, sweep(config)


def _explicit_hessian(config: FragilityConfig, name: str, weight_decay: float) -> torch.Tensor:
    """H of R at the cell's saved theta_hat by torch.func.hessian of the whole objective (no influencekit HVP code)."""
    split = koh_liang_split(load_or_download_mnist(config.data_dir, download=False))
    x, y = model_inputs(name, split.x_train[: config.train_size], config), split.y_train[: config.train_size]
    tensors, saved = load_tensors(config.out / "cells" / f"{name}_wd{weight_decay:g}")
    model = build_model(name, x.shape[1], config).double()
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    assert saved["parameters"] == [n for n, _ in shapes]

    def objective(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for n, shape in shapes:
            params[n] = theta[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        return loss + 0.5 * weight_decay * (theta * theta).sum()

    return hessian(objective)(tensors["theta"])


def test_logistic_regression_influence_matches_retraining(logistic_run):
    config, results = logistic_run
    (cell,) = results["cells"]
    assert "error" not in cell
    assert cell["at_optimum"] and cell["grad_norm"] <= config.tol
    assert cell["damping_needed"] == 0.0 and cell["damping_used"] == 0.0
    assert cell["refits_not_converged"] == 0 and cell["refit_max_grad_norm"] <= config.tol
    assert cell["num_points"] == 10 and cell["n_train"] == 60 and cell["p"] == 16 * 10 + 10
    assert cell["pearson"] >= 0.95 and cell["spearman"] >= 0.9
    saved = json.loads((config.out / "results.json").read_text())
    assert saved["cells"][0]["pearson"] == cell["pearson"]
    assert saved["sizes"]["n_train"] == 60 and saved["sizes"]["parameters"] == {"logistic": 170}
    assert (config.out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Fragility of influence" in (config.out / "report.html").read_text()


def test_a_rerun_reuses_saved_cells_and_reports_those_past_the_time_budget(logistic_run):
    config, results = logistic_run
    again = _tiny(config.out, config.data_dir, models=["logistic", "mlp1"], weight_decays=[1e-2], time_budget=0.0)
    rerun = sweep(again)
    saved, skipped = rerun["cells"]
    assert saved == json.loads(json.dumps(results["cells"][0]))  # from OUT/cells, not refitted
    assert skipped["model"] == "mlp1" and skipped["error"].startswith("not run") and "pearson" not in skipped


def test_positive_definite_cell_agrees_with_an_explicit_eigendecomposition(logistic_run):
    config, results = logistic_run
    (cell,) = results["cells"]
    eigenvalues = torch.linalg.eigvalsh(_explicit_hessian(config, "logistic", 1e-2))
    assert eigenvalues[0] >= 1e-2 * (1 - 1e-9) and cell["negative_eigenvalues"] == 0
    assert cell["min_eigenvalue"] == pytest.approx(float(eigenvalues[0]), rel=1e-6)
    assert cell["max_eigenvalue"] == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
    assert cell["min_eigenvalue_lanczos"] == pytest.approx(float(eigenvalues[0]), rel=1e-6)


def test_indefinite_cell_names_the_damping_of_an_explicit_eigendecomposition(indefinite_run):
    config, results = indefinite_run
    (cell,) = results["cells"]
    eigenvalues = torch.linalg.eigvalsh(_explicit_hessian(config, "mlp1", 0.0))
    scale = float(eigenvalues.abs().max())
    assert eigenvalues[0] < 0 and not cell["at_optimum"]
    assert cell["negative_eigenvalues"] == int((eigenvalues < -cell["p"] * 2.2e-16 * scale).sum()) > 0
    assert cell["damping_needed"] == pytest.approx(-float(eigenvalues[0]), rel=1e-6, abs=1e-12 * scale)
    assert cell["min_eigenvalue_lanczos"] == pytest.approx(float(eigenvalues[0]), rel=1e-6, abs=1e-10 * scale)
    assert cell["damping_used"] == pytest.approx(cell["damping_needed"] + config.damping_margin)
    assert cell["cg_relative_residual"] <= 1e-8  # damped CG solved H + damping_used I
    # not retrained (no minimum nearby), and saying so
    assert cell["pearson"] is None and "not at a verified local optimum" in cell["retrain_skipped"]
    # InfluenceFunction's solve check refuses the undamped solve and names a damping 10% above -lambda_min
    assert cell["undamped_cg"]["outcome"] == "IndefiniteCurvatureError"
    assert cell["undamped_cg"]["suggested_damping"] == pytest.approx(1.1 * cell["damping_needed"], rel=1e-3)


def test_cli_options_reach_the_configuration(tmp_path):
    args = build_parser(("experiment", "fragility")).parse_args(
        ["experiment", "fragility", "--out", str(tmp_path), "--models", "logistic,cnn", "--weight-decays", "0,1e-3",
         "--scheduler", "tcp://127.0.0.1:8786", "--train-size", "400", "--no-progress"])
    config = _config_from_args(args)
    assert config.models == ["logistic", "cnn"] and config.weight_decays == [0.0, 1e-3]
    assert config.scheduler == "tcp://127.0.0.1:8786" and config.train_size == 400 and config.progress is False
