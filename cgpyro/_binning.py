"""Equal-width CG bins over a periodic site lattice: which site goes to which bin.

Sites sit at the lattice points ``s_i = a + i * ds`` (i = 0 .. n_sites - 1) of the domain
``[a, b)``; a site belongs to the equal-width bin ``[e_j, e_{j+1})`` that contains its lattice
point, so with 1,280 sites and 25 bins the bins hold 51 or 52 sites (1280 / 25 = 51.2). All
arithmetic is integer, so a lattice point on a bin edge always goes to the bin on its right.

This module depends on numpy (and ``cgpyro._checks``) only; ``cgpyro.systems``,
``cgpyro.reference`` and the interacting system import it (and ``cgpyro.reference`` re-exports
its names), so that neither of the first two imports the other.
"""

from __future__ import annotations

import numpy as np

from cgpyro._checks import is_int

__all__ = ["bin_fractions", "bin_of_site", "bin_sizes", "bin_starts", "check_bins"]


def check_bins(n_sites: int, n_bins: int) -> None:
    """Raise ``ValueError`` unless ``n_bins`` is an integer in ``[1, n_sites]``."""
    if not is_int(n_bins):
        raise ValueError(f"n_bins: expected an integer, found {type(n_bins).__name__}")
    if not 1 <= n_bins <= n_sites:
        raise ValueError(
            f"n_bins: expected an integer between 1 and n_sites={n_sites} "
            f"(every bin needs a site), found {n_bins}"
        )


def bin_of_site(n_sites: int, n_bins: int) -> np.ndarray:
    """Bin index of every site, int64 (n_sites,): ``floor(i * n_bins / n_sites)``.

    Integer arithmetic, so a lattice point on a bin edge always goes to the bin on its right
    (bins are half-open ``[e_j, e_{j+1})``), with no float rounding.
    """
    check_bins(n_sites, n_bins)
    return (np.arange(n_sites, dtype=np.int64) * n_bins) // n_sites


def bin_starts(n_sites: int, n_bins: int) -> np.ndarray:
    """First site of every bin, int64 (n_bins,): ``ceil(j * n_sites / n_bins)``."""
    check_bins(n_sites, n_bins)
    j = np.arange(n_bins, dtype=np.int64)
    return (j * n_sites + n_bins - 1) // n_bins


def bin_sizes(n_sites: int, n_bins: int) -> np.ndarray:
    """Number of sites in every bin, int64 (n_bins,); sums to ``n_sites``."""
    starts = bin_starts(n_sites, n_bins)
    return np.diff(starts, append=n_sites)


def bin_fractions(site_values: np.ndarray, n_bins: int) -> np.ndarray:
    """Sum site values (..., n_sites) into ``n_bins`` equal-width bins -> (..., n_bins).

    Sums, does not normalize: site fractions give bin fractions, site counts give bin counts
    (the dtype is kept).
    """
    site_values = np.asarray(site_values)
    if site_values.ndim < 1 or site_values.shape[-1] == 0:
        raise ValueError(
            f"site_values: expected shape (..., n_sites) with n_sites >= 1, "
            f"found {site_values.shape}"
        )
    starts = bin_starts(site_values.shape[-1], n_bins)
    return np.add.reduceat(site_values, starts, axis=-1)
