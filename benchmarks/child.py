"""Per-variant subprocess: peak memory at the benchmark shape, then (optionally) the longest-sequence data.

:mod:`benchmarks.cli` starts :func:`run_child` in a fresh process per variant (``multiprocessing``
"forkserver" context, with torch / transformers / peft preloaded in the server so that a child starts in well
under a second; nothing in the server has touched the accelerator or run a kernel), so that each variant's peak
memory is its own. By hand: ``python -m benchmarks.child CONFIG.json VARIANT INPUTS.pt OUT.json``.

* CPU: glibc's mmap threshold is fixed at 128 KiB first (``--cpu_malloc tuned``, the default; see
  :func:`benchmarks.measure.fix_malloc_mmap_threshold`), so peak RSS follows live tensor memory.
* Peak: ``memory_warmup`` steps at ``(batch, seq_len)``, reset of the peak counter (device allocator on
  CUDA/HPU; ``VmHWM`` via ``/proc/self/clear_refs`` on CPU, after ``malloc_trim``), ``memory_steps`` steps.
* Longest sequence at batch 1 (``maxseq`` section):
  - CUDA/HPU: the real search of :func:`benchmarks.maxseq.search_longest` in this process. A length "fits"
    when one training step at ``(1, L)`` neither raises an out-of-memory error nor peaks above the budget.
  - CPU: the cross-check MODEL only: peak RSS measured at each of ``maxseq_lengths`` (ascending, counter reset
    before each), a straight line ``peak = a + b * L`` fitted through the points, solved for ``peak = budget``.
    The real CPU search runs one fresh process per probe (:func:`benchmarks.maxseq.search_cpu`).
"""

from __future__ import annotations

import gc
import json
import sys
import time


def _run(cfg: dict, variant_name: str, inputs_path: str) -> dict:
    import torch

    from paca_hpu import device as _device
    from .measure import fix_malloc_mmap_threshold, peak_memory_of_steps, release_host_memory
    from .variants import DTYPES, ModelSpec, build_variant, load_base_model, make_optimizer

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    info = _device.get_device_info()
    malloc_fixed = False
    if info.type == "cpu" and cfg.get("cpu_malloc", "tuned") == "tuned":
        malloc_fixed = fix_malloc_mmap_threshold()
    dev = info.device
    inputs = torch.load(inputs_path)
    spec = ModelSpec(**cfg["model"])
    t0 = time.perf_counter()
    _device.manual_seed_all(cfg["seed"])
    if cfg.get("quant"):  # the qpaca section: the same variants on a bitsandbytes 4-bit base
        from .qpaca import load_quantized_base

        base = load_quantized_base(spec, DTYPES[cfg["dtype"]], dev, **cfg["quant"])
    else:
        base = load_base_model(spec, DTYPES[cfg["dtype"]], dev)
    variant = build_variant(variant_name, base, r=cfg["r"], alpha=cfg["alpha"], copy_base=False)
    del base
    opt = make_optimizer(variant, 1e-4)
    release_host_memory()
    out = {"variant": variant_name, "kind": _device.peak_memory_kind(), "device": info.describe(),
           "trainable": variant.trainable, "malloc_mmap_threshold_fixed": malloc_fixed}
    peak = peak_memory_of_steps(variant, opt, inputs["batch"], cfg["memory_warmup"], cfg["memory_steps"])
    out.update(peak)
    out["batch"], out["seq_len"] = cfg["batch"], cfg["seq_len"]

    if cfg.get("maxseq"):
        out["maxseq"] = _longest_sequence(cfg, info, variant, opt, inputs["stream"])
    out["seconds"] = time.perf_counter() - t0
    return out


def _longest_sequence(cfg: dict, info, variant, opt, stream: dict) -> dict:
    """The longest-sequence figure in the measuring process: on CPU the straight-line model through
    ``cfg["maxseq_lengths"]`` (the cross-check of the fresh-process search), elsewhere an out-of-memory search."""
    import torch

    from paca_hpu import device as _device
    from .maxseq import search_longest
    from .measure import _to, is_oom_error, linear_memory_model, release_host_memory, train_step

    dev = info.device
    if cfg.get("budget_bytes"):
        budget = float(cfg["budget_bytes"])
    else:
        budget = default_budget_bytes(info)

    def step_peak(length: int) -> int:
        batch = {k: v[:, :length] for k, v in stream.items()}
        release_host_memory()
        if info.type == "cuda":
            torch.cuda.empty_cache()
        _device.reset_peak_memory()
        train_step(variant, opt, _to(batch, dev))
        _device.synchronize()
        return int(_device.peak_memory_bytes())

    ms: dict = {"budget_bytes": budget}
    if info.type == "cpu":
        # the cross-check: the real CPU search runs one fresh process per probe (benchmarks.maxseq)
        points = [[length, step_peak(length)] for length in sorted(cfg["maxseq_lengths"])]
        ms.update({"method": "model", "points": points, **linear_memory_model(points, budget)})
    else:
        probes = []

        def fits(length: int) -> bool:
            try:
                p = step_peak(length)
                ok = p <= budget
                probes.append([length, p, ok, None])
                return ok
            except Exception as err:  # noqa: BLE001 - OOM surfaces as different types per device
                if not is_oom_error(err):
                    raise
                probes.append([length, None, False, "out of memory"])
                if opt is not None:  # floor has no optimizer
                    opt.zero_grad(set_to_none=True)
                variant.model.zero_grad(set_to_none=True)
                gc.collect()
                if info.type == "cuda":
                    torch.cuda.empty_cache()
                return False

        limit, gran = int(cfg["maxseq_limit"]), int(cfg["maxseq_granularity"])
        found = search_longest(fits, int(cfg["maxseq_start"]), limit, gran)
        ms.update({"method": "search", "isolation": "the variant's measuring process", "probes": probes,
                   **found, "limit": limit, "granularity": gran})
    return ms


def run_child(cfg: dict, variant_name: str, inputs_path: str, out_path: str) -> None:
    """Entry point of the per-variant process: measure and write the result JSON to ``out_path``."""
    from paca_hpu.atomic import write_json_atomic

    write_json_atomic(out_path, _run(cfg, variant_name, inputs_path))


def main(argv=None) -> int:
    """Entry point of a per-variant measuring subprocess (peak memory, longest sequence); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    cfg_path, variant_name, inputs_path, out_path = argv
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    run_child(cfg, variant_name, inputs_path, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def default_budget_bytes(info) -> float:
    """Memory budget of the longest-sequence figure when none is given: the device's memory (CUDA/HPU) or the
    machine's RAM (CPU). Called in the measuring subprocess (the parent must not open the accelerator)."""
    import torch

    if info.type == "cuda":
        return float(torch.cuda.get_device_properties(0).total_memory)
    if info.type == "hpu":
        from paca_hpu import device as _device

        return float(_device.habana_module("habana_frameworks.torch.hpu").memory_stats()["Limit"])
    import psutil

    return float(psutil.virtual_memory().total)
