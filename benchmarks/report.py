"""Benchmark output: Markdown tables, PNG charts, and the ``docs/benchmarks.md`` page (its prose:
``templates/page.md``)."""

from __future__ import annotations

import glob
import json
import os
from typing import List, Optional

from .prose import render
from .report_headline import TARGETS, evaluate_targets, headline_markdown, measured_ratios
from .report_tables import (MB, _anchor, _fmt, _maxbatch_markdown, _maxseq_markdown, _memory_markdown,
                            _saved_markdown, _timing_markdown, profile_markdown, quality_markdown, run_title)

__all__ = ["TARGETS", "evaluate_targets", "run_markdown", "write_charts", "write_docs_page"]


def run_markdown(res: dict, image_prefix: str = "", heading: str = "###") -> str:
    """Markdown for one run: command, environment, tables, charts (image paths prefixed with
    ``image_prefix``)."""
    c, meta = res["config"], res["meta"]
    h = heading
    lines = [f"{h} {run_title(res)}", ""]
    lines += _run_header(meta, c)
    lines += _targets_markdown(res, h)

    timing = res.get("timing")
    if timing:
        lines += _timing_markdown(timing, c, h)

    saved = res.get("saved")
    if saved:
        lines += _saved_markdown(saved, h)
    lines += _memory_markdown(res, c, h)

    ms = res.get("maxseq")
    if ms:
        lines += _maxseq_markdown(ms, h)
    if res.get("maxbatch"):
        lines += _maxbatch_markdown(res["maxbatch"], h)

    q = res.get("quality")
    if q:
        lines += quality_markdown(q, h)

    prof = res.get("profile")
    if prof:
        lines += profile_markdown(prof, h)

    if res.get("qpaca"):
        from .qpaca import qpaca_markdown

        lines += qpaca_markdown(res["qpaca"], h)

    charts = res.get("charts") or []
    if charts:
        lines += [f"{h}# Charts", ""]
        for name in charts:
            lines.append(f"![{name}]({image_prefix}{name})")
        lines.append("")
    return "\n".join(lines)


