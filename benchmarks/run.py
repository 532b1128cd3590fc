"""``make bench``: every benchmark, one results table (benchmarks/results.md)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_model  # noqa: E402
import bench_simulate  # noqa: E402

LEGEND = """
Columns: `ratio@t` = mean L1 error of the posterior-mean bin fractions at t Δt over the 16
held-out sequences / the oracle floor (exact lattice expectation from the true FG state at
T = 9); `linear@t` the same for the least-squares linear peer; `mass_*` = max over held-out
sequences and steps of |1 - Σ_j E[X_j]| (inferred: t ≤ 9, forecast: 10..40, 1000 samples);
`coverage_*` = fraction of (sequence, step, bin) observed fractions inside the 95 % band of
the reconstructed FG fractions; `train_s` = SVI wall time (2,000 steps, one torch thread,
defaults of `cgpyro train`), `total_s` includes simulation, held-out state inference and
forecasts. `physics` is what the default model `auto` trains on these data (σ 0.49 bins per
snapshot); `particles_paper` the paper's exact setting
(2 x 25 ReLU drift, learned σ_r). Held-out sequences here come from the training family;
out-of-family tests, learning curves, the robustness matrix, peers, the interacting system
and scale have their own tables: matrix.md, curves/, peers.md, exclusion.md, scale.md,
simulate.md (separate make targets, see the Makefile).
"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} (CPU threads {torch.get_num_threads()})")


def table(rows: list[dict], floatfmt: str = "{:.3g}") -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(floatfmt.format(r[k]) if isinstance(r[k], float)
                                     else str(r[k]) for k in keys) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    if "OMP_NUM_THREADS" not in os.environ:  # as the CLI: one torch thread (see cgpyro/cli.py)
        torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.md"))
    parser.add_argument("--quick", action="store_true", help="one seed, fewer repeats")
    args = parser.parse_args()
    seeds = (0,) if args.quick else (0, 1, 2)
    sections = [f"# cgpyro benchmarks\n\nMachine: {machine()}\n"]
    sections.append("## FG data generation (paper dataset: 64 x 41 snapshots x 250,000 "
                    "particles x 25 bins)\n\n" + bench_simulate.to_markdown(
                        bench_simulate.run(quick=args.quick)) + "\n")
    sections.append("## SVI step cost (64 sequences x 10 snapshots x 25 bins, paper network)\n\n"
                    + table(bench_model.step_cost()))
    sections.append("## Whole process, 1,500 SVI steps (64 x 10 x 25; start, imports, "
                    "empirical Bayes, training, files)\n\n" + table(bench_model.whole_process()))
    sections.append("## Forecast accuracy (held-out 16 sequences; ratio = error / oracle floor; "
                    "linear = least-squares linear peer)\n\n"
                    + table(bench_model.accuracy(seeds=seeds)) + LEGEND)
    args.out.write_text("\n".join(sections))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
