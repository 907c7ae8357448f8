"""The README's Python usage example runs as written (in a fresh process, in an empty directory)."""

from helpers import REPO_DIR  # the repository root / tests folder
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(REPO_DIR) / "README.md"


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


def _section(title):
    text = README.read_text()
    start = text.index(f"## {title}")
    return text[start: text.index("\n## ", start + 1)]


def test_trl_section_says_what_cpu_users_pass():
    """The TRL section's ``bf16=True`` example raises in ``SFTConfig`` / ``DPOConfig`` on a machine without a GPU
    (TRL turns bf16 on by default anyway); the ``run_args`` it gives for a CPU build both configs on both stacks."""
    import torch
    from trl import DPOConfig, SFTConfig

    text = " ".join(_section("Use with TRL").split())
    cpu = re.search(r"On a CPU pass `run_args = (dict\([^`]*\))`", text)
    assert cpu, "the TRL section gives no run_args for a CPU"
    run_args = eval(cpu.group(1), {})  # noqa: S307 (the README's own literal)
    for config_class in (SFTConfig, DPOConfig):
        assert config_class(output_dir="out", **run_args).bf16 is False
    gpu = re.search(r"e\.g\. `(dict\([^`]*bf16=True[^`]*\))` on a GPU", text)
    assert gpu, "the TRL section's bf16 example is no longer marked as a GPU one"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16"):
            SFTConfig(output_dir="out", **eval(gpu.group(1), {}))  # noqa: S307


def test_trainer_checkpoint_file_list_names_every_file():
    """The files a plain transformers.Trainer checkpoint of a PaCA model holds (test_integration checks them against
    real checkpoints), model.safetensors included, are the ones the README lists."""
    from test_integration import ADAPTER_FILES

    section = _section("In your own trainer, loading, and serving")
    listed = section[: section.index("```")]
    missing = [name for name in sorted(ADAPTER_FILES) if f"`{name}`" not in listed]
    assert not missing, missing
