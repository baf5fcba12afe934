"""Koh & Liang Figure 2 pipeline on a reduced problem, with real retraining; kill -9 and resume."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headless_chromium import external_references, is_not_blank, open_alone
from influencekit.cli import main
from influencekit.datasets import koh_liang_split, load_mnist
from influencekit.experiments.koh_liang_fig2 import Fig2Config, reproduce
from influencekit.validation.refit_cache import RefitCache

@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory, synthetic_mnist_dir):
    out = tmp_path_factory.mktemp("fig2")
    config = Fig2Config(out=out, data_dir=synthetic_mnist_dir, train_size=5000, num_points=50, solvers=["exact", "cg"], workers=2, progress=False)
    return out, reproduce(config)


def test_reduced_figure2_predicts_actual_retraining(reduced_run):
    out, results = reduced_run
    assert results["n_train"] == 5000 and results["num_points"] == 50
    assert results["model"]["train_grad_norm"] <= 1e-10
    assert results["retrain"]["max_grad_norm"] <= 1e-10
    assert results["hessian"]["negative"] == 0 and 0 < results["hessian"]["min_eig"] < results["hessian"]["max_eig"]
    assert results["hessian"]["min_eig"] >= 0.01 * (1 - 1e-6)  # H includes the weight decay 0.01 I
    assert results["trustworthy"] is True and results["untrustworthy_reasons"] == []
    for solver in ("exact", "cg"):
        assert results["solvers"][solver]["pearson"] >= 0.99
        assert results["solvers"][solver]["spearman"] >= 0.95
    assert max(results["solvers"]["cg"]["relative_residual"]) <= 1e-9
    saved = json.loads((out / "results.json").read_text())
    assert saved["solvers"]["exact"]["pearson"] == results["solvers"]["exact"]["pearson"]
    lines = (out / "points.csv").read_text().splitlines()
    assert lines[0].startswith("test_index,train_index,mnist_index,label,predicted_exact,predicted_cg,actual")
    assert len(lines) == 51
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predicted_changes_have_the_right_scale_for_the_top_points(reduced_run):
    out, _ = reduced_run
    rows = [line.split(",") for line in (out / "points.csv").read_text().splitlines()[1:]]
    predicted = [float(r[4]) for r in rows]
    actual = [float(r[6]) for r in rows]
    top = sorted(range(len(rows)), key=lambda i: -abs(actual[i]))[:10]
    for i in top:
        assert abs(predicted[i] - actual[i]) <= 0.2 * abs(actual[i])  # second-order effects shrink as n grows


def test_report_renders_alone_with_the_scatter_plots_and_training_images(reduced_run, tmp_path):
    out, results = reduced_run
    text = (out / "report.html").read_text(encoding="utf-8")
    assert external_references(text) == []
    assert "Retraining without it: the test loss went" in text and f"R = {results['solvers']['exact']['pearson']:.3f}" in text
    probe, screenshot = open_alone(out / "report.html", tmp_path)
    assert all(width > 0 for width in probe["natural_widths"]) and all(probe["decoded"])
    assert sum(alt.startswith("#") for alt in probe["alts"]) == 20 and probe["alts"].count("scatter plots") == 1
    assert is_not_blank(screenshot)


def _untrained(data_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` training points (x as float64 numpy, y) and the gradient of mean CE at W = 0."""
    split = koh_liang_split(load_mnist(data_dir))
    x, y = split.x_train[:n].numpy(), split.y_train[:n].numpy()
    residuals = np.full((n, 10), 0.1)  # softmax(0) - e_y
    residuals[np.arange(n), y] -= 1.0
    return x, residuals.T @ x / n


def _refusal(capsys, data_dir: Path, *args: str) -> str:
    code = main(["reproduce", "koh-liang-fig2", "--data-dir", str(data_dir), "--train-size", "500", "--num-points", "5",
                 "--solvers", "exact", "--workers", "0", "--no-progress", *args])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2, lines
    assert lines[-1].startswith("refused: ") and not any("Traceback" in line for line in lines)
    return lines[-1]


