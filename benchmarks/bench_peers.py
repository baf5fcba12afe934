"""influencekit against peer libraries at matched iHVP accuracy (issue 15, item 2) -- W1 and dattri CG only so far.

W1 (Koh & Liang's MNIST logistic regression, weights from ``fit_softmax_regression``
cached in --work, see bench_generic_w1.py), float32, ``nn.Linear(784, 10, bias=False)``,
test image 8, s_test = H^{-1} grad CE(test) with H the Hessian of
R = mean CE + (0.01/2)||W||^2. Reference: float64 Cholesky (cached by bench_generic_w1.py).

* influencekit: ``CGSolver(HessianOperator(TorchObjective(...)), rtol)``
  (retained-gradient HVPs, chunks of 4,096), then ``train_gradient_dots`` for the
  scores of all n training points (``InfluenceFunction.scores``).
* dattri 0.3.0: ``dattri.func.hessian.ihvp_at_x_cg(R, theta, max_iter=K, mode="rev-rev")``
  on the full training set in one batch (dattri's IFAttributorCG sums one CG per
  dataloader batch, which is the inverse of the full Hessian only with one batch);
  its CG has no tolerance and always runs K iterations from x0 = v. Scores: dattri
  returns <H^{-1} g_test, g_i> (no minus sign, no 1/n): I_up,loss = -(dattri score).
  Its scores would need the 55,000 x 7,840 per-example gradients (1.7 GB float32);
  only the iHVP is timed here, and our row is timed both for the iHVP alone and with scores.

Matched accuracy: dattri's K is tuned (``--dattri-iters``) and our rtol chosen so that
our iHVP error is <= dattri's. Rows run interleaved ``--repeats`` times; best times kept.
Peers not covered yet (pyDVL, Captum, kronfluence; workloads W2 and the CNN): see RESULTS.md.

    python benchmarks/bench_peers.py --data-dir ../shared/data/mnist --work /tmp/influencekit-w1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    from influencekit import CGSolver, HessianOperator, InfluenceFunction, TorchObjective
    from influencekit.datasets import koh_liang_split, load_mnist

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/influencekit-w1"))
    parser.add_argument("--dattri-iters", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=55_000, help="first N training points only (same weights; reference solved here)")
    args = parser.parse_args()
    split = koh_liang_split(load_mnist(args.data_dir))
    x, y = split.x_train[: args.n_train].float(), split.y_train[: args.n_train]
    test = (split.x_test[8:9].float(), split.y_test[8:9])
    weights = torch.load(args.work / "weights.pt")
    if args.n_train == 55_000:
        exact = torch.load(args.work / "exact_s_test.pt")[0]
    else:  # H of the subset (still positive definite: weight decay) at the same weights, float64 Cholesky
        from influencekit import DirectSolver
        from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective

        closed = SoftmaxRegressionObjective(weights, x.double(), y, 0.01)
        exact = InfluenceFunction(closed, DirectSolver(closed.hessian())).inverse_hvp_of_test((test[0].double(), test[1])).solution[0]
    weights = weights.float()

    def error(s: torch.Tensor) -> float:
        return float((s.double().reshape(-1) - exact).norm() / exact.norm())

    model = torch.nn.Linear(784, 10, bias=False)
    model.weight.data.copy_(weights)

    def ours(with_scores: bool):
        start = time.perf_counter()
        objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.01, chunk_size=4096)
        influence = InfluenceFunction(objective, CGSolver(HessianOperator(objective), rtol=args.rtol))
        s = influence.scores(test).inverse_hvp.solution if with_scores else influence.inverse_hvp_of_test(test).solution
        return time.perf_counter() - start, error(s)

    def dattri(iterations: int):
        from dattri.func.hessian import ihvp_at_x_cg

        def objective_at(theta: torch.Tensor) -> torch.Tensor:
            logits = x @ theta.reshape(10, 784).T
            return torch.nn.functional.cross_entropy(logits, y) + 0.005 * (theta * theta).sum()

        start = time.perf_counter()
        theta = weights.reshape(-1).clone()
        test_gradient = torch.func.grad(lambda t: torch.nn.functional.cross_entropy(test[0] @ t.reshape(10, 784).T, test[1]))(theta)
        s = ihvp_at_x_cg(objective_at, theta, max_iter=iterations, mode="rev-rev")(test_gradient)
        return time.perf_counter() - start, error(s)

    rows: dict[str, tuple[float, float]] = {}
    runs = [("influencekit CG, iHVP only", lambda: ours(False)), ("influencekit CG, iHVP + scores of all n points", lambda: ours(True))]
    runs += [(f"dattri CG max_iter={k}, iHVP only", lambda k=k: dattri(k)) for k in args.dattri_iters]
    for _ in range(args.repeats):
        for name, fn in runs:
            seconds, err = fn()
            print(f"{name}: {seconds:.2f} s, iHVP error {err:.2e}", flush=True)
            if name not in rows or seconds < rows[name][0]:
                rows[name] = (seconds, err)
    print(f"\n| W1 (n = {args.n_train:,}), float32 | seconds (best of {args.repeats}) | iHVP error |\n|---|---|---|")
    for name, (seconds, err) in rows.items():
        print(f"| {name} | {seconds:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
