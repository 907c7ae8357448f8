"""Benchmark output: Markdown tables, PNG charts, and the ``docs/benchmarks.md`` page (its prose:
``templates/page.md``)."""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional

from .prose import render

__all__ = ["TARGETS", "evaluate_targets", "run_markdown", "write_charts", "write_docs_page"]

MB = 1024 ** 2

#: Targets of the benchmark issue: (key, description, limit, dtype or None for both).
TARGETS = [
    ("time_paca_lora", "step time PaCA / LoRA", 0.80, "fp32"),
    ("time_paca_lora", "step time PaCA / LoRA", 0.70, "bf16"),
    ("time_paca_floor", "step time PaCA / floor", 1.03, None),
    ("time_paca_peft_paca", "step time PaCA / upstream peft PaCA", 0.90, None),
    ("saved_paca_floor", "bytes saved for backward PaCA / floor", 1.005, None),
    ("peak_paca_lora", "peak memory PaCA / LoRA", 0.78, None),
    ("peak_plain_paca_lora", "peak RSS PaCA / LoRA, glibc's default malloc (CPU)", 0.78, None),
    ("loss_paca_lora", "held-out loss PaCA / LoRA (within 1 %)", 1.01, None),
]


#: (target key, results section) of the peak-memory ratios: live-tensor RSS / device peak, plain RSS (CPU).
_PEAK_SECTIONS = (("peak_paca_lora", "memory"), ("peak_plain_paca_lora", "memory_plain_rss"))


def _fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def _mb(b) -> str:
    return "-" if b is None else f"{b / MB:,.1f}"


def measured_ratios(res: dict) -> Dict[str, float]:
    """The headline ratios (medians of per-round ratios for time) present in ``res``."""
    out: Dict[str, float] = {}
    timing = res.get("timing") or {}
    ratios = timing.get("ratios") or {}
    if "paca/lora" in ratios:
        out["time_paca_lora"] = ratios["paca/lora"]["median"]
    if "paca/floor" in ratios:
        out["time_paca_floor"] = ratios["paca/floor"]["median"]
    if "paca/peft_paca" in ratios:
        out["time_paca_peft_paca"] = ratios["paca/peft_paca"]["median"]
    saved = res.get("saved") or {}
    if "paca" in saved and "floor" in saved and saved["floor"]["bytes"]:
        out["saved_paca_floor"] = saved["paca"]["bytes"] / saved["floor"]["bytes"]
    for key, sec in _PEAK_SECTIONS:
        mem = res.get(sec) or {}
        if "paca" in mem and "lora" in mem:
            out[key] = mem["paca"]["peak_bytes"] / mem["lora"]["peak_bytes"]
    mb_ratios = (res.get("maxbatch") or {}).get("ratios") or {}
    if "paca/lora" in mb_ratios:
        out["throughput_paca_lora"] = mb_ratios["paca/lora"]["median"]
    ms = res.get("maxseq") or {}
    if (ms.get("paca") or {}).get("method") == "search" and (ms.get("lora") or {}).get("max_seq_len"):
        out["maxseq_paca_lora"] = ms["paca"]["max_seq_len"] / ms["lora"]["max_seq_len"]
    q = res.get("quality") or {}
    if "ratio_paca_lora" in q:
        out["loss_paca_lora"] = q["ratio_paca_lora"]
    return out


def floor_bounds(res: dict) -> Dict[str, float]:
    """What the frozen floor itself reaches on the ratios to LoRA (no adapter method can do better):
    ``time_paca_lora`` -> median per-round floor/LoRA step time, ``peak_*`` -> floor/LoRA peak memory,
    ``time_paca_floor`` / ``saved_paca_floor`` -> 1."""
    out: Dict[str, float] = {}
    ratios = (res.get("timing") or {}).get("ratios") or {}
    if "lora/floor" in ratios and ratios["lora/floor"].get("median"):
        out["time_paca_lora"] = 1.0 / ratios["lora/floor"]["median"]
    if "paca/floor" in ratios:
        out["time_paca_floor"] = 1.0
    if "peft_paca/floor" in ratios and ratios["peft_paca/floor"].get("median"):
        out["time_paca_peft_paca"] = 1.0 / ratios["peft_paca/floor"]["median"]
    saved = res.get("saved") or {}
    if "floor" in saved:
        out["saved_paca_floor"] = 1.0
    for key, sec in _PEAK_SECTIONS:
        mem = res.get(sec) or {}
        if "floor" in mem and "lora" in mem:
            out[key] = mem["floor"]["peak_bytes"] / mem["lora"]["peak_bytes"]
    return out


