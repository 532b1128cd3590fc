"""Reliability (issue 5): no lost work, no traceback on a user's mistake, nothing executed.

Every bad input a user can give ``cgpyro train``/``predict``/``reproduce``/``simulate`` is one
line ``cgpyro: error: ...`` on stderr and a non-zero exit code (``BAD_INPUTS`` is the table of
what was tried and what the user sees). Interrupted runs resume bit-identically on CPU; Ctrl-C
saves a checkpoint; NaN stops training naming the step and the last good checkpoint; extreme
but legal data trains and forecasts finite values.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

import cgpyro.inference
import cgpyro.systems
from cgpyro.checkpoint import CheckpointError, atomic_write, load_checkpoint
from cgpyro.cli import main
from cgpyro.data import DataError, Dataset, load, save
from cgpyro.guides import guide_for_new_sequences
from cgpyro.inference import SVIInference
from cgpyro.predict import forecast
from cgpyro.specs import load_guide, load_model
from cgpyro.systems import simulate_dataset

RUN_FILES = {"config.json", "model.toml", "guide.toml", "train.npz", "checkpoint.pt"}


def cli(capsys, *args) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``cgpyro ARGS`` run in-process."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The single ``cgpyro: error:`` line of ``err`` (no traceback, nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cgpyro: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def every_step_guide(path: Path) -> Path:
    """The paper's lognormal guide, checkpointing after every step."""
    path.write_text('name = "every_step"\n[guide]\nkind = "lognormal"\n'
                    "[svi]\ncheckpoint_every = 1\n")
    return path


