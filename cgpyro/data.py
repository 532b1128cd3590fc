"""The interchange format: CG bin counts of many sequences, as ``.npz`` or NetCDF ``.nc``.

A file holds ``counts`` int (n_sequences, n_times, n_bins), optionally ``bin_edges`` float
(n_bins + 1,) (default: equal bins on [-1, 1]) and ``dt`` float scalar (default 1.0). Particle
totals may differ between sequences but not within one. Every rule is checked by ``validate``,
which refuses bad input with a ``DataError`` (a ``ValueError``) of one line naming the array,
the rule and what was found.
"""

from __future__ import annotations

import os
import stat
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DataError", "Dataset", "as_counts", "load", "save", "validate"]

SUFFIXES = (".npz", ".nc")
_INT64_LIMIT = float(2**63)


class DataError(ValueError):
    """A dataset or data file breaks the interchange rules (message: one line)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _validate_counts(counts: object) -> np.ndarray:
    try:
        arr = np.asarray(counts)
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"counts: expected a rectangular integer array (sequence, time, bin), "
            f"found {type(counts).__name__} ({_one_line(exc)})"
        ) from exc
    if arr.dtype.kind not in "iuf":
        raise DataError(f"counts: expected integer counts, found dtype {arr.dtype}")
    if arr.ndim != 3:
        raise DataError(
            f"counts: expected 3 dimensions (sequence, time, bin), "
            f"found {arr.ndim} with shape {arr.shape}"
        )
    if 0 in arr.shape:
        raise DataError(
            f"counts: expected at least one sequence, time and bin, found shape {arr.shape}"
        )
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = _first(bad)
            raise DataError(f"counts: expected finite values, found {arr[idx]} at index {idx}")
        frac = arr != np.floor(arr)
        if frac.any():
            idx = _first(frac)
            raise DataError(f"counts: expected integer values, found {arr[idx]} at index {idx}")
        huge = np.abs(arr) >= _INT64_LIMIT
        if huge.any():
            idx = _first(huge)
            raise DataError(f"counts: expected values below 2**63, found {arr[idx]:g} at {idx}")
    elif arr.dtype == np.uint64:
        huge = arr > np.iinfo(np.int64).max
        if huge.any():
            idx = _first(huge)
            raise DataError(f"counts: expected values below 2**63, found {arr[idx]} at {idx}")
    neg = arr < 0
    if neg.any():
        idx = _first(neg)
        raise DataError(f"counts: expected non-negative counts, found {arr[idx]} at index {idx}")
    out = arr.astype(np.int64)
    if int(out.max()) > np.iinfo(np.int64).max // out.shape[2]:  # the int64 sum could wrap
        exact = out.astype(object).sum(axis=2)  # Python integers: exact (rare, small arrays)
        over = exact >= 2**63
        if over.any():
            seq, t = _first(over)
            raise DataError(
                f"counts: expected fewer than 2**63 particles per sequence, found "
                f"{float(exact[seq, t]):g} in sequence {seq} at time {t}"
            )
    totals = out.sum(axis=2)  # (n_sequences, n_times)
    empty = totals[:, 0] == 0
    if empty.any():
        seq = int(np.flatnonzero(empty)[0])
        raise DataError(
            f"counts: expected particles in every sequence, found 0 in sequence {seq} at time 0"
        )
    changed = totals != totals[:, :1]
    if changed.any():
        seq, t = _first(changed)
        raise DataError(
            f"counts: expected a constant particle total within each sequence, found sequence "
            f"{seq} with {totals[seq, 0]} at time 0 but {totals[seq, t]} at time {t}"
        )
    return out


def _validate_edges(bin_edges: object, n_bins: int) -> np.ndarray:
    if bin_edges is None:
        return np.linspace(-1.0, 1.0, n_bins + 1)
    try:
        edges = np.asarray(bin_edges)
    except (ValueError, TypeError) as exc:
        raise DataError(f"bin_edges: expected a 1-D float array ({_one_line(exc)})") from exc
    if edges.dtype.kind not in "iuf":
        raise DataError(f"bin_edges: expected real numbers, found dtype {edges.dtype}")
    if edges.shape != (n_bins + 1,):
        raise DataError(
            f"bin_edges: expected shape ({n_bins + 1},) for {n_bins} bins, found {edges.shape}"
        )
    edges = edges.astype(np.float64)
    if not np.all(np.isfinite(edges)):
        raise DataError(f"bin_edges: expected finite values, found {edges[~np.isfinite(edges)][0]}")
    step = np.diff(edges)
    if np.any(step <= 0):
        i = int(np.flatnonzero(step <= 0)[0])
        raise DataError(
            f"bin_edges: expected strictly increasing values, found {edges[i]:g} at index {i} "
            f"followed by {edges[i + 1]:g}"
        )
    return edges


def _validate_dt(dt: object) -> float:
    if dt is None:
        return 1.0
    value = np.asarray(dt) if not isinstance(dt, str | bytes) else None
    if value is None or value.ndim != 0 or value.dtype.kind not in "iuf":
        shown = f"shape {value.shape}" if value is not None and value.ndim else repr(dt)
        raise DataError(f"dt: expected a positive finite scalar, found {shown}")
    out = float(value)
    if not (np.isfinite(out) and out > 0):
        raise DataError(f"dt: expected a positive finite scalar, found {out}")
    return out


def validate(
    counts: object, bin_edges: object = None, dt: object = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Check the interchange rules; return ``(counts int64, bin_edges float64, dt float)``.

    ``counts`` (n_sequences, n_times, n_bins): non-negative integers (integer-valued floats are
    cast), constant total over time within each sequence, no empty sequence. ``bin_edges``
    (n_bins + 1,) finite, strictly increasing (None: equal bins on [-1, 1]). ``dt`` positive
    finite scalar (None: 1.0). Raises ``DataError`` with one line otherwise.
    """
    with np.errstate(all="ignore"):  # e.g. 2**63 cast to float16: the checks stay exact
        checked = _validate_counts(counts)
        return checked, _validate_edges(bin_edges, checked.shape[2]), _validate_dt(dt)