def evaluate_targets(res: dict) -> List[dict]:
    """The issue's targets that apply to ``res`` (defined for the embedded SmolLM2-135M only; other models get
    an empty list)."""
    if res.get("config", {}).get("model", {}).get("kind") != "embedded":
        return []
    dtype = res.get("config", {}).get("dtype")
    got = measured_ratios(res)
    bounds = floor_bounds(res)
    rows = []
    for key, desc, limit, tdtype in TARGETS:
        if tdtype is not None and tdtype != dtype:
            continue
        val = got.get(key)
        note = None
        if val is None and key == "time_paca_peft_paca" and "timing" in res:
            note = res.get("meta", {}).get("peft_paca_note")
            if not note:
                continue
        elif val is None and (key != "loss_paca_lora" or "quality" not in res["config"].get("sections", ["quality"])):
            continue  # section not run here (e.g. a quality-only run)
        rows.append({"key": key, "target": desc, "limit": limit, "measured": val, "floor_bound": bounds.get(key),
                     "met": None if val is None else bool(val <= limit), "note": note})
    return rows


def _memory_table(mem: Dict[str, dict]) -> List[str]:
    """Markdown rows of one peak-memory table (``{variant: {peak_bytes, before_bytes}}``)."""
    lines = ["| variant | peak MB | before MB | peak - before MB | / lora | / floor |", "|---|---:|---:|---:|---:|---:|"]
    lp = mem.get("lora", {}).get("peak_bytes")
    fp = mem.get("floor", {}).get("peak_bytes")
    for v, d in mem.items():
        lines.append(f"| {v} | {_mb(d['peak_bytes'])} | {_mb(d['before_bytes'])} | "
                     f"{_mb(d['peak_bytes'] - d['before_bytes'])} | "
                     f"{_fmt(d['peak_bytes'] / lp) if lp else '-'} | {_fmt(d['peak_bytes'] / fp) if fp else '-'} |")
    return lines + [""]


def _summary_row(s: dict, scale=1.0, nd=3) -> List[str]:
    return [_fmt(s.get(k, float("nan")) * scale, nd) for k in ("median", "q1", "q3", "min", "max")]


def run_title(res: dict) -> str:
    """Heading of one run on the docs page (model, dtype, batch x seq, device)."""
    c = res["config"]
    extra = f", r {c['r']}" if c.get("r", 8) != 8 else ""
    sections = c.get("sections") or []
    if sections and set(sections) <= {"maxseq", "maxbatch"}:
        extra += ", memory-budget figures only"
    if sections and set(sections) <= {"quality"}:
        extra += f", quality only ({(res.get('quality') or {}).get('steps', '?')} steps)"
    if sections == ["qpaca"]:
        q = res.get("qpaca", {}).get("quant", {})
        extra += f", QPaCA vs QLoRA ({q.get('quant_type', '?')}{' + double quant' if q.get('double_quant') else ''})"
    if ((res.get("timing") or {}).get("protocol") or {}).get("legacy"):
        extra += ", legacy timing protocol"
    return (f"{res['meta'].get('model', '?')}, {c['dtype']}, batch {c['batch']} x seq {c['seq_len']}{extra}, "
            f"{res['meta'].get('device', '?')}")


