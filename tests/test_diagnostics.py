"""ArviZ export: dims and coords of every group, pointwise log-likelihood, loo/compare, NetCDF."""

import math
import warnings

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pytest

from cgpyro.diagnostics import (
    describe_model,
    load_inference_data,
    save_inference_data,
    summary_table,
    to_inference_data,
)
from cgpyro.inference import SVIInference
from cgpyro.model import CGModel
from cgpyro.systems import simulate_dataset
from cgpyro.transitions import Drift, GaussianTransition
from cgpyro.virtual import VirtualObservable, mass_conservation

N_SEQ, N_TIMES, N_BINS, HORIZON, DRAWS = 3, 4, 5, 3, 40


def make_model(hidden=(8,), vectorized=True):
    return CGModel(N_BINS, GaussianTransition(Drift(N_BINS, hidden=hidden, linear_skip=True)),
                   virtual_observables=[VirtualObservable("mass", mass_conservation)],
                   vectorized=vectorized)


@pytest.fixture(scope="module")
def fitted():
    """Two fits of the same data; InferenceData is built right after each (shared param store)."""
    data, _ = simulate_dataset(N_SEQ, N_TIMES - 1, 2000, N_BINS, seed=0)
    out = {"data": data}
    for name, hidden in (("a", (8,)), ("b", (4,))):
        model = make_model(hidden)
        inf = SVIInference(model, steps=50, progress=False).fit(data)
        out[name] = to_inference_data(model, inf.guide, data, num_samples=DRAWS,
                                      horizon=HORIZON, seed=1)
        out[f"model_{name}"] = model
    return out


def test_groups_dims_and_coords(fitted):
    idata, data = fitted["a"], fitted["data"]
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood",
                                   "observed_data"}
    state = ("chain", "draw", "sequence", "time", "bin")
    sizes = (1, DRAWS, N_SEQ, N_TIMES, N_BINS)
    assert idata.posterior["X"].dims == state and idata.posterior["X"].shape == sizes
    assert idata.posterior["mass"].dims == state[:-1]
    pp = idata.posterior_predictive
    assert pp["counts"].dims == state and pp["counts"].shape == sizes
    fc = ("chain", "draw", "sequence", "forecast_time", "bin")
    for name in ("X_forecast", "counts_forecast"):
        assert pp[name].dims == fc and pp[name].shape == (1, DRAWS, N_SEQ, HORIZON, N_BINS)
    assert idata.log_likelihood["counts"].dims == state[:-1]
    assert idata.log_likelihood["counts"].shape == sizes[:-1]
    assert idata.observed_data["counts"].dims == ("sequence", "time", "bin")
    np.testing.assert_array_equal(idata.observed_data["counts"].values, data.counts)

    np.testing.assert_allclose(idata.posterior["time"], np.arange(N_TIMES) * data.dt)
    np.testing.assert_allclose(pp["forecast_time"], (N_TIMES + np.arange(HORIZON)) * data.dt)
    centres = 0.5 * (data.bin_edges[1:] + data.bin_edges[:-1])
    np.testing.assert_allclose(idata.posterior["bin"], centres, atol=1e-12)
    np.testing.assert_array_equal(idata.posterior["sequence"], np.arange(N_SEQ))
    assert idata.posterior["draw"].size == DRAWS and idata.posterior["chain"].size == 1


def test_reconstructed_counts_are_multinomial_draws(fitted):
    idata, data = fitted["a"], fitted["data"]
    pp = idata.posterior_predictive
    assert pp["counts"].dtype == np.int64 and (pp["counts"] >= 0).all()
    totals = data.totals[:, None]
    np.testing.assert_array_equal(pp["counts"].sum("bin").values[0], np.broadcast_to(
        totals, (DRAWS, N_SEQ, N_TIMES)))
    np.testing.assert_array_equal(pp["counts_forecast"].sum("bin").values[0], np.broadcast_to(
        totals, (DRAWS, N_SEQ, HORIZON)))
    np.testing.assert_allclose(idata.posterior["mass"], idata.posterior["X"].sum("bin"))


def test_log_likelihood_matches_eq17_for_one_draw(fitted):
    idata, data = fitted["a"], fitted["data"]
    ll = idata.log_likelihood["counts"].values
    assert np.isfinite(ll).all()
    draw = 7
    x = idata.posterior["X"].values[0, draw]
    m = data.counts.astype(float)
    lgamma = np.vectorize(math.lgamma)
    direct = lgamma(m.sum(-1) + 1) - lgamma(m + 1).sum(-1) + (m * np.log(x)).sum(-1)
    np.testing.assert_allclose(ll[0, draw], direct, rtol=1e-10)


