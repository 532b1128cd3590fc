"""Learning curves: forecast accuracy against the number of training sequences (issue 11).

The paper's central claim (small data) measured: train on nested subsets ``n = 1, 2, 4, ...``
of the training sequences, forecast held-out sequences from their first snapshots, and compare
with the least-squares linear map fitted on the same subset, with and without virtual
observables.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import metrics
from .inference import SVIInference, as_counts

__all__ = ["learning_curve", "write_curve", "plot_learning_curve"]


def _variants(spec, name: str, with_no_vo: bool):
    out = [(name, spec)]
    if with_no_vo and spec.virtual_observables:
        out.append((f"{name}_no_vo", dataclasses.replace(
            spec, virtual_observables=[], emission="normalized_multinomial")))
    return out


def learning_curve(
    train,
    test,
    sizes=(1, 2, 4, 8, 16, 64),
    model="auto",
    guide="lognormal",
    *,
    steps: int | None = None,
    eval_steps=None,
    oracle: np.ndarray | None = None,
    with_no_vo: bool = True,
    num_samples: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Train on the first ``n`` sequences of ``train`` for each ``n`` in ``sizes``; score ``test``.

    :param train: counts ``(n_sequences, T, n_bins)`` (Dataset, array or tensor).
    :param test: held-out counts ``(n_test, T_test, n_bins)`` with ``T_test > T``: states are
        inferred from the first ``T`` snapshots, then forecast to ``T_test - 1``.
    :param sizes: training-set sizes; those above ``n_sequences`` are dropped.
    :param model: a model spec name or path (a no-VO variant is added if ``with_no_vo``); a
        choosing spec (``"auto"``) picks its model from each training subset (row key
        ``chosen``: the spec trained).
    :param eval_steps: test snapshot indices to score (default: four spread over the forecast).
    :param oracle: optional oracle fractions ``(n_test, T_test, n_bins)`` (e.g. the exact
        expectation given the FG state at ``T - 1``); then ``ratio`` = error / oracle error,
        else error / the error of the linear map fitted on *all* training sequences.
    :returns: rows ``{"n", "model", "t", "error", "ratio", "mass_error", "coverage",
        "coverage50", "coverage80", "coverage95", "train_seconds", "chosen"}`` (coverage =
        95 %), one
        per (n, model, t); model ``"linear"`` is the peer.
    """
    from .guides import guide_for_new_sequences
    from .predict import forecast
    from .specs import ModelChoice, load_guide, load_model_spec

    train_c, test_c = as_counts(train), as_counts(test)
    n_all, T, B = train_c.shape
    n_test, T_test, B_test = test_c.shape
    if B_test != B:
        raise ValueError(f"test: expected {B} bins (as train), found {B_test}")
    if T_test <= T:
        raise ValueError(f"test: expected more snapshots than train ({T}) to forecast, "
                         f"found {T_test}")
    sizes = sorted({int(n) for n in sizes if 1 <= int(n) <= n_all})
    if not sizes:
        raise ValueError(f"sizes: expected integers in [1, {n_all}] (training sequences)")
    if eval_steps is None:
        eval_steps = sorted({int(round(T - 1 + f * (T_test - T))) for f in (0.25, 0.5, 0.75, 1)})
    eval_steps = [t for t in eval_steps if T <= t < T_test]
    if oracle is not None and np.shape(oracle) != (n_test, T_test, B):
        raise ValueError(f"oracle: expected shape {(n_test, T_test, B)}, found "
                         f"{np.shape(oracle)}")
    train_f = (train_c / train_c.sum(-1, keepdim=True)).numpy()
    truth = (test_c / test_c.sum(-1, keepdim=True)).numpy()

    def linear_errors(n):
        A = metrics.fit_linear_peer(train_f[:n])
        path = metrics.rollout_linear(A, truth[:, T - 1], T_test - T)
        return {t: float(metrics.l1_error(path[:, t - T], truth[:, t])) for t in eval_steps}

    if oracle is not None:
        norm = {t: float(metrics.l1_error(oracle[:, t], truth[:, t])) for t in eval_steps}
    else:
        norm = linear_errors(n_all)
    guide_spec = load_guide(guide)
    svi = dict(guide_spec.svi)
    if steps is not None:
        svi["steps"] = steps
    base = load_model_spec(model, allow_choice=True)  # read once
    rows = []
    for n in sizes:
        for t, err in linear_errors(n).items():
            rows.append({"n": n, "model": "linear", "t": t, "error": err,
                         "ratio": err / norm[t], "mass_error": 0.0, "coverage": float("nan"),
                         "coverage50": float("nan"), "coverage80": float("nan"),
                         "coverage95": float("nan"), "train_seconds": 0.0, "chosen": "linear"})
        chosen = base.choose(train_c[:n]) if isinstance(base, ModelChoice) else base
        for name, spec in _variants(chosen, base.name, with_no_vo):
            cg = spec.build(B)
            inference = SVIInference(cg, guide=guide_spec.factory, seed=seed,
                                     progress=progress, **svi).fit(train_c[:n])
            new = guide_for_new_sequences(inference, test_c[:, :T])
            f = forecast(cg, new, test_c[:, :T], T_test - T, num_samples=num_samples, seed=seed)
            future = slice(T, T_test)
            mass = float(metrics.mass_error(f.mean[:, future]).max())
            cov = {f"coverage{int(100 * level)}": metrics.coverage(
                lo[:, future], hi[:, future], truth[:, future])
                for level, (lo, hi) in f.intervals.items()}
            for t in eval_steps:
                err = float(metrics.l1_error(f.mean[:, t], truth[:, t]))
                rows.append({"n": n, "model": name, "t": t, "error": err,
                             "ratio": err / norm[t], "mass_error": mass,
                             "coverage": cov["coverage95"], **cov,
                             "train_seconds": inference.fit_seconds, "chosen": chosen.name})
    return rows


