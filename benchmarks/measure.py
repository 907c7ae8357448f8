"""Measurements: step time (interleaved rounds), bytes saved for backward, peak memory, longest sequence.

All helpers take ready-built :class:`~benchmarks.variants.Variant` objects; process isolation for the memory
figures is arranged by :mod:`benchmarks.cli` (one subprocess per variant).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from paca_hpu import device as _device

__all__ = [
    "summarize",
    "train_step",
    "balanced_orders",
    "time_rounds",
    "saved_tensor_bytes",
    "release_host_memory",
    "peak_memory_of_steps",
    "is_oom_error",
    "linear_memory_model",
]


# --------------------------------------------------------------------------- statistics


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), ``sorted_vals`` non-empty and sorted."""
    if len(sorted_vals) == 1:
        return float(sorted_vals[0])
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo))


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """``{n, median, q1, q3, min, max, mean}`` of ``values`` (empty -> ``{"n": 0}``)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0}
    return {
        "n": len(vals),
        "median": statistics.median(vals),
        "q1": _quantile(vals, 0.25),
        "q3": _quantile(vals, 0.75),
        "min": vals[0],
        "max": vals[-1],
        "mean": statistics.fmean(vals),
    }


# --------------------------------------------------------------------------- one training step


def _to(batch: Dict[str, torch.Tensor], dev: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def train_step(variant, optimizer, batch: Dict[str, torch.Tensor], scheduler=None) -> torch.Tensor:
    """Forward + backward + optimizer step (+ ``zero_grad(set_to_none=True)``) on one batch already on the
    device; returns the (detached) loss. ``floor`` has no optimizer: forward + backward only."""
    out = variant.model(**batch)
    loss = out.loss
    loss.backward()
    _device.mark_step()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        _device.mark_step()
    return loss.detach()


def balanced_orders(names: Sequence[str], rounds: int) -> List[List[str]]:
    """The order of ``names`` in each of ``rounds`` rounds: rows of a Williams design, cycled.

    Rotating one fixed order (``names[k:] + names[:k]``) keeps cyclic neighbours: every variant then runs right
    after the same other variant in ``n - 1`` of every ``n`` rounds, so whatever one step leaves behind (caches,
    allocator state, a large ``full`` optimizer step) lands on the same successor every time. In a Williams design
    (E. J. Williams, 1949) every variant directly follows every other variant equally often within a round: once per
    ``n`` rounds for an even number ``n`` of variants, twice per ``2 n`` rounds for an odd ``n``. Each round still
    runs every variant exactly once.

    Returns:
        ``rounds`` lists, each a permutation of ``names``.
    """
    n = len(names)
    if n == 0:
        return [[] for _ in range(rounds)]
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(j + i) % n for j in first] for i in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [[names[j] for j in rows[k % len(rows)]] for k in range(rounds)]


def rotated_orders(names: Sequence[str], rounds: int) -> List[List[str]]:
    """The order of the harness before the fix (kept for ``--timing_legacy rotate``): ``names`` rotated by one each
    round, which keeps every variant's predecessor fixed in ``n - 1`` of ``n`` rounds (see :func:`balanced_orders`)."""
    n = len(names)
    return [list(names[k % n:]) + list(names[:k % n]) for k in range(rounds)]


