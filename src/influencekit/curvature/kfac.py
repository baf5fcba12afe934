"""K-FAC and EK-FAC: Kronecker-factored approximations of the Gauss-Newton matrix (the curvature; its inverse is
:class:`influencekit.solvers.KFACSolver`).

The generalised Gauss-Newton (GGN) of a :class:`~influencekit.objectives.TorchObjective` is

    G = (1/n) sum_i J_i^T H_i J_i + lambda I ,

with J_i the Jacobian of the model outputs of example i with respect to theta,
H_i the Hessian of the loss with respect to those outputs and lambda the weight
decay. Writing H_i = L_i L_i^T (cross-entropy on logits: L = diag(sqrt p) - p sqrt(p)^T,
squared error 0.5||o - y||^2: L = I), G is a sum of outer products of
*pseudo-gradients* J_i^T l_{ic}, one per column c of L_i.

For a layer with weight W (out, in) and bias b, let a be its input with a 1
appended (bias), and s_c the gradient of <outputs, l_c> with respect to the
layer's output (pre-activation). The pseudo-gradient of [W, b] is s_c a^T, and
the layer's GGN block is (1/n) sum_i sum_c (s_ic s_ic^T) kron (a_i a_i^T).
K-FAC (Martens & Grosse 2015) approximates it by S kron A with

    A = (1/n) sum_i a_i a_i^T ,   S = (1/n) sum_i sum_c s_ic s_ic^T ,

block-diagonally over layers. Convolutions (KFC, Grosse & Martens 2016) use the
im2col patches as a and sum over the T spatial locations t:
A = (1/n) sum_i sum_t a_it a_it^T and S = (1/n) sum_i (1/T) sum_t sum_c s_ict s_ict^T
(only the product S kron A matters; the 1/T puts the KFC normalisation on S).
Linear layers applied to inputs with extra leading dimensions (B, ..., in) are
treated the same way, the extra dimensions playing the role of locations.

With A = Q_A diag(l_A) Q_A^T and S = Q_S diag(l_S) Q_S^T, K-FAC is diagonal in
the Kronecker eigenbasis Q_S kron Q_A with eigenvalues l_S l_A^T. EK-FAC
(George et al. 2018) keeps that basis but replaces the eigenvalues by the exact
diagonal of the GGN block in it,

    Lambda[o, j] = (1/n) sum_i sum_c ((Q_S^T G_ic Q_A)[o, j])^2 ,  G_ic = sum_t s_ict a_it^T ,

which is the Frobenius-closest matrix to the GGN block among those diagonal in
that basis (so EK-FAC is never further from the exact block than K-FAC).

The inverse is applied in matrix form, without Kronecker products: a layer's
part of a vector, reshaped to V (out, in + 1) (the weight (out, in) row-major,
then the bias as the last column), maps to Q_S [(Q_S^T V Q_A) / (Lambda + lambda + damping)] Q_A^T.
The weight decay lambda of the objective is part of the approximated curvature
(as for :class:`~influencekit.curvature.HessianOperator`); ``damping`` (one
number, or one per layer) is added on top.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influencekit.curvature.base import CurvatureOperator
from influencekit.data import Batch, batch_size, index_batch
from influencekit.losses import BUILTIN_LOSSES, cast_floats
from influencekit.linalg import check_directions
from influencekit.persistence import load_saved, save_tensors

OutputHessianFactor = Callable[[Tensor, Batch], Tensor]
"""``factor(outputs, batch) -> L`` of shape (B, D, R) with D = outputs[0].numel() and H_out = L L^T."""

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
_SAVED_CLASS = "KFACCurvature"
_FORMAT_VERSION = 1


def cross_entropy_hessian_factor(outputs: Tensor, batch: Batch) -> Tensor:
    """L with L L^T = diag(p) - p p^T, p = softmax(logits); shape (B, C, C), column c = sqrt(p_c) (e_c - p)."""
    if outputs.dim() != 2:
        raise ValueError(f"cross-entropy K-FAC needs logits of shape (B, C), got {tuple(outputs.shape)}")
    p = torch.softmax(outputs, dim=1)
    root = p.sqrt()
    return torch.diag_embed(root) - p.unsqueeze(2) * root.unsqueeze(1)


def squared_error_hessian_factor(outputs: Tensor, batch: Batch) -> Tensor:
    """L = I (D x D) for the per-example loss 0.5 ||o - y||^2 summed over the D output entries."""
    d = outputs[0].numel()
    return torch.eye(d, dtype=outputs.dtype, device=outputs.device).expand(outputs.shape[0], d, d)


BUILTIN_OUTPUT_HESSIANS: dict[str, OutputHessianFactor] = {
    "cross_entropy": cross_entropy_hessian_factor,
    "squared_error": squared_error_hessian_factor,
}


@dataclass
class KFACFactors:
    """The fitted factors of one layer (all in the layout V (out, columns), columns = [weight inputs, bias]).

    Attributes:
        A: input covariance, shape (columns, columns).
        S: pseudo-gradient covariance, shape (out, out).
        eigenvalues_A, eigenvectors_A: A = Q_A diag(l_A) Q_A^T (eigenvalues clamped at 0).
        eigenvalues_S, eigenvectors_S: S = Q_S diag(l_S) Q_S^T (eigenvalues clamped at 0).
        corrected_eigenvalues: EK-FAC's diagonal of the GGN block in the basis Q_S kron Q_A,
            shape (out, columns), or None for plain K-FAC.
    """

    A: Tensor
    S: Tensor
    eigenvalues_A: Tensor
    eigenvectors_A: Tensor
    eigenvalues_S: Tensor
    eigenvectors_S: Tensor
    corrected_eigenvalues: Tensor | None = None

    def eigenvalues(self) -> Tensor:
        """The approximation's eigenvalues as a (out, columns) grid (EK-FAC's if corrected, else l_S l_A^T)."""
        if self.corrected_eigenvalues is not None:
            return self.corrected_eigenvalues
        return torch.outer(self.eigenvalues_S, self.eigenvalues_A)

    def dense(self) -> Tensor:
        """The layer's approximated GGN block, (out columns) x (out columns) in V's row-major order, without
        weight decay or damping: (Q_S kron Q_A) diag(eigenvalues) (Q_S kron Q_A)^T."""
        basis = torch.kron(self.eigenvectors_S, self.eigenvectors_A)
        return (basis * self.eigenvalues().reshape(-1)) @ basis.T

    _NAMES = ("A", "S", "eigenvalues_A", "eigenvectors_A", "eigenvalues_S", "eigenvectors_S", "corrected_eigenvalues")


@dataclass(frozen=True)
class KFACLayer:
    """A supported layer with attributed parameters, and where they sit in theta.

    Attributes:
        name: module name (key of ``damping`` dicts).
        module: the ``nn.Linear`` / ``nn.Conv2d``.
        weight: slice of theta holding the weight (row-major (out, in_features)), or None if not attributed.
        bias: slice of theta holding the bias, or None (no bias, or not attributed).
        out_features: rows of V.
        in_features: weight columns (in, or in_channels * kh * kw for convolutions).
    """

    name: str
    module: nn.Module
    weight: slice | None
    bias: slice | None
    out_features: int
    in_features: int

    @property
    def columns(self) -> int:
        """Columns of V: the weight's inputs (if attributed) and 1 for the bias (if attributed)."""
        return (self.in_features if self.weight is not None else 0) + (1 if self.bias is not None else 0)

    def gather(self, vectors: Tensor) -> Tensor:
        """This layer's part of each row of ``vectors`` (k, p) as V, shape (k, out, columns)."""
        k = vectors.shape[0]
        parts = []
        if self.weight is not None:
            parts.append(vectors[:, self.weight].reshape(k, self.out_features, self.in_features))
        if self.bias is not None:
            parts.append(vectors[:, self.bias].reshape(k, self.out_features, 1))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def scatter(self, blocks: Tensor, into: Tensor) -> None:
        """Write V blocks (k, out, columns) back into their positions of ``into`` (k, p)."""
        k = blocks.shape[0]
        if self.weight is not None:
            into[:, self.weight] = blocks[:, :, : self.in_features].reshape(k, -1)
        if self.bias is not None:
            into[:, self.bias] = blocks[:, :, -1]

    def theta_indices(self) -> Tensor:
        """Index into theta of every entry of V (out, columns), row-major: shape (out * columns,)."""
        parts = []
        if self.weight is not None:
            parts.append(torch.arange(self.weight.start, self.weight.stop).reshape(self.out_features, self.in_features))
        if self.bias is not None:
            parts.append(torch.arange(self.bias.start, self.bias.stop).reshape(self.out_features, 1))
        return torch.cat(parts, dim=1).reshape(-1)

    def inputs_to_columns(self, inputs: Tensor) -> Tensor:
        """The layer input as a (B, T, columns) tensor: per location, the weight's input and a 1 for the bias."""
        batch = inputs.shape[0]
        if isinstance(self.module, nn.Conv2d):
            if inputs.dim() != 4:
                raise ValueError(
                    f"K-FAC needs batched Conv2d inputs (B, C, H, W) in layer {self.name!r}, got {tuple(inputs.shape)}"
                )
            m = self.module
            if isinstance(m.padding, str) or m.padding_mode != "zeros":
                mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
                inputs = F.pad(inputs, m._reversed_padding_repeated_twice, mode=mode)
                padding: Any = 0
            else:
                padding = m.padding
            patches = F.unfold(inputs, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            columns = patches.transpose(1, 2)  # (B, T, C_in kh kw), weight's flattening order
        else:
            columns = inputs.reshape(batch, -1, inputs.shape[-1])
        pieces = [columns] if self.weight is not None else []
        if self.bias is not None:
            pieces.append(columns.new_ones(batch, columns.shape[1], 1))
        return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]

    def output_gradients_to_rows(self, grads: Tensor) -> Tensor:
        """Gradients at the layer output, shape (R, B, *output shape), as (R, B, T, out)."""
        r, b = grads.shape[:2]
        if isinstance(self.module, nn.Conv2d):
            return grads.reshape(r, b, self.out_features, -1).transpose(2, 3)
        return grads.reshape(r, b, -1, self.out_features)


