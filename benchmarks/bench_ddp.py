"""Data-parallel training (issue 13, item 4): ``Run.fit(nproc=N)`` (``cgpyro train --nproc N``)
against one process.

Synthetic counts of a known linear CG law (``bench_scale.synthetic``: 10 snapshots x 25 bins),
full batch, the default model, one thread per process. A callback in rank 0 (this process)
stamps every step: ms/step is the median over the second half; setup is the time from
``fit`` to the end of the first step (every process runs the model's setup on all the data:
empirical Bayes, warm start). The final loss is the mean of the last 100 steps per (sequence,
time). ``python benchmarks/bench_ddp.py [--sequences 1000] [--nproc 1,2] [--steps 300]
[--out benchmarks/ddp.md]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import synthetic  # noqa: E402


def train(dataset, out: Path, steps: int, nproc: int) -> tuple[float, float, float]:
    from cgpyro.run import Run

    stamps = []
    start = time.perf_counter()
    with Run.create(out, dataset, steps=steps) as run:
        inference = run.fit(progress=False, nproc=nproc,
                            callbacks=[lambda step, loss, inf: stamps.append(time.perf_counter())])
    times = np.diff(stamps)[len(stamps) // 2:]
    loss = np.mean(inference.loss_history[-100:]) / np.prod(dataset.counts.shape[:2])
    return float(np.median(times)) * 1e3, stamps[0] - start, float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/ddp.md"))
    args = parser.parse_args()
    from cgpyro import data as cgdata

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = cgdata.Dataset(counts=synthetic(args.sequences))
        for nproc in (int(n) for n in args.nproc.split(",")):
            start = time.perf_counter()
            ms, setup, loss = train(dataset, Path(tmp) / f"run{nproc}", args.steps, nproc)
            rows.append((nproc, ms, setup, time.perf_counter() - start, loss))
            print(rows[-1], flush=True)
    base = rows[0][1]
    lines = [
        "# Data-parallel training (benchmarks/bench_ddp.py)", "",
        __doc__.split("\n\n", 1)[1].strip(), "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average at the end {os.getloadavg()[0]:.2f}. "
        f"{args.sequences} sequences x 10 snapshots x 25 bins, {args.steps} steps.", "",
        "| processes | ms/step | speed-up | setup s | fit s | final loss per (sequence, time) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {ms:.1f} | {base / ms:.2f} | {setup:.1f} | {whole:.1f} | {loss:.2f} |"
              for n, ms, setup, whole, loss in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
