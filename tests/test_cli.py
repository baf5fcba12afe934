"""The CLI's failure contract: an expected failure is one line on stderr and exit status 2, no traceback."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from influencekit import cli
from influencekit.cli import main
from influencekit.datasets import DatasetError
from influencekit.solvers.base import NotPositiveDefiniteError
from influencekit.solvers.lissa import LiSSADivergenceError

SRC = Path(__file__).resolve().parents[1] / "src"


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def raising_command(monkeypatch: pytest.MonkeyPatch):
    """Registers ``influencekit test raise``, whose run raises the exception put in ``box``."""
    box: list[BaseException] = []
    module = types.ModuleType("influencekit_test_raise")
    module.configure = lambda parser: None

    def run(args: argparse.Namespace) -> int:
        raise box[0]

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "test", {"raise": (module.__name__, "raises")})
    return box


@pytest.mark.parametrize(
    "error",
    [
        DatasetError("MNIST is missing.\nDownload it."),
        ValueError("--k must lie in [1, 500], got 0"),
        NotPositiveDefiniteError(torch.tensor([-0.5]), -0.5, 0.0, 0.6),
        LiSSADivergenceError(step=12, norm=1e9, bound=1e6, scale=1.0, suggested_scale=30.0),
    ],
    ids=["dataset", "value", "not-positive-definite", "lissa-divergence"],
)
def test_expected_errors_are_one_line_and_exit_2(raising_command, capsys, error: Exception) -> None:
    raising_command.append(error)
    assert main(["test", "raise"]) == 2
    line = _one_error_line(capsys)
    assert line == "influencekit: error: " + " ".join(str(error).split())
    for argv in (["--debug", "test", "raise"], ["test", "raise", "--debug"]):
        with pytest.raises(type(error)):  # --debug, before or after the command: the exception and its traceback
            main(argv)


def test_unexpected_errors_keep_their_traceback(raising_command) -> None:
    raising_command.append(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["test", "raise"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["reproduce", "koh-liang-fig2"], "the following arguments are required: --out"),
        (["reproduce", "koh-liang-fig2", "--out", "x", "--num-points", "many"], "argument --num-points: invalid int value: 'many'"),
        (["experiment", "no-such-experiment"], "argument name: invalid choice: 'no-such-experiment'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    line = _one_error_line(capsys)
    assert expected in line and line.startswith("influencekit") and line.endswith("--help)")


@pytest.mark.parametrize(
    "argv",
    [
        ["reproduce", "koh-liang-fig2", "--num-points", "5"],
        ["experiment", "tracin-mnist"],
        ["experiment", "fastif-recall"],
    ],
    ids=["koh-liang-fig2", "tracin-mnist", "fastif-recall"],
)
def test_no_download_without_data_refuses_in_one_line(tmp_path: Path, capsys, argv: list[str]) -> None:
    missing = tmp_path / "no-mnist"
    assert main([*argv, "--out", str(tmp_path / "out"), "--data-dir", str(missing), "--no-download"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"influencekit: error: MNIST is not in {missing} and downloading is off (--no-download)")
    assert f"influencekit download mnist --data-dir {missing}" in line
    assert not missing.exists()


def test_input_check_failure_is_one_line(tmp_path: Path, synthetic_mnist_dir: Path, capsys) -> None:
    argv = ["experiment", "tracin-mnist", "--data-dir", str(synthetic_mnist_dir), "--out", str(tmp_path), "--train-size", "0"]
    assert main(argv) == 2
    assert _one_error_line(capsys) == "influencekit: error: --train-size must lie in [1, 55000], got 0"


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"  # nothing listens there once the socket is closed


def test_without_data_or_network_the_command_fails_in_one_line(tmp_path: Path) -> None:
    """A real process: no MNIST in the user cache, every mirror unreachable (a closed port on 127.0.0.1)."""
    env = {k: v for k, v in os.environ.items() if k != "INFLUENCEKIT_DATA"}
    env.update(HOME=str(tmp_path / "home"), INFLUENCEKIT_MNIST_MIRRORS=_closed_port_url(), PYTHONPATH=str(SRC))
    argv = [sys.executable, "-m", "influencekit.cli", "reproduce", "koh-liang-fig2", "--out", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    # one line announces the download, one says why it failed and what to do
    announce, error = done.stderr.splitlines()
    assert announce.startswith(f"MNIST not found in {tmp_path / 'home/.cache/influencekit/mnist'}: downloading it")
    assert error.startswith("influencekit: error: could not download train-images-idx3-ubyte.gz from any of 1 mirror(s)")
    assert "Connection refused" in error and "set $INFLUENCEKIT_MNIST_MIRRORS to a working mirror" in error


def test_download_command_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("INFLUENCEKIT_MNIST_MIRRORS", _closed_port_url())
    assert main(["download", "mnist", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert "any of 1 mirror(s)" in _one_error_line(capsys) and list(tmp_path.iterdir()) == []
    closed = [_closed_port_url(), _closed_port_url()]
    assert main(["download", "mnist", "--data-dir", str(tmp_path), "--mirror", closed[0], "--mirror", closed[1]]) == 2
    line = _one_error_line(capsys)
    assert "any of 2 mirror(s)" in line and closed[0] in line and closed[1] in line
