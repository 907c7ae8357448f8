"""Per-step communication volume and per-rank memory of PaCA, LoRA and full fine-tuning under data parallelism
(DDP, DeepSpeed ZeRO-1/2/3), computed from a model config (``scripts/scale_out.py``; docs/scale-out.md).

What is counted, per optimizer step and per rank (no gradient accumulation; with ``k`` accumulation steps the
ZeRO-3 parameter all-gathers happen ``k`` times, the gradient reduction once):

* **Collective payload** (:func:`step_communication`): the bytes of the tensors a rank hands to each collective, as a
  DDP communication hook or DeepSpeed's comms logger sees them (``all_reduce``: the whole tensor;
  ``reduce_scatter``: the whole input; ``all_gather``: the whole gathered output, the sum over ranks of what
  DeepSpeed logs per rank). Measured on CPU for a tiny LLaMA (tests/distributed/test_distributed.py), DeepSpeed 0.19.8:

  - DDP: one ``all_reduce`` of every trainable gradient (param dtype);
  - ZeRO-1 and ZeRO-2: ``all_reduce`` of the trainable gradients (communication dtype: bf16 under ``bf16``), then an
    ``all_gather`` of the updated trainable parameters (in their own dtype: DeepSpeed's ``bf16`` casts the model,
    but PaCA's ``delta`` stays float32, :class:`paca_hpu.PaCALinear`);
  - ZeRO-3: ``all_gather`` of every partitioned parameter, frozen ones included, before the forward, and again
    before the backward for what DeepSpeed released in between (modelled as everything beyond
    ``stage3_max_reuse_distance`` elements), then a ``reduce_scatter`` of the trainable gradients. Parameters with at
    most ``stage3_param_persistence_threshold`` elements stay whole on every rank and are never gathered.

  Wire bytes (:func:`wire_bytes`) are what a ring algorithm sends per rank: ``2 (N-1)/N`` of an all-reduce,
  ``(N-1)/N`` of a reduce-scatter or all-gather. Alignment padding (at most ``N`` elements per tensor or group) is
  ignored.
* **Model-state memory** (:func:`memory_per_rank`, the ZeRO paper's accounting, Rajbhandari et al. 2020, section 3,
  with ``K = 12`` bytes of float32 master copy and Adam moments per trainable element): frozen base weights and
  trainable parameters in the model dtype, gradients in the model dtype, master weights and Adam states;
  ZeRO-1 partitions the optimizer states, ZeRO-2 also the gradients, ZeRO-3 also the parameters. PaCA also keeps
  its ``original_columns`` buffer (``out_features x r`` per layer, model dtype) on every rank: buffers are never
  partitioned. Not included: activations (see :func:`saved_linear_inputs_per_token`), ZeRO-3's gathered-parameter
  working set (bounded by ``stage3_max_live_parameters``), communication buckets, allocator fragmentation.

Sources: LLaMA-3 configs as published with the models (``meta-llama/Meta-Llama-3-8B`` / ``-70B``
``config.json``); DeepSpeed's communication pattern as measured (above); Intel Gaudi 2: 96 GB HBM2E per card, eight
cards per server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "LLAMA3_8B",
    "LLAMA3_70B",
    "ModelShape",
    "trainable_numels",
    "frozen_numels",
    "trainable_bytes",
    "step_communication",
    "wire_bytes",
    "memory_per_rank",
    "saved_linear_inputs_per_token",
    "report",
    "PROJECTIONS",
    "r_problem",
    "main",
]

#: ``config.json`` fields of meta-llama/Meta-Llama-3-8B (the 3.1 release has the same shapes).
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
#: ``config.json`` fields of meta-llama/Meta-Llama-3-70B.
LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}

METHODS = ("paca", "lora", "full")
ENGINES = ("ddp", "zero1", "zero2", "zero3")
GAUDI2_HBM_BYTES = 96 * 10**9
#: DeepSpeed defaults (``stage3_max_reuse_distance``, ``stage3_param_persistence_threshold``) in elements.
DS_REUSE_DISTANCE = 10**9
DS_PERSISTENCE_THRESHOLD = 10**5


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-style decoder (``LlamaForCausalLM``): every projection is a bias-free ``nn.Linear``.

    Attributes: ``hidden``, ``intermediate``, ``layers``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab``, ``tied``
    (``tie_word_embeddings``).
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: Dict) -> "ModelShape":
        """From a transformers ``config.json`` dict (``LlamaConfig`` field names)."""
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(hidden=hidden, intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
                   heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
                   tied=bool(cfg.get("tie_word_embeddings", False)))

    def linears(self) -> List[Tuple[int, int]]:
        """``(in_features, out_features)`` of the seven projections of one decoder layer (q, k, v, o, gate, up,
        down): what ``target_modules="all-linear"`` adapts (the output head excluded)."""
        h, f, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]

    def base_numels(self) -> List[int]:
        """Element count of every parameter tensor of the base model."""
        out = [self.vocab * self.hidden] + ([] if self.tied else [self.vocab * self.hidden]) + [self.hidden]
        for _ in range(self.layers):
            out += [i * o for i, o in self.linears()] + [self.hidden, self.hidden]
        return out


def trainable_numels(shape: ModelShape, method: str, r: int) -> List[int]:
    """Element counts of the trainable tensors: PaCA ``delta`` (``out x r``), LoRA ``A`` (``r x in``) and ``B``
    (``out x r``) for every projection, or every base parameter (``"full"``).

    Raises:
        ValueError: unknown ``method``.
    """
    if method == "paca":
        return [o * r for _ in range(shape.layers) for _, o in shape.linears()]
    if method == "lora":
        return [n for _ in range(shape.layers) for i, o in shape.linears() for n in (r * i, o * r)]
    if method == "full":
        return shape.base_numels()
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def frozen_numels(shape: ModelShape, method: str) -> List[int]:
    """Element counts of the frozen tensors: the whole base model for adapters, nothing for full fine-tuning."""
    return [] if method == "full" else shape.base_numels()


def trainable_bytes(method: str, param_bytes: int) -> int:
    """Bytes per trainable element in the model: PaCA's ``delta`` is float32 (float64 with a float64 model) whatever
    the model dtype; LoRA factors and full fine-tuning take the model dtype (DeepSpeed's ``bf16`` casts them)."""
    if method == "paca":
        return 8 if param_bytes == 8 else 4
    return param_bytes


def step_communication(shape: ModelShape, method: str, r: int, engine: str, world: int, *,
                       param_bytes: int = 2, grad_bytes: int = 2,
                       persistence_threshold: int = DS_PERSISTENCE_THRESHOLD,
                       reuse_distance: int = DS_REUSE_DISTANCE) -> Dict[str, int]:
    """Collective payload in bytes per optimizer step: ``{"all_reduce", "reduce_scatter", "all_gather"}``.

    Args:
        shape, method, r: the model and fine-tuning method (see :func:`trainable_numels`).
        engine: ``"ddp"``, ``"zero1"``, ``"zero2"`` or ``"zero3"``.
        world: data-parallel ranks (only ZeRO-3's persistence rule does not depend on it; payloads do not).
        param_bytes: bytes per element of the model dtype (2 for bf16, 4 for float32); trainable tensors in
            their own dtype (:func:`trainable_bytes`).
        grad_bytes: bytes per gradient element communicated (DDP: the parameter's dtype; DeepSpeed: its
            ``communication_data_type``, by default the model dtype).
        persistence_threshold, reuse_distance: ZeRO-3's ``stage3_param_persistence_threshold`` and
            ``stage3_max_reuse_distance`` (elements).

    Raises:
        ValueError: unknown engine, ``world < 1``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    trainable = sum(trainable_numels(shape, method, r))
    t_bytes = trainable_bytes(method, param_bytes)
    comm = {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0}
    if world == 1:
        return comm
    if engine == "ddp":
        comm["all_reduce"] = trainable * grad_bytes
    elif engine in ("zero1", "zero2"):
        comm["all_reduce"] = trainable * grad_bytes
        comm["all_gather"] = trainable * t_bytes
    else:
        frozen = sum(n for n in frozen_numels(shape, method) if n > persistence_threshold)
        train = sum(n for n in trainable_numels(shape, method, r) if n > persistence_threshold)
        regather = max(0.0, 1.0 - reuse_distance / max(1, frozen + train))  # share released between fwd and bwd
        comm["all_gather"] = int(round((1 + regather) * (frozen * param_bytes + train * t_bytes)))
        comm["reduce_scatter"] = trainable * grad_bytes
    return comm


def wire_bytes(comm: Dict[str, int], world: int) -> int:
    """Bytes each rank sends for ``comm`` (from :func:`step_communication`) with ring algorithms."""
    if world <= 1:
        return 0
    frac = (world - 1) / world
    return int(round(2 * frac * comm["all_reduce"] + frac * (comm["reduce_scatter"] + comm["all_gather"])))


def memory_per_rank(shape: ModelShape, method: str, r: int, engine: str, world: int, *,
                    param_bytes: int = 2, persistence_threshold: int = DS_PERSISTENCE_THRESHOLD) -> Dict[str, int]:
    """Model-state bytes per rank: ``{"frozen", "trainable", "gradients", "optimizer", "paca_buffers", "total"}``.

    ``param_bytes`` is the model dtype (frozen weights); trainable tensors and their gradients take
    :func:`trainable_bytes`; the optimizer holds a float32 master copy plus two float32 Adam moments per trainable
    element (12 bytes), partitioned by every ZeRO stage.
    DDP keeps everything on every rank. ZeRO-3 partitions parameters above ``persistence_threshold`` elements.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    n = max(1, world)
    trainable = trainable_numels(shape, method, r)
    phi = sum(trainable)
    t_bytes = trainable_bytes(method, param_bytes)

    def params(numels: Sequence[int]) -> float:
        if engine != "zero3":
            return sum(numels)
        return sum(x if x <= persistence_threshold else x / n for x in numels)

    mem = {
        "frozen": params(frozen_numels(shape, method)) * param_bytes,
        "trainable": params(trainable) * t_bytes,
        "gradients": phi * t_bytes / (n if engine in ("zero2", "zero3") else 1),
        "optimizer": phi * 12 / (1 if engine == "ddp" else n),
        "paca_buffers": phi * param_bytes if method == "paca" else 0,
    }
    mem = {k: int(round(v)) for k, v in mem.items()}
    mem["total"] = sum(mem.values())
    return mem


def saved_linear_inputs_per_token(shape: ModelShape, method: str, r: int, act_bytes: int = 2) -> int:
    """Bytes per token that the projections keep for backward because of the trained tensors, beyond what a frozen
    model keeps (a frozen ``nn.Linear`` needs no input for ``grad_x``): PaCA ``x[..., idx]`` (``r`` values per
    projection); LoRA the whole input of each adapted projection for ``grad_A`` (q/k/v and gate/up share one
    input tensor) plus the ``r``-wide ``x @ A`` for ``grad_B``; full fine-tuning the same inputs for ``grad_W``.
    """
    if method == "paca":
        return shape.layers * len(shape.linears()) * r * act_bytes
    q = shape.heads * shape.head_dim
    unique_inputs = shape.hidden + q + shape.hidden + shape.intermediate  # qkv, o, gate/up, down
    extra = len(shape.linears()) * r if method == "lora" else 0
    return shape.layers * (unique_inputs + extra) * act_bytes


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f}"


