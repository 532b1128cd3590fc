"""Speed of generating the paper's dataset (64 sequences x 41 snapshots x 250,000 particles,
25 bins) with the exact coarse-step sampler, beside the alternatives it was chosen over.

Rows that could not be run at full size are measured on a reduced size and extrapolated
linearly in the number of (particle, step) pairs; their note says "extrapolated".
``particle_steps_per_s`` counts micro particle-steps (1,600 per coarse step), so every row is
comparable with naive micro-stepping.

``--scale`` runs the simulator at scale instead (issue 13): 10**7 particles per sequence and
10**4 sequences, through ``ParticleSystem.simulate_binned`` (chunks of sequences, blocks of
particles), each row in a fresh process so its peak RSS is its own; it writes
``benchmarks/simulate.md`` (with ``--write``).

Usage: ``python benchmarks/bench_simulate.py [--quick] [--scale [--write]]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cgpyro.systems import ParticleSystem, simulate_dataset

PAPER = {"n_sequences": 64, "n_steps": 40, "n_particles": 250_000, "n_bins": 25}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_mb(fn: Callable[[], object]) -> float:
    """Peak traced heap (numpy buffers included) of one call, in MB; run apart from timing."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def naive_micro_steps(system: ParticleSystem, n_micro: int, seed: int = 0) -> np.ndarray:
    """Move every particle at every micro step (vectorized over particles); final positions."""
    rng = np.random.default_rng(seed)
    n = system.n_sites
    pos = rng.integers(0, n, size=system.n_particles)
    u = np.empty(system.n_particles)
    for _ in range(n_micro):
        rng.random(out=u)
        pos += u < system.p_right  # right with p_r
        pos -= u >= 1.0 - system.p_left  # left with p_l
        pos %= n
    return pos


def two_binomials_per_particle(system: ParticleSystem, n_coarse: int, seed: int = 0) -> None:
    """Exact per-particle alternative: moves ~ Bin(m, p_l + p_r), rights ~ Bin(moves, .)."""
    rng = np.random.default_rng(seed)
    m, p_move = system.micro_steps, system.p_left + system.p_right
    pos = rng.integers(0, system.n_sites, size=system.n_particles)
    for _ in range(n_coarse):
        moves = rng.binomial(m, p_move, size=pos.size)
        rights = rng.binomial(moves, system.p_right / p_move)
        pos = (pos + 2 * rights - moves) % system.n_sites


