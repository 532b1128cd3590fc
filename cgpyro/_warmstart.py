"""Warm start of θ before SVI: least squares on the empirical bin fractions.

:func:`fit_drift_least_squares` fits the drift network to pairs (or, for a flux drift, short
rollouts) of empirical fractions; :func:`hold_linear_part` fixes the empirical-Bayes part of a
drift that declares ``initial_fit``. Used by :class:`~cgpyro.inference.SVIInference`.
"""

from __future__ import annotations

import math

import torch

from .transitions import Drift

__all__ = ["fit_drift_least_squares", "hold_linear_part"]


def _identity_relu_init(drift: Drift, A: torch.Tensor, b: torch.Tensor, generator) -> dict:
    """θ for a ReLU MLP that computes exactly ``A X + b`` on X ≥ 0 (hidden widths ≥ n_bins).

    Hidden units ``1..B`` pass ``B·X`` through (ReLU is the identity on positive inputs); extra
    units start random with zero outgoing weight. Starting the paper's network here avoids the
    poor local minima it falls into from a random start.
    """
    B, dtype = drift.n_bins, A.dtype
    values = drift.init_values(generator, dtype)
    for k in range(len(drift.hidden)):
        w, bias = values[f"mlp.{k}.weight"], values[f"mlp.{k}.bias"]
        w[:B] = 0.0
        w[:B, :B] = torch.eye(B, dtype=dtype)
        bias[:B] = 0.0
    last = len(drift.hidden)
    values[f"mlp.{last}.weight"].zero_()
    values[f"mlp.{last}.weight"][:, :B] = A
    values[f"mlp.{last}.bias"] = b * B
    return values


