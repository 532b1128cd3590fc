"""Variational families q(X, θ) for :class:`~cgpyro.model.CGModel`, as ``PyroModule``\\ s.

Every guide is a container module in the style of Pyro's ``AutoGuideList``: a MAP part
``theta`` (:class:`ThetaMAP`: a Delta per unfixed θ site) and a part for the states X. The
parameters are the modules' own ``PyroParam``\\ s, named ``theta.{site}`` and ``{prefix}.…`` in
Pyro's param store; all guides follow the :class:`CGGuide` protocol.
"""

from __future__ import annotations

import math
import operator
from typing import Protocol, runtime_checkable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal, init_to_value
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam, pyro_method
from pyro.nn.module import to_pyro_module_
from torch import nn

__all__ = [
    "AmortizedGuide",
    "CGAutoGuide",
    "CGGuide",
    "LogNormalGuide",
    "ThetaMAP",
    "auto_guide",
    "guide_for_new_sequences",
    "init_states_from_counts",
    "theta_map",
    "training_pair",
]


@runtime_checkable
class CGGuide(Protocol):
    """What cgpyro's training, prediction and diagnostics need of a guide.

    ``theta`` is the MAP part (its parameters get their own step size ``lr_theta``); ``X`` in
    :meth:`median` / :meth:`quantiles` are the states ``(n_sequences, n_times, n_bins)`` (also
    for the Markov form of the model, whose sites are ``X_0 … X_{T-1}``).
    """

    theta: ThetaMAP

    def __call__(self, counts=None, totals=None, n_times=None, forecast=0,
                 subsample_size=None, resample_observed=False) -> None:
        """Sample θ (Delta sites) and X, given the model's arguments."""

    def theta_map(self) -> dict[str, torch.Tensor]:
        """θ_MAP (detached) by site name, fixed sites included."""

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of ``log X``, each ``(n_sequences, n_times, n_bins)``."""

    def median(self) -> dict[str, torch.Tensor]:
        """θ_MAP and the median of X, by site name."""

    def quantiles(self, quantiles) -> dict[str, torch.Tensor]:
        """Per site, the quantiles stacked on a leading axis of ``len(quantiles)``."""


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


def own_parameters(guide: nn.Module) -> dict[str, torch.Tensor]:
    """Param-store name -> the guide's own (unconstrained) tensor, for a top-level guide."""
    return {name.removesuffix("_unconstrained"): p for name, p in guide.named_parameters()}


class ThetaMAP(PyroModule):
    """The MAP part of every guide: ``pyro.sample(site, Delta(θ_site))`` per unfixed θ site.

    One ``PyroParam`` per site, constrained to the prior's support and started at ``init``
    (default ``model.init_values()``); with ``values`` θ is held at those constants (no
    parameters), as for new sequences.

    Sites in ``held`` are the θ that empirical Bayes sets from the data (MAP-II): constant
    Delta sites marked ``is_auxiliary``, so that ``Predictive`` and replays of the model see
    their values, while training conditions and hides them in the model (they are no part of
    the ELBO; see :class:`~cgpyro.inference.SVIInference`).

    ``linear_posterior`` (set by :class:`~cgpyro.inference.SVIInference`): the Gaussian
    posterior behind the held linear part of a flux drift, ``(mean, Cholesky factor)``, for
    forecasts with epistemic uncertainty (``None``: none).

    :param like: a tensor of the guide's dtype and device.
    """

    def __init__(self, model, like: torch.Tensor, init=None, values=None, held=None):
        super().__init__()
        self.event_dims: dict[str, int] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.held = {k: v.to(like) for k, v in (held or {}).items()}
        self.linear_posterior = None
        for name, prior in model.priors(like.dtype, like.device).items():
            if name in model.fixed:
                continue
            self.event_dims[name] = prior.event_dim
            if name in self.held:
                continue
            if values is not None:
                self.constants[name] = values[name].to(like)
                continue
            if init is None:
                init = model.init_values(dtype=like.dtype)
            deep_setattr(self, name, PyroParam(init[name].to(like), prior.support,
                                               prior.event_dim))

    def _value(self, name: str) -> torch.Tensor:
        if name in self.held:
            return self.held[name]
        if name in self.constants:
            return self.constants[name]
        return operator.attrgetter(name)(self)

    def forward(self) -> None:
        for name, event_dim in self.event_dims.items():
            infer = {"is_auxiliary": True} if name in self.held else {}
            pyro.sample(name, dist.Delta(self._value(name), event_dim=event_dim), infer=infer)

    @pyro_method
    def learned(self) -> dict[str, torch.Tensor]:
        """θ_MAP of the sites this guide trains (neither held nor constant), by site name:
        the parameters themselves (differentiable; read as ``pyro.param``s, so that ``SVI``
        finds them)."""
        return {name: self._value(name) for name in self.event_dims
                if name not in self.held and name not in self.constants}

    def values(self) -> dict[str, torch.Tensor]:
        """θ_MAP (detached) of the unfixed sites, held ones included, by site name."""
        return {name: self._value(name).detach() for name in self.event_dims}


