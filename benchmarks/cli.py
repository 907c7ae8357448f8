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
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

SECTIONS = ("timing", "saved", "memory", "maxseq", "maxbatch", "quality", "profile", "qpaca")
QPACA_PARTS = ("timing", "saved", "memory", "quality")
DEFAULT_SECTIONS = "timing,saved,memory,maxseq,quality"
DEFAULT_VARIANTS = "floor,lora,paca,peft_paca,full"


def _repo_root() -> Path:
    """The checkout this harness belongs to: ``benchmarks/`` is never installed (the wheel holds ``paca_hpu`` only),
    so its parent folder is the repository, whose ``docs/benchmarks/`` and ``outputs/benchmarks/`` receive runs by
    default and whose git commit is recorded with each run."""
    return Path(__file__).resolve().parents[1]


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


def default_output_dir(args, run_name: str, root: Path) -> Path:
    """Where a run writes when ``--output_dir`` is not given: ``docs/benchmarks/<run_name>`` for a real model (the
    tracked report, rebuilt into docs/benchmarks.md), ``outputs/benchmarks/<run_name>`` (untracked, no docs page) for
    the random-weight smoke models of ``--tiny`` / ``--model_config``."""
    if args.tiny or args.model_config:
        return root / "outputs" / "benchmarks" / run_name
    return root / "docs" / "benchmarks" / run_name


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/benchmark.py`` argument parser (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="scripts/benchmark.py",
        description="Benchmark PaCA against the frozen floor, peft LoRA and full fine-tuning: step time, "
                    "tokens/s, bytes saved for backward, peak memory, longest sequence, held-out loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    t = p.add_argument_group("timing")
    t.add_argument("--rounds", type=int, default=12, help="interleaved timed rounds (one step per variant each)")
    t.add_argument("--warmup", type=int, default=2, help="discarded warm-up steps per variant")
    t.add_argument("--timing_legacy", default=None,
                   help="reproduce parts of the timing protocol before the fix, to show what each changed: "
                        "comma separated subset of inprocess,full,rotate,gc, or all (see benchmarks.timing)")
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
    return p


class _Log:
    def __init__(self, path: Optional[str]):
        from .measure import OtherLoad

        self.f = open(path, "a", encoding="utf-8") if path else None
        self.t0 = time.perf_counter()
        self.other = OtherLoad()

    def __call__(self, msg: str) -> None:
        self.other.sample()
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()


def _git_commit(root: Path) -> str:
    """The checkout's short commit, ``+dirty`` when tracked files differ from it; the benchmark's own outputs
    (``docs/benchmarks/``, ``docs/benchmarks.md``: a run appends to its folder's ``log.txt`` before this is read) do
    not count."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)docs/benchmarks", ":(exclude)docs/benchmarks.md"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    """``model name`` of ``/proc/cpuinfo`` with its ``cpu family`` / ``model`` numbers (a virtual machine's name
    alone, e.g. 'AMD EPYC', does not tell the generation apart) and the vector extensions that decide bf16 speed."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, val = line.partition(":")
                fields[key.strip()] = val.strip()
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}; "
            f"{' '.join(ext) or 'no AVX2'})")


