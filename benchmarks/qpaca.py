"""The ``qpaca`` benchmark section: QPaCA vs QLoRA on a bitsandbytes 4-bit base, and a memory model for large models.

Measured (``--sections qpaca``) on the benchmark model quantized by bitsandbytes (``--bnb_4bit_quant_type``,
``--bnb_4bit_use_double_quant``; compute dtype = ``--dtype``), one quantized base for every variant:

* ``qfloor`` / ``qlora`` / ``qpaca``: the dense benchmark's ``floor`` / ``lora`` (peft LoRA, which wraps bitsandbytes
  layers itself: QLoRA) / ``paca`` (:class:`paca_hpu.quantized.PaCALinear4bit`: QPaCA) variants built on the 4-bit
  base (:func:`benchmarks.variants.build_variant`), same targets, r and alpha;
* step time (interleaved rounds, as the ``timing`` section), bytes saved for backward (as ``saved``), peak memory
  (one subprocess per variant, as ``memory``), held-out loss after the same steps (as ``quality``, on the 4-bit base).

Modelled (:func:`memory_model`): bytes of a LLaMA-architecture model fine-tuned with QPaCA or QLoRA at a given batch x
sequence length, from bytes per parameter (4-bit weights, 16-bit rest, trainable parameters with AdamW state) plus
bytes per token (what autograd saves, counted tensor by tensor for a LLaMA decoder layer with SDPA attention, and
the largest transient buffers), checked against the measured small-model figures (:func:`model_check`) and solved
for the largest model of :data:`LLAMA_FAMILY` that fits one Gaudi 2 (96 GB HBM).
"""

from __future__ import annotations

import gc
import math
import tempfile
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["QUANT_VARIANTS", "LLAMA_FAMILY", "load_quantized_base", "arch_of", "memory_model", "model_check",
           "largest_fitting", "run_qpaca_section", "qpaca_markdown"]

#: result name -> dense variant built on the 4-bit base
QUANT_VARIANTS = {"qfloor": "floor", "qlora": "lora", "qpaca": "paca"}

#: LLaMA-architecture shapes (from the models' published config.json files).
_FAMILY_FIELDS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab", "tied")
LLAMA_FAMILY: Dict[str, dict] = {name: dict(zip(_FAMILY_FIELDS, shape)) for name, shape in [
    ("Llama-3.2-1B", (2048, 8192, 16, 32, 8, 64, 128256, True)),
    ("Llama-3.2-3B", (3072, 8192, 28, 24, 8, 128, 128256, True)),
    ("Llama-3.1-8B", (4096, 14336, 32, 32, 8, 128, 128256, False)),
    ("Llama-2-13B", (5120, 13824, 40, 40, 40, 128, 32000, False)),
    ("Qwen2.5-32B", (5120, 27648, 64, 40, 8, 128, 152064, False)),
    ("Llama-3.1-70B", (8192, 28672, 80, 64, 8, 128, 128256, False)),
    ("Llama-3.1-405B", (16384, 53248, 126, 128, 8, 128, 128256, False)),
]}

GB = 1e9


# --------------------------------------------------------------------------- the quantized base


