"""SVI inference: recovery of a known drift, warm start, new sequences, checkpoints."""

import numpy as np
import pyro
import pytest
import torch

from cgpyro.checkpoint import CheckpointError
from cgpyro.inference import NumericalError, SVIInference, fit_drift_least_squares
from cgpyro.model import CGModel
from cgpyro.transitions import Drift, GaussianTransition
from cgpyro.virtual import VirtualObservable, mass_conservation

B = 4
# A column-stochastic diffusion-with-drift matrix: the exact CG law of a biased random walk
# observed in 4 periodic bins.
K = np.array([[0.80, 0.08, 0.00, 0.12],
              [0.12, 0.80, 0.08, 0.00],
              [0.00, 0.12, 0.80, 0.08],
              [0.08, 0.00, 0.12, 0.80]])


def linear_data(n_seq=12, n_times=8, total=200_000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.dirichlet(np.full(B, 3.0), size=n_seq)
    out = np.empty((n_seq, n_times, B))
    for t in range(n_times):
        out[:, t] = [rng.multinomial(total, xi) for xi in x]
        x = x @ K.T
    return torch.tensor(out)


def linear_model(**kw):
    return CGModel(B, GaussianTransition(Drift(B, hidden=(), linear_skip=True, **kw)),
                   virtual_observables=[VirtualObservable("mass", mass_conservation,
                                                          sigma_start=1e-2)])


def jacobian(model, theta):
    x0 = torch.full((B,), 1.0 / B, dtype=torch.float64)
    return torch.autograd.functional.jacobian(lambda x: model.transition_mean(x, theta), x0)


def test_training_recovers_a_known_linear_drift():
    """Tolerance 0.02 per entry: ~5x the LS standard error at 200k particles, 12 x 7 pairs."""
    counts = linear_data()
    model = linear_model()
    inference = SVIInference(model, steps=400, progress=False).fit(counts)
    J = jacobian(model, inference.guide.theta_map())
    assert np.abs(J.numpy() - K).max() < 0.02
    loc, scale = inference.guide.states()
    mass = (loc + 0.5 * scale**2).exp().sum(-1)
    # the MAP mass bias of eq. 17 + eq. 18 is N σ_c² = 2e5 * 1e-9
    assert (mass - 1).abs().max() < 1e-3
    assert np.isfinite(inference.loss_history).all() and len(inference.loss_history) == 400


def test_training_without_warm_start_also_recovers_the_drift():
    counts = linear_data()
    model = linear_model()
    inference = SVIInference(model, steps=1500, lr=0.02, lr_theta=0.01, warm_start=False,
                             progress=False).fit(counts)
    J = jacobian(model, inference.guide.theta_map())
    assert np.abs(J.numpy() - K).max() < 0.05


def test_least_squares_warm_start_makes_the_paper_relu_network_linear():
    counts = linear_data()
    model = CGModel(B, GaussianTransition(Drift(B, hidden=(B, B))))
    theta = fit_drift_least_squares(model, counts, model.init_values(), max_iter=0)
    J = jacobian(model, theta)
    assert np.abs(J.numpy() - K).max() < 0.02


def test_new_sequences_get_states_with_theta_fixed():
    counts = linear_data()
    model = linear_model()
    inference = SVIInference(model, steps=200, progress=False).fit(counts[:8])
    theta_before = {k: v.clone() for k, v in inference.guide.theta_map().items()}
    guide = inference.infer_states(counts[8:], steps=200)
    loc, _ = guide.states()
    assert loc.shape == (4, counts.shape[1], B)
    frac = counts[8:] / counts[8:].sum(-1, keepdim=True)
    assert (loc.exp() - frac).abs().max() < 5e-3
    for k, v in inference.guide.theta_map().items():
        assert torch.equal(v, theta_before[k]), f"{k} changed while fitting new sequences"


def test_early_stopping_and_callbacks():
    counts = linear_data(n_seq=4, n_times=4)
    seen = []

    def stop_at_30(step, loss, inference):
        seen.append(step)
        return step >= 30

    inference = SVIInference(linear_model(), steps=500, progress=False,
                             callbacks=[stop_at_30]).fit(counts)
    assert inference.step == 30 and seen[-1] == 30 and len(inference.loss_history) == 30


def test_nan_stops_training_with_a_message(tmp_path):
    counts = linear_data(n_seq=3, n_times=4)

    def poison(step, loss, inference):
        if step == 20:
            with torch.no_grad():
                dict(pyro.get_param_store().named_parameters())["q.X_loc"].fill_(float("nan"))

    inference = SVIInference(linear_model(), steps=100, progress=False, callbacks=[poison],
                             checkpoint=tmp_path / "ck.pt", checkpoint_every=10)
    with pytest.raises(NumericalError,
                       match=r"step 20: parameter 'q.X_loc' is not finite.*step 10"):
        inference.fit(counts)


def interrupted_checkpoint(inference, counts, path, at):
    """Fit ``inference`` (writing checkpoints to ``path``) until Ctrl-C at step ``at``;
    return the saved payload."""
    def interrupt(step, loss, inf):
        if step == at:
            raise KeyboardInterrupt

    inference.checkpoint, inference.callbacks = path, [interrupt]
    with pytest.raises(KeyboardInterrupt):
        inference.fit(counts)
    return torch.load(path, weights_only=True)


def test_resume_is_bit_identical(tmp_path):
    counts = linear_data(n_seq=3, n_times=4)
    full = SVIInference(linear_model(), steps=60, progress=False).fit(counts)
    expected = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    ck = tmp_path / "ck.pt"
    interrupted_checkpoint(SVIInference(linear_model(), steps=60, progress=False), counts, ck, 25)
    resumed = SVIInference(linear_model(), steps=60, progress=False, checkpoint=ck)
    resumed.fit(counts, resume=ck)
    assert resumed.step == 60
    assert resumed.loss_history == full.loss_history
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), expected[k]), k


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        SVIInference(linear_model(), steps=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        SVIInference(linear_model(), lr=-1.0)
    with pytest.raises(ValueError,
                       match=r"counts: expected 3 dimensions \(sequence, time, bin\), found 2"):
        SVIInference(linear_model(), steps=2, progress=False).fit(np.zeros((3, 4)))


def test_a_fitted_guide_keeps_its_parameters_after_another_fit():
    counts = linear_data(n_seq=4, n_times=4)
    model_a = linear_model()
    first = SVIInference(model_a, steps=50, progress=False).fit(counts)
    theta_a = {k: v.clone() for k, v in first.guide.theta_map().items()}
    loc_a = first.guide.states()[0].clone()
    SVIInference(linear_model(), steps=50, progress=False, seed=1).fit(counts * 2)
    for k, v in first.guide.theta_map().items():
        assert torch.equal(v, theta_a[k]), k
    assert torch.equal(first.guide.states()[0], loc_a)


def test_sigma_r_calibrated_to_the_multinomial_scale_is_fixed():
    counts = linear_data(n_seq=4, n_times=4, total=10_000)
    model = CGModel(B, GaussianTransition(Drift(B, hidden=(), linear_skip=True),
                                          sigma_r_multinomial=0.25),
                    virtual_observables=[VirtualObservable("mass", mass_conservation)])
    inference = SVIInference(model, steps=20, progress=False).fit(counts)
    frac = counts / counts.sum(-1, keepdim=True)
    expected = 0.25 * (frac * (1 - frac) / 10_000).mean().sqrt()
    assert inference.guide.theta_map()["transition.sigma_r"].item() == pytest.approx(
        expected.item(), rel=1e-12)
    assert "theta.transition.sigma_r" not in pyro.get_param_store().keys()


def test_minibatch_elbo_is_scaled_to_the_whole_dataset():
    """The sequence plate scales a batch of k of n sequences by n / k (exact), so the minibatch
    loss is an unbiased estimate of the full one (2 % tolerance: 3 standard errors over 300
    draws of the batch, measured)."""
    from cgpyro.elbo import AnalyticTraceELBO
    from cgpyro.guides import LogNormalGuide

    counts = linear_data(n_seq=12, n_times=5)
    model = linear_model()
    guide = LogNormalGuide(model, counts)
    tr = pyro.poutine.trace(guide).get_trace(counts, subsample_size=3)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(model, trace=tr)).get_trace(
        counts, subsample_size=3)
    assert model_tr.nodes["counts"]["scale"] == pytest.approx(4.0)
    assert model_tr.nodes["X"]["value"].shape[0] == 3
    elbo = AnalyticTraceELBO()
    full = np.mean([elbo.loss(model, guide, counts) for _ in range(50)])
    batch = np.mean([elbo.loss(model, guide, counts, subsample_size=3) for _ in range(300)])
    assert abs(batch - full) < 0.02 * abs(full)


