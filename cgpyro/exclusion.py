"""The interacting FG system: soft-exclusion walkers on a periodic lattice (issue 12).

``n_sites`` sites on the periodic domain ``[a, b)`` (lattice points ``a + i * ds``), site capacity
``K``, occupancies ``n_s >= 0``. One micro step is a *parallel update*: every particle
independently tries to jump left with ``p_left`` or right with ``p_right`` (else it stays); a try
into site ``s'`` succeeds with probability ``max(0, 1 - n_{s'} / K)``, ``n`` taken at the start of
the micro step; failed tries stay. Per site::

    tries_left  ~ Bin(n_s, p_left)
    tries_right ~ Bin(n_s - tries_left, p_right / (1 - p_left))
    accepted    ~ Bin(tries, max(0, 1 - n_target / K))    (each direction)

then all sites update at once. ``micro_steps`` micro steps make one coarse snapshot; CG counts are
equal-width bins of the occupancies, as for the reference system (``cgpyro.systems``).
Hydrodynamic limit, ρ = n / K: ``ρ_t + (v ρ (1 - ρ))_x = D ρ_xx`` with
``v = (p_right - p_left) ds / δt`` and ``D = (p_left + p_right) ds² / (2 δt)``: fronts steepen and
the characteristic speed ``v (1 - 2ρ)`` changes sign at ρ = ½.

Sampling is exact micro-stepping (there is no skip-ahead), vectorised over sites and sequences in
torch, on whatever device the tensors live. Binomials come from precomputed lookup tables (the
two-level table method of ``cgpyro.systems``): a key (count, probability) and ``B`` uniform bits
pick an entry of a table that holds ``floor(P(k) 2^B)`` copies of every outcome ``k``; the
leftover slots (about ``support / 2^(B+1)`` of the mass) send the draw to the exact inverse CDF of
the normalized residual. The mixture is the binomial exactly, up to float64 round-off of its
probabilities. Counts beyond the tables fall back to ``torch.binomial`` (exact, slower).
Arrays follow the (sequence, time, site) convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from cgpyro._binning import bin_fractions, bin_of_site
from cgpyro._checks import check_int
from cgpyro.data import Dataset
from cgpyro.systems import Simulation, check_lattice_walk

__all__ = [
    "FAMILIES",
    "ExclusionSystem",
    "MonteCarloFloor",
    "hydrodynamic_solution",
    "initial_profiles",
    "monte_carlo_floor",
    "simulate_exclusion_dataset",
]

#: Initial-condition families (densities ρ = n / K in about [0.1, 0.9]), see ``initial_profiles``.
FAMILIES = ("fourier", "bumps", "steps")

_MAX_TABLE = 1 << 25  # entries per lookup table (bytes for uint8 outcomes)


@dataclass(frozen=True)
class ExclusionSystem:
    """Soft-exclusion walkers on a periodic 1-D lattice (defaults: issue 12's contract).

    ``micro_steps`` micro steps of length ``micro_dt`` make one coarse step, so the coarse time
    step is ``coarse_dt = micro_steps * micro_dt`` (1.0 by default).
    """

    n_sites: int = 1280
    capacity: int = 200
    p_left: float = 0.1
    p_right: float = 0.3
    micro_steps: int = 200
    micro_dt: float = 5e-3
    domain: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("n_sites", "capacity", "micro_steps"):
            check_int(getattr(self, name), name)
        if self.n_sites < 3:
            raise ValueError(f"n_sites: expected at least 3 (two distinct neighbours), "
                             f"found {self.n_sites}")
        check_lattice_walk(self)
        object.__setattr__(self, "p_left", float(self.p_left))
        object.__setattr__(self, "p_right", float(self.p_right))

    # -- derived constants ---------------------------------------------------------------------
    @property
    def length(self) -> float:
        """Domain length ``b - a``."""
        return self.domain[1] - self.domain[0]

    @property
    def ds(self) -> float:
        """Lattice spacing δs = length / n_sites."""
        return self.length / self.n_sites

    @property
    def coarse_dt(self) -> float:
        """Coarse time step Δt = micro_steps * micro_dt."""
        return self.micro_steps * self.micro_dt

    @property
    def velocity(self) -> float:
        """v = (p_r - p_l) δs / δt: the flux is ``v ρ (1 - ρ)`` (speed of a small bump at ρ→0)."""
        return (self.p_right - self.p_left) * self.ds / self.micro_dt

    @property
    def diffusion(self) -> float:
        """D = (p_l + p_r) δs² / (2 δt) of the hydrodynamic equation."""
        return (self.p_left + self.p_right) * self.ds**2 / (2.0 * self.micro_dt)

    @property
    def site_centers(self) -> np.ndarray:
        """Lattice points ``a + i * ds``, float64 (n_sites,)."""
        return self.domain[0] + self.ds * np.arange(self.n_sites, dtype=np.float64)

    # -- one micro step ------------------------------------------------------------------------
    def expected_flux(self, occupancy: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Mean particle flux across bond s -> s+1 in one micro step given n: (..., n_sites).

        ``p_r n_s max(0, 1 - n_{s+1}/K) - p_l n_{s+1} max(0, 1 - n_s/K)``; periodic, so entry
        ``n_sites - 1`` is the bond to site 0. Exact: E[n_s(t+1) | n] = n_s - J_s + J_{s-1}.
        """
        lib = torch if isinstance(occupancy, torch.Tensor) else np
        n = occupancy.double() if lib is torch else np.asarray(occupancy, dtype=np.float64)
        right = lib.roll(n, -1, -1)
        acc = (1.0 - n / self.capacity).clip(0.0, None)
        acc_right = (1.0 - right / self.capacity).clip(0.0, None)
        return self.p_right * n * acc_right - self.p_left * right * acc

    def micro_step(
        self, occupancy: torch.Tensor, generator: torch.Generator, return_flux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One exact parallel-update micro step: int64 (..., n_sites) -> int64 (..., n_sites).

        ``generator`` must live on ``occupancy``'s device. ``return_flux=True`` also returns
        the realised net flux across bond s -> s+1, int64 (..., n_sites) (accepted right moves
        out of s minus accepted left moves out of s+1).
        """
        n = _check_state(occupancy, self.n_sites)
        return _Stepper.for_system(self, n.device).step(n, generator, return_flux)

    def evolve(
        self,
        occupancy: torch.Tensor,
        n_micro: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """``n_micro`` micro steps from int64 (..., n_sites); returns the final state."""
        n = _check_state(occupancy, self.n_sites)
        stepper = _Stepper.for_system(self, n.device)
        for _ in range(check_int(n_micro, "n_micro", 0)):
            n = stepper.step(n, generator)
        return n

    # -- simulation ----------------------------------------------------------------------------
    def initial_density(
        self, n_sequences: int, seed: int = 0, family: str = "fourier"
    ) -> np.ndarray:
        """ρ = E[n] / K at t = 0 of ``simulate`` with the same arguments, float64 (n_sequences,
        n_sites)."""
        check_int(n_sequences, "n_sequences")
        rng = np.random.default_rng(np.random.SeedSequence([check_int(seed, "seed", 0), 1]))
        return initial_profiles(rng, n_sequences, self.site_centers, family, self.domain)

    def simulate(
        self,
        n_sequences: int,
        n_steps: int,
        seed: int = 0,
        family: str = "fourier",
        initial_occupancy: np.ndarray | torch.Tensor | None = None,
        device: str | torch.device | None = None,
        chunk_size: int = 256,
        progress: bool = False,
    ) -> Simulation:
        """Simulate ``n_steps`` snapshots after t = 0 of ``n_sequences`` independent sequences.

        Returns a :class:`cgpyro.systems.Simulation` whose ``occupancy`` is int64
        (n_sequences, n_steps + 1, n_sites) (``bin_counts``/``to_dataset`` as for the reference
        system) and ``initial_density`` the profile ρ (n_sequences, n_sites) t = 0 was drawn from:
        ``n_s(0) ~ Binomial(K, ρ(s))`` independently per site.

        family: the initial-condition family (``FAMILIES``; see ``initial_profiles``).
        initial_occupancy: instead, start every sequence from this int array (n_sites,) or
            (n_sequences, n_sites) of occupancies (e.g. a true FG state, for Monte-Carlo floors).
        device: where to micro-step (default: CPU; ``"cuda"`` if you have one).
        seed: non-negative int. Chunk c of ``chunk_size`` sequences uses a ``torch.Generator``
            seeded from ``SeedSequence(seed).spawn``, so a run is reproduced by the same
            (seed, n_sequences, chunk_size, device); chunking bounds memory.
        """
        n_seq = check_int(n_sequences, "n_sequences")
        n_steps = check_int(n_steps, "n_steps", 0)
        chunk = check_int(chunk_size, "chunk_size")
        seed = check_int(seed, "seed", 0)
        device = torch.device("cpu" if device is None else device)
        density = None
        if initial_occupancy is None:
            density = self.initial_density(n_seq, seed, family)
        else:
            start = self._check_occupancy(initial_occupancy, n_seq)
        occupancy = np.empty((n_seq, n_steps + 1, self.n_sites), dtype=np.int64)
        children = np.random.SeedSequence(seed).spawn(-(-n_seq // chunk))
        stepper = _Stepper.for_system(self, device)

        from tqdm import tqdm

        bar = tqdm(total=n_seq * n_steps, unit="snapshot", desc="simulate", disable=not progress)
        try:
            for c, child in enumerate(children):
                lo, hi = c * chunk, min(n_seq, (c + 1) * chunk)
                gen = torch.Generator(device=device)
                gen.manual_seed(int(child.generate_state(1, np.uint64)[0] >> np.uint64(1)))
                if density is None:
                    n = torch.as_tensor(start[lo:hi], device=device)
                else:
                    rho = torch.as_tensor(density[lo:hi], device=device)
                    n = torch.binomial(torch.full_like(rho, float(self.capacity)), rho,
                                       generator=gen).to(torch.int64)
                occupancy[lo:hi, 0] = n.cpu().numpy()
                for t in range(1, n_steps + 1):
                    for _ in range(self.micro_steps):
                        n = stepper.step(n, gen)
                    occupancy[lo:hi, t] = n.cpu().numpy()
                    bar.update(hi - lo)
        finally:
            bar.close()
        return Simulation(occupancy=occupancy, system=self, initial_density=density, seed=seed)

    def _check_occupancy(self, occ: object, n_seq: int) -> np.ndarray:
        arr = occ.cpu().numpy() if isinstance(occ, torch.Tensor) else np.asarray(occ)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"initial_occupancy: expected integers, found dtype {arr.dtype}")
        if arr.shape not in ((self.n_sites,), (n_seq, self.n_sites)):
            raise ValueError(f"initial_occupancy: expected shape ({self.n_sites},) or "
                             f"({n_seq}, {self.n_sites}), found {arr.shape}")
        if np.any(arr < 0):
            raise ValueError(f"initial_occupancy: expected non-negative counts, found "
                             f"min {arr.min()}")
        return np.broadcast_to(arr.astype(np.int64), (n_seq, self.n_sites)).copy()


# -- initial conditions ----------------------------------------------------------------------
def initial_profiles(
    rng: np.random.Generator,
    n_sequences: int,
    x: np.ndarray,
    family: str = "fourier",
    domain: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Random smooth periodic density profiles ρ(x) in [0.1, 0.9], float64 (n_sequences, len(x)).

    ``x`` (n_points,): positions in ``domain``. Families (``FAMILIES``):

    - ``"fourier"``: mean ~ U(0.3, 0.7) plus modes k = 1..3 with Normal(0, (0.25/k)²)
      coefficients, the fluctuation scaled down (if needed) to stay within [0.1, 0.9];
    - ``"bumps"``: a floor ~ U(0.1, 0.35) plus 1-3 periodic Gaussian bumps of width
      U(0.05, 0.2) L and heights summing to at most 0.9 - floor;
    - ``"steps"``: 2-4 plateaus at levels ~ U(0.1, 0.9) between random points, joined by tanh
      fronts of width U(0.02, 0.05) L (smooth on the lattice and on 25 bins).
    """
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, found {family!r}")
    n = check_int(n_sequences, "n_sequences")
    a, b = domain
    length = b - a
    phase = 2.0 * np.pi * (np.asarray(x, dtype=np.float64) - a) / length  # (n_points,)
    out = np.empty((n, phase.size))
    for i in range(n):
        if family == "fourier":
            k = np.arange(1, 4)
            ca, cb = rng.normal(size=(2, 3)) * (0.25 / k)
            fluct = ca @ np.cos(np.outer(k, phase)) + cb @ np.sin(np.outer(k, phase))
            mean = rng.uniform(0.3, 0.7)
            room = min(mean - 0.1, 0.9 - mean)
            scale = min(1.0, room / max(np.abs(fluct).max(), 1e-12))
            out[i] = mean + scale * fluct
        elif family == "bumps":
            floor = rng.uniform(0.1, 0.35)
            n_bumps = rng.integers(1, 4)
            heights = rng.dirichlet(np.ones(n_bumps)) * rng.uniform(0.3, 1.0) * (0.9 - floor)
            rho = np.full(phase.size, floor)
            for h in heights:
                centre, width = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2) * 2 * np.pi
                d = np.angle(np.exp(1j * (phase - centre)))  # periodic distance
                rho += h * np.exp(-0.5 * (d / width) ** 2)
            out[i] = rho
        else:
            n_plateaus = rng.integers(2, 5)
            edges = np.sort(rng.uniform(0, 2 * np.pi, n_plateaus))
            levels = rng.uniform(0.1, 0.9, n_plateaus)
            width = rng.uniform(0.02, 0.05) * 2 * np.pi
            out[i] = _steps_profile(phase, edges, levels, width)
    return np.clip(out, 0.1, 0.9)


def _steps_profile(phase: np.ndarray, edges: np.ndarray, levels: np.ndarray,
                   width: float) -> np.ndarray:
    """Periodic plateaus: ``levels[j]`` on [edges[j], edges[j+1]), tanh fronts at the edges."""
    rho = np.zeros_like(phase)
    m = len(edges)
    for j in range(m):
        start, end = edges[j], edges[(j + 1) % m] + (2 * np.pi if j == m - 1 else 0.0)
        # indicator of the arc [start, end) smoothed by tanh, summed over periodic images
        for shift in (-2 * np.pi, 0.0, 2 * np.pi):
            p = phase + shift
            rho += levels[j] * 0.5 * (np.tanh((p - start) / width) - np.tanh((p - end) / width))
    return rho


# -- the exact sampler -----------------------------------------------------------------------
class _BinomialTable:
    """Exact Binomial(n, p_j) draws for n in 0..n_max and fixed probabilities p_j, j < n_p.

    Key ``j * (n_max + 1) + n``; one gather of ``bits`` uniform bits per draw; leftover table
    slots hold a sentinel and resolve through the residual inverse CDF.
    """

    def __init__(self, probs: np.ndarray, n_max: int, bits: int, device: torch.device) -> None:
        probs = np.asarray(probs, dtype=np.float64)
        n_p, size = probs.size, n_max + 1
        self.n_max, self.bits, self.n_p = n_max, bits, n_p
        self.probs = torch.as_tensor(probs, device=device)
        k = np.arange(size, dtype=np.float64)
        nn = k[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_choose = (_lgamma(nn + 1) - _lgamma(k + 1) - _lgamma(np.maximum(nn - k, 0) + 1))
            p = probs[:, None, None]
            logpmf = (log_choose + _xlogy(k, p) + _xlogy(nn - k, 1 - p))
        pmf = np.where(k <= nn, np.exp(logpmf), 0.0)  # (n_p, n + 1, k + 1)
        pmf /= pmf.sum(-1, keepdims=True)
        pmf = pmf.reshape(n_p * size, size)
        scale = float(1 << bits)
        copies = np.floor(pmf * scale).astype(np.int64)
        used = copies.sum(-1)
        self.dtype = torch.uint8 if n_max < 255 else torch.int16
        self.sentinel = 255 if n_max < 255 else -1
        lut = np.full((n_p * size, 1 << bits), self.sentinel,
                      dtype=np.uint8 if n_max < 255 else np.int16)
        rows = np.repeat(np.arange(n_p * size), used)
        starts = np.cumsum(used) - used
        cols = np.arange(rows.size) - np.repeat(starts, used)
        lut[rows, cols] = np.repeat(np.tile(np.arange(size), n_p * size), copies.reshape(-1))
        self.lut = torch.as_tensor(lut.reshape(-1), device=device)
        residual = np.clip(pmf - copies / scale, 0.0, None)
        self.residual_cdf = torch.as_tensor(np.cumsum(residual, -1), device=device)

    def sample(self, n: torch.Tensor, j: torch.Tensor | int, raw: torch.Tensor,
               generator: torch.Generator, may_overflow: bool = True) -> torch.Tensor:
        """Draws int64 shaped like ``n``; ``raw`` holds >= ``bits`` uniform bits per element.

        ``may_overflow=False`` promises ``n <= n_max`` (skips that check).
        """
        over = n > self.n_max if may_overflow else None
        any_over = may_overflow and bool(over.any())
        key_n = n.clamp(max=self.n_max) if any_over else n
        key = key_n if self.n_p == 1 else j * (self.n_max + 1) + key_n
        idx = (key << self.bits) | (raw & ((1 << self.bits) - 1))
        out = torch.take(self.lut, idx)
        miss = out == self.sentinel
        out = out.to(torch.int64)
        if bool(miss.any()):
            pos = miss.nonzero(as_tuple=True)
            cdf = self.residual_cdf[key[pos]]  # (n_miss, n_max + 1)
            u = torch.rand(cdf.shape[0], generator=generator, dtype=torch.float64,
                           device=n.device) * cdf[:, -1]
            # first entry with cdf > u: never a zero-width (zero-probability) outcome
            out[pos] = (cdf <= u[:, None]).sum(-1).clamp(max=self.n_max)
        if any_over:  # counts beyond the table: exact, slower draws
            pos = over.nonzero(as_tuple=True)
            p = self.probs[0] if self.n_p == 1 else self.probs[j[pos]]
            counts = n[pos].to(torch.float64)
            out[pos] = torch.binomial(counts, p.expand_as(counts).contiguous(),
                                      generator=generator).to(torch.int64)
        return out


def _lgamma(x: np.ndarray) -> np.ndarray:
    return torch.lgamma(torch.as_tensor(x, dtype=torch.float64)).numpy()


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = np.broadcast_arrays(x, y)
    out = np.zeros(x.shape)
    nz = x != 0
    out[nz] = x[nz] * np.log(y[nz])
    return out


class _Stepper:
    """Lookup tables of one system on one device, and the vectorised micro step."""

    def __init__(self, system: ExclusionSystem, device: torch.device) -> None:
        K = system.capacity
        self.K = K
        # Occupancies rarely exceed K (a full site accepts nothing); tries are ~ p n.
        n_max = max(254, math.ceil(1.25 * K))
        p_max = max(system.p_left, system.p_right)
        t_max = min(n_max, int(p_max * n_max + 5 * math.sqrt(n_max * p_max * (1 - p_max)) + 8))
        # 12 bits keep the count-keyed tables in cache (~1 MB); residual mass ~0.5 %
        bits_tries = min(12, int(math.log2(_MAX_TABLE // (n_max + 1))))
        bits_acc = min(16, int(math.log2(_MAX_TABLE // ((K + 1) * (t_max + 1)))))
        ratio = system.p_right / (1 - system.p_left) if system.p_left < 1 else 0.0
        self.left = _BinomialTable(np.array([system.p_left]), n_max, bits_tries, device)
        self.right = _BinomialTable(np.array([min(ratio, 1.0)]), n_max, bits_tries, device)
        # acceptance 1 - m/K for target occupancy m = 0..K (m >= K: 0)
        self.accept = _BinomialTable(1.0 - np.arange(K + 1) / K, t_max, bits_acc, device)
        self.bits = (bits_tries, bits_tries, bits_acc, bits_acc)
        self.total_bits = sum(self.bits)
        if self.total_bits > 62:
            raise ValueError(f"capacity: table bits {self.total_bits} exceed 62")

    @staticmethod
    def for_system(system: ExclusionSystem, device: torch.device | str) -> _Stepper:
        # the tables depend on the jump rule only, not on the lattice size
        rule = ExclusionSystem(capacity=system.capacity, p_left=system.p_left,
                               p_right=system.p_right)
        return _stepper_cache(rule, str(torch.device(device)))

    def step(self, n: torch.Tensor, generator: torch.Generator,
             return_flux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        raw = torch.randint(0, 1 << self.total_bits, n.shape, generator=generator,
                            device=n.device)
        b0, b1, b2, _ = self.bits
        # one reduction decides whether any count can exceed a table (almost never)
        big = int(n.max()) > min(self.left.n_max, self.accept.n_max)
        tries_left = self.left.sample(n, 0, raw, generator, big)
        tries_right = self.right.sample(n - tries_left, 0, raw >> b0, generator, big)
        # target occupancies at the start of the step; n >= K accepts nothing
        m_left = torch.roll(n, 1, -1).clamp_(max=self.K)
        m_right = torch.roll(n, -1, -1).clamp_(max=self.K)
        go_left = self.accept.sample(tries_left, m_left, raw >> (b0 + b1), generator, big)
        go_right = self.accept.sample(tries_right, m_right, raw >> (b0 + b1 + b2), generator,
                                      big)
        arrive_from_right = torch.roll(go_left, -1, -1)
        new = n - go_left - go_right + arrive_from_right + torch.roll(go_right, 1, -1)
        return (new, go_right - arrive_from_right) if return_flux else new


def _check_state(occupancy: object, n_sites: int) -> torch.Tensor:
    if not isinstance(occupancy, torch.Tensor) or occupancy.dtype != torch.int64:
        raise ValueError(f"occupancy: expected an int64 torch tensor (..., {n_sites}), found "
                         f"{getattr(occupancy, 'dtype', type(occupancy).__name__)}")
    if occupancy.ndim < 1 or occupancy.shape[-1] != n_sites:
        raise ValueError(f"occupancy: expected shape (..., {n_sites}), found "
                         f"{tuple(occupancy.shape)}")
    return occupancy


@lru_cache(maxsize=8)
def _stepper_cache(system: ExclusionSystem, device: str) -> _Stepper:
    return _Stepper(system, torch.device(device))


# -- references ------------------------------------------------------------------------------
def hydrodynamic_solution(
    system: ExclusionSystem,
    density0: np.ndarray,
    times: np.ndarray,
    refine: int = 1,
) -> np.ndarray:
    """Finite-volume solution of ``ρ_t + (v ρ (1 - ρ))_x = D ρ_xx``, ρ (..., len(times), n_sites).

    ``density0`` (..., n_sites): ρ = n / K at t = 0 on the lattice (any real profile);
    ``times``: non-negative physical times (snapshot k is at ``k * coarse_dt``). Cells are the
    lattice sites split into ``refine`` sub-cells; the flux at a face is the average of the
    physical fluxes of its two cells minus ``D`` times the centred gradient, stepped by Heun's
    method with ``refine²`` sub-steps per micro step (diffusion number ``(p_l + p_r) / 4``, cell
    Péclet number ``2 |p_r - p_l| / ((p_l + p_r) refine)`` < 2 for the defaults: stable and
    non-oscillatory). Second order in space and time: the difference between ``refine`` and
    ``2 * refine`` estimates the discretisation error (and shrinks ~4× per refinement).
    The result is averaged back onto the lattice sites. Mass is conserved to round-off.
    """
    rho = np.asarray(density0, dtype=np.float64)
    if rho.ndim < 1 or rho.shape[-1] != system.n_sites or not np.all(np.isfinite(rho)):
        raise ValueError(f"density0: expected finite values of shape (..., {system.n_sites}), "
                         f"found {rho.shape}")
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"times: expected a 1-D array of finite times >= 0, found {times!r}")
    r = check_int(refine, "refine")
    # lattice units: cell width 1/r sites, time step 1/r² micro steps
    v, diff = system.p_right - system.p_left, 0.5 * (system.p_left + system.p_right)
    h, dt = 1.0 / r, 1.0 / r**2
    u = np.repeat(rho, r, axis=-1)

    def rate(u: np.ndarray) -> np.ndarray:
        up = np.roll(u, -1, -1)
        face = 0.5 * v * (u * (1 - u) + up * (1 - up)) - diff * (up - u) / h
        return -(face - np.roll(face, 1, -1)) / h

    micro = np.rint(t / system.micro_dt * r**2).astype(np.int64)  # sub-steps to each time
    order = np.argsort(micro)
    out = np.empty(rho.shape[:-1] + (t.size, system.n_sites))
    done = 0
    for i in order:
        for _ in range(int(micro[i]) - done):
            k1 = rate(u)
            u = u + 0.5 * dt * (k1 + rate(u + dt * k1))
        done = int(micro[i])
        out[..., i, :] = u.reshape(u.shape[:-1] + (system.n_sites, r)).mean(-1)
    return out


@dataclass(eq=False)
class MonteCarloFloor:
    """Mean of R FG replicas restarted from a true FG state (the interacting system's floor).

    replicas: bin fractions of every replica, float64 (n_replicas, n_sequences, len(horizons),
    n_bins). ``mean`` and ``stderr`` (standard error of that mean, per bin) have the shape
    without the replica axis.
    """

    replicas: np.ndarray
    horizons: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.replicas.mean(0)

    @property
    def stderr(self) -> np.ndarray:
        r = self.replicas.shape[0]
        return self.replicas.std(0, ddof=1) / np.sqrt(r)

    def error(self, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The floor error and its Monte-Carlo standard error, each (len(horizons),).

        ``observed`` (n_sequences, len(horizons), n_bins): true bin fractions at T + h. Error:
        mean over sequences of ``Σ_j |mean_j - observed_j|``; its standard error is the
        jackknife over replicas.
        """
        obs = np.asarray(observed, dtype=np.float64)
        if obs.shape != self.replicas.shape[1:]:
            raise ValueError(f"observed: expected shape {self.replicas.shape[1:]}, "
                             f"found {obs.shape}")
        err = np.abs(self.mean - obs).sum(-1).mean(0)
        r = self.replicas.shape[0]
        loo = (self.replicas.sum(0)[None] - self.replicas) / (r - 1)
        loo_err = np.abs(loo - obs[None]).sum(-1).mean(1)  # (R, len(horizons))
        se = np.sqrt((r - 1) / r * ((loo_err - loo_err.mean(0)) ** 2).sum(0))
        return err, se


def monte_carlo_floor(
    system: ExclusionSystem,
    state_at_T: np.ndarray,
    horizons,
    n_bins: int = 25,
    n_replicas: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    chunk_size: int = 256,
) -> MonteCarloFloor:
    """Run ``n_replicas`` FG replicas from the true state at T and bin them at T + h.

    ``state_at_T`` int (n_sequences, n_sites); ``horizons``: positive coarse steps ahead.
    Returns a :class:`MonteCarloFloor` (replicas (n_replicas, n_sequences, len(horizons),
    n_bins) as fractions). The replicas use their own random streams (``seed``).
    """
    occ = np.asarray(state_at_T)
    if occ.ndim != 2 or occ.shape[-1] != system.n_sites or occ.dtype.kind not in "iu":
        raise ValueError(f"state_at_T: expected integer occupancies (n_sequences, "
                         f"{system.n_sites}), found {occ.shape} of dtype {occ.dtype}")
    hs = np.atleast_1d(np.asarray(horizons))
    if hs.ndim != 1 or hs.dtype.kind not in "iu" or np.any(hs < 1):
        raise ValueError(f"horizons: expected positive integer coarse steps, found {horizons!r}")
    r = check_int(n_replicas, "n_replicas")
    if r < 2:
        raise ValueError(f"n_replicas: expected at least 2 (for a standard error), found {r}")
    bin_of_site(system.n_sites, n_bins)
    n_seq = occ.shape[0]
    start = np.tile(occ, (r, 1))  # replica-major: (r * n_seq, n_sites)
    sim = system.simulate(r * n_seq, int(hs.max()), seed=seed, initial_occupancy=start,
                          device=device, chunk_size=chunk_size)
    counts = bin_fractions(sim.occupancy[:, hs], n_bins).astype(np.float64)
    frac = counts / counts.sum(-1, keepdims=True)
    return MonteCarloFloor(replicas=frac.reshape(r, n_seq, hs.size, n_bins),
                           horizons=hs.astype(np.int64))


def simulate_exclusion_dataset(
    n_sequences: int = 64,
    n_steps: int = 40,
    n_bins: int = 25,
    seed: int = 0,
    system: ExclusionSystem | None = None,
    family: str = "fourier",
    device: str | torch.device | None = None,
    progress: bool = False,
    **system_kwargs,
) -> tuple[Dataset, Simulation]:
    """Simulate the soft-exclusion system and bin it: ``(Dataset, Simulation)``.

    Counts int64 (n_sequences, n_steps + 1, n_bins), ``dt = system.coarse_dt``. Give either
    ``system`` or ``system_kwargs`` (fields of :class:`ExclusionSystem`).
    """
    if system is None:
        system = ExclusionSystem(**system_kwargs)
    elif system_kwargs:
        raise ValueError(f"system_kwargs: expected none with system=, found "
                         f"{sorted(system_kwargs)}")
    bin_of_site(system.n_sites, n_bins)  # fail before simulating
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, found {family!r}")
    sim = system.simulate(n_sequences, n_steps, seed=seed, family=family, device=device,
                          progress=progress)
    return sim.to_dataset(n_bins), sim