def find_layers(model: nn.Module, space: Any) -> list[KFACLayer]:
    """The supported layers holding the attributed parameters of ``space``; raises if any parameter is elsewhere."""
    offsets = space.offsets()
    layers: list[KFACLayer] = []
    covered: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_LAYERS):
            continue
        prefix = f"{name}." if name else ""
        weight = offsets.get(prefix + "weight")
        bias = offsets.get(prefix + "bias") if module.bias is not None else None
        if weight is None and bias is None:
            continue
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise ValueError(f"K-FAC supports Conv2d with groups=1 only; layer {name!r} has groups={module.groups}")
            in_features = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            out_features = module.out_channels
        else:
            in_features, out_features = module.in_features, module.out_features
        layers.append(KFACLayer(name, module, weight, bias, out_features, in_features))
        covered.update(n for n, s in ((prefix + "weight", weight), (prefix + "bias", bias)) if s is not None)
    missing = [n for n in space.names if n not in covered]
    if missing:
        raise ValueError(
            f"K-FAC covers the weights and biases of nn.Linear and nn.Conv2d layers only; the attributed "
            f"parameters {missing} belong to no such layer. Restrict the attributed parameters with "
            f"TorchObjective(..., params=[...]) or use another solver."
        )
    return layers


class KFACCurvature(CurvatureOperator):
    """G_kfac + lambda I: the K-FAC (or, with ``eigenvalue_correction=True``, EK-FAC) approximation of the GGN.

    Fitting (one pass over the data for K-FAC, a second for EK-FAC's correction) happens
    on the first use, or by :meth:`fit`; :meth:`save` / :meth:`load` keep the factors.

    Args:
        objective: a :class:`~influencekit.objectives.TorchObjective` whose attributed
            parameters all belong to ``nn.Linear`` / ``nn.Conv2d`` layers (weights and biases).
        eigenvalue_correction: False: K-FAC; True: EK-FAC.
        chunk_size: examples per forward/backward pass while fitting (bounds memory).
        output_hessian: how the loss curves in the model outputs: "cross_entropy",
            "squared_error" or a callable ``(outputs, batch) -> L`` (B, D, R) with
            H_out = L L^T; default: inferred from the objective's built-in loss.
        factors: factors fitted earlier (what :meth:`load` passes), per layer name.
        fit_examples: estimate the factors (and EK-FAC's correction) from this many
            training examples drawn at random without replacement (seeded by ``seed``)
            instead of all n: the factors are means, so a subset of m examples gives
            the same scale with O(1/sqrt(m)) sampling error, for m/n of the fit's cost.
            None: all n.
        seed: seed of that draw.

    Attributes:
        layers: the :class:`KFACLayer` s, in the order of the model's modules.
        factors: per layer name, its :class:`KFACFactors` (None until fitted).
        n_examples, fit_seconds: of the fit.
    """

    SAVED_CLASS = _SAVED_CLASS

    def __init__(
        self,
        objective: Any,
        *,
        eigenvalue_correction: bool = False,
        chunk_size: int = 256,
        output_hessian: str | OutputHessianFactor | None = None,
        factors: Mapping[str, KFACFactors] | None = None,
        fit_examples: int | None = None,
        seed: int = 0,
    ):
        for attribute in ("model", "space", "outputs", "train"):
            if not hasattr(objective, attribute):
                raise TypeError(
                    f"K-FAC needs a TorchObjective (model, space, outputs, train), got {type(objective).__name__}"
                )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if fit_examples is not None and fit_examples < 1:
            raise ValueError(f"fit_examples must be >= 1 (or None for all), got {fit_examples}")
        self.fit_examples = None if fit_examples is None or fit_examples >= objective.n_train else int(fit_examples)
        self.seed = int(seed)
        self.objective = objective
        self.eigenvalue_correction = bool(eigenvalue_correction)
        self.chunk_size = int(chunk_size)
        self.output_hessian_name, self.output_hessian = _resolve_output_hessian(output_hessian, objective)
        self.layers = find_layers(objective.model, objective.space)
        self.dim = objective.space.dim
        self.dtype = objective.dtype
        self.device = objective.parameters_vector().device
        self.factors: dict[str, KFACFactors] | None = None if factors is None else dict(factors)
        self.n_examples: int | None = None if factors is None else objective.n_train
        self.fit_seconds: float | None = None if factors is None else 0.0

    # -- fitting -------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return "ekfac" if self.eigenvalue_correction else "kfac"

    def _batches(self):
        if self.fit_examples is not None:
            generator = torch.Generator().manual_seed(self.seed)
            indices = torch.randperm(self.objective.n_train, generator=generator)[: self.fit_examples].sort().values
            chunks = (self.objective.train.gather(indices[start : start + self.chunk_size])
                      for start in range(0, self.fit_examples, self.chunk_size))
        else:
            chunks = self.objective.train.chunks()
        for chunk in chunks:
            chunk = cast_floats(chunk, self.dtype)
            size = batch_size(chunk)
            for start in range(0, size, self.chunk_size):
                yield index_batch(chunk, slice(start, start + self.chunk_size)) if size > self.chunk_size else chunk

    def _layer_statistics(self, batch: Batch) -> tuple[int, dict[str, tuple[Tensor, Tensor]]]:
        """One forward and a batched backward: per layer, a (B, T, columns) and s (R, B, T, out)."""
        records: dict[str, tuple[Tensor, Tensor]] = {}

        def make_hook(layer: KFACLayer):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
                if layer.name in records:
                    raise ValueError(
                        f"layer {layer.name!r} ran more than once in one forward pass; K-FAC does not "
                        f"support shared (tied) layers"
                    )
                inputs = args[0] if args else next(iter(kwargs.values()))
                records[layer.name] = (inputs.detach(), output)

            return hook

        handles = [layer.module.register_forward_hook(make_hook(layer), with_kwargs=True) for layer in self.layers]
        try:
            theta = self.objective.parameters_vector().detach().clone().requires_grad_(True)
            outputs = self.objective.outputs(theta, batch)
        finally:
            for handle in handles:
                handle.remove()
        if not isinstance(outputs, Tensor):
            raise TypeError(f"K-FAC needs the forward to return one tensor of outputs, got {type(outputs).__name__}")
        b = outputs.shape[0]
        factor = self.output_hessian(outputs.detach(), batch)
        if factor.dim() != 3 or factor.shape[0] != b or factor.shape[1] != outputs[0].numel():
            raise ValueError(
                f"the output Hessian factor must have shape (B, D, R) = ({b}, {outputs[0].numel()}, R), "
                f"got {tuple(factor.shape)}"
            )
        seeds = factor.permute(2, 0, 1).reshape(factor.shape[2], *outputs.shape).to(outputs.dtype)
        unused = [layer.name for layer in self.layers if layer.name not in records]
        if unused:
            raise ValueError(
                f"the forward hooks of layers {unused} never ran: their parameters are attributed but the module "
                f"was not called (e.g. its weight is used through a functional call, as in nn.MultiheadAttention); "
                f"K-FAC cannot see their inputs. Leave them out with TorchObjective(..., params=[...])"
            )
        layer_outputs = [records[layer.name][1] for layer in self.layers]
        grads = _batched_backward(outputs, layer_outputs, seeds)
        stats = {}
        for layer, out, grad in zip(self.layers, layer_outputs, grads):
            if grad is None:
                grad = out.new_zeros(seeds.shape[0], *out.shape)
            a = layer.inputs_to_columns(records[layer.name][0])
            stats[layer.name] = (a, layer.output_gradients_to_rows(grad.detach()))
        return b, stats

    def fit(self) -> "KFACCurvature":
        """Fit A and S of every layer (and EK-FAC's eigenvalues) over the training data; returns self."""
        start = time.perf_counter()
        options = {"dtype": self.dtype, "device": self.device}
        sums_a = {layer.name: torch.zeros(layer.columns, layer.columns, **options) for layer in self.layers}
        sums_s = {layer.name: torch.zeros(layer.out_features, layer.out_features, **options) for layer in self.layers}
        n = 0
        for batch in self._batches():
            size, stats = self._layer_statistics(batch)
            n += size
            for name, (a, s) in stats.items():
                sums_a[name] += torch.einsum("bti,btj->ij", a, a)
                sums_s[name] += torch.einsum("rbto,rbtq->oq", s, s) / s.shape[2]
        factors = {}
        for layer in self.layers:
            a_matrix = _symmetric(sums_a[layer.name] / n)
            s_matrix = _symmetric(sums_s[layer.name] / n)
            eigenvalues_a, eigenvectors_a = torch.linalg.eigh(a_matrix)
            eigenvalues_s, eigenvectors_s = torch.linalg.eigh(s_matrix)
            factors[layer.name] = KFACFactors(  # contiguous, as after a save/load round trip (same kernels, same bits)
                a_matrix.contiguous(),
                s_matrix.contiguous(),
                eigenvalues_a.clamp_min(0).contiguous(),
                eigenvectors_a.contiguous(),
                eigenvalues_s.clamp_min(0).contiguous(),
                eigenvectors_s.contiguous(),
            )
        if self.eigenvalue_correction:
            bases = {name: (f.eigenvectors_A, f.eigenvectors_S) for name, f in factors.items()}
            for name, mean in self._mean_rotated_squares(bases).items():
                factors[name].corrected_eigenvalues = mean.contiguous()
        self.factors, self.n_examples = factors, n
        self.fit_seconds = time.perf_counter() - start
        return self

    def exact_diagonal(self) -> Tensor:
        """The exact diagonal of the GGN plus weight decay, (1/n) sum_i sum_c (J_i^T l_ic)^2 + lambda, shape (p,).

        One pass over the data with the same statistics as the fit: per layer, the squared
        pseudo-gradients G_ic = sum_t s_ict a_it^T summed over examples and seeds (EK-FAC's
        correction in the standard basis). Exact for every supported layer, convolutions
        included; independent of the fitted factors and of ``damping``. A Jacobi
        preconditioner for CG: ``JacobiPreconditioner.from_diagonal(curvature.exact_diagonal(), damping)``.
        """
        means = self._mean_rotated_squares({layer.name: (None, None) for layer in self.layers})
        diagonal = torch.full((self.dim,), self.objective.weight_decay, dtype=self.dtype, device=self.device)
        for layer in self.layers:
            diagonal[layer.theta_indices()] += means[layer.name].reshape(-1)
        return diagonal

    def _mean_rotated_squares(self, bases: Mapping[str, tuple[Tensor | None, Tensor | None]]) -> dict[str, Tensor]:
        """Per layer, (1/n) sum_i sum_c ((Q_S^T G_ic Q_A)[o, j])^2 over one pass, bases {name: (Q_A, Q_S)}, shape (out, columns).

        A basis of None is the standard one (no rotation).
        """
        sums = {
            layer.name: torch.zeros(layer.out_features, layer.columns, dtype=self.dtype, device=self.device)
            for layer in self.layers
        }
        n = 0
        for batch in self._batches():
            size, stats = self._layer_statistics(batch)
            n += size
            for name, (a, s) in stats.items():
                sums[name] += _rotated_squares(a, s, *bases[name])
        return {name: total / n for name, total in sums.items()}

    def _fitted(self) -> dict[str, KFACFactors]:
        if self.factors is None:
            self.fit()
        assert self.factors is not None
        return self.factors

    # -- applying the approximation --------------------------------------------------------
    def in_eigenbasis(self, vectors: Tensor, scale: Callable[[KFACLayer, Tensor], Tensor]) -> Tensor:
        """Rows Q diag-op Q^T v: each layer's block V rotated to Q_S^T V Q_A, mapped by ``scale(layer, rotated)``
        (elementwise in the eigenbasis) and rotated back; ``vectors`` (k, p) -> (k, p)."""
        factors = self._fitted()
        vectors = check_directions(vectors, self.dim).to(self.dtype)
        result = torch.empty_like(vectors)
        for layer in self.layers:
            f = factors[layer.name]
            v = layer.gather(vectors)
            rotated = f.eigenvectors_S.T @ v @ f.eigenvectors_A
            layer.scatter(f.eigenvectors_S @ scale(layer, rotated) @ f.eigenvectors_A.T, result)
        return result

    def matvec(self, vectors: Tensor) -> Tensor:
        """The approximation times each row of ``vectors`` (k, p): (G_kfac + lambda I) v."""
        factors = self._fitted()
        decay = self.objective.weight_decay
        return self.in_eigenbasis(vectors, lambda layer, rotated: rotated * (factors[layer.name].eigenvalues() + decay))

    def eigenvalues(self) -> dict[str, Tensor]:
        """Per layer, the eigenvalues of G_kfac + lambda I in its Kronecker eigenbasis, shape (out, columns)."""
        factors = self._fitted()
        return {layer.name: factors[layer.name].eigenvalues() + self.objective.weight_decay for layer in self.layers}

    def to_dense(self, block: int = 512) -> Tensor:
        """The explicit approximation (p, p): block-diagonal over layers, plus lambda I."""
        factors = self._fitted()
        dense = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        for layer in self.layers:
            block = factors[layer.name].dense()
            index = layer.theta_indices()
            dense[index.unsqueeze(1), index.unsqueeze(0)] = 0.5 * (block + block.T)
        return dense + self.objective.weight_decay * torch.eye(self.dim, dtype=self.dtype, device=self.device)

    # -- persistence -----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
        """Write the fitted factors and the arguments (plus ``extra``, e.g. a solver's damping) to ``directory``."""
        factors = self._fitted()
        tensors = {}
        for index, layer in enumerate(self.layers):
            for field in KFACFactors._NAMES:
                value = getattr(factors[layer.name], field)
                if value is not None:
                    tensors[f"layer{index}.{field}"] = value
        space = self.objective.space
        arguments = {
            "class": _SAVED_CLASS,
            "version": _FORMAT_VERSION,
            "eigenvalue_correction": self.eigenvalue_correction,
            "chunk_size": self.chunk_size,
            "output_hessian": self.output_hessian_name,
            "layers": [layer.name for layer in self.layers],
            "parameter_names": list(space.names),
            "parameter_shapes": [list(shape) for shape in space.shapes],
            "n_examples": self.n_examples,
            "n_train": self.objective.n_train,
            "fit_seconds": self.fit_seconds,
            **(extra or {}),
        }
        return save_tensors(directory, tensors, arguments)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        objective: Any,
        *,
        output_hessian: str | OutputHessianFactor | None = None,
    ) -> KFACCurvature:
        """The approximation with the factors saved in ``directory``, for ``objective`` (same parameters and data size)."""
        return cls.from_saved(*load_saved(directory, _SAVED_CLASS), objective, output_hessian=output_hessian)

    @classmethod
    def from_saved(
        cls,
        tensors: Mapping[str, Tensor],
        arguments: Mapping[str, Any],
        objective: Any,
        *,
        output_hessian: str | OutputHessianFactor | None = None,
    ) -> KFACCurvature:
        """The approximation from what :meth:`save` wrote (as ``persistence.load_saved`` returns it), for ``objective``."""
        space = objective.space
        saved = (arguments["parameter_names"], arguments["parameter_shapes"])
        if saved != (list(space.names), [list(shape) for shape in space.shapes]):
            raise ValueError(
                f"the saved factors are for parameters {saved[0]} with shapes {saved[1]}, but the objective "
                f"attributes {list(space.names)} with shapes {[list(s) for s in space.shapes]}"
            )
        saved_n = arguments.get("n_train", arguments["n_examples"])
        if saved_n != objective.n_train:
            raise ValueError(f"the saved factors were fitted on a training set of {saved_n} examples, the objective has {objective.n_train}")
        layers = find_layers(objective.model, space)
        if [layer.name for layer in layers] != arguments["layers"]:
            raise ValueError(f"the saved layers {arguments['layers']} differ from {[l.name for l in layers]}")
        dtype, device = objective.dtype, objective.parameters_vector().device
        factors = {}
        for index, layer in enumerate(layers):  # clone: fresh aligned storage, so BLAS gives the same bits
            values = {f: tensors.get(f"layer{index}.{f}") for f in KFACFactors._NAMES}
            factors[layer.name] = KFACFactors(
                **{f: None if v is None else v.to(dtype).clone().to(device) for f, v in values.items()}
            )
        curvature = cls(
            objective,
            eigenvalue_correction=arguments["eigenvalue_correction"],
            chunk_size=arguments["chunk_size"],
            output_hessian=arguments["output_hessian"] if output_hessian is None else output_hessian,
            factors=factors,
        )
        curvature.fit_seconds, curvature.n_examples = arguments["fit_seconds"], arguments["n_examples"]
        return curvature