def load_quantized_base(spec, dtype: torch.dtype, device: torch.device, quant_type: str = "nf4",
                        double_quant: bool = True) -> torch.nn.Module:
    """The benchmark model (:class:`~benchmarks.variants.ModelSpec`) loaded by transformers with a bitsandbytes
    4-bit ``BitsAndBytesConfig`` (compute dtype = ``dtype``, the rest of the model in ``dtype``) onto ``device``;
    train mode, every parameter frozen, kept out of bitsandbytes' CPU inference repack for every variant copied from
    it (:func:`paca_hpu.quantized.prevent_cpu_repack`: a QLoRA base repacked by an evaluation would pass no gradient).
    In-process models (``--tiny`` / ``--model_config``) are built as :func:`~benchmarks.variants.load_base_model`
    builds them, saved to a temporary directory and loaded from it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from paca_hpu.quantized import prevent_cpu_repack
    from .variants import load_base_model

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=dtype,
                             bnb_4bit_use_double_quant=double_quant)
    kwargs = dict(quantization_config=cfg, torch_dtype=dtype, device_map={"": str(device)},
                  attn_implementation=spec.attn_implementation)
    if spec.random_init:
        with tempfile.TemporaryDirectory(prefix="paca_qbase_") as tmp:
            load_base_model(spec, dtype, torch.device("cpu")).save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.resolved_path(), **kwargs)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    prevent_cpu_repack(model)
    model.train()
    return model


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter, buffer and bitsandbytes quantization state tensor of ``model`` (each storage once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        qs = getattr(t, "quant_state", None)
        while qs is not None:
            for name in ("absmax", "code", "offset"):
                v = getattr(qs, name, None)
                if isinstance(v, torch.Tensor):
                    seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
            qs = getattr(qs, "state2", None)
    return int(sum(seen.values()))


# --------------------------------------------------------------------------- the memory model


def arch_of(config) -> dict:
    """The :data:`LLAMA_FAMILY`-style shape dict of a transformers LLaMA-family config."""
    heads = int(config.num_attention_heads)
    return dict(hidden=int(config.hidden_size), intermediate=int(config.intermediate_size),
                layers=int(config.num_hidden_layers), heads=heads,
                kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                vocab=int(config.vocab_size), tied=bool(getattr(config, "tie_word_embeddings", False)))


def _linears(a: dict) -> List[tuple]:
    """``(in, out)`` of the 7 projections of one decoder layer."""
    h, i, q, kv = a["hidden"], a["intermediate"], a["heads"] * a["head_dim"], a["kv_heads"] * a["head_dim"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def memory_model(a: dict, method: str, batch: int, seq_len: int, *, r: int = 8, dtype_bytes: int = 2,
                 double_quant: bool = True, blocksize: int = 64, checkpointing: bool = False,
                 gqa_sdpa: bool = True, o_proj_input_is_sdpa_output: bool = False) -> Dict[str, float]:
    """Bytes needed to fine-tune LLaMA architecture ``a`` on a 4-bit base with ``method`` (``"qpaca"``,
    ``"qlora"`` or ``"qfloor"``), all 7 projections of every layer targeted, AdamW, at ``batch`` x ``seq_len``.

    Per parameter: 4-bit projection weights 0.5 byte + block scales (4 / blocksize bytes; with double quantization
    1 / blocksize + 4 / (256 * blocksize)); embeddings, norms and the output head ``dtype_bytes`` (bitsandbytes
    leaves them unquantized); trainable parameters 16 bytes (float32 value, gradient, two AdamW moments), for QPaCA
    20 (plus the float32 ``original_columns`` of its ``(out, r)`` delta).

    Per token (what autograd saves; counted tensor by tensor on the CPU for a tiny LLaMA, exact there): per decoder
    layer two RMSNorm inputs in float32 (``4 h + 4``), SDPA's q and output (``2 * heads * head_dim * e``), k and v
    (``2 * kv_heads * head_dim * e`` with ``gqa_sdpa``: transformers' SDPA path without a mask matrix, i.e. an
    all-ones attention mask as in packed training, on torch >= 2.5; else repeated to ``heads`` and the mask's two
    ``seq_len``-long rows per token ``2 * seq_len * e``, once) and log-sum-exp (``4 * heads``), the MLP's gate,
    SiLU and up outputs (``3 i e``); then the
    method's own: QPaCA ``x[..., idx]`` of each projection (``7 r e``); QLoRA (peft) a float32 copy of each
    projection's input (shared between projections with the same input when the model is float32; there, with
    ``o_proj_input_is_sdpa_output`` (transformers >= 5, whose SDPA output already has the ``(batch, seq, heads,
    head_dim)`` layout, so ``o_proj``'s input is a view of the tensor SDPA saved) ``o_proj``'s input adds nothing)
    plus the LoRA A output (``7 * 4 r``); but the first layer's input norm only for the frozen floor (whose embedding output requires
    grad). Once: the final norm, float32
    logits (``4 V``), labels and the rotary tables. With gradient
    checkpointing only each layer's input (``h e``) is kept per layer, and one layer's activations are recomputed.
    Transient: the logits in the compute dtype plus their float32 gradient (``V * (e + 4)``), two dequantized copies
    of the largest projection.

    Returns:
        ``{"weights", "trainable_state", "saved", "transient", "total"}`` in bytes, plus ``"trainable_params"``.
    """
    if method not in QUANT_VARIANTS:
        raise ValueError(f"method must be one of {', '.join(QUANT_VARIANTS)}, got {method!r}")
    h, i, L, V, e = a["hidden"], a["intermediate"], a["layers"], a["vocab"], dtype_bytes
    lin = _linears(a)
    q_bytes = 0.5 + ((1 / blocksize + 4 / (256 * blocksize)) if double_quant else 4 / blocksize)
    p_lin = L * sum(fi * fo for fi, fo in lin)
    p_other = V * h * (1 if a["tied"] else 2) + (2 * L + 1) * h
    weights = p_lin * q_bytes + p_other * e
    if method == "qpaca":
        trainable = L * r * sum(fo for _, fo in lin)
        state = 20.0 * trainable
    elif method == "qlora":
        trainable = L * r * sum(fi + fo for fi, fo in lin)
        state = 16.0 * trainable
    else:
        trainable, state = 0, 0.0
    tokens = batch * seq_len
    heads_dim = a["heads"] * a["head_dim"]
    kv_dim = (a["kv_heads"] if gqa_sdpa else a["heads"]) * a["head_dim"]
    floor_layer = 2 * (4 * h + 4) + 2 * (heads_dim + kv_dim) * e + 4 * a["heads"] + 3 * i * e
    if method == "qpaca":
        method_layer = 7 * r * e
    elif method == "qlora":
        if e != 4:
            inputs = [fi for fi, _ in lin]
        else:  # float32 model: no cast, so projections sharing an input share its storage
            inputs = [h, h, i] if o_proj_input_is_sdpa_output else [h, heads_dim, h, i]
        method_layer = 4 * sum(inputs) + 7 * 4 * r
    else:
        method_layer = 0
    once = (4 * h + 4) + 4 * V + 8 + 2 * a["head_dim"] * e / batch + (0 if gqa_sdpa else 2 * seq_len * e)
    if method != "qfloor":  # the first layer's input norm: its input (the frozen embedding) needs no gradient
        once -= 4 * h + 4
    if checkpointing:
        saved = tokens * (L * h * e + once)
        transient_layer = tokens * (floor_layer + method_layer)
    else:
        saved = tokens * (L * (floor_layer + method_layer) + once)
        transient_layer = 0
    biggest = max(fi * fo for fi, fo in lin)
    transient = tokens * V * (e + 4) + 2 * biggest * e + transient_layer
    total = weights + state + saved + transient
    return {"weights": weights, "trainable_state": state, "saved": saved, "transient": transient, "total": total,
            "trainable_params": trainable}


def longest_sequence(a: dict, method: str, budget: float, batch: int = 1, limit: int = 1 << 20, **kw) -> int:
    """Largest ``seq_len`` (multiple of 128) at ``batch`` whose :func:`memory_model` total fits ``budget`` bytes (0:
    none)."""
    lo, hi = 0, limit
    while hi - lo > 128:
        mid = (lo + hi) // 2 // 128 * 128 or 128
        if memory_model(a, method, batch, mid, **kw)["total"] <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def largest_fitting(method: str, budget: float, batch: int, seq_len: int, **kw) -> Optional[str]:
    """Name of the largest :data:`LLAMA_FAMILY` model (by parameter count) whose :func:`memory_model` total at
    ``batch`` x ``seq_len`` fits ``budget`` bytes, or None."""
    best = None
    for name, a in sorted(LLAMA_FAMILY.items(), key=lambda kv: _param_count(kv[1])):
        if memory_model(a, method, batch, seq_len, **kw)["total"] <= budget:
            best = name
    return best


def _param_count(a: dict) -> int:
    return a["layers"] * sum(fi * fo for fi, fo in _linears(a)) + a["vocab"] * a["hidden"] * (1 if a["tied"] else 2)


def family_table(budget: float, batch: int, seq_len: int, r: int = 8, double_quant: bool = True) -> dict:
    """The modelled figures for every :data:`LLAMA_FAMILY` model (bf16 compute), with and without gradient
    checkpointing, plus the largest fitting model per method and the longest batch-1 sequence per model."""
    rows = {}
    kw = dict(r=r, dtype_bytes=2, double_quant=double_quant)
    for name, a in LLAMA_FAMILY.items():
        row = {"params": _param_count(a)}
        for method in ("qpaca", "qlora"):
            for ckpt in (False, True):
                m = memory_model(a, method, batch, seq_len, checkpointing=ckpt, **kw)
                row[f"{method}{'_ckpt' if ckpt else ''}"] = m
            row[f"{method}_max_seq_b1"] = longest_sequence(a, method, budget, **kw)
        rows[name] = row
    largest = {f"{m}{'_ckpt' if c else ''}": largest_fitting(m, budget, batch, seq_len, checkpointing=c, **kw)
               for m in ("qpaca", "qlora") for c in (False, True)}
    return {"budget_bytes": budget, "batch": batch, "seq_len": seq_len, "r": r, "double_quant": double_quant,
            "models": rows, "largest": largest}


def model_check(a: dict, measured: dict, batch: int, seq_len: int, r: int, dtype_bytes: int,
                double_quant: bool) -> Dict[str, dict]:
    """Modelled vs measured on the benchmark's own model: saved-for-backward bytes, weight bytes, and the peak
    memory increase over the state before a step (saved + transient + gradients vs the measured peak - before).
    The installed transformers' major version decides ``o_proj_input_is_sdpa_output`` (see :func:`memory_model`)."""
    import transformers

    aliased = int(transformers.__version__.split(".")[0]) >= 5
    out: Dict[str, dict] = {}
    for v in QUANT_VARIANTS:
        m = memory_model(a, v, batch, seq_len, r=r, dtype_bytes=dtype_bytes, double_quant=double_quant,
                         o_proj_input_is_sdpa_output=aliased)
        row: Dict[str, float] = {}
        saved = (measured.get("saved") or {}).get(v)
        if saved:
            row.update(saved_model=m["saved"], saved_measured=saved["bytes"], saved_ratio=m["saved"] / saved["bytes"])
        if v == "qpaca" and measured.get("weight_bytes"):
            row.update(weights_model=m["weights"], weights_measured=measured["weight_bytes"],
                       weights_ratio=m["weights"] / measured["weight_bytes"])
        mem = (measured.get("memory") or {}).get(v)
        if mem:
            step = m["saved"] + m["transient"] + 4.0 * m["trainable_params"]
            got = mem["peak_bytes"] - mem["before_bytes"]
            row.update(step_model=step, step_measured=got, step_ratio=step / got if got > 0 else float("nan"))
        out[v] = row
    return out


