"""Accuracy and speed of the CG model on the paper's configuration (issue: the model).

For each model spec and seed: simulate 64 training + 16 held-out sequences (250,000 particles,
25 bins, 41 snapshots), train with the defaults of ``cgpyro train`` on T = 9 (10 snapshots),
infer the held-out states with θ fixed, forecast to 40 Δt, and compare with the oracle floor
and the least-squares linear peer. Also the cost of one SVI step in each form of the model.
"""

from __future__ import annotations

import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from cgpyro.elbo import AnalyticTraceELBO, FusedELBO
from cgpyro.experiment import run_paper_experiment
from cgpyro.guides import LogNormalGuide, training_pair
from cgpyro.inference import empirical_bayes
from cgpyro.specs import load_model
from cgpyro.systems import simulate_dataset


def accuracy(specs=("physics", "particles_paper"), seeds=(0, 1, 2)) -> list[dict]:
    rows = []
    for spec in specs:
        for seed in seeds:
            t0 = time.perf_counter()
            result = run_paper_experiment(spec, "lognormal", seed=seed)
            m = result.metrics
            rows.append({
                "model": spec, "seed": seed,
                **{f"ratio@{r['time']}": r["ratio"] for r in result.rows},
                **{f"linear@{r['time']}": r["linear_ratio"] for r in result.rows},
                "mass_inferred": m["mass_error_inferred"],
                "mass_forecast": m["mass_error_forecast"],
                "coverage_forecast": m["coverage_forecast"],
                "coverage_inferred": m["coverage_inferred"],
                "train_s": m["train_seconds"], "total_s": time.perf_counter() - t0,
            })
            print(rows[-1], flush=True)
    return rows


def step_cost(n_steps: int = 200) -> list[dict]:
    """Seconds per SVI step on 64 x 10 x 25: vectorized (fused / analytic / trace ELBO) vs
    pyro.markov. The fused form is what ``cgpyro train`` runs with the lognormal guide."""
    data, _ = simulate_dataset(64, 9, seed=0)
    counts = torch.as_tensor(data.counts, dtype=torch.float64)
    rows = []
    for label, spec, vectorized, elbo in [
            ("physics, vectorized + FusedELBO (default)", "physics", True, FusedELBO),
            ("physics, vectorized + AnalyticTraceELBO", "physics", True, AnalyticTraceELBO),
            ("paper MLP, vectorized + FusedELBO (default)", "particles_paper", True, FusedELBO),
            ("paper MLP, vectorized + AnalyticTraceELBO", "particles_paper", True,
             AnalyticTraceELBO),
            ("paper MLP, vectorized + Trace_ELBO", "particles_paper", True, Trace_ELBO),
            ("paper MLP, pyro.markov loop + Trace_ELBO", "particles_paper", False, Trace_ELBO)]:
        model = load_model(spec, n_bins=25)
        # θ set by empirical Bayes before SVI (σ_r, the physics drift's linear part) is held
        held, _ = empirical_bayes(model, counts)
        model.vectorized = vectorized
        pyro.clear_param_store()
        guide = LogNormalGuide(model, counts, theta_held=held)
        if elbo is FusedELBO:
            fused = FusedELBO(model, guide)
            svi = SVI(*fused.pair, pyro.optim.Adam({"lr": 1e-3}), loss=fused)
        else:
            svi = SVI(*training_pair(model, guide), pyro.optim.Adam({"lr": 1e-3}), loss=elbo())
        for _ in range(3):
            svi.step(counts)
        start = time.perf_counter()
        for _ in range(n_steps):
            svi.step(counts)
        rows.append({"form": label, "ms_per_step": 1e3 * (time.perf_counter() - start) / n_steps})
    return rows
