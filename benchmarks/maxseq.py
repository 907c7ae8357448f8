"""Longest sequence at batch 1 that trains within a memory budget: a real search, each CPU probe in a fresh process.

A length ``L`` *fits* when one training step (forward + backward + optimizer step) at ``(1, L)`` completes and its
peak memory stays within the budget. Lengths double from ``start`` until one does not fit (or ``limit``), or, given a
guess (the straight-line model below), steps of growing size from the guess bracket the boundary; then bisection
narrows it to ``granularity`` tokens (:func:`search_longest`).

* CUDA/HPU: the probes run in the variant's measuring process (:mod:`benchmarks.child`); out-of-memory errors
  are recoverable there.
* CPU (:func:`search_cpu`): every probe runs in a FRESH process (:func:`probe_child`): the model is loaded, the
  variant built, one warm-up step at a short length allocates the optimizer state and the thread pools, then the
  address space is capped with ``resource.setrlimit(RLIMIT_AS)`` at what is mapped now plus the part of the budget
  not yet resident (``VmSize + budget - VmRSS``), the peak-RSS counter is reset and the step at ``L`` runs. It fits
  when no allocation fails under that cap AND the peak RSS (``VmHWM``) stays within the budget. A probe process that
  dies under the cap (e.g. a thread that cannot map its stack) counts as not fitting and is listed as such. glibc's
  mmap threshold is fixed as in the memory section (``--cpu_malloc tuned``), so RSS follows live tensors.

The straight-line model of the memory section (peak RSS at two lengths, solved for the budget) is kept next to the
search as a cross-check.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, List, Optional

__all__ = ["search_longest", "probe_child", "fresh_probe", "search_cpu", "DEFAULT_CPU_BUDGET_GB"]

#: Budget of the CPU search when ``--memory_budget_gb`` is not given (the machine's RAM would put every variant past
#: the model's position limit and make the search a long run that shows nothing).
DEFAULT_CPU_BUDGET_GB = 4.0


def search_longest(fits: Callable[[int], bool], start: int, limit: int, granularity: int,
                   guess: Optional[float] = None) -> Dict[str, object]:
    """The longest length that ``fits``, to ``granularity`` tokens.

    Without ``guess``: doubling from ``start`` while ``fits``, then bisection between the last fitting and the first
    failing length. With ``guess`` (e.g. the straight-line memory model's answer; ignored unless a finite positive
    number): the first probe is ``guess`` rounded down to a multiple of ``granularity``; from there steps of
    ``granularity``, doubling, go up while the probes fit (or down while they do not) until the boundary is
    bracketed, then bisection. An accurate guess
    brackets the answer in two probes; a wrong one costs about as many probes as the plain doubling. Lengths probed
    during the bracketing and bisection are multiples of ``granularity`` (or ``limit`` itself); none exceeds
    ``limit``.

    Returns:
        ``{"max_seq_len": longest length that fitted (0 if none), "hit_limit": whether that is >= limit}``.
    """
    if guess is not None and math.isfinite(guess) and guess > 0:  # else (no model, nan, inf): doubling
        lo, hi = _bracket_from_guess(fits, guess, limit, granularity)
    else:
        lo, length = 0, int(start)
        while length <= limit and fits(length):
            lo, length = length, length * 2
        hi = min(length, limit + granularity)
    if lo and hi is not None:
        while hi - lo > granularity:
            mid = (lo + hi) // 2 // granularity * granularity
            if mid <= lo:
                break
            if fits(mid):
                lo = mid
            else:
                hi = mid
    return {"max_seq_len": lo, "hit_limit": lo >= limit}


def _bracket_from_guess(fits: Callable[[int], bool], guess: float, limit: int, gran: int) -> tuple:
    """``(lo, hi)``: a fitting length (0 if none) and a failing one (None when ``lo`` reached ``limit``), found by
    growing steps from ``guess`` (see :func:`search_longest`)."""
    first = min(max(gran, int(guess) // gran * gran), limit)
    step = gran
    if fits(first):
        lo = first
        while lo < limit:
            nxt = min(lo + step, limit)
            if not fits(nxt):
                return lo, nxt
            lo, step = nxt, step * 2
        return lo, None
    hi = first
    while hi > gran:
        nxt = max(hi - step, gran)
        if fits(nxt):
            return nxt, hi
        hi, step = nxt, step * 2
    return 0, hi


def _status_bytes() -> Dict[str, int]:
    """``VmSize`` and ``VmRSS`` of this process in bytes (Linux ``/proc/self/status``)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmSize", "VmRSS"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _probe(cfg: dict, variant_name: str, length: int, stream_path: str, batch: int = 1) -> dict:
    import resource

    import torch

    from paca_hpu import device as _device
    from paca_hpu.hub import one_line
    from .measure import fix_malloc_mmap_threshold, is_oom_error, release_host_memory, train_step
    from .variants import DTYPES, ModelSpec, build_variant, load_base_model, make_optimizer

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    malloc_fixed = cfg.get("cpu_malloc", "tuned") == "tuned" and fix_malloc_mmap_threshold()
    stream = torch.load(stream_path)
    if stream["input_ids"].shape[1] < batch * length:
        raise ValueError(f"probe at batch {batch} x {length}: the saved token stream holds only "
                         f"{stream['input_ids'].shape[1]} tokens; save at least {batch * length}")
    _device.manual_seed_all(cfg["seed"])
    base = load_base_model(ModelSpec(**cfg["model"]), DTYPES[cfg["dtype"]], torch.device("cpu"))
    variant = build_variant(variant_name, base, r=cfg["r"], alpha=cfg["alpha"], copy_base=False)
    del base
    opt = make_optimizer(variant, 1e-4)
    warm = min(length, int(cfg.get("maxseq_warm_len", 64)))
    train_step(variant, opt, {k: v[:, :warm] for k, v in stream.items()})  # optimizer state, thread pools
    release_host_memory()
    budget = int(cfg["budget_bytes"])
    st = _status_bytes()
    res = {"length": length, "batch": batch, "rss_before": st["VmRSS"], "vm_before": st["VmSize"],
           "budget_bytes": budget,
           "malloc_mmap_threshold_fixed": bool(malloc_fixed), "peak_bytes": None, "fits": False, "error": None}
    if st["VmRSS"] >= budget:
        res["error"] = "the model and optimizer state alone exceed the budget"
        return res
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = st["VmSize"] + budget - st["VmRSS"]
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    shaped = {k: v[:, :batch * length].reshape(batch, length) for k, v in stream.items()}
    _device.reset_peak_memory("cpu")
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        train_step(variant, opt, shaped)
        res["peak_bytes"] = int(_device.peak_memory_bytes("cpu"))
        res["fits"] = res["peak_bytes"] <= budget
    except Exception as err:  # noqa: BLE001 - the allocator's failure surfaces as RuntimeError or MemoryError
        if not is_oom_error(err):
            raise
        res["error"] = one_line(err, limit=200)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    res["cap_bytes"] = cap
    return res


