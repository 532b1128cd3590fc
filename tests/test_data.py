"""The interchange format: validation messages, round trips, and damaged files."""

import os

import h5py
import numpy as np
import pytest

from cgpyro.data import DataError, Dataset, load, save, validate


def make_counts(n_seq: int = 3, n_times: int = 4, n_bins: int = 5, seed: int = 0) -> np.ndarray:
    """Counts with a different but constant total in each sequence."""
    rng = np.random.default_rng(seed)
    totals = rng.integers(50, 100, size=n_seq)
    probs = rng.dirichlet(np.ones(n_bins), size=(n_seq, n_times))
    return np.stack(
        [np.stack([rng.multinomial(totals[i], probs[i, t]) for t in range(n_times)])
         for i in range(n_seq)]
    )


@pytest.fixture
def dataset():
    return Dataset(make_counts(), bin_edges=np.linspace(0.0, 2.0, 6), dt=4.0)


# -- validation ---------------------------------------------------------------------------------
def test_valid_input_is_normalized():
    counts, edges, dt = validate(make_counts().astype(np.float32))  # integer-valued floats ok
    assert counts.dtype == np.int64 and counts.shape == (3, 4, 5)
    np.testing.assert_array_equal(counts, make_counts())
    np.testing.assert_allclose(edges, np.linspace(-1, 1, 6))
    assert dt == 1.0 and isinstance(dt, float)


def _with(index, value, dtype=None):
    counts = make_counts().astype(dtype or np.int64)
    counts[index] = value
    return counts


BAD_INPUTS = [
    ({"counts": make_counts()[0]}, r"counts: expected 3 dimensions \(sequence, time, bin\), "
                                   r"found 2 with shape \(4, 5\)"),
    ({"counts": np.zeros((0, 4, 5), int)}, r"counts: expected at least one sequence, time and "
                                           r"bin, found shape \(0, 4, 5\)"),
    ({"counts": _with((0, 1, 2), 2.5, float)}, r"counts: expected integer values, found 2.5 at "
                                               r"index \(0, 1, 2\)"),
    ({"counts": _with((1, 0, 0), np.nan, float)}, r"counts: expected finite values, found nan"),
    ({"counts": _with((1, 0, 0), np.inf, float)}, r"counts: expected finite values, found inf"),
    ({"counts": _with((2, 3, 4), -3)}, r"counts: expected non-negative counts, found -3 at "
                                       r"index \(2, 3, 4\)"),
    ({"counts": make_counts().astype(bool)}, r"counts: expected integer counts, found dtype bool"),
    ({"counts": make_counts().astype(str)}, r"counts: expected integer counts, found dtype <U"),
    ({"counts": make_counts().astype(object)}, r"counts: expected integer counts, found dtype "
                                               r"object"),
    ({"counts": [[[1, 2]], [[1]]]}, r"counts: expected a rectangular integer array"),
    ({"counts": np.zeros((2, 3, 4), int)}, r"counts: expected particles in every sequence, "
                                           r"found 0 in sequence 0"),
    ({"counts": _with((1, 2, 0), 0)}, r"counts: expected a constant particle total within each "
                                      r"sequence, found sequence 1 with \d+ at time 0 but \d+ at "
                                      r"time 2"),
    ({"bin_edges": np.linspace(-1, 1, 5)}, r"bin_edges: expected shape \(6,\) for 5 bins, found "
                                           r"\(5,\)"),
    ({"bin_edges": np.linspace(-1, 1, 6)[::-1]}, r"bin_edges: expected strictly increasing "
                                                 r"values, found 1 at index 0 followed by 0.6"),
    ({"bin_edges": np.array([0, 1, 1, 2, 3, 4.0])}, r"bin_edges: expected strictly increasing "
                                                    r"values, found 1 at index 1 followed by 1"),
    ({"bin_edges": np.array([0, 1, 2, 3, 4, np.inf])}, r"bin_edges: expected finite values"),
    ({"bin_edges": np.ones((2, 3))}, r"bin_edges: expected shape \(6,\)"),
    ({"dt": 0.0}, r"dt: expected a positive finite scalar, found 0.0"),
    ({"dt": -4.0}, r"dt: expected a positive finite scalar, found -4.0"),
    ({"dt": np.nan}, r"dt: expected a positive finite scalar, found nan"),
    ({"dt": [1.0, 2.0]}, r"dt: expected a positive finite scalar, found shape \(2,\)"),
    ({"dt": "4"}, r"dt: expected a positive finite scalar, found '4'"),
    ({"dt": True}, r"dt: expected a positive finite scalar, found True"),
]


