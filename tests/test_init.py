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


@pytest.mark.parametrize("suffix", [".npz", ".nc"])
def test_cli_help_and_simulate_stay_light(tmp_path, suffix):
    """``cgpyro --help`` and ``cgpyro simulate`` need neither torch nor ArviZ nor matplotlib
    (nor xarray and pandas for a NetCDF file)."""
    out = tmp_path / f"small{suffix}"
    loaded = _modules_after(
        "import contextlib as c, io\nfrom cgpyro.cli import main\n"
        "with c.redirect_stdout(io.StringIO()), c.redirect_stderr(io.StringIO()):\n"
        "    assert main(['--help']) == 0\n"
        f"    assert main(['simulate', '--sequences', '2', '--steps', '2', '--particles', '100', "
        f"'--out', {str(out)!r}]) == 0")
    assert out.is_file()
    assert not loaded & {*HEAVY, "pandas"}, sorted(loaded & {*HEAVY, "pandas"})


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


def test_every_error_class_is_exported():
    """Each ``class ...Error`` in the package is a public name (the CLI's UsageError excepted:
    ``cgpyro.cli.main`` turns it into exit code 2, so no caller of the library meets it)."""
    import ast
    from pathlib import Path

    defined = set()
    for path in Path(cgpyro.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined |= {(path.stem, node.name) for node in ast.walk(tree)
                    if isinstance(node, ast.ClassDef) and node.name.endswith("Error")}
    assert ("run", "RunError") in defined  # the scan sees the package
    missing = {name for module, name in defined
               if name not in cgpyro.__all__ and (module, name) != ("cli", "UsageError")}
    assert not missing, sorted(missing)
    for module, name in defined - {("cli", "UsageError")}:
        assert getattr(cgpyro, name).__name__ == name, (module, name)


def test_catching_input_errors_stays_light():
    """``except cgpyro.SpecError`` (or RunError, DataError) loads no heavy dependency."""
    loaded = _modules_after("import cgpyro\ncgpyro.SpecError, cgpyro.RunError, cgpyro.DataError")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_public_submodules_resolve():
    import types

    for name in cgpyro._SUBMODULES:
        module = getattr(cgpyro, name)
        assert isinstance(module, types.ModuleType) and module.__name__ == f"cgpyro.{name}"
    assert not {m for m in cgpyro._SUBMODULES if m.startswith("_")}


def test_exports_are_the_defining_objects():
    from cgpyro.inference import SVIInference
    from cgpyro.predict import forecast

    assert cgpyro.SVIInference is SVIInference and cgpyro.forecast is forecast
    assert cgpyro.plots.plot_loss.__module__ == "cgpyro.plots"  # submodule as attribute


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        cgpyro.no_such_name  # noqa: B018
    assert not hasattr(cgpyro, "_private_thing")