def _run_header(meta: dict, c: dict) -> List[str]:
    """The start of one run's Markdown: noisy-run warnings, the command(s) that made it, environment, precision."""
    lines: List[str] = []
    section_busy = meta.get("section_busy") or {}
    if any(section_busy.values()):
        for warning in dict.fromkeys(w for w in section_busy.values() if w):
            secs = ", ".join(k for k, w in section_busy.items() if w == warning)
            lines += [f"> **Noisy run** ({secs}): {warning}", ""]
    elif meta.get("busy_warning"):
        lines += [f"> **Noisy run:** {meta['busy_warning']}", ""]
    cmds = meta.get("section_commands") or {}
    distinct = list(dict.fromkeys(cmds.values()))
    if len(distinct) > 1:
        lines += ["Commands (sections were produced by different invocations, merged with `--merge`):", ""]
        for cmd in distinct:
            secs = ", ".join(k for k, v in cmds.items() if v == cmd)
            lines += [f"{secs}:", "", "```", cmd, "```", ""]
    else:
        lines += ["Command:", "", "```", meta.get("command", ""), "```", ""]
    env = meta.get("environment", {})
    lines += ["Environment: " + "; ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += [f"Precision mode `{c['dtype']}`: {meta.get('precision_note', '')}", ""]
    return lines


def _targets_markdown(res: dict, h: str) -> List[str]:
    """The benchmark issue's targets that apply to one run (:func:`evaluate_targets`), and the note on peft's PaCA."""
    lines: List[str] = []
    meta = res["meta"]
    targets = evaluate_targets(res)
    if targets:
        lines += [f"{h}# Targets", "",
                  "'floor reaches': the same ratio for the frozen floor, the bound no adapter method can beat.", "",
                  "| target | limit | measured | floor reaches | met |", "|---|---:|---:|---:|:---:|"]
        for t in targets:
            met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
            measured = "not measured" if t.get("note") else _fmt(t["measured"], 3)
            lines.append(f"| {t['target']} | <= {t['limit']} | {measured} | "
                         f"{_fmt(t.get('floor_bound'), 3)} | {met} |")
        lines.append("")
    if meta.get("peft_paca_note"):
        lines += [f"Note: {meta['peft_paca_note']}.", ""]
    return lines


# --------------------------------------------------------------------------- charts


def write_charts(res: dict, out_dir: str) -> List[str]:
    """PNG charts into ``out_dir``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: List[str] = []
    title = run_title(res)
    timing = res.get("timing")
    if timing:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
        vs = list(timing["variants"])
        data = [timing["variants"][v]["raw_wall_s"] for v in vs]
        axes[0].boxplot(data, tick_labels=vs, whis=(0, 100))
        for i, d in enumerate(data, 1):
            axes[0].scatter([i] * len(d), d, s=8, alpha=0.5)
        axes[0].set_ylabel("step time (s), forward+backward+optimizer")
        axes[0].set_title("step time per variant (all rounds)")
        rk = list(timing["ratios"])
        axes[1].boxplot([timing["raw_ratios"][k] for k in rk], tick_labels=rk, whis=(0, 100))
        axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
        axes[1].set_title("per-round ratios")
        axes[1].tick_params(axis="x", labelrotation=30)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "step_time.png"), dpi=110)
        plt.close(fig)
        names.append("step_time.png")
    mem, saved = res.get("memory"), res.get("saved")
    if mem or saved:
        panels = [p for p in (("memory", mem), ("saved", saved)) if p[1]]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (kind, d) in zip(axes[0], panels):
            vs = list(d)
            if kind == "memory":
                before = [d[v]["before_bytes"] / MB for v in vs]
                inc = [(d[v]["peak_bytes"] - d[v]["before_bytes"]) / MB for v in vs]
                ax.bar(vs, before, label="in use before step", color="#bbbbbb")
                ax.bar(vs, inc, bottom=before, label="step increment")
                for i, v in enumerate(vs):
                    ax.text(i, before[i] + inc[i], f"{d[v]['peak_bytes'] / MB:,.0f}", ha="center", va="bottom", fontsize=8)
                ax.set_ylabel("MB")
                ax.set_title(next(iter(d.values())).get("kind", "peak memory"))
                ax.legend(fontsize=8)
            else:
                vals = [d[v]["bytes"] / MB for v in vs]
                ax.bar(vs, vals, color="#4c72b0")
                for i, x in enumerate(vals):
                    ax.text(i, x, f"{x:,.1f}", ha="center", va="bottom", fontsize=8)
                ax.set_ylabel("MB")
                ax.set_title("bytes saved for backward per step")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "memory.png"), dpi=110)
        plt.close(fig)
        names.append("memory.png")
    q = res.get("quality")
    if q and q.get("best"):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for i, (m, b) in enumerate(q["best"].items()):
            run = q["runs"][m][repr(b["lr"])]
            color = f"C{i}"
            tl = run["train_loss"]
            k = max(1, len(tl) // 10)
            smooth = [sum(tl[max(0, j - k + 1):j + 1]) / len(tl[max(0, j - k + 1):j + 1]) for j in range(len(tl))]
            ax.plot(range(1, len(tl) + 1), smooth, color=color, alpha=0.45, lw=1,
                    label=f"{m} train (moving avg {k})")
            ev = run["eval"]
            ax.plot([e[0] for e in ev], [e[1] for e in ev], "o-", color=color, label=f"{m} held-out, lr {b['lr']:g}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"loss curves at each method's best learning rate\n{title}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "loss_curves.png"), dpi=110)
        plt.close(fig)
        names.append("loss_curves.png")
    return names


# --------------------------------------------------------------------------- docs page


def load_results(root: str) -> List[tuple]:
    """``[(run_dir, results)]`` for every ``<root>/*/results.json``, sorted by run name."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                out.append((os.path.dirname(path), json.load(f)))
        except (OSError, ValueError):
            continue
    return out


def write_docs_page(docs_path: str, results_root: Optional[str] = None) -> str:
    """Write the benchmarks page ``docs_path`` from every run under ``results_root`` (default: the directory
    named like the page without ``.md``, e.g. ``docs/benchmarks/``). Returns the path."""
    if results_root is None:
        results_root = os.path.splitext(docs_path)[0]
    runs = load_results(results_root)
    docs_dir = os.path.dirname(os.path.abspath(docs_path))
    from .study import study_markdown

    parts = [render("page.md", headline="\n".join(headline_markdown(runs))) + study_markdown(results_root),
             "## Results\n"]
    parts[-1:-1] = minimal_loop_markdown(results_root, runs)
    if not runs:
        parts.append("No results yet: run `python scripts/benchmark.py`.\n")
    else:
        parts += ["Summary (medians; see each run for quartiles and min/max):", "",
                  "| run | dtype | batch x seq | time PaCA/LoRA | time PaCA/floor | time PaCA/peft PaCA | "
                  "saved PaCA/floor | peak PaCA/LoRA | plain RSS PaCA/LoRA | loss PaCA/LoRA | noisy |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
        for run_dir, res in runs:
            r = measured_ratios(res)
            c = res["config"]
            legacy = ((res.get("timing") or {}).get("protocol") or {}).get("legacy")
            tag = f" (legacy timing: {','.join(legacy)})" if legacy else ""
            parts.append(
                f"| [{os.path.basename(run_dir)}](#{_anchor(run_title(res))}){tag} | {c['dtype']} | {c['batch']} x "
                f"{c['seq_len']} | {_fmt(r.get('time_paca_lora'))} | {_fmt(r.get('time_paca_floor'))} | "
                f"{_fmt(r.get('time_paca_peft_paca'))} | "
                f"{_fmt(r.get('saved_paca_floor'), 4)} | {_fmt(r.get('peak_paca_lora'))} | "
                f"{_fmt(r.get('peak_plain_paca_lora'))} | "
                f"{_fmt(r.get('loss_paca_lora'), 4)} | {'yes' if res['meta'].get('busy_warning') else ''} |")
        parts.append("")
        for run_dir, res in runs:
            prefix = os.path.relpath(run_dir, docs_dir).replace(os.sep, "/") + "/"
            parts.append(run_markdown(res, image_prefix=prefix, heading="###"))
    text = "\n".join(parts).rstrip() + "\n"
    os.makedirs(docs_dir, exist_ok=True)
    with open(docs_path, "w", encoding="utf-8") as f:
        f.write(text)
    return docs_path


MINIMAL_LOOP_DIR = "minimal-loop"


def minimal_loop_markdown(results_root: str, runs: List[tuple]) -> List[str]:
    """The independent check: every ``<results_root>/minimal-loop/*.json`` written by ``scripts/minimal_loop.py
    --json`` next to the harness run of the same dtype and shape. A ratio reproduces when the minimal loop's median
    lies within the harness run's quartiles [q1, q3] (both are medians of per-round ratios). Empty when there is
    no such file."""
    files = sorted(glob.glob(os.path.join(results_root, MINIMAL_LOOP_DIR, "*.json")))
    checks = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                checks.append((os.path.basename(path), json.load(f)))
        except (OSError, ValueError):
            continue
    if not checks:
        return []
    by_shape = {}
    for run_dir, res in runs:
        c = res.get("config", {})
        if (res.get("timing") or {}).get("ratios") and not ((res["timing"].get("protocol") or {}).get("legacy")):
            by_shape.setdefault((c.get("dtype"), c.get("batch"), c.get("seq_len")), (run_dir, res))
    lines = ["## Independent check: the minimal loop against this page", "",
             "`scripts/minimal_loop.py` (see above) on the same machine, right after the harness runs. A ratio "
             "reproduces when the minimal loop's median lies within the harness run's quartiles.", "",
             "| dtype | batch x seq | ratio | minimal loop median [q1, q3] | harness median [q1, q3] | reproduces |",
             "|---|---|---|---:|---:|:---:|"]
    for name, chk in checks:
        a = chk.get("args", {})
        key = (a.get("dtype"), a.get("batch"), a.get("seq_len"))
        harness = ((by_shape.get(key) or (None, {}))[1].get("timing") or {}).get("ratios") or {}
        for pair, m in chk.get("ratios", {}).items():
            h = harness.get(pair)
            cell = f"{h['median']:.3f} [{h['q1']:.3f}, {h['q3']:.3f}]" if h else "-"
            ok = ("yes" if h["q1"] <= m["median"] <= h["q3"] else "no") if h else "-"
            lines.append(f"| {key[0]} | {key[1]} x {key[2]} | {pair} | {m['median']:.3f} [{m['q1']:.3f}, "
                         f"{m['q3']:.3f}] | {cell} | {ok} |")
    lines += ["", f"Files: `docs/benchmarks/{MINIMAL_LOOP_DIR}/` ({', '.join(n for n, _ in checks)}).", ""]
    return lines
