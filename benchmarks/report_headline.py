"""The ratios of a benchmark run against the benchmark issue's targets and the paper's claims, and the docs page's
headline table (the paper's four PaCA / LoRA ratios beside every measurement of each on the page)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from .report_tables import _anchor, run_title


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
