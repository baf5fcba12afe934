"""What to run: the rows of W1 and W2 (one :class:`Spec` each) and each workload's configuration.

Nothing here imports torch: the parent process builds the row lists and configurations, and the
workers receive them as JSON.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

W1_WEIGHT_DECAY = 0.01
W2_WEIGHT_DECAY = 1e-3
W2_DAMPING = 1e-3
W2_HIDDEN = 128
REFERENCE_RTOL = 1e-10
ITERATION_BAR_RTOL = 1e-8
TEST_INDEX = 8
QUICK_LISSA_DEPTH = 1000


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
    """W1's rows (the same in quick mode: only n shrinks)."""
    lissa_depth = 5000
    return [
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


def w2_specs(quick: bool) -> list[Spec]:
    """W2's rows; in quick mode the rows whose cost is bound by p (LiSSA, tuned Arnoldi) are shortened."""
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
             "exact GGN diagonal (KFACCurvature.exact_diagonal), at most 400 iterations"),
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
        _shorten_p_bound_rows(specs)
    return specs


def _shorten_p_bound_rows(specs: list[Spec]) -> None:
    """Quick mode on W2: LiSSA depth 1000 and tuned Arnoldi rank 100 (Krylov 200), in place."""
    for spec in specs:
        if spec.method == "lissa":
            spec.params["depth"] = QUICK_LISSA_DEPTH
            spec.describe = spec.describe.replace("depth 5000", f"depth {QUICK_LISSA_DEPTH} (quick)")
        if (spec.method, spec.setting) == ("arnoldi", "tuned"):
            spec.params.update(rank=100, krylov_dim=200)
            spec.describe = "rank 100 (Krylov 200) (quick)"


SPECS = {"w1": w1_specs, "w2": w2_specs}


def select_specs(name: str, quick: bool, methods: list[str] | None, curvatures: set[str] | None,
                 settings: set[str]) -> list[Spec]:
    """The workload's rows that match the filters (``None``: all); its baseline row always."""
    return [s for s in SPECS[name](quick)
            if s.method == "baseline"
            or ((methods is None or s.method in methods)
                and (curvatures is None or s.curvature in curvatures)
                and s.setting in settings)]


def workload_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The workload's configuration (sizes, regularisation, cache directory), passed to the workers as JSON."""
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
