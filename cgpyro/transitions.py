"""Transition laws p(X_{t+1} | X_t, θ_NN, σ_r) of the CG dynamics (eq. 4-5).

A transition is an ``nn.Module`` that *declares* its parameters θ as named sites with priors
(:meth:`priors`) and evaluates the density for given values of θ (:meth:`forward`). The model
samples θ (MAP in the paper's guide); fixed values skip the site (footnote 1 of the paper).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro import distributions as dist
from pyro.distributions import constraints
from torch import nn

__all__ = ["Drift", "GaussianTransition", "ACTIVATIONS"]

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


class Drift(nn.Module):
    r"""The right-hand side ``NN(X; θ_NN)`` of eq. 4, mapping ``(..., n_bins) -> (..., n_bins)``.

    ``NN(X) = [A X + b] + MLP(n_bins · X) / n_bins``

    - the MLP has ``hidden`` layers with ``activation`` (the paper: two layers of 25, ReLU); it
      sees ``n_bins · X`` (order-one inputs for bin fractions) and its output is scaled back by
      ``1 / n_bins``, a fixed affine reparametrization that leaves the function class unchanged;
    - ``linear_skip`` adds the linear map ``A X + b`` beside the MLP;
    - ``conserve_mass`` projects the drift onto ``Σ_j NN_j = 0`` so that the mean dynamics
      conserves ``Σ_j X_j`` exactly (the mass virtual observable then only has to hold at t=0).

    Sites (names relative to ``prefix``): ``linear.weight (B, B)``, ``linear.bias (B,)``,
    ``mlp.{k}.weight (out, in)``, ``mlp.{k}.bias (out,)``.
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

    def priors(self, dtype=torch.float64, device=None) -> dict[str, dist.Distribution]:
        """Independent ``Normal(0, weight_prior_scale)`` priors on every weight and bias."""
        zero = torch.zeros((), dtype=dtype, device=device)
        return {
            name: dist.Normal(zero, self.weight_prior_scale).expand(shape).to_event(len(shape))
            for name, shape in self.shapes().items()
        }

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


class GaussianTransition(nn.Module):
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

    Sites: ``drift.*`` (see :class:`Drift`), ``sigma_r`` and (full noise) ``noise_tril``.
    """

    def __init__(self, drift: Drift, sigma_prior_scale: float = 0.1, noise: str = "isotropic",
                 noise_ridge: float = 1e-4, sigma_r_multinomial: float | None = None):
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

    def priors(self, dtype=torch.float64, device=None) -> dict[str, dist.Distribution]:
        priors = {f"drift.{k}": v for k, v in self.drift.priors(dtype, device).items()}
        scale = torch.tensor(self.sigma_prior_scale, dtype=dtype, device=device)
        priors["sigma_r"] = dist.HalfCauchy(scale)
        if self.noise == "full":
            priors["noise_tril"] = FlatCholesky(self.drift.n_bins, dtype=dtype, device=device)
        return priors

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

    def mean(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        """``E[X_{t+1} | X_t] = X_t + NN(X_t)``, clamped to [-1, 2]; shape of ``x``.

        Bin fractions live in [0, 1]; the clamp never binds for a trained drift, but keeps
        rollouts with θ drawn from the prior (e.g. ``Predictive``'s probe of the plate nesting)
        finite over long horizons.
        """
        drift_theta = {k[len("drift."):]: v for k, v in theta.items() if k.startswith("drift.")}
        return (x + self.drift(x, drift_theta)).clamp(-1.0, 2.0)

    def forward(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> dist.Distribution:
        mean = self.mean(x, theta)
        sigma = theta["sigma_r"]
        if self.noise == "full":
            scale_tril = sigma[..., None, None] * theta["noise_tril"]
            return dist.MultivariateNormal(mean, scale_tril=scale_tril)
        # batched θ (particles, Predictive samples) carries x's batch axes: add the bin axis
        return dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1)