# --------------------------------------------------------------------------- the section


def run_qpaca_section(args, spec, dtype: torch.dtype, splits, info, log: Callable[[str], None],
                      run_children: Callable, lr_grids: Dict[str, List[float]],
                      previous: Optional[dict] = None) -> dict:
    """Measure QPaCA vs QLoRA (see the module docstring) for parsed benchmark ``args``; returns the
    ``results["qpaca"]`` dict. ``run_children(cfg, variants, inputs, log)`` is the benchmark's per-variant
    subprocess runner (memory). ``previous``: parts (``timing`` / ``saved`` / ``memory`` / ``quality``) of an
    earlier run of the same model and shape (``--merge``), kept as they are; the memory-model check is recomputed
    from the kept and the new parts."""
    from paca_hpu import device as _device
    from .inputs import fixed_batches

    quant = {"quant_type": args.bnb_4bit_quant_type, "double_quant": bool(args.bnb_4bit_use_double_quant)}
    res: dict = {"quant": dict(quant, compute_dtype=args.dtype, library=_bnb_version()), "variants": QUANT_VARIANTS}
    res.update(previous or {})
    names = list(QUANT_VARIANTS)
    batches = fixed_batches(splits["train"], args.batch, max(args.rounds + args.warmup, 1), seed=args.seed)

    if "memory" in args.qpaca_parts:
        res["memory"] = _qpaca_memory(args, spec, quant, names, batches, run_children, log)

    _device.manual_seed_all(args.seed)
    base = load_quantized_base(spec, dtype, info.device, **quant)
    res["weight_bytes"] = _weight_bytes(base)
    log(f"qpaca: 4-bit base ({quant['quant_type']}{', double quant' if quant['double_quant'] else ''}): "
        f"{res['weight_bytes'] / 2 ** 20:,.1f} MB of weights")

    if "saved" in args.qpaca_parts or "timing" in args.qpaca_parts:
        _qpaca_saved_and_timing(args, base, names, batches, res, log)
    if "quality" in args.qpaca_parts:
        res["quality"] = _qpaca_quality(args, base, splits, lr_grids, log)

    a = arch_of(base.config)
    e = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    res["arch"] = a
    res["model_check"] = model_check(a, res, args.batch, args.seq_len, args.r, e, quant["double_quant"])
    res["family"] = family_table(args.qpaca_device_gb * GB, args.qpaca_model_batch, args.qpaca_model_seq_len,
                                 r=args.r, double_quant=quant["double_quant"])
    for k, v in res["family"]["largest"].items():
        log(f"qpaca model: largest LLaMA-family model on {args.qpaca_device_gb:g} GB at batch "
            f"{args.qpaca_model_batch} x {args.qpaca_model_seq_len}, {k}: {v}")
    del base
    gc.collect()
    return res


