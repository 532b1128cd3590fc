"""Forecasts through Predictive (Algorithm 1)."""

import numpy as np
import pytest
import torch

from cgpyro.inference import SVIInference
from cgpyro.predict import forecast, sample_positions
from tests.test_inference import B, linear_data, linear_model


@pytest.fixture(scope="module")
def fitted():
    counts = linear_data(n_seq=6, n_times=6)
    model = linear_model(conserve_mass=True)
    inference = SVIInference(model, steps=300, progress=False).fit(counts)
    return model, inference, counts


@pytest.mark.parametrize("horizon", [0, 1, 7])
def test_forecast_shapes_and_bands(fitted, horizon):
    model, inference, counts = fitted
    f = forecast(model, inference.guide, counts, horizon, num_samples=50, keep_samples=True)
    n_seq, n_times, _ = counts.shape
    assert f.mean.shape == f.lower.shape == f.upper.shape == (n_seq, n_times + horizon, B)
    assert f.mass.shape == (n_seq, n_times + horizon)
    assert f.samples_x.shape == (50, n_seq, n_times + horizon, B)
    assert (f.lower <= f.upper).all() and np.isfinite(f.mean).all()
    # reconstructed FG fractions are counts / N: they sum to 1 exactly in every draw
    assert np.allclose(f.samples_fractions.sum(-1), 1.0)


def test_forecast_mass_stays_within_tolerance(fitted):
    """A mass-conserving drift keeps E[Σ X] at the inferred mass; MC error of 400 draws."""
    model, inference, counts = fitted
    f = forecast(model, inference.guide, counts, 20, num_samples=400)
    assert np.abs(f.mass - 1).max() < 2e-3


def test_forecast_tracks_the_true_linear_law(fitted):
    model, inference, counts = fitted
    from tests.test_inference import K

    f = forecast(model, inference.guide, counts, 5, num_samples=200)
    x = counts[:, -1].numpy() / counts[:, -1].sum(-1, keepdims=True).numpy()
    for _ in range(5):
        x = x @ K.T
    assert np.abs(f.mean[:, -1] - x).sum(-1).max() < 0.02


def test_same_seed_same_forecast(fitted):
    model, inference, counts = fitted
    a = forecast(model, inference.guide, counts, 3, num_samples=20, seed=5)
    b = forecast(model, inference.guide, counts, 3, num_samples=20, seed=5)
    c = forecast(model, inference.guide, counts, 3, num_samples=20, seed=6)
    assert np.array_equal(a.mean, b.mean) and not np.array_equal(a.mean, c.mean)


def test_bad_horizon_is_refused(fitted):
    model, inference, counts = fitted
    with pytest.raises(ValueError, match="horizon must be a non-negative integer"):
        forecast(model, inference.guide, counts, -1)


def test_positions_are_uniform_within_bins():
    edges = np.linspace(-1, 1, 5)
    pos = sample_positions([1000, 0, 3000, 1], edges, seed=0)
    assert pos.shape == (4001,)
    hist, _ = np.histogram(pos, edges)
    assert hist.tolist() == [1000, 0, 3000, 1]
    first = pos[:1000]
    assert abs(first.mean() - (-0.75)) < 0.02  # uniform on [-1, -0.5]: mean -0.75, se 0.005


@pytest.fixture(scope="module")
def long_run():
    """100 snapshots: a rollout of θ drawn from the prior (|W| ~ 10) overflows on these."""
    from cgpyro.specs import load_guide, load_model
    from cgpyro.systems import simulate_dataset

    data, _ = simulate_dataset(n_sequences=2, n_steps=99, n_particles=20_000, n_bins=25, seed=0)
    model = load_model("particles_best", n_bins=25)
    inference = load_guide("lognormal").inference(model, steps=30, progress=False).fit(data)
    return model, inference, data


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forecast_of_long_sequences_never_rolls_out_the_prior(long_run, seed):
    model, inference, data = long_run
    f = forecast(model, inference.guide, data, 100, num_samples=20, seed=seed)
    assert f.mean.shape == (2, 200, 25) and np.isfinite(f.mean).all()
    assert np.isfinite(f.lower).all() and np.isfinite(f.upper).all()


def test_users_own_predictive_survives_its_prior_probe(long_run):
    """Predictive guesses the plate nesting from a prior run: the clamped mean keeps it finite."""
    import torch
    from pyro.infer import Predictive

    model, inference, data = long_run
    counts = torch.as_tensor(data.counts, dtype=torch.float64)
    out = Predictive(model, guide=inference.guide, num_samples=5, parallel=True,
                     return_sites=["X", "X_forecast"])(counts, forecast=100,
                                                       resample_observed=True)
    assert out["X_forecast"].shape[-2:] == (100, 25)
    assert torch.isfinite(out["X_forecast"]).all()


