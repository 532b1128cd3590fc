"""Stochastic variational inference for :class:`~cgpyro.model.CGModel` (section 2.5)."""

from __future__ import annotations

import copy
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from . import _distributed
from ._checks import describe_invalid, is_finite, is_invalid_values
from ._progress import anneal_end, phase, progress_bar
from ._threads import with_auto_threads
from ._warmstart import empirical_bayes, fit_drift_least_squares
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_rng_state
from .data import DataError, as_counts
from .elbo import AnalyticTraceELBO, FusedELBO
from .guides import AmortizedGuide, LogNormalGuide, own_parameters, training_pair
from .virtual import annealing

__all__ = ["SVIInference", "NumericalError", "as_counts", "empirical_bayes",
           "fit_drift_least_squares"]


class NumericalError(RuntimeError):
    """The loss or a parameter became NaN or infinite during training."""


# --------------------------------------------------------------------------- SVI
def _guide_parameters(guide) -> dict[str, torch.Tensor]:
    """Param-store name -> unconstrained tensor of ``guide`` (a module: its own parameters;
    a plain callable guide: whatever the param store holds)."""
    if isinstance(guide, torch.nn.Module):
        return own_parameters(guide)
    return dict(pyro.get_param_store().named_parameters())


# Names of checkpoints written before guides were PyroModules (cgpyro <= 0.x): pyro.module's
# "{prefix}$$${name}" and the AutoGuideList parts "CGAutoGuide.{i}." of the autoguide states;
# and the lognormal scale, once a positive PyroParam "X_scale" whose unconstrained value was
# already its log.
_OLD_NAMES = ((re.compile(r"\$\$\$"), "."), (re.compile(r"^CGAutoGuide\.\d+\."), "q."),
              (re.compile(r"\.X_scale$"), ".X_log_scale"))


def _current_name(name: str) -> str:
    for pattern, new in _OLD_NAMES:
        name = pattern.sub(new, name)
    return name


_WARM_START_SEQUENCES = 8192


def _adam(params, **kwargs) -> torch.optim.Optimizer:
    """``Adam``, or ``SparseAdam`` for a parameter whose gradient is sparse: the lazy Adam of
    minibatch SVI, which updates (values and moments) only the rows of the batch, so a step
    costs O(batch) and rows outside the batch stay where they are. Pyro creates each optimizer
    after the first backward pass, so the gradient's layout is known here. Dense ones use the
    fused kernel (the same update in one pass over the parameter)."""
    (param,) = params
    if param.grad is not None and param.grad.is_sparse:
        return torch.optim.SparseAdam(params, **kwargs)
    return torch.optim.Adam(params, fused=True, **kwargs)  # one kernel: 0.16 -> 0.11 ms


