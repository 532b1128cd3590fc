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


# -- train / predict / reproduce -------------------------------------------------------------
RUN_FILES = ("config.json", "model.toml", "guide.toml", "train.npz", "checkpoint.pt")


def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="training dataset (.npz or .nc)")
    parser.add_argument("--model", default="particles_best",
                        help="model spec: a name in models/ or a .toml path (default: particles_best)")
    parser.add_argument("--guide", default="lognormal",
                        help="guide spec: a name in guides/ or a .toml path (default: lognormal)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="total SVI steps (default: the guide spec's)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="new run directory")
    where.add_argument("--resume", type=Path, help="continue the run in this directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _writable_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"directory {path} is not writable")
    return path


def _run_train(args: argparse.Namespace) -> int:
    import json

    from cgpyro import data as cgdata
    from cgpyro.inference import SVIInference
    from cgpyro.specs import load_guide, load_model

    dataset = cgdata.load(args.data)
    if args.resume is not None:
        run = args.resume
        missing = [f for f in RUN_FILES if not (run / f).is_file()]
        if missing:
            raise ValueError(f"--resume {run}: not a run directory (missing {', '.join(missing)})")
        config = json.loads((run / "config.json").read_text())
        if list(dataset.counts.shape) != config["data_shape"]:
            raise ValueError(f"--resume {run}: the run was trained on data of shape "
                             f"{tuple(config['data_shape'])}, --data has {dataset.counts.shape}")
        steps = args.steps or config["steps"]
        seed, device = config["seed"], args.device or config["device"]
        model_path, guide_path = run / "model.toml", run / "guide.toml"
    else:
        run = _writable_dir(args.out)
        model_path, guide_path = args.model, args.guide
        seed, device = args.seed, args.device
        steps = None
    model = load_model(model_path, n_bins=dataset.n_bins)
    guide_spec = load_guide(guide_path)
    svi = dict(guide_spec.svi)
    steps = steps or args.steps or svi.get("steps", 2000)
    svi["steps"] = steps
    config = {"data_shape": list(dataset.counts.shape), "steps": steps, "seed": seed,
              "device": device, "dt": dataset.dt, "bin_edges": dataset.bin_edges.tolist(),
              "model_spec": model.spec.name, "guide_spec": guide_spec.name}
    if args.resume is None:
        (run / "model.toml").write_text(model.spec.source)
        (run / "guide.toml").write_text(guide_spec.source)
        cgdata.save(dataset, run / "train.npz")
        (run / "config.json").write_text(json.dumps(config, indent=2))
    inference = SVIInference(model, guide=guide_spec.factory, seed=seed, device=device,
                             checkpoint=run / "checkpoint.pt", config=config,
                             progress=not args.quiet, **svi)
    resume = run / "checkpoint.pt" if args.resume is not None else None
    inference.fit(dataset, resume=resume)
    (run / "config.json").write_text(json.dumps(config, indent=2))
    print(f"trained {inference.step} steps in {inference.fit_seconds:.1f} s; "
          f"final loss {inference.loss_history[-1]:.6g}; run saved in {run}")
    return EXIT_OK


def load_run(run: Path, device: str = "cpu"):
    """``(model, inference, train_dataset, config)`` of a run directory, trained state restored."""
    import json

    from cgpyro import data as cgdata
    from cgpyro.inference import SVIInference
    from cgpyro.specs import load_guide, load_model

    missing = [f for f in RUN_FILES if not (run / f).is_file()]
    if missing:
        raise ValueError(f"--run {run}: not a run directory (missing {', '.join(missing)})")
    config = json.loads((run / "config.json").read_text())
    train = cgdata.load(run / "train.npz")
    model = load_model(run / "model.toml", n_bins=train.n_bins)
    guide_spec = load_guide(run / "guide.toml")
    svi = {**guide_spec.svi, "steps": config["steps"]}
    inference = SVIInference(model, guide=guide_spec.factory, seed=config["seed"], device=device,
                             progress=False, config=config, **svi)
    inference.load(train, run / "checkpoint.pt")
    return model, inference, train, config


def _configure_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="run directory from `train`")
    parser.add_argument("--data", type=Path, required=True, help="observed sequences (.npz/.nc)")
    parser.add_argument("--horizon", type=positive_int, required=True,
                        help="coarse steps to forecast past the last snapshot")
    parser.add_argument("--samples", type=positive_int, default=200,
                        help="posterior samples (default: 200)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=output_file((".npz",)), required=True, help="pred.npz")


def _run_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from cgpyro.checkpoint import atomic_write
    from cgpyro.data import load
    from cgpyro.predict import forecast
    from cgpyro.guides import guide_for_new_sequences

    if args.samples < 2:
        raise UsageError("predict: argument --samples: expected at least 2")
    model, inference, train, _ = load_run(args.run, args.device)
    dataset = load(args.data)
    if dataset.n_bins != train.n_bins:
        raise ValueError(f"--data has {dataset.n_bins} bins, the run was trained on "
                         f"{train.n_bins}")
    same = dataset.counts.shape == train.counts.shape and np.array_equal(dataset.counts,
                                                                          train.counts)
    guide = inference.guide if same else guide_for_new_sequences(inference, dataset.counts)
    result = forecast(model, guide, dataset.counts, args.horizon, num_samples=args.samples,
                      seed=args.seed)
    arrays = result.to_npz_dict()
    if not all(np.isfinite(v).all() for v in arrays.values()):
        raise ValueError("the forecast is not finite; the run may be diverged")

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(args.out, write)
    print(f"wrote {args.out}: {dataset.n_sequences} sequences x "
          f"{dataset.n_times + args.horizon} steps x {dataset.n_bins} bins")
    return EXIT_OK


def _configure_reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("report"), help="report directory")
    parser.add_argument("--model", default="particles_best", help="model spec")
    parser.add_argument("--guide", default="lognormal", help="guide spec")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--particles", type=positive_int, default=250_000)
    parser.add_argument("--steps", type=positive_int, default=None, help="SVI steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_reproduce(args: argparse.Namespace) -> int:
    import json

    from cgpyro.experiment import run_paper_experiment, write_report

    out = _writable_dir(args.out)
    result = run_paper_experiment(args.model, args.guide, seed=args.seed,
                                  n_particles=args.particles, steps=args.steps,
                                  device=args.device, progress=not args.quiet)
    paths = write_report(result, out)
    print(json.dumps(result.metrics, indent=1))
    print(f"wrote {len(paths)} files to {out}")
    return EXIT_OK


register(Command("train", "fit the CG model to a dataset by SVI", _configure_train, _run_train))
register(Command("predict", "infer CG states and forecast with uncertainty",
                 _configure_predict, _run_predict))
register(Command("reproduce", "the seed's experiment end to end: figures and metrics",
                 _configure_reproduce, _run_reproduce))


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
    except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: NumericalError  # DataError is a ValueError; OSError covers
        # FileNotFoundError, PermissionError, IsADirectoryError
        print(f"cgpyro: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
