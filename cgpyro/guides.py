"""Variational families q(X, θ) for :class:`~cgpyro.model.CGModel`."""

from __future__ import annotations

import math
import operator

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_value,
)
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam
from torch import nn

__all__ = [
    "AmortizedGuide",
    "CGAutoGuide",
    "LogNormalGuide",
    "auto_guide",
    "guide_for_new_sequences",
    "init_states_from_counts",
    "theta_map",
]


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


def own_params(guide) -> None:
    """Bind ``guide`` to the current values of its parameters in Pyro's global param store.

    Every fit starts with ``pyro.clear_param_store()``; without this a guide fitted earlier
    would silently read the parameters of whatever was fitted last under the same names. A bound
    guide puts its own tensors back into the store whenever it is called.
    """
    store = pyro.get_param_store()
    mine = (f"{guide.prefix}.", f"{guide.prefix}$$$")
    if getattr(guide, "theta_values", None) is None:
        mine += ("theta.",)
    guide._owned_params = {
        "params": {n: store._params[n] for n in store.keys() if n.startswith(mine)},
        "constraints": {n: store._constraints[n] for n in store.keys() if n.startswith(mine)},
    }


def _rebind(guide) -> None:
    owned = getattr(guide, "_owned_params", None)
    if not owned:
        return
    store = pyro.get_param_store()
    if any(store._params.get(n) is not v for n, v in owned["params"].items()):
        store.set_state(owned)


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
                    f"theta.{name}", lambda n=name: init[n].to(dtype=dtype, device=device),  # noqa: B023 (called at once)
                    constraint=prior.support,
                )
            pyro.sample(name, dist.Delta(value, event_dim=prior.event_dim))

    def theta_map(self) -> dict[str, torch.Tensor]:
        """The MAP estimates θ_MAP (detached), by site name; fixed sites included."""
        _rebind(self)
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
        _rebind(self)
        store = pyro.get_param_store()
        return store[f"{self.prefix}.X_loc"].detach(), store[f"{self.prefix}.X_scale"].detach()

    def __call__(self, counts=None, totals=None, n_times=None, forecast=0, subsample_size=None,
                 resample_observed=False):
        _rebind(self)
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


class AmortizedGuide:
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

    Parameters: the network, registered as ``pyro.module(prefix, net)`` (params
    ``{prefix}$$$...``), and ``theta.{site}`` for every unfixed parameter site (as in
    :class:`LogNormalGuide`). Works with the vectorized (site ``X``) and the Markov form (sites
    ``X_{t}``) of the model.

    :param model: the :class:`~cgpyro.model.CGModel`.
    :param counts: training counts ``(n_sequences, n_times, n_bins)``: they fix dtype and device
        and are the default of :meth:`states`.
    :param theta_init: initial θ by site name (default: ``model.init_values()``).
    :param hidden: width of the two hidden layers (int) or the list of widths.
    :param window: half-width ``w`` of the window of snapshots seen per time (``>= 0``).
    :param theta_values: if given, θ is fixed to these values and has no ``pyro.param``.
    """

    def __init__(self, model, counts: torch.Tensor, theta_init=None, hidden=64, window: int = 3,
                 prefix: str = "amortized", theta_values=None):
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
        self.model = model
        self.counts = counts
        self.n_sequences, self.n_times, self.n_bins = counts.shape
        self.hidden, self.window, self.prefix = hidden, window, prefix
        self.theta_init, self.theta_values = theta_init, theta_values
        n_features = (2 * window + 1) * self.n_bins + 2 * window + 1
        self.net = _AmortizedNet(n_features, self.n_bins, hidden).to(
            dtype=counts.dtype, device=counts.device
        )

    @property
    def device(self) -> torch.device:
        return self.counts.device

    # -- θ: the same Delta sites and ``theta.{site}`` params as LogNormalGuide ---------------
    _theta = LogNormalGuide._theta
    theta_map = LogNormalGuide.theta_map

    # -- q(X) ----------------------------------------------------------------------------
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
        _rebind(self)
        with torch.no_grad():
            pyro.module(self.prefix, self.net)  # load the trained weights from the param store
            return self._loc_scale(self.counts if counts is None else counts)

    def __call__(self, counts=None, totals=None, n_times=None, forecast=0, subsample_size=None,
                 resample_observed=False):
        _rebind(self)
        if counts is None:
            raise ValueError("the amortized guide needs the observed counts")
        self._theta(counts.dtype, counts.device)
        pyro.module(self.prefix, self.net)
        n_seq, n_times = counts.shape[:2]
        with pyro.plate("sequences", n_seq, subsample_size=subsample_size, dim=-1) as idx:
            loc, scale = self._loc_scale(counts[idx])
            if self.model.vectorized:
                pyro.sample("X", dist.LogNormal(loc, scale).to_event(2))
            else:
                for t in pyro.markov(range(n_times)):
                    pyro.sample(f"X_{t}", dist.LogNormal(loc[:, t], scale[:, t]).to_event(1))


# =========================================================================== Pyro autoguides
class _ThetaDelta(AutoDelta):
    """``AutoDelta`` whose params are named ``theta.{site}``, as in :class:`LogNormalGuide`.

    The name matters beyond cosmetics: ``SVIInference`` gives params named ``theta.*`` their
    own step size ``lr_theta``.
    """

    def _pyro_set_supermodule(self, name, context):
        super()._pyro_set_supermodule("theta", context)


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


class CGAutoGuide(AutoGuideList):
    """The ``AutoGuideList`` built by :func:`auto_guide`: part 0 is MAP θ, part 1 q(X)."""

    def __init__(self, model, cg_model, theta_sites: list[str]):
        super().__init__(model)
        self.cg_model_ref = (cg_model,)  # a tuple: not registered as a submodule
        self.theta_sites = list(theta_sites)

    def _parts(self):
        if self.prototype_trace is None:
            raise ValueError("the autoguide has no parameters yet: train it (or call it) first")
        parts = list(self)
        return (parts[0] if self.theta_sites else None), parts[-1]

    def theta_map(self) -> dict[str, torch.Tensor]:
        """The MAP estimates θ_MAP (detached), by site name; fixed sites included."""
        _rebind(self)
        theta_part, _ = self._parts()
        out = {name: operator.attrgetter(name)(theta_part).detach() for name in self.theta_sites}
        out.update(self.cg_model_ref[0].fixed)
        return out

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of the marginals of ``log X``, each ``(n_seq, n_times, n_bins)``."""
        _rebind(self)
        _, part = self._parts()
        with torch.no_grad():
            if isinstance(part, AutoNormal):
                return part._get_loc_and_scale("X")
            loc, scale = part._loc_scale()
            site = part.prototype_trace.nodes["X"]
            return loc.detach().reshape(site["value"].shape), scale.detach().reshape(
                site["value"].shape)


