"""Forecasts with uncertainty (Algorithm 1): posterior-predictive draws of the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine

from ._threads import with_auto_threads
from .data import DataError
from .guides import LogNormalGuide
from .inference import NumericalError, _describe_invalid, _is_invalid_values, as_counts

__all__ = ["Forecast", "forecast", "posterior_predictive", "sample_positions"]

LEVELS = (0.5, 0.8, 0.95)  # central intervals kept by every forecast


@dataclass
class Forecast:
    """Posterior-predictive summaries over ``n_times + horizon`` steps.

    Arrays (numpy, float64), axes ``(sequence, time, bin)``:

    - ``mean``: posterior (predictive) mean of the CG state ``X``;
    - ``lower``, ``upper``: 2.5 % / 97.5 % quantiles of the reconstructed FG bin fractions
      ``m / N`` sampled from p_cf (Algorithm 1, step 5);
    - ``mass``: ``(sequence, time)`` posterior mean of ``Σ_j X_j``;
    - ``intervals``: central intervals of the same draws at 50, 80 and 95 %
      (:meth:`interval`), for calibration at every level;
    - ``samples_x``, ``samples_fractions``: ``(sample, sequence, time, bin)`` draws, kept when
      ``keep_samples=True``.
    ``n_observed`` is the number of inferred (observed) steps; later steps are predicted.
    """

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    mass: np.ndarray
    n_observed: int
    totals: np.ndarray
    samples_x: np.ndarray | None = None
    samples_fractions: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)

    def interval(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` of the central ``level`` interval, each ``(sequence, time, bin)``."""
        key = round(float(level), 4)
        if key not in self.intervals:
            raise ValueError(f"level must be one of {sorted(self.intervals)}, got {level!r}")
        return self.intervals[key]

    @property
    def horizon(self) -> int:
        return self.mean.shape[1] - self.n_observed

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        """The arrays of ``pred.npz`` (design contract)."""
        return {"mean": self.mean, "lower": self.lower, "upper": self.upper, "mass": self.mass}