# -- shared tiny data and runs -----------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny datasets (3 sequences x 5 snapshots x 5 bins, 3000 particles) and a 20-step run.
    160 sites: a snapshot moves particles by 0.7 bins, so the default spec ("auto") trains the
    fast "physics" (on 1,280 sites it would train "subbin": 10 s a run instead of 3)."""
    root = tmp_path_factory.mktemp("world")
    tiny = {"n_steps": 4, "n_particles": 3000, "n_sites": 160}
    data, _ = simulate_dataset(n_sequences=3, n_bins=5, seed=0, **tiny)
    save(data, root / "d.npz")
    other, _ = simulate_dataset(n_sequences=3, n_bins=5, seed=1, **tiny)
    save(other, root / "other.npz")  # same shape, other counts
    wide, _ = simulate_dataset(n_sequences=2, n_bins=8, seed=0, **tiny)
    save(wide, root / "bins8.npz")
    save(data.subset(times=slice(0, 1)), root / "one_snapshot.npz")
    assert main(["train", "--data", str(root / "d.npz"), "--steps", "20", "--out",
                 str(root / "run"), "--quiet"]) == 0
    return root


def copy_run(world: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    return run


# -- the table of bad inputs ---------------------------------------------------------------------
def _npz(tmp, name, **arrays):
    np.savez(tmp / name, **arrays)
    return tmp / name


def _bad_data(kind):
    """A ``train --data`` file builder for one kind of bad array."""
    def build(world, tmp):
        c = np.full((2, 3, 4), 5, dtype=np.int64)
        arrays = {
            "nan": {"counts": np.where(c == 5, np.nan, 0.0)},
            "inf": {"counts": c * np.inf},
            "fraction": {"counts": c / 2},
            "negative": {"counts": -c},
            "2-D": {"counts": c[0]},
            "strings": {"counts": c.astype(str)},
            "bool": {"counts": c > 0},
            "zero particles": {"counts": np.concatenate([c, 0 * c[:1]])},
            "total changes": {"counts": np.concatenate([c[:, :2], c[:, 2:] + 1], axis=1)},
            "no counts": {"bin_edges": np.linspace(-1, 1, 5)},
            "bad edges": {"counts": c, "bin_edges": np.array([0.0, 1, 1, 2, 3])},
            "bad dt": {"counts": c, "dt": -1.0},
        }[kind]
        return ["train", "--data", _npz(tmp, "bad.npz", **arrays), "--out", tmp / "r",
                "--steps", "2", "--quiet"]
    return build


def _write(tmp, name, content):
    (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return tmp / name


def _damaged_run(file, content):
    """A ``predict --run`` on a copy of the run with one file replaced (None: removed)."""
    def build(world, tmp):
        run = copy_run(world, tmp)
        if content is None:
            (run / file).unlink()
        elif callable(content):
            content(run / file)
        else:
            _write(run, file, content)
        return ["predict", "--run", run, "--data", world / "d.npz", "--horizon", "2",
                "--samples", "4", "--out", tmp / "p.npz"]
    return build


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_bomb(path):
    class Bomb:  # unpickling this would run a shell command
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    torch.save({"format": "cgpyro-checkpoint-1", "params": Bomb()}, path)


def _wrong_structure(path):
    payload = torch.load(path, weights_only=True)
    payload["params"] = [1, 2, 3]
    payload.pop("sha256")
    torch.save(payload, path)


def _tampered(path):
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["params"]))
    payload["params"][name] = payload["params"][name] + 1.0  # digest now stale
    torch.save(payload, path)


def _args(*args):
    """A fixed command line; ``{d}``, ``{run}``, ``{tmp}``, ``{w}`` are substituted."""
    def build(world, tmp):
        return [str(a).format(d=world / "d.npz", run=world / "run", tmp=tmp, w=world)
                for a in args]
    return build


def _spec(kind, text, then):
    def build(world, tmp):
        path = _write(tmp, f"{kind}.toml", text)
        return [a.format(spec=path, d=world / "d.npz", tmp=tmp) for a in then]
    return build


TRAIN = ["train", "--data", "{d}", "--steps", "2", "--quiet", "--out", "{tmp}/r"]
PREDICT = ["predict", "--run", "{run}", "--data", "{d}", "--horizon", "2", "--samples", "4",
           "--out", "{tmp}/p.npz"]

# (bad input, command-line builder, exit code, what the user sees on stderr: a substring)
BAD_INPUTS = [
    ("data: NaN count", _bad_data("nan"), 1, "counts: expected finite values, found nan at index"),
    ("data: inf count", _bad_data("inf"), 1, "counts: expected finite values, found inf"),
    ("data: fractional count", _bad_data("fraction"), 1,
     "counts: expected integer values, found 2.5 at index (0, 0, 0)"),
    ("data: negative count", _bad_data("negative"), 1,
     "counts: expected non-negative counts, found -5 at index (0, 0, 0)"),
    ("data: counts 2-D", _bad_data("2-D"), 1,
     "counts: expected 3 dimensions (sequence, time, bin), found 2 with shape (3, 4)"),
    ("data: counts dtype str", _bad_data("strings"), 1,
     "counts: expected integer counts, found dtype <U21"),
    ("data: counts dtype bool", _bad_data("bool"), 1,
     "counts: expected integer counts, found dtype bool"),
    ("data: zero-particle sequence", _bad_data("zero particles"), 1,
     "counts: expected particles in every sequence, found 0 in sequence 2 at time 0"),
    ("data: total changes in time", _bad_data("total changes"), 1,
     "counts: expected a constant particle total within each sequence, found sequence 0 with 20 "
     "at time 0 but 24 at time 2"),
    ("data: no 'counts' array", _bad_data("no counts"), 1, "missing array 'counts'"),
    ("data: bin_edges not increasing", _bad_data("bad edges"), 1,
     "bin_edges: expected strictly increasing values, found 1 at index 1 followed by 1"),
    ("data: dt < 0", _bad_data("bad dt"), 1, "dt: expected a positive finite scalar, found -1.0"),
    ("data: one snapshot", _args("train", "--data", "{w}/one_snapshot.npz", "--out", "{tmp}/r",
                                 "--quiet"), 1,
     "training needs at least 2 snapshots per sequence, got 1"),
    ("data: missing file", _args("train", "--data", "{tmp}/nope.npz", "--out", "{tmp}/r"), 1,
     "nope.npz: no such file"),
    ("data: .csv", _args("train", "--data", "{tmp}/d.csv", "--out", "{tmp}/r"), 1,
     "expected a .npz or .nc file, found suffix '.csv'"),
    ("data: text file named .npz", lambda w, t: ["train", "--data", _write(t, "t.npz", "a,b\n"),
                                                 "--out", t / "r"], 1,
     "cannot read as .npz (not a zip archive; empty, truncated or another format)"),
    ("data: truncated .npz", lambda w, t: ["train", "--data", _write(
        t, "t.npz", (w / "d.npz").read_bytes()[:300]), "--out", t / "r"], 1,
     "cannot read as .npz"),
    ("data: truncated .nc", lambda w, t: ["train", "--data", _write(t, "t.nc", b"\x89HDF\r\n"),
                                          "--out", t / "r"], 1, "cannot read as .nc"),
    ("spec: unknown model key", _spec("m", "bogus = 1\n", [*TRAIN, "--model", "{spec}"]), 1,
     "unknown key 'bogus'; allowed: cg, description, emission"),
    ("spec: unknown guide key", _spec("g", "[svi]\nstep = 3\n", [*TRAIN, "--guide", "{spec}"]), 1,
     "[svi] unknown key 'step'"),
    ("spec: bad value", _spec("m", "[transition]\nhidden = [-3]\n", [*TRAIN, "--model",
                                                                    "{spec}"]), 1,
     "[transition] hidden: expected a list of positive integers, found -3"),
    ("spec: invalid TOML", _spec("m", "hidden = [\n", [*TRAIN, "--model", "{spec}"]), 1,
     "invalid TOML"),
    ("spec: unknown name", _args(*TRAIN, "--model", "nonesuch"), 1, "no model spec 'nonesuch'"),
    ("flag: --steps 0", _args(*TRAIN, "--steps", "0"), 2,
     "train: argument --steps: expected a positive integer, found 0"),
    ("flag: --seed -1", _args(*TRAIN, "--seed", "-1"), 2,
     "argument --seed: expected an integer >= 0, found -1"),
    ("flag: --out and --resume", _args(*TRAIN, "--resume", "{run}"), 2,
     "argument --resume: not allowed with argument --out"),
    ("flag: --device tpu", _args(*TRAIN, "--device", "tpu"), 2,
     "argument --device: invalid choice: 'tpu'"),
    ("output: --out under a file", lambda w, t: ["train", "--data", w / "d.npz", "--out",
                                                 _write(t, "f", "x") / "r"], 2,
     "cannot create the directory (Not a directory)"),
    ("output: --out is a file", lambda w, t: ["train", "--data", w / "d.npz", "--out",
                                              _write(t, "f", "x")], 2,
     "exists and is not a directory"),
    ("output: --out holds a run", lambda w, t: ["train", "--data", w / "d.npz", "--out",
                                                copy_run(w, t)], 1,
     "already holds a trained run (checkpoint.pt); continue it with --resume"),
    ("resume: no such directory", _args("train", "--data", "{d}", "--resume", "{tmp}/none"), 1,
     "none: no such run directory"),
    ("resume: not a run directory", _args("train", "--data", "{d}", "--resume", "{tmp}"), 1,
     "not a run directory (missing config.json, model.toml, guide.toml, train.npz, "
     "checkpoint.pt)"),
    ("resume: data with other bins", lambda w, t: ["train", "--data", w / "bins8.npz",
                                                   "--resume", copy_run(w, t)], 1,
     "the run was trained on data of shape (3, 5, 5), --data "),
    ("resume: other data, same shape", lambda w, t: ["train", "--data", w / "other.npz",
                                                     "--resume", copy_run(w, t)], 1,
     "has the shape of the run's data but other counts than"),
    ("resume: --steps below the checkpoint", lambda w, t: [
        "train", "--data", w / "d.npz", "--resume", copy_run(w, t), "--steps", "5"], 1,
     "is at step 20, beyond steps=5: pass steps >= 20"),
    ("predict: --horizon 0", _args(*PREDICT[:6], "0", *PREDICT[7:]), 2,
     "predict: argument --horizon: expected a positive integer, found 0"),
    ("predict: --horizon -3", _args(*PREDICT[:6], "-3", *PREDICT[7:]), 2,
     "argument --horizon: expected a positive integer, found -3"),
    ("predict: --samples 1", _args(*PREDICT, "--samples", "1"), 2,
     "predict: argument --samples: expected at least 2"),
    ("predict: data with other bins", _args("predict", "--run", "{run}", "--data",
                                            "{w}/bins8.npz", "--horizon", "2", "--out",
                                            "{tmp}/p.npz"), 1,
     "bins8.npz has 8 bins, the run was trained on 5"),
    ("predict: --out .csv", _args(*PREDICT[:-1], "{tmp}/p.csv"), 2,
     "argument --out: expected a file ending in .npz, found"),
    ("predict: --out in a missing directory", _args(*PREDICT[:-1], "{tmp}/no/p.npz"), 2,
     "argument --out: directory"),
    ("run: checkpoint missing", _damaged_run("checkpoint.pt", None), 1,
     "not a run directory (missing checkpoint.pt)"),
    ("run: checkpoint empty", _damaged_run("checkpoint.pt", b""), 1,
     "checkpoint.pt: unreadable or truncated (EOFError)"),
    ("run: checkpoint truncated", _damaged_run("checkpoint.pt", _truncate), 1,
     "checkpoint.pt: unreadable or truncated"),
    ("run: checkpoint garbage", _damaged_run("checkpoint.pt", b"garbage\n"), 1,
     "checkpoint.pt: unreadable or damaged"),
    ("run: checkpoint pickle bomb", _damaged_run("checkpoint.pt", _pickle_bomb), 1,
     "refused, it holds Python objects other than tensors, numbers and strings (loading them "
     "could run code"),
    ("run: checkpoint wrong structure", _damaged_run("checkpoint.pt", _wrong_structure), 1,
     "damaged ('params' must map parameter names to tensors)"),
    ("run: checkpoint tampered", _damaged_run("checkpoint.pt", _tampered), 1,
     "damaged (its content does not match its SHA-256 digest)"),
    ("run: config.json not JSON", _damaged_run("config.json", "{steps: 3"), 1,
     "config.json: cannot read the run's configuration (Expecting property name"),
    ("run: config.json missing key", _damaged_run("config.json", '{"data_shape": [3, 5, 5]}'),
     1, "config.json: missing key 'steps'"),
    ("run: config.json bad value", _damaged_run(
        "config.json", '{"data_shape": [3, 5, 5], "steps": -2, "seed": 0, "device": "cpu"}'),
     1, "config.json: steps: expected a positive integer, found -2"),
    ("run: model.toml edited", _damaged_run("model.toml", "bogus = 1\n"), 1,
     "model.toml: unknown key 'bogus'"),
    ("run: train.npz damaged", _damaged_run("train.npz", b"PK\x03\x04junk"), 1,
     "train.npz: cannot read as .npz"),
    ("reproduce: unknown model key", _spec("m", "bogus = 1\n", [
        "reproduce", "--model", "{spec}", "--out", "{tmp}/rep"]), 1, "unknown key 'bogus'"),
    ("reproduce: --out under a file", lambda w, t: ["reproduce", "--out",
                                                    _write(t, "f", "x") / "rep"], 2,
     "cannot create the directory (Not a directory)"),
    ("simulate: --particles 0", _args("simulate", "--particles", "0", "--out", "{tmp}/d.npz"), 2,
     "argument --particles: expected a positive integer, found 0"),
    ("simulate: --sequences 1e23", _args("simulate", "--sequences", str(10**23), "--out",
                                         "{tmp}/d.npz"), 2,
     "argument --sequences: expected a positive integer below 2**63, found 1e+23"),
    ("data: one bin", lambda w, t: ["train", "--data", _npz(t, "one.npz", counts=np.full(
        (2, 3, 1), 5)), "--out", t / "r", "--quiet"], 1,
     "one.npz: counts has 1 bin; the CG model needs at least 2 bins"),
]


@pytest.mark.parametrize("build, code, message", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_and_nonzero_exit(world, tmp_path, capsys, build, code, message):
    args = build(world, tmp_path)
    got, _, err = cli(capsys, *args)
    line = one_line(err)
    assert message in line, line
    assert got == code
    assert not (tmp_path / "PWNED").exists() and not (world / "run" / "PWNED").exists()
    assert not (tmp_path / "p.npz").exists()  # nothing half-written under the final name


def test_refusing_to_overwrite_a_run_keeps_it_intact(world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    before = {f: (run / f).read_bytes() for f in RUN_FILES}
    code, _, err = cli(capsys, "train", "--data", world / "other.npz", "--out", run, "--quiet")
    assert code == 1 and "already holds a trained run" in one_line(err)
    assert {f: (run / f).read_bytes() for f in RUN_FILES} == before


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only /sys")
@pytest.mark.parametrize("command", ["simulate", "train", "predict"])
def test_unwritable_output_path(world, capsys, command):
    """/sys refuses new files even to root (chmod tests cannot run as root, CI's user)."""
    args = {
        "simulate": ["simulate", "--sequences", "1", "--steps", "1", "--particles", "10",
                     "--bins", "2", "--quiet", "--out", "/sys/cgpyro-test.npz"],
        "train": ["train", "--data", world / "d.npz", "--out", "/sys/cgpyro-test-run"],
        "predict": ["predict", "--run", world / "run", "--data", world / "d.npz", "--horizon",
                    "1", "--samples", "4", "--out", "/sys/cgpyro-test.npz"],
    }[command]
    code, _, err = cli(capsys, *args)
    line = one_line(err)
    assert code != 0 and "/sys/cgpyro-test" in line
    assert any(w in line for w in ("Permission denied", "not permitted", "Read-only")), line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores permission bits")
def test_read_only_directory(world, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = cli(capsys, "predict", "--run", world / "run", "--data", world / "d.npz",
                       "--horizon", "1", "--out", locked / "p.npz")
    assert code == 2 and "is not writable" in one_line(err)


SIMULATE = ["simulate", "--sequences", "1", "--steps", "1", "--particles", "10", "--bins", "2",
            "--quiet"]


def test_warnings_are_one_line_each(tmp_path, capsys, monkeypatch):
    def warn_then_fail(**kwargs):
        warnings.warn("odd but legal:\n  second line", UserWarning, stacklevel=1)
        raise DataError("counts: boom")

    monkeypatch.setattr(cgpyro.systems, "simulate_dataset", warn_then_fail)
    code, _, err = cli(capsys, *SIMULATE, "--out", tmp_path / "d.npz")
    assert code == 1
    assert err.splitlines() == ["cgpyro: warning: odd but legal: second line",
                                "cgpyro: error: counts: boom"]


def test_a_bug_is_still_one_line_unless_debugging(tmp_path, capsys, monkeypatch):
    def bug(**kwargs):
        return 1 / 0

    monkeypatch.setattr(cgpyro.systems, "simulate_dataset", bug)
    code, _, err = cli(capsys, *SIMULATE, "--out", tmp_path / "d.npz")
    assert code == 1 and err == ("cgpyro: error: internal error (ZeroDivisionError: division by "
                                 "zero); please report it; set CGPYRO_DEBUG=1 to see the "
                                 "traceback\n")
    monkeypatch.setenv("CGPYRO_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main([*SIMULATE, "--out", str(tmp_path / "d.npz")])


def test_loading_a_pickle_never_runs_it(tmp_path):
    _pickle_bomb(tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "ck.pt")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


# -- Python arguments ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    counts = simulate_dataset(n_sequences=3, n_steps=4, n_particles=3000, n_bins=5,
                              seed=0)[0].counts
    model = load_model("particles_best", n_bins=5)
    inference = SVIInference(model, steps=10, progress=False).fit(counts)
    return model, inference, counts


@pytest.mark.parametrize("kwargs, message", [
    ({"lr_theta": "a"}, "lr_theta must be a non-negative number, got 'a'"),
    ({"tol": -1.0}, "tol must be None or a non-negative number, got -1.0"),
    ({"tol": float("nan")}, "tol must be None or a non-negative number, got nan"),
    ({"seed": -1}, "seed must be an integer in [0, 2**32), got -1"),
    ({"seed": 1.5}, "seed must be an integer in [0, 2**32), got 1.5"),
    ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ({"callbacks": [1]}, "callbacks must be callables, got 1"),
    ({"checkpoint": 3}, "checkpoint must be a path or None, got 3"),
])
def test_bad_inference_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SVIInference(load_model("particles_best", n_bins=5), **kwargs)


def _with(counts, index, value):
    out = counts.astype(np.float64)
    out[index] = value
    return out


@pytest.mark.parametrize("change, message", [
    (lambda c: _with(c, (0, 1, 2), np.nan), "counts: expected finite values, found nan at "
                                            "index (0, 1, 2)"),
    (lambda c: _with(c, (1, 0, 0), -1), "counts: expected non-negative counts, found -1.0"),
    (lambda c: _with(c, (0, 0, 0), 0.5), "counts: expected integer values, found 0.5"),
    (lambda c: np.concatenate([c[..., :3], c[..., 3:].sum(-1, keepdims=True)], -1),
     "counts: expected 5 bins (the model's n_bins), found 4"),
    (lambda c: c * 0, "counts: expected particles in every sequence, found 0 in sequence 0"),
    (lambda c: c.astype(str), "counts: expected integer counts, found dtype <U21"),
    (lambda c: c[:0], "counts: expected at least one sequence, time and bin, found shape "
                      "(0, 5, 5)"),
])
def test_bad_counts_through_the_python_api(fitted, change, message):
    model, inference, counts = fitted
    bad = change(counts)
    calls = {"fit": lambda: SVIInference(model, steps=2, progress=False).fit(bad),
             "forecast": lambda: forecast(model, inference.guide, bad, 2, num_samples=4),
             "infer_states": lambda: inference.infer_states(bad, steps=2)}
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        expected = ("new data has 4 bins, the model was trained on 5"
                    if name == "infer_states" and "bins" in message else message)
        assert expected in str(info.value) and "\n" not in str(info.value), name


def test_bad_forecast_arguments(fitted):
    model, inference, counts = fitted
    for kwargs, message in [({"horizon": True}, "horizon must be a non-negative integer"),
                            ({"horizon": -1}, "horizon must be a non-negative integer"),
                            ({"seed": -2}, "seed must be an integer in [0, 2**32)"),
                            ({"num_samples": 1}, "num_samples must be an integer >= 2")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            forecast(model, inference.guide, counts, **{"horizon": 2, "num_samples": 4, **kwargs})
    with pytest.raises(ValueError, match=re.escape(
            "counts: the guide was fitted to 3 sequences x 5 snapshots, found 2 x 5 (fit new "
            "sequences first: cgpyro.guides.guide_for_new_sequences)")):
        forecast(model, inference.guide, counts[:2], 2, num_samples=4)


# -- checkpoints: atomic, complete, safe ---------------------------------------------------------
def test_checkpoint_holds_everything_and_is_plain_tensors(world):
    payload = torch.load(world / "run" / "checkpoint.pt", weights_only=True)
    assert set(payload) >= {"format", "step", "params", "optim", "rng", "loss_history",
                            "config", "sha256"}
    assert payload["step"] == 20 and len(payload["loss_history"]) == 20
    assert set(payload["optim"]) == set(payload["params"])  # Adam state of every parameter
    assert {"torch", "numpy_key", "numpy_pos", "python"} <= set(payload["rng"])
    assert payload["config"]["steps"] == 20 and payload["config"]["data_shape"] == [3, 5, 5]
    assert sorted(p.name for p in (world / "run").iterdir()) == sorted(RUN_FILES)  # no .tmp


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "ck.pt"
    target.write_bytes(b"old")

    def half_then_crash(tmp):
        Path(tmp).write_bytes(b"new but incompl")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_write(target, half_then_crash)
    assert info.value.filename == str(target)  # names the target, not the temporary file
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ck.pt"]

    def interrupted(tmp):
        Path(tmp).write_bytes(b"new but")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


# -- resume and Ctrl-C ---------------------------------------------------------------------------
class _CtrlCAt(SVIInference):
    """Sends SIGINT to this process at the end of step ``at`` (as a user pressing Ctrl-C)."""

    at = 20

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.callbacks.insert(
            0, lambda step, loss, inf: step == self.at and signal.raise_signal(signal.SIGINT))


def _state(run: Path) -> dict:
    return load_checkpoint(run / "checkpoint.pt")


def _assert_same_training(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["loss_history"] == b["loss_history"]
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    for name in a["optim"]:
        for slot, value in a["optim"][name]["state"][0].items():
            assert torch.equal(value, b["optim"][name]["state"][0][slot]), (name, slot)


@pytest.fixture(scope="module")
def uninterrupted(world):
    run = world / "full40"
    assert main(["train", "--data", str(world / "d.npz"), "--steps", "40", "--seed", "3",
                 "--out", str(run), "--quiet"]) == 0
    return run


def test_ctrl_c_saves_and_resume_is_bit_identical(world, uninterrupted, tmp_path, capsys,
                                                  monkeypatch):
    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cgpyro.inference, "SVIInference", _CtrlCAt)
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--steps", "40", "--seed",
                       "3", "--out", run, "--quiet")
    assert code == 130
    assert one_line(err) == (
        f"cgpyro: error: interrupted at step 20; checkpoint saved in {run / 'checkpoint.pt'}; "
        f"continue with: cgpyro train --resume {run}")
    assert _state(run)["step"] == 20 and signal.getsignal(signal.SIGINT) is handler
    monkeypatch.undo()

    code, out, err = cli(capsys, "train", "--resume", run, "--data", world / "d.npz", "--quiet")
    assert code == 0 and err == "" and "trained 40 steps" in out
    _assert_same_training(_state(run), _state(uninterrupted))
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)


def test_extending_a_finished_run_continues_from_its_state(world, uninterrupted, tmp_path,
                                                           capsys):
    """``train --steps 20`` then ``--resume --steps 40`` continues (step 20 -> 40) but is not
    identical to ``--steps 40``: the learning-rate decay and the σ_c annealing follow the total
    number of steps, so the first 20 steps of a 20-step run differ from those of a 40-step one.
    Bit-identical resumption is for interrupted runs (above)."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(world / "d.npz"), "--steps", "20", "--seed", "3",
                 "--out", str(run), "--quiet"]) == 0
    first = _state(run)
    code, out, _ = cli(capsys, "train", "--resume", run, "--data", world / "d.npz", "--steps",
                       "40", "--quiet")
    assert code == 0 and "trained 40 steps" in out
    state = _state(run)
    assert state["step"] == 40 and state["loss_history"][:20] == first["loss_history"]
    assert np.isfinite(state["loss_history"]).all()
    assert state["config"]["steps"] == 40 and '"steps": 40' in (run / "config.json").read_text()
    full = _state(uninterrupted)
    assert state["loss_history"][:20] != full["loss_history"][:20]  # other schedule


def test_interrupt_before_the_first_resumed_step_keeps_the_optimizer_state(tmp_path,
                                                                           monkeypatch):
    """Pyro creates optimizers lazily: a checkpoint saved before the first step after a resume
    must still hold the restored Adam state (else the next resume silently differs)."""
    counts = simulate_dataset(n_sequences=3, n_steps=4, n_particles=3000, n_bins=5,
                              seed=0)[0].counts

    def inference(**kw):
        return SVIInference(load_model("particles_best", n_bins=5), steps=12, progress=False,
                            checkpoint=tmp_path / "ck.pt", **kw)

    full = inference().fit(counts)
    expected = load_checkpoint(tmp_path / "ck.pt")

    def stop_at_5(step, loss, inf):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        inference(callbacks=[stop_at_5]).fit(counts)
    saved = load_checkpoint(tmp_path / "ck.pt")
    def interrupt_first(progress):  # the σ_c schedule's context opens each step
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("cgpyro.inference.annealing", interrupt_first)
        with pytest.raises(KeyboardInterrupt):
            inference().fit(counts, resume=tmp_path / "ck.pt")
    again = load_checkpoint(tmp_path / "ck.pt")
    assert again["step"] == 5 and again["optim"].keys() == saved["optim"].keys() != set()
    resumed = inference().fit(counts, resume=tmp_path / "ck.pt")
    assert resumed.loss_history == full.loss_history
    _assert_same_training(load_checkpoint(tmp_path / "ck.pt"), expected)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_real_signal_to_a_training_process(world, tmp_path, capsys, sig):
    """A real Ctrl-C (SIGINT), or a batch system's SIGTERM, to ``cgpyro train`` in another
    process: exit 130, one line, the checkpoint holds the step it names, the run resumes."""
    run = tmp_path / "run"
    guide = every_step_guide(tmp_path / "every.toml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cgpyro.cli", "train", "--data", str(world / "d.npz"),
         "--guide", str(guide), "--steps", "1000000", "--out", str(run), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(1200):  # up to 60 s for startup and the first checkpoint
            if (run / "checkpoint.pt").exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    line = one_line(err)
    step = _state(run)["step"]
    assert f"interrupted at step {step}; checkpoint saved in {run / 'checkpoint.pt'}" in line
    code, out, _ = cli(capsys, "train", "--resume", run, "--data", world / "d.npz", "--steps",
                       str(step + 2), "--quiet")
    assert code == 0 and f"trained {step + 2} steps" in out


# -- numerical faults ----------------------------------------------------------------------------
class _PoisonAt(SVIInference):
    """Turns a parameter into NaN at the end of step ``at`` (a diverging optimizer)."""

    at = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def poison(step, loss, inf):
            if step == self.at:
                with torch.no_grad():
                    next(iter(pyro.get_param_store().named_parameters()))[1].fill_(float("nan"))

        self.callbacks.insert(0, poison)


def test_nan_stops_training_naming_step_and_last_checkpoint(world, tmp_path, capsys,
                                                            monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(cgpyro.inference, "SVIInference", _PoisonAt)
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--guide",
                       every_step_guide(tmp_path / "g.toml"), "--steps", "10", "--out", run,
                       "--quiet")
    assert code == 1
    line = one_line(err)
    assert line.startswith("cgpyro: error: training stopped at step 3: parameter '")
    assert line.endswith(f"is not finite; last good checkpoint: {run / 'checkpoint.pt'} (step 2)")
    state = _state(run)  # the good checkpoint is intact and finite
    assert state["step"] == 2
    monkeypatch.undo()
    code, _, err = cli(capsys, "predict", "--run", run, "--data", world / "d.npz", "--horizon",
                       "2", "--samples", "4", "--out", tmp_path / "p.npz")
    assert code == 0, err
    assert all(np.isfinite(v).all() for v in np.load(tmp_path / "p.npz").values())


def test_divergence_inside_the_model_is_a_numerical_error(world, tmp_path, capsys):
    """A huge learning rate: Pyro's validation meets NaN/inf inside the model; the user sees
    the step and the checkpoint state, not a page of tensor values."""
    spec = tmp_path / "hot.toml"
    spec.write_text('name = "hot"\n[guide]\nkind = "lognormal"\n[svi]\nlr = 1e6\n'
                    "lr_theta = 1e6\n")
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--guide", spec, "--steps",
                       "30", "--out", tmp_path / "r", "--quiet")
    line = one_line(err)
    assert code == 1 and line.startswith("cgpyro: error: training stopped at step ")
    assert "no checkpoint was written" in line and len(line) < 300


# -- extreme but legal inputs --------------------------------------------------------------------
def _multinomial(rng, total, n_seq, n_times, probs):
    return np.stack([np.stack([rng.multinomial(total, probs) for _ in range(n_times)])
                     for _ in range(n_seq)])


def _extreme(name):
    rng = np.random.default_rng(0)
    if name == "one particle per bin":
        return np.ones((3, 5, 5), dtype=np.int64)
    if name == "one particle in all":
        c = np.zeros((3, 5, 5), dtype=np.int64)
        c[np.arange(3)[:, None], np.arange(5)[None], rng.integers(0, 5, (3, 5))] = 1
        return c
    if name == "1e9 particles":
        return _multinomial(rng, 10**9, 3, 5, np.full(5, 0.2))
    if name == "sparse bins":  # 3 particles in 20 bins
        return _multinomial(rng, 3, 3, 5, np.full(20, 0.05))
    if name == "always-empty bin":
        return _multinomial(rng, 3000, 3, 5, np.array([0.3, 0.3, 0.0, 0.2, 0.2]))
    raise KeyError(name)


EXTREMES = [
    "one particle per bin",
    "one particle in all",  # σ_r calibrated on all-in-one-bin data was 0 before its floor
    "1e9 particles",
    "sparse bins",
    "always-empty bin",
]


@pytest.mark.parametrize("name", EXTREMES)
def test_extreme_inputs_train_and_forecast_finite(name):
    counts = Dataset(_extreme(name)).counts
    n_bins = counts.shape[-1]
    model = load_model("particles_best", n_bins=n_bins)
    spec = load_guide("lognormal")
    inference = SVIInference(model, guide=spec.factory, progress=False,
                             **{**spec.svi, "steps": 30}).fit(counts)
    assert np.isfinite(inference.loss_history).all()
    seen = forecast(model, inference.guide, counts, 4, num_samples=20)
    new = forecast(model, guide_for_new_sequences(inference, counts[:1], steps=10), counts[:1],
                   4, num_samples=20)
    for f in (seen, new):
        for key, value in f.to_npz_dict().items():
            assert np.isfinite(value).all(), (name, key)
        assert (f.lower >= 0).all() and (f.upper <= 1).all() and (f.lower <= f.upper).all()
        assert np.abs(f.mass[:, : counts.shape[1]] - 1).max() < 0.5


def test_1e9_particles_through_the_command_line(tmp_path, capsys):
    save(Dataset(_extreme("1e9 particles")), tmp_path / "big.npz")
    assert load(tmp_path / "big.npz").totals.tolist() == [10**9] * 3
    code, _, err = cli(capsys, "train", "--data", tmp_path / "big.npz", "--steps", "20",
                       "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    code, _, err = cli(capsys, "predict", "--run", tmp_path / "run", "--data",
                       tmp_path / "big.npz", "--horizon", "3", "--samples", "10", "--out",
                       tmp_path / "p.npz")
    assert code == 0, err
    pred = np.load(tmp_path / "p.npz")
    assert all(np.isfinite(v).all() for v in pred.values())
    assert np.abs(pred["mass"] - 1).max() < 0.1


# -- determinism ---------------------------------------------------------------------------------
def test_same_seed_same_data_training_and_forecasts(world, uninterrupted, tmp_path, capsys):
    sim = ["simulate", "--sequences", "3", "--steps", "4", "--particles", "3000", "--bins",
           "5", "--quiet"]
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert cli(capsys, *sim, "--seed", seed, "--out", tmp_path / f"{name}.npz")[0] == 0
    a, b, c = (load(tmp_path / f"{n}.npz").counts for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)

    again = tmp_path / "again"
    assert cli(capsys, "train", "--data", world / "d.npz", "--steps", "40", "--seed", "3",
               "--out", again, "--quiet")[0] == 0
    _assert_same_training(_state(again), _state(uninterrupted))

    def predict(data, seed, out):
        code, _, err = cli(capsys, "predict", "--run", again, "--data", data, "--horizon", "3",
                           "--samples", "10", "--seed", seed, "--out", tmp_path / out)
        assert code == 0, err
        return dict(np.load(tmp_path / out))

    for data in (world / "d.npz", world / "other.npz"):  # training and new sequences
        first, second, other = predict(data, 1, "1.npz"), predict(data, 1, "2.npz"), \
            predict(data, 2, "3.npz")
        assert all(np.array_equal(first[k], second[k]) for k in first)
        assert not np.array_equal(first["lower"], other["lower"])


# -- round two (issue 8 items 2-11, issue 9 items 5, 8, 10) --------------------------------------
def _predict_args(run: Path, data: Path, tmp: Path, *extra) -> list:
    return ["predict", "--run", run, "--data", data, "--horizon", "2", "--samples", "4",
            "--out", tmp / "p.npz", *extra]


def _tol_guide(path: Path) -> Path:
    """The lognormal guide with a tolerance every run meets once annealing is over."""
    path.write_text('name = "tol"\n[guide]\nkind = "lognormal"\n[svi]\ntol = 1e9\nwindow = 2\n'
                    "checkpoint_every = 1\n")
    return path


def test_a_run_that_converged_early_reopens(world, tmp_path, capsys):
    """Item 2: ``extra.converged`` was a NumPy bool, which safe loading refuses."""
    run = tmp_path / "r"
    code, out, _ = cli(capsys, "train", "--data", world / "d.npz", "--guide",
                       _tol_guide(tmp_path / "g.toml"), "--steps", "40", "--out", run, "--quiet")
    state = _state(run)
    assert code == 0 and state["extra"]["converged"] is True and state["step"] < 40
    code, _, err = cli(capsys, *_predict_args(run, world / "d.npz", tmp_path))
    assert code == 0, err


def test_checkpoint_fields_are_stored_as_plain_python(tmp_path):
    from cgpyro.checkpoint import save_checkpoint

    pyro.clear_param_store()
    pyro.param("a", torch.ones(2))
    save_checkpoint(tmp_path / "c.pt", step=np.int64(3), optim=None,
                    loss_history=[np.float64(1.5)],
                    config={"shape": np.array([1, 2]), "flag": np.bool_(True), "p": tmp_path},
                    extra={"converged": np.bool_(True), "n": np.int32(4), "x": np.float32(.5)})
    payload = load_checkpoint(tmp_path / "c.pt")
    assert payload["extra"] == {"converged": True, "n": 4, "x": 0.5}
    assert type(payload["extra"]["converged"]) is bool and type(payload["extra"]["n"]) is int
    assert payload["config"] == {"shape": [1, 2], "flag": True, "p": str(tmp_path)}
    with pytest.raises(TypeError, match=r"extra\['obj'\]: cannot store a object"):
        save_checkpoint(tmp_path / "d.pt", step=0, optim=None, loss_history=[], config={},
                        extra={"obj": object()})
    assert not (tmp_path / "d.pt").exists()


def _constraint_module(folder: Path, name: str, marker: Path) -> None:
    """A constraint module that leaves ``marker`` behind when it is imported."""
    (folder / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'a').close()\n\n"
        "def mass(x):\n    return 1.0 - x.sum(-1, keepdim=True)\n")


def test_loading_a_run_imports_only_what_the_user_allowed(world, tmp_path, capsys,
                                                          monkeypatch):
    """Item 4: a run's model.toml names constraints; loading it (predict, resume) imports
    none from the run directory or the current directory, nor any module that is not an
    installed package unless ``--allow-import`` names it, nor a non-function."""
    marker = tmp_path / "IMPORTED"
    lib = tmp_path / "lib"
    lib.mkdir()
    _constraint_module(lib, "cg_user_vo", marker)
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.delitem(sys.modules, "cg_user_vo", raising=False)
    spec = tmp_path / "m.toml"
    spec.write_text('[transition]\nhidden = [8]\n[[virtual_observables]]\n'
                    'constraint = "cg_user_vo:mass"\n')
    run = tmp_path / "r"
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--model", spec, "--steps",
                       "2", "--out", run, "--quiet")
    assert code == 0 and marker.exists(), err  # training imports what the user named
    assert "cg_user_vo:mass" in (run / "config.json").read_text()  # its identity is recorded
    marker.unlink()
    del sys.modules["cg_user_vo"]
    code, _, err = cli(capsys, *_predict_args(run, world / "d.npz", tmp_path))
    assert code == 1 and ("'cg_user_vo' (" in one_line(err)) and \
        "is not an installed package; allow it with --allow-import cg_user_vo" in err
    assert not marker.exists()
    code, _, err = cli(capsys, *_predict_args(run, world / "d.npz", tmp_path),
                       "--allow-import", "cg_user_vo")
    assert code == 0 and marker.exists(), err
    (lib / "cg_user_vo.py").write_text((lib / "cg_user_vo.py").read_text() + "# changed\n")
    del sys.modules["cg_user_vo"]
    marker.unlink()

    # a module in the run directory and the current directory is never imported
    evil = copy_run(world, tmp_path / "evil")
    _constraint_module(evil, "cg_evil", marker)
    monkeypatch.chdir(evil)
    monkeypatch.syspath_prepend("")
    text = (evil / "model.toml").read_text()
    for constraint, message in (
            ("cg_evil:mass", "refused to import 'cg_evil' from the run directory or the current "
                             "directory; allow it with --allow-import cg_evil"),
            ("builtins:input", "'builtins' is built into Python"),
            ("html:escape", "'html' (")):
        (evil / "model.toml").write_text(
            f'{text}\n[[virtual_observables]]\nname = "x"\nconstraint = "{constraint}"\n')
        code, _, err = cli(capsys, *_predict_args(evil, world / "d.npz", tmp_path))
        assert code == 1 and message in one_line(err), err
        assert not marker.exists() and "cg_evil" not in sys.modules


def test_a_second_writer_is_refused(world, tmp_path, capsys):
    """Item 5: ``train`` holds an exclusive lock on its run directory; another ``train`` into
    it (a new run or a resume) is refused in one line and writes nothing."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cgpyro.cli", "train", "--data", str(world / "d.npz"),
         "--guide", str(every_step_guide(tmp_path / "every.toml")), "--steps", "1000000",
         "--out", str(run), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(1200):
            if (run / "checkpoint.pt").exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        config = (run / "config.json").read_bytes()
        code, _, err = cli(capsys, "train", "--resume", run, "--quiet")
        assert code == 1 and "in use by another cgpyro process" in one_line(err)
        assert (run / "config.json").read_bytes() == config
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        proc.kill()
    assert proc.returncode == 130
    from cgpyro.run import _Lock  # the same lock refuses a new run into the directory

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    lock = _Lock(fresh)
    try:
        code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--out", fresh, "--quiet")
        assert code == 1 and "in use by another cgpyro process" in one_line(err)
        assert list(fresh.iterdir()) == []
    finally:
        lock.release()


def test_checkpoints_specs_and_directories_from_elsewhere_are_refused(world, tmp_path, capsys):
    """Item 6: a checkpoint of another run with the same shapes (here: another guide spec), an
    edited spec, and an ``--out`` directory holding unrelated files are refused."""
    other = tmp_path / "other"
    assert main(["train", "--data", str(world / "d.npz"), "--steps", "20", "--guide",
                 str(every_step_guide(tmp_path / "g.toml")), "--out", str(other),
                 "--quiet"]) == 0
    run = copy_run(world, tmp_path)
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    for args in (_predict_args(run, world / "d.npz", tmp_path),
                 ["train", "--resume", run, "--steps", "30", "--quiet"]):
        code, _, err = cli(capsys, *args)
        assert code == 1 and "checkpoint was written for another guide spec than this run's" \
            in one_line(err)
    edited = copy_run(world, tmp_path / "edited")
    (edited / "model.toml").write_text((edited / "model.toml").read_text() + "\n# edited\n")
    code, _, err = cli(capsys, *_predict_args(edited, world / "d.npz", tmp_path))
    assert code == 1 and "model.toml: edited since the run was trained" in one_line(err)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--out", mine, "--quiet")
    assert code == 1 and "holds files that are not part of a cgpyro run (notes.txt)" in \
        one_line(err)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


class _Signals(SVIInference):
    """Raises ``signals`` (names, 50 ms apart) in this process in the middle of step ``at``
    (after the parameter update, before the step is counted) and, if ``during_save``, one
    more while the checkpoint is written."""

    at, signals, during_save = 20, ("SIGINT",), False

    def _set_lr(self, optim, step):
        if self.step == self.at - 1:
            for name in self.signals:
                signal.raise_signal(getattr(signal, name))
                time.sleep(0.05)
        super()._set_lr(optim, step)

    def _save(self, optim):
        if self.during_save:
            signal.raise_signal(signal.SIGINT)
        super()._save(optim)


@pytest.mark.parametrize("at, signals, during_save", [
    (20, ("SIGINT", "SIGINT"), False),  # two Ctrl-C 50 ms apart
    (20, ("SIGINT", "SIGTERM"), False),
    (1, ("SIGINT",), False),  # Ctrl-C during the first step
    (20, ("SIGINT",), True),  # a second Ctrl-C while the checkpoint is written
], ids=["two SIGINTs", "SIGINT then SIGTERM", "during the first step", "during the save"])
def test_ctrl_c_edge_cases_save_a_step_boundary(world, uninterrupted, tmp_path, capsys,
                                                monkeypatch, at, signals, during_save):
    """Item 7: the first signal stops training at a step boundary, later ones are ignored
    until the checkpoint is saved, the message names the saved step, the resumed run is
    bit-identical to an uninterrupted one."""
    run = tmp_path / "run"
    kind = type("Sig", (_Signals,), {"at": at, "signals": signals, "during_save": during_save})
    monkeypatch.setattr(cgpyro.inference, "SVIInference", kind)
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--steps", "40", "--seed",
                       "3", "--out", run, "--quiet")
    assert code == 130 and f"interrupted at step {at}; checkpoint saved" in one_line(err)
    assert _state(run)["step"] == at
    monkeypatch.undo()
    code, out, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0 and "trained 40 steps" in out, err
    _assert_same_training(_state(run), _state(uninterrupted))


