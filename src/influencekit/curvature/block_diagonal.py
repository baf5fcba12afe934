"""Block-diagonal approximations of any curvature operator.

Given a partition of the p coordinates of theta into blocks b_1, ..., b_m
(parameter tensors, modules or user-defined groups of parameters), the
block-diagonal approximation of a curvature M keeps the diagonal blocks
M_{b b} and zeroes every coupling between blocks:

    (M_bd v)_b = M_{b b} v_b   for every block b.

Weight decay lambda I of the wrapped operator is diagonal, so it is kept
exactly. Its inverse is the block-wise inverse, so each block can be solved
on its own (:class:`influencekit.solvers.block_diagonal.BlockDiagonalSolver`).

Blocks are given as a mapping ``{name: indices}`` or a sequence of indices
(named "0", "1", ...), each entry a slice over theta, a 1-D integer tensor or
sequence of coordinates, or a boolean mask of length p. Together they must
cover every coordinate exactly once. :func:`blocks_per_tensor`,
:func:`blocks_per_module` and :func:`blocks_from_groups` build them from a
:class:`~influencekit.parameters.ParameterSpace`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from influencekit.curvature.base import CurvatureOperator
from influencekit.linalg import check_directions, check_mini_batches
from influencekit.parameters import ParameterSpace

BlockIndices = Union[slice, Tensor, Sequence[int]]
BlockSpec = Union[Mapping[str, BlockIndices], Sequence[BlockIndices]]


def blocks_per_tensor(space: ParameterSpace) -> dict[str, Tensor]:
    """One block per attributed parameter tensor, named by the parameter ("0.weight", ...)."""
    return {name: torch.arange(s.start, s.stop) for name, s in space.offsets().items()}


def blocks_per_module(model: nn.Module, space: ParameterSpace) -> dict[str, Tensor]:
    """One block per module owning attributed parameters, e.g. "0.weight" and "0.bias" -> block "0".

    The owner of parameter "a.b.weight" is the module "a.b" (the module that
    registers it); parameters registered on ``model`` itself form the block
    named "" (PyTorch's name of the root module). Blocks are ordered by the
    first of their parameters in theta.

    Args:
        model: the module ``space`` was built from.
        space: the attributed parameters.
    """
    parameters = dict(model.named_parameters())
    groups: dict[str, list[str]] = {}
    for name in space.names:
        if name not in parameters:
            raise KeyError(f"parameter {name!r} of the parameter space is not a parameter of the model")
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return blocks_from_groups(space, groups)


def blocks_from_groups(space: ParameterSpace, groups: Mapping[str, Sequence[str]]) -> dict[str, Tensor]:
    """Blocks from user-defined groups of parameter names.

    Args:
        space: the attributed parameters.
        groups: ``{block name: [parameter names]}``; every attributed parameter
            must belong to exactly one group (attribute fewer parameters with
            ``TorchObjective(params=...)`` instead of leaving some out).
    Returns:
        ``{block name: coordinates of theta}``, the coordinates of a block in
        the order its parameters are listed.
    """
    offsets = space.offsets()
    owner: dict[str, str] = {}
    blocks: dict[str, Tensor] = {}
    for group, names in groups.items():
        if isinstance(names, str):
            raise TypeError(f"group {group!r} must be a list of parameter names, got the string {names!r}")
        if not names:
            raise ValueError(f"group {group!r} is empty")
        for name in names:
            if name not in offsets:
                raise KeyError(
                    f"group {group!r} names {name!r}, which is not an attributed parameter; those are {list(space.names)}"
                )
            if name in owner:
                raise ValueError(f"parameter {name!r} is in both group {owner[name]!r} and group {group!r}")
            owner[name] = group
        blocks[group] = torch.cat([torch.arange(offsets[n].start, offsets[n].stop) for n in names])
    missing = [name for name in space.names if name not in owner]
    if missing:
        raise ValueError(f"parameters {missing} belong to no group; every attributed parameter needs one")
    return blocks


def normalize_blocks(blocks: BlockSpec, dim: int) -> dict[str, Tensor]:
    """``{name: int64 coordinates, in the order given}`` from a block specification, checked to partition range(dim)."""
    items = list(blocks.items()) if isinstance(blocks, Mapping) else [(str(i), b) for i, b in enumerate(blocks)]
    if not items:
        raise ValueError("need at least one block")
    out: dict[str, Tensor] = {}
    seen = torch.zeros(dim, dtype=torch.long)
    for name, spec in items:
        index = _block_index(str(name), spec, dim)
        seen.index_add_(0, index, torch.ones_like(index))
        out[str(name)] = index
    if int(seen.max()) > 1:
        raise ValueError(f"blocks overlap: {int((seen > 1).sum())} coordinate(s) belong to more than one block")
    if int(seen.min()) == 0:
        raise ValueError(f"blocks must cover theta: {int((seen == 0).sum())} of {dim} coordinate(s) belong to no block")
    return out


def _block_index(name: str, spec: BlockIndices, dim: int) -> Tensor:
    """The coordinates of one block as a non-empty 1-D int64 tensor within [0, dim)."""
    index = torch.arange(dim)[spec] if isinstance(spec, slice) else torch.as_tensor(spec)
    if index.numel() == 0:
        raise ValueError(f"block {name!r} is empty")
    if index.dim() != 1:
        raise ValueError(f"coordinates of block {name!r} must be a 1-D index, got shape {tuple(index.shape)}")
    if index.dtype == torch.bool:
        if index.shape != (dim,):
            raise ValueError(f"boolean mask of block {name!r} must have shape ({dim},), got {tuple(index.shape)}")
        index = index.nonzero().squeeze(1)
        if index.numel() == 0:
            raise ValueError(f"block {name!r} is empty")
    elif index.is_floating_point() or index.is_complex():
        raise TypeError(f"coordinates of block {name!r} must be integers, got {index.dtype}")
    index = index.long()
    if int(index.min()) < 0 or int(index.max()) >= dim:
        raise IndexError(f"block {name!r} has coordinates outside [0, {dim})")
    return index


class BlockDiagonalOperator(CurvatureOperator):
    """The block-diagonal part M_bd of a curvature operator M (see the module docstring).

    ``matvec`` costs one call of M's ``matvec`` on k * m rows (the k vectors
    masked to each of the m blocks, stacked), so its memory grows with the
    number of blocks. ``sampled_matvec`` does the same with M's mini-batch
    products (every block of vector j sees mini-batch j); ``to_dense`` masks
    M's explicit matrix.

    Args:
        operator: the curvature M (p x p).
        blocks: a partition of range(p), see the module docstring.
    """

    def __init__(self, operator: CurvatureOperator, blocks: BlockSpec):
        self.operator = operator
        self.dim = operator.dim
        self.dtype = operator.dtype
        self.blocks = normalize_blocks(blocks, self.dim)
        owner = torch.empty(self.dim, dtype=torch.long)
        for b, index in enumerate(self.blocks.values()):
            owner[index] = b
        self.owner = owner
        self._masks = (owner.unsqueeze(0) == torch.arange(len(self.blocks)).unsqueeze(1)).to(self.dtype)  # (m, p)

    @property
    def n_train(self) -> int:
        """Number of training examples of the wrapped operator (needed by stochastic solvers)."""
        return self.operator.n_train  # type: ignore[attr-defined]

    def _stack(self, vectors: Tensor) -> Tensor:
        """(m * k, p): row b * k + j is vector j restricted to block b (zero elsewhere)."""
        return (self._masks.unsqueeze(1) * vectors.unsqueeze(0)).reshape(-1, self.dim)

    def _pick(self, products: Tensor, k: int) -> Tensor:
        """(k, p) from (m * k, p) products: each coordinate from the product of its own block."""
        return (products.reshape(len(self.blocks), k, self.dim) * self._masks.unsqueeze(1)).sum(dim=0)

    def matvec(self, vectors: Tensor) -> Tensor:
        """Rows M_bd v_j; vectors (k, p) -> (k, p)."""
        vectors = check_directions(vectors, self.dim).to(self.dtype)
        return self._pick(self.operator.matvec(self._stack(vectors)), vectors.shape[0])

    def sampled_matvec(self, indices: Tensor, vectors: Tensor) -> Tensor:
        """Rows (M_{B_j})_bd v_j; indices (k, B), or (g, B) shared by groups of k / g rows; vectors (k, p) -> (k, p)."""
        if not hasattr(self.operator, "sampled_matvec"):
            raise TypeError(f"{type(self.operator).__name__} has no mini-batch products (sampled_matvec)")
        vectors = check_directions(vectors, self.dim).to(self.dtype)
        indices = check_mini_batches(indices, vectors.shape[0], expand=False)
        stacked_indices = indices.repeat(len(self.blocks), 1)  # row b * k + j: the group of row j
        products = self.operator.sampled_matvec(stacked_indices, self._stack(vectors))
        return self._pick(products, vectors.shape[0])

    def to_dense(self, block: int = 512) -> Tensor:
        """The explicit (p, p) matrix: M's explicit matrix with every off-diagonal block zeroed."""
        same_block = self.owner.unsqueeze(0) == self.owner.unsqueeze(1)
        return self.operator.to_dense(block) * same_block.to(self.dtype)


