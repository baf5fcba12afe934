"""TracIn (Pruthi et al., 2020): influence of training examples by tracing gradient descent.

* :class:`TracInCP` -- exact per-example gradients over checkpoints.
* :class:`LastLayerTracIn` -- the same score restricted to one ``nn.Linear``
  layer, via ``(g . g')(a . a')`` per checkpoint.
* :func:`influence_embeddings` / :func:`write_influence_embeddings` -- vectors
  whose dot product is the TracIn score, optionally JL-projected, in memory or
  streamed to zarr / ``.npy``.
* :class:`InnerProductIndex` -- FAISS top-k proponents/opponents and recall@k.
* :class:`LastLayerFactorIndex` -- exact last-layer top-k from the factors (g, a),
  a tenth of the embeddings' memory and query time on MNIST.

Sign convention: a positive score means the training example's gradient steps
reduced the test loss (proponent); negative means they increased it (opponent).
"""

from influencekit.tracin.embeddings import (
    GaussianProjection,
    embedding_dim,
    influence_embeddings,
    iter_embedding_chunks,
    jl_min_dimension,
    jl_pair_failure_probability,
    open_embeddings,
    write_influence_embeddings,
)
from influencekit.tracin.factor_index import LastLayerFactorIndex
from influencekit.tracin.index import IndexKind, InnerProductIndex, RecallReport, SearchResult, recall_at_k
from influencekit.tracin.tracincp import (
    Checkpoint,
    LastLayerTracIn,
    TracInCP,
    TracInData,
    TracInLossFn,
    TracInTopK,
    load_checkpoint,
)

__all__ = [
    "Checkpoint",
    "GaussianProjection",
    "IndexKind",
    "InnerProductIndex",
    "LastLayerFactorIndex",
    "LastLayerTracIn",
    "RecallReport",
    "SearchResult",
    "TracInCP",
    "TracInData",
    "TracInLossFn",
    "TracInTopK",
    "embedding_dim",
    "influence_embeddings",
    "iter_embedding_chunks",
    "jl_min_dimension",
    "jl_pair_failure_probability",
    "load_checkpoint",
    "open_embeddings",
    "recall_at_k",
    "write_influence_embeddings",
]
