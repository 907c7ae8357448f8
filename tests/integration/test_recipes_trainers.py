"""Issue 9, trainer level: PaCA in the training recipes people run with LoRA, through the real libraries (TRL
SFTTrainer / DPOTrainer, transformers.Trainer with schedule-free and LOMO optimizers, optimum-habana's GaudiTrainer
in CPU mode, the run_paca_clm command line), each checked against an independent reference: a dense float64 model
with the deltas merged by hand, the base model itself, or a second run without the feature.
"""
from helpers import REPO_DIR  # the repository root / tests folder
import copy
import json
import math
import os
import re
import types
from pathlib import Path

import pytest
import torch

from test_recipes import _kl, _named, _random_deltas, dense_reference
from helpers import make_tiny_checkpoint, qa_records, write_jsonl

from paca_hpu import PaCAReferenceModel, disable_paca, load_adapter, paca_layers, save_adapter

README = Path(REPO_DIR) / "README.md"
R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LlamaForCausalLM (hidden 32, 2 layers, float32) and its small BPE tokenizer, saved once."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("recipes_model"))


def _tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def _base(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny).eval()


def _paca_model(tiny, **kw):
    """(base, model): the checkpoint, and the same checkpoint with PaCA applied (all-linear, r=4, alpha=8)."""
    from paca_hpu.trainer import prepare_model

    return _base(tiny), prepare_model(_base(tiny), "paca", r=R, alpha=ALPHA, **kw)


