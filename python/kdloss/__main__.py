"""``python -m kdloss``: the command line.

``python -m kdloss`` (or ``python -m kdloss check``) shows that the installed library computes the published
check value; ``python -m kdloss demo`` shows distillation working. ``python -m kdloss --help`` lists them all.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Iterable, NamedTuple, NoReturn, Optional, Sequence

import numpy as np

from . import DistillationLoss, __version__

PROG = "python -m kdloss"


class Subcommand(NamedTuple):
    """One ``python -m kdloss COMMAND``.

    Attributes
    ----------
    help : str
        One line for the command list of ``--help``.
    add_arguments : callable
        ``add_arguments(parser)`` adds the command's options to its sub-parser.
    run : callable
        ``run(args)`` does the work and returns the exit status.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _from_module(name: str) -> Subcommand:
    """Load the subcommand implemented by a module of this package as ``HELP``, ``add_arguments``, ``run``.

    Such modules must import quickly (numpy and kdloss only at import time): all are imported to build the
    parser, even for ``--help``.
    """
    module = importlib.import_module(name, __package__)
    return Subcommand(module.HELP, module.add_arguments, module.run)


# ----------------------------------------------------------------------------------------------------------------
# check: the default command
# ----------------------------------------------------------------------------------------------------------------

# The check case of the specification, computed by the C# DistillationLoss<T> this library follows. Its
# epsilon inside the logarithms moves the 10th digit, so agreement is expected to about 1e-8.
STUDENT = np.array([1.0, 2.0, 0.5])
TEACHER = np.array([1.5, 1.8, 0.6])
ONE_HOT = np.array([0.0, 1.0, 0.0])
REFERENCE_LOSS = 0.25465032
REFERENCE_GRADIENT = np.array([0.05121834, -0.12252327, 0.07130493])
REFERENCE_SOFT_LOSS = 0.04493185

CHECK_HELP = "compute the published check value and compare it with the reference (the default)"


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """``check`` takes no options."""


def run_check(args: Optional[argparse.Namespace] = None) -> int:
    """Print the check value computed by the library next to the reference.

    Returns
    -------
    int
        0 if every value agrees with the reference to 1e-8, else 1.
    """
    kd = DistillationLoss(temperature=3.0, alpha=0.5)
    loss, gradient = kd.loss_and_gradient(STUDENT, TEACHER, ONE_HOT)
    soft_loss = kd.compute_loss(STUDENT, TEACHER)
    print(f"kdloss {__version__}: {kd!r}")
    print(f"student {STUDENT.tolist()}, teacher {TEACHER.tolist()}, one-hot label {ONE_HOT.tolist()}\n")
    rows: list[tuple[str, Iterable[float], Iterable[float]]] = [
        ("loss (with labels)", [float(loss)], [REFERENCE_LOSS]),
        ("gradient", gradient, REFERENCE_GRADIENT),
        ("loss (no labels)", [float(soft_loss)], [REFERENCE_SOFT_LOSS]),
    ]
    print(f"{'quantity':<20}{'kdloss':>16}{'reference':>14}")
    ok = True
    for name, values, expected in rows:
        for value, reference in zip(values, expected):
            print(f"{name:<20}{value:>16.10f}{reference:>14.8f}")
            name = ""
            ok &= abs(value - reference) <= 1e-8
    print("\nagrees with the reference to 1e-8" if ok else "\nDISAGREES with the reference")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_COMMAND = "check"


def subcommands() -> dict[str, Subcommand]:
    """Every subcommand by name, in the order ``--help`` lists them.

    To add one, write a module ``kdloss/_<name>.py`` defining ``HELP``, ``add_arguments(parser)`` and
    ``run(args) -> int`` (see ``kdloss/_demo.py``), and add a line here.
    """
    return {
        "check": Subcommand(CHECK_HELP, _no_arguments, run_check),
        "demo": _from_module("._demo"),
        "bench": _from_module("._bench"),
    }


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: the problem and where to look for help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(commands: Optional[dict[str, Subcommand]] = None) -> argparse.ArgumentParser:
    """Build the parser of ``python -m kdloss`` and its subcommands.

    Parameters
    ----------
    commands : dict, optional
        The subcommands; by default :func:`subcommands`.

    Returns
    -------
    argparse.ArgumentParser
        Parsed arguments have ``command`` (None when none was given), ``run``, the command's entry point, and
        ``command_parser``, the parser of that command.
    """
    commands = subcommands() if commands is None else commands
    parser = _Parser(
        prog=PROG,
        description="kdloss: the knowledge-distillation loss of Hinton et al. (2015) and its exact gradient, "
        "computed natively.",
        epilog=f"Without a command, runs '{DEFAULT_COMMAND}'. '{PROG} COMMAND --help' describes a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"kdloss {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, command in commands.items():
        # The sub-parsers are _Parser too (argparse makes them of the parent's class): one-line errors there.
        command_parser = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(command_parser)
        command_parser.set_defaults(run=command.run, command_parser=command_parser)
    parser.set_defaults(run=commands[DEFAULT_COMMAND].run, command_parser=parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``python -m kdloss`` with ``argv`` (default: the process's arguments) and return the exit status."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the command's own parser, so that its error points to that command's --help
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
