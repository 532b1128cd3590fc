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
import tomllib
from pathlib import Path

from .data import Dataset
from .specs import SpecError, specs_dir
from .systems import ParticleSystem, Simulation, simulate_dataset

__all__ = ["DatasetSpec", "load_dataset_spec", "simulate_spec"]

_SAMPLING = {"n_sequences": 64, "n_steps": 40, "n_bins": 25, "seed": 0}
_SYSTEMS = ("particles", "exclusion")


def _system_class(system: str) -> type:
    if system == "exclusion":
        from .exclusion import ExclusionSystem  # torch: only when asked for

        return ExclusionSystem
    return ParticleSystem


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    system: str
    system_params: dict
    sampling: dict
    path: Path


def _resolve(path_or_name) -> Path:
    path = Path(path_or_name)
    if path.is_file():
        return path
    candidate = specs_dir() / "data" / f"{path.stem if path.suffix == '.toml' else path}.toml"
    if candidate.is_file():
        return candidate
    raise SpecError(f"no dataset spec {str(path_or_name)!r}: not a file and not in "
                    f"{specs_dir() / 'data'}")


def load_dataset_spec(path_or_name) -> DatasetSpec:
    """Read and validate a dataset spec; :class:`~cgpyro.specs.SpecError` names the key."""
    path = _resolve(path_or_name)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not valid TOML ({err})") from None
    unknown = set(raw) - {"name", "description", "system", "system_params", "sampling"}
    if unknown:
        raise SpecError(f"{path}: unknown key {sorted(unknown)[0]!r}; allowed: name, "
                        "description, system, system_params, sampling")
    system = raw.get("system", "particles")
    if system not in _SYSTEMS:
        raise SpecError(f"{path}: system: expected 'particles' or 'exclusion', found {system!r}")
    cls = _system_class(system)
    system_keys = {f.name for f in dataclasses.fields(cls)}
    params = raw.get("system_params", {})
    bad = set(params) - system_keys
    if bad:
        raise SpecError(f"{path}: [system_params] unknown key {sorted(bad)[0]!r}; allowed: "
                        f"{', '.join(sorted(system_keys))}")
    sampling = {**_SAMPLING, **raw.get("sampling", {})}
    bad = set(sampling) - set(_SAMPLING) - {"family"}
    if bad:
        raise SpecError(f"{path}: [sampling] unknown key {sorted(bad)[0]!r}; allowed: "
                        f"{', '.join(_SAMPLING)}, family")
    if "family" in sampling:
        families = _families(system)
        if sampling["family"] not in families:
            raise SpecError(f"{path}: [sampling] family: expected one of "
                            f"{', '.join(families) or '(none for this system)'}, "
                            f"found {sampling['family']!r}")
    for key, value in sampling.items():
        if key == "family":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed"
                                                                            else 1):
            raise SpecError(f"{path}: [sampling] {key}: expected a "
                            f"{'non-negative' if key == 'seed' else 'positive'} integer, "
                            f"found {value!r}")
    try:
        cls(**params)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{path}: [system_params] {err}") from None
    return DatasetSpec(raw.get("name", path.stem), system, dict(params), sampling, path)


def _families(system: str) -> tuple[str, ...]:
    if system == "exclusion":
        from .exclusion import FAMILIES

        return FAMILIES
    import inspect

    from . import systems

    # the reference system's families, once it has them (helper P's ``family=`` argument)
    if "family" not in inspect.signature(simulate_dataset).parameters:
        return ()
    return tuple(getattr(systems, "FAMILIES", ("fourier", "bumps", "steps")))


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
