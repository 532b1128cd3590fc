"""Aggregate per-seed learning curves (``curve.md`` of benchmarks/curves.py) into one table:
median [min-max] over seeds. ``python benchmarks/curves_summary.py benchmarks/curves/seeds``."""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

ROW = re.compile(r"\| (\d+) \| (\w+) \| ([^|]+)\| ([^|]+)\| ([^|]+)\| ([^|]+)\| ([^|]+)\| "
                 r"([^|]+)\|")


def spread(values, fmt: str = ".3g") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def main(root: Path) -> None:
    seeds = sorted(root.glob("physics_bins25_seed*"))
    rows: dict = {}
    for d in seeds:
        for line in (d / "curve.md").read_text().splitlines():
            m = ROW.match(line)
            if not m:
                continue
            vals = [float(m[i]) for i in range(3, 7)]
            cov = [float(x) for x in m[8].split("/")] if "nan" not in m[8] else None
            rows.setdefault((int(m[1]), m[2]), []).append((vals, float(m[7]), cov))
    print(f"Seeds: {len(seeds)} ({', '.join(d.name[-5:] for d in seeds)}). Ratio to the oracle "
          "floor at 15 / 20 / 25 / 35 Δt: median [min–max] over seeds; coverage: median "
          "[min–max] of the 95 % band (50 / 80 % medians beside).\n")
    print("| n | model | ratio@15 | ratio@20 | ratio@25 | ratio@35 | worst over t, per seed "
          "| cov95 | cov50 / cov80 (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (n, model), rs in sorted(rows.items()):
        cells = [spread([r[0][i] for r in rs]) for i in range(4)]
        worst = " / ".join(f"{max(r[0]):.3g}" for r in rs)
        if rs[0][2]:
            cov = spread([r[2][2] for r in rs], ".2f")
            cov2 = (f"{statistics.median(r[2][0] for r in rs):.2f} / "
                    f"{statistics.median(r[2][1] for r in rs):.2f}")
        else:
            cov = cov2 = "–"
        print(f"| {n} | {model} | " + " | ".join(cells) + f" | {worst} | {cov} | {cov2} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