def test_an_interrupt_at_the_convergence_step_resumes_to_the_same_end(world, tmp_path, capsys,
                                                                      monkeypatch):
    guide = _tol_guide(tmp_path / "g.toml")
    full = tmp_path / "full"
    assert main(["train", "--data", str(world / "d.npz"), "--guide", str(guide), "--steps",
                 "40", "--out", str(full), "--quiet"]) == 0
    converged_at = _state(full)["step"]
    run = tmp_path / "run"
    monkeypatch.setattr(cgpyro.inference, "SVIInference",
                        type("Sig", (_Signals,), {"at": converged_at}))
    code, _, _ = cli(capsys, "train", "--data", world / "d.npz", "--guide", guide, "--steps",
                     "40", "--out", run, "--quiet")
    assert code == 130 and _state(run)["extra"]["converged"] is True
    monkeypatch.undo()
    code, out, _ = cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0 and f"trained {converged_at} steps" in out
    _assert_same_training(_state(run), _state(full))


def test_resources_beyond_memory_are_refused_up_front(world, tmp_path, capsys):
    """Item 8: a network of 1.6e9 weights, a checkpoint that unpacks to more than allowed."""
    spec = tmp_path / "huge.toml"
    spec.write_text('[transition]\nhidden = [40000, 40000]\n[[virtual_observables]]\n'
                    'constraint = "mass"\n')
    start = time.perf_counter()
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--model", spec, "--out",
                       tmp_path / "r", "--quiet")
    line = one_line(err)
    assert code == 1 and time.perf_counter() - start < 20
    assert re.search(r"d.npz: training on 3 x 5 x 5 counts with 1,60\d,\d{3},\d{3} network "
                     r"weights needs about \d+\.\d GiB of memory, more than the", line), line
    assert list((tmp_path / "r").iterdir()) == []
    with pytest.raises(CheckpointError, match=r"holds \d+ MiB of tensors, more than the 0 MiB"):
        load_checkpoint(world / "run" / "checkpoint.pt", max_bytes=1000)
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(fifo)


