"""θ as ``PyroSample`` attributes: the declaration protocol of cgpyro's submodules.

A submodule of :class:`~cgpyro.model.CGModel` (transition, drift, emission, virtual observable)
declares each parameter θ with :meth:`ThetaModule.declare` as a ``PyroSample`` attribute, whose
prior may read other attributes (a hyperprior: ``lambda self: Normal(0, self.jump_scale)``).
Inside the model's forward (a ``PyroModule`` context) reading the attribute is the
``pyro.sample`` statement of the site named by the module path, e.g.
``transition.drift.jumps``; fixing a parameter is ``poutine.condition``.

Priors build their constant tensors with :func:`const`, in the dtype and device of the data
the model runs on (:func:`like`), so one model object serves float64 CPU and CUDA data alike.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
from pyro.nn import PyroModule, PyroSample

_LIKE: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("cgpyro_like",
                                                                             default=None)


@contextmanager
def like(tensor: torch.Tensor):
    """Priors built in this block take ``tensor``'s dtype and device."""
    token = _LIKE.set(tensor.new_zeros(()))
    try:
        yield
    finally:
        _LIKE.reset(token)


def like_kwargs() -> dict:
    """``dtype`` and ``device`` of the current block (see :func:`like`; float64 on the CPU
    outside one)."""
    ref = _LIKE.get()
    return {"dtype": torch.float64} if ref is None else {"dtype": ref.dtype, "device": ref.device}


def const(value) -> torch.Tensor:
    """``value`` as a tensor of the current dtype and device (see :func:`like`)."""
    return torch.as_tensor(value, **like_kwargs())


class ThetaModule(PyroModule):
    """A ``PyroModule`` whose parameters θ are ``PyroSample`` attributes.

    ``declared_sites`` lists the attributes declared here (relative names; submodules list their
    own), in declaration order.
    """

    def __init__(self):
        super().__init__()
        self.declared_sites: tuple[str, ...] = ()

    def declare(self, name: str, prior) -> None:
        """Declare site ``name`` with ``prior`` (a distribution or ``fn(self) -> distribution``)."""
        setattr(self, name, PyroSample(prior))
        self.declared_sites = (*self.declared_sites, name)