@dataclass(eq=False)
class Dataset:
    """CG bin counts: ``counts`` int64 (n_sequences, n_times, n_bins), ``bin_edges`` float64
    (n_bins + 1,), ``dt`` the coarse time step. Validated on construction."""

    counts: np.ndarray
    bin_edges: np.ndarray | None = None
    dt: float = 1.0

    def __post_init__(self) -> None:
        self.counts, self.bin_edges, self.dt = validate(self.counts, self.bin_edges, self.dt)

    @property
    def n_sequences(self) -> int:
        return self.counts.shape[0]

    @property
    def n_times(self) -> int:
        return self.counts.shape[1]

    @property
    def n_bins(self) -> int:
        return self.counts.shape[2]

    @property
    def totals(self) -> np.ndarray:
        """Particles per sequence, int64 (n_sequences,)."""
        return self.counts[:, 0].sum(axis=-1)

    @property
    def fractions(self) -> np.ndarray:
        """Bin fractions m_j / N, float64 (n_sequences, n_times, n_bins)."""
        return self.counts / self.totals[:, None, None]

    def subset(self, sequences: object = None, times: slice | None = None) -> Dataset:
        """A new Dataset of some sequences (slice, int array or bool mask) and a time slice.

        An integer selects one sequence and keeps the axis. A time slice with step s gives
        ``dt * s``.
        """
        seq = slice(None) if sequences is None else sequences
        if np.ndim(seq) == 0 and not isinstance(seq, slice):
            seq = [seq]
        if times is None:
            times = slice(None)
        if not isinstance(times, slice):
            raise DataError(f"times: expected a slice, found {type(times).__name__}")
        step = 1 if times.step is None else times.step
        if step <= 0:
            raise DataError(f"times: expected a positive slice step, found {step}")
        try:
            counts = self.counts[seq][:, times]
        except IndexError as exc:
            raise DataError(f"sequences: {_one_line(exc)}") from exc
        return Dataset(counts=counts.copy(), bin_edges=self.bin_edges.copy(), dt=self.dt * step)

    def __repr__(self) -> str:
        return (
            f"Dataset(n_sequences={self.n_sequences}, n_times={self.n_times}, "
            f"n_bins={self.n_bins}, dt={self.dt})"
        )


