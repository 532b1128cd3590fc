"""Dataset specs in data/."""

import numpy as np
import pytest

from cgpyro.datasets import load_dataset_spec, simulate_spec
from cgpyro.inference import SVIInference
from cgpyro.specs import SpecError, load_model, specs_dir
from cgpyro.systems import simulate_dataset


def test_shipped_specs_load():
    paper = load_dataset_spec("particles_paper")
    assert paper.sampling == {"n_sequences": 64, "n_steps": 40, "n_bins": 25, "seed": 0}
    assert paper.system_params["n_particles"] == 250_000


def test_small_spec_simulates_its_shapes():
    data, sim = simulate_spec("particles_small")
    assert data.counts.shape == (8, 21, 10)
    assert np.all(data.counts.sum(-1) == 20_000)


@pytest.mark.parametrize("text, match", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ("[sampling]\nn_bins = 0\n", r"\[sampling\] n_bins: expected a positive integer"),
    ("[system_params]\np_left = 0.9\np_right = 0.9\n", r"\[system_params\]"),
    ("[system_params]\nwidth = 3\n", "unknown key 'width'"),
    ("system = 'fluid'\n", "expected 'particles'"),
    ("x = [\n", "invalid TOML at end of document"),
])
def test_bad_specs_are_refused(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=match):
        load_dataset_spec(path)


MATRIX_CELLS = sorted(p.stem for p in (specs_dir() / "data").glob("*.toml")
                      if p.stem.startswith(("matrix_", "offmatrix_")))


def test_the_matrix_has_its_cells():
    assert len(MATRIX_CELLS) >= 14, MATRIX_CELLS


@pytest.mark.parametrize("name", MATRIX_CELLS)
def test_matrix_cell_simulates_and_trains_a_few_steps(name):
    """Each robustness-matrix cell (benchmarks/matrix.py): its spec loads, a small copy of its
    system (its bins, Δt and transport; 2 sequences x 3 snapshots of 2,000 particles) simulates,
    and the physics model trains 5 steps on it to a finite loss."""
    spec = load_dataset_spec(name)
    bins = spec.sampling["n_bins"]
    data, _ = simulate_dataset(n_sequences=2, n_steps=2, n_bins=bins, seed=0,
                               **{**spec.system_params, "n_particles": 2000})
    assert data.counts.shape == (2, 3, bins)
    assert np.all(data.counts.sum(-1) == 2000)
    model = load_model("physics", n_bins=bins)
    inference = SVIInference(model, steps=5, progress=False).fit(data)
    assert inference.step == 5 and np.isfinite(inference.loss_history).all()
