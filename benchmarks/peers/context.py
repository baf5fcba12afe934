"""The three workloads of the peer benchmark, loaded in a worker, in the benchmark's dtype.

W1 and W2 are ``ihvp_family``'s (same cache layout, same references); W1's cache can be seeded from
``bench_generic_w1.py``'s (``weights.pt``, ``exact_s_test.pt``). The CNN is Koh & Liang's Figure 2 network
(``koh_liang_cnn``, 2,616 parameters) fitted briefly by Adam then L-BFGS (``prepare_cnn``): a model for timing,
not a verified optimum; its reference is a float64 CG solve (rtol 1e-10) on the damped Hessian.

Every workload's regularised objective is R(theta) = mean_i CE_i + (wd/2)||theta||^2 and the solves are
(H + damping I)^-1 g_test with H = Hessian of R; a peer without weight decay gets regularization = wd + damping.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from influencekit.models.small_cnn import koh_liang_cnn
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective
from influencekit.objectives.torch_objective import TorchObjective

from ihvp_family.cache import fingerprint, load_cached, load_mnist_subset, reference_path, save_cached, w1_weights_path, w2_model_path
from ihvp_family.context import Context
from ihvp_family.util import log

CNN_ADAM_STEPS = 300
CNN_LBFGS_ITERATIONS = 200


def cnn_model_path(cfg: dict) -> Path:
    """The CNN is cached under ``w2_model_path``'s name in its own cache directory (its references then follow)."""
    return w2_model_path(cfg)


class PeerContext(Context):
    """``ihvp_family.Context`` for W1, W2 and the CNN, with model, data and test point cast to ``cfg["dtype"]``.

    ``closed_form`` (W1 only) chooses which objective influencekit's rows solve with: the closed-form softmax
    regression or the generic ``TorchObjective`` (``nn.Linear``); peers always see the ``nn.Module``.
    """

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        dtype = getattr(torch, cfg["dtype"])
        self.dtype = dtype
        self.x = self.x.to(dtype)
        self.test = (self.test[0].to(dtype), self.test[1])
        if self.name == "w1":
            self.weights = self.weights.to(dtype)
            self.closed = SoftmaxRegressionObjective(self.weights, self.x, self.y, self.weight_decay)
        if self.name != "w1":
            self.model = self.model.to(dtype)
        self._torch_objective = None
        _ = self.torch_objective
        self.closed_form = False

    @property
    def torch_objective(self) -> TorchObjective:
        """The autograd objective in the context's dtype (W1: ``nn.Linear(784, 10, bias=False)`` holding W)."""
        if self._torch_objective is None:
            if self.name == "w1":
                self.model = nn.Linear(784, 10, bias=False).to(self.weights.dtype).eval()
                with torch.no_grad():
                    self.model.weight.copy_(self.weights)
            self._torch_objective = TorchObjective(self.model, "cross_entropy", (self.x, self.y), weight_decay=self.weight_decay,
                                                   chunk_size=self.cfg["chunk_size"])
        return self._torch_objective

    def _load_w2(self) -> None:
        if self.name != "cnn":
            return super()._load_w2()
        loaded = load_cached(cnn_model_path(self.cfg))
        if loaded is None:
            raise RuntimeError("CNN model is not cached: run bench_peers.py --prepare cnn first")
        self.model = koh_liang_cnn().double()
        self.model.load_state_dict(loaded[0])
        self.model.eval()

    def objective(self, curvature: str):
        return self.closed if (self.name == "w1" and self.closed_form and curvature == "hessian") else self.torch_objective

    @property
    def parameters(self) -> dict[str, torch.Tensor]:
        """The model's parameters by name (detached), in influencekit's flattening order."""
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def regularised_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """mean CE over (x, y) at the flat parameters theta, plus (wd/2)||theta||^2 (for dattri's functional API)."""
        logits = torch.func.functional_call(self.model, self.torch_objective.space.unflatten(theta), (x,))
        return F.cross_entropy(logits, y) + 0.5 * self.weight_decay * (theta * theta).sum()

    def test_gradient(self) -> torch.Tensor:
        """g_test = grad CE(test) at theta, flat (p,)."""
        return self.torch_objective.measurement_gradients(self.test)[0]


