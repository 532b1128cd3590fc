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
def _int_at_least(minimum: int, rule: str) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rule}, found {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {rule}, found {value}")
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
                        help="FG system: particles (the seed's section 3.1, default) or "
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


register(Command("simulate", "simulate the reference FG system and write CG bin counts",
                 _configure_simulate, _run_simulate))


# -- train / predict / reproduce -------------------------------------------------------------
RUN_FILES = ("config.json", "model.toml", "guide.toml", "train.npz", "checkpoint.pt")


def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="training dataset (.npz or .nc)")
    parser.add_argument("--model", default="physics",
                        help="model spec: a name in models/ or a .toml path "
                             "(default: physics)")
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


def _check_run_dir(run: Path, flag: str) -> None:
    if not run.is_dir():
        raise ValueError(f"{flag} {run}: no such run directory")
    missing = [f for f in RUN_FILES if not (run / f).is_file()]
    if missing:
        raise ValueError(f"{flag} {run}: not a run directory (missing {', '.join(missing)})")


def _read_config(run: Path) -> dict:
    """The run's ``config.json``, checked key by key (a damaged file is one error line)."""
    import json

    path = run / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: cannot read the run's configuration "
                         f"({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")

    def is_int(x, low):
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    rules = {
        "data_shape": (lambda v: isinstance(v, list) and len(v) == 3
                       and all(is_int(n, 1) for n in v), "a list of 3 positive integers"),
        "steps": (lambda v: is_int(v, 1), "a positive integer"),
        "seed": (lambda v: is_int(v, 0) and v < 2**32, "an integer in [0, 2**32)"),
        "device": (lambda v: v in ("cpu", "cuda"), "'cpu' or 'cuda'"),
    }
    for key, (ok, rule) in rules.items():
        if key not in config:
            raise ValueError(f"{path}: missing key {key!r}")
        if not ok(config[key]):
            raise ValueError(f"{path}: {key}: expected {rule}, found {config[key]!r}"[:300])
    return config


