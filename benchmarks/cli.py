"""Command line of the benchmark (``scripts/benchmark.py``; ``python -m benchmarks`` from the repository root).

Sections (``--sections``, comma separated, default ``timing,saved,memory,maxseq,quality``; ``profile`` on
request; ``all`` = every section):

* ``timing``: step time and tokens/s, every variant in this process, interleaved rounds;
* ``saved``: bytes saved for backward per step;
* ``memory``: peak memory, each variant in its own subprocess;
* ``maxseq``: longest sequence at batch 1 within a memory budget (same subprocesses);
* ``maxbatch``: tokens/s of each variant at the largest batch it fits within the same budget (CPU; fresh-process
  probes, then the step-time section's interleaved timing, each variant at its own batch; :mod:`benchmarks.maxbatch`);
* ``quality``: held-out loss after ``--steps`` steps at each method's best learning rate;
* ``profile``: where PaCA's step time goes beyond the floor's (torch.profiler + component timings);
* ``qpaca``: QPaCA vs QLoRA on the model quantized to 4 bits by bitsandbytes (step time, saved bytes, peak memory,
  held-out loss; ``--qpaca_parts``), plus a memory model for large LLaMA models (:mod:`benchmarks.qpaca`).

Outputs in ``--output_dir`` (default ``docs/benchmarks/<run name>``; ``outputs/benchmarks/<run name>`` for the
``--tiny`` / ``--model_config`` smoke models): ``results.json``, ``results.md``, ``step_time.png``, ``memory.png``,
``loss_curves.png``, ``log.txt``, profiler tables; then the docs page (``--docs``, default ``docs/benchmarks.md``
when the output is under ``docs/benchmarks/``) is rebuilt from every run directory next to this one.

Parts: :mod:`benchmarks.arguments` (parser and checks), :mod:`benchmarks.sections` (the measuring sections),
:mod:`benchmarks.runinfo` (log, environment, results skeleton), :mod:`benchmarks.merge` (``--merge``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

from .arguments import SECTIONS, _csv, _parse_lr_grid, build_parser, check_args, resolve_variants
from .merge import _check_merge_target, _merge_previous
from .runinfo import _Log, _default_run_name, _model_spec, _results_skeleton
from .sections import run_sections


def _repo_root() -> Path:
    """The checkout this harness belongs to: ``benchmarks/`` is never installed (the wheel holds ``paca_hpu`` only),
    so its parent folder is the repository, whose ``docs/benchmarks/`` and ``outputs/benchmarks/`` receive runs by
    default and whose git commit is recorded with each run."""
    return Path(__file__).resolve().parents[1]


def default_output_dir(args, run_name: str, root: Path) -> Path:
    """Where a run writes when ``--output_dir`` is not given: ``docs/benchmarks/<run_name>`` for a real model (the
    tracked report, rebuilt into docs/benchmarks.md), ``outputs/benchmarks/<run_name>`` (untracked, no docs page) for
    the random-weight smoke models of ``--tiny`` / ``--model_config``."""
    if args.tiny or args.model_config:
        return root / "outputs" / "benchmarks" / run_name
    return root / "docs" / "benchmarks" / run_name


def run(args) -> dict:
    """Run the selected sections for parsed ``args``; returns the results dict also written to ``results.json``."""
    import torch

    root = _repo_root()
    if args.device != "auto":
        os.environ["PACA_DEVICE"] = args.device
    from paca_hpu import device as _device

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    info = _device.refresh()  # after set_num_threads: the CPU description names the thread count
    problem = check_args(args)
    if problem:
        raise ValueError(problem)
    from .timing import parse_legacy

    sections = list(SECTIONS) if args.sections.strip() == "all" else _csv(args.sections)
    legacy = parse_legacy(args.timing_legacy)
    variants, peft_note = resolve_variants(args)
    quality_variants = [v for v in _csv(args.quality_variants) if v != "floor"]
    lr_grids = _parse_lr_grid(args.lr_grid)

    run_name = args.run_name or _default_run_name(args, info.type)
    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args, run_name, root)
    spec = _model_spec(args)
    from .inputs import load_tokenizer, packed_splits

    tok = load_tokenizer(spec)  # before anything is written: a model that cannot be loaded leaves no run folder
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _Log(str(out_dir / "log.txt"))
    log(f"benchmark {run_name}: {spec.describe()} on {info.describe()}, {args.dtype}, batch {args.batch} x seq "
        f"{args.seq_len}, variants {variants}, sections {sections}, torch threads {threads}")
    if peft_note:
        log(peft_note)
    splits = packed_splits(tok, args.seq_len, max_train_samples=args.max_train_samples,
                           max_eval_samples=args.max_eval_samples)
    log(f"data: {len(splits['train'])} train / {len(splits['validation'])} held-out blocks of {args.seq_len} tokens")
    results = _results_skeleton(args, spec, info, threads, variants, sections, quality_variants, lr_grids, legacy,
                                root)
    if peft_note:
        results["meta"]["peft_paca_note"] = peft_note
    if args.merge and (out_dir / "results.json").is_file():  # refuse a mismatched --merge before measuring
        _check_merge_target(out_dir / "results.json", results)
    run_sections(args, spec, info, sections, variants, quality_variants, lr_grids, legacy, splits, results, log,
                 out_dir)
    _write_outputs(args, results, sections, out_dir, root, log)
    return results


def _write_outputs(args, results: dict, sections: List[str], out_dir: Path, root: Path, log) -> None:
    log("done measuring")
    other = log.other.cores()
    env = results["meta"]["environment"]
    if other is not None:
        env["other processes' CPU use during the run"] = f"{other:.2f} cores on average"
        if other > 0.25:
            results["meta"]["busy_warning"] = (
                f"other processes kept {other:.2f} of {os.cpu_count()} cores busy on average during this run: "
                "timing figures are not representative; rerun on a quiet machine.")
    cmd = results["meta"]["command"]
    results["meta"]["section_commands"] = {sec: cmd for sec in sections}
    results["meta"]["section_busy"] = {sec: results["meta"].get("busy_warning") for sec in sections}
    if args.merge and (out_dir / "results.json").is_file():
        _merge_previous(results, out_dir / "results.json", sections, log)
    from paca_hpu.atomic import write_json_atomic

    from .report import evaluate_targets, run_markdown, write_charts, write_docs_page

    results["targets"] = evaluate_targets(results)
    results["charts"] = write_charts(results, str(out_dir))
    write_json_atomic(out_dir / "results.json", results, indent=1)
    (out_dir / "results.md").write_text(run_markdown(results, image_prefix="", heading="##") + "\n", encoding="utf-8")
    log(f"wrote {out_dir / 'results.json'}, results.md, {', '.join(results['charts'])}")
    docs = _docs_path(args, out_dir, root)
    if docs:
        write_docs_page(docs, str(out_dir.parent))
        log(f"wrote {docs}")


def _docs_path(args, out_dir: Path, root: Path) -> Optional[str]:
    if args.docs is not None:
        return args.docs or None
    default_root = (root / "docs" / "benchmarks").resolve()
    if out_dir.resolve().parent == default_root:
        return str(root / "docs" / "benchmarks.md")
    return None


def main(argv=None) -> int:
    """``scripts/benchmark.py`` entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = None if argv is None else list(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)  # usage + one error line, exit 2
    if args.docs_only:
        from .report import write_docs_page

        root = _repo_root()
        from .report import load_results, run_markdown

        results_root = str(Path(args.output_dir).parent) if args.output_dir else str(root / "docs" / "benchmarks")
        if args.docs == "":
            parser.error("--docs_only with --docs '': no page to build; give --docs PATH or leave --docs out")
        if args.docs is None and Path(results_root).resolve() != (root / "docs" / "benchmarks").resolve():
            parser.error(f"--docs_only: the runs under '{results_root}' are not this repository's docs/benchmarks/; "
                         "give the page to build with --docs PATH (the repository's page is built only from its own "
                         "runs)")
        docs = args.docs or str(root / "docs" / "benchmarks.md")
        runs = load_results(results_root)
        if not runs:
            parser.error(f"--docs_only: no */results.json under '{results_root}'; nothing to build (run a benchmark "
                         "first, or point --output_dir at a run directory)")
        for run_dir, res in runs:  # refresh each run's own page too
            Path(run_dir, "results.md").write_text(run_markdown(res, image_prefix="", heading="##") + "\n",
                                                   encoding="utf-8")
        print(write_docs_page(docs, results_root))
        return 0
    from paca_hpu.hub import ModelSourceError

    try:
        run(args)
    except ModelSourceError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
