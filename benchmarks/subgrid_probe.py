"""Probe: a latent sub-bin state (r sub-bins per bin) with a local positive kernel. Not the library.

The CG law of bin fractions is not Markov where the state inside a bin matters (coarse bins,
short time steps): the default model then needs memory terms it cannot learn from 10 snapshots.
This probe keeps a finer latent grid instead and asks how far that structure alone goes:

- ``x_t`` (B·r fine fractions) evolves by one translation-invariant, positive, mass-conserving
  kernel ``x_{t+1} = K x_t + N(0, q I)`` (``2·3r + 1`` weights, a softmax);
- the bins observe sums over their ``r`` sub-bins, ``y_t = H x_t + N(0, diag(ȳ / N))``;
- ``x_0`` has a smooth prior: mean the within-bin linear interpolation of ``y_0``, covariance
  ``s0² P G P`` (``G`` a squared-exponential kernel of length ``ell`` sub-bins, ``P`` the
  projection on within-bin zero-sum directions, so the prior leaves the bin sums at ``y_0``);
- kernel, ``q``, ``s0``, ``ell`` maximise the Kalman marginal likelihood (type-II ML, L-BFGS);
  the forecast is the filter mean at T = 9 propagated by ``K`` and summed into bins.

It ignores unequal bins (25 bins of 51/52 lattice sites are treated as equal). Printed: the ratio
to the oracle floor at 15/20/25/35 Δt of the cell's held-out sequences, as in ``matrix.py``.
``python benchmarks/subgrid_probe.py CELL SEED SIZES [R]`` (e.g. ``offmatrix_dt200 1 1,4,64 4``);
results in benchmarks/matrix.md, "A latent sub-bin state".
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from matrix import TIMES, cell_data

T = 9


def kernel(logits: torch.Tensor, n_fine: int) -> torch.Tensor:
    """Circulant ``K`` (n_fine, n_fine): mass at sub-bin j moves to j + k with softmax weight k."""
    reach = (logits.numel() - 1) // 2
    eye = torch.eye(n_fine)
    weights = torch.softmax(logits, 0)
    return sum(weights[k + reach] * torch.roll(eye, k, 0) for k in range(-reach, reach + 1))


def filter_and_forecast(y: np.ndarray, p: dict, r: int, n_particles: float, horizon: int = 0):
    """Kalman filter over ``y`` (S, T+1, B) fractions. Returns the log marginal likelihood, or
    with ``horizon`` > 0 the forecast bin fractions (S, horizon, B) from the last snapshot."""
    S, n_times, B = y.shape
    Bf = B * r
    y = torch.as_tensor(y)
    K = kernel(p["logits"], Bf)
    H = torch.kron(torch.eye(B), torch.ones(1, r))
    R = torch.diag(y.mean((0, 1)) / n_particles)
    P = torch.eye(Bf) - torch.kron(torch.eye(B), torch.ones(r, r) / r)
    slope = (torch.roll(y[:, 0], -1, -1) - torch.roll(y[:, 0], 1, -1)) / 2
    centres = (torch.arange(r) + 0.5) / r - 0.5
    m = (y[:, 0, :, None] / r + slope[..., None] * centres / r).reshape(S, Bf)
    d = torch.arange(Bf)[:, None] - torch.arange(Bf)[None]
    d = torch.minimum(d.abs(), Bf - d.abs()).double()
    ell = torch.exp(p["logell"].clamp(-1.0, 3.0))
    C = torch.exp(2 * p["logs0"]) * P @ torch.exp(-0.5 * (d / ell) ** 2) @ P
    C = C + 1e-14 * torch.eye(Bf)
    loglik = torch.zeros(())
    for t in range(n_times):
        if t > 0:
            m = m @ K.T
            C = K @ C @ K.T + torch.exp(p["logq"]) * torch.eye(Bf)
        CH = C @ H.T
        L = torch.linalg.cholesky(0.5 * (H @ CH + (H @ CH).T) + R)
        e = y[:, t] - m @ H.T
        z = torch.cholesky_solve(e.T, L).T
        loglik = loglik - 0.5 * (e * z).sum() - S * torch.log(torch.diagonal(L)).sum()
        m = m + z @ CH.T
        C = C - CH @ torch.cholesky_inverse(L) @ CH.T
        C = 0.5 * (C + C.T)
    if horizon == 0:
        return loglik
    out = []
    for _ in range(horizon):
        m = m @ K.T
        out.append(m @ H.T)
    return torch.stack(out, 1)


def fit(y: np.ndarray, r: int, n_particles: float) -> dict:
    reach = 3 * r
    p = {"logits": torch.zeros(2 * reach + 1), "logq": torch.tensor(np.log(1e-8)),
         "logs0": torch.tensor(np.log(1e-3)), "logell": torch.tensor(np.log(float(r)))}
    for v in p.values():
        v.requires_grad_(True)
    opt = torch.optim.LBFGS(list(p.values()), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        try:
            loss = -filter_and_forecast(y, p, r, n_particles)
        except torch.linalg.LinAlgError:  # a line-search trial past positive definiteness
            return torch.tensor(1e30)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return p


def main() -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    cell, seed, sizes = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    r = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    train, test, oracle, _ = cell_data(cell, seed)
    frac = train.counts / train.counts.sum(-1, keepdims=True)
    held = test.counts / test.counts.sum(-1, keepdims=True)
    floor = np.array([np.abs(oracle[:, t] - held[:, t]).sum(-1).mean() for t in TIMES])
    n_particles = float(train.counts[0, 0].sum())
    for n in sizes:
        t0 = time.perf_counter()
        p = fit(frac[:n], r, n_particles)
        with torch.no_grad():
            pred = filter_and_forecast(held[:, : T + 1], p, r, n_particles,
                                       horizon=max(TIMES) - T).numpy()
        err = np.array([np.abs(pred[:, t - T - 1] - held[:, t]).sum(-1).mean() for t in TIMES])
        print(f"{cell} seed {seed} r = {r} n = {n}: ratio "
              + " / ".join(f"{v:.3f}" for v in err / floor)
              + f"  (ell {torch.exp(p['logell'].clamp(-1.0, 3.0)).item():.2f} sub-bins, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
