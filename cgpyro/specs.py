"""Declarative model and guide specs (TOML files in ``models/`` and ``guides/``).

Specs are read with :mod:`tomllib` and validated key by key; nothing in them is evaluated as
Python. A user constraint is named by an import path ``package.module:function`` and imported.
Every mistake raises :class:`SpecError` (a ``ValueError``) of one line naming the file, the
table and the key, e.g. ``models/foo.toml: [transition] hidden: expected a list of positive
integers, found -3``.

A spec is a path to a ``.toml`` file or a bare name looked up in ``models/`` (``guides/``) of
the specs directory: ``$CGPYRO_SPECS_DIR`` if set, else the repository root beside the package.

Model spec (``models/NAME.toml``; absent keys take the defaults shown)::

    name = "NAME"                    # default: the file name
    description = ""
    vectorized = true                # time-vectorized model (site X) or a pyro.markov loop
    [cg]
    n_bins = "auto"                  # "auto" (from the data) or an int >= 2 that must match it
    [transition]                     # eq. 4-5: X_{t+1} ~ N(X_t + NN(X_t), Σ_r)
    drift = "mlp"                    # mlp (the paper's network) | flux (local, conservative)
    hidden = [25, 25]                # mlp: widths (may be [] with linear_skip = true)
    activation = "relu"              # relu | tanh | elu | softplus | silu
    linear_skip = false              # NN(X) = A X + b + MLP(X)
    conserve_mass = false            # project the drift onto Σ_j NN_j = 0
    noise = "isotropic"              # isotropic (σ_r² I) | full (σ_r² L Lᵀ)
    noise_ridge = 1e-4               # ridge of the full-noise initial covariance
    weight_prior_scale = 10.0        # Normal(0, s) prior on every weight and bias
    sigma_prior_scale = 0.1          # HalfCauchy(s) prior on σ_r
    sigma_r_multinomial = 0.25       # fix σ_r at 0.25 x the per-bin multinomial std of the
                                     # data (footnote 1); absent: σ_r is learned (MAP)
    radius = "auto"                  # flux: jump reach in bins ("auto": ceil(B/4), >= 2)
    correction_radius = 2            # flux: reach of the per-bin (non-equivariant) correction
    channels = []                    # flux: conv face-flux network widths ([]: linear stencil)
    kernel = 5                       # flux: odd conv kernel width (bins)
    hyper_prior_scale = 1.0          # flux: HalfCauchy(s) hyperprior on the two prior scales
                                     # (flux: activation default "tanh", weight scale 1.0)
    [prior]
    x0_scale = 1.0                   # X_0 ~ LogNormal(log(1/n_bins), x0_scale)
    [emission]
    kind = "multinomial"             # multinomial (eq. 17) | normalized_multinomial
    [[virtual_observables]]          # zero or more (eq. 6-8); none by default
    name = "mass"                    # site vo.{name}; default: the constraint's name
    constraint = "mass"              # required: "mass" (eq. 18) or "package.module:function"
    sigma2 = 1e-9                    # final σ_c² (the paper: 1e-9)
    sigma2_start = 1e-4              # σ_c² where annealing starts (default max(1e-4, sigma2))
    anneal_fraction = 0.5            # fraction of the SVI steps over which σ_c is annealed
    learn = false                    # σ_c as a MAP parameter with a HalfCauchy(1) prior
    [fixed]                          # scalar parameter sites held fixed (footnote 1)
    "transition.sigma_r" = 1e-3

``kind = "multinomial"`` without any virtual observable is an error (its density in the
unnormalized ``X`` is unbounded); with virtual observables none of which is the built-in
``"mass"``, a ``UserWarning`` (the user's constraint may or may not normalize ``X``).

Guide spec (``guides/NAME.toml``)::

    name = "NAME"
    description = ""
    [guide]
    kind = "lognormal"               # lognormal (the paper's) | amortized | auto
    hidden = 64                      # amortized: hidden width (two layers) or list of widths
    window = 3                       # amortized: snapshots t-w..t+w seen per time
    family = "normal"                # auto: normal (AutoNormal) | lowrank
    rank = 10                        # auto, lowrank: rank of the covariance factor
    [svi]                            # keyword arguments of SVIInference (absent: its default)
    steps = 2000                     # also: lr, lr_theta, lr_final_factor, num_particles, tol,
    lr = 0.01                        #       window, elbo, warm_start, checkpoint_every,
    batch_size = 256                 #       minibatch of sequences per step (absent: all)

Usage: ``SVIInference(model, guide=spec.factory, **spec.svi)`` or ``spec.inference(model)``.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .emissions import MultinomialEmission, NormalizedMultinomialEmission
from .guides import AmortizedGuide, LogNormalGuide, auto_guide
from .inference import SVIInference
from .model import CGModel
from .transitions import ACTIVATIONS, Drift, FluxDrift, GaussianTransition
from .virtual import (
    BUILTIN_CONSTRAINTS,
    VirtualObservable,
    mass_conservation,
    resolve_constraint,
)

__all__ = [
    "GuideSpec",
    "ModelSpec",
    "SpecError",
    "list_specs",
    "load_guide",
    "load_model",
    "load_model_spec",
    "specs_dir",
]

SPECS_ENV = "CGPYRO_SPECS_DIR"

EMISSIONS = {"multinomial": MultinomialEmission,
             "normalized_multinomial": NormalizedMultinomialEmission}
NOISES = ("isotropic", "full")
DRIFTS = ("mlp", "flux")
GUIDE_KINDS = ("lognormal", "amortized", "auto")
AUTO_FAMILIES = ("normal", "lowrank")
ELBOS = ("analytic", "trace")

MODEL_KEYS = {
    "": ("name", "description", "vectorized", "cg", "transition", "prior", "emission",
         "virtual_observables", "fixed"),
    "cg": ("n_bins",),
    "transition": ("drift", "hidden", "activation", "linear_skip", "conserve_mass", "noise",
                   "noise_ridge", "weight_prior_scale", "sigma_prior_scale",
                   "sigma_r_multinomial", "radius", "correction_radius", "channels", "kernel",
                   "hyper_prior_scale"),
    "prior": ("x0_scale",),
    "emission": ("kind",),
    "virtual_observables": ("name", "constraint", "sigma2", "sigma2_start", "anneal_fraction",
                            "learn"),
}
GUIDE_KEYS = {
    "": ("name", "description", "guide", "svi"),
    "lognormal": ("kind",),
    "amortized": ("kind", "hidden", "window"),
    "auto": ("kind", "family", "rank"),
}
SVI_KEYS = ("steps", "lr", "lr_theta", "lr_final_factor", "num_particles", "tol", "window",
            "elbo", "warm_start", "checkpoint_every", "batch_size")
_SVI_PARAMS = inspect.signature(SVIInference.__init__).parameters
assert all(k in _SVI_PARAMS for k in SVI_KEYS), "SVI_KEYS out of sync with SVIInference"


class SpecError(ValueError):
    """A model or guide spec that cannot be read: one line naming the file and the key."""


# --------------------------------------------------------------------------- files
def specs_dir() -> Path:
    """The directory holding ``models/``, ``guides/`` and ``data/``: ``$CGPYRO_SPECS_DIR``, else
    the source checkout's root, else the copy a wheel installs in ``cgpyro/_specs/``."""
    env = os.environ.get(SPECS_ENV)
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[1]
    if (root / "models").is_dir() and (root / "guides").is_dir():  # a source checkout
        return root
    return Path(__file__).resolve().parent / "_specs"


