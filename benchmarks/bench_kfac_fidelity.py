"""Benchmark: where K-FAC / EK-FAC lose fidelity on W2, and how it depends on the damping.

Uses the W2 workload of ``bench_ihvp_family.py`` (MLP 784-128-10, tanh, first
10,000 training images, weight decay 1e-3, test image 8) from that script's
cache: run it first with the same ``--out`` (and ``--w2-max-iter``), or this
script trains and caches W2 itself through the same code.

Printed, all against exact computations:

1. **Matched damping.** For each damping mu in ``--dampings``: the exact
   damped-GGN solve x = (G + mu I)^{-1} g_test by CG (relative residual
   ``--rtol``; G includes the weight decay), and K-FAC and EK-FAC with the same
   mu: Pearson and Spearman of I_up,loss of all n training points against the
   exact ones, and ||x - x_exact|| / ||x_exact||. (The ihvp-family table
   compares every method at mu = 1e-3 only.)
2. **Layer contributions.** I_up,loss = -sum_l g_i,l . x_l splits into one
   term per layer; their variances relative to the total's show whether the
   layers' terms cancel (shares above 1), which amplifies per-layer errors.
3. **The output layer exactly.** Its GGN block (1/n) sum_i H_i kron a_i a_i^T
   (1,290 x 1,290; H_i = diag(p_i) - p_i p_i^T, a_i = [tanh(h_i), 1]) formed
   explicitly: relative Frobenius error of the K-FAC and EK-FAC blocks, and of
   their damped inverses applied to that layer's part of g_test.

Also printed: each layer's mean GGN eigenvalue, trace / size, read off EK-FAC
(whose eigenvalues are the exact diagonal of the block in a rotated basis, so
their sum is the exact trace), to put the dampings in scale.

Usage:
    python benchmarks/bench_kfac_fidelity.py --data-dir ../shared/data/mnist \\
        --out out/bench_ihvp_family_w2b --w2-max-iter 1500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ihvp_family.cache import load_cached, w2_model_path  # noqa: E402
from ihvp_family.context import Context  # noqa: E402
from ihvp_family.prepare import prepare  # noqa: E402
from ihvp_family.workloads import workload_config  # noqa: E402

from influencekit.curvature import GaussNewtonOperator, blocks_per_module  # noqa: E402
from influencekit.solvers import CGSolver, KFACSolver  # noqa: E402
from influencekit.curvature.kfac import cross_entropy_hessian_factor  # noqa: E402


def influence_of(objective, x: torch.Tensor) -> torch.Tensor:
    """I_up,loss = -g_i . x of every training point, shape (n,)."""
    return -objective.train_gradient_dots(x.unsqueeze(0))[0].detach()


def correlations(a: torch.Tensor, b: torch.Tensor) -> str:
    return (f"Pearson {scipy.stats.pearsonr(a.numpy(), b.numpy())[0]:.4f}, "
            f"Spearman {scipy.stats.spearmanr(a.numpy(), b.numpy())[0]:.4f}")


def explicit_output_block(model, x: torch.Tensor) -> torch.Tensor:
    """(1/n) sum_i sum_c (l_ic kron a_i)(l_ic kron a_i)^T of the last Linear, in K-FAC's V layout (out, in + 1)."""
    with torch.no_grad():
        hidden = model[1](model[0](x))
        logits = model[2](hidden)
    a = torch.cat([hidden, torch.ones(len(hidden), 1, dtype=hidden.dtype)], dim=1)
    factor = cross_entropy_hessian_factor(logits, None)  # (n, C, C): column c is l_ic
    size = factor.shape[1] * a.shape[1]
    block = torch.zeros(size, size, dtype=torch.float64)
    for start in range(0, len(a), 500):
        rows = torch.einsum("boc,bj->bcoj", factor[start : start + 500], a[start : start + 500]).reshape(-1, size)
        block += rows.T @ rows
    return block / len(a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist", help="MNIST directory")
    parser.add_argument("--out", default="out/bench_ihvp_family", help="bench_ihvp_family.py's output directory (its cache)")
    parser.add_argument("--w2-max-iter", type=int, default=10000, help="W2 L-BFGS iteration cap, as given to bench_ihvp_family.py")
    parser.add_argument("--w2-gtol", type=float, default=1e-6, help="W2 L-BFGS target ||grad R||, as given to bench_ihvp_family.py")
    parser.add_argument("--dampings", default="1e-3,1e-2,3e-2,1e-1", help="comma-separated damping values mu")
    parser.add_argument("--rtol", type=float, default=1e-8, help="relative residual of the exact CG solves")
    args = parser.parse_args()
    options = argparse.Namespace(out=args.out, data_dir=args.data_dir, threads=None, quick=False, w1_n=None, w2_n=None,
                                 w2_gtol=args.w2_gtol, w2_max_iter=args.w2_max_iter, no_hessian_reference=True)
    cfg = workload_config("w2", options)
    if load_cached(w2_model_path(cfg)) is None:
        print("W2 is not cached under --out: training it (bench_ihvp_family.py's prepare step) ...", flush=True)
        prepare(cfg)
    ctx = Context(cfg)
    objective = ctx.torch_objective
    g_test = objective.measurement_gradients(ctx.test)
    print(f"W2: n = {ctx.n:,}, p = {objective.dim:,}, weight decay {ctx.weight_decay:g}, test image {cfg['test_index']}")

    start = time.perf_counter()
    solvers = {name: KFACSolver(objective, damping=0.0, eigenvalue_correction=name == "EK-FAC", chunk_size=1024).fit()
               for name in ("K-FAC", "EK-FAC")}
    print(f"K-FAC and EK-FAC factors fitted in {time.perf_counter() - start:.1f} s")
    for name, factors in solvers["EK-FAC"].approximation.factors.items():  # EK-FAC keeps the trace: its mean eigenvalue is exact
        print(f"layer {name}: mean eigenvalue of its GGN block (trace / size) {float(factors.eigenvalues().mean()):.3g}")

    print("\n== 1. matched damping: K-FAC / EK-FAC vs the exact damped GGN at the same mu ==")
    operator = GaussNewtonOperator(objective)
    exact_at: dict[float, torch.Tensor] = {}
    for mu in (float(v) for v in args.dampings.split(",")):
        begin = time.perf_counter()
        cg = CGSolver(operator, damping=mu, rtol=args.rtol).solve(g_test)
        x_exact = cg.solution[0]
        exact_at[mu] = x_exact
        reference = influence_of(objective, x_exact)
        print(f"mu = {mu:g}: exact by CG, {int(cg.iterations[0])} iterations, {time.perf_counter() - begin:.0f} s")
        for name, solver in solvers.items():
            x = KFACSolver(solver.approximation, damping=mu).inverse_matvec(g_test)[0]
            error = float((x - x_exact).norm() / x_exact.norm())
            print(f"  {name:6s}: {correlations(influence_of(objective, x), reference)}, iHVP rel. error {error:.3f}")

    mu = min(exact_at)
    print(f"\n== 2. per-layer terms of the exact I_up,loss at mu = {mu:g} ==")
    blocks = blocks_per_module(ctx.model, objective.space)
    x_exact = exact_at[mu]
    total = influence_of(objective, x_exact)
    for name, index in blocks.items():
        part = torch.zeros_like(x_exact)
        part[index] = x_exact[index]
        term = influence_of(objective, part)
        print(f"layer {name} ({index.numel():,} parameters): variance / variance of the total = "
              f"{float(term.var() / total.var()):.2f}, correlation with the total {float(torch.corrcoef(torch.stack([term, total]))[0, 1]):.3f}")

    print(f"\n== 3. the output layer's GGN block, explicit (damping mu = {mu:g} + weight decay) ==")
    solver = solvers["K-FAC"]
    layer = solver.approximation.layers[-1]
    exact_block = explicit_output_block(ctx.model, ctx.x.double().reshape(ctx.n, -1))
    eigenvalues = torch.linalg.eigvalsh(exact_block)
    shift = ctx.weight_decay + mu
    print(f"exact block: {exact_block.shape[0]:,} x {exact_block.shape[0]:,}, largest eigenvalue {float(eigenvalues.max()):.3g}, "
          f"{int((eigenvalues < shift).sum())} eigenvalues below weight decay + mu = {shift:g}")
    rhs = g_test[0][layer.theta_indices()]
    identity = torch.eye(exact_block.shape[0], dtype=torch.float64)
    x_block = torch.linalg.solve(exact_block + shift * identity, rhs)
    for name, fitted in solvers.items():
        approx = fitted.approximation.factors[layer.name].dense()
        frobenius = float((approx - exact_block).norm() / exact_block.norm())
        x = torch.linalg.solve(approx + shift * identity, rhs)
        print(f"  {name:6s}: relative Frobenius error {frobenius:.3f}; damped inverse on g_test's part: "
              f"relative error {float((x - x_block).norm() / x_block.norm()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
