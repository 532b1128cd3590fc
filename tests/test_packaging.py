"""The wheel: it carries the shipped specs, and a non-editable install finds them.

The package is built offline from a copy of the source tree (``pip wheel --no-deps
--no-build-isolation --no-index``, with the setuptools of the running environment), installed
with ``pip install --target`` into a temporary folder, and used from a subprocess whose working
directory holds no ``models/`` or ``guides/``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC_FOLDERS = ("models", "guides", "data")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                                reason="building the wheel offline needs setuptools installed")


def _pip(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build from a copy: the shared working tree gets no build/ or egg-info folders."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "cgpyro", src / "cgpyro",
                    ignore=shutil.ignore_patterns("__pycache__", "_specs"))
    for folder in SPEC_FOLDERS:  # the spec files only, not generated data
        (src / folder).mkdir()
        for spec in (ROOT / folder).glob("*.toml"):
            shutil.copy(spec, src / folder / spec.name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(tmp / "dist"), str(src), cwd=tmp)
    (built,) = (tmp / "dist").glob("cgpyro-*.whl")
    return built


def test_wheel_carries_every_shipped_spec_and_an_spdx_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in SPEC_FOLDERS:
        expected = {f"cgpyro/_specs/{folder}/{p.name}" for p in (ROOT / folder).glob("*.toml")}
        assert expected and expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith("cgpyro/_specs/") and not n.endswith(".toml")]
    assert not [n for n in names if "__pycache__" in n or n.endswith((".npz", ".nc"))]
    metadata = zipfile.ZipFile(wheel).read("cgpyro-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata.splitlines()


def test_installed_wheel_loads_specs_without_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel),
         cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = (
        "import cgpyro, cgpyro.specs as s\n"
        "from cgpyro.datasets import load_dataset_spec\n"
        f"assert cgpyro.__file__.startswith({str(target)!r}), cgpyro.__file__\n"
        "print(s.specs_dir())\n"
        "print(sorted(s.list_specs()['models']))\n"
        "model = cgpyro.load_model('particles_best', n_bins=25)\n"
        "guide = cgpyro.load_guide('lognormal')\n"
        "print(type(model).__name__, model.n_bins, guide.svi['steps'])\n"
        "print(load_dataset_spec('particles_small').name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CGPYRO_SPECS_DIR"}
    env["PYTHONPATH"] = str(target)  # ahead of the editable install of this checkout
    out = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(target / "cgpyro" / "_specs")
    assert lines[1] == str(sorted(p.stem for p in (ROOT / "models").glob("*.toml")))
    assert lines[2].startswith("CGModel 25 ") and int(lines[2].split()[-1]) > 0
    assert lines[3] == "particles_small"
