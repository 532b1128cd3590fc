"""Fuzzing the loaders: random malformed ``.npz``, ``.nc``, checkpoint and TOML spec files.

Each loader must either accept a file or raise its one-line error (``DataError``,
``CheckpointError``, ``SpecError``, all ``ValueError``s): never another exception. A sample of
the same files through the command line gives a non-zero exit code and one stderr line, never
a traceback. The counts are bounded and the seed fixed; ``CGPYRO_FUZZ_SCALE=N`` runs N times
more files.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cgpyro.checkpoint import CheckpointError, load_checkpoint
from cgpyro.cli import main
from cgpyro.data import DataError, load, save
from cgpyro.inference import SVIInference
from cgpyro.specs import SpecError, load_guide, load_model, specs_dir
from cgpyro.systems import simulate_dataset

SCALE = int(os.environ.get("CGPYRO_FUZZ_SCALE", "1"))
N_FILES = 60 * SCALE  # per format


def _mutate_bytes(rng, good: bytes) -> bytes:
    """One random byte-level damage: truncation, flips, a junk block, an insertion, or junk."""
    data = bytearray(good)
    kind = rng.integers(6)
    if kind == 0:
        return bytes(data[: rng.integers(0, len(data))])
    if kind == 1:
        for i in rng.integers(0, len(data), size=rng.integers(1, 8)):
            data[i] = rng.integers(0, 256)
    elif kind == 2:
        start = rng.integers(0, len(data))
        data[start:start + 64] = rng.bytes(64)
    elif kind == 3:
        at = rng.integers(0, len(data))
        data[at:at] = rng.bytes(int(rng.integers(1, 32)))
    elif kind == 4:
        return rng.bytes(int(rng.integers(0, 512)))
    else:
        cut = rng.integers(0, len(data))
        data = data[cut:] + data[:cut]  # rotated: right bytes, wrong places
    return bytes(data)


def _npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _weird_npy(rng) -> bytes:
    """A .npy member with a valid magic and a damaged header (shape, dtype, order)."""
    good = _npy_bytes(np.ones((2, 3, 4), dtype=np.int64))
    header_len = int.from_bytes(good[8:10], "little")
    header = good[10:10 + header_len].decode("latin1")
    replacement = rng.choice([
        "'shape': (1000000000, 1000000000, 1000000000)", "'shape': (-1, 3, 4)",
        "'shape': (2, 3)", "'shape': 'abc'", "'shape': (2, 3, 4, 5, 6)", "'shape': ()"])
    header = re.sub(r"'shape': \([^)]*\)", replacement, header)
    header = header.replace("'<i8'", str(rng.choice(
        ["'<i8'", "'<c16'", "'|O'", "'<M8[s]'", "'|S0'", "'<f2'", "'V8'", "'xyz'"])))
    if rng.random() < 0.2:
        header = header.replace("False", "True")  # fortran_order
    raw = header.encode("latin1")
    raw = raw + b" " * ((-len(raw) - 11) % 64) + b"\n"
    return good[:8] + len(raw).to_bytes(2, "little") + raw + good[10 + header_len:]


def _npz_structural(rng, tmp: Path, i: int) -> Path:
    path = tmp / f"s{i}.npz"
    members = {}
    kind = rng.integers(5)
    if kind == 0:
        members["counts.npy"] = _weird_npy(rng)
    elif kind == 1:
        members["counts.npy"] = _npy_bytes(np.array([{"x": 1}], dtype=object))
    elif kind == 2:
        members["counts.npy"] = rng.bytes(int(rng.integers(0, 200)))
    elif kind == 3:
        members["counts.npy"] = _npy_bytes(rng.integers(-5, 5, size=(2, 2, 2)))
        members["bin_edges.npy"] = _weird_npy(rng)
    else:
        members["counts.npy"] = _npy_bytes(np.ones((1, 2, 2), dtype=np.int64))
        dts = [np.array("x"), np.zeros(3), np.array(-1.0)]
        members["dt.npy"] = _npy_bytes(dts[rng.integers(len(dts))])
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return path


def _nc_structural(rng, tmp: Path, i: int) -> Path:
    path = tmp / f"s{i}.nc"
    with h5py.File(path, "w") as f:
        kind = rng.integers(6)
        if kind == 0:
            f["counts"] = np.array([b"ab", b"cd"])
        elif kind == 1:
            f.create_group("counts")
        elif kind == 2:
            f["counts"] = np.zeros(3, dtype=[("a", "i4"), ("b", "f8")])
        elif kind == 3:
            f["counts"] = np.int64(3)
        elif kind == 4:
            f["counts"] = np.ones((1, 2, 2, 2), dtype=np.int64)
        else:
            f["counts"] = np.ones((1, 2, 2), dtype=np.int64)
            f["bin_edges"] = np.array([1.0, np.nan, 0.0])
            f["dt"] = np.array([1.0, 2.0])
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Valid files to damage: a dataset (.npz, .nc), a run's checkpoint, the shipped specs."""
    root = tmp_path_factory.mktemp("good")
    # 8 bins: the default (physics) model's correction radius needs at least 5
    data, _ = simulate_dataset(n_sequences=2, n_steps=3, n_particles=500, n_bins=8, seed=0)
    save(data, root / "d.npz")
    save(data, root / "d.nc")
    assert main(["train", "--data", str(root / "d.npz"), "--steps", "3", "--out",
                 str(root / "run"), "--quiet"]) == 0
    return root


