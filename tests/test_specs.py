"""Declarative model and guide specs: every shipped pair trains, every mistake is one clear line."""

import math
import re
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from cgpyro import specs
from cgpyro.emissions import MultinomialEmission, NormalizedMultinomialEmission
from cgpyro.guides import AmortizedGuide, CGAutoGuide, LogNormalGuide
from cgpyro.inference import SVIInference
from cgpyro.predict import forecast
from cgpyro.systems import simulate_dataset
from cgpyro.virtual import mass_conservation

MODELS = ["particles_paper", "particles_best", "particles_no_vo", "subbin"]
GUIDES = ["lognormal", "amortized", "auto_normal"]


@pytest.fixture(scope="module")
def data():
    dataset, _ = simulate_dataset(n_sequences=3, n_steps=3, n_particles=2000, n_bins=5, seed=0)
    return dataset


def write(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def train_and_forecast(model_name, guide_name, data, steps=3):
    """The whole user code path; swapping a spec changes only the names passed in."""
    model = specs.load_model(model_name, n_bins=data.n_bins)
    guide = specs.load_guide(guide_name)
    inference = SVIInference(model, guide=guide.factory,
                             **{**guide.svi, "steps": steps, "progress": False})
    inference.fit(data)
    pred = forecast(model, inference.guide, data, horizon=2, num_samples=8)
    return model, inference, pred


# --------------------------------------------------------------------------- shipped specs
def test_list_specs_names_the_shipped_files():
    names = specs.list_specs()
    assert set(MODELS) <= set(names["models"])
    assert set(GUIDES) <= set(names["guides"])


@pytest.mark.parametrize("guide_name", GUIDES)
@pytest.mark.parametrize("model_name", MODELS)
def test_every_model_spec_trains_with_every_guide_spec(model_name, guide_name, data):
    model, inference, pred = train_and_forecast(model_name, guide_name, data)
    assert model.n_bins == 5  # n_bins = "auto": from the data
    assert len(inference.loss_history) == 3
    assert all(math.isfinite(v) for v in inference.loss_history)
    assert pred.mean.shape == (3, 4 + 2, 5)
    assert pred.lower.shape == pred.upper.shape == (3, 6, 5)
    assert pred.mass.shape == (3, 6)
    assert np.isfinite(pred.mean).all()


def test_swapping_a_spec_is_a_one_word_change(data):
    _, lognormal, _ = train_and_forecast("particles_paper", "lognormal", data, steps=2)
    _, amortized, _ = train_and_forecast("particles_paper", "amortized", data, steps=2)
    _, auto, _ = train_and_forecast("particles_paper", "auto_normal", data, steps=2)
    assert isinstance(lognormal.guide, LogNormalGuide)
    assert isinstance(amortized.guide, AmortizedGuide)
    assert isinstance(auto.guide, CGAutoGuide)
    best = specs.load_model("particles_best", n_bins=5)
    no_vo = specs.load_model("particles_no_vo", n_bins=5)
    assert best.transition.drift.conserve_mass
    assert isinstance(no_vo.emission, NormalizedMultinomialEmission)
    assert len(no_vo.virtual_observables) == 0


def test_paper_spec_is_the_papers_setting():
    model = specs.load_model("particles_paper", n_bins=25)
    drift = model.transition.drift
    assert (drift.hidden, drift.activation) == ((25, 25), "relu")
    assert not drift.linear_skip and not drift.conserve_mass
    assert model.transition.noise == "isotropic"
    assert isinstance(model.emission, MultinomialEmission)
    (vo,) = model.virtual_observables
    assert vo.name == "mass" and vo.fn is mass_conservation
    assert vo.sigma_final == pytest.approx(math.sqrt(1e-9))
    assert vo.sigma_start == pytest.approx(math.sqrt(1e-4))
    assert vo.anneal_fraction == 0.5 and not vo.learn
    assert model.vectorized and model.spec.name == "particles_paper"


def test_path_and_bare_name_give_the_same_spec():
    by_name = specs.load_model_spec("particles_paper")
    by_path = specs.load_model_spec(specs.specs_dir() / "models" / "particles_paper.toml")
    by_file_name = specs.load_model_spec("particles_paper.toml")
    assert by_name == by_path == by_file_name


def test_guide_specs():
    lognormal = specs.load_guide("lognormal")
    assert lognormal.kind == "lognormal" and lognormal.svi["steps"] == 2000
    assert lognormal.svi["lr"] == 0.01
    amortized = specs.load_guide("amortized")
    assert amortized.kind == "amortized" and set(amortized.options) == {"hidden", "window"}
    auto = specs.load_guide("auto_normal")
    assert auto.kind == "auto" and auto.options["family"] == "normal"
    # The svi table is exactly keyword arguments of SVIInference.
    SVIInference(None, guide=auto.factory, **auto.svi)


def test_specs_dir_can_be_overridden(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "guides").mkdir()
    write(tmp_path / "models", """
        [transition]
        hidden = [4]
        [emission]
        kind = "normalized_multinomial"
        """, "tiny.toml")
    write(tmp_path / "guides", '[guide]\nkind = "amortized"\nhidden = [8]\n', "net.toml")
    monkeypatch.setenv(specs.SPECS_ENV, str(tmp_path))
    assert specs.list_specs() == {"models": ["tiny"], "guides": ["net"]}
    assert specs.load_model("tiny", n_bins=3).transition.drift.hidden == (4,)
    # only the keys the spec gives: window takes AmortizedGuide's default
    assert specs.load_guide("net").options == {"hidden": (8,)}


# --------------------------------------------------------------------------- n_bins, fixed
def test_n_bins_auto_needs_the_data_and_an_int_must_match(tmp_path):
    with pytest.raises(ValueError, match=r"n_bins is 'auto'"):
        specs.load_model("particles_paper")
    path = write(tmp_path, '[cg]\nn_bins = 25\n[emission]\nkind = "normalized_multinomial"\n')
    assert specs.load_model(path).n_bins == 25
    assert specs.load_model(path, n_bins=25).n_bins == 25
    with pytest.raises(ValueError, match=r"spec.toml: \[cg\] n_bins = 25, but the data has 5"):
        specs.load_model(path, n_bins=5)


def test_fixed_scalar_sites(tmp_path):
    path = write(tmp_path, """
        [emission]
        kind = "normalized_multinomial"
        [fixed]
        "transition.sigma_r" = 1e-3
        """)
    model = specs.load_model(path, n_bins=5)
    assert "transition.sigma_r" in model.fixed
    assert model.fixed["transition.sigma_r"].item() == pytest.approx(1e-3)


@pytest.mark.parametrize(("entry", "message"), [
    ('"transition.sigma" = 1e-3', r"\[fixed\] unknown parameter site 'transition.sigma'; sites:"),
    ('"transition.drift.mlp.0.weight" = 0.0',
     r"\[fixed\] transition.drift.mlp.0.weight: only scalar sites"),
    ('"transition.sigma_r" = -1.0', r"\[fixed\] transition.sigma_r: -1 is outside the support"),
    ('"transition.sigma_r" = "small"', r"\[fixed\] transition.sigma_r: expected a finite number"),
])
def test_fixed_errors(tmp_path, entry, message):
    path = write(tmp_path, f'[emission]\nkind = "normalized_multinomial"\n[fixed]\n{entry}\n')
    with pytest.raises(ValueError, match="spec.toml: " + message):
        specs.load_model(path, n_bins=5)


# --------------------------------------------------------------------------- constraints
def test_user_constraint_by_import_path(tmp_path, monkeypatch, data):
    module = "cgpyro_user_constraints_fixture"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        def total_mass(x):
            return 1.0 - x.sum(-1, keepdim=True)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    path = write(tmp_path, f"""
        [[virtual_observables]]
        constraint = "{module}:total_mass"
        sigma2 = 1e-6
        """)
    with pytest.warns(UserWarning, match="without the 'mass' virtual observable"):
        model = specs.load_model(path, n_bins=5)
    (vo,) = model.virtual_observables
    assert vo.name == "total_mass" and vo.sigma_start == pytest.approx(1e-2)
    inference = SVIInference(model, steps=2, progress=False, warm_start=False).fit(data)
    assert all(math.isfinite(v) for v in inference.loss_history)


def test_builtin_constraint_by_import_path(tmp_path):
    path = write(tmp_path, """
        [[virtual_observables]]
        name = "m"
        constraint = "cgpyro.virtual:mass_conservation"
        """)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it is the mass constraint: no warning
        (vo,) = specs.load_model(path, n_bins=5).virtual_observables
    assert vo.fn is mass_conservation and vo.affine is not None


# --------------------------------------------------------------------------- loader errors
VO = r"\[\[virtual_observables\]\] "
MODEL_ERRORS = [
    ("nmae = 'x'\n", r"unknown key 'nmae'; allowed: cg, description, emission, fixed, name"),
    ("[transition]\nhiden = [25]\n",
     r"\[transition\] unknown key 'hiden'; allowed: activation, channels, conserve_mass"),
    ("[cg]\nbins = 25\n", r"\[cg\] unknown key 'bins'; allowed: n_bins"),
    ("[[virtual_observables]]\nconstraint = 'mass'\nsigma = 1e-9\n",
     VO + r"#1 unknown key 'sigma'; allowed: anneal_fraction"),
    ("[transition]\nhidden = [25, -3]\n",
     r"\[transition\] hidden: expected a list of positive integers, found -3$"),
    ("[transition]\nhidden = 25\n",
     r"\[transition\] hidden: expected a list of positive integers, found 25$"),
    ("[transition]\nhidden = []\n", r"\[transition\] hidden: an empty list needs linear_skip"),
    ("[transition]\nlinear_skip = 'yes'\n",
     r"\[transition\] linear_skip: expected true or false, found 'yes'"),
    ("[transition]\nactivation = 'relu2'\n",
     r"\[transition\] activation: expected one of 'elu', 'relu'.*found 'relu2'"),
    ("[transition]\nnoise = 'diagonal'\n",
     r"\[transition\] noise: expected one of 'isotropic', 'full', found 'diagonal'"),
    ("[transition]\nweight_prior_scale = -1\n",
     r"\[transition\] weight_prior_scale: expected a number > 0, found -1"),
    ("[cg]\nn_bins = 'many'\n", r"\[cg\] n_bins: expected 'auto' or an integer >= 2, found 'many'"),
    ("[cg]\nn_bins = 1\n", r"\[cg\] n_bins: expected 'auto' or an integer >= 2, found 1"),
    ("[prior]\nx0_scale = 0\n", r"\[prior\] x0_scale: expected a number > 0, found 0"),
    ("[emission]\nkind = 'poisson'\n", r"\[emission\] kind: expected one of 'multinomial'"),
    ("[emission]\nkind = 'multinomial'\n",
     r"\[emission\] kind: 'multinomial' needs a virtual observable"),
    ("vectorized = 1\n", r"vectorized: expected true or false, found 1"),
    ("transition = 3\n", r"\[transition\]: expected a table, found 3"),
    ("virtual_observables = 'mass'\n", r"virtual_observables: expected an array of tables"),
    ("[[virtual_observables]]\nsigma2 = 1e-9\n",
     VO + r"#1 constraint: required"),
    ("[[virtual_observables]]\nconstraint = 'mass'\nsigma2 = 0\n",
     VO + r"#1 sigma2: expected a number > 0, found 0"),
    ("[[virtual_observables]]\nconstraint = 'mass'\nsigma2 = 1e-6\nsigma2_start = 1e-8\n",
     VO + r"#1 sigma2_start: expected a number >= sigma2 = 1e-06, found 1e-08"),
    ("[[virtual_observables]]\nconstraint = 'mass'\nanneal_fraction = 1.5\n",
     VO + r"#1 anneal_fraction: expected a number in \[0, 1\], found 1.5"),
    ("[[virtual_observables]]\nconstraint = 'mass'\n[[virtual_observables]]\nconstraint = 'mass'\n",
     VO + r"#2 name: expected a unique, non-empty name, found 'mass'"),
    ("[[virtual_observables]]\nconstraint = 'no_such_module_xyz:fn'\n",
     VO + r"#1 constraint: constraint 'no_such_module_xyz:fn' cannot be imported"),
    ("[[virtual_observables]]\nconstraint = 'cgpyro.virtual:no_such_fn'\n",
     VO + r"#1 constraint: constraint 'cgpyro.virtual:no_such_fn' cannot be imported"),
    ("[[virtual_observables]]\nconstraint = 'energy'\n",
     VO + r"#1 constraint: constraint 'energy': expected a built-in name"),
    ("[[virtual_observables]]\nconstraint = 'torch:sum'\n",
     VO + r"#1 constraint: 'torch:sum' must map \(\.\.\., n_bins\) to \(\.\.\., M\)"),
    ("[transition\nhidden = [25]\n", r"invalid TOML"),
]


@pytest.mark.filterwarnings("ignore:.*without the 'mass' virtual observable")
@pytest.mark.parametrize(("text", "message"), MODEL_ERRORS)
def test_model_spec_errors_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=r"spec\.toml: " + message) as info:
        specs.load_model(path, n_bins=5)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, specs.SpecError)


