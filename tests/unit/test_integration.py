"""A PaCA model in plain transformers.Trainer / TRL SFTTrainer / accelerate: adapter-only checkpoints and final saves,
exact resume, load_best_model_at_end, one-call loading (paca_hpu.from_pretrained) and a clear error from
AutoModelForCausalLM.from_pretrained(adapter_dir). References: an uninterrupted run, a reloaded model, the base
model's own size."""

import copy
import json
import os
import pickle

import pytest
import torch
from helpers import logits, random_ids, tiny_llama
from helpers import make_tiny_checkpoint, qa_records

import paca_hpu
from paca_hpu import PaCAConfig, apply_paca, merge_paca, paca_layers

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"}
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
CONFIG = dict(r=4, paca_alpha=8, random_seed=3)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_base"))


def _model(base_dir, **cfg):
    from transformers import AutoModelForCausalLM

    return apply_paca(AutoModelForCausalLM.from_pretrained(base_dir), PaCAConfig(**{**CONFIG, **cfg}))


def _dataset(tok, n=24):
    from datasets import Dataset

    texts = [r["question"] + " " + r["answer"] for r in qa_records(n)]
    enc = tok(texts, padding="max_length", max_length=24, truncation=True)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": [list(x) for x in enc["input_ids"]], "text": texts})


def _trainer(kind, model, tok, out, **overrides):
    """A plain transformers.Trainer or TRL SFTTrainer: nothing from paca_hpu but the model."""
    common = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, logging_steps=1, save_steps=3,
                  report_to="none", learning_rate=1e-2, seed=5, use_cpu=True, lr_scheduler_type="linear")
    common.update(overrides)
    ds = _dataset(tok)
    if kind == "trainer":
        from transformers import Trainer, TrainingArguments, default_data_collator

        return Trainer(model=model, args=TrainingArguments(**common),
                       train_dataset=ds.remove_columns("text"), eval_dataset=ds.remove_columns("text").select(range(4)),
                       data_collator=default_data_collator, processing_class=tok)
    from trl import SFTConfig, SFTTrainer

    # bf16=False: TRL defaults to bf16 autocast, which accelerate leaves wrapped around model.forward after training
    cfg = SFTConfig(gradient_checkpointing=False, dataset_text_field="text", max_length=24, packing=False, bf16=False,
                    **common)
    text = ds.select_columns(["text"])
    return SFTTrainer(model=model, args=cfg, train_dataset=text, eval_dataset=text.select(range(4)),
                      processing_class=tok)


def _losses(trainer):
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def _deltas(model):
    return {n: l.delta.detach().clone() for n, l in paca_layers(model)}


