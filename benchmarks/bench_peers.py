"""Peers on the same run and the same data (issue 13 item 6): forecasts of held-out sequences.

Data (reference system, 250,000 particles, 25 bins): 64 training sequences x 10 snapshots of
the "fourier" initial-condition family (seed 0) and held-out test sequences x 41 snapshots of
the "bumps" family (seed 1), so every method is also tested out of its training distribution.
Each method is fitted on the first n = 1, 4, 64 training sequences, sees the first 10 snapshots
of every test sequence and forecasts to snapshot 40. Scores (``cgpyro.metrics``):

- ``ratio@t``: mean L1 error of the forecast bin fractions at t = 15, 20, 25, 35 Δt divided by
  the oracle floor (exact expectation given the FG state at t = 9, ``cgpyro.reference``);
- ``mass``: max |1 - Σ_j X_j| over the forecast steps 10..40;
- ``coverage``: fraction of (sequence, step, bin) truths in the 95 % band, steps 10..40, for
  the methods that give bands (cgpyro, BOP-DMD);
- ``wall_s``: fit + forecast of the test sequences, seconds (one torch thread).

Methods:

- ``lstsq``: the least-squares linear map X_{t+1} = A X_t (``cgpyro.peers.LinearMap``);
- ``sindy-lin`` / ``sindy-quad``: pysindy ``DiscreteSINDy`` with a polynomial library of degree
  1 / 2 (constant included), STLSQ(threshold=1e-3, alpha=1e-6), all trajectories passed as a
  list; rolled forward with ``predict``;
- ``dmd``: pydmd ``DMD`` (exact, default ``svd_rank=0``: optimal hard threshold) fitted on the
  one-step pairs of all training trajectories (``fit(X, Y)``), rolled forward with its
  reduced operator;
- ``bopdmd``: pydmd ``BOPDMD`` (rank 6, "stable" eigenvalue constraint, 32 bagging trials of
  80 % of the snapshots): the training trajectories are stacked
  along the state axis (shared eigenvalues, per-sequence modes) to learn continuous-time
  eigenvalues and their bagging std; a test sequence's modes are fitted by least squares to
  its 10 observed snapshots, and the band is the 2.5-97.5 % quantile over 200 forecasts with
  eigenvalues drawn as ``BOPDMD.forecast`` draws them (real part clipped to <= 0), each
  refitting the modes;
- cgpyro model specs (``--models``, default ``physics,particles_paper``) trained as
  ``cgpyro.experiment`` does (guide ``lognormal``, its SVI settings, warm start), states of the
  test sequences inferred with θ fixed (``guide_for_new_sequences``), ``forecast`` with 200
  posterior samples. A spec that does not exist is skipped with a message.

Usage: ``python benchmarks/bench_peers.py [--quick] [--models physics,particles_paper]
[--write]``; ``--write`` writes ``benchmarks/peers.md``. ``--quick``: 300 SVI steps, 8 test
sequences, 100,000 particles.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from cgpyro import metrics
from cgpyro.reference import oracle_fractions
from cgpyro.systems import simulate_dataset

EVAL_TIMES = (15, 20, 25, 35)
N_OBSERVED = 10  # snapshots seen of every sequence (t = 0..9)
N_TEST_STEPS = 40  # test snapshots 0..40
SIZES = (1, 4, 64)


# -- data --------------------------------------------------------------------------------------
def make_data(n_test: int, n_particles: int, seed: int = 0) -> dict:
    """Training fractions/counts (64, 10, 25) "fourier"; test (n_test, 41, 25) "bumps"; oracle
    (n_test, len(EVAL_TIMES), 25) given the FG state at t = 9."""
    train, _ = simulate_dataset(64, N_OBSERVED - 1, n_particles=n_particles, seed=seed,
                                family="fourier")
    test, sim = simulate_dataset(n_test, N_TEST_STEPS, n_particles=n_particles, seed=seed + 1,
                                 family="bumps")
    T = N_OBSERVED - 1
    oracle = oracle_fractions(sim.system, sim.occupancy[:, T], [t - T for t in EVAL_TIMES], 25)
    return {"train_counts": train.counts, "train": train.fractions, "test_counts": test.counts,
            "test": test.fractions, "oracle": oracle}


# -- peers: each returns (mean (n_test, 41, B), lower, upper or None, None) -------------------
def _observed_then(path: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Forecast from t = 9: ``path`` (n_test, 32, B) is t = 9..40; observed t < 9 prepended."""
    return np.concatenate([truth[:, : N_OBSERVED - 1], path], axis=1)


