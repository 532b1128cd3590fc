"""ArviZ ``InferenceData`` of a fitted model: posterior states, reconstructions, log-likelihood.

The variational posterior q(X) is sampled by :func:`~cgpyro.predict.posterior_samples`
(``pyro.infer.Predictive``'s computation with the plate nesting known) exactly as
:func:`~cgpyro.predict.forecast` does, and handed to ``az.from_dict`` with named dims so that
``az.summary``, ``az.plot_hdi``, ``az.loo`` and ``az.compare`` work on it. q is not an MCMC
posterior: there is one chain of independent draws (``chain=1``, ``draw=num_samples``), so R-hat
is undefined and the effective sample size equals the number of draws up to Monte Carlo noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import torch

from ._version import __version__
from .inference import as_counts
from .predict import posterior_samples

__all__ = [
    "to_inference_data",
    "save_inference_data",
    "load_inference_data",
    "summary_table",
    "describe_model",
]


def _fields(obj, names) -> str:
    return ", ".join(f"{n}={getattr(obj, n)!r}" for n in names if hasattr(obj, n))


def describe_model(model) -> str:
    """One line naming the model's transition, emission and virtual observables."""
    trans = model.transition
    drift = getattr(trans, "drift", None)
    drift_txt = (f"{type(drift).__name__}("
                 f"{_fields(drift, ('hidden', 'activation', 'linear_skip', 'conserve_mass'))})"
                 if drift is not None else "")
    parts = (_fields(trans, ("noise",)), drift_txt and f"drift={drift_txt}")
    trans_txt = ", ".join(p for p in parts if p)
    vos = ", ".join(f"{vo.name}(sigma={vo.sigma_final:g})" for vo in model.virtual_observables)
    return (f"{type(model).__name__}(n_bins={model.n_bins}, "
            f"transition={type(trans).__name__}({trans_txt}), "
            f"emission={type(model.emission).__name__}, virtual_observables=[{vos}], "
            f"fixed={sorted(model.fixed)}, vectorized={model.vectorized})")


def _centres(edges: np.ndarray) -> np.ndarray:
    """Bin centres, with round-off below 1e-12 of the domain width removed (0.0, not 1e-16)."""
    width = edges[-1] - edges[0]
    return np.round(0.5 * (edges[:-1] + edges[1:]) / width, 12) * width


