"""Torch's intra-op thread count chosen from the problem size, restored afterwards.

The model's tensors are small (the paper's data: 64 sequences x 10 snapshots x 25 bins, 16,000
numbers) and SVI runs thousands of short steps. torch's default of one thread per core then
mostly pays for waking and synchronising OpenMP workers, and on a busy machine the workers
oversubscribe the cores: measured 15-51 s for a 300-step fit with the default threads against
2.4-2.7 s with one (issue 9). Only problems large enough for an operation to be split across
threads (torch splits elementwise work in chunks of 32,768) get more than one thread.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

__all__ = ["threads_for", "torch_threads", "with_auto_threads", "WORK_PER_THREAD"]

# Numbers per step (sequences x times x bins x samples/particles) that make a second thread pay.
WORK_PER_THREAD = 1 << 20


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_for(work: int, limit: int | None = None) -> int:
    """Intra-op threads for ``work`` numbers per step: 1 below :data:`WORK_PER_THREAD`, then one
    more per multiple of it, never more than ``limit`` (default: the cores this process may use).

    :param work: elements touched per step, e.g. ``n_sequences * n_times * n_bins * n_samples``.
    """
    if isinstance(work, bool) or not isinstance(work, int | np.integer) or work < 0:
        raise ValueError(f"work must be a non-negative integer, got {work!r}")
    limit = _available_cores() if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return int(max(1, min(limit, work // WORK_PER_THREAD)))


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)``; the caller's count is restored on exit
    (also on errors). Never raises the count above the caller's: a user who set one thread keeps
    one. Yields the count in effect.
    """
    import torch

    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    before = torch.get_num_threads()
    chosen = int(min(n, before))
    if chosen != before:
        torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _numel(data) -> int:
    """Elements of counts ``(n_sequences, n_times, n_bins)`` given as Dataset/array/tensor."""
    counts = getattr(data, "counts", data)
    shape = getattr(counts, "shape", None)
    if shape is None:
        shape = np.shape(counts)
    return int(math.prod(shape))


def _work(bound: inspect.BoundArguments) -> int:
    """Numbers per step of a call taking ``data`` (and maybe ``num_samples``/``horizon``)."""
    args = bound.arguments
    data = args.get("data")
    if data is None:
        return 0
    work = _numel(data)
    shape = getattr(getattr(data, "counts", data), "shape", None) or np.shape(data)
    if len(shape) == 3 and args.get("horizon"):
        work = work // shape[1] * (shape[1] + int(args["horizon"]))
    self = args.get("self")
    batch = getattr(self, "batch_size", None)  # minibatch SVI touches batch_size sequences
    if batch and len(shape) == 3 and 0 < batch < shape[0]:
        work = work // shape[0] * batch
    return work * int(args.get("num_samples") or getattr(self, "num_particles", 1) or 1)


def with_auto_threads(fn: Callable) -> Callable:
    """Decorator: run ``fn`` under :func:`torch_threads` sized by :func:`threads_for` of its
    ``data`` argument (counts ``(n_sequences, n_times, n_bins)``, times ``num_samples`` or the
    inference's ``num_particles``; ``batch_size`` sequences per step for minibatch SVI).
    Arguments that cannot be sized run with one thread; ``fn``'s
    own validation reports them.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            work = _work(signature.bind(*args, **kwargs))
        except (TypeError, ValueError):  # bad call or unsizeable data: fn raises the real error
            work = 0
        with torch_threads(threads_for(work)):
            return fn(*args, **kwargs)

    return wrapper