def run_markdown(res: dict, image_prefix: str = "", heading: str = "###") -> str:
    """Markdown for one run: command, environment, tables, charts (image paths prefixed with
    ``image_prefix``)."""
    c, meta = res["config"], res["meta"]
    h = heading
    lines = [f"{h} {run_title(res)}", ""]
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

    timing = res.get("timing")
    if timing:
        lines += _timing_markdown(timing, c, h)

    saved = res.get("saved")
    if saved:
        lines += [f"{h}# Bytes saved for backward per step", "",
                  "`saved_tensors_hooks` over one forward, unique storages, parameters and buffers excluded "
                  "(deterministic).", "", "| variant | MB | tensors | by dtype (MB) | / floor | / lora |",
                  "|---|---:|---:|---|---:|---:|"]
        fb = saved.get("floor", {}).get("bytes")
        lb = saved.get("lora", {}).get("bytes")
        for v, d in saved.items():
            bd = ", ".join(f"{k} {_mb(b)}" for k, b in sorted(d["by_dtype"].items()))
            lines.append(f"| {v} | {_mb(d['bytes'])} | {d['tensors']} | {bd} | "
                         f"{_fmt(d['bytes'] / fb, 4) if fb else '-'} | {_fmt(d['bytes'] / lb, 4) if lb else '-'} |")
        lines.append("")

    mem = res.get("memory")
    if mem:
        kind = next(iter(mem.values())).get("kind", "peak memory")
        fixed = any(d.get("malloc_mmap_threshold_fixed") for d in mem.values())
        lines += [f"{h}# Peak memory ({kind}), each variant in its own process", "",
                  f"{c['memory_warmup']} warm-up step(s), counter reset, {c['memory_steps']} measured step(s) at "
                  f"batch {c['batch']} x seq {c['seq_len']}. 'before' = in use right after the reset (weights, "
                  "optimizer state, runtime)." + (
                      " glibc's mmap threshold fixed at 128 KiB in the measuring process (`--cpu_malloc tuned`), so "
                      "RSS follows live tensor memory rather than heap fragmentation." if fixed else ""), ""]
        lines += _memory_table(mem)
    plain = res.get("memory_plain_rss")
    if plain:
        lines += [f"{h}# Peak RSS with glibc's default malloc, each variant in its own process", "",
                  "The same measurement with glibc's dynamic mmap threshold left alone: the plain peak RSS of a "
                  "normal training run, heap fragmentation included (varies more from run to run).", ""]
        lines += _memory_table(plain)

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


