"""Training progress: short lines every 10 % in logs, tqdm on terminals, phases of σ_c."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cgpyro._progress import LineProgress, anneal_end, phase, progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(bar, steps: int, postfix_every: int = 50) -> None:
    for step in range(1, steps + 1):
        bar.update(1)
        if step % postfix_every == 0:
            bar.set_postfix(loss=f"{-step:.4g}")
    bar.close()


def test_log_gets_one_line_per_ten_percent_with_the_current_postfix():
    out = io.StringIO()
    bar = progress_bar(2000, file=out)
    assert isinstance(bar, LineProgress)
    _run(bar, 2000)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10
    assert [int(line.split()[2].split("/")[0]) for line in lines] == list(range(200, 2001, 200))
    assert lines[0].startswith("SVI  10% 200/2000 steps") and lines[0].endswith("loss=-200")
    assert lines[-1].startswith("SVI 100% 2000/2000 steps") and lines[-1].endswith("loss=-2000")


def test_log_early_stop_and_resume():
    out = io.StringIO()
    _run(LineProgress(2000, file=out), 450)  # stopped early: the last state is printed
    assert [line.split()[2] for line in out.getvalue().splitlines()] == \
        ["200/2000", "400/2000", "450/2000"]
    out = io.StringIO()
    _run(LineProgress(100, initial=60, file=out), 40, postfix_every=7)  # resumed at 60
    assert [line.split()[2] for line in out.getvalue().splitlines()] == \
        ["70/100", "80/100", "90/100", "100/100"]
    out = io.StringIO()
    LineProgress(5, file=out).close()  # nothing done: nothing printed
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="total"):
        LineProgress(0)
    with pytest.raises(ValueError, match="every"):
        LineProgress(10, every=0)


def test_terminal_gets_tqdm_and_disable_prints_nothing():
    from tqdm import tqdm

    tty = _Tty()
    bar = progress_bar(10, file=tty)
    assert isinstance(bar, tqdm)
    _run(bar, 10, postfix_every=5)
    assert "\r" in tty.getvalue()
    quiet = io.StringIO()
    bar = progress_bar(10, disable=True, file=quiet)
    _run(bar, 10)
    assert quiet.getvalue() == ""


def test_anneal_end_and_phase():
    vo = SimpleNamespace
    observables = [vo(sigma_start=1e-2, sigma_final=1e-5, anneal_fraction=0.5),
                   vo(sigma_start=None, sigma_final=1e-5, anneal_fraction=0.9),  # not annealed
                   vo(sigma_start=1e-3, sigma_final=1e-3, anneal_fraction=0.9)]  # constant
    assert anneal_end(observables, 2000) == 1000
    assert anneal_end(observables[1:], 2000) == 0
    assert anneal_end([], 10) == 0
    assert phase(999, 1000) == "annealing" and phase(1000, 1000) == "final"


def test_fit_reports_the_loss_in_lines_when_stderr_is_not_a_terminal(capsys):
    from cgpyro.inference import SVIInference
    from cgpyro.model import CGModel
    from cgpyro.transitions import Drift, GaussianTransition
    from cgpyro.virtual import VirtualObservable, mass_conservation

    counts = torch.tensor(np.random.default_rng(0).multinomial(1000, [0.25] * 4, size=(3, 4)),
                          dtype=torch.float64)
    model = CGModel(4, GaussianTransition(Drift(4, hidden=(), linear_skip=True)),
                    virtual_observables=[VirtualObservable("mass", mass_conservation,
                                                           sigma_start=1e-2,
                                                           anneal_fraction=0.8)])
    inference = SVIInference(model, steps=100, progress=True).fit(counts)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and "\r" not in "".join(lines)
    assert lines[4].endswith(f"loss={inference.loss_history[49]:.4g}, sigma_c=annealing")
    assert lines[-1].startswith("SVI 100% 100/100 steps")
    assert lines[-1].endswith(f"loss={inference.loss_history[-1]:.4g}, sigma_c=final")
