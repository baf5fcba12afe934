"""In-place dense kernels (influencekit.linalg) and the per-process peak memory (influencekit.memory)."""

import multiprocessing

import pytest
import torch

from influencekit.linalg import PackedCholesky, matmul, symmetrize_, transposed_product
from influencekit.memory import peak_rss_mb


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_packed_cholesky_solves_and_multiplies_in_the_matrix_own_memory(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 150, generator=gen, dtype=torch.float64)
    matrix = (a @ a.T / 150).to(dtype)  # rank 150 < 200: singular, so only the shift makes it definite
    shift = 0.1
    rhs = torch.randn(3, 200, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(matrix.double() + shift * torch.eye(200, dtype=torch.float64), rhs.T).T
    buffer = matrix.clone()
    packed = PackedCholesky(buffer, shift=shift)
    assert packed.info == 0 and packed.buffer.data_ptr() == buffer.data_ptr()
    solution = packed.solve(rhs.to(dtype)).double()
    assert float((solution - expected).norm() / expected.norm()) <= tol
    product = packed.matvec(rhs.to(dtype)).double()  # M itself, without the shift, from the other triangle
    assert float((product - rhs @ matrix.double()).norm() / product.norm()) <= tol
    assert torch.equal(packed.solve(rhs.to(dtype)).double(), solution)  # the product left the factor intact


def test_packed_cholesky_reports_the_first_non_positive_minor():
    packed = PackedCholesky(torch.diag(torch.tensor([2.0, 1.0, -1.0, 4.0], dtype=torch.float64)))
    assert packed.info == 3
    assert PackedCholesky(torch.diag(torch.tensor([2.0, 1.0, -1.0, 4.0], dtype=torch.float64)), shift=1.5).info == 0


def test_symmetrize_in_place_equals_the_mean_with_the_transpose_across_tile_edges():
    matrix = torch.randn(130, 130, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = 0.5 * (matrix + matrix.T)
    result = symmetrize_(matrix, block=32)  # 130 = 4 full tiles and a ragged one
    assert result.data_ptr() == matrix.data_ptr() and torch.equal(result, expected)


def _child_peak(queue) -> None:
    queue.put(peak_rss_mb())


def test_a_spawned_process_reports_its_own_peak_not_its_parents():
    ballast = torch.ones(300 * 2**20 // 8, dtype=torch.float64)  # 300 MiB touched by this process
    parent = peak_rss_mb()
    context = multiprocessing.get_context("spawn")  # what Dask's local workers use
    queue = context.Queue()
    child = context.Process(target=_child_peak, args=(queue,))
    child.start()
    child_peak = queue.get(timeout=120)
    child.join()
    assert parent >= 300 and float(ballast[-1]) == 1.0
    assert child_peak < parent - 200


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matmul_of_a_transposed_operand_is_the_product(dtype):
    # a^T b through (b^T a)^T for a transposed view, the plain product otherwise; against a loop of dot products
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 7, generator=gen, dtype=dtype), torch.randn(50, 9, generator=gen, dtype=dtype)
    expected = torch.tensor([[float((a[:, i].double() * b[:, j].double()).sum()) for j in range(9)] for i in range(7)], dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul(a.T, b), expected, **tol)
    torch.testing.assert_close(torch.from_numpy(transposed_product(a.numpy(), b.numpy())), expected, **tol)
    torch.testing.assert_close(matmul(a.T.contiguous(), b), expected, **tol)
    torch.testing.assert_close(matmul(b.T, a), expected.T, **tol)
