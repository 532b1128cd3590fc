"""Plots: artists drawn, given axes used, input checks, and the files of reproduce_figures."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure

from cgpyro.plots import (
    empirical_coverage,
    plot_calibration,
    plot_density_heatmaps,
    plot_loss,
    plot_mass,
    plot_snapshots,
    reproduce_figures,
)
from cgpyro.predict import Forecast

N_SEQ, N_OBS, HORIZON, N_BINS, DRAWS = 2, 10, 30, 6, 60


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def make_forecast(horizon=HORIZON, keep_samples=True, seed=0):
    """A Forecast built from Dirichlet draws, no fitting; truth is one more draw."""
    rng = np.random.default_rng(seed)
    n_total = N_OBS + horizon
    alpha = 200 * rng.dirichlet(np.ones(N_BINS), size=(N_SEQ, n_total))
    gamma = rng.gamma(alpha, size=(DRAWS + 1, *alpha.shape))  # Dirichlet(alpha) draws
    draws = gamma / gamma.sum(-1, keepdims=True)
    samples, truth = draws[:-1], draws[-1]
    fc = Forecast(
        mean=samples.mean(0),
        lower=np.quantile(samples, 0.025, axis=0),
        upper=np.quantile(samples, 0.975, axis=0),
        mass=samples.sum(-1).mean(0) + 1e-3 * rng.standard_normal((N_SEQ, n_total)),
        n_observed=N_OBS,
        totals=np.full(N_SEQ, 1000.0),
        samples_x=samples if keep_samples else None,
        samples_fractions=samples if keep_samples else None,
    )
    return fc, truth


def test_density_heatmaps_new_and_given_axes():
    fc, truth = make_forecast()
    axes = plot_density_heatmaps(truth[0], fc.mean[0], N_OBS, dt=4.0)
    assert len(axes) == 2
    for ax in axes:
        assert len(ax.images) == 1
        (line,) = ax.lines  # the red divide
        assert line.get_color() == "red" and line.get_xdata()[0] == pytest.approx(4.0 * 9.5)
    assert axes[0].images[0].get_clim() == axes[1].images[0].get_clim()

    fig = Figure()
    given = fig.subplots(2, 1)
    out = plot_density_heatmaps(truth[0, :N_OBS], fc.mean[0], N_OBS, axes=given, colorbar=False)
    assert list(out) == list(given) and len(fig.axes) == 2  # no colorbar axes added


def test_density_heatmaps_unequal_bins_and_errors():
    fc, truth = make_forecast()
    edges = np.array([-1.0, -0.5, -0.2, 0.0, 0.1, 0.5, 1.0])
    axes = plot_density_heatmaps(truth[0], fc.mean[0], N_OBS, bin_edges=edges)
    assert isinstance(axes[1].collections[0], QuadMesh) and not axes[1].images
    with pytest.raises(ValueError, match="same number of bins"):
        plot_density_heatmaps(truth[0, :, :3], fc.mean[0], N_OBS)
    with pytest.raises(ValueError, match="bin_edges"):
        plot_density_heatmaps(truth[0], fc.mean[0], N_OBS, bin_edges=edges[:-1])
    with pytest.raises(ValueError, match="2 dimensions"):
        plot_density_heatmaps(truth, fc.mean[0], N_OBS)


def test_snapshots():
    fc, truth = make_forecast()
    axes = plot_snapshots(fc, truth, 1, [0, 5, 9])
    assert len(axes) == 3
    for ax in axes:
        assert len(ax.lines) == 2 and len(ax.collections) == 1  # mean, truth; 95 % band
    assert axes[0].get_title() == "inferred, t = 0 Δt"
    np.testing.assert_allclose(axes[1].lines[0].get_ydata(), fc.mean[1, 5])

    grid = plot_snapshots(fc, truth[1], 1, [15, 20, 25, 35])  # (time, bin) truth accepted
    assert len(grid) == 4 and grid[3].get_title() == "predicted, t = 35 Δt"
    assert grid[2].get_subplotspec().rowspan.start == 1  # 2 × 2 as in Fig. 3

    fig = Figure()
    given = fig.subplots(1, 2)
    out = plot_snapshots(fc, truth[:, :N_OBS], 0, [3, 20], axes=given)
    assert list(out) == list(given)
    assert len(out[1].lines) == 1  # no truth past its end


@pytest.mark.parametrize("times, sequence, match", [
    ([0, 40], 0, "times"), ([], 0, "at least one"), ([0], 5, "sequence"),
])
def test_snapshots_errors(times, sequence, match):
    fc, truth = make_forecast()
    with pytest.raises(ValueError, match=match):
        plot_snapshots(fc, truth, sequence, times)


def test_mass():
    fc, _ = make_forecast()
    ax = plot_mass(fc, sequence=1, dt=4.0)
    assert len(ax.lines) == 3  # mass, target 1, divide
    np.testing.assert_allclose(ax.lines[0].get_ydata(), fc.mass[1])
    assert ax.lines[1].get_ydata()[0] == 1.0
    fig = Figure()
    given = fig.subplots()
    assert plot_mass(fc, ax=given) is given
    assert len(given.lines) == 3 and len(given.collections) == 1  # mean + range over sequences
    no_horizon, _ = make_forecast(horizon=0)
    assert len(plot_mass(no_horizon).lines) == 2  # nothing predicted: no divide


def test_loss():
    history = [5e4, 1e3, -20.0, -100.0, -101.0]
    ax = plot_loss(history)
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_ydata(), history)
    assert ax.get_yscale() == "symlog"
    given = Figure().subplots()
    assert plot_loss(history, ax=given) is given
    for bad in ([], [1.0, float("nan")], np.ones((2, 2))):
        with pytest.raises(ValueError, match="loss_history"):
            plot_loss(bad)


def test_loss_marks_the_annealing_phase():
    history = np.r_[np.linspace(-1e8, -1e6, 850), np.linspace(1e5, 2e4, 1150)]
    ax = plot_loss(history, anneal_end=1000)
    (line,) = ax.lines
    (span,) = ax.patches  # the shaded annealing steps
    assert (span.get_x(), span.get_x() + span.get_width()) == (0.5, 1000.5)
    assert ax.get_ylabel() == "loss = −ELBO (nats)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["loss = −ELBO", "σ_c annealed (objective changes)"]
    assert not plot_loss(history, anneal_end=0).patches  # no annealing: nothing shaded
    clipped = plot_loss(history[:10], anneal_end=50).patches[0]  # ends with the history
    assert clipped.get_x() + clipped.get_width() == 10.5
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="anneal_end"):
            plot_loss(history, anneal_end=bad)


def test_empirical_coverage_is_nominal_for_calibrated_samples():
    rng = np.random.default_rng(1)
    samples, truth = rng.standard_normal((4000, 3000)), rng.standard_normal(3000)
    levels = np.array([0.5, 0.8, 0.95])
    np.testing.assert_allclose(empirical_coverage(samples, truth, levels), levels, atol=0.03)
    assert empirical_coverage(samples, np.full(3000, 1e3), levels).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="must match"):
        empirical_coverage(samples, truth[:10])
    with pytest.raises(ValueError, match="levels"):
        empirical_coverage(samples, truth, [0.5, 1.0])


def test_calibration():
    fc, truth = make_forecast()
    ax = plot_calibration(fc, truth)
    assert len(ax.lines) == 3  # ideal, inferred, predicted
    cov = ax.lines[2].get_ydata()
    assert np.all(np.diff(cov) >= 0) and cov[-1] > 0.8  # truth drawn like the samples
    given = Figure().subplots()
    assert plot_calibration(fc, truth[:, :N_OBS], levels=[0.5, 0.9], ax=given) is given
    assert len(given.lines) == 2  # truth ends with the inferred steps
    without, _ = make_forecast(keep_samples=False)
    with pytest.raises(ValueError, match="keep_samples"):
        plot_calibration(without, truth)
    with pytest.raises(ValueError, match="truth_fractions"):
        plot_calibration(fc, truth[:1])


def test_reproduce_figures(tmp_path):
    fc, truth = make_forecast()
    before = plt.get_fignums()
    paths = reproduce_figures(fc, truth, 0, 4.0, np.linspace(-1, 1, N_BINS + 1),
                              [3.0, 2.0, 1.0], tmp_path / "report", anneal_end=2)
    names = ["fig1_density.png", "fig2_inferred_snapshots.png", "fig3_predicted_snapshots.png",
             "fig4_mass.png", "loss.png", "calibration.png"]
    assert [p.name for p in paths] == names
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == before  # no pyplot figures left open


def test_reproduce_figures_short_forecast_without_samples(tmp_path):
    fc, truth = make_forecast(horizon=3, keep_samples=False)
    paths = reproduce_figures(fc, truth, 1, 1.0, None, None, tmp_path)
    # paper times 15-35 lie past the forecast: fig3 falls back to predicted steps 10-12
    assert [p.name for p in paths] == ["fig1_density.png", "fig2_inferred_snapshots.png",
                                       "fig3_predicted_snapshots.png", "fig4_mass.png"]
    with pytest.raises(ValueError, match="sequence"):
        reproduce_figures(fc, truth, 2, 1.0, None, None, tmp_path)
