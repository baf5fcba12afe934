"""Benchmark: performance and fidelity of the inverse-Hessian family (issue 4's table).

Workloads
---------
W1  Koh & Liang's MNIST logistic regression: training images 5,000..59,999
    (n = 55,000), pixels / 255, W (10 x 784) without bias, objective
    R = mean CE + (0.01/2)||W||^2 in float64, fitted to ||grad R|| <= 1e-10 by
    ``fit_softmax_regression``; test image 8. Hessian-based methods use the
    closed-form ``SoftmaxRegressionObjective``; GGN, empirical Fisher and K-FAC
    use ``nn.Linear(784, 10, bias=False)`` with the same weights in a
    ``TorchObjective`` (chunks of 4,096). The model is linear in theta, so its
    GGN *is* its Hessian (the GGN rows differ from the exact answer by
    round-off only). No damping: the weight decay makes H positive definite.
    Reference: Cholesky of the explicit Hessian (``DirectSolver``).
W2  MLP 784-128(tanh)-10 (p = 101,770) on the first 10,000 of W1's training
    images, R = mean CE + (1e-3/2)||theta||^2 (all weights and biases), float64,
    trained by full-batch L-BFGS (strong Wolfe) from a seeded initialisation to
    ||grad R|| <= ``--w2-gtol`` (or ``--w2-max-iter`` iterations; the reached norm
    is reported); test image 8. Every method solves with damping mu = 1e-3 added
    to the curvature (on top of the weight decay). There is no explicit Hessian:
    the references are CG on the damped GGN and on the damped Hessian with
    relative residual 1e-10. Each row is compared with the reference of the
    matrix it approximates: rows on the Hessian with the Hessian reference,
    all others (GGN, block-diagonal GGN, K-FAC, EK-FAC, and the empirical-Fisher
    rows, which approximate the GGN = true Fisher) with the GGN reference. The
    JSON has both errors for every row.

Each (workload, method, curvature, setting) runs in a fresh subprocess of this
script, so ``peak MB`` is that process's ru_maxrss (imports, data, model,
reference and the method); the ``baseline`` row of each workload is a process
that only loads those, and each row's notes give its peak above its own
baseline ("+N MB"). ``seconds`` = fit (constructor / factor fit / sketch /
preconditioner) + solve (test gradient and iHVP) + scoring all n training
points (``objective.train_gradient_dots``), as ``InfluenceFunction.scores``
does; the split is in the notes and the JSON. Solvers that measure a residual
inside ``solve`` with an extra full pass (Arnoldi, Nystroem sketch, LiSSA,
DataInf) are asked not to. ``iHVP rel. error`` = ||x - x_ref|| / ||x_ref||;
Pearson and Spearman compare the influences I_up,loss of all n training points
on test image 8 with the reference's. The model fits and references are
cached under ``--out``/cache, so reruns skip them.

Also reported: iterations to relative residual 1e-8 of plain CG and of
Nystroem-preconditioned CG on W1 (the bar: PCG needs at most half of CG's).

Failures (exceptions, NotPositiveDefinite, divergence, a killed or timed-out
worker) become rows with the error message. Progress goes to stderr; the
Markdown table to stdout and, with the JSON, to ``--out`` (rewritten after
every row, so an interrupted run keeps what it has).

Full run (on a quiet machine; roughly 1-2 hours on 2 cores, most of it W2: the
L-BFGS training, cached afterwards, the references, and Jacobi-PCG):
    python benchmarks/bench_ihvp_family.py --data-dir ../shared/data/mnist --out out/bench_ihvp_family
Quick check (small sizes: W1 on 3,000 points, W2 on 1,000; W2's LiSSA depth
1,000 and tuned Arnoldi rank 100, since p = 101,770 at any n; the W1 spectrum
of the 7,840 x 7,840 Hessian costs the same as in the full run):
    python benchmarks/bench_ihvp_family.py --quick
Subsets: ``--workloads w1 --methods cg,cg-nystrom --settings default``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
KNOWN_METHODS = (
    "baseline",
    "exact",
    "cg",
    "cg-jacobi",
    "cg-nystrom",
    "cg-kfac",
    "block-cg",
    "lissa",
    "arnoldi",
    "nystrom-sketch",
    "kfac",
    "ekfac",
    "datainf",
)
W1_WEIGHT_DECAY = 0.01
W2_WEIGHT_DECAY = 1e-3
W2_DAMPING = 1e-3
W2_HIDDEN = 128
REFERENCE_RTOL = 1e-10
ITERATION_BAR_RTOL = 1e-8
TEST_INDEX = 8


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """One row: a method on a curvature of a workload at a named setting."""

    workload: str
    method: str
    curvature: str
    setting: str
    params: dict[str, Any] = field(default_factory=dict)
    describe: str = ""

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.method}/{self.curvature}/{self.setting}"


def w1_specs(quick: bool) -> list[Spec]:
    lissa_depth = 5000
    s = [
        Spec("w1", "baseline", "-", "-", {}, "load data, model, reference"),
        Spec("w1", "exact", "hessian", "default", {}, "Cholesky of the explicit Hessian"),
        Spec("w1", "cg", "hessian", "default", {"rtol": 1e-10}, "rtol 1e-10"),
        Spec("w1", "cg", "hessian", "tuned", {"rtol": 1e-6}, "rtol 1e-6"),
        Spec("w1", "cg", "ggn", "default", {"rtol": 1e-10}, "rtol 1e-10, TorchObjective GGN (= Hessian here)"),
        Spec("w1", "cg", "fisher", "default", {"rtol": 1e-10}, "rtol 1e-10, empirical Fisher"),
        Spec("w1", "cg-jacobi", "hessian", "default", {"rtol": 1e-10, "probes": 64}, "64 Hutchinson probes"),
        Spec("w1", "cg-jacobi", "hessian", "tuned", {"rtol": 1e-10, "closed_form_diagonal": True}, "exact diagonal (closed form)"),
        Spec("w1", "cg-nystrom", "hessian", "default", {"rtol": 1e-10, "rank": 100}, "rank 100"),
        Spec("w1", "cg-nystrom", "hessian", "tuned", {"rtol": 1e-10, "rank": 500}, "rank 500"),
        Spec("w1", "block-cg", "hessian", "default", {"rtol": 1e-10}, "no preconditioner"),
        Spec("w1", "block-cg", "hessian", "tuned", {"rtol": 1e-10, "nystrom_rank": 100}, "Nystroem rank-100 preconditioner"),
        Spec("w1", "lissa", "hessian", "default",
             {"scale": 25.0, "depth": lissa_depth, "repeats": 10, "batch_size": 1},
             "Koh & Liang: scale 25, depth 5000, T 10, B 1, damping 0"),
        Spec("w1", "lissa", "hessian", "tuned",
             {"scale": "auto", "depth": lissa_depth, "repeats": 1, "batch_size": 512},
             "scale auto, depth 5000, T 1, B 512"),
        Spec("w1", "arnoldi", "hessian", "default", {"rank": 50}, "rank 50 (Krylov 100)"),
        Spec("w1", "arnoldi", "hessian", "tuned", {"rank": 500, "krylov_dim": 1000}, "rank 500 (Krylov 1000)"),
        Spec("w1", "nystrom-sketch", "hessian", "default", {"rank": 100}, "rank 100 of the data term, damping = weight decay"),
        Spec("w1", "nystrom-sketch", "hessian", "tuned", {"rank": 500}, "rank 500 of the data term, damping = weight decay"),
        Spec("w1", "kfac", "ggn", "default", {"chunk_size": 256}, "damping 0, chunks of 256"),
        Spec("w1", "kfac", "ggn", "tuned", {"chunk_size": 4096}, "damping 0, chunks of 4096"),
        Spec("w1", "ekfac", "ggn", "default", {"chunk_size": 256}, "damping 0, chunks of 256"),
        Spec("w1", "ekfac", "ggn", "tuned", {"chunk_size": 4096}, "damping 0, chunks of 4096"),
        Spec("w1", "datainf", "fisher", "default", {}, "paper damping 0.1 mean g^2, one block"),
        Spec("w1", "datainf", "fisher", "tuned", {"damping": "weight_decay", "chunk_size": 4096}, "damping = weight decay 0.01"),
    ]
    return s


def w2_specs(quick: bool) -> list[Spec]:
    specs = [
        Spec("w2", "baseline", "-", "-", {}, "load data, model, references"),
        Spec("w2", "cg", "ggn", "default", {"rtol": 1e-10}, "rtol 1e-10 (the reference's own computation)"),
        Spec("w2", "cg", "ggn", "tuned", {"rtol": 1e-6}, "rtol 1e-6"),
        Spec("w2", "cg", "hessian", "default", {"rtol": 1e-10}, "rtol 1e-10 (the reference's own computation)"),
        Spec("w2", "cg", "fisher", "default", {"rtol": 1e-10}, "rtol 1e-10, empirical Fisher"),
        Spec("w2", "cg", "ggn-blockdiag", "default", {"rtol": 1e-10}, "per layer, CG rtol 1e-10 per block"),
        Spec("w2", "cg", "ggn-blockdiag", "tuned", {"rtol": 1e-6}, "per layer, CG rtol 1e-6 per block"),
        Spec("w2", "cg-jacobi", "ggn", "default", {"rtol": 1e-10, "probes": 64, "maxiter": 400},
             "64 Hutchinson probes, at most 400 iterations"),
        Spec("w2", "cg-jacobi", "ggn", "tuned", {"rtol": 1e-10, "ggn_diagonal": True, "maxiter": 400},
             "exact GGN diagonal (KFACSolver.exact_diagonal), at most 400 iterations"),
        Spec("w2", "cg-nystrom", "ggn", "default", {"rtol": 1e-10, "rank": 100}, "rank 100"),
        Spec("w2", "cg-nystrom", "ggn", "tuned", {"rtol": 1e-10, "rank": 300}, "rank 300"),
        Spec("w2", "cg-kfac", "ggn", "default", {"rtol": 1e-10, "ekfac": False}, "K-FAC (damping mu) as preconditioner"),
        Spec("w2", "cg-kfac", "ggn", "tuned", {"rtol": 1e-10, "ekfac": True}, "EK-FAC (damping mu) as preconditioner"),
        Spec("w2", "block-cg", "ggn", "default", {"rtol": 1e-10}, "no preconditioner"),
        Spec("w2", "block-cg", "ggn", "tuned", {"rtol": 1e-10, "nystrom_rank": 100}, "Nystroem rank-100 preconditioner"),
        Spec("w2", "lissa", "ggn", "default",
             {"scale": "auto", "depth": 5000, "repeats": 10, "batch_size": 1}, "scale auto, depth 5000, T 10, B 1"),
        Spec("w2", "lissa", "ggn", "tuned",
             {"scale": "auto", "depth": 5000, "repeats": 1, "batch_size": 256}, "scale auto, depth 5000, T 1, B 256"),
        Spec("w2", "arnoldi", "ggn", "default", {"rank": 50}, "rank 50 (Krylov 100)"),
        Spec("w2", "arnoldi", "ggn", "tuned", {"rank": 200, "krylov_dim": 400}, "rank 200 (Krylov 400)"),
        Spec("w2", "arnoldi", "hessian", "default", {"rank": 50}, "rank 50 (Krylov 100)"),
        Spec("w2", "nystrom-sketch", "ggn", "default", {"rank": 100}, "rank 100 of the data term, damping = wd + mu"),
        Spec("w2", "nystrom-sketch", "ggn", "tuned", {"rank": 300}, "rank 300 of the data term, damping = wd + mu"),
        Spec("w2", "kfac", "ggn", "default", {"chunk_size": 256}, "damping mu, chunks of 256"),
        Spec("w2", "kfac", "ggn", "tuned", {"chunk_size": 1024}, "damping mu, chunks of 1024 (the objective's)"),
        Spec("w2", "ekfac", "ggn", "default", {"chunk_size": 256}, "damping mu, chunks of 256"),
        Spec("w2", "ekfac", "ggn", "tuned", {"chunk_size": 1024}, "damping mu, chunks of 1024 (the objective's)"),
        Spec("w2", "datainf", "fisher", "default", {"chunk_size": 256}, "paper damping 0.1 mean g^2, one block"),
        Spec("w2", "datainf", "fisher", "tuned", {"chunk_size": 256, "per_layer": True, "damping": "wd+mu"},
             "per-layer blocks, damping = wd + mu"),
    ]
    if quick:  # p = 101,770 at any n: keep the p-bound rows of the smoke test short
        for spec in specs:
            if spec.method == "lissa":
                spec.params["depth"] = 1000
                spec.describe = spec.describe.replace("depth 5000", "depth 1000 (quick)")
            if (spec.method, spec.setting) == ("arnoldi", "tuned"):
                spec.params.update(rank=100, krylov_dim=200)
                spec.describe = "rank 100 (Krylov 200) (quick)"
    return specs


# ----------------------------------------------------------------------------------------------
# Workload configuration (passed to workers as JSON)
# ----------------------------------------------------------------------------------------------
def workload_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cache = str(Path(args.out).resolve() / "cache")
    common = {"name": name, "data_dir": str(Path(args.data_dir).resolve()), "cache_dir": cache,
              "threads": args.threads, "quick": args.quick, "test_index": TEST_INDEX}
    if name == "w1":
        n = args.w1_n or (3000 if args.quick else 55000)
        return {**common, "n": n, "weight_decay": W1_WEIGHT_DECAY, "damping": 0.0, "chunk_size": 4096}
    n = args.w2_n or (1000 if args.quick else 10000)
    return {**common, "n": n, "weight_decay": W2_WEIGHT_DECAY, "damping": W2_DAMPING, "chunk_size": 1024,
            "hidden": W2_HIDDEN, "seed": 0, "gtol": args.w2_gtol, "max_iter": args.w2_max_iter,
            "hessian_reference": not args.no_hessian_reference}


# ----------------------------------------------------------------------------------------------
# Worker side: everything below runs in a fresh process per row
# ----------------------------------------------------------------------------------------------
def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _fingerprint(tensor) -> str:
    import hashlib

    return hashlib.sha1(tensor.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def _save(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"json": json.dumps(meta)})
    os.replace(tmp, path)


def _load(path: Path) -> tuple[dict, dict] | None:
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def data_path(cfg: dict) -> Path:
    return Path(cfg["cache_dir"]) / f"{cfg['name']}_n{cfg['n']}_t{cfg['test_index']}_data.safetensors"


def load_data(cfg: dict, from_mnist: bool = False):
    """(x, y, test batch) of the workload: from MNIST (checksums verified; prepare step), else from the cached subset.

    Workers read the cached float64 subset, so their baseline memory and start-up do not include all of MNIST.
    """
    cached = None if from_mnist else _load(data_path(cfg))
    if cached is not None:
        t = cached[0]
        return t["x"], t["y"], (t["x_test"], t["y_test"])
    from influencekit.datasets import koh_liang_split, load_mnist

    split = koh_liang_split(load_mnist(cfg["data_dir"], verify=True))
    n = cfg["n"]
    if n > split.x_train.shape[0]:
        raise ValueError(f"n = {n} exceeds the {split.x_train.shape[0]} training images of Koh & Liang's split")
    x, y = split.x_train[:n].contiguous(), split.y_train[:n].contiguous()
    t = cfg["test_index"]
    test = (split.x_test[t : t + 1].contiguous(), split.y_test[t : t + 1].contiguous())
    _save(data_path(cfg), {"x": x, "y": y, "x_test": test[0], "y_test": test[1]}, {"source": "MNIST, Koh & Liang split"})
    return x, y, test


def make_mlp(cfg: dict):
    import torch
    from torch import nn

    torch.manual_seed(cfg["seed"])
    return nn.Sequential(nn.Linear(784, cfg["hidden"]), nn.Tanh(), nn.Linear(cfg["hidden"], 10)).double()


def w1_weights_path(cfg: dict) -> Path:
    return Path(cfg["cache_dir"]) / f"w1_n{cfg['n']}_wd{cfg['weight_decay']:g}_weights.safetensors"


def w2_model_path(cfg: dict) -> Path:
    return Path(cfg["cache_dir"]) / (
        f"w2_n{cfg['n']}_h{cfg['hidden']}_wd{cfg['weight_decay']:g}_seed{cfg['seed']}_gtol{cfg['gtol']:g}_model.safetensors"
    )


def reference_path(cfg: dict, kind: str) -> Path:
    stem = w1_weights_path(cfg).stem if cfg["name"] == "w1" else w2_model_path(cfg).stem
    return Path(cfg["cache_dir"]) / f"{stem}_ref-{kind}_damp{cfg['damping']:g}_t{cfg['test_index']}.safetensors"


class Context:
    """Data, trained model, objectives and references of one workload, loaded in a worker."""

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
            from influencekit.models.softmax_regression import SoftmaxRegressionObjective

            loaded = _load(w1_weights_path(cfg))
            if loaded is None:
                raise RuntimeError("W1 weights are not cached: the prepare step did not run or failed")
            self.weights = loaded[0]["weights"]
            self.closed = SoftmaxRegressionObjective(self.weights, self.x, self.y, self.weight_decay)
        else:
            loaded = _load(w2_model_path(cfg))
            if loaded is None:
                raise RuntimeError("W2 model is not cached: the prepare step did not run or failed")
            self.model = make_mlp(cfg)
            self.model.load_state_dict(loaded[0])
            self.model.eval()
        self.references: dict[str, dict] = {}
        for kind in ("hessian", "ggn"):
            ref = _load(reference_path(cfg, kind))
            if ref is not None:
                self.references[kind] = {"x": ref[0]["x"], "influence": ref[0]["influence"], **ref[1]}
        if self.name == "w1" and "hessian" in self.references:
            self.references["ggn"] = self.references["hessian"]  # linear model: GGN == Hessian
        _ = self.torch_objective  # cheap (no copy of the data): part of every row's baseline

    @property
    def torch_objective(self):
        if self._torch_objective is None:
            import torch
            from torch import nn

            from influencekit.torch_objective import TorchObjective

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

    def operator(self, curvature: str):
        from influencekit.curvature import EmpiricalFisherOperator, GaussNewtonOperator, HessianOperator

        if curvature == "hessian":
            return HessianOperator(self.objective("hessian"))
        if curvature in ("ggn", "ggn-blockdiag"):
            return GaussNewtonOperator(self.torch_objective)
        if curvature == "fisher":
            return EmpiricalFisherOperator(self.torch_objective)
        raise ValueError(f"unknown curvature {curvature!r}")

    def reference_for(self, curvature: str) -> str:
        return "hessian" if curvature == "hessian" or self.name == "w1" else "ggn"


def _data_term(operator, shift: float):
    """M - shift I as a curvature operator (the data term of a curvature that includes weight decay)."""
    from influencekit.curvature import CurvatureOperator

    class DataTerm(CurvatureOperator):
        def __init__(self):
            self.dim, self.dtype = operator.dim, operator.dtype

        def matvec(self, vectors):
            return operator.matvec(vectors) - shift * vectors

    return DataTerm()


def _closed_form_jacobi(ctx: Context, damping: float):
    """JacobiPreconditioner with W1's exact Hessian diagonal, (1/n) sum_i p_ia (1 - p_ia) x_ij^2 + lambda."""
    from influencekit.solvers import JacobiPreconditioner

    probs = ctx.closed.probs
    diagonal = ((probs * (1 - probs)).T @ (ctx.x * ctx.x) / ctx.n + ctx.weight_decay).reshape(-1)
    return JacobiPreconditioner.from_diagonal(diagonal, damping)


