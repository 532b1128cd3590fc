"""The reference FG system of the seed (section 3.1): non-interacting walkers on a periodic lattice.

Sites sit at the lattice points ``s_i = a + i * ds`` (i = 0 .. n_sites - 1) of the periodic
domain ``[a, b)``; each is the centre of a cell of width ``ds``. Every micro step a particle
jumps one site left with ``p_left``, right with ``p_right`` and stays otherwise.

Simulation is exact in distribution and never loops over micro steps: a coarse step moves
every particle by a displacement drawn from the exact ``micro_steps``-step lattice kernel.
The sampler is a two-level table method: a 65,536-entry lookup table holds
``floor(K_d * 2**16)`` copies of every displacement d, indexed by one uniform 16-bit integer
per particle; the leftover table slots (about 0.16 % of the mass for the paper's kernel) send
the particle to an inverse-CDF draw from the normalized residual ``K_d - floor(K_d 2^16)/2^16``.
The mixture reproduces ``K`` exactly (up to float64 round-off of ``K`` itself). Arrays follow
the (sequence, time, site) convention; counts are int64.

Random initial densities come in ``FAMILIES`` ("fourier", "bumps", "steps"; ``random_density``)
so that models can be tested on initial conditions unlike their training data. At scale,
particles move in blocks of 2**20 (scratch memory independent of ``n_particles``) and
``ParticleSystem.simulate_binned`` keeps only a chunk of sequences' sites in memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cgpyro._binning import bin_fractions, bin_of_site
from cgpyro._checks import check_int, is_finite, is_real
from cgpyro.data import Dataset

__all__ = [
    "FAMILIES",
    "ParticleSystem",
    "Simulation",
    "random_bumps_density",
    "random_density",
    "random_smooth_density",
    "random_steps_density",
    "simulate_dataset",
]

#: Initial-condition families of ``random_density`` (and ``family=`` everywhere).
FAMILIES = ("fourier", "bumps", "steps")

_LUT_BITS = 16
_LUT_SIZE = 1 << _LUT_BITS
# Particles moved per block in the occupancy-only path: bounds scratch memory (~26 B a particle).
_PARTICLE_BLOCK = 1 << 20


def check_lattice_walk(system) -> None:
    """Validate the jump probabilities, ``micro_dt`` and ``domain`` of a frozen lattice-walk
    dataclass (the reference and the interacting system share them); normalizes ``domain`` to
    a tuple of floats so that equal systems hash equal (kernel cache keys)."""
    for name in ("p_left", "p_right"):
        value = getattr(system, name)
        if not is_real(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1], found {value!r}")
    if system.p_left + system.p_right > 1.0:
        raise ValueError(
            f"p_left + p_right: expected at most 1, found {system.p_left + system.p_right!r}"
        )
    if not is_finite(system.micro_dt) or not system.micro_dt > 0:
        raise ValueError(
            f"micro_dt: expected a positive finite number, found {system.micro_dt!r}"
        )
    dom = system.domain
    if (
        not isinstance(dom, tuple | list)
        or len(dom) != 2
        or not all(is_finite(x) for x in dom)
        or not dom[0] < dom[1]
    ):
        raise ValueError(
            f"domain: expected two finite numbers (a, b) with a < b, found {dom!r}"
        )
    object.__setattr__(system, "domain", (float(dom[0]), float(dom[1])))


@dataclass(frozen=True)
class ParticleSystem:
    """Non-interacting random walkers on a periodic 1-D lattice (defaults: the seed's section 3.1).

    ``micro_steps`` micro steps of length ``micro_dt`` make one coarse step, so the coarse
    time step is ``coarse_dt = micro_steps * micro_dt`` (4.0 by default).
    """

    n_particles: int = 250_000
    n_sites: int = 1280
    p_left: float = 0.1875
    p_right: float = 0.2125
    micro_dt: float = 2.5e-3
    micro_steps: int = 1600
    domain: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("n_particles", "n_sites", "micro_steps"):
            check_int(getattr(self, name), name)
        check_lattice_walk(self)

    # -- derived constants ---------------------------------------------------------------------
    @property
    def length(self) -> float:
        """Domain length ``b - a``."""
        return self.domain[1] - self.domain[0]

    @property
    def ds(self) -> float:
        """Lattice spacing δs = length / n_sites (1/640 by default)."""
        return self.length / self.n_sites

    @property
    def coarse_dt(self) -> float:
        """Coarse time step Δt = micro_steps * micro_dt (4.0 by default)."""
        return self.micro_steps * self.micro_dt

    @property
    def diffusion(self) -> float:
        """Continuum diffusion constant D = (p_l + p_r) δs² / (2 δt) of eq. 16."""
        return (self.p_left + self.p_right) * self.ds**2 / (2.0 * self.micro_dt)

    @property
    def velocity(self) -> float:
        """Continuum drift velocity v = (p_r - p_l) δs / δt of eq. 16."""
        return (self.p_right - self.p_left) * self.ds / self.micro_dt

    @property
    def site_centers(self) -> np.ndarray:
        """Lattice points ``a + i * ds``, float64 (n_sites,): where particles sit.

        Each is the centre of its site's cell ``[s_i - ds/2, s_i + ds/2)``; CG binning uses
        these points (see ``cgpyro._binning.bin_of_site``).
        """
        return self.domain[0] + self.ds * np.arange(self.n_sites, dtype=np.float64)

    def displacement_moments(self, n_coarse_steps: int = 1) -> tuple[float, float]:
        """Exact (mean, variance) of the unwrapped displacement in sites after k coarse steps.

        Over m = k * micro_steps micro steps: mean m (p_r - p_l), variance
        m (p_l + p_r - (p_r - p_l)^2). Multiply by ds, ds^2 for physical units; the variance
        differs from the continuum 2 D t by the drift term m (p_r - p_l)^2.
        """
        m = n_coarse_steps * self.micro_steps
        mean = m * (self.p_right - self.p_left)
        var = m * (self.p_left + self.p_right - (self.p_right - self.p_left) ** 2)
        return mean, var

    # -- exact kernel --------------------------------------------------------------------------
    def kernel(self, n_coarse_steps: int = 1) -> np.ndarray:
        """Exact periodic displacement distribution after k coarse steps, float64 (n_sites,).

        Entry d is P(displacement ≡ d mod n_sites) after ``n_coarse_steps * micro_steps``
        micro steps; sums to 1. Computed by raising the one-step characteristic function on the
        periodic lattice to that power (FFT), so it is exact up to float64 round-off (~1e-17
        absolute; round-off negatives are clipped to 0). Read-only and cached.
        """
        check_int(n_coarse_steps, "n_coarse_steps", 0)
        return _lattice_kernel(
            self.n_sites, float(self.p_left), float(self.p_right),
            int(n_coarse_steps) * self.micro_steps,
        )

    # -- simulation ----------------------------------------------------------------------------
    def initial_densities(
        self,
        n_sequences: int,
        seed: int = 0,
        initial_density: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
        family: str = "fourier",
    ) -> np.ndarray:
        """Site probabilities the initial particles are drawn from, float64 (n_sequences, n_sites).

        Same rules and same random streams as ``simulate`` (so these are exactly the densities
        a ``simulate`` call with the same arguments used).
        """
        check_int(n_sequences, "n_sequences")
        _check_family(family, initial_density)
        rngs = _sequence_rngs(seed, n_sequences)
        return self._initial_densities(rngs, initial_density, family)

    def _initial_densities(
        self, rngs: list[np.random.Generator], initial_density, family: str = "fourier"
    ) -> np.ndarray:
        n_seq, n = len(rngs), self.n_sites
        if initial_density is None:
            return np.stack([random_density(rng, n, family) for rng in rngs])
        if callable(initial_density):
            values = np.asarray(initial_density(self.site_centers))
            if values.shape != (n,):
                raise ValueError(
                    f"initial_density: expected the callable to return shape ({n},) on the "
                    f"site centres, found {values.shape}"
                )
        else:
            values = np.asarray(initial_density)
        if values.shape not in ((n,), (n_seq, n)):
            raise ValueError(
                f"initial_density: expected shape ({n},) or ({n_seq}, {n}), found {values.shape}"
            )
        if values.dtype.kind not in "iuf":
            raise ValueError(f"initial_density: expected real numbers, found dtype {values.dtype}")
        values = values.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("initial_density: expected finite values, found NaN or inf")
        if np.any(values < 0):
            raise ValueError(
                f"initial_density: expected non-negative values, found min {values.min():g}"
            )
        total = values.sum(axis=-1, keepdims=True)
        if np.any(total <= 0):
            raise ValueError("initial_density: expected a positive sum, found 0")
        return np.broadcast_to(values / total, (n_seq, n)).copy()

    def simulate(
        self,
        n_sequences: int,
        n_steps: int,
        seed: int = 0,
        initial_density: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
        return_positions: bool = False,
        progress: bool = False,
        n_workers: int | None = None,
        family: str = "fourier",
    ) -> Simulation:
        """Simulate ``n_steps`` coarse steps of ``n_sequences`` independent sequences.

        Returns ``n_steps + 1`` snapshots per sequence (t = 0 included), ``coarse_dt`` apart.

        initial_density: None draws a random density of ``family`` per sequence
            (``random_density``); an array (n_sites,) or (n_sequences, n_sites) of
            non-negative weights, or a callable ``f(site_centers) -> (n_sites,)``, is normalized
            and used as given. Initial occupancy ~ Multinomial(n_particles, density), exactly.
        seed: non-negative int. Sequence i uses its own stream
            ``np.random.default_rng(SeedSequence(seed).spawn(n)[i])``, so results do not depend
            on ``n_workers``, and sequence i is the same for any ``n_sequences > i``.
        return_positions: also keep every particle's site index, (n_sequences, n_steps + 1,
            n_particles) int16 (int32 above 32,767 sites): 2 bytes per particle and snapshot,
            1.3 GB for the paper's dataset. Particles are labelled in site order at t = 0. The
            occupancy is identical with or without positions for the same seed.
        n_workers: threads over sequences (numpy releases the GIL in the heavy loops); default
            ``min(4, os.cpu_count(), n_sequences)``.
        family: initial-condition family when ``initial_density`` is None, one of ``FAMILIES``:
            "fourier" (default, ``random_smooth_density``), "bumps" (``random_bumps_density``),
            "steps" (``random_steps_density``).
        """
        check_int(n_sequences, "n_sequences")
        _check_family(family, initial_density)
        check_int(n_steps, "n_steps", 0)
        if n_workers is not None:
            check_int(n_workers, "n_workers")
        rngs = _sequence_rngs(seed, n_sequences)
        bar = _progress_bar(n_sequences * n_steps, progress)
        try:
            occupancy, positions, densities = self._simulate_streams(
                rngs, n_steps, initial_density, family, return_positions, bar, n_workers
            )
        finally:
            bar.close()
        return Simulation(
            occupancy=occupancy,
            system=self,
            positions=positions,
            initial_density=densities,
            seed=seed,
        )

    def simulate_binned(
        self,
        n_sequences: int,
        n_steps: int,
        n_bins: int = 25,
        seed: int = 0,
        initial_density: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
        family: str = "fourier",
        chunk_size: int = 64,
        progress: bool = False,
        n_workers: int | None = None,
    ) -> Dataset:
        """Simulate and bin at scale, holding only ``chunk_size`` sequences' sites at a time.

        Returns the ``Dataset`` with counts int64 (n_sequences, n_steps + 1, n_bins), identical
        to ``simulate(...).to_dataset(n_bins)`` with the same arguments (every sequence has its
        own stream, whatever the chunking). Memory is bounded in both sizes: the counts
        (n_sequences x (n_steps + 1) x n_bins x 8 B), one chunk's site occupancy
        (chunk_size x (n_steps + 1) x n_sites x 8 B, 27 MB for 64 x 41 x 1280) and per-worker
        scratch of ~26 B per particle up to 2**20 particles (larger systems are moved in blocks
        of 2**20 particles). Arguments as in ``simulate``; ``initial_density`` may be
        (n_sequences, n_sites) and is sliced per chunk.
        """
        check_int(n_sequences, "n_sequences")
        check_int(n_steps, "n_steps", 0)
        check_int(chunk_size, "chunk_size")
        _check_family(family, initial_density)
        bin_of_site(self.n_sites, n_bins)  # validates n_bins before simulating
        n = self.n_sites
        per_sequence = False
        if initial_density is not None and not callable(initial_density):
            shape = np.shape(initial_density)
            per_sequence = shape == (n_sequences, n)
            if not per_sequence and shape != (n,):
                raise ValueError(
                    f"initial_density: expected shape ({n},) or ({n_sequences}, {n}), "
                    f"found {shape}"
                )
        rngs = _sequence_rngs(seed, n_sequences)
        counts = np.empty((n_sequences, n_steps + 1, n_bins), dtype=np.int64)
        bar = _progress_bar(n_sequences * n_steps, progress)
        try:
            for lo in range(0, n_sequences, chunk_size):
                hi = min(lo + chunk_size, n_sequences)
                density = initial_density[lo:hi] if per_sequence else initial_density
                occupancy, _, _ = self._simulate_streams(
                    rngs[lo:hi], n_steps, density, family, False, bar, n_workers
                )
                counts[lo:hi] = bin_fractions(occupancy, n_bins)
                rngs[lo:hi] = [None] * (hi - lo)  # a finished stream's state is not needed
                del occupancy
        finally:
            bar.close()
        a, b = self.domain
        return Dataset(counts=counts, bin_edges=np.linspace(a, b, n_bins + 1), dt=self.coarse_dt)

    def _simulate_streams(
        self,
        rngs: list[np.random.Generator],
        n_steps: int,
        initial_density,
        family: str,
        return_positions: bool,
        bar,
        n_workers: int | None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """One sequence per generator: (occupancy, positions or None, initial densities)."""
        n_sequences = len(rngs)
        if n_workers is None:
            n_workers = min(4, os.cpu_count() or 1, n_sequences)
        check_int(n_workers, "n_workers")
        densities = self._initial_densities(rngs, initial_density, family)

        n, n_part = self.n_sites, self.n_particles
        occupancy = np.empty((n_sequences, n_steps + 1, n), dtype=np.int64)
        pos_dtype = np.int16 if n <= np.iinfo(np.int16).max else np.int32
        positions = (
            np.empty((n_sequences, n_steps + 1, n_part), dtype=pos_dtype)
            if return_positions
            else None
        )
        sampler = _KernelSampler.for_kernel(self.kernel(1))
        lock = threading.Lock()

        def tick() -> None:
            with lock:  # tqdm counters are not atomic across threads
                bar.update(1)

        def run(i: int) -> None:
            occupancy[i, 0] = rngs[i].multinomial(n_part, densities[i])
            _simulate_sequence(
                rngs[i], sampler, occupancy[i], None if positions is None else positions[i], tick
            )

        if n_workers == 1:
            for i in range(n_sequences):
                run(i)
        else:
            pool = ThreadPoolExecutor(max_workers=n_workers)
            try:
                list(pool.map(run, range(n_sequences)))  # re-raises a worker's exception
            finally:
                # On Ctrl-C or an error, drop the queued sequences instead of finishing them.
                pool.shutdown(wait=True, cancel_futures=True)
        return occupancy, positions, densities


def _progress_bar(total: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="simulate", disable=not progress)


@lru_cache(maxsize=64)
def _lattice_kernel(n_sites: int, p_left: float, p_right: float, n_micro: int) -> np.ndarray:
    one_step = np.zeros(n_sites)
    # += so that n_sites = 1 or 2 (neighbours coincide) still sums the probabilities
    one_step[0] += 1.0 - p_left - p_right
    one_step[1 % n_sites] += p_right
    one_step[-1 % n_sites] += p_left
    kernel = np.fft.ifft(np.fft.fft(one_step) ** n_micro).real
    kernel = np.clip(kernel, 0.0, None)
    kernel /= kernel.sum()
    kernel.flags.writeable = False
    return kernel


class _KernelSampler:
    """Exact sampler of periodic displacements from a kernel (n_sites,): LUT + residual CDF."""

    def __init__(self, kernel: np.ndarray) -> None:
        n = kernel.size
        copies = np.floor(kernel * _LUT_SIZE).astype(np.int64)
        used = int(copies.sum())
        assert used <= _LUT_SIZE, f"LUT over-full: {used} > {_LUT_SIZE}"
        self.n_sites = n
        # The sentinel lands base + sentinel in [2n, 3n), a block of its own in the bincount,
        # which yields the per-site number of residual draws at no extra pass.
        self.sentinel = 2 * n
        self.lut = np.full(_LUT_SIZE, self.sentinel, dtype=np.intp)
        self.lut[:used] = np.repeat(np.arange(n, dtype=np.intp), copies)
        # Exact in floating point: copies/2^16 <= kernel < 2 * copies/2^16 (Sterbenz) or copies=0.
        residual = kernel - copies / _LUT_SIZE
        self.residual_cdf = np.cumsum(residual)
        assert used == _LUT_SIZE or self.residual_cdf[-1] > 0, "LUT has free slots but no residual"

    @classmethod
    def for_kernel(cls, kernel: np.ndarray) -> _KernelSampler:
        return _sampler_cache(kernel.tobytes())

    def draw_table(self, rng: np.random.Generator, index: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out`` (N,) with LUT draws (displacement or sentinel); ``index`` is scratch."""
        size = out.size
        raw = rng.bit_generator.random_raw(-(-size // 4)).view(np.uint16)[:size]
        np.copyto(index, raw, casting="unsafe")
        np.take(self.lut, index, out=out)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """(size,) intp displacements in [0, n_sites) drawn exactly from the kernel."""
        out = np.empty(size, dtype=np.intp)
        self.draw_table(rng, np.empty(size, dtype=np.intp), out)
        residual = out == self.sentinel
        out[residual] = self.draw_residual(rng, int(np.count_nonzero(residual)))
        return out

    def draw_residual(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """(size,) intp displacements from the normalized residual distribution."""
        u = rng.random(size) * self.residual_cdf[-1]
        # side="right" never picks a zero-width (zero-probability) entry
        return np.minimum(
            np.searchsorted(self.residual_cdf, u, side="right"), self.n_sites - 1
        ).astype(np.intp)


@lru_cache(maxsize=16)
def _sampler_cache(kernel_bytes: bytes) -> _KernelSampler:
    return _KernelSampler(np.frombuffer(kernel_bytes, dtype=np.float64))


def _simulate_sequence(
    rng: np.random.Generator,
    sampler: _KernelSampler,
    occupancy: np.ndarray,
    positions: np.ndarray | None,
    tick: Callable[[], None],
) -> None:
    """Fill ``occupancy[1:]`` (n_times, n_sites) from ``occupancy[0]``; optionally ``positions``."""
    n = sampler.n_sites
    n_part = int(occupancy[0].sum())
    sites = np.arange(n, dtype=np.intp)
    # Particles move in blocks of at most _PARTICLE_BLOCK (the same blocks with and without
    # positions, so the occupancy does not depend on return_positions); without positions the
    # scratch then does not grow with n_particles.
    size = n_part if positions is not None else min(n_part, _PARTICLE_BLOCK)
    index = np.empty(size, dtype=np.intp)
    disp = np.empty(size, dtype=np.intp)
    pos = None
    if positions is not None:
        pos = np.repeat(sites, occupancy[0]).astype(positions.dtype)
        positions[0] = pos
    for t in range(1, occupancy.shape[0]):
        if pos is None:
            new = np.zeros(n, dtype=np.int64)
            cum = np.concatenate(([0], np.cumsum(occupancy[t - 1])))
            for lo in range(0, n_part, _PARTICLE_BLOCK):
                hi = min(lo + _PARTICLE_BLOCK, n_part)
                # particles lo..hi-1 in site order: how many of each site fall in the block
                in_block = np.diff(np.clip(cum, lo, hi))
                _move_block(rng, sampler, sites, in_block, index[: hi - lo], disp[: hi - lo], new)
        else:
            # Same draws in the same site order and blocks as _move_block, so the occupancy
            # does not depend on return_positions; stable radix sort keeps it cheap.
            order = np.argsort(pos, kind="stable")
            moved = np.empty_like(pos)
            for lo in range(0, n_part, _PARTICLE_BLOCK):
                hi = min(lo + _PARTICLE_BLOCK, n_part)
                d = disp[lo:hi]
                sampler.draw_table(rng, index[lo:hi], d)
                residual = d == sampler.sentinel
                m = int(np.count_nonzero(residual))
                if m:
                    d[residual] = sampler.draw_residual(rng, m)
                block = order[lo:hi]
                moved[block] = (pos[block].astype(np.intp) + d) % n
            pos = moved
            positions[t] = pos
            new = np.bincount(pos, minlength=n)
        assert new.sum() == n_part, "particle number changed during a coarse step"
        occupancy[t] = new
        tick()


def _move_block(
    rng: np.random.Generator,
    sampler: _KernelSampler,
    sites: np.ndarray,
    occupancy: np.ndarray,
    index: np.ndarray,
    disp: np.ndarray,
    out: np.ndarray,
) -> None:
    """Move the ``occupancy.sum()`` particles of ``occupancy`` (n_sites,) one coarse step and add
    their new occupancy to ``out`` (n_sites,); ``index`` and ``disp`` are scratch of that size."""
    n = sampler.n_sites
    # Slot j gets the j-th draw, slots in site order: particles are exchangeable, so only the
    # multiset of (site, displacement) pairs matters for the occupancy.
    sampler.draw_table(rng, index, disp)
    disp += np.repeat(sites, occupancy)
    counts = np.bincount(disp, minlength=3 * n)
    out += counts[:n] + counts[n : 2 * n]  # fold the periodic wrap
    n_residual = counts[2 * n :]
    m = int(n_residual.sum())
    if m:
        dest = sampler.draw_residual(rng, m) + np.repeat(sites, n_residual)
        extra = np.bincount(dest, minlength=2 * n)
        out += extra[:n] + extra[n:]


def _sequence_rngs(seed: int, n_sequences: int) -> list[np.random.Generator]:
    check_int(seed, "seed", 0)
    children = np.random.SeedSequence(int(seed)).spawn(n_sequences)
    return [np.random.default_rng(child) for child in children]


def random_smooth_density(
    rng: np.random.Generator,
    n_sites: int,
    n_modes: int = 3,
    amplitude: float = 0.5,
    min_ratio: float = 0.2,
) -> np.ndarray:
    """A random smooth positive periodic density, as site probabilities float64 (n_sites,).

    ``f(s) = 1 + sum_{k=1..n_modes} a_k cos(pi k s) + b_k sin(pi k s)`` on the lattice points
    mapped to s in [-1, 1), with a_k, b_k ~ Normal(0, (amplitude / k)^2). If the minimum of f
    falls below ``min_ratio`` (f has mean 1), the fluctuation is scaled down so that the
    minimum is exactly ``min_ratio``. Returns f / sum(f).
    """
    check_int(n_sites, "n_sites")
    check_int(n_modes, "n_modes")
    if not 0.0 < min_ratio < 1.0:
        raise ValueError(f"min_ratio: expected a number in (0, 1), found {min_ratio!r}")
    s = -1.0 + 2.0 * np.arange(n_sites) / n_sites
    k = np.arange(1, n_modes + 1)
    a, b = rng.normal(size=(2, n_modes)) * (amplitude / k)
    phase = np.pi * np.outer(k, s)
    fluct = a @ np.cos(phase) + b @ np.sin(phase)
    low = fluct.min()
    if 1.0 + low < min_ratio:
        fluct *= (1.0 - min_ratio) / -low
    f = 1.0 + fluct
    return f / f.sum()


def _site_phase(n_sites: int) -> np.ndarray:
    """Angle 2 pi i / n_sites of every site, float64 (n_sites,): the periodic coordinate."""
    return 2.0 * np.pi * np.arange(n_sites, dtype=np.float64) / n_sites


def _periodic_distance(phase: np.ndarray, centre: float) -> np.ndarray:
    """Signed angular distance to ``centre`` wrapped to [-pi, pi), same shape as ``phase``."""
    return (phase - centre + np.pi) % (2.0 * np.pi) - np.pi


def random_bumps_density(
    rng: np.random.Generator,
    n_sites: int,
    max_bumps: int = 3,
    floor: tuple[float, float] = (0.2, 0.5),
    width: tuple[float, float] = (0.04, 0.12),
) -> np.ndarray:
    """A floor plus a few random periodic Gaussian bumps, site probabilities float64 (n_sites,).

    ``f = c + sum_b h_b exp(-d_b^2 / (2 w_b^2))`` with the floor ``c ~ U(floor)``, 1 to
    ``max_bumps`` bumps of height ``h_b ~ U(0.5, 2)``, centre uniform on the domain and width
    ``w_b ~ U(width)`` as a fraction of the domain length (``d_b``: periodic distance to the
    centre): localised features that a 3-mode Fourier density does not have. Returns
    f / sum(f), positive everywhere (f >= c > 0).
    """
    check_int(n_sites, "n_sites")
    check_int(max_bumps, "max_bumps")
    _check_range(floor, "floor", positive=True)
    _check_range(width, "width", positive=True)
    phase = _site_phase(n_sites)
    f = np.full(n_sites, rng.uniform(*floor))
    for _ in range(int(rng.integers(1, max_bumps + 1))):
        height = rng.uniform(0.5, 2.0)
        centre = rng.uniform(0.0, 2.0 * np.pi)
        w = rng.uniform(*width) * 2.0 * np.pi
        f += height * np.exp(-0.5 * (_periodic_distance(phase, centre) / w) ** 2)
    return f / f.sum()


def random_steps_density(
    rng: np.random.Generator,
    n_sites: int,
    max_plateaus: int = 4,
    levels: tuple[float, float] = (0.2, 1.0),
    front_width: tuple[float, float] = (0.01, 0.03),
) -> np.ndarray:
    """Smoothed random piecewise-constant plateaus, site probabilities float64 (n_sites,).

    2 to ``max_plateaus`` plateaus between uniform random points of the periodic domain, at
    levels ~ U(levels), joined by tanh fronts of width ~ U(front_width) x the domain length (a
    25-bin CG cell is 0.04 of it, so the fronts are sharp on the CG scale and smooth on the
    lattice). Returns f / sum(f), positive everywhere (f is a smooth interpolation between
    adjacent levels, all >= ``levels[0]`` > 0).
    """
    check_int(n_sites, "n_sites")
    check_int(max_plateaus, "max_plateaus", 2)
    _check_range(levels, "levels", positive=True)
    _check_range(front_width, "front_width", positive=True)
    phase = _site_phase(n_sites)
    m = int(rng.integers(2, max_plateaus + 1))
    edges = np.sort(rng.uniform(0.0, 2.0 * np.pi, m))
    heights = rng.uniform(*levels, size=m)
    w = rng.uniform(*front_width) * 2.0 * np.pi
    f = np.zeros(n_sites)
    for j in range(m):
        start = edges[j]
        end = edges[j + 1] if j + 1 < m else edges[0] + 2.0 * np.pi
        # smoothed indicator of the arc [start, end), summed over the periodic images
        for shift in (-2.0 * np.pi, 0.0, 2.0 * np.pi):
            p = phase + shift
            f += heights[j] * 0.5 * (np.tanh((p - start) / w) - np.tanh((p - end) / w))
    # the smoothed arcs sum to 1 at every point, so f lies between adjacent levels; the clip only
    # guards round-off
    f = np.clip(f, 1e-3 * levels[0], None)
    return f / f.sum()


def random_density(rng: np.random.Generator, n_sites: int, family: str = "fourier") -> np.ndarray:
    """A random initial density of ``family`` (``FAMILIES``), site probabilities (n_sites,).

    "fourier": ``random_smooth_density``; "bumps": ``random_bumps_density``; "steps":
    ``random_steps_density``, each with its defaults and the generator ``rng``.
    """
    _check_family(family)
    if family == "fourier":
        return random_smooth_density(rng, n_sites)
    if family == "bumps":
        return random_bumps_density(rng, n_sites)
    return random_steps_density(rng, n_sites)


def _check_family(family: object, initial_density: object = None) -> None:
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, found {family!r}")
    if initial_density is not None and family != "fourier":
        raise ValueError(
            f"family: applies only when initial_density is None, found family={family!r} "
            "with an initial_density"
        )


def _check_range(bounds: object, name: str, positive: bool = False) -> None:
    ok = (
        isinstance(bounds, tuple | list)
        and len(bounds) == 2
        and all(is_finite(x) for x in bounds)
        and bounds[0] <= bounds[1]
        and (not positive or bounds[0] > 0)
    )
    if not ok:
        rule = "0 < lo <= hi" if positive else "lo <= hi"
        raise ValueError(f"{name}: expected two finite numbers (lo, hi) with {rule}, "
                         f"found {bounds!r}")


@dataclass(eq=False)  # holds arrays: compare fields explicitly
class Simulation:
    """The FG trajectories of ``ParticleSystem.simulate``.

    occupancy: int64 (n_sequences, n_steps + 1, n_sites), particles per site per snapshot.
    positions: None, or int16/int32 (n_sequences, n_steps + 1, n_particles) site indices.
    initial_density: float64 (n_sequences, n_sites), the probabilities t = 0 was drawn from.
    """

    occupancy: np.ndarray
    system: ParticleSystem
    positions: np.ndarray | None = None
    initial_density: np.ndarray | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        occ = self.occupancy
        assert occ.ndim == 3 and occ.shape[-1] == self.system.n_sites, (
            f"occupancy must be (n_sequences, n_times, {self.system.n_sites}), got {occ.shape}"
        )

    @property
    def dt(self) -> float:
        """Coarse time step Δt between snapshots."""
        return self.system.coarse_dt

    @property
    def n_sequences(self) -> int:
        return self.occupancy.shape[0]

    @property
    def n_times(self) -> int:
        return self.occupancy.shape[1]

    @property
    def times(self) -> np.ndarray:
        """Snapshot times, float64 (n_times,): 0, Δt, 2Δt, ..."""
        return self.dt * np.arange(self.n_times, dtype=np.float64)

    def bin_edges(self, n_bins: int = 25) -> np.ndarray:
        """Equal-width CG bin edges on the domain, float64 (n_bins + 1,)."""
        bin_of_site(self.system.n_sites, n_bins)  # validates n_bins
        a, b = self.system.domain
        return np.linspace(a, b, n_bins + 1)

    def bin_counts(self, n_bins: int = 25) -> np.ndarray:
        """Particles per CG bin, int64 (n_sequences, n_steps + 1, n_bins).

        A site counts in the bin containing its lattice point, so bins need not hold equal
        numbers of sites (1280 sites / 25 bins: 51 or 52).
        """
        return bin_fractions(self.occupancy, n_bins).astype(np.int64, copy=False)

    def to_dataset(self, n_bins: int = 25) -> Dataset:
        """The CG data (``cgpyro.data.Dataset``): bin counts, bin edges and Δt."""
        return Dataset(counts=self.bin_counts(n_bins), bin_edges=self.bin_edges(n_bins), dt=self.dt)


def simulate_dataset(
    n_sequences: int = 64,
    n_steps: int = 40,
    n_particles: int = 250_000,
    n_bins: int = 25,
    seed: int = 0,
    progress: bool = False,
    *,
    n_sites: int = 1280,
    p_left: float = 0.1875,
    p_right: float = 0.2125,
    micro_steps: int = 1600,
    family: str = "fourier",
    **system_kwargs,
) -> tuple[Dataset, Simulation]:
    """Simulate the reference system and bin it: ``(Dataset, Simulation)``.

    Counts are int64 (n_sequences, n_steps + 1, n_bins). ``n_particles``, ``n_sites``,
    ``p_left``, ``p_right``, ``micro_steps`` and ``system_kwargs`` (``micro_dt``, ``domain``)
    go to ``ParticleSystem`` (defaults: the seed's section 3.1); ``family`` picks the random
    initial densities (``FAMILIES``).
    """
    system = ParticleSystem(
        n_particles=n_particles, n_sites=n_sites, p_left=p_left, p_right=p_right,
        micro_steps=micro_steps, **system_kwargs,
    )
    bin_of_site(system.n_sites, n_bins)  # fail before simulating
    _check_family(family)
    sim = system.simulate(n_sequences, n_steps, seed=seed, progress=progress, family=family)
    return sim.to_dataset(n_bins), sim