def test_minibatch_training_recovers_the_drift():
    counts = linear_data()
    model = linear_model()
    inference = SVIInference(model, steps=400, batch_size=4, progress=False).fit(counts)
    J = jacobian(model, inference.guide.theta_map())
    assert np.abs(J.numpy() - K).max() < 0.03
    with pytest.raises(ValueError, match="batch_size must be None or a positive integer"):
        SVIInference(model, batch_size=0)


def test_learning_rates_decay_geometrically_and_theta_has_its_own():
    """After SVI step k (from 0) every step size is its start times lr_final_factor ** (k/steps);
    θ (the guide's MAP part, found by module membership) starts at lr_theta."""
    counts = linear_data(n_seq=3, n_times=4)
    seen = {}

    def record(step, loss, inference):
        for name, state in inference.optim.get_state().items():
            seen.setdefault(name, []).append(state["optimizer"]["param_groups"][0]["lr"])

    inference = SVIInference(linear_model(), steps=7, lr=0.02, lr_theta=0.005,
                             lr_final_factor=0.3, progress=False, callbacks=[record]).fit(counts)
    theta = {name for name, _ in inference.guide.theta.named_pyro_params(prefix="theta")}
    assert theta and seen.keys() == theta | {"q.X_loc", "q.X_log_scale"}
    for name, lrs in seen.items():
        start = 0.005 if name in theta else 0.02
        expected = [start * 0.3 ** (k / 7) for k in range(7)]
        assert np.allclose(lrs, expected, rtol=0, atol=1e-12), name


