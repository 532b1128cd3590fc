"""The README's Python example runs as written (the paper's sizes, default settings)."""

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.mark.slow
def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    pred = namespace["pred"]
    assert pred.mean.shape == (64, 41, 25) and pred.mass.shape == (64, 41)
    assert abs(pred.mass - 1).max() < 1e-2
    assert set(namespace["idata"].groups()) >= {"posterior", "log_likelihood", "observed_data"}
