"""What a worker loads for one row: the workload's data, trained model, objectives, curvatures and references."""

from __future__ import annotations

import torch
from torch import nn

from influencekit.curvature import CurvatureOperator, EmpiricalFisherOperator, GaussNewtonOperator, HessianOperator
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective
from influencekit.objectives.torch_objective import TorchObjective

from .cache import load_cached, load_data, reference_path, w1_weights_path, w2_model_path


def make_mlp(cfg: dict) -> nn.Sequential:
    """W2's MLP 784-hidden(tanh)-10 in float64, initialised from ``cfg["seed"]``."""
    torch.manual_seed(cfg["seed"])
    return nn.Sequential(nn.Linear(784, cfg["hidden"]), nn.Tanh(), nn.Linear(cfg["hidden"], 10)).double()


class Context:
    """Data, trained model, objectives and references of one workload, loaded in a worker from the cache."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.name = cfg["name"]
        self.weight_decay = cfg["weight_decay"]
        self.damping = cfg["damping"]
        self.x, self.y, self.test = load_data(cfg)
        self.n = self.x.shape[0]
        self._torch_objective = None
        self.closed = None
        self.model = None
        if self.name == "w1":
            self._load_w1()
        else:
            self._load_w2()
        self.references = self._load_references()
        _ = self.torch_objective  # cheap (no copy of the data): part of every row's baseline

    def _load_w1(self) -> None:
        """W1's fitted weights and their closed-form objective."""
        loaded = load_cached(w1_weights_path(self.cfg))
        if loaded is None:
            raise RuntimeError("W1 weights are not cached: the prepare step did not run or failed")
        self.weights = loaded[0]["weights"]
        self.closed = SoftmaxRegressionObjective(self.weights, self.x, self.y, self.weight_decay)

    def _load_w2(self) -> None:
        """W2's trained MLP."""
        loaded = load_cached(w2_model_path(self.cfg))
        if loaded is None:
            raise RuntimeError("W2 model is not cached: the prepare step did not run or failed")
        self.model = make_mlp(self.cfg)
        self.model.load_state_dict(loaded[0])
        self.model.eval()

    def _load_references(self) -> dict[str, dict]:
        """Cached reference solves by curvature kind: {"x", "influence", and the solve's metadata}."""
        references: dict[str, dict] = {}
        for kind in ("hessian", "ggn"):
            ref = load_cached(reference_path(self.cfg, kind))
            if ref is not None:
                references[kind] = {"x": ref[0]["x"], "influence": ref[0]["influence"], **ref[1]}
        if self.name == "w1" and "hessian" in references:
            references["ggn"] = references["hessian"]  # linear model: GGN == Hessian
        return references

    @property
    def torch_objective(self) -> TorchObjective:
        """The autograd objective: W2's MLP, or W1's weights in ``nn.Linear(784, 10, bias=False)``."""
        if self._torch_objective is None:
            if self.name == "w1":
                model = nn.Linear(784, 10, bias=False).double()
                with torch.no_grad():
                    model.weight.copy_(self.weights)
                self.model = model.eval()
            self._torch_objective = TorchObjective(
                self.model, "cross_entropy", (self.x, self.y), weight_decay=self.weight_decay,
                chunk_size=self.cfg["chunk_size"],
            )
        return self._torch_objective

    def objective(self, curvature: str):
        """The objective a row computes with: closed form for W1's Hessian rows, else the TorchObjective."""
        if self.name == "w1" and curvature == "hessian":
            return self.closed
        return self.torch_objective

    def operator(self, curvature: str) -> CurvatureOperator:
        """The curvature operator a row's name stands for (the block-diagonal GGN's operator is the full GGN)."""
        if curvature == "hessian":
            return HessianOperator(self.objective("hessian"))
        if curvature in ("ggn", "ggn-blockdiag"):
            return GaussNewtonOperator(self.torch_objective)
        if curvature == "fisher":
            return EmpiricalFisherOperator(self.torch_objective)
        raise ValueError(f"unknown curvature {curvature!r}")

    def reference_for(self, curvature: str) -> str:
        """Which reference a row is compared with: the Hessian's for Hessian rows (and all of W1), else the GGN's."""
        return "hessian" if curvature == "hessian" or self.name == "w1" else "ggn"
