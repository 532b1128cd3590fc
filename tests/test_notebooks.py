"""The notebooks in ``notebooks/``: stored clean, and each runs top to bottom in fast mode.

Each notebook is executed with nbclient in a fresh ``python3`` kernel, with
``CGPYRO_FAST=1`` (tiny sizes: a smoke test, not the paper's numbers) in the kernel's
environment, in a temporary working directory. The kernel is the one of the Python running
the tests: ``JUPYTER_PATH`` points first at ``sys.prefix/share/jupyter`` (where ``make install``
puts the ``python3`` kernel spec), whose ``argv[0]`` ``python`` jupyter_client replaces by
``sys.executable``; without that spec, ipykernel's built-in one, which also uses
``sys.executable``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ("01_reproduce_paper.ipynb", "02_swap_guides_and_priors.ipynb",
            "03_bring_your_own_data.ipynb")
FAST_LINE = 'FAST = os.environ.get("CGPYRO_FAST", "0") == "1"'
KERNEL = "python3"
CELL_TIMEOUT = 300  # seconds per cell

# What each notebook must print or show besides figures: table headers and markers.
MARKERS = {
    "01_reproduce_paper.ipynb": ["| time (Δt) | error | oracle floor | ratio to floor |",
                                 "| max_ratio |", "fig1_density.png"],
    "02_swap_guides_and_priors.ipynb": ["| model | guide | final ELBO | elpd_loo |",
                                        "| particles_no_vo | lognormal |",
                                        "| particles_best | amortized |",
                                        "| particles_best | auto_normal |",
                                        "round trip OK",
                                        "| spec | sigma_r_multinomial | mean band width |",
                                        "counts_forecast  (",
                                        "max |Predictive mean - forecast mean|"],
    "03_bring_your_own_data.ipynb": ["DataError:", "| time index | steps ahead | cgpyro L1 error |",
                                     "max |CLI mean - Python API mean|"],
}
MIN_FIGURES = {"01_reproduce_paper.ipynb": 5, "02_swap_guides_and_priors.ipynb": 4,
               "03_bring_your_own_data.ipynb": 3}


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _first_code_cell(nb) -> str:
    return next(cell.source for cell in nb.cells if cell.cell_type == "code")


def _texts(nb) -> str:
    """Everything the executed notebook printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                data = out.get("data", {})
                parts.extend(str(data[k]) for k in ("text/plain", "text/markdown", "text/html")
                             if k in data)
    return "\n".join(parts)


def _figures(nb) -> int:
    return sum("image/png" in out.get("data", {})
               for cell in nb.cells for out in cell.get("outputs", [])
               if out.output_type in ("display_data", "execute_result"))


@pytest.fixture
def kernel_env(monkeypatch):
    """Fast mode and a headless matplotlib for the kernel (kernels inherit os.environ)."""
    monkeypatch.setenv("CGPYRO_FAST", "1")
    # A headless backend that still sends figures to the notebook: ipykernel picks the inline
    # backend only when MPLBACKEND is unset, and `make test` sets MPLBACKEND=Agg (no outputs).
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(Path(sys.prefix) / "share" / "jupyter"), *filter(None, [os.environ.get(
            "JUPYTER_PATH")])]))


# --------------------------------------------------------------------------- stored form
def test_all_notebooks_present():
    assert [p.name for p in NOTEBOOKS] == sorted(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_stored_clean(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} is stored with outputs"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"
    assert FAST_LINE in _first_code_cell(nb), f"{path.name}: first code cell lacks {FAST_LINE!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ci_safe(path):
    """No shell escapes or magics (CI runs them in-process), no plt.show(), seeds first."""
    nb = _read(path)
    first = _first_code_cell(nb)
    for call in ("np.random.seed(", "torch.manual_seed(", "pyro.set_rng_seed("):
        assert call in first, f"{path.name}: first code cell lacks {call}"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            stripped = line.lstrip()
            assert not stripped.startswith(("!", "%")), f"{path.name}: cell {i}: {line!r}"
        assert "plt.show(" not in cell.source, f"{path.name}: cell {i} calls plt.show()"


def test_kernel_is_this_python(kernel_env):
    """The ``python3`` kernel nbclient will start runs this interpreter (the venv's)."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    exe = spec.argv[0]
    assert exe in {"python", f"python{sys.version_info[0]}",
                   "python{}.{}".format(*sys.version_info[:2])} or \
        os.path.realpath(exe) == os.path.realpath(sys.executable), \
        f"kernel {KERNEL!r} in {spec.resource_dir} runs {exe}, not {sys.executable}"


# --------------------------------------------------------------------------- execution
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, kernel_env):
    nb = _read(path)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the traceback) on any failing cell

    errors = [out for cell in nb.cells for out in cell.get("outputs", [])
              if out.output_type == "error"]
    assert not errors, errors
    text = _texts(nb)
    assert "FAST = True" in text, "the kernel did not see CGPYRO_FAST=1"
    assert "IProgress not found" not in text, "tqdm.auto used without ipywidgets"
    for marker in MARKERS.get(path.name, []):
        assert marker in text, f"{path.name}: no output contains {marker!r}"
    assert _figures(nb) >= MIN_FIGURES.get(path.name, 1), f"{path.name}: too few figures"
    assert list(tmp_path.iterdir()) == [], "the notebook left files in its working directory"
    # the stored file is untouched: never save an executed copy over it
    assert all(not cell.get("outputs") for cell in _read(path).cells
               if cell.cell_type == "code")