def _minor_faults() -> int:
    """Minor page faults of this process so far (every thread; Linux/macOS ``getrusage``), 0 where unavailable."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except (ImportError, OSError):  # pragma: no cover - Windows
        return 0


def time_rounds(
    variants: Dict[str, object],
    optimizers: Dict[str, Optional[torch.optim.Optimizer]],
    batches: Union[List[Dict[str, torch.Tensor]], Dict[str, List[Dict[str, torch.Tensor]]]],
    rounds: int,
    warmup: int,
    log: Callable[[str], None] = print,
    order: str = "balanced",
    collect_garbage: bool = False,
) -> Dict[str, Dict[str, List[float]]]:
    """Interleaved round-robin timing in this process.

    ``warmup`` steps per variant first (discarded), then ``rounds`` rounds; in round ``k`` every variant runs one
    step on batch ``k`` (so all variants see the same data; ``batches`` may instead map each variant to its own
    list, e.g. each at the largest batch it fits, see :mod:`benchmarks.maxbatch`), in the order of
    :func:`balanced_orders` (``order="balanced"``; ``"rotate"``: :func:`rotated_orders`, the protocol before the
    fix). Each step is bracketed by a device synchronize and nothing else: Python's garbage collector runs when it
    would in a user's loop (``collect_garbage=True`` restores the old ``gc.collect()`` before every timed step, outside the timing).

    Returns:
        ``{variant: {"wall_s": [...], "cpu_s": [...], "minflt": [...], "loss": [...], "tokens": [...]}}`` in round
        order (``tokens``: the step's batch x sequence length; ``cpu_s``: process CPU time, all threads, a
        contention-insensitive companion to wall time on CPU; ``minflt``: minor page faults during the step, i.e. fresh memory pages the allocator had to map).
    """
    names = list(variants)
    dev = _device.get_device()
    if isinstance(batches, dict):
        per = {n: [_to(b, dev) for b in batches[n]] for n in names}
    else:
        moved = [_to(b, dev) for b in batches]
        per = {n: moved for n in names}
    for name in names:
        for i in range(warmup):
            train_step(variants[name], optimizers[name], per[name][i % len(per[name])])
        _device.synchronize()
    out = {n: {"wall_s": [], "cpu_s": [], "minflt": [], "loss": [], "tokens": []} for n in names}
    orders = balanced_orders(names, rounds) if order == "balanced" else rotated_orders(names, rounds)
    for k, round_order in enumerate(orders):
        for name in round_order:
            batch = per[name][(warmup + k) % len(per[name])]
            if collect_garbage:
                gc.collect()
            _device.synchronize()
            f0 = _minor_faults()
            c0, t0 = time.process_time(), time.perf_counter()
            loss = train_step(variants[name], optimizers[name], batch)
            _device.synchronize()
            t1, c1 = time.perf_counter(), time.process_time()
            out[name]["minflt"].append(_minor_faults() - f0)
            out[name]["wall_s"].append(t1 - t0)
            out[name]["cpu_s"].append(c1 - c0)
            out[name]["loss"].append(float(loss))
            out[name]["tokens"].append(int(batch["input_ids"].numel()))
        log(f"  round {k + 1}/{rounds} ({' '.join(round_order)}): "
            + ", ".join(f"{n} {out[n]['wall_s'][-1]:.3f}s" for n in names))
    return out


# --------------------------------------------------------------------------- saved for backward


def saved_tensor_bytes(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Bytes autograd saves for backward in one forward of ``model`` on ``batch``.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: every packed tensor's storage is counted once
    (unique ``untyped_storage().data_ptr()``), storages of the model's parameters and buffers are excluded (they
    exist anyway). The pack hook returns ``t.detach()``: returning ``t`` itself keeps the autograd graph alive
    across probed forwards, so memory grows with every call. No backward is run; the graph is dropped.

    Returns:
        ``{"bytes", "tensors", "by_dtype": {dtype: bytes}}``.
    """
    exclude = set()
    for t in list(model.parameters()) + list(model.buffers()):
        exclude.add(t.untyped_storage().data_ptr())
    storages: Dict[int, tuple] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in exclude and ptr not in storages:
                storages[ptr] = (st.nbytes(), str(t.dtype).replace("torch.", ""))
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrapper subclasses)
            pass
        return t.detach()

    def unpack(t):
        return t

    dev = _device.get_device()
    batch = _to(batch, dev)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = model(**batch)
        loss = out.loss
    _device.mark_step()
    del out, loss
    by_dtype: Dict[str, int] = {}
    for nbytes, dt in storages.values():
        by_dtype[dt] = by_dtype.get(dt, 0) + int(nbytes)
    result = {"bytes": int(sum(b for b, _ in storages.values())), "tensors": len(storages), "by_dtype": by_dtype}
    storages.clear()
    gc.collect()
    return result


# --------------------------------------------------------------------------- peak memory


