"""Figures of section 3.3 of the paper, plus training loss and calibration, with matplotlib.

Every ``plot_*`` function takes numpy arrays (or a :class:`~cgpyro.predict.Forecast`), draws on
the given ``ax`` / ``axes`` or on a new figure (``plt.subplots``, so it shows in notebooks), and
returns the axes; none calls ``plt.show()``. :func:`reproduce_figures` builds its figures as
``matplotlib.figure.Figure`` objects outside pyplot, so a batch run leaks no open figures and
needs no display.

Time is drawn in physical units ``t · dt``; the divide between inferred steps (the observed
snapshots ``t < n_observed``) and predicted ones is a red line at ``(n_observed - ½) · dt``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "plot_density_heatmaps",
    "plot_snapshots",
    "plot_mass",
    "plot_loss",
    "plot_calibration",
    "empirical_coverage",
    "reproduce_figures",
    "DEFAULT_LEVELS",
]

DEFAULT_LEVELS = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
INFERRED_TIMES = (0, 5, 9)  # paper Fig. 2
PREDICTED_TIMES = (15, 20, 25, 35)  # paper Fig. 3
DIVIDE = {"color": "red", "lw": 1.5}


# --------------------------------------------------------------------------- helpers
def _new_axes(nrows: int, ncols: int, figsize):
    import matplotlib.pyplot as plt  # only when the caller gave no axes

    _, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    return axes


def _edges(bin_edges, n_bins: int) -> np.ndarray:
    # the interchange format's default: equal bins on [-1, 1]
    if bin_edges is None:
        return np.linspace(-1.0, 1.0, n_bins + 1)
    edges = np.asarray(bin_edges, dtype=np.float64)
    if edges.shape != (n_bins + 1,):
        raise ValueError(f"bin_edges must have shape ({n_bins + 1},) for {n_bins} bins, "
                         f"got {edges.shape}")
    return edges


def _array(name: str, value, ndim: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


def _sequence_truth(truth_fractions, sequence: int, n_bins: int) -> np.ndarray:
    """``(time, bin)`` truth of one sequence from ``(time, bin)`` or ``(seq, time, bin)``."""
    truth = np.asarray(truth_fractions, dtype=np.float64)
    if truth.ndim == 3:
        if not 0 <= sequence < truth.shape[0]:
            raise ValueError(f"sequence must be in [0, {truth.shape[0]}), got {sequence}")
        truth = truth[sequence]
    if truth.ndim != 2 or truth.shape[-1] != n_bins:
        raise ValueError(f"truth_fractions must be (time, {n_bins}) or (seq, time, {n_bins}), "
                         f"got shape {np.shape(truth_fractions)}")
    return truth


def _check_sequence(forecast, sequence: int) -> None:
    n_seq = forecast.mean.shape[0]
    if not isinstance(sequence, int | np.integer) or not 0 <= sequence < n_seq:
        raise ValueError(f"sequence must be an integer in [0, {n_seq}), got {sequence!r}")


def _add_divide(ax, n_observed: int, n_total: int, dt: float) -> None:
    if 0 < n_observed < n_total:
        ax.axvline((n_observed - 0.5) * dt, **DIVIDE)


# --------------------------------------------------------------------------- Fig. 1
def plot_density_heatmaps(truth_fractions, predicted_mean, n_observed: int, bin_edges=None,
                          dt: float = 1.0, axes=None, colorbar: bool = True):
    """Paper Fig. 1: particle density over (time, position), truth (top) vs prediction (bottom).

    :param truth_fractions: ``(time, bin)`` true bin fractions of one sequence.
    :param predicted_mean: ``(time', bin)`` posterior (predictive) mean; time lengths may differ.
    :param n_observed: inferred steps; a red line divides them from the predicted ones.
    :param axes: two axes (top, bottom); default a new 2 × 1 figure.
    :returns: the two axes, each holding one image on a shared colour scale.
    """
    truth = _array("truth_fractions", truth_fractions, 2)
    pred = _array("predicted_mean", predicted_mean, 2)
    if truth.shape[1] != pred.shape[1]:
        raise ValueError(f"truth_fractions and predicted_mean must have the same number of bins, "
                         f"got {truth.shape[1]} and {pred.shape[1]}")
    edges = _edges(bin_edges, pred.shape[1])
    axes = _new_axes(2, 1, (8, 5)).ravel() if axes is None else np.asarray(axes).ravel()
    if axes.size != 2:
        raise ValueError(f"axes must hold 2 axes (truth, prediction), got {axes.size}")
    vmin = min(truth.min(), pred.min())
    vmax = max(truth.max(), pred.max())
    n_total = max(truth.shape[0], pred.shape[0])
    uniform = np.allclose(np.diff(edges), np.diff(edges)[0])
    for ax, values, title in ((axes[0], truth, "ground truth"),
                              (axes[1], pred, "posterior mean (inferred | predicted)")):
        if uniform:
            mappable = ax.imshow(values.T, origin="lower", aspect="auto", vmin=vmin, vmax=vmax,
                                 extent=(-0.5 * dt, (values.shape[0] - 0.5) * dt,
                                         edges[0], edges[-1]), interpolation="nearest")
        else:  # imshow cannot draw unequal bins honestly
            t_edges = (np.arange(values.shape[0] + 1) - 0.5) * dt
            mappable = ax.pcolormesh(t_edges, edges, values.T, vmin=vmin, vmax=vmax)
        _add_divide(ax, n_observed, n_total, dt)
        ax.set_xlim(-0.5 * dt, (n_total - 0.5) * dt)
        ax.set_ylabel("position")
        ax.set_title(title)
    axes[1].set_xlabel("time")
    if colorbar:
        axes[0].figure.colorbar(mappable, ax=list(axes), label="bin fraction")
    return axes


# --------------------------------------------------------------------------- Fig. 2 / 3
def plot_snapshots(forecast, truth_fractions, sequence: int, times: Sequence[int],
                   bin_edges=None, axes=None):
    """Paper Fig. 2/3: density profiles at time indices ``times`` with the 95 % band.

    Each panel: posterior mean of ``X`` and truth (lines over bin centres), and the band
    ``[lower, upper]`` of the reconstructed FG fractions. Truth is omitted where
    ``truth_fractions`` ends before the time index.

    :param forecast: a :class:`~cgpyro.predict.Forecast`.
    :param truth_fractions: ``(time, bin)`` of the sequence, or ``(seq, time, bin)``.
    :param times: time indices in ``[0, n_observed + horizon)``.
    :param axes: ``len(times)`` axes; default one row (a 2 × 2 grid for 4 times, as in Fig. 3).
    :returns: flat array of the axes used.
    """
    _check_sequence(forecast, sequence)
    n_total, n_bins = forecast.mean.shape[1:]
    truth = _sequence_truth(truth_fractions, sequence, n_bins)
    times = [int(t) for t in times]
    if not times:
        raise ValueError("times must name at least one time index")
    bad = [t for t in times if not 0 <= t < n_total]
    if bad:
        raise ValueError(f"times must lie in [0, {n_total}), got {bad}")
    edges = _edges(bin_edges, n_bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    if axes is None:
        shape = (2, 2) if len(times) == 4 else (1, len(times))
        axes = _new_axes(*shape, (3.2 * shape[1], 2.8 * shape[0]))
    axes = np.asarray(axes).ravel()
    if axes.size < len(times):
        raise ValueError(f"axes must hold {len(times)} axes (one per time), got {axes.size}")
    for ax, t in zip(axes, times, strict=False):
        ax.fill_between(centres, forecast.lower[sequence, t], forecast.upper[sequence, t],
                        color="C0", alpha=0.3, lw=0, label="95 % band")
        ax.plot(centres, forecast.mean[sequence, t], color="C0", label="posterior mean")
        if t < truth.shape[0]:
            ax.plot(centres, truth[t], "k--", label="truth")
        kind = "inferred" if t < forecast.n_observed else "predicted"
        ax.set_title(f"{kind}, t = {t} Δt")
        ax.set_xlabel("position")
    for ax in axes[: len(times)]:
        spec = ax.get_subplotspec()
        if spec is None or spec.is_first_col():
            ax.set_ylabel("bin fraction")
    axes[0].legend(fontsize="small")
    return axes[: len(times)]


# --------------------------------------------------------------------------- Fig. 4
def plot_mass(forecast, sequence: int | None = None, ax=None, dt: float = 1.0):
    """Paper Fig. 4: mass ``Σ_j X_j`` over time against the target 1.

    :param sequence: one sequence; ``None``: the mean over sequences with their min–max range.
    :returns: the axes (lines: mass, target, divide).
    """
    mass = _array("forecast.mass", forecast.mass, 2)
    n_total = mass.shape[1]
    t = np.arange(n_total) * dt
    if ax is None:
        ax = _new_axes(1, 1, (6, 3.5))[0, 0]
    if sequence is None:
        ax.fill_between(t, mass.min(0), mass.max(0), color="C0", alpha=0.25, lw=0,
                        label="range over sequences")
        ax.plot(t, mass.mean(0), "o-", color="C0", ms=3, label="mean over sequences")
    else:
        _check_sequence(forecast, sequence)
        ax.plot(t, mass[sequence], "o-", color="C0", ms=3, label=f"sequence {sequence}")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="target")
    _add_divide(ax, forecast.n_observed, n_total, dt)
    ax.set_xlabel("time")
    ax.set_ylabel(r"mass $\sum_j X_j$")
    ax.legend(fontsize="small")
    return ax


# --------------------------------------------------------------------------- training
def plot_loss(loss_history, ax=None, anneal_end: int | None = None):
    """Training loss ``-ELBO`` (nats, lower is better) per SVI step on a symmetric-log axis.

    The loss of eq. 17 changes sign (its log-likelihood terms can be large and positive) and
    spans orders of magnitude while σ_c is annealed, hence symlog (linear within ±1). While σ_c
    shrinks the objective itself changes every step, so a rise there is not a divergence: the
    annealing steps are shaded, and only losses after them compare with each other.

    :param loss_history: ``(steps,)`` losses.
    :param anneal_end: the step at which σ_c reaches its final value (see
        ``cgpyro._progress.anneal_end``); ``None`` or 0: nothing shaded.
    :returns: the axes (one line: the loss; one shaded span for the annealing phase).
    """
    loss = np.asarray(loss_history, dtype=np.float64)
    if loss.ndim != 1 or loss.size == 0:
        raise ValueError(f"loss_history must be a non-empty 1-D sequence, got shape {loss.shape}")
    if not np.isfinite(loss).all():
        raise ValueError("loss_history must be finite (training diverged?)")
    if anneal_end is not None and (isinstance(anneal_end, bool)
                                   or not isinstance(anneal_end, int | np.integer)
                                   or anneal_end < 0):
        raise ValueError(f"anneal_end must be None or a non-negative integer step, "
                         f"got {anneal_end!r}")
    if ax is None:
        ax = _new_axes(1, 1, (6, 3.5))[0, 0]
    ax.plot(np.arange(1, loss.size + 1), loss, lw=1, label="loss = −ELBO")
    if anneal_end:
        ax.axvspan(0.5, min(anneal_end, loss.size) + 0.5, color="0.88", lw=0, zorder=0,
                   label="σ_c annealed (objective changes)")
        ax.legend(fontsize="small")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("SVI step")
    ax.set_ylabel("loss = −ELBO (nats)")
    return ax


# --------------------------------------------------------------------------- calibration
def empirical_coverage(samples, truth, levels=DEFAULT_LEVELS) -> np.ndarray:
    """Fraction of truths inside the central ``level`` band of the samples, per level.

    :param samples: ``(sample, ...)`` draws; ``truth``: ``(...)``, the same trailing shape.
    :returns: ``(n_levels,)``.
    """
    samples = np.asarray(samples, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if samples.shape[1:] != truth.shape:
        raise ValueError(f"samples (sample, ...) and truth (...) must match, got "
                         f"{samples.shape} and {truth.shape}")
    levels = np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or not ((levels > 0) & (levels < 1)).all():
        raise ValueError(f"levels must be a 1-D array in (0, 1), got {levels}")
    q = np.concatenate([(1 - levels) / 2, (1 + levels) / 2])
    bounds = np.quantile(samples, q, axis=0)
    lower, upper = bounds[: levels.size], bounds[levels.size:]
    return ((truth >= lower) & (truth <= upper)).reshape(levels.size, -1).mean(1)


def plot_calibration(forecast, truth_fractions, levels=DEFAULT_LEVELS, ax=None):
    """Empirical coverage of the central bands of the reconstructed fractions vs nominal level.

    One curve for inferred steps and one for predicted steps (where the truth reaches them),
    over all (sequence, time, bin); the diagonal is perfect calibration.
    :param forecast: made with ``keep_samples=True`` (needs ``samples_fractions``).
    :param truth_fractions: ``(seq, time, bin)``; its time axis may be shorter than the forecast's.
    """
    if forecast.samples_fractions is None:
        raise ValueError("plot_calibration needs forecast samples: call forecast(..., "
                         "keep_samples=True)")
    samples = forecast.samples_fractions
    truth = _array("truth_fractions", truth_fractions, 3)
    if truth.shape[0] != samples.shape[1] or truth.shape[2] != samples.shape[3]:
        raise ValueError(f"truth_fractions must be (seq={samples.shape[1]}, time, "
                         f"bin={samples.shape[3]}), got {truth.shape}")
    levels = np.asarray(levels, dtype=np.float64)
    n = min(truth.shape[1], samples.shape[2])
    split = min(forecast.n_observed, n)
    if ax is None:
        ax = _new_axes(1, 1, (4.5, 4.5))[0, 0]
    ax.plot([0, 1], [0, 1], color="0.5", ls=":", label="ideal")
    for name, sl, style in (("inferred", slice(0, split), "o-"),
                            ("predicted", slice(split, n), "s-")):
        if sl.stop > sl.start:
            cov = empirical_coverage(samples[:, :, sl], truth[:, sl], levels)
            ax.plot(levels, cov, style, ms=4, label=name)
    ax.set_xlim(levels.min() - 0.05, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("nominal level of central band")
    ax.set_ylabel("empirical coverage")
    ax.legend(fontsize="small")
    return ax


# --------------------------------------------------------------------------- all figures
def _fit_times(preferred, lo: int, hi: int, k: int) -> list[int]:
    """The paper's times within ``[lo, hi)``; if none fits, ``k`` evenly spaced ones there."""
    kept = [t for t in preferred if lo <= t < hi]
    if kept or hi <= lo:
        return kept
    return sorted({int(round(t)) for t in np.linspace(lo, hi - 1, min(k, hi - lo))})


def reproduce_figures(forecast, truth_fractions, sequence: int, dt: float, bin_edges,
                      loss_history, out_dir: str | os.PathLike,
                      anneal_end: int | None = None) -> list[Path]:
    """Write the paper's Fig. 1-4 and the loss and calibration plots as PNG files.

    Files: ``fig1_density.png``, ``fig2_inferred_snapshots.png`` (t = 0, 5, 9 Δt),
    ``fig3_predicted_snapshots.png`` (t = 15, 20, 25, 35 Δt; times past the forecast are
    skipped, and if none is left evenly spaced predicted times are used; no file without a
    horizon), ``fig4_mass.png``, ``loss.png`` (skipped if ``loss_history`` is empty or None) and
    ``calibration.png`` (skipped unless the forecast kept samples).

    :param truth_fractions: ``(seq, time, bin)`` true fractions (may be shorter in time).
    :param anneal_end: the step σ_c reaches its final value, shaded in ``loss.png``.
    :returns: the paths written, in that order.
    """
    _check_sequence(forecast, sequence)
    truth = _array("truth_fractions", truth_fractions, 3)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_obs, n_total = forecast.n_observed, forecast.mean.shape[1]
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        written.append(out / name)

    fig = Figure(figsize=(8, 5), layout="constrained")
    plot_density_heatmaps(truth[sequence], forecast.mean[sequence], n_obs, bin_edges, dt,
                          axes=fig.subplots(2, 1, sharex=True))
    save(fig, "fig1_density.png")

    for name, times in (
        ("fig2_inferred_snapshots.png", _fit_times(INFERRED_TIMES, 0, n_obs, 3)),
        ("fig3_predicted_snapshots.png", _fit_times(PREDICTED_TIMES, n_obs, n_total, 4)),
    ):
        if not times:
            continue
        shape = (2, 2) if len(times) == 4 else (1, len(times))
        fig = Figure(figsize=(3.2 * shape[1], 2.8 * shape[0]), layout="constrained")
        plot_snapshots(forecast, truth, sequence, times, bin_edges,
                       axes=fig.subplots(*shape, squeeze=False, sharey=True))
        save(fig, name)

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    plot_mass(forecast, sequence, ax=fig.subplots(), dt=dt)
    save(fig, "fig4_mass.png")

    if loss_history is not None and len(loss_history):
        fig = Figure(figsize=(6, 3.5), layout="constrained")
        plot_loss(loss_history, ax=fig.subplots(), anneal_end=anneal_end)
        save(fig, "loss.png")

    if forecast.samples_fractions is not None:
        fig = Figure(figsize=(4.5, 4.5), layout="constrained")
        plot_calibration(forecast, truth, ax=fig.subplots())
        save(fig, "calibration.png")
    return written