class CurvatureBlock(CurvatureOperator):
    """One diagonal block M_{b b} + damping I of a curvature M, as an operator on R^{|b|}.

    ``matvec(W)`` with W of shape (k, |b|) embeds W into theta (zero outside
    b), applies M and keeps the coordinates of b. Each product costs one
    product with the full M.

    Args:
        operator: the curvature M (p x p).
        index: the coordinates b of theta, 1-D int64.
        damping: added to the block's diagonal (>= 0).
    """

    def __init__(self, operator: CurvatureOperator, index: Tensor, damping: float = 0.0):
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.operator = operator
        self.index = torch.as_tensor(index).long()
        self.damping = float(damping)
        self.dim = int(self.index.numel())
        self.dtype = operator.dtype

    @property
    def n_train(self) -> int:
        """Number of training examples of the wrapped operator (needed by stochastic solvers)."""
        return self.operator.n_train  # type: ignore[attr-defined]

    def _embed(self, vectors: Tensor) -> Tensor:
        full = torch.zeros(vectors.shape[0], self.operator.dim, dtype=self.dtype)
        full[:, self.index] = vectors
        return full

    def matvec(self, vectors: Tensor) -> Tensor:
        """Rows (M_{b b} + damping I) w_j; vectors (k, |b|) -> (k, |b|)."""
        vectors = check_directions(vectors, self.dim).to(self.dtype)
        return self.operator.matvec(self._embed(vectors))[:, self.index] + self.damping * vectors

    def sampled_matvec(self, indices: Tensor, vectors: Tensor) -> Tensor:
        """Rows ((M_{B_j})_{b b} + damping I) w_j; indices (k, B) or (g, B) (grouped), vectors (k, |b|) -> (k, |b|)."""
        if not hasattr(self.operator, "sampled_matvec"):
            raise TypeError(f"{type(self.operator).__name__} has no mini-batch products (sampled_matvec)")
        vectors = check_directions(vectors, self.dim).to(self.dtype)
        products = self.operator.sampled_matvec(indices, self._embed(vectors))
        return products[:, self.index] + self.damping * vectors