def _mkldnn_bf16() -> Optional[bool]:
    """Whether oneDNN runs bf16 GEMMs natively on this CPU (AVX-512 BF16 / AMX); False means torch's slow
    reference kernel. None where torch does not say."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def environment(info, threads: int) -> Dict[str, str]:
    """Versions, device and host facts recorded with every benchmark run (strings for the docs page)."""
    import torch
    import transformers

    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": info.describe(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    env["cpu"] = f"{_cpu_model()}, {os.cpu_count()} cores, torch threads {threads}"
    env["cpu bf16 GEMM (torch.ops.mkldnn._is_mkldnn_bf16_supported())"] = str(_mkldnn_bf16())
    try:
        import psutil

        env["ram"] = f"{psutil.virtual_memory().total / 1024 ** 3:.1f} GiB"
    except ImportError:
        pass
    env["git"] = _git_commit(_repo_root())
    return env


def _default_run_name(args, device_type: str) -> str:
    if args.tiny:
        model = "tiny"
    elif args.model_config:
        model = Path(args.model_config).stem
    elif args.model_name_or_path:
        model = Path(args.model_name_or_path.rstrip("/")).name
    else:
        model = "smollm2-135m"
    name = f"{device_type}-{model}-{args.dtype}-b{args.batch}-s{args.seq_len}"
    if _csv(args.sections) == ["qpaca"]:
        name += f"-qpaca-{args.bnb_4bit_quant_type}{'-dq' if args.bnb_4bit_use_double_quant else ''}"
    return name.lower()


def _run_children(cfg: dict, variants: List[str], inputs: dict, log) -> Dict[str, dict]:
    """One fresh process per variant running :func:`benchmarks.child.run_child` (:mod:`benchmarks.proc`)."""
    import torch

    from .child import run_child
    from .proc import run_fresh

    results = {}
    with tempfile.TemporaryDirectory(prefix="paca_bench_") as tmp:
        inputs_path = os.path.join(tmp, "inputs.pt")
        torch.save(inputs, inputs_path)
        for v in variants:
            out_path = os.path.join(tmp, f"{v}.json")
            t0 = time.perf_counter()
            results[v] = d = run_fresh(run_child, (cfg, v, inputs_path, out_path), out_path, name=f"bench-{v}")
            extra = ""
            if "maxseq" in d:
                extra = f", max seq {d['maxseq']['max_seq_len']:.0f} ({d['maxseq']['method']})"
            log(f"memory: {v}: peak {d['peak_bytes'] / 2 ** 20:,.1f} MB (before step {d['before_bytes'] / 2 ** 20:,.1f}"
                f" MB){extra} [{time.perf_counter() - t0:.0f} s]")
    return results


def _memory_rows(child: Dict[str, dict]) -> Dict[str, dict]:
    """The per-variant peak-memory fields of the children's results."""
    return {v: {k: d[k] for k in ("peak_bytes", "before_bytes", "kind", "trainable", "malloc_mmap_threshold_fixed")}
            for v, d in child.items()}


def _model_spec(args):
    from .variants import ModelSpec

    if args.tiny:
        return ModelSpec(kind="tiny", seed=args.seed, attn_implementation=args.attn_implementation)
    if args.model_config:
        return ModelSpec(kind="config", path=os.path.abspath(args.model_config), seed=args.seed,
                         attn_implementation=args.attn_implementation)
    if args.model_name_or_path:
        return ModelSpec(kind="path", path=args.model_name_or_path, seed=args.seed,
                         attn_implementation=args.attn_implementation)
    return ModelSpec(kind="embedded", seed=args.seed, attn_implementation=args.attn_implementation)


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


