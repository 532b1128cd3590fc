"""Variational families q(X, θ) for :class:`~cgpyro.model.CGModel`."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

__all__ = ["LogNormalGuide", "init_states_from_counts"]


def init_states_from_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(loc, scale)`` of a lognormal q(X) from bin counts ``(n_seq, n_times, n_bins)``.

    ``loc = log((m + ½) / (N + ½ n_bins))`` (empirical fractions, empty bins kept positive) and
    ``scale = 1 / sqrt(m + 1)``, the relative std of the posterior under eq. 17, capped at 0.3.
    """
    n_bins = counts.shape[-1]
    totals = counts.sum(-1, keepdim=True)
    frac = (counts + 0.5) / (totals + 0.5 * n_bins)
    scale = (counts + 1.0).rsqrt().clamp(max=0.3)
    return frac.log() - 0.5 * scale**2, scale


class LogNormalGuide:
    r"""The paper's mean-field guide (eq. 15, section 3.2).

    ``q(X, θ) = Π_i Π_t Π_j LogNormal(X_{i,t,j} | μ_{i,t,j}, s_{i,t,j}) · δ(θ - θ_MAP)``

    Parameters (``pyro.param``): ``{prefix}.X_loc`` and ``{prefix}.X_scale`` of shape
    ``(n_sequences, n_times, n_bins)``, and ``theta.{site}`` for every unfixed parameter site
    of the model (Delta sites: MAP estimates). Guides with different ``prefix`` share θ, which is
    how new sequences are fitted with θ held fixed (``theta_values``).

    :param model: the :class:`~cgpyro.model.CGModel`.
    :param counts: counts ``(n_sequences, n_times, n_bins)`` used to initialize q(X).
    :param theta_init: initial values of θ by site name (default: ``model.init_values()``).
    :param theta_values: if given, θ is fixed to these values and has no ``pyro.param``.
    """

    def __init__(self, model, counts: torch.Tensor, theta_init=None, theta_values=None,
                 prefix: str = "q"):
        self.model = model
        self.n_sequences, self.n_times, self.n_bins = counts.shape
        self.init_loc, self.init_scale = init_states_from_counts(counts)
        self.theta_init = theta_init
        self.theta_values = theta_values
        self.prefix = prefix

    # -- θ -------------------------------------------------------------------------------
    def _theta(self, dtype, device):
        init = None
        for name, prior in self.model.priors(dtype, device).items():
            if name in self.model.fixed:
                continue
            if self.theta_values is not None:
                value = self.theta_values[name].to(dtype=dtype, device=device)
            else:
                if init is None:
                    init = self.theta_init or self.model.init_values(dtype=dtype)
                value = pyro.param(
                    f"theta.{name}", lambda n=name: init[n].to(dtype=dtype, device=device),
                    constraint=prior.support,
                )
            pyro.sample(name, dist.Delta(value, event_dim=prior.event_dim))

    def theta_map(self) -> dict[str, torch.Tensor]:
        """The MAP estimates θ_MAP (detached), by site name; fixed sites included."""
        if self.theta_values is not None:
            out = dict(self.theta_values)
        else:
            store = pyro.get_param_store()
            out = {
                name: store[f"theta.{name}"].detach()
                for name in self.model.priors() if name not in self.model.fixed
            }
        out.update(self.model.fixed)
        return out

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(X), each ``(n_sequences, n_times, n_bins)``."""
        store = pyro.get_param_store()
        return store[f"{self.prefix}.X_loc"].detach(), store[f"{self.prefix}.X_scale"].detach()

    def __call__(self, counts=None, totals=None, n_times=None, forecast=0, subsample_size=None,
                 resample_observed=False):
        like = counts if counts is not None else totals
        dtype, device = like.dtype, like.device
        self._theta(dtype, device)
        loc = pyro.param(f"{self.prefix}.X_loc", lambda: self.init_loc.to(like))
        scale = pyro.param(f"{self.prefix}.X_scale", lambda: self.init_scale.to(like),
                           constraint=constraints.positive)
        n_times = counts.shape[1] if counts is not None else n_times
        if tuple(loc.shape[:2]) != (like.shape[0], n_times):
            raise ValueError(
                f"the guide was built for {tuple(loc.shape[:2])} (sequences, times); "
                f"got data with {like.shape[0]} sequences and {n_times} times"
            )
        with pyro.plate("sequences", self.n_sequences, subsample_size=subsample_size,
                        dim=-1) as idx:
            if self.model.vectorized:
                pyro.sample("X", dist.LogNormal(loc[idx], scale[idx]).to_event(2))
            else:
                for t in pyro.markov(range(self.n_times)):
                    pyro.sample(f"X_{t}", dist.LogNormal(loc[idx, t], scale[idx, t]).to_event(1))
