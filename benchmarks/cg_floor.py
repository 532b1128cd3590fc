"""What a CG forecast can reach at short horizons: the exact lattice kernel applied to a FG state
reconstructed from the CG state alone (uniform inside each bin), against the oracle floor.

The oracle knows the FG state at T; a CG model knows bin fractions only. On the held-out
"bumps" initial conditions of benchmarks/curves.py (same seeds) this reference measures how much
of the gap at 15 Δt is missing sub-bin information rather than learning. It is not a model (it
uses the true kernel). ``python benchmarks/cg_floor.py [--bins 25] [--micro-steps 1600]
[--seeds 0,1,2,3,4]`` (``--micro-steps``: Δt of the paper's system in micro steps)
"""

from __future__ import annotations

import argparse

import numpy as np

from cgpyro.reference import bin_fractions, bin_of_site, oracle_fractions, propagate_expected
from cgpyro.systems import simulate_dataset

TIMES = [15, 20, 25, 35]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bins", type=int, default=25)
    p.add_argument("--micro-steps", type=int, default=1600)
    p.add_argument("--seeds", default="0,1,2,3,4")
    a = p.parse_args()
    T = 10
    print("| seed | " + " | ".join(f"ratio@{t}" for t in TIMES) + " |")
    print("|---|" + "---|" * len(TIMES))
    for seed in (int(s) for s in a.seeds.split(",")):
        test, sim = simulate_dataset(16, 40, n_bins=a.bins, seed=seed + 1000, family="bumps",
                                      micro_steps=a.micro_steps)
        obs = test.counts / test.counts.sum(-1, keepdims=True)
        hs = np.array(TIMES) - (T - 1)
        oracle = oracle_fractions(sim.system, sim.occupancy[:, T - 1], hs, a.bins)
        site_bin = bin_of_site(sim.system.n_sites, a.bins)
        width = np.bincount(site_bin, minlength=a.bins)
        uniform = obs[:, T - 1][:, site_bin] / width[site_bin]  # (sequence, site)
        pred = np.stack([bin_fractions(propagate_expected(sim.system, uniform, int(h)), a.bins)
                         for h in hs], 1)
        truth = obs[:, T - 1 + hs]
        ratio = (np.abs(pred - truth).sum(-1).mean(0)
                 / np.abs(oracle - truth).sum(-1).mean(0))
        print(f"| {seed} | " + " | ".join(f"{r:.3f}" for r in ratio) + " |", flush=True)


if __name__ == "__main__":
    main()
