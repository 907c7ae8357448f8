"""Benchmark harness for PaCA vs the frozen floor, peft LoRA, upstream peft's PaCA and full fine-tuning
(``scripts/benchmark.py``).

Modules: :mod:`~paca_hpu.bench.variants` (how each variant is built), :mod:`~paca_hpu.bench.inputs` (data),
:mod:`~paca_hpu.bench.measure` (timing loop, saved-for-backward bytes, peak memory), :mod:`~paca_hpu.bench.timing`
(the step-time section: groups, fresh processes, ratios), :mod:`~paca_hpu.bench.proc` (fresh processes),
:mod:`~paca_hpu.bench.child` (per-variant memory subprocess), :mod:`~paca_hpu.bench.maxseq` (longest-sequence
search), :mod:`~paca_hpu.bench.quality` (held-out loss), :mod:`~paca_hpu.bench.profile` (PaCA vs floor),
:mod:`~paca_hpu.bench.report` (Markdown, charts, docs page), :mod:`~paca_hpu.bench.cli`, and
:mod:`~paca_hpu.bench.ab` (A/B timing of the candidates in :mod:`paca_hpu.experimental`).

Importing this package imports nothing heavy; peft, matplotlib and torch.profiler load only when used.
"""

from .cli import main

__all__ = ["main"]