def _qpaca_memory(args, spec, quant: dict, names: List[str], batches, run_children: Callable, log) -> dict:
    """Peak memory of each quantized variant, each in its own process (``run_children``)."""
    from paca_hpu import device as _device

    child_cfg = {"model": spec.to_dict(), "dtype": args.dtype, "seed": args.seed, "r": args.r, "alpha": args.alpha,
                 "threads": args.threads, "batch": args.batch, "seq_len": args.seq_len,
                 "memory_warmup": args.memory_warmup, "memory_steps": args.memory_steps, "maxseq": False,
                 "cpu_malloc": "tuned" if args.cpu_malloc == "both" else args.cpu_malloc, "quant": quant}
    log(f"qpaca memory: one subprocess per variant ({_device.peak_memory_kind()})")
    child = run_children(child_cfg, [QUANT_VARIANTS[n] for n in names],
                         {"batch": batches[0], "stream": batches[0]}, log)
    return {n: {k: child[QUANT_VARIANTS[n]][k] for k in ("peak_bytes", "before_bytes", "kind", "trainable")}
            for n in names}


def _qpaca_saved_and_timing(args, base, names: List[str], batches, res: dict, log) -> None:
    """Bytes saved for backward and interleaved step times of the quantized variants, built once on ``base``; into
    ``res`` as ``saved`` / ``timing`` (the parts ``--qpaca_parts`` selects)."""
    from .measure import saved_tensor_bytes, summarize, time_rounds
    from .variants import build_variant, make_optimizer

    built = {n: build_variant(QUANT_VARIANTS[n], base, r=args.r, alpha=args.alpha) for n in names}
    opts = {n: make_optimizer(built[n], 1e-4) for n in names}
    if "saved" in args.qpaca_parts:
        res["saved"] = {n: saved_tensor_bytes(built[n].model, batches[0]) for n in names}
        for n in names:
            log(f"qpaca saved: {n}: {res['saved'][n]['bytes'] / 2 ** 20:,.2f} MB")
    if "timing" in args.qpaca_parts:
        raw = time_rounds(built, opts, batches, rounds=args.rounds, warmup=args.warmup, log=log)
        tokens = args.batch * args.seq_len
        res["timing"] = {"rounds": args.rounds, "warmup": args.warmup, "tokens_per_step": tokens, "variants": {
            n: {"wall_s": summarize(raw[n]["wall_s"]), "cpu_s": summarize(raw[n]["cpu_s"]),
                "tokens_per_s": summarize([tokens / x for x in raw[n]["wall_s"]]),
                "trainable": built[n].trainable, "raw_wall_s": raw[n]["wall_s"]} for n in names}}
        pairs = (("qpaca", "qlora"), ("qpaca", "qfloor"), ("qlora", "qfloor"))
        res["timing"]["ratios"] = {
            f"{a}/{b}": summarize([x / y for x, y in zip(raw[a]["wall_s"], raw[b]["wall_s"])]) for a, b in pairs}
    del built, opts
    gc.collect()