class _Guide(PyroModule):
    """A root module ``theta`` (:class:`ThetaMAP`) + a states part named ``prefix``: the
    parameters are ``theta.{site}`` and ``{prefix}.…`` in the param store."""

    def __init__(self, model, like: torch.Tensor, prefix: str):
        if not (isinstance(prefix, str) and prefix.isidentifier() and prefix != "theta"):
            raise ValueError(f"prefix must be a Python identifier other than 'theta', "
                             f"got {prefix!r}")
        super().__init__(name="")
        self._model = (model,)  # a tuple: the model (a PyroModule) is not part of the guide
        self._like = like.new_zeros(())  # dtype and device of the guide's tensors
        self.prefix = prefix
        self._called = False

    @property
    def model(self):
        return self._model[0]

    @property
    def device(self) -> torch.device:
        """Where the guide's parameters live."""
        return next(iter(self.parameters()), self._like).device

    @property
    def _states(self) -> nn.Module:
        return getattr(self, self.prefix)

    def __call__(self, *args, **kwargs):
        # PyroModule adopts the tensor the global param store holds under a parameter's name
        # (store -> module) and registers its own only where the name is free. A guide's first
        # call does just that (guides built side by side share θ, as pyro.param would), but
        # fits start with pyro.clear_param_store() and guides share names (theta.*, q.*): a
        # guide used before would then read, and train, whatever was fitted last. So from its
        # second call on a guide drops the store's entries of its names that hold other
        # tensors, and PyroModule puts its own back. (module_local_params is no option:
        # pyro.optim names parameters, for per-parameter step sizes and optimizer state,
        # through the global store.)
        self._own_store()
        return super().__call__(*args, **kwargs)

    def _own_store(self) -> None:
        """What a call does before it reads its parameters (see ``__call__``); also run by
        :class:`~cgpyro.elbo.FusedELBO`, which reads them without calling the guide."""
        if self._called:
            store = pyro.get_param_store()
            held = dict(store.named_parameters())
            for name, param in own_parameters(self).items():
                if name in held and held[name] is not param:
                    del store[name]
        self._called = True

    def theta_map(self) -> dict[str, torch.Tensor]:
        """θ_MAP (detached) by site name; fixed sites included."""
        return {**self.theta.values(), **self.model.fixed}

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of ``log X``, each ``(n_sequences, n_times, n_bins)``."""
        raise NotImplementedError

    def median(self) -> dict[str, torch.Tensor]:
        """θ_MAP and the median ``exp(loc)`` of X ``(n_sequences, n_times, n_bins)``."""
        return {**self.theta_map(), "X": self.states()[0].exp()}

    def quantiles(self, quantiles) -> dict[str, torch.Tensor]:
        """As Pyro's ``AutoGuide.quantiles``: site -> values ``(len(quantiles), *shape)``
        (θ: its MAP value repeated; X: the quantiles of its lognormal marginals)."""
        loc, scale = self.states()
        qs = torch.as_tensor(quantiles, dtype=loc.dtype, device=loc.device)
        if qs.dim() != 1 or not ((qs > 0) & (qs < 1)).all():
            raise ValueError(f"quantiles must be a list of numbers in (0, 1), got {quantiles!r}")
        out = {k: v.expand(len(qs), *v.shape) for k, v in self.theta_map().items()}
        out["X"] = (loc + scale * torch.special.ndtri(qs).reshape(-1, 1, 1, 1)).exp()
        return out


class _GatherRows(torch.autograd.Function):
    """``weight[idx]`` whose gradient is a sparse COO tensor of the rows ``idx`` only (what
    ``embedding(..., sparse=True)`` gives a 2-D weight, for a weight of any shape): the
    backward pass of a minibatch never touches the other rows."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.weight_shape = weight.shape
        return weight[idx]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(idx.unsqueeze(0), grad, ctx.weight_shape,
                                       check_invariants=False), None


