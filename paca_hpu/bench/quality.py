"""Quality: held-out loss after the same number of steps, each method at its best learning rate from a grid.

Protocol (identical for every method): a fresh copy of the base model, ``torch.manual_seed(seed)``, the same
training batches in the same order, AdamW (betas 0.9/0.999, weight decay 0), linear warm-up over the first 10 %
of the steps then linear decay to 0 (``transformers.get_linear_schedule_with_warmup``), ``steps`` optimizer steps.
The held-out split (the data set's fixed validation split, packed like the training data) is cut in two halves
by block index: the learning rate is chosen on the *selection* half (even blocks) and the figure reported is the
loss on the *report* half (odd blocks), so the choice of learning rate does not flatter the reported number.
Held-out loss is the token-level mean cross entropy over all trained (response) tokens of a half.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Callable, Dict, List, Sequence

import torch

from .. import device as _device
from .measure import _to, train_step
from .variants import build_variant, make_optimizer

__all__ = ["evaluate_loss", "run_quality", "DEFAULT_LR_GRIDS"]

DEFAULT_LR_GRIDS: Dict[str, List[float]] = {
    "lora": [1e-3, 3e-3, 1e-2],
    "paca": [1e-3, 3e-3, 1e-2],
    "full": [1e-5, 3e-5, 1e-4],
}


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Sequence[Dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss of ``model`` over ``batches`` (each batch's mean loss weighted by its number of
    trained, i.e. shifted non ``-100``, label tokens)."""
    was_training = model.training
    model.eval()
    dev = _device.get_device()
    total, count = 0.0, 0
    try:
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            out = model(**_to(b, dev))
            _device.mark_step()
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def run_quality(
    base: torch.nn.Module,
    methods: Sequence[str],
    lr_grids: Dict[str, Sequence[float]],
    train_batches: List[Dict[str, torch.Tensor]],
    select_batches: List[Dict[str, torch.Tensor]],
    report_batches: List[Dict[str, torch.Tensor]],
    steps: int,
    eval_every: int,
    seed: int = 0,
    r: int = 8,
    alpha: float = 16.0,
    log: Callable[[str], None] = print,
) -> Dict[str, object]:
    """Train every ``method`` at every learning rate of its grid; see the module docstring.

    Returns a JSON-ready dict: ``base_loss`` (select/report halves, before training), ``runs`` (per method and
    learning rate: ``train_loss`` per step, ``eval`` = ``[[step, select-half loss], ...]``, ``final_select``,
    ``final_report``, ``seconds``), ``best`` (per method: ``lr``, ``heldout_loss`` (report half),
    ``select_loss``, ``at_grid_edge``), and ``ratio_paca_lora`` of the best held-out losses when both ran.
    """
    from transformers import get_linear_schedule_with_warmup

    if len(train_batches) < steps:
        raise ValueError(f"need {steps} training batches, got {len(train_batches)}")
    dev = _device.get_device()
    base_select = evaluate_loss(base, select_batches)
    base_report = evaluate_loss(base, report_batches)
    log(f"quality: base model held-out loss select {base_select:.4f} report {base_report:.4f}")
    eval_points = sorted({s for s in range(eval_every, steps + 1, eval_every)} | {steps}) if eval_every > 0 else [steps]
    runs: Dict[str, Dict[str, dict]] = {}
    best: Dict[str, dict] = {}
    for method in methods:
        runs[method] = {}
        grid = list(lr_grids[method])
        for lr in grid:
            t0 = time.perf_counter()
            _device.manual_seed_all(seed)
            variant = build_variant(method, base, r=r, alpha=alpha)
            opt = make_optimizer(variant, lr)
            sched = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
            train_loss: List[float] = []
            evals = [[0, base_select]]
            for step in range(1, steps + 1):
                loss = train_step(variant, opt, _to(train_batches[step - 1], dev), scheduler=sched)
                train_loss.append(float(loss))
                if step in eval_points and step != steps:
                    evals.append([step, evaluate_loss(variant.model, select_batches)])
            final_select = evaluate_loss(variant.model, select_batches)
            final_report = evaluate_loss(variant.model, report_batches)
            evals.append([steps, final_select])
            secs = time.perf_counter() - t0
            runs[method][repr(lr)] = {"lr": lr, "train_loss": train_loss, "eval": evals,
                                      "final_select": final_select, "final_report": final_report, "seconds": secs}
            log(f"quality: {method} lr {lr:g}: held-out select {final_select:.4f} report {final_report:.4f} "
                f"(train loss last {train_loss[-1]:.4f}, {secs:.0f} s)")
            del variant, opt, sched
            gc.collect()
        finite = [(v["final_select"], k) for k, v in runs[method].items() if math.isfinite(v["final_select"])]
        if finite:
            _, key = min(finite)
            chosen = runs[method][key]
            idx = grid.index(chosen["lr"])
            best[method] = {"lr": chosen["lr"], "heldout_loss": chosen["final_report"],
                            "select_loss": chosen["final_select"],
                            "at_grid_edge": len(grid) > 1 and idx in (0, len(grid) - 1)}
    result: Dict[str, object] = {
        "steps": steps,
        "eval_points": eval_points,
        "base_loss": {"select": base_select, "report": base_report},
        "select_blocks": sum(int(b["input_ids"].shape[0]) for b in select_batches),
        "report_blocks": sum(int(b["input_ids"].shape[0]) for b in report_batches),
        "runs": runs,
        "best": best,
    }
    if "paca" in best and "lora" in best:
        result["ratio_paca_lora"] = best["paca"]["heldout_loss"] / best["lora"]["heldout_loss"]
    return result