def test_epistemic_bands_widen_with_fewer_training_sequences():
    """θ drawn from the empirical-Bayes posterior: the forecast spread of one training sequence
    exceeds that of 32 (the posterior of the jumps narrows like 1/sqrt(n))."""
    from cgpyro.specs import load_model
    from cgpyro.systems import simulate_dataset

    data, _ = simulate_dataset(n_sequences=33, n_steps=9, n_particles=20_000, n_bins=10, seed=0)
    counts = data.counts
    spread = {}
    for n in (1, 32):
        model = load_model("physics", n_bins=10)
        inference = SVIInference(model, steps=30, progress=False).fit(counts[:n])
        held = {k: v.clone() for k, v in inference.guide.theta.held.items()}
        f = forecast(model, inference.guide, counts[:n], 10, num_samples=100, keep_samples=True,
                     epistemic=True)
        assert not model.fixed  # the draws condition the model's sites, for this call only
        assert inference.guide.theta.held.keys() == held.keys()
        assert all(torch.equal(inference.guide.theta.held[k], held[k]) for k in held)
        plain = forecast(model, inference.guide, counts[:n], 10, num_samples=100,
                         keep_samples=True, epistemic=False)
        default = forecast(model, inference.guide, counts[:n], 10, num_samples=100,
                           keep_samples=True)  # epistemic whenever the drift has a posterior
        assert np.array_equal(default.samples_x, f.samples_x)
        spread[n] = (f.samples_x[:, :, -1].std(0).mean(), plain.samples_x[:, :, -1].std(0).mean())
    assert spread[1][0] > 1.5 * spread[1][1]  # θ uncertainty dominates with one sequence
    assert spread[1][0] > 1.5 * spread[32][0]


def test_epistemic_needs_a_flux_drift(fitted):
    model, inference, counts = fitted
    with pytest.raises(ValueError, match="epistemic=True needs a drift"):
        forecast(model, inference.guide, counts, 2, epistemic=True)


def test_bands_without_rollout_noise_are_p_cf_around_the_noise_free_continuation(fitted):
    """band_noise=False: the forecast fractions vary as the law of total variance says,
    Var[m/N] = Var[X] + E[X(1 - X)] / N (multinomial p_cf around the noise-free X; 4,000 draws,
    the variance estimate's relative std ~2 %: 10 % tolerance); with the rollout noise the same
    step varies more."""
    model, inference, counts = fitted
    kw = dict(num_samples=4000, keep_samples=True, seed=1)
    quiet = forecast(model, inference.guide, counts, 6, band_noise=False, **kw)
    noisy = forecast(model, inference.guide, counts, 6, band_noise=True, **kw)
    assert np.array_equal(quiet.mean, noisy.mean)  # only the bands differ
    x, frac = quiet.samples_x[:, :, -1], quiet.samples_fractions[:, :, -1]
    expected = x.var(0) + (x * (1 - x)).mean(0) / quiet.totals[:, None]
    assert np.abs(frac.var(0) / expected - 1).max() < 0.1
    assert noisy.samples_fractions[:, :, -1].var(0).mean() > 1.2 * frac.var(0).mean()
    past = slice(0, counts.shape[1])  # the observed steps are the same draws either way
    assert np.array_equal(quiet.samples_fractions[:, :, past], noisy.samples_fractions[:, :, past])
    with pytest.raises(ValueError, match="needs transition_noise=False"):
        forecast(model, inference.guide, counts, 2, band_noise=False, transition_noise=True)


def test_band_noise_defaults_to_the_transition_setting(fitted):
    model, inference, counts = fitted
    assert model.transition.forecast_noise  # Algorithm 1 unless the spec says otherwise
    default = forecast(model, inference.guide, counts, 3, num_samples=50, seed=2)
    noisy = forecast(model, inference.guide, counts, 3, num_samples=50, seed=2, band_noise=True)
    assert np.array_equal(default.lower, noisy.lower)
    model.transition.forecast_noise = False
    try:
        off = forecast(model, inference.guide, counts, 3, num_samples=50, seed=2)
        quiet = forecast(model, inference.guide, counts, 3, num_samples=50, seed=2,
                         band_noise=False)
    finally:
        model.transition.forecast_noise = True
    assert np.array_equal(off.lower, quiet.lower) and not np.array_equal(off.lower, noisy.lower)


