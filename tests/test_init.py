"""The package surface: lazy exports (PEP 562) and what ``import cgpyro`` loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import cgpyro

HEAVY = ("torch", "pyro", "arviz", "matplotlib", "xarray")


def _modules_after(code: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in " \
                    "sys.modules})))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_import_loads_no_heavy_dependency():
    loaded = _modules_after("import cgpyro")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_cli_help_and_simulator_stay_light():
    """``cgpyro --help`` and the simulate path need neither torch nor ArviZ nor matplotlib."""
    loaded = _modules_after("from cgpyro import cli\nfrom cgpyro.systems import simulate_dataset\n"
                            "from cgpyro.data import save")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("name", cgpyro.__all__)
def test_every_export_resolves(name):
    value = getattr(cgpyro, name)
    assert value is not None
    assert name in dir(cgpyro)


def test_all_lists_every_lazy_export():
    assert sorted(cgpyro.__all__) == sorted([*cgpyro._EXPORTS, "plots"])


def test_error_classes_exported():
    for name in ("DataError", "SpecError", "CheckpointError", "NumericalError", "RunError",
                 "RunLockedError"):
        cls = getattr(cgpyro, name)
        assert issubclass(cls, Exception) and cls.__name__ == name
    assert issubclass(cgpyro.DataError, ValueError)  # user input errors are ValueErrors


def test_exports_are_the_defining_objects():
    from cgpyro.inference import SVIInference
    from cgpyro.predict import forecast

    assert cgpyro.SVIInference is SVIInference and cgpyro.forecast is forecast
    assert cgpyro.plots.plot_loss.__module__ == "cgpyro.plots"  # submodule as attribute


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        cgpyro.no_such_name  # noqa: B018
    assert not hasattr(cgpyro, "_private_thing")
