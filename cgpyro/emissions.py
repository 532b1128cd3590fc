"""Coarse-to-fine densities p_cf(x_t | X_t; θ_cf) (eq. 3), evaluated on CG bin counts.

An emission maps the CG state ``X_t`` (``(..., n_bins)``) and the particle total ``N`` to a
distribution over the bin counts ``m(x_t)`` (event ``(n_bins,)``), the sufficient statistic of
the FG state under eq. 17. A learned decoder implements the same interface and declares its
θ_cf as ``PyroSample`` attributes (:meth:`cgpyro.transitions.ThetaModule.declare`, with
:meth:`init_values`; none here: eq. 17 has no parameters).
"""

from __future__ import annotations

import torch

from ._sites import ThetaModule
from .distributions import BinCounts

__all__ = ["Emission", "MultinomialEmission", "NormalizedMultinomialEmission"]


class Emission(ThetaModule):
    """Interface: ``forward(x, total_count, theta) -> Distribution`` over bin counts, θ_cf by
    relative site name."""

    needs_mass_constraint = False

    def init_values(self, generator=None, dtype=torch.float64) -> dict:
        return {}

    def fractions(self, x: torch.Tensor) -> torch.Tensor:
        """Expected FG bin fractions ``E[m / N | X]``, shape of ``x``."""
        return x / x.sum(-1, keepdim=True)


class MultinomialEmission(Emission):
    r"""The paper's p_cf for particles (eq. 17): ``N!/Π m_j! · Π_j X_j^{m_j}``.

    ``X`` is not normalized here; with no constraint on ``Σ X`` this density grows without bound,
    so it must be paired with the mass virtual observable (eq. 18) that makes ``Σ_j X_j = 1``.
    Particle positions given ``X`` are i.i.d.: bin ``j`` w.p. ``X_j``, uniform within the bin.
    """

    needs_mass_constraint = True

    def forward(self, x, total_count, theta=None) -> BinCounts:
        return BinCounts(x, total_count)

    @staticmethod
    def log_normalizer(value):
        """``log N! - Σ_j log m_j!`` of counts ``value`` ``(..., n_bins)``: ``(...)``."""
        return torch.lgamma(value.sum(-1) + 1) - torch.lgamma(value + 1).sum(-1)

    def expected_log_prob(self, value, loc, scale, log_norm=None):
        """``E_q[log p(m | X)]`` under ``X ~ LogNormal(loc, scale)``: ``Σ_j m_j loc_j`` + const.

        ``value, loc, scale``: ``(..., n_bins)``; returns ``(...)``; ``log_norm``:
        :meth:`log_normalizer` of ``value`` where the caller holds it.
        """
        norm = self.log_normalizer(value) if log_norm is None else log_norm
        return norm + (value * loc).sum(-1)


class NormalizedMultinomialEmission(Emission):
    r"""``Multinomial(N, X / Σ_j X_j)``: normalizes ``X`` itself, so it needs no virtual observable.

    For ablations of the mass constraint; ``Σ X`` is then unidentified by the data and set by the
    prior and the dynamics only.
    """

    def forward(self, x, total_count, theta=None) -> BinCounts:
        return BinCounts(x / x.sum(-1, keepdim=True), total_count)
