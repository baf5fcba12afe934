"""Hessian-vector products of the generic ``TorchObjective`` against their FLOP and memory-traffic limits (issue 15).

Models (float32, random weights from seed 0 -- the cost of an HVP does not depend on
where it is evaluated), on the first n MNIST training images of Koh & Liang's split:
  MLP  784-128(tanh)-10 (W2's shape, p = 101,770), n = 10,000, chunks of 1,024;
  CNN  all-convolutional tanh network as in Figure 2 (right): conv 1->16 3x3 s2, tanh,
       conv 16->16 3x3 s2, tanh, conv 16->10 3x3, mean over positions (p = 3,930), n = 5,500.
For each: seconds per HVP (one vector, best of --repeats) with the retained-gradient
cache (``hvp_cache_mb`` default) and without it (``jvp(grad)``); FLOPs of one cached HVP
counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and
convolutions only); bytes one cached HVP must read at least (the data and the tensors
the retained graphs saved, counted by ``TorchObjective._retained_gradient``). Limits:
this process's measured float32 GEMM rate (4,096^3) and copy bandwidth (512 MB), taken
in the same run, so that a loaded machine lowers limit and measurement alike.

    python benchmarks/bench_hvp_roofline.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from timing import wall_times


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls (after a warm-up)."""
    return min(wall_times(fn, repeats))


def main() -> None:
    from influencekit import TorchObjective
    from influencekit.datasets import koh_liang_split, load_mnist

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    split = koh_liang_split(load_mnist(args.data_dir))
    square = torch.randn(4096, 4096)
    gemm_rate = 2 * 4096**3 / best(lambda: square @ square, args.repeats)
    big = torch.empty(128 * 2**20)  # 512 MB
    bandwidth = 2 * big.nbytes / best(big.clone, args.repeats)  # read + write
    big = square = None  # free before the models
    print(f"limits measured now: float32 GEMM {gemm_rate / 1e9:.1f} GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s (read + write)")
    torch.manual_seed(0)
    models = {
        "MLP 784-128-10, n=10,000": (nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10)), 10_000, lambda x: x),
        "CNN (all-conv tanh), n=5,500": (
            nn.Sequential(nn.Conv2d(1, 16, 3, stride=2), nn.Tanh(), nn.Conv2d(16, 16, 3, stride=2), nn.Tanh(), nn.Conv2d(16, 10, 3), MeanPool()),
            5_500,
            lambda x: x.reshape(-1, 1, 28, 28),
        ),
    }
    print("\n| model | p | HVP s (cached) | HVP s (jvp(grad)) | GFLOP per HVP | GFLOP/s (% of GEMM) | bytes read >= | GB/s (% of copy) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (model, n, shape) in models.items():
        data = (shape(split.x_train[:n].float()), split.y_train[:n])
        cached = TorchObjective(model, "cross_entropy", data, weight_decay=1e-3, chunk_size=1024)
        plain = TorchObjective(model, "cross_entropy", data, weight_decay=1e-3, chunk_size=1024, hvp_cache_mb=0)
        v = torch.randn(1, cached.dim)
        cached.hvp(v)
        saved = sum(cached._retained_gradient(cached._prepare(chunk))[1] for chunk in cached.train.chunks())
        read = saved + data[0].nbytes
        with FlopCounterMode(display=False) as counter:
            cached.hvp(v)
        flops = counter.get_total_flops()
        t_cached, t_plain = best(lambda: cached.hvp(v), args.repeats), best(lambda: plain.hvp(v), args.repeats)
        print(f"| {name} | {cached.dim:,} | {t_cached:.3f} | {t_plain:.3f} | {flops / 1e9:.2f} | {flops / t_cached / 1e9:.1f} ({100 * flops / t_cached / gemm_rate:.0f}%) "
              f"| {read / 1e6:.0f} MB | {read / t_cached / 1e9:.2f} ({100 * read / t_cached / bandwidth:.0f}%) |", flush=True)


if __name__ == "__main__":
    main()
