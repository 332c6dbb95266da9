"""``python -m kdloss``: the command line, and the demo's training code.

The command-line tests run the installed package in a subprocess from a scratch directory (so that no source
tree shadows it) with ``-W error``: the commands must not warn either. Argument errors are also checked
in-process, which is much faster than one interpreter per bad argument. The demo's training code is checked
in-process on tiny networks: its parameter gradients against finite differences of the loss, and that training
with ``DistillationLoss`` drives the loss down.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from kdloss import DistillationLoss, __version__
from kdloss import _demo as demo
from kdloss.__main__ import Subcommand, build_parser, main, subcommands

TIMEOUT_S = 60


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -W error -m kdloss ARGS`` and capture its output."""
    command = [sys.executable, "-W", "error", "-m", "kdloss", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd)


# ----------------------------------------------------------------------------------------------------------------
# The command line, in a subprocess
# ----------------------------------------------------------------------------------------------------------------


def test_bare_command_prints_the_check_value(tmp_path: Path) -> None:
    done = run_cli(cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith(f"kdloss {__version__}: DistillationLoss(")
    assert "loss (with labels)      0.2546503" in done.stdout
    assert "agrees with the reference to 1e-8" in done.stdout
    # The README promises that ``python -m kdloss`` is ``python -m kdloss check``.
    assert run_cli("check", cwd=tmp_path).stdout == done.stdout


def test_help_lists_the_subcommands(tmp_path: Path) -> None:
    done = run_cli("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m kdloss" in done.stdout
    for command in ("check", "demo"):
        assert any(line.split()[:1] == [command] for line in done.stdout.splitlines()), done.stdout


def test_bad_argument_is_a_one_line_error_with_status_2(tmp_path: Path) -> None:
    done = run_cli("demo", "--epochs", "abc", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("python -m kdloss demo: error: argument --epochs:"), done.stderr


def test_short_demo_prints_progress_and_the_table(tmp_path: Path) -> None:
    done = run_cli("demo", "--epochs", "2", "--seed", "3", "--temperature", "2.5", "--alpha", "0.5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.strip().startswith("epoch 2/2") for line in lines) == 3, done.stdout
    assert "seed 3: 500 training and 4000 held-out images, 2 epochs, temperature 2.5, alpha 0.5" in lines
    assert any(line.split()[:1] == ["model"] and line.rstrip().endswith("held-out acc") for line in lines)
    for row in ("teacher ", "student, hard labels ", "student, distilled "):
        assert any(line.startswith(row) and line.endswith(" %") for line in lines), (row, done.stdout)
    assert any(line.startswith("distillation: ") for line in lines), done.stdout


@pytest.mark.parametrize(
    ("cache", "described"), [("top-k:3", "its top 3 classes a row"), ("sample:4", "4 draws a row")]
)
def test_the_demo_distils_from_a_sparse_cache(cache: str, described: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "2", "--teacher-cache", cache]) == 0
    out = capsys.readouterr().out
    assert f"teacher cached as a sparse cache: {described}" in out, out
    assert f"teacher cached as {cache}" in out  # the table's heading
    assert any(line.startswith("student, distilled ") and line.endswith(" %") for line in out.splitlines()), out


def test_a_top_k_cache_of_every_class_trains_as_the_logits_do() -> None:
    # Up to the cache's half-precision log-probabilities (within 2^-11 of each).
    dense = demo.run_experiment(demo.DemoConfig(epochs=2))
    cached = demo.run_experiment(demo.DemoConfig(epochs=2, teacher_cache=("top-k", 10)))
    np.testing.assert_allclose(cached.distilled.history.train_loss, dense.distilled.history.train_loss, rtol=3e-3)
    assert cached.distilled.history.train_loss != dense.distilled.history.train_loss  # the cache was used


# ----------------------------------------------------------------------------------------------------------------
# The command line, in-process
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--epochs", "abc"], "argument --epochs"),
        (["demo", "--epochs", "-3"], "argument --epochs"),
        (["demo", "--epochs", "0"], "argument --epochs"),
        (["demo", "--epochs", "2.5"], "argument --epochs"),
        (["demo", "--temperature", "0"], "argument --temperature"),
        (["demo", "--temperature", "-1"], "argument --temperature"),
        (["demo", "--temperature", "inf"], "argument --temperature"),
        (["demo", "--temperature", "nan"], "argument --temperature"),
        (["demo", "--temperature", "1e7"], "temperature must be in [1e-30, 1e6]"),
        (["demo", "--alpha", "1.5"], "argument --alpha"),
        (["demo", "--alpha", "-0.1"], "argument --alpha"),
        (["demo", "--seed", "-1"], "argument --seed"),
        (["demo", "--teacher-cache", "top-k"], "argument --teacher-cache"),
        (["demo", "--teacher-cache", "top-k:0"], "argument --teacher-cache"),
        (["demo", "--teacher-cache", "sample:x"], "argument --teacher-cache"),
        (["demo", "--teacher-cache", "dense:3"], "argument --teacher-cache"),
        (["demo", "--plot", "/no/such/directory/curves.png"], "argument --plot"),
        (["demo", "--no-such-option"], "unrecognized arguments"),
        (["check", "extra"], "unrecognized arguments"),
        (["no-such-command"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert ": error: " in err and message in err, err


@pytest.mark.parametrize(
    "args, help_command",
    [
        (["demo", "--bogus"], "python -m kdloss demo --help"),
        (["--bogus"], "python -m kdloss --help"),
        (["check", "extra"], "python -m kdloss check --help"),
    ],
)
def test_an_unknown_option_points_to_its_commands_help(
    args: list[str], help_command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(args)
    assert capsys.readouterr().err.endswith(f"(see '{help_command}')\n")


def test_a_new_subcommand_is_one_entry_in_the_table() -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--status", type=int, default=0)

    commands = {**subcommands(), "extra": Subcommand("an extra command", add_arguments, lambda args: args.status)}
    parser = build_parser(commands)
    args = parser.parse_args(["extra", "--status", "3"])
    assert args.command == "extra" and args.run(args) == 3
    assert "an extra command" in parser.format_help()
    bare = parser.parse_args([])
    assert bare.command is None and bare.run is commands["check"].run


def test_demo_help_names_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--seed", "--temperature", "--alpha", "--epochs", "--plot"):
        assert option in out


def test_plot_without_matplotlib_says_so_and_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry in sys.modules makes the import fail as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "curves.png"
    assert main(["demo", "--epochs", "1", "--plot", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "student, distilled" in out
    assert err.count("\n") == 1 and "matplotlib" in err and "pip install kdloss[plot]" in err, err
    assert not path.exists()


def test_plot_with_matplotlib_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    assert main(["demo", "--epochs", "2", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"learning curves written to {path}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# The demo's data and training code
# ----------------------------------------------------------------------------------------------------------------


def test_digits_are_balanced_deterministic_and_shaped() -> None:
    x, y = demo.make_digits(50, np.random.default_rng(7))
    x2, y2 = demo.make_digits(50, np.random.default_rng(7))
    assert x.shape == (50, 13 * 9) and y.shape == (50,)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 5))


def test_shift_moves_content_and_fills_zeros() -> None:
    image = np.arange(1.0, 13.0).reshape(1, 3, 4)
    down_right = demo.shift_images(image, np.array([1]), np.array([1]))[0]
    np.testing.assert_array_equal(down_right[1:, 1:], image[0, :-1, :-1])
    assert not down_right[0].any() and not down_right[:, 0].any()
    up_left = demo.shift_images(image, np.array([-1]), np.array([-1]))[0]
    np.testing.assert_array_equal(up_left[:-1, :-1], image[0, 1:, 1:])


def _numerical_gradients(
    loss_of: Callable[[], float], parameters: list[np.ndarray], h: float = 1e-6
) -> list[np.ndarray]:
    """Central differences of ``loss_of()`` with respect to every entry of every parameter array."""
    gradients = []
    for p in parameters:
        g = np.zeros_like(p)
        for index in np.ndindex(p.shape):
            saved = p[index]
            p[index] = saved + h
            up = loss_of()
            p[index] = saved - h
            down = loss_of()
            p[index] = saved
            g[index] = (up - down) / (2 * h)
        gradients.append(g)
    return gradients


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_parameter_gradients_match_finite_differences(dropout: float) -> None:
    """The demo chains kdloss's logit gradient (of the batch mean) through the network correctly."""
    rng = np.random.default_rng(0)
    model = demo.MLP.initialise((6, 5, 4, 3), rng)
    x = rng.standard_normal((7, 6))
    teacher = 2.0 * rng.standard_normal((7, 3))
    y = rng.integers(0, 3, 7)
    kd = DistillationLoss(temperature=2.5, alpha=0.3)

    def loss_of() -> float:
        # The same dropout masks every time: a fresh generator with the same seed.
        return demo.loss_and_gradients(model, x, y, kd, teacher, dropout=dropout, rng=np.random.default_rng(1))[0]

    _, analytic = demo.loss_and_gradients(model, x, y, kd, teacher, dropout=dropout, rng=np.random.default_rng(1))
    numerical = _numerical_gradients(loss_of, model.parameters)
    for a, n in zip(analytic, numerical):
        np.testing.assert_allclose(a, n, rtol=1e-5, atol=1e-8)


def test_distillation_training_lowers_the_loss_and_approaches_the_teacher() -> None:
    rng = np.random.default_rng(0)
    x, y = demo.make_digits(120, rng)
    x_test, y_test = demo.make_digits(60, rng)
    fit = dict(x_test=x_test, y_test=y_test, epochs=20, learning_rate=1e-2)
    teacher = demo.MLP.initialise((x.shape[1], 32, 10), rng)
    cross_entropy = DistillationLoss(temperature=1.0, alpha=1.0)
    teacher_history = demo.train(teacher, x, y, cross_entropy, rng=rng, **fit)  # type: ignore[arg-type]
    teacher_logits = teacher.logits(x)

    student = demo.MLP.initialise((x.shape[1], 8, 10), rng)
    kd = DistillationLoss(temperature=3.0, alpha=0.2)
    soft_only = DistillationLoss(temperature=3.0, alpha=0.0)
    before = soft_only.compute_loss(student.logits(x), teacher_logits, y)
    history = demo.train(student, x, y, kd, teacher_logits=teacher_logits, rng=rng, **fit)  # type: ignore[arg-type]
    after = soft_only.compute_loss(student.logits(x), teacher_logits, y)

    assert len(history.train_loss) == len(history.test_accuracy) == 20
    assert teacher_history.train_loss[-1] < 0.25 * teacher_history.train_loss[0]
    assert history.train_loss[-1] < 0.7 * history.train_loss[0]
    assert all(later < earlier for earlier, later in zip(history.train_loss[::5], history.train_loss[5::5]))
    assert after < 0.5 * before  # the student moved towards the teacher's softened outputs


def test_train_rejects_inconsistent_settings() -> None:
    rng = np.random.default_rng(0)
    x, y = demo.make_digits(20, rng)
    model = demo.MLP.initialise((x.shape[1], 4, 10), rng)
    with pytest.raises(ValueError, match="alpha=1"):
        demo.train(model, x, y, DistillationLoss(alpha=0.5), x_test=x, y_test=y, rng=rng, epochs=1)
    with pytest.raises(ValueError, match="augment"):
        demo.train(
            model, x, y, DistillationLoss(), teacher_logits=np.zeros((20, 10)), augment=True,
            x_test=x, y_test=y, rng=rng, epochs=1,
        )  # fmt: skip


def test_experiment_is_deterministic_and_tabulated() -> None:
    config = demo.DemoConfig(
        seed=5, epochs=2, n_train=60, n_test=40, teacher_hidden=(16,), student_hidden=(4,), batch_size=32
    )
    lines: list[str] = []
    first = demo.run_experiment(config, lines.append)
    second = demo.run_experiment(config)
    for a, b in zip((first.teacher, first.plain, first.distilled), (second.teacher, second.plain, second.distilled)):
        assert a.test_accuracy == b.test_accuracy and a.train_loss == b.train_loss
        assert len(a.history.test_accuracy) == 2
    assert first.plain.n_parameters == first.distilled.n_parameters < first.teacher.n_parameters
    assert sum("epoch 2/2" in line for line in lines) == 3
    table = demo.format_table(first)
    assert "student, distilled" in table and "held-out acc" in table
