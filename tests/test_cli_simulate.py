"""``cgpyro simulate --system exclusion`` end to end, and its one-line refusals."""

import numpy as np
import pytest

from cgpyro.cli import main
from cgpyro.data import load
from cgpyro.exclusion import ExclusionSystem, simulate_exclusion_dataset

SMALL = ["--system", "exclusion", "--sequences", "2", "--steps", "2", "--sites", "64",
         "--micro-steps", "3", "--bins", "8", "--seed", "4", "--quiet"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cgpyro: error: "), err
    return err[0]


def test_simulate_exclusion_writes_what_the_library_returns(tmp_path, capsys):
    out = tmp_path / "x.npz"
    args = [*SMALL, "--capacity", "50", "--p-left", "0.2", "--p-right", "0.25",
            "--family", "steps"]
    assert main(["simulate", *args, "--out", str(out)]) == 0
    assert "2 sequences x 3 snapshots x 8 bins" in capsys.readouterr().out
    system = ExclusionSystem(n_sites=64, micro_steps=3, capacity=50, p_left=0.2, p_right=0.25)
    expected, _ = simulate_exclusion_dataset(2, 2, n_bins=8, seed=4, system=system,
                                             family="steps")
    got = load(out)
    np.testing.assert_array_equal(got.counts, expected.counts)
    assert got.dt == pytest.approx(system.coarse_dt)


@pytest.mark.parametrize("args, message", [
    (["--system", "particles", "--capacity", "10"], "--capacity: only for --system exclusion"),
    ([*SMALL, "--family", "waves"], "--family: expected one of fourier, bumps, steps"),
    ([*SMALL, "--p-left", "1.5"], "--p-left: expected a probability in [0, 1]"),
    ([*SMALL, "--bins", "65"], "--bins: expected at most 64"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, args, message):
    assert main(["simulate", *args, "--out", str(tmp_path / "d.npz")]) == 2
    assert message in _one_error_line(capsys)


def test_broken_rule_is_one_line_exit_1(tmp_path, capsys):
    args = [*SMALL, "--p-left", "0.7", "--p-right", "0.6"]
    assert main(["simulate", *args, "--out", str(tmp_path / "d.npz")]) == 1
    assert "p_left + p_right: expected at most 1" in _one_error_line(capsys)