def test_large_data_is_announced_with_its_cost(world, tmp_path, capsys, monkeypatch):
    """Item 11: above a threshold (1 GiB; lowered here) train says what it will cost."""
    monkeypatch.setattr("cgpyro.run.WARN_BYTES", 1)
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--steps", "2", "--out",
                       tmp_path / "r", "--quiet")
    assert code == 0
    assert "cgpyro: warning: training on 3 x 5 x 5 counts needs about 0 MiB of memory and " \
           "writes checkpoints of about 0 MiB; expect very roughly 7.5e-05 s per step" in err
    code, _, err = cli(capsys, *_predict_args(world / "run", world / "d.npz", tmp_path)[:-4],
                       "--samples", "1000000000", "--out", tmp_path / "p.npz")
    assert code == 1 and "a forecast of 1000000000 samples x 3 sequences x 7 steps x 5 bins " \
        "needs about" in one_line(err)


def test_problems_are_found_before_training_and_named(world, tmp_path, capsys, monkeypatch):
    """Item 9: a run directory that cannot be written to is refused before training; a full
    disk says so; a constraint that is no function of tensors names the spec."""
    import errno
    import tempfile

    run = copy_run(world, tmp_path)
    before = (run / "checkpoint.pt").read_bytes()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(SVIInference, "fit", lambda *a, **k: pytest.fail("trained"))
    code, _, err = cli(capsys, "train", "--resume", run, "--steps", "30", "--quiet")
    assert code == 1 and "cannot write to the run directory (Read-only file system)" in \
        one_line(err)
    assert (run / "checkpoint.pt").read_bytes() == before
    monkeypatch.undo()

    def full_disk(payload, tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(os, "statvfs", lambda p: type("S", (), {"f_bavail": 0,
                                                               "f_frsize": 4096})())
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--steps", "2", "--out",
                       tmp_path / "full", "--quiet")
    assert code == 1 and one_line(err).endswith("checkpoint.pt: No space left on device"), err
    monkeypatch.undo()

    spec = tmp_path / "m.toml"
    spec.write_text('[[virtual_observables]]\nconstraint = "mass"\n[[virtual_observables]]\n'
                    'name = "h"\nconstraint = "html:escape"\n')
    code, _, err = cli(capsys, "train", "--data", world / "d.npz", "--model", spec, "--out",
                       tmp_path / "r", "--quiet")
    assert code == 1 and "m.toml" in one_line(err) and "AttributeError" in err


