"""Exact references for the lattice particle system: the oracle and the continuum limit.

Everything here is deterministic. Site arrays have the site on the last axis; bin arrays have
the bin on the last axis. Binning follows ``cgpyro._binning`` (a site belongs to the equal-width
CG bin that contains its lattice point; 1,280 sites in 25 bins: 51 or 52 sites each), whose
helpers are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

# The binning helpers live in cgpyro._binning (no import cycle with cgpyro.systems); their old
# names stay importable from here.
from cgpyro._binning import bin_fractions, bin_of_site, bin_starts
from cgpyro._binning import check_bins as _check_bins

if TYPE_CHECKING:  # the oracle only needs the system's kernel and constants
    from cgpyro.systems import ParticleSystem

__all__ = [
    "bin_fractions",
    "bin_of_site",
    "bin_starts",
    "continuum_solution",
    "oracle_fractions",
    "propagate_expected",
]


def _site_fractions(system: ParticleSystem, occupancy: np.ndarray, name: str) -> np.ndarray:
    """Validate a site occupancy (..., n_sites) and normalize it per row to fractions."""
    occ = np.asarray(occupancy)
    if occ.dtype.kind not in "iuf":
        raise ValueError(f"{name}: expected a numeric array, found dtype {occ.dtype}")
    occ = occ.astype(np.float64)
    if occ.ndim < 1 or occ.shape[-1] != system.n_sites:
        raise ValueError(
            f"{name}: expected shape (..., {system.n_sites}) with sites last, found {occ.shape}"
        )
    if not np.all(np.isfinite(occ)):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    if np.any(occ < 0):
        raise ValueError(f"{name}: expected non-negative values, found min {occ.min()}")
    total = occ.sum(axis=-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError(f"{name}: expected a positive total in every row, found a zero row")
    return occ / total


def _check_steps(values: Sequence[int] | np.ndarray | int, name: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values))
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or np.any(arr < 0):
        raise ValueError(
            f"{name}: expected non-negative integer coarse steps, found {np.asarray(values)!r}"
        )
    return arr.astype(np.int64)


def propagate_expected(
    system: ParticleSystem, occupancy: np.ndarray, n_coarse_steps: int
) -> np.ndarray:
    """Exact expected site fractions after ``n_coarse_steps`` coarse steps, float64 (..., n_sites).

    ``occupancy`` (..., n_sites): particles per site (or any non-negative site weights; each row
    is normalized). The result is the circular convolution of ``occupancy / N`` with
    ``system.kernel(n_coarse_steps)`` (via FFT), i.e. E[m_j(t + k)] / N given the state at t.
    Round-off negatives (~1e-18) are clipped to 0.
    """
    fractions = _site_fractions(system, occupancy, "occupancy")
    (k,) = _check_steps(n_coarse_steps, "n_coarse_steps")
    if k == 0:
        return fractions
    n = system.n_sites
    spectrum = np.fft.rfft(fractions, axis=-1) * np.fft.rfft(system.kernel(int(k)))
    return np.clip(np.fft.irfft(spectrum, n=n, axis=-1), 0.0, None)


def oracle_fractions(
    system: ParticleSystem,
    occupancy_T: np.ndarray,
    horizons: Sequence[int] | np.ndarray,
    n_bins: int,
) -> np.ndarray:
    """Exact expected bin fractions at T + h given the FG state at T, (..., len(horizons), n_bins).

    ``occupancy_T`` (..., n_sites), typically (n_sequences, n_sites) = ``occupancy[:, T]``;
    ``horizons``: coarse steps ahead (non-negative ints). This is the oracle of the design
    contract: no CG model beats it on average.
    """
    hs = _check_steps(horizons, "horizons")
    _check_bins(system.n_sites, n_bins)
    out = [bin_fractions(propagate_expected(system, occupancy_T, int(h)), n_bins) for h in hs]
    return np.stack(out, axis=-2)


def continuum_solution(
    system: ParticleSystem, density0: np.ndarray, times: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Spectral solution of eq. 16 (periodic), as site fractions (..., len(times), n_sites).

    ``density0`` (..., n_sites): the initial density sampled at the site lattice points (any
    positive scale; normalized). Each Fourier mode is multiplied by ``exp((-i v k - D k^2) t)``
    with ``k = 2 pi q / L`` (``pi q`` on [-1, 1)), which is exact for the trigonometric
    interpolant of ``density0``. Every time slice is normalized to sum 1; nothing is clipped, so
    a rough ``density0`` can give small Gibbs undershoots.
    """
    rho0 = _site_fractions(system, density0, "density0")
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"times: expected a 1-D array of finite times >= 0, found {times!r}")
    n = system.n_sites
    length = system.domain[1] - system.domain[0]
    k = 2.0 * np.pi * np.arange(n // 2 + 1) / length
    growth = np.exp(
        np.multiply.outer(t, -1j * system.velocity * k - system.diffusion * k**2)
    )  # (len(times), n // 2 + 1)
    # irfft drops the imaginary part of the Nyquist mode, which keeps the field real.
    spectrum = np.fft.rfft(rho0, axis=-1)[..., None, :] * growth
    rho = np.fft.irfft(spectrum, n=n, axis=-1)
    return rho / rho.sum(axis=-1, keepdims=True)