def quality_markdown(q: dict, h: str = "###") -> List[str]:
    """The quality section of one run: best learning rate per variant, and the seed spread when there are reruns."""
    seeds = q.get("seeds") or []
    lines = [f"{h}# Quality: held-out loss after {q['steps']} steps", "",
             f"Each variant at its best learning rate (chosen on the selection half of the held-out blocks, "
             f"{q['select_blocks']} blocks; reported on the other half, {q['report_blocks']} blocks); "
             f"same seed, same batches in the same order. Base model: {_fmt(q['base_loss']['report'], 4)}."
             + (f" Seed of the grid search: {seeds[0]}." if len(seeds) > 1 else ""),
             "", "| variant | r | trainable | best lr | held-out loss | selection-half loss | grid (lr: report-half "
             "loss) | / lora |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    lb = q["best"].get("lora", {}).get("heldout_loss")
    for m, b in q["best"].items():
        grid = ", ".join(f"{r['lr']:g}: {_fmt(r['final_report'], 4)}"
                         for r in sorted(q["runs"][m].values(), key=lambda r: r["lr"]))
        edge = " (grid edge)" if b.get("at_grid_edge") else ""
        trainable = f"{b['trainable']:,}" if isinstance(b.get("trainable"), int) else "-"
        lines.append(f"| {m} | {_fmt(b.get('r'))} | {trainable} | {b['lr']:g}{edge} | "
                     f"{_fmt(b['heldout_loss'], 4)} | {_fmt(b['select_loss'], 4)} | {grid} | "
                     f"{_fmt(b['heldout_loss'] / lb, 4) if lb else '-'} |")
    lines.append("")
    for m in q.get("grid_edge") or [m for m, b in q["best"].items() if b.get("at_grid_edge")]:
        lines.append(f"* **{m}: best at grid edge: extend the grid** (best lr {q['best'][m]['lr']:g}).")
    if len(seeds) > 1:
        ratios = q.get("ratios_to_lora") or {}
        lines += ["", f"Held-out loss per seed at each variant's best learning rate, and its ratio to LoRA's at the "
                      f"same seed (mean [min, max] over seeds {', '.join(str(x) for x in seeds)}):", "",
                  "| variant | best lr | " + " | ".join(f"seed {x}" for x in seeds) + " | mean [min, max] | "
                  "/ lora mean [min, max] |", "|---|---:|" + "---:|" * len(seeds) + "---:|---:|"]
        for m, b in q["best"].items():
            per = [_fmt(b["seeds"].get(str(x)), 4) for x in seeds]
            sp, rt = b["heldout_spread"], ratios.get(m)
            rcell = f"{rt['mean']:.4f} [{rt['min']:.4f}, {rt['max']:.4f}]" if rt else "-"
            lines.append(f"| {m} | {b['lr']:g} | " + " | ".join(per) +
                         f" | {sp['mean']:.4f} [{sp['min']:.4f}, {sp['max']:.4f}] | {rcell} |")
    lines.append("")
    return lines


def _timing_markdown(timing: dict, c: dict, h: str) -> List[str]:
    """Markdown lines of the step-time section of one run."""
    tok = c["batch"] * c["seq_len"]
    proto = timing.get("protocol") or {}
    groups = timing.get("groups")
    lines = [f"{h}# Step time (forward + backward + optimizer step)", ""]
    if proto.get("legacy"):
        lines += [f"> **Legacy timing protocol** (`--timing_legacy {','.join(proto['legacy'])}`), kept only to show "
                  "what the protocol fix changed: these figures are NOT what a user's loop sees.", ""]
    if groups:
        where = "in the harness process" if proto.get("process") == "harness process" else "each group in a fresh process"
        lines += [f"Timed together ({where}): " + "; ".join(" / ".join(g) for g in groups) + ". "
                  f"{timing['rounds']} interleaved rounds after {timing['warmup']} warm-up steps per variant, "
                  f"{'balanced (Williams) order' if proto.get('order') == 'balanced' else 'rotated order'}, "
                  f"{tok} tokens per step; seconds of wall time; process CPU time (all threads) and minor page "
                  "faults per step alongside.", ""]
    else:  # results of the harness before the protocol fix
        lines += [f"{timing['rounds']} interleaved rounds after {timing['warmup']} warm-up steps per variant, "
                  f"{tok} tokens per step (protocol before the fix: all variants, `full` included, in the harness "
                  "process, rotated order, `gc.collect()` before every step).", ""]
    lines += ["| variant | median s | q1 | q3 | min | max | tokens/s (median) | CPU s (median) | page faults (median) "
              "| trainable |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v, d in timing["variants"].items():
        flt = (d.get("minflt") or {}).get("median")
        lines.append(f"| {v} | " + " | ".join(_summary_row(d["wall_s"])) +
                     f" | {_fmt(d['tokens_per_s']['median'], 0)} | {_fmt(d['cpu_s']['median'])} | "
                     f"{'-' if flt is None else format(flt, ',.0f')} | {d.get('trainable', 0):,} |")
    lines += ["", "Ratios, computed per round (same round, same batch, same process):", "",
              "| ratio | median | q1 | q3 | min | max | CPU-time median |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k, s in timing["ratios"].items():
        cpu = (timing.get("cpu_ratios") or {}).get(k, {})
        lines.append(f"| {k} | " + " | ".join(_summary_row(s)) + f" | {_fmt(cpu.get('median'))} |")
    lines.append("")
    return lines


def _probe_error(probe: list) -> str:
    """Why a probe ``[value, peak, fits, error]`` has no peak, short: torch's allocator message becomes 'allocating
    N MB failed under the cap'."""
    import re

    err = probe[3] if len(probe) > 3 and probe[3] else "OOM"
    m = re.search(r"allocate (\d+) bytes", err)
    return f"allocating {int(m.group(1)) / MB:,.0f} MB failed under the cap" if m else err


def _maxseq_markdown(ms: dict, h: str) -> List[str]:
    """Markdown lines of the longest-sequence section (a search, with the straight-line model as a cross-check on
    CPU; or the model alone)."""
    first = next(iter(ms.values()))
    budget = first.get("budget_bytes", 0) / 1024 ** 3
    lm = ms.get("lora", {}).get("max_seq_len")
    if first.get("method") == "model":
        lines = [f"{h}# Longest sequence at batch 1 within {budget:.1f} GiB: MODELLED (CPU)", "",
                 "**A model, not a measurement of the limit**: peak RSS measured at batch 1 at the lengths "
                 "shown, a straight line `peak = a + b * L` fitted through them and solved for the budget. "
                 "SDPA attention keeps activation memory linear in L on CPU.", "",
                 "| variant | measured points (L: peak MB) | a (MB) | b (KB/token) | modelled max L | / lora |",
                 "|---|---|---:|---:|---:|---:|"]
        for v, d in ms.items():
            pts = ", ".join(f"{p[0]}: {_mb(p[1])}" for p in d["points"])
            lines.append(f"| {v} | {pts} | {_mb(d['intercept_bytes'])} | {_fmt(d['bytes_per_token'] / 1024, 1)} "
                         f"| {_fmt(d['max_seq_len'], 0)} | {_fmt(d['max_seq_len'] / lm) if lm else '-'} |")
        return lines + [""]
    iso = first.get("isolation", "")
    lines = [f"{h}# Longest sequence at batch 1 within {budget:.2f} GiB (measured: out-of-memory search)", "",
             (f"From the straight-line model's answer, steps of growing size up or down until a length fits and a "
              f"longer one does not" if first.get("guess") is not None else "Doubling") +
             f", then bisection to {first.get('granularity', '?')} tokens; probes: {iso}. A length fits when "
             "one full training step completes within the budget." + (
                 " On CPU the address space is capped (`RLIMIT_AS`) at the budget's unused part and the peak RSS "
                 "must stay within the budget; the straight-line model (peak RSS at two lengths) is shown as a "
                 "cross-check." if "RLIMIT_AS" in iso else ""), "",
             "| variant | max L | / lora | modelled max L (cross-check) | probes (L: peak MB, or why not) |",
             "|---|---:|---:|---:|---|"]
    for v, d in ms.items():
        pr = ", ".join(f"{p[0]}: {_mb(p[1]) if p[1] is not None else _probe_error(p)}{'' if p[2] else ' (no)'}"
                       for p in d["probes"])
        limit = " (limit)" if d.get("hit_limit") else ""
        model = d.get("model") or {}
        lines.append(f"| {v} | {d['max_seq_len']}{limit} | {_fmt(d['max_seq_len'] / lm) if lm else '-'} | "
                     f"{_fmt(model.get('max_seq_len'), 0)} | {pr} |")
    return lines + [""]


def _maxbatch_markdown(mb: dict, h: str) -> List[str]:
    """Markdown lines of the throughput-at-the-largest-batch section (:mod:`benchmarks.maxbatch`)."""
    lines = [f"{h}# Throughput at the largest batch within {mb['budget_bytes'] / 1024 ** 3:.2f} GiB (seq "
             f"{mb['seq_len']})", "",
             "Largest batch: fresh-process probes under an address-space cap, as for the longest sequence (limit "
             f"{mb['limit']}). Then {mb['rounds']} interleaved rounds after {mb['warmup']} warm-up steps per variant "
             "(the step-time section's protocol), each variant at its own largest batch; tokens/s ratios are "
             "computed per round.", "",
             "| variant | largest batch | probes (batch: peak MB, or why not) | s per step (median) | tokens/s median "
             "[q1, q3] |", "|---|---:|---|---:|---:|"]
    for v, d in mb["search"].items():
        pr = ", ".join(f"{p[0]}: {_mb(p[1]) if p[1] is not None else _probe_error(p)}{'' if p[2] else ' (no)'}"
                       for p in d["probes"])
        t = mb["variants"].get(v)
        tps = (f"{t['tokens_per_s']['median']:,.1f} [{t['tokens_per_s']['q1']:,.1f}, {t['tokens_per_s']['q3']:,.1f}]"
               if t else "not timed")
        lines.append(f"| {v} | {d['max_batch']}{' (limit)' if d['hit_limit'] else ''} | {pr} | "
                     f"{_fmt(t['wall_s']['median']) if t else '-'} | {tps} |")
    lines += ["", "| tokens/s ratio | median | q1 | q3 | min | max |", "|---|---:|---:|---:|---:|---:|"]
    for k, s in mb["ratios"].items():
        lines.append(f"| {k} | " + " | ".join(_summary_row(s)) + " |")
    return lines + [""]


def profile_markdown(prof: dict, h: str = "###") -> List[str]:
    """Markdown lines for the PaCA-vs-floor profile section (times in ms per step)."""
    st = prof["step"]
    lines = [f"{h}# Profile: PaCA's time beyond the floor", "",
             f"Interleaved, {prof['rounds']} rounds: floor {_fmt(st['floor']['wall_s']['median'])} s, paca "
             f"{_fmt(st['paca']['wall_s']['median'])} s (wall medians); per-round paca - floor "
             f"{_fmt(prof['diff_ms_wall']['median'], 1)} ms wall, {_fmt(prof['diff_ms_cpu']['median'], 1)} ms CPU; "
             f"ratio {_fmt(prof['ratio_paca_floor_wall']['median'])} wall, "
             f"{_fmt(prof['ratio_paca_floor_cpu']['median'])} CPU.", "",
             f"PaCA-only work per step, each piece timed alone at the model's real shapes ({prof['layers']} layers), "
             "wall-time medians:", "", "| component | ms per step |", "|---|---:|"]
    for k, v in prof["breakdown_ms"].items():
        lines.append(f"| {k} | {_fmt(v, 1)} |")
    comp = prof["components_ms"]
    forms = [("delta_gemm_batched (used)", "one (r x seq) @ (seq x out) GEMM per sequence, summed (used)"),
             ("delta_gemm_xT_g (used)", "(x_sel^T g)^T as one GEMM (used by that run)"),
             ("delta_gemm_xT_g (one GEMM, alternative)", "(x_sel^T g)^T as one GEMM"),
             ("delta_gemm_gT_x (alternative)", "g^T x_sel")]
    gemm_forms = ", ".join(f"{desc} {_fmt(comp[k]['wall_ms'], 1)} ms" for k, desc in forms if k in comp)
    lines += [f"| **sum** | **{_fmt(prof['explained_ms'], 1)}** |", "",
              f"Measured step difference minus this sum: {_fmt(prof['diff_ms_wall']['median'] - prof['explained_ms'], 1)}"
              " ms (what only shows in situ: cache effects of the second pass over every layer's grad_y, and noise). "
              f"Delta-gradient GEMM forms: {gemm_forms}.", "",
              "Largest per-operator self-time differences in one profiled step (torch.profiler):", "",
              "| operator | floor ms (calls) | paca ms (calls) | diff ms |", "|---|---:|---:|---:|"]
    for d in prof["profiler_op_diff"][:12]:
        lines.append(f"| `{d['op']}` | {_fmt(d['floor_ms'], 1)} ({d['floor_calls']}) | {_fmt(d['paca_ms'], 1)} "
                     f"({d['paca_calls']}) | {_fmt(d['diff_ms'], 1)} |")
    lines.append("")
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


# --------------------------------------------------------------------------- headline table

#: The paper's four headline claims against LoRA (Woo et al. 2025; LLaMA on A100 and Gaudi 2), as PaCA / LoRA
#: ratios: (key of :func:`measured_ratios`, claim, ratio, bound, whether the bound is a maximum, results section).
PAPER_CLAIMS = [
    ("time_paca_lora", "22 % less training time", "step time PaCA / LoRA", 0.78, True, "timing"),
    ("peak_paca_lora", "16 % less memory", "peak memory PaCA / LoRA", 0.84, True, "memory"),
    ("maxseq_paca_lora", "23 % longer sequences", "longest sequence at batch 1 in one budget, PaCA / LoRA", 1.23, False,
     "maxseq"),
    ("throughput_paca_lora", "16 % more throughput", "tokens/s at each one's largest batch in one budget, PaCA / LoRA",
     1.16, False, "maxbatch"),
]

#: The command that measures a claim (CPU, the embedded SmolLM2-135M) where the page has no measurement of it yet;
#: ``{dtype}`` is filled in.
HEADLINE_TODO = {
    "timing": "python scripts/benchmark.py --dtype {dtype} --batch 4 --seq_len 256 --sections timing --merge "
              "--rounds 12 --threads 2 --variants floor,lora,paca",
    "memory": "python scripts/benchmark.py --dtype {dtype} --batch 4 --seq_len 256 --sections memory --merge",
    "maxseq": "python scripts/benchmark.py --dtype {dtype} --batch 4 --seq_len 256 --sections maxseq --variants "
              "floor,lora,paca --threads 1 --memory_budget_gb 4 --memory_warmup 0 --memory_steps 1 --maxseq_lengths "
              "1024,2048 --maxseq_granularity 8 --run_name cpu-smollm2-135m-{dtype}-maxseq-4gib",
    "maxbatch": "python scripts/benchmark.py --dtype {dtype} --batch 4 --seq_len 256 --sections maxbatch --variants "
                "floor,lora,paca --memory_budget_gb 4 --threads 2 --run_name cpu-smollm2-135m-{dtype}-maxseq-4gib "
                "--merge",
}

#: Devices the paper measured on that the page may not hold a run of: (device type, name, what measures it).
HEADLINE_DEVICES = [
    ("cuda", "CUDA GPU (the paper: A100)", "`bash scripts/gpu_bench.sh` on a machine with a GPU (step time, peak "
     "memory, longest sequence in bf16; steps at the top of that script; the throughput figure is CPU-only so far)"),
    ("hpu", "Gaudi 2", "`bash scripts/gaudi_check.sh` on a Gaudi machine (docs/hpu.md), then `python "
     "scripts/benchmark.py --device hpu --dtype bf16 --batch 8 --seq_len 1024 --sections timing,memory,maxseq`"),
]


def _headline_value(res: dict, key: str) -> Optional[tuple]:
    """``(value, measured text, shape text, (low, high) or None)`` of one claim in one run, or None when the run has
    no measurement of it (a modelled longest sequence and step times of the harness before its protocol fix do not
    count). ``(low, high)``: the range the ratio of two searched limits lies in, each known to the search's
    granularity (the true limit of a search that found ``L`` is in ``[L, L + granularity - 1]``)."""
    c = res.get("config", {})
    shape = f"{c.get('batch')} x {c.get('seq_len')}"
    val = measured_ratios(res).get(key)
    if val is None:
        return None
    if key == "time_paca_lora":
        t = res["timing"]
        if "groups" not in t or (t.get("protocol") or {}).get("legacy"):
            return None
        s = t["ratios"]["paca/lora"]
        return val, f"{val:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]", shape, None
    if key == "peak_paca_lora":
        plain = measured_ratios(res).get("peak_plain_paca_lora")
        return val, f"{val:.3f}" + (f" (plain RSS {plain:.3f})" if plain else ""), shape, None
    if key == "maxseq_paca_lora":
        return _headline_maxseq(res["maxseq"], val)
    mb = res["maxbatch"]
    s = mb["ratios"]["paca/lora"]
    b = {v: mb["variants"][v]["batch"] for v in ("paca", "lora")}
    return val, f"{val:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]", \
        f"{b['paca']} / {b['lora']} x {mb['seq_len']}, {mb['budget_bytes'] / 1024 ** 3:g} GiB", None


def _headline_maxseq(ms: dict, val: float) -> tuple:
    """The longest-sequence cell of :func:`_headline_value`: the two limits (and the floor's), the search's
    granularity, and the range of the ratio that granularity leaves (an upper limit is open when a search reached
    its length limit)."""
    p, lo = ms["paca"], ms["lora"]
    g = int(p.get("granularity") or 1)
    high = float("inf") if p.get("hit_limit") else (p["max_seq_len"] + g - 1) / lo["max_seq_len"]
    low = p["max_seq_len"] / (lo["max_seq_len"] + (0 if lo.get("hit_limit") else g - 1))
    floor = f"; floor {ms['floor']['max_seq_len']:,}" if "floor" in ms else ""
    text = (f"{val:.3f} ({p['max_seq_len']:,} / {lo['max_seq_len']:,} tokens{floor}; to {g} tokens: "
            f"{low:.3f}-{high:.3f})")
    return val, text, f"1 x longest, {p['budget_bytes'] / 1024 ** 3:g} GiB", (low, high)


def _host(res: dict) -> str:
    env = res.get("meta", {}).get("environment", {})
    bf16 = env.get("cpu bf16 GEMM (torch.ops.mkldnn._is_mkldnn_bf16_supported())")
    flag = {"True": ", native bf16 GEMM", "False": ", no native bf16 GEMM"}.get(bf16, "")
    return f"{env.get('cpu', '?')}{flag}; {env.get('date', '?')[:10]}"


def headline_markdown(runs: List[tuple]) -> List[str]:
    """The page's first table: the paper's four PaCA/LoRA ratios (:data:`PAPER_CLAIMS`) beside every measurement of
    each on the page (embedded SmolLM2-135M runs; modelled figures left out), each with its host, dtype, shape,
    whether it meets the paper's figure, and the command that produced it; claims without one name the command
    that would measure them."""
    lines = ["| paper's claim | PaCA / LoRA | paper | measured here | dtype | shape | host; date | met | run and "
             "command |", "|---|---|---:|---:|---|---|---|:---:|---|"]
    runs = [(d, r) for d, r in runs if r.get("config", {}).get("model", {}).get("kind") != "tiny"]
    missing = []
    for key, claim, ratio, bound, is_max, sec in PAPER_CLAIMS:
        rows, dtypes = [], set()
        for run_dir, res in runs:
            got = _headline_value(res, key)
            if got is None:
                continue
            val, text, shape, span = got
            met = "yes" if (val <= bound if is_max else val >= bound) else "**no**"
            if span and span[0] < bound <= span[1]:
                met = "open: finer search needed"
            busy = sec in ("timing", "maxbatch") and (res["meta"].get("section_busy") or {}).get(sec)
            cmd = (res["meta"].get("section_commands") or {}).get(sec) or res["meta"].get("command", "")
            name = os.path.basename(run_dir)
            if res["config"].get("model", {}).get("kind") != "embedded":
                shape += f", {res['meta'].get('model', '?')}"
            dtypes.add(res["config"]["dtype"])
            rows.append(f"| {claim} | {ratio} | {bound} | {text}{' (noisy run)' if busy else ''} | "
                        f"{res['config']['dtype']} | {shape} | {_host(res)} | {met} | "
                        f"[{name}](#{_anchor(run_title(res))}): `{cmd}` |")
        if not rows:
            rows.append(f"| {claim} | {ratio} | {bound} | not measured yet | | | | - | "
                        f"`{HEADLINE_TODO[sec].format(dtype='fp32')}` |")
            dtypes.add("fp32")
        lines += rows
        missing += [f"* {ratio}, {d} on CPU: `{HEADLINE_TODO[sec].format(dtype=d)}`" for d in ("fp32", "bf16")
                    if d not in dtypes]
    if missing:
        lines += ["", "No measurement on this page yet (modelled figures and step times of the harness before its "
                      "protocol fix do not count; time needs an otherwise idle machine):", ""]
        lines += missing
    devices = {r["meta"].get("device_type") for _, r in runs}
    todo = [f"* {name}: not measured on this host; {how}." for dev, name, how in HEADLINE_DEVICES
            if dev not in devices]
    if todo:
        lines += ["", "Not measured on the paper's devices:", ""] + todo
    return lines + [""]


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


def _anchor(title: str) -> str:
    import re

    a = title.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")
