"""Accuracy and speed of the CG model on the paper's configuration (issue: the model).

For each model spec and seed: simulate 64 training + 16 held-out sequences (250,000 particles,
25 bins, 41 snapshots), train with the defaults of ``cgpyro train`` on T = 9 (10 snapshots),
infer the held-out states with θ fixed, forecast to 40 Δt, and compare with the oracle floor
and the least-squares linear peer. Also the cost of one SVI step in each form of the model.
"""

from __future__ import annotations

import os
import sys
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


# The plain prototype of issue 13: the paper's model as a pyro.markov loop, Trace_ELBO, Adam.
_MARKOV_LOOP = """
import sys, torch
torch.set_num_threads(1)
from cgpyro.data import load
from cgpyro.inference import SVIInference, as_counts
from cgpyro.specs import load_model
counts = as_counts(load(sys.argv[1]))
model = load_model("particles_paper", n_bins=counts.shape[-1])
model.vectorized = False
SVIInference(model, steps=int(sys.argv[2]), elbo="trace", progress=False).fit(counts)
"""


def whole_process(n_steps: int = 1500) -> list[dict]:
    """Wall seconds of whole processes (start, imports, empirical Bayes, ``n_steps`` SVI steps,
    files) on the paper's training data (64 x 10 x 25): ``cgpyro train`` with the default
    model and guide against the paper's model run as a plain ``pyro.markov`` loop."""
    import subprocess
    import tempfile
    from pathlib import Path

    from cgpyro.data import save

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.npz"
        save(simulate_dataset(64, 9, seed=0)[0], data)
        runs = [("cgpyro train (default model: auto -> physics; default guide)",
                 [sys.executable, "-m", "cgpyro.cli", "train", "--data", str(data), "--steps",
                  str(n_steps), "--quiet", "--out", str(Path(tmp) / "run")]),
                ("pyro.markov loop, paper MLP, Trace_ELBO",
                 [sys.executable, "-c", _MARKOV_LOOP, str(data), str(n_steps)])]
        rows = []
        for label, cmd in runs:
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            rows.append({"process": label, "steps": n_steps,
                         "wall_s": time.perf_counter() - start})
    rows[0]["speedup"] = rows[1]["wall_s"] / rows[0]["wall_s"]
    rows[1]["speedup"] = 1.0
    return rows


def step_cost(n_steps: int = 200) -> list[dict]:
    """Seconds per SVI step on 64 x 10 x 25: vectorized (fused / analytic / trace ELBO) vs
    pyro.markov. The fused form is what ``cgpyro train`` runs with the lognormal guide; Adam is
    the fused kernel, as ``cgpyro train`` builds it."""
    data, _ = simulate_dataset(64, 9, seed=0)
    counts = torch.as_tensor(data.counts, dtype=torch.float64)
    adam = {"lr": 1e-3, "fused": True}
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
            svi = SVI(*fused.pair, pyro.optim.Adam(adam), loss=fused)
        else:
            svi = SVI(*training_pair(model, guide), pyro.optim.Adam(adam), loss=elbo())
        for _ in range(3):
            svi.step(counts)
        start = time.perf_counter()
        for _ in range(n_steps):
            svi.step(counts)
        rows.append({"form": label, "ms_per_step": 1e3 * (time.perf_counter() - start) / n_steps})
    return rows
