"""Declarative model and guide specs (TOML files in ``models/`` and ``guides/``).

Specs are read with :mod:`tomllib` and validated key by key; nothing in them is evaluated as
Python. A user constraint is named by an import path ``package.module:function`` and imported.
Every mistake raises :class:`SpecError` (a ``ValueError``) of one line naming the file, the
table and the key, e.g. ``models/foo.toml: [transition] hidden: expected a list of positive
integers, found -3``.

A spec is a path to a ``.toml`` file or a bare name looked up in ``models/`` (``guides/``) of
the specs directory: ``$CGPYRO_SPECS_DIR`` if set, else the repository root beside the package.

Specs only parse TOML into constructor arguments: an absent key takes the default of the
constructor it is passed to (shown below; :class:`~cgpyro.transitions.Drift`,
:class:`~cgpyro.transitions.FluxDrift`, :class:`~cgpyro.transitions.GaussianTransition`,
:class:`~cgpyro.model.CGModel`, :class:`~cgpyro.virtual.VirtualObservable`, the guides and
:class:`~cgpyro.inference.SVIInference`), which also validate the values.

Model spec (``models/NAME.toml``; absent keys take the defaults shown)::

    name = "NAME"                    # default: the file name
    description = ""
    vectorized = true                # time-vectorized model (site X) or a pyro.markov loop
    [cg]
    n_bins = "auto"                  # "auto" (from the data) or an int >= 2 that must match it
    [transition]                     # eq. 4-5: X_{t+1} ~ N(X_t + NN(X_t), Σ_r)
    drift = "mlp"                    # mlp (the paper's network) | flux (local, conservative)
                                     # | subgrid (a conservation law on sub-cells of the bins)
                                     # | filter (linear transport of a sub-bin profile that a
                                     # Kalman filter infers from the earlier snapshots)
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
    forecast_noise = true            # forecast bands: noisy rollouts (Algorithm 1) | false:
                                     # p_cf around the noise-free continuation
    radius = "auto"                  # flux: jump reach in bins ("auto": ceil(B/4), >= 2);
                                     # the full (B-1)/2 lets few sequences spread the stencil
                                     # over far jumps (25 bins, 4 sequences: 1.06 -> 1.64 x floor)
    correction_radius = 2            # flux: reach of the per-bin (non-equivariant) correction
    channels = []                    # flux: conv face-flux network widths ([]: linear stencil)
    kernel = 5                       # flux: odd conv kernel width (bins)
    hyper_prior_scale = 1.0          # flux: HalfCauchy(s) hyperprior on the prior scales
    memory = false                   # flux: + Σ_k c_k (X_t - X_{t-1})_{j-k}: true | false |
                                     # "auto" (on where the evidence prefers it)
    memory_radius = 1                # flux: reach of the memory stencil (bins; with "auto"
                                     # the longest reach the evidence may choose)
    memory_lags = 1                  # flux: increments in the memory term (ΔX_t, ΔX_{t-1},
                                     # ...: a chain of order 1 + lags; with "auto" the most
                                     # the evidence may choose)
    jump_prior = "decay"             # flux: prior variance of a jump falls off with its reach
                                     # at a learned rate (locality) | "flat" (one scale)
    dense = false                    # flux: + a dense bin-to-bin rate correction under a
                                     # learned prior scale: true | false | "auto" (<= 32 bins)
                                     # (flux: activation default "tanh", weight scale 1.0)
    subcells = 4                     # subgrid, filter: sub-cells per bin ("auto", filter's
                                     # default: about 100 over the domain, ceil(100 / n_bins))
    substeps = 16                    # subgrid: least explicit sub-steps per coarse step
    degree = 2                       # subgrid: degree of the flux polynomial g(u)
    window = 0                       # subgrid, filter: earlier snapshots that carry the
                                     # sub-cell profile (a chain of order 1 + window; filter:
                                     # "auto" = 48, its default)
    width_prior_scale = 0.0          # filter: N(0, s) prior on per-bin log widths (0: equal
                                     # bins, no width parameters; "auto": 0.02 where the
                                     # evidence prefers learned widths, else 0)
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

A *choosing* spec (``models/auto.toml``, the default) holds only ``name``, ``description``
and a table that names two plain specs; it picks one from the training data
(:func:`resolve_model_spec`, ``load_model(spec, counts=...)``; :class:`ModelChoice`)::

    [choose]
    short_step = "subbin"            # where the rms width of one snapshot's displacement
    width_below = 0.28               # (bins; transitions.displacement_width) is below this
    otherwise = "physics"            # else this one

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._checks import is_finite
from ._toml import SPECS_ENV, SpecError, Table, available, display, read, resolve, show, specs_dir
from .emissions import MultinomialEmission, NormalizedMultinomialEmission
from .guides import AmortizedGuide, LogNormalGuide, auto_guide
from .inference import SVIInference
from .model import CGModel
from .transitions import (
    ACTIVATIONS,
    Drift,
    FilterDrift,
    FluxDrift,
    GaussianTransition,
    SubgridDrift,
    displacement_width,
)
from .virtual import (
    BUILTIN_CONSTRAINTS,
    VirtualObservable,
    mass_conservation,
    resolve_constraint,
)

__all__ = [
    "SPECS_ENV",
    "GuideSpec",
    "ModelChoice",
    "ModelSpec",
    "SpecError",
    "describe_model",
    "list_specs",
    "load_guide",
    "load_model",
    "load_model_spec",
    "resolve_model_spec",
    "specs_dir",
]

EMISSIONS = {"multinomial": MultinomialEmission,
             "normalized_multinomial": NormalizedMultinomialEmission}
NOISES = ("isotropic", "full")
DRIFTS = ("mlp", "flux", "subgrid", "filter")
GUIDE_KINDS = ("lognormal", "amortized", "auto")
AUTO_FAMILIES = ("normal", "lowrank")
ELBOS = ("analytic", "trace")

# [transition] keys that are GaussianTransition's arguments; the others are the drift's
TRANSITION_KEYS = ("noise", "noise_ridge", "sigma_prior_scale", "sigma_r_multinomial",
                   "forecast_noise")
MODEL_KEYS = {
    "": ("name", "description", "vectorized", "cg", "transition", "prior", "emission",
         "virtual_observables", "fixed"),
    "cg": ("n_bins",),
    "transition": ("drift", "hidden", "activation", "linear_skip", "conserve_mass", "noise",
                   "noise_ridge", "weight_prior_scale", "sigma_prior_scale",
                   "sigma_r_multinomial", "radius", "correction_radius", "channels", "kernel",
                   "hyper_prior_scale", "memory", "memory_radius", "memory_lags", "jump_prior",
                   "dense", "forecast_noise", "subcells", "substeps", "degree", "window",
                   "width_prior_scale"),
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


# --------------------------------------------------------------------------- files
def list_specs() -> dict[str, list[str]]:
    """Names of the shipped specs: ``{"models": [...], "guides": [...]}``."""
    return {"models": available("models"), "guides": available("guides")}


# --------------------------------------------------------------------------- model specs
@dataclass
class ModelSpec:
    """A validated model spec; :meth:`build` makes the :class:`~cgpyro.model.CGModel`.

    ``transition``, ``virtual_observables`` hold the keyword arguments the spec gives (TOML
    names; an absent key takes the constructor's default, ``None`` likewise for ``x0_scale``
    and ``vectorized``); ``transition["drift"]`` is the drift kind; ``source`` is the file's
    text (to store beside a run).
    """

    name: str
    description: str
    path: Path
    source: str
    n_bins: int | str
    transition: dict
    x0_scale: float | None
    emission: str
    virtual_observables: list[dict]
    fixed: dict[str, float]
    vectorized: bool | None
    choice: dict | None = None  # set where a choosing spec (ModelChoice) picked this one

    @property
    def file(self) -> str:
        return display(self.path)

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
        drift_args = {k: v for k, v in t.items() if k != "drift" and k not in TRANSITION_KEYS}
        try:
            drift = {"flux": FluxDrift, "subgrid": SubgridDrift,
                     "filter": FilterDrift}.get(t["drift"], Drift)(
                n_bins, **drift_args)
        except ValueError as err:  # sizes that only fail for this n_bins
            raise SpecError(f"{self.file}: [transition] for {n_bins} bins: {err}") from None
        transition = GaussianTransition(drift, **{k: t[k] for k in TRANSITION_KEYS if k in t})
        vos = [self._virtual_observable(i, vo, n_bins)
               for i, vo in enumerate(self.virtual_observables, 1)]
        options = {k: v for k, v in (("x0_scale", self.x0_scale),
                                     ("vectorized", self.vectorized)) if v is not None}
        model = CGModel(n_bins, transition, EMISSIONS[self.emission](), vos, **options)
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
        sigmas = {arg: math.sqrt(vo[key]) for arg, key in (("sigma", "sigma2"),
                                                           ("sigma_start", "sigma2_start"))
                  if key in vo}
        options = {k: vo[k] for k in ("anneal_fraction", "learn") if k in vo}
        return VirtualObservable(vo["name"], fn, **sigmas, **options)

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


def _memory_setting(table, key: str):
    value = table.data[key]
    if not (isinstance(value, bool) or value == "auto"):
        table.fail(key, f"expected true, false or 'auto', found {show(value)}")
    return value


@dataclass
class ModelChoice:
    """A spec that picks one of two model specs from the training data (table ``[choose]``;
    ``models/auto.toml``): ``short_step`` where the rms width of one snapshot's displacement,
    :func:`~cgpyro.transitions.displacement_width`, is below ``width_below`` bins (the profile
    inside the bins outlives a snapshot), else ``otherwise``."""

    name: str
    description: str
    path: Path
    source: str
    short_step: str
    otherwise: str
    width_below: float

    @property
    def file(self) -> str:
        return display(self.path)

    def choose(self, counts) -> ModelSpec:
        """The spec for training ``counts`` ``(n_sequences, n_times, n_bins)`` (a Dataset,
        array or tensor), with ``choice``: ``{"spec", "chosen", "width", "width_below"}``.
        Data with one snapshot or fewer than 3 bins have no width to fit (``width`` None):
        ``otherwise``."""
        counts = torch.as_tensor(getattr(counts, "counts", counts))
        if counts.dim() != 3:
            raise ValueError(f"{self.file}: choosing a model needs counts (n_sequences, "
                             f"n_times, n_bins), got shape {tuple(counts.shape)}")
        width = displacement_width(counts) if counts.shape[1] >= 2 and counts.shape[2] >= 3 \
            else None
        chosen = self.short_step if width is not None and width < self.width_below \
            else self.otherwise
        spec = _load_plain(chosen, self.file)
        spec.choice = {"spec": self.name, "chosen": spec.name, "width": width,
                       "width_below": self.width_below}
        return spec


def describe_model(name: str, choice: dict | None = None) -> str:
    """``name``, and where a choosing spec picked it (``ModelSpec.choice``), why: e.g.
    ``"subbin (chosen by auto: rms displacement width 0.112 bins per snapshot, threshold
    0.28)"``."""
    if not choice:
        return name
    width = "no width to fit" if choice["width"] is None else (
        f"rms displacement width {choice['width']:.3f} bins per snapshot, threshold "
        f"{choice['width_below']:g}")
    return f"{name} (chosen by {choice['spec']}: {width})"


