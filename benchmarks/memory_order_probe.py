"""Probe: would a memory of several increments (a chain of order 3 or 4) help? Not the library.

The default model's empirical-Bayes fit of the linear part (stencil, δ, dense, memory stencil of
reach 2, decay-rate hedge: ``FluxDrift``'s own regressors and evidence) is extended with memory
stencils of the earlier increments ``ΔX_{t-1}``, ``ΔX_{t-2}``. Every order is fitted on the same
targets (``t ≥ 3``; their log evidence is comparable) and rolled out from the held-out fractions
of a matrix cell; printed: the ratio to the oracle floor at 15/20/25/35 Δt and the evidence.
``python benchmarks/memory_order_probe.py CELL SEED SIZES`` (e.g. ``offmatrix_dt200 1 1,4,64``);
results in benchmarks/matrix.md, "Off the matrix".
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from matrix import cell_data

from cgpyro.inference import as_counts
from cgpyro.specs import load_model

T, FIRST, TIMES, ORDERS = 10, 3, (15, 20, 25, 35), (1, 2, 3, 4)


def main() -> None:
    torch.set_num_threads(1)
    cell, seed, sizes = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    train, test, oracle, B = cell_data(cell, seed)
    drift = load_model("physics", n_bins=B).transition.drift
    drift.memory_radius = 2
    frac = as_counts(train).double()
    frac = frac / frac.sum(-1, keepdim=True)
    held = as_counts(test).double()
    held = held / held.sum(-1, keepdim=True)

    def features(hist, order):  # hist: newest first
        if order == 1:
            return drift._features(hist[0])
        extra = [drift._memory_window(hist[m] - hist[m + 1]) for m in range(1, order - 1)]
        return torch.cat([drift._features(hist[0], hist[0] - hist[1]), *extra], -1)

    def groups(order):
        g = drift._groups(order >= 2).tolist()
        for m in range(1, order - 1):
            g += [3 + m] * (2 * drift.memory_radius + 1)
        return torch.tensor(g)

    def fit(order, n):
        P = len(groups(order))
        rows = [(features([frac[:n, t - k] for k in range(order)], order).reshape(-1, P),
                 (frac[:n, t + 1] - frac[:n, t]).reshape(-1))
                for t in range(FIRST, frac.shape[1] - 1)]
        phi, y = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        stats = (phi.T @ phi, phi.T @ y, y.pow(2).sum(), y.numel(), groups(order))
        _, post, evidence, _ = drift._evidence_fit(*stats)
        _, post2, _, _ = drift._evidence_fit(*stats, rate_scale=1.0)
        return 0.5 * (post[0] + post2[0]), evidence

    for n in sizes:
        line = []
        for order in ORDERS:
            w, evidence = fit(order, n)
            hist, path = [held[:, T - 1 - k] for k in range(order)], []
            for _ in range(max(TIMES) - T + 1):
                x = hist[0] + features(hist, order) @ w
                hist = [x, *hist[:-1]]
                path.append(x.numpy())
            ratio = [np.abs(path[t - T] - held[:, t].numpy()).sum(-1).mean()
                     / np.abs(oracle[:, t] - held[:, t].numpy()).sum(-1).mean() for t in TIMES]
            line.append(f"order {order} (log ev {evidence:.0f}): "
                        + "/".join(f"{r:.2f}" for r in ratio))
        print(f"{cell} seed {seed} n {n} | " + " | ".join(line), flush=True)


if __name__ == "__main__":
    main()
