#!/usr/bin/env python
"""The independent check of the step-time ratios on docs/benchmarks.md: a plain training loop, nothing else.

Each variant is a model of its own, loaded from disk and adapted the way a user would do it; every step is
``model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()`` (the frozen ``floor`` has no optimizer).
All variants live in this one process and take turns: every round, each variant does one step on the same batch, in
a fresh random order; the ratios are computed per round and summarised by their median and quartiles.

Shared with the harness (``scripts/benchmark.py``) is only the data loading (``benchmarks.inputs``: the embedded
GSM8K, chat-formatted, response-only labels, packed into blocks of exactly ``seq_len`` tokens). Everything else is
written out here.

    python scripts/minimal_loop.py --dtype fp32 --batch 4 --seq_len 256 --rounds 20
    python scripts/minimal_loop.py --dtype bf16 --batch 4 --seq_len 256 --rounds 20 --variants floor,lora,paca
    python scripts/minimal_loop.py --tiny --rounds 3 --seq_len 32          # a few seconds, random tiny model

Run it on an otherwise idle machine; the harness's figures reproduce when their medians fall within each other's
quartiles.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.inputs import byte_level_tokenizer, fixed_batches, packed_splits  # noqa: E402  (data only)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("floor", "lora", "paca", "peft_paca")
PAIRS = [("paca", "lora"), ("paca", "floor"), ("lora", "floor"), ("paca", "peft_paca"), ("peft_paca", "floor")]


def load_model(args, dtype):
    """A fresh base model, frozen, in train mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.tiny:  # the harness's --tiny shape: 2 layers, hidden 64, byte-level vocabulary
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True, pad_token_id=257, bos_token_id=256,
                                             eos_token_id=257)).to(dtype)
    else:
        from paca_hpu.embedded import embedded_model_path

        model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), torch_dtype=dtype)
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.train()


def build(name, args, dtype):
    """``(model, optimizer or None)`` for one variant, built the way a user would."""
    model = load_model(args, dtype)
    if name == "floor":  # no adapter: backward through every layer (input gradients only), no optimizer
        model.enable_input_require_grads()
        return model, None
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    elif name == "paca":
        from paca_hpu import PaCAConfig, apply_paca

        model = apply_paca(model, PaCAConfig(r=args.r, paca_alpha=args.alpha, target_modules=TARGETS))
    elif name == "peft_paca":
        from peft import PacaConfig, get_peft_model  # peft's main branch only

        model = get_peft_model(model, PacaConfig(r=args.r, paca_alpha=args.alpha, target_modules=TARGETS,
                                                 random_seed=0, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def step(model, optimizer, batch):
    loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()


def quartiles(values):
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": median, "q1": q1, "q3": q3}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="floor,lora,paca",
                   help=f"comma separated subset of {','.join(VARIANTS)} (peft_paca: a peft with PaCA, its main branch)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="tiny random model (a smoke test of this script)")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--json", default=None, help="also write per-round times and ratios to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        p.error(f"--variants: unknown or empty {args.variants!r}; choose from {', '.join(VARIANTS)}")
    for flag in ("rounds", "batch", "seq_len", "r"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")

    # the same batches as the harness (seed 0): fixed_batches(train blocks, batch, count, seed=0)
    if args.tiny:
        tokenizer = byte_level_tokenizer()
    else:
        from transformers import AutoTokenizer

        from paca_hpu.embedded import embedded_model_path

        tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    splits = packed_splits(tokenizer, args.seq_len, max_train_samples=args.max_train_samples)
    batches = fixed_batches(splits["train"], args.batch, args.rounds + args.warmup, seed=0)

    variants = {name: build(name, args, dtype) for name in names}
    for name, (model, opt) in variants.items():
        for i in range(args.warmup):
            step(model, opt, batches[i])

    times = {name: [] for name in names}
    order = list(names)
    for k in range(args.rounds):
        random.Random(k).shuffle(order)
        for name in order:
            model, opt = variants[name]
            t0 = time.perf_counter()
            step(model, opt, batches[args.warmup + k])
            times[name].append(time.perf_counter() - t0)
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)

    print(f"\n{args.dtype}, batch {args.batch} x {args.seq_len}, {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}")
    for name in names:
        s = quartiles(times[name])
        print(f"  {name:10s} step {s['median']:.3f} s [q1 {s['q1']:.3f}, q3 {s['q3']:.3f}]")
    ratios = {}
    for a, b in PAIRS:
        if a in times and b in times:
            per_round = [x / y for x, y in zip(times[a], times[b])]
            ratios[f"{a}/{b}"] = dict(quartiles(per_round), per_round=per_round)
            s = ratios[f"{a}/{b}"]
            print(f"  {a}/{b}: median {s['median']:.3f} [q1 {s['q1']:.3f}, q3 {s['q3']:.3f}]")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "times": times, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
