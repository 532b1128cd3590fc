"""The Pyro model: site shapes, ELBO, gradients, markov vs vectorized forms."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from cgpyro.distributions import BinCounts, MarkovChain
from cgpyro.elbo import AnalyticTraceELBO
from cgpyro.guides import LogNormalGuide
from cgpyro.model import CGModel
from cgpyro.transitions import Drift, GaussianTransition
from cgpyro.virtual import VirtualObservable, mass_conservation

B = 4


def make_model(vectorized=True, noise="isotropic", sigma_c=1e-2, **drift):
    drift = {"hidden": (6, 6), "linear_skip": True, **drift}
    return CGModel(B, GaussianTransition(Drift(B, **drift), noise=noise),
                   virtual_observables=[VirtualObservable("mass", mass_conservation,
                                                          sigma=sigma_c, sigma_start=None)],
                   vectorized=vectorized)


def make_counts(n_seq, n_times, total=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n_seq, n_times, B, generator=g, dtype=torch.float64) + 0.5
    p = p / p.sum(-1, keepdim=True)
    return torch.distributions.Multinomial(total, p).sample().to(torch.float64)


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("n_seq", [1, 3])
@pytest.mark.parametrize("n_times", [2, 5])
def test_site_shapes(vectorized, n_seq, n_times):
    model = make_model(vectorized)
    counts = make_counts(n_seq, n_times)
    guide = LogNormalGuide(model, counts)
    tr = poutine.trace(poutine.replay(model, poutine.trace(guide).get_trace(counts)))
    trace = tr.get_trace(counts, forecast=3)
    trace.compute_log_prob()
    sites = {k: v for k, v in trace.nodes.items() if v["type"] == "sample"}
    if vectorized:
        assert sites["X"]["value"].shape == (n_seq, n_times, B)
        assert sites["counts"]["log_prob"].shape == (n_seq,)
        assert sites["vo.mass"]["value"].shape == (n_seq, n_times, 1)
    else:
        for t in range(n_times):
            assert sites[f"X_{t}"]["value"].shape == (n_seq, B)
            assert sites[f"counts_{t}"]["log_prob"].shape == (n_seq,)
            assert sites[f"vo.mass_{t}"]["value"].shape == (n_seq, 1)
    assert sites["X_forecast"]["value"].shape == (n_seq, 3, B)
    assert sites["counts_forecast"]["value"].shape == (n_seq, 3, B)
    assert sites["transition.drift.mlp.0.weight"]["value"].shape == (6, B)
    assert sites["transition.sigma_r"]["value"].shape == ()


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("noise", ["isotropic", "full"])
def test_elbo_finite_and_gradients_reach_every_parameter(vectorized, noise):
    model = make_model(vectorized, noise=noise)
    counts = make_counts(3, 4)
    guide = LogNormalGuide(model, counts)
    elbo = (AnalyticTraceELBO() if vectorized else Trace_ELBO())
    loss = elbo.differentiable_loss(model, guide, counts)
    assert torch.isfinite(loss)
    loss.backward()
    params = dict(pyro.get_param_store().named_parameters())  # unconstrained leaves
    names = list(params)
    assert "q.X_loc" in names and "theta.transition.sigma_r" in names
    for name in names:
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"


def _log_joint(model, counts, x):
    """log p(x̂, ĉ, X=x, θ=θ0) of ``model`` with the states conditioned to ``x``."""
    theta = model.init_values(torch.Generator().manual_seed(1))
    data = dict(theta)
    if model.vectorized:
        data["X"] = x
    else:
        data.update({f"X_{t}": x[:, t] for t in range(x.shape[1])})
    trace = poutine.trace(poutine.condition(model, data=data)).get_trace(counts)
    return trace.log_prob_sum()


def test_markov_and_vectorized_forms_have_the_same_joint_density():
    counts = make_counts(3, 5)
    x = (counts + 1) / (counts + 1).sum(-1, keepdim=True) * 1.01
    lp_vec = _log_joint(make_model(True), counts, x)
    lp_markov = _log_joint(make_model(False), counts, x)
    assert torch.isfinite(lp_vec)
    assert torch.allclose(lp_vec, lp_markov, rtol=1e-12, atol=1e-8)


def test_markov_and_vectorized_forms_give_the_same_elbo_on_the_same_samples():
    counts = make_counts(2, 4)
    vec, markov = make_model(True), make_model(False)
    guide_v, guide_m = LogNormalGuide(vec, counts), LogNormalGuide(markov, counts)
    # One draw of the vectorized guide, evaluated in both forms: log p - log q.
    gtr = poutine.trace(guide_v).get_trace(counts)
    draw_v = {k: v["value"] for k, v in gtr.nodes.items() if v["type"] == "sample"}
    draw_m = {k: v for k, v in draw_v.items() if k != "X"}
    draw_m.update({f"X_{t}": draw_v["X"][:, t] for t in range(4)})

    def elbo(model, guide, draw):
        lp = poutine.trace(poutine.condition(model, data=draw)).get_trace(counts).log_prob_sum()
        lq = poutine.trace(poutine.condition(guide, data=draw)).get_trace(counts).log_prob_sum()
        return lp - lq

    e_v, e_m = elbo(vec, guide_v, draw_v), elbo(markov, guide_m, draw_m)
    assert torch.isfinite(e_v)
    assert torch.allclose(e_v, e_m, rtol=1e-12)


def test_analytic_elbo_has_the_expectation_of_trace_elbo():
    """AnalyticTraceELBO replaces three terms by their exact expectations under q: averaged
    over many draws both estimators agree (tolerance: 5 standard errors of Trace_ELBO).
    With a stiff constraint (σ_c = 1e-3) the closed form removes most of the variance."""
    model = make_model(True, sigma_c=1e-3)
    model.fix("transition.sigma_r", 1.0)
    counts = make_counts(2, 3, total=200)
    guide = LogNormalGuide(model, counts)
    guide.init_scale = guide.init_scale * 0.5
    n = 2000
    pyro.set_rng_seed(0)
    trace_losses = torch.tensor([Trace_ELBO().loss(model, guide, counts) for _ in range(n)])
    analytic = AnalyticTraceELBO(num_particles=n, vectorize_particles=True)
    pyro.set_rng_seed(1)
    a = analytic.loss_and_grads(model, guide, counts)
    se = trace_losses.std() / math.sqrt(n)
    assert abs(trace_losses.mean() - a) < 5 * se + 1e-9, (trace_losses.mean(), a, se)
    # ... and its single-draw spread is far smaller (the point of it).
    singles = torch.tensor([AnalyticTraceELBO().loss_and_grads(model, guide, counts)
                            for _ in range(200)])
    assert singles.std() < 0.5 * trace_losses.std()


def test_bincounts_is_eq17_and_normalized_at_unit_mass():
    x = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    m = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)
    expected = torch.distributions.Multinomial(10, probs=x).log_prob(m)
    assert torch.allclose(BinCounts(x, 10).log_prob(m), expected)
    # unnormalized X: Π X^m scales with the mass — the virtual observable must fix it
    assert torch.allclose(BinCounts(2 * x, 10).log_prob(m), expected + 10 * math.log(2))
    draws = BinCounts(x.expand(2000, 3), 1000).sample()
    assert (draws.sum(-1) == 1000).all()
    assert torch.allclose(draws.mean(0) / 1000, x, atol=3e-3)


def test_markov_chain_log_prob_matches_loop_and_samples_shape():
    def step(x):
        return pyro.distributions.Normal(0.9 * x, 0.1).to_event(1)

    init = pyro.distributions.Normal(torch.zeros(2, 3), 1.0).to_event(1)
    chain = MarkovChain(step, 4, init=init)
    x = chain.sample()
    assert x.shape == (2, 4, 3)
    loop = init.log_prob(x[:, 0]) + sum(step(x[:, t - 1]).log_prob(x[:, t]) for t in range(1, 4))
    assert torch.allclose(chain.log_prob(x), loop)


def test_fixed_parameter_removes_its_site():
    model = make_model()
    model.fix("transition.sigma_r", 0.01)
    counts = make_counts(2, 3)
    guide = LogNormalGuide(model, counts)
    trace = poutine.trace(guide).get_trace(counts)
    assert "transition.sigma_r" not in trace.nodes
    assert guide.theta_map()["transition.sigma_r"].item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="not a parameter site"):
        model.fix("nope", 1.0)


def test_theta_are_pyro_sample_attributes_named_by_module_path():
    """θ sites are the submodules' PyroSample attributes: the trace of the model has exactly
    ``site_names()``; conditioning a site is ordinary Pyro (a hyperprior's child conditioned
    on a value is scored under its parent), and ``fix`` hides the conditioned site."""
    from cgpyro.specs import load_model

    model = load_model("physics", n_bins=8)
    counts = make_counts(2, 3).new_zeros(2, 3, 8) + 100.0
    trace = poutine.trace(model).get_trace(counts)
    theta = [name for name, site in trace.nodes.items() if site["type"] == "sample"
             and name not in ("sequences", "X", "counts", "vo.mass")]
    assert theta == model.site_names()
    assert "transition.drift.jumps" in theta and "vo.mass.sigma" not in theta
    jumps = torch.full((4,), 0.01, dtype=torch.float64)
    scored = []
    for scale in (0.1, 1.0):
        data = {"transition.drift.jumps": jumps,
                "transition.drift.jump_scale": torch.tensor(scale, dtype=torch.float64)}
        site = poutine.trace(poutine.condition(model, data=data)).get_trace(counts) \
            .nodes["transition.drift.jumps"]
        assert site["is_observed"] and torch.equal(site["value"], jumps)
        scored.append(site["fn"].log_prob(site["value"]).item())
    assert scored[0] != scored[1]
    model.fix("transition.drift.jumps", jumps)
    trace = poutine.trace(model).get_trace(counts)
    assert "transition.drift.jumps" not in trace.nodes  # conditioned and hidden
    assert torch.equal(model.sample_theta(counts)["transition.drift.jumps"], jumps)


def test_resample_observed_unconditions_the_counts_only():
    model = make_model()
    counts = make_counts(2, 3)
    trace = poutine.trace(model).get_trace(counts, resample_observed=True)
    site = trace.nodes["counts"]
    assert not site["is_observed"] and site["infer"].get("was_observed")
    assert not torch.equal(site["value"], counts)  # redrawn from p_cf
    assert trace.nodes["vo.mass"]["is_observed"]  # the constraint stays a virtual observation


def test_fitting_and_forecasting_leave_the_model_as_built():
    """Empirical Bayes, σ_r calibration, the σ_c schedule and the memory decision live in the
    inference and its guide: the user's model object is the same before and after."""
    from cgpyro.inference import SVIInference
    from cgpyro.predict import forecast
    from cgpyro.specs import load_model

    def state(model):
        plain = (int, float, str, bool, tuple, type(None))
        return ({name: {k: v for k, v in vars(m).items()
                        if not k.startswith("_") and isinstance(v, plain)}
                 for name, m in model.named_modules()},
                {k: v.clone() for k, v in model.named_buffers()}, dict(model.fixed))

    model = load_model("physics", n_bins=8)
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 5, 8, generator=g, dtype=torch.float64) + 0.5
    counts = torch.distributions.Multinomial(20_000, p / p.sum(-1, keepdim=True)).sample()
    before = state(model)
    inference = SVIInference(model, steps=20, progress=False).fit(counts)
    forecast(model, inference.guide, counts, 3, num_samples=4)
    after = state(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())
    assert inference.guide.theta.held  # the fitted state is there, held by the guide