def _load_plain(name, where: str) -> ModelSpec:
    spec = load_model_spec(name, allow_choice=True)
    if isinstance(spec, ModelChoice):
        raise SpecError(f"{where}: [choose] {name!r} is itself a choosing spec; name plain "
                        "model specs")
    return spec


def _model_choice(file: str, path: Path, source: str, data: dict) -> ModelChoice:
    top = Table(file, "", data, ("name", "description", "choose"))
    ch = data["choose"]
    if not isinstance(ch, dict):
        raise SpecError(f"{file}: choose: expected a table ([choose]), found {show(ch)}")
    t = Table(file, "[choose]", ch, ("short_step", "otherwise", "width_below"))
    for key in ("short_step", "otherwise", "width_below"):
        if not t.has(key):
            t.fail(key, "required")
    names = {key: t.get_str(key) for key in ("short_step", "otherwise")}
    for key, name in names.items():
        try:
            _load_plain(name, f"{file}: [choose] {key}")
        except SpecError as err:
            t.fail(key, f"{name!r} is not a usable model spec ({err})")
    return ModelChoice(name=top.get_str("name", path.stem),
                       description=top.get_str("description", ""), path=path, source=source,
                       width_below=t.get_number("width_below"), **names)


def resolve_model_spec(path_or_name, counts) -> ModelSpec:
    """:func:`load_model_spec`, where a choosing spec (``[choose]``, e.g. ``"auto"``) picks its
    model from the training ``counts`` ``(n_sequences, n_times, n_bins)``; a plain spec is
    returned as read."""
    spec = load_model_spec(path_or_name, allow_choice=True)
    return spec.choose(counts) if isinstance(spec, ModelChoice) else spec


