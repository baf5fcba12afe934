"""Arnoldi and Nystroem sketch-and-solve iHVPs against explicit float64 eigen-decompositions and solves."""

import pytest
import torch

from influencekit.curvature import DenseOperator
from influencekit.solvers import ArnoldiSolver, DirectSolver, NystromSketchSolver, randomized_nystrom
from solver_problems import DAMPING, decaying_spd_operator as spd_operator, exact_solution, F64, ill_conditioned_hessian, random_rhs, relative_error


OPERATORS = [ill_conditioned_hessian, spd_operator]


# -- full rank: exact ----------------------------------------------------------------------


@pytest.mark.parametrize("make", OPERATORS)
@pytest.mark.parametrize("k_extra", [-100, 0, 7])  # k = 1, k = p, k = p + 7
def test_full_rank_solvers_equal_the_explicit_solve(make, k_extra):
    curvature = make()
    p = curvature.dim
    rhs = random_rhs(max(1, p + k_extra), p)
    truth = exact_solution(curvature, DAMPING, rhs)
    arnoldi = ArnoldiSolver(curvature, rank=p, krylov_dim=p, damping=DAMPING)
    nystrom = NystromSketchSolver(curvature, rank=p, damping=DAMPING)
    for result in (arnoldi.solve(rhs), nystrom.solve(rhs)):
        assert result.solution.shape == rhs.shape
        assert relative_error(result.solution, truth) <= 1e-8
        assert bool((result.relative_residuals(rhs) <= 1e-9).all())
        assert result.iterations is None


def test_arnoldi_restarts_through_repeated_eigenvalues():
    curvature = ill_conditioned_hessian()
    solver = ArnoldiSolver(curvature, rank=curvature.dim, krylov_dim=curvature.dim, damping=DAMPING)
    assert solver.fit_info["restarts"] >= 1  # eigenvalue 1e-6 has multiplicity 12
    eigenvalues = torch.linalg.eigvalsh(curvature.to_dense())
    torch.testing.assert_close(solver.eigenvalues.sort().values, eigenvalues, rtol=1e-8, atol=1e-14)
    u = solver.eigenvectors
    torch.testing.assert_close(u.T @ u, torch.eye(curvature.dim, dtype=F64), rtol=0, atol=1e-12)


# -- lower rank: the documented approximations ---------------------------------------------


def test_arnoldi_top_eigenpairs_converge_from_a_short_krylov_space():
    curvature = spd_operator()
    solver = ArnoldiSolver(curvature, rank=4, krylov_dim=20)
    eigenvalues, eigenvectors = torch.linalg.eigh(curvature.matrix)
    torch.testing.assert_close(solver.eigenvalues, eigenvalues.flip(0)[:4], rtol=1e-9, atol=0)
    overlap = (solver.eigenvectors.T @ eigenvectors.flip(1)[:, :4]).abs()
    torch.testing.assert_close(overlap, torch.eye(4, dtype=F64), rtol=0, atol=1e-6)


def test_arnoldi_keeps_eigenvalues_by_magnitude_and_refuses_a_singular_projection():
    matrix = torch.diag(torch.tensor([3.0, -5.0, 1.0, 0.5, 0.0], dtype=F64))
    solver = ArnoldiSolver(DenseOperator(matrix), rank=2, krylov_dim=5)
    torch.testing.assert_close(solver.eigenvalues, torch.tensor([-5.0, 3.0], dtype=F64))
    assert solver.fit_info["negative_eigenvalues"] == 1
    with pytest.raises(ValueError, match="damping > 0"):
        ArnoldiSolver(DenseOperator(matrix), rank=5, krylov_dim=5)


@pytest.mark.parametrize("make", OPERATORS)
def test_low_rank_arnoldi_is_the_projection_onto_the_top_eigenvectors(make):
    """x = U_r (Lambda_r + damping)^{-1} U_r^T b: the part of b off span(U_r) is dropped."""
    curvature = make()
    p, rank = curvature.dim, curvature.dim // 2  # the top half of the spectrum is simple in both cases
    rhs = random_rhs(3, p)
    solver = ArnoldiSolver(curvature, rank=rank, krylov_dim=p, damping=DAMPING)
    eigenvalues, eigenvectors = torch.linalg.eigh(curvature.to_dense())
    top_values, top_vectors = eigenvalues.flip(0)[:rank], eigenvectors.flip(1)[:, :rank]
    expected = ((rhs @ top_vectors) / (top_values + DAMPING)) @ top_vectors.T
    result = solver.solve(rhs)
    assert relative_error(result.solution, expected) <= 1e-8
    # ... which is far from the exact iHVP, dominated by the small eigenvalues dropped
    assert relative_error(result.solution, exact_solution(curvature, DAMPING, rhs)) > 0.5


