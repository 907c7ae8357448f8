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
@pytest.mark.both_stacks  # the README promises it on transformers 5 too: `make test-latest` runs it
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


def test_quick_start_timing_says_what_it_assumes():
    """The demo's time is only meaningful with its conditions: cores, load, first run, package downloads."""
    text = README.read_text()
    quick = text[text.index("## Quick start"): text.index("## Use it from Python")]
    demo_line = next(ln for ln in quick.splitlines() if ln.startswith("make demo"))
    minutes = re.search(r"~(\d+) min", demo_line)
    assert minutes, demo_line
    stated = [p for p in quick.split("\n\n") if f"~{minutes.group(1)} min assume" in p]
    assert len(stated) == 1, quick
    for condition in ("idle", "CPU cores", "first run", "conversion", "download"):
        assert condition in stated[0], condition
