"""The reference FG system: exact kernel, exact sampler, simulation bookkeeping.

Statistical tests use fixed seeds and tolerances of 5 standard errors (or chi-square tails of
1e-6), so they are deterministic and fail only if the distribution is wrong.
"""

import numpy as np
import pytest
from scipy import stats

from cgpyro.reference import bin_fractions, continuum_solution, propagate_expected
from cgpyro.systems import (
    FAMILIES,
    ParticleSystem,
    Simulation,
    _KernelSampler,
    random_density,
    random_smooth_density,
    simulate_dataset,
)

PAPER = ParticleSystem()


def brute_force_kernel(system: ParticleSystem, n_micro: int) -> np.ndarray:
    """Repeated circular convolution of the one-step kernel, written out site by site."""
    n = system.n_sites
    dist = np.zeros(n)
    dist[0] = 1.0
    for _ in range(n_micro):
        new = (1 - system.p_left - system.p_right) * dist
        new += system.p_right * np.roll(dist, 1)  # mass at d moves to d + 1
        new += system.p_left * np.roll(dist, -1)
        dist = new
    return dist


def centred_displacement(delta: np.ndarray, n_sites: int, mean: float) -> np.ndarray:
    """Unwrap periodic displacements to the window mean ± n_sites/2 (exact while |d - mean| <
    n_sites/2, a > 14-sigma event for the cases below)."""
    shift = int(round(mean))
    return (delta - shift + n_sites // 2) % n_sites - n_sites // 2 + shift


def chi2_stat(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0):
    """Pearson chi-square after pooling cells with small expectation; returns (stat, dof)."""
    order = np.argsort(expected)
    small = expected[order] < min_expected
    obs = np.append(observed[order][~small], observed[order][small].sum())
    exp = np.append(expected[order][~small], expected[order][small].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


# -- constants and validation -------------------------------------------------------------------
def test_paper_constants():
    assert PAPER.ds == pytest.approx(1 / 640, rel=1e-15)
    assert PAPER.coarse_dt == pytest.approx(4.0, rel=1e-15)
    # D = 0.4 / 640^2 / (2 * 2.5e-3), v = 0.025 / 640 / 2.5e-3
    assert PAPER.diffusion == pytest.approx(1.953125e-4, rel=1e-12)
    assert PAPER.velocity == pytest.approx(0.015625, rel=1e-12)
    centers = PAPER.site_centers
    assert centers.shape == (1280,)
    assert centers[0] == -1.0 and centers[-1] == pytest.approx(1 - 1 / 640)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"p_left": 0.6, "p_right": 0.5}, r"p_left \+ p_right: expected at most 1, found 1.1"),
        ({"p_left": -0.1}, "p_left: expected a probability"),
        ({"p_right": float("nan")}, "p_right: expected a probability"),
        ({"n_sites": 0}, "n_sites: expected a positive integer"),
        ({"n_particles": 2.5}, "n_particles: expected a positive integer"),
        ({"micro_steps": True}, "micro_steps: expected a positive integer"),
        ({"micro_dt": 0.0}, "micro_dt: expected a positive finite number"),
        ({"domain": (1.0, -1.0)}, "domain: expected two finite numbers"),
    ],
)
def test_system_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParticleSystem(**kwargs)


# -- exact kernel -------------------------------------------------------------------------------
@pytest.mark.parametrize("n_sites, micro_steps, k", [(16, 7, 3), (5, 4, 2), (2, 3, 1), (1, 5, 1)])
def test_kernel_matches_brute_force(n_sites, micro_steps, k):
    system = ParticleSystem(n_sites=n_sites, micro_steps=micro_steps, p_left=0.3, p_right=0.15)
    kernel = system.kernel(k)
    assert kernel.shape == (n_sites,)
    np.testing.assert_allclose(kernel, brute_force_kernel(system, k * micro_steps), atol=1e-14)