@pytest.mark.parametrize("kwargs, message", BAD_INPUTS)
def test_bad_input_refused_with_one_line(kwargs, message):
    args = {"counts": make_counts(), **kwargs}
    with pytest.raises(DataError, match=message) as info:
        Dataset(**args)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_totals_may_differ_between_sequences(dataset):
    assert len(set(dataset.totals.tolist())) > 1
    np.testing.assert_allclose(dataset.fractions.sum(axis=-1), 1.0)
    assert (dataset.n_sequences, dataset.n_times, dataset.n_bins) == (3, 4, 5)


def test_subset(dataset):
    sub = dataset.subset(sequences=[2, 0], times=slice(0, 4, 2))
    np.testing.assert_array_equal(sub.counts, dataset.counts[[2, 0]][:, ::2])
    assert sub.dt == 8.0  # every other snapshot
    one = dataset.subset(sequences=1)
    assert one.counts.shape == (1, 4, 5)
    mask = dataset.subset(sequences=np.array([True, False, True]))
    assert mask.n_sequences == 2
    with pytest.raises(DataError, match="sequences: "):
        dataset.subset(sequences=[7])
    with pytest.raises(DataError, match="times: expected a slice"):
        dataset.subset(times=[0, 1])
    with pytest.raises(DataError, match="counts: expected at least one"):
        dataset.subset(times=slice(5, None))


# -- files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".nc"])
def test_round_trip(tmp_path, dataset, suffix):
    path = save(dataset, tmp_path / f"d{suffix}")
    back = load(path)
    assert back.counts.dtype == np.int64
    np.testing.assert_array_equal(back.counts, dataset.counts)
    np.testing.assert_array_equal(back.bin_edges, dataset.bin_edges)
    assert back.dt == 4.0
    assert [p.name for p in tmp_path.iterdir()] == [f"d{suffix}"]  # no temporary files left


def test_nc_layout_is_netcdf_via_xarray(tmp_path, dataset):
    import xarray as xr

    save(dataset, tmp_path / "d.nc")
    with xr.open_dataset(tmp_path / "d.nc", engine="h5netcdf") as ds:
        assert ds["counts"].dims == ("sequence", "time", "bin")
        assert ds["bin_edges"].dims == ("edge",)
        assert float(ds["dt"]) == 4.0


def test_nc_file_is_the_one_xarray_writes(tmp_path, dataset):
    """``save`` writes NetCDF with h5netcdf directly: the same variables, dims, attributes and
    encoding (NaN ``_FillValue`` on floats) as ``xarray.Dataset.to_netcdf`` did."""
    import h5py
    import xarray as xr

    save(dataset, tmp_path / "d.nc")
    xr.Dataset({"counts": (("sequence", "time", "bin"), dataset.counts),
                "bin_edges": (("edge",), dataset.bin_edges),
                "dt": ((), np.float64(dataset.dt))},
               attrs={"description": "cgpyro CG bin counts (sequence, time, bin)"},
               ).to_netcdf(tmp_path / "ref.nc", engine="h5netcdf")
    with xr.open_dataset(tmp_path / "d.nc", engine="h5netcdf") as ours, \
            xr.open_dataset(tmp_path / "ref.nc", engine="h5netcdf") as ref:
        assert ours.identical(ref)
        assert {k: v.encoding.get("dtype") for k, v in ours.variables.items()} == \
            {k: v.encoding.get("dtype") for k, v in ref.variables.items()}

    def layout(path):
        with h5py.File(path, "r") as f:
            return {name: (f[name].shape, f[name].dtype, f[name].chunks,
                           sorted(set(f[name].attrs) - {"REFERENCE_LIST", "DIMENSION_LIST"}))
                    for name in f} | {"/": sorted(set(f.attrs) - {"_NCProperties"})}

    assert layout(tmp_path / "d.nc") == layout(tmp_path / "ref.nc")


def test_npz_with_only_counts_gets_defaults(tmp_path):
    np.savez(tmp_path / "c.npz", counts=make_counts())
    back = load(tmp_path / "c.npz")
    np.testing.assert_allclose(back.bin_edges, np.linspace(-1, 1, 6))
    assert back.dt == 1.0