def load_model_spec(path_or_name, allow_choice: bool = False) -> ModelSpec | ModelChoice:
    """Read and validate a model spec (a ``.toml`` path or a name in ``models/``). A choosing
    spec (table ``[choose]``) needs the training data (:func:`resolve_model_spec`); with
    ``allow_choice`` it is returned as a :class:`ModelChoice`, else refused."""
    path = resolve(path_or_name, "models", "model")
    data, source = read(path)
    file = display(path)
    if "choose" in data:
        if not allow_choice:
            raise SpecError(f"{file}: chooses its model from the training data ([choose]): "
                            "use resolve_model_spec(spec, counts) or load_model(spec, "
                            "counts=counts)")
        return _model_choice(file, path, source, data)
    top = Table(file, "", data, MODEL_KEYS[""])
    cg = Table(file, "[cg]", data.get("cg", {}), MODEL_KEYS["cg"])
    n_bins = cg.data.get("n_bins", "auto")
    if n_bins != "auto" and (not isinstance(n_bins, int) or isinstance(n_bins, bool)
                             or n_bins < 2):
        cg.fail("n_bins", f"expected 'auto' or an integer >= 2, found {show(n_bins)}")

    tr = Table(file, "[transition]", data.get("transition", {}), MODEL_KEYS["transition"])
    kind = tr.get_str("drift", "mlp", choices=DRIFTS)
    owners = {"mlp": ("hidden", "activation", "linear_skip", "conserve_mass"),
              "flux": ("radius", "correction_radius", "channels", "kernel", "activation",
                       "hyper_prior_scale", "memory", "memory_radius", "memory_lags",
                       "jump_prior", "dense"),
              "subgrid": ("subcells", "substeps", "degree", "window"),
              "filter": ("subcells", "window", "width_prior_scale")}
    for key in sorted({k for keys in owners.values() for k in keys} - set(owners[kind])):
        if tr.has(key):
            users = " or ".join(f"drift = '{d}'" for d, keys in owners.items() if key in keys)
            tr.fail(key, f"is not a setting of drift = '{kind}' (it belongs to {users})")
    radius = tr.data.get("radius", "auto")
    if radius != "auto" and (not isinstance(radius, int) or isinstance(radius, bool)
                             or radius < 1):
        tr.fail("radius", f"expected 'auto' or an integer >= 1, found {show(radius)}")
    # Only the keys given: absent ones take the constructors' defaults (Drift, FluxDrift,
    # GaussianTransition).
    transition = {"drift": kind, **tr.given(
        radius=lambda k: radius,
        correction_radius=lambda k: tr.get_int(k, minimum=0),
        channels=tr.widths,
        kernel=tr.get_int,
        hyper_prior_scale=tr.get_number,
        memory=lambda k: _memory_setting(tr, k),
        memory_radius=lambda k: tr.get_int(k, minimum=0),
        memory_lags=lambda k: tr.get_int(k, minimum=1),
        jump_prior=lambda k: tr.get_str(k, choices=("decay", "flat")),
        dense=lambda k: _memory_setting(tr, k),
        hidden=tr.widths,
        activation=lambda k: tr.get_str(k, choices=sorted(ACTIVATIONS)),
        linear_skip=tr.get_bool,
        conserve_mass=tr.get_bool,
        noise=lambda k: tr.get_str(k, choices=NOISES),
        noise_ridge=tr.get_number,
        weight_prior_scale=tr.get_number,
        sigma_prior_scale=tr.get_number,
        sigma_r_multinomial=tr.get_number,
        forecast_noise=tr.get_bool,
        subcells=lambda k: "auto" if tr.data.get(k) == "auto" else tr.get_int(k, minimum=1),
        substeps=lambda k: tr.get_int(k, minimum=1),
        degree=lambda k: tr.get_int(k, minimum=1),
        window=lambda k: "auto" if tr.data.get(k) == "auto" and kind == "filter"
        else tr.get_int(k, minimum=0),
        width_prior_scale=lambda k: "auto" if tr.data.get(k) == "auto"
        else tr.get_number(k, strict=False),
    )}
    if transition.get("kernel", 1) % 2 == 0:
        tr.fail("kernel", f"expected an odd integer, found {transition['kernel']}")
    if transition.get("hidden") == () and not transition.get("linear_skip"):
        tr.fail("hidden", "an empty list needs linear_skip = true")

    prior = Table(file, "[prior]", data.get("prior", {}), MODEL_KEYS["prior"])
    em = Table(file, "[emission]", data.get("emission", {}), MODEL_KEYS["emission"])
    emission = em.get_str("kind", "multinomial", choices=tuple(EMISSIONS))

    raw_vos = data.get("virtual_observables", [])
    if not isinstance(raw_vos, list):
        raise SpecError(f"{file}: virtual_observables: expected an array of tables "
                        f"([[virtual_observables]]), found {show(raw_vos)}")
    vos, names = [], set()
    for i, raw in enumerate(raw_vos, 1):
        t = Table(file, f"[[virtual_observables]] #{i}", raw, MODEL_KEYS["virtual_observables"])
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
        vo = {"name": name, "constraint": constraint, **t.given(
            sigma2=t.get_number, sigma2_start=t.get_number,
            anneal_fraction=lambda k, t=t: t.get_number(k, strict=False, maximum=1.0),
            learn=t.get_bool)}
        # σ_c² starts annealing at max(1e-4, sigma2): VirtualObservable's own default start
        # (σ = 1e-2) where sigma2 <= 1e-4, else no annealing.
        sigma2 = vo.get("sigma2", 0.0)
        if "sigma2_start" not in vo and sigma2 > 1e-4:
            vo["sigma2_start"] = sigma2
        if vo.get("sigma2_start", math.inf) < sigma2:
            t.fail("sigma2_start", f"expected a number >= sigma2 = {sigma2:g}, "
                                   f"found {vo['sigma2_start']:g}")
        vos.append(vo)
    fixed_table = Table(file, "[fixed]", data.get("fixed", {}), allowed=data.get("fixed", {}))
    fixed = {}
    for key, value in fixed_table.data.items():
        if not is_finite(value):
            fixed_table.fail(key, f"expected a finite number, found {show(value)}")
        fixed[key] = float(value)
    name = top.get_str("name", path.stem)
    description = top.get_str("description", "")
    vectorized = top.get_bool("vectorized")
    x0_scale = prior.get_number("x0_scale")
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


