"""paca_hpu.trainer on the CPU GaudiTrainer path: adapter-only checkpoints, exact resume, merged export,
peft LoRA and full fine-tuning through the same code."""

import json
import os

import pytest
import torch
from helpers import StopAt, ZeroStyleOptimizer, base_weight_files, make_tiny_checkpoint, qa_records


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


# ----------------------------------------------------------------------------- helpers of this module


def _token_dataset(tok, n=32):
    from datasets import Dataset

    texts = [r["question"] + " " + r["answer"] for r in qa_records(n)]
    enc = tok(texts)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": [list(x) for x in enc["input_ids"]]})


def _collator(tok):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tok, padding=True)


def _run(tiny_ckpt, out, peft_type, stop=None, resume=None, max_steps=6, extra_callbacks=(), hf=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from paca_hpu.trainer import ThroughputCallback, build_training_arguments, make_trainer, prepare_model

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    model = prepare_model(model, peft_type, r=4, alpha=8, random_seed=3)
    kwargs = dict(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, logging_steps=1, save_steps=3,
        report_to="none", learning_rate=5e-3, seed=7, include_num_input_tokens_seen=True,
    )
    # hf=True: the plain transformers.Trainer path (what CUDA uses), exercised here on CPU
    args = TrainingArguments(use_cpu=True, **kwargs) if hf else build_training_arguments(**kwargs)
    ds = _token_dataset(tok)
    callbacks = [StopAt(stop)] if stop else []
    trainer = make_trainer(model, args, train_dataset=ds, data_collator=_collator(tok), processing_class=tok,
                           callbacks=callbacks + list(extra_callbacks))
    tp = ThroughputCallback(trainer)
    trainer.add_callback(tp)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, tp


def _losses(trainer):
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


# ----------------------------------------------------------------------------- tests


@pytest.mark.optimum_habana
def test_trainer_kind_for_cpu():
    from paca_hpu.trainer import arguments_class, build_training_arguments

    args = build_training_arguments(output_dir="unused", use_habana=True, use_lazy_mode=True)
    assert type(args).__name__ == "GaudiTrainingArguments" and arguments_class("cpu") is type(args)
    assert args.use_cpu and not args.use_habana and not args.use_lazy_mode
    assert args.device.type == "cpu"


def test_prepare_model_paca_lora_none(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    from paca_hpu import PaCALinear
    from paca_hpu import trainable_parameters as count_parameters
    from paca_hpu.trainer import is_paca_model, prepare_model

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_ckpt)

    base_total = count_parameters(fresh())[1]
    # llama: q,k,v,o (32->32 / 32->16 for k,v), gate/up (32->64), down (64->32); PaCA trains (out, r) per layer
    paca = prepare_model(fresh(), "paca", r=4, alpha=8)
    assert is_paca_model(paca)
    outs = [m.out_features for m in paca.modules() if isinstance(m, PaCALinear)]
    assert len(outs) == 14
    assert count_parameters(paca) == (4 * sum(outs), base_total + 4 * sum(outs))
    assert not paca.lm_head.weight.requires_grad and not paca.model.embed_tokens.weight.requires_grad

    lora = prepare_model(fresh(), "lora", r=4, alpha=8)
    assert not is_paca_model(lora)
    trainable, total = count_parameters(lora)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in fresh().modules()
                            if isinstance(m, torch.nn.Linear) and m.out_features != fresh().config.vocab_size)
    assert lora.peft_config["default"].lora_dropout == 0.0

    full = prepare_model(fresh(), "none")
    assert count_parameters(full) == (base_total, base_total)

    for peft_type in ("paca", "lora"):
        with pytest.raises(ValueError):
            prepare_model(fresh(), peft_type, target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match="peft_type"):
        prepare_model(fresh(), "ia3")


@pytest.mark.parametrize("peft_type", ["paca", "lora", "none"])
def test_resume_is_exact(tiny_ckpt, tmp_path, peft_type):
    """A run interrupted at step 3 and resumed gives the uninterrupted run's losses and final weights, bit for bit."""
    full, full_model, tp = _run(tiny_ckpt, tmp_path / "full", peft_type)
    cut, _, _ = _run(tiny_ckpt, tmp_path / "cut", peft_type, stop=3)
    assert [s for s, _ in _losses(cut)] == [1, 2, 3]
    ckpt = tmp_path / "cut" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    if peft_type == "paca":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        assert not base_weight_files(ckpt), files  # adapter only: no base weights in the checkpoint
        assert os.path.getsize(ckpt / "adapter_model.safetensors") < 64 * 1024
        from paca_hpu.adapter import PEFT_TYPE

        assert json.load(open(ckpt / "adapter_config.json"))["peft_type"] == PEFT_TYPE
    if peft_type == "none":
        gen = json.load(open(ckpt / "generation_config.json"))
        assert "use_flash_attention" not in gen  # the Gaudi-only fields never reach a saved file

    resumed, resumed_model, _ = _run(tiny_ckpt, tmp_path / "cut", peft_type, resume=str(ckpt))
    assert _losses(resumed) == _losses(full), (_losses(resumed), _losses(full))
    ref = full_model.state_dict()
    got = resumed_model.state_dict()
    assert ref.keys() == got.keys()
    diff = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not diff, diff[:5]
    if peft_type == "paca":
        idx = {k: v for k, v in got.items() if k.endswith(".indices")}
        assert len(idx) == 14 and all(torch.equal(v, ref[k]) for k, v in idx.items())
    if type(full).__name__ == "PaCAGaudiTrainer":  # CPU path of GaudiTrainer.log(): our memory numbers instead of
        logs = [h for h in full.state.log_history if "loss" in h]  # the HPU-only ones
        assert all("peak_rss (GB)" in h for h in logs) and not any("max_memory_allocated (GB)" in h for h in logs)
    assert not hasattr(full_model.generation_config, "use_flash_attention")
    assert tp.steps == 6 and tp.tokens > 0 and tp.tokens_per_second > 0


