"""Where PaCA's step time goes beyond the frozen floor's.

PaCA's step = the floor's step (same forward GEMMs, same input-gradient GEMMs, same attention / norms / loss)
plus, per adapted layer: the gather ``x[..., idx]`` in forward, the delta-gradient GEMM
``(x_sel^T grad_y)^T`` (with its float32 casts in bf16) in backward, the Python ``autograd.Function`` dispatch in
forward and backward, and, per step: AdamW over the ``delta`` tensors, the write-back of the merged columns of
every layer (the optimizer post-hook) and ``zero_grad``. (The floor additionally computes the input gradient of
the first layer's q/k/v projections and input norm, which PaCA does not need: a small amount in PaCA's favour.)

:func:`profile_paca_vs_floor` measures

1. the two step times, interleaved (wall and process CPU time, medians);
2. each PaCA-only component in isolation at the model's real per-layer shapes (captured with forward pre-hooks),
   summed over all layers, as medians of repeated runs;
3. a ``torch.profiler`` table of one step of each variant, and the per-operator self-time difference.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn

from paca_hpu import PaCALinear, paca_layers, sync_paca
from paca_hpu import device as _device

from .measure import _to, summarize, time_rounds, train_step
from .variants import build_variant, make_optimizer

__all__ = ["profile_paca_vs_floor"]


def _timeit(fn: Callable[[], object], reps: int) -> Dict[str, float]:
    """Median wall / process-CPU milliseconds of ``fn`` over ``reps`` runs (after one untimed run)."""
    fn()
    _device.synchronize()
    walls, cpus = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        _device.synchronize()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_ms": statistics.median(walls) * 1e3, "cpu_ms": statistics.median(cpus) * 1e3}


def _capture_shapes(variant, batch) -> Dict[str, tuple]:
    """``{layer name: input shape}`` of every PaCA layer in one forward."""
    shapes: Dict[str, tuple] = {}
    handles = []
    for name, layer in paca_layers(variant.model):
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, _n=name: shapes.__setitem__(_n, tuple(args[0].shape))))
    try:
        with torch.no_grad():
            variant.model(**_to(batch, _device.get_device()))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _tiny_layer_pairs(layers: List[tuple], dev, gen) -> List[tuple]:
    """``[(x, PaCALinear, frozen nn.Linear)]``, one per layer, 16 x 16 with the layer's ``r`` (at most 16) and
    scaling, and a 1-token input that requires grad: the Python / autograd dispatch of a PaCA layer call against an
    ``nn.Linear`` call, with next to no arithmetic."""
    pairs = []
    for _, layer in layers:
        tw = torch.randn(16, 16, generator=gen)
        ti = torch.arange(min(layer.r, 16), dtype=layer.indices.dtype)
        tiny_paca = PaCALinear(tw.clone(), None, ti, layer.scaling).to(dev)
        tiny_floor = nn.Linear(16, 16, bias=False).requires_grad_(False)
        with torch.no_grad():
            tiny_floor.weight.copy_(tw)
        pairs.append((torch.randn(1, 1, 16, device=dev).requires_grad_(True), tiny_paca, tiny_floor.to(dev)))
    return pairs


def _delta_gradient_pieces(layers: List[tuple], shapes: Dict[str, tuple], dev, gen) -> tuple:
    """``(gather, delta_gemm, delta_casts)``: the column gather and the delta-gradient GEMM of every layer in
    ``layers`` at its captured input shape (``delta_gemm(order)`` returns the callable of one GEMM form), on
    random inputs drawn from ``gen``."""
    xs, gs, sels = {}, {}, {}
    for name, layer in layers:
        dt = layer.weight.dtype
        xs[name] = torch.randn(shapes[name], generator=gen).to(dev, dt)
        gs[name] = torch.randn(shapes[name][:-1] + (layer.out_features,), generator=gen).to(dev, dt)
        sels[name] = xs[name].index_select(-1, layer.indices)

    def gather():
        for name, layer in layers:
            xs[name].index_select(-1, layer.indices)

    def delta_gemm(order: str):
        def run():
            for name, layer in layers:
                acc = torch.float64 if layer.delta.dtype == torch.float64 else torch.float32
                g2 = gs[name].reshape(-1, layer.out_features).to(acc)
                x2 = sels[name].reshape(-1, layer.r).to(acc)
                if order == "batched" and sels[name].dim() == 3:  # what the layer does for (batch, seq, .)
                    torch.bmm(sels[name].to(acc).transpose(1, 2), gs[name].to(acc)).sum(0).t().mul_(layer.scaling)
                elif order in ("xT_g", "batched"):
                    torch.mm(x2.t(), g2).t().mul_(layer.scaling)
                else:
                    torch.mm(g2.t(), x2).mul_(layer.scaling)
        return run

    def delta_casts():
        for name, layer in layers:
            gs[name].reshape(-1, layer.out_features).to(torch.float32)
            sels[name].reshape(-1, layer.r).to(torch.float32)

    return gather, delta_gemm, delta_casts


def _components(paca, optimizer, shapes: Dict[str, tuple], reps: int) -> Dict[str, Dict[str, float]]:
    layers: List[tuple] = [(n, l) for n, l in paca_layers(paca.model) if n in shapes]
    dev = _device.get_device()
    gen = torch.Generator().manual_seed(0)
    gather, delta_gemm, delta_casts = _delta_gradient_pieces(layers, shapes, dev, gen)

    tiny: List[tuple] = []  # built after the write-back is timed: the step hook looks at every live PaCA layer

    def dispatch_paca():
        for tx, tp, _ in tiny:
            tp(tx).backward(torch.ones(1, 1, 16, device=dev))

    def dispatch_floor():
        for tx, _, tf in tiny:
            tf(tx).backward(torch.ones(1, 1, 16, device=dev))

    def opt_step():  # AdamW + the write-back post-hook, as in training
        optimizer.step()

    def write_back():  # what runs after every optimizer step (the global post-hook) and nothing else: AdamW skips
        optimizer.step()  # parameters without .grad, so a step with every gradient None is the hook alone

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)
        for p in paca.params:
            p.grad = torch.zeros_like(p)

    def grads_alloc():
        for p in paca.params:
            p.grad = torch.zeros_like(p)

    res = {}
    # AdamW skips parameters without .grad: give every delta a gradient right before timing the step
    grads_alloc()
    res["optimizer_step_incl_write_back"] = _timeit(opt_step, reps)
    for p in paca.params:
        p.grad = None
    res["write_back_all_layers"] = _timeit(write_back, reps)
    tiny.extend(_tiny_layer_pairs(layers, dev, gen))
    res.update({
        "gather": _timeit(gather, reps),
        "delta_gemm_casts_only": _timeit(delta_casts, reps),
        "delta_gemm_batched (used)": _timeit(delta_gemm("batched"), reps),
        "delta_gemm_xT_g (one GEMM, alternative)": _timeit(delta_gemm("xT_g"), reps),
        "delta_gemm_gT_x (alternative)": _timeit(delta_gemm("gT_x"), reps),
        "dispatch_paca_tiny": _timeit(dispatch_paca, reps),
        "dispatch_floor_tiny": _timeit(dispatch_floor, reps),
        "zero_grad_and_realloc": _timeit(zero_grad, reps),
        "grad_realloc_only": _timeit(grads_alloc, reps),
    })
    for p in paca.params:
        p.grad = None
    # the write-back was applied with random-looking optimizer updates: restore exact zeros and base columns
    with torch.no_grad():
        for p in paca.params:
            p.zero_()
    sync_paca(paca.model)
    return res


def _op_table(prof) -> Dict[str, Dict[str, float]]:
    return {e.key: {"self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in prof.key_averages()}


def profile_paca_vs_floor(base, batches, rounds: int = 3, reps: int = 5, r: int = 8, alpha: float = 16.0,
                          log: Callable[[str], None] = print) -> Dict[str, object]:
    """See the module docstring. ``batches``: at least ``rounds + 1`` training batches of the benchmark shape.

    Returns a JSON-ready dict with ``step`` (per-variant summaries and the median difference),
    ``components_ms`` (per-step totals of each PaCA-only piece), ``breakdown`` (the attribution of the
    difference), ``profiler`` (top operators by self CPU time per variant, and the largest per-operator
    differences) and ``tables`` (the profiler's text tables)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    floor = build_variant("floor", base, r=r, alpha=alpha)
    paca = build_variant("paca", base, r=r, alpha=alpha)
    opt = make_optimizer(paca, 1e-4)
    variants = {"floor": floor, "paca": paca}
    optimizers = {"floor": None, "paca": opt}
    log(f"profile: {rounds} interleaved rounds of floor / paca")
    times = time_rounds(variants, optimizers, batches, rounds=rounds, warmup=1, log=log)
    step = {n: {"wall_s": summarize(t["wall_s"]), "cpu_s": summarize(t["cpu_s"])} for n, t in times.items()}
    ratios = [p / f for p, f in zip(times["paca"]["wall_s"], times["floor"]["wall_s"])]
    cpu_ratios = [p / f for p, f in zip(times["paca"]["cpu_s"], times["floor"]["cpu_s"])]
    diff_ms = [(p - f) * 1e3 for p, f in zip(times["paca"]["wall_s"], times["floor"]["wall_s"])]
    cpu_diff_ms = [(p - f) * 1e3 for p, f in zip(times["paca"]["cpu_s"], times["floor"]["cpu_s"])]

    log("profile: components at the model's real shapes")
    shapes = _capture_shapes(paca, batches[0])
    comp = _components(paca, opt, shapes, reps)
    w = lambda k: comp[k]["wall_ms"]  # noqa: E731
    breakdown = {
        "gather (forward index_select)": w("gather"),
        "delta-gradient GEMM incl. casts and scaling": w("delta_gemm_batched (used)"),
        "  of which float32 casts": w("delta_gemm_casts_only"),
        "PaCA layer call over nn.Linear's (Python, autograd.Function) fwd+bwd":
            max(0.0, w("dispatch_paca_tiny") - w("dispatch_floor_tiny")),
        "AdamW over delta (excl. write-back)": w("optimizer_step_incl_write_back") - w("write_back_all_layers"),
        "write-back of merged columns (all layers)": w("write_back_all_layers"),
        "zero_grad / grad allocation": w("grad_realloc_only"),
    }
    explained = sum(v for k, v in breakdown.items() if not k.startswith("  "))

    log("profile: torch.profiler, one step each")
    dev = _device.get_device()
    b = _to(batches[0], dev)
    tables, ops = {}, {}
    for name in ("floor", "paca"):
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            with record_function(f"step_{name}"):
                train_step(variants[name], optimizers[name], b)
            _device.synchronize()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        ops[name] = _op_table(prof)
    keys = set(ops["floor"]) | set(ops["paca"])
    op_diff = sorted(
        ({"op": k, "floor_ms": ops["floor"].get(k, {}).get("self_cpu_ms", 0.0),
          "paca_ms": ops["paca"].get(k, {}).get("self_cpu_ms", 0.0),
          "floor_calls": ops["floor"].get(k, {}).get("calls", 0), "paca_calls": ops["paca"].get(k, {}).get("calls", 0)}
         for k in keys if not k.startswith("step_")),
        key=lambda d: -abs(d["paca_ms"] - d["floor_ms"]),
    )[:20]
    for d in op_diff:
        d["diff_ms"] = d["paca_ms"] - d["floor_ms"]
    n_layers = len(shapes)
    del floor, paca, opt, variants, optimizers
    gc.collect()
    return {
        "rounds": rounds,
        "layers": n_layers,
        "step": step,
        "ratio_paca_floor_wall": summarize(ratios),
        "ratio_paca_floor_cpu": summarize(cpu_ratios),
        "diff_ms_wall": summarize(diff_ms),
        "diff_ms_cpu": summarize(cpu_diff_ms),
        "components_ms": comp,
        "breakdown_ms": breakdown,
        "explained_ms": explained,
        "profiler_op_diff": op_diff,
        "tables": tables,
    }