def test_summary_hdi_loo_and_compare(fitted):
    idata = fitted["a"]
    table = az.summary(idata, var_names=["X"], kind="stats")
    assert len(table) == N_SEQ * N_TIMES * N_BINS
    one = summary_table(idata, sequence=1)
    assert len(one) == N_TIMES * N_BINS + N_TIMES and {"mean", "sd"} <= set(one.columns)

    ax = az.plot_hdi(idata.posterior["time"].values,
                     idata.posterior["X"].isel(sequence=0, bin=2), smooth=False)
    plt.close(ax.figure)

    with warnings.catch_warnings():  # Pareto-k warnings: q(X) is sharp, eq. 17 is stiff
        warnings.simplefilter("ignore")
        loo = az.loo(idata, pointwise=True)
        cmp = az.compare({"a": idata, "b": fitted["b"]}, ic="loo")
    assert np.isfinite(loo.elpd_loo) and loo.loo_i.shape == (N_SEQ, N_TIMES)
    assert set(cmp.index) == {"a", "b"} and np.isfinite(cmp["elpd_loo"]).all()


def test_netcdf_round_trip(fitted, tmp_path):
    idata = fitted["a"]
    path = save_inference_data(idata, tmp_path / "sub" / "idata.nc")
    back = load_inference_data(path)
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        assert back[group].identical(idata[group]), group
    assert back.attrs["cgpyro_version"] == idata.attrs["cgpyro_version"]
    assert back.attrs["model"] == describe_model(fitted["model_a"])
    assert "Drift(hidden=(8,)" in back.attrs["model"]


def test_theta_and_unvectorized_model_plain_array():
    data, _ = simulate_dataset(2, 2, 500, 4, seed=3)
    model = CGModel(4, GaussianTransition(Drift(4, hidden=(), linear_skip=True)),
                    virtual_observables=[VirtualObservable("mass", mass_conservation)],
                    vectorized=False)
    inf = SVIInference(model, steps=3, progress=False).fit(data)
    idata = to_inference_data(model, inf.guide, data.counts, num_samples=5, include_theta=True)
    post = idata.posterior
    assert post["X"].shape == (1, 5, 2, 3, 4)
    assert "posterior_predictive" in idata.groups() and "forecast_time" not in post.dims
    np.testing.assert_allclose(post["time"], np.arange(3))  # no Dataset: dt = 1
    np.testing.assert_allclose(post["bin"], [-0.75, -0.25, 0.25, 0.75])
    weight = post["transition.drift.linear.weight"]
    assert weight.shape == (1, 5, 4, 4)
    theta = inf.guide.theta_map()["transition.drift.linear.weight"].numpy()
    np.testing.assert_allclose(weight.values[0, 3], theta)


@pytest.mark.parametrize("kwargs, match", [
    ({"horizon": -1}, "horizon"),
    ({"num_samples": 1}, "num_samples"),
    ({"bin_edges": np.linspace(0, 1, 3)}, "bin_edges"),
    ({"dt": 0.0}, "dt"),
])
def test_bad_arguments(kwargs, match):
    counts = np.ones((2, 3, 5), dtype=np.int64)
    with pytest.raises(ValueError, match=match):
        to_inference_data(make_model(), None, counts, **kwargs)


def test_bad_data_and_path(tmp_path):
    with pytest.raises(ValueError, match="bins"):
        to_inference_data(make_model(), None, np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\.nc"):
        save_inference_data(az.InferenceData(), tmp_path / "x.npz")
    with pytest.raises(ValueError, match="no inference data"):
        load_inference_data(tmp_path / "missing.nc")


@pytest.mark.parametrize("vectorized", [True, False])
def test_log_likelihood_is_the_multinomial_log_pmf_of_every_draw(vectorized):
    """Both model layouts against scipy: eq. 17 is Multinomial(N, X / ΣX) plus N log ΣX."""
    from scipy.stats import multinomial

    data, _ = simulate_dataset(2, 2, 500, 4, seed=3)
    model = CGModel(4, GaussianTransition(Drift(4, hidden=(), linear_skip=True)),
                    virtual_observables=[VirtualObservable("mass", mass_conservation)],
                    vectorized=vectorized)
    inf = SVIInference(model, steps=3, progress=False).fit(data)
    idata = to_inference_data(model, inf.guide, data, num_samples=6, horizon=2)
    x = idata.posterior["X"].values[0]  # (draw, sequence, time, bin)
    mass = x.sum(-1)
    totals = data.counts.sum(-1)  # (sequence, time)
    expected = multinomial.logpmf(data.counts, totals, x / mass[..., None]) + totals * np.log(mass)
    ll = idata.log_likelihood["counts"].values[0]
    assert ll.shape == expected.shape == (6, 2, 3)
    np.testing.assert_allclose(ll, expected, rtol=0, atol=1e-8)
