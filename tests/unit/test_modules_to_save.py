"""Issue 23 item 1: ``modules_to_save`` train a copy, as peft's ``ModulesToSaveWrapper`` does, so the model with its
adapter disabled (``disable_paca``, ``PaCAReferenceModel``) and ``unload_paca`` are the base model bit for bit, while
``merge_paca``, the adapter files and the Trainer's state-dict path keep the trained values. References: the untouched
base model, peft LoRA with the same ``modules_to_save``, and the model reloaded from its adapter. (The LoRA export of
``modules_to_save``, items 2 and 8, is in test_export.py.)
"""
import copy

import pytest
import torch
from helpers import lm_loss, logits, random_ids, tiny_llama

from paca_hpu import (PaCAConfig, PaCAReferenceModel, apply_paca, disable_paca, load_adapter, merge_paca,
                      save_adapter, unload_paca)

peft = pytest.importorskip("peft")

TIE = pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied_embeddings"])


def _trained(tie, modules_to_save=("lm_head",), steps=3):
    """(untouched float64 base, PaCA model after ``steps`` AdamW steps on deltas and ``modules_to_save``)."""
    base = tiny_llama(seed=0, dtype=torch.float64, tie=tie)
    model = apply_paca(copy.deepcopy(base), PaCAConfig(r=4, paca_alpha=8, modules_to_save=list(modules_to_save)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        lm_loss(model, random_ids(2, 8, seed=step)).backward()
        opt.step()
    return base, model.eval()


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".delta"))


@TIE
def test_disabled_model_and_reference_are_the_base_with_a_trained_head(tie):
    """After training ``lm_head`` (with a tied embedding: the one matrix both use), the model inside
    ``disable_paca`` and ``PaCAReferenceModel`` is the untouched base bit for bit (was 0.48 / 1.08 off: the head was
    trained in place), also between the policy forward and its backward; the trained head is back afterwards. What
    trains is what peft trains with ``ensure_weight_tying=True``: one copy, shared by the tied modules."""
    base, model = _trained(tie)
    ids = random_ids(2, 8, seed=9)
    base_logits, trained_logits = logits(base, ids), logits(model, ids)
    assert (trained_logits - base_logits).abs().max() > 0.1
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=tie))
    assert _trainable(model) == [n.replace("base_model.model.", "").replace(".modules_to_save.default", "")
                                 for n in _trainable(peft_model) if "lora_" not in n]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie

    with torch.no_grad(), disable_paca(model):
        assert torch.equal(model(ids).logits, base_logits)
    ref = PaCAReferenceModel(model)
    assert torch.equal(ref(input_ids=ids).logits, base_logits)
    assert torch.equal(logits(model, ids), trained_logits)

    # DPO / KL-to-base: reference forward between the policy forward and its backward
    def head_grad(reference_logits):
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        ref_logits = reference_logits() if callable(reference_logits) else reference_logits
        logp, logq = out.logits.log_softmax(-1), ref_logits.log_softmax(-1)
        (out.loss + (logp.exp() * (logp - logq)).sum(-1).mean()).backward()
        return model.lm_head.weight.grad.clone()

    got = head_grad(lambda: ref(input_ids=ids).logits)
    torch.testing.assert_close(got, head_grad(base_logits), rtol=0, atol=1e-15)
    assert torch.count_nonzero(got) > 0


@TIE
def test_merge_keeps_the_trained_copy_and_unload_gives_the_base(tie):
    """``merge_paca``: the trained head stays (tied stays tied), nothing PaCA-specific is left; ``unload_paca``: every
    tensor of the base model comes back bit for bit, the tie included (the head was kept trained before)."""
    base, model = _trained(tie)
    ids = random_ids(2, 8, seed=10)
    trained_logits = logits(model, ids)
    merged = merge_paca(copy.deepcopy(model))
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tie
    torch.testing.assert_close(logits(merged, ids), trained_logits, rtol=1e-12, atol=1e-12)

    unload_paca(model)
    want, got = base.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert torch.equal(logits(model, ids), logits(base, ids))


@TIE
def test_reloaded_adapter_keeps_the_base_for_disable(tie, tmp_path):
    """The adapter file holds the trained head only; loaded onto a fresh base (``load_adapter``) or into a PaCA model
    through the Trainer's ``load_state_dict`` of ``model.safetensors``, it gives the trained logits, and disabled the
    base model's."""
    from safetensors.torch import load_file

    base, model = _trained(tie)
    ids = random_ids(2, 8, seed=11)
    base_logits, trained_logits = logits(base, ids), logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert [k for k in saved if not k.endswith((".delta", ".indices"))] == ["modules_to_save.lm_head.weight"]

    loaded = load_adapter(copy.deepcopy(base), tmp_path).eval()
    resumed = apply_paca(copy.deepcopy(base), PaCAConfig(r=4, paca_alpha=8, modules_to_save=["lm_head"]))
    result = resumed.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for other in (loaded, resumed.eval()):
        assert torch.equal(logits(other, ids), trained_logits)
        with torch.no_grad(), disable_paca(other):
            assert torch.equal(other(ids).logits, base_logits)


def test_pretrained_weights_loaded_after_apply_paca_are_the_base_of_modules_to_save():
    """Built from config, ``apply_paca`` with ``modules_to_save``, then the pretrained state dict: it is the base
    model, so the head's frozen original takes its values too (not only the trainable copy)."""
    pretrained = tiny_llama(seed=0, dtype=torch.float64)
    model = apply_paca(tiny_llama(seed=5, dtype=torch.float64), PaCAConfig(r=4, modules_to_save=["lm_head"]))
    model.load_state_dict(pretrained.state_dict(), strict=False)
    ids = random_ids(2, 8, seed=12)
    with torch.no_grad(), disable_paca(model):
        assert torch.equal(model(ids).logits, logits(pretrained, ids))


@pytest.mark.parametrize("mts,msg", [(["q_proj"], "is the PaCA layer"), (["self_attn"], "overlaps the PaCA layer")])
def test_modules_to_save_overlapping_a_target_is_refused(mts, msg):
    """A module cannot be adapted by PaCA and trained whole at once (before: the base weight of the PaCA layer was
    made trainable); refused before the model changes."""
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=msg):
        apply_paca(model, PaCAConfig(r=4, modules_to_save=mts))
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())