def test_plain_transformers_trainer_path(tiny_ckpt, tmp_path):
    """The CUDA trainer (PaCATrainer = mixin + transformers.Trainer): adapter-only checkpoints, exact resume."""
    full, full_model, _ = _run(tiny_ckpt, tmp_path / "full", "paca", hf=True)
    assert type(full).__name__ == "PaCATrainer"
    _run(tiny_ckpt, tmp_path / "cut", "paca", stop=3, hf=True)
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert "adapter_model.safetensors" in os.listdir(ckpt) and not base_weight_files(ckpt)
    resumed, resumed_model, _ = _run(tiny_ckpt, tmp_path / "cut", "paca", resume=str(ckpt), hf=True)
    assert _losses(resumed) == _losses(full)
    ref, got = full_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_paca_final_save_and_merged_export(tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    from paca_hpu import load_adapter
    from paca_hpu.trainer import save_merged_model

    trainer, model, _ = _run(tiny_ckpt, tmp_path / "run", "paca", max_steps=3)
    trainer.save_model()
    out = tmp_path / "run"
    assert not base_weight_files(out)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 40, 77, 120, 3]])
    with torch.no_grad():
        want = model(ids).logits
    # reload: base + adapter
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_ckpt), out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, want)
    # merged export leaves the PaCA model alone and loads as a plain model
    save_merged_model(model, str(tmp_path / "merged"))
    assert hasattr(model, "paca_config")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("PaCA" in type(m).__name__ for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-6)


def test_lora_merged_export(tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    from paca_hpu.trainer import save_merged_model

    _, model, _ = _run(tiny_ckpt, tmp_path / "run", "lora", max_steps=2)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 40, 77]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_merged_model(model, str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_resolve_checkpoint(tmp_path):
    from paca_hpu.trainer import resolve_checkpoint

    assert resolve_checkpoint(None, str(tmp_path)) is None
    assert resolve_checkpoint("False", str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="drop --resume_from_checkpoint to start a new run"):  # nothing there
        resolve_checkpoint(True, str(tmp_path))
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # an interrupted save: no trainer_state.json, skipped
    assert resolve_checkpoint("true", str(tmp_path)).endswith("checkpoint-10")
    with pytest.raises(FileNotFoundError, match="not a Trainer checkpoint"):  # an explicit path must be one
        resolve_checkpoint(str(tmp_path / "checkpoint-2"), "x")
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert resolve_checkpoint(str(tmp_path / "checkpoint-2"), "x").endswith("checkpoint-2")
    with pytest.raises(FileNotFoundError, match="drop --resume_from_checkpoint"):
        resolve_checkpoint(str(tmp_path / "nope"), "x")




@pytest.mark.parametrize("master_copy", [False, True], ids=["torch_optimizer", "master_copy_optimizer"])
def test_write_back_after_every_optimizer_kind(tiny_ckpt, tmp_path, master_copy):
    """Merged columns == base + scaling * delta after training, also when PaCA's step hook cannot see the
    optimizer (DeepSpeed ZeRO style); with a torch optimizer the trainer adds no second write-back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_constant_schedule

    from paca_hpu import PaCALinear
    from paca_hpu.trainer import build_training_arguments, make_trainer, prepare_model

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_ckpt), "paca", r=4, alpha=8)
    layers = [m for m in model.modules() if isinstance(m, PaCALinear)]
    base = [m.weight.detach().index_select(1, m.indices.long()).clone() for m in layers]
    args = build_training_arguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                    report_to="none", save_strategy="no", max_grad_norm=0.0, learning_rate=0.1)
    kwargs = {}
    if master_copy:
        opt = ZeroStyleOptimizer(model.parameters(), lr=0.1, inner=torch.optim.SGD)
        kwargs["optimizers"] = (opt, get_constant_schedule(opt.optimizer))
    trainer = make_trainer(model, args, train_dataset=_token_dataset(tok, 8), data_collator=_collator(tok), **kwargs)
    trainer.train()
    guard = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "_WriteBackGuard")
    assert guard._needed is master_copy
    for layer, b in zip(layers, base):
        assert torch.count_nonzero(layer.delta) > 0
        want = (b.float() + layer.scaling * layer.delta.detach()).to(layer.weight.dtype)
        assert torch.equal(layer.weight.detach().index_select(1, layer.indices.long()), want)