def _results_skeleton(args, spec, info, threads: int, variants: List[str], sections: List[str],
                      quality_variants: List[str], lr_grids: dict, legacy: List[str], root: Path) -> dict:
    from .quality import lr_grid_for
    from .variants import parse_quality_variant

    argv = getattr(args, "_argv", None)
    if argv is None:  # run as a script: the command line it was given
        argv0 = os.path.relpath(sys.argv[0], root) if os.path.isabs(sys.argv[0]) else sys.argv[0]
        argv = [argv0] + sys.argv[1:]
    else:  # main(argv) called in-process: the arguments it was given, as the script would take them
        argv = ["scripts/benchmark.py"] + list(argv)
    return {
        "meta": {
            "command": "python " + " ".join(shlex.quote(a) for a in argv),
            "model": spec.describe(),
            "device": info.describe(),
            "device_type": info.type,
            "precision_note": (
                "float32 parameters, no autocast" if args.dtype == "fp32" else
                "bfloat16 parameters, no autocast; LoRA A/B float32 (peft autocast_adapter_dtype), its adapter "
                "branch on a float32 copy of the input; PaCA delta float32, delta gradient in float32; full "
                "trains the bf16 parameters in place"),
            "environment": environment(info, threads),
        },
        "config": {
            "model": spec.to_dict(), "dtype": args.dtype, "batch": args.batch, "seq_len": args.seq_len,
            "variants": variants, "sections": sections, "r": args.r, "alpha": args.alpha, "seed": args.seed,
            "threads": threads, "rounds": args.rounds, "warmup": args.warmup,
            "memory_warmup": args.memory_warmup, "memory_steps": args.memory_steps, "steps": args.steps,
            "cpu_malloc": args.cpu_malloc, "timing_legacy": legacy,
            "quality_variants": quality_variants,
            "lr_grids": {k: lr_grid_for(parse_quality_variant(k), lr_grids) for k in quality_variants},
            "lr_extend": args.lr_extend, "seeds": _parse_seeds(args.seeds) or [args.seed],
            "paca_calibration_batches": args.paca_calibration_batches,
            **({"qpaca": {"quant_type": args.bnb_4bit_quant_type, "double_quant": args.bnb_4bit_use_double_quant,
                          "parts": _csv(args.qpaca_parts), "device_gb": args.qpaca_device_gb,
                          "model_batch": args.qpaca_model_batch, "model_seq_len": args.qpaca_model_seq_len}}
               if "qpaca" in sections else {}),
        },
    }


def _budget_bytes(args, info) -> Optional[float]:
    """The memory budget of the longest-sequence and largest-batch figures in bytes: ``--memory_budget_gb``, else
    :data:`~benchmarks.maxseq.DEFAULT_CPU_BUDGET_GB` on CPU, else None (the device's memory, read by the child)."""
    from .maxseq import DEFAULT_CPU_BUDGET_GB

    if args.memory_budget_gb:
        return args.memory_budget_gb * 1024 ** 3
    return DEFAULT_CPU_BUDGET_GB * 1024 ** 3 if info.type == "cpu" else None


def _maxbatch_section(args, spec, info, variants, splits, results, log, out_dir: Path) -> None:
    """Throughput at the largest batch each variant fits (:mod:`benchmarks.maxbatch`); starts each variant's batch
    search from the longest-sequence result of this invocation or, with ``--merge``, of the earlier run in
    ``out_dir`` (when it was measured within the same budget)."""
    from .inputs import fixed_batches, token_stream
    from .maxbatch import run_maxbatch

    if info.type != "cpu":
        raise ValueError("--sections maxbatch: CPU only (the interleaved timing keeps every variant's model resident, "
                         "so a batch that fits one variant alone in device memory would not fit there)")
    probe_cfg = {"model": spec.to_dict(), "dtype": args.dtype, "seed": args.seed, "r": args.r, "alpha": args.alpha,
                 "threads": args.threads, "cpu_malloc": "default" if args.cpu_malloc == "default" else "tuned",
                 "budget_bytes": _budget_bytes(args, info)}
    maxseq = results.get("maxseq")
    if not maxseq and args.merge and (out_dir / "results.json").is_file():
        with open(out_dir / "results.json", encoding="utf-8") as f:
            maxseq = json.load(f).get("maxseq")
    guesses = {v: d["max_seq_len"] / args.seq_len for v, d in (maxseq or {}).items()
               if d.get("max_seq_len") and d.get("budget_bytes") == probe_cfg["budget_bytes"]}
    log(f"maxbatch: largest batch of {args.seq_len} tokens within {probe_cfg['budget_bytes'] / 1024 ** 3:.2f} GiB, "
        f"one fresh process per probe (limit {args.maxbatch_limit}"
        f"{', starting from the longest-sequence results' if guesses else ''})")
    results["maxbatch"] = run_maxbatch(
        probe_cfg, _timing_cfg(args, spec, []), variants,
        lambda b: fixed_batches(splits["train"], b, args.rounds + args.warmup, seed=args.seed), args.seq_len,
        token_stream(splits["train"], args.maxbatch_limit * args.seq_len), args.maxbatch_limit, guesses, log,
        str(out_dir / "log.txt"))
    for k, s in results["maxbatch"]["ratios"].items():
        log(f"maxbatch: tokens/s {k}: median {s['median']:.3f} [q1 {s['q1']:.3f}, q3 {s['q3']:.3f}]")


