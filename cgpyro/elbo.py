"""A lower-variance estimator of the same ELBO for the paper's lognormal guide.

Under the mean-field lognormal ``q(X)``, three terms of the ELBO have closed-form expectations:

- the data term of eq. 17, ``E_q[Σ_j m_j log X_j] = Σ_j m_j μ_j`` (linear in ``log X``);
- affine virtual observables ``c(X) = a + W X`` such as mass (eq. 18):
  ``E_q[(c)²] = (a + W E[X])² + W² Var[X]``, with ``E[X] = e^{μ + s²/2}`` and
  ``Var[X] = (e^{s²} - 1) e^{2μ + s²}``;
- the entropy of ``q(X)``;
- the state chain ``log p(X_{0:T-1} | θ)`` when the transition is Gaussian with isotropic noise
  and a mean linear in the state (the default model's flux drift without a network):
  ``E_q[|X_{t+1} - Σ_m X_{t+1-m} K_m|²]`` needs only the moments of the independent
  coordinates (:meth:`~cgpyro.transitions.GaussianTransition.expected_log_prob`).

:class:`AnalyticTraceELBO` uses these expectations and keeps the single-sample Monte Carlo
estimate for everything else (a nonlinear transition, θ), so its expectation equals
``Trace_ELBO``'s while the stiff penalty σ_c⁻² no longer multiplies sampling noise. With every
term in closed form (the default model) the ELBO is computed exactly: no draw, no gradient
noise.
Model sites opt in with ``infer={"expected_log_prob": fn}`` (observed sites) or a distribution
with an ``expected_log_prob`` attribute (the latent states, whose ``infer`` is the guide's under
``poutine.replay``; :class:`~cgpyro.distributions.MarkovChain` of an affine-Gaussian law), where
``fn(loc, scale)`` returns ``E_q[log p(site)]`` with the site's batch shape.

:class:`FusedELBO` evaluates the same estimator for a :class:`~cgpyro.model.CGModel` and the
paper's :class:`~cgpyro.guides.LogNormalGuide` as one torch function of the guide's parameters,
without building Pyro traces at every step (same draws, same value, same gradients: tested).
Where θ is constant (held or fixed) and every term has a closed form (the default model) it
writes the gradient out as well, instead of recording an autograd graph of ~100 small tensor
operations (the same value and gradients to rounding: tested).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pyro
import torch
from pyro import poutine
from pyro.distributions import LogNormal
from pyro.distributions.util import is_identically_zero
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

from .emissions import MultinomialEmission
from .transitions import _first_steps_cross, _lagged

__all__ = ["AnalyticTraceELBO", "FusedELBO"]


def _expected_log_prob(site):
    """The site's closed-form ``fn(loc, scale) -> E_q[log p]``, or ``None``."""
    return site["infer"].get("expected_log_prob") \
        or getattr(site["fn"], "expected_log_prob", None)


def _lognormal_params(fn):
    while not isinstance(fn, LogNormal) and hasattr(fn, "base_dist"):
        fn = fn.base_dist  # unwrap Independent / expanded wrappers
    if isinstance(fn, LogNormal):
        return fn.loc, fn.scale
    return None