def test_predict_refuses_data_on_another_grid(world, tmp_path, capsys):
    """Item 10: data with another dt or other bin edges than the training data."""
    train = load(world / "d.npz")
    save(Dataset(train.counts, dt=train.dt * 2), tmp_path / "dt.npz")
    save(Dataset(train.counts, bin_edges=np.linspace(0, 1, 6), dt=train.dt), tmp_path / "e.npz")
    for name, message in (("dt.npz", "has dt = 8, the run was trained with dt = 4"),
                          ("e.npz", "has other bin edges than the run was trained on")):
        code, _, err = cli(capsys, *_predict_args(world / "run", tmp_path / name, tmp_path))
        assert code == 1 and message in one_line(err) and "--allow-other-grid" in err
        code, _, err = cli(capsys, *_predict_args(world / "run", tmp_path / name, tmp_path),
                           "--allow-other-grid")
        assert code == 0, err


def test_resume_without_data_uses_the_runs_own(world, tmp_path, capsys):
    """Issue 9 item 5: ``train --resume RUN`` as the README writes it."""
    run = copy_run(world, tmp_path)
    code, out, err = cli(capsys, "train", "--resume", run, "--steps", "22", "--quiet")
    assert code == 0 and "trained 22 steps" in out, err
    code, _, err = cli(capsys, "train", "--out", tmp_path / "new", "--quiet")
    assert code == 2 and "argument --data: required with --out" in one_line(err)


