"""Command-line arguments of the benchmark (``scripts/benchmark.py``): the parser, built one argument group at a
time, and the checks of the parsed values (:func:`check_args`, one line naming the flag)."""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

SECTIONS = ("timing", "saved", "memory", "maxseq", "maxbatch", "quality", "profile", "qpaca")
QPACA_PARTS = ("timing", "saved", "memory", "quality")
DEFAULT_SECTIONS = "timing,saved,memory,maxseq,quality"
DEFAULT_VARIANTS = "floor,lora,paca,peft_paca,full"


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_lr_grid(text: Optional[str]) -> Dict[str, List[float]]:
    """``'lora=1e-3,3e-3;paca=1e-2'`` -> the default grids with those entries replaced; a ``wide`` part starts from
    :data:`~benchmarks.quality.WIDE_LR_GRIDS` instead. Keys are methods (lora, paca, full) or quality variant
    specs (``paca-req=...``), which then override their method's grid.

    Raises:
        ValueError: malformed text, unknown method or spec, a value that is no positive number (message names the
            part).
    """
    from .quality import DEFAULT_LR_GRIDS, WIDE_LR_GRIDS
    from .variants import parse_quality_variant

    parts = [p.strip() for p in (text or "").split(";") if p.strip()]
    base = WIDE_LR_GRIDS if "wide" in parts else DEFAULT_LR_GRIDS
    grids = {k: list(v) for k, v in base.items()}
    for part in parts:
        if part == "wide":
            continue
        name, _, vals = part.partition("=")
        name = name.strip()
        try:
            parse_quality_variant(name)
        except ValueError:
            name = ""
        if not vals.strip() or not name:
            raise ValueError(f"--lr_grid: expected 'wide' or 'variant=lr,lr,...' with a variant such as lora, paca, "
                             f"full, paca-req, got {part!r}")
        try:
            lrs = [float(v) for v in _csv(vals)]
        except ValueError:
            raise ValueError(f"--lr_grid: {part!r} holds something that is not a number") from None
        if not lrs or any(not (lr > 0) for lr in lrs):
            raise ValueError(f"--lr_grid: learning rates must be positive numbers, got {part!r}")
        grids[name] = lrs
    return grids


def _quality_variant_problem(text: str) -> Optional[str]:
    from .variants import parse_quality_variant

    for spec in _csv(text):
        if spec == "floor":
            continue
        try:
            parse_quality_variant(spec)
        except ValueError as err:
            return f"--quality_variants: {err}"
    return None


def _parse_seeds(text: Optional[str]) -> Optional[List[int]]:
    """``'0,1'`` -> ``[0, 1]`` (None for no text). Raises ValueError naming the flag."""
    if not text:
        return None
    try:
        seeds = [int(v) for v in _csv(text)]
    except ValueError:
        raise ValueError(f"--seeds: expected comma separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct integers, got {text!r}")
    return seeds