def _full_model_bytes(base_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(base_dir, "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def _check_adapter_only(path, base_dir, n_params):
    files = {f for f in os.listdir(path) if not f.startswith("checkpoint-")}
    assert ADAPTER_FILES <= files, files
    extra = files - ADAPTER_FILES - TRAINER_FILES - TOKENIZER_FILES - {"README.md"}
    assert not extra, f"{path} holds more than the adapter: {sorted(extra)}"
    assert "config.json" not in files
    size = os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
    # deltas (float32) + indices (int64) + the safetensors header; the full model is ~40x that
    assert size < n_params * 4 + 4096 < _full_model_bytes(base_dir) / 10, (size, _full_model_bytes(base_dir))
    same = os.path.samefile(os.path.join(path, "model.safetensors"), os.path.join(path, "adapter_model.safetensors"))
    assert same or open(os.path.join(path, "model.safetensors"), "rb").read() == open(
        os.path.join(path, "adapter_model.safetensors"), "rb").read()


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_adapter_only_checkpoints_and_exact_resume(kind, base_dir, tmp_path, reset_accelerate):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model_a = _model(base_dir)
    n_params = sum(d.numel() for d in _deltas(model_a).values())
    trainer_a = _trainer(kind, model_a, tok, tmp_path / "a")
    trainer_a.train()
    for sub in ("a/checkpoint-3", "a/checkpoint-6"):
        _check_adapter_only(tmp_path / sub, base_dir, n_params)
    trainer_a.save_model()
    _check_adapter_only(tmp_path / "a", base_dir, n_params)

    # resume from step 3 in a new process-like setting: fresh base, plain apply_paca, plain trainer
    model_b = _model(base_dir)
    trainer_b = _trainer(kind, model_b, tok, tmp_path / "b")
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a/checkpoint-3"))
    losses_a, losses_b = dict(_losses(trainer_a)), dict(_losses(trainer_b))
    assert sorted(losses_b) == [1, 2, 3, 4, 5, 6]  # 1-3 from the checkpoint's trainer_state.json, 4-6 trained now
    assert losses_b == losses_a
    da, db = _deltas(model_a), _deltas(model_b)
    assert all(torch.equal(da[n], db[n]) for n in da)
    assert any(d.abs().sum() > 0 for d in da.values())

    # the final output directory loads in one call onto a fresh base and gives the trained model's logits
    ids = random_ids(2, 10, seed=3, vocab=len(tok))
    loaded = paca_hpu.from_pretrained(tmp_path / "a")
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert torch.equal(logits(loaded, ids), logits(model_a.eval(), ids))


@pytest.mark.parametrize("hf", [False, True], ids=["device_trainer", "transformers_args"])
def test_paca_trainer_checkpoint_is_what_save_pretrained_writes(base_dir, tmp_path, hf, reset_accelerate):
    """Issue 21 item 1: paca_hpu's trainer (``make_trainer``: GaudiTrainer on CPU where optimum-habana is installed,
    else transformers.Trainer) saves through ``model.save_pretrained``: its checkpoint holds the files a plain
    ``save_pretrained`` writes, tensor for tensor, besides the trainer's own. Resuming from it through that trainer,
    and loading its ``model.safetensors`` as transformers.Trainer resumes (``load_state_dict``), give models whose
    logits equal those of ``paca_hpu.from_pretrained(checkpoint)``, a fresh base with the adapter reloaded."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, TrainingArguments, default_data_collator

    from paca_hpu.trainer import build_training_arguments, make_trainer

    tok = AutoTokenizer.from_pretrained(base_dir)
    ds = _dataset(tok).remove_columns("text")

    def trainer(model, out):
        kw = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=2, save_steps=2, logging_steps=1,
                  report_to="none", learning_rate=1e-2, seed=5)
        args = TrainingArguments(use_cpu=True, **kw) if hf else build_training_arguments(**kw)
        return make_trainer(model, args, train_dataset=ds, data_collator=default_data_collator, processing_class=tok)

    model = _model(base_dir, modules_to_save=["lm_head"])
    trainer(model, tmp_path / "run").train()
    ckpt, plain = tmp_path / "run" / "checkpoint-2", tmp_path / "plain"
    model.save_pretrained(plain)
    assert set(os.listdir(plain)) == ADAPTER_FILES
    in_ckpt = set(os.listdir(ckpt))
    assert ADAPTER_FILES <= in_ckpt and not in_ckpt - ADAPTER_FILES - TRAINER_FILES - TOKENIZER_FILES - {
        "gaudi_config.json", "paca_run.json"}, sorted(in_ckpt)
    for name in ("adapter_model.safetensors", "model.safetensors"):
        got, want = load_file(str(ckpt / name)), load_file(str(plain / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
        assert any(k.startswith("modules_to_save.") for k in got)
    assert json.loads((ckpt / "adapter_config.json").read_text()) == json.loads((plain / "adapter_config.json").
                                                                                read_text())

    reference = paca_hpu.from_pretrained(ckpt)
    ids = random_ids(2, 10, seed=6, vocab=len(tok))
    want = logits(reference, ids)
    assert torch.equal(logits(model.eval(), ids), want)
    resumed = _model(base_dir, modules_to_save=["lm_head"], random_seed=11)  # other columns until it resumes
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(ckpt))  # at max_steps: loads only
    assert torch.equal(logits(resumed.eval(), ids), want)
    hooked = _model(base_dir, modules_to_save=["lm_head"], random_seed=12)
    # transformers.Trainer's resume of a model that is no PeftModel (its optimizer state has other groups than this
    # trainer's, so it cannot resume this checkpoint itself)
    result = hooked.load_state_dict(load_file(str(ckpt / "model.safetensors")), False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(logits(hooked.eval(), ids), want)


def test_load_best_model_at_end_restores_best_adapter(base_dir, tmp_path, reset_accelerate):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = _model(base_dir)
    # a learning rate this large makes later steps worse: the best checkpoint is not the last one
    trainer = _trainer("trainer", model, tok, tmp_path, max_steps=6, save_steps=2, eval_steps=2,
                       eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="eval_loss",
                       learning_rate=0.3)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    for name, layer in paca_layers(model):
        assert torch.equal(layer.delta.detach(), saved[f"{name}.delta"]), name
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert best.endswith(f"checkpoint-{min(evals, key=evals.get)}")
    reference = paca_hpu.from_pretrained(best)
    ids = random_ids(2, 10, seed=4, vocab=len(tok))
    assert torch.equal(logits(model.eval(), ids), logits(reference, ids))


def test_accelerate_unwrapped_save_pretrained_writes_the_adapter(base_dir, tmp_path, reset_accelerate):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _model(base_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    ids = random_ids(2, 10, seed=1, vocab=100)
    for _ in range(2):
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(tmp_path / "adapter")  # peft's documented accelerate idiom
    assert set(os.listdir(tmp_path / "adapter")) == ADAPTER_FILES
    _check_adapter_only(tmp_path / "adapter", base_dir, sum(d.numel() for d in _deltas(unwrapped).values()))
    loaded = paca_hpu.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids), logits(unwrapped.eval(), ids))


def test_automodel_from_pretrained_names_the_paca_call(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    _model(base_dir).save_pretrained(tmp_path)
    with pytest.raises(Exception) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "paca_hpu.from_pretrained" in str(err.value)
    peft = pytest.importorskip("peft")
    with pytest.raises(Exception) as err:
        peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    assert "paca_hpu.from_pretrained" in str(err.value)


def test_from_pretrained_base_model_argument_and_errors(base_dir, tmp_path):
    trained = tiny_llama(seed=0)
    apply_paca(trained, PaCAConfig(**CONFIG))
    with torch.no_grad():
        for _, layer in paca_layers(trained):
            layer.delta.normal_(0, 0.1)
            layer.sync()
    trained.save_pretrained(tmp_path)  # a model built in memory records no base model
    with pytest.raises(ValueError, match="base_model="):
        paca_hpu.from_pretrained(tmp_path)
    fresh = tiny_llama(seed=0)
    loaded = paca_hpu.from_pretrained(tmp_path, base_model=fresh, is_trainable=True)
    assert loaded is fresh and all(l.delta.requires_grad for _, l in paca_layers(loaded))
    ids = random_ids(2, 8, seed=2)
    assert torch.equal(logits(loaded, ids), logits(trained.eval(), ids))
    with pytest.raises(ValueError, match="not a paca_hpu adapter"):
        (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
        paca_hpu.from_pretrained(tmp_path, base_model=tiny_llama(seed=0))


def test_load_state_dict_accepts_an_adapter_state_dict(tmp_path):
    """Trainer-style resume: load_state_dict(adapter tensors, strict) re-selects the saved columns, reports no frozen
    tensor missing, keeps the optimizer's delta objects and refreshes the merged weights."""
    from safetensors.torch import load_file

    trained = apply_paca(tiny_llama(seed=0, tie=False), PaCAConfig(r=4, paca_alpha=6, random_seed=1,
                                                                   modules_to_save=["lm_head"]))
    with torch.no_grad():
        for _, layer in paca_layers(trained):
            layer.delta.normal_(0, 0.1)
            layer.sync()
        trained.lm_head.weight.add_(0.01)
    trained.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    other = apply_paca(tiny_llama(seed=0, tie=False), PaCAConfig(r=4, paca_alpha=6, random_seed=2,
                                                                 modules_to_save=["lm_head"]))
    delta_objects = [l.delta for _, l in paca_layers(other)]
    result = other.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert [l.delta for _, l in paca_layers(other)] == delta_objects
    ids = random_ids(2, 8, seed=5)
    assert torch.equal(logits(other.eval(), ids), logits(trained.eval(), ids))
    # a partial adapter is reported, not silently accepted
    partial = {k: v for k, v in state.items() if "layers.1." not in k}
    result = other.load_state_dict(partial, strict=False)
    assert result.missing_keys and all("layers.1." in k for k in result.missing_keys)
    assert all(k.endswith((".delta", ".indices")) for k in result.missing_keys)


def test_load_state_dict_of_an_adapter_checks_it_as_load_adapter_does(tmp_path):
    """Issue 21 item 1: ``load_state_dict`` of an adapter (transformers.Trainer's resume) reads it as
    ``load_adapter`` does: repeated columns or a non-finite delta are refused naming the layer, before the model is
    touched (torch alone would load both)."""
    from safetensors.torch import load_file

    apply_paca(tiny_llama(seed=0), PaCAConfig(**CONFIG)).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    layer = "model.layers.1.self_attn.v_proj"
    repeated = {**state, f"{layer}.indices": state[f"{layer}.indices"].clone()}
    repeated[f"{layer}.indices"][1] = repeated[f"{layer}.indices"][0]
    nan = {**state, f"{layer}.delta": state[f"{layer}.delta"].clone()}
    nan[f"{layer}.delta"][0, 0] = float("nan")
    model = apply_paca(tiny_llama(seed=0), PaCAConfig(**{**CONFIG, "random_seed": 4}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, message in ((repeated, "distinct columns"), (nan, "not finite")):
        with pytest.raises(ValueError, match=message) as err:
            model.load_state_dict(bad, strict=False)
        assert layer in str(err.value)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_save_pretrained_survives_copies_and_merge(tmp_path):
    model = apply_paca(tiny_llama(seed=0), PaCAConfig(**CONFIG))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            for _, layer in paca_layers(clone):
                layer.delta.fill_(0.5)
        clone.save_pretrained(tmp_path / "clone")
        loaded = paca_hpu.from_pretrained(tmp_path / "clone", base_model=tiny_llama(seed=0))
        assert all(torch.equal(l.delta, torch.full_like(l.delta, 0.5)) for _, l in paca_layers(loaded))
    assert all(l.delta.abs().sum() == 0 for _, l in paca_layers(model))  # copies saved their own deltas
    with pytest.raises(ValueError, match="config.json"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "config.json").write_text("{}")
        model.save_pretrained(tmp_path / "full")
    merged = merge_paca(model)
    merged.save_pretrained(tmp_path / "merged")  # a plain model again: the class's own save_pretrained
    assert "config.json" in os.listdir(tmp_path / "merged")
    assert "adapter_config.json" not in os.listdir(tmp_path / "merged")
