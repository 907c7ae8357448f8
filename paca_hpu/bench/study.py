"""The parity study and column-selection ablation of issue 14 on the docs page: the exact commands, and tables
filled in from those commands' ``results.json`` once the runs exist ("pending: not yet run" until then).

Every number in the tables comes from a run directory next to the others (``docs/benchmarks/<run name>/``); the
page is rebuilt by every benchmark run and by ``scripts/benchmark.py --docs_only``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

__all__ = ["PARITY_RUN", "FULL_RUN", "ABLATION_RUN", "study_markdown"]

PARITY_RUN = "cpu-smollm2-135m-bf16-b4-s256-parity"
FULL_RUN = "cpu-smollm2-135m-fp32-b4-s256-parity"
ABLATION_RUN = "cpu-smollm2-135m-bf16-b4-s256-ablation"
PENDING = "pending: not yet run"

_COMMON = "python scripts/benchmark.py --batch 4 --seq_len 256 --sections quality --steps 120 --eval_every 20"
#: Estimated wall time on 2 idle CPU cores (torch uses both: CPU time is about twice that); see ESTIMATE_NOTE.
PARITY_ESTIMATE = ("12 runs (3 variants x 3 learning rates + 3 seed-1 reruns) of about 8 (PaCA r 8), 8.5 (PaCA r 16) "
                   "and 13 (LoRA) minutes: about 2 h; up to 3.4 h if every grid grows by 3 points (21 runs)")
FULL_ESTIMATE = ("9 runs of about 13.5 (PaCA), 18 (LoRA) and 20 (full) minutes: about 2.6 h; up to 5.2 h with every "
                 "grid grown by 3 points (18 runs)")
ABLATION_ESTIMATE = ("12 runs of about 8-8.5 minutes (+ 10 s calibration for activation_norm): about 1.7 h; up to "
                     "3.4 h with every grid grown by 3 points (24 runs)")
ESTIMATE_NOTE = """How the times were estimated. Wall times: one run = 120 steps x (step time) + 7 half-split evaluations + about
10 s to copy the model, with step times 1.15 x the medians of this page's quiet-machine timing runs at batch 4 x 256
(bf16: PaCA 2.74 s, LoRA 4.78 s; fp32: PaCA 4.66 s, LoRA 6.69 s, full 7.48 s; 1.15 = the 60-step quality run's
3.15 s per step / the timing median) and a half-split evaluation (13 batches) of about 14 s in bf16, 22 s in fp32
(base-model evaluations in those runs' logs). CPU time, from 2-step smoke runs of these commands (`--steps 2
--eval_every 0 --threads 1 --max_eval_samples 4`, process CPU seconds per run in the log) on this machine while other
jobs kept its 2 cores at a load average of 12 to 17: fp32 PaCA 14.5 and full 23 CPU-s per step, 2 CPU-s per
evaluated block, so the float32 command needs about 7.7 CPU-hours (3 x (41 + 54 + 58) CPU-minutes for PaCA, LoRA
(scaled from PaCA by the timing ratio 1.44) and full), i.e. 3.8 h on 2 cores: an upper bound next to the 2.6 h
above, as contention inflates CPU time too. In bf16 the 1-thread smoke ran 4 x slower than fp32 (8.3 CPU-s per
evaluated block against 2; the 2-thread timing runs have bf16 at 0.6 x fp32), so its bf16 figures were not used;
it did confirm that the commands run end to end on SmolLM2, calibration included."""
#: (run name, command, estimated wall time on 2 quiet CPU cores; how it was estimated: ESTIMATE_NOTE).
COMMANDS = [
    (PARITY_RUN,
     f"{_COMMON} --dtype bf16 \\\n    --quality_variants lora,paca,paca-req --seeds 0,1 --lr_extend 3 \\\n"
     f"    --lr_grid 'lora=1e-3,3e-3,1e-2;paca=3e-3,1e-2,3e-2' --run_name {PARITY_RUN}",
     PARITY_ESTIMATE),
    (FULL_RUN,
     f"{_COMMON} --dtype fp32 \\\n    --quality_variants lora,paca,full --lr_extend 3 \\\n"
     f"    --lr_grid 'lora=1e-3,3e-3,1e-2;paca=3e-3,1e-2,3e-2;full=1e-5,3e-5,1e-4' --run_name {FULL_RUN}",
     FULL_ESTIMATE),
    (ABLATION_RUN,
     f"{_COMMON} --dtype bf16 \\\n    --quality_variants paca-weight_norm,paca-activation_norm,paca-req-weight_norm,"
     "paca-req-activation_norm \\\n    --paca_calibration_batches 8 --lr_extend 3 \\\n    --lr_grid 'paca=3e-3,1e-2,3e-2;"
     "paca-activation_norm=3e-4,1e-3,3e-3;paca-req-activation_norm=3e-4,1e-3,3e-3' \\\n"
     f"    --run_name {ABLATION_RUN}",
     ABLATION_ESTIMATE),
]


_TEXT = """## Parity study and column selection (issue 14)

Does PaCA reach LoRA's held-out loss (within 1 %) on this task, at equal steps, at r 8 and at the r that trains as
many parameters as LoRA r 8, and does a column choice other than random close the gap? LoRA r adds
`r * (in + out)` parameters per layer, PaCA r `out * r`, so for the 7 projections of a SmolLM2-135M decoder layer
(`sum(in + out)` = 10,176, `sum(out)` = 5,184) PaCA's matching r is `round(8 * 10176 / 5184)` = 16 (`paca-req`):
2,488,320 trainable parameters against LoRA r 8's 2,442,240 (PaCA r 8: 1,244,160).

Protocol (`paca_hpu/bench/quality.py`): SmolLM2-135M-Instruct on the embedded GSM8K, batch 4 x 256, 120 optimizer
steps (AdamW, 10 % warm-up then linear decay), same batches in the same order for every variant; each variant at
its best learning rate, chosen on one half of the held-out blocks and reported on the other half. A best learning
rate at an edge of its grid grows the grid past that edge (`--lr_extend 3`), so a reported best is interior unless
the run says "best at grid edge: extend the grid". `--seeds 0,1` trains each variant's best learning rate again
with seed 1 (another data order, LoRA initialisation and random PaCA columns): the ratios below are per seed, with
their mean and range. `activation_norm` chooses, per layer, the input channels of largest L2 norm over 8 training
batches (`paca_hpu.calibrate_indices`); `weight_norm` the columns of largest `||W0[:, j]||`. The `activation_norm`
grids start 10 x lower: its columns meet the largest inputs, so the same step on `delta` moves the outputs more (in
a 2-step smoke run, batch 1 x 64, one update at lr 1e-2 raised the held-out loss of `paca-req-activation_norm` from
2.55 to 4.95, while `paca-weight_norm` stayed at 2.59).

Full fine-tuning, the upper reference, runs in float32: in the bf16 mode every variant trains bf16 parameters, and
full fine-tuning there has no float32 master copy, so an AdamW update of about `lr` (1e-5) is lost against the
bf16 spacing of a typical weight (about 1.2e-4 at |w| = 0.03). The float32 run also repeats LoRA and PaCA r 8, so
its ratios are within one precision.

The commands (run on an otherwise idle machine, one after the other; each writes `docs/benchmarks/<run name>/`
and rebuilds this page, which fills the tables in). The bf16 ones need a CPU with bf16 GEMM support
(`python -c "import torch; print(torch.ops.mkldnn._is_mkldnn_bf16_supported())"` prints True; AVX-512 BF16 or AMX)
or a device: without it torch runs bf16 GEMMs on its reference kernel, many times slower than float32 (on the 2-core
AVX2 machine of 2026-12-02 a bf16 timing group did not finish 12 rounds in 14 minutes), and the estimates below
do not hold; there, run them with `--dtype fp32` and new run names.

{commands}
{estimate_note}

If the ablation names a better PaCA setting, confirm it against LoRA on more seeds, each at its best learning rate
(`--quality_variants lora,<setting> --lr_grid 'lora=<lr>;<setting>=<lr>' --seeds 0,1,2 --run_name
cpu-smollm2-135m-bf16-b4-s256-final`), and make it the recommended setting only if its mean ratio stays within
1.01.
"""


def _best(res: Optional[dict], spec: str) -> Optional[dict]:
    return (((res or {}).get("quality") or {}).get("best") or {}).get(spec)


def _ratio_cell(res: Optional[dict], spec: str) -> str:
    rt = (((res or {}).get("quality") or {}).get("ratios_to_lora") or {}).get(spec)
    if not rt:
        return "-"
    if len(rt["per_seed"]) == 1:
        return f"{rt['mean']:.4f}"
    return f"{rt['mean']:.4f} [{rt['min']:.4f}, {rt['max']:.4f}]"


def _row(res: Optional[dict], spec: str, label: str) -> str:
    b = _best(res, spec)
    if b is None:
        return f"| {label} | {PENDING} | | | | |"
    seeds = ", ".join(f"{float(v):.4f}" for v in b["seeds"].values())
    edge = " (edge: extend the grid)" if b.get("at_grid_edge") else ""
    return (f"| {label} | {b.get('r') or '-'} | {b.get('trainable', 0):,} | {b['lr']:g}{edge} | {seeds} | "
            f"{_ratio_cell(res, spec)} |")


def _table(title: str, res: Optional[dict], rows: List[tuple], run: str, anchor: Optional[str]) -> List[str]:
    where = f"run [{run}](#{anchor or run})" if res else PENDING
    head = [f"**{title}** ({where})", "",
            "| variant | r | trainable | best lr | held-out loss per seed | / LoRA r 8, mean [min, max] |",
            "|---|---:|---:|---:|---|---:|"]
    return head + [_row(res, spec, label) for spec, label in rows] + [""]


def _ablation_spec(strategy: str, req: bool) -> str:
    return "paca" + ("-req" if req else "") + ("" if strategy == "random" else "-" + strategy)


def _ablation(parity: Optional[dict], ablation: Optional[dict]) -> List[str]:
    """Strategy x r: held-out loss and its ratio to LoRA r 8's (seed 0), each at its best learning rate."""
    lora = _best(parity, "lora")
    lines = [f"**Ablation: column selection x r**, bf16, seed 0 ({'' if ablation else PENDING + '; '}random rows "
             "from the parity run; cell: held-out loss / LoRA r 8's, at the best lr)", "",
             "| init_indices | r 8 | r 16 (= LoRA r 8's parameters) |", "|---|---:|---:|"]
    for strategy in ("random", "weight_norm", "activation_norm"):
        cells = []
        for req in (False, True):
            b = _best(parity if strategy == "random" else ablation, _ablation_spec(strategy, req))
            if b is None:
                cells.append(PENDING)
                continue
            ratio = f" / {b['seeds']['0'] / lora['seeds']['0']:.4f}" if lora and "0" in b["seeds"] else ""
            edge = ", edge: extend the grid" if b.get("at_grid_edge") else ""
            cells.append(f"{b['seeds'].get('0', b['heldout_loss']):.4f}{ratio} (lr {b['lr']:g}{edge})")
        lines.append(f"| {strategy} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def _ratios(parity: Optional[dict], ablation: Optional[dict]) -> Dict[str, float]:
    """PaCA settings -> held-out loss / LoRA r 8's: the mean over seeds in the parity run, seed 0 in the
    ablation (against the parity run's LoRA)."""
    out = {}
    for spec, rt in (((parity or {}).get("quality") or {}).get("ratios_to_lora") or {}).items():
        if spec.startswith("paca"):
            out[spec] = rt["mean"]
    lora = _best(parity, "lora")
    for spec, b in (((ablation or {}).get("quality") or {}).get("best") or {}).items():
        if lora and spec.startswith("paca") and "0" in b["seeds"]:
            out[spec] = b["seeds"]["0"] / lora["seeds"]["0"]
    return out


def _verdict(parity: Optional[dict], ablation: Optional[dict]) -> List[str]:
    ratios = _ratios(parity, ablation)
    if not ratios:
        return [f"**Measured gap**: {PENDING}.", ""]
    best = min(ratios, key=ratios.get)
    plain = f"; `paca` (r 8, random): {ratios['paca']:.4f}" if "paca" in ratios else ""
    return [f"**Measured gap** (generated from the runs above): the best PaCA setting, `{best}`, ends at "
            f"{ratios[best]:.4f} x LoRA r 8's held-out loss ({100 * (ratios[best] - 1):+.1f} %), "
            f"{'within' if ratios[best] <= 1.01 else 'not within'} 1 %{plain}.", ""]


def study_markdown(runs: Dict[str, dict], anchors: Dict[str, str]) -> str:
    """The issue-14 section of the docs page.

    Args:
        runs: run directory name -> that run's ``results.json`` (all runs on the page).
        anchors: run directory name -> the page anchor of its own section.
    """
    cmds = "\n".join(f"```\n{cmd}\n```\nEstimated: {est}.\n" for _, cmd, est in COMMANDS)
    parity, full, ablation = runs.get(PARITY_RUN), runs.get(FULL_RUN), runs.get(ABLATION_RUN)
    lines = [_TEXT.format(commands=cmds, estimate_note=ESTIMATE_NOTE)]
    lines += _table("Parity, bf16, seeds 0 and 1", parity,
                    [("lora", "LoRA r 8"), ("paca", "PaCA r 8"), ("paca-req", "PaCA r_eq")], PARITY_RUN,
                    anchors.get(PARITY_RUN))
    lines += _table("Parity with full fine-tuning, float32, seed 0", full,
                    [("lora", "LoRA r 8"), ("paca", "PaCA r 8"), ("full", "full FT")], FULL_RUN, anchors.get(FULL_RUN))
    lines += _ablation(parity, ablation)
    lines += _verdict(parity, ablation)
    lines.append("Loss curves (training and held-out loss at each variant's best learning rate): "
                 + ", ".join(f"[{name}](benchmarks/{name}/loss_curves.png)" if name in runs else f"{name} ({PENDING})"
                             for name, _, _ in COMMANDS) + ".")
    return "\n".join(lines) + "\n"
