"""ELBO estimators: the fused form computes AnalyticTraceELBO's estimate (same draws, value and
gradients) without Pyro traces."""

import re

import pyro
import pytest
import torch

from cgpyro.elbo import AnalyticTraceELBO, FusedELBO
from cgpyro.emissions import NormalizedMultinomialEmission
from cgpyro.inference import SVIInference, as_counts
from cgpyro.model import CGModel
from cgpyro.specs import load_model
from cgpyro.systems import simulate_dataset
from cgpyro.transitions import Drift, GaussianTransition
from cgpyro.virtual import VirtualObservable, mass_conservation

N_BINS = 8


@pytest.fixture(scope="module")
def counts():
    dataset, _ = simulate_dataset(n_sequences=4, n_steps=5, n_particles=5000, n_bins=N_BINS,
                                  seed=0)
    return as_counts(dataset)


def _custom():
    """Learned σ_c, a constraint without a closed form, an emission without one, full noise."""
    learned = VirtualObservable("mass", mass_conservation, learn=True)
    ends = VirtualObservable("ends", lambda x: (x[..., :1] - x[..., -1:]) ** 2, sigma=0.1,
                             sigma_start=None)
    transition = GaussianTransition(Drift(N_BINS, hidden=(6,)), noise="full")
    return CGModel(N_BINS, transition, emission=NormalizedMultinomialEmission(),
                   virtual_observables=[learned, ends])


MODELS = {
    "physics": lambda: load_model("physics", n_bins=N_BINS),         # θ all held (EB)
    "particles_paper": lambda: load_model("particles_paper", n_bins=N_BINS),  # learned θ
    "particles_best": lambda: load_model("particles_best", n_bins=N_BINS),  # learned + held
    "exclusion": lambda: load_model("exclusion", n_bins=N_BINS),    # sub-cell conservation law
    "exclusion_conv": lambda: load_model("exclusion_conv", n_bins=N_BINS),  # conv face flux
    "subbin": lambda: load_model("subbin", n_bins=N_BINS),  # Kalman-filtered sub-bin state
    "custom": _custom,
}


def _fitted(name, counts, steps=5):
    inference = SVIInference(MODELS[name](), steps=steps, progress=False)
    inference.fit(counts)
    return inference


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_elbo_equals_the_traced_estimate_and_its_gradients(name, counts):
    """Same seed, same draw of q(X): the loss and every gradient agree to 1e-12 relative (the
    forms differ only in the order of sums)."""
    inference = _fitted(name, counts)
    fused = FusedELBO(inference.model, inference.guide)
    params = list(inference.guide.parameters())
    assert params
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        traced = AnalyticTraceELBO().differentiable_loss(*fused.pair, counts)
        pyro.set_rng_seed(seed)
        mine = fused.differentiable_loss(*fused.pair, counts)
        assert mine.item() == pytest.approx(traced.item(), rel=1e-12, abs=1e-9)
        g_traced = torch.autograd.grad(traced, params, allow_unused=True)
        g_mine = torch.autograd.grad(mine, params, allow_unused=True)
        for a, b in zip(g_traced, g_mine, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * a.abs().max().item())
    pyro.set_rng_seed(2)
    if name == "physics":  # every term in closed form: no draw, the same value for any seed
        assert fused.loss(*fused.pair, counts) == mine.item()
    else:  # the draw is random: another seed gives another value (the check above can fail)
        assert fused.loss(*fused.pair, counts) != pytest.approx(mine.item(), rel=1e-12)


