"""Atomic, pickle-free checkpoints of a training run.

A checkpoint holds only tensors, numbers, strings, lists and dicts, and is read with
``torch.load(..., weights_only=True)``: loading never executes code from the file. It is
written to a temporary file in the same directory and renamed over the target, so a crash or
Ctrl-C never leaves a half-written checkpoint. A SHA-256 digest of the content (``sha256``)
detects damaged files that still unpickle (flipped bytes in tensor data); every entry is
checked for type and shape on load, so a damaged file gives one :class:`CheckpointError`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pyro
import torch

__all__ = ["CheckpointError", "available_memory", "load_checkpoint", "plain", "rng_state",
           "save_checkpoint", "set_rng_state"]


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match the run."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # name the target, not the temporary file
        raise OSError(err.errno, err.strerror, str(path)) from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    except RuntimeError as err:  # torch.save reports a failed write (e.g. disk full) this way
        if _disk_full(path.parent):  # torch says "enforce fail at inline_container.cc"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise OSError(f"{path}: cannot write ({' '.join(str(err).split())})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _disk_full(folder: Path, margin: int = 2**20) -> bool:
    """Less than ``margin`` bytes free where a write just failed (the partial file still
    holds its space at this point)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def rng_state() -> dict:
    """The torch, numpy and Python RNG states, as tensors and lists."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    internal, version = state["python"]
    random.setstate((version, tuple(internal), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(obj, where: str = "checkpoint"):
    """``obj`` with NumPy scalars and arrays turned into Python numbers and lists, so that the
    safe loader (``weights_only=True``) reads back everything that was written (a NumPy bool in
    a checkpoint made a run unreadable). Anything else that is not a tensor, number, string,
    ``None``, list or dict is a ``TypeError`` at write time, never a surprise at load time."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {plain(k, where): plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} in a checkpoint (tensors, "
                    "numbers, strings, lists and dicts only)")


def save_checkpoint(path, *, step: int, optim: dict | None, loss_history, config: dict,
                    extra=None, params: dict | None = None) -> None:
    """Write parameters, optimizer state, RNG states, step and config to ``path``.

    :param optim: torch optimizer state (``state_dict()``) per parameter name, or ``None``.
    :param params: unconstrained parameter values by name (default: Pyro's param store).
    ``config`` and ``extra`` are stored as plain Python types (see :func:`plain`).
    """
    if params is None:
        params = dict(pyro.get_param_store().named_parameters())
    payload = {
        "format": "cgpyro-checkpoint-1",
        "step": int(step),
        "params": {k: v.detach().cpu() for k, v in params.items()},
        "optim": _to_cpu(optim or {}),
        "rng": rng_state(),
        "loss_history": [float(x) for x in loss_history],
        "config": plain(config, "config"),
        "extra": plain(extra or {}, "extra"),
    }
    payload["sha256"] = _digest(payload)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _digest(payload: dict) -> str:
    """SHA-256 of everything in ``payload`` but its ``sha256`` entry, in a canonical walk."""
    h = hashlib.sha256()

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            keys = sorted((k for k in obj if not (obj is payload and k == "sha256")), key=repr)
            h.update(f"D{len(keys)}:".encode())
            for key in keys:
                h.update(repr(key).encode())
                walk(obj[key])
        elif isinstance(obj, list | tuple):
            h.update(f"L{len(obj)}:".encode())
            for item in obj:
                walk(item)
        else:
            h.update(f"{type(obj).__name__}:{obj!r};".encode())

    walk(payload)
    return h.hexdigest()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; else physical
    memory; 2**62 where neither is known)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62


def gib(n_bytes: float) -> str:
    """``n_bytes`` for a message: ``'3.2 GiB'`` / ``'40 MiB'``."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def _unpacked_size(path: Path) -> int:
    """Bytes the tensors of a (zip-format) checkpoint take once read; 0 if not a zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return 0  # not a zip: torch.load reports the damage below