def test_save_overwrites_atomically_and_reports_bad_directory(tmp_path, dataset):
    path = tmp_path / "d.npz"
    save(Dataset(make_counts(seed=1)), path)
    save(dataset, path)
    np.testing.assert_array_equal(load(path).counts, dataset.counts)
    for suffix in (".npz", ".nc"):
        target = tmp_path / "missing" / f"d{suffix}"
        with pytest.raises(FileNotFoundError) as info:
            save(dataset, target)
        assert str(info.value) == f"[Errno 2] No such file or directory: '{target}'"
    with pytest.raises(DataError, match=r"expected a \.npz or \.nc file, found suffix '\.csv'"):
        save(dataset, tmp_path / "d.csv")
    with pytest.raises(TypeError, match="dataset: expected a cgpyro.data.Dataset"):
        save(make_counts(), path)


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def _damaged_files(tmp_path, dataset):
    good_npz = save(dataset, tmp_path / "good.npz").read_bytes()
    good_nc = save(dataset, tmp_path / "good.nc").read_bytes()
    np.save(tmp_path / "single.npy", make_counts())
    no_counts = tmp_path / "no_counts.npz"
    np.savez(no_counts, bin_edges=np.arange(3.0))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, counts=np.array([{"a": 1}], dtype=object))
    nc_no_counts = tmp_path / "no_counts.nc"
    with h5py.File(nc_no_counts, "w") as f:
        f["other"] = np.arange(3)
    bad_counts = tmp_path / "bad_counts.npz"
    np.savez(bad_counts, counts=-make_counts())
    return [
        (tmp_path / "absent.npz", "no such file"),
        (tmp_path, r"expected a \.npz or \.nc file, found suffix ''"),
        (tmp_path / "data.csv", r"expected a \.npz or \.nc file, found suffix '\.csv'"),
        (_write(tmp_path / "text.npz", b"not a zip at all\n"), r"cannot read as \.npz"),
        (_write(tmp_path / "empty.npz", b""), r"cannot read as \.npz"),
        (_write(tmp_path / "trunc.npz", good_npz[: len(good_npz) // 2]), r"cannot read as \.npz"),
        (_write(tmp_path / "tail.npz", good_npz[:-10]), r"cannot read as \.npz"),
        (_write(tmp_path / "npy.npz", (tmp_path / "single.npy").read_bytes()),
         r"expected an \.npz archive, found a single \.npy array"),
        (no_counts, r"missing array 'counts' \(found \['bin_edges'\]\)"),
        (pickled, r"cannot read as \.npz \(.*allow_pickle=False"),
        (bad_counts, r"counts: expected non-negative counts"),
        (_write(tmp_path / "text.nc", b"CDF not really\n"), r"cannot read as \.nc"),
        (_write(tmp_path / "trunc.nc", good_nc[: len(good_nc) // 2]), r"cannot read as \.nc"),
        (nc_no_counts, r"missing variable 'counts' \(found \['other'\]\)"),
    ]


def test_damaged_or_missing_files_give_one_line_data_error(tmp_path, dataset):
    (tmp_path / "isdir.npz").mkdir()
    cases = _damaged_files(tmp_path, dataset) + [(tmp_path / "isdir.npz", "is a directory")]
    for path, message in cases:
        with pytest.raises(DataError, match=message) as info:
            load(path)
        text = str(info.value)
        assert text.startswith(str(path)), text  # names the file
        assert "\n" not in text


def test_random_byte_damage_never_escapes_as_other_errors(tmp_path, dataset):
    """Flip bytes in valid files: load either succeeds or raises DataError, nothing else."""
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "DataError": 0}
    for suffix in (".npz", ".nc"):
        good = bytearray(save(dataset, tmp_path / f"good{suffix}").read_bytes())
        for trial in range(60):
            damaged = bytearray(good)
            for i in rng.integers(0, len(good), size=3):
                damaged[i] = rng.integers(0, 256)
            path = _write(tmp_path / f"bad{trial}{suffix}", bytes(damaged))
            try:
                load(path)
                outcomes["ok"] += 1
            except DataError:
                outcomes["DataError"] += 1
    assert outcomes["DataError"] > 0
    assert sum(outcomes.values()) == 120


# -- issue 8 (round two) and issue 9: NetCDF variants, hostile and oversized files -------------
def _h5(path, counts, dims=None, **attrs):
    """A NetCDF-4-like HDF5 file with ``counts`` (and named dimension scales if ``dims``)."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("counts", data=counts)
        if dims:
            for axis, name in enumerate(dims):
                scale = f.create_dataset(name, data=np.arange(counts.shape[axis]))
                scale.make_scale(name)
                ds.dims[axis].attach_scale(scale)
        f.attrs.update(attrs)
    return path


def test_netcdf_dimensions_are_read_by_name(tmp_path, dataset):
    """(time, sequence, bin) on disk is transposed to (sequence, time, bin), not misread."""
    swapped = np.ascontiguousarray(dataset.counts.transpose(1, 0, 2))
    got = load(_h5(tmp_path / "t.nc", swapped, dims=("time", "sequence", "bin")))
    np.testing.assert_array_equal(got.counts, dataset.counts)
    with pytest.raises(DataError, match=r"counts has dimensions \('x', 'y', 'z'\); expected "
                       "sequence, time, bin in any order"):
        load(_h5(tmp_path / "x.nc", swapped, dims=("x", "y", "z")))


def test_dt_as_a_global_attribute(tmp_path, dataset):
    assert load(_h5(tmp_path / "a.nc", dataset.counts, dt=0.25)).dt == 0.25
    path = tmp_path / "both.nc"
    save(Dataset(dataset.counts, dt=2.0), path)
    with h5py.File(path, "a") as f:
        f.attrs["dt"] = 3.0
    with pytest.raises(DataError, match="dt: the variable .* and the global attribute"):
        load(path)


def test_netcdf3_classic_is_read(tmp_path, dataset):
    """NetCDF-3 (as many tools write it) through scipy: same counts, dims by name, dt."""
    netcdf_file = pytest.importorskip("scipy.io").netcdf_file
    path = tmp_path / "classic.nc"
    with netcdf_file(path, "w") as f:
        for name, size in zip(("time", "sequence", "bin"), (4, 3, 5), strict=True):
            f.createDimension(name, size)
        f.createDimension("edge", 6)
        var = f.createVariable("counts", "i4", ("time", "sequence", "bin"))
        var[:] = dataset.counts.transpose(1, 0, 2)
        f.createVariable("bin_edges", "f8", ("edge",))[:] = np.linspace(-1, 1, 6)
        f.dt = 0.5
    got = load(path)
    np.testing.assert_array_equal(got.counts, dataset.counts)
    assert got.dt == 0.5 and got.bin_edges[-1] == 1.0


def test_external_storage_and_links_are_refused(tmp_path, dataset):
    """A small .nc must not make cgpyro read another file of the user's (issue 8, item 3)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(60, 7, dtype=np.int64).tobytes())
    ext = tmp_path / "ext.nc"
    with h5py.File(ext, "w") as f:
        f.create_dataset("counts", shape=(3, 4, 5), dtype="i8", external=[(str(secret), 0, 480)])
    with pytest.raises(DataError, match="keeps its data outside the file .external storage"):
        load(ext)
    save(dataset, tmp_path / "other.nc")
    for kind, link in (("soft", h5py.SoftLink("/elsewhere")),
                       ("external", h5py.ExternalLink(str(tmp_path / "other.nc"), "/counts"))):
        path = tmp_path / f"{kind}.nc"
        with h5py.File(path, "w") as f:
            f.create_dataset("elsewhere", data=dataset.counts)
            f["counts"] = link
        with pytest.raises(DataError, match="'counts' is a link to another place or file"):
            load(path)
    virtual = tmp_path / "virtual.nc"
    layout = h5py.VirtualLayout(shape=(3, 4, 5), dtype="i8")
    layout[:] = h5py.VirtualSource(str(tmp_path / "other.nc"), "counts", shape=(3, 4, 5))
    with h5py.File(virtual, "w") as f:
        f.create_virtual_dataset("counts", layout)
    with pytest.raises(DataError, match="outside the file .virtual storage"):
        load(virtual)


def test_oversized_arrays_are_refused_before_reading(tmp_path, dataset):
    """A 1.4 KB NetCDF with a fill value can declare 8e6 x 10 x 25 counts (16 GB)."""
    path = tmp_path / "fill.nc"
    with h5py.File(path, "w") as f:
        f.create_dataset("counts", shape=(8_000_000, 10, 25), dtype="i8", chunks=(1000, 10, 25),
                         compression="gzip", fillvalue=1)
    assert path.stat().st_size < 10_000
    with pytest.raises(DataError, match=r"fill.nc: counts of shape \(8000000, 10, 25\) need "
                       r"about 44.7 GiB to read, more than the .* available"):
        load(path, max_bytes=2**34)
    save(dataset, tmp_path / "d.npz")  # the same rule for .npz, from the array header
    with pytest.raises(DataError, match=r"counts of shape \(3, 4, 5\) need about 0 MiB"):
        load(tmp_path / "d.npz", max_bytes=100)
    assert load(tmp_path / "d.npz", max_bytes=10_000).n_sequences == 3


def test_pipes_and_devices_are_refused_not_read(tmp_path):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    (tmp_path / "zero.nc").symlink_to("/dev/zero")
    for path in (fifo, tmp_path / "zero.nc"):
        with pytest.raises(DataError, match="not a regular file"):
            load(path)
