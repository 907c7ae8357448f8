"""The measuring sections of one benchmark run, in the order that keeps the figures clean: fresh processes first
(peak memory, longest sequence, largest batch, step time), then QPaCA vs QLoRA, then what runs in this process
(bytes saved for backward, profile, quality)."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from .arguments import QPACA_PARTS, _csv, _parse_seeds
from .merge import _previous_qpaca


def run_sections(args, spec, info, sections, variants, quality_variants, lr_grids, legacy, splits, results, log,
                 out_dir: Path) -> None:
    """Measure the selected ``sections`` of parsed ``args`` into ``results`` (the dict written to ``results.json``)."""
    from .inputs import fixed_batches

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
        _qpaca_section(args, spec, info, splits, lr_grids, results, log, out_dir)

    base = None
    if any(s in sections for s in ("saved", "profile", "quality")) or "inprocess" in legacy and "timing" in sections:
        base = _in_process_sections(args, spec, info, sections, variants, train_batches, results, legacy, log,
                                    out_dir)
    if "quality" in sections and quality_variants:
        _quality_section(args, base, quality_variants, lr_grids, splits, results, log)


def _qpaca_section(args, spec, info, splits, lr_grids, results, log, out_dir: Path) -> None:
    """QPaCA vs QLoRA (:mod:`benchmarks.qpaca`); with ``--merge``, the parts ``--qpaca_parts`` does not rerun are
    kept from the earlier run, each with the command that measured it."""
    from .qpaca import run_qpaca_section
    from .variants import DTYPES

    previous = _previous_qpaca(args, results, out_dir, log) or {}
    commands = previous.pop("part_commands", {})
    results["qpaca"] = run_qpaca_section(args, spec, DTYPES[args.dtype], splits, info, log, _run_children,
                                         lr_grids, previous=previous)
    commands.update({part: results["meta"]["command"] for part in _csv(args.qpaca_parts)})
    results["qpaca"]["part_commands"] = {part: commands[part] for part in QPACA_PARTS if part in commands}


def _quality_section(args, base, quality_variants, lr_grids, splits, results, log) -> None:
    """Held-out loss at each variant's best learning rate (:mod:`benchmarks.quality`): the grid is chosen on one
    half of the held-out blocks and reported on the other."""
    from .inputs import all_batches, fixed_batches
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
