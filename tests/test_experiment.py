"""The paper's experiment end to end at toy sizes: the default spec's choice is reported."""

import json

from cgpyro.experiment import run_paper_experiment, write_report


def test_paper_experiment_reports_the_model_the_default_spec_chose(tmp_path):
    result = run_paper_experiment(n_train=2, n_test=1, n_observed=4, n_steps=6, n_particles=5000,
                                  steps=5, num_samples=10, eval_times=(5, 6))
    # the paper's system at the paper's Δt on 25 bins: half a bin per snapshot
    assert result.extra["model_spec"] == "physics"
    choice = result.extra["model_choice"]
    assert choice["spec"] == "auto" and choice["chosen"] == "physics"
    assert choice["width"] > choice["width_below"] == 0.28
    write_report(result, tmp_path)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["model"] == "physics" and report["model_choice"]["chosen"] == "physics"
    first = (tmp_path / "metrics.md").read_text().splitlines()[0]
    assert first.startswith("Model: physics (chosen by auto: rms displacement width 0.")
    assert [r["time"] for r in report["rows"]] == [5, 6]
