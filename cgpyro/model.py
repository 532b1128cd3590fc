"""The CG state-space model of the paper (sections 2.1-2.6) as a Pyro model."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import transform_to
from pyro.nn import PyroModule, pyro_method
from pyro.poutine.messenger import Messenger
from torch import nn

from . import _sites
from .distributions import MarkovChain, lognormal_moments
from .emissions import Emission, MultinomialEmission
from .transitions import GaussianTransition
from .virtual import VirtualObservable

__all__ = ["CGModel"]


class _Prototype(Messenger):
    """Gives every sample site without a value a point of its support instead of a draw (no
    RNG; on real supports a zero-stride zero tensor, so that huge weights cost nothing)."""

    def _pyro_sample(self, msg):
        if msg["value"] is not None:
            return
        fn = msg["fn"]
        support = fn.support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        zero = _sites.const(0.0).expand(fn.shape())
        msg["value"] = zero if support is constraints.real \
            else transform_to(fn.support)(zero.clone())


class CGModel(PyroModule):
    r"""Generative model ``p(x̂_{0:T}, ĉ_{0:T}, X_{0:T}, θ)`` for ``n`` sequences (eq. 9-13).

    - ``θ ~ p(θ)``: the ``PyroSample`` attributes of the submodules (θ_NN, σ_r and hyperpriors
      of the transition, θ_cf of the emission, σ_c of learnable virtual observables), each a
      site named by its module path, e.g. ``transition.drift.jumps``, ``vo.{name}.sigma``
      (:meth:`site_names`, :meth:`priors`). Values in ``fixed`` condition their site and hide
      it from the trace (``poutine.condition`` + ``poutine.block``: footnote 1 of the paper).
    - ``X_0 ~ LogNormal(log(1/n_bins), x0_scale)`` per bin, then ``X_{t+1} ~ p(X_{t+1} | X_t)``.
    - ``m_t ~ p_cf(m_t | X_t)`` (site ``counts``), the FG data through its bin counts.
    - ``0 ~ N(c(X_t), σ_c²)`` for every virtual observable (site ``vo.{name}``).

    Sites live in ``pyro.plate("sequences", dim=-1)``. With ``vectorized=True`` the states form
    one site ``X`` of event shape ``(n_times, n_bins)`` (a :class:`MarkovChain`) and the data one
    site ``counts`` of event ``(n_times, n_bins)``; with ``vectorized=False`` a ``pyro.markov``
    loop has sites ``X_{t}``, ``counts_{t}``, ``vo.{name}_{t}`` of event ``(n_bins,)``. Both give
    the same joint density. ``forecast=P`` appends ``X_forecast`` and ``counts_forecast`` of
    event ``(P, n_bins)`` (Algorithm 1).
    """

    def __init__(
        self,
        n_bins: int,
        transition: GaussianTransition,
        emission: Emission | None = None,
        virtual_observables: tuple[VirtualObservable, ...] | list = (),
        x0_scale: float = 1.0,
        fixed: dict[str, torch.Tensor] | None = None,
        vectorized: bool = True,
    ):
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        self.n_bins = int(n_bins)
        self.transition = transition
        self.emission = emission if emission is not None else MultinomialEmission()
        names = [vo.name for vo in virtual_observables]
        for name in names:
            if not (isinstance(name, str) and name and "." not in name) \
                    or names.count(name) > 1:
                raise ValueError(f"virtual observables need distinct names without '.', got "
                                 f"{names}")
        # a ModuleDict by name: the site of a learned σ_c is vo.{name}.sigma
        self.vo = PyroModule[nn.ModuleDict]({vo.name: vo for vo in virtual_observables})
        self.x0_scale = float(x0_scale)
        self.vectorized = bool(vectorized)
        self.fixed = {}
        for name, value in (fixed or {}).items():
            self.fix(name, value)

    @property
    def virtual_observables(self) -> tuple[VirtualObservable, ...]:
        """The virtual observables, in the order given."""
        return tuple(self.vo.values())

    # ----------------------------------------------------------------- parameters θ
    def _declared(self):
        """``(site name, module, attribute)`` of every θ site, in declaration order."""
        for prefix, module in self.named_modules():
            for name in getattr(module, "declared_sites", ()):
                yield f"{prefix}.{name}", module, name

    def site_names(self) -> list[str]:
        """Names of all parameter sites θ (fixed ones included), parents before children."""
        return [site for site, _, _ in self._declared()]

    @pyro_method
    def _read_theta(self) -> dict[str, torch.Tensor]:
        # each attribute read is the site's pyro.sample (once per model call: PyroModule caches)
        return {site: getattr(module, name) for site, module, name in self._declared()}

    def priors(self, dtype=torch.float64, device=None) -> dict[str, dist.Distribution]:
        """The prior of every θ site (fixed ones included), by site name; a hierarchical
        prior is evaluated at its parents' fixed values or at a point of their support (its
        support and event shape do not depend on them). Draws nothing, allocates no weights."""
        like = torch.zeros((), dtype=dtype, device=device)
        fixed = {k: v.to(like) for k, v in self.fixed.items()}
        with _sites.like(like), _Prototype(), poutine.condition(data=fixed):
            trace = poutine.trace(self._read_theta).get_trace()
        return {name: trace.nodes[name]["fn"] for name in self.site_names()}

    def init_values(self, generator=None, dtype=torch.float64) -> dict[str, torch.Tensor]:
        """Default initial values of θ (random network weights), by site name."""
        values = {
            f"transition.{k}": v for k, v in self.transition.init_values(generator, dtype).items()
        }
        values.update(
            {f"emission.{k}": v for k, v in self.emission.init_values(generator, dtype).items()}
        )
        for vo in self.virtual_observables:
            if vo.learn:
                values[f"vo.{vo.name}.sigma"] = torch.tensor(vo.sigma_final, dtype=dtype)
        return values

    def fix(self, name: str, value) -> None:
        """Fix parameter ``name`` to ``value``: its site is conditioned and hidden."""
        if name not in self.site_names():
            raise ValueError(f"cannot fix {name!r}: not a parameter site of this model; "
                             f"sites are {sorted(self.site_names())}")
        self.fixed[name] = torch.as_tensor(value, dtype=torch.float64)

    def sample_theta(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ by site name (the sites' ``pyro.sample`` statements; fixed values included), in
        the dtype and device of ``like``."""
        with _sites.like(like):
            if not self.fixed:
                return self._read_theta()
            fixed = {k: v.to(like) for k, v in self.fixed.items()}
            with poutine.block(hide=list(fixed)), poutine.condition(data=fixed):
                return self._read_theta()

    # ----------------------------------------------------------------- densities
    def initial(self, batch_shape, dtype=torch.float64, device=None) -> dist.Distribution:
        """``p(X_0)``, event ``(n_bins,)``."""
        loc = torch.full((self.n_bins,), -math.log(self.n_bins), dtype=dtype, device=device)
        return dist.LogNormal(loc, self.x0_scale).to_event(1).expand(batch_shape)

    def transition_mean(self, x: torch.Tensor, theta: dict[str, torch.Tensor],
                        totals: torch.Tensor | None = None,
                        x_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``E[X_{t+1} | X_t = x, X_{t-1} = x_prev]`` for θ by full site name; ``x`` is
        ``(..., n_bins)``, ``totals`` the particle totals broadcast against ``x[..., 0]`` (or
        ``None``); ``x_prev`` matters only for a second-order transition (memory)."""
        return self.transition.mean(x, self._part(theta, "transition."), totals, x_prev)

    def emission_dist(self, x: torch.Tensor, totals: torch.Tensor,
                      theta: dict[str, torch.Tensor]):
        """``p_cf(m | X = x)`` for θ by full site name: ``x`` ``(..., n_bins)``, ``totals``
        broadcast against ``x[..., 0]``; batch ``x.shape[:-1]``, event ``(n_bins,)``."""
        return self.emission(x, totals, self._part(theta, "emission."))

    def _part(self, theta, prefix):
        return {k[len(prefix):]: v for k, v in theta.items() if k.startswith(prefix)}

    def state_chain(self, theta: dict[str, torch.Tensor], totals: torch.Tensor, n_times: int,
                    dtype: torch.dtype | None = None) -> MarkovChain:
        """``p(X_{0:T-1} | θ)`` of sequences with particle totals ``totals`` ``(n_sequences,)``:
        batch ``(n_sequences,)``, event ``(n_times, n_bins)``; θ by full site name; states of
        ``dtype`` (default: that of ``totals``)."""
        trans_theta = self._part(theta, "transition.")

        def step(x, *older):  # older: (X_{t-1}, X_{t-2}, ...), newest first
            return self.transition(x, trans_theta, totals, x_prev=older or None)

        x0 = self.initial(totals.shape, dtype or totals.dtype, totals.device)
        expected = None
        if self.has_chain_expected_log_prob(theta):  # closed form for AnalyticTraceELBO
            def expected(loc, scale):
                return self.state_chain_expected_log_prob(theta, loc, scale)
        return MarkovChain(step, n_times, init=x0, order=getattr(self.transition, "order", 1),
                           expected_log_prob=expected)

    def has_chain_expected_log_prob(self, theta: dict[str, torch.Tensor]) -> bool:
        """Whether :meth:`state_chain_expected_log_prob` has a closed form for θ (full names)."""
        transition = self.transition
        return hasattr(transition, "has_expected_log_prob") \
            and transition.has_expected_log_prob(self._part(theta, "transition."))

    def state_chain_expected_log_prob(self, theta: dict[str, torch.Tensor], loc: torch.Tensor,
                                      scale: torch.Tensor, matrices=None) -> torch.Tensor:
        """``E_q[log p(X_{0:T-1} | θ)]`` per sequence under ``q(X) = LogNormal(loc, scale)``
        (mean-field), each ``(n_sequences, n_times, n_bins)``; returns ``(n_sequences,)``: the
        lognormal ``p(X_0)`` and an affine-Gaussian transition in closed form, no draw of
        ``X`` (requires :meth:`has_chain_expected_log_prob`; ``matrices``: the transition's
        ``affine_matrices`` of θ, if held by the caller)."""
        # p(X_0) of initial(): E[log LogNormal(X_0; μ0, s0)] = E[-log X_0 + log N(log X_0; μ0,
        # s0)] with log X_0 ~ N(loc, scale)
        mu0, s0 = -math.log(self.n_bins), float(self.x0_scale)
        loc0, scale0 = loc[..., 0, :], scale[..., 0, :]
        lp0 = (-loc0 - math.log(s0) - 0.5 * math.log(2 * math.pi)
               - 0.5 * ((loc0 - mu0).pow(2) + scale0.pow(2)) / s0**2).sum(-1)
        mean, var = lognormal_moments(loc, scale)
        return lp0 + self.transition.expected_log_prob(self._part(theta, "transition."),
                                                       mean, var, matrices)

    def emission_expected_log_prob(self, counts, loc, scale, log_norm=None) -> torch.Tensor:
        """``E_q[log p_cf(m | X)]`` per sequence under ``q(X) = LogNormal(loc, scale)``, each
        ``(n_sequences, n_times, n_bins)``; returns ``(n_sequences,)``. Emissions without a
        closed form have no such term (``None``). ``log_norm``: the emission's
        ``log_normalizer(counts)`` ``(n_sequences, n_times)``, where the caller holds it."""
        if not hasattr(self.emission, "expected_log_prob"):
            return None
        if log_norm is None:
            return self.emission.expected_log_prob(counts, loc, scale).sum(-1)
        return self.emission.expected_log_prob(counts, loc, scale, log_norm).sum(-1)

    def vo_sigma(self, vo: VirtualObservable, theta, max_total: float | None, like):
        """σ_c of ``vo``: its learned site, or its tolerance at the current annealing
        progress for data of at most ``max_total`` particles per snapshot."""
        sigma = theta.get(f"vo.{vo.name}.sigma")
        return like.new_tensor(vo.tolerance(max_total)) if sigma is None else sigma.to(like)

    def _vo_factors(self, x, theta, event_dim, max_total, suffix=""):
        for vo in self.virtual_observables:
            sigma = self.vo_sigma(vo, theta, max_total, x)
            c = vo(x)
            fn = dist.Normal(c, sigma).to_event(event_dim)
            infer = {}
            if vo.affine is not None:  # closed form for AnalyticTraceELBO
                infer["expected_log_prob"] = (
                    lambda loc, scale, vo=vo, sigma=sigma:
                    vo.expected_log_prob(sigma, loc, scale, event_dim)
                )
            pyro.sample(f"vo.{vo.name}{suffix}", fn, obs=torch.zeros_like(c), infer=infer)

    def max_total(self, totals: torch.Tensor) -> float | None:
        """The largest snapshot's particles, for the mass constraint's σ_c cap (eq. 17)."""
        return float(totals.max()) if self.emission.needs_mass_constraint else None

    # ----------------------------------------------------------------- the model
    def forward(
        self,
        counts: torch.Tensor | None = None,
        totals: torch.Tensor | None = None,
        n_times: int | None = None,
        forecast: int = 0,
        subsample_size: int | None = None,
        resample_observed: bool = False,
    ):
        """Run the generative model.

        :param counts: observed bin counts ``(n_sequences, n_times, n_bins)`` (float tensor), or
            ``None`` to sample from the prior (then ``totals`` and ``n_times`` are required).
        :param totals: particles per sequence ``(n_sequences,)``; default ``counts[:, 0].sum(-1)``.
        :param forecast: number of coarse steps ``P`` to roll past the last snapshot.
        :param subsample_size: mini-batch size over sequences (``None``: all).
        :param resample_observed: sample the ``counts`` sites from p_cf even where observed
            (``poutine.uncondition``: posterior predictive reconstruction of the FG bin
            counts).
        :returns: the states ``X`` of shape ``(n_sequences, n_times + P, n_bins)``.
        """
        if counts is not None:
            dtype, device = counts.dtype, counts.device
            n_seq, n_times, n_bins = counts.shape
            if n_bins != self.n_bins:
                raise ValueError(f"counts has {n_bins} bins, the model has {self.n_bins}")
            if totals is None:
                totals = counts[:, 0].sum(-1)
        else:
            if totals is None or n_times is None:
                raise ValueError("without counts, pass totals (n_sequences,) and n_times")
            dtype, device = totals.dtype, totals.device
            n_seq = totals.shape[0]
        theta = self.sample_theta(torch.zeros((), dtype=dtype, device=device))
        max_total = self.max_total(totals)
        trans_theta = self._part(theta, "transition.")
        emis_theta = self._part(theta, "emission.")

        with pyro.plate("sequences", n_seq, subsample_size=subsample_size, dim=-1) as idx:
            obs = None if counts is None else counts[idx]
            resample = poutine.uncondition() if resample_observed else nullcontext()
            n_tot = totals[idx]

            order = getattr(self.transition, "order", 1)

            def step(x, *older):
                return self.transition(x, trans_theta, n_tot, x_prev=older or None)

            if self.vectorized:
                X = pyro.sample("X", self.state_chain(theta, n_tot, n_times, dtype))
                infer = {}
                if obs is not None and hasattr(self.emission, "expected_log_prob"):
                    infer["expected_log_prob"] = (  # closed form for AnalyticTraceELBO
                        lambda loc, scale: self.emission_expected_log_prob(obs, loc, scale)
                    )
                with resample:
                    pyro.sample(
                        "counts", self.emission(X, n_tot.unsqueeze(-1), emis_theta).to_event(1),
                        obs=obs, infer=infer,
                    )
                self._vo_factors(X, theta, event_dim=2, max_total=max_total)
            else:
                states, prev = [], None
                for t in pyro.markov(range(n_times), history=order):
                    if t == 0:
                        fn = self.initial(idx.shape, dtype, device)
                    else:  # a law of order k sees X_{-1} = ... = X_0 at first (MarkovChain)
                        fn = step(*[states[max(t - m, 0)] for m in range(1, order + 1)])
                    prev = pyro.sample(f"X_{t}", fn)
                    with resample:
                        pyro.sample(
                            f"counts_{t}", self.emission(prev, n_tot, emis_theta),
                            obs=None if obs is None else obs[..., t, :],
                        )
                    self._vo_factors(prev, theta, event_dim=1, max_total=max_total,
                                     suffix=f"_{t}")
                    states.append(prev)
                X = torch.stack(states, -2)
            if forecast:
                if order > 1:  # the last k states, X_0 repeated before the start
                    last = torch.arange(X.shape[-2] - order, X.shape[-2]).clamp_min(0)
                    start = X[..., last.to(X.device), :]
                else:
                    start = X[..., -1, :]
                Xf = pyro.sample("X_forecast", MarkovChain(step, forecast, start=start,
                                                           order=order))
                pyro.sample(
                    "counts_forecast",
                    self.emission(Xf, n_tot.unsqueeze(-1), emis_theta).to_event(1),
                )
                X = torch.cat([X, Xf], -2)
        return X
