"""Virtual observables (eq. 6-8): ``ĉ_l = c(X_l) + σ_c ε`` observed at ``ĉ_l = 0``.

Each virtual observable is a differentiable constraint ``c: (..., n_bins) -> (..., M)`` and a
tolerance ``σ_c``. Stiff tolerances (the paper: σ_c² = 1e-9) are reached by annealing ``σ_c``
geometrically from ``sigma_start`` during the first ``anneal_fraction`` of training, as the
authors' code raises the penalty precision step by step.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from torch import nn

from .distributions import lognormal_moments

__all__ = ["VirtualObservable", "mass_conservation", "resolve_constraint"]


def mass_conservation(x: torch.Tensor) -> torch.Tensor:
    """Eq. 18: ``c(X) = 1 - Σ_j X_j``, shape ``(..., 1)``."""
    return 1.0 - x.sum(-1, keepdim=True)


mass_conservation.affine = (torch.ones(1), -torch.ones(1, 1))


BUILTIN_CONSTRAINTS: dict[str, Callable] = {"mass": mass_conservation}


def resolve_constraint(spec: str) -> Callable:
    """A built-in name (``"mass"``) or an import path ``package.module:function``.

    The function is imported, never evaluated from text.
    """
    if spec in BUILTIN_CONSTRAINTS:
        return BUILTIN_CONSTRAINTS[spec]
    if ":" not in spec:
        raise ValueError(
            f"constraint {spec!r}: expected a built-in name {sorted(BUILTIN_CONSTRAINTS)} "
            "or an import path 'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"constraint {spec!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"constraint {spec!r} is not callable")
    return fn


class VirtualObservable(nn.Module):
    r"""``p(ĉ = 0 | X, σ_c) = N(0 | c(X), σ_c² I)`` (eq. 8) at every time step.

    :param name: site name suffix (the site is ``vo.{name}``).
    :param fn: the constraint ``c``, ``(..., n_bins) -> (..., M)``.
    :param sigma: final tolerance σ_c (paper: ``sqrt(1e-9)``).
    :param sigma_start: σ_c at the start of annealing (``None``: no annealing).
    :param anneal_fraction: fraction of the training steps over which σ_c is annealed.
    :param learn: if true, σ_c is a parameter with a ``HalfCauchy`` prior (MAP) instead.
    :param affine: optional ``(a, W)`` with ``c(X) = a + W X`` (``a: (M,)``, ``W: (M, n_bins)``
        or a row broadcast over bins); enables closed-form expectations under a lognormal q.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
        sigma: float = math.sqrt(1e-9),
        sigma_start: float | None = 1e-2,
        anneal_fraction: float = 0.5,
        learn: bool = False,
        affine: tuple | None = None,
    ):
        super().__init__()
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"virtual observable {name!r}: sigma must be positive, got {sigma}")
        if sigma_start is not None and not sigma_start >= sigma:
            raise ValueError(
                f"virtual observable {name!r}: sigma_start must be >= sigma, got {sigma_start}"
            )
        if not 0.0 <= anneal_fraction <= 1.0:
            raise ValueError(f"anneal_fraction must be in [0, 1], got {anneal_fraction}")
        self.name, self.fn = name, fn
        affine = affine if affine is not None else getattr(fn, "affine", None)
        self.sigma_final, self.sigma_start = float(sigma), sigma_start
        self._sigma_requested = float(sigma)
        self.anneal_fraction, self.learn = float(anneal_fraction), bool(learn)
        self.register_buffer("sigma", torch.tensor(float(sigma), dtype=torch.float64))
        self.affine = affine

    def expected_log_prob(self, sigma, loc, scale, event_dim):
        """``E_q[log N(0 | c(X), σ²)]`` for affine ``c`` under ``LogNormal(loc, scale)``.

        ``loc, scale``: ``(..., n_bins)``; sums the last ``event_dim`` axes of ``(..., M)``.
        """
        a, W = (torch.as_tensor(v, dtype=loc.dtype, device=loc.device) for v in self.affine)
        W = W.expand(a.shape[0], loc.shape[-1])
        mean, var = lognormal_moments(loc, scale)
        c_mean = a + mean @ W.T
        c_var = var @ W.pow(2).T
        sigma = torch.as_tensor(sigma, dtype=loc.dtype, device=loc.device)
        lp = (-0.5 * (c_mean.pow(2) + c_var) / sigma**2 - torch.log(sigma)
              - 0.5 * math.log(2 * math.pi))
        return lp.sum(tuple(range(-event_dim, 0)))

    def calibrate(self, max_total: float, max_bias: float = 2.5e-4) -> None:
        """Cap the final σ_c of the mass constraint for data with ``max_total`` particles.

        With eq. 17 the MAP of ``Σ_j X_j`` is ``1 + N σ_c²``: the paper's σ_c² = 1e-9 gives
        2.5e-4 at its N = 250,000 but a mass of 2 at N = 1e9, so σ_c² is capped at
        ``max_bias / N`` (no change for the paper's setting).
        """
        if self.fn is not mass_conservation or self.learn:
            return
        self.sigma_final = min(self._sigma_requested, math.sqrt(max_bias / float(max_total)))
        if self.sigma_start is not None:
            self.sigma_start = max(self.sigma_start, self.sigma_final)
        self.sigma.fill_(self.sigma_final)

    def anneal(self, progress: float) -> float:
        """Set σ_c for the training progress in [0, 1] (geometric schedule); returns it."""
        if self.sigma_start is None or self.anneal_fraction == 0:
            value = self.sigma_final
        else:
            f = min(1.0, max(0.0, progress / self.anneal_fraction))
            value = math.exp((1 - f) * math.log(self.sigma_start) + f * math.log(self.sigma_final))
        self.sigma.fill_(value)
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``c(X)``, shape ``(..., M)``."""
        c = self.fn(x)
        assert c.shape[:-1] == x.shape[:-1], (
            f"constraint {self.name!r} must map (..., n_bins) to (..., M); got {tuple(c.shape)}"
        )
        return c