def load_model(path_or_name, n_bins: int | None = None, counts=None) -> CGModel:
    """The :class:`~cgpyro.model.CGModel` of a spec, for data with ``n_bins`` bins.

    :param path_or_name: a ``.toml`` path or a name in ``models/`` (e.g. ``"particles_paper"``).
    :param n_bins: the data's number of bins; required if the spec has ``n_bins = "auto"``
        (and no ``counts``), checked against it otherwise.
    :param counts: the training counts ``(n_sequences, n_times, n_bins)`` (Dataset, array or
        tensor): needed by a choosing spec (``"auto"``), which picks its model from them.
    """
    if counts is None:
        return load_model_spec(path_or_name).build(n_bins)
    counts = getattr(counts, "counts", counts)
    if n_bins is None:
        n_bins = int(counts.shape[-1])
    return resolve_model_spec(path_or_name, counts).build(n_bins)


# --------------------------------------------------------------------------- guide specs
@dataclass
class GuideSpec:
    """A validated guide spec.

    ``kind``: ``"lognormal"`` | ``"amortized"`` | ``"auto"``; ``options``: the guide's keyword
    arguments given in the spec (absent ones: the guide's defaults); ``svi``: keyword arguments of
    :class:`~cgpyro.inference.SVIInference` given in the spec.
    """

    name: str
    kind: str
    options: dict = field(default_factory=dict)
    svi: dict = field(default_factory=dict)
    description: str = ""
    path: Path | None = None
    source: str = ""

    def factory(self, model, counts: torch.Tensor, theta_init=None, theta_held=None):
        """The guide for ``model`` and training ``counts`` (the ``SVIInference`` factory)."""
        if self.kind == "lognormal":
            return LogNormalGuide(model, counts, theta_init=theta_init, theta_held=theta_held)
        if self.kind == "amortized":
            return AmortizedGuide(model, counts, theta_init=theta_init, theta_held=theta_held,
                                  **self.options)
        if self.kind == "auto":
            options = dict(self.options)
            if "family" in options:  # the spec's name for auto_guide's ``kind``
                options["kind"] = options.pop("family")
            return auto_guide(model, counts, theta_init=theta_init, theta_held=theta_held,
                              **options)
        raise AssertionError(f"unvalidated guide kind {self.kind!r}")

    def inference(self, model, **overrides) -> SVIInference:
        """``SVIInference(model, guide=self.factory, **self.svi, **overrides)``."""
        return SVIInference(model, guide=self.factory, **{**self.svi, **overrides})