def check_args(args) -> Optional[str]:
    """The first problem with parsed ``args`` as a one-line message naming the flag (None if they are usable)."""
    from .variants import VARIANTS

    for flag in ("batch", "seq_len", "r", "rounds", "memory_steps", "steps", "profile_rounds", "profile_reps"):
        if getattr(args, flag) < 1:
            return f"--{flag} must be >= 1, got {getattr(args, flag)}"
    for flag in ("warmup", "memory_warmup", "eval_every"):
        if getattr(args, flag) < 0:
            return f"--{flag} must be >= 0, got {getattr(args, flag)}"
    if not args.alpha > 0:
        return f"--alpha must be > 0, got {args.alpha}"
    sections = list(SECTIONS) if args.sections.strip() == "all" else _csv(args.sections)
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        return f"--sections: unknown or empty {bad or args.sections!r}; choose from {', '.join(SECTIONS)} or all"
    variants = _csv(DEFAULT_VARIANTS if args.variants is None else args.variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        return f"--variants: unknown or empty {bad or args.variants!r}; choose from {', '.join(VARIANTS)}"
    if args.variants is not None and "peft_paca" in variants:
        from .variants import peft_paca_unavailable

        reason = peft_paca_unavailable()
        if reason:
            return f"--variants peft_paca: {reason}"
    from .timing import parse_legacy

    try:
        parse_legacy(args.timing_legacy)
    except ValueError as err:
        return str(err)
    parts = _csv(args.qpaca_parts)
    if not parts or any(x not in QPACA_PARTS for x in parts):
        return f"--qpaca_parts: unknown or empty {args.qpaca_parts!r}; choose from {', '.join(QPACA_PARTS)}"
    if not args.qpaca_device_gb > 0:
        return f"--qpaca_device_gb must be > 0, got {args.qpaca_device_gb}"
    for flag in ("qpaca_model_batch", "qpaca_model_seq_len"):
        if getattr(args, flag) < 1:
            return f"--{flag} must be >= 1, got {getattr(args, flag)}"
    problem = _quality_variant_problem(args.quality_variants)
    if problem:
        return problem
    if args.lr_extend < 0:
        return f"--lr_extend must be >= 0, got {args.lr_extend}"
    if args.maxbatch_limit < 1:
        return f"--maxbatch_limit must be >= 1, got {args.maxbatch_limit}"
    if "maxbatch" in sections and args.device in ("cuda", "hpu"):
        return ("--sections maxbatch: CPU only (the interleaved timing keeps every variant's model resident, so a "
                "batch that fits one variant alone in device memory would not fit there); use --device cpu")
    if args.paca_calibration_batches < 1:
        return f"--paca_calibration_batches must be >= 1, got {args.paca_calibration_batches}"
    try:
        _parse_lr_grid(args.lr_grid)
        _parse_seeds(args.seeds)
    except ValueError as err:
        return str(err)
    if args.model_name_or_path:
        from paca_hpu.hub import check_model_source

        problem = check_model_source(args.model_name_or_path)
        if problem:
            return f"--model_name_or_path: {problem}"
    if args.model_config and not os.path.isfile(args.model_config):
        return f"--model_config '{args.model_config}' not found"
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        return f"--output_dir '{args.output_dir}' is an existing file; pass a directory path"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/benchmark.py`` argument parser (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="scripts/benchmark.py",
        description="Benchmark PaCA against the frozen floor, peft LoRA and full fine-tuning: step time, "
                    "tokens/s, bytes saved for backward, peak memory, longest sequence, held-out loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_arguments(p)
    _timing_arguments(p)
    _memory_arguments(p)
    _quality_arguments(p)
    _profile_and_qpaca_arguments(p)
    _output_arguments(p)
    return p


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, device, dtype, shape, variants and sections (the ungrouped options)."""
    m = p.add_argument_group("model")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--model_name_or_path", default=None,
                   help="transformers LLaMA-family checkpoint (directory or Hub id); default: the embedded "
                        "SmolLM2-135M-Instruct")
    g.add_argument("--tiny", action="store_true",
                   help="tiny 2-layer LLaMA built in-process with random weights and a byte-level tokenizer "
                        "(smoke tests)")
    g.add_argument("--model_config", default=None,
                   help="LlamaConfig JSON file: model built in-process with random weights, byte-level tokenizer")
    m.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "hpu"],
                   help="auto: HPU > CUDA > CPU (paca_hpu.device)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="fp32: float32 model, no autocast; bf16: bfloat16 model, no autocast (same for all variants)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--variants", default=None,
                   help=f"comma separated subset of {DEFAULT_VARIANTS} (default: all of them; peft_paca only when "
                        "the installed peft has its PaCA tuner, otherwise the page says it was not measured)")
    p.add_argument("--sections", default=DEFAULT_SECTIONS, help=f"comma separated subset of {','.join(SECTIONS)}, or all")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0, help="lora_alpha and paca_alpha")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")


def _timing_arguments(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("timing")
    t.add_argument("--rounds", type=int, default=12, help="interleaved timed rounds (one step per variant each)")
    t.add_argument("--warmup", type=int, default=2, help="discarded warm-up steps per variant")
    t.add_argument("--timing_legacy", default=None,
                   help="reproduce parts of the timing protocol before the fix, to show what each changed: "
                        "comma separated subset of inprocess,full,rotate,gc, or all (see benchmarks.timing)")


def _memory_arguments(p: argparse.ArgumentParser) -> None:
    mem = p.add_argument_group("memory / longest sequence")
    mem.add_argument("--memory_warmup", type=int, default=1)
    mem.add_argument("--memory_steps", type=int, default=2)
    mem.add_argument("--memory_budget_gb", type=float, default=None,
                     help="budget for the longest-sequence figure; default: device memory (CUDA/HPU), 4 GiB (CPU)")
    mem.add_argument("--maxseq_method", default="search", choices=["search", "model"],
                     help="CPU: 'search' (real search, one fresh process per probe, RLIMIT_AS cap; the straight-line "
                          "model is kept as a cross-check) or 'model' (the straight-line model only, quick)")
    mem.add_argument("--cpu_malloc", default="both", choices=["both", "tuned", "default"],
                     help="CPU peak RSS: 'tuned' fixes glibc's mmap threshold at 128 KiB in the measuring process so "
                          "RSS follows live tensors (closest to a device's peak allocated); 'default' leaves glibc's "
                          "dynamic threshold (the plain RSS of a normal run, heap fragmentation included); 'both' "
                          "(default) measures 'tuned' (memory + longest sequence) and then 'default' (memory only), "
                          "each variant in its own process every time")
    mem.add_argument("--maxseq_lengths", default=None,
                     help="CPU model: batch-1 lengths to measure (default: 2*seq_len,4*seq_len)")
    mem.add_argument("--maxseq_start", type=int, default=512, help="search: first length")
    mem.add_argument("--maxseq_limit", type=int, default=None,
                     help="search: largest length tried (default: max_position_embeddings)")
    mem.add_argument("--maxseq_granularity", type=int, default=32,
                     help="search: the answer's resolution in tokens")
    mem.add_argument("--maxbatch_limit", type=int, default=64,
                     help="maxbatch section: largest batch (of --seq_len tokens) the search tries")
    mem.add_argument("--maxseq_guess", default="model", choices=["model", "none"],
                     help="CPU search: 'model' starts at the straight-line model's answer and brackets the limit "
                          "with growing steps from there (2-7 probes); 'none' doubles from --maxseq_start")


def _quality_arguments(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("quality")
    q.add_argument("--steps", type=int, default=20, help="training steps per quality run")
    q.add_argument("--quality_variants", default="lora,paca",
                   help="settings trained for the quality figure: lora, paca, full, and named settings "
                        "<method>-<setting>...: r<N> (lora, paca), req (PaCA at the r matching LoRA --r's "
                        "trainable-parameter count), a column selection strategy (paca: random, weight_norm, "
                        "activation_norm); e.g. lora,paca,paca-req,paca-activation_norm,full")
    q.add_argument("--quality_batch", type=int, default=None, help="default: --batch")
    q.add_argument("--lr_grid", default=None,
                   help="'lora=1e-4,3e-4;paca=...;full=...;paca-req=...' (defaults: lora/paca 1e-3,3e-3,1e-2; full "
                        "1e-5,3e-5,1e-4); a 'wide' part starts from five points per method (lora 3e-4..3e-2, paca "
                        "1e-3..1e-1, full 3e-6..3e-4); a variant's own entry overrides its method's grid")
    q.add_argument("--lr_extend", type=int, default=0,
                   help="when a variant's best learning rate is at an edge of its grid, train up to N more points "
                        "past that edge (same log spacing); a best still at an edge is flagged 'best at grid edge: "
                        "extend the grid'")
    q.add_argument("--seeds", default=None,
                   help="comma separated seeds (default: --seed): the grid is searched with the first, then each "
                        "variant's best learning rate is trained again with the others (data order, torch RNG, PaCA's "
                        "random columns); the report gives the spread")
    q.add_argument("--paca_calibration_batches", type=int, default=8,
                   help="activation_norm variants: training batches run through the base model to choose columns")
    q.add_argument("--eval_every", type=int, default=10,
                   help="held-out evaluation (selection half) every N steps for the curves; 0: only at the end")
    q.add_argument("--max_train_samples", type=int, default=None, help="limit raw training examples")
    q.add_argument("--max_eval_samples", type=int, default=None, help="limit raw held-out examples")


def _profile_and_qpaca_arguments(p: argparse.ArgumentParser) -> None:
    pr = p.add_argument_group("profile")
    pr.add_argument("--profile_rounds", type=int, default=3)
    pr.add_argument("--profile_reps", type=int, default=5)
    qp = p.add_argument_group("qpaca (QPaCA vs QLoRA on a bitsandbytes 4-bit base)")
    qp.add_argument("--bnb_4bit_quant_type", default="nf4", choices=["nf4", "fp4"])
    qp.add_argument("--bnb_4bit_use_double_quant", action="store_true", help="quantize the block scales too")
    qp.add_argument("--qpaca_parts", default=",".join(QPACA_PARTS),
                    help=f"comma separated subset of {','.join(QPACA_PARTS)} measured by the qpaca section")
    qp.add_argument("--qpaca_device_gb", type=float, default=96.0,
                    help="memory of the device the memory model solves for (Gaudi 2: 96 GB HBM), 10^9 bytes")
    qp.add_argument("--qpaca_model_batch", type=int, default=1, help="batch of the memory model's table")
    qp.add_argument("--qpaca_model_seq_len", type=int, default=2048, help="sequence length of the memory model's table")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--output_dir", default=None,
                   help="default: docs/benchmarks/<run_name>; outputs/benchmarks/<run_name> for --tiny / --model_config")
    o.add_argument("--run_name", default=None, help="default: <device>-<model>-<dtype>-b<batch>-s<seq_len>")
    o.add_argument("--docs", default=None,
                   help="docs page rebuilt from all runs next to --output_dir (default docs/benchmarks.md when the "
                        "output is under docs/benchmarks/; '' to skip)")
    o.add_argument("--docs_only", action="store_true", help="only rebuild the docs page from existing results")
    o.add_argument("--merge", action="store_true",
                   help="keep the sections of an existing results.json in --output_dir that this invocation does not "
                        "rerun (same model, dtype, batch and seq_len required)")


def resolve_variants(args) -> tuple:
    """``(variants, peft_paca_note)``: the variants to run. ``peft_paca`` is in the default list only when the
    installed peft has its PaCA tuner; otherwise it is left out and the note (also shown on the page) says why.
    (An explicit ``--variants peft_paca`` without it is a usage error: :func:`check_args`.)"""
    from .variants import peft_paca_unavailable

    if args.variants is not None:
        return _csv(args.variants), None
    reason = peft_paca_unavailable()
    variants = [v for v in _csv(DEFAULT_VARIANTS) if not (v == "peft_paca" and reason)]
    return variants, (f"upstream peft's PaCA (peft_paca) not measured: {reason}" if reason else None)