def _lm_rows(n, seq=12, seed=0, vocab=100):
    """Fixed-length token rows (no padding), so a Trainer's eval loss over one batch is the model's mean loss."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})


def _loss(model, rows):
    batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        return float(model(**batch).loss)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


IDS = torch.tensor([[1, 5, 9, 40, 77, 90, 3, 18], [7, 8, 30, 60, 90, 11, 14, 20]])
F32 = dict(rtol=2e-5, atol=2e-5)  # float32 model against the float64 dense reference


def _hf_args(out, **kw):
    from transformers import TrainingArguments

    values = dict(output_dir=str(out), use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                  per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=3, seed=5,
                  disable_tqdm=True, dataloader_num_workers=0)
    values.update(kw)
    return TrainingArguments(**values)


def _gaudi_args(out, **kw):
    from paca_hpu.trainer import build_training_arguments

    values = dict(output_dir=str(out), report_to="none", save_strategy="no", logging_steps=1,
                  per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=3, seed=5,
                  disable_tqdm=True)
    values.update(kw)
    return build_training_arguments(**values)


def _train_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ------------------------------------------------------------------------------------------------ README: use with TRL


def _readme_trl_blocks():
    """The python blocks of README.md's "Use with TRL" section: (SFT block, DPO block)."""
    text = README.read_text()
    section = re.search(r"^## Use with TRL\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Use with TRL' section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), flags=re.S)
    assert len(blocks) == 2, f"expected an SFT and a DPO block in 'Use with TRL', found {len(blocks)}"
    return blocks


def _sft_rows():
    from datasets import Dataset

    return Dataset.from_dict({"text": [r["question"] + " " + r["answer"] for r in qa_records(8)]})


def _preference_rows():
    from datasets import Dataset

    rows = qa_records(4, offset=20)
    return Dataset.from_dict({
        "prompt": [r["question"] for r in rows],
        "chosen": [" " + r["answer"] for r in rows],
        "rejected": [" " + r["answer"].replace("plus", "minus")[::-1] for r in rows],
    })


def _dpo_reference_logps(trainer, reference):
    """Mean chosen / rejected log-probs of ``reference`` on the one training batch (all preference rows). TRL 0.22:
    by TRL's own ``concatenated_forward`` on the given (dense) model. TRL 1.x (rows ``[chosen..., rejected...]``,
    ``completion_mask`` marking the completion tokens): summed by hand from the model's logits."""
    batch = next(iter(trainer.get_train_dataloader()))
    if "prompt_input_ids" in batch:  # TRL 0.22
        assert batch["prompt_input_ids"].shape[0] == len(trainer.train_dataset)  # one batch holds every row
        with torch.no_grad():
            out = trainer.concatenated_forward(reference, batch)
        return float(out["chosen_logps"].mean()), float(out["rejected_logps"].mean())
    ids, completion = batch["input_ids"], batch["completion_mask"]
    assert ids.shape[0] == 2 * len(trainer.train_dataset)  # one batch holds every row, chosen then rejected
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    chosen, rejected = (token_logps * completion[:, 1:]).sum(dim=1).chunk(2)
    return float(chosen.mean()), float(rejected.mean())


def _check_dpo_run(trainer, model, reference, start_deltas):
    """The reference log-probs DPO reports at every step (``logps - rewards / beta``) equal ``reference``'s, the
    policy starts at the reference (rewards 0 at step 1) and moves away, the deltas changed, and the model computes
    the dense reference built from its deltas."""
    want_c, want_r = _dpo_reference_logps(trainer, reference)
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    beta = trainer.args.beta
    assert len(logs) == trainer.args.max_steps
    for h in logs:
        assert math.isfinite(h["loss"])
        assert h["logps/chosen"] - h["rewards/chosen"] / beta == pytest.approx(want_c, rel=1e-5, abs=2e-4), h
        assert h["logps/rejected"] - h["rewards/rejected"] / beta == pytest.approx(want_r, rel=1e-5, abs=2e-4), h
    assert abs(logs[0]["rewards/chosen"]) < 1e-5 and abs(logs[0]["rewards/rejected"]) < 1e-5
    assert abs(logs[-1]["rewards/margins"]) > 1e-4  # the policy moved away from the reference
    for name, layer in paca_layers(model):
        assert not torch.equal(layer.delta.detach(), start_deltas[name]), name


def _assert_no_weight_copy(trainer, model):
    """The trainer's reference is the wrapper over ``model`` and no model accelerate prepared holds weights other
    than ``model``'s (TRL builds no copy)."""
    assert isinstance(trainer.ref_model, PaCAReferenceModel) and trainer.ref_model.policy is model
    assert not list(trainer.ref_model.parameters()) and not list(trainer.ref_model.buffers())
    own = {p.data_ptr() for p in model.parameters()}
    for prepared in trainer.accelerator._models:
        assert all(p.data_ptr() in own for p in prepared.parameters()), type(prepared).__name__


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["no_ckpt", "reentrant_ckpt"])
def test_readme_trl_sft_then_dpo_with_disabled_adapter_reference(tiny, tmp_path, monkeypatch, gradient_checkpointing,
                                                     reset_accelerate):
    """Issue 9 item 1 through TRL (0.22 and 1.x): the README's SFT block, then its DPO block (``ref_model=
    PaCAReferenceModel(model)``, the PaCA model with its adapter disabled as reference, no copy of the weights). SFT trains every delta (reentrant checkpointing with a frozen
    embedding) and the model equals the dense reference; DPO trains without error, reports the SFT model's
    log-probs as reference at every step, and its result equals the dense reference too."""
    monkeypatch.chdir(tmp_path)
    sft_block, dpo_block = _readme_trl_blocks()
    run_args = dict(max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2, report_to="none", use_cpu=True,
                    bf16=False, logging_steps=1, save_strategy="no", seed=3, disable_tqdm=True,
                    gradient_checkpointing=gradient_checkpointing)
    ns = {"model_path": tiny, "tokenizer": _tokenizer(tiny), "sft_data": _sft_rows(), "pairs": _preference_rows(),
          "run_args": run_args}
    exec(compile(sft_block, "README.md:Use with TRL (SFT)", "exec"), ns)
    model = ns["model"]
    assert len(_train_losses(ns["sft"])) == 3
    assert all(torch.count_nonzero(layer.delta) for _, layer in paca_layers(model)), "a delta did not train"
    sft_dense = dense_reference(_base(tiny), model)  # the SFT result, merged by hand in float64
    torch.testing.assert_close(_logits(model, IDS), _logits(sft_dense, IDS), **F32)

    run_args["per_device_train_batch_size"] = len(ns["pairs"])
    exec(compile(dpo_block, "README.md:Use with TRL (DPO)", "exec"), ns)
    dpo, model = ns["dpo"], ns["model"]
    _assert_no_weight_copy(dpo, model)
    _check_dpo_run(dpo, model, sft_dense, {n: torch.zeros_like(l.delta) for n, l in paca_layers(model)})
    torch.testing.assert_close(_logits(model, IDS), _logits(dense_reference(sft_dense, model), IDS), **F32)