def test_intervals_at_every_level_are_nested(fitted):
    model, inference, counts = fitted
    f = forecast(model, inference.guide, counts, 4, num_samples=100)
    (l50, u50), (l80, u80), (l95, u95) = (f.interval(x) for x in (0.5, 0.8, 0.95))
    assert np.array_equal(l95, f.lower) and np.array_equal(u95, f.upper)
    assert (l95 <= l80).all() and (l80 <= l50).all() and (u50 <= u80).all() and (u80 <= u95).all()
    assert (u50 - l50).mean() < (u95 - l95).mean()
    with pytest.raises(ValueError, match="level must be one of"):
        f.interval(0.9)


@pytest.mark.parametrize("vectorized", [True, False])
def test_posterior_samples_have_one_layout_for_both_model_forms(vectorized):
    """Per-step sites of the Markov form are stacked: the same keys and shapes either way."""
    from cgpyro.model import CGModel
    from cgpyro.predict import posterior_samples
    from cgpyro.transitions import Drift, GaussianTransition
    from cgpyro.virtual import VirtualObservable, mass_conservation

    counts = linear_data(n_seq=3, n_times=4)
    model = CGModel(B, GaussianTransition(Drift(B, hidden=(), linear_skip=True)),
                    virtual_observables=[VirtualObservable("mass", mass_conservation)],
                    vectorized=vectorized)
    guide = SVIInference(model, steps=2, progress=False).fit(counts).guide
    out = posterior_samples(model, guide, counts, 7, forecast=2, seed=3, log_likelihood=True)
    theta = set(guide.theta_map()) - set(model.fixed)
    assert set(out) == {"X", "counts", "X_forecast", "counts_forecast", "log_likelihood"} | theta
    assert out["X"].shape == out["counts"].shape == (7, 3, 4, B)
    assert out["X_forecast"].shape == out["counts_forecast"].shape == (7, 3, 2, B)
    assert out["log_likelihood"].shape == (7, 3, 4)
    assert (out["counts"].sum(-1) == counts.sum(-1)).all()  # resampled, N kept
    assert not torch.equal(out["counts"][0], counts)
    again = posterior_samples(model, guide, counts, 7, forecast=2, seed=3)
    assert "log_likelihood" not in again
    assert all(torch.equal(again[k], out[k]) for k in again)


def test_forecast_of_a_law_with_two_memory_lags_follows_it():
    """A model with ``memory_lags=2`` fitted to data of such a law (tests.test_transitions):
    its held law has the second lag; the forecast (θ at its held value, no noise), normalised,
    tracks the true paths of the held-out part within 9 % of their change (measured 6.1 %; 6.6 %
    with one lag: the second lag is small here), and it is the law rolled out with its history."""
    from cgpyro.model import CGModel
    from cgpyro.transitions import FluxDrift, GaussianTransition
    from tests.test_transitions import B_SYN, third_order_counts

    counts = third_order_counts(6, T=16)
    drift = FluxDrift(B_SYN, radius=3, correction_radius=0, memory="auto", memory_lags=2)
    model = CGModel(B_SYN, GaussianTransition(drift, sigma_r_multinomial=4.0,
                                              forecast_noise=False))
    inference = SVIInference(model, steps=300, progress=False).fit(counts[:, :10])
    held = inference.guide.theta.held
    assert held["transition.drift.memory2"].abs().max() > 0.05
    f = forecast(model, inference.guide, counts[:, :10], 6, num_samples=20, epistemic=False)
    truth = (counts / counts.sum(-1, keepdim=True)).numpy()
    mean = f.mean / f.mean.sum(-1, keepdims=True)  # no mass constraint here: X's scale is free
    err = np.abs(mean[:, 10:] - truth[:, 10:]).sum(-1).mean()
    change = np.abs(truth[:, 10:] - truth[:, 9:10]).sum(-1).mean()
    assert np.isfinite(f.mean).all() and err < 0.09 * change, (err, change)  # measured 0.061
    # the law is linear: the mean continuation is the law rolled out from the mean states,
    # each step seeing X_t, X_{t-1}, X_{t-2} (a wrong history order would not match)
    hist = [torch.as_tensor(f.mean[:, t]) for t in (9, 8, 7)]
    for t in range(10, 16):
        hist = [model.transition_mean(hist[0], held, None, tuple(hist[1:])), *hist[:2]]
        assert np.allclose(f.mean[:, t], hist[0].numpy(), rtol=1e-9, atol=1e-12), t