def test_kernel_paper_moments_and_normalization():
    kernel = PAPER.kernel(1)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    assert kernel.min() >= 0
    d = centred_displacement(np.arange(PAPER.n_sites), PAPER.n_sites, 40)
    mean, var = PAPER.displacement_moments(1)  # 40 sites, 1600 * (0.4 - 0.025^2) = 639 sites^2
    assert mean == pytest.approx(40.0) and var == pytest.approx(639.0)
    assert (kernel * d).sum() == pytest.approx(mean, rel=1e-9)
    assert (kernel * d**2).sum() - mean**2 == pytest.approx(var, rel=1e-9)


def test_kernel_zero_steps_is_delta_and_composes():
    delta = PAPER.kernel(0)
    assert delta[0] == 1.0 and delta[1:].sum() == 0.0
    # k-step kernels form a semigroup: K_3 = K_1 (*) K_2 (circular convolution)
    composed = np.fft.ifft(np.fft.fft(PAPER.kernel(1)) * np.fft.fft(PAPER.kernel(2))).real
    np.testing.assert_allclose(PAPER.kernel(3), composed, atol=1e-15)
    with pytest.raises(ValueError, match="n_coarse_steps"):
        PAPER.kernel(-1)


# -- exact sampler ------------------------------------------------------------------------------
def test_sampler_exact_with_large_residual():
    """A kernel with ~9 % of its mass in the residual branch, most of it in a long tail of
    entries below 2**-16 (no LUT slot): the LUT + residual mixture must reproduce it
    (chi-square over 1e6 draws, tail probability 1e-6). A uniform residual gives ~4e5."""
    n = 20_000
    kernel = np.exp(-np.arange(n) / 2500.0)
    kernel[123] += 0.5 * kernel.sum()
    kernel /= kernel.sum()
    sampler = _KernelSampler(kernel)
    residual_mass = 1 - np.count_nonzero(sampler.lut != sampler.sentinel) / sampler.lut.size
    assert residual_mass > 0.05
    draws = sampler.sample(np.random.default_rng(1), 1_000_000)
    assert draws.min() >= 0 and draws.max() < n
    # pool neighbouring sites in groups of 10 so that most cells expect >= 5 draws
    observed = np.bincount(draws, minlength=n).reshape(-1, 10).sum(axis=1)
    expected = 1_000_000 * kernel.reshape(-1, 10).sum(axis=1)
    stat, dof = chi2_stat(observed, expected)
    assert stat < stats.chi2.isf(1e-6, dof), (stat, dof)
    assert abs(observed[12] - expected[12]) < 5 * np.sqrt(expected[12])  # the heavy site


def test_one_step_displacements_match_kernel():
    """Displacements of 200k particles over one coarse step follow the exact kernel."""
    system = ParticleSystem(n_particles=200_000)
    sim = system.simulate(1, 1, seed=3, return_positions=True)
    delta = (sim.positions[0, 1].astype(np.int64) - sim.positions[0, 0]) % system.n_sites
    observed = np.bincount(delta, minlength=system.n_sites)
    stat, dof = chi2_stat(observed, system.n_particles * system.kernel(1))
    assert stat < stats.chi2.isf(1e-6, dof), (stat, dof)


def test_displacement_mean_and_variance_after_three_steps():
    """Mean v t and lattice variance k (p_l + p_r - (p_r - p_l)^2) ds^2 within 5 standard errors.

    We test the exact lattice variance; the continuum 2 D t is larger by k (p_r - p_l)^2 ds^2
    (0.16 %), below the 1 % resolution of 20k particles, so both would pass here.
    """
    system = ParticleSystem(n_particles=20_000)
    k = 3
    sim = system.simulate(1, k, seed=7, return_positions=True)
    mean, var = system.displacement_moments(k)
    d = centred_displacement(
        sim.positions[0, k].astype(np.int64) - sim.positions[0, 0], system.n_sites, mean
    )
    n = d.size
    assert mean * system.ds == pytest.approx(system.velocity * k * system.coarse_dt)
    assert abs(d.mean() - mean) < 5 * np.sqrt(var / n)
    assert abs(d.var(ddof=1) - var) < 5 * var * np.sqrt(2 / (n - 1))


