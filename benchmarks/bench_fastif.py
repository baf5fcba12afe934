"""Benchmark: FastIF on Koh & Liang's MNIST logistic regression (W1) -- kNN search speed-up and parallel s_test.

Part 1, FastIF top-m search. W1 (55,000 training points, float64, as in
``influencekit experiment fastif-recall``); s_test of each test point is
prepared by CG (relative residual 1e-10). Times, medians over ``--repeats``
runs per test point and then over ``--num-test`` test points: the top-m
search (most helpful, harmful and influential) among the ``--k`` nearest
training points by input distance (exact FAISS ``IndexFlatL2``) against
scoring all n points with the objective's full pass; the speed-up with and
without the kNN search; the same with FastIF's generic per-example-gradient
scoring on k and on n points (first test point); and recall@m of FastIF
against the full top-m. Then the same search with an approximate kNN index
(FAISS ``IndexIVFFlat`` over the inputs, at each of ``--ivf-nprobes``, or
``--approx-index hnsw`` at each of ``--hnsw-ef-search-values``): its search time,
the recall of the exact k nearest neighbours, the speed-up including the
search, and recall@m of FastIF with its candidates.

Part 2, parallel s_test. LiSSA with Koh & Liang's settings (scale 25, depth
5,000, batch 1, damping 0; ``--lissa-*`` to change) and T = ``--lissa-repeats``
chains for the first test point: the sequential ``LiSSA`` (all chains
vectorised in one process) against ``ParallelLiSSASolver`` on a local Dask cluster
of ``--workers`` single-threaded worker processes, with one chain per task and
with T / workers chains per task; median wall time over ``--lissa-runs`` solves
(cluster start-up and worker imports excluded and printed separately; each
solver sends the curvature and its data to the workers in its first solve,
included, and reuses them afterwards) and the
relative difference of the solutions (same seeds: ~1e-16 expected). The
sequential solver uses this process's torch threads (``--torch-threads``).

The numbers depend on the machine and its load. Usage:
``python benchmarks/bench_fastif.py --data-dir ../shared/data/mnist``
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from distributed import Client

from influencekit.curvature.hessian import HessianOperator
from influencekit.experiments.fastif_recall import _int_list, default_test_indices, fit_w1, time_speedup
from influencekit.scores.fastif import RECALL_KINDS, fastif_recall_table
from influencekit.search import KNNCandidateSelector
from influencekit.scores.influence import InfluenceFunction
from influencekit.cluster import local_cluster
from influencekit.solvers.parallel_lissa import ParallelLiSSASolver
from influencekit.solvers.base import Solver, SolveResult
from influencekit.solvers.cg import CGSolver
from influencekit.solvers.lissa import LiSSASolver


def median_solve(solver: Solver, rhs: torch.Tensor, runs: int) -> tuple[SolveResult, float]:
    """The last solve and the median wall time (s) of ``runs`` solves."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = solver.solve(rhs)
        times.append(time.perf_counter() - start)
    assert result is not None
    return result, statistics.median(times)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST directory")
    parser.add_argument("--train-size", type=int, default=None, help="first N training points only (default: all 55,000)")
    parser.add_argument("--num-test", type=int, default=10, help="test points: 8 and seeded random others (default 10)")
    parser.add_argument("--k", type=int, default=1000, help="kNN candidates (default 1000)")
    parser.add_argument("--m", type=int, default=10, help="top-m (default 10)")
    parser.add_argument("--repeats", type=int, default=20, help="timed searches per test point (default 20)")
    parser.add_argument("--approx-index", choices=["ivf", "hnsw"], default="ivf", help="approximate kNN index (default ivf)")
    parser.add_argument("--ivf-nlist", type=int, default=None, help="IVF lists (default 4 sqrt(n))")
    parser.add_argument("--ivf-nprobes", type=_int_list, default=[24, 32, 58],
                        help="comma-separated IVF lists probed per query, one line each (default 24,32,58)")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree (default 32)")
    parser.add_argument("--hnsw-ef-construction", type=int, default=128, help="HNSW build beam (default 128)")
    parser.add_argument("--hnsw-ef-search-values", type=_int_list, default=[64, 2000],
                        help="comma-separated HNSW search beams, one line each; the beam is max(this, k) (default 64,2000)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads of this process (default: torch's own)")
    parser.add_argument("--skip-parallel", action="store_true", help="skip part 2 (parallel s_test)")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    parser.add_argument("--lissa-repeats", type=int, default=10, help="LiSSA chains T (default 10)")
    parser.add_argument("--lissa-depth", type=int, default=5000, help="LiSSA recursion depth (default 5000)")
    parser.add_argument("--lissa-scale", type=float, default=25.0, help="LiSSA scale (default 25)")
    parser.add_argument("--lissa-batch", type=int, default=1, help="LiSSA mini-batch size (default 1)")
    parser.add_argument("--lissa-runs", type=int, default=3, help="timed solves per variant (default 3)")
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(f"torch threads in this process: {torch.get_num_threads()} (Dask workers: 1 each)")

    start = time.perf_counter()
    w1 = fit_w1(args.data_dir, args.train_size)
    n = w1.objective.n_train
    print(f"W1 fitted on n = {n:,} in {time.perf_counter() - start:.1f} s (||grad R|| = {w1.fit.gradient_norm:.1e})")
    test_indices = default_test_indices(args.num_test)
    test_batch = (w1.x_test[test_indices], w1.y_test[test_indices])
    cg = CGSolver(HessianOperator(w1.objective), rtol=1e-10, maxiter=2000)
    scores = InfluenceFunction(w1.objective, cg).scores(test_batch)
    selector = KNNCandidateSelector(w1.x_train)

    print(f"\n== FastIF top-{args.m} search, k = {args.k} of n = {n:,}, {len(test_indices)} test points ==")
    speed = time_speedup(w1, scores, selector, test_indices, args.k, args.m, args.repeats, progress=False)
    print(f"full scoring of all n (objective full pass):  {speed['full_seconds'] * 1e3:9.3f} ms")
    print(f"FastIF on k candidates (closed form):        {speed['fastif_seconds'] * 1e3:9.3f} ms")
    print(f"kNN search (IndexFlatL2, k = {args.k}):          {speed['knn_seconds'] * 1e3:9.3f} ms")
    print(f"speed-up: {speed['speedup']:.1f}x; including the kNN search: {speed['speedup_including_knn']:.1f}x")
    print(f"per-example-gradient scoring (first test point): k {speed['gradients_k_seconds'] * 1e3:.2f} ms, "
          f"n {speed['gradients_n_seconds'] * 1e3:.2f} ms, speed-up {speed['speedup_gradients']:.1f}x")
    table = fastif_recall_table(w1.objective, cg, test_batch, selector, test_batch[0], (args.m,), (args.k,), scores=scores, progress=False)
    means = table.mean()
    print(f"recall@{args.m} with k = {args.k}: " + ", ".join(f"{kind} {float(means[a, 0, 0]):.3f}" for a, kind in enumerate(RECALL_KINDS)))

    if args.approx_index == "hnsw":
        approximate = KNNCandidateSelector(w1.x_train, "hnsw", hnsw_m=args.hnsw_m, ef_construction=args.hnsw_ef_construction)
        settings = [("efSearch", v) for v in args.hnsw_ef_search_values]
        described = f"IndexHNSWFlat (M {args.hnsw_m}, efConstruction {args.hnsw_ef_construction}; beam max(efSearch, k))"
    else:
        approximate = KNNCandidateSelector(w1.x_train, "ivf", nlist=args.ivf_nlist)
        settings = [("nprobe", v) for v in args.ivf_nprobes]
        described = f"IndexIVFFlat ({approximate.nlist} lists)"
    print(f"\n== the same with an approximate kNN index: {described}, built in {approximate.build_seconds:.1f} s ==")
    print(f"(per setting: kNN and FastIF times, the full pass timed again, speed-up including the kNN search, "
          f"recall of the exact {args.k} nearest, recall@{args.m} of FastIF)")
    for name, value in settings:
        setattr(approximate, "ef_search" if name == "efSearch" else "nprobe", value)
        approx = time_speedup(w1, scores, approximate, test_indices, args.k, args.m, args.repeats, progress=False)
        table = fastif_recall_table(w1.objective, cg, test_batch, approximate, test_batch[0], (args.m,), (args.k,),
                                    scores=scores, progress=False)
        means = table.mean()
        print(f"{name} {value:4d}: kNN {approx['knn_seconds'] * 1e3:6.3f} ms + FastIF {approx['fastif_seconds'] * 1e3:6.3f} ms "
              f"vs full {approx['full_seconds'] * 1e3:7.3f} ms: {approx['speedup_including_knn']:5.1f}x; "
              f"neighbour recall {approximate.recall_vs(selector, test_batch[0], args.k):.3f}; recall@{args.m} "
              + ", ".join(f"{kind} {float(means[a, 0, 0]):.3f}" for a, kind in enumerate(RECALL_KINDS)))

    if args.skip_parallel:
        return
    t = args.lissa_repeats
    print(f"\n== s_test by LiSSA (scale {args.lissa_scale:g}, depth {args.lissa_depth}, batch {args.lissa_batch}, T = {t}) ==")
    curvature = HessianOperator(w1.objective)
    rhs = w1.objective.measurement_gradients((test_batch[0][:1], test_batch[1][:1]))
    settings = dict(scale=args.lissa_scale, depth=args.lissa_depth, repeats=t, batch_size=args.lissa_batch, seed=0)
    sequential, seq_seconds = median_solve(LiSSASolver(curvature, measure_residuals=False, progress=False, **settings), rhs, args.lissa_runs)
    print(f"sequential LiSSA (T chains vectorised, 1 process): {seq_seconds:8.2f} s; "
          f"relative difference to CG: {relative_difference(sequential.solution, scores.inverse_hvp.solution[:1]):.2e}")
    begin = time.perf_counter()
    with local_cluster(args.workers) as cluster, Client(cluster) as client:
        client.wait_for_workers(args.workers)
        print(f"Dask LocalCluster with {args.workers} workers started in {time.perf_counter() - begin:.1f} s (not counted below)")
        for per_task in sorted({1, max(1, t // args.workers)}):
            if t % per_task:
                continue
            solver = ParallelLiSSASolver(curvature, client=client, chains_per_task=per_task, measure_residuals=False, progress=False, **settings)
            parallel, par_seconds = median_solve(solver, rhs, args.lissa_runs)
            chain = parallel.info["chain_seconds"]
            print(f"parallel, {per_task} chain(s) per task: {par_seconds:8.2f} s (scatter {parallel.info['scatter_seconds']:.2f} s, "
                  f"task mean {float(chain.mean()):.2f} s); speed-up {seq_seconds / par_seconds:.2f}x; "
                  f"relative difference to sequential: {relative_difference(parallel.solution, sequential.solution):.1e}")


if __name__ == "__main__":
    main()
