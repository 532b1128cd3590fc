"""Warm start of θ before SVI: least squares on the empirical bin fractions.

:func:`empirical_bayes` sets the θ that are held during SVI (σ_r calibrated to the data, the
empirical-Bayes part of a drift that declares ``initial_fit``); :func:`fit_drift_least_squares`
fits the drift network to pairs (or, for a flux drift, short rollouts) of empirical fractions
with those held. Used by :class:`~cgpyro.inference.SVIInference`; the model is not changed.
"""

from __future__ import annotations

import math

import torch

from .transitions import Drift

__all__ = ["empirical_bayes", "fit_drift_least_squares"]


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
    generator: torch.Generator | None = None, held: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Warm start: fit θ_NN by least squares to pairs of empirical bin fractions.

    Minimizes ``Σ |m_{t+1}/N - m_t/N - NN(m_t/N)|²`` with L-BFGS from the closed-form ridge
    solution of the linear map (or, for a ReLU MLP without linear skip, from a network that
    computes that linear map exactly). Sets the transition noise from the residuals.
    Returns a new θ dict of the sites neither fixed in the model nor ``held`` (the input is
    not modified).

    :param counts: ``(n_sequences, n_times, n_bins)``, ``n_times ≥ 2``.
    :param held: θ values held during SVI by site name (:func:`empirical_bayes`).
    """
    drift = model.transition.drift
    fixed = {**model.fixed, **(held or {})}
    if hasattr(drift, "initial_fit"):
        return _fit_flux_drift(model, counts, theta, max_iter, fixed)
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

    names = [k for k in theta if k.startswith("transition.drift.") and k not in fixed]
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
        if f"transition.{name}" not in fixed:
            theta[f"transition.{name}"] = value
    return {k: v for k, v in theta.items() if k not in fixed}


def empirical_bayes(model, counts: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple | None]:
    """The θ that SVI holds at values set from the data, and the posterior behind them.

    - ``transition.sigma_r`` at the transition's ``calibrated_sigma(counts)``, if it has one;
    - the :meth:`~cgpyro.transitions.FluxDrift.held_sites` of a drift that declares
      ``initial_fit`` (MAP-II scales, posterior-mean linear part).

    Deterministic in the data, so a resumed or reloaded run gets the same values. Sites the
    model fixes itself are left out. The guides hold these sites at these values (Delta
    sites without parameters); the model is not changed.

    :param counts: ``(n_sequences, n_times, n_bins)``.
    :returns: ``(held, posterior)``: values by site name, and the Gaussian posterior of the
        drift's linear part (``None`` without ``initial_fit``).
    """
    held, posterior = {}, None
    sigma_r = getattr(model.transition, "calibrated_sigma", lambda c: None)(counts)
    if sigma_r is not None:
        held["transition.sigma_r"] = sigma_r.detach().to(torch.float64).cpu()
    drift = getattr(model.transition, "drift", None)
    if hasattr(drift, "initial_fit"):
        values, posterior = drift.initial_fit(counts)
        held.update({f"transition.drift.{name}": values[name] for name in drift.held_sites()})
    return {k: v for k, v in held.items() if k not in model.fixed}, posterior


def _fit_flux_drift(model, counts, theta, max_iter, fixed):
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
    theta.update({k: v.cpu() for k, v in fixed.items() if k.startswith(pre)})
    names = [k for k in theta if k.startswith(pre + "flux.") and k not in fixed]

    def drift_theta(params):
        return {k[len(pre):]: params.get(k, theta[k]) for k in theta if k.startswith(pre)}

    def step(x, th, x_prev):  # (time, sequence, bin): totals broadcast over sequences
        return (x + drift(x, th, totals, x_prev=x_prev)).clamp(-1.0, 2.0)

    # X_{t-m} for a drift with memory, with X_{-1} = ... = X_0 as in the model (any m, also
    # beyond the snapshots)
    def earlier(m):
        return frac[:, (torch.arange(frac.shape[1]) - m).clamp_min(0)]

    before = earlier(1)
    # the law's earlier states at each pair (time first): (X_{t-1}, X_{t-2}, ...)
    older = tuple(earlier(m)[:, :-1].transpose(0, 1) for m in range(1, max(drift.order, 2)))
    n_times = frac.shape[1]
    H = min(4, n_times - 1)
    with torch.no_grad():
        lin = step(frac[:, :-1].transpose(0, 1), drift_theta({}), older).transpose(0, 1)
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
        residuals = (step(x, drift_theta({}), older)
                     - frac[:, 1:].transpose(0, 1)).reshape(-1, drift.n_bins)
    for name, value in model.transition.noise_init(residuals).items():
        if f"transition.{name}" not in fixed:
            theta[f"transition.{name}"] = value
    return {k: v for k, v in theta.items() if k not in fixed}
