"""Learning-curve smoke run: nested subsets, the linear peer and the no-VO variant."""

import numpy as np

from cgpyro.curve import learning_curve, write_curve
from cgpyro.systems import simulate_dataset


def test_learning_curve_smoke(tmp_path):
    data, _ = simulate_dataset(n_sequences=5, n_steps=7, n_particles=20_000, n_bins=10, seed=0)
    train, test = data.counts[:3, :4], data.counts[3:]
    rows = learning_curve(train, test, sizes=(1, 2, 99), steps=20, num_samples=20)
    assert {r["n"] for r in rows} == {1, 2}
    # the default spec "auto" picks its model from each subset: 10 bins of 128 sites at
    # Δt = 1,600 is a short step (width 0.2 bins), so "subbin"
    assert {r["model"] for r in rows} == {"linear", "auto", "auto_no_vo"}
    assert {r["chosen"] for r in rows if r["model"] != "linear"} == {"subbin"}
    assert {r["t"] for r in rows} <= set(range(4, 8))
    assert all(np.isfinite(r["error"]) and r["error"] > 0 for r in rows)
    # the model learns from one sequence what the linear map cannot
    phys = max(r["ratio"] for r in rows if r["model"] == "auto" and r["n"] == 1)
    lin = max(r["ratio"] for r in rows if r["model"] == "linear" and r["n"] == 1)
    assert phys < lin
    files = write_curve(rows, tmp_path)
    assert [f.name for f in files] == ["curve.md", "curve.csv", "curve.png"]
    assert "| n | model |" in files[0].read_text()


def test_curve_command_writes_table_and_figure(tmp_path):
    from cgpyro.cli import main
    from cgpyro.data import save

    data, _ = simulate_dataset(n_sequences=4, n_steps=6, n_particles=20_000, n_bins=8, seed=1)
    train, test = data.subset(slice(0, 2), slice(0, 4)), data.subset(slice(2, 4))
    save(train, tmp_path / "train.npz")
    save(test, tmp_path / "test.npz")
    rc = main(["curve", "--data", str(tmp_path / "train.npz"), "--test",
               str(tmp_path / "test.npz"), "--sizes", "1,2", "--steps", "10",
               "--no-vo-variant", "--out", str(tmp_path / "curve")])
    assert rc == 0
    text = (tmp_path / "curve" / "curve.md").read_text()
    assert "| 2 | auto | subbin |" in text and "| 1 | linear | linear |" in text
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 0
    assert main(["curve", "--data", str(tmp_path / "train.npz"), "--test",
                 str(tmp_path / "test.npz"), "--sizes", "1,x", "--out",
                 str(tmp_path / "c2")]) != 0


def test_train_batch_size_flag_trains_on_minibatches(tmp_path):
    import json

    from cgpyro.cli import main
    from cgpyro.data import save

    data, _ = simulate_dataset(n_sequences=6, n_steps=3, n_particles=20_000, n_bins=8, seed=2)
    save(data, tmp_path / "d.npz")
    assert main(["train", "--data", str(tmp_path / "d.npz"), "--steps", "10", "--batch-size",
                 "2", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["batch_size"] == 2
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"),
                 "--horizon", "2", "--samples", "10", "--out", str(tmp_path / "p.npz")]) == 0


def test_resume_refuses_settings_of_a_new_run(tmp_path, capsys):
    from cgpyro.cli import main
    from cgpyro.data import save

    data, _ = simulate_dataset(n_sequences=2, n_steps=3, n_particles=10_000, n_bins=8, seed=3)
    save(data, tmp_path / "d.npz")
    assert main(["train", "--data", str(tmp_path / "d.npz"), "--steps", "4", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    for flag, value in (("--model", "particles_paper"), ("--seed", "3"), ("--guide", "amortized")):
        assert main(["train", "--resume", str(tmp_path / "run"), flag, value, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{flag}: not with --resume" in err