def report(models: Sequence[Tuple[str, Dict]] = (("LLaMA-3-8B", LLAMA3_8B), ("LLaMA-3-70B", LLAMA3_70B)),
           worlds: Sequence[int] = (8, 64), engines: Sequence[str] = ("zero2", "zero3"), r: int = 8) -> str:
    """Markdown tables (communication and memory) for bf16 DeepSpeed on Gaudi 2 cards; what docs/scale-out.md shows."""
    lines = ["| model | method | trainable | engine | cards | all-reduce GB | reduce-scatter GB | all-gather GB "
             "| sent per card GB | model states per card GB | fits 96 GB | saved inputs MB / 1k tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, cfg in models:
        shape = ModelShape.from_config(cfg)
        for method in METHODS:
            phi = sum(trainable_numels(shape, method, r))
            act = saved_linear_inputs_per_token(shape, method, r) * 1000 / 1e6
            name = {"paca": f"PaCA r={r}", "lora": f"LoRA r={r}", "full": "full"}[method]
            for engine in engines:
                for world in worlds:
                    comm = step_communication(shape, method, r, engine, world)
                    mem = memory_per_rank(shape, method, r, engine, world)
                    fits = "yes" if mem["total"] < GAUDI2_HBM_BYTES else "no"
                    lines.append(
                        f"| {label} | {name} | {phi / 1e6:,.1f} M | ZeRO-{engine[-1]} | {world} "
                        f"| {_gb(comm['all_reduce'])} | {_gb(comm['reduce_scatter'])} | {_gb(comm['all_gather'])} "
                        f"| {_gb(wire_bytes(comm, world))} | {_gb(mem['total'])} | {fits} | {act:,.1f} |")
    return "\n".join(lines) + "\n"


#: Names of the projections :meth:`ModelShape.linears` lists, in its order.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def r_problem(label: str, shape: ModelShape, r: int) -> Optional[str]:
    """Why ``r`` does not fit ``shape`` (one line), or None: PaCA trains ``r`` of a projection's ``in_features``
    input columns, so ``r`` may not exceed the smallest ``in_features`` of the targeted projections (a LoRA rank
    above it adds parameters but no rank)."""
    in_features, name = min(((i, n) for (i, _), n in zip(shape.linears(), PROJECTIONS)), key=lambda t: t[0])
    if r <= in_features:
        return None
    return (f"--r {r} exceeds in_features={in_features} of {label}'s {name}; PaCA trains r of a layer's input "
            f"columns: pass --r {in_features} or less")


def _read_config(path: str) -> Tuple[str, Dict]:
    """``(label, config dict)`` of a transformers ``config.json``; the label is its ``_name_or_path``, else the
    folder (or file) name.  Raises OSError / ValueError / KeyError / TypeError for a file that is no LLaMA-style
    config."""
    with open(path) as fh:
        cfg = json.load(fh)
    ModelShape.from_config(cfg)  # KeyError / ValueError / TypeError for what is no LLaMA-style config
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    label = cfg.get("_name_or_path") or (folder if os.path.basename(path) == "config.json" else
                                         os.path.splitext(os.path.basename(path))[0])
    return str(label), cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``scripts/scale_out.py``: print the tables of :func:`report` (default: LLaMA-3-8B and 70B, 8 and 64 cards,
    ZeRO-2 and ZeRO-3, r=8; ``--config config.json``: that model instead), or with ``--json`` the numbers as JSON.
    Returns 2 with one ``error: ...`` line for a config that cannot be read and for an ``--r`` above a projection's
    ``in_features`` (:func:`r_problem`)."""
    p = argparse.ArgumentParser(prog="scale_out.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a transformers config.json of a LLaMA-style model (default: LLaMA-3 8B and 70B)")
    p.add_argument("--r", type=int, default=8, help="PaCA columns / LoRA rank per projection (default 8)")
    p.add_argument("--world", type=int, nargs="+", default=[8, 64], help="data-parallel ranks (default 8 64)")
    p.add_argument("--engines", nargs="+", default=["zero2", "zero3"], choices=ENGINES)
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of the table")
    args = p.parse_args(argv)
    if args.r < 1 or any(w < 1 for w in args.world):
        p.error("--r and --world must be positive")
    models: List[Tuple[str, Dict]] = [("LLaMA-3-8B", LLAMA3_8B), ("LLaMA-3-70B", LLAMA3_70B)]
    if args.config is not None:
        try:
            models = [_read_config(args.config)]
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"error: cannot read a LLaMA-style config from '{args.config}': {err}", file=sys.stderr)
            return 2
    for label, cfg in models:
        problem = r_problem(label, ModelShape.from_config(cfg), args.r)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if not args.json:
        sys.stdout.write(report(models, worlds=args.world, engines=args.engines, r=args.r))
        return 0
    out = {}
    for label, cfg in models:
        shape = ModelShape.from_config(cfg)
        out[label] = {m: {e: {w: {"communication": step_communication(shape, m, args.r, e, w),
                                  "memory": memory_per_rank(shape, m, args.r, e, w)}
                              for w in args.world} for e in args.engines} for m in METHODS}
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