def _lbfgs(params: dict[str, torch.Tensor], loss_fn, max_iter: int) -> bool:
    """Minimise ``loss_fn()`` over ``params`` (in place) by L-BFGS with a strong Wolfe search;
    ``True`` if the loss ended finite and no higher than it started (else keep the start)."""
    opt = torch.optim.LBFGS(list(params.values()), lr=1.0, max_iter=max_iter,
                            tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    before = loss_fn().item()
    opt.step(closure)
    after = loss_fn().item()
    return math.isfinite(after) and after <= before


def fit_drift_least_squares(
    model, counts: torch.Tensor, theta: dict[str, torch.Tensor], max_iter: int = 300,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Warm start: fit θ_NN by least squares to pairs of empirical bin fractions.

    Minimizes ``Σ |m_{t+1}/N - m_t/N - NN(m_t/N)|²`` with L-BFGS from the closed-form ridge
    solution of the linear map (or, for a ReLU MLP without linear skip, from a network that
    computes that linear map exactly). Sets the transition noise from the residuals.
    Returns a new θ dict (the input is not modified).

    :param counts: ``(n_sequences, n_times, n_bins)``, ``n_times ≥ 2``.
    """
    drift = model.transition.drift
    if hasattr(drift, "initial_fit"):
        return _fit_flux_drift(model, counts, theta, max_iter)
    B = drift.n_bins
    frac = counts / counts.sum(-1, keepdim=True)
    x = frac[:, :-1].reshape(-1, B).cpu()
    y = frac[:, 1:].reshape(-1, B).cpu()
    target = y - x
    # Ridge LS for A x + b: the fractions lie on Σx = 1, so [x, 1] is rank-deficient by one.
    Z = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    G = Z.T @ Z
    G = G + 1e-9 * G.diagonal().mean() * torch.eye(B + 1, dtype=G.dtype)
    W = torch.linalg.solve(G, Z.T @ target)
    A, b = W[:B].T.contiguous(), W[B].contiguous()

    theta = {k: v.detach().clone().cpu() for k, v in theta.items()}
    if drift.linear_skip:
        theta["transition.drift.linear.weight"] = A.clone()
        theta["transition.drift.linear.bias"] = b.clone()
        if drift.hidden:  # the MLP starts as a zero correction to the linear map
            last = len(drift.hidden)
            theta[f"transition.drift.mlp.{last}.weight"].zero_()
            theta[f"transition.drift.mlp.{last}.bias"].zero_()
    elif drift.activation == "relu" and all(h >= B for h in drift.hidden):
        init = _identity_relu_init(drift, A, b, generator)
        theta.update({f"transition.drift.{k}": v for k, v in init.items()})

    names = [k for k in theta if k.startswith("transition.drift.") and k not in model.fixed]
    params = {k: theta[k].clone().requires_grad_(True) for k in names}
    scale = target.pow(2).mean().clamp_min(1e-30)

    def loss_fn():
        full = {k[len("transition.drift."):]: params.get(k, theta[k])
                for k in theta if k.startswith("transition.drift.")}
        return (x + drift(x, full) - y).pow(2).mean() / scale

    if names and max_iter > 0 and _lbfgs(params, loss_fn, max_iter):
        theta.update({k: v.detach() for k, v in params.items()})
    with torch.no_grad():
        full = {k[len("transition.drift."):]: v for k, v in theta.items()
                if k.startswith("transition.drift.")}
        residuals = x + drift(x, full) - y
    for name, value in model.transition.noise_init(residuals).items():
        if f"transition.{name}" not in model.fixed:
            theta[f"transition.{name}"] = value
    return theta


def hold_linear_part(model, counts: torch.Tensor) -> None:
    """Empirical Bayes for a drift that declares ``initial_fit`` (:class:`FluxDrift`).

    Deterministic in the data, so a resumed or reloaded run gets the same values: the held
    sites are fixed in the model (``model.fix``) and have no guide parameters.
    """
    drift = getattr(model.transition, "drift", None)
    if not hasattr(drift, "initial_fit"):
        return
    drift.calibrate(counts)
    held = set(drift.held_sites())
    for name, value in drift.initial_fit(counts).items():
        if name in held:
            model.fix(f"transition.drift.{name}", value)


def _fit_flux_drift(model, counts, theta, max_iter):
    """Warm start of a flux drift's network on multi-step rollouts of the empirical fractions.

    MAP with the linear part held: ``Σ |x̂_{t+h} - x_{t+h}|² / (2σ²) + Σ w² / (2 s_w²)`` over
    rollouts of ``h ≤ 4`` steps from every start, σ² the residual variance of the linear part.
    Rollouts (not one-step pairs) make the nonlinear flux consistent over the horizons it will
    be used on. Then the noise parameters from the one-step residuals.
    """
    drift = model.transition.drift
    pre = "transition.drift."
    frac = (counts / counts.sum(-1, keepdim=True)).cpu()
    totals = counts[:, 0].sum(-1).cpu()
    theta = {k: v.detach().clone().cpu() for k, v in theta.items()}
    theta.update({k: v.cpu() for k, v in model.fixed.items() if k.startswith(pre)})
    names = [k for k in theta if k.startswith(pre + "flux.") and k not in model.fixed]

    def drift_theta(params):
        return {k[len(pre):]: params.get(k, theta[k]) for k in theta if k.startswith(pre)}

    def step(x, th, x_prev):  # (time, sequence, bin): totals broadcast over sequences
        return (x + drift(x, th, totals, x_prev=x_prev)).clamp(-1.0, 2.0)

    # X_{t-1} for a drift with memory, with X_{-1} = X_0 as in the model
    before = torch.cat([frac[:, :1], frac[:, :-1]], 1)
    n_times = frac.shape[1]
    H = min(4, n_times - 1)
    with torch.no_grad():
        lin = step(frac[:, :-1].transpose(0, 1), drift_theta({}),
                   before[:, :-1].transpose(0, 1)).transpose(0, 1)
        sigma2 = (lin - frac[:, 1:]).pow(2).mean().clamp_min(1e-30)

    def loss_fn(params):
        th = drift_theta(params)
        x, x_prev = frac[:, : n_times - H], before[:, : n_times - H]
        loss = 0.0
        for h in range(1, H + 1):
            x, x_prev = step(x.transpose(0, 1), th, x_prev.transpose(0, 1)).transpose(0, 1), x
            loss = loss + (x - frac[:, h: n_times - H + h]).pow(2).sum() / (2 * sigma2)
        prior = sum(params[k].pow(2).sum() for k in names) / (2 * drift.weight_prior_scale**2)
        return (loss + prior) / frac[:, 1:].numel()

    if names and max_iter > 0:
        params = {k: theta[k].clone().requires_grad_(True) for k in names}
        if _lbfgs(params, lambda: loss_fn(params), max_iter):
            theta.update({k: v.detach() for k, v in params.items()})
    with torch.no_grad():
        x = frac[:, :-1].transpose(0, 1)  # one step of the fitted drift (network included)
        residuals = (step(x, drift_theta({}), before[:, :-1].transpose(0, 1))
                     - frac[:, 1:].transpose(0, 1)).reshape(-1, drift.n_bins)
    for name, value in model.transition.noise_init(residuals).items():
        if f"transition.{name}" not in model.fixed:
            theta[f"transition.{name}"] = value
    return {k: v for k, v in theta.items() if k not in model.fixed}
