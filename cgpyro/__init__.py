"""cgpyro: physics-aware probabilistic coarse-graining of multiscale dynamics with Pyro.

Axis convention everywhere: ``(sequence, time, bin)`` for coarse quantities and
``(sequence, time, site)`` for fine-grained lattice occupancies.

The public names below are imported on first use (PEP 562), so ``import cgpyro`` and the
command line do not pay for torch, Pyro, ArviZ or matplotlib until a name that needs them is
touched. Every error class a user can meet is exported here (all are ``ValueError``s but
:class:`NumericalError`, a ``RuntimeError``); the public modules are those in
``_SUBMODULES``, the others (``cgpyro._*``) are internal.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
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
    "SpecError": "_toml",  # the class cgpyro.specs raises, without importing torch
    "RunError": "run",
    "RunLockedError": "run",
    # model, guides, inference, prediction
    "CGModel": "model",
    "AmortizedGuide": "guides",
    "CGGuide": "guides",
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
    # a run directory: create / open / fit / resume / forecast
    "Run": "run",
}
# the public submodules, reachable as attributes (``cgpyro.plots.plot_loss``) without an
# explicit import
_SUBMODULES = {"cli", "curve", "data", "datasets", "diagnostics", "exclusion", "experiment",
               "guides", "inference", "metrics", "model", "plots", "predict", "reference", "run",
               "specs", "systems"}

__all__ = [  # a literal list, so that linters see the names the TYPE_CHECKING block binds
    "AmortizedGuide", "CGGuide", "CGModel", "CheckpointError", "DataError", "Dataset", "Forecast",
    "LogNormalGuide", "NumericalError", "ParticleSystem", "Run", "RunError", "RunLockedError",
    "SVIInference", "SpecError",
    "auto_guide", "forecast", "guide_for_new_sequences", "list_specs", "load", "load_guide",
    "load_model", "plots", "save", "simulate_dataset", "to_inference_data",
]


def _quiet_tqdm_in_kernels_without_widgets() -> None:
    """Pyro imports ``tqdm.auto``, which in a Jupyter kernel without ipywidgets warns
    ``IProgress not found`` (ipywidgets comes with ``make notebook``). Import it once here with
    only that warning silenced, so ``import cgpyro`` before ``import pyro`` shows none; cgpyro's
    own bars use plain tqdm there (:mod:`cgpyro._progress`).
    """
    if "ipykernel.zmqshell" not in sys.modules or "tqdm.autonotebook" in sys.modules:
        return
    if importlib.util.find_spec("ipywidgets") is not None:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        importlib.import_module("tqdm.autonotebook")


_quiet_tqdm_in_kernels_without_widgets()


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
    from ._toml import SpecError
    from .checkpoint import CheckpointError
    from .data import DataError, Dataset, load, save
    from .diagnostics import to_inference_data
    from .guides import AmortizedGuide, CGGuide, LogNormalGuide, auto_guide, guide_for_new_sequences
    from .inference import NumericalError, SVIInference
    from .model import CGModel
    from .predict import Forecast, forecast
    from .run import Run, RunError, RunLockedError
    from .specs import list_specs, load_guide, load_model
    from .systems import ParticleSystem, simulate_dataset