def test_missing_spec_files():
    with pytest.raises(ValueError,
                       match=r"no model spec 'no_such_model'.*available: .*particles_paper"):
        specs.load_model("no_such_model", n_bins=5)
    with pytest.raises(ValueError, match=r"no guide spec 'no_such_guide'"):
        specs.load_guide("no_such_guide")
    with pytest.raises(ValueError, match=r"nowhere/model\.toml: no such file"):
        specs.load_model("nowhere/model.toml", n_bins=5)


GUIDE_ERRORS = [
    ("kind = 'lognormal'\n", r"unknown key 'kind'; allowed: description, guide, name, svi"),
    ("[guide]\nkind = 'laplace'\n",
     r"\[guide\] kind: expected one of 'lognormal', 'amortized', 'auto', found 'laplace'"),
    ("[guide]\nkind = 'lognormal'\nhidden = 64\n",
     r"\[guide\] unknown key 'hidden'; allowed: kind$"),
    ("[guide]\nkind = 'amortized'\nhidden = [64, 0]\n",
     r"\[guide\] hidden: expected a positive integer or a list of them, found 0"),
    ("[guide]\nkind = 'amortized'\nwindow = -1\n",
     r"\[guide\] window: expected an integer >= 0, found -1"),
    ("[guide]\nkind = 'auto'\nfamily = 'flow'\n", r"\[guide\] family: expected one of 'normal'"),
    ("[guide]\nkind = 'auto'\nrank = 0\n", r"\[guide\] rank: expected an integer >= 1, found 0"),
    ("[guide]\nkind = 'auto'\nrank = 1000000000\n",
     r"\[guide\] rank: expected an integer <= 10000, found 1000000000"),
    ("[guide]\nkind = 'amortized'\nwindow = 1000000000000000000\n",
     r"\[guide\] window: expected an integer <= 1000, found 1000000000000000000"),
    ("[svi]\nbatch_size = 0\n", r"\[svi\] batch_size: expected an integer >= 1, found 0"),
    ("[svi]\nstep = 10\n",
     r"\[svi\] unknown key 'step'; allowed: batch_size, checkpoint_every, elbo, lr"),
    ("[svi]\nsteps = 0\n", r"\[svi\] steps: expected an integer >= 1, found 0"),
    ("[svi]\nsteps = 10.5\n", r"\[svi\] steps: expected an integer >= 1, found 10.5"),
    ("[svi]\nlr = 'fast'\n", r"\[svi\] lr: expected a number > 0, found 'fast'"),
    ("[svi]\nelbo = 'renyi'\n", r"\[svi\] elbo: expected one of 'analytic', 'trace'"),
    ("[svi]\nwarm_start = 'no'\n", r"\[svi\] warm_start: expected true or false, found 'no'"),
    ("guide = 'lognormal'\n", r"guide: expected a table \(\[guide\]\), found 'lognormal'"),
]