def _suffix(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in SUFFIXES:
        raise DataError(f"{path}: expected a .npz or .nc file, found suffix '{path.suffix}'")
    return ext


# What numpy, zipfile and h5py raise on files a user can damage (truncated, not a zip/HDF5,
# wrong content), found by fuzzing truncations and byte flips. KeyError: zip member listed but
# missing; zlib.error: corrupt deflate data; RuntimeError (and its NotImplementedError): zip
# headers claiming encryption or unknown compression, HDF5 library errors.
_READ_ERRORS = (
    OSError, ValueError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile, zlib.error
)


def _check_size(path: Path, shape: tuple, itemsize: int, max_bytes: int | None) -> None:
    """Refuse an array whose reading and checking would not fit in memory, before reading it
    (a 1.4 KB compressed file can declare 8e6 x 10 x 25 counts)."""
    from .checkpoint import available_memory, gib

    n = int(np.prod(shape, dtype=object))
    need = n * (int(itemsize) + 16)  # the array, its int64 copy and the checks' temporaries
    limit = available_memory() if max_bytes is None else max_bytes
    if need > limit:
        raise DataError(f"{path}: counts of shape {tuple(int(d) for d in shape)} need about "
                        f"{gib(need)} to read, more than the {gib(limit)} available (pass "
                        "max_bytes, or --no-memory-check on the command line, to try anyway)")


def _npy_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple, np.dtype]:
    with archive.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(fh)
    return shape, dtype


def _read_npz(path: Path, max_bytes: int | None = None) -> dict[str, object]:
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{path}: expected an .npz archive, found a single .npy array")
    if not zipfile.is_zipfile(path):  # else numpy reads it as a pickle and suggests unpickling
        raise DataError(f"{path}: cannot read as .npz (not a zip archive; empty, truncated or "
                        "another format)")
    with zipfile.ZipFile(path) as archive:
        if "counts.npy" in archive.namelist():
            shape, dtype = _npy_header(archive, "counts.npy")
            _check_size(path, shape, dtype.itemsize, max_bytes)
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected an .npz archive, found a single .npy array")
    with loaded:
        if "counts" not in loaded.files:
            raise DataError(f"{path}: missing array 'counts' (found {sorted(loaded.files)})")
        return {key: loaded[key] for key in ("counts", "bin_edges", "dt") if key in loaded.files}


DIMS = ("sequence", "time", "bin")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NETCDF3_MAGIC = (b"CDF\x01", b"CDF\x02")  # classic and 64-bit offset


def _order(path: Path, names: tuple) -> tuple[int, ...] | None:
    """The transpose that puts named dimensions in ``DIMS`` order (``None``: keep the file's
    order, for unnamed dimensions)."""
    if all(n is None or n.startswith("phony_dim") for n in names):
        return None
    if sorted(names) != sorted(DIMS):
        raise DataError(f"{path}: counts has dimensions {names}; expected "
                        f"{', '.join(DIMS)} in any order (or unnamed dimensions in that order)")
    return tuple(names.index(d) for d in DIMS)


def _global_dt(path: Path, arrays: dict, attrs) -> None:
    """``dt`` as a global attribute (as many tools write it) when there is no ``dt`` variable."""
    if "dt" not in attrs:
        return
    value = np.asarray(attrs["dt"])
    value = value.reshape(()) if value.size == 1 else value  # NetCDF attributes are 1-D
    if "dt" in arrays and not np.array_equal(np.asarray(arrays["dt"]), value):
        raise DataError(f"{path}: dt: the variable ({arrays['dt']}) and the global attribute "
                        f"({value}) differ")
    arrays.setdefault("dt", value)


