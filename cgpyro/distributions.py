"""Distributions used by the CG state-space model.

Shapes follow the package convention: a trailing ``bin`` axis (event), optionally preceded by a
``time`` axis (event in the time-vectorized form) and a ``sequence`` axis (batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import Distribution

__all__ = ["BinCounts", "MarkovChain", "lognormal_moments"]


def lognormal_moments(loc: torch.Tensor, scale: torch.Tensor):
    """``(E[X], Var[X])`` of ``LogNormal(loc, scale)``, elementwise."""
    s2 = scale.pow(2)
    mean = torch.exp(loc + 0.5 * s2)
    return mean, torch.expm1(s2) * mean.pow(2)


class BinCounts(TorchDistribution):
    r"""Counts of FG particles in CG bins given the CG state, eq. 17 of the paper.

    ``log p(m | X) = log N! - Σ_j log m_j! + Σ_j m_j log X_j``

    written as in the paper with the *unnormalized* ``X``: nothing here forces ``Σ_j X_j = 1``;
    it is the mass virtual observable (eq. 18) that normalizes ``X``. With ``Σ X = 1`` this is
    the multinomial density. ``sample()`` draws ``Multinomial(N, X / Σ X)``, i.e. the FG bin
    counts reconstructed by p_cf (Algorithm 1, step 5).

    :param x: CG state ``X``, positive, shape ``(..., n_bins)``.
    :param total_count: particles ``N`` per FG state, shape broadcastable to ``x.shape[:-1]``.
    """

    # Not validated as positive: forward samples under a drift can step below 0; sample() clamps.
    arg_constraints = {"x": constraints.independent(constraints.real, 1)}
    support = constraints.independent(constraints.nonnegative_integer, 1)
    has_rsample = False

    def __init__(self, x: torch.Tensor, total_count, validate_args=None):
        total_count = torch.as_tensor(total_count, dtype=x.dtype, device=x.device)
        batch_shape = torch.broadcast_shapes(x.shape[:-1], total_count.shape)
        self.x = x.expand(batch_shape + x.shape[-1:])
        self.total_count = total_count.expand(batch_shape)
        super().__init__(batch_shape, x.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return BinCounts(
            self.x.expand(batch_shape + self.event_shape), self.total_count.expand(batch_shape)
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        norm = torch.lgamma(value.sum(-1) + 1) - torch.lgamma(value + 1).sum(-1)
        # xlogy: an empty bin contributes 0 even where X underflows to 0.
        return norm + torch.xlogy(value, self.x).sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return self.total_count.unsqueeze(-1) * self.x / self.x.sum(-1, keepdim=True)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:  # noqa: B008
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            # float64 keeps counts up to 2**53 exact (the float32 grid is 64 particles wide at 1e9).
            p = self.x.clamp_min(0).to(torch.float64)
            p = (p / p.sum(-1, keepdim=True)).expand(shape)
            remaining = self.total_count.to(torch.float64).expand(shape[:-1]).clone()
            tail = torch.ones_like(remaining)
            out = torch.empty(shape, dtype=torch.float64, device=p.device)
            # Multinomial by conditional binomials: torch's Multinomial needs one scalar N.
            for j in range(shape[-1] - 1):
                q = (p[..., j] / tail.clamp_min(1e-300)).clamp(0.0, 1.0)
                n_j = torch.binomial(remaining, q)
                out[..., j] = n_j
                remaining = remaining - n_j
                tail = tail - p[..., j]
            out[..., -1] = remaining
        return out.to(self.x.dtype)


class MarkovChain(TorchDistribution):
    r"""Joint density of a Markov chain of order ``k ≥ 1``, vectorized over time.

    ``p(X_{0:T-1}) = p_0(X_0) Π_{t≥1} p(X_t | X_{t-1}, ..., X_{t-k})`` with event shape
    ``(n_steps, n_bins)``. With ``order > 1`` the step also sees earlier states (a memory of the
    unresolved sub-bin state); the first transitions, which have no states before ``X_0``, see
    ``X_{-1} = ... = X_{-k+1} = X_0``. With ``start`` given instead of ``init``, the chain is
    ``X_{1:n}`` continuing from known states (used for forecasts):
    ``Π_{t=1}^{n} p(X_t | X_{t-1}, ...)``.

    :param step: ``step(X_{t-1}, X_{t-2}, ..., X_{t-k})`` (newest first; one argument for
        order 1), each ``(..., n_bins)``, returns the distribution of ``X_t`` (event shape
        ``(n_bins,)``); it must broadcast over leading axes.
    :param n_steps: number of states in the event.
    :param init: distribution of ``X_0`` (event ``(n_bins,)``), or ``None`` with ``start``.
    :param start: known states preceding the chain, ``(..., n_bins)`` (the last one) or, for
        order ``k > 1``, ``(..., k, n_bins)`` (the last ``k``, oldest first).
    :param order: ``k``, a positive integer.
    :param expected_log_prob: optional ``fn(loc, scale)``: ``E_q[log p(X)]`` per batch element
        under a mean-field ``q(X) = LogNormal(loc, scale)`` of the event's shape, where the
        law has a closed form (read by :class:`~cgpyro.elbo.AnalyticTraceELBO`; a latent
        site's ``infer`` dict is the guide's under ``poutine.replay``, so it lives here).
    """

    arg_constraints = {}
    support = constraints.independent(constraints.positive, 2)
    has_rsample = False

    def __init__(
        self,
        step: Callable[..., Distribution],
        n_steps: int,
        init: Distribution | None = None,
        start: torch.Tensor | None = None,
        order: int = 1,
        validate_args=None,
        expected_log_prob: Callable | None = None,
    ):
        assert (init is None) != (start is None), "MarkovChain takes exactly one of init, start"
        self.expected_log_prob = expected_log_prob
        assert isinstance(order, int) and order >= 1, f"order must be a positive int, got {order}"
        self.step, self.n_steps, self.init, self.order = step, int(n_steps), init, order
        assert start is None or order == 1 or (start.dim() >= 2 and start.shape[-2] == order), \
            f"an order-{order} chain starts from the last {order} states (..., {order}, " \
            f"n_bins), got {None if start is None else tuple(start.shape)}"
        self.start = start
        if init is not None:
            batch_shape, n_bins = init.batch_shape, init.event_shape[-1]
        else:
            batch_shape = start.shape[:-2] if order > 1 else start.shape[:-1]
            n_bins = start.shape[-1]
        super().__init__(
            batch_shape, torch.Size([self.n_steps, n_bins]), validate_args=False
        )

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if self.init is not None:
            # the closed form holds for the batch it was built for (plates expand to the same)
            same = batch_shape == self.batch_shape
            return MarkovChain(self.step, self.n_steps, init=self.init.expand(batch_shape),
                               order=self.order,
                               expected_log_prob=self.expected_log_prob if same else None)
        event = self.start.shape[-2:] if self.order > 1 else self.start.shape[-1:]
        start = self.start.expand(batch_shape + event)
        return MarkovChain(self.step, self.n_steps, start=start, order=self.order)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        k = self.order
        if self.init is not None:
            lp = self.init.log_prob(value[..., 0, :])
            # X_{-1} = ... = X_0; order 1 needs no copy (the default, on every SVI step)
            states = value if k == 1 else torch.cat([value[..., :1, :]] * (k - 1) + [value], -2)
        else:
            lp = 0.0
            start = self.start if k > 1 else self.start.unsqueeze(-2)
            states = torch.cat([start.expand(*value.shape[:-2], *start.shape[-2:]), value], -2)
        # states = [X_{-k+1} .. X_{T-1}] (init) or [start..., X_1 .. X_n]; predict the
        # ``n_next`` last ones from the ``k`` before each.
        n_next = value.shape[-2] - (1 if self.init is not None else 0)
        if n_next > 0:
            T = states.shape[-2]
            nxt = states[..., T - n_next:, :]
            # Time leads, so batch axes of θ (particles, Predictive samples) stay aligned
            # with the batch axes of the states when ``step`` broadcasts them.
            args = [states[..., T - n_next - m:T - m, :].movedim(-2, 0) for m in range(1, k + 1)]
            lp = lp + self.step(*args).log_prob(nxt.movedim(-2, 0)).sum(0)
        return lp

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:  # noqa: B008
        sample_shape = torch.Size(sample_shape)
        k = self.order
        with torch.no_grad():
            if self.init is not None:
                x = self.init.sample(sample_shape)
                states, history = [x], [x] * k
            else:
                start = self.start.expand(sample_shape + self.start.shape)
                states = []
                history = list(start.unbind(-2)) if k > 1 else [start]
            while len(states) < self.n_steps:
                nxt = self.step(*history[:-k - 1:-1]).sample()  # newest first
                states.append(nxt)
                history.append(nxt)
        return torch.stack(states, -2)