def _memory_sections(args, spec, info, sections, variants, splits, results, log) -> None:
    """Peak memory and the longest sequence: fresh processes only, before this process touches the device."""
    from transformers import AutoConfig

    from paca_hpu import device as _device
    from .inputs import fixed_batches, token_stream
    from .maxseq import search_cpu

    budget = _budget_bytes(args, info)
    if spec.random_init:
        max_pos = 4096
    else:
        max_pos = int(getattr(AutoConfig.from_pretrained(spec.resolved_path()), "max_position_embeddings", 4096))
    maxseq_lengths = ([int(x) for x in _csv(args.maxseq_lengths)] if args.maxseq_lengths
                      else [2 * args.seq_len, 4 * args.seq_len])
    limit = args.maxseq_limit or max_pos
    need = max(max(maxseq_lengths), limit)
    batch = fixed_batches(splits["train"], args.batch, 1, seed=args.seed)[0]
    inputs = {"batch": batch, "stream": token_stream(splits["train"], need)}
    child_cfg = {"model": spec.to_dict(), "dtype": args.dtype, "seed": args.seed, "r": args.r,
                 "alpha": args.alpha, "threads": args.threads, "batch": args.batch, "seq_len": args.seq_len,
                 "memory_warmup": args.memory_warmup, "memory_steps": args.memory_steps,
                 "maxseq": "maxseq" in sections, "budget_bytes": budget, "maxseq_lengths": maxseq_lengths,
                 "maxseq_start": args.maxseq_start, "maxseq_limit": limit,
                 "maxseq_granularity": args.maxseq_granularity, "cpu_malloc": args.cpu_malloc}
    plain_too = info.type == "cpu" and args.cpu_malloc == "both" and "memory" in sections
    if info.type == "cpu" and args.cpu_malloc == "both":
        child_cfg["cpu_malloc"] = "tuned"
    log(f"memory: one subprocess per variant ({_device.peak_memory_kind()}"
        f"{', glibc mmap threshold fixed' if child_cfg['cpu_malloc'] == 'tuned' and info.type == 'cpu' else ''})")
    child = _run_children(child_cfg, variants, inputs, log)
    if "memory" in sections:
        results["memory"] = _memory_rows(child)
    if plain_too:
        log("memory: again with glibc's default malloc (plain RSS), one subprocess per variant")
        plain = _run_children(dict(child_cfg, cpu_malloc="default", maxseq=False), variants, inputs, log)
        results["memory_plain_rss"] = _memory_rows(plain)
    if "maxseq" not in sections:
        return
    results["maxseq"] = {v: d["maxseq"] for v, d in child.items()}
    results["maxseq_max_position_embeddings"] = max_pos
    if info.type != "cpu" or args.maxseq_method == "model":
        return
    import torch

    log(f"maxseq: real search within {budget / 1024 ** 3:.2f} GiB, one fresh process per probe (start "
        f"{args.maxseq_start}, limit {limit}, granularity {args.maxseq_granularity})")
    with tempfile.TemporaryDirectory(prefix="paca_maxseq_") as tmp:
        stream_path = os.path.join(tmp, "stream.pt")
        torch.save(inputs["stream"], stream_path)
        for v in variants:
            model = results["maxseq"][v]
            guess = model.get("max_seq_len") if args.maxseq_guess == "model" else None
            results["maxseq"][v] = dict(search_cpu(child_cfg, v, stream_path, tmp, log, guess=guess), model=model)
            log(f"maxseq: {v}: {results['maxseq'][v]['max_seq_len']} tokens (model: {model['max_seq_len']:.0f})")


