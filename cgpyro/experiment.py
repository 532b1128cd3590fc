"""The seed's experiment (section 3) end to end: simulate, train, forecast, measure.

Shared by ``cgpyro reproduce``, the notebooks and ``benchmarks/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from .guides import guide_for_new_sequences
from .inference import SVIInference
from .predict import Forecast, forecast
from .reference import oracle_fractions
from .systems import simulate_dataset

__all__ = ["ExperimentResult", "run_paper_experiment", "write_report"]


@dataclass
class ExperimentResult:
    """Everything the paper's figures and the metrics table need.

    ``truth_*`` are observed bin fractions ``(sequence, time, bin)`` over all simulated
    snapshots; ``forecast_*`` cover the same steps (inferred ``< n_observed`` <= predicted).
    ``rows``: one dict per evaluation time (model / oracle / linear-peer errors and ratios).
    """

    metrics: dict
    rows: list[dict]
    forecast_train: Forecast
    forecast_test: Forecast
    truth_train: np.ndarray
    truth_test: np.ndarray
    loss_history: list[float]
    bin_edges: np.ndarray
    dt: float
    n_observed: int
    extra: dict = field(default_factory=dict)


def _as_model(model, n_bins, counts=None):
    """The model of a spec name (a choosing spec only with the training ``counts``: until
    then ``None``, the spec checked) or the model given."""
    if isinstance(model, str):
        from .specs import ModelChoice, load_model, load_model_spec

        if counts is None and isinstance(load_model_spec(model, allow_choice=True), ModelChoice):
            return None
        return load_model(model, n_bins=n_bins, counts=counts)
    return model


def _svi_settings(guide):
    if guide is None:
        return "lognormal", {}, None
    if isinstance(guide, str):
        from .specs import load_guide

        spec = load_guide(guide)
        return spec.factory, dict(spec.svi), spec
    return "lognormal", {}, None


def run_paper_experiment(
    model="auto",
    guide="lognormal",
    *,
    seed: int = 0,
    n_train: int = 64,
    n_test: int = 16,
    n_observed: int = 10,
    n_steps: int = 40,
    n_particles: int = 250_000,
    n_bins: int = 25,
    steps: int | None = None,
    num_samples: int = 1000,
    eval_times=(15, 20, 25, 35),
    device: str = "cpu",
    progress: bool = False,
) -> ExperimentResult:
    """Simulate ``n_train + n_test`` sequences, train on the first ``n_observed`` snapshots of
    the training ones, and forecast every sequence to ``n_steps`` (held-out ones after fitting
    their states with θ fixed).

    :param model: a model spec name/path (a choosing one, the default ``"auto"``, picks its
        model from the training sequences) or a :class:`~cgpyro.model.CGModel`.
    :param guide: a guide spec name/path (``"lognormal"``: the paper's).
    :param steps: SVI steps (default: the guide spec's).
    """
    if not 2 <= n_observed <= n_steps:
        raise ValueError(f"need 2 <= n_observed <= n_steps, got {n_observed} and {n_steps}")
    eval_times = [t for t in eval_times if n_observed <= t <= n_steps]
    cg_model = _as_model(model, n_bins)  # a bad spec fails before the (long) simulation
    factory, svi, _ = _svi_settings(guide)
    t0 = time.perf_counter()
    data, sim = simulate_dataset(n_train + n_test, n_steps, n_particles=n_particles,
                                 n_bins=n_bins, seed=seed, progress=progress)
    sim_seconds = time.perf_counter() - t0
    frac = data.fractions
    counts = data.counts
    train, test = counts[:n_train, :n_observed], counts[n_train:, :n_observed]
    if cg_model is None:
        cg_model = _as_model(model, n_bins, train)
    if steps is not None:
        svi["steps"] = steps
    inference = SVIInference(cg_model, guide=factory, seed=seed, device=device,
                             progress=progress, **svi)
    inference.fit(train)
    t1 = time.perf_counter()
    guide_test = guide_for_new_sequences(inference, test)
    infer_seconds = time.perf_counter() - t1
    horizon = n_steps - n_observed + 1
    f_train = forecast(cg_model, inference.guide, train, horizon, num_samples=num_samples,
                       seed=seed, keep_samples=True)
    t2 = time.perf_counter()
    f_test = forecast(cg_model, guide_test, test, horizon, num_samples=num_samples, seed=seed)
    predict_seconds = time.perf_counter() - t2

    truth_test = frac[n_train:]
    T = n_observed - 1
    oracle = oracle_fractions(sim.system, sim.occupancy[n_train:, T], [t - T for t in eval_times],
                              n_bins)
    A = metrics.fit_linear_peer(frac[:n_train, :n_observed])
    linear = metrics.rollout_linear(A, truth_test[:, T], n_steps - T)
    rows = []
    for i, t in enumerate(eval_times):
        err = float(metrics.l1_error(f_test.mean[:, t], truth_test[:, t]))
        floor = float(metrics.l1_error(oracle[:, i], truth_test[:, t]))
        lin = float(metrics.l1_error(linear[:, t - T - 1], truth_test[:, t]))
        rows.append({"time": t, "error": err, "oracle_floor": floor, "ratio": err / floor,
                     "linear_error": lin, "linear_ratio": lin / floor})
    future = slice(n_observed, n_steps + 1)
    summary = {
        "max_ratio": max(r["ratio"] for r in rows) if rows else float("nan"),
        "max_linear_ratio": max(r["linear_ratio"] for r in rows) if rows else float("nan"),
        "mass_error_inferred": float(metrics.mass_error(f_test.mean[:, :n_observed]).max()),
        "mass_error_forecast": float(metrics.mass_error(f_test.mean[:, future]).max()),
        "coverage_forecast": metrics.coverage(f_test.lower[:, future], f_test.upper[:, future],
                                              truth_test[:, future]),
        "coverage_inferred": metrics.coverage(f_test.lower[:, :n_observed],
                                              f_test.upper[:, :n_observed],
                                              truth_test[:, :n_observed]),
        "train_seconds": inference.fit_seconds,
        "svi_steps": inference.step,
        "simulate_seconds": sim_seconds,
        "infer_new_seconds": infer_seconds,
        "predict_seconds": predict_seconds,
        "seed": seed,
    }
    spec = getattr(cg_model, "spec", None)  # set where the model was built from a spec
    return ExperimentResult(
        metrics=summary, rows=rows, forecast_train=f_train, forecast_test=f_test,
        truth_train=frac[:n_train], truth_test=truth_test, loss_history=inference.loss_history,
        bin_edges=data.bin_edges, dt=data.dt, n_observed=n_observed,
        extra={"inference": inference, "model": cg_model,
               "model_spec": getattr(spec, "name", None),
               "model_choice": getattr(spec, "choice", None)},
    )


def write_report(result: ExperimentResult, out_dir) -> list[Path]:
    """Write the paper's figures (training sequence 0, as in Fig. 1-4), the loss and calibration
    plots, ``metrics.md`` and ``metrics.json`` into ``out_dir``; returns the paths."""
    from .plots import reproduce_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = reproduce_figures(result.forecast_train, result.truth_train, 0, result.dt,
                              result.bin_edges, result.loss_history, out)
    lines = ["| time (Δt) | error | oracle floor | ratio | linear peer ratio |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['time']} | {r['error']:.5f} | {r['oracle_floor']:.5f} | {r['ratio']:.3f} "
              f"| {r['linear_ratio']:.3f} |" for r in result.rows]
    lines += ["", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in result.metrics.items()]
    from .specs import describe_model

    spec, choice = result.extra.get("model_spec"), result.extra.get("model_choice")
    if spec is not None:  # which spec trained (a choosing spec's pick, with its σ)
        lines = [f"Model: {describe_model(spec, choice)}", "", *lines]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    (out / "metrics.json").write_text(json.dumps({"model": spec, "model_choice": choice,
                                                  "summary": result.metrics,
                                                  "rows": result.rows}, indent=2))
    return [*paths, out / "metrics.md", out / "metrics.json"]
