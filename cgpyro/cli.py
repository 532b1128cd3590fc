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
import warnings
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
def _int_at_least(minimum: int, rule: str, maximum: int = 2**63 - 1) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rule}, found {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {rule}, found {value}")
        if value > maximum:  # beyond torch's and numpy's int64 sizes: an internal error later
            raise argparse.ArgumentTypeError(f"expected {rule} below 2**63, found {value:.3g}")
        return value

    check.__doc__ = f"argparse type: {rule}."
    return check


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


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
SYSTEMS = ("particles", "exclusion")


def _configure_simulate(parser: argparse.ArgumentParser) -> None:
    def _probability(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], found {text!r}")
        return value

    parser.add_argument("--system", choices=SYSTEMS, default="particles",
                        help="FG system: particles (the paper's section 3.1, default) or "
                        "exclusion (interacting soft-exclusion walkers)")
    parser.add_argument("--sites", type=positive_int, default=None,
                        help="lattice sites on [-1, 1) (default: 1280)")
    parser.add_argument("--p-left", type=_probability, default=None,
                        help="jump-left probability per micro step (default: 0.1875 particles, "
                        "0.1 exclusion)")
    parser.add_argument("--p-right", type=_probability, default=None,
                        help="jump-right probability per micro step (default: 0.2125 "
                        "particles, 0.3 exclusion)")
    parser.add_argument("--micro-steps", type=positive_int, default=None,
                        help="micro steps per snapshot (default: 1600 particles, 200 exclusion)")
    parser.add_argument("--capacity", type=positive_int, default=None,
                        help="site capacity K, exclusion only (default: 200)")
    parser.add_argument("--family", default=None,
                        help="initial-condition family: fourier (default), bumps or steps")
    parser.add_argument("--device", default="cpu",
                        help="torch device for the exclusion micro steps (default: cpu)")
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
    import inspect

    from cgpyro.data import save

    params = {key: value for key, value in (
        ("n_sites", args.sites), ("p_left", args.p_left), ("p_right", args.p_right),
        ("micro_steps", args.micro_steps)) if value is not None}
    family = {} if args.family is None else {"family": args.family}
    if args.system == "exclusion":
        from cgpyro.exclusion import FAMILIES, ExclusionSystem, simulate_exclusion_dataset

        if args.capacity is not None:
            params["capacity"] = args.capacity
        if args.family is not None and args.family not in FAMILIES:
            raise UsageError(f"simulate: argument --family: expected one of "
                             f"{', '.join(FAMILIES)}, found {args.family!r}")
        system = ExclusionSystem(**params)  # a ValueError names the rule
        if args.bins > system.n_sites:
            raise UsageError(f"simulate: argument --bins: expected at most {system.n_sites} "
                             f"(the lattice sites), found {args.bins}")
        dataset, _ = simulate_exclusion_dataset(
            n_sequences=args.sequences, n_steps=args.steps, n_bins=args.bins, seed=args.seed,
            system=system, device=args.device, progress=not args.quiet, **family)
    else:
        from cgpyro.systems import ParticleSystem, simulate_dataset

        if args.capacity is not None:
            raise UsageError("simulate: argument --capacity: only for --system exclusion")
        if family and "family" not in inspect.signature(simulate_dataset).parameters:
            raise UsageError("simulate: argument --family: only for --system exclusion")
        n_sites = ParticleSystem(**params).n_sites
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
            **family,
            **params,
        )
    path = save(dataset, args.out)
    print(
        f"wrote {path}: {dataset.n_sequences} sequences x {dataset.n_times} snapshots x "
        f"{dataset.n_bins} bins, dt = {dataset.dt:g}"
    )
    return EXIT_OK


register(Command("simulate", "simulate an FG system (reference or interacting) and write CG "
                 "bin counts", _configure_simulate, _run_simulate))


# -- train / predict / reproduce -------------------------------------------------------------
def _memory_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-memory-check", action="store_true",
                        help="read and train even when the estimated memory exceeds what is "
                             "available (default: refuse such inputs up front)")