def _available(folder: str) -> list[str]:
    directory = specs_dir() / folder
    return sorted(p.stem for p in directory.glob("*.toml")) if directory.is_dir() else []


def list_specs() -> dict[str, list[str]]:
    """Names of the shipped specs: ``{"models": [...], "guides": [...]}``."""
    return {"models": _available("models"), "guides": _available("guides")}


def _resolve(path_or_name, folder: str) -> Path:
    """A spec file from a path or a bare name looked up in ``specs_dir() / folder``."""
    text = os.fspath(path_or_name)
    path = Path(text)
    if path.is_file():
        return path
    if not path.is_absolute() and (specs_dir() / path).is_file():
        return specs_dir() / path  # e.g. "models/NAME.toml" from outside the repository root
    if path.name == text:  # a bare name: no directory part
        stem = path.stem if path.suffix == ".toml" else text
        candidate = specs_dir() / folder / f"{stem}.toml"
        if candidate.is_file():
            return candidate
        raise SpecError(f"no {folder[:-1]} spec {text!r}: not a file, and not in "
                        f"{specs_dir() / folder} (available: {', '.join(_available(folder))})")
    raise SpecError(f"{text}: no such file")


def _display(path: Path) -> str:
    """The path as shown in messages: relative to the working directory where possible."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read(path: Path) -> tuple[dict, str]:
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{_display(path)}: cannot read: {err}") from None
    try:
        return tomllib.loads(source), source
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{_display(path)}: invalid TOML: {err}") from None


# --------------------------------------------------------------------------- validation
def _show(value) -> str:
    """A value as written in TOML (``true``, ``'relu'``, ``[1, 2]``, ``{...}``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Table:
    """One table of a spec file, with typed getters that fail naming file, table and key."""

    def __init__(self, file: str, section: str, data, allowed, kind="table"):
        self.file, self.section = file, section
        if not isinstance(data, dict):
            raise SpecError(f"{file}: {section}: expected a {kind}, found {_show(data)}")
        self.data = data
        unknown = [k for k in data if k not in allowed]
        if unknown:
            where = f"{section} " if section else ""
            raise SpecError(f"{file}: {where}unknown key {unknown[0]!r}; "
                            f"allowed: {', '.join(sorted(allowed))}")

    def fail(self, key: str, message: str):
        where = f"{self.section} " if self.section else ""
        raise SpecError(f"{self.file}: {where}{key}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get_str(self, key: str, default=None, choices=None) -> str | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(key, f"expected a string, found {_show(value)}")
        if choices is not None and value not in choices:
            self.fail(key, f"expected one of {', '.join(map(repr, choices))}, found {value!r}")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, found {_show(value)}")
        return value

    def get_number(self, key: str, default, minimum=0.0, strict=True, maximum=None) -> float | None:
        """A finite number ``> minimum`` (``>=`` if not ``strict``), at most ``maximum``."""
        value = self.data.get(key, default)
        if value is None:
            return None
        bound = f"{'> ' if strict else '>= '}{minimum:g}"
        rule = f"a number {bound}" if maximum is None else f"a number in [{minimum:g}, {maximum:g}]"
        if not _is_number(value):
            self.fail(key, f"expected {rule}, found {_show(value)}")
        if (value <= minimum if strict else value < minimum) or (
                maximum is not None and value > maximum):
            self.fail(key, f"expected {rule}, found {_show(value)}")
        return float(value)

    def get_int(self, key: str, default, minimum: int = 1, maximum: int = 2**31) -> int | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(key, f"expected an integer >= {minimum}, found {_show(value)}")
        if value > maximum:
            self.fail(key, f"expected an integer <= {maximum}, found {_show(value)}")
        return value

    def widths(self, key: str, default, allow_int: bool = False) -> tuple[int, ...]:
        """A list of positive integers (or one positive integer if ``allow_int``)."""
        value = self.data.get(key, default)
        rule = "a positive integer or a list of them" if allow_int else \
            "a list of positive integers"
        if allow_int and isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            self.fail(key, f"expected {rule}, found {_show(value)}")
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                self.fail(key, f"expected {rule}, found {_show(v)}")
        return tuple(value)


# --------------------------------------------------------------------------- model specs
@dataclass
class ModelSpec:
    """A validated model spec; :meth:`build` makes the :class:`~cgpyro.model.CGModel`.

    ``transition``, ``virtual_observables`` hold keyword arguments (TOML names, defaults
    filled in); ``source`` is the file's text (to store beside a run).
    """

    name: str
    description: str
    path: Path
    source: str
    n_bins: int | str
    transition: dict
    x0_scale: float
    emission: str
    virtual_observables: list[dict]
    fixed: dict[str, float]
    vectorized: bool

    @property
    def file(self) -> str:
        return _display(self.path)

    def build(self, n_bins: int | None = None) -> CGModel:
        """The model for data with ``n_bins`` bins (required when the spec says ``"auto"``)."""
        if n_bins is not None:
            try:
                n_bins = operator.index(n_bins)  # int, numpy or torch integers
            except TypeError:
                raise SpecError(f"n_bins must be an integer, got {n_bins!r}") from None
        if self.n_bins == "auto":
            if n_bins is None:
                raise SpecError(f"{self.file}: [cg] n_bins is 'auto': pass the data's n_bins")
        elif n_bins is not None and n_bins != self.n_bins:
            raise SpecError(f"{self.file}: [cg] n_bins = {self.n_bins}, but the data has "
                            f"{n_bins} bins")
        else:
            n_bins = self.n_bins
        if n_bins < 2:
            raise SpecError(f"n_bins must be >= 2, got {n_bins}")
        t = self.transition
        try:
            if t["drift"] == "flux":
                drift = FluxDrift(n_bins, radius=t["radius"],
                                  correction_radius=t["correction_radius"],
                                  channels=t["channels"], kernel=t["kernel"],
                                  activation=t["activation"],
                                  weight_prior_scale=t["weight_prior_scale"],
                                  hyper_prior_scale=t["hyper_prior_scale"])
            else:
                drift = Drift(n_bins, hidden=t["hidden"], activation=t["activation"],
                              linear_skip=t["linear_skip"], conserve_mass=t["conserve_mass"],
                              weight_prior_scale=t["weight_prior_scale"])
        except ValueError as err:  # sizes that only fail for this n_bins
            raise SpecError(f"{self.file}: [transition] for {n_bins} bins: {err}") from None
        transition = GaussianTransition(drift, sigma_prior_scale=t["sigma_prior_scale"],
                                        noise=t["noise"], noise_ridge=t["noise_ridge"],
                                        sigma_r_multinomial=t["sigma_r_multinomial"])
        vos = [self._virtual_observable(i, vo, n_bins)
               for i, vo in enumerate(self.virtual_observables, 1)]
        model = CGModel(n_bins, transition, EMISSIONS[self.emission](), vos,
                        x0_scale=self.x0_scale, vectorized=self.vectorized)
        self._fix(model)
        model.spec = self  # so that runs can record what they were built from
        return model

    def _virtual_observable(self, index: int, vo: dict, n_bins: int) -> VirtualObservable:
        where = f"{self.file}: [[virtual_observables]] #{index}"
        fn = resolve_constraint(vo["constraint"])  # checked when the spec was read
        probe = torch.full((2, n_bins), 1.0 / n_bins, dtype=torch.float64)
        try:
            c = fn(probe)
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            raise SpecError(f"{where} constraint: {vo['constraint']!r} fails on a "
                            f"(2, {n_bins}) state: {err}") from None
        if not torch.is_tensor(c) or c.dim() != 2 or c.shape[0] != 2:
            shape = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
            raise SpecError(f"{where} constraint: {vo['constraint']!r} must map (..., n_bins) "
                            f"to (..., M); on (2, {n_bins}) it gave {shape}")
        return VirtualObservable(vo["name"], fn, sigma=math.sqrt(vo["sigma2"]),
                                 sigma_start=math.sqrt(vo["sigma2_start"]),
                                 anneal_fraction=vo["anneal_fraction"], learn=vo["learn"])

    def _fix(self, model: CGModel) -> None:
        priors = model.priors()
        for name, value in self.fixed.items():
            if name not in priors:
                raise SpecError(f"{self.file}: [fixed] unknown parameter site {name!r}; "
                                f"sites: {', '.join(sorted(priors))}")
            prior = priors[name]
            if prior.shape() != torch.Size():
                raise SpecError(f"{self.file}: [fixed] {name}: only scalar sites can be fixed "
                                f"here, this one has shape {tuple(prior.shape())}")
            tensor = torch.tensor(value, dtype=torch.float64)
            if not bool(prior.support.check(tensor)):
                raise SpecError(f"{self.file}: [fixed] {name}: {value:g} is outside the "
                                f"support of its prior ({prior.support})")
            model.fix(name, tensor)


def load_model_spec(path_or_name) -> ModelSpec:
    """Read and validate a model spec (a ``.toml`` path or a name in ``models/``)."""
    path = _resolve(path_or_name, "models")
    data, source = _read(path)
    file = _display(path)
    top = _Table(file, "", data, MODEL_KEYS[""])
    cg = _Table(file, "[cg]", data.get("cg", {}), MODEL_KEYS["cg"])
    n_bins = cg.data.get("n_bins", "auto")
    if n_bins != "auto" and (not isinstance(n_bins, int) or isinstance(n_bins, bool)
                             or n_bins < 2):
        cg.fail("n_bins", f"expected 'auto' or an integer >= 2, found {_show(n_bins)}")

    tr = _Table(file, "[transition]", data.get("transition", {}), MODEL_KEYS["transition"])
    kind = tr.get_str("drift", "mlp", choices=DRIFTS)
    flux = kind == "flux"
    if flux:
        for key in ("hidden", "linear_skip", "conserve_mass"):
            if tr.has(key):
                tr.fail(key, "is an mlp setting; drift = 'flux' uses radius, correction_radius, "
                             "channels, kernel")
    else:
        for key in ("radius", "correction_radius", "channels", "kernel", "hyper_prior_scale"):
            if tr.has(key):
                tr.fail(key, "is a flux setting; set drift = 'flux' to use it")
    radius = tr.data.get("radius", "auto")
    if radius != "auto" and (not isinstance(radius, int) or isinstance(radius, bool)
                             or radius < 1):
        tr.fail("radius", f"expected 'auto' or an integer >= 1, found {_show(radius)}")
    transition = {
        "drift": kind,
        "radius": radius,
        "correction_radius": tr.get_int("correction_radius", 2, minimum=0),
        "channels": tr.widths("channels", []),
        "kernel": tr.get_int("kernel", 5),
        "hyper_prior_scale": tr.get_number("hyper_prior_scale", 1.0),
        "hidden": tr.widths("hidden", [25, 25]),
        "activation": tr.get_str("activation", "tanh" if flux else "relu",
                                 choices=sorted(ACTIVATIONS)),
        "linear_skip": tr.get_bool("linear_skip", False),
        "conserve_mass": tr.get_bool("conserve_mass", False),
        "noise": tr.get_str("noise", "isotropic", choices=NOISES),
        "noise_ridge": tr.get_number("noise_ridge", 1e-4),
        "weight_prior_scale": tr.get_number("weight_prior_scale", 1.0 if flux else 10.0),
        "sigma_prior_scale": tr.get_number("sigma_prior_scale", 0.1),
        "sigma_r_multinomial": tr.get_number("sigma_r_multinomial", None),
    }
    if transition["kernel"] % 2 == 0:
        tr.fail("kernel", f"expected an odd integer, found {transition['kernel']}")
    if not flux and not transition["hidden"] and not transition["linear_skip"]:
        tr.fail("hidden", "an empty list needs linear_skip = true")

    prior = _Table(file, "[prior]", data.get("prior", {}), MODEL_KEYS["prior"])
    em = _Table(file, "[emission]", data.get("emission", {}), MODEL_KEYS["emission"])
    emission = em.get_str("kind", "multinomial", choices=tuple(EMISSIONS))

    raw_vos = data.get("virtual_observables", [])
    if not isinstance(raw_vos, list):
        raise SpecError(f"{file}: virtual_observables: expected an array of tables "
                        f"([[virtual_observables]]), found {_show(raw_vos)}")
    vos, names = [], set()
    for i, raw in enumerate(raw_vos, 1):
        t = _Table(file, f"[[virtual_observables]] #{i}", raw, MODEL_KEYS["virtual_observables"])
        if not t.has("constraint"):
            t.fail("constraint", "required: 'mass' or an import path 'package.module:function'")
        constraint = t.get_str("constraint")
        try:
            resolve_constraint(constraint)
        except ValueError as err:
            t.fail("constraint", str(err))
        default_name = constraint if constraint in BUILTIN_CONSTRAINTS else \
            constraint.rpartition(":")[2]
        name = t.get_str("name", default_name)
        if not name or name in names:
            t.fail("name", f"expected a unique, non-empty name, found {name!r}")
        names.add(name)
        sigma2 = t.get_number("sigma2", 1e-9)
        sigma2_start = t.get_number("sigma2_start", max(1e-4, sigma2))
        if sigma2_start < sigma2:
            t.fail("sigma2_start", f"expected a number >= sigma2 = {sigma2:g}, "
                                   f"found {sigma2_start:g}")
        vos.append({
            "name": name, "constraint": constraint, "sigma2": sigma2,
            "sigma2_start": sigma2_start,
            "anneal_fraction": t.get_number("anneal_fraction", 0.5, strict=False, maximum=1.0),
            "learn": t.get_bool("learn", False),
        })
    fixed_table = _Table(file, "[fixed]", data.get("fixed", {}), allowed=data.get("fixed", {}))
    fixed = {}
    for key, value in fixed_table.data.items():
        if not _is_number(value):
            fixed_table.fail(key, f"expected a finite number, found {_show(value)}")
        fixed[key] = float(value)
    name = top.get_str("name", path.stem)
    description = top.get_str("description", "")
    vectorized = top.get_bool("vectorized", True)
    x0_scale = prior.get_number("x0_scale", 1.0)
    # Cross-checks last, so that a plain mistake is reported as such first.
    if emission == "multinomial":
        if not vos:
            em.fail("kind", "'multinomial' needs a virtual observable that normalizes X "
                            "(constraint = 'mass'), or use 'normalized_multinomial'")
        if not any(resolve_constraint(vo["constraint"]) is mass_conservation for vo in vos):
            warnings.warn(f"{file}: [emission] kind = 'multinomial' without the 'mass' virtual "
                          "observable: make sure a constraint normalizes X", stacklevel=2)

    return ModelSpec(
        name=name,
        description=description,
        path=path,
        source=source,
        n_bins=n_bins,
        transition=transition,
        x0_scale=x0_scale,
        emission=emission,
        virtual_observables=vos,
        fixed=fixed,
        vectorized=vectorized,
    )


def load_model(path_or_name, n_bins: int | None = None) -> CGModel:
    """The :class:`~cgpyro.model.CGModel` of a spec, for data with ``n_bins`` bins.

    :param path_or_name: a ``.toml`` path or a name in ``models/`` (e.g. ``"particles_paper"``).
    :param n_bins: the data's number of bins; required if the spec has ``n_bins = "auto"``,
        checked against it otherwise.
    """
    return load_model_spec(path_or_name).build(n_bins)


# --------------------------------------------------------------------------- guide specs
@dataclass
class GuideSpec:
    """A validated guide spec.

    ``kind``: ``"lognormal"`` | ``"amortized"`` | ``"auto"``; ``options``: the guide's keyword
    arguments (defaults filled in); ``svi``: keyword arguments of
    :class:`~cgpyro.inference.SVIInference` given in the spec.
    """

    name: str
    kind: str
    options: dict = field(default_factory=dict)
    svi: dict = field(default_factory=dict)
    description: str = ""
    path: Path | None = None
    source: str = ""

    def factory(self, model, counts: torch.Tensor, theta_init=None):
        """The guide for ``model`` and training ``counts`` (the ``SVIInference`` factory)."""
        if self.kind == "lognormal":
            return LogNormalGuide(model, counts, theta_init=theta_init)
        if self.kind == "amortized":
            return AmortizedGuide(model, counts, theta_init=theta_init, **self.options)
        if self.kind == "auto":
            return auto_guide(model, counts, theta_init=theta_init,
                              kind=self.options["family"], rank=self.options["rank"])
        raise AssertionError(f"unvalidated guide kind {self.kind!r}")

    def inference(self, model, **overrides) -> SVIInference:
        """``SVIInference(model, guide=self.factory, **self.svi, **overrides)``."""
        return SVIInference(model, guide=self.factory, **{**self.svi, **overrides})


def load_guide(path_or_name) -> GuideSpec:
    """Read and validate a guide spec (a ``.toml`` path or a name in ``guides/``)."""
    path = _resolve(path_or_name, "guides")
    data, source = _read(path)
    file = _display(path)
    top = _Table(file, "", data, GUIDE_KEYS[""])
    raw = data.get("guide", {})
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: guide: expected a table ([guide]), found {_show(raw)}")
    kind = _Table(file, "[guide]", raw, allowed=raw).get_str("kind", "lognormal",
                                                         choices=GUIDE_KINDS)
    g = _Table(file, "[guide]", raw, GUIDE_KEYS[kind])
    if kind == "amortized":
        hidden = g.widths("hidden", 64, allow_int=True)
        options = {"hidden": hidden[0] if isinstance(raw.get("hidden", 64), int) else hidden,
                   "window": g.get_int("window", 3, minimum=0, maximum=1000)}
    elif kind == "auto":
        options = {"family": g.get_str("family", "normal", choices=AUTO_FAMILIES),
                   "rank": g.get_int("rank", 10, maximum=10_000)}
    else:
        options = {}

    s = _Table(file, "[svi]", data.get("svi", {}), SVI_KEYS)
    svi = {
        "steps": s.get_int("steps", None),
        "lr": s.get_number("lr", None),
        "lr_theta": s.get_number("lr_theta", None, strict=False),
        "lr_final_factor": s.get_number("lr_final_factor", None),
        "num_particles": s.get_int("num_particles", None),
        "tol": s.get_number("tol", None),
        "window": s.get_int("window", None),
        "elbo": s.get_str("elbo", None, choices=ELBOS),
        "warm_start": s.get_bool("warm_start", True) if s.has("warm_start") else None,
        "checkpoint_every": s.get_int("checkpoint_every", None),
        "batch_size": s.get_int("batch_size", None),
    }
    svi = {k: v for k, v in svi.items() if k in s.data}
    try:  # whatever SVIInference itself refuses (a dry construction: it only stores settings)
        SVIInference(None, **svi)
    except ValueError as err:
        raise SpecError(f"{file}: [svi] {err}") from None
    return GuideSpec(name=top.get_str("name", path.stem), kind=kind, options=options, svi=svi,
                     description=top.get_str("description", ""), path=path, source=source)
