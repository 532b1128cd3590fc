"""A training run on disk: :class:`Run` creates, opens, fits, resumes and forecasts.

A run directory holds ``config.json`` (settings, shapes and SHA-256 digests of the specs and
data), ``model.toml`` and ``guide.toml`` (the specs' text), ``train.npz`` (the training data)
and ``checkpoint.pt`` (:mod:`cgpyro.checkpoint`). :class:`Run` owns that format and its
policies: a writer holds an exclusive lock on the directory; a checkpoint, spec or data file
that does not match the digests in ``config.json`` is refused; loading a run imports no
constraint module the user did not allow (:class:`~cgpyro.virtual.ImportPolicy`); sizes are
checked against the available memory before anything large is allocated.

Every problem is one line: :class:`RunError` (a ``ValueError``) names the directory and what is
wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ._checks import check_int, is_int

__all__ = ["RUN_FILES", "Run", "RunError", "RunLockedError", "estimate_training"]

RUN_FILES = ("config.json", "model.toml", "guide.toml", "train.npz", "checkpoint.pt")
FORMAT = "cgpyro-run-2"
_DIGESTS = ("model_sha256", "guide_sha256", "data_sha256")
# Measured on the CLI (issue 8): 1e5 x 10 x 25 counts trained at 7.5 GB and wrote a 1.2 GB
# checkpoint, i.e. ~300 and ~48 bytes per count.
_BYTES_PER_COUNT, _CHECKPOINT_BYTES_PER_COUNT = 300, 48
_BYTES_PER_THETA = 64  # value, gradient, two Adam slots, prior and warm-start copies (float64)
# One SVI step took 2.5 s on 4000 x 10 x 25 counts (physics model, one busy CPU thread);
# ~20 s on 1e5 x 10 x 25 in issue 8: order 1 microsecond per count.
_SECONDS_PER_COUNT_STEP = 1e-6
_FORECAST_BYTES_PER_VALUE = 48  # states and observations per sample, float64, and summaries
WARN_BYTES = 2**30


class RunError(ValueError):
    """A run directory is missing, damaged, in use, or does not match what is asked."""


class RunLockedError(RunError):
    """Another process is writing to the run directory."""


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def data_digest(dataset) -> str:
    """SHA-256 of a :class:`~cgpyro.data.Dataset`'s counts, bin edges and ``dt``."""
    h = hashlib.sha256()
    h.update(str(dataset.counts.shape).encode())
    h.update(np.ascontiguousarray(dataset.counts, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(dataset.bin_edges, dtype=np.float64).tobytes())
    h.update(repr(float(dataset.dt)).encode())
    return h.hexdigest()


def estimate_training(shape: tuple[int, int, int], model=None) -> dict[str, int]:
    """Rough memory and checkpoint size of training on counts of ``shape`` (sequence, time,
    bin): ``{"bytes", "checkpoint_bytes", "theta"}``."""
    n = math.prod(int(d) for d in shape)
    theta = 0
    drift = getattr(getattr(model, "transition", None), "drift", None)
    if hasattr(drift, "shapes"):
        theta = sum(math.prod(int(d) for d in s) for s in drift.shapes().values())
    return {"bytes": n * _BYTES_PER_COUNT + theta * _BYTES_PER_THETA,
            "checkpoint_bytes": n * _CHECKPOINT_BYTES_PER_COUNT + theta * 32, "theta": theta}


class _Lock:
    """An exclusive ``flock`` on the directory itself (no lock file to leave behind); the
    kernel releases it when the process ends, however it ends."""

    def __init__(self, path: Path):
        import fcntl

        self.fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise RunLockedError(f"{path}: in use by another cgpyro process (training into it); "
                                 "wait for it to finish or choose another directory") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _probe_write(path: Path) -> None:
    """Fail now, not after training, where the directory cannot take new files (read-only
    mounts refuse even root, which ``os.access`` does not see)."""
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise RunError(f"{path}: cannot write to the run directory "
                       f"({exc.strerror or exc})") from None


def _is_run_file(name: str) -> bool:
    """A run file, or a temporary file of an atomic write of one that a crash left behind."""
    return name in RUN_FILES or (name.startswith(tuple(f".{f}." for f in RUN_FILES))
                                 and name.endswith(".tmp"))


def _read_config(run: Path) -> dict:
    """The run's ``config.json``, checked key by key (a damaged file is one error line)."""
    path = run / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise RunError(f"{path}: cannot read the run's configuration "
                       f"({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(config).__name__}")

    rules = {
        "data_shape": (lambda v: isinstance(v, list) and len(v) == 3
                       and all(is_int(n) and n >= 1 for n in v), "a list of 3 positive integers"),
        "steps": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "seed": (lambda v: is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
        "device": (lambda v: v in ("cpu", "cuda"), "'cpu' or 'cuda'"),
    }
    for key, (ok, rule) in rules.items():
        if key not in config:
            raise RunError(f"{path}: missing key {key!r}")
        if not ok(config[key]):
            raise RunError(f"{path}: {key}: expected {rule}, found {config[key]!r}"[:300])
    for key in _DIGESTS:
        if key in config and not (isinstance(config[key], str) and len(config[key]) == 64):
            raise RunError(f"{path}: {key}: expected a SHA-256 hex digest")
    if not isinstance(config.get("constraints", {}), dict):
        raise RunError(f"{path}: constraints: expected a JSON object")
    return config


def _write_text(path: Path, text: str) -> None:
    from .checkpoint import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _build_model(spec, n_bins: int, where: str):
    """The model of a spec; a spec whose model cannot be built is a SpecError naming it."""
    from .specs import SpecError, load_model

    try:
        return load_model(spec, n_bins=n_bins)
    except SpecError:
        raise
    except ValueError as err:  # a constraint refused by the import policy, a bad size
        raise SpecError(f"{where}: {' '.join(str(err).split())}") from None
    except (AttributeError, TypeError, OverflowError, IndexError, KeyError, RuntimeError,
            MemoryError) as err:  # e.g. a constraint that is no function of tensors
        raise SpecError(f"{where}: cannot build the model ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]})") from None


class _StepBoundarySignals:
    """Ctrl-C (SIGINT) and SIGTERM (a batch system's time limit) during training stop it at
    the end of the current step (a ``KeyboardInterrupt`` there), so that the checkpoint
    written on interrupt holds a consistent state. The first signal is remembered and acted
    on at the next step boundary (also when it comes while the first step is being
    prepared); later ones are ignored until the checkpoint is saved. Outside training the
    previous handlers apply."""

    def __init__(self):
        self.pending = False
        self.previous: dict = {}

    def install(self, inference) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        inference.callbacks.append(self._at_step_end)  # last: sees signals from the others
        signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
        self.previous = {sig: signal.signal(sig, self._handler) for sig in signals}

    def _handler(self, signum, frame) -> None:
        self.pending = True  # acted on at the step boundary; repeats change nothing

    def _at_step_end(self, step, loss, inference) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.previous = {}


class Run:
    """A run directory: its configuration, model, guide spec and training data.

    Make one with :meth:`create` (a new run) or :meth:`open` (an existing one); then
    :meth:`fit` trains or resumes, :meth:`load` restores the trained state, :meth:`forecast`
    predicts. A run opened for writing holds the directory's lock until :meth:`close` (or
    the end of a ``with`` block).

    :ivar path: the directory.
    :ivar config: ``config.json`` as a dict.
    :ivar model: the :class:`~cgpyro.model.CGModel` of ``model.toml``.
    :ivar guide_spec: the :class:`~cgpyro.specs.GuideSpec` of ``guide.toml``.
    :ivar train: the training :class:`~cgpyro.data.Dataset`, counts (sequence, time, bin).
    """

    def __init__(self, path: Path, config: dict, model, guide_spec, train, lock=None):
        self.path, self.config, self.model = Path(path), config, model
        self.guide_spec, self.train, self._lock = guide_spec, train, lock
        self.inference = None
        self.data_name: str | None = None  # how messages name the training data
        # constraint modules that processes reopening the run may import (``nproc > 1``)
        self._allow_import: tuple = ()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release the directory's lock (if held)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @classmethod
    def create(cls, path, data, model="auto", guide="lognormal", *, steps: int | None = None,
               seed: int = 0, device: str = "cpu", max_bytes: int | None = None,
               data_name: str | None = None, batch_size: int | None = None) -> Run:
        """A new run in ``path`` (created if missing; it must be empty or hold only the files of
        a run that never saved a checkpoint) for ``data`` (a Dataset or a data file).

        :param model, guide: spec names or ``.toml`` paths. A choosing model spec (the
            default ``"auto"``) picks its model from ``data``; the run stores the chosen spec
            and records the choice in ``config["model_choice"]``.
        :param steps: total SVI steps (default: the guide spec's).
        :param max_bytes: memory the run may need (default: the available memory).
        :param data_name: how messages name the data (default: its path).
        :param batch_size: sequences per SVI step (minibatch SVI; default: the guide spec's,
            else all).
        """
        from . import data as cgdata
        from .inference import SVIInference
        from .specs import load_guide, resolve_model_spec
        from .virtual import constraint_identity

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunError(f"{path}: exists and is not a directory")
        if (path / "checkpoint.pt").exists():  # checked again under the lock below
            raise RunError(f"{path}: already holds a trained run (checkpoint.pt); continue "
                           f"it with --resume {path}, or choose a new directory")
        if isinstance(data, cgdata.Dataset):
            dataset = data
        else:
            data_name = data_name or str(data)
            dataset = cgdata.load(data, max_bytes=max_bytes)
        if dataset.n_bins < 2:
            raise RunError(f"{data_name or 'data'}: counts has {dataset.n_bins} bin; the CG "
                           "model needs at least 2 bins")
        model_spec = resolve_model_spec(model, dataset.counts)  # "auto" picks from the data
        built = _build_model(model_spec.path, dataset.n_bins, model_spec.file)
        guide_spec = load_guide(guide)
        steps = steps or guide_spec.svi.get(
            "steps", inspect.signature(SVIInference).parameters["steps"].default)
        constraints = {vo["constraint"]: ident for vo in model_spec.virtual_observables
                       if (ident := constraint_identity(vo["constraint"])) is not None}
        config = {
            "format": FORMAT, "data_shape": list(dataset.counts.shape), "steps": steps,
            "seed": seed, "device": device, "dt": dataset.dt,
            "bin_edges": dataset.bin_edges.tolist(), "model_spec": model_spec.name,
            "guide_spec": guide_spec.name, "model_sha256": _sha256(model_spec.source),
            "guide_sha256": _sha256(guide_spec.source), "data_sha256": data_digest(dataset),
            "constraints": constraints,
        }
        if model_spec.choice is not None:
            config["model_choice"] = model_spec.choice
        if batch_size is not None:
            try:
                config["batch_size"] = check_int(batch_size, "batch_size")
            except ValueError as err:
                raise RunError(str(err)) from None
        run = cls(path, config, built, guide_spec, dataset)
        run.data_name = data_name
        run._allow_import = ("*",)  # the spec's constraints: this process just imported them
        run._check_memory(max_bytes)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"{path}: cannot create the directory "
                           f"({exc.strerror or exc})") from None
        lock = _Lock(path)
        run._lock = lock
        try:
            if (path / "checkpoint.pt").exists():
                raise RunError(f"{path}: already holds a trained run (checkpoint.pt); continue "
                               f"it with --resume {path}, or choose a new directory")
            others = sorted(p.name for p in path.iterdir() if not _is_run_file(p.name))
            if others:
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                raise RunError(f"{path}: holds files that are not part of a cgpyro run "
                               f"({shown}); choose an empty or new directory")
            _probe_write(path)
            _write_text(path / "model.toml", model_spec.source)
            _write_text(path / "guide.toml", guide_spec.source)
            cgdata.save(dataset, path / "train.npz")
            _write_text(path / "config.json", json.dumps(config, indent=2))
            return run
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(cls, path, *, device: str | None = None, writable: bool = False,
             allow_import=(), max_bytes: int | None = None, trained: bool = True) -> Run:
        """An existing run. ``writable``: take the lock (to resume training). ``trained=False``
        also opens a run created but not trained yet (no ``checkpoint.pt``).

        :param allow_import: module names of constraints that may be imported although they
            are not installed packages (``"*"``: any); see :class:`~cgpyro.virtual.ImportPolicy`.
        """
        from . import data as cgdata
        from .specs import load_guide
        from .virtual import ImportPolicy, import_policy

        path = Path(path)
        if not path.is_dir():
            raise RunError(f"{path}: no such run directory")
        lock = _Lock(path) if writable else None
        try:
            missing = [f for f in RUN_FILES if not (path / f).is_file()
                       and (trained or f != "checkpoint.pt")]
            if missing:
                raise RunError(f"{path}: not a run directory (missing {', '.join(missing)})")
            if writable:
                _probe_write(path)
            config = _read_config(path)
            if device is not None:
                config = {**config, "device": device}
            train = cgdata.load(path / "train.npz", max_bytes=max_bytes)
            if list(train.counts.shape) != config["data_shape"]:
                raise RunError(f"{path}: train.npz has shape {train.counts.shape}, config.json "
                               f"says {tuple(config['data_shape'])}")
            if "data_sha256" in config and data_digest(train) != config["data_sha256"]:
                raise RunError(f"{path}: train.npz is not the data the run was trained on (its "
                               "SHA-256 differs from config.json's)")
            policy = ImportPolicy(allowed=frozenset(allow_import),
                                  forbidden=(path.resolve(), Path.cwd().resolve()),
                                  recorded=config.get("constraints", {}))
            with import_policy(policy):
                model = _build_model(path / "model.toml", train.n_bins,
                                     str(path / "model.toml"))
            guide_spec = load_guide(path / "guide.toml")
            for name, spec in (("model", model.spec), ("guide", guide_spec)):
                key = f"{name}_sha256"
                if key in config and _sha256(spec.source) != config[key]:
                    raise RunError(f"{path / (name + '.toml')}: edited since the run was "
                                   "trained (its SHA-256 differs from config.json's); restore "
                                   "it, or train a new run with the edited spec")
            run = cls(path, config, model, guide_spec, train, lock)
            run._allow_import = tuple(allow_import)
            return run
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    # ------------------------------------------------------------------ training
    def _check_memory(self, max_bytes: int | None) -> None:
        from .checkpoint import available_memory, gib

        cost = estimate_training(self.train.counts.shape, self.model)
        limit = available_memory() if max_bytes is None else max_bytes
        shape = " x ".join(str(d) for d in self.train.counts.shape)
        what = getattr(self, "data_name", None) or str(self.path / "train.npz")
        if cost["bytes"] > limit:
            raise RunError(f"{what}: training on {shape} counts with {cost['theta']:,} network "
                           f"weights needs about {gib(cost['bytes'])} of memory, more than the "
                           f"{gib(limit)} available; train on fewer sequences "
                           "(--no-memory-check to try anyway)")
        if cost["bytes"] > WARN_BYTES:
            step = math.prod(self.train.counts.shape) * _SECONDS_PER_COUNT_STEP
            warnings.warn(f"training on {shape} counts needs about {gib(cost['bytes'])} of "
                          f"memory and writes checkpoints of about "
                          f"{gib(cost['checkpoint_bytes'])}; expect very roughly {step:.2g} s "
                          f"per step ({step * self.config['steps'] / 3600:.2g} h for "
                          f"{self.config['steps']} steps); fewer sequences train faster",
                          UserWarning, stacklevel=3)

    def _inference(self, *, steps: int, progress: bool, callbacks, checkpoint: bool):
        from . import inference as cginference  # module attribute: tests substitute the class

        svi = {**self.guide_spec.svi, "steps": steps}
        if self.config.get("batch_size") is not None:
            svi["batch_size"] = self.config["batch_size"]
        return cginference.SVIInference(
            self.model, guide=self.guide_spec.factory, seed=self.config["seed"],
            device=self.config["device"], checkpoint=self.checkpoint if checkpoint else None,
            config=self.config, progress=progress, callbacks=list(callbacks), **svi)

    def check_data(self, dataset, name: str = "--data") -> None:
        """Refuse ``dataset`` unless it is the run's training data (shape and counts)."""
        if list(dataset.counts.shape) != self.config["data_shape"]:
            raise RunError(f"{self.path}: the run was trained on data of shape "
                           f"{tuple(self.config['data_shape'])}, {name} has "
                           f"{dataset.counts.shape}")
        if not np.array_equal(self.train.counts, dataset.counts):
            raise RunError(f"{self.path}: {name} has the shape of the run's data but other counts "
                           f"than {self.path / 'train.npz'}; resume with the data the run was "
                           "started on (or leave the data out)")

    def fit(self, *, steps: int | None = None, progress: bool = True, callbacks=(),
            on_start=None, max_bytes: int | None = None, stop_on_signals: bool = False,
            nproc: int = 1):
        """Train: from the start, or from ``checkpoint.pt`` where there is one (resume).

        :param steps: total steps (default: ``config.json``'s; more extends a finished run).
        :param on_start: ``on_start(inference)`` before training.
        :param stop_on_signals: while training (main thread only), SIGINT and SIGTERM stop it
            at the end of the current step; later ones wait until the checkpoint is saved.
            An interrupt after which the checkpoint holds the run raises ``KeyboardInterrupt``
            naming the step and the checkpoint.
        :param nproc: data-parallel training on this many CPU processes (gloo; the sequences
            split between them, see :mod:`cgpyro._distributed`): this process is rank 0 (its
            ``inference`` holds every sequence's q(X) at the end), ``nproc - 1`` more are
            started; SIGINT/SIGTERM then always stop at a step boundary.
        :returns: the :class:`~cgpyro.inference.SVIInference`, trained.
        """
        if self._lock is None:
            raise RunError(f"{self.path}: opened read-only; open it with writable=True to train")
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
        resume = self.checkpoint if self.checkpoint.is_file() else None
        if steps is not None:
            self.config["steps"] = int(steps)
        if resume is not None:
            self._check_memory(max_bytes)
        inference = self._inference(steps=self.config["steps"], progress=progress,
                                    callbacks=callbacks, checkpoint=True)
        self.inference = inference
        if on_start is not None:
            on_start(inference)
        signals = _StepBoundarySignals()
        if stop_on_signals or nproc > 1:  # the processes stop together at a step boundary
            signals.install(inference)  # after on_start: its callback comes last
        try:
            with self._processes(nproc):
                inference.fit(self.train, resume=resume)
        except KeyboardInterrupt:
            if self.checkpoint.is_file():
                raise KeyboardInterrupt(f"interrupted at step {inference.step}; checkpoint "
                                        f"saved in {self.checkpoint}") from None
            raise
        finally:
            signals.restore()
        _write_text(self.path / "config.json", json.dumps(self.config, indent=2))
        return inference

    def _processes(self, nproc: int):
        """The data-parallel processes of :meth:`fit` (this one is rank 0), or no-op."""
        if nproc == 1:
            return contextlib.nullcontext()
        from . import _distributed

        if self.config["device"] != "cpu":
            raise RunError("data-parallel training (nproc > 1) runs CPU processes (gloo); "
                           f"this run's device is {self.config['device']!r}")
        if self.config["data_shape"][0] < nproc:
            raise RunError(f"nproc={nproc}: more processes than the run's "
                           f"{self.config['data_shape'][0]} sequences")
        return _distributed.processes(self.path, nproc=nproc, steps=self.config["steps"],
                                      allow_import=self._allow_import)

    def resume(self, data=None, *, steps: int | None = None, **kwargs):
        """Continue training from ``checkpoint.pt``; ``data`` (optional, a Dataset) must be the
        run's training data. Other arguments as :meth:`fit`."""
        if not self.checkpoint.is_file():
            raise RunError(f"{self.path}: no checkpoint.pt to resume from")
        if data is not None:
            self.check_data(data, "data")
        return self.fit(steps=steps, **kwargs)

    def load(self):
        """The trained state (no training): an :class:`~cgpyro.inference.SVIInference`."""
        if self.inference is None:
            inference = self._inference(steps=self.config["steps"], progress=False,
                                        callbacks=(), checkpoint=False)
            inference.load(self.train, self.checkpoint)
            self.inference = inference
        return self.inference

    def forecast(self, data, horizon: int, *, num_samples: int = 200, seed: int = 0,
                 allow_other_grid: bool = False, name: str = "--data",
                 max_bytes: int | None = None, out=None):
        """Posterior forecast of ``data`` (a Dataset) ``horizon`` steps past its last snapshot.

        Data on another grid (bin edges) or time step ``dt`` than the training data is
        refused unless ``allow_other_grid``; so is a forecast whose samples would need more
        than ``max_bytes`` (default: the available memory). Returns a
        :class:`~cgpyro.predict.Forecast` (summaries (sequence, time, bin)); ``out``: also
        write its :meth:`~cgpyro.predict.Forecast.to_npz_dict` arrays to this ``.npz`` file
        (atomically: readers never see a partial file).
        """
        from .checkpoint import atomic_write, available_memory, gib
        from .guides import guide_for_new_sequences
        from .predict import forecast

        train = self.train
        if data.n_bins != train.n_bins:
            raise RunError(f"{name} has {data.n_bins} bins, the run was trained on "
                           f"{train.n_bins}")
        if not allow_other_grid:
            if not math.isclose(data.dt, train.dt, rel_tol=1e-9):
                raise RunError(f"{name} has dt = {data.dt:g}, the run was trained with dt = "
                               f"{train.dt:g} (--allow-other-grid to forecast anyway)")
            if not np.allclose(data.bin_edges, train.bin_edges, rtol=1e-9, atol=1e-12):
                raise RunError(f"{name} has other bin edges than the run was trained on "
                               "(--allow-other-grid to forecast anyway)")
        need = (num_samples * data.n_sequences * (data.n_times + horizon) * data.n_bins
                * _FORECAST_BYTES_PER_VALUE)
        limit = available_memory() if max_bytes is None else max_bytes
        if need > limit:
            raise RunError(f"{name}: a forecast of {num_samples} samples x {data.n_sequences} "
                           f"sequences x {data.n_times + horizon} steps x {data.n_bins} bins "
                           f"needs about {gib(need)}, more than the {gib(limit)} available; "
                           "ask for fewer samples, sequences or steps")
        inference = self.load()
        same = data.counts.shape == train.counts.shape and np.array_equal(data.counts,
                                                                           train.counts)
        guide = inference.guide if same else guide_for_new_sequences(inference, data.counts)
        result = forecast(self.model, guide, data.counts, horizon, num_samples=num_samples,
                          seed=seed)
        arrays = result.to_npz_dict()
        if not all(np.isfinite(v).all() for v in arrays.values()):
            raise RunError(f"{self.path}: the forecast is not finite; the run may be diverged")
        if out is not None:
            def write(tmp):
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)

            atomic_write(out, write)
        return result