# -- simulation bookkeeping ---------------------------------------------------------------------
def test_counts_conserved_and_positions_consistent():
    system = ParticleSystem(n_particles=5_000)
    sim = system.simulate(3, 4, seed=11, return_positions=True)
    assert sim.occupancy.shape == (3, 5, 1280) and sim.occupancy.dtype == np.int64
    assert sim.positions.shape == (3, 5, 5_000) and sim.positions.dtype == np.int16
    np.testing.assert_array_equal(sim.occupancy.sum(axis=-1), 5_000)
    for i in range(3):
        for t in range(5):
            np.testing.assert_array_equal(
                np.bincount(sim.positions[i, t], minlength=1280), sim.occupancy[i, t]
            )
    counts = sim.bin_counts(25)
    assert counts.shape == (3, 5, 25) and counts.dtype == np.int64
    np.testing.assert_array_equal(counts.sum(axis=-1), 5_000)
    # occupancy does not depend on whether positions are kept
    plain = system.simulate(3, 4, seed=11)
    np.testing.assert_array_equal(plain.occupancy, sim.occupancy)
    assert plain.positions is None


def test_bin_counts_follow_bin_edges():
    """A site counts in the bin [e_j, e_j+1) holding its lattice point; 1280/25 = 51.2 sites."""
    system = ParticleSystem(n_particles=3_000)
    sim = system.simulate(2, 2, seed=5)
    edges = sim.bin_edges(25)
    np.testing.assert_allclose(edges, np.linspace(-1, 1, 26))
    site_bin = np.digitize(system.site_centers, edges[1:-1])  # right-open bins
    expected = np.stack(
        [np.bincount(site_bin, weights=o, minlength=25) for o in sim.occupancy.reshape(-1, 1280)]
    ).reshape(2, 3, 25)
    np.testing.assert_array_equal(sim.bin_counts(25), expected)
    sizes = np.bincount(site_bin, minlength=25)
    assert set(sizes) == {51, 52} and sizes.sum() == 1280
    for bad in (0, 1281):
        with pytest.raises(ValueError, match="n_bins"):
            sim.bin_counts(bad)


def test_to_dataset_and_simulate_dataset():
    dataset, sim = simulate_dataset(n_sequences=2, n_steps=3, n_particles=1_000, n_bins=10, seed=4)
    assert isinstance(sim, Simulation)
    assert dataset.counts.shape == (2, 4, 10)
    assert dataset.dt == 4.0 and sim.dt == 4.0
    np.testing.assert_array_equal(dataset.counts, sim.bin_counts(10))
    np.testing.assert_array_equal(dataset.totals, [1_000, 1_000])
    np.testing.assert_allclose(sim.times, [0, 4, 8, 12])


def test_seeding():
    system = ParticleSystem(n_particles=2_000)
    a = system.simulate(3, 2, seed=1)
    b = system.simulate(3, 2, seed=1, n_workers=1)  # the thread count must not matter
    c = system.simulate(3, 2, seed=2)
    prefix = system.simulate(2, 2, seed=1)  # sequence i does not depend on n_sequences
    np.testing.assert_array_equal(a.occupancy, b.occupancy)
    np.testing.assert_array_equal(a.occupancy[:2], prefix.occupancy)
    assert not np.array_equal(a.occupancy, c.occupancy)
    assert not np.array_equal(a.occupancy[0], a.occupancy[1])  # sequences are independent draws
    with pytest.raises(ValueError, match="seed"):
        system.simulate(1, 1, seed=-1)


def test_progress_bar_goes_to_stderr(capsys):
    ParticleSystem(n_particles=100).simulate(2, 3, progress=True)
    assert "6/6" in capsys.readouterr().err


# -- initial conditions -------------------------------------------------------------------------
def test_random_smooth_density():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = random_smooth_density(rng, 1280, n_modes=3, min_ratio=0.2)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert p.min() >= 0.2 / 1280 * (1 - 1e-9)  # min >= 0.2 x mean
        power = np.abs(np.fft.rfft(p))
        assert power[4:].max() < 1e-12 * power[0]  # only modes 1..3