class SVIInference:
    r"""Fit a :class:`~cgpyro.model.CGModel` by SVI with ``Trace_ELBO`` and Adam.

    Settings are stored here; :meth:`fit` trains. The stiff virtual observables are annealed
    (σ_c from ``sigma_start`` to its final value, see :class:`~cgpyro.virtual.VirtualObservable`),
    and the learning rates decay geometrically to ``lr · lr_final_factor``.

    :param model: the model.
    :param guide: ``"lognormal"`` (the paper's guide) or a factory
        ``guide(model, counts, theta_init, theta_held=...) -> guide`` (``theta_held``, passed
        when the model has such sites: θ set from the data by empirical Bayes, which the guide
        holds as constant Delta sites; see :class:`~cgpyro.guides.ThetaMAP`).
    :param steps: total SVI steps (a resumed run continues up to this number).
    :param lr: Adam step size of the local (per sequence) variational parameters.
    :param lr_theta: Adam step size of θ (default ``lr / 10``).
    :param warm_start: initialize θ_NN by least squares on the empirical fractions.
    :param tol: stop early once annealing is over and the mean loss over ``window`` steps improves
        by less than ``tol`` nats per (sequence, time) between windows (``None``: never).
    :param callbacks: ``callback(step, loss, inference)``; a callback returning ``True`` stops.
    :param checkpoint: path of the checkpoint file (``None``: no checkpoints).
    :param elbo: ``"analytic"`` (:class:`~cgpyro.elbo.AnalyticTraceELBO`: closed-form
        expectations of the data, constraint and entropy terms; same ELBO, lower variance;
        with the lognormal guide, one particle and one process evaluated as
        :class:`~cgpyro.elbo.FusedELBO`, the same estimator without Pyro traces per step) or
        ``"trace"`` (plain ``Trace_ELBO``).
    """

    _task = "training"  # what the loop runs, for error messages

    def __init__(
        self,
        model,
        guide: str | Callable = "lognormal",
        *,
        steps: int = 2000,
        lr: float = 0.01,
        lr_theta: float | None = None,
        lr_final_factor: float = 0.1,
        num_particles: int = 1,
        warm_start: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        tol: float | None = None,
        window: int = 200,
        progress: bool = True,
        callbacks: Sequence[Callable] = (),
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 500,
        batch_size: int | None = None,
        elbo: str = "analytic",
        config: dict | None = None,
    ):
        for name, value in (("steps", steps), ("num_particles", num_particles),
                            ("checkpoint_every", checkpoint_every), ("window", window)):
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("lr", lr), ("lr_final_factor", lr_final_factor)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if lr_theta is not None and not (is_finite(lr_theta) and lr_theta >= 0):
            raise ValueError(f"lr_theta must be a non-negative number, got {lr_theta!r}")
        if tol is not None and not (is_finite(tol) and tol >= 0):
            raise ValueError(f"tol must be None or a non-negative number, got {tol!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) \
                or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if elbo not in ("analytic", "trace"):
            raise ValueError(f"elbo must be 'analytic' or 'trace', got {elbo!r}")
        bad = [cb for cb in callbacks if not callable(cb)]
        if bad:
            raise ValueError(f"callbacks must be callables, got {bad[0]!r}")
        if checkpoint is not None and not isinstance(checkpoint, str | os.PathLike):
            raise ValueError(f"checkpoint must be a path or None, got {checkpoint!r}")
        self.elbo = elbo
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        self.model = model
        self.guide_factory = guide
        self.steps, self.lr = int(steps), float(lr)
        self.lr_theta = float(lr / 10 if lr_theta is None else lr_theta)
        self.lr_final_factor = float(lr_final_factor)
        self.num_particles, self.warm_start, self.seed = num_particles, warm_start, int(seed)
        self.tol, self.window, self.progress = tol, int(window), progress
        self.callbacks = list(callbacks)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = int(checkpoint_every)
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int | np.integer)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be None or a positive integer, got {batch_size!r}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.config = dict(config or {})
        self.guide = None
        self.loss_history: list[float] = []
        self.step = 0
        self.converged = False
        self.fit_seconds = 0.0
        self._world = (0, 1)  # (rank, processes) of data-parallel training, set by fit

    # ------------------------------------------------------------------ helpers
    def _make_guide(self, counts, theta_init):
        held = self._held  # the guide's ThetaMAP moves them to the guide's dtype and device
        if self.guide_factory == "lognormal":
            guide = LogNormalGuide(self.model, counts, theta_init=theta_init, theta_held=held)
        elif callable(self.guide_factory):
            # theta_held only where there are held sites: three-argument factories still work
            # for models without any
            guide = self.guide_factory(self.model, counts, theta_init,
                                       **({"theta_held": held} if held else {}))
        else:
            raise ValueError("guide must be 'lognormal' or a factory callable, "
                             f"got {self.guide_factory!r}")
        guide.theta.linear_posterior = self._posterior
        return guide

    def _elbo(self):
        cls = AnalyticTraceELBO if self.elbo == "analytic" else Trace_ELBO
        return cls(num_particles=self.num_particles, vectorize_particles=self.num_particles > 1)

    def _svi(self, guide, optim) -> SVI:
        """SVI of the model and ``guide`` (one process); ``elbo="analytic"`` with the lognormal
        guide and one particle evaluates the same estimator fused (:class:`FusedELBO`)."""
        if self.elbo == "analytic" and self.num_particles == 1 \
                and FusedELBO.applies(self.model, guide):
            elbo = FusedELBO(self.model, guide)
            return SVI(*elbo.pair, optim, loss=elbo)
        return SVI(*training_pair(self.model, guide), optim, loss=self._elbo())

    def _optim_args(self, name: str) -> dict:
        # θ (the parameters of the guide's MAP part) has its own step size
        param = dict(pyro.get_param_store().named_parameters())[name]
        theta = getattr(self.guide, "theta", None)
        is_theta = isinstance(theta, torch.nn.Module) and any(
            param is p for p in theta.parameters())
        return {"lr": self.lr_theta if is_theta else self.lr, "betas": (0.9, 0.999)}

    def _lr_factor(self, epoch: int) -> float:
        """Geometric decay from 1 to ``lr_final_factor`` over ``steps``: the scheduler's epoch
        ``k + 1`` (after step ``k``, counted from 0) gives ``lr_final_factor ** (k / steps)``."""
        return self.lr_final_factor ** (max(epoch - 1, 0) / self.steps)

    def _optimizer(self):
        """Adam with one step size per parameter and the lr decay, a per-parameter
        ``LambdaLR`` that :meth:`_set_lr` steps once per SVI step; parameters with sparse
        gradients (the lognormal guide's states in minibatch SVI) get ``SparseAdam``."""
        return pyro.optim.LambdaLR({"optimizer": _adam,
                                    "optim_args": self._optim_args,
                                    "lr_lambda": self._lr_factor})

    def _set_lr(self, optim, step: int) -> None:
        """The lr for the step after ``step``: one step of every parameter's scheduler."""
        optim.step()

    def _optim_state(self, optim) -> dict:
        """Torch optimizer state per parameter name (the scheduler's position is the step count),
        including state restored from a checkpoint that no step has consumed yet (Pyro creates
        each optimizer at its parameter's first step)."""
        current = {name: state["optimizer"] for name, state in optim.get_state().items()}
        return {**self._restored_optim, **current}

    def _save(self, optim) -> None:
        if self.checkpoint is None:
            return
        params, state = _guide_parameters(self.guide), self._optim_state(optim)
        if self._world[1] > 1:  # q(X) of every process; rank 0 writes
            params, state = self._gather(params), {k: self._gather_state(k, v)
                                                   for k, v in state.items()}
            if self._world[0] != 0:
                return
        save_checkpoint(self.checkpoint, step=self.step, optim=state, params=params,
                        loss_history=self.loss_history, config=self.config,
                        extra={"converged": bool(self.converged)})

    # ------------------------------------------------------------------ data parallel
    def _is_local(self, name: str) -> bool:
        """A per-sequence parameter (q(X) of the lognormal guide), kept on its shard."""
        return isinstance(self.guide, LogNormalGuide) and name.startswith(f"{self.guide.prefix}.")

    def _gather(self, params: dict) -> dict:
        return {k: _distributed.gather_rows(v.detach(), self._n_all) if self._is_local(k)
                else v for k, v in params.items()}

    def _gather_state(self, name: str, state: dict) -> dict:
        """A torch optimizer state dict of parameter ``name`` with its per-sequence tensors
        (Adam's moments of a q(X) parameter) gathered from every process."""
        if not self._is_local(name):
            return state
        return {**state, "state": {i: {k: _distributed.gather_rows(v, self._n_all)
                                       if torch.is_tensor(v) and v.dim() else v
                                       for k, v in s.items()}
                                   for i, s in state["state"].items()}}

    def _shard_payload(self, payload: dict) -> dict:
        """A checkpoint's q(X) rows (and their optimizer state) of this process's block."""
        rows = self._rows

        def cut(v):
            return v[rows] if torch.is_tensor(v) and v.dim() else v

        params = {k: cut(v) if self._is_local(_current_name(k)) else v
                  for k, v in payload["params"].items()}
        optim = {k: {**st, "state": {i: {kk: cut(vv) for kk, vv in s.items()}
                                     for i, s in st["state"].items()}}
                 if self._is_local(_current_name(k)) else st
                 for k, st in payload["optim"].items()}
        return {**payload, "params": params, "optim": optim}

    def _assemble(self, counts: torch.Tensor, theta_init) -> None:
        """After data-parallel training: ``guide`` becomes the guide of all sequences (θ and
        every process's q(X)), the same on every process."""
        values = self._gather(_guide_parameters(self.guide))
        self.guide = self._make_guide(counts, theta_init)
        pyro.clear_param_store()  # the shard guide's tensors hold the names
        with torch.no_grad():
            pyro.poutine.trace(self.guide).get_trace(counts)
            for name, param in _guide_parameters(self.guide).items():
                param.copy_(values[name])

    def _check_finite(self, loss: float | None, every_row: bool = True) -> None:
        """NaN/inf in the loss or a parameter stops training. Without ``every_row`` the
        parameters with sparse gradients (the states of minibatch SVI: reading them all costs
        O(n)) are skipped; a bad row shows in the loss when its sequence is drawn again, and
        :meth:`_loop` checks every row before each checkpoint and at the end."""
        bad = self._nonfinite(loss, every_row)
        if bad:
            self._numerical_failure(self.step, bad)

    def _nonfinite(self, loss: float | None, every_row: bool = True) -> str | None:
        """What is not finite (see :meth:`_check_finite`), or ``None``."""
        bad = None
        if loss is not None and not math.isfinite(loss):
            bad = f"loss is {loss}"
        else:
            for name, value in _guide_parameters(self.guide).items():
                if not every_row and value.grad is not None and value.grad.is_sparse:
                    continue
                if not torch.isfinite(value).all():
                    bad = f"parameter {name!r} is not finite"
                    break
        return bad

    def _numerical_failure(self, step: int, bad: str):
        if self._task != "training":
            raise NumericalError(f"{self._task}: {bad} at step {step}")
        last = (f"last good checkpoint: {self.checkpoint} (step {self._last_saved})"
                if self.checkpoint is not None and self._last_saved is not None
                else "no checkpoint was written")
        raise NumericalError(f"training stopped at step {step}: {bad}; {last}")

    # ------------------------------------------------------------------ training
    @with_auto_threads  # one torch thread for small problems (issue 9)
    def fit(self, data, resume: str | Path | None = None) -> SVIInference:
        """Train on ``data`` (Dataset, array or tensor of counts ``(n_seq, n_times, n_bins)``).

        :param resume: a checkpoint written by an earlier run with the same settings and data;
            training continues from its step up to ``steps`` and gives the same result as an
            uninterrupted run.
        :returns: ``self``; see ``loss_history``, ``guide``, ``converged``.
        """
        counts, optim, svi = self._setup(data, load_checkpoint(resume) if resume else None)
        if self.step > self.steps:
            raise CheckpointError(f"checkpoint {resume} is at step {self.step}, beyond "
                                  f"steps={self.steps}: pass steps >= {self.step}")
        # Minibatch SVI over sequences: the plate scales the batch's terms by n / batch_size.
        subsample = self.batch_size if self.batch_size and self.batch_size < len(counts) \
            else None
        if subsample and not isinstance(self.guide, LogNormalGuide | AmortizedGuide):
            raise ValueError("batch_size needs the lognormal or amortized guide (autoguides "
                             "see every sequence at each step)")
        if isinstance(self.guide, LogNormalGuide):  # O(batch) steps: SparseAdam on q(X)'s rows
            self.guide.sparse_gradients = bool(subsample)
        self._loop(svi, optim, counts, subsample)
        if self._world[1] > 1:
            self._assemble(as_counts(data, device=self.device), self._theta_init)
        return self

    def _loop(self, svi, optim, counts, subsample) -> None:
        """SVI steps from ``self.step`` to ``steps``: annealing, lr schedule, NaN checks,
        callbacks, early stopping and checkpoints (the one loop of :meth:`fit` and
        :meth:`infer_states`)."""
        parallel = self._world[1] > 1
        scale = (self._n_all if parallel else counts.shape[0]) * counts.shape[1]
        # the model's default totals read every sequence; a minibatch step only its rows
        kwargs = {"subsample_size": subsample}
        if subsample:
            kwargs["totals"] = counts[:, 0].sum(-1)
        start = time.perf_counter()
        bar = progress_bar(self.steps, self.step, disable=not self.progress)  # log: 10 % lines
        annealed_at = anneal_end(self.model.virtual_observables, self.steps)
        try:
            while self.step < self.steps and not self.converged:
                try:
                    with annealing(self.step / self.steps):
                        loss = svi.step(counts, **kwargs)
                except ValueError as err:  # Pyro's argument validation met NaN/inf in the model
                    if not is_invalid_values(err):
                        raise
                    self._numerical_failure(self.step + 1, describe_invalid(err))
                self._set_lr(optim, self.step)
                self.step += 1
                self.loss_history.append(loss)
                # before the callbacks: an interrupt raised by one saves this step's verdict
                self.converged = self._has_converged(scale)
                try:
                    stop = any(cb(self.step, loss, self) is True for cb in self.callbacks)
                    interrupted = False
                except KeyboardInterrupt:
                    if not parallel:
                        raise
                    stop, interrupted = True, True
                bad = self._nonfinite(loss, every_row=not subsample)
                if parallel:  # every process stops, is interrupted or fails at the same step
                    stop, failed, interrupted = _distributed.agree(stop, bad is not None,
                                                                   interrupted)
                    if failed and bad is None:
                        bad = "a parameter of another process is not finite"
                if bad:
                    self._numerical_failure(self.step, bad)
                if interrupted:
                    raise KeyboardInterrupt
                bar.update(1)
                if self.step % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.4g}", sigma_c=phase(self.step, annealed_at))
                self.converged = stop or self.converged
                if self.checkpoint is not None and (self.step % self.checkpoint_every == 0):
                    if subsample:
                        self._check_finite(None)
                    self._save(optim)
                    self._last_saved = self.step
        except KeyboardInterrupt:
            self._save(optim)
            raise
        finally:
            bar.close()
            self.fit_seconds += time.perf_counter() - start
        if subsample:
            self._check_finite(None)
        self._save(optim)

    def _setup(self, data, payload):
        counts = as_counts(data, device=self.device)
        if counts.shape[1] < 2:
            raise ValueError(
                f"training needs at least 2 snapshots per sequence, got {counts.shape[1]}"
            )
        if counts.shape[-1] != self.model.n_bins:
            raise DataError(f"counts: expected {self.model.n_bins} bins (the model's n_bins), "
                            f"found {counts.shape[-1]}")
        self.model.to(self.device)
        # θ set from the data and held (σ_r, the empirical-Bayes linear part): the guide holds
        # them, the model is not changed
        self._held, self._posterior = empirical_bayes(self.model, counts)
        pyro.clear_param_store()
        pyro.set_rng_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        theta_init = self.model.init_values(gen)
        if self.warm_start and payload is None:
            # A start for SVI: at most _WARM_START_SEQUENCES evenly spread sequences, so its
            # memory (L-BFGS over all pairs: 4 GB at 10^5 sequences) stays bounded.
            every = torch.linspace(0, len(counts) - 1, _WARM_START_SEQUENCES).round().long() \
                if len(counts) > _WARM_START_SEQUENCES else slice(None)
            theta_init = fit_drift_least_squares(self.model, counts[every], theta_init,
                                                 generator=gen, held=self._held)
        self._world = rank, size = _distributed.world()
        self._theta_init = theta_init
        if size == 1:
            self.guide = self._make_guide(counts, theta_init)
            optim = self._optimizer()
            svi = self._svi(self.guide, optim)
        else:
            counts, optim, svi = self._setup_shard(counts, theta_init, rank, size)
            if payload is not None:
                payload = self._shard_payload(payload)
        self.step, self.loss_history, self.converged = 0, [], False
        self._last_saved, self._restored_optim = None, {}
        if payload is not None:
            self._restore(payload, counts, optim)
        self.optim = optim
        return counts, optim, svi

    def _setup_shard(self, counts, theta_init, rank: int, size: int):
        """Data parallel (an initialized process group of ``size``): the guide of this
        process's block of sequences, θ summed over processes (see :mod:`cgpyro._distributed`).
        The model's setup above ran on all the data, the same on every process."""
        if self.device.type != "cpu":
            raise ValueError("data-parallel training runs CPU processes (gloo backend); "
                             f"got device {str(self.device)!r}")
        self._n_all, self._rows = len(counts), _distributed.shard(len(counts), rank, size)
        counts = counts[self._rows]
        self.guide = self._make_guide(counts, theta_init)
        if not isinstance(self.guide, LogNormalGuide | AmortizedGuide):
            raise ValueError("data-parallel training needs the lognormal or amortized guide")
        with torch.no_grad():
            pyro.poutine.trace(self.guide).get_trace(counts)  # creates every parameter
        own = _guide_parameters(self.guide)
        shared = [own[k] for k in sorted(own) if not self._is_local(k)]
        for param in shared:  # one θ start everywhere, whatever the warm start's rounding
            torch.distributed.broadcast(param.data, 0)
        pyro.set_rng_seed(self.seed + rank)  # independent draws of q(X) per process
        optim, elbo = self._optimizer(), self._elbo()
        scale = _distributed.ScaleGlobal(1.0 / size)
        model, guide = training_pair(self.model, self.guide)
        svi = SVI(scale(model), scale(guide), optim, loss=elbo.loss,
                  loss_and_grads=_distributed.all_reduced(elbo.loss_and_grads, shared))
        return counts, optim, svi

    def load(self, data, checkpoint) -> SVIInference:
        """Restore a trained state from ``checkpoint`` (written by :meth:`fit` on ``data``).

        No training happens; ``guide``, ``loss_history`` and ``step`` are as saved.
        """
        self._setup(data, load_checkpoint(checkpoint))
        return self

    def _has_converged(self, scale: int) -> bool:
        w = self.window
        annealed = all(vo.sigma_start is None or self.step >= vo.anneal_fraction * self.steps
                       for vo in self.model.virtual_observables)
        if self.tol is None or not annealed or self.step % w or len(self.loss_history) < 2 * w:
            return False
        prev = np.mean(self.loss_history[-2 * w:-w])
        last = np.mean(self.loss_history[-w:])
        return bool((prev - last) / scale < self.tol)  # a NumPy bool broke safe loading

    def _restore(self, payload, counts, optim) -> None:
        config = payload["config"]
        if self.config and config and config.get("data_shape") != self.config.get("data_shape"):
            raise CheckpointError(
                f"checkpoint was written for data of shape {config.get('data_shape')}, "
                f"got {self.config.get('data_shape')}"
            )
        for key, what in (("model_sha256", "model spec"), ("guide_sha256", "guide spec"),
                          ("data_sha256", "training data")):  # written by cgpyro.run.Run
            if key in self.config and config.get(key) != self.config[key]:
                raise CheckpointError(f"checkpoint was written for another {what} than this "
                                      "run's (a checkpoint from another run?)")
        # One guide trace creates every parameter (autoguides create theirs lazily), then the
        # saved (unconstrained) values are copied into the guide's own tensors.
        with torch.no_grad():
            pyro.poutine.trace(self.guide).get_trace(counts)
        own = _guide_parameters(self.guide)
        saved = {_current_name(k): v for k, v in payload["params"].items()}
        missing = set(own) ^ set(saved)
        if missing:
            raise CheckpointError(f"checkpoint parameters do not match this model/guide: "
                                  f"{sorted(missing)[:5]}")
        for name, value in saved.items():
            if own[name].shape != value.shape:
                raise CheckpointError(f"checkpoint parameter {name!r} has shape "
                                      f"{tuple(value.shape)}, "
                                      f"expected {tuple(own[name].shape)}")
            with torch.no_grad():
                own[name].copy_(value.to(own[name]))
        self.step = int(payload["step"])
        self._restored_optim = {_current_name(k): v for k, v in payload["optim"].items()}
        # Each parameter's scheduler resumes at the step count (lr_lambdas: see LambdaLR).
        optim.set_state({name: {"optimizer": state,
                                "scheduler": {"last_epoch": self.step, "lr_lambdas": [None]}}
                         for name, state in self._restored_optim.items()})
        self.loss_history = list(payload["loss_history"])
        self.converged = bool(payload.get("extra", {}).get("converged", False))
        self._last_saved = self.step
        set_rng_state(payload["rng"])

    # ------------------------------------------------------------------ new sequences
    def infer_states(self, data, steps: int | None = None, prefix: str = "new") -> LogNormalGuide:
        """Fit q(X) of sequences not seen in training, with θ fixed at θ_MAP.

        :param data: counts ``(n_sequences, n_times, n_bins)`` of the new sequences.
        :returns: a :class:`LogNormalGuide` for them (its params are named ``{prefix}.*``).
        """
        if self.guide is None:
            raise ValueError("infer_states needs a fitted inference: call fit() first")
        counts = as_counts(data, device=self.device)
        n_bins = self.model.n_bins
        if counts.shape[-1] != n_bins:
            raise ValueError(f"new data has {counts.shape[-1]} bins, "
                             f"the model was trained on {n_bins}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int | np.integer)
                                  or steps < 1):
            raise ValueError(f"steps must be None or a positive integer, got {steps!r}")
        steps = int(steps or max(500, self.steps // 2))
        # Seeded: the states of new sequences do not depend on what ran before (the CLI's
        # predict and the Python API give the same forecast for the same seed).
        pyro.set_rng_seed(self.seed)
        held = self.guide.theta.held
        guide = LogNormalGuide(self.model, counts, theta_values=self.guide.theta_map(),
                               prefix=prefix, theta_held=held)
        guide.theta.linear_posterior = self.guide.theta.linear_posterior
        store = pyro.get_param_store()
        for name in own_parameters(guide):  # start from the counts, not an earlier fit's states
            if name in store:
                del store[name]
        # The training loop, on a copy that holds this run: its own step count, θ fixed (the
        # guide has no θ parameters), no callbacks, checkpoints or early stopping.
        run = copy.copy(self)
        run.guide, run.steps, run._task = guide, steps, "inferring new sequences"
        run.callbacks, run.checkpoint, run.tol, run.progress = [], None, None, False
        run.step, run.loss_history, run.converged, run._last_saved = 0, [], False, None
        run._world = (0, 1)  # after data-parallel training too: this process's own sequences
        optim = run._optimizer()
        run._loop(self._svi(guide, optim), optim, counts, None)
        return guide
