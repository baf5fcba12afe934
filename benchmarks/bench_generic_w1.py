"""Generic ``TorchObjective`` CG against the closed-form softmax path on W1 (issue 15, item 1).

W1: Koh & Liang's MNIST logistic regression (55,000 training images 5,000..59,999,
pixels / 255, W 10 x 784 without bias, mean CE + (0.01/2)||W||^2, at its optimum
||grad R|| <= 1e-10, fitted by ``fit_softmax_regression`` and cached in --work);
test image 8. For each dtype, rows run interleaved (closed form, generic with the
retained-gradient cache, generic without it), ``--repeats`` times; the table keeps
each row's fastest run. A row = ``InfluenceFunction(obj, CGSolver(
HessianOperator(obj), rtol)).scores(test)``: test gradient, CG solve, scores of all
55,000 points. The generic rows include building the objective (and its cache).
iHVP error = ||s - s_exact|| / ||s_exact|| with s_exact from a float64 Cholesky
solve of the explicit closed-form Hessian (cached).

    python benchmarks/bench_generic_w1.py --data-dir ../shared/data/mnist --work /tmp/influencekit-w1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from influencekit import CGSolver, DirectSolver, HessianOperator, InfluenceFunction, TorchObjective
    from influencekit.datasets import koh_liang_split, load_mnist
    from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/influencekit-w1"))
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--rtol", type=float, nargs=2, default=(1e-5, 1e-10), help="CG rtol for float32 and float64")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    split = koh_liang_split(load_mnist(args.data_dir))
    x, y, test = split.x_train, split.y_train, (split.x_test[8:9], split.y_test[8:9])
    weights_path, exact_path = args.work / "weights.pt", args.work / "exact_s_test.pt"
    if not weights_path.exists():
        torch.save(fit_softmax_regression(x, y, 0.01, num_classes=10).weights, weights_path)
    weights = torch.load(weights_path)
    if not exact_path.exists():
        closed = SoftmaxRegressionObjective(weights, x, y, 0.01)
        torch.save(InfluenceFunction(closed, DirectSolver(closed.hessian())).inverse_hvp_of_test(test).solution, exact_path)
    exact = torch.load(exact_path)

    rows: dict[str, dict] = {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        rtol = args.rtol[0] if dtype == torch.float32 else args.rtol[1]
        xd, wd, test_d = x.to(dtype), weights.to(dtype), (test[0].to(dtype), test[1])

        def generic(cache_mb: float):
            model = torch.nn.Linear(784, 10, bias=False).to(dtype)
            model.weight.data.copy_(wd)
            return TorchObjective(model, "cross_entropy", (xd, y), weight_decay=0.01, chunk_size=args.chunk_size, hvp_cache_mb=cache_mb)

        makers = {
            "closed form": lambda: SoftmaxRegressionObjective(wd, xd, y, 0.01),
            "TorchObjective (retained graphs)": lambda: generic(1024.0),
            "TorchObjective (jvp(grad), no cache)": lambda: generic(0.0),
        }
        for _ in range(args.repeats):
            for name, make in makers.items():
                start = time.perf_counter()
                objective = make()
                scores = InfluenceFunction(objective, CGSolver(HessianOperator(objective), rtol=rtol)).scores(test_d)
                seconds = time.perf_counter() - start
                key = f"{name}, {dtype_name}"
                error = float((scores.inverse_hvp.solution.double() - exact).norm() / exact.norm())
                row = {"seconds": seconds, "iterations": int(scores.inverse_hvp.iterations[0]), "ihvp_error": error, "rtol": rtol}
                if key not in rows or seconds < rows[key]["seconds"]:
                    rows[key] = row
                print(key, json.dumps(row), flush=True)
    print(f"\n| row | CG rtol | iterations | seconds (best of {args.repeats}) | iHVP error |\n|---|---|---|---|---|")
    for key, row in rows.items():
        print(f"| {key} | {row['rtol']:g} | {row['iterations']} | {row['seconds']:.2f} | {row['ihvp_error']:.1e} |")


if __name__ == "__main__":
    main()
