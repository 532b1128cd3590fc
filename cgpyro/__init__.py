"""cgpyro: physics-aware probabilistic coarse-graining of multiscale dynamics with Pyro.

Axis convention everywhere: ``(sequence, time, bin)`` for coarse quantities and
``(sequence, time, site)`` for fine-grained lattice occupancies.
"""

from . import plots
from ._version import __version__ as __version__
from .data import DataError, Dataset, load, save
from .diagnostics import to_inference_data
from .guides import AmortizedGuide, LogNormalGuide, auto_guide, guide_for_new_sequences
from .inference import NumericalError, SVIInference
from .model import CGModel
from .predict import Forecast, forecast
from .specs import load_guide, load_model
from .systems import ParticleSystem, simulate_dataset

__all__ = [
    "AmortizedGuide",
    "CGModel",
    "DataError",
    "Dataset",
    "Forecast",
    "LogNormalGuide",
    "NumericalError",
    "ParticleSystem",
    "SVIInference",
    "auto_guide",
    "forecast",
    "guide_for_new_sequences",
    "load",
    "load_guide",
    "load_model",
    "plots",
    "save",
    "simulate_dataset",
    "to_inference_data",
]