def auto_guide(model, counts: torch.Tensor, theta_init=None, kind: str = "normal",
               rank: int = 10) -> CGAutoGuide:
    """A Pyro autoguide: ``AutoDelta`` (MAP) on θ and ``AutoNormal`` or a low-rank MVN on ``X``.

    The states are Gaussian in ``log X`` (the support of ``X`` is positive), initialized like
    :class:`LogNormalGuide` from the counts. ``kind="lowrank"`` uses
    ``AutoLowRankMultivariateNormal`` of the given ``rank`` over all states of all sequences
    (correlations across time and bins), so its size grows as ``n_seq · n_times · n_bins · rank``.
    θ params are named ``theta.{site}`` as in :class:`LogNormalGuide`. Vectorized models only.

    :param counts: ``(n_sequences, n_times, n_bins)``; the guide is tied to these sequences.
    """
    if not model.vectorized:
        raise ValueError("auto_guide needs the vectorized model (vectorized = true)")
    if kind not in ("normal", "lowrank"):
        raise ValueError(f"kind must be 'normal' or 'lowrank', got {kind!r}")
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    dtype, device = counts.dtype, counts.device
    theta_init = theta_init or model.init_values(dtype=dtype)
    theta_sites = [name for name in model.priors() if name not in model.fixed]
    loc, scale = init_states_from_counts(counts)
    values = {name: theta_init[name].to(dtype=dtype, device=device) for name in theta_sites}
    values["X"] = loc.exp()  # the median of the lognormal start
    init_fn = init_to_value(values=values)
    # Every prototype run of the model uses these values (never a draw from the wide prior).
    initialized = InitMessenger(init_fn)(model)
    guide = CGAutoGuide(initialized, model, theta_sites)
    guide.device = device  # where the guide's params live (read by prediction code)
    if theta_sites:
        guide.append(_ThetaDelta(poutine.block(initialized, expose=theta_sites),
                                 init_loc_fn=init_fn))
    states_model = poutine.block(initialized, expose=["X"])
    if kind == "normal":
        guide.append(_StatesNormal(states_model, init_loc_fn=init_fn, init_scales={"X": scale}))
    else:
        guide.append(AutoLowRankMultivariateNormal(
            states_model, init_loc_fn=init_fn, init_scale=float(scale.median()), rank=rank))
    return guide


# =========================================================================== helpers
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
