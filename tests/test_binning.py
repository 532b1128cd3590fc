"""Equal-width CG binning of the site lattice (cgpyro._binning) and its re-export."""

import subprocess
import sys

import numpy as np
import pytest

from cgpyro import _binning as binning
from cgpyro import reference
from cgpyro._binning import bin_fractions, bin_of_site, bin_sizes, bin_starts, check_bins


def float_bin_of_site(n_sites: int, n_bins: int) -> np.ndarray:
    """Reference: the bin whose [e_j, e_j+1) holds the lattice point -1 + 2 i / n_sites,
    evaluated in exact rational arithmetic (i * n_bins / n_sites)."""
    from fractions import Fraction

    return np.array([int(Fraction(i * n_bins, n_sites)) for i in range(n_sites)])


@pytest.mark.parametrize("n_sites, n_bins", [(1280, 25), (1280, 64), (10, 10), (7, 3), (5, 1)])
def test_bins_match_exact_rational_reference(n_sites, n_bins):
    of = bin_of_site(n_sites, n_bins)
    np.testing.assert_array_equal(of, float_bin_of_site(n_sites, n_bins))
    starts = bin_starts(n_sites, n_bins)
    # the first site of every bin is where bin_of_site steps up
    np.testing.assert_array_equal(starts, np.searchsorted(of, np.arange(n_bins)))
    sizes = bin_sizes(n_sites, n_bins)
    np.testing.assert_array_equal(sizes, np.bincount(of, minlength=n_bins))
    assert sizes.sum() == n_sites and sizes.min() >= 1


def test_paper_bins_hold_51_or_52_sites():
    sizes = bin_sizes(1280, 25)
    assert set(sizes.tolist()) == {51, 52} and sizes.sum() == 1280
    assert (sizes == 52).sum() == 5  # 1280 = 25 * 51 + 5


def test_bin_fractions_sums_and_keeps_dtype():
    counts = np.arange(2 * 3 * 10).reshape(2, 3, 10)
    out = bin_fractions(counts, 4)
    assert out.shape == (2, 3, 4) and out.dtype == counts.dtype
    expected = np.stack([counts[..., bin_of_site(10, 4) == j].sum(-1) for j in range(4)], -1)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(bin_fractions(np.full(1280, 1 / 1280), 25).sum(), 1.0, atol=1e-15)


@pytest.mark.parametrize(
    "n_bins, message",
    [
        (0, "n_bins: expected an integer between 1 and n_sites=10"),
        (11, "n_bins: expected an integer between 1 and n_sites=10 .* found 11"),
        (2.0, "n_bins: expected an integer, found float"),
        (True, "n_bins: expected an integer, found bool"),
    ],
)
def test_bin_validation(n_bins, message):
    with pytest.raises(ValueError, match=message):
        check_bins(10, n_bins)
    with pytest.raises(ValueError, match=message):
        bin_fractions(np.ones(10), n_bins)


def test_bin_fractions_rejects_scalars_and_empty_sites():
    for values in (np.float64(1.0), np.ones((2, 0))):
        with pytest.raises(ValueError, match=r"site_values: expected shape \(\.\.\., n_sites\)"):
            bin_fractions(values, 1)


def test_reference_reexports_the_same_functions():
    for name in ("bin_fractions", "bin_of_site", "bin_starts"):
        assert getattr(reference, name) is getattr(binning, name)


def test_systems_and_reference_do_not_import_each_other():
    """Importing cgpyro.systems must not load cgpyro.reference (the old import cycle)."""
    code = ("import sys, cgpyro.systems; print('cgpyro.reference' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"
