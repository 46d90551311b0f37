"""The README's API example runs as written (on tiny random data, two rounds)."""

import pathlib
import re

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_api_example_runs():
    text = (REPO / "README.md").read_text()
    code = re.search(r"## The API in 15 lines\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    rng = np.random.default_rng(0)
    scope = {}
    for i, n in enumerate((12, 20, 7)):
        scope[f"x{i}"] = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
        scope[f"y{i}"] = rng.integers(0, 10, n).astype(np.int32)
    exec(compile(code.replace("range(50)", "range(2)"), "README.md", "exec"), scope)
    assert int(scope["state"].round) == 2
    assert np.isfinite(float(scope["metrics"]["client_train_loss_weighted_mean"]))