def test_every_option_has_help_and_the_wording_is_the_papers():
    """Issue 9 item 8."""
    from cgpyro.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")
                                                         ._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings}: no help text"
            if name in ("train", "predict", "reproduce"):  # "the seed's" clashed with --seed
                assert "seed's" not in action.help, (name, action.option_strings)
        assert "seed's" not in (command.description or ""), name


def test_the_run_object_from_python(world, tmp_path):
    """Issue 10 item 3: create / fit / open / resume / forecast without the command line; the
    lock is held while the run is open for writing and released by ``with``."""
    from cgpyro.run import Run, RunError, RunLockedError

    data = load(world / "d.npz")
    with Run.create(tmp_path / "r", data, steps=4, seed=3) as run:
        with pytest.raises(RunLockedError, match="in use by another cgpyro process"):
            Run.open(tmp_path / "r", writable=True)
        inference = run.fit(progress=False)
        assert inference.step == 4
    with Run.open(tmp_path / "r", writable=True) as run:
        with pytest.raises(RunError, match="other counts than"):
            run.resume(load(world / "other.npz"), steps=6, progress=False)
        assert run.resume(data, steps=6, progress=False).step == 6
    opened = Run.open(tmp_path / "r")
    with pytest.raises(RunError, match="opened read-only"):
        opened.fit()
    result = opened.forecast(data, 3, num_samples=4, seed=0)
    arrays = result.to_npz_dict()
    assert all(np.isfinite(v).all() for v in arrays.values())
    reopened = Run.open(tmp_path / "r")  # the trained state, as cgpyro.cli.load_run gave it
    inference = reopened.load()
    assert inference.step == 6 and reopened.config["steps"] == 6
    assert reopened.train.counts.shape == (3, 5, 5)
    out = tmp_path / "f.npz"
    reopened.forecast(data, 3, num_samples=4, seed=0, out=out)
    with np.load(out) as saved:
        assert sorted(saved.files) == sorted(arrays)
        assert all(np.array_equal(saved[k], v) for k, v in arrays.items())