def test_closed_form_elbo_is_the_mean_of_the_sampled_estimate(counts, monkeypatch):
    """The default model's ELBO in closed form (no draw of X) equals the average of the same
    estimator with the transition's term sampled (what ``Trace_ELBO`` estimates), within 4
    standard errors of 4,000 draws; the gradients in loc agree within 5 standard errors."""
    from cgpyro.model import CGModel as Model

    inference = _fitted("physics", counts, steps=30)
    fused = FusedELBO(inference.model, inference.guide)
    loc = inference.guide._states.X_loc
    exact = fused.differentiable_loss(*fused.pair, counts)
    (g_exact,) = torch.autograd.grad(exact, [loc])
    monkeypatch.setattr(Model, "has_chain_expected_log_prob", lambda self, theta: False)
    sampled = FusedELBO(inference.model, inference.guide)
    pyro.set_rng_seed(0)
    values, grads = [], []
    for _ in range(4000):
        loss = sampled.differentiable_loss(*sampled.pair, counts)
        (g,) = torch.autograd.grad(loss, [loc])
        values.append(loss.item())
        grads.append(g)
    values, grads = torch.tensor(values, dtype=torch.float64), torch.stack(grads)
    se = values.std() / len(values) ** 0.5
    assert abs(exact.item() - values.mean().item()) < 4 * se
    assert se > 0 and values.std() > 1e-3 * abs(exact.item()) ** 0.5  # the draws vary
    g_se = grads.std(0) / len(grads) ** 0.5
    assert ((g_exact - grads.mean(0)).abs() <= 5 * g_se + 1e-9 * g_exact.abs().max()).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_elbo_minibatch_equals_the_traced_estimate(counts, sparse):
    """A minibatch of 2 of 4 sequences: the same draw of the batch and of X, the same value
    (scaled by 4/2) and gradients, dense or sparse (the rows of the batch)."""
    inference = _fitted("particles_paper", counts)
    inference.guide.sparse_gradients = sparse
    fused = FusedELBO(inference.model, inference.guide)
    params = list(inference.guide.parameters())
    values = []
    for elbo in (AnalyticTraceELBO(), fused):
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(*fused.pair, counts, subsample_size=2)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        values.append((loss.item(), [g.to_dense() if g is not None and g.is_sparse else g
                                     for g in grads]))
    (traced, g_traced), (mine, g_mine) = values
    assert mine == pytest.approx(traced, rel=1e-12)
    assert sum(g is not None and g.is_sparse for g in grads) == (2 if sparse else 0)
    for a, b in zip(g_traced, g_mine, strict=True):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * a.abs().max().item())
    pyro.set_rng_seed(3)
    full = fused.loss(*fused.pair, counts)
    assert abs(full - mine) > 1e-6 * abs(full)  # a batch is not the whole


def test_fused_elbo_refuses_other_pairs(counts):
    inference = _fitted("particles_paper", counts)
    fused = FusedELBO(inference.model, inference.guide)
    with pytest.raises(ValueError, match="pair it was built with"):
        fused.loss(MODELS["particles_paper"](), inference.guide, counts)
    vectorized_off = CGModel(N_BINS, GaussianTransition(Drift(N_BINS, hidden=(4,))),
                             vectorized=False)
    assert not FusedELBO.applies(vectorized_off, inference.guide)
    with pytest.raises(ValueError, match="vectorized CGModel and its LogNormalGuide"):
        FusedELBO(vectorized_off, inference.guide)


@pytest.mark.parametrize("name", ["physics", "particles_paper"])
def test_training_with_the_fused_elbo_repeats_the_traced_run(name, counts, monkeypatch):
    """SVIInference trains with the fused form; the traced form gives the same losses, step by
    step, and the same parameters."""
    fused = _fitted(name, counts, steps=40)
    assert isinstance(fused._svi(fused.guide, fused.optim).loss.__self__, FusedELBO)
    monkeypatch.setattr(FusedELBO, "applies", staticmethod(lambda model, guide: False))
    traced = _fitted(name, counts, steps=40)
    assert isinstance(traced._svi(traced.guide, traced.optim).loss.__self__, AnalyticTraceELBO)
    assert fused.loss_history == pytest.approx(traced.loss_history, rel=1e-10)
    assert len(set(fused.loss_history)) > 30  # it trained: the losses move
    for (k, a), (_, b) in zip(sorted(fused.guide.state_dict().items()),
                              sorted(traced.guide.state_dict().items()), strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10), k


