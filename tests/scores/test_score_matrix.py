"""The out-of-core score matrix against InfluenceFunction on the same task; kill -9 and resume."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import zarr

from influencekit import DirectSolver, HessianOperator, InfluenceFunction
from influencekit.cli import main
from influencekit.data import index_batch
from influencekit.scores.matrix import KILL_AFTER_BLOCKS_ENV, ScoreMatrixSpec, compute_score_matrix

TESTS_DIR = Path(__file__).parent
SRC_DIR = TESTS_DIR.parents[1] / "src"
sys.path.insert(0, str(TESTS_DIR))
from score_tasks import tiny_softmax_task  # noqa: E402

TASK = "score_tasks:tiny_softmax_task"


def reference(test_indices):
    """I_up,loss rows from the in-memory API with an exact solve (float64)."""
    task = tiny_softmax_task(Path("."), Path("."))
    objective = task.objective(torch.float64)
    scores = InfluenceFunction(objective, DirectSolver(HessianOperator(objective))).scores(index_batch(task.test_data, torch.tensor(test_indices)))
    return scores.influence_on_loss.numpy()


def score_args(out: Path, *extra: str) -> list[str]:
    return ["score", "--task", TASK, "--data-dir", str(out.parent), "--solver", "exact", "--out", str(out),
            "--test-block", "3", "--train-block", "10", "--no-progress", *extra]


def run_cli_process(out: Path, *extra: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR), str(TESTS_DIR)]), **(env_extra or {})}
    command = [sys.executable, "-m", "influencekit.cli", *score_args(out, *extra)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_rows_equal_single_test_point_influence(tmp_path):
    spec = ScoreMatrixSpec(task=TASK, data_dir=str(tmp_path), solver="exact", tests="4,0,9", test_block=2, train_block=10, dtype="float64")
    report = compute_score_matrix(spec, tmp_path / "s.zarr", progress=False)
    assert report.shape == (3, 37) and report.score_blocks_computed == report.score_blocks_total == 2 * 4
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    np.testing.assert_array_equal(group["test_indices"][:], [4, 0, 9])
    for row, test in enumerate([4, 0, 9]):  # each row against a one-test-point run
        np.testing.assert_allclose(group["scores"][row], reference([test])[0], rtol=1e-10, atol=1e-13)
    assert group["residual_norms"][:].max() < 1e-10
    # CG solves to its tolerance; float32 scores to float32 rounding
    cg = ScoreMatrixSpec(task=TASK, data_dir=str(tmp_path), solver="cg", rtol=1e-12, tests="all", test_block=4, train_block=16)
    compute_score_matrix(cg, tmp_path / "cg.zarr", progress=False)
    np.testing.assert_allclose(zarr.open_group(tmp_path / "cg.zarr")["scores"][:], reference(list(range(11))), rtol=1e-4, atol=1e-6)


def test_kill_9_mid_run_then_resume_loses_nothing(tmp_path, capsys):
    out = tmp_path / "scores.zarr"
    killed = run_cli_process(out, "--tests", "all", "--dtype", "float64", env_extra={KILL_AFTER_BLOCKS_ENV: "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    group = zarr.open_group(out, mode="r")
    done = group["scores_done"][:]
    assert done.shape == (4, 4) and done.sum() == 5  # the five committed blocks, nothing else
    assert np.isnan(group["scores"][:]).sum() == sum(
        min(3, 11 - 3 * a) * min(10, 37 - 10 * b) for a in range(4) for b in range(4) if not done[a, b]
    )
    assert main(score_args(out, "--tests", "all", "--dtype", "float64")) == 0
    assert "0 s_test blocks, 11 of 16 score blocks" in capsys.readouterr().out  # only what was missing
    np.testing.assert_allclose(zarr.open_group(out, mode="r")["scores"][:], reference(list(range(11))), rtol=1e-10, atol=1e-13)
    assert main(score_args(out, "--tests", "1,2", "--dtype", "float64")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err


def test_blocks_on_a_local_dask_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC_DIR), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    spec = ScoreMatrixSpec(task=TASK, data_dir=str(tmp_path), tests="all", test_block=6, train_block=20, dtype="float64")
    report = compute_score_matrix(spec, tmp_path / "d.zarr", workers=2, progress=False)
    assert report.score_blocks_computed == 4 and any(key.startswith("worker") for key in report.peak_rss_mb)
    np.testing.assert_allclose(zarr.open_group(tmp_path / "d.zarr")["scores"][:], reference(list(range(11))), rtol=1e-10, atol=1e-13)


def test_bad_tests_option_is_one_line_exit_2(tmp_path, capsys):
    assert main(score_args(tmp_path / "x.zarr", "--tests", "3,99")) == 2
    err = capsys.readouterr().err
    assert "[0, 11)" in err and err.count("\n") == 1