def _qpaca_quality(args, base, splits, lr_grids: Dict[str, List[float]], log) -> dict:
    """Held-out loss of QLoRA and QPaCA at each one's best learning rate (:func:`benchmarks.quality.run_quality`
    with the results renamed ``qlora`` / ``qpaca``)."""
    from .inputs import all_batches, fixed_batches
    from .quality import run_quality

    q_train = fixed_batches(splits["train"], args.batch, args.steps, seed=args.seed + 1)
    val = splits["validation"]
    q = run_quality(base, ["lora", "paca"], lr_grids, q_train, all_batches(val.select(range(0, len(val), 2)),
                    args.batch), all_batches(val.select(range(1, len(val), 2)), args.batch), args.steps,
                    args.eval_every, seed=args.seed, r=args.r, alpha=args.alpha, log=log)
    q["best"] = {("q" + k): v for k, v in q["best"].items()}
    q["runs"] = {("q" + k): v for k, v in q["runs"].items()}
    if "ratio_paca_lora" in q:
        q["ratio_qpaca_qlora"] = q.pop("ratio_paca_lora")
    return q


def _bnb_version() -> str:
    try:
        import bitsandbytes

        return f"bitsandbytes {bitsandbytes.__version__}"
    except ImportError:  # pragma: no cover - the section needs it
        return "bitsandbytes not installed"