@pytest.mark.parametrize("make", OPERATORS)
def test_low_rank_nystrom_solves_its_own_approximation_exactly(make):
    curvature = make()
    p, rank = curvature.dim, curvature.dim // 3
    matrix = curvature.to_dense()
    rhs = random_rhs(3, p)
    solver = NystromSketchSolver(curvature, rank=rank, damping=DAMPING, seed=7)
    u, lam = solver.approximation.eigenvectors, solver.approximation.eigenvalues
    approximation = (u * lam) @ u.T
    # Nystroem never overestimates: M - M_nys is positive semi-definite
    assert float(torch.linalg.eigvalsh(matrix - approximation).min()) >= -1e-10 * float(lam[0])
    damped = approximation + DAMPING * torch.eye(p, dtype=F64)
    result = solver.solve(rhs)
    assert relative_error(result.solution, torch.linalg.solve(damped, rhs.T).T) <= 1e-8
    error = relative_error(result.solution, exact_solution(curvature, DAMPING, rhs))
    full = NystromSketchSolver(curvature, rank=p, damping=DAMPING, seed=7).solve(rhs).solution
    assert error > 1e-3 > 1e6 * relative_error(full, exact_solution(curvature, DAMPING, rhs))
    assert bool((result.relative_residuals(rhs) > 1e-6).any())


def test_nystrom_approximation_is_the_textbook_formula():
    """U Lambda U^T = (M Omega)(Omega^T M Omega)^{-1}(M Omega)^T for the seeded Gaussian Omega (range invariant to QR)."""
    curvature = spd_operator()
    rank, seed = 8, 3
    approximation = randomized_nystrom(curvature, rank, seed)
    omega = torch.randn(curvature.dim, rank, generator=torch.Generator().manual_seed(seed), dtype=F64)
    sketch = curvature.matrix @ omega
    textbook = sketch @ torch.linalg.solve(omega.T @ sketch, sketch.T)
    u, lam = approximation.eigenvectors, approximation.eigenvalues
    torch.testing.assert_close((u * lam) @ u.T, textbook, rtol=0, atol=1e-9 * float(lam[0]))
    assert bool((lam[:-1] >= lam[1:]).all()) and bool((lam >= 0).all())


def test_nystrom_needs_damping_and_a_valid_rank():
    curvature = spd_operator(p=6)
    with pytest.raises(ValueError, match="damping > 0"):
        NystromSketchSolver(curvature, rank=3, damping=0.0)
    with pytest.raises(ValueError, match="rank"):
        NystromSketchSolver(curvature, rank=7, damping=1.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        randomized_nystrom(DenseOperator(-torch.eye(6, dtype=F64)), 2)


def test_low_rank_errors_against_direct_shrink_with_rank():
    curvature = spd_operator()
    rhs = random_rhs(4, curvature.dim)
    direct = DirectSolver(curvature, damping=DAMPING).solve(rhs).solution
    arnoldi = [relative_error(ArnoldiSolver(curvature, rank=r, krylov_dim=curvature.dim, damping=DAMPING).solve(rhs).solution, direct) for r in (5, 15, 25)]
    nystrom = [relative_error(NystromSketchSolver(curvature, rank=r, damping=DAMPING).solve(rhs).solution, direct) for r in (5, 15, 25)]
    assert arnoldi[0] > arnoldi[1] > arnoldi[2]
    assert nystrom[0] > nystrom[1] > nystrom[2]


# -- persistence ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver_class", [ArnoldiSolver, NystromSketchSolver])
def test_save_load_round_trip_gives_identical_solutions(solver_class, tmp_path):
    curvature = ill_conditioned_hessian()
    solver = solver_class(curvature, rank=20, damping=DAMPING, seed=5)
    solver.save(tmp_path / "fit")
    rhs = random_rhs(3, curvature.dim)
    original = solver.solve(rhs)
    loaded = solver_class.load(tmp_path / "fit", curvature)
    again = loaded.solve(rhs)
    assert torch.equal(again.solution, original.solution)
    assert torch.equal(again.residual_norms, original.residual_norms)
    assert (loaded.rank, loaded.damping, loaded.seed) == (solver.rank, solver.damping, solver.seed)
    without_curvature = solver_class.load(tmp_path / "fit").solve(rhs)
    assert torch.equal(without_curvature.solution, original.solution)
    assert without_curvature.residual_norms is None


def test_load_checks_kind_and_dimension(tmp_path):
    curvature = spd_operator()
    ArnoldiSolver(curvature, rank=4).save(tmp_path / "arnoldi")
    with pytest.raises(ValueError, match="ArnoldiSolver"):
        NystromSketchSolver.load(tmp_path / "arnoldi")
    with pytest.raises(ValueError, match="p = 30"):
        ArnoldiSolver.load(tmp_path / "arnoldi", spd_operator(p=12))
