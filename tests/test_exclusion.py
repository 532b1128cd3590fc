"""Soft-exclusion walkers: statistics of the exact sampler, conservation, references, seeds."""

import numpy as np
import pytest
import torch

from cgpyro.exclusion import (
    FAMILIES,
    ExclusionSystem,
    _BinomialTable,
    hydrodynamic_solution,
    monte_carlo_floor,
    simulate_exclusion_dataset,
)

K = 200


def _binomial_state(system, rho, n_rep, seed):
    g = torch.Generator().manual_seed(seed)
    rho = torch.as_tensor(np.broadcast_to(rho, (n_rep, system.n_sites)).copy())
    return torch.binomial(torch.full_like(rho, float(system.capacity)), rho, generator=g).long()


def test_binomial_table_matches_the_exact_distribution():
    # n = 60 at p = 0.3 and the fallback beyond the table (n = 90 > n_max = 80): mean, variance
    # and the full histogram against the binomial pmf (chi-square, 200,000 draws each).
    stats = pytest.importorskip("scipy.stats")
    binom, chi2 = stats.binom, stats.chi2

    table = _BinomialTable(np.array([0.3]), 80, 8, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for n_val in (60, 90):
        n = torch.full((200_000,), n_val)
        raw = torch.randint(0, 1 << 8, n.shape, generator=g)
        draws = table.sample(n, 0, raw, g).numpy()
        observed = np.bincount(draws, minlength=n_val + 1)
        expected = binom.pmf(np.arange(n_val + 1), n_val, 0.3) * draws.size
        keep = expected > 5
        stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        assert stat < chi2.ppf(0.999, keep.sum() - 1), (n_val, stat)
        assert observed[~keep].sum() < 5 * max(expected[~keep].sum(), 1)


def test_mean_one_step_flux_matches_its_formula():
    # A state with a sharp front and sites at/over capacity; 4,000 replicas of one micro step.
    system = ExclusionSystem(n_sites=48)
    n0 = torch.as_tensor(np.r_[np.full(16, 30), np.full(16, 190), np.full(16, 100)])
    n0[20], n0[21] = K, K + 7
    n = n0.expand(4000, -1).contiguous()
    new, flux = system.micro_step(n, torch.Generator().manual_seed(1), return_flux=True)
    expected = system.expected_flux(n0).numpy()
    f = flux.double().numpy()
    fixed = f.std(0) == 0  # the bond between the two full sites carries nothing
    assert fixed.sum() == 1 and expected[fixed] == 0 and np.all(f[:, fixed] == 0)
    z = (f.mean(0) - expected)[~fixed] / (f.std(0)[~fixed] / np.sqrt(f.shape[0]))
    assert np.abs(z).max() < 4.5
    assert 0.7 < (z**2).mean() < 1.3  # the spread of z is that of a standard normal
    # the flux explains the change exactly: conservation bond by bond
    np.testing.assert_array_equal(new - n, -(flux - torch.roll(flux, 1, -1)))


def test_conservation_and_what_the_rule_allows():
    system = ExclusionSystem(n_sites=40)
    n = _binomial_state(system, np.linspace(0.05, 0.98, 40), 64, 2)
    n[:, 5] = K + 3  # over capacity: may only lose particles
    g = torch.Generator().manual_seed(3)
    total = n.sum(-1)
    for _ in range(200):
        new = system.micro_step(n, g)
        assert new.dtype == torch.int64
        assert int(new.min()) >= 0
        full = n >= K
        assert bool((new[full] <= n[full]).all())  # a full site accepts nothing
        bound = n + torch.roll(n, 1, -1) + torch.roll(n, -1, -1)  # arrivals only from neighbours
        assert bool((new <= bound).all())
        n = new
        assert bool((n.sum(-1) == total).all())


def test_small_perturbation_follows_the_linearised_pde():
    # rho = 0.3 + 0.05 cos(2 pi x / L) on 64 sites, 400 micro steps: the mode's mean amplitude is
    # multiplied by exp((-i c k - D k^2) t), c = (p_r - p_l)(1 - 2 rho), D = (p_l + p_r) / 2
    # (lattice units): a phase turn of pi and a decay to 0.46. Tolerance: 4 standard errors.
    L, rb, q, steps, reps = 64, 0.3, 1, 400, 512
    system = ExclusionSystem(n_sites=L, micro_steps=steps)
    x = np.arange(L)
    start = _binomial_state(system, rb + 0.05 * np.cos(2 * np.pi * q * x / L), reps, 4)
    occ = system.simulate(reps, 1, seed=5, initial_occupancy=start).occupancy / K
    modes = np.fft.fft(occ, axis=-1)[..., q]  # (reps, 2)
    k = 2 * np.pi * q / L
    c, d = (system.p_right - system.p_left) * (1 - 2 * rb), 0.5 * (system.p_left + system.p_right)
    predicted = modes[:, 0].mean() * np.exp((-1j * c * k - d * k**2) * steps)
    stderr = modes[:, 1].std() / np.sqrt(reps)
    assert abs(modes[:, 1].mean() - predicted) < 4 * stderr
    # the non-interacting walk (c = p_r - p_l) is far off: the test can tell them apart
    free = modes[:, 0].mean() * np.exp((-1j * 0.2 * k - d * k**2) * steps)
    assert abs(modes[:, 1].mean() - free) > 20 * stderr


def test_seeds_reproduce_and_families_differ():
    system = ExclusionSystem(n_sites=64, micro_steps=5)
    a = system.simulate(3, 2, seed=7).occupancy
    b = system.simulate(3, 2, seed=7).occupancy
    c = system.simulate(3, 2, seed=8).occupancy
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int64 and a.shape == (3, 3, 64)
    for family in FAMILIES:
        rho = system.initial_density(16, 0, family)
        assert rho.shape == (16, 64) and rho.min() >= 0.1 and rho.max() <= 0.9
    assert not np.allclose(system.initial_density(2, 0, "bumps"),
                           system.initial_density(2, 0, "steps"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_device_and_dtype(device):
    system = ExclusionSystem(n_sites=32)
    n = torch.full((2, 32), 50, dtype=torch.int64, device=device)
    out = system.evolve(n, 3, torch.Generator(device=device).manual_seed(0))
    assert out.dtype == torch.int64 and out.device.type == device
    assert int(out.sum()) == 2 * 32 * 50
    with pytest.raises(ValueError, match="int64 torch tensor"):
        system.micro_step(n.double(), torch.Generator(device=device))
    data, sim = simulate_exclusion_dataset(2, 1, n_bins=4, system=ExclusionSystem(
        n_sites=32, micro_steps=2), device=device)
    assert data.counts.shape == (2, 2, 4) and data.counts.dtype == np.int64
    assert data.dt == pytest.approx(0.01)


def test_hydrodynamic_solution_converges_at_second_order_and_conserves_mass():
    system = ExclusionSystem(n_sites=32, micro_steps=20)
    x = np.arange(32)
    rho0 = 0.5 + 0.3 * np.sin(2 * np.pi * x / 32) + 0.1 * np.cos(4 * np.pi * x / 32)
    times = [0.0, 0.1, 0.2]
    sols = [hydrodynamic_solution(system, rho0, times, refine=r) for r in (1, 2, 4)]
    e1, e2 = np.abs(sols[0] - sols[2]).max(), np.abs(sols[1] - sols[2]).max()
    assert 3.0 < e1 / e2 < 6.0  # second order: refining twice cuts the error ~5x vs the finest
    np.testing.assert_allclose(sols[0].sum(-1), rho0.sum(), rtol=1e-12)
    np.testing.assert_array_equal(sols[0][0], rho0)


def test_monte_carlo_floor_shapes_and_standard_error():
    system = ExclusionSystem(n_sites=50, micro_steps=3)
    state = _binomial_state(system, np.full(50, 0.4), 2, 6).numpy()
    floor = monte_carlo_floor(system, state, [1, 2], n_bins=5, n_replicas=8, seed=0)
    assert floor.replicas.shape == (8, 2, 2, 5)
    np.testing.assert_allclose(floor.mean.sum(-1), 1.0)
    err, se = floor.error(floor.mean)
    np.testing.assert_allclose(err, 0.0, atol=1e-15)
    assert np.all(floor.stderr > 0) and se.shape == (2,)
    with pytest.raises(ValueError, match="n_replicas: expected at least 2"):
        monte_carlo_floor(system, state, [1], n_replicas=1)


def test_validation_names_the_rule():
    with pytest.raises(ValueError, match="p_left \\+ p_right: expected at most 1"):
        ExclusionSystem(p_left=0.8, p_right=0.3)
    with pytest.raises(ValueError, match="capacity: expected a positive integer"):
        ExclusionSystem(capacity=0)
    with pytest.raises(ValueError, match="family: expected one of fourier, bumps, steps"):
        simulate_exclusion_dataset(1, 1, family="waves")
    with pytest.raises(ValueError, match="n_bins: expected an integer between 1 and n_sites"):
        simulate_exclusion_dataset(1, 1, n_bins=2000)
    with pytest.raises(ValueError, match="initial_occupancy: expected non-negative"):
        ExclusionSystem(n_sites=8).simulate(1, 1, initial_occupancy=-np.ones(8, dtype=int))


def test_dataset_spec_is_the_contract():
    from cgpyro.datasets import load_dataset_spec

    spec = load_dataset_spec("exclusion")
    assert spec.system == "exclusion"
    assert ExclusionSystem(**spec.system_params) == ExclusionSystem()
    assert spec.sampling == {"n_sequences": 64, "n_steps": 40, "n_bins": 25, "seed": 0,
                             "family": "fourier"}
