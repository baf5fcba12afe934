"""Benchmark: TracIn top-k proponents of one test point among MNIST training points, from prepared embeddings.

Embeddings: Koh & Liang's MNIST logistic regression W1 (55,000 training
points, float64 Newton-CG fit to ||grad R|| <= 1e-10, as in ``influencekit
experiment fastif-recall``), treated as the last linear layer of a model with
a single checkpoint (eta = 1): ``LastLayerTracIn`` on ``nn.Linear(784, 10,
bias=False)`` with W1 in float32, so g = p - e_y (10 values), a = x (784
pixels) and the influence embedding vec(g a^T) has 7,840 float32 entries; the
TracIn score is <e, e'> = (g . g')(a . a'). ``--model mlp`` instead trains
the ``tracin-mnist`` experiment's MLP (784-128-10, tanh, float32) by SGD on
the same 55,000 points, one checkpoint per epoch (``--epochs``, default 5),
and embeds its last layer ``fc2`` at every checkpoint: 5 x 10 x 129 = 6,450
entries, the sum over checkpoints of products as one dot product.
``--proj-dim D`` projects the embeddings to D dimensions with a seeded
Gaussian (JL) projection.

Printed: time to build the embeddings and indexes, the median query time (ms,
over ``--repeats`` queries) of the top-k proponents and opponents of test
point ``--test-index`` with the exact FAISS Flat (inner-product) index, the
largest deviation of the Flat scores from float64 TracIn scores, the same
search with the exact ``LastLayerFactorIndex`` (the factors g and a instead
of their 7,840 products: a tenth of the memory read per query), and for an
HNSW index its build time, median query time and recall@k against the Flat
index over ``--recall-queries`` test points. The numbers depend on the
machine and its load (FAISS uses all OpenMP threads unless ``--threads``).

Memory: the embeddings plus one copy per index (about 1.7 GB each for all
55,000 points unprojected). HNSW construction over 7,840-dimensional vectors
takes minutes; lower ``--ef-construction`` or use ``--proj-dim`` to shorten it,
or ``--skip-hnsw``.

Usage: ``python benchmarks/bench_tracin_topk.py --data-dir ../shared/data/mnist``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from influencekit.experiments.fastif_recall import fit_w1
from influencekit.search import InnerProductIndex, LastLayerFactorIndex
from influencekit.tracin import GaussianProjection, LastLayerTracIn, embedding_dim, influence_embeddings
from timing import wall_times


def cross_entropy_losses(model_call: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy of a batch (x, y)."""
    x, y = batch
    return F.cross_entropy(model_call(x), y, reduction="none")