def _outcomes(paths, loader, allowed):
    outcomes = {"accepted": 0, "refused": 0}
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # specs warn on odd but legal input
                loader(path)
            outcomes["accepted"] += 1
        except allowed as err:
            assert "\n" not in str(err), (path, str(err))
            outcomes["refused"] += 1
        # any other exception fails the test with its traceback and the file
    return outcomes


def _damaged(rng, good_bytes, tmp, suffix, n, structural=None):
    paths = []
    for i in range(n):
        if structural is not None and i % 3 == 0:
            paths.append(structural(rng, tmp, i))
            continue
        path = tmp / f"f{i}{suffix}"
        path.write_bytes(_mutate_bytes(rng, good_bytes))
        paths.append(path)
    return paths


@pytest.mark.parametrize("suffix, structural", [(".npz", _npz_structural),
                                                (".nc", _nc_structural)])
def test_malformed_data_files_give_data_error(good, tmp_path, suffix, structural):
    rng = np.random.default_rng(1)
    paths = _damaged(rng, (good / f"d{suffix}").read_bytes(), tmp_path, suffix, N_FILES,
                     structural)
    outcomes = _outcomes(paths, load, DataError)
    assert outcomes["refused"] > N_FILES // 2, outcomes


def _netcdf3(path: Path, counts: np.ndarray, dims=("sequence", "time", "bin")) -> Path:
    from scipy.io import netcdf_file

    order = [("sequence", "time", "bin").index(d) for d in dims]
    with netcdf_file(path, "w") as f:
        for name, size in zip(dims, np.transpose(counts, order).shape, strict=True):
            f.createDimension(name, size)
        f.createVariable("counts", "i4", dims)[:] = np.transpose(counts, order)
        f.dt = 2.0
    return path


def test_malformed_netcdf3_files_give_data_error(good, tmp_path):
    """The NetCDF-3 reader (issue 9) on damaged classic files: DataError or a valid read."""
    pytest.importorskip("scipy.io")
    counts = load(good / "d.npz").counts
    good_bytes = _netcdf3(tmp_path / "good.nc", counts).read_bytes()
    rng = np.random.default_rng(2)
    paths = []
    for i in range(N_FILES):
        data = _mutate_bytes(rng, good_bytes)
        if i % 2:  # keep the signature so that the NetCDF-3 reader, not h5py, sees it
            data = b"CDF\x01" + data[4:]
        (tmp_path / f"f{i}.nc").write_bytes(data)
        paths.append(tmp_path / f"f{i}.nc")
    outcomes = _outcomes(paths, load, DataError)
    assert outcomes["refused"] > N_FILES // 2, outcomes


