"""The ``cgpyro`` command line.

Subcommands live in ``COMMANDS`` (name -> ``Command``): each adds its flags to its own
argparse sub-parser and runs from the parsed namespace. ``main`` turns every error a user can
cause into one line ``cgpyro: error: ...`` on stderr and a non-zero exit code.

Exit codes: 0 success, 1 runtime error (bad data, files), 2 bad command line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMMANDS", "Command", "UsageError", "main", "register"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A bad command line (reported as one line, exit code 2)."""


@dataclass(frozen=True)
class Command:
    """A subcommand: ``configure`` adds flags to its parser, ``run`` returns an exit code."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add a subcommand (``train``, ``predict``, ... register themselves the same way)."""
    assert command.name not in COMMANDS, f"subcommand {command.name!r} registered twice"
    COMMANDS[command.name] = command
    return command


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting (so errors stay one line)."""

    def error(self, message: str):
        where = self.prog.removeprefix("cgpyro").strip()  # "simulate" for a sub-parser
        raise UsageError(f"{where}: {message}" if where else message)


# -- flag types ------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {value}")
    return value


def output_file(suffixes: Sequence[str]) -> Callable[[str], Path]:
    """argparse type: a file path with one of ``suffixes`` in an existing, writable directory."""

    def check(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"expected a file ending in {' or '.join(suffixes)}, found {text!r}"
            )
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"directory {str(parent)!r} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"directory {str(parent)!r} is not writable")
        return path

    return check


# -- simulate --------------------------------------------------------------------------------
SYSTEMS = ("particles",)


def _configure_simulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", choices=SYSTEMS, default="particles",
                        help="FG system (default: particles, the seed's section 3.1)")
    parser.add_argument("--sequences", type=positive_int, default=64,
                        help="independent sequences (default: 64)")
    parser.add_argument("--steps", type=positive_int, default=40,
                        help="coarse steps; writes steps + 1 snapshots (default: 40)")
    parser.add_argument("--particles", type=positive_int, default=250_000,
                        help="particles per sequence (default: 250000)")
    parser.add_argument("--bins", type=positive_int, default=25,
                        help="equal-width CG bins on [-1, 1) (default: 25)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=output_file((".npz", ".nc")), required=True,
                        help="output dataset, .npz or .nc")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_simulate(args: argparse.Namespace) -> int:
    from cgpyro.data import save
    from cgpyro.systems import ParticleSystem, simulate_dataset

    n_sites = ParticleSystem().n_sites
    if args.bins > n_sites:
        raise UsageError(
            f"simulate: argument --bins: expected at most {n_sites} (the lattice "
            f"sites), found {args.bins}"
        )
    dataset, _ = simulate_dataset(
        n_sequences=args.sequences,
        n_steps=args.steps,
        n_particles=args.particles,
        n_bins=args.bins,
        seed=args.seed,
        progress=not args.quiet,
    )
    path = save(dataset, args.out)
    print(
        f"wrote {path}: {dataset.n_sequences} sequences x {dataset.n_times} snapshots x "
        f"{dataset.n_bins} bins, dt = {dataset.dt:g}"
    )
    return EXIT_OK


register(Command("simulate", "simulate the reference FG system and write CG bin counts",
                 _configure_simulate, _run_simulate))


# -- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from cgpyro import __version__

    parser = _Parser(prog="cgpyro", description="Probabilistic coarse-graining with Pyro.")
    parser.add_argument("--version", action="version", version=f"cgpyro {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS.values():
        command.configure(sub.add_parser(command.name, help=command.help,
                                         description=command.help))
    return parser


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line, whatever the library put in the message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version print and exit 0
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        if args.command is None:
            raise UsageError(f"expected a command ({', '.join(COMMANDS)}); try --help")
        return COMMANDS[args.command].run(args)
    except UsageError as exc:
        print(f"cgpyro: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cgpyro: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("cgpyro: error: out of memory; try fewer sequences or particles", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as exc:  # DataError is a ValueError; OSError covers
        # FileNotFoundError, PermissionError, IsADirectoryError
        print(f"cgpyro: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
