"""cgpyro: physics-aware probabilistic coarse-graining of multiscale dynamics with Pyro.

Axis convention everywhere: ``(sequence, time, bin)`` for coarse quantities and
``(sequence, time, site)`` for fine-grained lattice occupancies.
"""

__version__ = "0.1.0"
