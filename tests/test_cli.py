"""The command line: ``cgpyro simulate`` end to end, and one-line errors for bad input."""

import errno
import re

import numpy as np
import pytest

import cgpyro.systems
from cgpyro.cli import COMMANDS, main
from cgpyro.data import DataError, load
from cgpyro.systems import simulate_dataset

OUT = ["--out", "{tmp}/d.npz"]
SMALL = ["--sequences", "2", "--steps", "3", "--particles", "1000", "--bins", "10", "--seed", "5"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cgpyro: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("suffix", [".npz", ".nc"])
def test_simulate_writes_what_simulate_dataset_returns(tmp_path, capsys, suffix):
    out = tmp_path / f"data{suffix}"
    assert main(["simulate", *SMALL, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "2 sequences x 4 snapshots x 10 bins" in captured.out
    assert "6/6" in captured.err  # the progress bar
    expected, _ = simulate_dataset(n_sequences=2, n_steps=3, n_particles=1000, n_bins=10, seed=5)
    got = load(out)
    np.testing.assert_array_equal(got.counts, expected.counts)
    np.testing.assert_array_equal(got.bin_edges, expected.bin_edges)
    assert got.dt == expected.dt == 4.0


def test_simulate_quiet_has_no_progress_bar(tmp_path, capsys):
    assert main(["simulate", *SMALL, "--quiet", "--out", str(tmp_path / "d.npz")]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "expected a command (simulate, train, predict, reproduce, curve)"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["simulate"], "the following arguments are required: --out"),
        (["simulate", "--sequences", "0", *OUT], "--sequences: expected a positive integer"),
        (["simulate", "--steps", "-1", *OUT], "--steps: expected a positive integer, found -1"),
        (["simulate", "--particles", "x", *OUT], "--particles: expected a positive integer"),
        (["simulate", "--bins", "0", *OUT], "--bins: expected a positive integer, found 0"),
        (["simulate", "--bins", "2000", *OUT], "--bins: expected at most 1280"),
        (["simulate", "--seed", "-3", *OUT], "--seed: expected an integer >= 0, found -3"),
        (["simulate", "--system", "ising", *OUT], "--system: invalid choice: 'ising'"),
        (["simulate", "--bogus", *OUT], "unrecognized arguments: --bogus"),
        (["simulate", "--out", "data.csv"], "expected a file ending in .npz or .nc"),
        (["simulate", "--out", "{tmp}/missing/d.npz"], "does not exist"),
        (["simulate", "--out", "{tmp}/adir.npz"], "is a directory"),
    ],
)
def test_bad_command_line_is_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "adir.npz").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(args) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "d.npz").exists()


@pytest.mark.parametrize(
    "exc, code, message",
    [
        (DataError("counts: expected integer counts, found dtype bool"), 1,
         "cgpyro: error: counts: expected integer counts, found dtype bool"),
        (OSError(errno.ENOSPC, "No space left on device", "out.npz"), 1,
         "cgpyro: error: out.npz: No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied", "out.npz"), 1,
         "cgpyro: error: out.npz: Permission denied"),
        (ValueError("bad\nmultiline\nmessage"), 1, "cgpyro: error: bad multiline message"),
        (KeyboardInterrupt(), 130, "cgpyro: error: interrupted"),
    ],
)
def test_runtime_errors_are_one_line(tmp_path, capsys, monkeypatch, exc, code, message):
    def boom(**kwargs):
        raise exc

    monkeypatch.setattr(cgpyro.systems, "simulate_dataset", boom)
    assert main(["simulate", *SMALL, "--out", str(tmp_path / "d.npz")]) == code
    assert one_error_line(capsys) == message


def test_help_and_registry(capsys):
    assert main(["--help"]) == 0
    assert "simulate" in capsys.readouterr().out
    assert main(["simulate", "--help"]) == 0
    assert "--particles" in capsys.readouterr().out
    assert "simulate" in COMMANDS and callable(COMMANDS["simulate"].run)


def test_train_default_model_is_chosen_from_the_data_and_recorded(tmp_path, capsys):
    import json

    from cgpyro.data import save
    from cgpyro.specs import load_model_spec

    data, _ = simulate_dataset(n_sequences=2, n_steps=4, n_particles=20_000, n_bins=25, seed=0)
    save(data, tmp_path / "d.npz")
    assert main(["train", "--data", str(tmp_path / "d.npz"), "--steps", "3", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    # the paper's step (Δt = 1,600 on 25 bins) moves particles by half a bin: "physics"
    assert re.search(r"model: physics \(chosen by auto: rms displacement width 0\.[45]\d+ "
                     r"bins per snapshot, threshold 0\.28\)", out)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_spec"] == "physics"
    assert config["model_choice"]["chosen"] == "physics"
    assert config["model_choice"]["width"] > 0.28
    # the run stores the chosen spec, so a resume or predict rebuilds it without choosing
    assert (tmp_path / "run" / "model.toml").read_text() == load_model_spec("physics").source