def _sigint_at_step_boundary(inference_callbacks: list):
    """Defer Ctrl-C (SIGINT) and SIGTERM (a batch system's time limit) during SVI to the end
    of the current step, so the checkpoint written on interrupt holds a consistent state (all
    parameters of one step updated, or none). A second signal, or one outside the training
    loop, interrupts at once. Returns ``restore()``."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    state = {"training": False, "pending": False}

    def handler(signum, frame):
        if state["training"] and not state["pending"]:
            state["pending"] = True
            return
        raise KeyboardInterrupt

    def at_step_end(step, loss, inference):
        state["training"] = True
        if state["pending"]:
            raise KeyboardInterrupt

    signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    inference_callbacks.append(at_step_end)

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _single_thread() -> None:
    """One torch thread unless OMP_NUM_THREADS says otherwise: the CG tensors are small (one
    SVI step on the paper's data: 5.9 ms with 1 thread, 5.5 ms with 2), and on a busy 2-core
    machine a second thread made training 20x slower (measured)."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


def _run_train(args: argparse.Namespace) -> int:
    _single_thread()
    import json

    import numpy as np

    from cgpyro import data as cgdata
    from cgpyro.checkpoint import atomic_write
    from cgpyro.inference import SVIInference
    from cgpyro.specs import load_guide, load_model

    dataset = cgdata.load(args.data)
    if args.resume is not None:
        run = args.resume
        _check_run_dir(run, "--resume")
        config = _read_config(run)
        if list(dataset.counts.shape) != config["data_shape"]:
            raise ValueError(f"--resume {run}: the run was trained on data of shape "
                             f"{tuple(config['data_shape'])}, --data has {dataset.counts.shape}")
        trained_on = cgdata.load(run / "train.npz")
        if not np.array_equal(trained_on.counts, dataset.counts):
            raise ValueError(f"--resume {run}: --data {args.data} has the shape of the run's "
                             f"data but other counts than {run / 'train.npz'}; resume with the "
                             "data the run was started on")
        steps = args.steps or config["steps"]
        seed, device = config["seed"], args.device or config["device"]
        model_path, guide_path = run / "model.toml", run / "guide.toml"
    else:
        run = _writable_dir(args.out)
        if (run / "checkpoint.pt").exists():
            raise ValueError(f"--out {run}: already holds a trained run (checkpoint.pt); "
                             f"continue it with --resume {run}, or choose a new directory")
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
    def write_text(path: Path, text: str) -> None:  # atomic: a crash leaves the old file
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    if args.resume is None:
        write_text(run / "model.toml", model.spec.source)
        write_text(run / "guide.toml", guide_spec.source)
        cgdata.save(dataset, run / "train.npz")
        write_text(run / "config.json", json.dumps(config, indent=2))
    callbacks: list = []
    inference = SVIInference(model, guide=guide_spec.factory, seed=seed, device=device,
                             checkpoint=run / "checkpoint.pt", config=config,
                             progress=not args.quiet, callbacks=callbacks, **svi)
    resume = run / "checkpoint.pt" if args.resume is not None else None
    restore = _sigint_at_step_boundary(inference.callbacks)
    try:
        inference.fit(dataset, resume=resume)
    except KeyboardInterrupt:
        if (run / "checkpoint.pt").is_file():
            raise KeyboardInterrupt(
                f"interrupted at step {inference.step}; checkpoint saved in "
                f"{run / 'checkpoint.pt'}; continue with: cgpyro train --resume {run} "
                f"--data {args.data}") from None
        raise
    finally:
        restore()
    write_text(run / "config.json", json.dumps(config, indent=2))
    print(f"trained {inference.step} steps in {inference.fit_seconds:.1f} s; "
          f"final loss {inference.loss_history[-1]:.6g}; run saved in {run}")
    return EXIT_OK


def load_run(run: Path, device: str = "cpu"):
    """``(model, inference, train_dataset, config)`` of a run directory, trained state restored."""

    from cgpyro import data as cgdata
    from cgpyro.inference import SVIInference
    from cgpyro.specs import load_guide, load_model

    _check_run_dir(run, "--run")
    config = _read_config(run)
    train = cgdata.load(run / "train.npz")
    if list(train.counts.shape) != config["data_shape"]:
        raise ValueError(f"--run {run}: train.npz has shape {train.counts.shape}, config.json "
                         f"says {tuple(config['data_shape'])}")
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
    _single_thread()
    import numpy as np

    from cgpyro.checkpoint import atomic_write
    from cgpyro.data import load
    from cgpyro.guides import guide_for_new_sequences
    from cgpyro.predict import forecast

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
    parser.add_argument("--model", default="physics", help="model spec (default: physics)")
    parser.add_argument("--guide", default="lognormal", help="guide spec")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--particles", type=positive_int, default=250_000)
    parser.add_argument("--steps", type=positive_int, default=None, help="SVI steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_reproduce(args: argparse.Namespace) -> int:
    _single_thread()
    import inspect
    import json

    from cgpyro.experiment import run_paper_experiment, write_report
    from cgpyro.specs import load_guide, load_model

    out = _writable_dir(args.out)
    # check the specs before the (long) simulation
    n_bins = inspect.signature(run_paper_experiment).parameters["n_bins"].default
    load_model(args.model, n_bins=n_bins)
    load_guide(args.guide)
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


# -- curve -----------------------------------------------------------------------------------
def _configure_curve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="training dataset (.npz/.nc)")
    parser.add_argument("--test", type=Path, required=True,
                        help="held-out dataset with more snapshots than --data (forecast from "
                             "its first snapshots, scored on the rest)")
    parser.add_argument("--sizes", default="1,2,4,8,16,64",
                        help="comma-separated training-set sizes (default: 1,2,4,8,16,64)")
    parser.add_argument("--model", default="physics", help="model spec (default: physics)")
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
