"""Cost of the building blocks of the full CNN panel (issue 13), measured before choosing an algorithm.

On Koh & Liang's right-panel shapes (``koh_liang_cnn(8)``, 2,616 parameters, the first 5,500 training
images of their MNIST split, weight decay 1e-3) it times, once each, in the order printed:

* the gradient of R over all 5,500 images (``TorchObjective.objective_gradient``), float32 and float64;
* one Hessian-vector product over all images (``TorchObjective.hvp``), with the retained gradient graphs
  (the default; the first call builds them) and with ``hvp_cache_mb=0`` (``jvp(grad)``), and optionally a
  block of ``--block`` products in one call;
* the explicit generalised Gauss-Newton matrix (``models.fitting.gauss_newton_matrix``) on ``--ggn-rows`` images;
* the K-FAC fit (``KFACSolver(...).fit()``, damping 0.01) and one application of its inverse,

then prints what the algorithms built from them would cost: the explicit Hessian (p products) and
matrix-free retraining (refits x Newton steps x preconditioned-CG iterations products).

Usage: nice -n 19 python benchmarks/bench_fig2_cnn_stages.py --data-dir ../shared/data/mnist [--float64-jvp] [--block 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from influencekit.datasets import koh_liang_split, load_or_download_mnist
from influencekit.models.fitting import gauss_newton_matrix
from influencekit.models.small_cnn import koh_liang_cnn
from influencekit.objectives.torch_objective import TorchObjective
from influencekit.solvers.kfac import KFACSolver


def timed(label: str, fn, results: dict[str, float]) -> object:
    start = time.perf_counter()
    value = fn()
    results[label] = time.perf_counter() - start
    print(f"{label}: {results[label]:.2f} s", flush=True)
    return value


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--train-size", type=int, default=5500)
    parser.add_argument("--ggn-rows", type=int, default=500)
    parser.add_argument("--block", type=int, default=0, help="also time one call with this many vectors (0: skip)")
    parser.add_argument("--float64-jvp", action="store_true", help="also time the float64 jvp(grad) product (slow)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = koh_liang_split(load_or_download_mnist(args.data_dir, download=False, progress=False))
    x, y = split.x_train[: args.train_size], split.y_train[: args.train_size]
    results: dict[str, float] = {}
    torch.manual_seed(0)
    model = koh_liang_cnn(8)
    for dtype, name in ((torch.float32, "float32"), (torch.float64, "float64")):
        model.to(dtype)
        objective = TorchObjective(model, "cross_entropy", (x.to(dtype), y), weight_decay=1e-3)
        plain = TorchObjective(model, "cross_entropy", (x.to(dtype), y), weight_decay=1e-3, hvp_cache_mb=0)
        vector = torch.randn(1, objective.dim, dtype=dtype)
        timed(f"{name} gradient (first call)", objective.objective_gradient, results)
        timed(f"{name} gradient", objective.objective_gradient, results)
        timed(f"{name} HVP, retained graphs (first call: builds them)", lambda: objective.hvp(vector), results)
        timed(f"{name} HVP, retained graphs", lambda: objective.hvp(vector), results)
        if dtype == torch.float32 or args.float64_jvp:
            timed(f"{name} HVP, jvp(grad)", lambda: plain.hvp(vector), results)
        if args.block:
            block = torch.randn(args.block, objective.dim, dtype=dtype)
            timed(f"{name} {args.block} HVPs in one call, retained graphs", lambda: objective.hvp(block), results)
    rows = TorchObjective(model, "cross_entropy", (x[: args.ggn_rows].double(), y[: args.ggn_rows]), weight_decay=1e-3)
    timed(f"float64 explicit GGN, {args.ggn_rows} images", lambda: gauss_newton_matrix(rows), results)
    kfac = timed("float64 K-FAC fit", lambda: KFACSolver(objective, damping=0.01, chunk_size=1024).fit(), results)
    timed("float64 K-FAC inverse, 1 vector", lambda: kfac.inverse_matvec(vector), results)

    p, n = objective.dim, len(y)
    hvp = results["float64 HVP, retained graphs"]
    print(f"\nprojections (p = {p}, n = {n}, float64):")
    print(f"  explicit Hessian, p products: {p * hvp / 3600:.1f} h")
    print(f"  explicit GGN over all images: {results[f'float64 explicit GGN, {args.ggn_rows} images'] * n / args.ggn_rows:.0f} s")
    for iterations in (20, 30):
        print(f"  mode (a), 100 refits x 2 Newton steps x {iterations} preconditioned-CG products: "
              f"{100 * 2 * iterations * hvp / 3600:.1f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