def _coords(data, n_times: int, n_bins: int, horizon: int, dt, bin_edges):
    """Time coords in units of Δt and bin centres; a Dataset supplies defaults for both."""
    dt = getattr(data, "dt", 1.0) if dt is None else dt
    if not (isinstance(dt, int | float | np.integer | np.floating) and np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive finite number, got {dt!r}")
    edges = getattr(data, "bin_edges", None) if bin_edges is None else bin_edges
    # the interchange format's default: equal bins on [-1, 1]
    edges = np.linspace(-1.0, 1.0, n_bins + 1) if edges is None else np.asarray(edges, float)
    if edges.shape != (n_bins + 1,):
        raise ValueError(f"bin_edges must have shape ({n_bins + 1},) for {n_bins} bins, "
                         f"got {edges.shape}")
    coords = {"time": np.arange(n_times) * float(dt), "bin": _centres(edges)}
    if horizon:
        coords["forecast_time"] = (n_times + np.arange(horizon)) * float(dt)
    return coords, float(dt), edges


# Named dims of each variable after (chain, draw); θ sites get ArviZ's ``{site}_dim_k``.
# One entry serves all groups: in log_likelihood ArviZ drops the trailing ``bin`` of ``counts``.
_DIMS = {
    "X": ["sequence", "time", "bin"],
    "mass": ["sequence", "time"],
    "counts": ["sequence", "time", "bin"],
    "X_forecast": ["sequence", "forecast_time", "bin"],
    "counts_forecast": ["sequence", "forecast_time", "bin"],
    "totals": ["sequence"],
    "bin_edges": ["edge"],
}


@torch.no_grad()
def to_inference_data(
    model,
    guide,
    data,
    num_samples: int = 200,
    horizon: int = 0,
    seed: int = 0,
    *,
    dt: float | None = None,
    bin_edges=None,
    include_theta: bool = False,
) -> az.InferenceData:
    """Posterior draws of a fitted model as ``arviz.InferenceData``.

    Groups and variables (dims in brackets; ``S = num_samples`` draws of one chain):

    - ``posterior``: ``X`` (chain, draw, sequence, time, bin) CG states from q(X);
      ``mass`` (chain, draw, sequence, time) ``Σ_j X_j``; with ``include_theta`` every θ site
      at its MAP value (a point mass under the paper's guide) with dims ``{site}_dim_k``.
    - ``posterior_predictive``: ``counts`` (chain, draw, sequence, time, bin) FG bin counts
      reconstructed by p_cf; with ``horizon > 0`` also ``X_forecast`` and ``counts_forecast``
      (chain, draw, sequence, forecast_time, bin), Algorithm 1 rolled past the last snapshot.
    - ``observed_data``: ``counts`` (sequence, time, bin), int64.
    - ``log_likelihood``: ``counts`` (chain, draw, sequence, time), ``log p_cf(m_t | X_t)``
      (eq. 17) of the observed counts for each draw of X, from the trace of the model replayed
      on the draws: the pointwise terms of ``az.loo``.
      Expect Pareto k > 0.7 there: each snapshot is nearly the only information on its X_t, so
      leaving it out moves q(X_t) far; compare models by ``az.compare`` with that caveat.

    Coords: ``time`` and ``forecast_time`` in physical units (``t · dt``), ``bin`` the bin
    centres, ``sequence`` the sequence index. ``dt`` and ``bin_edges`` default to those of a
    :class:`~cgpyro.data.Dataset` (else 1.0 and equal bins on [-1, 1]).

    :param model: a fitted :class:`~cgpyro.model.CGModel`.
    :param guide: the guide fitted to ``data``'s sequences.
    :param data: counts ``(n_sequences, n_times, n_bins)`` (Dataset, array or tensor).
    """
    if not isinstance(horizon, int | np.integer) or horizon < 0:
        raise ValueError(f"horizon must be a non-negative integer, got {horizon!r}")
    if not isinstance(num_samples, int | np.integer) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    counts = as_counts(data)
    n_seq, n_times, n_bins = counts.shape
    if n_bins != model.n_bins:
        raise ValueError(f"data has {n_bins} bins, the model has {model.n_bins}")
    coords, dt, edges = _coords(data, n_times, n_bins, int(horizon), dt, bin_edges)
    coords["sequence"] = np.arange(n_seq)

    out = posterior_samples(model, guide, counts, num_samples, forecast=int(horizon), seed=seed,
                            log_likelihood=True)
    out["mass"] = out["X"].sum(-1)
    draws = {name: value.cpu().numpy()[None] for name, value in out.items()}  # (chain=1, draw)

    posterior = {"X": draws["X"], "mass": draws["mass"]}
    if include_theta:
        for name, value in guide.theta_map().items():
            value = value.detach().cpu().numpy()
            posterior[name] = np.broadcast_to(value, (1, num_samples, *value.shape)).copy()
    predictive = {"counts": draws["counts"].astype(np.int64)}
    if horizon:
        predictive["X_forecast"] = draws["X_forecast"]
        predictive["counts_forecast"] = draws["counts_forecast"].astype(np.int64)
    attrs = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "cgpyro_version": __version__,
        "model": describe_model(model),
        "guide": type(guide).__name__,
        "posterior": "variational q(X) with theta at its MAP estimate; one chain of i.i.d. draws",
        "num_samples": int(num_samples),
        "seed": int(seed),
        "horizon": int(horizon),
        "n_observed": int(n_times),
        "dt": dt,
    }
    return az.from_dict(
        posterior=posterior,
        posterior_predictive=predictive,
        log_likelihood={"counts": draws["log_likelihood"]},
        observed_data={"counts": np.rint(counts.numpy()).astype(np.int64),
                       "totals": np.rint(counts[:, 0].sum(-1).numpy()).astype(np.int64),
                       "bin_edges": edges},
        coords=coords,
        dims=_DIMS,
        attrs=dict(attrs),  # from_dict pops created_at: the groups keep their own
        posterior_attrs=attrs,
        posterior_predictive_attrs=attrs,
        log_likelihood_attrs=attrs,
    )


def save_inference_data(idata: az.InferenceData, path: str | os.PathLike) -> Path:
    """Write ``idata`` as NetCDF (one HDF5 group per InferenceData group); returns the path."""
    path = Path(path)
    if path.suffix != ".nc":
        raise ValueError(f"inference data path must end in .nc, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(path), engine="h5netcdf")
    return path


def load_inference_data(path: str | os.PathLike) -> az.InferenceData:
    """Read a file written by :func:`save_inference_data` (loaded into memory)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no inference data file at {str(path)!r}")
    return az.from_netcdf(str(path), engine="h5netcdf")


def summary_table(idata: az.InferenceData, var_names=("X", "mass"), sequence: int | None = None,
                  hdi_prob: float = 0.95):
    """``az.summary`` statistics (mean, sd, HDI) of posterior variables, as a DataFrame.

    Only ``kind="stats"``: with one chain of independent draws the MCMC diagnostics are void.
    :param sequence: restrict to one sequence index (``None``: all).
    """
    if sequence is not None:
        n_seq = idata.posterior.sizes["sequence"]
        if not 0 <= sequence < n_seq:
            raise ValueError(f"sequence must be in [0, {n_seq}), got {sequence}")
        idata = idata.isel(sequence=[sequence])
    return az.summary(idata, var_names=list(var_names), kind="stats", hdi_prob=hdi_prob)
