"""The record of one benchmark run: its log, the environment it ran in, its default name, the model it measures,
and the ``results.json`` skeleton (command line, configuration) the sections fill in."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .arguments import _csv, _parse_seeds


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


def environment(info, threads: int, root: Path) -> Dict[str, str]:
    """Versions, device and host facts recorded with every benchmark run (strings for the docs page);
    ``root``: the checkout whose git commit is recorded."""
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
    env["git"] = _git_commit(root)
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
            "environment": environment(info, threads, root),
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