def _rollout(step, x0: np.ndarray, n_steps: int) -> np.ndarray:
    """Iterate ``step`` from x0 (n, B): (n, n_steps + 1, B); non-finite stays inf."""
    out = [x0]
    x = x0
    with np.errstate(all="ignore"):
        for _ in range(n_steps):
            x = np.asarray(step(x), dtype=np.float64)
            x = np.where(np.isfinite(x).all(-1, keepdims=True), x, np.inf)
            out.append(x)
    return np.stack(out, axis=1)


def peer_lstsq(train: np.ndarray, test_obs: np.ndarray):
    try:
        from cgpyro.peers import LinearMap

        model = LinearMap().fit(train)
        step = model.step
    except ImportError:  # before cgpyro.peers existed: the same map in three lines
        A = np.linalg.lstsq(train[:, :-1].reshape(-1, train.shape[-1]),
                            train[:, 1:].reshape(-1, train.shape[-1]), rcond=None)[0].T
        step = lambda x: x @ A.T  # noqa: E731
    path = _rollout(step, test_obs[:, -1], N_TEST_STEPS - N_OBSERVED + 1)
    return _observed_then(path, test_obs), None, None


def _sindy(degree: int):
    def fit_forecast(train: np.ndarray, test_obs: np.ndarray):
        import pysindy as ps

        model = ps.DiscreteSINDy(
            optimizer=ps.STLSQ(threshold=1e-3, alpha=1e-6),
            feature_library=ps.PolynomialLibrary(degree=degree),
        )
        with warnings.catch_warnings():  # ill-conditioned libraries warn; the score says it
            warnings.simplefilter("ignore")
            model.fit(list(train), t=1.0)
            path = _rollout(model.predict, test_obs[:, -1], N_TEST_STEPS - N_OBSERVED + 1)
        return _observed_then(path, test_obs), None, None

    return fit_forecast


def peer_dmd(train: np.ndarray, test_obs: np.ndarray):
    from pydmd import DMD

    B = train.shape[-1]
    X = train[:, :-1].reshape(-1, B).T  # (B, n_pairs): pairs never cross sequences
    Y = train[:, 1:].reshape(-1, B).T
    dmd = DMD().fit(X, Y)
    Phi, lam = dmd.modes, dmd.eigs
    pinv = np.linalg.pinv(Phi)

    def step(x):
        return (Phi @ (lam[:, None] * (pinv @ x.T))).real.T

    path = _rollout(step, test_obs[:, -1], N_TEST_STEPS - N_OBSERVED + 1)
    return _observed_then(path, test_obs), None, None


