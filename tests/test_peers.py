"""CG peers: exact recovery of known maps from synthetic data, rollout shape and divergence."""

import numpy as np
import pytest

from cgpyro.peers import LinearMap, LocalStencil, QuadraticStencil, forecast_error


def _trajectories(step, x0: np.ndarray, n_times: int) -> np.ndarray:
    out = [x0]
    for _ in range(n_times - 1):
        out.append(step(out[-1]))
    return np.stack(out, 1)


def _periodic_apply(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = (len(coef) - 1) // 2
    return sum(c * np.roll(x, -k, axis=-1) for c, k in zip(coef, range(-r, r + 1), strict=True))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_map_recovers_a_known_map(bias):
    rng = np.random.default_rng(1)
    n_bins = 6
    A = np.eye(n_bins) + 0.1 * rng.normal(size=(n_bins, n_bins))
    b = 0.01 * rng.normal(size=n_bins) if bias else np.zeros(n_bins)
    data = _trajectories(lambda x: x @ A.T + b, rng.random((12, n_bins)), 3)
    peer = LinearMap(bias=bias).fit(data)
    np.testing.assert_allclose(peer.A, A, atol=1e-10)
    np.testing.assert_allclose(peer.b, b, atol=1e-10)
    roll = peer.rollout(data[:, 0], 2)
    assert roll.shape == (12, 3, n_bins)
    np.testing.assert_allclose(roll, data, atol=1e-10)


def test_local_stencil_recovers_a_known_stencil():
    rng = np.random.default_rng(2)
    coef = np.array([0.05, 0.2, 0.5, 0.15, 0.1])
    data = _trajectories(lambda x: _periodic_apply(coef, x), rng.random((4, 12)), 4)
    peer = LocalStencil(radius=2).fit(data)
    np.testing.assert_allclose(peer.coef, coef, atol=1e-12)
    np.testing.assert_allclose(peer.rollout(data[:, 0], 3), data, atol=1e-12)


def test_quadratic_stencil_recovers_a_known_local_polynomial():
    # A discrete Burgers-like update: upwind flux u(1 - u) on the scaled field u = n_bins x.
    rng = np.random.default_rng(3)
    n_bins = 10

    def step(x):
        u = x * n_bins
        flux = 0.1 * u * (1 - u)
        return (u - (flux - np.roll(flux, 1, -1)) + 0.05 * (np.roll(u, 1, -1) - 2 * u
                                                          + np.roll(u, -1, -1))) / n_bins

    data = _trajectories(step, rng.uniform(0.2, 0.8, (6, n_bins)) / n_bins, 3)
    peer = QuadraticStencil(radius=1).fit(data)
    np.testing.assert_allclose(peer.rollout(data[:, 0], 2), data, rtol=1e-9, atol=1e-12)
    # coefficients: const, (u_-1, u_0, u_1), products (-1-1, -1 0, -1 1, 0 0, 0 1, 1 1)
    expected = [0, 0.15, 1 - 0.1 - 0.1, 0.05, -0.1, 0, 0, 0.1, 0, 0]
    np.testing.assert_allclose(peer.coef, expected, atol=1e-9)


def test_diverging_rollout_is_inf_error_not_a_crash():
    peer = LinearMap().fit(np.ones((2, 3, 3)))
    peer.A = np.full((3, 3), 1e200)
    roll = peer.rollout(np.ones((2, 3)), 4)
    assert np.isinf(roll[:, 2:]).all()
    err = forecast_error(roll, np.zeros_like(roll))
    assert err[0] == 3.0 and np.isinf(err[2:]).all()


def test_validation_names_the_rule():
    with pytest.raises(ValueError, match=r"fractions: expected shape \(n_sequences, n_times >= 2"):
        LinearMap().fit(np.zeros((3, 1, 4)))
    with pytest.raises(ValueError, match="call fit"):
        LocalStencil().rollout(np.zeros((1, 5)), 2)
    with pytest.raises(ValueError, match="2 \\* radius \\+ 1 <= n_bins"):
        QuadraticStencil(radius=3).fit(np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match=r"x0: expected real numbers of shape \(n_sequences, 4\)"):
        LinearMap().fit(np.ones((2, 3, 4))).rollout(np.zeros((2, 5)), 1)
