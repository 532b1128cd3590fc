"""Data-parallel SVI: sequences sharded over ``torch.distributed`` processes.

The ELBO is a sum over sequences plus the terms of θ (its prior and hyperpriors), so each of
``W`` processes evaluates its own block of sequences and ``1/W`` of the θ terms (the
:class:`ScaleGlobal` handler); the sum over processes is the full ELBO, and the summed θ
gradients (:func:`all_reduced`, one all-reduce per step) are its gradient. q(X) of a
sequence lives only on the process that owns the sequence; θ stays identical everywhere because
every process takes the same optimizer step on the same summed gradient. Checkpoints gather
q(X) (and its optimizer state) on every process and rank 0 writes them, so a checkpoint is the
one a single process would write and resumes on any number of processes.

Launch with ``cgpyro train --nproc N`` (:func:`processes`), or run a script under ``torchrun``
that calls ``torch.distributed.init_process_group("gloo")`` and then
:meth:`SVIInference.fit <cgpyro.inference.SVIInference.fit>` on the same data on every rank.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger
from tqdm import tqdm

__all__ = ["ScaleGlobal", "agree", "all_reduced", "gather_rows", "processes", "shard", "world"]

_PLATE = "sequences"


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, size: int) -> slice:
    """The contiguous block of ``n`` sequences that process ``rank`` of ``size`` owns (blocks
    differ by at most one sequence)."""
    if n < size:
        raise ValueError(f"data-parallel training needs at least one sequence per process: "
                         f"{n} sequences for {size} processes")
    return slice(n * rank // size, n * (rank + 1) // size)


class ScaleGlobal(Messenger):
    """Scale the log-density of every site outside the ``sequences`` plate by ``scale``
    (``1/world_size``): the θ terms then count once in the sum over processes. Sites inside the
    plate (X, counts, virtual observables) keep their scale."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def _process_message(self, msg):
        # The plate is entered inside the model, after this handler, so its frame is on the
        # site's stack by the time the site reaches us.
        if not any(frame.name == _PLATE for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.scale


def all_reduced(loss_and_grads, shared: Iterable[torch.Tensor]):
    """``loss_and_grads(model, guide, *args, **kwargs)`` of an ELBO, then the loss and the
    gradients of the ``shared`` parameters (θ, an amortized network; the same order on every
    process) summed over all processes in one flat all-reduce. The local parameters (q(X) rows
    of this process's sequences) keep their own gradient. For ``SVI(..., loss_and_grads=)``."""
    shared = list(shared)

    def step(model, guide, *args, **kwargs):
        loss = loss_and_grads(model, guide, *args, **kwargs)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in shared]
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads]
                         + [torch.tensor([float(loss)], dtype=torch.float64)])
        dist.all_reduce(flat)
        for p, g in zip(shared, flat[:-1].split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p).to(p.dtype)
        return float(flat[-1])

    return step


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The rows ``(n, ...)`` of all processes from this process's block ``local`` (rows of
    :func:`shard`); every process gets the whole tensor."""
    size = world()[1]
    blocks = [shard(n, r, size) for r in range(size)]
    most = max(b.stop - b.start for b in blocks)
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())  # gloo needs equal shapes: pad, then cut
    return torch.cat([p[:b.stop - b.start] for p, b in zip(parts, blocks, strict=True)])


def agree(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all processes (one all-reduce)."""
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t]


# ------------------------------------------------------------------------ cgpyro train --nproc
def _worker(index: int, size: int, init_file: str, path: str, steps: int,
            allow_import: tuple) -> None:
    """Rank ``index + 1`` of :func:`processes`: train the run in ``path`` beside rank 0."""
    from .run import Run, _StepBoundarySignals

    torch.set_num_threads(1)  # one core per process
    # tqdm's default lock is a multiprocessing semaphore, which the os._exit below would leak
    # (a resource_tracker warning in the parent); this process shows no bar
    tqdm.set_lock(threading.RLock())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=index + 1,
                            world_size=size)
    try:
        run = Run.open(path, allow_import=allow_import, trained=False)
        inference = run._inference(steps=steps, progress=False, callbacks=(), checkpoint=True)
        signals = _StepBoundarySignals()  # Ctrl-C reaches every process: stop together
        signals.install(inference)
        interrupted = False
        try:
            inference.fit(run.train, resume=run.checkpoint if run.checkpoint.is_file() else None)
        except KeyboardInterrupt:
            interrupted = True  # every process stopped at the same step, and rank 0 saved it
        finally:
            signals.restore()
        if not interrupted:
            dist.barrier()  # pairs with rank 0's in processes(): all are past the last collective
    finally:
        dist.destroy_process_group()
    # Nothing is left to do, so skip the interpreter's teardown: a worker aborted once in CI
    # after a finished, saved run (SIGABRT, "terminate called without an active exception":
    # a C++ thread still joinable at exit, in gloo's destroy or in the teardown).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextmanager
def processes(path, *, nproc: int, steps: int, allow_import=()) -> Iterator[None]:
    """Inside the block this process is rank 0 of ``nproc`` CPU processes (gloo backend); the
    other ``nproc - 1`` train the run in ``path`` (up to ``steps``, from its checkpoint where
    there is one) while this one calls :meth:`SVIInference.fit
    <cgpyro.inference.SVIInference.fit>` with the same settings and writes the checkpoint. An
    exception here stops them."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:  # file:// rendezvous: no port to choose
        init_file = os.path.join(tmp, "rendezvous")
        context = mp.start_processes(_worker, nprocs=nproc - 1, join=False,
                                     start_method="spawn",
                                     args=(nproc, init_file, str(path), int(steps),
                                           tuple(allow_import)))
        try:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0,
                                    world_size=nproc)
            try:
                yield
                dist.barrier()  # every process is past its last collective
                _join(context, timeout=None)  # they close their connections before this one
            finally:
                dist.destroy_process_group()
        except KeyboardInterrupt:  # agreed at a step boundary: they save and stop too
            _join(context, timeout=120)
            raise
        except BaseException:
            _join(context, timeout=0)
            raise


def _join(context, timeout: float | None) -> None:
    """Wait for the processes (``None``: until they end, raising a failure of theirs); past
    ``timeout`` seconds, terminate them."""
    import time

    end = None if timeout is None else time.monotonic() + timeout
    while end is None or time.monotonic() < end:
        try:
            if context.join(timeout=1.0):
                return
        except Exception:
            if end is None:
                raise
            return  # the caller's own exception is the one to report
    for process in context.processes:
        if process.is_alive():
            process.terminate()