def peer_bopdmd(train: np.ndarray, test_obs: np.ndarray, rank: int = 6, num_trials: int = 32,
                n_draws: int = 200, seed: int = 0):
    from pydmd import BOPDMD

    n, T, B = train.shape
    t_obs = np.arange(T, dtype=np.float64)
    stacked = train.transpose(0, 2, 1).reshape(n * B, T)  # (n * B, T): shared eigenvalues
    rank = min(rank, T - 1, n * B)
    np.random.seed(seed)  # BOPDMD draws its bags from numpy's global generator
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # pydmd prints
        warnings.simplefilter("ignore")
        bop = BOPDMD(svd_rank=rank, num_trials=num_trials, trial_size=0.8,
                     eig_constraints={"stable"})
        bop.fit(stacked, t_obs)
    eigs = np.asarray(bop.eigs)
    eigs_std = np.asarray(bop.eigenvalues_std) if bop.eigenvalues_std is not None else 0 * eigs
    t_all = np.arange(N_TEST_STEPS + 1, dtype=np.float64)
    rng = np.random.default_rng(seed)

    T_obs = test_obs.shape[1]
    observed = test_obs.transpose(1, 0, 2).reshape(T_obs, -1)  # (T_obs, n_test * B)

    def forecast_with(lam):
        basis = np.exp(np.outer(lam, t_all))  # (r, 41)
        # modes of each test sequence: least squares of its observed snapshots on the basis
        modes = np.linalg.lstsq(basis[:, :T_obs].T, observed, rcond=None)[0]  # (r, n_test*B)
        x = (basis.T @ modes).real.reshape(len(t_all), test_obs.shape[0], B)
        return x.transpose(1, 0, 2)

    mean = forecast_with(eigs)
    def draw():
        # as BOPDMD.forecast draws them (a real normal times the real bagging std), kept in the
        # stable half-plane the fit was constrained to, so a draw cannot overflow
        lam = eigs + eigs_std * rng.standard_normal(eigs.shape)
        return forecast_with(np.minimum(lam.real, 0.0) + 1j * lam.imag)

    draws = np.stack([draw() for _ in range(n_draws)])
    lower, upper = np.quantile(draws, [0.025, 0.975], axis=0)
    return mean, lower, upper


PEERS = {
    "lstsq": peer_lstsq,
    "sindy-lin": _sindy(1),
    "sindy-quad": _sindy(2),
    "dmd": peer_dmd,
    "bopdmd": peer_bopdmd,
}


