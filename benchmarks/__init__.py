"""Benchmark harness for PaCA vs the frozen floor, peft LoRA, upstream peft's PaCA and full fine-tuning
(``scripts/benchmark.py``, ``scripts/study.py``, ``scripts/scale_out.py``; ``python -m benchmarks`` and
``python -m benchmarks.ab`` from the repository root).

Not part of the installed package: ``pip install .`` installs ``paca_hpu`` only, and this folder uses nothing of it
but its public API. What it needs beyond ``paca_hpu`` is ``benchmarks/requirements.txt``. Runs go to the
checkout's ``docs/benchmarks/`` (the docs page, whose prose is in ``benchmarks/templates/``) or
``outputs/benchmarks/``.

Modules: :mod:`~benchmarks.variants` (how each variant is built), :mod:`~benchmarks.inputs` (data),
:mod:`~benchmarks.measure` (timing loop, saved-for-backward bytes, peak memory), :mod:`~benchmarks.timing`
(the step-time section: groups, fresh processes, ratios), :mod:`~benchmarks.proc` (fresh processes),
:mod:`~benchmarks.child` (per-variant memory subprocess), :mod:`~benchmarks.maxseq` (longest-sequence
search), :mod:`~benchmarks.quality` (held-out loss), :mod:`~benchmarks.profile` (PaCA vs floor),
:mod:`~benchmarks.qpaca` (QPaCA vs QLoRA, memory model), :mod:`~benchmarks.report` (Markdown, charts, docs page;
its tables in :mod:`~benchmarks.report_tables`, targets and headline in :mod:`~benchmarks.report_headline`),
:mod:`~benchmarks.prose` (the page's templates), :mod:`~benchmarks.study_runs` / :mod:`~benchmarks.study` (the
resumable parity study and its page section), :mod:`~benchmarks.scale_out` (communication and memory under
DeepSpeed ZeRO), :mod:`~benchmarks.cli` (with :mod:`~benchmarks.arguments`, :mod:`~benchmarks.sections`,
:mod:`~benchmarks.runinfo`, :mod:`~benchmarks.merge`), and :mod:`~benchmarks.ab` (A/B timing of the candidates in
:mod:`paca_hpu.experimental`).

Importing this package imports nothing heavy; peft, matplotlib and torch.profiler load only when used.
"""

from .cli import main

__all__ = ["main"]