def _read_nc(path: Path, max_bytes: int | None = None) -> dict[str, object]:
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic[:4] in _NETCDF3_MAGIC:
        return _read_netcdf3(path, max_bytes)
    if magic[:4] == b"CDF\x05":
        raise DataError(f"{path}: NetCDF-3 CDF-5 (64-bit data) is not supported; convert it "
                        "with: nccopy -k netCDF-4 IN.nc OUT.nc")
    # Read the NetCDF4 (HDF5) variables with h5py rather than xarray: on a damaged file
    # h5netcdf's File.__del__ prints a traceback ("Exception ignored in ...") to stderr.
    import h5py

    with h5py.File(path, "r") as nc:
        # Hard links only: a soft or external link (or an external/virtual dataset, below)
        # would make reading this file read another file of the user's.
        links = {key: nc.get(key, getlink=True) for key in nc.keys()}
        names = [key for key, link in links.items() if isinstance(link, h5py.HardLink)
                 and isinstance(nc[key], h5py.Dataset)]
        for key in ("counts", "bin_edges", "dt"):
            if key in links and not isinstance(links[key], h5py.HardLink):
                raise DataError(f"{path}: variable {key!r} is a link to another place or file; "
                                "refused (store the data in the file itself)")
        if "counts" not in names:
            raise DataError(f"{path}: missing variable 'counts' (found {sorted(names)})")
        arrays = {}
        for key in ("counts", "bin_edges", "dt"):
            if key not in names:
                continue
            ds = nc[key]
            if ds.external or ds.is_virtual:
                raise DataError(f"{path}: variable {key!r} keeps its data outside the file "
                                f"({'virtual' if ds.is_virtual else 'external'} storage); "
                                "refused (store the data in the file itself)")
            if key == "counts":
                _check_size(path, ds.shape, ds.dtype.itemsize, max_bytes)
                dims = tuple(dim[0].name.rsplit("/", 1)[-1] if len(dim) else None
                             for dim in ds.dims)
                order = _order(path, dims) if ds.ndim == 3 else None
                arrays[key] = ds[()] if order is None else np.transpose(ds[()], order)
            else:
                arrays[key] = ds[()]
        _global_dt(path, arrays, nc.attrs)
        return arrays


def _read_netcdf3(path: Path, max_bytes: int | None) -> dict[str, object]:
    """NetCDF-3 (classic, 64-bit offset) through scipy, the reader of xarray's scipy engine."""
    try:
        from scipy.io import netcdf_file
    except ImportError:
        raise DataError(f"{path}: NetCDF-3 (classic) files need scipy (pip install scipy), "
                        "or convert it with: nccopy -k netCDF-4 IN.nc OUT.nc") from None
    try:
        with warnings.catch_warnings():  # scipy warns when arrays still reference the mmap
            warnings.simplefilter("ignore")
            with netcdf_file(path, "r", mmap=True) as nc:
                return _netcdf3_arrays(path, nc, max_bytes)
    except DataError:
        raise
    except Exception as exc:  # scipy's pure-Python parser of a damaged file raises about
        # anything (IndexError, struct.error, TypeError, ... seen fuzzing); it runs no code
        # from the file, so any failure means damage
        raise DataError(f"{path}: cannot read as NetCDF-3 ({type(exc).__name__}: "
                        f"{_one_line(exc)[:200]})") from None


def _netcdf3_arrays(path: Path, nc, max_bytes: int | None) -> dict[str, object]:
    variables = nc.variables
    if "counts" not in variables:
        raise DataError(f"{path}: missing variable 'counts' (found {sorted(variables)})")
    counts = variables["counts"]
    _check_size(path, counts.shape, counts.data.dtype.itemsize, max_bytes)
    order = _order(path, tuple(counts.dimensions)) if len(counts.shape) == 3 else None
    arrays = {"counts": np.array(counts.data if order is None
                                 else np.transpose(counts.data, order))}
    for key in ("bin_edges", "dt"):
        if key in variables:
            arrays[key] = np.array(variables[key].data)
    _global_dt(path, arrays, nc._attributes)
    return arrays


