"""Atomic, pickle-free checkpoints of a training run.

A checkpoint holds only tensors, numbers, strings, lists and dicts, and is read with
``torch.load(..., weights_only=True)``: loading never executes code from the file.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyro
import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match the run."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def save_checkpoint(path, *, step: int, optim, loss_history, config: dict, extra=None) -> None:
    """Write the param store, optimizer state, RNG states, step and config to ``path``."""
    store = pyro.get_param_store()
    payload = {
        "format": "cgpyro-checkpoint-1",
        "step": int(step),
        "params": {k: v.detach().cpu() for k, v in store._params.items()},
        "optim": _to_cpu(optim.get_state()) if optim is not None else {},
        "rng": rng_state(),
        "loss_history": [float(x) for x in loss_history],
        "config": config,
        "extra": extra or {},
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def load_checkpoint(path) -> dict:
    """Read a checkpoint safely; :class:`CheckpointError` names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {path}: refused (not a plain-tensor file)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError,
            zipfile.BadZipFile) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: unreadable or truncated ({msg})") from None
    if not isinstance(payload, dict) or payload.get("format") != "cgpyro-checkpoint-1":
        raise CheckpointError(f"checkpoint {path}: not a cgpyro checkpoint")
    for key in ("step", "params", "optim", "rng", "loss_history", "config"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path}: missing {key!r}")
    return payload
