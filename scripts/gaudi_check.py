"""Issue 20, device check on a real Gaudi: what paca_hpu's CPU tests prove only against a fake habana_frameworks.

Run it through ``bash scripts/gaudi_check.sh`` (inside an Intel Gaudi software image with this repository, optimum-habana
1.21.2 and, for the ZeRO part, Habana's DeepSpeed fork installed; see docs/hpu.md, "Confirm on a Gaudi"), or by parts:

    PT_HPU_LAZY_MODE=1 python3 scripts/gaudi_check.py graphs                 # HPU graphs for training, 1 card
    PT_HPU_LAZY_MODE=1 python3 scripts/gaudi_check.py reference --out DIR    # one card, DeepSpeed's bf16 cast
    PT_HPU_LAZY_MODE=1 deepspeed --num_gpus 2 --no_local_rank scripts/gaudi_check.py zero --stage 2 --out DIR
    PT_HPU_LAZY_MODE=1 deepspeed --num_gpus 2 --no_local_rank scripts/gaudi_check.py zero --stage 3 --out DIR
    python3 scripts/gaudi_check.py compare --out DIR

Every check prints one line ``CHECK <name>: PASS|FAIL|INFO <numbers>``; docs/hpu.md lists the lines to expect. The
model is the tiny LLaMA of the CPU tests (hidden 32, 2 layers, PaCA on all 14 projections), so the numbers compare
with theirs. ``--smoke`` runs the same code on the CPU (with tests/fake_habana on the path for ``graphs``; under
``torchrun`` with DeepSpeed's CPU accelerator for ``zero``): a check of this script, not of a Gaudi.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paca_hpu import device as _device  # noqa: E402

R, ALPHA, MICRO, SEQ, LR, CLIP, STEPS = 4, 8.0, 2, 12, 1e-2, 1.0, 3
#: (losses, deltas, logits) relative tolerances against one card; ZeRO-3's as on CPU (tests/distributed/test_distributed.py
#: BF16_TOL), ZeRO-2's looser than CPU's exact match (another all-reduce implementation)
TOLERANCES = {2: (1e-4, 1e-3, 1e-2), 3: (5e-4, 2e-2, 3e-2)}


def _device_name(smoke: bool) -> str:
    return "cpu" if smoke else "hpu"


def _line(name: str, ok, detail: str) -> bool:
    status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    print(f"CHECK {name}: {status} {detail}", flush=True)
    return ok is not False


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny_model(kind: str = "paca", r: int = R, seed: int = 0):
    """The CPU tests' tiny LLaMA (tests/helpers.py), ``kind`` paca / lora / none (the base model), training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from paca_hpu.trainer import prepare_model

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
                      initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng():  # the base weights and peft's LoRA initialisation, the same at every call
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        model.train()
        return model if kind == "none" else prepare_model(model, kind, r=r, alpha=ALPHA, random_seed=3)