def test_netcdf_dimension_orders_read_back_the_same(good, tmp_path):
    """Every order of the named dimensions, NetCDF-4 and NetCDF-3, reads as the original."""
    import itertools

    import xarray as xr

    pytest.importorskip("scipy.io")
    original = load(good / "d.npz")
    for i, dims in enumerate(itertools.permutations(("sequence", "time", "bin"))):
        order = [("sequence", "time", "bin").index(d) for d in dims]
        path = tmp_path / f"p{i}.nc"
        xr.Dataset({"counts": (dims, np.transpose(original.counts, order))},
                   attrs={"dt": 2.0}).to_netcdf(path, engine="h5netcdf")
        for read in (load(path), load(_netcdf3(tmp_path / f"c{i}.nc", original.counts, dims))):
            np.testing.assert_array_equal(read.counts, original.counts)
            assert read.dt == 2.0


def _structural_checkpoint(rng, payload: dict, path: Path) -> None:
    """The real payload with one entry replaced by a value of another type or shape."""
    junk = [None, 3, -1, "x", [1, "a"], {"a": torch.zeros(2)}, torch.zeros(0),
            torch.full((2,), float("nan")), 1.5, True, {}]
    p = {k: v for k, v in payload.items() if k != "sha256"}
    key = str(rng.choice(["step", "params", "optim", "rng", "loss_history", "config", "extra",
                          "format", "param", "optim_slot", "rng_entry"]))
    value = junk[rng.integers(len(junk))]
    if key == "param":
        name = sorted(p["params"])[rng.integers(len(p["params"]))]
        p["params"] = {**p["params"], name: value}
    elif key == "optim_slot":
        name = sorted(p["optim"])[rng.integers(len(p["optim"]))]
        p["optim"] = {**p["optim"], name: {"state": {0: {"exp_avg": value}}, "param_groups": []}}
    elif key == "rng_entry":
        p["rng"] = {**p["rng"], str(rng.choice(["torch", "numpy_key", "numpy_pos", "python"])):
                    value}
    else:
        p[key] = value
    if rng.random() < 0.5:
        p.pop(str(rng.choice(list(p))))
    torch.save(p, path)


