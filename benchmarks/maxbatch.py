"""Throughput at the largest batch each method fits in one memory budget (the paper's fourth headline figure).

1. For each variant, the largest batch ``B`` at ``seq_len`` whose training step (forward + backward + optimizer
   step) fits the budget: the same fresh-process probes under an address-space cap as the CPU longest-sequence
   search (:func:`benchmarks.maxseq.fresh_probe`), searched over the batch with
   :func:`benchmarks.maxseq.search_longest` (granularity 1). It starts from the longest-sequence result of the same
   run when there is one (``max_seq_len // seq_len``: with SDPA attention a step's activation memory is linear in
   its tokens), else it doubles from 1.
2. The variants are timed interleaved in a fresh process with the step-time section's code
   (:func:`benchmarks.timing.timing_child` -> :func:`benchmarks.measure.time_rounds`, balanced order, warm-up
   steps discarded; ``full`` in a second process with ``floor``, as there), each variant on its own batches of
   ``B x seq_len`` tokens from the training split. Reported: tokens per second per variant and, per round, the
   ratio of two variants' tokens per second (PaCA/LoRA is the paper's "+16 % throughput").

CPU only: on CUDA/HPU the interleaved timing keeps every variant's model resident in device memory, so a batch that
fits one variant alone would not fit there (refused by the CLI).
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["search_batch_cpu", "throughput_ratios", "run_maxbatch", "DEFAULT_BATCH_LIMIT"]

#: Largest batch the search tries when ``--maxbatch_limit`` is not given.
DEFAULT_BATCH_LIMIT = 64


def search_batch_cpu(cfg: dict, variant_name: str, seq_len: int, stream_path: str, tmp_dir: str, limit: int,
                     log: Callable[[str], None] = print, guess: Optional[float] = None) -> Dict[str, object]:
    """The largest batch of ``seq_len`` tokens that ``variant_name`` trains within ``cfg["budget_bytes"]``, one
    fresh process per probe (``cfg`` as for :func:`benchmarks.maxseq.search_cpu`; ``stream_path``: a saved ``(1,
    >= limit * seq_len)`` token stream).

    Returns:
        ``{"max_batch", "hit_limit", "limit", "guess", "budget_bytes", "probes": [[batch, peak bytes or None, fits,
        error or None], ...]}``.
    """
    from .maxseq import fresh_probe, search_longest

    probes: List[list] = []
    found = search_longest(lambda b: fresh_probe(cfg, variant_name, seq_len, stream_path, tmp_dir, probes, log,
                                                 batch=b, by_batch=True), 1, limit, 1, guess=guess)
    return {"max_batch": found["max_seq_len"], "hit_limit": found["hit_limit"], "limit": limit, "guess": guess,
            "budget_bytes": float(cfg["budget_bytes"]), "probes": probes}


def throughput_ratios(groups: List[List[str]], raws: List[dict], tokens: Dict[str, int]) -> Dict[str, List[float]]:
    """Per-round ratios of tokens per second, ``a/b`` for each :data:`benchmarks.timing.RATIO_PAIRS` pair timed in
    the same group (``raws[i]``: that group's ``{variant: {"wall_s": [...]}}``; ``tokens``: tokens per step of each
    variant). ``(tokens[a] / wall_a) / (tokens[b] / wall_b)`` round by round."""
    from .timing import RATIO_PAIRS

    out: Dict[str, List[float]] = {}
    for names, raw in zip(groups, raws):
        for a, b in RATIO_PAIRS:
            key = f"{a}/{b}"
            if a in names and b in names and key not in out:
                out[key] = [(tokens[a] / wa) / (tokens[b] / wb) for wa, wb in zip(raw[a]["wall_s"], raw[b]["wall_s"])]
    return out


def _time_at_batches(tcfg: dict, variants: Sequence[str], batches: Dict[str, list], log, log_path) -> tuple:
    """Each timing group (:func:`benchmarks.timing.plan_groups`) in a fresh process, each variant on its own batches;
    returns ``(groups, raw results)``."""
    import torch

    from .proc import run_fresh
    from .timing import plan_groups, timing_child

    groups = plan_groups(variants)
    raws = []
    with tempfile.TemporaryDirectory(prefix="paca_maxbatch_") as tmp:
        for gi, names in enumerate(groups):
            path, out = os.path.join(tmp, f"batches{gi}.pt"), os.path.join(tmp, f"g{gi}.json")
            torch.save({v: batches[v] for v in names}, path)
            log(f"maxbatch: timing {names} at batches {[len(batches[v][0]['input_ids']) for v in names]}: "
                f"{tcfg['warmup']} warm-up steps each, then {tcfg['rounds']} interleaved rounds, in a fresh process")
            raws.append(run_fresh(timing_child, (tcfg, list(names), path, out, log_path), out, name=f"maxbatch-{gi}"))
    return groups, raws


def run_maxbatch(probe_cfg: dict, timing_cfg: dict, variants: Sequence[str], make_batches: Callable[[int], list],
                 seq_len: int, stream: dict, limit: int, guesses: Dict[str, Optional[float]],
                 log: Callable[[str], None], log_path: Optional[str] = None) -> dict:
    """The whole section (see the module docstring).

    Args:
        probe_cfg: the probes' config (:func:`search_batch_cpu`), with ``budget_bytes``.
        timing_cfg: the step-time section's config (:func:`benchmarks.timing.time_group`: ``rounds``, ``warmup``...).
        make_batches: ``batch -> rounds + warmup`` training batches of ``batch x seq_len`` tokens.
        stream: a ``(1, >= limit * seq_len)`` token stream (``input_ids`` / ``attention_mask`` / ``labels``).
        guesses: a starting batch per variant (e.g. from the longest-sequence search), or None.

    Returns:
        the ``results["maxbatch"]`` dict: ``budget_bytes``, ``seq_len``, ``limit``, ``search`` (per variant),
        ``rounds``, ``warmup``, ``groups``, ``variants`` (per timed variant: ``batch``, ``tokens_per_step``,
        ``wall_s`` / ``tokens_per_s`` summaries, ``raw_wall_s``), ``ratios`` (summaries of per-round tokens/s
        ratios), ``raw_ratios``, ``not_timed`` (variants that fit no batch).
    """
    import torch

    from .measure import summarize

    search: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="paca_maxbatch_probe_") as tmp:
        stream_path = os.path.join(tmp, "stream.pt")
        torch.save(stream, stream_path)
        for v in variants:
            search[v] = search_batch_cpu(probe_cfg, v, seq_len, stream_path, tmp, limit, log, guess=guesses.get(v))
            log(f"maxbatch: {v}: largest batch {search[v]['max_batch']} x {seq_len}"
                f"{' (limit)' if search[v]['hit_limit'] else ''}")
    timed = [v for v in variants if search[v]["max_batch"] > 0]
    tokens = {v: search[v]["max_batch"] * seq_len for v in timed}
    groups, raws = _time_at_batches(timing_cfg, timed, {v: make_batches(search[v]["max_batch"]) for v in timed},
                                    log, log_path) if timed else ([], [])
    tv = {}
    for names, res in zip(groups, raws):
        for v in names:
            if v not in tv:
                wall = res["raw"][v]["wall_s"]
                if set(res["raw"][v]["tokens"]) != {tokens[v]}:
                    raise RuntimeError(f"maxbatch: {v} was timed on {sorted(set(res['raw'][v]['tokens']))} tokens "
                                       f"per step, not its largest batch's {tokens[v]}")
                tv[v] = {"batch": search[v]["max_batch"], "tokens_per_step": tokens[v], "wall_s": summarize(wall),
                         "tokens_per_s": summarize([tokens[v] / w for w in wall]), "raw_wall_s": wall,
                         "group": names}
    raw_ratios = throughput_ratios(groups, [r["raw"] for r in raws], tokens)
    return {"budget_bytes": float(probe_cfg["budget_bytes"]), "seq_len": seq_len, "limit": limit, "search": search,
            "rounds": timing_cfg["rounds"], "warmup": timing_cfg["warmup"], "groups": groups, "variants": tv,
            "ratios": {k: summarize(r) for k, r in raw_ratios.items()}, "raw_ratios": raw_ratios,
            "not_timed": [v for v in variants if v not in timed],
            "threads": raws[0].get("threads") if raws else None}
