"""Declarative dataset specs (``data/*.toml``) for the FG simulators.

A spec names the system, its parameters (keyword arguments of
:class:`~cgpyro.systems.ParticleSystem` or :class:`~cgpyro.exclusion.ExclusionSystem`) and the
sampling (sequences, coarse steps, CG bins, seed, optionally the initial-condition family)::

    name = "particles_paper"
    system = "particles"  # or "exclusion"
    [system_params]   # n_particles, n_sites, p_left, p_right, micro_dt, micro_steps, domain
                      # (exclusion: n_sites, capacity, p_left, p_right, micro_steps, micro_dt,
                      # domain)
    [sampling]        # n_sequences, n_steps, n_bins, seed, family

Generated data belongs in ``data/generated/`` (git-ignored).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ._checks import check_int
from ._toml import SpecError, Table, display, read, resolve, show
from .data import Dataset
from .systems import FAMILIES as PARTICLE_FAMILIES
from .systems import ParticleSystem, Simulation, simulate_dataset

__all__ = ["DatasetSpec", "load_dataset_spec", "simulate_spec"]

_KEYS = ("name", "description", "system", "system_params", "sampling")
_SYSTEMS = ("particles", "exclusion")
# Keyword arguments of simulate_dataset / simulate_exclusion_dataset (their defaults apply)
_SAMPLING = ("n_sequences", "n_steps", "n_bins", "seed", "family")


def _system_class(system: str) -> type:
    if system == "exclusion":
        from .exclusion import ExclusionSystem  # torch: only when asked for

        return ExclusionSystem
    return ParticleSystem


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A validated dataset spec: ``system_params`` and ``sampling`` hold the keyword arguments
    the spec gives (of the system class and the simulate function)."""

    name: str
    system: str
    system_params: dict
    sampling: dict
    path: Path


def load_dataset_spec(path_or_name) -> DatasetSpec:
    """Read and validate a dataset spec; :class:`~cgpyro.specs.SpecError` names the key."""
    path = resolve(path_or_name, "data", "dataset")
    raw, _ = read(path)
    file = display(path)
    top = Table(file, "", raw, _KEYS)
    system = top.get_str("system", "particles")
    if system not in _SYSTEMS:
        top.fail("system", f"expected 'particles' or 'exclusion', found {show(system)}")
    cls = _system_class(system)
    params = Table(file, "[system_params]", raw.get("system_params", {}),
                   {f.name for f in dataclasses.fields(cls)})
    sampling = Table(file, "[sampling]", raw.get("sampling", {}), _SAMPLING)
    values = dict(sampling.data)
    for key, value in values.items():
        if key == "family":
            sampling.get_str(key, choices=_families(system))
            continue
        try:
            check_int(value, key, minimum=0 if key == "seed" else 1)
        except ValueError as err:
            sampling.fail(key, str(err).partition(": ")[2])
    try:
        cls(**params.data)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{file}: [system_params] {err}") from None
    return DatasetSpec(top.get_str("name", path.stem), system, dict(params.data), values, path)


def _families(system: str) -> tuple[str, ...]:
    if system == "exclusion":
        from .exclusion import FAMILIES

        return FAMILIES
    return PARTICLE_FAMILIES


def simulate_spec(path_or_name, progress: bool = False,
                  device: str | None = None) -> tuple[Dataset, Simulation]:
    """Simulate the dataset a spec describes: ``(Dataset, Simulation)``.

    ``device`` (exclusion only): where to micro-step (default CPU).
    """
    spec = load_dataset_spec(path_or_name)
    if spec.system == "exclusion":
        from .exclusion import ExclusionSystem, simulate_exclusion_dataset

        return simulate_exclusion_dataset(**spec.sampling, system=ExclusionSystem(
            **spec.system_params), device=device, progress=progress)
    return simulate_dataset(**spec.sampling, progress=progress, **spec.system_params)
