"""Virtual observables (eq. 6-8): ``ĉ_l = c(X_l) + σ_c ε`` observed at ``ĉ_l = 0``.

Each virtual observable is a differentiable constraint ``c: (..., n_bins) -> (..., M)`` and a
tolerance ``σ_c``. Stiff tolerances (the paper: σ_c² = 1e-9) are reached by annealing ``σ_c``
geometrically from ``sigma_start`` during the first ``anneal_fraction`` of training, as the
authors' code raises the penalty precision step by step.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import inspect
import math
import os
import site
import sys
import sysconfig
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import pyro.distributions as dist
import torch

from ._sites import ThetaModule, const
from .distributions import lognormal_moments

__all__ = ["ImportPolicy", "VirtualObservable", "annealing", "constraint_identity",
           "import_policy", "mass_conservation", "resolve_constraint"]


def mass_conservation(x: torch.Tensor) -> torch.Tensor:
    """Eq. 18: ``c(X) = 1 - Σ_j X_j``, shape ``(..., 1)``."""
    return 1.0 - x.sum(-1, keepdim=True)


mass_conservation.affine = (torch.ones(1), -torch.ones(1, 1))


BUILTIN_CONSTRAINTS: dict[str, Callable] = {"mass": mass_conservation}


@dataclass(frozen=True)
class ImportPolicy:
    """What :func:`resolve_constraint` may import while a run directory is being loaded.

    A run's ``model.toml`` names constraints ``module:function``; loading a run must not run
    code the user did not choose. Under a policy a constraint module is imported only if it is
    ``allowed`` (module names, or ``"*"``) or lives in an installed package (site-packages, or
    cgpyro itself), never from a ``forbidden`` directory (the run directory, the current
    directory) even if ``sys.path`` lists it; its source must match the ``recorded`` identity
    (``{spec: {"module", "sha256"}}`` from :func:`constraint_identity` at training); and the
    object must be a plain Python function.
    """

    allowed: frozenset = frozenset()
    forbidden: tuple = ()
    recorded: dict = field(default_factory=dict)


_POLICY: ContextVar[ImportPolicy | None] = ContextVar("cgpyro_import_policy", default=None)


@contextmanager
def import_policy(policy: ImportPolicy):
    """Apply ``policy`` to every :func:`resolve_constraint` in the ``with`` block."""
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def _installed_roots() -> list[Path]:
    roots = [*site.getsitepackages(), site.getusersitepackages(),
             sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return [Path(r).resolve() for r in roots] + [Path(__file__).resolve().parent]


def _under(path: Path, roots) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _module_origin(module_name: str, forbidden: tuple) -> Path | None:
    """Where ``module_name`` would be imported from, without importing it (``None``: not
    found outside the forbidden directories)."""
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        return Path(origin).resolve() if origin else None
    search = []
    for entry in sys.path:
        where = Path(entry or os.getcwd()).resolve()
        if not _under(where, forbidden):
            search.append(str(where))
    parts = module_name.split(".")
    spec = None
    for i in range(len(parts)):  # walk packages by their search locations, importing nothing
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), search)
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    return Path(spec.origin).resolve() if spec and spec.origin else None


def constraint_identity(spec: str) -> dict | None:
    """``{"module", "sha256"}`` of a constraint's source file, to record beside a run
    (``None`` for built-ins and modules without a source file)."""
    if spec in BUILTIN_CONSTRAINTS or ":" not in spec:
        return None
    module_name = spec.partition(":")[0]
    origin = _module_origin(module_name, ())
    if origin is None or not origin.is_file():
        return None
    return {"module": module_name, "sha256": hashlib.sha256(origin.read_bytes()).hexdigest()}


def _check_policy(spec: str, module_name: str, policy: ImportPolicy) -> None:
    if "*" in policy.allowed or module_name in policy.allowed or \
            module_name.partition(".")[0] == __name__.partition(".")[0]:  # cgpyro itself
        return
    forbidden = tuple(Path(p).resolve() for p in policy.forbidden)
    allow = f"allow it with --allow-import {module_name} if you trust it"
    origin = _module_origin(module_name, forbidden)
    if origin is None and module_name in sys.modules:
        raise ValueError(f"constraint {spec!r}: {module_name!r} is built into Python, not a "
                         "package of constraints")
    if origin is None:
        if _module_origin(module_name, ()) is not None:
            raise ValueError(f"constraint {spec!r}: refused to import {module_name!r} from the "
                             f"run directory or the current directory; {allow}")
        raise ValueError(f"constraint {spec!r}: module {module_name!r} is not installed")
    if not _under(origin, _installed_roots()) or _under(origin, forbidden):
        raise ValueError(f"constraint {spec!r}: {module_name!r} ({origin}) is not an installed "
                         f"package; {allow}")
    recorded = policy.recorded.get(spec)
    if recorded and origin.is_file() and \
            hashlib.sha256(origin.read_bytes()).hexdigest() != recorded.get("sha256"):
        raise ValueError(f"constraint {spec!r}: {origin} changed since the run was trained; "
                         f"{allow}")


def resolve_constraint(spec: str) -> Callable:
    """A built-in name (``"mass"``) or an import path ``package.module:function``.

    The function is imported, never evaluated from text; under an :class:`ImportPolicy`
    (loading a run directory) only as the policy allows.
    """
    if spec in BUILTIN_CONSTRAINTS:
        return BUILTIN_CONSTRAINTS[spec]
    if ":" not in spec:
        raise ValueError(
            f"constraint {spec!r}: expected a built-in name {sorted(BUILTIN_CONSTRAINTS)} "
            "or an import path 'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    policy = _POLICY.get()
    if policy is not None:
        _check_policy(spec, module_name, policy)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"constraint {spec!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"constraint {spec!r} is not callable")
    if policy is not None and not inspect.isfunction(fn):  # input(), sys.exit, classes, ...
        raise ValueError(f"constraint {spec!r}: expected a plain Python function of a tensor, "
                         f"found {type(fn).__name__}")
    return fn


_PROGRESS: ContextVar[float] = ContextVar("cgpyro_annealing_progress", default=1.0)


@contextmanager
def annealing(progress: float):
    """Virtual observables in this block use σ_c at training progress ``progress`` in [0, 1]
    (the training loop's schedule; outside any block σ_c is final)."""
    token = _PROGRESS.set(float(progress))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


class VirtualObservable(ThetaModule):
    r"""``p(ĉ = 0 | X, σ_c) = N(0 | c(X), σ_c² I)`` (eq. 8) at every time step.

    σ_c is :meth:`tolerance` (annealed during training: :func:`annealing`), or with ``learn``
    the site ``sigma`` (``vo.{name}.sigma`` in the model) under ``HalfCauchy(1)``.

    :param name: site name suffix (the site is ``vo.{name}``).
    :param fn: the constraint ``c``, ``(..., n_bins) -> (..., M)``.
    :param sigma: final tolerance σ_c (paper: ``sqrt(1e-9)``).
    :param sigma_start: σ_c at the start of annealing (``None``: no annealing).
    :param anneal_fraction: fraction of the training steps over which σ_c is annealed.
    :param learn: if true, σ_c is a parameter with a ``HalfCauchy`` prior (MAP) instead.
    :param affine: optional ``(a, W)`` with ``c(X) = a + W X`` (``a: (M,)``, ``W: (M, n_bins)``
        or a row broadcast over bins); enables closed-form expectations under a lognormal q.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
        sigma: float = math.sqrt(1e-9),
        sigma_start: float | None = 1e-2,
        anneal_fraction: float = 0.5,
        learn: bool = False,
        affine: tuple | None = None,
    ):
        super().__init__()
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"virtual observable {name!r}: sigma must be positive, got {sigma}")
        if sigma_start is not None and not sigma_start >= sigma:
            raise ValueError(
                f"virtual observable {name!r}: sigma_start must be >= sigma, got {sigma_start}"
            )
        if not 0.0 <= anneal_fraction <= 1.0:
            raise ValueError(f"anneal_fraction must be in [0, 1], got {anneal_fraction}")
        self.name, self.fn = name, fn
        affine = affine if affine is not None else getattr(fn, "affine", None)
        self.sigma_final, self.sigma_start = float(sigma), sigma_start
        self.anneal_fraction, self.learn = float(anneal_fraction), bool(learn)
        if self.learn:
            self.declare("sigma", lambda _: dist.HalfCauchy(const(1.0)))
        self.affine = affine

    def expected_log_prob(self, sigma, loc, scale, event_dim):
        """``E_q[log N(0 | c(X), σ²)]`` for affine ``c`` under ``LogNormal(loc, scale)``.

        ``loc, scale``: ``(..., n_bins)``; sums the last ``event_dim`` axes of ``(..., M)``.
        """
        a, W = (torch.as_tensor(v, dtype=loc.dtype, device=loc.device) for v in self.affine)
        W = W.expand(a.shape[0], loc.shape[-1])
        mean, var = lognormal_moments(loc, scale)
        c_mean = a + mean @ W.T
        c_var = var @ W.pow(2).T
        sigma = torch.as_tensor(sigma, dtype=loc.dtype, device=loc.device)
        lp = (-0.5 * (c_mean.pow(2) + c_var) / sigma**2 - torch.log(sigma)
              - 0.5 * math.log(2 * math.pi))
        return lp.sum(tuple(range(-event_dim, 0)))

    def tolerance(self, max_total: float | None = None, max_bias: float = 2.5e-4) -> float:
        """σ_c at the training progress of the enclosing :func:`annealing` block (final σ_c
        outside one), for data with at most ``max_total`` particles per snapshot.

        The schedule is geometric from ``sigma_start`` to the final σ_c over the first
        ``anneal_fraction`` of training. The final σ_c of the mass constraint is capped for
        the data: with eq. 17 the MAP of ``Σ_j X_j`` is ``1 + N σ_c²``, so the paper's
        σ_c² = 1e-9 gives 2.5e-4 at its N = 250,000 but a mass of 2 at N = 1e9; σ_c² is capped
        at ``max_bias / N`` (no change in the paper's setting; ``max_total=None``: no cap).
        """
        final, start = self.sigma_final, self.sigma_start
        if max_total is not None and self.fn is mass_conservation and not self.learn:
            final = min(final, math.sqrt(max_bias / float(max_total)))
            start = None if start is None else max(start, final)
        if start is None or self.anneal_fraction == 0:
            return final
        f = min(1.0, max(0.0, _PROGRESS.get() / self.anneal_fraction))
        return math.exp((1 - f) * math.log(start) + f * math.log(final))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``c(X)``, shape ``(..., M)`` for ``x`` of shape ``(..., n_bins)``."""
        c = self.fn(x)
        if not torch.is_tensor(c) or c.dim() == 0 or c.shape[:-1] != x.shape[:-1]:
            found = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
            expected = str((*x.shape[:-1], "M")).replace("'", "")
            raise ValueError(f"virtual observable {self.name!r}: the constraint must map X of "
                             f"shape (..., n_bins) to (..., M), here {tuple(x.shape)} to "
                             f"{expected}; it returned {found}")
        return c
