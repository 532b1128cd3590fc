"""Scale of SVI (issue 13): step time and peak memory against the number of sequences, and
the steps minibatch SVI needs to reach the full-batch forecast accuracy.

Each configuration runs in its own process (peak RSS is per process), on one thread: the
default model on synthetic counts of a known linear CG law (10 snapshots x 25 bins, 250,000
particles), full batch or minibatches of ``--batch`` sequences. ``python
benchmarks/bench_scale.py [--sizes 64,1000,10000,100000] [--batch 64] [--accuracy 1000]
[--device cuda] [--out benchmarks/scale.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

KERNEL = {0: 0.8, 1: 0.12, -1: 0.08}  # the CG law: a biased random walk on periodic bins


def _step(x: np.ndarray) -> np.ndarray:
    k = np.zeros(x.shape[-1])
    for shift, p in KERNEL.items():
        k[shift] = p
    x = np.real(np.fft.ifft(np.fft.fft(x, axis=-1) * np.fft.fft(k), axis=-1))
    x = np.clip(x, 1e-12, None)
    return x / x.sum(-1, keepdims=True)


def synthetic(n_seq: int, n_times: int = 10, n_bins: int = 25, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.dirichlet(np.full(n_bins, 20.0), size=n_seq)
    out = np.empty((n_seq, n_times, n_bins), dtype=np.int64)
    for t in range(n_times):
        out[:, t] = rng.multinomial(250_000, x)
        x = _step(x)
    return out


def child(n_seq: int, batch: int | None, steps: int, device: str) -> dict:
    from cgpyro.inference import SVIInference
    from cgpyro.specs import load_model

    counts = synthetic(n_seq)
    model = load_model("physics", n_bins=25)
    times, rss_at = [], {}

    def tick(step, loss, inference):
        times.append(time.perf_counter())
        if step in (1, steps):
            rss_at[step] = _rss_mb()

    inference = SVIInference(model, steps=steps, batch_size=batch, progress=False,
                             device=device, callbacks=[tick])
    t0 = time.perf_counter()
    inference.fit(counts)
    total = time.perf_counter() - t0
    dt = np.diff(times[steps // 2:])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    # parameters and their two Adam moments: what has to grow with the data
    state = 3 * sum(p.numel() * p.element_size() for p in inference.guide.parameters()) / 2**20
    return {"sequences": n_seq, "batch": batch or n_seq, "device": device,
            "ms_per_step": 1e3 * float(np.median(dt)), "setup_s": times[0] - t0,
            "fit_s": total, "peak_rss_mb": rss, "rss_step1_mb": rss_at[1],
            "rss_end_mb": rss_at[steps], "state_mb": state, "peak_gpu_mb": gpu}


def _rss_mb() -> float:
    """Resident memory now (Linux), MB."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def forecast_error(model, theta, counts: torch.Tensor) -> float:
    """RMSE of the bin fractions of held-out sequences ``(n, T, B)`` rolled by the mean
    transition from their first snapshot, over every later snapshot and bin."""
    frac = counts / counts.sum(-1, keepdim=True)
    totals = counts[:, 0].sum(-1)
    x, prev, err = frac[:, 0], frac[:, 0], []
    with torch.no_grad():
        for t in range(1, counts.shape[1]):
            x, prev = model.transition_mean(x, theta, totals, x_prev=prev), x
            err.append(((x - frac[:, t]) ** 2).mean())
    return float(torch.stack(err).mean().sqrt())


def accuracy_child(n_seq: int, batch: int | None, steps: int, every: int, model_name: str
                   ) -> dict:
    """Forecast error of 200 held-out sequences against the SVI step, from a cold start (no
    least-squares warm start: SVI has to learn the drift)."""
    from cgpyro.inference import SVIInference, as_counts
    from cgpyro.specs import load_model

    data = synthetic(n_seq + 200)
    test = as_counts(data[n_seq:])
    model = load_model(model_name, n_bins=25)
    curve, spent = [], [0.0]
    t0 = time.perf_counter()

    def record(step, loss, inference):
        if step % every == 0 or step == steps:
            t = time.perf_counter()
            error = forecast_error(model, inference.guide.theta_map(), test)
            curve.append((step, error, t - t0 - spent[0]))
            spent[0] += time.perf_counter() - t

    SVIInference(model, steps=steps, batch_size=batch, progress=False, warm_start=False,
                 callbacks=[record]).fit(data[:n_seq])
    frac = test / test.sum(-1, keepdim=True)
    x, floor = frac[:, 0].numpy(), []
    for t in range(1, test.shape[1]):  # the true law rolled from the same noisy start
        x = _step(x)
        floor.append(((x - frac[:, t].numpy()) ** 2).mean())
    return {"sequences": n_seq, "batch": batch or n_seq, "steps": steps, "curve": curve,
            "model": model_name,
            "floor": float(np.sqrt(np.mean(floor)))}