# --------------------------------------------------------------------------- report


def _f(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}"


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2 ** 20:,.1f}"


def qpaca_markdown(res: dict, h: str = "###") -> List[str]:
    """Markdown lines of the ``qpaca`` section of one run's results."""
    qd = res["quant"]
    lines = [f"{h}# QPaCA vs QLoRA on a 4-bit base", "",
             f"The model quantized by {qd['library']} to 4-bit {qd['quant_type']}"
             f"{' with double quantization' if qd['double_quant'] else ''}, compute dtype {qd['compute_dtype']}; "
             "`qfloor` / `qlora` / `qpaca` = the frozen floor / peft LoRA (QLoRA) / paca_hpu PaCA (QPaCA) on that "
             f"same base; 4-bit base weights {_mb(res.get('weight_bytes'))} MB.", ""]
    if len(set((res.get("part_commands") or {}).values())) > 1:  # parts measured by separate --merge runs
        lines += ["Parts measured by separate runs (`--qpaca_parts ... --merge`):", ""]
        lines += [f"* {part}: `{cmd}`" for part, cmd in res["part_commands"].items()] + [""]
    lines += ["| variant | step s (median) | q1 | q3 | saved for backward MB | peak MB | peak - before MB | "
             "held-out loss (best lr) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    timing, saved, mem = res.get("timing") or {}, res.get("saved") or {}, res.get("memory") or {}
    best = (res.get("quality") or {}).get("best") or {}
    for v in QUANT_VARIANTS:
        t = (timing.get("variants") or {}).get(v, {}).get("wall_s") or {}
        m = mem.get(v) or {}
        b = best.get(v) or {}
        lines.append(f"| {v} | {_f(t.get('median'))} | {_f(t.get('q1'))} | {_f(t.get('q3'))} | "
                     f"{_mb((saved.get(v) or {}).get('bytes'))} | {_mb(m.get('peak_bytes'))} | "
                     f"{_mb(m['peak_bytes'] - m['before_bytes']) if m else '-'} | "
                     f"{_f(b.get('heldout_loss'), 4)}{' (lr ' + format(b['lr'], 'g') + ')' if b else ''} |")
    ratios = timing.get("ratios") or {}
    extra = [f"step time {k} {_f(s.get('median'))}" for k, s in ratios.items()]
    if saved.get("qpaca") and saved.get("qlora"):
        extra.append(f"saved qpaca/qlora {saved['qpaca']['bytes'] / saved['qlora']['bytes']:.3f}")
    if mem.get("qpaca") and mem.get("qlora"):
        extra.append(f"peak qpaca/qlora {mem['qpaca']['peak_bytes'] / mem['qlora']['peak_bytes']:.3f}")
    q = res.get("quality") or {}
    if "ratio_qpaca_qlora" in q:
        extra.append(f"held-out loss qpaca/qlora {q['ratio_qpaca_qlora']:.4f} after {q['steps']} steps")
    lines += ["", "Ratios (medians of per-round ratios for time): " + ("; ".join(extra) or "-") + ".", ""]

    check = res.get("model_check") or {}
    if check:
        lines += [f"{h}## The memory model against this run", "",
                  "`benchmarks.qpaca.memory_model` evaluated for this model and shape, next to the measurement "
                  "(ratio = model / measured). 'step' = what one step adds to memory in use before it (saved "
                  "activations + transient buffers + gradients) against the measured peak - before.", "",
                  "| variant | saved model MB | saved measured MB | ratio | step model MB | step measured MB | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for v, c in check.items():
            lines.append(f"| {v} | {_mb(c.get('saved_model'))} | {_mb(c.get('saved_measured'))} | "
                         f"{_f(c.get('saved_ratio'))} | {_mb(c.get('step_model'))} | {_mb(c.get('step_measured'))} | "
                         f"{_f(c.get('step_ratio'))} |")
        w = check.get("qpaca") or {}
        if "weights_model" in w:
            lines += ["", f"Weights (4-bit projections, 16/32-bit rest): model {_mb(w['weights_model'])} MB, "
                          f"measured {_mb(w['weights_measured'])} MB (ratio {_f(w['weights_ratio'])})."]
        lines.append("")
    fam = res.get("family")
    if fam:
        lines += _family_lines(fam, h)
    return lines


def _family_lines(fam: dict, h: str) -> List[str]:
    budget = fam["budget_bytes"] / GB
    lines = [f"{h}## Modelled: which LLaMA fits one Gaudi 2 ({budget:g} GB) with QPaCA vs QLoRA", "",
             f"bf16 compute, NF4{' + double quantization' if fam['double_quant'] else ''}, r {fam['r']} on all 7 "
             f"projections, AdamW, batch {fam['batch']} x seq {fam['seq_len']}; GB = 10^9 bytes; no allowance for "
             "the runtime or fragmentation (a lower bound). **Modelled, not run on Gaudi.**", "",
             "| model | params (B) | QPaCA GB | QLoRA GB | QPaCA GB, grad. ckpt | QLoRA GB, grad. ckpt | "
             "longest seq at batch 1, QPaCA | QLoRA |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in fam["models"].items():
        def g(key):
            t = row[key]["total"] / GB
            return f"{t:,.1f}" + ("" if t <= budget else " (no)")
        lines.append(f"| {name} | {row['params'] / 1e9:.1f} | {g('qpaca')} | {g('qlora')} | {g('qpaca_ckpt')} | "
                     f"{g('qlora_ckpt')} | {row['qpaca_max_seq_b1']:,} | {row['qlora_max_seq_b1']:,} |")
    lg = fam["largest"]
    lines += ["", f"Largest that fits at batch {fam['batch']} x {fam['seq_len']}: QPaCA {lg['qpaca'] or 'none'}, "
                  f"QLoRA {lg['qlora'] or 'none'}; with gradient checkpointing: QPaCA {lg['qpaca_ckpt'] or 'none'}, "
                  f"QLoRA {lg['qlora_ckpt'] or 'none'}.", ""]
    return lines