def test_plain_trl_dpo_trainer_ref_model_none(tiny, tmp_path, reset_accelerate):
    """``DPOTrainer(model=paca_model, ref_model=None)`` without the README subclass: TRL keeps a frozen deep copy
    as reference (a PaCA model is no PeftModel); the reported reference log-probs are the base model's."""
    import trl
    base, model = _paca_model(tiny)
    pairs = _preference_rows()
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=len(pairs),
                         learning_rate=1e-2, report_to="none", use_cpu=True, bf16=False, logging_steps=1,
                         save_strategy="no", seed=3, disable_tqdm=True, gradient_checkpointing=False)
    dpo = trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=pairs, processing_class=_tokenizer(tiny))
    dpo.train()
    _check_dpo_run(dpo, model, base.double(), {n: torch.zeros_like(l.delta) for n, l in paca_layers(model)})
    torch.testing.assert_close(_logits(model, IDS), _logits(dense_reference(_base(tiny), model), IDS), **F32)


def _perturbed_base(tiny, seed):
    """The tiny checkpoint with every weight moved by noise: another base model of the same shape."""
    base = _base(tiny)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return base


def test_dpo_reference_wrapper_with_precomputed_reference_logps(tiny, tmp_path, reset_accelerate):
    """``precompute_ref_log_probs=True`` with ``ref_model=PaCAReferenceModel(model)``, on the same preference rows,
    for two PaCA models over DIFFERENT bases: each run's reference log-probs are its own base model's, and TRL 1.x's
    cache key for them (dataset fingerprint + hash of the reference's state dict) differs in its model part."""
    import trl

    from paca_hpu.trainer import prepare_model

    from datasets import load_dataset

    # a dataset read from a file (not from_dict): its fingerprint, and so TRL's cache file name, is the same in
    # both runs unless the reference's hash differs
    write_jsonl(tmp_path / "pairs.jsonl", _preference_rows().to_list())
    pairs = load_dataset("json", data_files=str(tmp_path / "pairs.jsonl"), split="train",
                         cache_dir=str(tmp_path / "hf_cache"))
    hashes = set()
    for seed in (11, 12):
        base = _perturbed_base(tiny, seed)
        model = prepare_model(copy.deepcopy(base), "paca", r=R, alpha=ALPHA)
        args = trl.DPOConfig(output_dir=str(tmp_path / str(seed)), max_steps=2, per_device_train_batch_size=len(pairs),
                             learning_rate=1e-2, report_to="none", use_cpu=True, bf16=False, logging_steps=1,
                             save_strategy="no", seed=3, disable_tqdm=True, gradient_checkpointing=False,
                             precompute_ref_log_probs=True)
        dpo = trl.DPOTrainer(model=model, ref_model=PaCAReferenceModel(model), args=args, train_dataset=pairs,
                             processing_class=_tokenizer(tiny))
        hashes.add(getattr(dpo, "_precompute_model_hash", seed))  # TRL 1.x: the reference's part of the cache key
        dpo.train()
        _check_dpo_run(dpo, model, base.double(), {n: torch.zeros_like(l.delta) for n, l in paca_layers(model)})
    assert len(hashes) == 2, "both references hashed alike: TRL 1.x could hand one the other's cached log-probs"


# ----------------------------------------------------------------------------------------- 1. GaudiTrainer, KL to base


def _kl_trainer(kind, model, args, rows, reference=None):
    """A trainer of ``kind`` ("gaudi" / "hf", from ``make_trainer``) whose loss adds a KL-to-base penalty; the base
    logits come from ``reference`` or, when None, from the PaCA model itself inside ``disable_paca`` between the
    policy forward and the Trainer's backward."""
    from paca_hpu.trainer import _unwrap, make_trainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        with torch.no_grad():
            ref_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            if reference is None:
                with disable_paca(_unwrap(model)):
                    ref = model(**ref_inputs).logits
            else:
                ref = reference(**ref_inputs).logits
        loss = out.loss + 0.5 * _kl(out.logits, ref)
        return (loss, out) if return_outputs else loss

    trainer = make_trainer(model, args, train_dataset=rows)
    assert type(trainer).__name__ == {"gaudi": "PaCAGaudiTrainer", "hf": "PaCATrainer"}[kind]
    trainer.compute_loss = types.MethodType(compute_loss, trainer)
    return trainer