def probe_child(cfg: dict, variant_name: str, length: int, stream_path: str, out_path: str, batch: int = 1) -> None:
    """Entry point of one fresh probe process (see the module docstring): one step at ``(batch, length)``, cut from
    the saved ``(1, N)`` token stream (``N >= batch * length``); result JSON to ``out_path``."""
    from paca_hpu.atomic import write_json_atomic

    write_json_atomic(out_path, _probe(cfg, variant_name, length, stream_path, batch))


def fresh_probe(cfg: dict, variant_name: str, length: int, stream_path: str, tmp_dir: str, probes: List[list],
                log: Callable[[str], None], batch: int = 1, by_batch: bool = False) -> bool:
    """Run :func:`probe_child` for one shape in a fresh process, append ``[value, peak bytes or None, fits, error or
    None]`` to ``probes`` (value: ``batch`` if ``by_batch`` else ``length``), log it, and return whether it fit."""
    from .proc import run_fresh

    t0 = time.perf_counter()
    tag = f"{variant_name}-{batch}x{length}"
    out = os.path.join(tmp_dir, f"probe-{tag}.json")
    res: Optional[dict] = run_fresh(probe_child, (cfg, variant_name, length, stream_path, out, batch), out,
                                    name=f"probe-{tag}", allow_failure=True)
    value = batch if by_batch else length
    if res is None:
        probes.append([value, None, False, "probe process died under the memory cap"])
    else:
        probes.append([value, res["peak_bytes"], res["fits"], res["error"]])
    p = probes[-1]
    log(f"probe {variant_name} {batch} x {length}: {'fits' if p[2] else 'does not fit'} "
        f"({'peak ' + format(p[1] / 2 ** 20, ',.0f') + ' MB' if p[1] else p[3]}) [{time.perf_counter() - t0:.0f} s]")
    return bool(p[2])


def search_cpu(cfg: dict, variant_name: str, stream_path: str, tmp_dir: str,
               log: Callable[[str], None] = print, guess: Optional[float] = None) -> Dict[str, object]:
    """The CPU search for ``variant_name``, one fresh process per probe.

    ``cfg``: as for the memory children, with ``budget_bytes``, ``maxseq_start``, ``maxseq_limit``,
    ``maxseq_granularity``. ``stream_path``: a saved ``(1, >= maxseq_limit)`` batch (``input_ids`` /
    ``attention_mask`` / ``labels``). ``guess``: where to start (see :func:`search_longest`; the CLI passes the
    straight-line model's answer), or None for doubling from ``maxseq_start``.

    Returns:
        ``{"method": "search", "isolation": "fresh process per probe", "budget_bytes", "probes": [[L, peak bytes or
        None, fits, error or None], ...], "max_seq_len", "hit_limit", "limit", "granularity", "guess"}``.
    """
    probes: List[list] = []

    def fits(length: int) -> bool:
        return fresh_probe(cfg, variant_name, length, stream_path, tmp_dir, probes, log)

    limit, gran = int(cfg["maxseq_limit"]), int(cfg["maxseq_granularity"])
    found = search_longest(fits, int(cfg["maxseq_start"]), limit, gran, guess=guess)
    return {"method": "search", "isolation": "fresh process per probe, RLIMIT_AS cap",
            "budget_bytes": float(cfg["budget_bytes"]), "probes": probes, **found, "limit": limit,
            "granularity": gran, "guess": guess}