def test_model_off_its_optimum_is_refused_with_its_gradient_norm(capsys, tmp_path, synthetic_mnist_dir):
    # --max-newton-steps 0 evaluates at W = 0: its gradient is (1/n) (softmax(0) - Y)^T X in closed form
    _, gradient = _untrained(synthetic_mnist_dir, 500)
    line = _refusal(capsys, synthetic_mnist_dir, "--out", str(tmp_path), "--max-newton-steps", "0")
    assert f"||grad R|| = {np.linalg.norm(gradient):.3g} > --optimum-tol 1e-10 after 0 Newton steps" in line
    assert "raise --max-newton-steps above 0" in line and "--allow-untrustworthy" in line
    assert "Hessian" not in line  # weight decay 0.01 > 0: positive definite
    assert not (tmp_path / "results.json").exists()


def test_indefinite_hessian_is_refused_with_its_negative_eigenvalues_and_a_damping(capsys, tmp_path, synthetic_mnist_dir):
    # At W = 0, H = (I/C - 11^T/C^2) kron (X^T X / n) + lambda I: eigenvalues lambda (d of them,
    # the shift W -> W + 1 v^T) and mu/C + lambda for each eigenvalue mu of X^T X / n, C - 1 times.
    x, _ = _untrained(synthetic_mnist_dir, 500)
    mu = np.linalg.eigvalsh(x.T @ x / 500) / 10
    assert np.abs(mu - 0.01).min() > 1e-6  # no eigenvalue on the fence
    negative = 784 + 9 * int((mu < 0.01).sum())
    # refused even with --allow-untrustworthy: the leave-one-out refits would have no minimum
    line = _refusal(capsys, synthetic_mnist_dir, "--out", str(tmp_path), "--weight-decay", "-0.01", "--max-newton-steps", "0", "--allow-untrustworthy")
    assert f"the Hessian is not positive definite: {negative} negative eigenvalues, smallest -0.01; damping 0.02 " in line
    assert "use --weight-decay > 0 (got -0.01)" in line
    assert "not at the optimum" in line  # W = 0 is not a stationary point either
    assert not (tmp_path / "results.json").exists()