@pytest.mark.optimum_habana
def test_gaudi_trainer_kl_penalty_reference_forward(tiny, tmp_path, reset_accelerate):
    """Issue 9 item 1 on the GaudiTrainer path (CPU mode): a KL-to-base penalty whose base logits come from the
    PaCA model inside ``disable_paca`` trains exactly like the same penalty against a separate frozen base model."""
    rows = _lm_rows(12, seed=1)
    base, model = _paca_model(tiny)
    trainer = _kl_trainer("gaudi", model, _gaudi_args(tmp_path / "a", learning_rate=2e-2), rows)
    trainer.train()  # main: autograd's in-place version error in the policy backward
    _, twin = _paca_model(tiny)
    twin_trainer = _kl_trainer("gaudi", twin, _gaudi_args(tmp_path / "b", learning_rate=2e-2), rows,
                               reference=_base(tiny))
    twin_trainer.train()
    assert _train_losses(trainer) == pytest.approx(_train_losses(twin_trainer), rel=1e-6)
    for (name, layer), (_, other) in zip(paca_layers(model), paca_layers(twin)):
        assert torch.count_nonzero(layer.delta) > 0, name
        torch.testing.assert_close(layer.delta, other.delta, rtol=1e-5, atol=1e-7, msg=_named(name))
    torch.testing.assert_close(_logits(model, IDS), _logits(dense_reference(base, model), IDS), **F32)


# ------------------------------------------------------------------------------------- 2. delta changed outside step()


@pytest.mark.parametrize("kind", ["gaudi", "hf"])
def test_in_place_delta_write_then_trainer_evaluate(tiny, tmp_path, kind, reset_accelerate):
    """Issue 9 item 2 through a trainer (GaudiTrainer in CPU mode, transformers.Trainer): after training, deltas
    written in place (``delta.data.copy_``) are what ``evaluate()`` measures: the dense reference's loss."""
    from paca_hpu.trainer import make_trainer

    base, model = _paca_model(tiny)
    rows, held_out = _lm_rows(12, seed=2), _lm_rows(8, seed=3)
    args = (_gaudi_args if kind == "gaudi" else _hf_args)(tmp_path, learning_rate=2e-2, max_steps=2)
    trainer = make_trainer(model, args, train_dataset=rows, eval_dataset=held_out)
    trainer.train()
    trained_loss = _loss(dense_reference(base, model), held_out)
    for name, d in _random_deltas(model, seed=60, scale=0.5).items():
        model.get_submodule(name).delta.data.copy_(d)
    want = _loss(dense_reference(base, model), held_out)
    assert abs(want - trained_loss) > 1e-3
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["transformers", "gaudi"])
def test_schedule_free_adamw_eval_loss_is_of_the_evaluated_weights(tiny, tmp_path, kind, reset_accelerate):
    """Issue 9 item 2: ``optim="schedule_free_adamw"`` (transformers.Trainer; GaudiTrainer through paca_hpu's
    trainer, which adds the optimizer mode switches optimum-habana 1.21 lacks): ``evaluate()`` puts the optimizer in
    eval mode (it moves the deltas to the averaged point); the eval loss it reports is the loss of a dense model
    built from base weights + those deltas."""
    from transformers import Trainer

    from paca_hpu.trainer import make_trainer

    base, model = _paca_model(tiny)
    rows, held_out = _lm_rows(12, seed=4), _lm_rows(8, seed=5)
    settings = dict(optim="schedule_free_adamw", learning_rate=5e-2, lr_scheduler_type="constant", max_steps=4)
    if kind == "transformers":
        trainer = Trainer(model=model, args=_hf_args(tmp_path, **settings), train_dataset=rows, eval_dataset=held_out)
    else:
        trainer = make_trainer(model, _gaudi_args(tmp_path, **settings), train_dataset=rows, eval_dataset=held_out)
    trainer.train()
    trainer.optimizer.train()
    train_point = _loss(dense_reference(base, model), held_out)
    metrics = trainer.evaluate()
    assert not trainer.optimizer.optimizer.param_groups[0]["train_mode"]
    want = _loss(dense_reference(base, model), held_out)
    assert abs(want - train_point) > 1e-4  # the eval point really differs from the training point
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["transformers", "gaudi"])
def test_lomo_model_and_saved_adapter_match_deltas(tiny, tmp_path, kind, reset_accelerate):
    """Issue 9 item 2: ``optim="lomo"`` updates the deltas inside backward and never steps; after training the
    model computes the dense reference built from its deltas, and the saved adapter reloaded onto a fresh base
    gives the model's logits."""
    from transformers import Trainer

    from paca_hpu.trainer import make_trainer

    base, model = _paca_model(tiny)
    rows = _lm_rows(12, seed=6)
    if kind == "transformers":
        trainer = Trainer(model=model, args=_hf_args(tmp_path, optim="lomo", learning_rate=5e-2), train_dataset=rows)
    else:
        trainer = make_trainer(model, _gaudi_args(tmp_path, optim="lomo", learning_rate=5e-2), train_dataset=rows)
    trainer.train()
    assert all(torch.count_nonzero(layer.delta) for _, layer in paca_layers(model)), "LOMO did not train"
    got = _logits(model, IDS)
    torch.testing.assert_close(got, _logits(dense_reference(base, model), IDS), **F32)
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(_base(tiny), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, IDS), got, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------- 7. bf16_full_eval


