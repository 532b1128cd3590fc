"""The exact references: lattice propagation (the oracle), binning and the continuum limit."""

import numpy as np
import pytest

from cgpyro.reference import (
    bin_fractions,
    bin_of_site,
    continuum_solution,
    oracle_fractions,
    propagate_expected,
)
from cgpyro.systems import ParticleSystem, random_smooth_density

PAPER = ParticleSystem()
SMALL = ParticleSystem(n_sites=16, micro_steps=5, p_left=0.3, p_right=0.1)


def smooth(seed: int = 0) -> np.ndarray:
    return random_smooth_density(np.random.default_rng(seed), PAPER.n_sites)


def test_propagate_matches_direct_convolution():
    rng = np.random.default_rng(0)
    occ = rng.integers(0, 50, size=(3, 16))
    kernel = SMALL.kernel(2)
    frac = occ / occ.sum(axis=-1, keepdims=True)
    direct = np.zeros_like(frac)
    for i in range(16):  # particle at site i lands on j with probability K[(j - i) mod n]
        for j in range(16):
            direct[:, j] += frac[:, i] * kernel[(j - i) % 16]
    np.testing.assert_allclose(propagate_expected(SMALL, occ, 2), direct, atol=1e-15)


def test_propagate_conserves_mass_for_any_batch_shape():
    rng = np.random.default_rng(1)
    occ = rng.integers(0, 300, size=(2, 3, PAPER.n_sites))
    out = propagate_expected(PAPER, occ, 7)
    assert out.shape == (2, 3, PAPER.n_sites) and out.dtype == np.float64
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-12)
    assert out.min() >= 0


def test_propagate_zero_steps_is_identity_and_composes():
    occ = np.random.default_rng(2).integers(0, 300, size=PAPER.n_sites)
    np.testing.assert_array_equal(propagate_expected(PAPER, occ, 0), occ / occ.sum())
    two_then_three = propagate_expected(PAPER, propagate_expected(PAPER, occ, 2), 3)
    np.testing.assert_allclose(two_then_three, propagate_expected(PAPER, occ, 5), atol=1e-15)


@pytest.mark.parametrize(
    "occ, steps, message",
    [
        (np.ones(100), 1, r"occupancy: expected shape \(\.\.\., 1280\)"),
        (-np.ones(1280), 1, "occupancy: expected non-negative"),
        (np.zeros((2, 1280)), 1, "occupancy: expected a positive total"),
        (np.ones(1280), -1, "n_coarse_steps: expected non-negative integer"),
        (np.ones(1280), 1.5, "n_coarse_steps: expected non-negative integer"),
    ],
)
def test_propagate_validation(occ, steps, message):
    with pytest.raises(ValueError, match=message):
        propagate_expected(PAPER, occ, steps)


def test_bin_fractions():
    values = np.arange(2 * 12).reshape(2, 12)
    np.testing.assert_array_equal(bin_fractions(values, 3), values.reshape(2, 3, 4).sum(-1))
    assert bin_fractions(values, 3).dtype == values.dtype  # counts stay integers
    sizes = np.bincount(bin_of_site(1280, 25))
    assert sizes.sum() == 1280 and set(sizes) == {51, 52}  # 1280 / 25 = 51.2
    np.testing.assert_array_equal(bin_fractions(np.ones(1280), 25), sizes)
    with pytest.raises(ValueError, match="n_bins: expected an integer between 1 and"):
        bin_fractions(values, 13)


def test_oracle_fractions():
    occ = np.random.default_rng(3).integers(0, 300, size=(4, PAPER.n_sites))
    out = oracle_fractions(PAPER, occ, [0, 6, 11], 25)
    assert out.shape == (4, 3, 25)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(out[:, 0], bin_fractions(occ / occ.sum(-1, keepdims=True), 25))
    np.testing.assert_allclose(out[:, 2], bin_fractions(propagate_expected(PAPER, occ, 11), 25))


def test_continuum_single_mode_is_analytic():
    """rho0 = 1 + a cos(pi q s) evolves into 1 + a exp(-D k^2 t) cos(k (s - v t)), k = pi q."""
    s = PAPER.site_centers
    q, a, t = 2, 0.4, 300.0
    k = np.pi * q
    exact = 1 + a * np.exp(-PAPER.diffusion * k**2 * t) * np.cos(k * (s - PAPER.velocity * t))
    out = continuum_solution(PAPER, 1 + a * np.cos(k * s), [t])
    np.testing.assert_allclose(out[0], exact / exact.sum(), rtol=1e-12)


def test_continuum_conserves_mass_and_starts_at_density0():
    rho0 = np.stack([smooth(0), smooth(1)])
    times = [0.0, 4.0, 40.0, 160.0]
    out = continuum_solution(PAPER, rho0, times)
    assert out.shape == (2, 4, PAPER.n_sites)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(out[:, 0], rho0, atol=1e-16)
    assert out.min() > 0
    flat = continuum_solution(PAPER, np.ones(PAPER.n_sites), times)
    np.testing.assert_allclose(flat, 1 / PAPER.n_sites, rtol=1e-12)


@pytest.mark.parametrize("k_steps", [1, 10, 40])
def test_continuum_close_to_lattice_expectation_on_cg_bins(k_steps):
    """On 25 bins the continuum limit (eq. 16) and the exact lattice expectation differ by
    1e-5 to 2e-4 in L1 (mostly because the lattice variance is smaller by
    (p_r - p_l)^2 / (p_l + p_r) = 0.16 %); we allow 5e-4, still 14 x below the finite-particle
    noise of ~7e-3, while the density itself moves by > 0.05."""
    rho0 = smooth(5)
    lattice = bin_fractions(propagate_expected(PAPER, rho0, k_steps), 25)
    continuum = bin_fractions(continuum_solution(PAPER, rho0, [k_steps * PAPER.coarse_dt])[0], 25)
    assert np.abs(lattice - continuum).sum() < 5e-4
    assert np.abs(lattice - bin_fractions(rho0, 25)).sum() > 0.05
