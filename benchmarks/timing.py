"""Step-time section: which variants are timed together, in which process, and the per-round ratios.

Protocol (what a user's training loop experiences, checked by ``scripts/minimal_loop.py``):

* The adapter variants (``floor``, ``lora``, ``paca``, ``peft_paca``) are timed together, interleaved round-robin,
  in ONE fresh process that holds nothing else: the model is loaded there, each variant built from it, and every
  variant steps once per round on the same batch, in the balanced order of
  :func:`~benchmarks.measure.balanced_orders`. Their ratios are computed per round.
* ``full`` (every parameter trainable: 538 MB of gradients allocated and freed and 1.1 GB of AdamW state updated per
  fp32 step on SmolLM2-135M) is timed in a SECOND fresh process, interleaved with ``floor`` only; it gives
  ``full/floor``. A user never trains both in one process, and sharing rounds with it changed what the adapters'
  steps cost (allocator and cache state left by its step).
* Nothing else runs in the timing processes: no ``gc.collect()`` before each step, no glibc ``mallopt`` (the memory
  section's tuning happens in its own processes), no other section's leftovers.

``--timing_legacy`` reproduces the protocol before the fix, in parts, to show what each part changed: ``inprocess``
(time in the harness process itself, after the other sections' set-up, all variants deep-copied from one base that
stays loaded), ``full`` (``full`` in the same rounds as the adapters), ``rotate`` (rotated instead of balanced order),
``gc`` (``gc.collect()`` before every timed step); ``all`` = all four.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["LEGACY_PARTS", "RATIO_PAIRS", "parse_legacy", "plan_groups", "time_group", "timing_child",
           "run_timing"]

LEGACY_PARTS = ("inprocess", "full", "rotate", "gc")

#: Per-round ratios reported when both variants were timed in the same rounds.
RATIO_PAIRS = [("paca", "lora"), ("paca", "floor"), ("lora", "floor"), ("paca", "peft_paca"),
               ("peft_paca", "floor"), ("peft_paca", "lora"), ("full", "floor"), ("paca", "full"), ("lora", "full")]


def parse_legacy(text: Optional[str]) -> List[str]:
    """``'rotate,gc'`` / ``'all'`` / ``''`` -> the list of legacy parts.

    Raises:
        ValueError: an unknown part (the message lists the valid ones).
    """
    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    if parts == ["all"]:
        return list(LEGACY_PARTS)
    bad = [p for p in parts if p not in LEGACY_PARTS]
    if bad:
        raise ValueError(f"--timing_legacy: unknown part(s) {bad}; choose from {', '.join(LEGACY_PARTS)} or all")
    return parts


def plan_groups(variants: Sequence[str], legacy: Sequence[str] = ()) -> List[List[str]]:
    """The variants timed together, one group per process: the adapters (and ``floor``) in one group, ``full`` with
    ``floor`` in a second one (``legacy`` ``full``: all in one group)."""
    variants = list(variants)
    if "full" not in variants or "full" in legacy:
        return [variants]
    adapters = [v for v in variants if v != "full"]
    second = (["floor"] if "floor" in variants else []) + ["full"]
    return [g for g in (adapters, second) if g and g != ["floor"]]


def time_group(cfg: dict, names: Sequence[str], batches: List[dict], log: Callable[[str], None],
               base=None) -> dict:
    """Build ``names`` and time them interleaved in THIS process (see the module docstring).

    ``cfg``: ``model`` (a :class:`~benchmarks.variants.ModelSpec` dict), ``dtype``, ``r``, ``alpha``, ``seed``,
    ``rounds``, ``warmup``, ``legacy`` (list), optional ``threads``. ``base``: an already loaded base model to
    deep-copy (legacy ``inprocess``); otherwise the model is loaded here and the last variant takes it over.

    Returns:
        ``{"raw": {variant: time_rounds lists}, "built": {variant: {trainable, total, note}}, "threads": int}``.
    """
    import torch

    from paca_hpu import device as _device
    from .measure import time_rounds
    from .variants import DTYPES, ModelSpec, build_variant, load_base_model, make_optimizer

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    legacy = list(cfg.get("legacy") or [])
    own_base = base is None
    if own_base:
        _device.manual_seed_all(cfg["seed"])
        base = load_base_model(ModelSpec(**cfg["model"]), DTYPES[cfg["dtype"]], _device.get_device())
    built, opts = {}, {}
    for i, v in enumerate(names):
        last = own_base and i == len(names) - 1
        built[v] = build_variant(v, base, r=cfg["r"], alpha=cfg["alpha"], copy_base=not last)
        opts[v] = make_optimizer(built[v], 1e-4)
    del base
    gc.collect()
    raw = time_rounds(built, opts, batches, rounds=cfg["rounds"], warmup=cfg["warmup"], log=log,
                      order="rotate" if "rotate" in legacy else "balanced", collect_garbage="gc" in legacy)
    info = {v: {"trainable": b.trainable, "total": b.total, "note": b.note} for v, b in built.items()}
    return {"raw": raw, "built": info, "threads": torch.get_num_threads()}


def timing_child(cfg: dict, names: List[str], batches_path: str, out_path: str, log_path: Optional[str]) -> None:
    """Entry point of a fresh timing process: :func:`time_group`, result JSON to ``out_path``; progress lines
    are printed and appended to ``log_path``."""
    import torch

    from paca_hpu.atomic import write_json_atomic

    t0 = time.perf_counter()
    logf = open(log_path, "a", encoding="utf-8") if log_path else None

    def log(msg: str) -> None:
        line = f"[timing {'/'.join(names)} {time.perf_counter() - t0:6.1f}s] {msg}"
        print(line, flush=True)
        if logf:
            logf.write(line + "\n")
            logf.flush()

    try:
        batches = torch.load(batches_path)
        result = time_group(cfg, names, batches, log)
        result["pid"] = os.getpid()
        write_json_atomic(out_path, result)
    finally:
        if logf:
            logf.close()


def run_timing(cfg: dict, variants: Sequence[str], batches: List[dict], tokens_per_step: int,
               log: Callable[[str], None], log_path: Optional[str] = None, base=None) -> dict:
    """The whole step-time section: each group of :func:`plan_groups` in a fresh process (in this process with
    legacy ``inprocess``, deep-copying ``base``), then per-variant summaries and per-round ratios.

    Returns:
        the ``results["timing"]`` dict: ``rounds``, ``warmup``, ``tokens_per_step``, ``groups``, ``protocol``,
        ``variants`` (per variant: wall/CPU/tokens-per-second summaries, minor page faults, raw lists, trainable),
        ``ratios`` / ``cpu_ratios`` (summaries of per-round ratios) and ``raw_ratios``.
    """
    import tempfile

    import torch

    from .proc import run_fresh

    legacy = list(cfg.get("legacy") or [])
    groups = plan_groups(variants, legacy)
    results = []
    with tempfile.TemporaryDirectory(prefix="paca_timing_") as tmp:
        path = os.path.join(tmp, "batches.pt")
        torch.save(batches, path)
        for gi, names in enumerate(groups):
            log(f"timing: group {gi + 1}/{len(groups)} {names}: {cfg['warmup']} warm-up steps each, then "
                f"{cfg['rounds']} interleaved rounds, " + ("in this process (legacy)" if "inprocess" in legacy
                                                          else "in a fresh process"))
            if "inprocess" in legacy:
                results.append(time_group(cfg, names, batches, log, base=base))
                gc.collect()
            else:
                results.append(run_fresh(timing_child, (cfg, list(names), path, os.path.join(tmp, f"g{gi}.json"),
                                                        log_path), os.path.join(tmp, f"g{gi}.json"),
                                         name=f"timing-{gi}"))
    return summarize_groups(groups, results, cfg, tokens_per_step)


def summarize_groups(groups: List[List[str]], results: List[dict], cfg: dict, tokens_per_step: int) -> dict:
    """Per-variant summaries (from the first group that timed the variant) and per-round ratios of every
    :data:`RATIO_PAIRS` pair timed in the same group."""
    from .measure import summarize

    tv, ratios, cpu_ratios, raw_ratios = {}, {}, {}, {}
    for names, res in zip(groups, results):
        raw = res["raw"]
        for v in names:
            if v in tv:
                continue
            r = raw[v]
            tv[v] = {"wall_s": summarize(r["wall_s"]), "cpu_s": summarize(r["cpu_s"]),
                     "tokens_per_s": summarize([tokens_per_step / x for x in r["wall_s"]]),
                     "minflt": summarize(r["minflt"]), "trainable": res["built"][v]["trainable"],
                     "total_params": res["built"][v]["total"], "note": res["built"][v]["note"],
                     "raw_wall_s": r["wall_s"], "raw_cpu_s": r["cpu_s"], "loss": r["loss"], "group": names}
        for a, b in RATIO_PAIRS:
            key = f"{a}/{b}"
            if a in raw and b in raw and key not in ratios:
                rr = [x / y for x, y in zip(raw[a]["wall_s"], raw[b]["wall_s"])]
                ratios[key] = summarize(rr)
                raw_ratios[key] = rr
                cpu_ratios[key] = summarize([x / y for x, y in zip(raw[a]["cpu_s"], raw[b]["cpu_s"])])
    legacy = list(cfg.get("legacy") or [])
    return {"rounds": cfg["rounds"], "warmup": cfg["warmup"], "tokens_per_step": tokens_per_step, "groups": groups,
            "protocol": {"legacy": legacy, "order": "rotate" if "rotate" in legacy else "balanced",
                         "process": "harness process" if "inprocess" in legacy else "fresh process per group",
                         "gc_collect_before_step": "gc" in legacy,
                         "threads": results[0].get("threads") if results else None},
            "variants": tv, "ratios": ratios, "cpu_ratios": cpu_ratios, "raw_ratios": raw_ratios}
