"""Forecasts with uncertainty (Algorithm 1): posterior-predictive draws of the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ._checks import describe_invalid, is_invalid_values
from ._threads import with_auto_threads
from .data import DataError
from .guides import LogNormalGuide
from .inference import NumericalError, as_counts

__all__ = ["Forecast", "forecast", "posterior_samples", "sample_positions"]

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
    epistemic: bool | None = None,
    band_noise: bool | None = None,
) -> Forecast:
    """Sample ``q(X_{0:T})``, roll the CG law ``horizon`` steps, and sample p_cf (Algorithm 1).

    The bands come from Algorithm 1 (noisy rollouts, then p_cf). The forecast ``mean`` is the
    average over draws of ``X_T`` of the *noise-free* continuation ``X_{t+1} = E[X_{t+1}|X_t]``
    (``transition_noise=False``, default): for a linear mean law it has the same expectation as
    the average of noisy rollouts without their Monte Carlo noise (which otherwise grows with
    the horizon and shows up as mass error); ``transition_noise=True`` averages the noisy ones.
    With ``band_noise=False`` the bands past the last snapshot are p_cf drawn around that
    noise-free continuation instead: for independent particles the counts at a later step are,
    given the FG state, nearly multinomial around the propagated density, so the rollout noise
    would count the same fluctuation twice.

    :param model: a fitted :class:`~cgpyro.model.CGModel`.
    :param guide: the guide fitted to ``data``'s sequences (see
        :meth:`~cgpyro.inference.SVIInference.infer_states` for new sequences).
    :param data: counts ``(n_sequences, n_times, n_bins)`` (Dataset, array or tensor).
    :param horizon: coarse steps to forecast past the last snapshot (``>= 0``).
    :param num_samples: posterior samples.
    :param epistemic: draw the linear part of the drift (jumps, δ, memory) from its
        empirical-Bayes posterior, one draw per sample, so that the bands include the
        uncertainty of θ (wide with one training sequence, negligible with many). ``None``
        (default): whenever the drift has such a posterior (``drift = "flux"``).
    :param band_noise: bands from noisy rollouts (Algorithm 1) or from p_cf around the
        noise-free continuation; ``None`` (default): the transition's ``forecast_noise``
        (``True`` unless the model spec says otherwise). ``transition_noise=True`` needs it.
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer) or horizon < 0:
        raise ValueError(f"horizon must be a non-negative integer, got {horizon!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) \
            or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if band_noise is None:
        band_noise = transition_noise or getattr(model.transition, "forecast_noise", True)
    if transition_noise and not band_noise:
        raise ValueError("band_noise=False draws the bands around the noise-free continuation: "
                         "it needs transition_noise=False")
    counts = as_counts(data, device=_guide_device(guide))
    if counts.shape[-1] != model.n_bins:
        raise DataError(f"counts: expected {model.n_bins} bins (the model's n_bins), found "
                        f"{counts.shape[-1]}")
    fitted = guide.states()[0].shape[:2] if isinstance(guide, LogNormalGuide) else None
    if fitted is not None and fitted != counts.shape[:2]:
        raise DataError(f"counts: the guide was fitted to {fitted[0]} sequences x "
                        f"{fitted[1]} snapshots, found {counts.shape[0]} x {counts.shape[1]} "
                        "(fit new sequences first: cgpyro.guides.guide_for_new_sequences)")
    totals = counts[:, 0].sum(-1)
    pyro.set_rng_seed(seed)
    drift = getattr(model.transition, "drift", None)
    posterior = getattr(getattr(guide, "theta", None), "linear_posterior", None)
    if epistemic is None:  # with one sequence a point estimate of θ makes the bands too narrow
        epistemic = posterior is not None
    draws = {}
    if epistemic:
        if posterior is None or not hasattr(drift, "sample_linear"):
            raise ValueError("epistemic=True needs a drift with a Gaussian posterior of its "
                             "linear part (drift = 'flux', fitted)")
        draws = {f"transition.drift.{name}": value.to(counts)
                 for name, value in drift.sample_linear(posterior, num_samples).items()}
    try:
        out = posterior_samples(model, guide, counts, num_samples, forecast=int(horizon),
                                theta=draws)
    except ValueError as err:  # Pyro's validation met NaN/inf: diverged parameters
        if not is_invalid_values(err):
            raise
        raise NumericalError(f"forecast: {describe_invalid(err)}; the trained parameters "
                             "may have diverged (see the loss history)") from None
    x, m = out["X"], out["counts"]
    if horizon:
        x = torch.cat([x, out["X_forecast"]], -2)
        m = torch.cat([m, out["counts_forecast"]], -2)
    if horizon and not transition_noise:
        theta = {name: out[name] for name in model.site_names() if name in out}
        theta.update({k: v.to(x) for k, v in model.fixed.items()})
        theta.update(draws)
        T0 = counts.shape[1]
        k = getattr(model.transition, "order", 1)
        # X_{t}, X_{t-1}, ..., X_{t-k+1} (newest first; before X_0: X_0), the law's history
        hist = [x[:, :, max(T0 - 1 - m, 0)] for m in range(max(k, 2))]
        for t in range(T0, T0 + horizon):
            hist = [model.transition_mean(hist[0], theta, totals, tuple(hist[1:])), *hist[:-1]]
            x[:, :, t] = hist[0]
        if not band_noise:
            future = x[:, :, T0:]
            m[:, :, T0:] = model.emission_dist(future, totals[:, None], theta).sample()
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


def _guide_device(guide) -> torch.device | None:
    """Where the guide's q(X) lives (``None``: the default device)."""
    return guide.states()[0].device if hasattr(guide, "states") else None


@torch.no_grad()
def posterior_samples(model, guide, counts: torch.Tensor, num_samples: int, *,
                      forecast: int = 0, seed: int | None = None,
                      log_likelihood: bool = False,
                      theta: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Posterior draws of the model's latent sites under a fitted guide, vectorized over draws.

    The guide is traced once in a plate of ``num_samples`` draws (dim -2, outside the model's
    ``sequences`` plate at dim -1) and the model replayed on its trace, with the FG bin counts
    resampled from p_cf where observed (posterior predictive reconstruction). This is what
    ``pyro.infer.Predictive(model, guide=guide, parallel=True)`` computes, with the plate
    nesting known instead of guessed: Predictive guesses it by running the model with θ drawn
    from the *prior*, whose rollout over long sequences can overflow. Here the model only ever
    sees θ from the guide.

    :param counts: observed counts ``(n_sequences, n_times, n_bins)``, a float tensor (moved to
        the device of the guide's q(X); the draws are returned there).
    :param forecast: coarse steps ``P`` to roll the CG law past the last snapshot.
    :param seed: Pyro's RNG seed (``None``: continue the current stream).
    :param log_likelihood: also return the pointwise log-likelihood of the observed counts.
    :param theta: θ values by site name that replace the guide's (``poutine.condition`` of the
        model), each ``(sample, 1, *event_shape)``: e.g. posterior draws of the linear part.
    :returns: site name -> draws, sample axis first:

        - ``X``, ``counts``: ``(sample, sequence, time, bin)`` (the per-step sites ``X_{t}``,
          ``counts_{t}`` of an unvectorized model are stacked along ``time``);
        - ``X_forecast``, ``counts_forecast``: ``(sample, sequence, P, bin)`` if ``forecast``;
        - each θ site drawn by the guide: ``(sample, 1, *event_shape)``;
        - ``log_likelihood``: ``(sample, sequence, time)`` ``log p_cf(m_t | X_t)`` of the observed
          counts, taken from the trace of the model replayed on the same draws with the counts
          observed.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    counts = counts.to(device=_guide_device(guide))
    n_times = counts.shape[1]
    kwargs = {"forecast": int(forecast), "resample_observed": True}
    with pyro.plate("_num_predictive_samples", num_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(counts, **kwargs)
        conditioned = poutine.condition(model, data=theta) if theta else model
        replayed = poutine.replay(conditioned, trace=guide_trace)
        trace = poutine.trace(replayed).get_trace(counts, **kwargs)
        observed = poutine.trace(replayed).get_trace(counts) if log_likelihood else None
    out = {name: site["value"] for name, site in trace.nodes.items()
           if site["type"] == "sample" and not site["is_observed"]
           and not site_is_subsample(site)}
    if not model.vectorized:
        for name in ("X", "counts"):
            out[name] = torch.stack([out.pop(f"{name}_{t}") for t in range(n_times)], -2)
    if observed is not None:
        if model.vectorized:  # one site over (time, bin): its terms before the sum over time
            site = observed.nodes["counts"]
            out["log_likelihood"] = site["fn"].base_dist.log_prob(site["value"])
        else:
            observed.compute_log_prob(lambda name, site: name.startswith("counts_"))
            out["log_likelihood"] = torch.stack(
                [observed.nodes[f"counts_{t}"]["log_prob"] for t in range(n_times)], -1)
    return out


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