def test_checkpoints_with_the_names_of_older_cgpyro_resume(tmp_path):
    """Before guides were PyroModules the amortized network's params were named
    ``amortized$$$…`` and the autoguide's states ``CGAutoGuide.{i}.…``: such runs resume."""
    from cgpyro.guides import AmortizedGuide

    counts = linear_data(n_seq=3, n_times=4)

    def factory(model, counts, theta_init):
        return AmortizedGuide(model, counts, theta_init, hidden=8, window=1)

    def inference(**kw):
        return SVIInference(linear_model(), guide=factory, steps=6, progress=False, **kw)

    full = inference().fit(counts)

    ck = tmp_path / "ck.pt"
    payload = interrupted_checkpoint(inference(), counts, ck, 3)
    old = {name: name.replace("amortized.", "amortized$$$") for name in payload["params"]}
    assert any("$$$" in name for name in old.values())
    for key in ("params", "optim"):
        payload[key] = {old[name]: value for name, value in payload[key].items()}
    del payload["sha256"]  # older files are read without one, too
    torch.save(payload, ck)
    resumed = inference(checkpoint=ck).fit(counts, resume=ck)
    assert resumed.loss_history == full.loss_history
    payload["params"]["amortized$$$extra"] = torch.zeros(2)
    torch.save(payload, ck)
    with pytest.raises(CheckpointError, match="do not match this model/guide"):
        inference().fit(counts, resume=ck)


