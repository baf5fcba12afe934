"""Tests for influencekit.validation.parallel.run_refits, including resumption after kill -9."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

import influencekit.validation.parallel as parallel
from influencekit.validation.parallel import run_refits
from influencekit.validation.refit_cache import RefitCache, fingerprint_of

# Ship this module's functions to Dask workers by value, so that workers import
# neither it nor, through it, torch: worker start-up stays short.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N, D = 40, 3


def make_problem() -> tuple[np.ndarray, np.ndarray]:
    """A small least-squares problem: ``x`` (N, D), ``y`` (N,)."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((N, D))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.standard_normal(N)
    return x, y


def loo_least_squares(shared: tuple[np.ndarray, np.ndarray], batch: list[int]) -> list[dict]:
    """Leave-one-out least squares for a batch, by downdating the normal equations.

    Solves ``(X'X - x_i x_i') theta = X'y - x_i y_i`` for all ``i`` in one batched solve.
    """
    x, y = shared
    rows = x[batch]  # (B, D)
    gram = x.T @ x - rows[:, :, None] * rows[:, None, :]  # (B, D, D)
    rhs = x.T @ y - rows * y[batch, None]  # (B, D)
    theta = np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]  # (B, D)
    residuals = y[None, :] - theta @ x.T  # (B, N), includes the removed point
    rss = (residuals**2).sum(axis=1) - residuals[np.arange(len(batch)), batch] ** 2
    return [{"theta": theta[k], "rss": float(rss[k])} for k in range(len(batch))]


def assert_matches_lstsq(results: dict[int, dict], indices: list[int]) -> None:
    """Compare with an explicit least-squares fit of the data without each row."""
    x, y = make_problem()
    assert list(results) == indices
    for i in indices:
        theta, rss, _, _ = np.linalg.lstsq(np.delete(x, i, axis=0), np.delete(y, i), rcond=None)
        np.testing.assert_allclose(results[i]["theta"], theta, rtol=1e-10, atol=1e-12)
        assert results[i]["rss"] == pytest.approx(rss[0], rel=1e-9)


class Recorder:
    """In-process refit function that records which indices it computed."""

    def __init__(self, fail_on_call: int | None = None, exc: type[BaseException] = RuntimeError):
        self.computed: list[int] = []
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.exc = exc

    def __call__(self, shared: tuple[np.ndarray, np.ndarray], batch: list[int]) -> list[dict]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise self.exc("refit failed")
        self.computed.extend(batch)
        return loo_least_squares(shared, batch)


def test_in_process_matches_lstsq_and_resumes(tmp_path: Path) -> None:
    x, y = make_problem()
    cache = RefitCache(tmp_path, fingerprint_of(x, y))
    indices = [5, 0, 39, 5, 17, 3, 22, 8, 11]
    first = Recorder()
    results = run_refits(
        first, indices, cache, shared=(x, y), workers=0, batch_size=3, progress=False
    )
    unique = [5, 0, 39, 17, 3, 22, 8, 11]
    assert first.computed == unique and first.calls == 3
    assert_matches_lstsq(results, unique)

    again = Recorder()
    reloaded = run_refits(again, [0, 1, 5], cache, shared=(x, y), workers=0, progress=False)
    assert again.computed == [1]
    assert list(reloaded) == [0, 1, 5]
    for i in (0, 5):
        np.testing.assert_array_equal(reloaded[i]["theta"], results[i]["theta"])
        assert reloaded[i]["rss"] == results[i]["rss"]


