"""Cost of the input checks against the work they ride along with (issue 11).

The non-finite check of an in-memory training set runs once, on construction; the
fingerprint of a loader batch runs on every pass, beside that batch's forward pass.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_input_checks.py
"""

import time

import torch
from torch import nn

from influencekit.checks import batch_fingerprint, check_finite_batch


def best_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(55000, 784, dtype=torch.float64), torch.randint(0, 10, (55000,))
    batch = (x[:1024], y[:1024])
    model = nn.Sequential(nn.Linear(784, 500), nn.Tanh(), nn.Linear(500, 10)).double()
    print(f"check_finite_batch, 55000 x 784 float64 (sum, then a mask only if not finite): "
          f"{best_ms(lambda: check_finite_batch((x, y), 'training data')):.1f} ms")
    print(f"isfinite(x).all() on the same tensor (the mask way, for comparison): {best_ms(lambda: bool(torch.isfinite(x).all())):.1f} ms")
    print(f"batch_fingerprint, 1024 x 784: {best_ms(lambda: batch_fingerprint(batch)):.2f} ms")
    with torch.no_grad():
        print(f"forward of an MLP 784-500-10 on the same 1024 rows: {best_ms(lambda: model(batch[0])):.2f} ms")


if __name__ == "__main__":
    main()