def _timing_cfg(args, spec, legacy: List[str]) -> dict:
    return {"model": spec.to_dict(), "dtype": args.dtype, "r": args.r, "alpha": args.alpha, "seed": args.seed,
            "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup, "legacy": legacy}


def _log_timing(timing: dict, log) -> None:
    for k, s in timing["ratios"].items():
        log(f"timing: {k}: median {s['median']:.3f} [q1 {s['q1']:.3f}, q3 {s['q3']:.3f}] "
            f"(min {s['min']:.3f}, max {s['max']:.3f})")


def _in_process_sections(args, spec, info, sections, variants, train_batches, results, legacy, log, out_dir):
    """``saved`` (and ``timing`` with ``--timing_legacy inprocess``), ``profile`` and ``quality`` in this process."""
    from paca_hpu import device as _d
    from .variants import DTYPES, build_variant, load_base_model

    _d.manual_seed_all(args.seed)
    base = load_base_model(spec, DTYPES[args.dtype], info.device)
    if "saved" in sections:
        from .measure import saved_tensor_bytes

        results["saved"] = {}
        for v in variants:
            built = build_variant(v, base, r=args.r, alpha=args.alpha)
            results["saved"][v] = saved_tensor_bytes(built.model, train_batches[0])
            del built
            gc.collect()
            log(f"saved: {v}: {results['saved'][v]['bytes'] / 2 ** 20:,.2f} MB in "
                f"{results['saved'][v]['tensors']} tensors")
    if "timing" in sections and "inprocess" in legacy:
        from .timing import run_timing

        results["timing"] = run_timing(_timing_cfg(args, spec, legacy), variants, train_batches,
                                       args.batch * args.seq_len, log, base=base)
        _log_timing(results["timing"], log)
    if "profile" in sections:
        from .profile import profile_paca_vs_floor

        prof = profile_paca_vs_floor(base, train_batches, rounds=args.profile_rounds, reps=args.profile_reps,
                                     r=args.r, alpha=args.alpha, log=log)
        for name, table in prof.pop("tables").items():
            (out_dir / f"profile_{name}.txt").write_text(table, encoding="utf-8")
        results["profile"] = prof
        log("profile: " + ", ".join(f"{k} {v:.1f} ms" for k, v in prof["breakdown_ms"].items()))
    return base


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
    from .inputs import all_batches, fixed_batches, load_tokenizer, packed_splits

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

    # ---- fresh processes first (memory, longest sequence, timing), before this process touches the accelerator
    if "memory" in sections or "maxseq" in sections:
        _memory_sections(args, spec, info, sections, variants, splits, results, log)
    if "maxbatch" in sections:
        _maxbatch_section(args, spec, info, variants, splits, results, log, out_dir)
    n_batches = max(args.rounds + args.warmup, args.profile_rounds + 1, 1)
    train_batches = fixed_batches(splits["train"], args.batch, n_batches, seed=args.seed)
    if "timing" in sections and "inprocess" not in legacy:
        from .timing import run_timing

        results["timing"] = run_timing(_timing_cfg(args, spec, legacy), variants, train_batches,
                                       args.batch * args.seq_len, log, log_path=str(out_dir / "log.txt"))
        _log_timing(results["timing"], log)

    # ---- QPaCA vs QLoRA (its memory subprocesses also run before this process loads the dense base)
    if "qpaca" in sections:
        from .qpaca import run_qpaca_section
        from .variants import DTYPES

        previous = _previous_qpaca(args, results, out_dir, log) or {}
        commands = previous.pop("part_commands", {})
        results["qpaca"] = run_qpaca_section(args, spec, DTYPES[args.dtype], splits, info, log, _run_children,
                                             lr_grids, previous=previous)
        commands.update({part: results["meta"]["command"] for part in _csv(args.qpaca_parts)})
        results["qpaca"]["part_commands"] = {part: commands[part] for part in QPACA_PARTS if part in commands}

    base = None
    if any(s in sections for s in ("saved", "profile", "quality")) or "inprocess" in legacy and "timing" in sections:
        base = _in_process_sections(args, spec, info, sections, variants, train_batches, results, legacy, log,
                                    out_dir)
    if "quality" in sections and quality_variants:
        from .quality import run_quality

        qb = args.quality_batch or args.batch
        val = splits["validation"]
        sel = val.select(range(0, len(val), 2))
        rep = val.select(range(1, len(val), 2))
        results["quality"] = run_quality(
            base, quality_variants, lr_grids,
            lambda s: fixed_batches(splits["train"], qb, max(args.steps, args.paca_calibration_batches), seed=s + 1),
            all_batches(sel, qb), all_batches(rep, qb), args.steps, args.eval_every, seed=args.seed, r=args.r,
            alpha=args.alpha, log=log, seeds=_parse_seeds(args.seeds), lr_extend=args.lr_extend,
            calibration_batches=args.paca_calibration_batches)
        results["quality"]["batch"] = qb
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


_MERGE_KEYS = {"timing": ["timing"], "saved": ["saved"], "memory": ["memory", "memory_plain_rss"],
               "maxseq": ["maxseq", "maxseq_max_position_embeddings"], "maxbatch": ["maxbatch"],
               "quality": ["quality"], "profile": ["profile"],
               "qpaca": ["qpaca"]}


def _previous_qpaca(args, results: dict, out_dir: Path, log) -> Optional[dict]:
    """With ``--merge``: the ``qpaca`` section of the earlier run in ``out_dir`` (its parts that ``--qpaca_parts``
    does not rerun are kept), or None. Another model/dtype/shape (:func:`_check_merge_target`) or quantization is
    refused."""
    path = out_dir / "results.json"
    if not args.merge or not path.is_file():
        return None
    old = _check_merge_target(path, results)
    prev = old.get("qpaca")
    if not prev:
        return None
    quant = {"quant_type": args.bnb_4bit_quant_type, "double_quant": bool(args.bnb_4bit_use_double_quant)}
    if any(prev.get("quant", {}).get(k) != v for k, v in quant.items()):
        raise SystemExit(f"--merge: {path} holds a qpaca section of another model/dtype/shape/quantization; "
                         "use another --output_dir")
    kept = [part for part in QPACA_PARTS if part not in _csv(args.qpaca_parts) and part in prev]
    log(f"qpaca: keeping parts {kept} of {path}")
    old_cmds = prev.get("part_commands") or {part: old.get("meta", {}).get("command") for part in kept}
    return dict({part: prev[part] for part in kept}, part_commands={part: old_cmds.get(part) for part in kept})


def _check_merge_target(path: Path, results: dict) -> dict:
    """The earlier run at ``path`` as a dict, if it has this run's model, dtype, batch and seq_len; else exit with
    the fields that differ."""
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    keys = ("model", "dtype", "batch", "seq_len")
    before = old.get("config", {})
    differ = [k for k in keys if before.get(k) != results["config"].get(k)]
    if differ:
        was = ", ".join(f"{k} {before.get(k)!r} there, {results['config'].get(k)!r} now" for k in differ)
        raise SystemExit(f"--merge: {path} was made with a different {'/'.join(differ)} ({was}); "
                         "use another --output_dir")
    return old


def _merge_previous(results: dict, path: Path, sections: List[str], log) -> None:
    """Copy into ``results`` the sections of the earlier run at ``path`` that were not rerun now."""
    old = _check_merge_target(path, results)
    kept = []
    for sec, ks in _MERGE_KEYS.items():
        if sec in sections or ks[0] not in old:
            continue
        for k in ks:
            if k in old:
                results[k] = old[k]
        om = old.get("meta", {})
        results["meta"]["section_commands"][sec] = om.get("section_commands", {}).get(sec, om.get("command"))
        results["meta"]["section_busy"][sec] = om.get("section_busy", {}).get(sec, om.get("busy_warning"))
        kept.append(sec)
    busy = {w for w in results["meta"]["section_busy"].values() if w}
    if busy:
        results["meta"]["busy_warning"] = " ".join(sorted(busy))
    else:
        results["meta"].pop("busy_warning", None)
    results["config"]["sections"] = [s for s in SECTIONS if s in sections or s in kept]
    log(f"merged sections {kept} from {path}")


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
