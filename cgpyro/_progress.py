"""Training progress for terminals, notebooks and log files.

- a terminal: tqdm's carriage-return bar;
- a Jupyter kernel: tqdm's widget bar when ipywidgets is installed (``make notebook``), else the
  text bar (never tqdm.auto without ipywidgets: it warns ``IProgress not found``);
- anything else (``cgpyro train > log 2>&1``, CI): one short line every 10 % of the steps, instead
  of thousands of carriage returns on one line.

The reported quantity is the SVI loss, ``loss = -ELBO`` (lower is better). While the virtual
observables' σ_c is annealed the objective itself changes each step, so the loss is comparable
only within the final phase; the postfix says which phase a value belongs to.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections.abc import Iterable

__all__ = ["LineProgress", "anneal_end", "in_notebook", "phase", "progress_bar"]


def in_notebook() -> bool:
    """True inside a Jupyter (IPython kernel) session."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class LineProgress:
    """A tqdm stand-in for logs: prints ``desc  30% 600/2000 steps  12.4 s  loss=...`` each time
    another ``every`` fraction of ``total`` is done (and at the end), one line each.

    Implements the part of tqdm's interface the training loop uses: ``update``,
    ``set_postfix``, ``close``.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "SVI", unit: str = "step",
                 every: float = 0.1, file=None):
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a positive integer, got {total!r}")
        if not 0 < every <= 1:
            raise ValueError(f"every must be in (0, 1], got {every!r}")
        self.total, self.n, self.desc, self.unit = total, int(initial), desc, unit
        self.every, self.file = float(every), file
        self.postfix = ""
        self._start = time.perf_counter()
        self._next = self._threshold_after(self.n)
        self._printed = self.n  # the step shown by the last line (nothing new to show yet)
        self._due = False

    def _threshold_after(self, n: int) -> int:
        step = max(1, math.ceil(self.every * self.total))
        return min(self.total, (n // step + 1) * step)

    def _print(self) -> None:
        elapsed = time.perf_counter() - self._start
        pct = 100 * self.n / self.total
        line = f"{self.desc} {pct:3.0f}% {self.n}/{self.total} {self.unit}s  {elapsed:.1f} s"
        if self.postfix:
            line += f"  {self.postfix}"
        print(line, file=self.file if self.file is not None else sys.stderr, flush=True)
        self._printed = self.n

    def update(self, n: int = 1) -> None:
        self._flush()
        self.n += n
        if self.n >= self._next:
            # printed by the next call, so that a postfix set right after this step shows
            self._due = True
            self._next = self._threshold_after(self.n)

    def _flush(self) -> None:
        if self._due:
            self._due = False
            self._print()

    def set_postfix(self, ordered_dict=None, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())
        self._flush()

    def close(self) -> None:
        """Print what is due, and the final state if no line showed it (an early stop)."""
        self._flush()
        if self.n != self._printed:
            self._print()


def progress_bar(total: int, initial: int = 0, *, disable: bool = False, desc: str = "SVI",
                 unit: str = "step", file=None):
    """A progress reporter for ``total`` steps (see the module docstring for which one).

    :param file: the stream (default ``sys.stderr``).
    :returns: an object with tqdm's ``update``, ``set_postfix`` and ``close``.
    """
    stream = file if file is not None else sys.stderr
    if disable:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, disable=True)
    if in_notebook():
        if importlib.util.find_spec("ipywidgets") is not None:
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=True)
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, file=stream)
    return LineProgress(total, initial, desc=desc, unit=unit, file=stream)


def anneal_end(virtual_observables: Iterable, steps: int) -> int:
    """The SVI step at which every annealed σ_c has reached its final value (0: no annealing).

    :param virtual_observables: objects with ``sigma_start``, ``sigma_final`` and
        ``anneal_fraction`` (:class:`~cgpyro.virtual.VirtualObservable`).
    """
    ends = [math.ceil(vo.anneal_fraction * steps) for vo in virtual_observables
            if vo.sigma_start is not None and vo.sigma_start != vo.sigma_final]
    return max(ends, default=0)


def phase(step: int, end: int) -> str:
    """``"annealing"`` while σ_c still changes (step < end), else ``"final"``."""
    return "annealing" if step < end else "final"
