"""Breakdown-free block CG against explicit float64 solves: one, many, dependent and more-than-p right-hand sides."""

import pytest
import torch

from influencekit.curvature import DenseOperator
from influencekit.solvers import BlockCGSolver, CGSolver, NotPositiveDefiniteError
from influencekit.solvers.block_cg import orthonormal_rows
from solver_problems import DAMPING, decaying_spd_operator as spd_operator, exact_solution, F64, ill_conditioned_hessian, random_rhs, relative_error


def dependent_rhs(p: int) -> torch.Tensor:
    """Five right-hand sides spanning only two directions (a rank-deficient block)."""
    v, w = random_rhs(2, p, seed=5)
    return torch.stack([v, 2 * v, v + w, w, -3 * w])


@pytest.mark.parametrize("make", [ill_conditioned_hessian, spd_operator])
@pytest.mark.parametrize("case", ["single", "several", "dependent", "more_than_p"])
def test_block_cg_equals_the_explicit_solve(make, case):
    curvature = make()
    p = curvature.dim
    rhs = {
        "single": random_rhs(1, p),
        "several": random_rhs(6, p),
        "dependent": dependent_rhs(p),
        "more_than_p": random_rhs(p + 13, p),
    }[case]
    result = BlockCGSolver(curvature, damping=DAMPING, rtol=1e-12).solve(rhs)
    assert result.solution.shape == rhs.shape
    assert relative_error(result.solution, exact_solution(curvature, DAMPING, rhs)) <= 1e-8
    assert bool(result.info["converged"].all())
    assert bool((result.relative_residuals(rhs) <= 1e-10).all())
    assert max(result.info["block_sizes"]) <= min(p, rhs.shape[0])


def test_more_right_hand_sides_than_parameters_take_a_single_full_block():
    curvature = spd_operator()
    result = BlockCGSolver(curvature, damping=DAMPING, rtol=1e-9).solve(random_rhs(45, curvature.dim))
    assert result.info["rhs_rank"] == result.info["block_sizes"][0] == curvature.dim  # the first block spans R^p
    assert int(result.iterations.max()) <= 2


def test_dependent_right_hand_sides_shrink_the_block():
    curvature = spd_operator()
    result = BlockCGSolver(curvature, damping=DAMPING, rtol=1e-12).solve(dependent_rhs(curvature.dim))
    assert result.info["rhs_rank"] == 2
    assert max(result.info["block_sizes"]) == 2
    # two independent directions: no slower than CG on one of them
    single = CGSolver(curvature, damping=DAMPING, rtol=1e-12).solve(dependent_rhs(curvature.dim)[3])
    assert int(result.iterations.max()) <= int(single.iterations[0])


def test_block_cg_needs_far_fewer_iterations_than_independent_cg():
    curvature = ill_conditioned_hessian()
    rhs = random_rhs(8, curvature.dim)
    independent = CGSolver(curvature, damping=DAMPING, rtol=1e-12).solve(rhs)
    block = BlockCGSolver(curvature, damping=DAMPING, rtol=1e-12).solve(rhs)
    assert relative_error(block.solution, independent.solution) <= 1e-8
    assert int(block.iterations.max()) * 3 <= int(independent.iterations.min())


def test_zero_right_hand_side_rows_stay_zero():
    curvature = spd_operator()
    rhs = random_rhs(3, curvature.dim)
    rhs[1] = 0.0
    result = BlockCGSolver(curvature, damping=DAMPING, rtol=1e-12).solve(rhs)
    assert torch.equal(result.solution[1], torch.zeros(curvature.dim, dtype=F64))
    assert int(result.iterations[1]) == 0
    assert relative_error(result.solution[[0, 2]], exact_solution(curvature, DAMPING, rhs[[0, 2]])) <= 1e-8


def test_iteration_cap_reports_unconverged_rows():
    curvature = ill_conditioned_hessian()
    rhs = random_rhs(2, curvature.dim)
    result = BlockCGSolver(curvature, damping=DAMPING, rtol=1e-12, maxiter=3).solve(rhs)
    assert result.iterations.tolist() == [3, 3]
    assert not bool(result.info["converged"].any())
    assert result.info["residual_history"].shape == (4, 2)


def test_indefinite_curvature_is_reported():
    matrix = torch.diag(torch.tensor([2.0, 1.0, -1.0, 0.5], dtype=F64))
    with pytest.raises(NotPositiveDefiniteError):
        BlockCGSolver(DenseOperator(matrix), damping=0.0).solve(torch.ones(2, 4, dtype=F64))


def test_orthonormal_rows_drops_dependent_directions():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 10, generator=gen, dtype=F64)
    block = torch.cat([base, base[:1] * 1e-9 + base[1:2], torch.zeros(1, 10, dtype=F64), base.sum(0, keepdim=True)])
    basis = orthonormal_rows(block, drop_tol=1e-12)
    assert basis.shape == (3, 10)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3, dtype=F64), rtol=0, atol=1e-13)
    projector = basis.T @ basis
    torch.testing.assert_close(base @ projector, base, rtol=0, atol=1e-12)
    assert orthonormal_rows(torch.zeros(2, 10, dtype=F64), 1e-12).shape == (0, 10)


def test_orthonormal_rows_of_wide_and_tall_blocks_span_what_the_svd_spans():
    # a wide block (m < p: QR, then the SVD of R) of rank 5 and a tall one (m > p: the SVD itself)
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(8, 5, generator=gen, dtype=F64) @ torch.randn(5, 40, generator=gen, dtype=F64)
    tall = torch.randn(12, 3, generator=gen, dtype=F64) @ torch.randn(3, 6, generator=gen, dtype=F64)
    for block, rank in ((wide, 5), (tall, 3)):
        basis = orthonormal_rows(block, drop_tol=1e-10)
        _, s, vh = torch.linalg.svd(block / block.norm(dim=1, keepdim=True), full_matrices=False)
        reference = vh[s > 1e-10 * s[0]]
        assert basis.shape == (rank, block.shape[1]) == reference.shape
        torch.testing.assert_close(basis @ basis.T, torch.eye(rank, dtype=F64), rtol=0, atol=1e-13)
        torch.testing.assert_close(basis.T @ basis, reference.T @ reference, rtol=0, atol=1e-12)
        torch.testing.assert_close(block @ basis.T @ basis, block, rtol=0, atol=1e-11)
