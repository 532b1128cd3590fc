"""Dataset specs in data/."""

import numpy as np
import pytest

from cgpyro.datasets import load_dataset_spec, simulate_spec
from cgpyro.specs import SpecError


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