def release_host_memory() -> None:
    """Collect garbage and, on glibc, return freed heap memory to the OS (``malloc_trim(0)``), so that peak RSS
    measured afterwards is not inflated by memory freed earlier (e.g. while loading the model)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


#: glibc ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h).
_M_MMAP_THRESHOLD = -3


def fix_malloc_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """On glibc, map every allocation of ``threshold`` bytes or more with its own ``mmap`` (returned to the OS
    on free) and switch off glibc's dynamic threshold, which otherwise rises to 32 MiB after the first large free
    and leaves activation-sized tensors in a fragmenting heap. Peak RSS then follows live tensor memory (what a
    device's "peak allocated" counts) instead of heap fragmentation. Returns whether it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def current_memory_bytes() -> int:
    """Memory in use now: device allocator (HPU/CUDA) or current RSS (CPU)."""
    info = _device.get_device_info()
    if info.type == "cuda":
        return int(torch.cuda.memory_allocated())
    if info.type == "hpu":
        return int(_device.habana_module("habana_frameworks.torch.hpu").memory_allocated())
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096


def peak_memory_of_steps(variant, optimizer, batch: Dict[str, torch.Tensor], warmup: int, steps: int) -> Dict[str, int]:
    """Run ``warmup`` steps, reset the peak counter, run ``steps`` steps; return ``{"peak_bytes",
    "before_bytes"}`` (``before``: memory in use right after the reset: weights, optimizer state, runtime)."""
    dev = _device.get_device()
    batch = _to(batch, dev)
    for _ in range(warmup):
        train_step(variant, optimizer, batch)
    _device.synchronize()
    release_host_memory()
    if _device.device_type() == "cuda":
        torch.cuda.empty_cache()
    _device.reset_peak_memory()
    before = current_memory_bytes()
    for _ in range(steps):
        train_step(variant, optimizer, batch)
    _device.synchronize()
    return {"peak_bytes": int(_device.peak_memory_bytes()), "before_bytes": int(before)}


def is_oom_error(err: BaseException) -> bool:
    """An out-of-memory error of CUDA or HPU (or the host allocator)."""
    if isinstance(err, MemoryError):
        return True
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(err, oom_cls):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "oom" in msg or "allocat" in msg)


def linear_memory_model(points: Sequence[tuple], budget_bytes: float) -> Dict[str, float]:
    """Fit ``peak(L) = a + b * L`` through two (or more: least squares) ``(L, peak_bytes)`` points and solve
    ``peak(L) = budget``. Returns ``{"intercept_bytes", "bytes_per_token", "max_seq_len"}``."""
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else float("nan")
    a = my - b * mx
    max_len = (budget_bytes - a) / b if b and b > 0 else float("inf")
    return {"intercept_bytes": a, "bytes_per_token": b, "max_seq_len": max_len}


# --------------------------------------------------------------------------- machine noise


class OtherLoad:
    """How busy the machine's CPUs were with work other than this benchmark (its own process tree excluded).

    ``sample()`` reads the machine's total busy CPU time (``/proc/stat``) and this process tree's CPU time
    (psutil: this process, its live descendants, and their reaped children); ``cores()`` is the average number of
    cores other processes kept busy over the samples so far. Linux only; elsewhere ``cores()`` is None.
    """

    def __init__(self) -> None:
        self.first = self.last = self._read()

    @staticmethod
    def _machine_busy_s() -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                parts = f.readline().split()
            vals = [int(x) for x in parts[1:]]
            hz = os.sysconf("SC_CLK_TCK")
            # user nice system idle iowait irq softirq steal ...
            return (sum(vals[:3]) + sum(vals[5:8])) / hz
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _own_cpu_s() -> Optional[float]:
        try:
            import psutil
        except ImportError:
            return None
        me = psutil.Process()
        total = 0.0
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _read(self):
        return time.perf_counter(), self._machine_busy_s(), self._own_cpu_s()

    def sample(self) -> None:
        self.last = self._read()

    def cores(self) -> Optional[float]:
        (t0, b0, o0), (t1, b1, o1) = self.first, self.last
        if None in (b0, b1, o0, o1) or t1 - t0 < 1.0:
            return None
        return max(0.0, ((b1 - b0) - (o1 - o0)) / (t1 - t0))