def test_run_fit_stops_on_signals_at_a_step_boundary(world, tmp_path):
    """``Run.fit(stop_on_signals=True)`` from Python: a SIGINT during a step stops training at
    its end, the KeyboardInterrupt names the saved step, the previous handler is back."""
    from cgpyro.run import Run

    before = signal.getsignal(signal.SIGINT)

    def ctrl_c(step, loss, inference):
        if inference.step == 3:
            signal.raise_signal(signal.SIGINT)

    seen = []  # steps whose callbacks all ran: the signal's own step finishes first
    with Run.create(tmp_path / "r", load(world / "d.npz"), steps=40, seed=3) as run:
        with pytest.raises(KeyboardInterrupt, match=r"interrupted at step (\d+); checkpoint "
                                                    r"saved in .*checkpoint\.pt") as info:
            run.fit(progress=False, callbacks=[ctrl_c, lambda s, l, inf: seen.append(inf.step)],
                    stop_on_signals=True)
    assert seen[-1] == 3
    assert signal.getsignal(signal.SIGINT) is before
    step = int(re.search(r"step (\d+)", str(info.value)).group(1))
    assert _state(tmp_path / "r")["step"] == step < 40


def test_runs_without_digests_still_open(world, tmp_path, capsys):
    """Run directories written before the digests (format 1) open as before; a directory
    left by a run that crashed before its first checkpoint can be trained into again."""
    import json

    run = copy_run(world, tmp_path)
    config = json.loads((run / "config.json").read_text())
    for key in ("format", "model_sha256", "guide_sha256", "data_sha256", "constraints"):
        config.pop(key)
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = cli(capsys, *_predict_args(run, world / "d.npz", tmp_path))
    assert code == 0, err
    (run / "checkpoint.pt").unlink()
    (run / ".checkpoint.pt.abc123.tmp").write_bytes(b"partial")
    code, out, err = cli(capsys, "train", "--data", world / "d.npz", "--steps", "2", "--out", run,
                         "--quiet")
    assert code == 0 and "trained 2 steps" in out, err
