"""cgpyro: physics-aware probabilistic coarse-graining of multiscale dynamics with Pyro.

Axis convention everywhere: ``(sequence, time, bin)`` for coarse quantities and
``(sequence, time, site)`` for fine-grained lattice occupancies.

The public names below are imported on first use (PEP 562), so ``import cgpyro`` and the
command line do not pay for torch, Pyro, ArviZ or matplotlib until a name that needs them is
touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__

# public name -> submodule that defines it
_EXPORTS = {
    # data
    "DataError": "data",
    "Dataset": "data",
    "load": "data",
    "save": "data",
    # errors of the other layers
    "CheckpointError": "checkpoint",
    "NumericalError": "inference",
    "SpecError": "specs",
    # model, guides, inference, prediction
    "CGModel": "model",
    "AmortizedGuide": "guides",
    "LogNormalGuide": "guides",
    "auto_guide": "guides",
    "guide_for_new_sequences": "guides",
    "SVIInference": "inference",
    "Forecast": "predict",
    "forecast": "predict",
    # specs, simulators, diagnostics
    "load_guide": "specs",
    "load_model": "specs",
    "list_specs": "specs",
    "ParticleSystem": "systems",
    "simulate_dataset": "systems",
    "to_inference_data": "diagnostics",
}
# submodules reachable as attributes (``cgpyro.plots.plot_loss``) without an explicit import
_SUBMODULES = {"plots", "diagnostics", "metrics", "specs", "experiment"}

__all__ = [  # a literal list, so that linters see the names the TYPE_CHECKING block binds
    "AmortizedGuide", "CGModel", "CheckpointError", "DataError", "Dataset", "Forecast",
    "LogNormalGuide", "NumericalError", "ParticleSystem", "SVIInference", "SpecError",
    "auto_guide", "forecast", "guide_for_new_sequences", "list_specs", "load", "load_guide",
    "load_model", "plots", "save", "simulate_dataset", "to_inference_data",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static analysers and IDEs see the eager form
    from . import plots
    from .checkpoint import CheckpointError
    from .data import DataError, Dataset, load, save
    from .diagnostics import to_inference_data
    from .guides import AmortizedGuide, LogNormalGuide, auto_guide, guide_for_new_sequences
    from .inference import NumericalError, SVIInference
    from .model import CGModel
    from .predict import Forecast, forecast
    from .specs import SpecError, list_specs, load_guide, load_model
    from .systems import ParticleSystem, simulate_dataset