def sgd_mlp_tracin(x: torch.Tensor, y: torch.Tensor, epochs: int, hidden: int) -> LastLayerTracIn:
    """The tracin-mnist experiment's MLP (784-hidden-10, tanh), float32, trained by its SGD on (x, y).

    One checkpoint per epoch (learning rate 0.1, batches of 32, weight decay 1e-3,
    seed 0: the experiment's defaults); TracIn over the last layer ``fc2`` of all of them.
    """
    import tempfile

    from influencekit.experiments.tracin_mnist import MLP, train_sgd

    torch.manual_seed(0)
    model = MLP(hidden)
    start = time.perf_counter()
    directory = Path(tempfile.mkdtemp(prefix="bench_tracin_"))
    records = train_sgd(model, x, y, epochs=epochs, learning_rate=0.1, batch_size=32, weight_decay=1e-3, seed=0,
                        checkpoint_dir=directory, progress=False)
    print(f"MLP 784-{hidden}-10 trained by SGD for {epochs} epochs in {time.perf_counter() - start:.1f} s "
          f"({epochs} checkpoints, learning rate 0.1 each)")
    return LastLayerTracIn(model, [r.path for r in records], [r.learning_rate for r in records], cross_entropy_losses,
                           layer="fc2", chunk_size=2048)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` calls (after one warm-up call)."""
    return 1e3 * statistics.median(wall_times(fn, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST directory")
    parser.add_argument("--train-size", type=int, default=None, help="first N training points only (default: all 55,000)")
    parser.add_argument("--model", choices=["w1", "mlp"], default="w1",
                        help="w1: Koh & Liang's logistic regression as a one-checkpoint last layer (default); mlp: the "
                             "tracin-mnist MLP trained by SGD on the same 55,000 points, last layer over --epochs checkpoints")
    parser.add_argument("--epochs", type=int, default=5, help="--model mlp: SGD epochs = checkpoints (default 5)")
    parser.add_argument("--hidden", type=int, default=128, help="--model mlp: hidden units (default 128)")
    parser.add_argument("--test-index", type=int, default=8, help="test point of the timed queries (default 8)")
    parser.add_argument("--k", type=int, default=10, help="proponents/opponents per query (default 10)")
    parser.add_argument("--repeats", type=int, default=100, help="timed queries (default 100)")
    parser.add_argument("--proj-dim", type=int, default=0, help="JL projection dimension (default 0: unprojected, exact)")
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: FAISS's own)")
    parser.add_argument("--skip-hnsw", action="store_true", help="only the exact Flat index")
    parser.add_argument("--hnsw-m", type=int, default=16, help="HNSW graph degree (default 16)")
    parser.add_argument("--ef-construction", type=int, default=64, help="HNSW build beam width (default 64)")
    parser.add_argument("--ef-search", type=int, default=64, help="HNSW query beam width (default 64)")
    parser.add_argument("--recall-queries", type=int, default=100, help="test points for the HNSW recall (default 100)")
    args = parser.parse_args()
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)

    start = time.perf_counter()
    w1 = fit_w1(args.data_dir, args.train_size)
    n = w1.objective.n_train
    print(f"W1 fitted on n = {n:,} in {time.perf_counter() - start:.1f} s (||grad R|| = {w1.fit.gradient_norm:.1e})")

    if args.model == "w1":
        model = nn.Sequential(nn.Linear(784, 10, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(w1.fit.weights.float())
        tracin = LastLayerTracIn(model, [model.state_dict()], [1.0], cross_entropy_losses, layer="0", chunk_size=2048)
    else:
        tracin = sgd_mlp_tracin(w1.x_train.float(), w1.y_train, args.epochs, args.hidden)
    projection = None if args.proj_dim == 0 else GaussianProjection(embedding_dim(tracin), args.proj_dim, seed=0)
    start = time.perf_counter()
    train_embeddings = influence_embeddings(tracin, (w1.x_train.float(), w1.y_train), projection)
    embed_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    recall_points = rng.choice(w1.x_test.shape[0], size=args.recall_queries, replace=False)
    queries = [args.test_index, *recall_points.tolist()]
    query_embeddings = influence_embeddings(tracin, (w1.x_test[queries].float(), w1.y_test[queries]), projection)
    query = query_embeddings[:1]
    dim = train_embeddings.shape[1]
    print(f"embeddings: {n:,} x {dim} float32 ({train_embeddings.numel() * 4 / 2**30:.2f} GiB) in {embed_seconds:.1f} s"
          + ("" if projection is None else f" (JL projection from {embedding_dim(tracin)})"))
    print(f"FAISS threads: {faiss.omp_get_max_threads()}")

    start = time.perf_counter()
    flat = InnerProductIndex.from_array(train_embeddings, "flat")
    print(f"\nFlat index: built in {time.perf_counter() - start:.2f} s")
    pro_ms = median_ms(lambda: flat.proponents(query, args.k), args.repeats)
    opp_ms = median_ms(lambda: flat.opponents(query, args.k), args.repeats)
    print(f"  top-{args.k} proponents of test #{args.test_index}: median {pro_ms:.3f} ms over {args.repeats} queries")
    print(f"  top-{args.k} opponents  of test #{args.test_index}: median {opp_ms:.3f} ms")
    if projection is None:
        if args.model == "w1":
            x, y = w1.x_train, w1.y_train
            g = torch.softmax(x @ w1.fit.weights.T, dim=1)
            g[torch.arange(n), y] -= 1.0
            xt, yt = w1.x_test[args.test_index], int(w1.y_test[args.test_index])
            gt = torch.softmax(w1.fit.weights @ xt, dim=0)
            gt[yt] -= 1.0
            exact = (g @ gt) * (x @ xt)  # float64 TracIn scores with the float64 W1
        else:  # the definition sum_c eta_c (g_c . g_c')(a_c . a_c') in float64, from the model's factors
            train_batch, test_batch = (w1.x_train.float(), w1.y_train), (w1.x_test[queries[:1]].float(), w1.y_test[queries[:1]])
            in_float64 = LastLayerFactorIndex.from_tracin(tracin, train_batch, dtype=np.float64)
            exact = torch.from_numpy(in_float64.scores(*LastLayerFactorIndex.query_factors(tracin, test_batch))[0])
            del in_float64
        found = flat.proponents(query, args.k)
        deviation = np.abs(found.scores[0] - exact[found.ids[0]].numpy()).max() / float(exact.abs().max())
        order = torch.topk(exact, args.k).indices.numpy()
        print(f"  max |Flat score - float64 TracIn| / max |TracIn| = {deviation:.1e}; same top-{args.k} set as "
              f"float64: {set(found.ids[0].tolist()) == set(order.tolist())}")

    start = time.perf_counter()
    factors = LastLayerFactorIndex.from_tracin(tracin, (w1.x_train.float(), w1.y_train))
    factor_build = time.perf_counter() - start
    query_factors = LastLayerFactorIndex.query_factors(tracin, (w1.x_test[queries[:1]].float(), w1.y_test[queries[:1]]))
    factor_ms = median_ms(lambda: factors.search(*query_factors, args.k), args.repeats)
    factor_pro, factor_opp = factors.search(*query_factors, args.k)
    flat_pro, flat_opp = flat.proponents(query, args.k), flat.opponents(query, args.k)
    print(f"\nLast-layer factor index (exact, {factors.nbytes / 2**20:.0f} MiB of factors): built in {factor_build:.2f} s")
    print(f"  top-{args.k} proponents and opponents together (one scoring pass): median {factor_ms:.3f} ms over "
          f"{args.repeats} queries; same proponent / opponent sets as Flat: "
          f"{set(factor_pro.ids[0].tolist()) == set(flat_pro.ids[0].tolist())} / "
          f"{set(factor_opp.ids[0].tolist()) == set(flat_opp.ids[0].tolist())}")

    if not args.skip_hnsw:
        start = time.perf_counter()
        hnsw = InnerProductIndex.from_array(
            train_embeddings, "hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search
        )
        build = time.perf_counter() - start
        hnsw_ms = median_ms(lambda: hnsw.proponents(query, args.k), args.repeats)
        report = hnsw.recall_vs(flat, query_embeddings[1:], args.k)
        print(f"\nHNSW index (M = {args.hnsw_m}, efConstruction = {args.ef_construction}, efSearch = {args.ef_search}): "
              f"built in {build:.1f} s")
        print(f"  top-{args.k} proponents: median {hnsw_ms:.3f} ms ({pro_ms / hnsw_ms:.1f}x the Flat speed)")
        print(f"  recall@{args.k} vs Flat over {report.n_queries} test points: proponents {report.proponent_recall:.3f}, "
              f"opponents {report.opponent_recall:.3f}")


if __name__ == "__main__":
    main()