class _LogNormalStates(PyroModule):
    """``X ~ LogNormal(X_loc, exp(X_log_scale))`` per sequence, time and bin, in the sequence
    plate.

    Both parameters are unconstrained, so that a minibatch step costs O(batch): only the
    batch's rows are gathered and exponentiated. With ``sparse_gradients`` (set by
    :class:`~cgpyro.inference.SVIInference` for minibatches) their gradients are sparse (the
    rows of the batch), to be stepped by a sparse optimizer (``torch.optim.SparseAdam``); off
    by default, so that a user's own ``SVI`` with ``pyro.optim.Adam`` and ``subsample_size``
    works. A step over all sequences is dense.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, vectorized: bool):
        super().__init__()
        self.X_loc = PyroParam(loc)
        self.X_log_scale = PyroParam(scale.log())
        self.vectorized = vectorized
        self.sparse_gradients = False

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of the sequences ``idx``, each ``(len(idx), n_times, n_bins)``."""
        loc, log_scale = self.X_loc, self.X_log_scale
        n = loc.shape[0]
        if len(idx) < n and self.sparse_gradients:
            return _GatherRows.apply(loc, idx), _GatherRows.apply(log_scale, idx).exp()
        if len(idx) < n:
            return loc[idx], log_scale[idx].exp()
        return loc[idx], log_scale.exp()[idx]

    def forward(self, subsample_size=None) -> None:
        n = self.X_loc.shape[0]
        with pyro.plate("sequences", n, subsample_size=subsample_size, dim=-1) as idx:
            loc, scale = self.rows(idx)
            if self.vectorized:
                pyro.sample("X", dist.LogNormal(loc, scale).to_event(2))
            else:
                for t in pyro.markov(range(loc.shape[1])):
                    pyro.sample(f"X_{t}", dist.LogNormal(loc[:, t], scale[:, t]).to_event(1))