def _iterations_to(history, rhs_norm: float, rtol: float) -> int | None:
    """First iteration whose residual norm is <= rtol ||b|| (row 0), or None."""
    if history is None:
        return None
    values = history[:, 0] if history.dim() == 2 else history
    hits = (values <= rtol * rhs_norm).nonzero()
    return int(hits[0, 0]) if hits.numel() else None


def build_solver(ctx: Context, spec: Spec) -> tuple[Any, Any, dict]:
    """(solver, scoring objective, fit notes); fitting happens here (timed as 'fit')."""
    from influencekit.curvature import blocks_per_module
    from influencekit.solvers import (
        ArnoldiSolver,
        BlockConjugateGradient,
        ConjugateGradient,
        DataInfSolver,
        DirectSolver,
        JacobiPreconditioner,
        KFACSolver,
        LiSSA,
        NystromPreconditioner,
        NystromSketchSolver,
    )
    from influencekit.solvers.block_diagonal import BlockDiagonalSolver

    p, mu, wd = spec.params, ctx.damping, ctx.weight_decay
    method, curvature = spec.method, spec.curvature
    notes: dict[str, Any] = {}
    if method == "exact":
        return DirectSolver(ctx.operator(curvature), damping=mu), ctx.objective(curvature), notes
    if method == "cg" and curvature == "ggn-blockdiag":
        operator = ctx.operator(curvature)
        blocks = blocks_per_module(ctx.model, ctx.torch_objective.space)
        notes["blocks"] = {name: int(index.numel()) for name, index in blocks.items()}
        solver = BlockDiagonalSolver(operator, blocks, lambda block, name: ConjugateGradient(block, rtol=p["rtol"]), damping=mu)
        return solver, ctx.torch_objective, notes
    if method == "cg":
        return ConjugateGradient(ctx.operator(curvature), damping=mu, rtol=p["rtol"]), ctx.objective(curvature), notes
    if method == "cg-jacobi":
        operator = ctx.operator(curvature)
        if p.get("closed_form_diagonal"):
            pre = _closed_form_jacobi(ctx, mu)
        elif p.get("ggn_diagonal"):
            pre = JacobiPreconditioner.from_diagonal(KFACSolver(ctx.torch_objective, chunk_size=1024).exact_diagonal(), mu)
        else:
            pre = JacobiPreconditioner(operator, damping=mu, num_probes=p["probes"], seed=0)
        notes["clamped"] = pre.clamped
        solver = ConjugateGradient(operator, damping=mu, rtol=p["rtol"], preconditioner=pre, maxiter=p.get("maxiter"))
        return solver, ctx.objective(curvature), notes
    if method == "cg-nystrom":
        operator = ctx.operator(curvature)
        pre = NystromPreconditioner(operator, rank=p["rank"], damping=mu, seed=0)
        notes["lambda_r"] = float(pre.approximation.eigenvalues[-1])
        return ConjugateGradient(operator, damping=mu, rtol=p["rtol"], preconditioner=pre), ctx.objective(curvature), notes
    if method == "cg-kfac":
        operator = ctx.operator(curvature)
        kfac = KFACSolver(ctx.torch_objective, damping=mu, eigenvalue_correction=p["ekfac"], chunk_size=1024).fit()
        solver = ConjugateGradient(operator, damping=mu, rtol=p["rtol"], preconditioner=kfac.inverse_matvec)
        return solver, ctx.objective(curvature), notes
    if method == "block-cg":
        operator = ctx.operator(curvature)
        pre = NystromPreconditioner(operator, rank=p["nystrom_rank"], damping=mu, seed=0) if p.get("nystrom_rank") else None
        return BlockConjugateGradient(operator, damping=mu, rtol=p["rtol"], preconditioner=pre), ctx.objective(curvature), notes
    if method == "lissa":
        solver = LiSSA(ctx.operator(curvature), scale=p["scale"], damping=mu, depth=p["depth"], repeats=p["repeats"],
                       batch_size=p["batch_size"], seed=0, measure_residual=False, progress=False)
        notes["scale"] = solver.scale
        return solver, ctx.objective(curvature), notes
    if method == "arnoldi":
        solver = ArnoldiSolver(ctx.operator(curvature), rank=p["rank"], krylov_dim=p.get("krylov_dim"), damping=mu, seed=0)
        solver.curvature = None  # no residual pass inside solve
        notes.update(krylov_dim=solver.krylov_dim, **solver.fit_info)
        return solver, ctx.objective(curvature), notes
    if method == "nystrom-sketch":
        solver = NystromSketchSolver(_data_term(ctx.operator(curvature), wd), rank=p["rank"], damping=wd + mu, seed=0)
        solver.curvature = None
        return solver, ctx.objective(curvature), notes
    if method in ("kfac", "ekfac"):
        solver = KFACSolver(ctx.torch_objective, damping=mu, eigenvalue_correction=method == "ekfac", chunk_size=p["chunk_size"])
        solver.fit()
        return solver, ctx.torch_objective, notes
    if method == "datainf":
        objective = ctx.objective("hessian") if ctx.name == "w1" else ctx.torch_objective  # any Objective: closed form on W1
        blocks = None
        if p.get("per_layer"):
            blocks = {}
            for name, index in blocks_per_module(ctx.model, ctx.torch_objective.space).items():
                start, stop = int(index.min()), int(index.max()) + 1
                if stop - start != index.numel():
                    raise ValueError(f"block {name!r} is not contiguous in theta")
                blocks[name] = slice(start, stop)
        damping = {"weight_decay": wd, "wd+mu": wd + mu}.get(p.get("damping"), p.get("damping"))
        solver = DataInfSolver(objective, damping=damping, blocks=blocks, chunk_size=p.get("chunk_size", 1024),
                               measure_residual=False)
        notes["block_damping"] = [float(f"{d:.3g}") for d in solver.block_damping]
        return solver, objective, notes
    raise ValueError(f"unknown method {method!r}")


