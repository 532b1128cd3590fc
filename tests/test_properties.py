"""Property tests (hypothesis): data validation and the FG simulator's invariants.

- ``validate``/``Dataset``/``as_counts`` on arbitrary arrays (any dtype, shape, values) either
  accept and normalize, or raise ``DataError`` with one line naming the array; nothing else.
- Valid datasets round-trip through ``.npz`` and ``.nc`` exactly.
- The simulator conserves particles in every snapshot, has the documented shapes, and the same
  seed gives the same data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cgpyro.data import DataError, Dataset, load, save, validate
from cgpyro.inference import as_counts
from cgpyro.systems import simulate_dataset

# CGPYRO_FUZZ_SCALE=50 runs 50x the examples with fresh random draws (a longer fuzz run);
# the default is a fixed, fast sample.
SCALE = int(os.environ.get("CGPYRO_FUZZ_SCALE", "1"))
FAST = settings(max_examples=60 * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=12 * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=[HealthCheck.too_slow])

DTYPES = st.sampled_from([
    np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.bool_, np.complex128, "U3", "S3", "M8[s]", "m8[s]",
])


@st.composite
def any_arrays(draw, max_dims=4):
    """Arrays of any dtype and shape (including empty and 0-d), with extreme values."""
    dtype = np.dtype(draw(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=4))
    elements = None
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def nearly_valid_counts(draw):
    """Valid counts, often damaged in one place: values near the rules' boundaries."""
    n_seq, n_times, n_bins = (draw(st.integers(1, 3)) for _ in range(3))
    totals = draw(st.lists(st.integers(0, 5) | st.sampled_from([1, 10**9, 2**62]),
                           min_size=n_seq, max_size=n_seq))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    counts = np.stack([
        np.stack([rng.multinomial(total, np.full(n_bins, 1 / n_bins)) for _ in range(n_times)])
        for total in totals
    ]).astype(np.int64)
    damage = draw(st.sampled_from(["none", "float", "value", "dtype"]))
    if damage == "float":
        counts = counts.astype(np.float64)
    elif damage == "value":
        index = tuple(draw(st.integers(0, s - 1)) for s in counts.shape)
        counts = counts.astype(np.float64)
        counts[index] = draw(st.sampled_from([-1.0, 0.5, np.nan, np.inf, -np.inf, 2.0**63,
                                              1e300, 0.0, 3.0]))
    elif damage == "dtype":
        counts = counts.astype(draw(st.sampled_from([np.uint64, np.int32, np.float32])))
    return counts


def _check_outcome(counts, edges=None, dt=None):
    """``validate`` either normalizes or raises one ``DataError`` line naming the array."""
    try:
        c, e, d = validate(counts, edges, dt)
    except DataError as err:
        text = str(err)
        assert "\n" not in text and text.split(":")[0] in ("counts", "bin_edges", "dt"), text
        return None
    assert c.dtype == np.int64 and c.ndim == 3 and 0 not in c.shape
    assert (c >= 0).all()
    totals = c.sum(-1)
    assert (totals == totals[:, :1]).all() and (totals[:, 0] > 0).all()
    assert e.dtype == np.float64 and e.shape == (c.shape[2] + 1,) and (np.diff(e) > 0).all()
    assert isinstance(d, float) and np.isfinite(d) and d > 0
    return c


@FAST
@given(any_arrays(), st.one_of(st.none(), any_arrays(max_dims=2)),
       st.one_of(st.none(), any_arrays(max_dims=1), st.floats(), st.text(max_size=3)))
def test_validate_accepts_or_refuses_with_one_line(counts, edges, dt):
    _check_outcome(counts, edges, dt)


@FAST
@given(nearly_valid_counts())
def test_nearly_valid_counts(counts):
    out = _check_outcome(counts)
    if out is not None:
        np.testing.assert_array_equal(out, counts.astype(np.int64))


@FAST
@given(any_arrays())
def test_as_counts_refuses_what_no_model_can_use(counts):
    try:
        out = as_counts(counts)
    except DataError as err:
        assert "\n" not in str(err) and str(err).startswith("counts")
        return
    assert out.dim() == 3 and bool((out >= 0).all()) and bool((out[:, 0].sum(-1) > 0).all())


@st.composite
def valid_datasets(draw):
    n_seq, n_times, n_bins = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(
        st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    totals = draw(st.lists(st.sampled_from([1, 2, 7, 1000, 10**9, 2**53]), min_size=n_seq,
                           max_size=n_seq))
    counts = np.stack([
        np.stack([rng.multinomial(total, rng.dirichlet(np.ones(n_bins)))
                  for _ in range(n_times)]) for total in totals])
    edges = np.cumsum(rng.uniform(1e-6, 10.0, n_bins + 1)) - draw(st.floats(-1e6, 1e6))
    dt = draw(st.floats(1e-9, 1e9))
    return Dataset(counts, bin_edges=edges, dt=dt)


@SLOW
@given(valid_datasets(), st.sampled_from([".npz", ".nc"]))
def test_valid_datasets_round_trip(dataset, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = save(dataset, Path(tmp) / f"d{suffix}")
        back = load(path)
        assert [p.name for p in Path(tmp).iterdir()] == [f"d{suffix}"]
    assert back.counts.dtype == np.int64
    np.testing.assert_array_equal(back.counts, dataset.counts)
    np.testing.assert_array_equal(back.bin_edges, dataset.bin_edges)
    assert back.dt == dataset.dt


SIMULATIONS = st.tuples(st.integers(1, 3), st.integers(0, 4), st.integers(1, 300),
                        st.sampled_from([1, 2, 5, 8, 10, 40]), st.integers(0, 2**32 - 1))


@SLOW
@given(SIMULATIONS)
def test_simulator_conserves_particles_and_is_seeded(args):
    n_seq, n_steps, n_particles, n_bins, seed = args
    data, sim = simulate_dataset(n_sequences=n_seq, n_steps=n_steps, n_particles=n_particles,
                                 n_bins=n_bins, seed=seed)
    assert data.counts.shape == (n_seq, n_steps + 1, n_bins)
    assert data.counts.dtype == np.int64 and (data.counts >= 0).all()
    assert (data.counts.sum(-1) == n_particles).all()  # every snapshot, every sequence
    assert data.bin_edges.shape == (n_bins + 1,) and data.dt > 0
    again, _ = simulate_dataset(n_sequences=n_seq, n_steps=n_steps, n_particles=n_particles,
                                n_bins=n_bins, seed=seed)
    np.testing.assert_array_equal(data.counts, again.counts)


def test_different_seeds_give_different_data():
    runs = [simulate_dataset(n_sequences=2, n_steps=3, n_particles=500, n_bins=10, seed=s)[0]
            for s in (0, 1, 2)]
    assert not np.array_equal(runs[0].counts, runs[1].counts)
    assert not np.array_equal(runs[1].counts, runs[2].counts)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_particles": 0}, "n_particles: expected a positive integer"),
    ({"n_bins": 0}, "n_bins: expected an integer between 1 and n_sites"),
    ({"seed": -1}, "seed: expected a non-negative integer"),
    ({"n_steps": -1}, "n_steps: expected a non-negative integer"),
])
def test_simulator_refuses_bad_arguments(kwargs, message):
    args = {"n_sequences": 1, "n_steps": 1, "n_particles": 10, "n_bins": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        simulate_dataset(**args)
