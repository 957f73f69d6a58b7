"""The README's usage example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["z"].shape == (16, 3)
    assert torch.isfinite(namespace["nll"]) and namespace["loss"].requires_grad


def test_flow_matching_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [block for block in blocks if "flow_matching_loss(t, scaling.inv(x))" in block]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["nll"])
