"""The parity study and column-selection ablation on the docs page: the command, and tables built from the run
files of every study folder (``docs/benchmarks/study-*/runs/*.json``, written by ``scripts/study.py``; see
:mod:`paca_hpu.bench.study_runs`). A cell without its run says "pending: not yet run"; a partial table lists the runs
still missing.
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional

__all__ = ["PENDING", "study_markdown", "plot_study"]

PENDING = "pending: not yet run"
COMMAND = "nice -n 19 python scripts/study.py      # again to continue; --summary prints the state"

_TEXT = """## Parity study and column selection

Does PaCA reach LoRA's held-out loss (within 1 %) on this task, at equal steps, at r 8 and at the r that trains as
many parameters as LoRA r 8, and does a column choice other than random close the gap? LoRA r adds
`r * (in + out)` parameters per layer, PaCA r `out * r`, so for the 7 projections of a SmolLM2-135M decoder layer
(`sum(in + out)` = 10,176, `sum(out)` = 5,184) PaCA's matching r is `round(8 * 10176 / 5184)` = 16 (`paca-req`):
2,488,320 trainable parameters against LoRA r 8's 2,442,240 (PaCA r 8: 1,244,160).

Protocol (`paca_hpu/bench/study_runs.py`): SmolLM2-135M-Instruct on the embedded GSM8K, batch 4 x 256 (packed
blocks), 120 optimizer steps (AdamW, 10 % warm-up then linear decay), the same batches in the same order for every
variant of a seed; the learning rate is chosen on one half of the held-out blocks (*select*) and the loss reported
on the other half (*report*). How the grid was pruned (successive halving, per variant, seed 0): every grid point
trains the first 40 of the 120 steps (the full schedule's first third); while the best select loss at step 40 is at
an edge of the grid, one more point past that edge is added (same log spacing, at most 3); the best 2 continue from
their step-40 checkpoint to step 120 and the lowest select loss at step 120 wins; a winner at an edge of everything
tried gets one more point past it, trained the whole way. LoRA r 8, PaCA r 8 and PaCA r 16 are trained again at their
best learning rate with seed 1 (another data order, LoRA initialisation and random PaCA columns). `activation_norm`
chooses, per layer, the input channels of largest L2 norm over 8 training batches (`paca_hpu.calibrate_indices`);
`weight_norm` the columns of largest `||W0[:, j]||`; their grids start 10 x lower for `activation_norm` (its
columns meet the largest inputs). Full fine-tuning is the upper reference (seed 0); in a bf16 study it trains
float32 master weights under bf16 autocast (transformers' `--bf16` recipe): a bf16 weight would lose AdamW updates of
about `lr` (1e-5) against its spacing (about 1.2e-4 at |w| = 0.03). LoRA's and PaCA's trainable parameters are
float32 in every study; their frozen base weights are in the study's precision.

Each finished run is one file `docs/benchmarks/<study>/runs/<variant>__lr<lr>__seed<seed>.json` (losses per step,
held-out loss every 20 steps, wall and CPU seconds, commit, CPU model); the tables below are rebuilt from those files
by every benchmark run and by `python scripts/benchmark.py --docs_only --docs docs/benchmarks.md`. The study is one
resumable command (stop it at any time; the same command skips finished runs and continues an interrupted one from
its last checkpoint); it picks bf16 where the CPU has bf16 GEMMs
(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`), float32 otherwise, and names the precision in the study folder:

```
{command}
```
"""

_VARIANTS = [("lora", "LoRA r 8"), ("paca", "PaCA r 8"), ("paca-req", "PaCA r 16 (= LoRA r 8's parameters)"),
             ("full", "full fine-tuning")]


def _studies(results_root: str) -> List[tuple]:
    """``[(name, summary)]`` of every study folder under ``results_root`` (a ``study.json`` inside)."""
    from .study_runs import study_summary

    out = []
    for cfg in sorted(glob.glob(os.path.join(results_root, "study-*", "study.json"))):
        d = os.path.dirname(cfg)
        out.append((os.path.basename(d), study_summary(d)))
    return out


def _ratio_cell(summary: dict, spec: str) -> str:
    rt = summary["ratios_to_lora"].get(spec)
    if not rt:
        return "-"
    if len(rt["per_seed"]) == 1:
        return f"{rt['mean']:.4f}"
    return f"{rt['mean']:.4f} [{rt['min']:.4f}, {rt['max']:.4f}]"


def _row(summary: dict, spec: str, label: str, name: str) -> str:
    b = summary["best"].get(spec)
    if b is None:
        return f"| {label} | {PENDING} | | | | | |"
    seeds = ", ".join(f"{float(v):.4f}" for v in b["seeds"].values())
    edge = " (edge of what was tried)" if b.get("at_grid_edge") else ""
    tried = ", ".join(f"{x:g}" for x in b["tried"])
    return (f"| {label} | {b.get('r') or '-'} | {b.get('trainable', 0):,} | [{b['lr']:g}]({name}/runs/{b['run']}.json)"
            f"{edge} | {tried} | {seeds} | {_ratio_cell(summary, spec)} |")


def _parity(name: str, summary: dict) -> List[str]:
    dtype = summary["config"]["dtype"]
    head = [f"**Parity, {dtype}** (study `{name}`; seeds {', '.join(map(str, summary['config']['seeds']))} for "
            "LoRA and PaCA, seed 0 for full fine-tuning)", "",
            "| variant | r | trainable | best lr (its run) | lrs tried | held-out loss per seed | / LoRA r 8, mean "
            "[min, max] |", "|---|---:|---:|---:|---|---|---:|"]
    return head + [_row(summary, spec, label, name) for spec, label in _VARIANTS] + [""]


def _ablation_spec(strategy: str, req: bool) -> str:
    return "paca" + ("-req" if req else "") + ("" if strategy == "random" else "-" + strategy)


def _ablation(summary: dict) -> List[str]:
    """Strategy x r: held-out loss and its ratio to LoRA r 8's (seed 0), each at its best learning rate."""
    lora = summary["best"].get("lora")
    lines = [f"**Ablation: column selection x r**, {summary['config']['dtype']}, seed 0 (cell: held-out loss / LoRA "
             "r 8's, at the best lr)", "", "| init_indices | r 8 | r 16 (= LoRA r 8's parameters) |", "|---|---:|---:|"]
    for strategy in ("random", "weight_norm", "activation_norm"):
        cells = []
        for req in (False, True):
            b = summary["best"].get(_ablation_spec(strategy, req))
            if b is None:
                cells.append(PENDING)
                continue
            s0 = b["seeds"].get("0", b["heldout_loss"])
            ratio = f" / {s0 / lora['seeds']['0']:.4f}" if lora and "0" in lora["seeds"] else ""
            edge = ", edge of what was tried" if b.get("at_grid_edge") else ""
            cells.append(f"{s0:.4f}{ratio} (lr {b['lr']:g}{edge})")
        lines.append(f"| {strategy} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def _ratios(summary: dict) -> Dict[str, float]:
    """PaCA settings -> held-out loss / LoRA r 8's: the mean over the seeds both have."""
    return {spec: rt["mean"] for spec, rt in summary["ratios_to_lora"].items() if spec.startswith("paca")}


def _verdict(summary: dict) -> List[str]:
    ratios = _ratios(summary)
    if not ratios:
        return [f"**Measured gap**: {PENDING}.", ""]
    best = min(ratios, key=ratios.get)
    plain = f"; `paca` (r 8, random): {ratios['paca']:.4f}" if "paca" in ratios else ""
    partial = " (so far: some runs are still missing, below)" if summary["missing"] else ""
    return [f"**Measured gap**{partial}: the best PaCA setting, `{best}`, ends at {ratios[best]:.4f} x LoRA r 8's "
            f"held-out loss ({100 * (ratios[best] - 1):+.1f} %), {'within' if ratios[best] <= 1.01 else 'not within'} "
            f"1 %{plain}.", ""]


def study_markdown(results_root: str) -> str:
    """The study section of the docs page, from every ``study-*`` folder under ``results_root``."""
    lines = [_TEXT.format(command=COMMAND)]
    studies = _studies(results_root)
    if not studies:
        lines += [f"**Parity**: {PENDING}.", "", f"**Ablation**: {PENDING}.", "", f"**Measured gap**: {PENDING}.", ""]
    for name, summary in studies:
        lines += _parity(name, summary) + _ablation(summary) + _verdict(summary)
        if summary["missing"]:
            lines += [f"Runs still missing in `{name}`: " + "; ".join(summary["missing"]) + ".", ""]
        lines += [f"{summary['runs']} run files, {summary['cpu_hours']:.1f} CPU-hours in all. Loss curves at each "
                  f"variant's best learning rate: [{name}/loss_curves.png](benchmarks/{name}/loss_curves.png).", ""]
    return "\n".join(lines) + "\n"


def plot_study(study_dir: str) -> Optional[str]:
    """``<study_dir>/loss_curves.png``: training loss (moving average over 10 steps) and select-half held-out loss
    against steps, for each variant's best run; returns the path, or None without finished runs."""
    import json

    from .study_runs import run_id, study_summary

    summary = study_summary(study_dir)
    if not summary["best"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5))
    for spec, b in sorted(summary["best"].items()):
        with open(os.path.join(study_dir, "runs", run_id(spec, b["lr"], 0) + ".json"), encoding="utf-8") as f:
            rec = json.load(f)
        tl = rec["train_loss"]
        avg = [sum(tl[max(0, i - 9):i + 1]) / len(tl[max(0, i - 9):i + 1]) for i in range(len(tl))]
        ax_t.plot(range(1, len(tl) + 1), avg, label=f"{spec} (lr {b['lr']:g})")
        ax_e.plot([e[0] for e in rec["eval"]], [e[1] for e in rec["eval"]], marker="o", label=spec)
    ax_t.set(xlabel="optimizer step", ylabel="training loss (10-step moving average)", title="training loss")
    ax_e.set(xlabel="optimizer step", ylabel="held-out loss (select half)", title="held-out loss")
    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(os.path.normpath(study_dir))}: SmolLM2-135M on GSM8K, 4 x 256, seed 0, best lr each")
    fig.tight_layout()
    out = os.path.join(study_dir, "loss_curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
