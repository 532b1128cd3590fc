"""Aggregate per-seed learning curves (``curve.md`` of benchmarks/curves.py) into one table:
median [min-max] over seeds. ``python benchmarks/curves_summary.py benchmarks/curves/seeds``."""
import re, sys, statistics
from pathlib import Path
root = Path(sys.argv[1]); seeds = sorted(root.glob("physics_bins25_seed*"))
rows = {}
for d in seeds:
    for line in (d / "curve.md").read_text().splitlines():
        m = re.match(r"\| (\d+) \| (\w+) \| ([^|]+)\| ([^|]+)\| ([^|]+)\| ([^|]+)\| ([^|]+)\| ([^|]+)\|", line)
        if not m: continue
        n, model = int(m[1]), m[2]
        vals = [float(m[i]) for i in range(3, 7)]
        cov = [float(x) for x in m[8].split("/")] if "nan" not in m[8] else None
        rows.setdefault((n, model), []).append((vals, float(m[7]), cov))
print(f"Seeds: {len(seeds)} ({', '.join(d.name[-5:] for d in seeds)}). Ratio to the oracle floor at 15 / 20 / 25 / 35 Δt: median [min–max] over seeds; coverage: median [min–max] of the 95 % band (50 / 80 % medians beside).\n")
print("| n | model | ratio@15 | ratio@20 | ratio@25 | ratio@35 | worst over t, per seed | cov95 | cov50 / cov80 (median) |")
print("|---|---|---|---|---|---|---|---|---|")
for (n, model), rs in sorted(rows.items()):
    cells = []
    for i in range(4):
        v = [r[0][i] for r in rs]
        cells.append(f"{statistics.median(v):.3g} [{min(v):.3g}–{max(v):.3g}]")
    worst = " / ".join(f"{max(r[0]):.3g}" for r in rs)
    if rs[0][2]:
        c95 = [r[2][2] for r in rs]; c50 = statistics.median(r[2][0] for r in rs); c80 = statistics.median(r[2][1] for r in rs)
        cov = f"{statistics.median(c95):.2f} [{min(c95):.2f}–{max(c95):.2f}]"; cov2 = f"{c50:.2f} / {c80:.2f}"
    else:
        cov = cov2 = "–"
    print(f"| {n} | {model} | " + " | ".join(cells) + f" | {worst} | {cov} | {cov2} |")
