"""Benchmark of ``influencekit reproduce koh-liang-fig2-cnn`` (issue 13): wall time, peak memory, Pearson R.

Runs the command in a child process (so its peak resident memory is its own and
includes its Dask workers) and prints the seconds, the peak RSS and the
correlations of CG influence with the three retraining modes.

Usage: python benchmarks/bench_fig2_cnn.py --data-dir ../shared/data/mnist --out /tmp/fig2cnn [-- EXTRA CLI ARGS]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("extra", nargs="*", help="further arguments for the command (after --)")
    args = parser.parse_args()
    command = [sys.executable, "-m", "influencekit.cli", "reproduce", "koh-liang-fig2-cnn", "--data-dir", str(args.data_dir),
               "--out", str(args.out), "--no-progress", *args.extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest single child process
    results = json.loads((args.out / "results.json").read_text())
    print(f"command: {' '.join(command[1:])}")
    print(f"n_train {results['n_train']}, points {results['num_points']}, parameters {results['model']['parameters']}")
    print(f"||grad R|| {results['model']['train_grad_norm']:.3g}; Hessian eigenvalues [{results['hessian']['min_eig']:.4g}, "
          f"{results['hessian']['max_eig']:.4g}], {results['hessian']['negative']} negative")
    for mode, corr in results["correlations"].items():
        print(f"cg vs retrain ({mode}): Pearson {corr['pearson']:.4f}, Spearman {corr['spearman']:.4f}, "
              f"{results['retrain'][mode]['seconds']:.1f} s, max ||grad|| {results['retrain'][mode]['max_grad_norm']:.3g}")
    print(f"wall {seconds:.1f} s (results.json total_seconds {results['total_seconds']:.1f}); peak RSS of the largest process {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