@with_auto_threads  # one torch thread for small problems (issue 9)
@torch.no_grad()
def forecast(
    model,
    guide,
    data,
    horizon: int,
    num_samples: int = 200,
    seed: int = 0,
    keep_samples: bool = False,
    transition_noise: bool = False,
    epistemic: bool = False,
) -> Forecast:
    """Sample ``q(X_{0:T})``, roll the CG law ``horizon`` steps, and sample p_cf (Algorithm 1).

    The bands come from Algorithm 1 (noisy rollouts, then p_cf). The forecast ``mean`` is the
    average over draws of ``X_T`` of the *noise-free* continuation ``X_{t+1} = E[X_{t+1}|X_t]``
    (``transition_noise=False``, default): for a linear mean law it has the same expectation as
    the average of noisy rollouts without their Monte Carlo noise (which otherwise grows with
    the horizon and shows up as mass error); ``transition_noise=True`` averages the noisy ones.

    :param model: a fitted :class:`~cgpyro.model.CGModel`.
    :param guide: the guide fitted to ``data``'s sequences (see
        :meth:`~cgpyro.inference.SVIInference.infer_states` for new sequences).
    :param data: counts ``(n_sequences, n_times, n_bins)`` (Dataset, array or tensor).
    :param horizon: coarse steps to forecast past the last snapshot (``>= 0``).
    :param num_samples: posterior samples.
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer) or horizon < 0:
        raise ValueError(f"horizon must be a non-negative integer, got {horizon!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) \
            or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    device = getattr(guide, "device", None) or getattr(getattr(guide, "init_loc", None),
                                                        "device", None)
    counts = as_counts(data, device=device)
    if counts.shape[-1] != model.n_bins:
        raise DataError(f"counts: expected {model.n_bins} bins (the model's n_bins), found "
                        f"{counts.shape[-1]}")
    if isinstance(guide, LogNormalGuide) and (guide.n_sequences, guide.n_times) != counts.shape[:2]:
        raise DataError(f"counts: the guide was fitted to {guide.n_sequences} sequences x "
                        f"{guide.n_times} snapshots, found {counts.shape[0]} x {counts.shape[1]} "
                        "(fit new sequences first: cgpyro.guides.guide_for_new_sequences)")
    totals = counts[:, 0].sum(-1)
    pyro.set_rng_seed(seed)
    saved = dict(model.fixed)
    drift = getattr(model.transition, "drift", None)
    if epistemic:
        if not hasattr(drift, "sample_linear"):
            raise ValueError("epistemic=True needs a drift with a Gaussian posterior of its "
                             "linear part (drift = 'flux')")
        for name, value in drift.sample_linear(num_samples).items():
            model.fixed[f"transition.drift.{name}"] = value.to(counts)
    try:
        try:
            out = posterior_predictive(model, guide, num_samples, counts, forecast=int(horizon),
                                       resample_observed=True)
        except ValueError as err:  # Pyro's validation met NaN/inf: diverged parameters
            if not _is_invalid_values(err):
                raise
            raise NumericalError(f"forecast: {_describe_invalid(err)}; the trained parameters "
                                 "may have diverged (see the loss history)") from None
        x, m = _collect(model, out, counts.shape[1], horizon)
        if horizon and not transition_noise:
            x = x.clone()
            theta = {name: out[name] for name in model.priors() if name in out}
            theta.update({k: v.to(x) for k, v in model.fixed.items()})
            prev = x[:, :, counts.shape[1] - 1]
            for t in range(counts.shape[1], counts.shape[1] + horizon):
                prev = model.transition_mean(prev, theta, totals)
                x[:, :, t] = prev
    finally:
        model.fixed.clear()
        model.fixed.update(saved)
    frac = m / totals[:, None, None]
    probs = [p for level in LEVELS for p in ((1 - level) / 2, (1 + level) / 2)]
    q = torch.quantile(frac, torch.tensor(probs, dtype=frac.dtype, device=frac.device), dim=0)
    q = q.cpu().numpy()
    intervals = {level: (q[2 * i], q[2 * i + 1]) for i, level in enumerate(LEVELS)}
    result = Forecast(
        mean=x.mean(0).cpu().numpy(),
        lower=intervals[0.95][0],
        upper=intervals[0.95][1],
        mass=x.sum(-1).mean(0).cpu().numpy(),
        n_observed=counts.shape[1],
        totals=totals.cpu().numpy(),
        intervals=intervals,
    )
    if keep_samples:
        result.samples_x = x.cpu().numpy()
        result.samples_fractions = frac.cpu().numpy()
    return result


def posterior_predictive(model, guide, num_samples: int, *args, **kwargs) -> dict:
    """Draws of every sample site of ``model`` replayed against ``guide``, vectorized.

    What ``pyro.infer.Predictive(model, guide=guide, parallel=True)`` computes, with the plate
    nesting known (one plate, ``sequences`` at dim -1; the draws go in a plate at dim -2) instead
    of guessed: Predictive guesses it by running the model with θ drawn from the *prior*, whose
    rollout over long sequences can overflow and be blamed on training. Here the model only ever
    sees θ from the guide.

    :returns: site name → tensor ``(num_samples, n_sequences, *event_shape)`` for sites in the
        sequence plate, ``(num_samples, 1, *event_shape)`` for global sites (θ).
    """
    with torch.no_grad(), pyro.plate("_num_predictive_samples", num_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs)
    return {name: site["value"] for name, site in model_trace.nodes.items()
            if site["type"] == "sample"}


def _collect(model, out, n_times, horizon):
    """States and counts ``(sample, sequence, time, bin)`` from Predictive's output."""
    def squeeze(v):  # Predictive adds a singleton plate axis before the sequence axis
        return v.reshape(v.shape[0], *v.shape[-3:]) if v.dim() > 4 else v

    if model.vectorized:
        x, m = squeeze(out["X"]), squeeze(out["counts"])
    else:
        x = torch.stack([out[f"X_{t}"].reshape(out[f"X_{t}"].shape[0], -1, model.n_bins)
                         for t in range(n_times)], -2)
        m = torch.stack([out[f"counts_{t}"].reshape(x.shape[0], -1, model.n_bins)
                         for t in range(n_times)], -2)
    if horizon:
        x = torch.cat([x, squeeze(out["X_forecast"])], -2)
        m = torch.cat([m, squeeze(out["counts_forecast"])], -2)
    return x, m


def sample_positions(counts, bin_edges, seed: int = 0) -> np.ndarray:
    """FG particle positions given bin counts, uniform within each bin (as p_cf implies).

    :param counts: integer counts ``(n_bins,)`` of one FG state (e.g. a p_cf sample).
    :param bin_edges: ``(n_bins + 1,)``.
    :returns: positions ``(Σ counts,)``, sorted by bin.
    """
    counts = np.asarray(counts)
    edges = np.asarray(bin_edges, dtype=np.float64)
    if counts.ndim != 1 or edges.shape != (counts.shape[0] + 1,):
        raise ValueError(f"counts must be (n_bins,) and bin_edges (n_bins + 1,); got "
                         f"{counts.shape} and {edges.shape}")
    rng = np.random.default_rng(seed)
    counts = np.rint(counts).astype(np.int64)
    left = np.repeat(edges[:-1], counts)
    width = np.repeat(np.diff(edges), counts)
    return left + width * rng.random(left.shape[0])
