"""Accuracy measures of the design contract: error, oracle floor, linear peer, coverage, mass."""

from __future__ import annotations

import numpy as np

__all__ = ["l1_error", "coverage", "mass_error", "fit_linear_peer", "rollout_linear"]


def l1_error(predicted: np.ndarray, observed_fractions: np.ndarray) -> np.ndarray:
    """Mean over sequences of ``Σ_j |X̂_j - m_j/N|``: ``(seq, ..., bin) -> (...)``."""
    return np.abs(np.asarray(predicted) - np.asarray(observed_fractions)).sum(-1).mean(0)


def coverage(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of (sequence, step, bin) truths inside ``[lower, upper]``."""
    truth = np.asarray(truth)
    return float(((truth >= lower) & (truth <= upper)).mean())


def mass_error(x: np.ndarray) -> np.ndarray:
    """``|1 - Σ_j X_j|``, shape ``x.shape[:-1]``."""
    return np.abs(1.0 - np.asarray(x).sum(-1))


def fit_linear_peer(fractions: np.ndarray) -> np.ndarray:
    """Least-squares linear map ``X_{t+1} = A X_t`` on all pairs of ``(seq, time, bin)``.

    What a DMD user would fit; returns ``A`` of shape ``(n_bins, n_bins)``.
    """
    f = np.asarray(fractions, dtype=np.float64)
    x, y = f[:, :-1].reshape(-1, f.shape[-1]), f[:, 1:].reshape(-1, f.shape[-1])
    return np.linalg.lstsq(x, y, rcond=None)[0].T


def rollout_linear(A: np.ndarray, x0: np.ndarray, n_steps: int) -> np.ndarray:
    """``(seq, bin)`` start -> ``(seq, n_steps, bin)`` states ``A^k x0`` for k = 1..n_steps."""
    out, x = [], np.asarray(x0, dtype=np.float64)
    for _ in range(n_steps):
        x = x @ A.T
        out.append(x)
    return np.stack(out, 1)
