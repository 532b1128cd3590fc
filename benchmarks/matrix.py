"""Robustness matrix of the default model (issue 11): one axis of the reference system at a time.

Cells (``data/matrix_*.toml`` plus the paper's ``particles_paper``): bins 16/25/64/128, Δt of
800/1,600/3,200 micro steps, transport 1x/3x faster, 1e4/2.5e5/1e6 particles; for each,
n = 1, 4, 64 training sequences ("fourier" initial conditions, 10 snapshots) and 16 held-out
"bumps" sequences of 41 snapshots forecast from their first 10. Columns: error / oracle floor
at 15/20/25/35 Δt for the model and the least-squares linear map fitted on the same n sequences,
mass error, 95 % coverage, train time.
``python benchmarks/matrix.py [--cells a,b] [--sizes 1,4,64]``
appends rows to ``--jsonl`` and rewrites ``--out`` (markdown) from all rows there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cgpyro.curve import learning_curve
from cgpyro.datasets import load_dataset_spec
from cgpyro.reference import oracle_fractions
from cgpyro.systems import simulate_dataset

CELLS = ["particles_paper", "matrix_bins16", "matrix_bins64", "matrix_bins128", "matrix_dt800",
         "matrix_dt3200", "matrix_fast", "matrix_n1e4", "matrix_n1e6"]
TIMES = [15, 20, 25, 35]


def cell_data(name: str, seed: int):
    spec = load_dataset_spec(name)
    params = dict(spec.system_params)
    bins = spec.sampling["n_bins"]
    kw = {k: params[k] for k in ("n_particles", "n_sites", "p_left", "p_right", "micro_steps")
          if k in params}
    train, _ = simulate_dataset(64, 9, n_bins=bins, seed=seed, family="fourier", **kw)
    test, sim = simulate_dataset(16, 40, n_bins=bins, seed=seed + 1000, family="bumps", **kw)
    oracle = np.full(test.counts.shape, np.nan)
    horizons = np.arange(10, test.n_times) - 9
    oracle[:, 10:] = oracle_fractions(sim.system, sim.occupancy[:, 9], horizons, bins)
    return train, test, oracle, bins


def to_markdown(rows: list[dict]) -> str:
    head = ("| cell | bins | n | model | " + " | ".join(f"ratio@{t}" for t in TIMES)
            + " | linear " + " / ".join(str(t) for t in TIMES) + " | mass | coverage | train_s |")
    out = [head, "|" + "---|" * (8 + len(TIMES))]
    for r in rows:
        model = r["model"] + (f" -> {r['chosen']}" if r.get("chosen", r["model"]) != r["model"]
                              else "")
        out.append(f"| {r['cell']} | {r['bins']} | {r['n']} | {model} (seed {r['seed']}) | "
                   + " | ".join(f"{r['ratio'][str(t)]:.3f}" for t in TIMES) + " | "
                   + " / ".join(f"{r['linear'][str(t)]:.3g}" for t in TIMES)
                   + f" | {r['mass']:.1e} | {r['coverage']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cells", default=",".join(CELLS))
    p.add_argument("--sizes", default="1,4,64")
    p.add_argument("--model", default="auto")
    p.add_argument("--seeds", default="0")
    p.add_argument("--jsonl", type=Path, default=Path("benchmarks/matrix.jsonl"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/matrix.md"))
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    for seed in [int(s) for s in a.seeds.split(",")]:
        for cell in a.cells.split(","):
            train, test, oracle, bins = cell_data(cell, seed)
            rows = learning_curve(train, test, sizes, a.model, eval_steps=TIMES, oracle=oracle,
                                  with_no_vo=False, seed=seed)
            for n in sizes:
                sel = [r for r in rows if r["n"] == n]
                mod = {str(r["t"]): r for r in sel if r["model"] != "linear"}
                lin = {str(r["t"]): r["ratio"] for r in sel if r["model"] == "linear"}
                first = next(iter(mod.values()))
                rec = {"cell": cell, "bins": bins, "n": n, "model": a.model, "seed": seed,
                       "ratio": {t: r["ratio"] for t, r in mod.items()}, "linear": lin,
                       "mass": first["mass_error"], "coverage": first["coverage"],
                       "train_s": first["train_seconds"], "chosen": first["chosen"],
                       "when": time.strftime("%F %T")}
                with a.jsonl.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
    rows = [json.loads(line) for line in a.jsonl.read_text().splitlines() if line.strip()]
    a.out.write_text("# Robustness matrix (issue 11)\n\n" + __doc__.split("\n\n", 1)[1]
                     + f"\nMachine: {platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} cores, torch {torch.__version__}, one thread per run "
                     "(several runs shared the 2 cores: train_s is inflated).\n\n"
                     + to_markdown(rows))


if __name__ == "__main__":
    main()
