"""TRAK on mnist-mlp against the number of models, the ridge and the ensemble estimator (issue 14, scratch study).

Step 1 (``features M K``): train M models on all 5,000 points as ``influencekit evaluate --workload mnist-mlp``
does (seeds 1000..1000+M-1, one batched run) and save each model's TRAK features (k = K) for the 100 test
and 50 validation images of the reduced run. Step 2 (``analyse K``): for each relative damping and each
number of models, the LDS on the reduced run's subsets (``subsets.npz`` of an evaluate run with
``--test-size 100 --val-test-size 50``) of (a) the mean of the per-model scores and (b) TRAK's estimator,
mean kernel times mean Q, with its held-out (validation) LDS.

    python benchmarks/trak_ensemble_scan.py features 20 1024 --work /tmp/trak_scan
    python benchmarks/trak_ensemble_scan.py analyse 1024 --work /tmp/trak_scan --subsets /tmp/eval-mlp-trak/subsets.npz
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import numpy as np
import torch

from influencekit.evaluation import linear_datamodeling_score
from influencekit.experiments.evaluate import EvaluateConfig
from influencekit.experiments.evaluate_network import _prepare, _train_full
from influencekit.scores.trak import TRAKFeatures, margin_objective, project_margins

DAMPINGS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)


def features(models: int, k: int, work: Path, data_dir: Path) -> None:
    config = EvaluateConfig(out=work, workload="mnist-mlp", data_dir=data_dir, test_size=100, val_test_size=50,
                            ensemble_size=models, warm_epochs=0)
    torch.manual_seed(config.seed)
    workload, x, y, tests, val_tests = _prepare(config)
    start = time.perf_counter()
    members = _train_full(workload, x, y, [config.seed + 1000 + j for j in range(models)])
    print(f"{models} models in {time.perf_counter() - start:.0f} s", flush=True)
    for j, net in enumerate(members):
        path = work / f"member_{j}_k{k}.npz"
        if path.exists():
            continue
        start = time.perf_counter()
        objective = margin_objective(net.module, (x, y))
        fitted = TRAKFeatures.compute(objective, k, seed=0)
        phi_test, _ = project_margins(objective, tests, fitted.projection)
        phi_val, _ = project_margins(objective, val_tests, fitted.projection)
        np.savez(path, train=fitted.train.numpy(), q=fitted.out_to_loss.numpy(), test=phi_test.numpy(), val=phi_val.numpy())
        print(f"member {j}: {time.perf_counter() - start:.0f} s", flush=True)


def analyse(k: int, work: Path, subsets: Path) -> None:
    arrays = np.load(subsets)
    files = sorted(glob.glob(str(work / f"member_*_k{k}.npz")), key=lambda f: int(Path(f).name.split("_")[1]))
    kernels = {(r, split): [] for r in DAMPINGS for split in ("test", "val")}
    weights = []
    for name in files:
        member = np.load(name)
        phi = torch.from_numpy(member["train"]).double()
        eigenvalues, vectors = torch.linalg.eigh(phi.T @ phi)
        rotated, mean = phi @ vectors, float(eigenvalues.sum()) / phi.shape[1]
        for r in DAMPINGS:
            for split in ("test", "val"):
                coefficients = (torch.from_numpy(member[split]) @ vectors) / (eigenvalues + r * mean)
                kernels[r, split].append((coefficients @ rotated.T).numpy())
        weights.append(member["q"])

    def lds(scores, masks, actual):
        return linear_datamodeling_score(scores, masks, actual, n_bootstrap=0).lds

    print("models", len(files))
    for r in DAMPINGS:
        row = []
        for m in sorted({1, 5, 10, 15, 20, len(files)} & set(range(1, len(files) + 1))):
            per_model = np.mean([a * q for a, q in zip(kernels[r, "test"][:m], weights[:m])], 0)
            q = np.mean(weights[:m], 0)
            trak = np.mean(kernels[r, "test"][:m], 0) * q
            trak_val = np.mean(kernels[r, "val"][:m], 0) * q
            row.append(f"M={m}: mean of tau {lds(-per_model, arrays['masks'], arrays['actual']):.3f}, TRAK "
                       f"{lds(-trak, arrays['masks'], arrays['actual']):.3f} (held-out {lds(-trak_val, arrays['val_masks'], arrays['actual_val']):.3f})")
        print(f"relative damping {r}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("features", "analyse"))
    parser.add_argument("numbers", type=int, nargs="+", help="features: M K; analyse: K")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trak_scan"))
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data/mnist"))
    parser.add_argument("--subsets", type=Path, default=Path("/tmp/eval-mlp-trak/subsets.npz"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "features":
        features(*args.numbers, args.work, args.data_dir)
    else:
        analyse(args.numbers[0], args.work, args.subsets)
