"""Quality: held-out loss after the same number of steps, each method at its best learning rate from a grid.

Protocol (identical for every method): a fresh copy of the base model, ``torch.manual_seed(seed)``, the same
training batches in the same order, AdamW (betas 0.9/0.999, weight decay 0), linear warm-up over the first 10 %
of the steps then linear decay to 0 (``transformers.get_linear_schedule_with_warmup``), ``steps`` optimizer steps.
The held-out split (the data set's fixed validation split, packed like the training data) is cut in two halves
by block index: the learning rate is chosen on the *selection* half (even blocks) and the figure reported is the
loss on the *report* half (odd blocks), so the choice of learning rate does not flatter the reported number.
Held-out loss is the token-level mean cross entropy over all trained (response) tokens of a half.

Variants are quality settings (:func:`benchmarks.variants.parse_quality_variant`: ``lora``, ``paca``,
``paca-req``, ``paca-activation_norm``, ``full``, ...). A variant's grid is ``lr_grids[spec]`` or else
``lr_grids[method]``. With ``lr_extend`` > 0, a best learning rate at an edge of the grid makes the grid grow one
point beyond that edge (same log spacing as the two edge points), up to ``lr_extend`` times; a best still at an edge
is flagged ("best at grid edge: extend the grid"). With several ``seeds``, the grid is searched with the first
seed, then each variant's best learning rate is trained again with every other seed (the seed sets the data order,
the torch RNG and PaCA's random columns): the spread of the held-out losses and of their ratios to ``lora``.
``activation_norm`` variants calibrate on the first ``calibration_batches`` training batches of their seed.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from paca_hpu import device as _device
from paca_hpu.selection import DATA_AWARE_INIT_INDICES
from .measure import _to, train_step
from .variants import QualityVariant, build_variant, make_optimizer, paca_r_matching_lora, parse_quality_variant

__all__ = ["evaluate_loss", "run_quality", "DEFAULT_LR_GRIDS", "WIDE_LR_GRIDS", "EDGE_NOTE", "lr_grid_for"]

DEFAULT_LR_GRIDS: Dict[str, List[float]] = {
    "lora": [1e-3, 3e-3, 1e-2],
    "paca": [1e-3, 3e-3, 1e-2],
    "full": [1e-5, 3e-5, 1e-4],
}
#: ``--lr_grid wide``: five points per method, a factor of about 3 apart.
WIDE_LR_GRIDS: Dict[str, List[float]] = {
    "lora": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "paca": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "full": [3e-6, 1e-5, 3e-5, 1e-4, 3e-4],
}
#: What the log and the report say about a variant whose best learning rate is at an edge of its grid.
EDGE_NOTE = "best at grid edge: extend the grid"


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


def lr_grid_for(variant: QualityVariant, lr_grids: Dict[str, Sequence[float]]) -> List[float]:
    """The learning-rate grid of ``variant``: ``lr_grids[spec]`` or else ``lr_grids[method]``, sorted, unique."""
    grid = lr_grids.get(variant.spec, lr_grids.get(variant.method))
    if not grid:
        raise ValueError(f"no learning-rate grid for quality variant {variant.spec!r}")
    return sorted(set(float(x) for x in grid))


def _beyond_edge(grid: List[float], low: bool) -> float:
    """The next learning rate past the low or high edge, spaced like the two edge points (x3 for one point)."""
    ratio = (grid[1] / grid[0] if low else grid[-1] / grid[-2]) if len(grid) > 1 else 3.0
    return float(f"{grid[0] / ratio if low else grid[-1] * ratio:.3g}")


def _best_key(runs: Dict[str, dict]) -> Optional[str]:
    finite = [(v["final_select"], k) for k, v in runs.items() if math.isfinite(v["final_select"])]
    return min(finite)[1] if finite else None


class _Trainer:
    """Trains one quality setting at one learning rate and seed (fresh copy of ``base`` each time)."""

    def __init__(self, base, train_batches, select_batches, report_batches, steps, eval_every, r, alpha,
                 calibration_batches, log):
        self.base, self.train_batches, self.select, self.report = base, train_batches, select_batches, report_batches
        self.steps, self.r, self.alpha, self.calibration_batches, self.log = steps, r, alpha, calibration_batches, log
        self.eval_points = (sorted({s for s in range(eval_every, steps + 1, eval_every)} | {steps}) if eval_every > 0
                            else [steps])
        c0 = time.process_time()
        self.base_select = evaluate_loss(base, select_batches)
        self.base_report = evaluate_loss(base, report_batches)
        self.base_eval_cpu_s = time.process_time() - c0  # both halves once: what one run's final evaluation costs
        self._batches: Dict[int, list] = {}

    def batches(self, seed: int) -> list:
        if seed not in self._batches:
            got = self.train_batches(seed) if callable(self.train_batches) else self.train_batches
            if len(got) < self.steps:
                raise ValueError(f"need {self.steps} training batches, got {len(got)}")
            self._batches[seed] = got
        return self._batches[seed]

    def r_of(self, variant: QualityVariant) -> int:
        if variant.r == "eq":
            return paca_r_matching_lora(self.base, self.r)
        return self.r if variant.r is None else int(variant.r)

    def __call__(self, variant: QualityVariant, lr: float, seed: int) -> dict:
        from transformers import get_linear_schedule_with_warmup

        t0, c0 = time.perf_counter(), time.process_time()
        dev = _device.get_device()
        batches = self.batches(seed)
        _device.manual_seed_all(seed)
        calib = batches[:self.calibration_batches] if variant.init_indices in DATA_AWARE_INIT_INDICES else None
        built = build_variant(variant.method, self.base, r=self.r_of(variant), alpha=self.alpha, paca_seed=seed,
                              init_indices=variant.init_indices, calibration_batches=calib)
        opt = make_optimizer(built, lr)
        sched = get_linear_schedule_with_warmup(opt, max(1, self.steps // 10), self.steps)
        train_loss: List[float] = []
        evals = [[0, self.base_select]]
        for step in range(1, self.steps + 1):
            train_loss.append(float(train_step(built, opt, _to(batches[step - 1], dev), scheduler=sched)))
            if step in self.eval_points and step != self.steps:
                evals.append([step, evaluate_loss(built.model, self.select)])
        final_select = evaluate_loss(built.model, self.select)
        final_report = evaluate_loss(built.model, self.report)
        evals.append([self.steps, final_select])
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.log(f"quality: {variant.spec} lr {lr:g} seed {seed}: held-out select {final_select:.4f} report "
                 f"{final_report:.4f} (train loss last {train_loss[-1]:.4f}, {secs:.0f} s, {cpu:.0f} s CPU)")
        run = {"lr": lr, "seed": seed, "r": self.r_of(variant) if variant.method != "full" else None,
               "trainable": built.trainable, "train_loss": train_loss, "eval": evals, "final_select": final_select,
               "final_report": final_report, "seconds": secs, "cpu_seconds": cpu}
        del built, opt, sched
        gc.collect()
        return run


def _search(variant: QualityVariant, grid: List[float], seed: int, lr_extend: int,
            train: Callable[[QualityVariant, float, int], dict], log: Callable[[str], None]):
    """Every learning rate of ``grid`` (``train(variant, lr, seed)`` -> a run dict with ``lr`` and
    ``final_select``), then up to ``lr_extend`` points past an edge holding the best (lowest finite
    ``final_select``); returns ``(runs by repr(lr), final grid, best key or None)``."""
    runs = {repr(lr): train(variant, lr, seed) for lr in grid}
    for _ in range(lr_extend):
        key = _best_key(runs)
        if key is None or len(grid) < 2 or runs[key]["lr"] not in (grid[0], grid[-1]):
            break
        low = runs[key]["lr"] == grid[0]
        lr = _beyond_edge(grid, low)
        log(f"quality: {variant.spec}: best lr {runs[key]['lr']:g} at the {'low' if low else 'high'} edge; "
                  f"extending the grid to {lr:g}")
        grid = [lr] + grid if low else grid + [lr]
        runs[repr(lr)] = train(variant, lr, seed)
    return runs, grid, _best_key(runs)


def _spread(values: List[float]) -> Dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def run_quality(
    base: torch.nn.Module,
    methods: Sequence[str],
    lr_grids: Dict[str, Sequence[float]],
    train_batches: Union[List[Dict[str, torch.Tensor]], Callable[[int], List[Dict[str, torch.Tensor]]]],
    select_batches: List[Dict[str, torch.Tensor]],
    report_batches: List[Dict[str, torch.Tensor]],
    steps: int,
    eval_every: int,
    seed: int = 0,
    r: int = 8,
    alpha: float = 16.0,
    log: Callable[[str], None] = print,
    *,
    seeds: Optional[Sequence[int]] = None,
    lr_extend: int = 0,
    calibration_batches: int = 8,
) -> Dict[str, object]:
    """Train every variant at every learning rate of its grid, then its best again per extra seed; see the module
    docstring.

    Args:
        methods: quality variant specs (``"lora"``, ``"paca-req"``, ...).
        train_batches: the training batches (one list, used for every seed) or ``seed -> list``.
        seeds: default ``[seed]``; the grid is searched with ``seeds[0]``.

    Returns a JSON-ready dict: ``base_loss`` (select/report halves, before training), ``runs`` (per variant and
    learning rate, first seed: ``train_loss`` per step, ``eval`` = ``[[step, select-half loss], ...]``,
    ``final_select``, ``final_report``, ``seconds``, ``r``, ``trainable``), ``best`` (per variant: ``lr``,
    ``heldout_loss`` (report half, first seed), ``select_loss``, ``at_grid_edge``, ``grid``, ``r``, ``trainable``,
    ``init_indices``, ``seeds`` {seed: report-half loss}, ``heldout_spread`` {mean, min, max}), ``seed_runs`` (the
    reruns), ``ratios_to_lora`` (per variant: ``per_seed``, ``mean``, ``min``, ``max`` of held-out loss / LoRA's at
    the same seed), ``grid_edge`` (variants still best at an edge), and ``ratio_paca_lora`` when both ran.

    Raises:
        ValueError: a malformed variant spec, a variant without a grid, too few training batches.
    """
    seeds = list(seeds) if seeds else [seed]
    variants = [parse_quality_variant(m) for m in methods]
    train = _Trainer(base, train_batches, select_batches, report_batches, steps, eval_every, r, alpha,
                     calibration_batches, log)
    log(f"quality: base model held-out loss select {train.base_select:.4f} report {train.base_report:.4f} "
        f"({train.base_eval_cpu_s:.0f} s CPU)")
    runs: Dict[str, Dict[str, dict]] = {}
    seed_runs: Dict[str, Dict[str, dict]] = {}
    best: Dict[str, dict] = {}
    for v in variants:
        runs[v.spec], grid, key = _search(v, lr_grid_for(v, lr_grids), seeds[0], lr_extend, train, log)
        if key is None:
            continue
        chosen = runs[v.spec][key]
        edge = len(grid) > 1 and chosen["lr"] in (grid[0], grid[-1])
        if edge:
            log(f"quality: {v.spec}: best lr {chosen['lr']:g} is at the edge of {grid}: {EDGE_NOTE}")
        seed_runs[v.spec] = {str(s): train(v, chosen["lr"], s) for s in seeds[1:]}
        per_seed = {str(seeds[0]): chosen["final_report"]}
        per_seed.update({s: run["final_report"] for s, run in seed_runs[v.spec].items()})
        best[v.spec] = {"lr": chosen["lr"], "heldout_loss": chosen["final_report"], "select_loss": chosen["final_select"],
                        "at_grid_edge": edge, "grid": grid, "r": chosen["r"], "trainable": chosen["trainable"],
                        "method": v.method, "init_indices": v.init_indices if v.method == "paca" else None,
                        "seeds": per_seed, "heldout_spread": _spread(list(per_seed.values()))}
    result: Dict[str, object] = {
        "steps": steps,
        "eval_points": train.eval_points,
        "seeds": seeds,
        "lr_extend": lr_extend,
        "calibration_batches": calibration_batches,
        "base_loss": {"select": train.base_select, "report": train.base_report},
        "base_eval_cpu_seconds": train.base_eval_cpu_s,
        "select_blocks": sum(int(b["input_ids"].shape[0]) for b in select_batches),
        "report_blocks": sum(int(b["input_ids"].shape[0]) for b in report_batches),
        "runs": runs,
        "seed_runs": seed_runs,
        "best": best,
        "grid_edge": [k for k, b in best.items() if b["at_grid_edge"]],
        "ratios_to_lora": _ratios_to_lora(best),
    }
    if "paca" in best and "lora" in best:
        result["ratio_paca_lora"] = best["paca"]["heldout_loss"] / best["lora"]["heldout_loss"]
    return result


def _ratios_to_lora(best: Dict[str, dict]) -> Dict[str, dict]:
    """Held-out loss / LoRA's (the ``lora`` variant) at the same seed, per variant, with mean / min / max."""
    ref = best.get("lora", {}).get("seeds")
    if not ref:
        return {}
    out = {}
    for spec, b in best.items():
        per = {s: loss / ref[s] for s, loss in b["seeds"].items() if s in ref and ref[s] > 0}
        if per:
            out[spec] = {"per_seed": per, **_spread(list(per.values()))}
    return out
