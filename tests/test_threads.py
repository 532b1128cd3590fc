"""Torch thread count picked from the problem size, restored for the caller."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cgpyro._threads import WORK_PER_THREAD, threads_for, torch_threads, with_auto_threads


@pytest.fixture
def two_threads(monkeypatch):
    """The caller runs with 2 threads (conftest sets 1 for the suite) on what looks like an
    8-core machine, whatever this one has; restored afterwards."""
    monkeypatch.setattr("cgpyro._threads._available_cores", lambda: 8)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threads_for_small_and_large_problems():
    assert threads_for(64 * 10 * 25) == 1  # the paper's data
    assert threads_for(0) == 1
    assert threads_for(WORK_PER_THREAD - 1, limit=8) == 1
    assert threads_for(3 * WORK_PER_THREAD, limit=8) == 3
    assert threads_for(100 * WORK_PER_THREAD, limit=4) == 4
    for bad in (-1, 2.5, True, None):
        with pytest.raises(ValueError, match="work"):
            threads_for(bad)
    with pytest.raises(ValueError, match="limit"):
        threads_for(10, limit=0)


def test_torch_threads_restores_and_never_raises_the_callers_count(two_threads):
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2  # restored on errors too
    torch.set_num_threads(1)
    with torch_threads(4) as n:  # a user who chose one thread keeps one
        assert n == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="positive integer"):
        with torch_threads(0):
            pass


def test_decorator_sizes_by_data_and_samples(two_threads):
    seen = []

    @with_auto_threads
    def run(data, horizon=0, num_samples=1):
        seen.append(torch.get_num_threads())
        return "ok"

    assert run(np.zeros((64, 10, 25))) == "ok"
    # 64 x (10 + 31) x 25 x 200 draws = 13 M numbers per step: worth both cores
    run(np.zeros((64, 10, 25)), horizon=31, num_samples=200)
    run(torch.zeros(4, 3, 2), num_samples=2)
    run(data=[[1, 2]], num_samples=None)  # sized through np.shape
    assert seen == [1, 2, 1, 1]
    assert torch.get_num_threads() == 2
    assert run.__name__ == "run"


def test_decorator_counts_particles_and_minibatches(two_threads):
    class Inference:
        def __init__(self, num_particles=1, batch_size=None):
            self.num_particles, self.batch_size = num_particles, batch_size

        @with_auto_threads
        def fit(self, data):
            return torch.get_num_threads()

    big = np.zeros((1024, 41, 25))  # 1.05 M numbers per step and particle
    assert Inference().fit(big) == 1
    assert Inference(num_particles=4).fit(big) == 2
    assert Inference(num_particles=4, batch_size=64).fit(big) == 1  # 64 of 1024 sequences a step
    assert Inference(num_particles=4, batch_size=4096).fit(big) == 2  # batch > data: all of it


def test_decorator_leaves_bad_calls_to_the_function(two_threads):
    @with_auto_threads
    def run(data, horizon=0):
        if not isinstance(horizon, int):
            raise ValueError(f"horizon must be an integer, got {horizon!r}")
        return torch.get_num_threads()

    with pytest.raises(ValueError, match="horizon must be an integer"):
        run(np.zeros((2, 3, 4)), horizon="x")
    with pytest.raises(TypeError):
        run()  # missing argument: Python's own error, raised by the function call
    assert torch.get_num_threads() == 2


def test_fit_and_forecast_run_single_threaded_on_small_data(two_threads):
    from cgpyro.inference import SVIInference
    from cgpyro.model import CGModel
    from cgpyro.predict import forecast
    from cgpyro.transitions import Drift, GaussianTransition

    counts = torch.tensor(np.random.default_rng(0).multinomial(1000, [0.25] * 4, size=(3, 4)),
                          dtype=torch.float64)
    model = CGModel(4, GaussianTransition(Drift(4, hidden=(), linear_skip=True)))
    seen = []
    inference = SVIInference(model, steps=2, progress=False,
                             callbacks=[lambda *a: seen.append(torch.get_num_threads())])
    inference.fit(counts)
    assert seen == [1, 1] and torch.get_num_threads() == 2
    forecast(model, inference.guide, counts, horizon=1, num_samples=2)
    assert torch.get_num_threads() == 2