def load_checkpoint(path, max_bytes: int | None = None) -> dict:
    """Read a checkpoint safely; :class:`CheckpointError` names what is wrong.

    Loading uses ``torch.load(..., weights_only=True)`` (no code from the file is run), then
    checks the digest and every entry's type, so whatever the file holds the caller gets a
    well-formed payload or one ``CheckpointError`` line. A file that would unpack to more than
    ``max_bytes`` (default: half the available memory) is refused before reading: a small
    compressed file can hold a huge tensor.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a directory, expected a file")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device would hang or never end
        raise CheckpointError(f"checkpoint {path}: not a regular file")
    size = _unpacked_size(path)
    limit = available_memory() // 2 if max_bytes is None else max_bytes
    if size > limit:
        raise CheckpointError(f"checkpoint {path}: holds {gib(size)} of tensors, more than the "
                              f"{gib(limit)} allowed (half the available memory)")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in damaged files
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        found = next((line for line in lines if "GLOBAL" in line), None)
        if found:  # a pickled object: a class or function the file asks to import and call
            raise CheckpointError(
                f"checkpoint {path}: refused, it holds Python objects other than tensors, "
                f"numbers and strings (loading them could run code: {found[:150]})") from None
        found = [line for line in lines if not line.startswith(
            ("Weights only load failed", "Check the documentation", "Please file an issue"))]
        detail = found[0][:150] if found else _first_line(err)
        raise CheckpointError(f"checkpoint {path}: unreadable or damaged ({detail})") from None
    except Exception as err:  # torch.load on damaged bytes can raise about anything
        # (RuntimeError, EOFError, OSError, KeyError, AssertionError, MemoryError, ... seen
        # fuzzing); weights_only=True ran no code from the file, so any failure means damage
        raise CheckpointError(f"checkpoint {path}: unreadable or truncated "
                              f"({_first_line(err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != "cgpyro-checkpoint-1":
        raise CheckpointError(f"checkpoint {path}: not a cgpyro checkpoint (no 'format': "
                              "'cgpyro-checkpoint-1' entry)")
    for key in ("step", "params", "optim", "rng", "loss_history", "config"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path}: missing {key!r}")
    if "sha256" in payload and payload["sha256"] != _digest(payload):
        raise CheckpointError(f"checkpoint {path}: damaged (its content does not match its "
                              "SHA-256 digest)")
    problem = _check_payload(payload)
    if problem:
        raise CheckpointError(f"checkpoint {path}: damaged ({problem})")
    return payload


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return " ".join(text.splitlines()[0].split())[:200] if text else type(err).__name__


def _check_payload(p: dict) -> str | None:
    """What is malformed in a loaded payload (``None``: nothing)."""
    if not _is_int(p["step"]) or p["step"] < 0:
        return f"'step' must be an integer >= 0, found {p['step']!r}"[:200]
    params = p["params"]
    if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in params.items()):
        return "'params' must map parameter names to tensors"
    for name, value in params.items():
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            return f"parameter {name!r} is not finite"
    optim = p["optim"]
    if not isinstance(optim, dict):
        return "'optim' must be a dict"
    for name, state in optim.items():
        if name not in params:
            return f"optimizer state for unknown parameter {name!r}"
        if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
                and isinstance(state.get("param_groups"), list)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                        for g in state["param_groups"])):
            return f"optimizer state of {name!r} is not a torch optimizer state"
        for slot in state["state"].values():  # SparseAdam counts its steps in a Python int
            if not isinstance(slot, dict) or not all(
                    isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape == params[name].shape)
                    or _is_int(v) and v >= 0 for v in slot.values()):
                return f"optimizer state of {name!r} does not match the parameter's shape"
    history = p["loss_history"]
    if not isinstance(history, list) or not all(
            isinstance(x, float | int) and not isinstance(x, bool) for x in history):
        return "'loss_history' must be a list of numbers"
    if not isinstance(p["config"], dict) or not isinstance(p.get("extra", {}), dict):
        return "'config' and 'extra' must be dicts"
    return _check_rng(p["rng"])


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_rng(rng) -> str | None:
    """Try each saved RNG state on a throwaway generator (no global state is touched)."""
    if not isinstance(rng, dict):
        return "'rng' must be a dict"
    try:
        torch.Generator().set_state(rng["torch"])
        key, pos = rng["numpy_key"], rng["numpy_pos"]
        if not (isinstance(key, torch.Tensor) and key.shape == (624,) and _is_int(pos)):
            raise ValueError("numpy state")
        np.random.RandomState().set_state(("MT19937", key.numpy().astype(np.uint32), pos, 0, 0.0))
        internal, version = rng["python"]
        if not (isinstance(internal, list) and all(_is_int(x) for x in internal)
                and _is_int(version)):
            raise ValueError("python state")
        random.Random().setstate((version, tuple(internal), None))
        for state in rng.get("cuda", []):
            if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
                raise ValueError("cuda state")
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, IndexError) as err:
        return f"bad RNG state ({_first_line(err)})"
    return None