def run_method(ctx: Context, spec: Spec) -> dict[str, Any]:
    from influencekit.influence import InfluenceFunction

    baseline = peak_mb()
    out: dict[str, Any] = {"baseline_mb": baseline}
    start = time.perf_counter()
    solver, objective, notes = build_solver(ctx, spec)
    fitted = time.perf_counter()
    influence = InfluenceFunction(objective, solver, allow_unconverged=True)  # capped solves are measured, not refused
    result = influence.inverse_hvp_of_test(ctx.test)  # test gradient + iHVP
    solved = time.perf_counter()
    scores = -objective.train_gradient_dots(result.solution)[0]
    scored = time.perf_counter()
    out.update(fit_s=fitted - start, solve_s=solved - fitted, score_s=scored - solved, seconds=scored - start)
    out["peak_mb"] = peak_mb()
    x = result.solution[0].detach()
    rhs_norm = float(objective.measurement_gradients(ctx.test)[0].norm())
    info = result.info or {}
    if result.iterations is not None:
        notes["iterations"] = int(result.iterations[0])
    if spec.method == "block-cg":
        notes["products"] = int(info.get("products", 0))
    if "residual_history" in info:
        notes["iterations_to_1e-8"] = _iterations_to(info["residual_history"], rhs_norm, ITERATION_BAR_RTOL)
    if "converged" in info:
        notes["converged"] = bool(info["converged"][0])
    if info.get("negative_curvature") is not None and bool(info["negative_curvature"][0]):
        notes["negative_curvature"] = True
    if "block_results" in info:
        notes["block_iterations"] = {name: int(r.iterations[0]) for name, r in info["block_results"].items()
                                     if r.iterations is not None}
    if result.residual_norms is not None:
        notes["relative_residual"] = float(result.residual_norms[0]) / rhs_norm
    if spec.method == "exact":
        t0 = time.perf_counter()
        spectrum = solver.spectrum()  # eigvalsh of the explicit (p, p) Hessian: the same cost at any n
        notes["spectrum"] = {"min": spectrum.min, "max": spectrum.max, "condition": spectrum.condition_number,
                             "negative": spectrum.negative, "zero": spectrum.zero, "how": "eigvalsh"}
        notes["spectrum_s"] = time.perf_counter() - t0
        out["peak_mb"] = max(out["peak_mb"], peak_mb())
    out["notes"] = notes
    out.update(compare(ctx, spec, x, scores))
    return out