class LogNormalGuide(_Guide):
    r"""The paper's mean-field guide (eq. 15, section 3.2).

    ``q(X, θ) = Π_i Π_t Π_j LogNormal(X_{i,t,j} | μ_{i,t,j}, s_{i,t,j}) · δ(θ - θ_MAP)``

    Parameters: ``{prefix}.X_loc`` and ``{prefix}.X_log_scale`` (the log of the scale) of
    shape ``(n_sequences, n_times, n_bins)``, and ``theta.{site}`` (the :class:`ThetaMAP` part) for
    every unfixed parameter site of the model that is not held. With ``theta_values`` θ is
    fixed (no θ parameters), which is how new sequences are fitted.

    :param model: the :class:`~cgpyro.model.CGModel`.
    :param counts: counts ``(n_sequences, n_times, n_bins)`` used to initialize q(X); they fix
        the guide's dtype and device.
    :param theta_init: initial values of θ by site name (default: ``model.init_values()``).
    :param theta_values: if given, θ is fixed to these values.
    :param theta_held: θ held at these values by site name (see :class:`ThetaMAP`).
    """

    def __init__(self, model, counts: torch.Tensor, theta_init=None, theta_values=None,
                 prefix: str = "q", theta_held=None):
        super().__init__(model, counts, prefix)
        self.n_sequences, self.n_times, self.n_bins = counts.shape
        self.theta = ThetaMAP(model, counts, theta_init, theta_values, theta_held)
        self.init_loc, scale = init_states_from_counts(counts)
        self.add_module(prefix, _LogNormalStates(self.init_loc, scale, model.vectorized))
        self.init_scale = scale

    @property
    def init_scale(self) -> torch.Tensor:
        """Initial scale of q(X); setting it restarts q(X)'s scale there."""
        return self._init_scale

    @init_scale.setter
    def init_scale(self, value: torch.Tensor) -> None:
        self._init_scale = value
        self._states.X_log_scale = PyroParam(value.log())

    @property
    def sparse_gradients(self) -> bool:
        """Minibatch steps give q(X)'s parameters sparse gradients (rows of the batch only),
        for ``torch.optim.SparseAdam``; :class:`~cgpyro.inference.SVIInference` turns it on
        for ``batch_size < n``. Off by default (``pyro.optim.Adam`` needs dense gradients)."""
        return self._states.sparse_gradients

    @sparse_gradients.setter
    def sparse_gradients(self, value: bool) -> None:
        self._states.sparse_gradients = bool(value)

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(X), each ``(n_sequences, n_times, n_bins)``."""
        return self._states.X_loc.detach(), self._states.X_log_scale.detach().exp()

    @pyro_method
    def loc_scale(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(X) of the sequences ``idx`` (a minibatch or all), each
        ``(len(idx), n_times, n_bins)``, differentiable in the parameters: what the guide's site
        ``X`` is built from, for :class:`~cgpyro.elbo.FusedELBO` (read as ``pyro.param``s, so
        that ``SVI`` finds them)."""
        return self._states.rows(idx)

    @pyro_method
    def loc_log_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The parameters ``(X_loc, X_log_scale)`` of all sequences, each ``(n_sequences,
        n_times, n_bins)`` (read as ``pyro.param``s), for :class:`~cgpyro.elbo.FusedELBO`'s
        exact form."""
        return self._states.X_loc, self._states.X_log_scale

    def forward(self, counts=None, totals=None, n_times=None, forecast=0, subsample_size=None,
                resample_observed=False) -> None:
        like = counts if counts is not None else totals
        n_times = counts.shape[1] if counts is not None else n_times
        self.theta()
        if (self.n_sequences, self.n_times) != (like.shape[0], n_times):
            raise ValueError(
                f"the guide was built for {(self.n_sequences, self.n_times)} (sequences, times); "
                f"got data with {like.shape[0]} sequences and {n_times} times"
            )
        self._states(subsample_size)


# =========================================================================== amortized guide
class _AmortizedNet(nn.Module):
    r"""Window features ``(..., n_features)`` -> ``(Δloc, Δlog-scale)`` each ``(..., n_bins)``.

    The output layer starts at zero, so the guide starts exactly at the empirical lognormal of
    :func:`init_states_from_counts` (the same start as :class:`LogNormalGuide`).
    """

    def __init__(self, n_features: int, n_bins: int, hidden: tuple[int, ...]):
        super().__init__()
        sizes = (n_features, *hidden)
        self.hidden = nn.ModuleList(
            nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.out = nn.Linear(sizes[-1], 2 * n_bins)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = features
        for layer in self.hidden:
            h = torch.nn.functional.silu(layer(h))
        d_loc, d_log_scale = self.out(h).chunk(2, dim=-1)
        return d_loc, d_log_scale


class AmortizedGuide(_Guide):
    r"""Amortized lognormal guide: a network maps the counts around each snapshot to q(X_t).

    ``q(X, θ) = Π_i Π_t LogNormal(X_{i,t} | μ_φ(m_{i,t-w:t+w}), s_φ(m_{i,t-w:t+w})) · δ(θ - θ_MAP)``

    (the amortized formulation mentioned in section 3.2 of the paper). For each (sequence, time)
    the network sees the log bin fractions of the snapshots ``t-w .. t+w`` (as differences to
    snapshot ``t``; the ends are padded by repeating the edge snapshot and flagged), the centred
    log fractions at ``t`` and ``log N``. It outputs a residual to the empirical start
    ``loc₀ = log((m + ½)/(N + ½ n_bins)) - s₀²/2``, ``s₀ = 1/sqrt(m + 1)`` (capped at 0.3):
    ``loc = loc₀ + Δloc``, ``scale = s₀ · exp(5 tanh(Δlog-scale / 5))``; the output layer starts
    at zero, so training starts where :class:`LogNormalGuide` starts.

    Because q(X) is a function of the counts, calling the guide with counts of *new* sequences
    gives their q(X) without any refit (e.g. ``forecast(model, guide, new_counts, H)``).

    Parameters: the network (a ``PyroModule`` submodule ``{prefix}``, params
    ``{prefix}.hidden.0.weight`` …) and ``theta.{site}`` for every unfixed parameter site (as in
    :class:`LogNormalGuide`). Works with the vectorized (site ``X``) and the Markov form (sites
    ``X_{t}``) of the model.

    :param model: the :class:`~cgpyro.model.CGModel`.
    :param counts: training counts ``(n_sequences, n_times, n_bins)``: they fix dtype and device
        and are the default of :meth:`states`.
    :param theta_init: initial θ by site name (default: ``model.init_values()``).
    :param hidden: width of the two hidden layers (int) or the list of widths.
    :param window: half-width ``w`` of the window of snapshots seen per time (``>= 0``).
    :param theta_values: if given, θ is fixed to these values.
    :param theta_held: θ held at these values by site name (see :class:`ThetaMAP`).
    """

    def __init__(self, model, counts: torch.Tensor, theta_init=None, hidden=64, window: int = 3,
                 prefix: str = "amortized", theta_values=None, theta_held=None):
        if isinstance(hidden, int):
            hidden = (hidden, hidden)
        hidden = tuple(hidden)
        if not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ValueError(f"hidden must be positive integers, got {hidden!r}")
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an integer >= 0, got {window!r}")
        if counts.dim() != 3 or counts.shape[-1] != model.n_bins:
            raise ValueError(f"counts must be (n_sequences, n_times, {model.n_bins}), "
                             f"got {tuple(counts.shape)}")
        super().__init__(model, counts, prefix)
        self.counts = counts
        self.n_sequences, self.n_times, self.n_bins = counts.shape
        self.hidden, self.window = hidden, window
        n_features = (2 * window + 1) * self.n_bins + 2 * window + 1
        net = _AmortizedNet(n_features, self.n_bins, hidden).to(dtype=counts.dtype,
                                                                device=counts.device)
        to_pyro_module_(net)  # in place: its layers' parameters are named {prefix}.…
        self.add_module(prefix, net)
        self.theta = ThetaMAP(model, counts, theta_init, theta_values, theta_held)

    @property
    def net(self) -> nn.Module:
        """The network (a ``PyroModule``)."""
        return self._states

    def features(self, counts: torch.Tensor) -> torch.Tensor:
        """Network inputs ``(n_sequences, n_times, (2w + 1) n_bins + 2w + 1)`` from counts."""
        S, T, B = counts.shape
        w = self.window
        totals = counts.sum(-1, keepdim=True)
        # Centred log fractions: about 0 for a uniform state, whatever n_bins.
        logf = torch.log((counts + 0.5) / (totals + 0.5 * B)) + math.log(B)
        parts = [logf]
        if w:
            padded = torch.nn.functional.pad(logf.transpose(1, 2), (w, w), mode="replicate")
            win = padded.unfold(-1, 2 * w + 1, 1)  # (S, B, T, 2w + 1)
            offsets = [k for k in range(2 * w + 1) if k != w]
            diffs = win[..., offsets] - logf.transpose(1, 2).unsqueeze(-1)  # (S, B, T, 2w)
            parts.append(diffs.permute(0, 2, 1, 3).reshape(S, T, B * 2 * w))
            t = torch.arange(T, device=counts.device).unsqueeze(-1)
            k = torch.tensor([o - w for o in offsets], device=counts.device)
            outside = ((t + k < 0) | (t + k >= T)).to(counts.dtype)  # (T, 2w): padded slots
            parts.append(outside.expand(S, T, 2 * w))
        parts.append(0.1 * totals.log())  # order one for N up to ~1e9
        return torch.cat(parts, -1)

    def _loc_scale(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if counts.dim() != 3 or counts.shape[-1] != self.n_bins:
            raise ValueError(f"counts must be (n_sequences, n_times, {self.n_bins}), "
                             f"got {tuple(counts.shape)}")
        counts = counts.to(dtype=self.counts.dtype, device=self.device)
        loc0, scale0 = init_states_from_counts(counts)
        d_loc, d_log_scale = self.net(self.features(counts))
        # Soft bound on the scale change: keeps exp() finite without cutting gradients.
        return loc0 + d_loc, scale0 * torch.exp(5.0 * torch.tanh(d_log_scale / 5.0))

    def states(self, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(X), each ``(n_sequences, n_times, n_bins)``, for ``counts``
        (default: the training counts)."""
        with torch.no_grad():
            return self._loc_scale(self.counts if counts is None else counts)

    def forward(self, counts=None, totals=None, n_times=None, forecast=0, subsample_size=None,
                resample_observed=False) -> None:
        if counts is None:
            raise ValueError("the amortized guide needs the observed counts")
        self.theta()
        n_seq, n_times = counts.shape[:2]
        with pyro.plate("sequences", n_seq, subsample_size=subsample_size, dim=-1) as idx:
            loc, scale = self._loc_scale(counts[idx])
            if self.model.vectorized:
                pyro.sample("X", dist.LogNormal(loc, scale).to_event(2))
            else:
                for t in pyro.markov(range(n_times)):
                    pyro.sample(f"X_{t}", dist.LogNormal(loc[:, t], scale[:, t]).to_event(1))