def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="training dataset (.npz or .nc); required with --out, optional "
                             "with --resume (then checked against the run's train.npz)")
    parser.add_argument("--model", default=None,
                        help="model spec of a new run: a name in models/ or a .toml path "
                             "(default: auto, which picks physics or subbin from the data)")
    parser.add_argument("--guide", default=None,
                        help="guide spec of a new run: a name in guides/ or a .toml path "
                             "(default: lognormal)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="total SVI steps (default: the guide spec's; with --resume the "
                             "run's, more extends a finished run)")
    parser.add_argument("--seed", type=nonnegative_int, default=None,
                        help="random seed of a new run (default: 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="torch device (default: cpu, or the run's with --resume)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="sequences per SVI step of a new run (minibatch SVI; default: "
                             "the guide spec's batch_size, else all)")
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="data-parallel training on this many CPU processes (gloo; the "
                             "sequences are split between them; default: 1)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="new run directory (empty or missing)")
    where.add_argument("--resume", type=Path, help="continue the run in this directory")
    parser.add_argument("--allow-import", action="append", default=[], metavar="MODULE",
                        help="with --resume: a constraint module named by the run's model.toml "
                             "that may be imported although it is not an installed package "
                             "(repeatable; '*' for any)")
    _memory_flag(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _writable_dir(path: Path, flag: str = "--out") -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create the directory "
                         f"({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: directory is not writable")
    return path


def _single_thread() -> None:
    """One torch thread unless OMP_NUM_THREADS says otherwise: the CG tensors are small (one
    SVI step on the paper's data: 5.9 ms with 1 thread, 5.5 ms with 2), and on a busy 2-core
    machine a second thread made training 20x slower (measured)."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


def _max_bytes(args: argparse.Namespace) -> int | None:
    return 2**62 if getattr(args, "no_memory_check", False) else None


def _run_train(args: argparse.Namespace) -> int:
    _single_thread()
    from cgpyro import data as cgdata
    from cgpyro.run import Run

    max_bytes = _max_bytes(args)
    if args.resume is not None:
        for flag in ("model", "guide", "seed", "batch_size"):
            if getattr(args, flag) is not None:
                raise UsageError(f"train: argument --{flag.replace('_', '-')}: not with --resume "
                                 "(a run continues with the settings it was created with)")
        run = Run.open(args.resume, device=args.device, writable=True,
                       allow_import=args.allow_import, max_bytes=max_bytes)
        if args.data is not None:
            run.check_data(cgdata.load(args.data, max_bytes=max_bytes),
                           f"--data {args.data}")
    else:
        if args.data is None:
            raise UsageError("train: argument --data: required with --out")
        if args.allow_import:
            raise UsageError("train: argument --allow-import: only with --resume (a new run "
                             "imports the constraints of the spec you name)")
        out = _writable_dir(args.out)
        given = {flag: getattr(args, flag) for flag in ("model", "guide", "seed", "device")
                 if getattr(args, flag) is not None}  # absent: Run.create's defaults
        run = Run.create(out, args.data, steps=args.steps, max_bytes=max_bytes,
                         batch_size=args.batch_size, **given)
        choice = run.config.get("model_choice")
        if choice is not None:
            from cgpyro.specs import describe_model

            print(f"model: {describe_model(choice['chosen'], choice)}")
    with run:
        try:
            inference = run.fit(steps=args.steps if args.resume is not None else None,
                                progress=not args.quiet, max_bytes=max_bytes,
                                stop_on_signals=True, nproc=args.nproc)
        except KeyboardInterrupt as exc:
            if str(exc):  # the checkpoint was saved
                raise KeyboardInterrupt(f"{exc}; continue with: cgpyro train --resume "
                                        f"{run.path}") from None
            raise
    print(f"trained {inference.step} steps in {inference.fit_seconds:.1f} s; "
          f"final loss {inference.loss_history[-1]:.6g}; run saved in {run.path}")
    return EXIT_OK


def _configure_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="run directory from `train`")
    parser.add_argument("--data", type=Path, required=True,
                        help="observed sequences to forecast from (.npz or .nc), on the run's "
                             "bins and dt")
    parser.add_argument("--horizon", type=positive_int, required=True,
                        help="coarse steps to forecast past the last snapshot")
    parser.add_argument("--samples", type=positive_int, default=200,
                        help="posterior samples, at least 2 (default: 200)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="random seed of the posterior samples (default: 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="torch device (default: cpu)")
    parser.add_argument("--allow-other-grid", action="store_true",
                        help="forecast data whose dt or bin edges differ from the training "
                             "data's (default: refuse)")
    parser.add_argument("--allow-import", action="append", default=[], metavar="MODULE",
                        help="a constraint module named by the run's model.toml that may be "
                             "imported although it is not an installed package (repeatable; "
                             "'*' for any)")
    _memory_flag(parser)
    parser.add_argument("--out", type=output_file((".npz",)), required=True,
                        help="output file (.npz): forecast samples and summaries")


def _run_predict(args: argparse.Namespace) -> int:
    _single_thread()
    from cgpyro.data import load
    from cgpyro.run import Run

    if args.samples < 2:
        raise UsageError("predict: argument --samples: expected at least 2")
    max_bytes = _max_bytes(args)
    run = Run.open(args.run, device=args.device, allow_import=args.allow_import,
                   max_bytes=max_bytes)
    dataset = load(args.data, max_bytes=max_bytes)
    run.forecast(dataset, args.horizon, num_samples=args.samples, seed=args.seed,
                 allow_other_grid=args.allow_other_grid, name=f"--data {args.data}",
                 max_bytes=max_bytes, out=args.out)
    print(f"wrote {args.out}: {dataset.n_sequences} sequences x "
          f"{dataset.n_times + args.horizon} steps x {dataset.n_bins} bins")
    return EXIT_OK


def _configure_reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="report directory (default: report)")
    parser.add_argument("--model", default="auto",
                        help="model spec: a name in models/ or a .toml path (default: auto, "
                             "which picks physics or subbin from the data)")
    parser.add_argument("--guide", default="lognormal",
                        help="guide spec: a name in guides/ or a .toml path (default: lognormal)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="random seed of the simulation and training (default: 0)")
    parser.add_argument("--particles", type=positive_int, default=250_000,
                        help="particles per sequence in the simulation (default: 250000, as "
                             "in the paper)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="SVI steps (default: the guide spec's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="torch device (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_reproduce(args: argparse.Namespace) -> int:
    _single_thread()
    import json

    from cgpyro.experiment import run_paper_experiment, write_report
    from cgpyro.specs import describe_model

    out = _writable_dir(args.out)
    result = run_paper_experiment(args.model, args.guide, seed=args.seed,
                                  n_particles=args.particles, steps=args.steps,
                                  device=args.device, progress=not args.quiet)
    paths = write_report(result, out)
    if result.extra["model_spec"] is not None:
        print(f"model: {describe_model(result.extra['model_spec'], result.extra['model_choice'])}")
    print(json.dumps(result.metrics, indent=1))
    print(f"wrote {len(paths)} files to {out}")
    return EXIT_OK


register(Command("train", "fit the CG model to a dataset by SVI", _configure_train, _run_train))
register(Command("predict", "infer CG states and forecast with uncertainty",
                 _configure_predict, _run_predict))
register(Command("reproduce", "the paper's experiment end to end: figures and metrics",
                 _configure_reproduce, _run_reproduce))


# -- curve -----------------------------------------------------------------------------------
def _configure_curve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="training dataset (.npz/.nc)")
    parser.add_argument("--test", type=Path, required=True,
                        help="held-out dataset with more snapshots than --data (forecast from "
                             "its first snapshots, scored on the rest)")
    parser.add_argument("--sizes", default="1,2,4,8,16,64",
                        help="comma-separated training-set sizes (default: 1,2,4,8,16,64)")
    parser.add_argument("--model", default="auto",
                        help="model spec (default: auto, which picks physics or subbin from "
                             "each training subset)")
    parser.add_argument("--guide", default="lognormal", help="guide spec (default: lognormal)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="SVI steps per fit (default: the guide spec's)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-vo-variant", action="store_true",
                        help="skip the variant without virtual observables")
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def _run_curve(args: argparse.Namespace) -> int:
    _single_thread()
    from cgpyro.curve import learning_curve, write_curve
    from cgpyro.data import load

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"curve: argument --sizes: expected comma-separated integers, found "
                         f"{args.sizes!r}") from None
    out = _writable_dir(args.out)
    rows = learning_curve(load(args.data), load(args.test), sizes, args.model, args.guide,
                          steps=args.steps, seed=args.seed, with_no_vo=not args.no_vo_variant)
    paths = write_curve(rows, out)
    print((out / "curve.md").read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return EXIT_OK


register(Command("curve", "learning curve: forecast error against the number of training "
                 "sequences", _configure_curve, _run_curve))


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


MAX_MESSAGE = 600  # characters: library messages can embed whole tensors


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())  # one line, whatever the library put in the message
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 4] + " ..."


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line ``cgpyro: warning: ...`` (not Python's two-line source listing)."""
    text = " ".join(str(message).split())
    print(f"cgpyro: warning: {text}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
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
    except KeyboardInterrupt as exc:
        print(f"cgpyro: error: {_describe(exc) if str(exc) else 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("cgpyro: error: out of memory; try fewer sequences or particles", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError, RuntimeError) as exc:
        # DataError/SpecError/CheckpointError are ValueErrors; OSError covers FileNotFoundError,
        # PermissionError, IsADirectoryError; RuntimeError covers NumericalError
        print(f"cgpyro: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug, not a user mistake: still one line, unless debugging
        if os.environ.get("CGPYRO_DEBUG"):
            raise
        print(f"cgpyro: error: internal error ({type(exc).__name__}: {_describe(exc)}); please "
              "report it; set CGPYRO_DEBUG=1 to see the traceback", file=sys.stderr)
        return EXIT_ERROR
    finally:
        warnings.showwarning = previous_showwarning


if __name__ == "__main__":
    sys.exit(main())
