"""The README's Python usage example runs as written (in a fresh process, in an empty directory)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_short_usage_example():
    blocks = _python_blocks()
    assert blocks, "README.md has no ```python block"
    code_lines = [ln for ln in blocks[0].splitlines() if ln.strip()]
    assert len(code_lines) <= 12, f"the usage example has {len(code_lines)} lines"


@pytest.mark.embedded_model
def test_readme_example_runs_as_written(tmp_path):
    code = _python_blocks()[0]
    check = (
        "\nimport os, torch\n"
        "assert os.path.getsize('my_adapter/adapter_model.safetensors') > 0\n"
        "from paca_hpu import PaCALinear\n"
        "assert not any(isinstance(m, PaCALinear) for m in merged.modules())\n"
        "x = torch.randint(0, 49152, (1, 8))\n"
        "print('README-EXAMPLE-OK', float(merged(input_ids=x).logits.abs().sum()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(README.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "README-EXAMPLE-OK" in proc.stdout