def test_second_order_chain_matches_an_explicit_sum_and_the_markov_loop():
    """``MarkovChain(order=2)``: ``log p = log p0(X_0) + Σ_t log p(X_t | X_{t-1}, X_{t-2})`` with
    ``X_{-1} = X_0``, from ``init`` or from two known ``start`` states."""
    import pyro.distributions as dist

    def step(x, before):
        return dist.Normal(x + 0.3 * (x - before), 0.1).to_event(1)

    init = dist.Normal(torch.zeros(3, B, dtype=torch.float64), 1.0).to_event(1)
    v = torch.rand(3, 4, B, dtype=torch.float64)
    expected = init.log_prob(v[:, 0]) + step(v[:, 0], v[:, 0]).log_prob(v[:, 1]) \
        + step(v[:, 1], v[:, 0]).log_prob(v[:, 2]) + step(v[:, 2], v[:, 1]).log_prob(v[:, 3])
    assert torch.allclose(MarkovChain(step, 4, init=init, order=2).log_prob(v), expected)
    chain = MarkovChain(step, 2, start=v[:, :2], order=2)
    expected = step(v[:, 1], v[:, 0]).log_prob(v[:, 2]) + step(v[:, 2], v[:, 1]).log_prob(v[:, 3])
    assert torch.allclose(chain.log_prob(v[:, 2:]), expected)
    assert chain.sample((5,)).shape == (5, 3, 2, B)
    # a first-order chain differs on the same states (the check above could fail)
    first = MarkovChain(lambda x: step(x, x), 4, init=init)
    assert not torch.allclose(first.log_prob(v), MarkovChain(step, 4, init=init, order=2)
                              .log_prob(v))