def compare(ctx: Context, spec: Spec, x, scores) -> dict[str, Any]:
    import numpy as np
    import scipy.stats

    out: dict[str, Any] = {"reference": ctx.reference_for(spec.curvature)}
    for kind, ref in ctx.references.items():
        rel = float((x - ref["x"]).norm() / ref["x"].norm())
        a, b = scores.detach().numpy(), ref["influence"].numpy()
        finite = bool(np.isfinite(a).all())
        pearson = float(scipy.stats.pearsonr(a, b)[0]) if finite else float("nan")
        spearman = float(scipy.stats.spearmanr(a, b)[0]) if finite else float("nan")
        out[f"vs_{kind}"] = {"rel_error": rel, "pearson": pearson, "spearman": spearman}
    chosen = out.get(f"vs_{out['reference']}")
    if chosen is not None:
        out.update(chosen)
    return out


# -- prepare: fit models and references ---------------------------------------------------------
def prepare(cfg: dict) -> dict[str, Any]:
    import torch

    from influencekit.influence import InfluenceFunction

    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    x, y, test = load_data(cfg, from_mnist=True)
    info["load_s"] = time.perf_counter() - t0
    if cfg["name"] == "w1":
        from influencekit.curvature import HessianOperator
        from influencekit.models.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression
        from influencekit.solvers import DirectSolver

        path = w1_weights_path(cfg)
        cached = _load(path)
        if cached is None:
            log(f"w1: fitting softmax regression on n = {cfg['n']:,} (Newton-CG to ||grad R|| <= 1e-10)")
            fit = fit_softmax_regression(x, y, cfg["weight_decay"], num_classes=10)
            meta = {"gradient_norm": fit.gradient_norm, "newton_steps": fit.newton_steps,
                    "cg_iterations": fit.cg_iterations, "train_s": fit.seconds}
            _save(path, {"weights": fit.weights}, meta)
            weights = fit.weights
        else:
            weights, meta = cached[0]["weights"], {**cached[1], "cached": True}
        info["training"] = meta
        log(f"w1: ||grad R|| = {meta['gradient_norm']:.2e} ({meta['newton_steps']} Newton steps, {meta['train_s']:.1f} s"
            f"{', cached' if meta.get('cached') else ''})")
        ref_path = reference_path(cfg, "hessian")
        fp = _fingerprint(weights)
        cached = _load(ref_path)
        if cached is None or cached[1].get("weights") != fp:
            log("w1: reference = Cholesky of the explicit Hessian")
            objective = SoftmaxRegressionObjective(weights, x, y, cfg["weight_decay"])
            start = time.perf_counter()
            solver = DirectSolver(HessianOperator(objective), damping=cfg["damping"])
            scores = InfluenceFunction(objective, solver).scores(test)
            rhs = objective.measurement_gradients(test)[0]
            meta = {"weights": fp, "solver": "DirectSolver (Cholesky)", "seconds": time.perf_counter() - start,
                    "relative_residual": float(scores.inverse_hvp.residual_norms[0] / rhs.norm())}
            _save(ref_path, {"x": scores.inverse_hvp.solution[0], "influence": scores.influence_on_loss[0]}, meta)
        else:
            meta = {**cached[1], "cached": True}
        info["reference_hessian"] = meta
        return info

    # W2
    import torch.nn.functional as F

    from influencekit.curvature import GaussNewtonOperator, HessianOperator
    from influencekit.solvers import ConjugateGradient
    from influencekit.torch_objective import TorchObjective

    path = w2_model_path(cfg)
    cached = _load(path)
    model = make_mlp(cfg)
    if cached is None:
        log(f"w2: training MLP 784-{cfg['hidden']}-10 on n = {cfg['n']:,} by full-batch L-BFGS to ||grad R|| <= {cfg['gtol']:g}")
        params = list(model.parameters())
        wd = cfg["weight_decay"]
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=100, history_size=50, tolerance_grad=0.0,
                                      tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y) + 0.5 * wd * sum((q * q).sum() for q in params)
            loss.backward()
            return loss

        start, done, norm = time.perf_counter(), 0, math.inf
        while done < cfg["max_iter"]:
            optimizer.param_groups[0]["max_iter"] = min(100, cfg["max_iter"] - done)
            loss = optimizer.step(closure)
            previous, done = done, optimizer.state[params[0]]["n_iter"]
            closure()
            norm = float(torch.cat([q.grad.reshape(-1) for q in params]).norm())
            log(f"w2: L-BFGS iteration {done}: R = {float(loss):.10f}, ||grad R|| = {norm:.2e}")
            if norm <= cfg["gtol"] or not math.isfinite(norm) or done == previous:
                break  # converged, broken, or stalled (no accepted step)
        optimizer.zero_grad()
        meta = {"iterations": done, "train_s": time.perf_counter() - start}
        model.eval()
        objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=wd, chunk_size=cfg["chunk_size"])
        meta["gradient_norm"] = float(objective.objective_gradient().norm())
        meta["objective"] = objective.objective_value()
        meta["train_accuracy"] = float((model(x).argmax(1) == y).double().mean())
        _save(path, {k: v.detach() for k, v in model.state_dict().items()}, meta)
    else:
        model.load_state_dict(cached[0])
        meta = {**cached[1], "cached": True}
    model.eval()
    info["training"] = meta
    log(f"w2: ||grad R|| = {meta['gradient_norm']:.2e} after {meta['iterations']} L-BFGS iterations "
        f"({meta['train_s']:.1f} s{', cached' if meta.get('cached') else ''}), train accuracy {meta['train_accuracy']:.4f}")
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=cfg["weight_decay"], chunk_size=cfg["chunk_size"])
    fp = _fingerprint(objective.parameters_vector())
    kinds = ["ggn"] + (["hessian"] if cfg["hessian_reference"] else [])
    for kind in kinds:
        ref_path = reference_path(cfg, kind)
        cached = _load(ref_path)
        if cached is not None and cached[1].get("weights") == fp:
            info[f"reference_{kind}"] = {**cached[1], "cached": True}
            continue
        log(f"w2: reference = CG on the damped {kind.upper()} (damping {cfg['damping']:g}, rtol {REFERENCE_RTOL:g})")
        operator = GaussNewtonOperator(objective) if kind == "ggn" else HessianOperator(objective)
        start = time.perf_counter()
        solver = ConjugateGradient(operator, damping=cfg["damping"], rtol=REFERENCE_RTOL)
        scores = InfluenceFunction(objective, solver).scores(test)
        solve = scores.inverse_hvp
        rhs = objective.measurement_gradients(test)[0]
        meta = {"weights": fp, "solver": f"CG rtol {REFERENCE_RTOL:g}", "seconds": time.perf_counter() - start,
                "iterations": int(solve.iterations[0]), "relative_residual": float(solve.residual_norms[0] / rhs.norm()),
                "converged": bool(solve.info["converged"][0]),
                "negative_curvature": bool(solve.info["negative_curvature"][0])}
        log(f"w2: {kind} reference: {meta['iterations']} iterations, relative residual {meta['relative_residual']:.1e}, "
            f"{meta['seconds']:.1f} s")
        if meta["negative_curvature"]:
            log(f"w2: CG met negative curvature on the damped {kind}: no {kind} reference")
            info[f"reference_{kind}"] = meta
            continue
        _save(ref_path, {"x": solve.solution[0], "influence": scores.influence_on_loss[0]}, meta)
        info[f"reference_{kind}"] = meta
    return info


