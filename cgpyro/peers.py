"""CG peers: deterministic one-step maps fitted by least squares on training bin fractions.

These are what a user would try before a probabilistic CG model, and the yardsticks of the
benchmarks. Every peer is fitted on all one-step pairs ``(X_t, X_{t+1})`` of the training
fractions, an array (sequence, time, bin), and rolls a start state forward deterministically:

- :class:`LinearMap`: ``X_{t+1} = A X_t (+ b)``, a dense map (what a DMD user does);
- :class:`LocalStencil`: a translation-invariant linear stencil of radius ``r`` on the periodic
  bin grid, ``X_{t+1, j} = sum_{|k| <= r} c_k X_{t, j+k} (+ c)``;
- :class:`QuadraticStencil`: a translation-invariant local polynomial of degree 2 in the
  ``2 r + 1`` neighbours of a bin (constant, linear and all pairwise products), the model class
  of the seed authors' earlier work on local CG closures.

``fit(fractions) -> self``; ``rollout(x0, n_steps) -> (n_sequences, n_steps + 1, n_bins)``
numpy float64, ``x0`` included at index 0. A rollout that overflows is not an error: once a
sequence's state is non-finite it stays ``inf`` from then on, and :func:`forecast_error` reports
``inf`` for it (a diverging peer is a result, not a crash).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PEERS",
    "LinearMap",
    "LocalStencil",
    "Peer",
    "QuadraticStencil",
    "forecast_error",
]


def _check_fractions(fractions: object, name: str = "fractions") -> np.ndarray:
    f = np.asarray(fractions)
    if f.dtype.kind not in "iuf":
        raise ValueError(f"{name}: expected real numbers, found dtype {f.dtype}")
    if f.ndim != 3 or f.shape[1] < 2 or 0 in f.shape:
        raise ValueError(
            f"{name}: expected shape (n_sequences, n_times >= 2, n_bins), found {f.shape}"
        )
    f = f.astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return f


def _check_radius(radius: object, name: str = "radius") -> int:
    if isinstance(radius, bool) or not isinstance(radius, int | np.integer) or radius < 0:
        raise ValueError(f"{name}: expected a non-negative integer, found {radius!r}")
    return int(radius)


def _pairs(fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All one-step pairs as rows: ``(n_pairs, n_bins)`` inputs and targets."""
    n_bins = fractions.shape[-1]
    return fractions[:, :-1].reshape(-1, n_bins), fractions[:, 1:].reshape(-1, n_bins)


def _windows(x: np.ndarray, radius: int) -> np.ndarray:
    """Periodic neighbourhoods: (..., n_bins) -> (..., n_bins, 2 r + 1), offsets -r..r."""
    return np.stack([np.roll(x, -k, axis=-1) for k in range(-radius, radius + 1)], axis=-1)


class Peer:
    """Base class: a deterministic one-step map on bin fractions (..., n_bins)."""

    n_bins: int | None = None

    def fit(self, fractions: np.ndarray) -> Peer:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """One step: (n_sequences, n_bins) -> (n_sequences, n_bins)."""
        raise NotImplementedError

    def rollout(self, x0: np.ndarray, n_steps: int) -> np.ndarray:
        """Iterate the fitted map: x0 (n_sequences, n_bins) -> (n_sequences, n_steps + 1, n_bins).

        Index 0 is ``x0``. A sequence whose state becomes non-finite is ``inf`` from then on.
        """
        if self.n_bins is None:
            raise ValueError(f"{type(self).__name__}: call fit(fractions) before rollout")
        x = np.asarray(x0)
        if x.dtype.kind not in "iuf" or x.ndim != 2 or x.shape[-1] != self.n_bins:
            raise ValueError(
                f"x0: expected real numbers of shape (n_sequences, {self.n_bins}), "
                f"found {x.shape} of dtype {x.dtype}"
            )
        if isinstance(n_steps, bool) or not isinstance(n_steps, int | np.integer) or n_steps < 0:
            raise ValueError(f"n_steps: expected a non-negative integer, found {n_steps!r}")
        out = np.empty((x.shape[0], int(n_steps) + 1, self.n_bins))
        out[:, 0] = x
        state = out[:, 0].copy()
        with np.errstate(over="ignore", invalid="ignore"):
            for t in range(1, int(n_steps) + 1):
                state = self.step(state)
                # Sticky divergence: an overflowed state is a diverged forecast, not NaN noise.
                state[~np.isfinite(state).all(-1)] = np.inf
                out[:, t] = state
        return out


class LinearMap(Peer):
    """Dense linear map ``X_{t+1} = A X_t (+ b)`` by least squares (DMD without truncation).

    ``bias=True`` adds an offset ``b`` (n_bins,). ``ridge`` > 0 adds ``ridge * ||A||^2`` to the
    squared residual (Tikhonov), useful when pairs are fewer than bins. After ``fit``:
    ``A`` (n_bins, n_bins), ``b`` (n_bins,) (zeros without bias).
    """

    def __init__(self, bias: bool = False, ridge: float = 0.0) -> None:
        if not np.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge: expected a finite number >= 0, found {ridge!r}")
        self.bias, self.ridge = bool(bias), float(ridge)
        self.A: np.ndarray | None = None
        self.b: np.ndarray | None = None

    def fit(self, fractions: np.ndarray) -> LinearMap:
        """Fit on every one-step pair of ``fractions`` (n_sequences, n_times, n_bins)."""
        f = _check_fractions(fractions)
        x, y = _pairs(f)
        n_bins = f.shape[-1]
        design = np.hstack([x, np.ones((len(x), 1))]) if self.bias else x
        coef = _lstsq(design, y, self.ridge, n_penalized=n_bins)  # (n_features, n_bins)
        self.A = coef[:n_bins].T
        self.b = coef[n_bins] if self.bias else np.zeros(n_bins)
        self.n_bins = n_bins
        return self

    def step(self, x: np.ndarray) -> np.ndarray:
        return x @ self.A.T + self.b