def _pivot(rows):
    steps = sorted({r["t"] for r in rows})
    keys = []
    for r in rows:
        if (r["n"], r["model"]) not in keys:
            keys.append((r["n"], r["model"]))
    table = []
    for n, name in keys:
        sel = {r["t"]: r for r in rows if r["n"] == n and r["model"] == name}
        first = next(iter(sel.values()))
        row = {"n": n, "model": name, "chosen": first["chosen"]}
        row.update({f"ratio@{t}": sel[t]["ratio"] for t in steps})
        row.update({"mass_error": first["mass_error"],
                    "cov50/80/95": " / ".join(f"{first[k]:.2f}" for k in
                                              ("coverage50", "coverage80", "coverage95")),
                    "train_s": first["train_seconds"]})
        table.append(row)
    return table


def plot_learning_curve(rows, ax=None):
    """Worst ratio over the scored steps against ``n`` (log-log), one line per model."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        ns = sorted({r["n"] for r in rows if r["model"] == name})
        worst = [max(r["ratio"] for r in rows if r["model"] == name and r["n"] == n) for n in ns]
        ax.plot(ns, worst, "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("training sequences n")
    ax.set_ylabel("worst forecast error / reference")
    ax.legend(fontsize=8)
    return ax


def write_curve(rows, out_dir, reference: str = "the linear map on all sequences") -> list[Path]:
    """``curve.md`` (table), ``curve.csv`` (rows) and ``curve.png`` (figure) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _pivot(rows)
    keys = list(table[0])
    lines = [f"ratio@t = forecast error at test snapshot t / error of {reference}; "
             "mass_error = max |1 - Σ X| of the forecast mean; cov50/80/95 = fraction of "
             "observed fractions inside the central 50/80/95 % bands (nominal 0.50/0.80/0.95); "
             "train_s = SVI wall time.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in table:
        lines.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])
                                       for k in keys) + " |")
    md = out / "curve.md"
    md.write_text("\n".join(lines) + "\n")
    csv = out / "curve.csv"
    cols = list(rows[0])
    csv.write_text("\n".join([",".join(cols)] + [",".join(str(r[c]) for c in cols)
                                                  for r in rows]) + "\n")
    ax = plot_learning_curve(rows)
    png = out / "curve.png"
    ax.figure.tight_layout()
    ax.figure.savefig(png, dpi=120)
    plt.close(ax.figure)
    return [md, csv, png]
