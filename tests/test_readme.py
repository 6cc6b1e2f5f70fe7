"""The README's examples run as written and produce what the text around them says."""
import re
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
EXPECTED = [("h", (4, 8192, 1024)), ("y_t", (16, 1, 256)), ("y_next", (2, 1, 128)), ("y_next2", (2, 1, 128)),
            ("y_ort", (8, 50, 64))]  # a result of each example, in order
NEEDS = {"y_ort": ("onnx", "onnxscript", "onnxruntime")}  # optional packages (the peers extra) an example imports


def test_every_example_has_an_expectation():
    assert len(EXAMPLES) == len(EXPECTED)


@pytest.mark.parametrize("index", range(len(EXPECTED)), ids=[name for name, _ in EXPECTED])
def test_readme_example_runs(index):
    name, shape = EXPECTED[index]
    for module in NEEDS.get(name, ()):
        pytest.importorskip(module, reason=f"the README example ending in {name} needs {module} (the peers extra)")
    namespace = {}
    exec(compile(EXAMPLES[index], "README.md", "exec"), namespace)
    assert tuple(namespace[name].shape) == shape