def batch(seed: int, n: int = MICRO) -> torch.Tensor:
    return torch.randint(3, 100, (n, SEQ), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- HPU graphs


def _grads(model):
    return {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _two_micro_batches(model, dev) -> None:
    for seed in (1, 2):
        ids = batch(seed).to(dev)
        model(input_ids=ids, labels=ids).loss.backward()
        _device.mark_step()


def check_raw_graph_gradients(dev: str) -> bool:
    """ModuleCacher without and with paca_hpu's guard, 2 micro-batches accumulated, against eager."""
    import habana_frameworks.torch as ht

    from paca_hpu.hpu_graphs import guard_hpu_graphs

    ok = True
    for kind, r in (("paca", 1), ("paca", R), ("lora", R)):
        eager = tiny_model(kind, r).to(dev)
        _two_micro_batches(eager, dev)
        want, second = _grads(eager), _second_only(kind, r, dev)
        for guarded in (False, True):
            graphed = tiny_model(kind, r).to(dev)
            ht.hpu.ModuleCacher()(model=graphed, inplace=True)
            if guarded:
                guard_hpu_graphs(graphed)
            _two_micro_batches(graphed, dev)
            got = _grads(graphed)
            worst = max(_rel(got[n], g) for n, g in want.items())
            doubled = max(_rel(got[n], 2 * g) for n, g in second.items())
            name = f"graph_grads_{kind}_r{r}_{'guarded' if guarded else 'raw'}"
            detail = f"rel diff to eager {worst:.2e} (to 2 x g2: {doubled:.2e})"
            ok &= _line(name, worst < 1e-4 if guarded else None, detail)
    return ok


def _second_only(kind, r, dev):
    model = tiny_model(kind, r).to(dev)
    ids = batch(2).to(dev)
    model(input_ids=ids, labels=ids).loss.backward()
    return _grads(model)


def _trainer(model, out: str, graphs: bool, smoke: bool, ga: int = 2, steps: int = 2):
    """paca_hpu's GaudiTrainer in lazy mode (HPU), or (smoke) its CPU path with the lazy / HPU-graph branches on."""
    from paca_hpu import _optimum_habana as oh
    from paca_hpu.trainer import build_training_arguments, make_trainer

    info = _device.DeviceInfo("cpu", torch.device("cpu")) if smoke else _device.get_device_info()
    args = build_training_arguments(
        info=info, output_dir=out, max_steps=steps, per_device_train_batch_size=MICRO, gradient_accumulation_steps=ga,
        learning_rate=LR, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=CLIP, use_lazy_mode=True,
        use_hpu_graphs_for_training=graphs)
    data = [{"input_ids": row, "labels": row} for row in batch(11, 8)]
    trainer = make_trainer(model, args, train_dataset=data, gaudi_config=oh.make_gaudi_config(use_habana=not smoke))
    if smoke:  # build_training_arguments turned the HPU-only branches off on the CPU
        import habana_frameworks.torch.core as htcore

        args.use_lazy_mode, args.use_hpu_graphs_for_training, trainer.htcore = True, graphs, htcore
    return trainer


def _recorded_training(kind: str, r: int, graphs: bool, smoke: bool):
    from transformers import TrainerCallback

    model = tiny_model(kind, r)
    seen = []

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append(_grads(model))

    trainer = _trainer(model, tempfile.mkdtemp(), graphs, smoke)
    trainer.add_callback(Grads())
    trainer.train()
    return seen, trainer, model


def check_trainer_gradient_accumulation(smoke: bool) -> bool:
    """GaudiTrainer, gradient accumulation 2, with and without --use_hpu_graphs_for_training."""
    ok = True
    for kind, r in (("paca", 1), ("paca", R), ("lora", R)):
        plain, _, _ = _recorded_training(kind, r, False, smoke)
        graphed, _, _ = _recorded_training(kind, r, True, smoke)
        worst = max(_rel(g[n], p[n]) for g, p in zip(graphed, plain) for n in p)
        ok &= _line(f"trainer_ga2_{kind}_r{r}", len(plain) == len(graphed) == 2 and worst < 1e-4,
                    f"max rel diff of the accumulated gradients, 2 steps: {worst:.2e}")
    return ok


def check_paca_features_under_graphs(smoke: bool) -> bool:
    """After the trainer captured its graph: disable_paca / functional_paca refused with grad, base model without
    grad, a delta changed outside an optimizer step written back before the replay."""
    from paca_hpu import disable_paca, functional_paca

    _, trainer, model = _recorded_training("paca", R, True, smoke)
    dev = next(model.parameters()).device
    model.train()
    ids = batch(5).to(dev)
    ok = True
    for name, ctx in (("disable_paca", disable_paca), ("functional_paca", functional_paca)):
        try:
            with ctx(model):
                model(input_ids=ids, labels=ids)
            ok &= _line(f"graphs_refuse_{name}", False, "no error")
        except RuntimeError as err:
            ok &= _line(f"graphs_refuse_{name}", "HPU graphs" in str(err), str(err)[:80])
    base = tiny_model("none").to(dev).eval()
    with torch.no_grad(), disable_paca(model):
        disabled = model(input_ids=ids).logits
        want = base(input_ids=ids).logits
    ok &= _line("graphs_disabled_no_grad_is_base", _rel(disabled, want) < 1e-6, f"rel {_rel(disabled, want):.2e}")
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.delta.add_(0.25)
    replayed = model(input_ids=ids, labels=ids).logits.detach()
    model.eval()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    return ok & _line("graphs_stale_delta_written_back", _rel(replayed, eager) < 1e-4, f"rel {_rel(replayed, eager):.2e}")


def cmd_graphs(args) -> bool:
    dev = _device_name(args.smoke)
    if not args.smoke and _device.device_type() != "hpu":
        raise SystemExit("no HPU: run inside an Intel Gaudi software image (or pass --smoke on a CPU)")
    from paca_hpu.trainer import adjust_for_device

    ok = check_raw_graph_gradients(dev)
    ok &= check_trainer_gradient_accumulation(args.smoke)
    ok &= check_paca_features_under_graphs(args.smoke)
    hpu = _device.DeviceInfo("hpu", torch.device("hpu"), lazy_mode=True)
    try:
        adjust_for_device({"use_hpu_graphs_for_training": True, "gradient_checkpointing": True}, hpu)
        ok &= _line("graphs_with_gradient_checkpointing_refused", False, "accepted")
    except ValueError as err:
        ok &= _line("graphs_with_gradient_checkpointing_refused", True, str(err)[:60])
    return ok


# ---------------------------------------------------------------------------------------------- DeepSpeed bf16


def _bf16_cast(model):
    """DeepSpeed's bf16 mode (0.19.8 ``_cast_module_mixed_precision``): parameters to bf16, buffers kept; then the
    module is moved, where PaCA puts ``delta`` back to float32."""
    for p in model.parameters():
        if p.dtype.is_floating_point:
            p.data = p.data.to(torch.bfloat16)
    return model


def _probe(model, run, dev):
    from paca_hpu import disable_paca

    with torch.no_grad():
        logits = run(batch(999).to(dev)).logits.float().cpu()
        with disable_paca(model):
            base = run(batch(999).to(dev)).logits.float().cpu()
    return logits, base


def _result(model, losses, logits, base):
    from paca_hpu import paca_layers

    return {"losses": losses, "logits": logits, "base_logits": base,
            "deltas": {n: m.delta.detach().float().cpu() for n, m in paca_layers(model)},
            "dtypes": sorted({(str(m.weight.dtype), str(m.delta.dtype)) for _, m in paca_layers(model)})}


def cmd_reference(args) -> bool:
    """One card: the global batch of 2 ranks, each step's gradient averaged over the ranks' micro-batches."""
    from paca_hpu import paca_layers, paca_parameters

    dev = _device_name(args.smoke)
    for kind in ("dense", "partitioned"):
        model = _bf16_cast(tiny_model()).to(dev)
        fixed = {f"{n}.weight": m.weight.detach().clone() for n, m in paca_layers(model)} if kind != "dense" else {}

        def run(ids, labels=None):
            return torch.func.functional_call(model, fixed, args=(), kwargs={"input_ids": ids, "labels": labels})

        opt = torch.optim.AdamW(paca_parameters(model), lr=LR)
        losses = []
        for step in range(STEPS):
            total = 0.0
            for rank in range(2):
                ids = batch(100 + step, 2 * MICRO)[rank * MICRO:(rank + 1) * MICRO].to(dev)
                loss = run(ids, ids).loss
                (loss / 2).backward()
                total += float(loss.detach()) / 2
            torch.nn.utils.clip_grad_norm_(paca_parameters(model), CLIP)
            opt.step()
            opt.zero_grad()
            _device.mark_step()
            losses.append(total)
        torch.save(_result(model, losses, *_probe(model, run, dev)), os.path.join(args.out, f"reference_{kind}.pt"))
    return True


def cmd_zero(args) -> bool:
    """A hand-written ``deepspeed.initialize`` loop on 2 ranks in bf16 with the shipped config's communication dtype."""
    import deepspeed

    from paca_hpu import paca_parameters

    if args.smoke:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if args.smoke else "hccl")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "ds_zero2_gaudi.json" if args.stage == 2 else "ds_zero3.json")
    with open(shipped) as fh:
        comm = json.load(fh).get("communication_data_type")
    cfg = {"train_batch_size": world * MICRO, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "gradient_clipping": CLIP, "steps_per_print": 10 ** 6, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}},
           "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0}}
    if comm:
        cfg["communication_data_type"] = comm
    model = tiny_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=paca_parameters(model), config=cfg)
    losses = []
    for step in range(STEPS):
        ids = batch(100 + step, 2 * MICRO)[rank * MICRO:(rank + 1) * MICRO].to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world)
    engine.eval()
    logits, base = _probe(model, lambda ids: engine(input_ids=ids), engine.device)
    from paca_hpu.adapter import adapter_state_dict

    state = adapter_state_dict(engine)  # gathers partitioned deltas on every rank
    result = _result(model, losses, logits, base)
    result["deltas"] = {k[:-len(".delta")]: v.float() for k, v in state.items() if k.endswith(".delta")}
    if rank == 0:
        torch.save(result, os.path.join(args.out, f"zero{args.stage}.pt"))
    return True