# =========================================================================== Pyro autoguides
class _StatesNormal(AutoNormal):
    """``AutoNormal`` whose scales start at the given tensors (site -> unconstrained scale)."""

    def __init__(self, model, *, init_loc_fn, init_scales: dict[str, torch.Tensor]):
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._init_scales = init_scales

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        for name, scale in self._init_scales.items():
            deep_setattr(self.scales, name,
                         PyroParam(scale, self.scale_constraint, self._event_dims[name]))


class CGAutoGuide(_Guide):
    """The guide built by :func:`auto_guide`: ``theta`` (:class:`ThetaMAP`) and a Pyro
    autoguide ``q`` on the states (params ``q.…``), composed as in ``AutoGuideList``."""

    def __init__(self, model, counts: torch.Tensor, theta_init=None, kind: str = "normal",
                 rank: int = 10, theta_held=None):
        super().__init__(model, counts, "q")
        self.theta = ThetaMAP(model, counts, theta_init, held=theta_held)
        loc, scale = init_states_from_counts(counts)
        values = {**self.theta.values(), "X": loc.exp()}  # X: the median of the lognormal start
        init_fn = init_to_value(values=values)
        # Every prototype run of the model uses these values (never a draw from the wide prior).
        states_model = poutine.block(InitMessenger(init_fn)(model), expose=["X"])
        if kind == "normal":
            self.q = _StatesNormal(states_model, init_loc_fn=init_fn, init_scales={"X": scale})
        else:
            self.q = AutoLowRankMultivariateNormal(
                states_model, init_loc_fn=init_fn, init_scale=float(scale.median()), rank=rank)

    def _trained(self) -> nn.Module:
        if self.q.prototype_trace is None:
            raise ValueError("the autoguide has no parameters yet: train it (or call it) first")
        return self.q

    def theta_map(self) -> dict[str, torch.Tensor]:
        """θ_MAP (detached) by site name; fixed sites included."""
        self._trained()
        return super().theta_map()

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of the marginals of ``log X``, each ``(n_seq, n_times, n_bins)``."""
        part = self._trained()
        with torch.no_grad():
            if isinstance(part, AutoNormal):
                return part.locs.X.detach(), part.scales.X.detach()
            posterior = part.get_posterior()
            shape = part.prototype_trace.nodes["X"]["value"].shape
            return posterior.loc.reshape(shape), posterior.variance.sqrt().reshape(shape)

    def forward(self, *args, **kwargs) -> None:
        self.theta()
        self.q(*args, **kwargs)


def auto_guide(model, counts: torch.Tensor, theta_init=None, kind: str = "normal",
               rank: int = 10, theta_held=None) -> CGAutoGuide:
    """A Pyro autoguide on ``X`` (``AutoNormal`` or a low-rank MVN) with MAP θ (:class:`ThetaMAP`).

    The states are Gaussian in ``log X`` (the support of ``X`` is positive), initialized like
    :class:`LogNormalGuide` from the counts. ``kind="lowrank"`` uses
    ``AutoLowRankMultivariateNormal`` of the given ``rank`` over all states of all sequences
    (correlations across time and bins), so its size grows as ``n_seq · n_times · n_bins · rank``.
    Vectorized models only.

    :param counts: ``(n_sequences, n_times, n_bins)``; the guide is tied to these sequences.
    :param theta_held: θ held at these values by site name (see :class:`ThetaMAP`).
    """
    if not model.vectorized:
        raise ValueError("auto_guide needs the vectorized model (vectorized = true)")
    if kind not in ("normal", "lowrank"):
        raise ValueError(f"kind must be 'normal' or 'lowrank', got {kind!r}")
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return CGAutoGuide(model, counts, theta_init, kind, rank, theta_held)


# =========================================================================== helpers
def training_pair(model, guide):
    """``(model, guide)`` to train with SVI: the θ the guide holds (``guide.theta.held``, set
    by empirical Bayes) conditioned and hidden in the model (``poutine.condition`` +
    ``poutine.block``) and hidden in the guide, so that they are constants outside the ELBO;
    ``model`` itself is not changed. What :class:`~cgpyro.inference.SVIInference` trains;
    use it for an SVI loop of one's own (``SVI(*training_pair(model, guide), optim, loss)``).
    """
    held = dict(getattr(getattr(guide, "theta", None), "held", None) or {})
    if not held:
        return model, guide
    return (poutine.block(poutine.condition(model, data=held), hide=list(held)),
            poutine.block(guide, hide=list(held)))


def theta_map(guide) -> dict[str, torch.Tensor]:
    """θ_MAP (detached, fixed sites included) of a :class:`LogNormalGuide`,
    :class:`AmortizedGuide` or :func:`auto_guide`."""
    if not hasattr(guide, "theta_map"):
        raise ValueError(f"{type(guide).__name__} has no MAP estimate of θ")
    return guide.theta_map()


def guide_for_new_sequences(inference, counts, steps: int | None = None):
    """A guide for sequences not seen in training, with θ at θ_MAP.

    The amortized guide needs no refit: it is returned as is (it maps any counts to q(X)).
    Otherwise q(X) of the new sequences is fitted by
    :meth:`~cgpyro.inference.SVIInference.infer_states` (a :class:`LogNormalGuide`).

    :param inference: a fitted :class:`~cgpyro.inference.SVIInference`.
    :param counts: the new sequences' counts ``(n_sequences, n_times, n_bins)``.
    """
    if inference.guide is None:
        raise ValueError("guide_for_new_sequences needs a fitted inference: call fit() first")
    if isinstance(inference.guide, AmortizedGuide):
        return inference.guide
    return inference.infer_states(counts, steps=steps)