def test_minibatch_states_take_sparse_gradients_of_the_same_loss():
    """The minibatch path gathers the batch's rows with sparse gradients; its loss and
    gradients equal those of the dense indexing it replaced (same seed, within 1e-10)."""
    from cgpyro.elbo import AnalyticTraceELBO
    from cgpyro.guides import LogNormalGuide

    counts = linear_data(n_seq=12, n_times=5)
    model = linear_model()
    guide = LogNormalGuide(model, counts)
    guide.sparse_gradients = True  # what SVIInference sets for batch_size < n
    loc0, scale0 = guide.states()
    loc_d = loc0.clone().requires_grad_()
    log_scale_d = scale0.log().requires_grad_()

    def dense_guide(counts, subsample_size=None, **kwargs):  # the indexing of cgpyro <= 0.x
        guide.theta()
        with pyro.plate("sequences", len(counts), subsample_size=subsample_size, dim=-1) as i:
            pyro.sample("X", pyro.distributions.LogNormal(loc_d[i], log_scale_d.exp()[i])
                        .to_event(2))

    elbo = AnalyticTraceELBO()
    pyro.set_rng_seed(3)
    new = elbo.differentiable_loss(model, guide, counts, subsample_size=3)
    new.backward()
    pyro.set_rng_seed(3)
    old = elbo.differentiable_loss(model, dense_guide, counts, subsample_size=3)
    old.backward()
    assert abs(new.item() - old.item()) <= 1e-10 * abs(old.item())
    params = dict(guide.named_parameters())
    grad_loc = params["q.X_loc_unconstrained"].grad
    grad_log_scale = params["q.X_log_scale_unconstrained"].grad
    assert grad_loc.is_sparse and grad_log_scale.is_sparse
    assert grad_loc.coalesce().indices().shape[1] == 3  # the batch's rows only
    torch.testing.assert_close(grad_loc.to_dense(), loc_d.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_log_scale.to_dense(), log_scale_d.grad, rtol=1e-10,
                               atol=1e-12)


def test_a_minibatch_step_moves_only_the_batch_rows():
    """Lazy Adam: a step of batch 4 of 12 sequences changes 4 rows of the states (dense Adam's
    momentum moved every row once it had been in a batch)."""
    from cgpyro.guides import init_states_from_counts

    counts = linear_data(n_seq=12, n_times=5)
    loc0, scale0 = init_states_from_counts(counts)
    for steps in (1, 3):
        inference = SVIInference(linear_model(), steps=steps, batch_size=4,
                                 progress=False).fit(counts)
        loc, scale = inference.guide.states()
        moved = ((loc != loc0) | (scale != scale0.log().exp())).flatten(1).any(-1)
        assert 4 <= int(moved.sum()) <= 4 * steps
    kinds = {type(o.optimizer).__name__ for o in inference.optim.optim_objs.values()}
    assert kinds == {"Adam", "SparseAdam"}


def test_minibatch_resume_is_bit_identical_also_from_old_names(tmp_path):
    """A minibatch run (SparseAdam states) resumes bit-identically, also from a checkpoint
    whose scale is named ``q.X_scale`` (the positive PyroParam of cgpyro <= 0.x: the same
    unconstrained log values)."""
    counts = linear_data(n_seq=5, n_times=4)

    def inference(**kw):
        return SVIInference(linear_model(), steps=30, batch_size=2, progress=False, **kw)

    full = inference().fit(counts)
    expected = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    ck = tmp_path / "ck.pt"
    payload = interrupted_checkpoint(inference(), counts, ck, 12)
    assert isinstance(payload["optim"]["q.X_loc"]["state"][0]["step"], int)  # SparseAdam
    resumed = inference(checkpoint=ck).fit(counts, resume=ck)
    assert resumed.loss_history == full.loss_history
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), expected[k]), k
    payload = interrupted_checkpoint(inference(), counts, ck, 12)
    for key in ("params", "optim"):
        payload[key]["q.X_scale"] = payload[key].pop("q.X_log_scale")
    del payload["sha256"]
    torch.save(payload, ck)
    assert inference().fit(counts, resume=ck).loss_history == full.loss_history


def test_a_nan_state_outside_the_batch_is_caught_before_the_checkpoint(tmp_path):
    """Minibatch steps skip the O(n) check of the states; every row is checked before a
    checkpoint is written (here the NaN comes at a checkpoint step, in a row that the step
    did not draw), so no checkpoint holds a NaN."""
    counts = linear_data(n_seq=6, n_times=4)

    def poison(step, loss, inference):
        if step == 20:
            with torch.no_grad():
                dict(pyro.get_param_store().named_parameters())["q.X_loc"][5].fill_(
                    float("nan"))

    inference = SVIInference(linear_model(), steps=100, batch_size=2, progress=False,
                             callbacks=[poison], checkpoint=tmp_path / "ck.pt",
                             checkpoint_every=10)
    with pytest.raises(NumericalError,
                       match=r"step 20: parameter 'q.X_loc' is not finite.*step 10"):
        inference.fit(counts)
