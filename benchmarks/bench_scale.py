"""Scale of SVI (issue 13): step time and peak memory against the number of sequences.

Each configuration runs in its own process (peak RSS is per process): the default model on
synthetic counts of a known linear CG law (10 snapshots x 25 bins, 250,000 particles), full
batch or minibatches of ``--batch`` sequences. ``python benchmarks/bench_scale.py
[--sizes 64,1000,10000] [--device cuda] [--out benchmarks/scale.md]``.
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


def synthetic(n_seq: int, n_times: int = 10, n_bins: int = 25, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = np.zeros(n_bins)
    k[[0, 1, -1]] = [0.8, 0.12, 0.08]
    x = rng.dirichlet(np.full(n_bins, 20.0), size=n_seq)
    out = np.empty((n_seq, n_times, n_bins), dtype=np.int64)
    for t in range(n_times):
        out[:, t] = rng.multinomial(250_000, x)
        x = np.real(np.fft.ifft(np.fft.fft(x, axis=-1) * np.fft.fft(k), axis=-1))
        x = np.clip(x, 1e-12, None)
        x /= x.sum(-1, keepdims=True)
    return out


def child(n_seq: int, batch: int | None, steps: int, device: str) -> dict:
    from cgpyro.inference import SVIInference
    from cgpyro.specs import load_model

    counts = synthetic(n_seq)
    model = load_model("physics", n_bins=25)
    times = []
    inference = SVIInference(model, steps=steps, batch_size=batch, progress=False,
                             device=device,
                             callbacks=[lambda *a: times.append(time.perf_counter())])
    t0 = time.perf_counter()
    inference.fit(counts)
    total = time.perf_counter() - t0
    dt = np.diff(times[steps // 2:])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return {"sequences": n_seq, "batch": batch or n_seq, "device": device,
            "ms_per_step": 1e3 * float(np.median(dt)), "fit_s": total,
            "peak_rss_mb": rss, "peak_gpu_mb": gpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="64,1000,10000")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        n, b = json.loads(a._child)
        torch.set_num_threads(1)
        print(json.dumps(child(n, b, a.steps, a.device)))
        return
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        for b in ([None, a.batch] if n <= 1000 else [a.batch]):
            if b is not None and b >= n:
                continue
            out = subprocess.run([sys.executable, __file__, "--_child", json.dumps([n, b]),
                                  "--steps", str(a.steps), "--device", a.device],
                                 capture_output=True, text=True, env={**os.environ,
                                                                      "OMP_NUM_THREADS": "1"})
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = ["| sequences | batch | device | ms/step | fit s | peak RSS MB | peak GPU MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sequences']} | {r['batch']} | {r['device']} | {r['ms_per_step']:.1f} | "
              f"{r['fit_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_gpu_mb']:.0f} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text("# SVI scale (benchmarks/bench_scale.py)\n\n" + __doc__.split("\n\n")[1]
                         + f"\n\n{a.steps} steps; ms/step = median over the second half.\n\n"
                         + text)


if __name__ == "__main__":
    main()