@pytest.mark.parametrize(("text", "message"), GUIDE_ERRORS)
def test_guide_spec_errors_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=r"spec\.toml: " + message) as info:
        specs.load_guide(path)
    assert "\n" not in str(info.value)


def test_error_message_format_matches_the_contract(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    path = write(models, "[transition]\nhidden = [25, -3]\n", "foo.toml")
    with pytest.raises(ValueError) as info:
        specs.load_model(path, n_bins=5)
    assert re.fullmatch(r".*models/foo\.toml: \[transition\] hidden: expected a list of "
                        r"positive integers, found -3", str(info.value))


def test_guide_factory_builds_each_kind(data):
    counts = torch.as_tensor(data.counts, dtype=torch.float64)
    model = specs.load_model("particles_paper", n_bins=5)
    kinds = {"lognormal": LogNormalGuide, "amortized": AmortizedGuide, "auto_normal": CGAutoGuide}
    for name, cls in kinds.items():
        assert isinstance(specs.load_guide(name).factory(model, counts, None), cls)


# --------------------------------------------------------------------------- choosing specs
def _particles(n_bins, micro_steps, seed=0):
    data, sim = simulate_dataset(n_sequences=2, n_steps=5, n_particles=20_000, n_bins=n_bins,
                                 micro_steps=micro_steps, seed=seed)
    p_left, p_right = sim.system.p_left, sim.system.p_right
    # one micro step moves a particle by -1, 0 or +1 site: variance p_l + p_r - (p_r - p_l)²
    var = p_left + p_right - (p_right - p_left) ** 2
    return data, math.sqrt(var * micro_steps) * n_bins / sim.system.n_sites


# two sequences of 5 steps and 20,000 particles: a short step's width comes out up to 30 % low
# (seeds 0-2: 0.103-0.139 for 0.140), a width near the threshold within 3 % (0.481-0.499, 0.494)
@pytest.mark.parametrize("n_bins, micro_steps, chosen, rel", [(10, 800, "subbin", 0.3),
                                                              (25, 1600, "physics", 0.05)])
def test_auto_spec_chooses_by_the_width_of_one_snapshots_displacement(n_bins, micro_steps,
                                                                      chosen, rel):
    data, width = _particles(n_bins, micro_steps)  # analytic: 0.140 and 0.494 bins
    spec = specs.resolve_model_spec("auto", data)
    assert spec.name == chosen
    assert spec.choice["spec"] == "auto" and spec.choice["chosen"] == chosen
    assert spec.choice["width"] == pytest.approx(width, rel=rel)
    model = specs.load_model("auto", counts=data.counts)
    assert model.n_bins == n_bins and model.spec.name == chosen


def test_auto_spec_needs_the_data_and_falls_back_without_a_width(data):
    with pytest.raises(specs.SpecError, match="chooses its model from the training data"):
        specs.load_model("auto", n_bins=5)
    one_snapshot = data.counts[:, :1]
    assert specs.resolve_model_spec("auto", one_snapshot).choice["width"] is None
    assert specs.resolve_model_spec("auto", one_snapshot).name == "physics"
    assert specs.resolve_model_spec("physics", data).choice is None  # a plain spec as read
    with pytest.raises(ValueError, match=r"\(n_sequences, n_times, n_bins\)"):
        specs.resolve_model_spec("auto", data.counts[0])


@pytest.mark.parametrize("text, message", [
    ('[choose]\nshort_step = "subbin"\notherwise = "physics"\n',
     r"\[choose\] width_below: required"),
    ('[choose]\nshort_step = "subbin"\notherwise = "physics"\nwidth_below = -1\n',
     r"\[choose\] width_below"),
    ('[choose]\nshort_step = "nonesuch"\notherwise = "physics"\nwidth_below = 0.3\n',
     r"\[choose\] short_step: 'nonesuch' is not a usable model spec"),
    ('[choose]\nshort_step = "auto"\notherwise = "physics"\nwidth_below = 0.3\n',
     r"'auto' is itself a choosing spec"),
    ('[choose]\nshort_step = "subbin"\notherwise = "physics"\nwidth_below = 0.3\nbogus = 1\n',
     r"\[choose\].*bogus"),
    ('[choose]\nshort_step = "subbin"\notherwise = "physics"\nwidth_below = 0.3\n'
     '[transition]\ndrift = "flux"\n', r"transition"),
])
def test_choosing_spec_errors_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(specs.SpecError, match=message) as err:
        specs.resolve_model_spec(path, np.ones((1, 3, 5)))
    assert "spec.toml" in str(err.value)