def cmd_compare(args) -> bool:
    ok = True
    for stage, kind in ((2, "dense"), (3, "partitioned")):
        path = os.path.join(args.out, f"zero{stage}.pt")
        if not os.path.exists(path):
            ok &= _line(f"zero{stage}_bf16", False, f"{path} missing (the zero run failed?)")
            continue
        got, ref = (torch.load(p, weights_only=False) for p in (path, os.path.join(args.out, f"reference_{kind}.pt")))
        losses, deltas, logits = (_rel(got["losses"], ref["losses"]),
                                  max(_rel(got["deltas"][n], d) for n, d in ref["deltas"].items()),
                                  _rel(got["logits"], ref["logits"]))
        tol = TOLERANCES[stage]
        detail = f"rel losses {losses:.1e} deltas {deltas:.1e} logits {logits:.1e} (tolerances {tol}); {got['dtypes']}"
        ok &= _line(f"zero{stage}_bf16_matches_one_card",
                    losses < tol[0] and deltas < tol[1] and logits < tol[2], detail)
        base = _rel(got["base_logits"], ref["base_logits"])
        ok &= _line(f"zero{stage}_bf16_disabled_is_base", base < 1e-6, f"rel {base:.1e}")
        ok &= _line(f"zero{stage}_bf16_dtypes", got["dtypes"] == [("torch.bfloat16", "torch.float32")], "")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gaudi_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["graphs", "reference", "zero", "compare"])
    parser.add_argument("--out", default=os.path.join("outputs", "gaudi_check"))
    parser.add_argument("--stage", type=int, choices=[2, 3], default=2)
    parser.add_argument("--smoke", action="store_true", help="run on the CPU (a check of this script)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ok = {"graphs": cmd_graphs, "reference": cmd_reference, "zero": cmd_zero, "compare": cmd_compare}[args.command](
        args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
