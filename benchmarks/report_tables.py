"""Markdown tables of one benchmark run, one function per results section (step time, bytes saved, peak memory,
longest sequence, largest batch, quality, profile), and the formatting they share."""

from __future__ import annotations

from typing import Dict, List

MB = 1024 ** 2


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


def _anchor(title: str) -> str:
    import re

    a = title.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")


def _saved_markdown(saved: dict, h: str) -> List[str]:
    """Markdown lines of the bytes-saved-for-backward section of one run."""
    lines = [f"{h}# Bytes saved for backward per step", "",
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
    return lines


def _memory_markdown(res: dict, c: dict, h: str) -> List[str]:
    """Markdown lines of the peak-memory sections of one run (live-tensor RSS or device peak; plain RSS on CPU)."""
    lines: List[str] = []
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
    return lines


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
