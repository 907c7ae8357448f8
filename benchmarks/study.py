"""The parity study and column-selection ablation on the docs page: the text (``templates/study.md``) with the
command, and tables built from the run files of every study folder (``docs/benchmarks/study-*/runs/*.json``,
written by ``scripts/study.py``; see :mod:`benchmarks.study_runs`). A cell without its run says "pending: not yet
run"; a partial table lists the runs still missing.
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional

from .prose import render

__all__ = ["PENDING", "study_markdown", "plot_study"]

PENDING = "pending: not yet run"
COMMAND = "nice -n 19 python scripts/study.py      # again to continue; --summary prints the state"

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
    link = f"benchmarks/{name}/runs/{b['run']}.json"  # relative to the page, docs/benchmarks.md
    return (f"| {label} | {b.get('r') or '-'} | {b.get('trainable', 0):,} | [{b['lr']:g}]({link})"
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
    lines = [render("study.md", command=COMMAND)]
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
