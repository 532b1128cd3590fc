#!/usr/bin/env bash
# GPU benchmarks (issue 13): run on a machine with a CUDA card, from the repository root, after
# `make install` with a CUDA build of torch. Writes benchmarks/gpu.md beside the CPU tables
# (scale.md, exclusion.md), naming the card. Each step is bounded so the whole script fits in
# about 10 minutes on one card.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/gpu.md}
CARD=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "unknown")
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch.cuda.is_available() is False: install a CUDA build of torch')"
{
  echo "# GPU benchmarks"
  echo
  echo "Card: ${CARD}; $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
  echo
  echo "## SVI step time and memory (benchmarks/bench_scale.py --device cuda)"
  echo
  timeout 300 "$PY" benchmarks/bench_scale.py --device cuda --sizes 64,1000,10000 --steps 200 | sed -n '/^| sequences/,$p'
  echo
  echo "## Exclusion micro-stepping on the GPU (benchmarks/bench_exclusion.py, simulation only)"
  echo
  timeout 300 "$PY" - <<'PY'
import time, torch
from cgpyro.exclusion import simulate_exclusion_dataset
for n in (64, 1024):
    torch.cuda.synchronize(); t = time.perf_counter()
    simulate_exclusion_dataset(n_sequences=n, n_steps=40, n_bins=25, seed=0, device="cuda")
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    print(f"- {n} sequences x 41 snapshots (200 micro steps each, 1,280 sites): {dt:.1f} s, "
          f"{n * 40 * 200 * 1280 / dt:.3g} site-updates/s")
PY
  echo
  echo "## End to end: cgpyro train / predict --device cuda"
  echo
  D=$(mktemp -d)
  "$PY" -m cgpyro.cli simulate --sequences 16 --steps 9 --particles 20000 --out "$D/d.npz" --quiet >/dev/null
  /usr/bin/time -f "train: %e s" "$PY" -m cgpyro.cli train --data "$D/d.npz" --steps 500 --device cuda --out "$D/run" --quiet 2>&1 | tail -1
  /usr/bin/time -f "predict: %e s" "$PY" -m cgpyro.cli predict --run "$D/run" --data "$D/d.npz" --horizon 10 --device cuda --out "$D/p.npz" 2>&1 | tail -1
} | tee "$OUT"
