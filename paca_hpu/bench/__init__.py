"""Benchmark harness for PaCA vs the frozen floor, peft LoRA and full fine-tuning (``scripts/benchmark.py``).

Modules: :mod:`~paca_hpu.bench.variants` (how each variant is built), :mod:`~paca_hpu.bench.inputs` (data),
:mod:`~paca_hpu.bench.measure` (timing, saved-for-backward bytes, peak memory), :mod:`~paca_hpu.bench.child`
(per-variant memory subprocess), :mod:`~paca_hpu.bench.quality` (held-out loss), :mod:`~paca_hpu.bench.profile`
(PaCA vs floor), :mod:`~paca_hpu.bench.report` (Markdown, charts, docs page), :mod:`~paca_hpu.bench.cli`.

Importing this package imports nothing heavy; peft, matplotlib and torch.profiler load only when used.
"""

from .cli import main

__all__ = ["main"]
