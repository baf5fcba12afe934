"""TracIn (Pruthi et al., 2020): influence of training examples by tracing gradient descent.

* :class:`TracInCP` -- exact per-example gradients over checkpoints.
* :class:`LastLayerTracIn` -- the same score restricted to one ``nn.Linear``
  layer, via ``(g . g')(a . a')`` per checkpoint.
* :func:`influence_embeddings` / :func:`write_influence_embeddings` -- vectors
  whose dot product is the TracIn score, optionally JL-projected, in memory or
  streamed to zarr / ``.npy``.

Searching them (FAISS top-k proponents / opponents, the exact last-layer factor index,
recall@k) lives in :mod:`influencekit.search`.

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
from influencekit._deprecation import alias_getattr
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
    "LastLayerTracIn",
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
    "write_influence_embeddings",
]

__getattr__ = alias_getattr(
    __name__,
    {name: f"influencekit.search:{name}" for name in
     ("IndexKind", "InnerProductIndex", "LastLayerFactorIndex", "RecallReport", "SearchResult", "recall_at_k")},
)