def load_guide(path_or_name) -> GuideSpec:
    """Read and validate a guide spec (a ``.toml`` path or a name in ``guides/``)."""
    path = resolve(path_or_name, "guides", "guide")
    data, source = read(path)
    file = display(path)
    top = Table(file, "", data, GUIDE_KEYS[""])
    raw = data.get("guide", {})
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: guide: expected a table ([guide]), found {show(raw)}")
    kind = Table(file, "[guide]", raw, allowed=raw).get_str("kind", "lognormal",
                                                        choices=GUIDE_KINDS)
    g = Table(file, "[guide]", raw, GUIDE_KEYS[kind])
    # Only the keys given: absent ones take the defaults of AmortizedGuide and auto_guide.
    if kind == "amortized":
        def hidden(key):  # one width (two layers of it) stays an int
            widths = g.widths(key, allow_int=True)
            return raw[key] if isinstance(raw[key], int) else widths

        options = g.given(hidden=hidden, window=lambda k: g.get_int(k, minimum=0, maximum=1000))
    elif kind == "auto":
        options = g.given(family=lambda k: g.get_str(k, choices=AUTO_FAMILIES),
                          rank=lambda k: g.get_int(k, maximum=10_000))
    else:
        options = {}

    s = Table(file, "[svi]", data.get("svi", {}), SVI_KEYS)
    svi = s.given(
        steps=s.get_int, lr=s.get_number,
        lr_theta=lambda k: s.get_number(k, strict=False),
        lr_final_factor=s.get_number, num_particles=s.get_int, tol=s.get_number,
        window=s.get_int, elbo=lambda k: s.get_str(k, choices=ELBOS),
        warm_start=s.get_bool, checkpoint_every=s.get_int, batch_size=s.get_int)
    try:  # whatever SVIInference itself refuses (a dry construction: it only stores settings)
        SVIInference(None, **svi)
    except ValueError as err:
        raise SpecError(f"{file}: [svi] {err}") from None
    return GuideSpec(name=top.get_str("name", path.stem), kind=kind, options=options, svi=svi,
                     description=top.get_str("description", ""), path=path, source=source)