class LocalStencil(Peer):
    """Translation-invariant linear stencil of radius ``r`` on the periodic bin grid.

    ``X_{t+1, j} = sum_{k=-r..r} c_k X_{t, j+k} (+ c)``: ``2 r + 1`` coefficients (plus an
    offset with ``bias=True``), shared by all bins, fitted by least squares over every
    (sequence, time, bin). After ``fit``: ``coef`` (2 r + 1,) for offsets -r..r, ``offset``.
    """

    def __init__(self, radius: int = 2, bias: bool = False) -> None:
        self.radius = _check_radius(radius)
        self.bias = bool(bias)
        self.coef: np.ndarray | None = None
        self.offset = 0.0

    def _features(self, x: np.ndarray) -> np.ndarray:
        w = _windows(x, self.radius)
        if self.bias:
            w = np.concatenate([w, np.ones(w.shape[:-1] + (1,))], axis=-1)
        return w

    def fit(self, fractions: np.ndarray) -> LocalStencil:
        """Fit on every one-step pair of ``fractions`` (n_sequences, n_times, n_bins)."""
        f = _check_fractions(fractions)
        if 2 * self.radius + 1 > f.shape[-1]:
            raise ValueError(
                f"radius: expected 2 * radius + 1 <= n_bins = {f.shape[-1]}, found {self.radius}"
            )
        x, y = _pairs(f)
        feats = self._features(x)
        coef = _lstsq(feats.reshape(-1, feats.shape[-1]), y.reshape(-1, 1), 0.0)[:, 0]
        w = 2 * self.radius + 1
        self.coef, self.offset = coef[:w], (float(coef[w]) if self.bias else 0.0)
        self.n_bins = f.shape[-1]
        return self

    def step(self, x: np.ndarray) -> np.ndarray:
        return _windows(x, self.radius) @ self.coef + self.offset


class QuadraticStencil(Peer):
    """Translation-invariant local polynomial of degree 2 on the periodic bin grid.

    ``X_{t+1, j} = c + sum_k a_k u_k + sum_{k <= l} b_kl u_k u_l`` with ``u = X_{t, j-r..j+r}``:
    ``1 + w + w (w + 1) / 2`` coefficients for ``w = 2 r + 1`` (10 for r = 1), shared by all
    bins, fitted by least squares over every (sequence, time, bin). Inputs are scaled by
    ``n_bins`` (so a uniform state is 1) for conditioning only; the fitted map is the same.
    After ``fit``: ``coef`` in the order (constant, linear terms, products for k <= l).
    """

    def __init__(self, radius: int = 1, ridge: float = 0.0) -> None:
        self.radius = _check_radius(radius)
        if not np.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge: expected a finite number >= 0, found {ridge!r}")
        self.ridge = float(ridge)
        self.coef: np.ndarray | None = None
        w = 2 * self.radius + 1
        self._pair_index = np.triu_indices(w)

    def _features(self, x: np.ndarray) -> np.ndarray:
        u = _windows(x * self.n_bins, self.radius)
        quad = (u[..., :, None] * u[..., None, :])[..., self._pair_index[0], self._pair_index[1]]
        return np.concatenate([np.ones(u.shape[:-1] + (1,)), u, quad], axis=-1)

    def fit(self, fractions: np.ndarray) -> QuadraticStencil:
        """Fit on every one-step pair of ``fractions`` (n_sequences, n_times, n_bins)."""
        f = _check_fractions(fractions)
        if 2 * self.radius + 1 > f.shape[-1]:
            raise ValueError(
                f"radius: expected 2 * radius + 1 <= n_bins = {f.shape[-1]}, found {self.radius}"
            )
        self.n_bins = f.shape[-1]
        x, y = _pairs(f)
        feats = self._features(x)
        target = (y * self.n_bins).reshape(-1, 1)
        self.coef = _lstsq(feats.reshape(-1, feats.shape[-1]), target, self.ridge)[:, 0]
        return self

    def step(self, x: np.ndarray) -> np.ndarray:
        return (self._features(x) @ self.coef) / self.n_bins


def _lstsq(design: np.ndarray, target: np.ndarray, ridge: float,
           n_penalized: int | None = None) -> np.ndarray:
    """``argmin ||design c - target||^2 + ridge ||c[:n_penalized]||^2``: (n_features, n_out)."""
    if ridge > 0:
        n_feat = design.shape[1]
        n_pen = n_feat if n_penalized is None else n_penalized
        penalty = np.zeros((n_pen, n_feat))
        penalty[np.arange(n_pen), np.arange(n_pen)] = np.sqrt(ridge)
        design = np.vstack([design, penalty])
        target = np.vstack([target, np.zeros((n_pen, target.shape[1]))])
    return np.linalg.lstsq(design, target, rcond=None)[0]


def forecast_error(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Mean over sequences of the L1 distance ``sum_j |X̂_j - X_j|``: (seq, ..., bin) -> (...).

    A sequence whose prediction is not finite counts as ``inf`` (a diverged rollout), so the
    mean is ``inf`` wherever any sequence diverged.
    """
    p, o = np.asarray(predicted, dtype=np.float64), np.asarray(observed, dtype=np.float64)
    if p.shape != o.shape:
        raise ValueError(f"predicted: expected the shape of observed {o.shape}, found {p.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(p - o).sum(-1)
    err[~np.isfinite(err)] = np.inf
    return err.mean(0)


PEERS = {"linear": LinearMap, "stencil": LocalStencil, "quadratic": QuadraticStencil}
