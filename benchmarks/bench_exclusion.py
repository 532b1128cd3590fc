"""Forecast accuracy on the interacting system (soft-exclusion walkers, issue 12).

Train: 64 sequences of one initial-condition family (default ``fourier``), 10 snapshots (T = 9),
25 bins. Test: held-out sequences of *another* family (default ``bumps``) with 41 snapshots,
forecast from their first 10. Floor: the mean of R FG replicas restarted from the true FG state
at T (``cgpyro.exclusion.monte_carlo_floor``), with its own Monte-Carlo standard error. Peers:
least-squares linear map and one-step quadratic stencil (``cgpyro.peers``), rolled from the
observed fractions at T; the hydrodynamic PDE from the true FG state at T. cgpyro models by spec
name, trained as ``cgpyro.experiment`` does (``load_model`` → guide spec ``.inference`` →
``.fit`` → ``guide_for_new_sequences`` → ``forecast``); a spec that does not exist is skipped.

Simulated data are cached under ``data/generated/`` (git-ignored), so reruns only train.
One command::

    OMP_NUM_THREADS=1 python benchmarks/bench_exclusion.py \
        --models exclusion,exclusion_conv,physics,particles_paper

writes ``benchmarks/exclusion.md`` (and ``.json`` beside it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cgpyro import metrics
from cgpyro.exclusion import (
    ExclusionSystem,
    MonteCarloFloor,
    hydrodynamic_solution,
    monte_carlo_floor,
    simulate_exclusion_dataset,
)
from cgpyro.peers import LinearMap, QuadraticStencil, forecast_error
from cgpyro.reference import bin_fractions

ROOT = Path(__file__).resolve().parents[1]
EVAL = (15, 25, 35)


def _cached(path: Path, make):
    """Load the arrays of ``path`` (npz) or compute ``make() -> dict`` and save them."""
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def simulate_all(a, system: ExclusionSystem) -> dict:
    key = (f"n{a.n_train}_t{a.n_test}_b{a.bins}_s{a.seed}_{a.train_family}_{a.test_family}"
           f"_r{a.replicas}_K{system.capacity}_m{system.micro_steps}")
    T = a.n_observed - 1
    horizons = np.array(EVAL) - T

    def make() -> dict:
        t0 = time.perf_counter()
        train, _ = simulate_exclusion_dataset(a.n_train, T, n_bins=a.bins, seed=a.seed,
                                              system=system, family=a.train_family,
                                              device=a.device, progress=a.progress)
        t1 = time.perf_counter()
        test, sim = simulate_exclusion_dataset(a.n_test, a.test_steps, n_bins=a.bins,
                                               seed=a.seed + 1000, system=system,
                                               family=a.test_family, device=a.device,
                                               progress=a.progress)
        t2 = time.perf_counter()
        floor = monte_carlo_floor(system, sim.occupancy[:, T], horizons, n_bins=a.bins,
                                  n_replicas=a.replicas, seed=a.seed + 2000, device=a.device)
        t3 = time.perf_counter()
        pde = hydrodynamic_solution(system, sim.occupancy[:, T] / system.capacity,
                                    horizons * system.coarse_dt)
        site_updates = system.n_sites * system.micro_steps * (
            a.n_train * T + a.n_test * a.test_steps + a.replicas * a.n_test * horizons.max())
        return {"train": train.counts, "test": test.counts, "replicas": floor.replicas,
                "pde": bin_fractions(pde, a.bins) / bin_fractions(pde, a.bins).sum(
                    -1, keepdims=True),
                "seconds": np.array([t1 - t0, t2 - t1, t3 - t2]),
                "site_updates": np.array(site_updates, dtype=np.float64)}

    return {**_cached(ROOT / "data" / "generated" / f"bench_exclusion_{key}.npz", make),
            "key": key}


def fractions(counts: np.ndarray) -> np.ndarray:
    c = counts.astype(np.float64)
    return c / c.sum(-1, keepdims=True)


def run_model(name: str, a, train: np.ndarray, test_obs: np.ndarray, horizon: int):
    from cgpyro.guides import guide_for_new_sequences
    from cgpyro.predict import forecast
    from cgpyro.specs import load_guide, load_model

    model = load_model(name, n_bins=a.bins)
    overrides = {"seed": a.seed, "device": a.device, "progress": a.progress}
    if a.svi_steps is not None:
        overrides["steps"] = a.svi_steps
    inference = load_guide(a.guide).inference(model, **overrides)
    inference.fit(train)
    guide_test = guide_for_new_sequences(inference, test_obs)
    fc = forecast(model, guide_test, test_obs, horizon, num_samples=a.samples, seed=a.seed)
    return fc, inference.fit_seconds


def _ratio(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else ("inf" if not np.isfinite(x) else f"{x:.1e}")


def main() -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="exclusion,exclusion_conv,physics,particles_paper",
                   help="comma-separated model spec names (missing specs are skipped)")
    p.add_argument("--guide", default="lognormal")
    p.add_argument("--svi-steps", type=int, default=None, help="override the guide's steps")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-test", type=int, default=16)
    p.add_argument("--n-observed", type=int, default=10)
    p.add_argument("--test-steps", type=int, default=40)
    p.add_argument("--bins", type=int, default=25)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--train-family", default="fourier")
    p.add_argument("--test-family", default="bumps")
    p.add_argument("--micro-steps", type=int, default=200,
                   help="micro steps per snapshot (the time step; default 200)")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--retrain", action="store_true", help="ignore cached model results")
    p.add_argument("--out", type=Path, default=Path("benchmarks/exclusion.md"))
    p.add_argument("--curve", default=None, metavar="SIZES",
                   help="also a learning curve of the first model over these training-set "
                   "sizes (e.g. 1,2,4,8,16,64), normalised by the floor, into OUT's folder")
    p.add_argument("--curve-only", action="store_true",
                   help="with --curve: skip the models' rows of the table")
    a = p.parse_args()

    system = ExclusionSystem(micro_steps=a.micro_steps)
    data = simulate_all(a, system)
    T = a.n_observed - 1
    train, test = data["train"], data["test"]
    truth = fractions(test)
    floor = MonteCarloFloor(replicas=data["replicas"], horizons=np.array(EVAL) - T)
    truth_eval = truth[:, list(EVAL)]
    floor_err, floor_se = floor.error(truth_eval)
    sim_s = data["seconds"]
    print(f"simulated in {sim_s.sum():.0f} s ({data['site_updates'] / sim_s.sum():.3g} "
          f"site-updates/s); floor {np.round(floor_err, 5)} ± {np.round(floor_se, 5)}")

    rows: list[dict] = []
    n_future = a.test_steps - T

    def score(name: str, pred: np.ndarray, extra: dict) -> None:
        err = forecast_error(pred, truth_eval)
        rows.append({"model": name, "error": err.tolist(), **extra})

    train_frac = fractions(train)
    t0 = time.perf_counter()
    linear = LinearMap().fit(train_frac)
    lin_roll = linear.rollout(truth[:, T], n_future)
    score("linear map (LS)", lin_roll[:, np.array(EVAL) - T], {
        "train_seconds": time.perf_counter() - t0,
        "mass_error": float(np.nanmax(metrics.mass_error(lin_roll[:, 1:])))})
    t0 = time.perf_counter()
    quad = QuadraticStencil(radius=1).fit(train_frac)
    q_roll = quad.rollout(truth[:, T], n_future)
    with np.errstate(invalid="ignore"):
        q_mass = metrics.mass_error(q_roll[:, 1:])
    score("quadratic stencil (LS, r=1)", q_roll[:, np.array(EVAL) - T], {
        "train_seconds": time.perf_counter() - t0,
        "mass_error": float(np.max(np.where(np.isfinite(q_mass), q_mass, np.inf)))})
    score("hydrodynamic PDE (true FG state at T)", data["pde"], {})

    for name in [m for m in a.models.split(",") if m] if not a.curve_only else []:
        spec = ROOT / "models" / f"{name}.toml"
        if not spec.is_file() and not Path(name).is_file():
            print(f"skipping model {name!r}: no spec {spec.relative_to(ROOT)}")
            continue
        # a result is reused while its spec, the guide spec, the library and the data are as then
        spec_text = (spec if spec.is_file() else Path(name)).read_text()
        guide_path = ROOT / "guides" / f"{a.guide}.toml"
        guide_text = guide_path.read_text() if guide_path.is_file() else Path(a.guide).read_text()
        code = "".join(f.read_text() for f in sorted((ROOT / "cgpyro").glob("*.py")))
        digest = hashlib.sha1(f"{spec_text}|{guide_text}|{a.svi_steps}|{a.samples}|{a.seed}|"
                              f"{data['key']}|{code}".encode()).hexdigest()[:12]
        cache = ROOT / "data" / "generated" / f"bench_exclusion_{Path(name).stem}_{digest}.json"
        if cache.is_file() and not a.retrain:
            rows.append(json.loads(cache.read_text()))
            print(f"{name}: cached result {cache.name} (--retrain to train again)")
            continue
        print(f"training {name} ...", flush=True)
        fc, seconds = run_model(name, a, train, test[:, : a.n_observed], n_future)
        future = slice(a.n_observed, a.test_steps + 1)
        score(f"cgpyro {name}", fc.mean[:, list(EVAL)], {
            "train_seconds": seconds,
            "mass_error": float(metrics.mass_error(fc.mean[:, future]).max()),
            "coverage": metrics.coverage(fc.lower[:, future], fc.upper[:, future],
                                         truth[:, future])})
        cache.write_text(json.dumps(rows[-1]))
        print(rows[-1], flush=True)

    lin_err = np.array(rows[0]["error"])
    lines = [
        "# Interacting system (soft-exclusion walkers): forecasts of held-out sequences",
        "",
        f"Train: {a.n_train} `{a.train_family}` sequences × {a.n_observed} snapshots "
        f"(T = {T}), {a.bins} bins; test: {a.n_test} `{a.test_family}` sequences, forecast "
        f"from their first {a.n_observed} snapshots. Floor: mean of {a.replicas} FG replicas "
        f"from the true state at T: error {', '.join(f'{e:.4f} ± {s:.4f}' for e, s in zip(floor_err, floor_se, strict=True))} "  # noqa: E501
        f"at {', '.join(str(t) for t in EVAL)} Δt (± Monte-Carlo standard error). "
        f"Error = mean over test sequences of Σ_j |X̂_j − m_j/N|; `inf` = the rollout diverged.",
        "",
        "| model | err/floor " + " | ".join(f"{t} Δt" for t in EVAL)
        + " | err/linear " + " | ".join(f"{t} Δt" for t in EVAL)
        + " | mass error | 95 % coverage | train s |",
        "|---|" + "---:|" * (2 * len(EVAL) + 3),
    ]
    for r in rows:
        err = np.array(r["error"])
        r["ratio_floor"] = (err / floor_err).tolist()
        r["ratio_linear"] = (err / lin_err).tolist()
        cells = [_ratio(x) for x in r["ratio_floor"] + r["ratio_linear"]]
        mass = f"{r['mass_error']:.1e}" if r.get("mass_error") is not None else "–"
        cov = f"{r['coverage']:.3f}" if "coverage" in r else "–"
        secs = f"{r['train_seconds']:.1f}" if "train_seconds" in r else "–"
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {mass} | {cov} | {secs} |")
    lines += [
        "",
        f"The floor is the error of a {a.replicas}-replica mean, inflated over that of the exact "
        f"expectation by about √(1 + 1/R) ≈ {np.sqrt(1 + 1 / a.replicas):.2f}: a deterministic "
        "forecast from the true FG state (the PDE row) can sit slightly below 1.",
        "",
        f"Simulation: {sim_s.sum():.0f} s for {data['site_updates']:.3g} site-updates "
        f"({data['site_updates'] / sim_s.sum():.3g} site-updates/s; train {sim_s[0]:.0f} s, "
        f"test {sim_s[1]:.0f} s, floor replicas {sim_s[2]:.0f} s) on `{a.device}`, one thread.",
        "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_exclusion.py "
        f"--models {a.models}" + (f" --svi-steps {a.svi_steps}" if a.svi_steps else "") + "`",
    ]
    if a.curve:
        from cgpyro.curve import learning_curve, write_curve

        name = a.models.split(",")[0]
        oracle = np.full(truth.shape, np.nan)
        oracle[:, list(EVAL)] = floor.mean
        sizes = [int(n) for n in a.curve.split(",")]
        curve = learning_curve(train, test, sizes, name, a.guide, steps=a.svi_steps,
                               eval_steps=list(EVAL), oracle=oracle, with_no_vo=False,
                               num_samples=a.samples, seed=a.seed)
        folder = a.out.parent / f"exclusion_curve_{name}"
        write_curve(curve, folder, reference=f"the floor (mean of {a.replicas} FG replicas)")
        lines += ["", f"Learning curve of `{name}`: [{folder.name}/curve.md]"
                  f"({folder.name}/curve.md)"]
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps(
        {"rows": rows, "floor": floor_err.tolist(), "floor_se": floor_se.tolist(),
         "eval_times": list(EVAL), "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