@pytest.mark.parametrize("kind", ["gaudi", "hf"])
def test_bf16_full_eval_before_training_keeps_delta_float32(tiny, tmp_path, kind, reset_accelerate):
    """Issue 9 item 7: evaluating with ``bf16_full_eval=True`` before training (as run_paca_clm does) casts the
    model to bf16; the deltas stay float32, the eval loss is the model's (bf16 tolerance), training then gives
    finite losses and float32 deltas that moved."""
    from paca_hpu.trainer import make_trainer

    base, model = _paca_model(tiny)
    rows, held_out = _lm_rows(12, seed=7), _lm_rows(8, seed=8)
    args = (_gaudi_args if kind == "gaudi" else _hf_args)(tmp_path, bf16_full_eval=True, learning_rate=2e-2,
                                                          max_steps=2)
    trainer = make_trainer(model, args, train_dataset=rows, eval_dataset=held_out)
    before = trainer.evaluate()["eval_loss"]
    assert before == pytest.approx(_loss(base.double(), held_out), rel=2e-2)
    wrong = {n: layer.delta.dtype for n, layer in paca_layers(model) if layer.delta.dtype != torch.float32}
    assert not wrong, f"bf16_full_eval cast the deltas: {wrong}"
    trainer.train()
    losses = _train_losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    for name, layer in paca_layers(model):
        assert layer.delta.dtype == torch.float32 and torch.count_nonzero(layer.delta) > 0, name


# --------------------------------------------------------------------------------------------- 8. resume, target order


def _cli(tiny_data, out, *extra):
    from paca_hpu.cli import main

    argv = ["--model_name_or_path", tiny_data["model"], "--train_file", tiny_data["train"],
            "--validation_split_percentage", "25", "--max_seq_len", "48", "--per_device_train_batch_size", "4",
            "--learning_rate", "5e-3", "--seed", "11", "--output_dir", str(out), *extra]
    return main(argv)


def test_resume_with_target_modules_in_another_order(tiny, tmp_path, capsys):
    """Issue 9 item 8: resuming is allowed when ``--target_modules`` selects the same layers (other order, a regex
    with the same matches) and refused, naming the flag, when it selects others."""
    data = {"model": tiny, "train": write_jsonl(tmp_path / "train.jsonl", qa_records(16))}
    first = tmp_path / "first"
    assert _cli(data, first, "--max_steps", "2", "--save_steps", "2", "--target_modules", "q_proj", "v_proj") == 0
    ck = first / "checkpoint-2"
    saved = json.load(open(ck / "adapter_config.json"))
    assert saved["target_modules"] == ["q_proj", "v_proj"]
    capsys.readouterr()
    for i, spelling in enumerate([["v_proj", "q_proj"], [r"model\.layers\.\d+\.self_attn\.(v|q)_proj"]]):
        out = tmp_path / f"again{i}"
        rc = _cli(data, out, "--max_steps", "3", "--target_modules", *spelling, "--resume_from_checkpoint", str(ck))
        assert rc == 0, (spelling, capsys.readouterr().err[-2000:])
        state = json.load(open(out / "trainer_state.json"))
        assert state["global_step"] == 3
        from safetensors.torch import load_file

        names = sorted(k for k in load_file(str(out / "adapter_model.safetensors")) if k.endswith(".delta"))
        assert names == sorted(k for k in load_file(str(ck / "adapter_model.safetensors")) if k.endswith(".delta"))
    capsys.readouterr()
    rc = _cli(data, tmp_path / "other", "--max_steps", "3", "--target_modules", "q_proj", "k_proj",
              "--resume_from_checkpoint", str(ck))
    assert rc == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "--target_modules" in lines[0] and "k_proj" in lines[0], err[-2000:]
    assert "Traceback" not in err
