"""Transition laws p(X_{t+1} | X_t, θ_NN, σ_r) of the CG dynamics (eq. 4-5).

A transition is a ``PyroModule`` that declares its parameters θ as ``PyroSample`` attributes
(:class:`ThetaModule`; hyperpriors read other attributes) and evaluates the
density for given values of θ (:meth:`forward`, a dict by relative site name, so that θ may carry
leading axes of posterior draws). The model samples θ (MAP in the paper's guide); a fixed
value conditions its site and hides it (footnote 1 of the paper).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from pyro import distributions as dist
from pyro.distributions import constraints
from pyro.nn import PyroModule
from torch import nn

from ._sites import ThetaModule, const, like_kwargs

__all__ = ["ACTIVATIONS", "Drift", "FlatCholesky", "FlatPositive", "FluxDrift",
           "FilterDrift", "GaussianTransition", "SubgridDrift", "ThetaModule", "auto_radius",
           "displacement_width"]

ACTIVATIONS = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "elu": F.elu,
    "softplus": F.softplus,
    "silu": F.silu,
}


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # einsum broadcasts leading axes of x against (possibly batched) weights.
    return torch.einsum("...i,...oi->...o", x, weight) + bias


def _normal(shape, scale: float):
    """``N(0, scale)`` on every entry of a weight of ``shape`` (one site)."""
    shape = torch.Size(shape)
    return lambda _: dist.Normal(const(0.0), const(scale)).expand(shape).to_event(len(shape))


class _Layer(ThetaModule):
    """Sites ``weight`` and ``bias`` of one layer under ``N(0, scale)``."""

    def __init__(self, weight_shape, bias_shape, scale: float):
        super().__init__()
        self.declare("weight", _normal(weight_shape, scale))
        self.declare("bias", _normal(bias_shape, scale))


def _layers(shapes: dict, prefix: str, scale: float) -> PyroModule:
    """``{prefix}.{k}.weight`` / ``.bias`` sites of ``shapes`` as a module list of layers."""
    n = sum(1 for name in shapes if name.startswith(prefix + ".") and name.endswith(".weight"))
    return PyroModule[nn.ModuleList]([
        _Layer(shapes[f"{prefix}.{k}.weight"], shapes[f"{prefix}.{k}.bias"], scale)
        for k in range(n)])


class Drift(ThetaModule):
    r"""The right-hand side ``NN(X; θ_NN)`` of eq. 4, mapping ``(..., n_bins) -> (..., n_bins)``.

    ``NN(X) = [A X + b] + MLP(n_bins · X) / n_bins``

    - the MLP has ``hidden`` layers with ``activation`` (the paper: two layers of 25, ReLU); it
      sees ``n_bins · X`` (order-one inputs for bin fractions) and its output is scaled back by
      ``1 / n_bins``, a fixed affine reparametrization that leaves the function class unchanged;
    - ``linear_skip`` adds the linear map ``A X + b`` beside the MLP;
    - ``conserve_mass`` projects the drift onto ``Σ_j NN_j = 0`` so that the mean dynamics
      conserves ``Σ_j X_j`` exactly (the mass virtual observable then only has to hold at t=0).

    Sites (names relative to the drift), each under ``N(0, weight_prior_scale)``:
    ``linear.weight (B, B)``, ``linear.bias (B,)``, ``mlp.{k}.weight (out, in)``,
    ``mlp.{k}.bias (out,)``.
    """

    def __init__(
        self,
        n_bins: int,
        hidden: tuple[int, ...] = (25, 25),
        activation: str = "relu",
        linear_skip: bool = False,
        conserve_mass: bool = False,
        weight_prior_scale: float = 10.0,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not hidden and not linear_skip:
            raise ValueError("a drift needs hidden layers or linear_skip=true (or both)")
        self.n_bins = int(n_bins)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.linear_skip = bool(linear_skip)
        self.conserve_mass = bool(conserve_mass)
        self.weight_prior_scale = float(weight_prior_scale)
        shapes = self.shapes()
        if self.linear_skip:
            self.linear = _Layer(shapes["linear.weight"], shapes["linear.bias"],
                                 self.weight_prior_scale)
        if self.hidden:
            self.mlp = _layers(shapes, "mlp", self.weight_prior_scale)

    def shapes(self) -> dict[str, torch.Size]:
        """Shapes of the parameters θ_NN, by site name."""
        shapes = {}
        if self.linear_skip:
            shapes["linear.weight"] = torch.Size([self.n_bins, self.n_bins])
            shapes["linear.bias"] = torch.Size([self.n_bins])
        if self.hidden:
            sizes = (self.n_bins, *self.hidden, self.n_bins)
            for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
                shapes[f"mlp.{k}.weight"] = torch.Size([o, i])
                shapes[f"mlp.{k}.bias"] = torch.Size([o])
        return shapes

    def init_values(self, generator: torch.Generator | None = None, dtype=torch.float64):
        """PyTorch-default (Kaiming-uniform) initial values; the linear part starts at zero."""
        values = {}
        for name, shape in self.shapes().items():
            if name.startswith("linear"):
                values[name] = torch.zeros(shape, dtype=dtype)
                continue
            fan_in = self.shapes()[name.replace("bias", "weight")][1]
            bound = 1.0 / math.sqrt(fan_in)
            u = torch.rand(shape, generator=generator, dtype=dtype)
            values[name] = (2 * u - 1) * bound
        return values

    def forward(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        out = 0.0
        if self.linear_skip:
            out = _affine(x, theta["linear.weight"], theta["linear.bias"])
        if self.hidden:
            act = ACTIVATIONS[self.activation]
            h = x * self.n_bins
            n_layers = len(self.hidden) + 1
            for k in range(n_layers):
                h = _affine(h, theta[f"mlp.{k}.weight"], theta[f"mlp.{k}.bias"])
                if k < n_layers - 1:
                    h = act(h)
            out = out + h / self.n_bins
        if self.conserve_mass:
            out = out - out.mean(-1, keepdim=True)
        return out


class FlatCholesky(dist.ImproperUniform):
    """Flat (improper) prior on ``(n, n)`` Cholesky factors: ``log p = 0``, so MAP = ML.

    ``sample()`` returns ``1e-3 · I`` instead of failing, so that runs of the model from its
    prior (e.g. Predictive's probe of the plate nesting) work.
    """

    def __init__(self, n: int, dtype=torch.float64, device=None, batch_shape=torch.Size()):  # noqa: B008
        super().__init__(constraints.lower_cholesky, batch_shape, torch.Size([n, n]))
        self._n, self._dtype, self._device = n, dtype, device
        self._eye = torch.eye(n, dtype=dtype, device=device)

    def expand(self, batch_shape, _instance=None):
        return FlatCholesky(self._n, self._dtype, self._device, torch.Size(batch_shape))

    def sample(self, sample_shape=torch.Size()):  # noqa: B008 (torch's own signature)
        return (1e-3 * self._eye).expand(self.shape(sample_shape))


class FlatPositive(dist.ImproperUniform):
    """Flat (improper) prior on a positive scalar: ``log p = 0``, for a constant that empirical
    Bayes sets from the data (its MAP-II value is held). ``sample()`` returns 1."""

    def __init__(self, dtype=torch.float64, device=None, batch_shape=torch.Size()):  # noqa: B008
        super().__init__(constraints.positive, batch_shape, torch.Size())
        self._dtype, self._device = dtype, device

    def expand(self, batch_shape, _instance=None):
        return FlatPositive(self._dtype, self._device, torch.Size(batch_shape))

    def sample(self, sample_shape=torch.Size()):  # noqa: B008 (torch's own signature)
        return torch.ones(self.shape(sample_shape), dtype=self._dtype, device=self._device)


class GaussianTransition(ThetaModule):
    r"""``p(X_{t+1} | X_t) = N(X_t + NN(X_t; θ_NN), Σ_r)`` (eq. 5), event shape ``(n_bins,)``.

    - ``noise="isotropic"`` (the paper): ``Σ_r = σ_r² I``; site ``sigma_r`` (scalar, prior
      ``HalfCauchy(sigma_prior_scale)``, flat near zero so its MAP is data-driven);
    - ``noise="full"``: ``Σ_r = σ_r² L Lᵀ`` with a learned Cholesky factor ``L`` of order one,
      site ``noise_tril`` ``(n_bins, n_bins)`` under a flat prior (its MAP is the maximum
      likelihood), beside ``sigma_r``; the split keeps Adam's steps relative to the scale.
      Particles hop between neighbouring bins, so the CG fluctuations are anti-correlated
      between neighbours and nearly absent from the mass and the slow modes; an isotropic σ_r
      puts noise there, where it accumulates and widens long forecast bands. The learned
      covariance narrows them, at a cost: the tight slow modes make q(X_T) follow the dynamics
      rather than the last snapshot (see benchmarks/results.md).

    ``forecast_noise`` (default ``True``, Algorithm 1): whether forecast bands roll the law with
    this noise (:func:`~cgpyro.predict.forecast`), or draw p_cf around its noise-free
    continuation (``False``: for a σ_r fixed as a smoothing device, ``sigma_r_multinomial``,
    rather than estimated as the law's error).

    Sites: ``drift.*`` (see :class:`Drift`), ``sigma_r`` and (full noise) ``noise_tril``.
    """

    def __init__(self, drift: Drift, sigma_prior_scale: float = 0.1, noise: str = "isotropic",
                 noise_ridge: float = 1e-4, sigma_r_multinomial: float | None = None,
                 forecast_noise: bool = True):
        super().__init__()
        if noise not in ("isotropic", "full"):
            raise ValueError(f"noise must be 'isotropic' or 'full', got {noise!r}")
        self.drift = drift
        self.sigma_prior_scale = float(sigma_prior_scale)
        self.noise = noise
        if not noise_ridge > 0:
            raise ValueError(f"noise_ridge must be positive, got {noise_ridge!r}")
        self.noise_ridge = float(noise_ridge)
        if sigma_r_multinomial is not None and not sigma_r_multinomial > 0:
            raise ValueError(f"sigma_r_multinomial must be positive, got {sigma_r_multinomial!r}")
        self.sigma_r_multinomial = sigma_r_multinomial
        if not isinstance(forecast_noise, bool):
            raise ValueError(f"forecast_noise must be True or False, got {forecast_noise!r}")
        self.forecast_noise = forecast_noise
        self._affine_cache = None  # (dtype/device, θ tensors and versions, affine_matrices)
        self.declare("sigma_r", lambda self: dist.HalfCauchy(const(self.sigma_prior_scale)))
        if noise == "full":
            self.declare("noise_tril", lambda self: FlatCholesky(self.drift.n_bins,
                                                                 **like_kwargs()))

    def calibrated_sigma(self, counts: torch.Tensor) -> torch.Tensor | None:
        """σ_r fixed at ``sigma_r_multinomial`` x the per-bin multinomial std of ``counts``.

        ``sqrt(mean_j X̄_j (1 - X̄_j) / N̄)`` over the data ``(n_seq, n_times, n_bins)``. Why:
        p_cf (eq. 17) already redraws the FG state's intrinsic fluctuation at every step, and the
        MAP σ_r learns that same fluctuation again from one-step residuals, so Algorithm 1's
        bands count it twice and widen like a random walk in the slow modes. ``None`` when
        σ_r is learned.
        """
        if self.sigma_r_multinomial is None:
            return None
        totals = counts.sum(-1, keepdim=True)
        frac = counts / totals
        var = (frac * (1 - frac) / totals).mean()
        # Floor: all particles in one bin (e.g. N = 1) give var = 0 and a degenerate Normal;
        # keep at least 1e-3 of the multinomial std of uniform fractions.
        B = counts.shape[-1]
        floor = 1e-6 * (1 / B) * (1 - 1 / B) / totals.mean()
        return self.sigma_r_multinomial * torch.maximum(var, floor).sqrt()

    def init_values(self, generator=None, dtype=torch.float64) -> dict[str, torch.Tensor]:
        values = {f"drift.{k}": v for k, v in self.drift.init_values(generator, dtype).items()}
        values["sigma_r"] = torch.tensor(1e-3, dtype=dtype)
        if self.noise == "full":
            values["noise_tril"] = torch.eye(self.drift.n_bins, dtype=dtype)
        return values

    def noise_init(self, residuals: torch.Tensor) -> dict[str, torch.Tensor]:
        """Noise parameters matching residuals ``(n_pairs, n_bins)`` of a drift fit."""
        sigma = residuals.pow(2).mean().sqrt().clamp_min(1e-8)
        if self.noise == "isotropic":
            return {"sigma_r": sigma}
        cov = residuals.T @ residuals / residuals.shape[0] / sigma**2
        # Observed fractions conserve mass exactly, so cov is singular along (1, ..., 1):
        # the ridge (relative to σ_r²) keeps the factor well defined.
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        return {"sigma_r": sigma,
                "noise_tril": torch.linalg.cholesky(cov + self.noise_ridge * eye)}

    @property
    def order(self) -> int:
        """2 when the drift declares a memory term (``p(X_{t+1} | X_t, X_{t-1})``), else 1."""
        return getattr(self.drift, "order", 1)

    def mean(self, x: torch.Tensor, theta: dict[str, torch.Tensor],
             totals: torch.Tensor | None = None,
             x_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``E[X_{t+1} | X_t, X_{t-1}] = X_t + NN(X_t, X_{t-1})``, clamped to [-1, 2]; shape of
        ``x`` ``(..., n_bins)``; ``x_prev`` (``X_{t-1}``) is used by drifts with memory only.

        Bin fractions live in [0, 1]; the clamp never binds for a trained drift, but keeps
        rollouts with θ drawn from the prior (e.g. ``Predictive``'s probe of the plate nesting)
        finite over long horizons.
        """
        drift_theta = self._drift_theta(theta)
        if getattr(self.drift, "uses_totals", False) or self.order > 1:
            return (x + self.drift(x, drift_theta, totals, x_prev=x_prev)).clamp(-1.0, 2.0)
        return (x + self.drift(x, drift_theta)).clamp(-1.0, 2.0)

    def has_expected_log_prob(self, theta: dict[str, torch.Tensor]) -> bool:
        """Whether :meth:`expected_log_prob` has a closed form for ``theta``: isotropic noise, a
        drift linear in the state (``drift.linear_in_state``) and θ without posterior-draw
        axes."""
        if self.noise != "isotropic" or not getattr(self.drift, "linear_in_state", False):
            return False
        return theta["sigma_r"].dim() == 0 \
            and self.drift._unbatched(self._drift_theta(theta), self.order >= 2)

    def _drift_theta(self, theta):
        return {k[len("drift."):]: v for k, v in theta.items() if k.startswith("drift.")}

    def affine_matrices(self, theta: dict[str, torch.Tensor], dtype=torch.float64,
                        device=None) -> tuple[torch.Tensor, ...]:
        """``(K_1, ..., K_k)`` for a law of order ``k``, each ``(n_bins, n_bins)``, with
        ``E[X_{t+1} | X_t, ..., X_{t-k+1}] = Σ_m X_{t+1-m} K_m`` (row vectors) before
        :meth:`mean`'s clamp; trailing ``K_m`` that are exactly zero are left out for θ that
        needs no gradient. Requires :meth:`has_expected_log_prob`."""
        assert self.has_expected_log_prob(theta), "no closed form for this transition and θ"
        drift_theta = self._drift_theta(theta)
        # Held θ are the same tensors at every step (traced ELBOs rebuild the model each step):
        # the matrices are reused while none of them changed or needs a gradient.
        grad = torch.is_grad_enabled() and any(v.requires_grad for v in drift_theta.values())
        key = [(v, v._version) for v in drift_theta.values()]
        cached = self._affine_cache
        if not grad and cached is not None and cached[0] == (dtype, device) \
                and len(cached[1]) == len(key) \
                and all(a is b and va == vb
                        for (a, va), (b, vb) in zip(cached[1], key, strict=True)):
            return cached[2]
        eye = torch.eye(self.drift.n_bins, dtype=dtype, device=device)
        k = self.order
        if k == 1:
            out = (eye + self.drift(eye, drift_theta),)
        else:  # the drift is linear in (X_t, X_{t-1}, ...): one unit input at a time
            zero = torch.zeros_like(eye)
            unit = [tuple(eye if j == m else zero for j in range(k - 1)) for m in range(k - 1)]
            out = (eye + self.drift(eye, drift_theta, x_prev=(zero,) * (k - 1)),
                   *(self.drift(zero, drift_theta, x_prev=u) for u in unit))
            # the oldest lags the evidence rejected (held at zero) read nothing: a law of
            # lower order, the same density, cheaper (not for θ being trained: they may move)
            while not grad and len(out) > 1 and not bool(out[-1].any()):
                out = out[:-1]
        self._affine_cache = None if grad else ((dtype, device), key, out)
        return out

    def expected_log_prob(self, theta: dict[str, torch.Tensor], mean: torch.Tensor,
                          var: torch.Tensor, matrices=None) -> torch.Tensor:
        r"""``E_q[Σ_{t≥1} log p(X_t | X_{t-1}, ..., X_{t-k})]`` under a mean-field ``q`` with
        moments ``mean = E[X]`` and ``var = Var[X]``, each ``(..., n_times, n_bins)``;
        returns ``(...)`` (``X_{-1} = ... = X_0`` of :class:`~cgpyro.distributions.MarkovChain`
        at the first steps of a law of order ``k > 1``).

        For a drift linear in the state the mean is ``Σ_m X_{t+1-m} K_m`` (row vectors), so with
        independent coordinates ``E[|X_{t+1} - Σ_m X_{t+1-m} K_m|²] = |m_{t+1} - Σ_m m_{t+1-m}
        K_m|² + Σ v_{t+1} + Σ_τ v_τ (C_τ∘C_τ)``, ``C_τ`` the sum of the ``K_m`` that read
        ``X_τ`` (one ``K_m`` each, but at the first steps several read ``X_0``): the Gaussian's
        expected log density without a draw of ``X``. Exact except for :meth:`mean`'s clamp to
        [-1, 2], which binds with probability ~0 under a ``q`` near bin fractions.
        ``matrices``: :meth:`affine_matrices` of ``theta`` where the caller holds them (θ
        constant over training), else built here.
        """
        B, T = mean.shape[-1], mean.shape[-2]
        if T < 2:
            return mean.new_zeros(mean.shape[:-2])
        Ks = matrices or self.affine_matrices(theta, mean.dtype, mean.device)
        pred_mean = pred_var = 0.0
        for m, K in enumerate(Ks, 1):  # X_{t+1-m} K_m, X_{-j} = X_0
            pred_mean = pred_mean + _lagged(mean, m) @ K
            pred_var = pred_var + _lagged(var, m) @ K.pow(2)
        cross = _first_steps_cross(Ks, T)
        if cross:  # the first steps read X_0 through several lags
            first = torch.stack([var[..., 0, :] @ M for M in cross], -2)
            pred_var = torch.cat([pred_var[..., :len(cross), :] + first,
                                  pred_var[..., len(cross):, :]], -2)
        sq = (mean[..., 1:, :] - pred_mean).pow(2) + var[..., 1:, :] + pred_var
        sigma = theta["sigma_r"]
        n = (T - 1) * B
        return -0.5 * sq.sum((-2, -1)) / sigma**2 - n * (torch.log(sigma)
                                                         + 0.5 * math.log(2 * math.pi))

    def forward(self, x: torch.Tensor, theta: dict[str, torch.Tensor],
                totals: torch.Tensor | None = None,
                x_prev: torch.Tensor | None = None) -> dist.Distribution:
        """``p(X_{t+1} | X_t = x[, X_{t-1} = x_prev])``; ``totals`` (particles, broadcast
        against ``x[..., 0]``) feed drifts that use the absolute density (:class:`FluxDrift`)."""
        mean = self.mean(x, theta, totals, x_prev)
        sigma = theta["sigma_r"]
        if self.noise == "full":
            scale_tril = sigma[..., None, None] * theta["noise_tril"]
            return dist.MultivariateNormal(mean, scale_tril=scale_tril)
        # batched θ (particles, Predictive samples) carries x's batch axes: add the bin axis
        return dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1)


def _lagged(x: torch.Tensor, m: int) -> torch.Tensor:
    """``X_{t+1-m}`` for the targets ``t + 1 = 1, ..., T-1`` of ``x`` ``(..., T, B)``, with
    ``X_{-j} = X_0``: shape ``(..., T-1, B)``."""
    T = x.shape[-2]
    head = min(m, T - 1)  # targets 1..m read X_0
    return torch.cat([x[..., :1, :].expand(*x.shape[:-2], head, x.shape[-1]),
                      x[..., 1:max(T - m, 1), :]], -2)


def _first_steps_cross(Ks: tuple, T: int) -> list[torch.Tensor]:
    """At the targets ``s = 1, ..., min(k, T) - 1`` the lags ``m ≥ s`` all read ``X_0``, so
    ``Var[X_0 Σ_{m≥s} K_m]`` exceeds ``Σ_{m≥s} v_0 (K_m∘K_m)`` by ``v_0 M_s`` with the cross
    terms ``M_s = (Σ_{m≥s} K_m)∘2 - Σ_{m≥s} K_m∘2``: one ``(B, B)`` matrix per such target
    (none for a first-order law)."""
    return [sum(Ks[s - 1:]).pow(2) - sum(K.pow(2) for K in Ks[s - 1:])
            for s in range(1, min(len(Ks), T))]


def _robust_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a symmetric positive semi-definite ``H``, with the smallest jitter
    (relative to its mean diagonal) that makes it succeed: precise data (10^6+ particles) make
    the Gram matrix nearly singular in float64."""
    return _jittered_cholesky(H)[0]


def _jittered_cholesky(H: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(L, j)``: the Cholesky factor of ``H + j I`` of :func:`_robust_cholesky` and its
    jitter ``j`` (0 where none was needed; ``L`` is differentiable through ``j = c · mean
    diag H`` as well)."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return L, 0.0
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    jitter = 1e-14 * H.diagonal().abs().mean().clamp_min(1e-300)
    while int(info) > 0:
        if not torch.isfinite(jitter) or jitter > 1e-2 * H.diagonal().abs().mean():
            raise torch.linalg.LinAlgError("matrix is not positive definite even with jitter")
        L, info = torch.linalg.cholesky_ex(H + jitter * eye)
        jitter = jitter * 100
    return L, float(jitter.detach()) / 100


def _neg_log_evidence(log_h, G, r, yy, n_obs, groups, reach, scale, decay: bool,
                      grad: bool = False, rate_scale: float | None = None):
    """``-log evidence / n_obs`` of Bayesian linear regression with Gram statistics ``G = ΦᵀΦ``
    ``(P, P)``, ``r = Φᵀy``, ``yy = yᵀy`` and ``n_obs`` targets, weight ``i`` of prior
    precision ``α_i = scale · exp(log τ_{groups_i} + rate · reach_i)`` and noise precision β;
    ``log_h = (log τ_0, …, log τ_{g-1}, rate, log β)``. With ``rate_scale`` (and ``decay``)
    the rate's hyperprior ``N(0, rate_scale)`` is added (MAP-II). Returns ``(loss, m, α)``
    (``m``: the posterior mean) or, with ``grad``, ``(loss, d loss / d log_h)`` in closed
    form."""
    n_groups = log_h.shape[0] - 2
    rate = log_h[n_groups] if decay else 0.0
    # precisions within e^±25 of the Gram scale: beyond, a weight is simply pinned at zero (or
    # free), and exp(rate · reach) cannot overflow at long reaches
    u = log_h[:n_groups][groups] + rate * reach
    alpha = scale * u.clamp(-25.0, 25.0).exp()
    beta = log_h[-1].exp()
    H = torch.diag(alpha) + beta * G
    L, jitter = _jittered_cholesky(H)
    m = beta * torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
    rss = yy - 2 * m @ r + m @ G @ m
    ev = 0.5 * (torch.log(alpha).sum() + n_obs * torch.log(beta) - beta * rss
                - m @ (alpha * m)) - torch.log(L.diagonal()).sum()
    hyper = decay and rate_scale is not None
    if hyper:
        ev = ev - 0.5 * (rate / rate_scale) ** 2
    if not grad:
        return -ev / n_obs, m, alpha
    # The gradient in closed form, with diag(H'⁻¹) from the Cholesky factor (LAPACK potri, 2/3
    # of the flops of solving L X = I) instead of back-propagation through the factor (which
    # made empirical Bayes 3x slower). With H' = H + j I
    # (j: the jitter), m = β H'⁻¹ r maximises the evidence's integrand up to j m, so
    # d ev / d α_i = (1/α_i - m_i² - H'⁻¹_ii) / 2 - j m_i (H'⁻¹m)_i and
    # d ev / d β = (n/β - rss - tr H'⁻¹G) / 2 + j (H'⁻¹m)ᵀ(r - G m), where
    # β tr(H'⁻¹G) = P - Σ_i (α_i + j) H'⁻¹_ii.
    h_diag = torch.cholesky_inverse(L).diagonal()
    d_alpha = 0.5 * (1.0 / alpha - m.pow(2) - h_diag)
    d_beta = 0.5 * (n_obs / beta - rss - (alpha.shape[0] - ((alpha + jitter) * h_diag).sum())
                    / beta)
    if jitter:  # j = c · mean(diag H) moves with H too: d ev / d j = -tr(H'⁻¹)/2 - j mᵀH'⁻¹m
        v = torch.cholesky_solve(m.unsqueeze(-1), L).squeeze(-1)
        d_jitter = (-0.5 * h_diag.sum() - jitter * m @ v) * jitter / H.diagonal().mean()
        d_alpha = d_alpha - jitter * m * v + d_jitter / alpha.shape[0]
        d_beta = d_beta + jitter * v @ (r - G @ m) + d_jitter * G.diagonal().mean()
    d_u = alpha * d_alpha * ((u >= -25.0) & (u <= 25.0))
    d_log_h = torch.zeros_like(log_h)
    d_log_h[:n_groups].index_add_(0, groups, d_u)
    if decay:
        d_log_h[n_groups] = (d_u * reach).sum() - (rate / rate_scale**2 if hyper else 0.0)
    d_log_h[-1] = beta * d_beta
    return -ev / n_obs, -d_log_h / n_obs


# the decay rate's hyperprior N(0, 1): the rate multiplies reaches of a few bins (at 3 the prior
# std of a jump two bins out is already 0.22 of the nearest one's)
DECAY_RATE_PRIOR_SCALE = 1.0

# "auto" dense correction up to this many bins: B(B-1) = 992 weights; at 64 bins 4,032 weights
# would cost minutes of evidence steps, and there the local model is at the floor already.
DENSE_AUTO_MAX_BINS = 32

# memory_lags > 1: an older increment must win by a Bayes factor of e^5 ("very strong" on Kass &
# Raftery's scale, 2 ln B > 10), whatever the number of sequences. One-step evidence on the
# training family does not see what an extra lag costs out of it: with any gain kept, the paper's
# cell at 4 sequences went 1.066 -> 1.137 x the floor (seed 1, all three lags kept). Gains of the
# second lag over the first (paper cell, seeds 0-4, n = 2-64): at most 4.5 nats, and where the
# lag was kept at e^3 (3.4-4.5 nats: seed 1 n = 4, seed 4 n = 4/8) forecasts got worse (seed 4:
# 1.05 -> 1.11, 1.06 -> 1.10); where it helps, 29-53 nats (Δt = 200 and 800 at n = 64: 2.61 ->
# 1.70, 1.033 -> 1.023) and 7-8 (16 bins at n = 64). e^5 was chosen after seeing these rows; it
# gives up Δt = 200 at n = 4 (3.3 nats; 3.08 -> 2.61 at e^3).
OLDER_LAG_MARGIN = 5.0

# initial_fit warns below this rms displacement per step of the fitted stencil (in bins): there
# the state inside the bins carries the dynamics and bin fractions are far from Markov. Measured
# on 16 cells of benchmarks/matrix.md (stencils fitted at n = 1/4/64, forecasts of seeds 0-3):
# fits below 0.3 bins (Δt = 200 at 25 bins with 1-4 sequences, 0.17-0.22; 16 bins at Δt = 200,
# 0.17-0.27 at any n) go with forecasts at 2.5-8x the floor; at 0.43-0.74 (Δt = 400 and 800,
# 8 bins, no drift) one sequence gives 1.3-2.9x; above 0.75 at most 1.6x. With the two-sd rule
# (below) the warning fires on exactly the first group (Δt = 200 at n = 1/4, 16 bins at Δt = 200
# at n = 1/4/64) and on no fit of the paper's cell, Δt = 400/800, 8 bins or no drift (n = 1/4/64).
# On fresh seeds it misses one such fit: Δt = 200 seed 3 at n = 4 (forecast 3.6x; matrix.md).
SHORT_STEP_RMS = 0.3

# memory="auto" with a single training sequence: the second-order law must win by a Bayes factor
# of e^3 ~ 20 ("strong" on Kass & Raftery's scale) instead of any margin, since the comparison
# rests on one trajectory of the sub-bin state (see FluxDrift's class docstring).
ONE_SEQUENCE_MEMORY_MARGIN = 3.0


# Largest Courant number of SubgridDrift's sub-steps: 1 gave the forecasts of 1/2 to two digits
# (interacting system, n = 1 and 4) at half the sub-steps.
SUBGRID_COURANT = 1.0
# subcells = "auto": the sub-cell grid has at least this many cells over the domain. On the
# interacting system (fronts a few lattice sites wide, 1,280 sites) 100 = 25 bins x 4 sub-cells;
# 16 bins x 4 (64 cells) forecast 2-3x worse than 16 x 6 or 8 (benchmarks/exclusion.md).
SUBGRID_CELLS = 100


class _Subgrid(ThetaModule):
    """Sites ``coef`` ``(degree,)`` and ``diffusion`` (scalar) under ``N(0, scale)``."""

    def __init__(self, degree: int, scale: float):
        super().__init__()
        self.declare("coef", _normal((degree,), scale))
        self.declare("diffusion", _normal((), scale))


class _WindowLaw(ThetaModule):
    """A law of the last ``window + 1`` snapshots, nonlinear in θ or the state."""

    @property
    def order(self) -> int:
        """``1 + window``: ``p(X_{t+1} | X_t, ..., X_{t-window})``."""
        return 1 + self.window

    @property
    def linear_in_state(self) -> bool:
        return False


class SubgridDrift(_WindowLaw):
    r"""A conservation law on a finer grid inside the bins, ``(..., B) -> (..., B)``.

    One coarse step: spread each bin's density evenly over ``subcells`` sub-cells, step
    ``u_t + g(u)_x = D u_xx`` on that periodic grid with a learned flux function, sum the
    sub-cells back into bins:

    ``NN(X) = R(Φ^m(P X)) - X``, ``P`` the even spread, ``R`` the bin sums, ``Φ`` one explicit
    finite-volume sub-step (central face flux ``(g(u_i) + g(u_{i+1})) / 2 - D (u_{i+1} - u_i)/h``)

    - ``u = B·X·N/N_ref``: the density relative to uniform, in units of the training data's mean
      particle total ``N_ref`` (site ``total_ref``, set from the data by :meth:`initial_fit` and
      held), so that the flux can depend on the absolute density (exclusion: ``ρ(1 - ρ)``);
    - ``g(u) = Σ_{k=1..degree} a_k u^k`` in bins per coarse step (site ``flux.coef``,
      ``(degree,)``, under ``N(0, weight_prior_scale)``): ``a_1`` is the drift speed of a dilute
      density, the higher terms the interaction;
    - ``D = 0.01 exp(d)`` in bins² per coarse step (site ``flux.diffusion``: ``d``, scalar, under
      ``N(0, weight_prior_scale)``);
    - ``m = max(substeps, h⁻¹ max|g'| / SUBGRID_COURANT, 4 D h⁻²)`` sub-steps of length ``1/m``
      (``h = 1/subcells`` bins), so the explicit scheme stays stable for whatever θ the data
      give; ``subcells = "auto"``: ``ceil(SUBGRID_CELLS / B)``, about 100 sub-cells over the
      domain at any number of bins ``B``.

    - ``window = L > 0`` (a chain of order ``1 + L``): the sub-cell profile is not spread evenly
      at ``t`` but carried from ``t - L``: spread ``X_{t-L}`` evenly, then for
      ``s = t-L+1, ..., t`` step once and shift each bin's sub-cells by one constant so that
      the bin holds ``X_s``, and step once more to ``t + 1``. The profile inside the bins is
      what the bin fractions do not carry (their law is not Markov); the last few snapshots
      reconstruct it, as a nudged filter would. On the interacting system (seeds 0 and 1,
      one step fitted by least squares) ``L = 4`` took forecasts at 15-35 Δt from 1.9-2.8x
      the floor (``L = 0``) to 1.3-1.9x with four sequences and from 2.2-15x to 1.6-2.5x with
      one; ``L = 8`` was no better with four and worse with one.

    Where the sub-bin state carries the dynamics (steep fronts of interacting particles, much
    narrower than a bin) a law on bin fractions alone cannot resolve it; this one evolves a
    sub-bin profile at the cost of a few parameters, so one to four sequences determine it. For
    any θ the mean dynamics conserves ``Σ_j X_j`` exactly and commutes with cyclic shifts of the
    bins (up to the clamp below).

    The central flux adds no numerical viscosity (a Rusanov flux gave 35-60 % more error
    on the interacting system), so a steep law on a rough profile can oscillate; sub-cell
    densities are clamped at ±1000× uniform so that such a θ (e.g. an optimiser's trial point)
    gives a large finite loss, not NaN; there mass is no longer conserved.
    """

    def __init__(self, n_bins: int, subcells: int | str = 4, substeps: int = 16, degree: int = 2,
                 window: int = 0, weight_prior_scale: float = 1.0):
        super().__init__()
        B = int(n_bins)
        if B < 3:
            raise ValueError(f"SubgridDrift needs n_bins >= 3, got {n_bins}")
        if subcells == "auto":  # the grid's resolution is the physics', whatever the bins
            subcells = max(1, math.ceil(SUBGRID_CELLS / B))
        for name, value, low in (("subcells", subcells, 1), ("substeps", substeps, 1),
                                 ("degree", degree, 1), ("window", window, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}" +
                                 (" or 'auto'" if name == "subcells" else "") +
                                 f", got {value!r}")
        if not (isinstance(weight_prior_scale, int | float) and math.isfinite(weight_prior_scale)
                and weight_prior_scale > 0):
            raise ValueError(f"weight_prior_scale must be a positive number, got "
                             f"{weight_prior_scale!r}")
        self.n_bins, self.subcells, self.substeps, self.degree = B, subcells, substeps, degree
        self.window = window
        self.weight_prior_scale = float(weight_prior_scale)
        self.uses_totals = True
        self.flux = _Subgrid(degree, self.weight_prior_scale)
        self.declare("total_ref", lambda _: FlatPositive(**like_kwargs()))

    def shapes(self) -> dict[str, torch.Size]:
        """Shapes of the flux parameters, by site name."""
        return {"flux.coef": torch.Size([self.degree]), "flux.diffusion": torch.Size([])}

    def held_sites(self) -> list[str]:
        """Sites set by :meth:`initial_fit` and held there during SVI (relative names)."""
        return ["total_ref", "flux.coef", "flux.diffusion"]

    def init_values(self, generator: torch.Generator | None = None, dtype=torch.float64):
        """No transport (``g = 0``) and ``D = 0.01`` bins² per step: the drift starts at zero."""
        return {"flux.coef": torch.zeros(self.degree, dtype=dtype),
                "flux.diffusion": torch.tensor(0.0, dtype=dtype),
                "total_ref": torch.tensor(1.0, dtype=dtype)}

    def _history(self, frac: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """For every pair of ``frac`` ``(S, T, B)``: ``X_t`` ``(S, T-1, B)`` and its earlier
        states ``(X_{t-1}, ..., X_{t-window})``, newest first, with ``X_{-j} = X_0``."""
        steps = torch.arange(frac.shape[1] - 1)
        prev = tuple(frac[:, (steps - k).clamp_min(0)] for k in range(1, self.window + 1))
        return frac[:, :-1], prev

    def initial_fit(self, counts: torch.Tensor, max_iter: int = 200) -> tuple[dict, tuple]:
        """MAP of the flux parameters on pairs of empirical fractions, and its Laplace posterior.

        ``total_ref`` is the data's mean particle total. ``w = (a_1, ..., a_degree, d)``
        minimises ``Σ |X_t + NN(X_t) - X_{t+1}|² / (2σ²) + |w|² / (2 s²)`` over every one-step
        pair (``s = weight_prior_scale``) by L-BFGS, twice: with σ² the variance of the
        increments, then with σ² that of the first fit's residuals. The posterior is
        ``N(w, H⁻¹)``, ``H`` the Hessian of that objective at ``w``: with three parameters it
        is exact to compute, and it carries the epistemic uncertainty of one or a few sequences
        into the forecast bands (:meth:`sample_linear`). Nothing is stored.

        :param counts: ``(n_sequences, n_times, n_bins)``, ``n_times ≥ 2``.
        :returns: ``(values, posterior)``: the values of :meth:`held_sites` and
            ``(mean (degree + 1,), Cholesky factor (degree + 1, degree + 1))``.
        """
        counts = counts.detach().to(torch.float64).cpu()
        totals = counts.sum(-1)
        ref = totals[:, 0].mean()
        frac = counts / totals.unsqueeze(-1)
        (x, prev), y, tot = self._history(frac), frac[:, 1:], totals[:, :-1]
        prior_var = self.weight_prior_scale ** 2

        def unpack(w):
            return {"flux.coef": w[: self.degree], "flux.diffusion": w[self.degree],
                    "total_ref": ref}

        def objective(w, sigma2):
            resid = x + self(x, unpack(w), tot, prev) - y
            return 0.5 * resid.pow(2).sum() / sigma2 + 0.5 * w.pow(2).sum() / prior_var

        from ._warmstart import _lbfgs  # (that module imports this one)

        w = torch.zeros(self.degree + 1, dtype=torch.float64)
        sigma2 = (y - x).pow(2).mean().clamp_min(1e-30)
        for _ in range(2):
            params = {"w": w.clone().requires_grad_(True)}
            if _lbfgs(params, lambda p=params, s2=sigma2: objective(p["w"], s2), max_iter):
                w = params["w"].detach()
            with torch.no_grad():
                sigma2 = (x + self(x, unpack(w), tot, prev) - y).pow(2).mean().clamp_min(1e-30)
        cov_factor, _ = _laplace_factor(lambda v: objective(v, sigma2), w)
        values = {"total_ref": ref, "flux.coef": w[: self.degree].clone(),
                  "flux.diffusion": w[self.degree].clone()}
        return values, (w, cov_factor)

    def sample_linear(self, posterior: tuple, num_samples: int) -> dict[str, torch.Tensor]:
        """Draws of ``flux.coef`` ``(S, 1, degree)`` and ``flux.diffusion`` ``(S, 1)`` from the
        Laplace ``posterior`` of :meth:`initial_fit` (``S`` = ``num_samples``; the singleton
        axis broadcasts over sequences)."""
        mean, factor = posterior
        eps = torch.randn(num_samples, mean.numel(), dtype=mean.dtype)
        w = (mean + eps @ factor.T).unsqueeze(1)
        return {"flux.coef": w[..., : self.degree], "flux.diffusion": w[..., self.degree]}

    def forward(self, x: torch.Tensor, theta: dict[str, torch.Tensor],
                totals: torch.Tensor | None = None,
                x_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``NN(X_t)`` of shape ``x`` ``(..., B)``; ``totals`` ``(...)`` particle totals (or
        ``None``: density relative to uniform); ``x_prev`` is ``X_{t-1}`` or a tuple
        ``(X_{t-1}, X_{t-2}, ...)``, newest first, of which the first ``window`` are used
        (``None``: the profile starts even in every bin at ``t``)."""
        r = self.subcells
        rel = 1.0 if totals is None else (totals / theta["total_ref"]).unsqueeze(-1)
        earlier = () if x_prev is None or not self.window else \
            ((x_prev,) if torch.is_tensor(x_prev) else tuple(x_prev))[: self.window]
        hist = [h * self.n_bins * rel for h in (*earlier[::-1], x)]  # oldest first
        u = hist[0].repeat_interleave(r, -1)
        coef = theta["flux.coef"]
        a = [coef[..., k].unsqueeze(-1) for k in range(self.degree)]
        diff = 0.01 * torch.exp(theta["flux.diffusion"].clamp(-30.0, 30.0)).unsqueeze(-1)
        with torch.no_grad():  # sub-steps: Courant ≤ SUBGRID_COURANT, diffusion number ≤ 1/4
            top = max(float(h.abs().max()) for h in hist) if u.numel() else 1.0
            top = max(top, 1.0)
            speed = sum(abs(k + 1) * a[k].abs().max() * top ** k for k in range(self.degree))
            need = max(r * float(speed) / SUBGRID_COURANT, 4 * r * r * float(diff.max()))
            # a wild θ (an optimiser's trial point) gets a capped count and a clamped state
            m = min(max(self.substeps, math.ceil(need)), 8 * self.substeps) \
                if math.isfinite(need) else self.substeps

        def g(v):
            out = a[-1]
            for k in range(self.degree - 2, -1, -1):
                out = out * v + a[k]
            return out * v

        def step(u):
            for _ in range(m):
                gu = g(u)
                face = 0.5 * (gu + gu.roll(-1, -1)) - (diff * r) * (u.roll(-1, -1) - u)
                u = (u - (r / m) * (face - face.roll(1, -1))).clamp(-1e3, 1e3)
            return u

        def bin_means(u):
            return u.reshape(*u.shape[:-1], self.n_bins, r).mean(-1)

        for target in hist[1:]:  # carry the profile, each bin's mass reset to the observed
            u = step(u)
            u = u + (target - bin_means(u)).repeat_interleave(r, -1)
        return bin_means(step(u)) / (self.n_bins * rel) - x


def _laplace_factor(objective, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of the Laplace covariance ``H⁻¹`` at the minimum ``w`` of
    ``objective`` and ``log det H`` (``H``: its Hessian; a direction the data do not see
    keeps at least a jitter of curvature)."""
    hess = torch.autograd.functional.hessian(objective, w)
    hess = 0.5 * (hess + hess.T)
    eye = torch.eye(w.numel(), dtype=w.dtype)
    jitter = 1e-12 * hess.diagonal().abs().max().clamp_min(1.0)
    while True:  # a flat direction (no data on it) keeps the prior's curvature at least
        chol, info = torch.linalg.cholesky_ex(hess + jitter * eye)
        if int(info) == 0:
            break
        jitter *= 10.0
    logdet = 2 * torch.log(chol.diagonal()).sum()
    return torch.linalg.cholesky(torch.cholesky_inverse(chol)), logdet


class _Filter(ThetaModule):
    """Scalar sites ``shift``, ``width``, ``spread``, ``length`` under ``N(0, scale)`` and,
    with ``width_scale > 0``, ``bins`` ``(n_bins,)`` under ``N(0, width_scale)``."""

    def __init__(self, scale: float, n_bins: int, width_scale: float):
        super().__init__()
        for name in FilterDrift.SITES:
            self.declare(name, _normal((), scale))
        if width_scale:
            self.declare("bins", _normal((n_bins,), width_scale))


# FilterDrift window = "auto": longer than the forecasts here (35 steps past 10 snapshots); the
# law on the snapshots there are is the exact filter, so a longer window only costs memory.
FILTER_AUTO_WINDOW = 48
# width_prior_scale = "auto": the prior std of a bin's log width where the evidence keeps
# learned widths. A lattice of n sites in B bins has widths floor(n/B) or ceil(n/B): 2 % apart
# at 51/52 sites (25 bins of 1,280); 0.02 is that size, and the evidence shrinks what the data
# do not support.
FILTER_WIDTH_SCALE = 0.02
# ... and only from this many sequences on: one smooth sequence trades the widths against the
# diffusion (paper's cell, seed 0, n = 1: σ 0.454 bins with widths, 0.496 without, the truth
# 0.494; forecasts 1.78-3.10x the floor against 1.20-1.38), although its evidence gain is 81 nats.
FILTER_WIDTH_MIN_SEQUENCES = 2


class FilterDrift(_WindowLaw):
    r"""Linear transport of a sub-bin profile that a Kalman filter reconstructs from the
    earlier snapshots, ``(..., B) -> (..., B)``: the mean of ``p(X_{t+1} | X_t, ..., X_{t-L})``.

    The fine state ``x`` holds the mass of ``n = B·r`` equal sub-cells over the periodic domain
    (``r = subcells`` per bin); bins are sums over them, ``X = H x``. One coarse step moves
    mass by a displacement ``Z ~ N(μ, σ²)`` (bins): ``x_{t+1} = K x_t``, ``K`` the exact
    solution operator of ``u_t + μ u_x = (σ²/2) u_xx`` on the band-limited interpolant of the
    sub-cells (a circulant; Fourier mode ``k`` times ``exp(-2πi k μ r / n - 2 (π k σ r / n)²)``:
    no numerical diffusion at any resolution). The profile inside the bins is what bin
    fractions do not carry, so the law infers it from the window ``X_{t-L}, ..., X_t`` by a
    Kalman filter: prior ``x_{t-L} ~ N(X_{t-L} spread evenly, s₀ P G Pᵀ + P Pᵀ)`` (``G`` a
    squared-exponential covariance of length ``ℓ`` bins, ``P`` the projection on profiles with
    zero sum in every bin), process noise ``I - K Kᵀ`` (independent particles' displacement
    noise in a uniform state), exact observations ``X_s = H x_s``; all in units of one sub-cell's
    multinomial variance, ``1 / (n N)`` (only ratios enter the gain). The mean is
    ``NN(X) = H K E[x_t | X_{t-L..t}] - X_t`` plus a uniform share of the mass the update moved:
    a linear map of the window fixed by four parameters, sites ``filter.shift`` μ,
    ``filter.width`` (σ = 0.3 e^w bins), ``filter.spread`` (s₀ = e^w), ``filter.length``
    (ℓ = 0.5 e^w bins), each under ``N(0, weight_prior_scale)``.

    With ``width_prior_scale > 0`` bins may differ in width: bin ``j`` spans ``[e_j, e_{j+1})``
    of the uniform grid, ``e = (0, cumsum(B softmax(b)))`` (site ``filter.bins``, ``b`` under
    ``N(0, width_prior_scale)``), and a sub-cell cut by an edge is shared in proportion (bins of
    51 or 52 lattice sites, say). ``"auto"``: ``FILTER_WIDTH_SCALE`` where the evidence
    (Laplace) prefers learned widths to equal ones, with at least
    ``FILTER_WIDTH_MIN_SEQUENCES`` sequences, else 0.

    For any θ the mean conserves ``Σ_j X_j`` exactly; with equal widths it commutes with
    cyclic shifts of the bins. Where transport per step is a fraction of a bin (short time
    steps, fine bins) the sub-bin state carries the dynamics for many steps and a law on bin
    fractions alone is far from Markov; four parameters are what one sequence determines. It
    assumes independent (linear) transport: for interacting particles see
    :class:`SubgridDrift`.

    ``window = L`` (``"auto"``: ``FILTER_AUTO_WINDOW``): snapshots before ``t`` in the filter,
    a chain of order ``1 + L``. The model and forecasts fill the history before ``X_0`` with
    copies of ``X_0``; the law drops such repeats (states equal to their successor at the start
    of the window) and filters from ``X_0``, so a long window is the exact filter over every
    snapshot there is.
    """

    SITES = ("shift", "width", "spread", "length")

    def __init__(self, n_bins: int, subcells: int | str = "auto", window: int | str = "auto",
                 weight_prior_scale: float = 1.0, width_prior_scale: float | str = 0.0):
        super().__init__()
        B = int(n_bins)
        if B < 3:
            raise ValueError(f"FilterDrift needs n_bins >= 3, got {n_bins}")
        if subcells == "auto":
            subcells = max(1, math.ceil(SUBGRID_CELLS / B))
        if window == "auto":
            window = FILTER_AUTO_WINDOW
        for name, value, low in (("subcells", subcells, 1), ("window", window, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low} or 'auto', "
                                 f"got {value!r}")
        if not (isinstance(weight_prior_scale, int | float) and not isinstance(
                weight_prior_scale, bool) and math.isfinite(weight_prior_scale)
                and weight_prior_scale > 0):
            raise ValueError(f"weight_prior_scale must be a positive number, got "
                             f"{weight_prior_scale!r}")
        self.auto_widths = width_prior_scale == "auto"
        if self.auto_widths:
            width_prior_scale = FILTER_WIDTH_SCALE
        if not (isinstance(width_prior_scale, int | float) and not isinstance(
                width_prior_scale, bool) and math.isfinite(width_prior_scale)
                and width_prior_scale >= 0):
            raise ValueError(f"width_prior_scale must be a number >= 0 or 'auto', got "
                             f"{width_prior_scale!r}")
        self.n_bins, self.subcells, self.window = B, subcells, window
        self.weight_prior_scale = float(weight_prior_scale)
        self.width_prior_scale = float(width_prior_scale)
        self.uses_totals = False
        self.filter = _Filter(self.weight_prior_scale, B, self.width_prior_scale)
        self._cache = None  # (θ values, filter): θ is held during SVI and forecasts

    def shapes(self) -> dict[str, torch.Size]:
        """Shapes of the law's parameters, by site name."""
        out = {f"filter.{k}": torch.Size([]) for k in self.SITES}
        if self.width_prior_scale:
            out["filter.bins"] = torch.Size([self.n_bins])
        return out

    def held_sites(self) -> list[str]:
        """Sites set by :meth:`initial_fit` and held there during SVI (relative names)."""
        return list(self.shapes())

    def init_values(self, generator: torch.Generator | None = None, dtype=torch.float64):
        """No transport, σ = 0.3 bins, s₀ = 1, ℓ = 0.5 bins, equal bins."""
        return {k: torch.zeros(shape, dtype=dtype) for k, shape in self.shapes().items()}

    def _unpack(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sites from their values side by side, ``w`` ``(..., P)``."""
        out, i = {}, 0
        for name, shape in self.shapes().items():
            size = shape.numel()
            out[name] = w[..., i:i + size].reshape(w.shape[:-1] + shape)
            i += size
        return out

    def _kernel(self, mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
        """Circulant ``K`` ``(..., n, n)`` of the displacement ``N(mu, sd²)`` in sub-cells."""
        n = self.n_bins * self.subcells
        k = torch.arange(n // 2 + 1, dtype=mu.dtype, device=mu.device)
        m, s = mu.unsqueeze(-1), sd.unsqueeze(-1)
        phase = -2 * math.pi * k * m / n
        decay = torch.exp(-2 * (math.pi * k * s / n) ** 2)
        w = torch.fft.irfft(torch.complex(decay * torch.cos(phase), decay * torch.sin(phase)),
                            n=n)
        i = torch.arange(n, device=mu.device)
        return w[..., (i[:, None] - i[None]) % n]

    def _bins(self, theta: dict[str, torch.Tensor], dtype, device) -> torch.Tensor:
        """``H`` ``(..., B, n)``: the part of each sub-cell in each bin."""
        B, r = self.n_bins, self.subcells
        if not self.width_prior_scale:
            return torch.kron(torch.eye(B, dtype=dtype),
                              torch.ones(1, r, dtype=dtype)).to(device)
        widths = B * torch.softmax(theta["filter.bins"], -1)
        edges = torch.cat([torch.zeros_like(widths[..., :1]), widths.cumsum(-1)], -1)
        lo = torch.arange(B * r, dtype=dtype, device=device) / r
        overlap = (torch.minimum(lo + 1.0 / r, edges[..., 1:, None])
                   - torch.maximum(lo, edges[..., :-1, None])).clamp_min(0.0)
        return overlap * r

    def _filter(self, theta: dict[str, torch.Tensor], steps: int, maps: bool = False) -> dict:
        """The filter over ``steps + 1`` snapshots: ``K`` ``(..., n, n)``, ``H`` ``(..., B, n)``,
        ``spread`` ``(..., n, B)`` (the prior mean's map), the gains ``(..., n, B)`` of the
        updates with the snapshots ``1..steps`` and, with ``maps``, for ``l = 0..steps`` the raw
        one-step prediction ``H K E[x_l | X_0..X_l]`` as a map ``(..., B, (l + 1)·B)`` of the
        snapshots (oldest first) and its error covariance ``(..., B, B)``."""
        B, r = self.n_bins, self.subcells
        n = B * r
        mu = theta["filter.shift"] * r
        sd = 0.3 * r * torch.exp(theta["filter.width"].clamp(-12.0, 6.0))
        s0 = torch.exp(theta["filter.spread"].clamp(-25.0, 25.0))[..., None, None]
        ell = 0.5 * torch.exp(theta["filter.length"].clamp(-8.0, 8.0))
        dt, dev = mu.dtype, mu.device
        K = self._kernel(mu, sd)
        H = self._bins(theta, dt, dev)
        Ht = H.transpose(-1, -2)
        spread = Ht @ torch.linalg.inv(H @ Ht)  # each bin's mass evenly over its extent
        proj = torch.eye(n, dtype=dt, device=dev) - spread @ H
        i = torch.arange(n, device=dev)
        d = (i[:, None] - i[None]).abs()
        d = torch.minimum(d, n - d).to(dt) / r
        G = torch.exp(-0.5 * (d / ell[..., None, None]) ** 2)
        C = s0 * (proj @ G @ proj.transpose(-1, -2)) + proj @ proj.transpose(-1, -2)
        Q = torch.eye(n, dtype=dt, device=dev) - K @ K.transpose(-1, -2)
        eye_b = torch.eye(B, dtype=dt, device=dev)
        lead = torch.broadcast_shapes(mu.shape, H.shape[:-2])
        M = spread.expand(*lead, n, B)  # E[x] as a map of the snapshots, oldest first
        out = {"K": K, "H": H, "spread": spread, "gains": [], "preds": [], "covs": []}
        for step in range(steps + 1):
            C = K @ C @ K.transpose(-1, -2) + Q
            HC = H @ C
            S = HC @ Ht
            # exact observations; the total's variance is zero: a jitter keeps S invertible
            S = S + 1e-9 * S.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye_b
            if maps:
                M = K @ M
                out["preds"].append(H @ M)
                out["covs"].append(S)
            if step == steps:
                break
            gain = torch.linalg.solve(S, HC).transpose(-1, -2)  # C Hᵀ S⁻¹, (..., n, B)
            out["gains"].append(gain)
            if maps:
                innov = torch.cat([-(H @ M), eye_b.expand(*lead, B, B)], -1)
                M = torch.cat([M, M.new_zeros(*lead, n, B)], -1) + gain @ innov
            C = C - gain @ HC
            C = 0.5 * (C + C.transpose(-1, -2))
        return out

    def laws(self, theta: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The law for every window ``0, ..., L``:
        ``A_l`` ``(..., B, (l + 1)·B)`` with ``E[X_{t+1}] = A_l [X_{t-l}; ...; X_t]`` (θ's
        leading axes first), conserving mass: the raw prediction plus a uniform share of
        ``Σ X_t - Σ`` (raw prediction)."""
        B = self.n_bins
        preds = self._filter(theta, self.window, maps=True)["preds"]
        share = torch.full((B, B), 1.0 / B, dtype=preds[0].dtype, device=preds[0].device)
        out = []
        for A in preds:
            last = torch.zeros_like(A)
            last[..., -B:] = share
            out.append(A + last - share @ A)
        return out

    def _cached(self, theta: dict[str, torch.Tensor], key: str, build):
        """``build()`` for θ, cached while θ (held during SVI and forecasts) is unchanged."""
        values = tuple(theta[k] for k in self.shapes())
        if any(v.requires_grad for v in values):
            return build()
        if self._cache is not None and self._cache[1] == key:
            had, _, value = self._cache
            if all(a.shape == b.shape and a.device == b.device and torch.equal(a, b)
                   for a, b in zip(had, values, strict=True)):
                return value
        value = build()
        self._cache = (tuple(v.detach().clone() for v in values), key, value)
        return value

    def forward(self, x: torch.Tensor, theta: dict[str, torch.Tensor],
                totals: torch.Tensor | None = None,
                x_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``NN(X_t)`` of shape ``x`` ``(..., B)``; ``x_prev`` is ``X_{t-1}`` or a tuple
        ``(X_{t-1}, X_{t-2}, ...)``, newest first, of which the first ``window`` are used.
        Where the oldest states repeat (the history before ``X_0``), the law of the shorter
        window applies. ``totals`` is unused. θ without leading axes: the law's maps (cached);
        with posterior-draw axes: the filter runs on the states (its gains cached), in memory
        linear in the window."""
        earlier = () if x_prev is None else \
            ((x_prev,) if torch.is_tensor(x_prev) else tuple(x_prev))[: self.window]
        hist = [*earlier[::-1], x]  # oldest first
        # repeats at the start of the window: padding (a state equal to its successor)
        padded = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        run = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        for a, b in zip(hist[:-1], hist[1:], strict=False):
            run = run & (a == b).all(-1)
            padded = padded + run.long()
        lags = len(hist) - 1 - padded
        found = sorted(set(lags.flatten().tolist()))
        if any(theta[k].shape != shape for k, shape in self.shapes().items()):
            # θ draws broadcast over the states: the filter on all of them, per window found
            # (one in a forecast, where every sequence is at the same time)
            out = self._run(theta, hist[len(hist) - 1 - found[0]:])
            for lag in found[1:]:
                pred = self._run(theta, hist[len(hist) - 1 - lag:])
                out = torch.where((lags == lag).unsqueeze(-1), pred, out)
            return out - x
        laws = self._cached(theta, "laws", lambda: self.laws(theta))
        out = x.new_zeros(x.shape)
        for lag in found:  # each window's law on its own states only (in SVI: one time each)
            rows = lags == lag
            z = torch.cat([h.expand_as(x)[rows] for h in hist[len(hist) - 1 - lag:]], -1)
            out[rows] = z @ laws[lag].transpose(-1, -2)
        return out - x

    def _run(self, theta: dict[str, torch.Tensor], states: list[torch.Tensor]) -> torch.Tensor:
        """``E[X_{t+1}]`` from ``states`` ``[X_{t-l}, ..., X_t]`` by running the filter on
        them (the same law as :meth:`laws`)."""
        f = self._cached(theta, "gains", lambda: self._filter(theta, self.window))
        K, H, spread = f["K"], f["H"], f["spread"]

        def apply(A, v):  # A (..., 1, rows, k) for θ draws over sequences: one GEMM per draw
            if A.dim() == v.dim() + 1 and A.shape[-3] == 1:
                return v @ A.squeeze(-3).transpose(-1, -2)
            return (A @ v.unsqueeze(-1)).squeeze(-1)

        m = apply(spread, states[0])
        for gain, X in zip(f["gains"], states[1:], strict=False):
            m = apply(K, m)
            m = m + apply(gain, X - apply(H, m))
        pred = apply(H, apply(K, m))
        return pred + (states[-1].sum(-1, keepdim=True) - pred.sum(-1, keepdim=True)) \
            / self.n_bins

    def _fit(self, counts: torch.Tensor, max_iter: int) -> tuple[dict, tuple, float]:
        """MAP-II of the sites and its Laplace posterior and log evidence (see
        :meth:`initial_fit`)."""
        from ._warmstart import _lbfgs  # (that module imports this one)

        frac = counts / counts.sum(-1, keepdim=True)
        n_seq, T, B = frac.shape
        n_params = sum(shape.numel() for shape in self.shapes().values())
        prior_var = torch.full((n_params,), self.weight_prior_scale ** 2, dtype=torch.float64)
        prior_var[len(self.SITES):] = self.width_prior_scale ** 2
        # a sub-cell's variance in units of 1/(n N) (N: each sequence's particle total)
        scale = (counts.sum(-1) * B * self.subcells)[:, 1:]  # (sequence, time)

        def objective(w):  # -log p(X_1..X_{T-1} | X_0, w) - log p(w), up to a constant
            f = self._filter(self._unpack(w), T - 2, maps=True)
            nll = 0.0
            for t in range(1, T):
                e = frac[:, t] - frac[:, :t].reshape(n_seq, -1) @ f["preds"][t - 1].T
                L = torch.linalg.cholesky(f["covs"][t - 1])
                z = torch.linalg.solve_triangular(L, e.T, upper=False).pow(2).sum(0)
                nll = nll + 0.5 * (scale[:, t - 1] * z).sum() \
                    + n_seq * torch.log(L.diagonal()).sum()
            return nll + 0.5 * (w.pow(2) / prior_var).sum()

        def safe(w):
            try:
                return objective(w)
            except torch.linalg.LinAlgError:  # a line-search trial past positive definiteness
                return w.sum() * 0.0 + float("inf")

        best = None
        for shift in (-1.0, -0.5, 0.0, 0.5, 1.0):
            start = torch.zeros(n_params, dtype=torch.float64)
            start[0] = shift
            params = {"w": start.clone().requires_grad_(True)}
            ok = _lbfgs(params, lambda p=params: safe(p["w"]), max_iter)
            w = params["w"].detach() if ok else start
            with torch.no_grad():
                score = float(safe(w))
            if math.isfinite(score) and (best is None or score < best[0]):
                best = (score, w)
        if best is None:
            raise RuntimeError("FilterDrift.initial_fit: the marginal likelihood is not finite "
                               "at any start")
        score, w = best
        factor, logdet = _laplace_factor(objective, w)
        # Laplace: log ∫ p(D|w) p(w) dw with the prior's normalisation (the data's constant
        # is the same for every law of these snapshots)
        evidence = -score - 0.5 * torch.log(2 * math.pi * prior_var).sum().item() \
            + 0.5 * n_params * math.log(2 * math.pi) - 0.5 * float(logdet)
        values = {k: v.clone() for k, v in self._unpack(w).items()}
        return values, (w, factor), evidence

    def initial_fit(self, counts: torch.Tensor, max_iter: int = 200) -> tuple[dict, tuple]:
        """Empirical Bayes: the sites maximise the filter's marginal likelihood of the
        empirical fractions (every sequence filtered from its first snapshot, with the
        multinomial variance of its particle count) times their prior (MAP-II), and their
        Laplace posterior is drawn into the forecasts (:meth:`sample_linear`). L-BFGS starts
        at shifts of -1, -1/2, 0, 1/2 and 1 bins per step (the likelihood is not convex in
        the shift); the best optimum is kept. With ``width_prior_scale = "auto"`` the law with
        learned widths is kept only where its Laplace evidence beats that of equal bins and
        there are at least ``FILTER_WIDTH_MIN_SEQUENCES`` sequences (else the width sites are
        held at zero). Nothing is stored.

        :param counts: ``(n_sequences, n_times, n_bins)``, ``n_times ≥ 2``.
        :returns: ``(values, posterior)``: the values of :meth:`held_sites` and
            ``(mean (P,), Cholesky factor (P, P))`` of the sites side by side.
        """
        counts = counts.detach().to(torch.float64).cpu()
        if self.auto_widths and counts.shape[0] < FILTER_WIDTH_MIN_SEQUENCES:
            values, posterior, evidence = None, None, -math.inf
        else:
            values, posterior, evidence = self._fit(counts, max_iter)
        if self.auto_widths:
            self.width_prior_scale = 0.0
            try:
                equal, equal_post, equal_evidence = self._fit(counts, max_iter)
            finally:
                self.width_prior_scale = FILTER_WIDTH_SCALE
            self.widths_evidence = (evidence, equal_evidence)
            if equal_evidence >= evidence:
                B, P = self.n_bins, equal_post[0].numel()
                values = {**equal, "filter.bins": torch.zeros(B, dtype=torch.float64)}
                mean = torch.cat([equal_post[0], torch.zeros(B, dtype=torch.float64)])
                factor = torch.zeros(P + B, P + B, dtype=torch.float64)
                factor[:P, :P] = equal_post[1]
                posterior = (mean, factor)
        return values, posterior

    def sample_linear(self, posterior: tuple, num_samples: int) -> dict[str, torch.Tensor]:
        """Draws of the sites, each ``(S, 1, *shape)``, from the Laplace ``posterior`` of
        :meth:`initial_fit` (``S`` = ``num_samples``; the singleton axis broadcasts over
        sequences)."""
        mean, factor = posterior
        eps = torch.randn(num_samples, mean.numel(), dtype=mean.dtype)
        return self._unpack((mean + eps @ factor.T).unsqueeze(1))


def displacement_width(counts: torch.Tensor, max_sequences: int = 4) -> float:
    """σ, the rms width (bins) of the spread of one snapshot's displacement of independent
    particles: :class:`FilterDrift`'s empirical Bayes (equal bins) on the first
    ``max_sequences`` sequences of ``counts`` ``(n_sequences, n_times, n_bins)``. It says how
    long the profile inside the bins lives: its slowest mode (one bin long) keeps
    ``exp(-2 π² σ²)`` of its amplitude per snapshot. Four sequences fix it to a few per cent
    (25 bins at Δt = 200: 0.178 from one, 0.173 from four and 64; the paper's cell 0.496 /
    0.489 / 0.491), so more are not read."""
    counts = torch.as_tensor(counts).detach().to(torch.float64).cpu()
    if counts.dim() != 3 or counts.shape[1] < 2 or counts.shape[2] < 3:
        raise ValueError("counts: expected (n_sequences, n_times >= 2, n_bins >= 3), got "
                         f"{tuple(counts.shape)}")
    drift = FilterDrift(counts.shape[-1], width_prior_scale=0.0)
    values, _ = drift.initial_fit(counts[:max_sequences])
    return 0.3 * math.exp(float(values["filter.width"]))


def auto_radius(n_bins: int) -> int:
    """Reach of the jump stencil in bins: a quarter of the domain, at least 2, at most (B-1)/2."""
    return max(1, min(max(math.ceil(n_bins / 4), 2), (n_bins - 1) // 2))


class FluxDrift(ThetaModule):
    r"""A local, conservative, translation-equivariant drift in flux form, ``(..., B) -> (..., B)``.

    Particles leave bin ``i`` for bin ``i + k`` at rate ``r_{i,k}`` per coarse step, and a
    network adds a nonlinear face flux ``F_{j+1/2}(X)``:

    ``NN(X)_j = Σ_k [r_{j-k,k} X_{j-k} - r_{j,k} X_j] - (F_{j+1/2}(X) - F_{j-1/2}(X)) / B``

    - ``r_{i,k} = p_k + δ_{i,k}``: a translation-invariant jump stencil ``p_k`` for
      ``0 < |k| ≤ radius`` (site ``jumps``, ``(2·radius,)``) plus a per-bin correction ``δ_{i,k}``
      for ``|k| ≤ correction_radius`` (site ``delta``, ``(B, 2·correction_radius)``): the
      non-equivariant part (e.g. bins of unequal width);
    - hierarchical prior: ``p_k ~ N(0, jump_scale · exp(-jump_decay · (|k| - 1) / 2))``
      (``jump_prior="decay"``: locality, the prior variance of a jump falls off geometrically
      with its reach at a rate ``jump_decay ~ N(0, 1)`` that the data set; ``"flat"``: one scale
      for every reach, ``jump_decay`` absent), ``δ ~ N(0, correction_scale)`` with
      ``jump_scale, correction_scale ~ HalfCauchy(hyper_prior_scale)``: the data decide how far
      the dynamics departs from locality and translation invariance. The linear part and its
      scales are set by empirical Bayes (:meth:`initial_fit`: the scales maximise the evidence
      with the jumps integrated out, MAP-II; the jumps are their posterior mean) and held there.
      One to a few sequences leave the decay rate poorly determined (its two estimates below
      lie at about 3-5 and 2-3, 0.5-3 nats of evidence apart, and the rate decides how much of
      the transport the second-nearest jumps carry), so with ``"decay"`` the law is averaged
      over both: type-II maximum likelihood, and MAP-II under the rate's ``N(0, 1)`` hyperprior (the
      weights are the mean of the two posterior means; :meth:`sample_linear` draws from
      both, half each). With many sequences the two laws agree;
    - dense correction (optional, ``dense``): a rate ``D_{i,j}`` from every bin ``j`` to every
      other bin ``i`` (site ``dense``, ``(B, B)``, diagonal unused) under ``N(0, dense_scale)``,
      held by empirical Bayes like δ: the non-local, non-equivariant departure that a
      least-squares linear map would fit, kept only where the data support it (the evidence
      shrinks it to zero with few sequences). ``dense="auto"`` uses it up to
      ``DENSE_AUTO_MAX_BINS`` bins: its ``B(B-1)`` weights cost ``O(B^6)`` per evidence step;
    - memory (optional, ``memory``): ``+ Σ_k c_k ΔX_{j-k} - mean_j(·)`` with
      ``ΔX = X_t - X_{t-1}`` and ``|k| ≤ memory_radius`` (site ``memory``, under
      ``N(0, memory_scale)``, held by empirical Bayes like the jumps): the bin fractions alone
      do not carry the sub-bin state, so their exact CG law is not Markov (Mori-Zwanzig); the
      last increment tells where the mass sits inside the bins (second-order chain, see
      :class:`~cgpyro.distributions.MarkovChain`). ``memory="auto"`` keeps its weights only where
      the evidence of the second-order law exceeds that of the first-order one (Bayesian
      model comparison on the same increments), and holds them at zero otherwise (the
      first-order law). With a single sequence it must win by ``ONE_SEQUENCE_MEMORY_MARGIN``
      nats (strong evidence): one trajectory of the sub-bin state is a noisy basis for the
      choice, yet coarse bins (8-16, where the sub-bin state dominates) need the term even
      then. With ``"auto"``
      ``memory_radius`` is the longest reach: reaches ``1, 2, ...`` are tried in turn while
      each one's evidence beats the one before, and the weights beyond the kept reach are
      held at zero. With ``memory_lags = L > 1`` the term also has stencils of the older
      increments ``ΔX_{t-1}, ..., ΔX_{t-L+1}`` (sites ``memory2``, ...; a chain of order
      ``1 + L``; ``models/physics.toml`` uses ``L = 3``), for short time steps, where the
      sub-bin state persists for many steps;
      with ``"auto"`` each older lag is kept only while its evidence beats the law without it
      on every target both can use by ``OLDER_LAG_MARGIN`` nats (after the first lag is
      kept). Every order has the closed-form ELBO (:meth:`GaussianTransition.affine_matrices`
      gives one matrix per earlier state);
    - ``F`` (optional, ``channels``): a periodic 1-D convolutional network (circular padding,
      ``kernel`` wide, ``activation``) of ``u = B·X - 1`` and, when particle totals are given,
      ``v = (B·X)·N/N_ref - 1`` (the density in units of the training data's mean total, site
      ``total_ref`` held by empirical Bayes, so that
      interacting systems can depend on the absolute density); sites ``flux.{k}.weight``
      ``(out, in, kernel)``, ``flux.{k}.bias`` ``(out,)`` under ``N(0, weight_prior_scale)``;
      the last layer starts at zero (the drift starts as the linear stencil).

    For any θ the mean dynamics conserves ``Σ_j X_j`` exactly and commutes with cyclic shifts
    when ``δ = 0``. ``B`` is the number of bins; every size scales with it.
    """

    def __init__(
        self,
        n_bins: int,
        radius: int | str = "auto",
        correction_radius: int = 2,
        channels: tuple[int, ...] = (),
        kernel: int = 5,
        activation: str = "tanh",
        weight_prior_scale: float = 1.0,
        hyper_prior_scale: float = 1.0,
        memory: bool | str = False,
        memory_radius: int = 1,
        jump_prior: str = "decay",
        dense: bool | str = False,
        memory_lags: int = 1,
    ):
        super().__init__()
        B = int(n_bins)
        if B < 3:
            raise ValueError(f"FluxDrift needs n_bins >= 3, got {n_bins}")
        if radius == "auto":
            radius = auto_radius(B)
        if isinstance(radius, bool) or not isinstance(radius, int) \
                or not 1 <= radius <= (B - 1) // 2:
            raise ValueError(f"radius must be 'auto' or an integer in [1, (n_bins-1)//2 = "
                             f"{(B - 1) // 2}], got {radius!r}")
        if isinstance(correction_radius, bool) or not isinstance(correction_radius, int) \
                or correction_radius < 0:
            raise ValueError(f"correction_radius must be a non-negative integer, got "
                             f"{correction_radius!r}")
        correction_radius = min(correction_radius, radius)  # a spec's value is "up to"
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 \
                or kernel % 2 == 0 or (channels and kernel > B):
            raise ValueError(f"kernel must be an odd integer in [1, n_bins = {B}], got {kernel!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        for name, value in (("weight_prior_scale", weight_prior_scale),
                            ("hyper_prior_scale", hyper_prior_scale)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if memory not in (True, False, "auto"):
            raise ValueError(f"memory must be true, false or 'auto', got {memory!r}")
        if memory == "auto" and isinstance(memory_radius, int):
            memory_radius = min(memory_radius, (B - 1) // 2)  # "auto": the longest reach tried
        if isinstance(memory_radius, bool) or not isinstance(memory_radius, int) \
                or not 0 <= memory_radius <= (B - 1) // 2:
            raise ValueError(f"memory_radius must be an integer in [0, (n_bins-1)//2 = "
                             f"{(B - 1) // 2}], got {memory_radius!r}")
        if jump_prior not in ("decay", "flat"):
            raise ValueError(f"jump_prior must be 'decay' or 'flat', got {jump_prior!r}")
        self.jump_prior = jump_prior
        if dense not in (True, False, "auto"):
            raise ValueError(f"dense must be true, false or 'auto', got {dense!r}")
        self.dense_on = bool(dense is True or (dense == "auto" and B <= DENSE_AUTO_MAX_BINS))
        if isinstance(memory_lags, bool) or not isinstance(memory_lags, int) or memory_lags < 1:
            raise ValueError(f"memory_lags must be a positive integer, got {memory_lags!r}")
        if memory_lags > 1 and channels:  # the network's warm start sees one earlier state
            raise ValueError("memory_lags > 1 is not yet supported with a flux network "
                             "(channels)")
        self.memory_mode = memory
        self.memory_radius = memory_radius if memory else 0
        # increments ΔX_t, ΔX_{t-1}, ... in the memory term (with "auto": the most tried)
        self.memory_lags = memory_lags if memory else 0
        self.n_bins, self.radius, self.correction_radius = B, radius, correction_radius
        self.channels, self.kernel, self.activation = tuple(int(c) for c in channels), kernel, \
            activation
        self.weight_prior_scale = float(weight_prior_scale)
        self.hyper_prior_scale = float(hyper_prior_scale)
        offsets = [k for k in range(-radius, radius + 1) if k != 0]
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)
        # reach of each jump beyond the nearest neighbour: the decay prior's exponent
        self.register_buffer("reach", torch.tensor([abs(k) - 1.0 for k in offsets],
                                                   dtype=torch.float64), persistent=False)
        self.uses_totals = True
        self._declare_sites()

    # -- declaration -------------------------------------------------------------------
    def _memory_sites(self) -> list[str]:
        """``memory`` (weights of ``ΔX_t``), ``memory2`` (of ``ΔX_{t-1}``), ...: one per lag."""
        return [f"memory{m}" if m > 1 else "memory" for m in range(1, self.memory_lags + 1)]

    def _corr_offsets(self) -> list[int]:
        c = self.correction_radius
        return [k for k in range(-c, c + 1) if k != 0]

    def shapes(self) -> dict[str, torch.Size]:
        shapes = {"jumps": torch.Size([2 * self.radius])}
        if self.correction_radius:
            shapes["delta"] = torch.Size([self.n_bins, 2 * self.correction_radius])
        if self.dense_on:
            shapes["dense"] = torch.Size([self.n_bins, self.n_bins])
        for name in self._memory_sites():
            shapes[name] = torch.Size([2 * self.memory_radius + 1])
        sizes = (2, *self.channels, 1) if self.channels else ()
        for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            shapes[f"flux.{k}.weight"] = torch.Size([o, i, self.kernel])
            shapes[f"flux.{k}.bias"] = torch.Size([o])
        return shapes

    def held_sites(self) -> list[str]:
        """Sites set by :meth:`initial_fit` and held there during SVI (relative names)."""
        names = ["jump_scale", "jumps"]
        if self.jump_prior == "decay":
            names.insert(1, "jump_decay")
        if self.correction_radius:
            names += ["correction_scale", "delta"]
        if self.dense_on:
            names += ["dense_scale", "dense"]
        for name in self._memory_sites():
            names += [f"{name}_scale", name]
        if self.channels:
            names.append("total_ref")
        return names

    def _declare_sites(self) -> None:
        """Hyperpriors ``HalfCauchy(hyper_prior_scale)``, the hierarchical linear part and
        ``N(0, weight_prior_scale)`` network weights (see the class docstring)."""
        shapes = self.shapes()

        def hyper(_):
            return dist.HalfCauchy(const(self.hyper_prior_scale))

        def under(scale_site, shape):
            shape = torch.Size(shape)

            def prior(self):  # the scale may carry leading axes (posterior draws)
                scale = getattr(self, scale_site)
                scale = scale.reshape(scale.shape + (1,) * len(shape))
                return dist.Normal(const(0.0), scale).expand(scale.shape[:-len(shape)] + shape) \
                    .to_event(len(shape))
            return prior

        self.declare("jump_scale", hyper)
        if self.jump_prior == "decay":
            self.declare("jump_decay", lambda _: dist.Normal(const(0.0),
                                                             const(DECAY_RATE_PRIOR_SCALE)))
            # the exponent is bounded so that far reaches never underflow to a zero scale
            self.declare("jumps", lambda self: dist.Normal(
                const(0.0), self.jump_scale.unsqueeze(-1) * torch.exp(
                    (-0.5 * self.jump_decay.unsqueeze(-1) * self.reach.to(**like_kwargs()))
                    .clamp(-300.0, 300.0))
            ).to_event(1))
        else:
            self.declare("jumps", under("jump_scale", shapes["jumps"]))
        for part in ("correction", "dense", *self._memory_sites()):
            site = "delta" if part == "correction" else part
            if site in shapes:
                self.declare(f"{part}_scale", hyper)
                self.declare(site, under(f"{part}_scale", shapes[site]))
        if self.channels:
            self.flux = _layers(shapes, "flux", self.weight_prior_scale)
            # the network's unit of density, set from the data (initial_fit) and held
            self.declare("total_ref", lambda _: FlatPositive(**like_kwargs()))

    def init_values(self, generator: torch.Generator | None = None, dtype=torch.float64):
        values = {"jump_scale": torch.tensor(0.1, dtype=dtype),
                  "jumps": torch.zeros(2 * self.radius, dtype=dtype)}
        if self.jump_prior == "decay":
            values["jump_decay"] = torch.tensor(0.0, dtype=dtype)
        if self.correction_radius:
            values["correction_scale"] = torch.tensor(0.01, dtype=dtype)
            values["delta"] = torch.zeros(self.n_bins, 2 * self.correction_radius, dtype=dtype)
        if self.dense_on:
            values["dense_scale"] = torch.tensor(0.01, dtype=dtype)
            values["dense"] = torch.zeros(self.n_bins, self.n_bins, dtype=dtype)
        for name in self._memory_sites():
            values[f"{name}_scale"] = torch.tensor(0.01, dtype=dtype)
            values[name] = torch.zeros(2 * self.memory_radius + 1, dtype=dtype)
        if self.channels:
            values["total_ref"] = torch.tensor(1.0, dtype=dtype)
        shapes = self.shapes()
        n_layers = len(self.channels) + 1 if self.channels else 0
        for k in range(n_layers):
            shape = shapes[f"flux.{k}.weight"]
            bound = 1.0 / math.sqrt(shape[1] * shape[2])
            u = torch.rand(shape, generator=generator, dtype=dtype)
            values[f"flux.{k}.weight"] = (2 * u - 1) * bound if k < n_layers - 1 \
                else torch.zeros(shape, dtype=dtype)
            values[f"flux.{k}.bias"] = torch.zeros(shape[0], dtype=dtype)
        return values

    # -- evaluation ----------------------------------------------------------------------
    def _memory_window(self, dx: torch.Tensor) -> torch.Tensor:
        """``ΔX_{j-k}`` for ``|k| ≤ memory_radius``, centred over bins: ``(..., B, 2r+1)``."""
        B, r = self.n_bins, self.memory_radius
        j = torch.arange(B, device=dx.device)
        k = torch.arange(-r, r + 1, device=dx.device)
        win = dx[..., (j[:, None] - k) % B]
        return win - win.mean(-2, keepdim=True)  # the memory term moves no mass

    def _memory_term(self, dx, memory) -> torch.Tensor:
        """``Σ_k c_k ΔX_{j-k} - mean_j`` of an increment ``dx``, shape of ``dx``; ``memory``
        ``(..., 2r+1)``."""
        return (self._memory_window(dx) * memory.unsqueeze(-2)).sum(-1)

    def _features(self, x: torch.Tensor, dx: torch.Tensor | None = None) -> torch.Tensor:
        """Regressors of the linear part: ``(..., B, P)`` with ``P = 2·radius + B·2·c``
        (``+ 2·memory_radius + 1`` memory regressors of ``dx = X_t - X_{t-1}`` when given)."""
        B = self.n_bins
        j = torch.arange(B, device=x.device)
        feats = [x[..., (j[:, None] - self.offsets.to(x.device)) % B] - x[..., :, None]]
        if self.correction_radius:
            # δ_{i,k} moves r X_i from bin i to bin i + k: +X_i at i + k, -X_i at i.
            ks = self._corr_offsets()
            out = torch.zeros(*x.shape, B, len(ks), dtype=x.dtype, device=x.device)
            for c, k in enumerate(ks):
                out[..., j, j, c] -= x
                out[..., (j + k) % B, j, c] += x
            feats.append(out.reshape(*x.shape, B * len(ks)))
        if self.dense_on:  # D_{i,j} moves D X_j from bin j to bin i: +X_j at i, -X_j at j
            eye = torch.eye(B, dtype=x.dtype, device=x.device)
            flow = x[..., None, None, :] * (eye[:, :, None] - eye[:, None, :])  # (..., r, i, j)
            off = ~torch.eye(B, dtype=torch.bool, device=x.device)
            feats.append(flow[..., off])
        if dx is not None:  # ΔX_t, ΔX_{t-1}, ... side by side: one window each
            feats += [self._memory_window(d) for d in dx.split(B, -1)]
        return torch.cat(feats, -1)

    def _unbatched(self, theta: dict[str, torch.Tensor], memory: bool) -> bool:
        """The linear part's θ has no leading (posterior-draw) axes."""
        return (theta["jumps"].dim() == 1
                and (not self.correction_radius or theta["delta"].dim() == 2)
                and (not self.dense_on or theta["dense"].dim() == 2)
                and (not memory or all(theta[n].dim() == 1 for n in self._memory_sites())))

    def _matrix_form(self, x: torch.Tensor, theta: dict[str, torch.Tensor], memory: bool) -> bool:
        """Whether :meth:`forward` applies the linear part as one (B, B) matrix, built from the
        identity, instead of gathering (and, backwards, scattering) every jump of every state:
        for θ without posterior-draw axes and at least B states, since building the matrix
        costs as much as gathering for B states (SVI step of the default model, 64 sequences
        x 25 bins: 14.8 -> 8.5 ms; the matrix for 1 sequence x 128 bins: 14 of 25 ms)."""
        return self._unbatched(theta, memory) and x.numel() >= self.n_bins ** 2

    def linear(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        """The jump part ``Σ_k r_{j-k,k} X_{j-k} - r_{j,k} X_j``, shape of ``x``."""
        B = self.n_bins
        j = torch.arange(B, device=x.device)
        src = x[..., (j[:, None] - self.offsets.to(x.device)) % B]  # (..., B, 2R): X_{j-k}
        jumps = theta["jumps"]
        out = (src * jumps.unsqueeze(-2)).sum(-1) - x * jumps.sum(-1, keepdim=True)
        if self.correction_radius:
            delta = theta["delta"]  # (..., B, 2c): rate from bin i by offset k
            for c, k in enumerate(self._corr_offsets()):
                flow = delta[..., c] * x  # (..., B): out of bin i
                out = out - flow + flow.roll(k, -1)
        if self.dense_on:  # a diagonal D_{j,j} moves nothing: it cancels between the two terms
            D = theta["dense"]
            out = out + torch.einsum("...ij,...j->...i", D, x) - x * D.sum(-2)
        return out

    def _conv(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # Circular conv as gather + einsum so that θ may carry batch axes (posterior draws).
        B, half = self.n_bins, self.kernel // 2
        idx = (torch.arange(B, device=h.device)[:, None]
               + torch.arange(-half, half + 1, device=h.device)[None, :]) % B
        win = h[..., idx]  # (..., C_in, B, kernel)
        return torch.einsum("...cbk,...ock->...ob", win, weight) + bias.unsqueeze(-1)

    def face_flux(self, x: torch.Tensor, theta: dict[str, torch.Tensor],
                  totals: torch.Tensor | None = None) -> torch.Tensor:
        """``F_{j+1/2}(X)``, shape of ``x`` (zero without ``channels``)."""
        if not self.channels:
            return torch.zeros_like(x)
        u = x * self.n_bins
        rel = 1.0 if totals is None else (totals / theta["total_ref"]).unsqueeze(-1)
        h = torch.stack([u - 1, u * rel - 1], -2)  # (..., 2, B)
        act = ACTIVATIONS[self.activation]
        n_layers = len(self.channels) + 1
        for k in range(n_layers):
            h = self._conv(h, theta[f"flux.{k}.weight"], theta[f"flux.{k}.bias"])
            if k < n_layers - 1:
                h = act(h)
        return h.squeeze(-2)

    def forward(self, x: torch.Tensor, theta: dict[str, torch.Tensor],
                totals: torch.Tensor | None = None,
                x_prev: torch.Tensor | None = None) -> torch.Tensor:
        """``NN(X_t)`` of shape ``x`` ``(..., B)``; ``x_prev`` is ``X_{t-1}`` or a tuple
        ``(X_{t-1}, X_{t-2}, ...)``, newest first, at least one per memory lag (the memory term;
        ``None``: no earlier state, no memory)."""
        memory = bool(self.memory_mode) and x_prev is not None
        increments = []  # (ΔX_{t-m+1}, its weights) for each lag m
        if memory:
            hist = (x, *((x_prev,) if torch.is_tensor(x_prev) else x_prev))
            assert len(hist) > self.memory_lags, \
                f"{self.memory_lags} memory lags need {self.memory_lags} earlier states"
            # a lag held at exactly zero (rejected by the evidence) adds nothing: skipped
            increments = [(hist[m] - hist[m + 1], theta[name])
                          for m, name in enumerate(self._memory_sites())
                          if theta[name].requires_grad or bool(theta[name].any())]
        if self._matrix_form(x, theta, memory):
            eye = torch.eye(self.n_bins, dtype=x.dtype, device=x.device)
            out = x @ self.linear(eye, theta)
            for dx, w in increments:
                out = out + dx @ self._memory_term(eye, w)
        else:
            out = self.linear(x, theta)
            for dx, w in increments:
                out = out + self._memory_term(dx, w)
        if self.channels:
            F_ = self.face_flux(x, theta, totals)
            out = out - (F_ - F_.roll(1, -1)) / self.n_bins
        return out

    @property
    def linear_in_state(self) -> bool:
        """Without a face-flux network the drift is linear in ``(X_t, X_{t-1})``, which gives
        the transition a closed-form expected log density
        (:meth:`GaussianTransition.expected_log_prob`)."""
        return not self.channels

    # -- empirical Bayes -----------------------------------------------------------------
    @property
    def order(self) -> int:
        """``1 + memory_lags`` with a memory term (``p(X_{t+1} | X_t, ..., X_{t-L})``), else 1.
        With ``memory="auto"`` the term is declared and the data decide its weights (zero where
        the evidence rejects a lag: the same law as a lower order)."""
        return 1 + self.memory_lags if self.memory_mode else 1

    def initial_fit(self, counts: torch.Tensor, max_pairs: int = 8192) -> tuple[dict, tuple]:
        """Empirical Bayes for the linear part on pairs of empirical fractions.

        Bayesian linear regression of ``m_{t+1}/N - m_t/N`` on the jump features with priors
        ``N(0, jump_scale²)`` (jumps), ``N(0, correction_scale²)`` (δ) and
        ``N(0, memory_scale²)`` (memory, regressors ``m_t/N - m_{t-1}/N``), Gaussian residuals;
        the scales and the residual variance maximise the log evidence (L-BFGS on its closed
        form, weights integrated out), the weights are their posterior mean. With
        ``memory="auto"`` it first decides whether the memory term is used (see the class
        docstring); a memory term not used has zero weights. With ``channels`` the network's
        reference total ``total_ref`` is the data's mean particle total. Nothing is stored.

        :param counts: ``(n_sequences, n_times, n_bins)``, ``n_times ≥ 2``.
        :param max_pairs: at most this many (evenly spread) pairs of snapshots are used.
        :returns: ``(values, posterior)``: the values of :meth:`held_sites` (relative names)
            and the Gaussian posterior of the linear weights ``(mean, Cholesky factor of the
            covariance)``, for :meth:`sample_linear`; with the decay prior an equal mixture of
            two, ``(means (2, P), factors (2, P, P))``.
        """
        frac = (counts / counts.sum(-1, keepdim=True)).to(torch.float64).cpu()
        stats = fit = None
        keep = None
        if self.memory_mode == "auto":
            memory = frac.shape[1] >= 3
            if memory:  # the comparison's second-order fit is the one kept, if memory wins
                margin = ONE_SEQUENCE_MEMORY_MARGIN if frac.shape[0] == 1 else 0.0
                memory, stats, fit, keep = self._memory_helps(frac, max_pairs, margin)
                if memory and self.memory_lags > 1 and frac.shape[1] >= 4:
                    memory, stats, fit, keep = self._memory_lags_help(
                        frac, max_pairs, margin, min(self.memory_lags, frac.shape[1] - 2),
                        (1, stats, fit, keep))
        else:  # every declared lag the snapshots allow
            memory = min(self.memory_lags, frac.shape[1] - 2) if self.memory_mode else 0
        values, posterior = self._fit_linear(frac, memory, max_pairs, stats, hedge=True, fit=fit,
                                             keep=keep)
        self._warn_short_step(posterior)
        if self.channels:
            values["total_ref"] = counts[:, 0].sum(-1).mean().detach().to(torch.float64).cpu()
        return values, posterior

    def _warn_short_step(self, posterior: tuple) -> None:
        """Warn where the fitted stencil moves particles much less than a bin per step: its
        mean-square displacement ``Σ_k p_k k²`` is under ``SHORT_STEP_RMS²`` by more than two
        posterior standard deviations (a stencil that few or noisy data shrink does not warn)."""
        means, factors = posterior
        if means.dim() == 1:  # one Gaussian, or the decay prior's mixture of two
            means, factors = means[None], factors[None]
        nj = 2 * self.radius
        a = torch.zeros(means.shape[-1], dtype=means.dtype)
        a[:nj] = self.offsets.to(means.dtype).pow(2)
        msd = means @ a
        sd = (factors.transpose(-1, -2) @ a).norm(dim=-1)
        if float((msd + 2 * sd).max()) < SHORT_STEP_RMS ** 2:
            rms = float(msd.mean().clamp_min(0.0).sqrt())
            warnings.warn(
                f"the fitted transport is {rms:.2f} bins (rms displacement) per snapshot: the "
                "state inside the bins carries the dynamics and bin fractions are far from "
                "Markov, so forecasts can be several times the physical floor (measured: 2.5-8x "
                "at 0.17-0.27 bins, benchmarks/matrix.md). For independent particles the "
                "model 'subbin' (a sub-bin state inferred by a Kalman filter) is built for "
                "this, and the default spec 'auto' trains it where the data show a short "
                "step; more sequences or a longer time between snapshots also help",
                UserWarning, stacklevel=3)

    def _pairs(self, frac, lags: int):
        """Regression pairs ``(x, dx, y)``, rows ``(sequence, time)`` sequence-major, ``x`` and
        ``y`` ``(rows, B)``; ``dx`` (``lags`` ≥ 1 memory lags: pairs from ``t = lags`` on, with
        the increments ``ΔX_t, ..., ΔX_{t-lags+1}`` side by side, ``(rows, lags·B)``) or
        ``None``."""
        B, T, L = self.n_bins, frac.shape[1], int(lags)
        x, y = frac[:, L:T - 1].reshape(-1, B), (frac[:, L + 1:] - frac[:, L:T - 1]).reshape(-1, B)
        if not L:
            return x, None, y
        dx = torch.cat([frac[:, L - m + 1:T - m] - frac[:, L - m:T - m - 1]
                        for m in range(1, L + 1)], -1)
        return x, dx.reshape(-1, L * B), y

    def _groups(self, lags: int) -> torch.Tensor:
        """Prior group of each weight: 0 jumps, 1 δ, 3 dense, then the memory windows of
        ``lags`` lags (2 for ``ΔX_t``, ``3 + m`` for lag ``m ≥ 2``)."""
        B = self.n_bins
        groups = [0] * (2 * self.radius) + [1] * (B * 2 * self.correction_radius)
        if self.dense_on:
            groups += [3] * (B * (B - 1))
        for m in range(1, int(lags) + 1):
            groups += [2 if m == 1 else 3 + m] * (2 * self.memory_radius + 1)
        return torch.tensor(groups)

    def _gram(self, x, dx, y, P: int) -> tuple:
        """Sufficient statistics of the regression: ``(Φᵀ Φ, Φᵀ y, yᵀ y, number of y)``.

        The features are linear in ``z = (x, dx)``, so the pairs enter only through
        ``S = Σ z zᵀ`` and ``Σ z yᵀ``: ``ΦᵀΦ`` is the Gram of the features of the ``Z``
        pseudo-states ``√λ_k v_k`` (``S = Σ_k λ_k v_k v_kᵀ``) and ``Φᵀy = Σ_s Φ(e_s)ᵀ (Σ z
        yᵀ)_s``: a pass over ``Z`` = B (2B with memory) states instead of every pair (8 s per
        fit at 8,192 pairs of 25 bins with the dense correction), in bounded memory."""
        B = self.n_bins
        z = x if dx is None else torch.cat([x, dx], -1)
        G = torch.zeros(P, P, dtype=torch.float64)
        r = torch.zeros(P, dtype=torch.float64)

        def features(states):  # (k, Z) -> (k, B, P)
            return self._features(states[:, :B], None if dx is None else states[:, B:])

        with torch.no_grad():
            S, Q = z.T @ z, z.T @ y  # (Z, Z), (Z, B)
            lam, V = torch.linalg.eigh(S)
            pseudo = (V * lam.clamp_min(0.0).sqrt()).T  # rows √λ_k v_k; rounding can make λ < 0
            unit = torch.eye(z.shape[-1], dtype=torch.float64)
            chunk = max(1, 2**22 // (B * P))  # in bounded memory
            for i in range(0, z.shape[-1], chunk):
                Phi = features(pseudo[i:i + chunk]).reshape(-1, P)
                G += Phi.T @ Phi
                r += torch.einsum("srf,sr->f", features(unit[i:i + chunk]), Q[i:i + chunk])
        return G, r, y.pow(2).sum(), y.numel()

    def _fit_linear(self, frac, memory: int, max_pairs: int, stats=None, hedge: bool = False,
                    fit=None, keep=None):
        """Empirical Bayes on the pairs of ``frac`` (or their ``stats``; ``fit``: their
        :meth:`_evidence_fit` already made; ``keep``: the indices of the weights that
        ``stats`` hold, a shorter memory reach, the others held at zero). With ``hedge`` and
        the decay prior, the law averaged over the two estimates of the decay rate (see the
        class docstring): weights the mean of the two posterior means, posterior their equal
        mixture (means ``(2, P)``, Cholesky factors ``(2, P, P)``)."""
        groups = self._groups(memory)
        if stats is None:
            x, dx, y = self._spread_pairs(frac, memory, max_pairs)
            stats = self._gram(x, dx, y, len(groups))
            if keep is not None:
                stats = (stats[0][keep][:, keep], stats[1][keep], *stats[2:])
        if keep is not None:
            groups = groups[keep]
        values, posterior, *_ = fit or self._evidence_fit(*stats, groups)
        values = dict(values)
        if hedge and self.jump_prior == "decay":
            # from the default start only: a restart from the ML optimum finds a higher MAP-II
            # optimum in some cells, but forecast worse in the one that moved (Δt = 6,400,
            # seed 1, n = 1: 1.216 -> 1.251; 91 other rows unchanged)
            other, other_posterior, *_ = self._evidence_fit(*stats, groups,
                                                            rate_scale=DECAY_RATE_PRIOR_SCALE)
            for name in ("jumps", "delta", "dense", *self._memory_sites()):
                if name in values:
                    values[name] = 0.5 * (values[name] + other[name])
            posterior = tuple(torch.stack(pair) for pair in zip(posterior, other_posterior,
                                                                 strict=True))
        if keep is None:
            return values, posterior
        # a shorter reach: its weights in the middle of the longest one's, the others zero
        R = self.memory_radius
        for name in self._memory_sites():
            r = (values[name].shape[0] - 1) // 2
            values[name] = torch.nn.functional.pad(values[name], (R - r, R - r))
        P = len(self._groups(memory))
        mean = posterior[0].new_zeros(*posterior[0].shape[:-1], P)
        mean[..., keep] = posterior[0]
        factor = posterior[1].new_zeros(*posterior[1].shape[:-2], P, P)
        factor[..., keep[:, None], keep] = posterior[1]
        return values, (mean, factor)

    def _spread_pairs(self, frac, memory: bool, max_pairs: int):
        """:meth:`_pairs`, at most ``max_pairs`` of them, evenly spread: plenty for the few
        hundred weights."""
        x, dx, y = self._pairs(frac, memory)
        if x.shape[0] > max_pairs:
            keep = torch.linspace(0, x.shape[0] - 1, max_pairs).round().long()
            x, y = x[keep], y[keep]
            dx = None if dx is None else dx[keep]
        return x, dx, y

    def _memory_helps(self, frac, max_pairs: int,
                      margin: float = 0.0) -> tuple[bool, tuple, tuple, torch.Tensor]:
        """Bayesian model comparison of nested laws on the same targets, the increments from
        ``t = 1`` on: the first-order law, then second-order laws of memory reach ``1, ...,
        memory_radius``, each kept only while its log evidence (type-II ML) exceeds the
        shorter one's by more than ``margin`` nats (stepwise, so that one more candidate does
        not win by chance where the step before it lost). The evidence charges the memory
        weights their Occam factor. A shorter reach's regressors are a subset of the longest
        one's (each column of the memory window is centred on its own), so its statistics are
        a sub-block of the same Gram matrix. Returns the decision, the winning second-order
        law's regression statistics and :meth:`_evidence_fit`, and the indices ``keep`` of
        its weights among the longest reach's (``None``: all of them)."""
        x, dx, y = self._spread_pairs(frac, True, max_pairs)
        first = self._groups(False)
        shorter = (self._gram(x, None, y, len(first)), first, None)  # (stats, groups, fit)
        best = None
        groups = self._groups(True)
        full = self._gram(x, dx, y, len(groups))
        R, n_fixed = self.memory_radius, len(groups) - (2 * self.memory_radius + 1)
        for r in range(min(R, 1), R + 1):  # memory_radius 0: the one weight of ΔX_j
            keep = None if r == R else torch.cat([torch.arange(n_fixed),
                                                  torch.arange(R - r, R + r + 1) + n_fixed])
            stats = full if keep is None else (full[0][keep][:, keep], full[1][keep],
                                               *full[2:])
            kept_groups = groups if keep is None else groups[keep]
            short_fit, fit = self._nested_fits(shorter, (stats, kept_groups))
            if fit[2] <= short_fit[2] + margin:  # nested: a longer reach only where each
                break                            # step gains
            best = (stats, fit, keep)
            shorter = (stats, kept_groups, fit)
        if best is None:
            return False, None, None, None
        return True, *best

    def _nested_fits(self, shorter: tuple, longer: tuple) -> tuple[tuple, tuple]:
        """:meth:`_evidence_fit` of two nested laws, ``shorter = (stats, groups, fit or
        None)`` and ``longer = (stats, groups)``, for their comparison: the longer one also
        from the shorter's optimum (it contains that law), and where it then scores higher,
        the shorter one again from the longer's (a poor optimum of the shorter law must not
        let the longer one win). Returns ``(shorter fit, longer fit)``."""
        stats, groups, small = shorter
        small = small or self._evidence_fit(*stats, groups)
        big = self._evidence_fit(*longer[0], longer[1], start=small[3])
        if big[2] > small[2]:
            small = self._evidence_fit(*stats, groups, start=big[3], fitted=small)
        return small, big

    def _memory_lags_help(self, frac, max_pairs: int, margin: float, max_lags: int,
                          first: tuple) -> tuple[int, tuple | None, tuple | None,
                                                 torch.Tensor | None]:
        """After :meth:`_memory_helps` kept ``ΔX_t`` (``first``: its return), the older
        increments ``ΔX_{t-1}, ΔX_{t-2}, ...`` one lag at a time at the kept reach: lag ``m``
        against lag ``m - 1`` on every target both can use (``t ≥ m``), kept only while its
        log evidence wins by more than ``OLDER_LAG_MARGIN`` nats (or ``margin``, if larger).
        Returns as :meth:`_memory_helps`, with the number of lags kept in place of the decision
        (the statistics and fit only where one lag is kept: the caller refits a longer law on
        every pair it can use)."""
        R, w = self.memory_radius, 2 * self.memory_radius + 1
        keep1 = first[3]
        r = R if keep1 is None else (len(keep1) - (len(self._groups(1)) - w) - 1) // 2
        kept = 1
        for lags in range(2, max_lags + 1):
            x, dx, y = self._spread_pairs(frac, lags, max_pairs)
            groups = self._groups(lags)
            full = self._gram(x, dx, y, len(groups))
            n_fixed = len(groups) - lags * w

            def law(n_lags, full=full, groups=groups, n_fixed=n_fixed):
                keep = torch.cat([torch.arange(n_fixed)] + [
                    n_fixed + (m - 1) * w + torch.arange(R - r, R + r + 1)
                    for m in range(1, n_lags + 1)])
                return (full[0][keep][:, keep], full[1][keep], *full[2:]), groups[keep]

            shorter, longer = self._nested_fits((*law(lags - 1), None), law(lags))
            if longer[2] <= shorter[2] + max(margin, OLDER_LAG_MARGIN):
                break
            kept = lags
        if kept == 1:
            return first
        keep = None if r == R else torch.cat([torch.arange(len(self._groups(kept)) - kept * w)] + [
            len(self._groups(kept)) - kept * w + (m - 1) * w + torch.arange(R - r, R + r + 1)
            for m in range(1, kept + 1)])
        return kept, None, None, keep

    def sample_linear(self, posterior: tuple, num_samples: int) -> dict[str, torch.Tensor]:
        """Draws of ``jumps`` ``(S, 1, 2·radius)``, ``delta`` ``(S, 1, B, 2c)``, ``dense``
        ``(S, 1, B, B)`` and (memory used) ``memory`` ``(S, 1, 2·memory_radius + 1)`` from the
        empirical-Bayes Gaussian ``posterior`` of :meth:`initial_fit` (``S`` = ``num_samples``;
        the singleton axis broadcasts over sequences); of a mixture, draw ``s`` comes from
        component ``s mod K``."""
        m, L = (part if part.dim() == d else part.unsqueeze(0)  # one Gaussian: K = 1
                for part, d in zip(posterior, (2, 3), strict=True))
        eps = torch.randn(num_samples, m.shape[-1], dtype=m.dtype)
        comp = torch.arange(num_samples) % m.shape[0]
        w = torch.empty_like(eps)
        for k in range(m.shape[0]):
            w[comp == k] = m[k] + eps[comp == k] @ L[k].T
        w = w.unsqueeze(1)
        B = self.n_bins
        nj, nd, nD = 2 * self.radius, B * 2 * self.correction_radius, self._n_dense()
        out = {"jumps": w[..., :nj]}
        if self.correction_radius:
            out["delta"] = w[..., nj:nj + nd].reshape(num_samples, 1, B,
                                                      2 * self.correction_radius)
        if self.dense_on:
            out["dense"] = self._dense_matrix(w[..., nj + nd:nj + nd + nD])
        width = 2 * self.memory_radius + 1  # the memory windows used, one per lag
        for i, name in enumerate(self._memory_sites()):
            start = nj + nd + nD + i * width
            if m.shape[-1] >= start + width:
                out[name] = w[..., start:start + width]
        return out

    def _n_dense(self) -> int:
        return self.n_bins * (self.n_bins - 1) if self.dense_on else 0

    def _dense_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """Off-diagonal weights ``(..., B(B-1))`` -> ``(..., B, B)`` with a zero diagonal."""
        B = self.n_bins
        D = torch.zeros(*w.shape[:-1], B, B, dtype=w.dtype, device=w.device)
        D[..., ~torch.eye(B, dtype=torch.bool, device=w.device)] = w
        return D

    def _evidence_fit(self, G, r, yy, n_obs, groups, rate_scale: float | None = None,
                      start: tuple | None = None, fitted: tuple | None = None):
        """MAP-II: one prior precision per group of weights (``groups``: ``(P,)`` ids 0 jumps,
        1 δ, 2 memory, 3 dense — an absent group's entry is idle; with ``jump_prior="decay"``
        the jumps' precision grows as ``exp(jump_decay · (|k| - 1))``), and the noise precision
        maximise the evidence (with ``rate_scale``: times the decay rate's hyperprior); returns
        the values of :meth:`held_sites`, the Gaussian posterior ``(mean, Cholesky factor of
        cov)``, the maximised log evidence (with the hyperprior's log density, if any) and
        ``(log_h, groups)``, the hyperparameters found, for ``start``.

        L-BFGS from the default start can stop at a poor local optimum (measured: a
        second-order law 179 nats below the first-order law it contains). ``start``, the
        ``(log_h, groups)`` of a fit of a nested law (containing or contained), is a known
        point: its groups' precisions, the groups it lacks pinned at zero weight. Where the
        objective there beats the optimum found, L-BFGS runs again from it and the better
        optimum is kept, so a law does not score below a law it contains.
        ``fitted``: this law's own earlier fit, which then stands for the default start."""
        n_groups = int(groups.max()) + 1
        scale = G.diagonal().mean().clamp_min(1e-300)
        nj, nd = 2 * self.radius, self.n_bins * 2 * self.correction_radius
        decay = self.jump_prior == "decay"
        reach = torch.zeros(groups.shape[0], dtype=torch.float64)
        reach[:nj] = self.reach

        def neg_evidence(log_h, grad: bool = False):
            return _neg_log_evidence(log_h, G, r, yy, n_obs, groups, reach, scale, decay, grad,
                                     rate_scale)

        def optimise(init):
            log_h = init.clone().requires_grad_(True)
            opt = torch.optim.LBFGS([log_h], lr=1.0, max_iter=100,
                                    line_search_fn="strong_wolfe")

            def closure():
                with torch.no_grad():
                    loss, log_h.grad = neg_evidence(log_h, grad=True)
                return loss

            try:
                opt.step(closure)
            except torch.linalg.LinAlgError:  # keep the start if a trial point was singular
                pass
            with torch.no_grad():
                if not torch.isfinite(log_h).all():
                    log_h.copy_(init)
                try:
                    out = neg_evidence(log_h)
                except torch.linalg.LinAlgError:
                    log_h.copy_(init)
                    out = neg_evidence(log_h)
            return log_h.detach(), out

        if fitted is None:
            # log τ_g (prior precisions relative to the Gram scale), the jumps' decay rate
            # (held at 0 for "flat"), log β (noise precision)
            first = torch.zeros(n_groups + 2, dtype=torch.float64)
            first[-1] = math.log(n_obs / max(yy.item(), 1e-300))
            best = optimise(first)
            best_loss = float(best[1][0])
        else:
            best, best_loss = None, -fitted[2] / n_obs
        if start is not None:
            had, had_groups = start
            # pinned: prior precision e^8 times the data's (β G), within the clamp of e^25
            warm = torch.full((n_groups + 2,), min(float(had[-1]) + 8.0, 25.0),
                              dtype=torch.float64)
            present = torch.unique(had_groups)
            present = present[present < n_groups]
            warm[present] = had[present]
            warm[-2:] = had[-2:]
            try:
                with torch.no_grad():
                    better = float(neg_evidence(warm)[0]) < best_loss
            except torch.linalg.LinAlgError:
                better = False
            if better:
                again = optimise(warm)
                if float(again[1][0]) < best_loss:
                    best = again
        if best is None:  # the earlier fit stands
            return fitted
        log_h, (loss, m, alpha) = best
        with torch.no_grad():
            # Gaussian posterior of the linear part (exact given the scales): for forecasts
            # with epistemic uncertainty (:meth:`sample_linear`).
            H = torch.diag(alpha) + log_h[-1].exp() * G
            cov = torch.cholesky_inverse(_robust_cholesky(H))
            posterior = (m.clone(), _robust_cholesky(0.5 * (cov + cov.T)))
        log_h = log_h.detach()
        values = {"jump_scale": (log_h[0].exp() * scale).rsqrt(), "jumps": m[:nj].clone()}
        if decay:
            values["jump_decay"] = log_h[n_groups].clone()
        if self.correction_radius:
            values["correction_scale"] = alpha[nj].rsqrt()
            values["delta"] = m[nj:nj + nd].reshape(self.n_bins, 2 * self.correction_radius).clone()
        nD = self._n_dense()
        if self.dense_on:
            values["dense_scale"] = alpha[nj + nd].rsqrt()
            values["dense"] = self._dense_matrix(m[nj + nd:nj + nd + nD])
        nd = nd + nD  # memory weights follow the dense ones, one window per lag
        for i, name in enumerate(self._memory_sites()):
            idx = (groups[nj + nd:] == (2 if i == 0 else 4 + i)).nonzero().squeeze(-1) + nj + nd
            on = len(idx) > 0  # a lag not in this fit: zero weights (the lower-order law)
            values[f"{name}_scale"] = alpha[idx[0]].rsqrt() if on else torch.tensor(
                1e-12, dtype=m.dtype)
            values[name] = m[idx].clone() if on else torch.zeros(2 * self.memory_radius + 1,
                                                                 dtype=m.dtype)
        return values, posterior, -loss.item() * n_obs, (log_h, groups)