def test_third_order_chain_matches_an_explicit_sum():
    """``MarkovChain(order=3)``: each step sees ``X_{t-1}, X_{t-2}, X_{t-3}`` (newest first),
    with ``X_{-2} = X_{-1} = X_0``, from ``init`` or from three known ``start`` states."""
    import pyro.distributions as dist

    def step(x, b1, b2):
        return dist.Normal(x + 0.3 * (x - b1) - 0.2 * (b1 - b2), 0.1).to_event(1)

    init = dist.Normal(torch.zeros(3, B, dtype=torch.float64), 1.0).to_event(1)
    v = torch.rand(3, 5, B, dtype=torch.float64)
    x = [v[:, 0], v[:, 0]] + list(v.unbind(1))  # X_{-2}, X_{-1}, X_0, ..., X_4
    expected = init.log_prob(v[:, 0]) + sum(
        step(x[t + 1], x[t], x[t - 1]).log_prob(x[t + 2]) for t in range(1, 5))
    chain = MarkovChain(step, 5, init=init, order=3)
    assert torch.allclose(chain.log_prob(v), expected)
    cont = MarkovChain(step, 2, start=v[:, :3], order=3)
    expected = step(v[:, 2], v[:, 1], v[:, 0]).log_prob(v[:, 3]) \
        + step(v[:, 3], v[:, 2], v[:, 1]).log_prob(v[:, 4])
    assert torch.allclose(cont.log_prob(v[:, 3:]), expected)
    assert cont.sample((5,)).shape == (5, 3, 2, B)
    assert chain.expand(torch.Size([3])).log_prob(v).shape == (3,)
    # the second-order chain on the same states differs (the check above could fail)
    assert not torch.allclose(MarkovChain(lambda a, b: step(a, b, b), 5, init=init, order=2)
                              .log_prob(v), chain.log_prob(v))


