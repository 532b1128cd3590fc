"""Data-parallel training (issue 13, item 4): ``cgpyro train --nproc N`` against one process.

Synthetic counts of a known linear CG law (``bench_scale.synthetic``: 10 snapshots x 25 bins),
full batch, the default model. Each configuration is a whole ``cgpyro train`` process timed
twice, with ``--steps`` S1 and S2: the time per step is the difference over S2 - S1 (so the
setup, which every process repeats on all the data, cancels); the setup is the rest. The final
loss is the mean of the last 100 steps per (sequence, time).
``python benchmarks/bench_ddp.py [--sequences 1000] [--nproc 1,2] [--steps 50,250]
[--out benchmarks/ddp.md]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import synthetic  # noqa: E402


def train(data: Path, out: Path, steps: int, nproc: int) -> float:
    start = time.perf_counter()
    cli = str(Path(sys.executable).parent / "cgpyro")
    subprocess.run([cli, "train", "--data", str(data), "--out", str(out), "--steps", str(steps),
                    "--nproc", str(nproc), "--quiet"],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--steps", default="50,250")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/ddp.md"))
    args = parser.parse_args()
    from cgpyro import data as cgdata

    s1, s2 = (int(s) for s in args.steps.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.npz"
        counts = synthetic(args.sequences)
        cgdata.save(cgdata.Dataset(counts=counts), data)
        for nproc in (int(n) for n in args.nproc.split(",")):
            t1 = train(data, Path(tmp) / f"a{nproc}", s1, nproc)
            t2 = train(data, Path(tmp) / f"b{nproc}", s2, nproc)
            payload = torch.load(Path(tmp) / f"b{nproc}" / "checkpoint.pt", weights_only=False)
            loss = np.mean(payload["loss_history"][-100:]) / counts.shape[0] / counts.shape[1]
            per_step = (t2 - t1) / (s2 - s1)
            rows.append((nproc, per_step * 1e3, t1 - s1 * per_step, t2, loss))
            print(rows[-1], flush=True)
    base = rows[0][1]
    lines = [
        "# Data-parallel training (benchmarks/bench_ddp.py)", "",
        __doc__.split("\n\n", 1)[1].strip(), "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average at the end {os.getloadavg()[0]:.2f}. "
        f"{args.sequences} sequences x 10 snapshots x 25 bins, steps {s1} and {s2}.", "",
        "| processes | ms/step | speed-up | setup + start s | whole process s "
        f"({s2} steps) | final loss per (sequence, time) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {ms:.1f} | {base / ms:.2f} | {setup:.1f} | {whole:.1f} | {loss:.2f} |"
              for n, ms, setup, whole, loss in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