# -- helpers -------------------------------------------------------------------------------
def _resolve_output_hessian(output_hessian: Any, objective: Any) -> tuple[str | None, OutputHessianFactor]:
    if output_hessian is None:
        for name, loss in BUILTIN_LOSSES.items():
            if objective.loss is loss:
                return name, BUILTIN_OUTPUT_HESSIANS[name]
        raise ValueError(
            "K-FAC needs the Hessian of the loss in the model outputs: the objective's loss is not a built-in "
            "one, so pass output_hessian='cross_entropy' or 'squared_error', or a callable (outputs, batch) -> L "
            "(B, D, R) with H_out = L L^T"
        )
    if isinstance(output_hessian, str):
        if output_hessian not in BUILTIN_OUTPUT_HESSIANS:
            raise ValueError(f"unknown output_hessian {output_hessian!r}; built-in: {sorted(BUILTIN_OUTPUT_HESSIANS)}")
        return output_hessian, BUILTIN_OUTPUT_HESSIANS[output_hessian]
    if callable(output_hessian):
        return None, output_hessian
    raise TypeError(f"output_hessian must be a name or a callable, got {type(output_hessian).__name__}")


def _symmetric(matrix: Tensor) -> Tensor:
    return 0.5 * (matrix + matrix.T)


def _batched_backward(outputs: Tensor, layer_outputs: list[Tensor], seeds: Tensor) -> list[Tensor | None]:
    """Gradients of <outputs, seeds[r]> with respect to each layer output, for all r at once: (R, *shape)."""
    if not layer_outputs:
        return []
    try:
        grads = torch.autograd.grad(
            outputs, layer_outputs, seeds, is_grads_batched=True, allow_unused=True, retain_graph=True
        )
        return list(grads)
    except (RuntimeError, NotImplementedError):  # an op without a batching rule: one backward per seed
        per_seed = [
            torch.autograd.grad(outputs, layer_outputs, seed, allow_unused=True, retain_graph=True) for seed in seeds
        ]
        stacked: list[Tensor | None] = []
        for j, out in enumerate(layer_outputs):
            column = [g[j] for g in per_seed]
            stacked.append(None if column[0] is None else torch.stack(column))
        return stacked


def _rotated_squares(
    a: Tensor, s: Tensor, eigenvectors_a: Tensor | None, eigenvectors_s: Tensor | None, budget: int = 1 << 22
) -> Tensor:
    """sum over seeds r and examples b of (Q_S^T G_rb Q_A)^2, G_rb = sum_t s_rbt a_bt^T; shape (out, columns).

    A basis of None is the identity (the squares of G_rb itself).
    """
    a_rot = a if eigenvectors_a is None else a @ eigenvectors_a  # (B, T, columns)
    s_rot = s if eigenvectors_s is None else s @ eigenvectors_s  # (R, B, T, out)
    r, b, t, out = s_rot.shape
    columns = a_rot.shape[2]
    rows = s_rot.reshape(r * b, t, out)
    example = torch.arange(r * b, device=a.device) % b
    step = max(1, budget // max(1, out * columns))
    total = torch.zeros(out, columns, dtype=a.dtype, device=a.device)
    for start in range(0, r * b, step):
        part = slice(start, start + step)
        gradients = torch.einsum("nto,nti->noi", rows[part], a_rot[example[part]])
        total += (gradients * gradients).sum(dim=0)
    return total