def run_child(args: list, extra: list) -> dict | None:
    out = subprocess.run([sys.executable, __file__, *extra, "--_child", json.dumps(args)],
                         capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def accuracy_table(full: dict, mini: dict) -> str:
    target = full["curve"][-1][1]
    lines = [f"Held-out forecast error (RMSE of bin fractions, 200 new sequences, 9 steps "
             f"rolled from their first snapshot; floor = the true law from the same start: "
             f"{full['floor']:.3e}), {full['sequences']} training sequences, model "
             f"{full['model']} trained by SVI from a cold start (no warm start).", "",
             "| batch | step | error | error / full-batch end | wall s (training only) |",
             "|---|---|---|---|---|"]
    for run in (full, mini):
        marks = {len(run["curve"]) - 1}
        marks |= {i for i, (_, e, _) in enumerate(run["curve"]) if e <= target}
        first = min((i for i, (_, e, _) in enumerate(run["curve"]) if e <= target), default=None)
        picks = sorted({0, len(run["curve"]) // 4, len(run["curve"]) // 2, first or 0,
                        len(run["curve"]) - 1})
        for i in picks:
            step, error, wall = run["curve"][i]
            mark = " (first <= full-batch end)" if i == first and run is mini else ""
            lines.append(f"| {run['batch']} | {step}{mark} | {error:.4e} | "
                         f"{error / target:.3f} | {wall:.1f} |")
    first = next(((s, w) for s, e, w in mini["curve"] if e <= target), None)
    within = next(((s, w) for s, e, w in mini["curve"] if e <= 1.01 * target), None)
    lines += ["", f"Full batch ({full['steps']} steps) ends at {target:.4e} "
              f"({target / full['floor']:.3f} x the floor) after {full['curve'][-1][2]:.0f} s. "
              f"Batch {mini['batch']} reaches within 1 % of it at step "
              f"{within[0] if within else 'never'}"
              + (f" ({within[1]:.0f} s)" if within else "")
              + f" and at or below it at step {first[0] if first else 'never'}"
              + (f" ({first[1]:.0f} s)" if first else "")
              + f"; it ends at {mini['curve'][-1][1]:.4e} after {mini['steps']} steps "
              f"({mini['curve'][-1][2]:.0f} s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="64,1000,10000,100000")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--accuracy", type=int, default=1000,
                   help="sequences of the steps-to-accuracy run (0: skip)")
    p.add_argument("--accuracy-steps", default="1000,4000",
                   help="steps of the full-batch and the minibatch run")
    p.add_argument("--accuracy-model", default="particles_paper",
                   help="model of the steps-to-accuracy run (the default physics model's "
                        "drift is fitted in closed form before SVI: nothing to reach)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        torch.set_num_threads(1)
        args = json.loads(a._child)
        if args[0] == "accuracy":
            print(json.dumps(accuracy_child(*args[1:])))
        else:
            n, b = args
            print(json.dumps(child(n, b, a.steps, a.device)))
        return
    rows = []
    for n in [int(s) for s in a.sizes.split(",") if s]:
        for b in ([None, a.batch] if n <= 1000 else [a.batch]):
            if b is not None and b >= n:
                continue
            row = run_child([n, b], ["--steps", str(a.steps), "--device", a.device])
            if row:
                rows.append(row)
                print(row, flush=True)
    lines = ["| sequences | batch | ms/step | setup s | fit s | peak RSS MB | RSS after step 1 "
             "MB | RSS at the end MB | params + Adam MB | peak GPU MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sequences']} | {r['batch']} | {r['ms_per_step']:.1f} | "
              f"{r['setup_s']:.1f} | {r['fit_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['rss_step1_mb']:.0f} | {r['rss_end_mb']:.0f} | "
              f"{r['state_mb']:.0f} | {r['peak_gpu_mb']:.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    if a.accuracy:
        full_steps, mini_steps = (int(s) for s in a.accuracy_steps.split(","))
        every = max(full_steps // 40, 1)
        common = [every, a.accuracy_model]
        full = run_child(["accuracy", a.accuracy, None, full_steps, *common], [])
        mini = run_child(["accuracy", a.accuracy, a.batch, mini_steps, *common], [])
        if full and mini:
            text += "\n" + accuracy_table(full, mini)
    print(text)
    if a.out:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        a.out.write_text("# SVI scale (benchmarks/bench_scale.py)\n\n" + __doc__.split("\n\n")[1]
                         + f"\n\n{a.steps} steps; ms/step = median over the second half; setup "
                         "= data checks, warm start and guide before the first step; device "
                         f"{a.device}. `uptime` at the end: {uptime}\n\n" + text)


if __name__ == "__main__":
    main()