def per_site_multinomial(system: ParticleSystem, n_coarse: int, seed: int = 0) -> None:
    """Exact per-site alternative: Multinomial(n_i, K) per site (numpy's conditional binomials,
    kernel sorted by decreasing probability so each site stops early), then shift and add."""
    rng = np.random.default_rng(seed)
    n = system.n_sites
    kernel = system.kernel(1)
    order = np.argsort(-kernel)
    occ = rng.multinomial(system.n_particles, np.full(n, 1.0 / n))
    dest = (np.arange(n)[:, None] + order[None, :]) % n  # (site, ranked displacement)
    for _ in range(n_coarse):
        moved = rng.multinomial(occ, kernel[order])
        occ = np.bincount(dest.ravel(), weights=moved.ravel(), minlength=n).astype(np.int64)


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows: name, wall_s, peak_mem_MB, particle_steps_per_s, note."""
    system = ParticleSystem()
    full = dict(PAPER)
    if quick:
        full.update(n_sequences=4, n_steps=10)
    full_coarse = full["n_sequences"] * full["n_steps"]
    micro_per_coarse = system.micro_steps
    pairs = full_coarse * micro_per_coarse * full["n_particles"]
    size = f"{full['n_sequences']} seq x {full['n_steps'] + 1} snapshots x 250k particles"
    rows = []

    def exact() -> None:
        simulate_dataset(seed=0, **full)

    exact()  # warm the kernel cache and the thread pool, as a user's second call would
    wall = min(_timed(exact) for _ in range(1 if not quick else 2))
    rows.append(
        {
            "name": "exact LUT sampler (cgpyro)",
            "wall_s": wall,
            "peak_mem_MB": _peak_mb(exact),
            "particle_steps_per_s": pairs / wall,
            "note": f"measured, {size}",
        }
    )

    def extrapolated(name: str, fn: Callable[[], object], done_coarse: float, how: str) -> dict:
        part = _timed(fn)
        total = part * full_coarse / done_coarse
        return {
            "name": name,
            "wall_s": total,
            "peak_mem_MB": _peak_mb(fn),
            "particle_steps_per_s": pairs / total,
            "note": f"extrapolated from {how} ({part:.2f} s) to {size}",
        }

    n_micro = 160 if quick else micro_per_coarse
    rows.append(
        extrapolated(
            "naive micro-stepping",
            lambda: naive_micro_steps(system, n_micro),
            n_micro / micro_per_coarse,
            f"1 seq x {n_micro} micro steps",
        )
    )
    rows.append(
        extrapolated(
            "per-particle two binomials",
            lambda: two_binomials_per_particle(system, 2),
            2,
            "1 seq x 2 coarse steps",
        )
    )
    rows.append(
        extrapolated(
            "per-site multinomial (numpy)",
            lambda: per_site_multinomial(system, 2),
            2,
            "1 seq x 2 coarse steps",
        )
    )
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| name | wall_s | peak_mem_MB | particle_steps_per_s | note |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['wall_s']:.2f} | {r['peak_mem_MB']:.0f} | "
            f"{r['particle_steps_per_s']:.2e} | {r['note']} |"
        )
    return "\n".join(lines)


# -- at scale --------------------------------------------------------------------------------
SCALE = {
    # name: (n_sequences, n_steps, n_particles, chunk_size)
    "1e7 particles": (4, 40, 10_000_000, 64),
    "1e4 sequences": (10_000, 9, 250_000, 64),
}
SCALE_QUICK = {
    "1e7 particles": (1, 4, 10_000_000, 64),
    "1e4 sequences": (1_000, 2, 250_000, 64),
}


def _scale_child(n_sequences: int, n_steps: int, n_particles: int, chunk_size: int) -> dict:
    """One scale row in this (fresh) process: wall time and this process's peak RSS."""
    system = ParticleSystem(n_particles=n_particles)
    system.simulate_binned(1, 1, seed=1)  # kernel and sampler tables, outside the timing
    start = time.perf_counter()
    data = system.simulate_binned(n_sequences, n_steps, n_bins=25, seed=0, chunk_size=chunk_size)
    wall = time.perf_counter() - start
    assert data.counts.shape == (n_sequences, n_steps + 1, 25)
    assert (data.counts.sum(-1) == n_particles).all()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return {"wall_s": wall, "peak_rss_MB": peak_kb / 1024}


def run_scale(quick: bool = False) -> list[dict]:
    """Scale rows: name, size, wall_s, peak_rss_MB, coarse and micro particle-steps per second."""
    rows = []
    for name, (n_seq, n_steps, n_part, chunk) in (SCALE_QUICK if quick else SCALE).items():
        out = subprocess.run(
            [sys.executable, __file__, "--_child", json.dumps([n_seq, n_steps, n_part, chunk])],
            capture_output=True, text=True, check=True,
        )
        res = json.loads(out.stdout.splitlines()[-1])
        coarse = n_seq * n_steps * n_part
        rows.append({
            "name": name,
            "size": f"{n_seq:,} seq x {n_steps + 1} snapshots x {n_part:,} particles, "
                    f"chunks of {chunk}",
            **res,
            "coarse_per_s": coarse / res["wall_s"],
            "micro_per_s": coarse * ParticleSystem().micro_steps / res["wall_s"],
        })
    return rows


def scale_markdown(rows: list[dict]) -> str:
    lines = [
        "| name | size | wall_s | peak_rss_MB | particle-coarse-steps/s | particle-steps/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['size']} | {r['wall_s']:.1f} | {r['peak_rss_MB']:.0f} | "
            f"{r['coarse_per_s']:.2e} | {r['micro_per_s']:.2e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes (seconds)")
    parser.add_argument("--scale", action="store_true", help="10^7 particles, 10^4 sequences")
    parser.add_argument("--write", action="store_true", help="with --scale: write simulate.md")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(_scale_child(*json.loads(args._child))))
    elif args.scale:
        table = scale_markdown(run_scale(quick=args.quick))
        print(table)
        if args.write:
            header = (
                f"Machine: {platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, Python {platform.python_version()}, numpy "
                f"{np.__version__}; `python benchmarks/bench_simulate.py --scale --write`"
                f"{' --quick' if args.quick else ''}\n"
            )
            path = Path(__file__).with_name("simulate.md")
            path.write_text("# Simulator at scale\n\n" + header + "\n" + table + "\n")
    else:
        print(to_markdown(run(quick=args.quick)))