def worker_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    cfg, spec = job["config"], Spec(**job["spec"])
    result: dict[str, Any] = {"spec": asdict(spec)}
    try:
        import torch

        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        if job["kind"] == "prepare":
            result["prepare"] = prepare(cfg)
            result["status"] = "ok"
        else:
            t0 = time.perf_counter()
            ctx = Context(cfg)
            if spec.method == "baseline":
                result.update(status="ok", seconds=time.perf_counter() - t0, peak_mb=peak_mb(),
                              notes={"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads()})
            else:
                if ctx.reference_for(spec.curvature) not in ctx.references:
                    log(f"{spec.key}: no {ctx.reference_for(spec.curvature)} reference; errors are against what exists")
                result.update(run_method(ctx, spec))
                result["status"] = "ok"
    except BaseException as error:  # noqa: BLE001 - every failure becomes a row
        result["status"] = "error"
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
        result["peak_mb"] = peak_mb()
        log(f"{spec.key}: FAILED: {result['error']}")
    Path(job["result"]).write_text(json.dumps(result, default=_json_default))
    return 0


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# ----------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------
def run_job(kind: str, cfg: dict, spec: Spec, jobs_dir: Path, timeout: float | None) -> dict[str, Any]:
    jobs_dir.mkdir(parents=True, exist_ok=True)
    stem = spec.key.replace("/", "_") if kind != "prepare" else f"{cfg['name']}_prepare"
    job_path, result_path = jobs_dir / f"{stem}.job.json", jobs_dir / f"{stem}.result.json"
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps({"kind": kind, "config": cfg, "spec": asdict(spec), "result": str(result_path)}))
    start = time.perf_counter()
    env = dict(os.environ)
    if cfg.get("threads"):
        env.update(OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]))
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--worker", str(job_path)], env=env, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        return {"spec": asdict(spec), "status": "error", "error": f"timed out after {timeout:g} s (worker killed)",
                "wall_s": time.perf_counter() - start}
    if not result_path.exists():
        why = "killed by a signal (out of memory?)" if rc < 0 else "no result"
        return {"spec": asdict(spec), "status": "error", "error": f"worker exited with rc {rc}: {why}",
                "wall_s": time.perf_counter() - start}
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def notes_text(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return "**FAILED**: " + row.get("error", "?").replace("|", "/").replace("\n", " ")[:300]
    n = row.get("notes", {})
    parts = []
    method = row["spec"]["method"]
    if method == "baseline":
        return f"load {n.get('load_s', 0):.1f} s, {n.get('threads')} threads"
    if "iterations" in n:
        text = f"{n['iterations']} it"
        if n.get("iterations_to_1e-8") is not None:
            text += f" ({n['iterations_to_1e-8']} to 1e-8)"
        parts.append(text)
    if "products" in n:
        parts.append(f"{n['products']} products")
    if "block_iterations" in n:
        parts.append("block it " + ", ".join(f"{k}: {v}" for k, v in n["block_iterations"].items()))
    if n.get("converged") is False:
        parts.append("NOT converged")
    if n.get("negative_curvature"):
        parts.append("negative curvature met")
    if "relative_residual" in n:
        parts.append(f"rel. res. {n['relative_residual']:.1e}")
    if "scale" in n:
        parts.append(f"scale {n['scale']:.3g}")
    if "lambda_r" in n:
        parts.append(f"lambda_r {n['lambda_r']:.3g}")
    if "clamped" in n and n["clamped"]:
        parts.append(f"{n['clamped']} clamped")
    if "block_damping" in n:
        parts.append("lambda_l " + ", ".join(f"{d:g}" for d in n["block_damping"]))
    if n.get("restarts"):
        parts.append(f"{n['restarts']} restarts")
    if n.get("negative_eigenvalues"):
        parts.append(f"{n['negative_eigenvalues']} negative Ritz values")
    if "spectrum" in n:
        s = n["spectrum"]
        parts.append(f"spectrum ({s['how']}) {n['spectrum_s']:.1f} s: eig [{s['min']:.3g}, {s['max']:.3g}], cond {s['condition']:.3g}, "
                     f"{s['negative']} < 0")
    parts.append(f"fit {row['fit_s']:.2f} / solve {row['solve_s']:.2f} / score {row['score_s']:.2f} s")
    parts.append(f"+{row['peak_mb'] - row['baseline_mb']:.0f} MB")
    parts.append(f"{row['spec']['describe']}; ref: {row.get('reference')}")
    return "; ".join(parts)


HEADER = ("| workload | method | curvature | setting | seconds | peak MB | iHVP rel. error | Pearson | Spearman | "
          "iterations / notes |\n|---|---|---|---|---:|---:|---:|---:|---:|---|")


def table(rows: list[dict[str, Any]]) -> str:
    lines = [HEADER]
    for row in rows:
        s = row["spec"]
        ok = row.get("status") == "ok"
        lines.append(
            f"| {s['workload']} | {s['method']} | {s['curvature']} | {s['setting']} "
            f"| {_fmt(row.get('seconds') if ok else None, '.2f')} | {_fmt(row.get('peak_mb'), '.0f')} "
            f"| {_fmt(row.get('rel_error') if ok else None, '.2e')} | {_fmt(row.get('pearson') if ok else None, '.6f')} "
            f"| {_fmt(row.get('spearman') if ok else None, '.6f')} | {notes_text(row)} |"
        )
    return "\n".join(lines)


def iteration_bar(rows: list[dict[str, Any]]) -> list[str]:
    """Iterations to relative residual 1e-8, plain CG vs Nystroem-PCG (the bar, on W1: PCG <= CG / 2)."""
    def find(workload, method, curvature, setting):
        for row in rows:
            s = row["spec"]
            if (s["workload"], s["method"], s["curvature"], s["setting"]) == (workload, method, curvature, setting):
                return row.get("notes", {}).get("iterations_to_1e-8") if row.get("status") == "ok" else None
        return None

    lines = []
    for workload, curvature in (("w1", "hessian"), ("w2", "ggn")):
        cg = find(workload, "cg", curvature, "default")
        for setting in ("default", "tuned"):
            pcg = find(workload, "cg-nystrom", curvature, setting)
            if cg is None or pcg is None:
                continue
            text = (f"- {workload.upper()} ({curvature}), iterations to relative residual 1e-8: CG {cg}, "
                    f"Nystroem-PCG ({setting}) {pcg}, ratio {pcg / cg:.2f}")
            if workload == "w1":
                text += f": {'meets' if pcg <= cg / 2 else 'MISSES'} the bar (<= 0.50)"
            lines.append(text)
    return lines


NOTES = """\
- **seconds** = fit (constructor, factors, sketch or preconditioner) + solve (test gradient and iHVP) + scoring all n
  training points (`train_gradient_dots`), in a fresh worker process; imports, data loading, model training and the
  reference are excluded. The notes split it as fit / solve / score.
- **peak MB** = ru_maxrss of the worker process (Python, torch, the n training images, model, reference and the
  method; the prepare step caches the workload's images, so workers never hold all of MNIST). The
  `baseline` row is a worker that only loads those; "+N MB" in the notes is a row's peak above its own baseline.
- **iHVP rel. error** = ||x - x_ref|| / ||x_ref||; **Pearson / Spearman** compare I_up,loss of all n training points
  on test image 8 with the reference's. "ref:" names the reference: W1, Cholesky of the explicit Hessian (the model
  is linear, so GGN == Hessian); W2, CG (rtol 1e-10) on the damped GGN for GGN, block-diagonal, K-FAC, EK-FAC and
  empirical-Fisher rows, on the damped Hessian for Hessian rows. results.json has both for every row.
- W1's Hessian rows use the closed-form `SoftmaxRegressionObjective` (products and scoring); GGN, Fisher, K-FAC and
  EK-FAC rows the `TorchObjective` of `nn.Linear(784, 10, bias=False)`; DataInf the closed-form objective's
  per-example gradients (it needs only an `Objective`; the numbers are the same).
- W2: every method adds damping mu = 1e-3 to its curvature (on top of the weight decay), as the references do;
  DataInf's damping is its own (paper default, or wd + mu when tuned).
- CG "N it (M to 1e-8)": iterations to its tolerance, and to relative residual 1e-8 (from its residual history).
  LiSSA "it" = depth x repeats. Nystroem sketch-and-solve sketches the data term M - wd I and uses damping wd (+ mu),
  so directions outside the sketch keep exactly the weight decay. Arnoldi drops the part of b outside its subspace.
- K-FAC / EK-FAC "tuned" only enlarges the fitting chunks (speed; K-FAC never uses chunks larger than the
  objective's): extra damping (+1e-3 ... +1e-1) moved both further from the reference on the quick workloads, so the
  damping stays at the reference's.
"""


def setup_lines(prepared: dict[str, dict]) -> list[str]:
    lines = []
    for name, info in prepared.items():
        if info.get("status") != "ok":
            lines.append(f"- {name}: prepare FAILED: {info.get('error')}")
            continue
        p = info["prepare"]
        t = p["training"]
        cfg = info["config"]
        if name == "w1":
            lines.append(f"- W1: n = {cfg['n']:,}, p = 7,840, weight decay {cfg['weight_decay']:g}, damping 0; "
                         f"Newton-CG fit ||grad R|| = {t['gradient_norm']:.2e} ({t['newton_steps']} steps, "
                         f"{t['train_s']:.1f} s{', cached' if t.get('cached') else ''}); reference: "
                         f"{p['reference_hessian']['solver']}, relative residual "
                         f"{p['reference_hessian']['relative_residual']:.1e} ({p['reference_hessian']['seconds']:.1f} s"
                         f"{', cached' if p['reference_hessian'].get('cached') else ''}). "
                         f"GGN == Hessian (linear model).")
        else:
            lines.append(f"- W2: n = {cfg['n']:,}, p = 101,770, weight decay {cfg['weight_decay']:g}, damping "
                         f"{cfg['damping']:g}; L-BFGS {t['iterations']} iterations ({t['train_s']:.1f} s"
                         f"{', cached' if t.get('cached') else ''}), "
                         f"||grad R|| = {t['gradient_norm']:.2e}, R = {t['objective']:.6f}, train accuracy "
                         f"{t['train_accuracy']:.4f}.")
            for kind in ("ggn", "hessian"):
                ref = p.get(f"reference_{kind}")
                if ref is None:
                    lines.append(f"  - {kind} reference: not computed")
                    continue
                lines.append(f"  - {kind} reference: {ref['solver']}: {ref['iterations']} iterations, relative residual "
                             f"{ref['relative_residual']:.1e}, {ref['seconds']:.1f} s{', cached' if ref.get('cached') else ''}"
                             + ("; NEGATIVE CURVATURE met: not used" if ref.get("negative_curvature") else ""))
    return lines


def write_outputs(out: Path, command: str, header: list[str], prepared: dict, rows: list[dict]) -> str:
    bar = iteration_bar(rows)
    markdown = "\n".join(
        ["# iHVP family: performance and fidelity", "", "```", command, "```", "", *header, "",
         "## Setup", "", *setup_lines(prepared), "", "## Results", "", table(rows), "", "## Notes", "", NOTES,
         *(["## Nystroem-PCG iteration bar", "", *bar, ""] if bar else []),
         *(["## Quick mode", "", "Small sizes (W1 n = 3,000, W2 n = 1,000); W2's LiSSA depth 1000 and tuned Arnoldi rank 100 "
            "(Krylov 200). Not the benchmark's numbers.", ""] if any(p.get("config", {}).get("quick") for p in prepared.values()) else [])]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown + "\n")
    payload = {"command": command, "prepared": prepared, "rows": rows, "iteration_bar": bar}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=_json_default))
    return markdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes: W1 on 3,000 points, W2 on 1,000")
    parser.add_argument("--workloads", default="w1,w2", help="comma-separated: w1, w2 (default both)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(KNOWN_METHODS)}")
    parser.add_argument("--curvatures", default=None, help="comma-separated subset of hessian, ggn, fisher, ggn-blockdiag")
    parser.add_argument("--settings", default="default,tuned", help="comma-separated: default, tuned")
    parser.add_argument("--data-dir", default="../shared/data/mnist", help="MNIST directory (default ../shared/data/mnist)")
    parser.add_argument("--out", default=None, help="output directory (default out/bench_ihvp_family[_quick])")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's own)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per row before its worker is killed")
    parser.add_argument("--w1-n", type=int, default=None, help="override W1's training size")
    parser.add_argument("--w2-n", type=int, default=None, help="override W2's training size")
    parser.add_argument("--w2-gtol", type=float, default=1e-6, help="W2 L-BFGS target ||grad R|| (default 1e-6)")
    parser.add_argument("--w2-max-iter", type=int, default=10000, help="W2 L-BFGS iteration cap (default 10000)")
    parser.add_argument("--no-hessian-reference", action="store_true", help="W2: skip the damped-Hessian CG reference")
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)

    if args.out is None:
        args.out = "out/bench_ihvp_family_quick" if args.quick else "out/bench_ihvp_family"
    out = Path(args.out)
    command = "python " + shlex.join([os.path.relpath(SCRIPT), *sys.argv[1:]])
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in ("w1", "w2")]
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown += [m for m in methods or [] if m not in KNOWN_METHODS]
    if unknown:
        parser.error(f"unknown workloads/methods {unknown}")
    curvatures = None if args.curvatures is None else set(args.curvatures.split(","))
    settings = set(args.settings.split(","))

    import torch  # only for the header

    header = [f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.node()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; Python {platform.python_version()}, "
              f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} torch threads per worker"
              + ("; QUICK mode (small sizes)" if args.quick else "")]
    del torch
    rows: list[dict[str, Any]] = []
    prepared: dict[str, dict] = {}
    jobs_dir = out / "jobs"
    total_start = time.perf_counter()
    for name in workloads:
        cfg = workload_config(name, args)
        specs = [s for s in (w1_specs if name == "w1" else w2_specs)(args.quick)
                 if (methods is None or s.method in methods or s.method == "baseline")
                 and (curvatures is None or s.curvature in curvatures or s.method == "baseline")
                 and (s.setting in settings or s.method == "baseline")]
        log(f"{name}: preparing (n = {cfg['n']:,}) ...")
        start = time.perf_counter()
        prep = run_job("prepare", cfg, Spec(name, "prepare", "-", "-"), jobs_dir, None)
        prep["config"] = cfg
        prepared[name] = prep
        log(f"{name}: prepare {prep.get('status')} in {time.perf_counter() - start:.1f} s")
        for spec in specs:
            if prep.get("status") != "ok":
                rows.append({"spec": asdict(spec), "status": "error", "error": f"prepare failed: {prep.get('error')}"})
                continue
            log(f"{spec.key}: running ({spec.describe})")
            row = run_job("method", cfg, spec, jobs_dir, args.timeout)
            rows.append(row)
            if row.get("status") == "ok":
                log(f"{spec.key}: {row.get('seconds', 0):.2f} s, peak {row.get('peak_mb', 0):.0f} MB, "
                    f"rel. error {_fmt(row.get('rel_error'), '.2e')}, Pearson {_fmt(row.get('pearson'), '.4f')} "
                    f"(wall {row['wall_s']:.1f} s)")
            write_outputs(out, command, header, prepared, rows)
    header.append(f"- total wall time of this run: {time.perf_counter() - total_start:.0f} s")
    markdown = write_outputs(out, command, header, prepared, rows)
    print(markdown)
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