def test_given_initial_density_is_used():
    system = ParticleSystem(n_particles=10_000)
    left_half = (system.site_centers < 0).astype(float)
    for density in (left_half, lambda s: (s < 0).astype(float), np.stack([left_half] * 2)):
        sim = system.simulate(2, 0, initial_density=density)
        assert sim.occupancy[:, 0, 640:].sum() == 0
        np.testing.assert_allclose(sim.initial_density[0], left_half / 640)
    # the default draws a different smooth density for every sequence
    default = system.initial_densities(2, seed=0)
    assert not np.allclose(default[0], default[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_densities_positive_normalised_reproducible(family):
    system = ParticleSystem(n_particles=1_000)
    a = system.initial_densities(8, seed=3, family=family)
    assert a.shape == (8, 1280)
    np.testing.assert_allclose(a.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    # every family keeps every site reachable: at least 0.1 x the uniform probability
    assert a.min() > 0.1 / 1280, a.min() * 1280
    np.testing.assert_array_equal(a, system.initial_densities(8, seed=3, family=family))
    # sequence i is the same for any n_sequences > i (own stream per sequence)
    np.testing.assert_array_equal(a[:3], system.initial_densities(3, seed=3, family=family))
    assert not np.allclose(a, system.initial_densities(8, seed=4, family=family))
    for i in range(1, 8):
        assert np.abs(a[i] - a[0]).sum() > 0.05  # L1 between site distributions
    # the initial occupancy is drawn from these densities
    sim = system.simulate(8, 0, seed=3, family=family)
    np.testing.assert_array_equal(sim.initial_density, a)


def test_fourier_family_is_the_default_stream():
    """family="fourier" is what the default always drew: random_smooth_density on the spawned
    per-sequence streams, so datasets simulated before families existed are unchanged."""
    system = ParticleSystem(n_particles=1_000)
    children = np.random.SeedSequence(7).spawn(3)
    expected = np.stack([random_smooth_density(np.random.default_rng(c), 1280) for c in children])
    np.testing.assert_array_equal(system.initial_densities(3, seed=7), expected)
    np.testing.assert_array_equal(system.initial_densities(3, seed=7, family="fourier"), expected)
    default = system.simulate(3, 2, seed=7).occupancy
    np.testing.assert_array_equal(system.simulate(3, 2, seed=7, family="fourier").occupancy,
                                  default)


def test_families_differ_in_shape():
    """Fourier densities hold modes 1..3 only (share beyond mode 3 at round-off, < 1e-20);
    bumps and steps put a share many orders above that beyond mode 3 (localised bumps, sharp
    fronts; a single widest bump, 0.12 L, keeps ~1e-4). Steps sit mostly on plateaus:
    over 40 % of the sites change by < 1e-4 of the range to their neighbour; a 3-mode profile
    does so only near its extrema (< 10 % of the sites for these draws: 6 % at most)."""
    system = ParticleSystem(n_particles=1_000)
    draws = {f: system.initial_densities(16, seed=11, family=f) for f in FAMILIES}

    def high_share(p):
        power = np.abs(np.fft.rfft(p - p.mean(axis=-1, keepdims=True), axis=-1)) ** 2
        return power[:, 4:].sum(axis=-1) / power.sum(axis=-1)

    assert high_share(draws["fourier"]).max() < 1e-20
    assert high_share(draws["bumps"]).min() > 1e-5
    assert high_share(draws["steps"]).min() > 1e-3

    def flat_share(p):
        step = np.abs(np.diff(p, axis=-1, append=p[:, :1]))
        return (step < 1e-4 * np.ptp(p, axis=-1, keepdims=True)).mean(axis=-1)

    assert flat_share(draws["steps"]).min() > 0.4
    assert flat_share(draws["fourier"]).max() < 0.1
    assert not np.allclose(draws["bumps"], draws["steps"])


def test_family_validation():
    system = ParticleSystem(n_particles=10)
    with pytest.raises(ValueError, match="family: expected one of fourier, bumps, steps, "
                                         "found 'gauss'"):
        system.simulate(2, 1, family="gauss")
    with pytest.raises(ValueError, match="family: expected one of"):
        random_density(np.random.default_rng(0), 10, family=None)
    with pytest.raises(ValueError, match="family: applies only when initial_density is None"):
        system.initial_densities(2, initial_density=np.ones(1280), family="bumps")
    with pytest.raises(ValueError, match="family: expected one of"):
        simulate_dataset(n_sequences=1, n_steps=1, n_particles=10, family="nope")


def test_simulate_dataset_takes_system_parameters_and_family():
    dataset, sim = simulate_dataset(
        n_sequences=3, n_steps=2, n_particles=2_000, n_bins=8, seed=5, n_sites=320,
        p_left=0.2, p_right=0.3, micro_steps=40, family="steps",
    )
    expected = ParticleSystem(n_particles=2_000, n_sites=320, p_left=0.2, p_right=0.3,
                              micro_steps=40)
    assert sim.system == expected
    assert dataset.counts.shape == (3, 3, 8) and dataset.dt == pytest.approx(40 * 2.5e-3)
    np.testing.assert_array_equal(sim.initial_density,
                                  expected.initial_densities(3, seed=5, family="steps"))
    np.testing.assert_array_equal(dataset.counts.sum(axis=-1), 2_000)


@pytest.mark.parametrize(
    "density, message",
    [
        (np.ones(100), r"expected shape \(1280,\) or \(2, 1280\), found \(100,\)"),
        (np.ones((3, 1280)), r"expected shape \(1280,\) or \(2, 1280\), found \(3, 1280\)"),
        (-np.ones(1280), "expected non-negative values"),
        (np.full(1280, np.nan), "expected finite values"),
        (np.zeros(1280), "expected a positive sum"),
        (np.array(["a"] * 1280), "expected real numbers"),
        (lambda s: np.ones(3), r"expected the callable to return shape \(1280,\).*found \(3,\)"),
    ],
)
def test_initial_density_validation(density, message):
    with pytest.raises(ValueError, match="initial_density: " + message):
        ParticleSystem(n_particles=10).simulate(2, 1, initial_density=density)


# -- agreement with the exact references ------------------------------------------------------
def test_empirical_density_matches_exact_expectation_after_ten_steps():
    """Given the FG state at t = 0, m(10) is a sum of independent multinomials with mean
    N * propagate_expected. The Pearson statistic over (sequence, bin) has an exactly computable
    mean; we allow 5 of its standard deviations (sqrt(2 E), as for a chi-square)."""
    system = ParticleSystem(n_particles=50_000)
    sim = system.simulate(6, 10, seed=21)
    n = system.n_sites
    occ0 = sim.occupancy[:, 0]
    expected = system.n_particles * bin_fractions(propagate_expected(system, occ0, 10), 25)
    observed = sim.bin_counts(25)[:, 10]
    stat = ((observed - expected) ** 2 / expected).sum()
    # E[stat] = sum_j sum_i n_i q_ij (1 - q_ij) / E m_j with q_ij = P(site i -> bin j)
    q = bin_fractions(np.stack([np.roll(system.kernel(10), i) for i in range(n)]), 25)
    mean_stat = sum(
        ((occ0[s][:, None] * q * (1 - q)).sum(axis=0) / expected[s]).sum() for s in range(6)
    )
    assert abs(stat - mean_stat) < 5 * np.sqrt(2 * mean_stat), (stat, mean_stat)


def test_empirical_density_matches_continuum_after_ten_steps():
    """Marginally each particle is at site ~ rho0 (*) K_10, so m(10) ~ Multinomial(N, .) exactly;
    the continuum solution of eq. 16 is within 5e-4 (L1 on bins, see test_reference) of its
    bin fractions, far below the sqrt(p / N) ~ 1e-3 noise, so a chi-square test must pass."""
    system = ParticleSystem(n_particles=50_000)
    sim = system.simulate(6, 10, seed=22)
    rho = continuum_solution(system, sim.initial_density, [10 * system.coarse_dt])[:, 0]
    expected = system.n_particles * bin_fractions(rho, 25)
    observed = sim.bin_counts(25)[:, 10]
    stat = ((observed - expected) ** 2 / expected).sum()
    assert stat < stats.chi2.isf(1e-6, 6 * 24), stat
    # and it is not trivially satisfied: the t = 0 profile is far off
    stale = system.n_particles * bin_fractions(sim.initial_density, 25)
    assert ((observed - stale) ** 2 / stale).sum() > 10 * stats.chi2.isf(1e-6, 6 * 24)


# -- at scale: chunks of sequences, blocks of particles -------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_simulate_binned_equals_simulate(chunk_size):
    system = ParticleSystem(n_particles=3_000)
    expected = system.simulate(5, 3, seed=9, family="bumps").to_dataset(10)
    got = system.simulate_binned(5, 3, n_bins=10, seed=9, family="bumps", chunk_size=chunk_size)
    np.testing.assert_array_equal(got.counts, expected.counts)
    np.testing.assert_array_equal(got.bin_edges, expected.bin_edges)
    assert got.dt == expected.dt and got.counts.dtype == np.int64
    # a per-sequence initial density is sliced per chunk
    dens = np.random.default_rng(0).random((5, 1280)) + 0.1
    expected = system.simulate(5, 2, seed=1, initial_density=dens).to_dataset(25)
    got = system.simulate_binned(5, 2, seed=1, initial_density=dens, chunk_size=chunk_size)
    np.testing.assert_array_equal(got.counts, expected.counts)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunk_size": 0}, "chunk_size: expected a positive integer"),
        ({"n_bins": 2000}, "n_bins: expected an integer between 1 and n_sites=1280"),
        ({"initial_density": np.ones((3, 1280))},
         r"initial_density: expected shape \(1280,\) or \(2, 1280\), found \(3, 1280\)"),
        ({"family": "gauss"}, "family: expected one of"),
        ({"n_workers": 0}, "n_workers: expected a positive integer"),
    ],
)
def test_simulate_binned_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParticleSystem(n_particles=10).simulate_binned(2, 1, **kwargs)


def test_particle_blocks_keep_the_distribution(monkeypatch):
    """Moving 50,000 particles in blocks of 4,096 (13 blocks, the last partial) must leave the
    exact law of the occupancy: the Pearson test of the unblocked path against the exact
    expectation, 5 standard deviations; positions and occupancy stay consistent."""
    import cgpyro.systems as systems

    monkeypatch.setattr(systems, "_PARTICLE_BLOCK", 4_096)
    system = ParticleSystem(n_particles=50_000)
    sim = system.simulate(6, 10, seed=21)
    occ0 = sim.occupancy[:, 0]
    np.testing.assert_array_equal(sim.occupancy.sum(-1), 50_000)
    expected = system.n_particles * bin_fractions(propagate_expected(system, occ0, 10), 25)
    observed = sim.bin_counts(25)[:, 10]
    stat = ((observed - expected) ** 2 / expected).sum()
    q = bin_fractions(np.stack([np.roll(system.kernel(10), i) for i in range(1280)]), 25)
    mean_stat = sum(
        ((occ0[s][:, None] * q * (1 - q)).sum(axis=0) / expected[s]).sum() for s in range(6)
    )
    assert abs(stat - mean_stat) < 5 * np.sqrt(2 * mean_stat), (stat, mean_stat)
    with_pos = system.simulate(2, 3, seed=4, return_positions=True)
    np.testing.assert_array_equal(with_pos.occupancy, system.simulate(2, 3, seed=4).occupancy)
    for t in range(4):
        np.testing.assert_array_equal(
            np.bincount(with_pos.positions[1, t], minlength=1280), with_pos.occupancy[1, t]
        )


def test_simulate_binned_memory_does_not_grow_with_particles_or_sequences(monkeypatch):
    """Peak traced memory of simulate_binned with 8x the particles (blocks of 2**14) and 8x the
    sequences (chunks of 2) stays within 1.5x of the small run plus the 8x larger output."""
    import tracemalloc

    import cgpyro.systems as systems

    monkeypatch.setattr(systems, "_PARTICLE_BLOCK", 1 << 14)

    def peak(n_particles, n_sequences):
        system = ParticleSystem(n_particles=n_particles)
        system.simulate_binned(1, 1, seed=0)  # warm the kernel caches outside the trace
        tracemalloc.start()
        try:
            system.simulate_binned(n_sequences, 3, seed=0, chunk_size=2, n_workers=1)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small = peak(1 << 14, 2)
    output = 16 * 4 * 25 * 8  # the counts of 16 sequences
    assert peak(1 << 17, 2) < 1.5 * small, (peak(1 << 17, 2), small)
    assert peak(1 << 14, 16) < 1.5 * small + output
