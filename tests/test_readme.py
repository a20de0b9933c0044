"""The README's usage example runs as written."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example():
    text = README.read_text()
    section = text[text.index("## Using the Engine"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_two_commands_open_the_readme():
    head = README.read_text().splitlines()[:6]
    assert any(line.startswith('pip install ".[train]" && pyengine-train') for line in head)
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = next(line.split("#")[0].strip() for line in head if "pytest" in line)
    assert test_cmd in ci, "CI runs the README's test command as written"


@pytest.mark.slow
def test_usage_example_runs(tmp_path):
    res = subprocess.run([sys.executable, "-c", api_example()], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split("\n")
    assert lines[0].split()[0] == "5", "global_step after 20 micro-batches of 4"
    assert (tmp_path / "ckpt" / "index.json").exists()