# -- cgpyro -------------------------------------------------------------------------------------
def cgpyro_runner(spec_name: str, steps: int | None, num_samples: int = 200, seed: int = 0):
    """A fit_forecast for a model spec, or None (with a message) if the spec does not exist."""
    from cgpyro.specs import load_guide, load_model_spec

    try:
        spec = load_model_spec(spec_name)
    except Exception as err:  # noqa: BLE001 - any failure to load means: skip this spec
        print(f"skipping model {spec_name!r}: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    guide = load_guide("lognormal")

    def fit_forecast(train_counts: np.ndarray, test_obs_counts: np.ndarray):
        import torch

        from cgpyro.guides import guide_for_new_sequences
        from cgpyro.inference import SVIInference
        from cgpyro.predict import forecast

        torch.set_num_threads(1)
        svi = dict(guide.svi)
        if steps is not None:
            svi["steps"] = steps
        cg = spec.build(train_counts.shape[-1])
        inference = SVIInference(cg, guide=guide.factory, seed=seed, progress=False, **svi).fit(
            torch.as_tensor(train_counts))
        obs = torch.as_tensor(test_obs_counts)
        new = guide_for_new_sequences(inference, obs)
        f = forecast(cg, new, obs, N_TEST_STEPS - N_OBSERVED + 1, num_samples=num_samples,
                     seed=seed)
        return np.asarray(f.mean), np.asarray(f.lower), np.asarray(f.upper)

    return fit_forecast


# -- scoring ------------------------------------------------------------------------------------
def score(mean, lower, upper, data) -> dict:
    truth, oracle = data["test"], data["oracle"]
    future = slice(N_OBSERVED, N_TEST_STEPS + 1)
    row = {}
    for i, t in enumerate(EVAL_TIMES):
        floor = float(metrics.l1_error(oracle[:, i], truth[:, t]))
        err = float(metrics.l1_error(mean[:, t], truth[:, t]))
        row[f"ratio@{t}"] = err / floor if np.isfinite(err) else float("inf")
    row["floor@15"] = float(metrics.l1_error(oracle[:, 0], truth[:, EVAL_TIMES[0]]))
    with np.errstate(invalid="ignore"):
        row["mass"] = float(np.nanmax(metrics.mass_error(mean[:, future])))
    row["coverage"] = (metrics.coverage(lower[:, future], upper[:, future], truth[:, future])
                       if lower is not None else float("nan"))
    return row


def run(quick: bool = False, models=("physics", "particles_paper"), sizes=SIZES,
        seed: int = 0) -> list[dict]:
    """Rows {"n", "method", "ratio@15..35", "mass", "coverage", "wall_s"} for every n and method."""
    n_test, n_particles, steps = (8, 100_000, 300) if quick else (16, 250_000, None)
    data = make_data(n_test, n_particles, seed)
    test_obs = data["test"][:, :N_OBSERVED]
    test_obs_counts = data["test_counts"][:, :N_OBSERVED]
    runners = {name: cgpyro_runner(name, steps, seed=seed) for name in models}
    import pydmd  # noqa: F401 - import time is not fit time
    import pysindy  # noqa: F401
    rows = []
    for n in sizes:
        for name, fn in PEERS.items():
            start = time.perf_counter()
            try:
                out = fn(data["train"][:n], test_obs)
            except Exception as err:  # noqa: BLE001 - a failing peer is a result, not a crash
                print(f"{name} n={n} failed: {type(err).__name__}: {err}", file=sys.stderr)
                rows.append({"n": n, "method": name, "failed": f"{type(err).__name__}"})
                continue
            wall = time.perf_counter() - start
            rows.append({"n": n, "method": name, **score(*out, data), "wall_s": wall})
            print(_fmt(rows[-1]), file=sys.stderr, flush=True)
        for name, fn in runners.items():
            if fn is None:
                continue
            start = time.perf_counter()
            out = fn(data["train_counts"][:n], test_obs_counts)
            wall = time.perf_counter() - start
            rows.append({"n": n, "method": f"cgpyro:{name}", **score(*out, data), "wall_s": wall})
            print(_fmt(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _num(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    if not np.isfinite(x):
        return "inf"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.1e}"


def _fmt(r: dict) -> str:
    if "failed" in r:
        return f"| {r['n']} | {r['method']} | failed ({r['failed']}) |" + " |" * 6
    ratios = " | ".join(_num(r[f"ratio@{t}"]) for t in EVAL_TIMES)
    return (f"| {r['n']} | {r['method']} | {ratios} | {r['mass']:.1e} | "
            f"{_num(r['coverage'])} | {r['wall_s']:.1f} |")


def to_markdown(rows: list[dict]) -> str:
    head = " | ".join(f"÷ floor {t}Δt" for t in EVAL_TIMES)
    lines = [f"| n | method | {head} | mass error | coverage | wall_s |",
             "|---:|---|" + "---:|" * (len(EVAL_TIMES) + 3)]
    lines += [_fmt(r) for r in rows]
    floors = sorted({round(r["floor@15"], 5) for r in rows if "floor@15" in r})
    return "\n".join(lines) + f"\n\nOracle floor at 15 Δt: {floors[0] if floors else '–'}."


def write_markdown(table: str, quick: bool, models: str) -> Path:
    """Write ``benchmarks/peers.md``: machine, versions, command, method notes and the table."""
    from importlib.metadata import version

    import torch

    header = (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__} (1 thread), "
        f"pysindy {version('pysindy')}, pydmd {version('pydmd')}. Command: "
        f"`python benchmarks/bench_peers.py{' --quick' if quick else ''} --models {models} "
        "--write`.\n"
    )
    doc = (__doc__.split("\n\n", 1)[1]).split("\nUsage:")[0]
    path = Path(__file__).with_name("peers.md")
    path.write_text("# Peers: same run, same data\n\n" + header + "\n" + doc.strip() + "\n\n"
                    + table + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 SVI steps, 8 test sequences")
    parser.add_argument("--models", default="physics,particles_paper",
                        help="cgpyro model specs, comma-separated (default: %(default)s)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="training-set sizes (default: %(default)s)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/peers.md")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    table = to_markdown(run(quick=args.quick, models=models, sizes=sizes))
    print(table)
    if args.write:
        write_markdown(table, args.quick, args.models)
