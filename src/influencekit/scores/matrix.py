"""Score matrices beyond one process's memory: I_up,loss of every training point for many test points.

Row j of the matrix is I_up,loss(z_i, z_test_j) = -s_j^T g_i for every training
point i, with s_j = (H + damping I)^{-1} grad m(z_test_j) (the "s_test" of Koh &
Liang) and g_i = grad l(z_i) + lambda theta: the same numbers as
``InfluenceFunction(objective, solver).scores(test_batch).influence_on_loss``
(negative = helpful). The run has two stages, both resumable:

1. *Solve* (one process): the curvature is factorised (``exact``: Cholesky of
   the explicit Hessian) or not (``cg``), and the test gradients are solved in
   blocks of ``test_block`` right-hand sides at once; each block of s_test rows
   is written to the zarr array ``s_test`` (float64, shape (m, p)).
2. *Score* (Dask): the (m, n) matrix is cut into blocks of ``test_block`` x
   ``train_block``; one task computes one block as -S_a G_b^T, a single GEMM
   of the block's s_test rows S_a (test_block, p) with the explicit training
   gradients G_b (train_block, p), and writes it as exactly one zarr chunk of
   ``scores``. Workers hold one block's operands: peak memory per process is
   about the task's data plus 4 (test_block + train_block) p bytes (float32).

Zarr writes every chunk atomically (temporary file, then rename). A block counts
as done only when its marker chunk in ``s_test_done`` / ``scores_done`` is
written, after its data: a run killed at any moment (kill -9 included) resumes
from the blocks whose markers exist and recomputes nothing else. The settings
of the run are stored in the group's attributes; resuming with other settings
is refused.

Store layout (zarr v3 group ``out``): ``scores`` (m, n), chunks (test_block,
train_block), NaN where not computed yet; ``s_test`` (m, p); ``residual_norms``
(m,) ||(H + damping I) s_j - g_test_j||; ``test_indices`` (m,), the positions of
the scored test points in the task's test data; ``s_test_done`` (blocks,) and
``scores_done`` (test blocks, train blocks) markers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from influencekit.data import batch_size, index_batch
from influencekit.memory import peak_rss_mb
from influencekit.objectives.base import Objective
from influencekit.tasks import Task, load_task

SOLVERS = ("exact", "cg")
#: Fault injection for the resume tests: the process SIGKILLs itself after this many score blocks.
KILL_AFTER_BLOCKS_ENV = "INFLUENCEKIT_SCORE_KILL_AFTER_BLOCKS"


@dataclass(frozen=True)
class ScoreMatrixSpec:
    """The settings that define a score matrix (stored with it; a resume must match them).

    Attributes:
        task: ``"module:function"`` of the task function ``fn(data_dir, cache_dir) -> Task``.
        data_dir: passed to the task function.
        solver: ``"exact"`` (Cholesky of the explicit Hessian, float64) or ``"cg"``.
        tests: ``"all"`` or comma-separated test indices ``"I,J,..."``.
        damping: added to the Hessian's diagonal.
        rtol: CG's relative residual tolerance.
        test_block, train_block: block (and zarr chunk) shape of the score stage.
        dtype: ``"float32"`` or ``"float64"``: the score GEMM and the stored matrix.
    """

    task: str
    data_dir: str | None
    solver: str = "exact"
    tests: str = "all"
    damping: float = 0.0
    rtol: float = 1e-8
    test_block: int = 1000
    train_block: int = 5000
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.test_block < 1 or self.train_block < 1:
            raise ValueError(f"block sizes must be >= 1, got test_block={self.test_block}, train_block={self.train_block}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class ScoreRunReport:
    """What one run (or resume) of :func:`compute_score_matrix` did.

    Attributes:
        shape: (m, n) of the matrix.
        solve_blocks_computed, score_blocks_computed: blocks done by this run.
        score_blocks_total: all blocks of the matrix.
        seconds: wall time per stage ("task", "solve", "score").
        peak_rss_mb: peak resident memory per process ("driver", and each Dask worker by address).
    """

    shape: tuple[int, int]
    solve_blocks_computed: int = 0
    score_blocks_computed: int = 0
    score_blocks_total: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)


def cache_dir_for(out: Path) -> Path:
    """Where task functions cache their expensive state (trained weights): next to the store."""
    return Path(str(out) + ".cache")


def parse_tests(tests: str, n_test: int) -> np.ndarray:
    """Test indices from ``"all"`` or ``"I,J,..."`` (each in [0, n_test))."""
    if tests == "all":
        return np.arange(n_test)
    try:
        indices = np.array([int(part) for part in tests.split(",") if part.strip()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"--tests must be 'all' or comma-separated integers, got {tests!r}") from None
    if indices.size == 0 or indices.min() < 0 or indices.max() >= n_test:
        raise ValueError(f"--tests indices must lie in [0, {n_test}), got {tests!r}")
    return indices


# -- one task per process ----------------------------------------------------------------
_TASKS: dict[tuple[str, str, str], Task] = {}
_OBJECTIVES: dict[tuple[str, str, str, torch.dtype], Objective] = {}


def _task(spec: ScoreMatrixSpec, cache_dir: Path) -> Task:
    key = (spec.task, spec.data_dir, str(cache_dir))
    if key not in _TASKS:
        _TASKS[key] = load_task(spec.task)(None if spec.data_dir is None else Path(spec.data_dir), cache_dir)
    return _TASKS[key]


def _objective(spec: ScoreMatrixSpec, cache_dir: Path, dtype: torch.dtype) -> Objective:
    key = (spec.task, spec.data_dir, str(cache_dir), dtype)
    if key not in _OBJECTIVES:
        _OBJECTIVES[key] = _task(spec, cache_dir).objective(dtype)
    return _OBJECTIVES[key]


def _blocks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


# -- the store ----------------------------------------------------------------------------
def _open_store(spec: ScoreMatrixSpec, out: Path, test_indices: np.ndarray, n_train: int, dim: int):
    import zarr

    m = len(test_indices)
    attrs = {"spec": asdict(spec), "shape": [m, n_train], "dim": dim}
    if (out / "zarr.json").exists():
        group = zarr.open_group(out, mode="r+")
        stored = dict(group.attrs)
        if stored.get("spec") != attrs["spec"] or stored.get("shape") != attrs["shape"] or stored.get("dim") != dim:
            raise ValueError(
                f"{out} holds a score matrix with other settings ({stored.get('spec')}, shape {stored.get('shape')}); "
                f"resume with the same options, or pass another --out"
            )
        return group
    group = zarr.open_group(out, mode="w")
    n_test_blocks, n_train_blocks = -(-m // spec.test_block), -(-n_train // spec.train_block)
    group.create_array("scores", shape=(m, n_train), chunks=(spec.test_block, spec.train_block), dtype=spec.dtype, fill_value=np.nan)
    group.create_array("s_test", shape=(m, dim), chunks=(spec.test_block, dim), dtype="float64", fill_value=np.nan)
    group.create_array("residual_norms", shape=(m,), chunks=(spec.test_block,), dtype="float64", fill_value=np.nan)
    group.create_array("test_indices", shape=(m,), chunks=(m,), dtype="int64", fill_value=-1)[:] = test_indices
    group.create_array("s_test_done", shape=(n_test_blocks,), chunks=(1,), dtype="uint8", fill_value=0)
    group.create_array("scores_done", shape=(n_test_blocks, n_train_blocks), chunks=(1, 1), dtype="uint8", fill_value=0)
    group.attrs.update(attrs)  # last: a store without its attributes is not a started run
    return group


# -- stage 1: s_test ----------------------------------------------------------------------
def _solver(spec: ScoreMatrixSpec, objective: Objective):
    from influencekit.curvature.hessian import HessianOperator
    from influencekit.solvers.cg import CGSolver
    from influencekit.solvers.direct import DirectSolver

    if spec.solver == "exact":  # one p x p matrix in memory: factorised in place, residuals by HVPs
        return DirectSolver(HessianOperator(objective), damping=spec.damping, overwrite_matrix=True)
    return CGSolver(HessianOperator(objective), damping=spec.damping, rtol=spec.rtol)


def _solve_tests(spec: ScoreMatrixSpec, group, cache_dir: Path, progress: bool) -> int:
    done = group["s_test_done"][:]
    pending = [a for a in range(len(done)) if not done[a]]
    if not pending:
        return 0
    task = _task(spec, cache_dir)
    objective = _objective(spec, cache_dir, torch.float64)
    solver = _solver(spec, objective)
    test_indices = torch.from_numpy(group["test_indices"][:])
    rows = _blocks(len(test_indices), spec.test_block)
    for a in tqdm(pending, desc="s_test blocks", disable=not progress):
        gradients = objective.measurement_gradients(index_batch(task.test_data, test_indices[rows[a]]))
        result = solver.solve(gradients)
        group["s_test"][rows[a]] = result.solution.numpy()
        group["residual_norms"][rows[a]] = result.residual_norms.numpy()
        group["s_test_done"][a] = 1
    return len(pending)


# -- stage 2: score blocks ----------------------------------------------------------------
def score_block(spec: ScoreMatrixSpec, out: str, a: int, b: int) -> dict[str, Any]:
    """Compute and store block (a, b) of the matrix: -S_a G_b^T. Runs on a Dask worker or in-process."""
    import zarr

    start = time.perf_counter()
    out_path = Path(out)
    group = zarr.open_group(out_path, mode="r+")
    m, n = group["scores"].shape
    rows, cols = _blocks(m, spec.test_block)[a], _blocks(n, spec.train_block)[b]
    objective = _objective(spec, cache_dir_for(out_path), spec.torch_dtype)
    s_test = torch.from_numpy(group["s_test"][rows]).to(spec.torch_dtype)
    gradients = objective.train_gradients(torch.arange(cols.start, cols.stop)).to(spec.torch_dtype)
    group["scores"][rows, cols] = (-(s_test @ gradients.T)).numpy()
    group["scores_done"][a, b] = 1
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "pid": os.getpid()}


def _fault_injection() -> int | None:
    value = os.environ.get(KILL_AFTER_BLOCKS_ENV)
    return int(value) if value else None


def compute_score_matrix(
    spec: ScoreMatrixSpec,
    out: Path | str,
    *,
    workers: int = 0,
    scheduler: str | None = None,
    progress: bool = True,
) -> ScoreRunReport:
    """Compute (or resume) the score matrix of ``spec`` into the zarr group ``out``.

    Args:
        spec: the matrix's settings.
        out: directory of the zarr group (created, or resumed when it exists).
        workers: score blocks on a local Dask cluster of this many single-threaded
            worker processes; 0 computes them in this process.
        scheduler: address of a running Dask scheduler (``dask scheduler``); its
            workers must see ``out`` and its cache directory at the same path.
        progress: tqdm bars.
    """
    out = Path(out)
    cache_dir = cache_dir_for(out)
    started = time.perf_counter()
    task = _task(spec, cache_dir)
    objective = _objective(spec, cache_dir, torch.float64)
    test_indices = parse_tests(spec.tests, batch_size(task.test_data))
    group = _open_store(spec, out, test_indices, objective.n_train, objective.dim)
    report = ScoreRunReport(shape=tuple(group["scores"].shape))
    report.seconds["task"] = time.perf_counter() - started

    started = time.perf_counter()
    report.solve_blocks_computed = _solve_tests(spec, group, cache_dir, progress)
    report.seconds["solve"] = time.perf_counter() - started
    _TASKS.clear()  # the driver's copies (and the factorisation) are not needed while workers score
    _OBJECTIVES.clear()

    started = time.perf_counter()
    done = group["scores_done"][:]
    report.score_blocks_total = done.size
    pending = [(a, b) for a in range(done.shape[0]) for b in range(done.shape[1]) if not done[a, b]]
    kill_after = _fault_injection()
    bar = tqdm(total=done.size, initial=done.size - len(pending), desc="score blocks", disable=not progress)
    with bar, ExitStack() as stack:
        if workers == 0 and scheduler is None:
            results = (score_block(spec, str(out), a, b) for a, b in pending)
        else:
            from distributed import as_completed

            from influencekit.cluster import dask_client

            client = stack.enter_context(dask_client(workers, scheduler))
            futures = [client.submit(score_block, spec, str(out), a, b, pure=False) for a, b in pending]
            results = (future.result() for future in as_completed(futures))
        for result in results:
            report.score_blocks_computed += 1
            key = "driver" if result["pid"] == os.getpid() else f"worker {result['pid']}"
            report.peak_rss_mb[key] = max(report.peak_rss_mb.get(key, 0.0), result["peak_rss_mb"])
            bar.update(1)
            if kill_after is not None and report.score_blocks_computed >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    report.seconds["score"] = time.perf_counter() - started
    report.peak_rss_mb["driver"] = max(report.peak_rss_mb.get("driver", 0.0), peak_rss_mb())
    return report


# -- command line -------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="MODULE:FUNCTION returning an influencekit.tasks.Task, e.g. influencekit.tasks:mnist_logistic_regression")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="passed to the task function (the MNIST task: default $INFLUENCEKIT_DATA or the user cache, "
                             "downloaded there if absent)")
    parser.add_argument("--solver", choices=SOLVERS, default="exact")
    parser.add_argument("--tests", default="all", help="'all' or comma-separated test indices I,J,...")
    parser.add_argument("--out", type=Path, required=True, help="zarr group to write (resumed if it exists)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=0, help="local Dask worker processes (0: in this process)")
    where.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://10.0.0.1:8786")
    parser.add_argument("--damping", type=float, default=0.0)
    parser.add_argument("--rtol", type=float, default=1e-8, help="CG relative residual tolerance")
    parser.add_argument("--test-block", type=int, default=1000)
    parser.add_argument("--train-block", type=int, default=5000)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="of the score GEMM and the stored matrix")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        if args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        spec = ScoreMatrixSpec(
            task=args.task, data_dir=None if args.data_dir is None else str(Path(args.data_dir).resolve()), solver=args.solver, tests=args.tests,
            damping=args.damping, rtol=args.rtol, test_block=args.test_block, train_block=args.train_block, dtype=args.dtype,
        )
        report = compute_score_matrix(spec, args.out, workers=args.workers, scheduler=args.scheduler, progress=not args.no_progress)
    except ValueError as error:
        print(f"influencekit score: error: {error}", file=sys.stderr)
        return 2
    seconds = ", ".join(f"{stage} {value:.1f} s" for stage, value in report.seconds.items())
    memory = ", ".join(f"{who} {mb:.0f} MB" for who, mb in sorted(report.peak_rss_mb.items()))
    print(
        f"{args.out}: {report.shape[0]} x {report.shape[1]} scores; this run: {report.solve_blocks_computed} s_test blocks, "
        f"{report.score_blocks_computed} of {report.score_blocks_total} score blocks; {seconds}; peak memory: {memory}"
    )
    return 0