def load(path: str | os.PathLike, max_bytes: int | None = None) -> Dataset:
    """Read a ``.npz`` or ``.nc`` dataset; any problem -> ``DataError`` naming the file.

    NetCDF files may be NetCDF-4 (HDF5) or NetCDF-3 (classic, needs scipy); their ``counts``
    dimensions are put in (sequence, time, bin) order by name, and ``dt`` may be a variable
    or a global attribute. ``max_bytes`` (default: the available memory) bounds what reading
    may take; a file whose arrays would need more is refused before reading them.
    """
    path = Path(path)
    ext = _suffix(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a {ext} file")
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or /dev/zero would hang reading
        raise DataError(f"{path}: not a regular file (a pipe, device or socket), expected a "
                        f"{ext} file")
    try:
        arrays = (_read_npz if ext == ".npz" else _read_nc)(path, max_bytes)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read as {ext} ({_one_line(exc)})") from exc
    except MemoryError as exc:  # a damaged header can claim a huge shape
        raise DataError(f"{path}: cannot read as {ext} (an array needs more memory than is "
                        f"available: {_one_line(exc)})") from exc
    try:
        return Dataset(**arrays)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc


def save(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` to ``.npz`` (compressed) or ``.nc`` atomically; returns the path.

    Writes a temporary file in the target directory and renames it over ``path``, so a crash
    never leaves a half-written dataset under the final name.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset: expected a cgpyro.data.Dataset, found {type(dataset).__name__}")
    path = Path(path)
    ext = _suffix(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if ext == ".npz":
            with open(tmp, "xb") as fh:  # "x": never clobber; open() honours the umask
                np.savez_compressed(
                    fh,
                    counts=dataset.counts,
                    bin_edges=dataset.bin_edges,
                    dt=np.float64(dataset.dt),
                )
        else:
            _write_netcdf(dataset, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno is None:
            raise OSError(f"{path}: cannot write ({_one_line(exc)})") from exc
        # os.strerror: h5py's strerror is a paragraph naming the temporary file
        raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_netcdf(dataset: Dataset, path: Path) -> None:
    """NetCDF-4 through h5netcdf, the file ``xarray.Dataset.to_netcdf(engine="h5netcdf")``
    wrote (float variables with a NaN ``_FillValue``, as xarray's default encoding), without
    importing xarray and pandas (half a second of ``cgpyro simulate``)."""
    import h5netcdf

    n_sequences, n_times, n_bins = dataset.counts.shape
    with h5netcdf.File(path, "w") as nc:
        nc.dimensions = {"sequence": n_sequences, "time": n_times, "bin": n_bins,
                         "edge": dataset.bin_edges.shape[0]}
        nc.create_variable("counts", ("sequence", "time", "bin"), data=dataset.counts)
        nc.create_variable("bin_edges", ("edge",), data=dataset.bin_edges, fillvalue=np.nan)
        nc.create_variable("dt", (), data=np.float64(dataset.dt), fillvalue=np.nan)
        nc.attrs["description"] = "cgpyro CG bin counts (sequence, time, bin)"


def as_counts(data, device=None, dtype=None):
    """Counts ``(n_sequences, n_times, n_bins)`` as a float tensor from a Dataset/array/tensor.

    Arrays and tensors go through the data format's validation
    (:func:`cgpyro.data.validate`: one-line :class:`~cgpyro.data.DataError`); a ``Dataset``
    was validated when it was made. ``dtype`` defaults to ``torch.float64``.
    """
    import torch  # here: reading and writing data files does not need torch

    dtype = torch.float64 if dtype is None else dtype
    if isinstance(data, Dataset):
        counts = data.counts
    else:
        if torch.is_tensor(data):
            if data.dtype == torch.bool or data.is_complex():
                raise DataError(f"counts: expected integer counts, found dtype {data.dtype}")
            data = data.detach().cpu().numpy()
        counts, _, _ = validate(data)
    return torch.as_tensor(counts).to(dtype=dtype, device=device)
