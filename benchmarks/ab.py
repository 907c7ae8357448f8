"""A/B timing of one candidate speed-up (:mod:`paca_hpu.experimental`) against the default path, in ONE process.

One model, one optimizer, the candidate switched on and off between steps: every round times the old and the new
path once each, in alternating order (old/new, then new/old), on the same batch; the per-round ratio new/old is
summarised by its median and quartiles. A correctness check runs first (old and new give the same result on this
model; ``bf16_delta_grad``: within bf16 rounding).

    python -m benchmarks.ab --candidate fused_writeback --dtype bf16 --batch 4 --seq_len 256 --rounds 30
    python -m benchmarks.ab --candidate fused_writeback --scope component --reps 20   # the write-back alone
    python -m benchmarks.ab --candidate compile --compile_backend inductor --rounds 20
    python -m benchmarks.ab --candidate lean_forward --tiny --rounds 3 --seq_len 32  # smoke test, seconds

Candidates: ``fused_writeback``, ``lean_forward``, ``bf16_delta_grad`` (switches of :mod:`paca_hpu.experimental`)
and ``compile`` (every decoder block ``torch.compile``-d with PaCA inside vs eager; ``--with_floor`` adds the frozen
floor in both modes, so PaCA/floor can be compared compiled and eager). ``--scope component`` times only the
changed piece at the model's real shapes (``fused_writeback``: the write-back of all layers; ``bf16_delta_grad``:
the delta-gradient GEMMs of all layers), ``reps`` calls per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Dict, List

import torch

CANDIDATE_NAMES = ("fused_writeback", "lean_forward", "bf16_delta_grad", "compile")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m benchmarks.ab`` (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n")[0])
    p.add_argument("--candidate", required=True, choices=CANDIDATE_NAMES)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tiny", action="store_true", help="tiny random 2-layer LLaMA (smoke test)")
    g.add_argument("--model_config", default=None, help="LlamaConfig JSON, random weights")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--scope", default="step", choices=["step", "component"])
    p.add_argument("--reps", type=int, default=20, help="component scope: calls per measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile_backend", default="inductor", help="compile candidate: inductor (needs a C++ "
                                                                  "compiler on CPU) or aot_eager")
    p.add_argument("--with_floor", action="store_true", help="compile candidate: also time the floor both ways")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--no_check", action="store_true", help="skip the correctness check")
    p.add_argument("--json", default=None, help="write per-round times and ratios to this file")
    return p


def _setup(args):
    from paca_hpu import device as _device
    from .inputs import fixed_batches, load_tokenizer, packed_splits
    from .measure import _to
    from .variants import DTYPES, ModelSpec, build_variant, load_base_model, make_optimizer

    if args.tiny:
        spec = ModelSpec(kind="tiny")
    elif args.model_config:
        import os

        spec = ModelSpec(kind="config", path=os.path.abspath(args.model_config))
    else:
        spec = ModelSpec(kind="embedded")
    dev = _device.get_device()
    splits = packed_splits(load_tokenizer(spec), args.seq_len, max_train_samples=args.max_train_samples)
    batches = [_to(b, dev) for b in fixed_batches(splits["train"], args.batch, args.rounds + args.warmup + 1)]
    _device.manual_seed_all(0)
    base = load_base_model(spec, DTYPES[args.dtype], dev)
    floor = build_variant("floor", base, r=args.r, alpha=args.alpha) if args.with_floor else None
    paca = build_variant("paca", base, r=args.r, alpha=args.alpha, copy_base=False)
    return spec, batches, paca, make_optimizer(paca, 1e-4), floor


def _toggles(args, paca, floor) -> Dict[str, Callable[[], None]]:
    """``{arm name: function that puts the process in that arm's state}``; each arm's step uses ``arm_model``."""
    from paca_hpu import experimental

    if args.candidate != "compile":
        name = args.candidate
        return {"old": lambda: experimental.disable(name), "new": lambda: experimental.enable(name)}
    use_paca = experimental.compile_decoder_layers(paca.model, backend=args.compile_backend)
    arms = {"old": lambda: use_paca(False), "new": lambda: use_paca(True)}
    if floor is not None:
        use_floor = experimental.compile_decoder_layers(floor.model, backend=args.compile_backend)
        arms.update({"floor_old": lambda: use_floor(False), "floor_new": lambda: use_floor(True)})
    return arms


def _check(args, paca, opt, batch) -> str:
    """Old and new give the same loss, delta gradients and (after one step) merged weights on this model."""
    import copy

    from paca_hpu import experimental, paca_layers

    if args.candidate == "compile":
        return "compile: see tests/unit/test_experimental.py (compiled vs eager)"
    results = {}
    for arm in ("old", "new"):
        model = copy.deepcopy(paca.model)
        params = [p for p in model.parameters() if p.requires_grad]
        o = torch.optim.AdamW(params, lr=1e-3)
        with experimental.candidate(args.candidate, on=(arm == "new")):
            loss = model(**batch).loss
            loss.backward()
            grads = [p.grad.clone() for p in params]
            o.step()
            o.zero_grad()
            weights = [m.weight.detach().clone() for _, m in paca_layers(model)]
        results[arm] = (float(loss.detach()), grads, weights)
        del model, o
    (l0, g0, w0), (l1, g1, w1) = results["old"], results["new"]
    exact = args.candidate != "bf16_delta_grad"
    gerr = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(g0, g1))
    same_w = all(torch.equal(a, b) for a, b in zip(w0, w1))
    ok = (l0 == l1) and (gerr == 0.0 if exact else gerr < 2e-2) and (same_w or not exact)
    msg = f"check: loss old {l0:.6f} new {l1:.6f}, max relative delta-grad difference {gerr:.2e}, " \
          f"merged weights {'identical' if same_w else 'differ'}"
    if not ok:
        raise SystemExit(f"A/B correctness check FAILED for {args.candidate}: {msg}")
    return msg


def _component_fn(args, paca, opt, batch) -> Callable[[], None]:
    """The changed piece alone, as the arm switched on by ``_toggles`` runs it, through the extension points the
    candidates switch: ``fused_writeback``: the write-back of every layer (:func:`paca_hpu.writeback.write_back`:
    per layer :meth:`~paca_hpu.PaCALinear.sync`, the default, or :func:`~paca_hpu.experimental.fused_write_back`);
    ``bf16_delta_grad``: every layer's delta gradient (:func:`paca_hpu.layer.delta_gradient_in_use`:
    :func:`~paca_hpu.layer.delta_gradient` or :func:`~paca_hpu.experimental.lowp_delta_gradient`)."""
    from paca_hpu import paca_layers, writeback
    from paca_hpu.layer import delta_gradient_in_use

    from .profile import _capture_shapes

    layers = [lay for _, lay in paca_layers(paca.model)]
    if args.candidate == "fused_writeback":
        def write_back():
            writeback.write_back(layers)
        return write_back
    if args.candidate == "bf16_delta_grad":
        shapes = _capture_shapes(paca, batch)
        gen = torch.Generator().manual_seed(0)
        work = []
        for name, lay in paca_layers(paca.model):
            dt = lay.weight.dtype
            x = torch.randn(shapes[name], generator=gen).to(lay.weight.device, dt)
            g = torch.randn(shapes[name][:-1] + (lay.out_features,), generator=gen).to(lay.weight.device, dt)
            work.append((x.index_select(-1, lay.indices), g, lay.scaling))

        def delta_gradients():
            fn = delta_gradient_in_use()
            return [fn(g, xs, s) for xs, g, s in work]
        return delta_gradients
    raise SystemExit(f"--scope component is not defined for {args.candidate}; use --scope step")


def _time_arm(args, arm, toggles, paca, opt, floor, batch, component) -> float:
    from paca_hpu import device as _device
    from .measure import train_step

    toggles[arm]()
    _device.synchronize()
    t0 = time.perf_counter()
    if component is not None:
        for _ in range(args.reps):
            component()
    elif arm.startswith("floor"):
        train_step(floor, None, batch)
    else:
        train_step(paca, opt, batch)
    _device.synchronize()
    return time.perf_counter() - t0


def run(args) -> dict:
    """Set up, check, warm up, time interleaved rounds; returns the JSON-ready result (also printed)."""
    from .measure import summarize

    if args.threads:
        torch.set_num_threads(args.threads)
    spec, batches, paca, opt, floor = _setup(args)
    check = "skipped" if args.no_check else _check(args, paca, opt, batches[0])
    print(check, flush=True)
    toggles = _toggles(args, paca, floor)
    component = _component_fn(args, paca, opt, batches[0]) if args.scope == "component" else None
    arms = list(toggles)
    for i in range(args.warmup):  # compile happens here for the compile candidate
        for arm in arms:
            _time_arm(args, arm, toggles, paca, opt, floor, batches[i], component)
    times: Dict[str, List[float]] = {a: [] for a in arms}
    for k in range(args.rounds):
        order = arms if k % 2 == 0 else arms[::-1]
        for arm in order:
            times[arm].append(_time_arm(args, arm, toggles, paca, opt, floor, batches[args.warmup + k], component))
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(f"{a} {times[a][-1]:.4f}s" for a in arms), flush=True)
    toggles["old"]()
    pairs = [("new", "old")] + ([("old", "floor_old"), ("new", "floor_new")] if "floor_old" in times else [])
    ratios = {f"{a}/{b}": summarize([x / y for x, y in zip(times[a], times[b])]) for a, b in pairs}
    out = {"candidate": args.candidate, "scope": args.scope, "model": spec.describe(), "dtype": args.dtype,
           "batch": args.batch, "seq_len": args.seq_len, "threads": torch.get_num_threads(), "check": check,
           "times": times, "summary": {a: summarize(t) for a, t in times.items()}, "ratios": ratios}
    for k, s in ratios.items():
        print(f"{args.candidate} ({args.scope}) {k}: median {s['median']:.4f} [q1 {s['q1']:.4f}, q3 {s['q3']:.4f}] "
              f"over {s['n']} rounds", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv=None) -> int:
    """Entry point of ``python -m benchmarks.ab``; returns the exit code."""
    args = build_parser().parse_args(argv)
    for flag in ("rounds", "reps", "batch", "seq_len", "r"):
        if getattr(args, flag) < 1:
            build_parser().error(f"--{flag} must be >= 1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