def seed_w1_cache(cfg: dict, generic_work: Path) -> bool:
    """Fill ihvp_family's W1 cache (weights and Cholesky reference) from bench_generic_w1.py's cache, if it has one.

    Only for the full n = 55,000 (the weights ``weights.pt`` were fitted on all of it); checks ||grad R|| <= 1e-8.
    Returns whether the cache is now filled.
    """
    if load_cached(w1_weights_path(cfg)) is not None:
        return True
    weights_file, exact_file = generic_work / "weights.pt", generic_work / "exact_s_test.pt"
    if cfg["n"] != 55_000 or not weights_file.exists() or not exact_file.exists():
        return False
    x, y, test = load_mnist_subset(cfg)
    weights, exact = torch.load(weights_file), torch.load(exact_file)
    closed = SoftmaxRegressionObjective(weights, x, y, cfg["weight_decay"])
    norm = float(closed.objective_gradient().norm())
    if norm > 1e-8:
        raise RuntimeError(f"{weights_file}: ||grad R|| = {norm:.2e} > 1e-8; delete it and rerun bench_generic_w1.py")
    save_cached(w1_weights_path(cfg), {"weights": weights},
                {"gradient_norm": norm, "newton_steps": -1, "cg_iterations": -1, "train_s": 0.0, "from": str(weights_file)})
    influence = -closed.train_gradient_dots(exact)[0]
    save_cached(reference_path(cfg, "hessian"), {"x": exact[0], "influence": influence},
                {"weights": fingerprint(weights), "solver": "DirectSolver (Cholesky), from bench_generic_w1.py"})
    log(f"w1: cache seeded from {generic_work} (||grad R|| = {norm:.1e})")
    return True


def prepare_cnn(cfg: dict) -> dict:
    """Fit the CNN (float64, Adam then L-BFGS on R; cached) and its reference (CG rtol 1e-10 on H + damping I)."""
    from influencekit.curvature import HessianOperator
    from influencekit.scores.influence import InfluenceFunction
    from influencekit.solvers import CGSolver

    x, y, test = load_mnist_subset(cfg)
    model, wd = koh_liang_cnn().double(), cfg["weight_decay"]
    cached = load_cached(cnn_model_path(cfg))
    if cached is not None:
        model.load_state_dict(cached[0])
    else:
        torch.manual_seed(cfg["seed"])
        model = koh_liang_cnn().double()
        start = time.perf_counter()
        params = list(model.parameters())

        def risk():
            return F.cross_entropy(model(x), y) + 0.5 * wd * sum((q * q).sum() for q in params)

        adam = torch.optim.Adam(params, lr=0.01)
        for step in range(CNN_ADAM_STEPS):
            adam.zero_grad()
            risk().backward()
            adam.step()
        lbfgs = torch.optim.LBFGS(params, max_iter=CNN_LBFGS_ITERATIONS, history_size=50, tolerance_grad=0.0,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure():
            lbfgs.zero_grad()
            loss = risk()
            loss.backward()
            return loss

        lbfgs.step(closure)
        objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=wd, chunk_size=cfg["chunk_size"])
        meta = {"train_s": time.perf_counter() - start, "gradient_norm": float(objective.objective_gradient().norm()),
                "train_accuracy": float((model(x).argmax(1) == y).double().mean()), "adam_steps": CNN_ADAM_STEPS,
                "lbfgs_iterations": CNN_LBFGS_ITERATIONS}
        save_cached(cnn_model_path(cfg), {k: v.detach() for k, v in model.state_dict().items()}, meta)
        log(f"cnn: fitted in {meta['train_s']:.0f} s: ||grad R|| = {meta['gradient_norm']:.2e}, train accuracy {meta['train_accuracy']:.3f}")
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=wd, chunk_size=cfg["chunk_size"])
    path = reference_path(cfg, "hessian")
    fp = fingerprint(objective.parameters_vector())
    ref = load_cached(path)
    if ref is None or ref[1].get("weights") != fp:
        start = time.perf_counter()
        scores = InfluenceFunction(objective, CGSolver(HessianOperator(objective), damping=cfg["damping"], rtol=1e-10)).scores(test)
        solve = scores.inverse_hvp
        meta = {"weights": fp, "solver": "CG rtol 1e-10 on H + damping I", "iterations": int(solve.iterations[0]),
                "seconds": time.perf_counter() - start, "negative_curvature": bool(solve.info["negative_curvature"][0])}
        if meta["negative_curvature"]:
            raise RuntimeError(f"cnn: CG met negative curvature on H + {cfg['damping']:g} I; raise --cnn-damping")
        save_cached(path, {"x": solve.solution[0], "influence": scores.influence_on_loss[0]}, meta)
        log(f"cnn: reference CG: {meta['iterations']} iterations, {meta['seconds']:.0f} s")
    return {"reference": str(path)}
