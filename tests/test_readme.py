"""The README's example runs as written."""
import re
from pathlib import Path


def test_readme_example_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["h"].shape == (4, 8192, 1024)
    assert namespace["h_packed"].shape == (1, 8192, 1024)