def test_malformed_checkpoints_give_checkpoint_error(good, tmp_path):
    rng = np.random.default_rng(2)
    ck = good / "run" / "checkpoint.pt"
    payload = torch.load(ck, weights_only=True)
    paths = _damaged(rng, ck.read_bytes(), tmp_path, ".pt", N_FILES)
    for i in range(N_FILES // 2):
        _structural_checkpoint(rng, payload, tmp_path / f"s{i}.pt")
        paths.append(tmp_path / f"s{i}.pt")
    train = load(good / "run" / "train.npz")
    spec = load_guide(good / "run" / "guide.toml")

    def load_into_inference(path):  # what predict and --resume do with it
        load_checkpoint(path)
        model = load_model(good / "run" / "model.toml", n_bins=train.n_bins)
        SVIInference(model, guide=spec.factory, steps=3, progress=False).load(train, path)

    outcomes = _outcomes(paths, load_into_inference, CheckpointError)
    # accepted: damage outside the content (zip padding, trailing bytes; the SHA-256 digest
    # proves the content intact) or a replaced entry that is still well-formed
    assert outcomes["refused"] > len(paths) * 3 // 4, outcomes


TOML_VALUES = ['"x"', "-3", "0", "1e400", "nan", "inf", "-inf", "true", "[]", "[1, -2]",
               '["a"]', "{}", "{ a = 1 }", "1979-05-27", '"nonexistent.module:fn"', '"mass"',
               '"math:sqrt"', "2.5", '""', "[[1], [2]]", "99999999999999999999"]


def _mutate_toml(rng, source: str) -> str:
    lines = source.splitlines()
    kind = rng.integers(6)
    i = int(rng.integers(len(lines)))
    if kind == 0:  # another value
        if "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {TOML_VALUES[rng.integers(len(TOML_VALUES))]}"
    elif kind == 1:  # a misspelt key
        if "=" in lines[i]:
            lines[i] = "x" + lines[i].lstrip()
    elif kind == 2:  # a line lost or repeated
        lines.insert(i, lines[i]) if rng.random() < 0.5 else lines.pop(i)
    elif kind == 3:  # a table renamed or made an array of tables
        heads = [j for j, line in enumerate(lines) if line.startswith("[")]
        if heads:
            j = heads[rng.integers(len(heads))]
            lines[j] = rng.choice(["[bogus]", "[[transition]]", "[svi.x]", "[guide]", "[cg"])
    elif kind == 4:  # a new key with any value
        lines.insert(i, f"n_bins = {TOML_VALUES[rng.integers(len(TOML_VALUES))]}")
    else:  # raw bytes, possibly not UTF-8 (kept through surrogateescape)
        return _mutate_bytes(rng, _raw(source)).decode("utf-8", "surrogateescape")
    return "\n".join(lines) + "\n"


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("folder", ["models", "guides"])
def test_malformed_specs_give_spec_error(tmp_path, folder):
    rng = np.random.default_rng(3)
    sources = [p.read_bytes() for p in sorted((specs_dir() / folder).glob("*.toml"))]
    paths = []
    for i in range(N_FILES):
        source = sources[i % len(sources)].decode()
        for _ in range(rng.integers(1, 4)):
            source = _mutate_toml(rng, source)
        path = tmp_path / f"s{i}.toml"
        path.write_bytes(_raw(source))
        paths.append(path)

    def loader(path):
        if folder == "models":
            load_model(path, n_bins=4)
        else:
            load_guide(path)

    outcomes = _outcomes(paths, loader, SpecError)
    assert outcomes["refused"] > N_FILES // 3, outcomes


def test_malformed_files_through_the_command_line(good, tmp_path, capsys):
    """Damaged data, checkpoints and specs via ``cgpyro``: one error line, never a traceback."""
    rng = np.random.default_rng(4)
    commands = []
    for i in range(4 * SCALE):
        data = tmp_path / f"d{i}.npz"
        data.write_bytes(_mutate_bytes(rng, (good / "d.npz").read_bytes()))
        commands.append(["train", "--data", data, "--steps", "2", "--out", tmp_path / f"r{i}",
                         "--quiet"])
        nc = _nc_structural(rng, tmp_path, 100 + i)
        commands.append(["predict", "--run", good / "run", "--data", nc, "--horizon", "1",
                         "--samples", "4", "--out", tmp_path / "p.npz"])
        run = tmp_path / f"run{i}"
        run.mkdir()
        for f in ("config.json", "model.toml", "guide.toml", "train.npz", "checkpoint.pt"):
            (run / f).write_bytes((good / "run" / f).read_bytes())
        (run / "checkpoint.pt").write_bytes(
            _mutate_bytes(rng, (good / "run" / "checkpoint.pt").read_bytes()))
        commands.append(["predict", "--run", run, "--data", good / "d.npz", "--horizon", "1",
                         "--samples", "4", "--out", tmp_path / "p.npz"])
        spec = tmp_path / f"m{i}.toml"
        spec.write_bytes(_raw(_mutate_toml(
            rng, (specs_dir() / "models" / "particles_best.toml").read_text())))
        commands.append(["train", "--data", good / "d.npz", "--model", spec, "--steps", "2",
                         "--out", tmp_path / f"rm{i}", "--quiet"])
    failures = 0
    for args in commands:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert "Traceback" not in err and "internal error" not in err, (args, err)
        if code != 0:
            failures += 1
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("cgpyro: error: "), (args, err)
    assert failures >= len(commands) // 2