@pytest.mark.parametrize("memory,lags", [("true", 1), ("false", 1), ("true", 3)])
def test_exact_form_with_its_gradient_by_hand_equals_autograd(memory, lags, tmp_path,
                                                              monkeypatch):
    """With θ held and every term in closed form FusedELBO evaluates the ELBO and writes its
    gradient out (no autograd graph): the value and the gradients equal the traced closed
    form's (autograd through the same terms) to rounding, with memory of one increment
    (second order), of three (fourth order) and without, for the training guide and for
    guides of new sequences of 1, 2, 3 and 5 snapshots (θ fixed, as ``infer_new`` builds
    them)."""
    from pathlib import Path

    import cgpyro.elbo as elbo_module
    from cgpyro.guides import LogNormalGuide

    text = (Path(__file__).parents[1] / "models" / "physics.toml").read_text()
    spec = tmp_path / "m.toml"
    text = text.replace('memory = "auto"', f"memory = {memory}")
    text, found = re.subn(r"\nmemory_lags = \d+\n", f"\nmemory_lags = {lags}\n", text)
    assert found == 1, "models/physics.toml must declare memory_lags"
    spec.write_text(text)
    dataset, _ = simulate_dataset(n_sequences=3, n_steps=4 if lags == 1 else 7,
                                  n_particles=5000, n_bins=N_BINS, seed=1)
    data = as_counts(dataset)
    inference = SVIInference(load_model(spec, n_bins=N_BINS), steps=20, progress=False)
    inference.fit(data)
    model = inference.model
    assert model.transition.order == (1 + lags if memory == "true" else 1)
    if lags > 1:  # the oldest lag has weights: every K_m of the closed form matters
        assert inference.guide.theta_map()["transition.drift.memory3"].abs().max() > 0
    calls = []
    apply = elbo_module._ExactELBO.apply
    monkeypatch.setattr(elbo_module._ExactELBO, "apply",
                        lambda *args: calls.append(1) or apply(*args))
    guides = [(inference.guide, data)]
    for n_times in (1, 2, 3, 5):
        guides.append((LogNormalGuide(model, data[:, :n_times],
                                      theta_values=inference.guide.theta_map(),
                                      theta_held=inference.guide.theta.held,
                                      prefix=f"new{n_times}"),
                       data[:, :n_times]))
    for guide, counts in guides:
        fused = FusedELBO(model, guide)
        params = list(guide.parameters())
        n_calls = len(calls)
        mine = fused.differentiable_loss(*fused.pair, counts)
        assert len(calls) == n_calls + 1  # the exact form ran
        traced = AnalyticTraceELBO().differentiable_loss(*fused.pair, counts)
        assert mine.item() == pytest.approx(traced.item(), rel=1e-12)
        g_mine = torch.autograd.grad(mine, params, allow_unused=True)
        g_traced = torch.autograd.grad(traced, params, allow_unused=True)
        for a, b in zip(g_traced, g_mine, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.abs().max() > 0
                assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * a.abs().max().item())


def test_exact_form_follows_changed_data_totals_and_annealing(counts):
    """What the exact form keeps of the data (normaliser, X_loc coefficients, largest snapshot)
    is rebuilt when the counts change in place or other totals are passed, and σ_c follows the
    annealing schedule at every call: each value equals the traced closed form's."""
    from cgpyro.virtual import annealing

    inference = _fitted("physics", counts)
    fused = FusedELBO(inference.model, inference.guide)
    data = counts.clone()

    def both(**kwargs):
        mine = fused.differentiable_loss(*fused.pair, data, **kwargs).item()
        traced = AnalyticTraceELBO().differentiable_loss(*fused.pair, data, **kwargs).item()
        assert mine == pytest.approx(traced, rel=1e-12)
        return mine

    before = both()
    data[0, 1, 2] += 50.0  # in place: the same tensor, a new version
    changed = both()
    assert changed != pytest.approx(before, rel=1e-9)
    # 1000x the particles: σ_c² of the mass VO capped below its final value (eq. 17)
    with_totals = both(totals=1000 * data[:, 0].sum(-1))
    assert with_totals != pytest.approx(changed, rel=1e-9)
    assert both(totals=data[:, 0].sum(-1)) == pytest.approx(changed, rel=1e-12)  # other totals
    with annealing(0.0):  # σ_c at its start: a looser mass constraint
        assert both() != pytest.approx(changed, rel=1e-9)
