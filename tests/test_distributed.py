"""Data-parallel SVI (cgpyro._distributed) on 2 CPU processes with the gloo backend."""

import numpy as np
import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cgpyro import _distributed
from cgpyro.cli import main
from cgpyro.inference import SVIInference
from cgpyro.systems import simulate_dataset
from tests.test_inference import linear_data, linear_model

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _elbo_and_grads(rank=0, size=1):
    """One ELBO evaluation of the linear model's SVI setup on this process's shard, with q(X)
    a point mass to float64 precision (scale 1e-15) so that the analytic ELBO is deterministic: the
    (summed) loss, the θ gradients and the q(X) gradients of the shard's rows."""
    pyro.clear_param_store()
    counts = linear_data(n_seq=7, n_times=5)  # 7 sequences: blocks of 3 and 4
    inference = SVIInference(linear_model(), steps=10, progress=False)
    local, _, svi = inference._setup(counts, None)
    guide = inference.guide
    guide.init_scale = torch.full_like(guide.init_scale, 1e-15)
    loss = svi.loss_and_grads(svi.model, svi.guide, local)
    theta = {name: p.grad.clone() for name, p in guide.theta.named_parameters()}
    return loss, theta, guide._states.X_loc.grad.clone()


def _elbo_worker(rank, size, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=size)
    try:
        torch.save(_elbo_and_grads(rank, size), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_compute_the_full_batch_elbo_and_gradients(tmp_path):
    """Each process holds its block of sequences and 1/2 of the θ terms: the all-reduced
    loss and θ gradients equal one process's full-batch ones, and each block's q(X)
    gradients are the full-batch rows. Tolerances: float64 rounding of sums of terms up to 1e5
    (measured differences: loss 4e-12, θ gradients 6e-10, q(X) gradients 4e-10)."""
    full_loss, full_theta, full_x = _elbo_and_grads()
    mp.spawn(_elbo_worker, nprocs=2, join=True,
             args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "out")))
    parts = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]
    assert full_theta and set(parts[0][1]) == set(full_theta)
    for loss, theta, _ in parts:
        assert loss == pytest.approx(full_loss, rel=1e-12, abs=1e-9)
        for name, grad in full_theta.items():
            assert torch.allclose(theta[name], grad, rtol=0, atol=1e-8), name
    x_grads = torch.cat([p[2] for p in parts])
    assert x_grads.shape == full_x.shape
    assert torch.allclose(x_grads, full_x, rtol=0, atol=1e-8)


def test_shard_blocks_cover_the_sequences_once():
    blocks = [_distributed.shard(7, r, 3) for r in range(3)]
    assert [(b.start, b.stop) for b in blocks] == [(0, 2), (2, 4), (4, 7)]
    with pytest.raises(ValueError, match="at least one sequence per process"):
        _distributed.shard(2, 0, 3)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "d.npz"
    from cgpyro import data as cgdata

    dataset, _ = simulate_dataset(n_sequences=8, n_steps=6, n_particles=20_000, seed=3)
    cgdata.save(dataset, path)
    return path


def test_cli_train_nproc_2_matches_one_process_and_resumes(small_data, tmp_path, capsys):
    """`cgpyro train --nproc 2`: the same ELBO trajectory as one process within Monte Carlo
    noise (mean of the last 100 steps within 2 %; step-to-step noise is ~1.5 %), the same
    θ_MAP and forecasts, a checkpoint of the same shape; resuming it on 2 processes continues."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        assert main(["train", "--data", str(small_data), "--out", str(out), "--steps", "300",
                     "--model", "particles_paper", "--nproc", str(nproc), "--quiet"]) == 0
        runs[nproc] = torch.load(out / "checkpoint.pt", weights_only=False)
    one, two = runs[1], runs[2]
    assert len(two["loss_history"]) == 300 and two["step"] == 300
    tail = [np.mean(r["loss_history"][-100:]) for r in (one, two)]
    assert abs(tail[1] - tail[0]) < 0.02 * abs(tail[0])
    assert set(one["params"]) == set(two["params"])
    for name, value in one["params"].items():
        assert value.shape == two["params"][name].shape
        if name.startswith("theta."):
            assert torch.allclose(value, two["params"][name], atol=0.02), name
    forecasts = []
    for nproc in (1, 2):
        assert main(["predict", "--run", str(tmp_path / f"run{nproc}"), "--data",
                     str(small_data), "--horizon", "3", "--out",
                     str(tmp_path / f"pred{nproc}.npz")]) == 0
        forecasts.append(np.load(tmp_path / f"pred{nproc}.npz")["mean"])
    assert np.abs(forecasts[0] - forecasts[1]).max() < 0.05 * np.abs(forecasts[0]).max()
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run2"), "--steps", "320",
                 "--nproc", "2", "--quiet"]) == 0
    resumed = torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 320 and resumed["loss_history"][:300] == two["loss_history"]
    assert "trained 320 steps" in capsys.readouterr().out


def test_nproc_refuses_more_processes_than_sequences(small_data, tmp_path, capsys):
    assert main(["train", "--data", str(small_data), "--out", str(tmp_path / "r"), "--steps",
                 "5", "--nproc", "9", "--quiet"]) != 0
    assert "more processes than the run's 8 sequences" in capsys.readouterr().err


def test_ctrl_c_stops_every_process_at_the_same_step_and_resumes(small_data, tmp_path, capsys,
                                                                 monkeypatch):
    """SIGINT to rank 0 at the end of step 20: both processes stop there, rank 0 saves the
    gathered checkpoint (every sequence's q(X)), and `--resume` on 2 processes finishes."""
    import cgpyro.inference
    from cgpyro.checkpoint import load_checkpoint
    from tests.test_reliability import _CtrlCAt

    run = tmp_path / "run"
    monkeypatch.setattr(cgpyro.inference, "SVIInference", _CtrlCAt)  # this process: rank 0
    assert main(["train", "--data", str(small_data), "--out", str(run), "--steps", "40",
                 "--model", "particles_paper", "--nproc", "2", "--quiet"]) == 130
    assert "interrupted at step 20" in capsys.readouterr().err
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 20 and len(state["loss_history"]) == 20
    assert state["params"]["q.X_loc"].shape[0] == 8
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--nproc", "2", "--quiet"]) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 40 and len(state["loss_history"]) == 40