def test_failure_keeps_finished_batches(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x, y = make_problem()
    cache = RefitCache(tmp_path, "f")
    with pytest.raises(RuntimeError, match="refit failed"):
        run_refits(
            Recorder(fail_on_call=3),
            range(20), cache, shared=(x, y), workers=0, batch_size=4, progress=False,
        )
    assert cache.done_indices() == list(range(8))

    logged = caplog.at_level(logging.WARNING, logger=parallel.__name__)
    with logged, pytest.raises(KeyboardInterrupt):
        run_refits(
            Recorder(fail_on_call=2, exc=KeyboardInterrupt),
            range(20), cache, shared=(x, y), workers=0, batch_size=4, progress=False,
        )
    assert cache.done_indices() == list(range(12))
    assert "12 of 20 refits are saved" in caplog.text

    def wrong_count(shared: object, batch: list[int]) -> list[dict]:
        return [{"v": 1.0}] * (len(batch) - 1)

    with pytest.raises(ValueError, match="returned 3 results for a batch of 4"):
        run_refits(wrong_count, range(12, 16), cache, workers=0, batch_size=4, progress=False)
    assert cache.done_indices() == list(range(12))


def test_argument_validation(tmp_path: Path) -> None:
    cache = RefitCache(tmp_path, "f")
    with pytest.raises(ValueError, match="workers"):
        run_refits(loo_least_squares, [0], cache, workers=-1)
    with pytest.raises(ValueError, match="batch_size"):
        run_refits(loo_least_squares, [0], cache, batch_size=0)
    with pytest.raises(ValueError, match="in-process"):
        run_refits(loo_least_squares, [0], cache, workers=0, scheduler_address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="non-negative"):
        run_refits(loo_least_squares, [3, -1], cache, workers=0)


def with_worker_identity(shared: tuple[np.ndarray, np.ndarray], batch: list[int]) -> list[dict]:
    """``loo_least_squares`` plus the worker's pid and the identity of its ``shared`` object."""
    results = loo_least_squares(shared, batch)
    for result in results:
        result["pid"] = os.getpid()
        result["shared_id"] = id(shared)
    return results


def test_dask_workers_match_in_process(tmp_path: Path) -> None:
    environ = dict(os.environ)
    x, y = make_problem()
    indices = list(range(N))
    local_cache = RefitCache(tmp_path / "local", "f")
    local = run_refits(
        loo_least_squares, indices, local_cache, shared=(x, y), workers=0, progress=False
    )
    cache = RefitCache(tmp_path / "dask", "f")
    distributed = run_refits(
        with_worker_identity, indices, cache, shared=(x, y), workers=2, batch_size=4, progress=False
    )
    assert_matches_lstsq(distributed, indices)
    for i in indices:
        np.testing.assert_allclose(distributed[i]["theta"], local[i]["theta"], rtol=1e-13, atol=0)
        assert distributed[i]["rss"] == pytest.approx(local[i]["rss"], rel=1e-13)
    assert cache.done_indices() == indices
    # Ran in worker processes, each of which deserialized `shared` once for all its tasks.
    ids_per_pid: dict[int, set[int]] = {}
    for result in distributed.values():
        ids_per_pid.setdefault(result["pid"], set()).add(result["shared_id"])
    assert os.getpid() not in ids_per_pid
    assert all(len(ids) == 1 for ids in ids_per_pid.values()), ids_per_pid
    # Dask's nanny set OMP_NUM_THREADS=1 etc. here to spawn the workers; they are unset again
    assert dict(os.environ) == environ


SCRIPT = """
import sys
import time

from influencekit.validation.parallel import run_refits
from influencekit.validation.refit_cache import RefitCache
from test_parallel_refits import loo_least_squares, make_problem


def slow_refit(shared, batch):
    time.sleep(0.25 * len(batch))
    return loo_least_squares(shared, batch)


if __name__ == "__main__":
    cache = RefitCache(sys.argv[1], "f")
    run_refits(
        slow_refit, range(40), cache,
        shared=make_problem(), workers=2, batch_size=2, progress=False,
    )
    print("finished")
"""


def test_resume_after_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    src_dir = Path(parallel.__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(src_dir), str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")]
    )
    log = tmp_path / "run.log"
    cache = RefitCache(tmp_path / "cache", "f")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while len(cache.done_indices()) < 4:
            assert proc.poll() is None, f"run exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no results after 60 s:\n{log.read_text()}"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its Dask workers
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "finished" not in log.read_text()

    done = cache.done_indices()
    assert 4 <= len(done) < N
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt entry would warn
        saved = {i: cache.get(i) for i in done}
    assert_matches_lstsq(saved, done)

    x, y = make_problem()
    resume = Recorder()
    resumed = run_refits(
        resume, range(N), cache, shared=(x, y), workers=0, batch_size=8, progress=False
    )
    assert set(resume.computed).isdisjoint(done)
    assert sorted(resume.computed + done) == list(range(N))

    fresh = RefitCache(tmp_path / "fresh", "f")
    uninterrupted = run_refits(
        loo_least_squares, range(N), fresh, shared=(x, y), workers=0, progress=False
    )
    assert_matches_lstsq(resumed, list(range(N)))
    for i in range(N):
        np.testing.assert_allclose(
            resumed[i]["theta"], uninterrupted[i]["theta"], rtol=1e-13, atol=0
        )
        assert resumed[i]["rss"] == pytest.approx(uninterrupted[i]["rss"], rel=1e-13)


def refit_killing_its_worker(shared: tuple, batch: list[int]) -> list[dict]:
    """``with_worker_identity``; the batch holding ``victim`` SIGKILLs its worker process once.

    It first waits (at most 60 s) until the client has committed ``after`` entries to the
    cache, then records those entries' (inode, mtime_ns) in ``marker`` and kills the
    process it runs in. The marker, created exclusively, makes the kill happen once:
    the task's retry on another worker computes normally.
    """
    from influencekit.validation.refit_cache import RefitCache

    problem, (cache_dir, victim, after, marker) = shared
    if victim in batch:
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            fd = None
        if fd is not None:
            cache = RefitCache(cache_dir, "f")
            deadline = time.monotonic() + 60
            while len(cache.done_indices()) < after and time.monotonic() < deadline:
                time.sleep(0.02)
            entries = {}
            for i in cache.done_indices():
                stat = (cache.path / f"{i}.safetensors").stat()
                entries[i] = [stat.st_ino, stat.st_mtime_ns]
            os.write(fd, json.dumps({"pid": os.getpid(), "entries": entries}).encode())
            os.fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    return with_worker_identity(problem, batch)


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *command],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def test_external_scheduler_survives_a_worker_killed_mid_run(tmp_path: Path) -> None:
    """`dask scheduler` + two `dask worker` processes; one worker is SIGKILLed mid-run.

    Its tasks are rerun on the other worker; every refit ends up in the cache once, and
    nothing that was committed before the kill is written again.
    """
    src_dir = Path(parallel.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(src_dir), os.environ.get("PYTHONPATH")] if p)}
    scheduler_file = tmp_path / "scheduler.json"
    processes: list[subprocess.Popen] = []
    try:
        processes.append(_start(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log", env))
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():  # written once the scheduler listens
            assert processes[0].poll() is None and time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.05)
        address = json.loads(scheduler_file.read_text())["address"]
        for k in range(2):
            processes.append(_start(
                ["worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                 "--host", "127.0.0.1"], tmp_path / f"worker{k}.log", env))
        from distributed import Client

        with Client(address) as client:
            client.wait_for_workers(2, timeout=60)  # so the scattered payload is on both
            pids_before = set(client.run(os.getpid).values())

        x, y = make_problem()
        cache = RefitCache(tmp_path / "cache", "f")
        marker = tmp_path / "killed.json"
        indices = list(range(16))
        results = run_refits(
            refit_killing_its_worker, indices, cache,
            shared=((x, y), (str(tmp_path / "cache"), 8, 4, str(marker))),
            scheduler_address=address, batch_size=1, progress=False,
        )
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    killed = json.loads(marker.read_text())
    assert killed["pid"] in pids_before
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # that worker process is gone
    assert len(killed["entries"]) >= 4
    assert results[8]["pid"] != killed["pid"]  # the killed task was rerun elsewhere
    assert_matches_lstsq(results, indices)
    assert cache.done_indices() == indices
    for i, identity in killed["entries"].items():  # committed before the kill: never rewritten
        stat = (cache.path / f"{i}.safetensors").stat()
        assert [stat.st_ino, stat.st_mtime_ns] == identity
