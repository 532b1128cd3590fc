"""Virtual observables: a user constraint of the wrong shape is refused by name and shape."""

import sys
import textwrap

import pytest
import torch
from pyro import poutine

from cgpyro import specs
from cgpyro.virtual import VirtualObservable, mass_conservation


@pytest.mark.parametrize(("fn", "shape", "message"), [
    (lambda x: x.sum(-1), (3, 4, 5), r"here \(3, 4, 5\) to \(3, 4, M\); it returned \(3, 4\)$"),
    (lambda x: x.sum(), (5,), r"here \(5,\) to \(M,\); it returned \(\)$"),
    (lambda x: x[0], (2, 5), r"here \(2, 5\) to \(2, M\); it returned \(5,\)$"),
    (lambda x: 1.0, (2, 5), r"here \(2, 5\) to \(2, M\); it returned float$"),
])
def test_constraint_of_the_wrong_shape_names_the_expected_one(fn, shape, message):
    vo = VirtualObservable("c", fn)
    rule = r"^virtual observable 'c': the constraint must map X of shape \(\.\.\., n_bins\) to "
    with pytest.raises(ValueError, match=rule + r"\(\.\.\., M\), " + message):
        vo(torch.ones(shape, dtype=torch.float64))


def test_constraints_of_the_right_shape_pass():
    x = torch.rand(3, 4, 5, dtype=torch.float64)
    assert VirtualObservable("m", mass_conservation)(x).shape == (3, 4, 1)
    assert VirtualObservable("two", lambda x: x[..., :2])(x).shape == (3, 4, 2)


def test_spec_constraint_that_only_fits_the_probe_fails_in_the_model(tmp_path, monkeypatch):
    """The spec loader probes a constraint on one (2, n_bins) state; one that flattens its
    input passes that probe and must still fail clearly on the model's (sequence, time, bin)."""
    module = "cgpyro_flat_constraint_fixture"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        def flat(x):
            return 1.0 - x.reshape(-1, x.shape[-1]).sum(-1, keepdim=True)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[[virtual_observables]]\nconstraint = "mass"\n'
                    f'[[virtual_observables]]\nconstraint = "{module}:flat"\n')
    model = specs.load_model(spec, n_bins=5)
    counts = torch.full((2, 3, 5), 10.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"virtual observable 'flat': .* here \(2, 3, 5\) to "
                                         r"\(2, 3, M\); it returned \(6, 1\)"):
        poutine.trace(model).get_trace(counts)