@pytest.mark.parametrize("lags", [1, 2])
@pytest.mark.parametrize("vectorized", [True, False])
def test_memory_model_forms_have_the_same_joint_density(vectorized, lags):
    """The ``pyro.markov`` loop and the vectorized chain of a law with memory of ``lags``
    increments (order ``1 + lags``) give the same joint density."""
    from cgpyro.transitions import FluxDrift

    def model(vec):
        drift = FluxDrift(B + 3, radius=2, correction_radius=0, memory=True, memory_lags=lags)
        return CGModel(B + 3, GaussianTransition(drift), vectorized=vec)

    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 5, B + 3, generator=g, dtype=torch.float64) + 0.5
    counts = torch.distributions.Multinomial(1000, p / p.sum(-1, keepdim=True)).sample().double()
    x = (counts + 1) / (counts + 1).sum(-1, keepdim=True)
    theta = model(True).init_values(g)
    theta["transition.drift.memory"] = torch.tensor([0.1, -0.3, 0.05], dtype=torch.float64)
    theta["transition.drift.jumps"] = torch.tensor([0.01, 0.1, 0.05, 0.0], dtype=torch.float64)
    if lags == 2:
        theta["transition.drift.memory2"] = torch.tensor([-0.05, 0.2, 0.0], dtype=torch.float64)
    assert model(True).transition.order == 1 + lags

    def log_joint(m):
        data = dict(theta)
        if m.vectorized:
            data["X"] = x
        else:
            data.update({f"X_{t}": x[:, t] for t in range(x.shape[1])})
        return poutine.trace(poutine.condition(m, data=data)).get_trace(counts).log_prob_sum()

    assert torch.allclose(log_joint(model(True)), log_joint(model(vectorized)), rtol=1e-12)
    # memory matters for the density (the equality above is not trivially true)
    before = log_joint(model(True))
    for name in ("memory", "memory2")[:lags]:
        theta[f"transition.drift.{name}"] = torch.zeros(3, dtype=torch.float64)
    assert not torch.allclose(log_joint(model(True)), before)


def test_analytic_elbo_skips_the_unused_densities_and_computes_the_same_loss():
    """Sites with a closed-form expectation (counts, constraints) are not evaluated; the loss
    and its gradient are bit-identical to evaluating every site as ``Trace_ELBO`` does."""

    class EveryDensity(AnalyticTraceELBO):
        def _get_trace(self, model, guide, args, kwargs):
            return Trace_ELBO._get_trace(self, model, guide, args, kwargs)

    model = make_model(True, sigma_c=1e-3)
    counts = make_counts(3, 4, total=500)
    guide = LogNormalGuide(model, counts)
    losses, grads = [], []
    for elbo in (AnalyticTraceELBO(), EveryDensity()):
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(model, guide, counts)
        params = list(guide.parameters())
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, params))
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    model_trace, _ = AnalyticTraceELBO()._get_trace(model, guide, (counts,), {})
    assert "log_prob" not in model_trace.nodes["counts"]
    assert "log_prob" not in model_trace.nodes["vo.mass"]
    assert "log_prob" in model_trace.nodes["X"]
