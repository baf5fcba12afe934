"""Influence of perturbing a training input (Koh & Liang 2017, section 2.2).

Perturbing the input of training example z_i = (x_i, y_i) to x_i + delta moves
the trained parameters, and with them a test measurement m(z_test). Koh &
Liang's perturbation influence is

    I_pert,loss(z_i, z_test) = - grad_theta m(z_test)^T H^{-1} grad_x grad_theta l(z_i, theta)
                             = - grad_x [ s_test . grad_theta l(z_i, theta) ] ,

with s_test = H^{-1} grad_theta m(z_test) (H the curvature the solver inverts,
plus its damping) and l the training loss. It has the shape of x_i. The L2
term of the training loss does not depend on x, so it drops out.

Units and sign: by the implicit function theorem, re-training with x_i
replaced by x_i + delta changes the measurement by, to first order,

    m(z_test; theta_hat(delta)) - m(z_test; theta_hat) = (1/n) <I_pert,loss(z_i, z_test), delta>

(Koh & Liang's "upweight z_i + delta, downweight z_i by eps = 1/n"). So
-I_pert,loss points along the input change that lowers the test loss most;
positive components mean increasing that input coordinate raises the test
measurement.

The gradient over x of a directional derivative in theta is computed with
``torch.func`` (``grad`` of a ``jvp`` along s_test), vectorised over the
training examples and the test points with ``vmap``, in chunks of the
objective's ``chunk_size`` (training examples times test points).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from influencekit.data import Batch, map_batch
from influencekit.losses import cast_floats
from influencekit.linalg import check_directions
from influencekit.solvers.base import Solver
from influencekit.objectives.torch_objective import TorchObjective

InputKey = int | str | None


def perturbation_influence(
    objective: TorchObjective,
    solver: Solver,
    test_batch: Batch,
    train_indices: Sequence[int] | Tensor,
    input_key: InputKey = None,
) -> Tensor:
    """I_pert,loss(z_i, z_test) for every test example and each training index.

    Solves s_test = (H + damping)^{-1} grad m(z_test) with ``solver`` (use
    :func:`perturbation_influence_from_inverse_hvp` with
    ``InfluenceFunction.inverse_hvp_of_test`` to keep the solve's residuals or
    reuse it).

    Args:
        objective: the training objective at the trained parameters.
        solver: an iHVP solver for the objective's curvature.
        test_batch: m_test test examples (the measurement's gradients define s_test).
        train_indices: k training indices.
        input_key: which tensor of a training batch is the perturbed input;
            default ``batch[0]`` for tuple batches, ``batch["inputs"]`` for
            dict batches, the batch itself for a bare tensor.
    Returns:
        shape (m_test, k, *input_shape), the objective's dtype; (1/n) <result[t, j], delta>
        predicts the change of m(z_test_t) when input j is moved by delta and the
        model re-trained (see the module docstring).
    """
    inverse_hvp = solver.solve(objective.measurement_gradients(test_batch)).solution
    return perturbation_influence_from_inverse_hvp(objective, inverse_hvp, train_indices, input_key)


def perturbation_influence_from_inverse_hvp(
    objective: TorchObjective,
    inverse_hvp: Tensor,
    train_indices: Sequence[int] | Tensor,
    input_key: InputKey = None,
) -> Tensor:
    """-grad_x [ s . grad_theta l(z_i, theta) ] for each row s of ``inverse_hvp`` and each training index.

    Args:
        objective: the training objective at the trained parameters.
        inverse_hvp: s_test rows, shape (m_test, p).
        train_indices: k training indices.
        input_key: see :func:`perturbation_influence`.
    Returns:
        shape (m_test, k, *input_shape).
    """
    s_test = check_directions(inverse_hvp, objective.dim, "inverse_hvp").to(objective.dtype)
    indices = torch.as_tensor(train_indices).reshape(-1)
    batch = cast_floats(objective.train.gather(indices), objective.dtype)
    key = _resolve_key(batch, input_key)
    inputs = _get_input(batch, key)
    if not inputs.is_floating_point():
        raise TypeError(
            f"the perturbed training input must be a floating-point tensor, got {inputs.dtype} "
            "(e.g. token ids); choose input_key or perturb an embedding instead"
        )
    theta = objective.parameters_vector()

    def directional_derivative(x: Tensor, s: Tensor, example: Batch) -> Tensor:
        one = map_batch(lambda t: t.unsqueeze(0), _with_input(example, key, x))
        return jvp(lambda t: objective.losses(t, one)[0], (theta,), (s,))[1]

    per_example = vmap(grad(directional_derivative), in_dims=(0, None, 0))
    per_test_and_example = vmap(per_example, in_dims=(None, 0, None))
    rows = max(1, objective.chunk_size // s_test.shape[0])
    pieces = []
    for start in range(0, indices.numel(), rows):
        chunk = map_batch(lambda t: t[start : start + rows], batch)
        pieces.append(-per_test_and_example(_get_input(chunk, key), s_test, chunk))
    return torch.cat(pieces, dim=1)


def _resolve_key(batch: Batch, key: InputKey) -> InputKey:
    if key is not None:
        if isinstance(batch, Tensor):
            raise TypeError(f"the training batch is a single tensor; input_key must be None, got {key!r}")
        if isinstance(batch, Mapping) and key not in batch:
            raise KeyError(f"input_key {key!r} is not in the training batch; its keys are {list(batch)}")
        if isinstance(batch, (tuple, list)) and not (isinstance(key, int) and -len(batch) <= key < len(batch)):
            raise KeyError(f"input_key must index the training batch tuple of length {len(batch)}, got {key!r}")
        return key
    if isinstance(batch, Mapping):
        if "inputs" not in batch:
            raise KeyError(f"dict training batches need an 'inputs' entry or an input_key; keys are {list(batch)}")
        return "inputs"
    return None if isinstance(batch, Tensor) else 0


def _get_input(batch: Batch, key: InputKey) -> Tensor:
    return batch if key is None else batch[key]  # type: ignore[index,return-value]


def _with_input(batch: Batch, key: InputKey, x: Tensor) -> Batch:
    if key is None:
        return x
    if isinstance(batch, Mapping):
        return {**batch, key: x}
    position = key % len(batch)  # type: ignore[operator,arg-type]
    return type(batch)(x if i == position else t for i, t in enumerate(batch))  # type: ignore[arg-type]