class AnalyticTraceELBO(Trace_ELBO):
    """``Trace_ELBO`` with closed-form expectations where the model provides them.

    Applies to a guide whose site ``states_site`` is a (possibly ``Independent``) ``LogNormal``;
    otherwise it is exactly ``Trace_ELBO``.
    """

    def __init__(self, states_site: str = "X", **kwargs):
        super().__init__(**kwargs)
        self.states_site = states_site

    def _get_trace(self, model, guide, args, kwargs):
        """``Trace_ELBO``'s traces (``get_importance_trace``), except that the densities of the
        model sites with a closed-form expectation are not evaluated (the multinomial's
        ``lgamma`` terms and the constraint penalties: a quarter of an SVI step, unused)."""
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace),
                                    graph_type="flat").get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        q_site = guide_trace.nodes.get(self.states_site)
        analytic = q_site is not None and _lognormal_params(q_site["fn"]) is not None

        def needed(name, site):
            return not (analytic and _expected_log_prob(site) is not None)

        model_trace.compute_log_prob(site_filter=needed)
        guide_trace.compute_score_parts()
        if is_validation_enabled():
            for name, site in model_trace.nodes.items():
                if site["type"] == "sample" and needed(name, site):
                    check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        q_site = guide_trace.nodes.get(self.states_site)
        params = _lognormal_params(q_site["fn"]) if q_site is not None else None
        if params is None:
            return super()._differentiable_loss_particle(model_trace, guide_trace)
        loc, scale = params
        elbo = 0.0
        for site in model_trace.nodes.values():
            if site["type"] != "sample":
                continue
            expected = _expected_log_prob(site)
            if expected is not None:
                elbo = elbo + (expected(loc, scale) * site["scale"]).sum()
            else:
                elbo = elbo + site["log_prob_sum"]
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name == self.states_site:
                elbo = elbo + (site["fn"].entropy() * site["scale"]).sum()
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            assert is_identically_zero(score_function_term), (
                "AnalyticTraceELBO supports reparametrized guides only"
            )
            elbo = elbo - (entropy_term.sum() if not is_identically_zero(entropy_term) else 0.0)
        return -torch_item(elbo), -elbo


class _ExactELBO(torch.autograd.Function):
    """``ELBO(X_loc, X_log_scale)`` of :meth:`FusedELBO._exact`, with its gradient written out
    (computed in the forward pass, which shares the moments, and scaled in the backward one):
    autograd's graph of the same terms costs about as much again as the terms themselves.

    Every Var[X] term of the ELBO is linear in Var[X], so they enter as one dot product with
    their constant coefficients ``terms.gv`` (= d ELBO / d Var[X]); scalars are Python floats
    (a 0-d tensor costs an op per use)."""

    @staticmethod
    def forward(ctx, loc, log_scale, terms):
        n, T, B = loc.shape
        s2 = torch.exp(2 * log_scale)
        e = torch.exp(s2)
        mean = torch.exp(loc + 0.5 * s2)
        mean2 = mean * mean
        var = (e - 1) * mean2
        # p(X_0): E[-log X_0 - (log X_0 - μ0)² / (2 s0²)] with log X_0 ~ N(loc, s²); its
        # -log X_0 is in loc_coef, with the emission's counts and the entropy's 1
        d0 = loc[:, 0] - terms.mu0
        p0 = 0.5 / terms.s0**2
        value = (torch.dot(terms.loc_coef.reshape(-1), loc.reshape(-1)) + log_scale.sum()
                 + torch.dot(var.sum(0).reshape(-1), terms.gv.reshape(-1))
                 - p0 * (torch.dot(d0.reshape(-1), d0.reshape(-1)) + s2[:, 0].sum()))
        gm = torch.zeros_like(loc)  # d ELBO / d E[X]
        if T > 1:  # the transitions: E|X_{t+1} - Σ_m X_{t+1-m} K_m|² / (2 σ_r²)
            prec = terms.prec
            P = (mean.view(-1, B) @ terms.K).view(n, T, -1)  # [X_t K_1 | X_t K_2 | ...]
            pred = 0.0
            for m in range(1, terms.order + 1):  # X_{t+1-m} K_m with X_{-j} = X_0
                pred = pred + _lagged(P[..., (m - 1) * B:m * B], m)
            r = mean[:, 1:] - pred
            value = value - 0.5 * prec * torch.dot(r.view(-1), r.view(-1))
            gr = r.mul_(prec)
            G = (gr.view(-1, B) @ terms.KT).view(n, T - 1, -1)  # [gr K_1ᵀ | gr K_2ᵀ | ...]
            gm[:, 1:] -= gr
            for m in range(1, terms.order + 1):  # target s reads X_{max(s-m, 0)}
                Gm = G[..., (m - 1) * B:m * B]
                gm[:, 0] += Gm[:, :m].sum(1)
                gm[:, 1:max(T - m, 1)] += Gm[:, m:]
        for a, W, prec_c in terms.affine_vos:  # E[(a + X Wᵀ)²] / (2 σ_c²)
            c = torch.addmm(a, mean.view(-1, B), W.T)
            value = value - 0.5 * prec_c * torch.dot(c.view(-1), c.view(-1))
            gm.view(-1, B).addmm_(c, W, alpha=-prec_c)
        # chain rule through E[X] = e^{loc + s²/2}, Var[X] = (e^{s²} - 1) E[X]², s² = e^{2 ls}
        gmm = gm.mul_(mean)
        g_loc = var.mul_(terms.gv).mul_(2).add_(terms.loc_coef).add_(gmm)  # var: spent
        g_loc[:, 0] -= 2 * p0 * d0
        g_s2 = e.mul_(2).sub_(1).mul_(mean2).mul_(terms.gv).add_(gmm, alpha=0.5)
        g_s2[:, 0] -= p0
        g_ls = g_s2.mul_(s2).mul_(2).add_(1)
        ctx.save_for_backward(g_loc, g_ls)
        return value + terms.constant

    @staticmethod
    def backward(ctx, grad):
        g_loc, g_ls = ctx.saved_tensors
        return grad * g_loc, grad * g_ls, None