def test_allow_untrustworthy_completes_and_marks_the_results(tmp_path, synthetic_mnist_dir):
    out = tmp_path / "out"
    code = main(["reproduce", "koh-liang-fig2", "--data-dir", str(synthetic_mnist_dir), "--out", str(out), "--train-size", "2000",
                 "--num-points", "5", "--solvers", "exact", "--workers", "0", "--no-progress",
                 "--max-newton-steps", "6", "--allow-untrustworthy"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    grad = results["model"]["train_grad_norm"]
    assert results["model"]["newton_steps"] == 6 and 1e-10 < grad < 1e-3
    assert results["trustworthy"] is False
    assert results["untrustworthy_reasons"] == [
        f"not at the optimum: ||grad R|| = {grad:.3g} > --optimum-tol 1e-10 after 6 Newton steps (raise --max-newton-steps above 6)"]
    assert results["retrain"]["max_grad_norm"] <= 1e-10  # the refits still reach their own optima


SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in [str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH")] if p)}

# Runs the CLI, SIGKILLing its own process right after the LIMIT-th refit is committed to the
# cache (RefitCache.put returned: file fsynced, renamed, directory fsynced): a kill -9 at a
# deterministic point instead of one raced against the run's speed.
KILL_AFTER_PUTS = """
import os, signal, sys
from influencekit import cli
from influencekit.validation.refit_cache import RefitCache
limit, put, done = int(sys.argv[1]), RefitCache.put, []
def put_then_die(self, index, result):
    stored = put(self, index, result)
    done.append(index)
    if len(done) == limit:
        os.kill(os.getpid(), signal.SIGKILL)
    return stored
RefitCache.put = put_then_die
sys.exit(cli.main(sys.argv[2:]))
"""


def _fig2(out: Path, data_dir: Path, *args: str, kill_after: int | None = None) -> subprocess.Popen:
    """The Figure 2 CLI in a subprocess (its own session, so it and its Dask workers can be killed as a group)."""
    command = ["reproduce", "koh-liang-fig2", "--out", str(out), "--data-dir", str(data_dir), "--no-progress", *args]
    prefix = ["-m", "influencekit.cli"] if kill_after is None else ["-c", KILL_AFTER_PUTS, str(kill_after)]
    return subprocess.Popen([sys.executable, *prefix, *command], env=SUBPROCESS_ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # Dask workers a killed run left behind
    return process.returncode, stderr


def _entries(cache_root: Path) -> tuple[RefitCache, dict[int, tuple[int, int]]]:
    """The one fingerprint directory under ``cache_root`` and its complete entries -> (inode, mtime_ns)."""
    [fingerprint] = [p.name for p in cache_root.iterdir()]  # a second one: the runs fitted different models
    cache = RefitCache(cache_root, fingerprint)
    stats = {i: (cache.path / f"{i}.safetensors").stat() for i in cache.done_indices()}
    return cache, {i: (s.st_ino, s.st_mtime_ns) for i, s in stats.items()}


def test_kill_minus_nine_then_resume_loses_nothing(tmp_path, synthetic_mnist_dir):
    """kill -9 after 7 refits are committed; the resumed run reuses exactly those and recomputes none.

    All three runs are subprocesses with one environment, so they fit bit-identical models
    (the fitted weights depend on the BLAS thread count; the cache key hashes them).
    """
    args = ["--train-size", "2000", "--num-points", "60", "--solvers", "exact"]
    cache_root, interrupted = tmp_path / "cache", tmp_path / "interrupted"
    code, stderr = _finish(_fig2(interrupted, synthetic_mnist_dir, "--cache-dir", str(cache_root), "--workers", "1", *args, kill_after=7))
    assert code == -signal.SIGKILL, stderr
    assert not (interrupted / "results.json").exists()
    cache, before = _entries(cache_root)
    assert len(before) == 7

    code, stderr = _finish(_fig2(interrupted, synthetic_mnist_dir, "--cache-dir", str(cache_root), "--workers", "0", *args))
    assert code == 0, stderr
    resumed = json.loads((interrupted / "results.json").read_text())
    assert resumed["retrain"]["from_cache"] == 7 and resumed["retrain"]["refits"] == 60
    assert resumed["retrain"]["cache"] == str(cache.path)
    same_cache, after = _entries(cache_root)
    assert same_cache.path == cache.path and len(after) == 60
    assert {i: after[i] for i in before} == before  # not rewritten: same inode, same mtime

    code, stderr = _finish(_fig2(tmp_path / "fresh", synthetic_mnist_dir, "--workers", "0", *args))
    assert code == 0, stderr
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())
    assert fresh["retrain"]["from_cache"] == 0
    # the 7 reused refits ran on a Dask worker (single-threaded BLAS), the fresh ones in-process:
    # equal optima (||grad|| <= 1e-10) up to rounding
    assert resumed["solvers"]["exact"]["pearson"] == pytest.approx(fresh["solvers"]["exact"]["pearson"], abs=1e-12)
    resumed_rows = [line.split(",") for line in (interrupted / "points.csv").read_text().splitlines()]
    fresh_rows = [line.split(",") for line in (tmp_path / "fresh" / "points.csv").read_text().splitlines()]
    assert [r[:4] for r in resumed_rows] == [r[:4] for r in fresh_rows]  # same points, same labels
    for resumed_row, fresh_row in zip(resumed_rows[1:], fresh_rows[1:]):
        assert [float(v) for v in resumed_row[4:]] == pytest.approx([float(v) for v in fresh_row[4:]], rel=1e-8, abs=1e-15)
