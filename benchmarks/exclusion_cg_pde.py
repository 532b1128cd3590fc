"""How much of the interacting system's forecast the CG state allows: the exact PDE on the bins.

The hydrodynamic equation of ``cgpyro.exclusion`` (``hydrodynamic_solution``) started from
(a) the true FG state at T (the row of ``bench_exclusion.py``), (b) the bin counts at T spread
evenly over each bin's sites, (c) a linear interpolation of the bin densities, and (d) the
even spread renewed at every snapshot: the best first-order law on bin fractions, which forgets
the profile inside the bins at every step. Ratios to the Monte-Carlo floor at 15 / 25 / 35 Δt on
the cached data of ``bench_exclusion.py`` (run that first).
``python benchmarks/exclusion_cg_pde.py [--seeds 0,1]``; results in benchmarks/exclusion.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cgpyro._binning import bin_of_site, bin_sizes
from cgpyro.exclusion import ExclusionSystem, hydrodynamic_solution
from cgpyro.reference import bin_fractions

ROOT = Path(__file__).resolve().parents[1]
B, T, EVAL = 25, 9, np.array([15, 25, 35])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args()
    system = ExclusionSystem()
    site_bin, width = bin_of_site(system.n_sites, B), bin_sizes(system.n_sites, B)
    for seed in (int(s) for s in a.seeds.split(",")):
        path = ROOT / "data" / "generated" / \
            f"bench_exclusion_n64_t16_b25_s{seed}_fourier_bumps_r8_K200_m200.npz"
        d = np.load(path)
        test = d["test"].astype(np.float64)
        frac = test / test.sum(-1, keepdims=True)
        truth = frac[:, EVAL]
        mean = d["replicas"].mean(0)
        floor = np.abs(mean / mean.sum(-1, keepdims=True) - truth).sum(-1).mean(0)

        def score(pred, truth=truth, floor=floor):  # pred (sequence, len(EVAL), B)
            return np.abs(pred - truth).sum(-1).mean(0) / floor

        def pde(rho0, times):
            out = bin_fractions(hydrodynamic_solution(system, rho0, times), B)
            return out / out.sum(-1, keepdims=True)

        counts = test[:, T]
        even = (counts / width)[:, site_bin] / system.capacity
        centres = np.cumsum(width) - width / 2 - 0.5
        xs = np.concatenate([centres - system.n_sites, centres, centres + system.n_sites])
        dens = counts / width / system.capacity
        interp = np.stack([np.interp(np.arange(system.n_sites), xs, np.tile(row, 3))
                           for row in dens])
        times = (EVAL - T) * system.coarse_dt
        x, renewed = counts, {}
        for k in range(1, EVAL.max() - T + 1):
            x = pde((x / width)[:, site_bin] / system.capacity, np.array([system.coarse_dt]))[:, 0]
            x = x * counts.sum(-1, keepdims=True)
            if T + k in EVAL:
                renewed[T + k] = x / x.sum(-1, keepdims=True)
        rows = {"true FG state at T": score(d["pde"]),
                "even spread of the bins at T": score(pde(even, times)),
                "linear interpolation at T": score(pde(interp, times)),
                "even spread renewed every snapshot": score(np.stack(
                    [renewed[t] for t in EVAL], 1))}
        print(f"seed {seed}: err / floor at {' / '.join(str(t) for t in EVAL)} Δt")
        for name, r in rows.items():
            print(f"  PDE from {name}: " + " / ".join(f"{v:.2f}" for v in r))


if __name__ == "__main__":
    main()