class FusedELBO(ELBO):
    """:class:`AnalyticTraceELBO`'s estimate for ``model`` (a vectorized
    :class:`~cgpyro.model.CGModel`) and ``guide`` (its :class:`~cgpyro.guides.LogNormalGuide`),
    evaluated directly from the model's densities instead of from Pyro traces:

    ``ELBO = log p(θ_MAP) + log p(X | θ) + E_q[log p_cf(m | X)] + Σ_c E_q[log N(0 | c(X), σ_c²)]
    + H[q(X)]`` with one reparametrized draw ``X ~ q(X)`` (the guide's own draw: the same
    random numbers as ``AnalyticTraceELBO``), closed forms where the model provides them and
    the draw elsewhere, and θ's prior only over the sites the guide trains (held and fixed θ
    are outside the ELBO, as in :func:`~cgpyro.guides.training_pair`).

    It is bound to the pair it was built with; ``loss`` / ``loss_and_grads`` /
    ``differentiable_loss`` take Pyro's ELBO arguments ``(model, guide, counts, **kwargs)``,
    where ``model`` and ``guide`` are that pair or its :attr:`pair`, so that ``SVI(*elbo.pair,
    optim, loss=elbo)`` trains as ``SVI(*training_pair(model, guide), optim,
    AnalyticTraceELBO())`` does (one particle). A minibatch (``subsample_size``) is drawn by
    the same plate and scaled to all sequences, as in the model.
    """

    def __init__(self, model, guide):
        from .guides import LogNormalGuide, training_pair

        if not self.applies(model, guide):
            raise ValueError("FusedELBO needs a vectorized CGModel and its LogNormalGuide "
                             f"(got {type(model).__name__} with vectorized="
                             f"{getattr(model, 'vectorized', None)} and {type(guide).__name__})")
        assert isinstance(guide, LogNormalGuide)
        super().__init__()
        self.model, self.guide = model, guide
        self.pair = training_pair(model, guide)
        self._traced = AnalyticTraceELBO()
        self._theta = None  # θ when the guide trains none: constant, read once
        self._chain = None  # and the transition's affine matrices of that θ (_held_chain)
        self._exact_applies = None  # whether _exact evaluates the ELBO with that θ
        self._norm = None  # (counts, its version, the emission's normaliser of counts)
        self._data = None  # (counts, totals, their versions, what _exact needs of them)

    def _get_trace(self, model, guide, args, kwargs):
        # ELBO's interface: the traces of the estimator this one evaluates without them
        return self._traced._get_trace(*self.pair, args, kwargs)

    @staticmethod
    def applies(model, guide) -> bool:
        """Whether ``(model, guide)`` is a pair this ELBO evaluates."""
        from .guides import LogNormalGuide
        from .model import CGModel

        return isinstance(model, CGModel) and model.vectorized \
            and isinstance(guide, LogNormalGuide) and guide.model is model

    def _theta_and_log_prior(self, like):
        """θ by site name and ``log p(θ)`` of the trained sites (a Pyro trace of the θ reads
        alone, the values conditioned; held and fixed sites hidden)."""
        learned = self.guide.theta.learned()
        constant = {**self.guide.theta.held, **self.guide.theta.constants}
        if not learned:
            if self._theta is None:
                with torch.no_grad(), poutine.condition(data=constant):
                    self._theta = self.model.sample_theta(like)
            return self._theta, 0.0
        read = poutine.block(poutine.condition(self.model.sample_theta, data=constant),
                             hide=list(constant))
        trace = poutine.trace(poutine.condition(read, data=learned)).get_trace(like)
        log_prior = sum(site["fn"].log_prob(site["value"]).sum()
                        for name, site in trace.nodes.items()
                        if site["type"] == "sample" and name in learned)
        return trace.nodes["_RETURN"]["value"], log_prior

    def _traced_instead(self, model, guide, kwargs) -> bool:
        """Checks the pair; true for arguments beyond ``counts, totals, subsample_size``,
        which :class:`AnalyticTraceELBO` evaluates."""
        if (model, guide) not in ((self.model, self.guide), self.pair):
            raise ValueError("FusedELBO evaluates the (model, guide) pair it was built with "
                             "(or its .pair); got another model or guide")
        return bool(set(kwargs) - {"totals", "subsample_size"})

    def differentiable_loss(self, model, guide, counts, **kwargs):
        """``-ELBO`` (a differentiable scalar) for counts ``(n_sequences, n_times, n_bins)``
        (keywords ``totals``: particles per sequence ``(n_sequences,)``; ``subsample_size``: a
        minibatch of sequences, scaled to all of them as the model's plate does)."""
        if self._traced_instead(model, guide, kwargs):
            return self._traced.differentiable_loss(*self.pair, counts, **kwargs)
        return self._loss(counts, **kwargs)

    def loss(self, model, guide, counts, **kwargs) -> float:
        """``-ELBO`` as a float."""
        if self._traced_instead(model, guide, kwargs):
            return self._traced.loss(*self.pair, counts, **kwargs)
        with torch.no_grad():
            return torch_item(self._loss(counts, **kwargs))

    def loss_and_grads(self, model, guide, counts, **kwargs) -> float:
        """``-ELBO`` as a float; its gradients accumulate in the parameters it depends on."""
        if self._traced_instead(model, guide, kwargs):
            return self._traced.loss_and_grads(*self.pair, counts, **kwargs)
        loss = self._loss(counts, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return torch_item(loss)

    def _exact(self, counts, totals, theta):
        """The ELBO of every sequence with θ constant and every term in closed form, by
        :class:`_ExactELBO` (the same value as the general path, to rounding; tested)."""
        model = self.model
        loc, log_scale = self.guide.loc_log_scale()
        n, T, B = loc.shape
        chain = self._held_chain(theta, loc)
        data = self._exact_data(counts, totals, loc)
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        constant = data.log_norm + n * B * (
            0.5 * (1 + math.log(2 * math.pi)) * T  # entropy
            - math.log(model.x0_scale) - half_log_2pi  # p(X_0)
            - (T - 1) * (chain.log_sigma_r + half_log_2pi))
        gv = chain.gv
        affine_vos = []
        for vo, (a, W, ww, held_sigma) in zip(model.virtual_observables, chain.vos, strict=True):
            # σ_c as model.vo_sigma gives it: the held site, or the tolerance at this progress
            sigma = vo.tolerance(data.max_total) if held_sigma is None else held_sigma
            gv = gv - (0.5 / sigma**2) * ww
            affine_vos.append((a, W, 1.0 / sigma**2))
            constant -= n * T * a.shape[0] * (math.log(sigma) + half_log_2pi)
        terms = SimpleNamespace(K=chain.K, KT=chain.KT, order=len(chain.Ks), prec=chain.prec,
                                loc_coef=data.loc_coef, gv=gv, mu0=-math.log(B),
                                s0=model.x0_scale, affine_vos=affine_vos, constant=constant)
        return _ExactELBO.apply(loc, log_scale, terms)

    def _exact_data(self, counts, totals, like) -> SimpleNamespace:
        """What :meth:`_exact` needs of the data, computed once per ``(counts, totals)``: the
        emission's normaliser (summed), the coefficients of ``X_loc`` in the ELBO (counts, and 1
        of the entropy, but at t = 0 the -log X_0 of the prior) and the largest snapshot."""
        versions = (counts._version, None if totals is None else totals._version)
        cached = self._data
        if cached is None or cached[0] is not counts or cached[1] is not totals \
                or cached[2] != versions:
            loc_coef = counts.to(like.dtype) + 1
            loc_coef[:, 0] -= 1
            self._data = cached = (counts, totals, versions, SimpleNamespace(
                log_norm=float(self._log_norm(counts, range(counts.shape[0])).sum()),
                loc_coef=loc_coef,
                max_total=self.model.max_total(counts[:, 0].sum(-1) if totals is None
                                               else totals)))
        return cached[3]

    def _held_chain(self, theta, like) -> SimpleNamespace:
        """What the constant θ fixes, built once for states ``like`` ``(n, T, B)`` (the guide's
        q(X), whose shape this ELBO is bound to): the transition's affine matrices ``Ks =
        (K_1, ..., K_k)`` (and side by side, ``K = [K_1 | ... | K_k]``, ``KT = [K_1ᵀ | ... |
        K_kᵀ]``), ``1 / σ_r²``, the chain's Var coefficients ``gv`` ``(T, B)`` (d ELBO /
        d Var[X], from the row sums of ``K_m∘K_m`` and, at the first steps, of the cross terms
        of the lags that read ``X_0``), and per virtual observable ``(a, W, Σ_m W_m², held σ_c
        or None)``."""
        if self._chain is not None:
            return self._chain
        model = self.model
        with torch.no_grad():
            Ks = model.transition.affine_matrices(model._part(theta, "transition."),
                                                  like.dtype, like.device)
            sigma_r = float(model._part(theta, "transition.")["sigma_r"])
            prec = sigma_r**-2
            vos = []
            for vo in model.virtual_observables:
                a, W = (torch.as_tensor(v, dtype=like.dtype, device=like.device)
                        for v in vo.affine)
                W = W.expand(a.shape[0], Ks[0].shape[0]).contiguous()
                held = theta.get(f"vo.{vo.name}.sigma")
                vos.append((a, W, (W * W).sum(0), None if held is None else float(held)))

            T = like.shape[1]
            gv = torch.zeros(T, Ks[0].shape[0], dtype=like.dtype, device=like.device)
            if T > 1:
                gv[1:] -= 0.5 * prec
                for m, K in enumerate(Ks, 1):  # targets 1..m read X_0, later ones X_{s-m}
                    c = (K * K).sum(1)
                    gv[0] -= 0.5 * prec * min(m, T - 1) * c
                    gv[1:max(T - m, 1)] -= 0.5 * prec * c
                for M in _first_steps_cross(Ks, T):  # lags reading X_0 together
                    gv[0] -= 0.5 * prec * M.sum(1)
        self._chain = SimpleNamespace(
            Ks=Ks, K=torch.cat(Ks, 1), KT=torch.cat([K.T for K in Ks], 1),
            prec=prec, log_sigma_r=math.log(sigma_r), vos=vos, gv=gv)
        return self._chain

    def _log_norm(self, counts, idx):
        """The emission's data-only normaliser per (sequence, time) of the rows ``idx``, computed
        once per ``counts`` (``None`` for an emission without one)."""
        emission = self.model.emission
        if not hasattr(emission, "log_normalizer"):
            return None
        if self._norm is None or self._norm[0] is not counts \
                or self._norm[1] != counts._version:
            self._norm = (counts, counts._version, emission.log_normalizer(counts))
        norm = self._norm[2]
        return norm if len(idx) == norm.shape[0] else norm[idx]

    def _all_closed_form(self, theta) -> bool:
        model = self.model
        return model.has_chain_expected_log_prob(theta) \
            and hasattr(model.emission, "expected_log_prob") \
            and all(vo.affine is not None for vo in model.virtual_observables)

    def _loss(self, counts, totals=None, subsample_size=None):
        model = self.model
        n = counts.shape[0]
        if n != self.guide.n_sequences or counts.shape[1:] != (self.guide.n_times, model.n_bins):
            raise ValueError(f"counts of shape {tuple(counts.shape)}: the guide was built for "
                             f"{(self.guide.n_sequences, self.guide.n_times, model.n_bins)}")
        self.guide._own_store()  # as a call of the guide would
        theta, log_prior = self._theta_and_log_prior(counts.new_zeros(()))
        # θ constant, every sequence, and the paper's p_cf: the ELBO with its gradient by hand
        if theta is self._theta and (subsample_size is None or subsample_size >= n):
            if self._exact_applies is None:  # θ is constant: so is the answer
                self._exact_applies = self._all_closed_form(theta) \
                    and isinstance(self.model.emission, MultinomialEmission)
            if self._exact_applies:
                return -self._exact(counts, totals, theta)
        totals = counts[:, 0].sum(-1) if totals is None else totals
        # the guide's plate: the same draw of the minibatch, then of X
        with pyro.plate("sequences", n, subsample_size=subsample_size, dim=-1) as idx:
            pass
        loc, scale = self.guide.loc_scale(idx)
        # the draw of X (the guide's, so the same random numbers as the traced form) only
        # where a term has no closed form
        X = None if self._all_closed_form(theta) else LogNormal(loc, scale).rsample()
        obs, n_tot = (counts, totals) if len(idx) == n else (counts[idx], totals[idx])
        if model.has_chain_expected_log_prob(theta):
            matrices = None
            if theta is self._theta:  # θ constant over training: its matrices too
                matrices = self._held_chain(theta, loc).Ks
            elbo = model.state_chain_expected_log_prob(theta, loc, scale, matrices).sum()
        else:
            elbo = model.state_chain(theta, n_tot, counts.shape[1], counts.dtype) \
                .log_prob(X).sum()
        expected = model.emission_expected_log_prob(obs, loc, scale, self._log_norm(counts, idx))
        if expected is None:
            emission_theta = model._part(theta, "emission.")
            expected = model.emission(X, n_tot.unsqueeze(-1), emission_theta) \
                .to_event(1).log_prob(obs)
        elbo = elbo + expected.sum()
        max_total = model.max_total(totals)
        for vo in model.virtual_observables:
            sigma = model.vo_sigma(vo, theta, max_total, loc)
            if vo.affine is not None:
                elbo = elbo + vo.expected_log_prob(sigma, loc, scale, 2).sum()
            else:
                c = vo(X)
                elbo = elbo + pyro.distributions.Normal(c, sigma).log_prob(
                    torch.zeros_like(c)).sum()
        # H[LogNormal(loc, scale)] = loc + log scale + (1 + log 2π) / 2 per coordinate
        elbo = elbo + (loc + scale.log()).sum() + 0.5 * (1 + math.log(2 * math.pi)) * loc.numel()
        if len(idx) < n:  # the sequence plate's scale
            elbo = elbo * (n / len(idx))
        return -(log_prior + elbo)
