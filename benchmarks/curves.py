"""Learning curves of the default model on the reference system (issue 11), oracle-normalised.

Train: the first 10 snapshots of up to 64 sequences of the "fourier" initial conditions; test: 16
held-out sequences of the "bumps" family with 41
snapshots, forecast from their first 10. ratio = error / oracle floor (exact expectation from
the true FG state at T = 9). One command: ``python benchmarks/curves.py --bins 25 --out DIR``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from cgpyro.curve import learning_curve, write_curve
from cgpyro.reference import oracle_fractions
from cgpyro.systems import simulate_dataset


def simulate(n, steps, bins, seed, family, **kw):
    return simulate_dataset(n, steps, n_bins=bins, seed=seed, family=family, **kw)


def main() -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bins", type=int, default=25)
    p.add_argument("--sizes", default="1,2,4,8,16,64")
    p.add_argument("--model", default="physics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-vo-variant", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/curves"))
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    t0 = time.perf_counter()
    train, _ = simulate(max(sizes), 9, a.bins, a.seed, "fourier")
    test, sim = simulate(16, 40, a.bins, a.seed + 1000, "bumps")
    T = 10
    oracle = np.full(test.counts.shape, np.nan)
    horizons = np.arange(T, test.n_times) - (T - 1)
    oracle[:, T:] = oracle_fractions(sim.system, sim.occupancy[:, T - 1], horizons, a.bins)
    rows = learning_curve(train, test, sizes, a.model, eval_steps=[15, 20, 25, 35],
                          oracle=oracle, with_no_vo=not a.no_vo_variant, seed=a.seed)
    out = a.out / f"{a.model}_bins{a.bins}_seed{a.seed}"
    write_curve(rows, out, reference="the oracle floor")
    print((out / "curve.md").read_text())
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
