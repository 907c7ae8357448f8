"""QPaCA: PaCA on bitsandbytes 4-bit (NF4 / FP4) layers, against an independent float64 reference.

The reference is the dense layer the 4-bit weight stands for: ``D = dequantize_4bit(Wq)`` (bitsandbytes' float32
products, exact in float64) with the selected columns replaced by ``D[:, idx] + scaling * delta``, evaluated and
differentiated in float64 by autograd. Model-level references are a dense float64 LlamaForCausalLM from the same
checkpoint whose projections carry those weights. Real bitsandbytes (CPU backend) throughout.
"""
import copy

import pytest
import torch
from torch import nn

from helpers import OneLayer, max_rel_err, random_ids, randn, saved_bytes, tiny_llama

from paca_hpu import (PaCAConfig, apply_paca, disable_paca, load_adapter, merge_paca, paca_parameters, save_adapter,
                      select_indices, trainable_parameters, unload_paca)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

from paca_hpu.quantized import PaCALinear4bit, prevent_cpu_repack  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}
#: hidden size of the tiny 4-bit LLaMAs: bitsandbytes' CPU repack (AVX-512 BF16 hosts) needs in_features of at least
#: the 4-bit block size (64) and out_features divisible by 32 (k_proj / v_proj: 64 / 4 heads * 2 KV heads = 32)
Q_HIDDEN = 64


def quantize(linear: nn.Linear, quant_type="nf4", double_quant=False, compute_dtype=torch.float32):
    """A bitsandbytes Linear4bit holding ``linear``'s weights, quantized on the CPU."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type)
    q.load_state_dict({k: v.float() for k, v in linear.state_dict().items()})
    return q.to("cpu")


def dequant64(weight) -> torch.Tensor:
    qs = copy.copy(weight.quant_state)
    qs.dtype = torch.float32
    return bnbF.dequantize_4bit(weight.data, qs).double()


class Dense64(nn.Module):
    """``y = x @ W.T + b`` in float64 with ``W = D``, ``W[:, idx] = D[:, idx] + scaling * delta``."""

    def __init__(self, d64, bias, idx, scaling, delta):
        super().__init__()
        self.d64, self.idx, self.scaling = d64, idx.long(), scaling
        self.bias = None if bias is None else bias.detach().double()
        self.delta = nn.Parameter(delta.detach().double().clone())

    def weight(self):
        w = self.d64.clone()
        w[:, self.idx] = w[:, self.idx] + self.scaling * self.delta
        return w

    def forward(self, x):
        return nn.functional.linear(x, self.weight(), self.bias)


def _layer(qt="nf4", dq=False, cd=torch.float32, bias=True, in_f=64, out_f=48, r=8, alpha=16, seed=0):
    base = quantize(OneLayer(in_f, out_f, bias=bias, seed=seed, dtype=torch.float32).proj, qt, dq, cd)
    idx = select_indices("proj", in_f, r, 0)
    return PaCALinear4bit(base, idx, alpha / r)


def _reference(layer):
    return Dense64(dequant64(layer.weight), layer.bias, layer.indices, layer.scaling, layer.delta)


# ------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_outputs_and_gradients_match_float64_reference(qt, dq, cd):
    layer = _layer(qt, dq, cd, bias=qt == "nf4")
    with torch.no_grad():
        layer.delta.copy_(randn(*layer.delta.shape, seed=3, dtype=torch.float32) * 0.05)
    ref = _reference(layer)
    x64 = randn(2, 5, 64, seed=4).requires_grad_(True)
    g64 = randn(2, 5, 48, seed=5)
    x = x64.detach().float().requires_grad_(True)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 48)
    y.backward(g64.float())
    y_ref = ref(x64)
    y_ref.backward(g64)
    tol = TOL[cd]
    assert max_rel_err(y.detach(), y_ref.detach()) < tol
    assert max_rel_err(x.grad, x64.grad) < tol
    assert layer.delta.grad.dtype == torch.float32
    assert max_rel_err(layer.delta.grad, ref.delta.grad) < tol
    # the packed 4-bit weight was read, never written
    assert not layer.weight.requires_grad and layer.weight.grad is None


def test_saves_only_x_sel_for_backward():
    for cd, elem in ((torch.float32, 4), (torch.bfloat16, 2)):
        layer = _layer(cd=cd)
        x = randn(4, 16, 64, seed=1, dtype=torch.float32).requires_grad_(True)
        exclude = list(layer.parameters()) + list(layer.buffers()) + [x]
        assert saved_bytes(lambda: layer(x), exclude) == 4 * 16 * layer.r * elem


def test_optimizer_steps_and_gradient_accumulation_match_float64_training():
    layer = _layer(bias=True)
    ref = _reference(layer)
    opt = torch.optim.SGD([layer.delta], lr=0.5, momentum=0.9)
    opt_ref = torch.optim.SGD([ref.delta], lr=0.5, momentum=0.9)
    for step in range(4):
        micro = [randn(3, 7, 64, seed=10 * step + k) for k in range(2)]  # two micro-batches per step
        for xb in micro:
            layer(xb.float()).pow(2).mean().backward()
            ref(xb).pow(2).mean().backward()
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        # every forward reads the current delta: no write-back, nothing stale after a step
        xt = randn(5, 64, seed=99 + step)
        with torch.no_grad():
            assert max_rel_err(layer(xt.float()), ref(xt)) < 2e-5
    assert max_rel_err(layer.delta.detach(), ref.delta.detach()) < 2e-5
    assert layer.delta.abs().max() > 1e-3  # it did train


def test_disabled_layer_is_bitsandbytes_base_bit_for_bit_and_gives_delta_no_gradient():
    layer = _layer(cd=torch.bfloat16)
    with torch.no_grad():
        layer.delta.normal_()
    x = randn(3, 64, seed=2, dtype=torch.float32)
    base_out = layer.base_layer(x)  # bitsandbytes' own forward
    layer._paca_enabled = False
    y = layer(x.requires_grad_(True))
    assert torch.equal(y, base_out)
    y.sum().backward()
    assert layer.delta.grad is None


def test_replaced_base_weight_recaptures_original_columns():
    layer = _layer()
    other = quantize(OneLayer(64, 48, seed=7, dtype=torch.float32).proj)
    layer.base_layer.weight = other.weight
    layer.base_layer.bias = other.bias
    x = randn(4, 64, seed=3)
    with torch.no_grad():
        assert max_rel_err(layer(x.float()), _reference(layer)(x)) < 2e-5


def test_autocast_bf16_and_index_dtype_and_float32_delta():
    layer = _layer(cd=torch.float32)
    layer.to(torch.bfloat16)
    assert layer.delta.dtype == torch.float32 and layer.indices.dtype == torch.int64
    x = randn(2, 3, 64, seed=6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        assert max_rel_err(y, _reference(layer)(x.double())) < TOL[torch.bfloat16]


def test_float64_input_is_refused_with_a_clear_error():
    layer = _layer()
    layer.base_layer.compute_dtype = None  # compute dtype then follows the input
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        layer(torch.zeros(2, 64, dtype=torch.float64))


def test_8bit_layers_are_refused_naming_4bit():
    model = OneLayer(64, 24, dtype=torch.float32)
    l8 = bnb.nn.Linear8bitLt(64, 24, has_fp16_weights=False)
    l8.load_state_dict(model.proj.state_dict())
    model.proj = l8.to("cpu")
    for target in (["proj"], "all-linear"):
        with pytest.raises(ValueError, match=r"8-bit Linear8bitLt.*load_in_4bit=True"):
            apply_paca(model, PaCAConfig(r=4, target_modules=target))
    assert type(model.proj) is bnb.nn.Linear8bitLt  # untouched


# ------------------------------------------------------------------------------------------ a 4-bit LLaMA


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qpaca") / "tiny"
    tiny_llama(seed=0, hidden=Q_HIDDEN).save_pretrained(path)
    return str(path)


def load_4bit(path, quant_type="nf4", double_quant=True, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", torch_dtype=dtype,
                                                 attn_implementation="eager")
    return model.eval()


def reference_model(path, qpaca_model):
    """Dense float64 LLaMA from the same checkpoint; each adapted projection carries D with the merged columns, each
    4-bit projection left alone carries D."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64, attn_implementation="eager").eval()
    for name, module in qpaca_model.named_modules():
        if isinstance(module, PaCALinear4bit):
            w = dequant64(module.weight)
            w[:, module.indices] += module.scaling * module.delta.detach().double()
            ref.get_submodule(name).weight.data.copy_(w)
        elif isinstance(module, bnb.nn.Linear4bit) and not name.endswith(".base_layer"):
            ref.get_submodule(name).weight.data.copy_(dequant64(module.weight))
    return ref


def assert_delta_gradients_match(model, ref, ids):
    """One training-mode loss and backward of ``model`` and of its float64 reference ``ref``: the losses and every
    ``delta.grad`` (against ``scaling * dW[:, idx]`` of the dense reference) agree."""
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PaCALinear4bit)]
    assert layers
    for name, module in layers:
        expected = module.scaling * ref.get_submodule(name).weight.grad[:, module.indices]  # d loss / d delta
        assert max_rel_err(module.delta.grad, expected) < 1e-4, name


def _train(model, steps=2, lr=3e-2, seed=0):
    opt = torch.optim.AdamW(paca_parameters(model), lr=lr)
    for s in range(steps):
        ids = random_ids(seed=seed + s)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def test_apply_paca_converts_every_4bit_projection_with_the_dense_columns(tiny_dir):
    model = apply_paca(load_4bit(tiny_dir), PaCAConfig(r=4))
    dense = apply_paca(tiny_llama(seed=0, hidden=Q_HIDDEN), PaCAConfig(r=4))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PaCALinear4bit)}
    assert len(layers) == 2 * 7
    for name, layer in layers.items():
        d = dense.get_submodule(name)
        assert (layer.in_features, layer.out_features, layer.r) == (d.in_features, d.out_features, 4)
        assert torch.equal(layer.indices, d.indices)  # same columns as on the dense model: adapters carry over
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if "base_layer" not in n)
    # element counts, not packed bytes
    assert trainable_parameters(model) == trainable_parameters(dense)


@pytest.mark.parametrize("checkpointing", [None, True, False])
def test_model_gradients_match_float64_reference(tiny_dir, checkpointing):
    model = _train(apply_paca(load_4bit(tiny_dir), PaCAConfig(r=4)), steps=2)
    ref = reference_model(tiny_dir, model)
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    assert_delta_gradients_match(model, ref, random_ids(seed=7))


def test_adapter_reloads_onto_a_freshly_quantized_base(tiny_dir, tmp_path):
    model = _train(apply_paca(load_4bit(tiny_dir, "fp4", False), PaCAConfig(r=4)), steps=3)
    ids = random_ids(seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(load_4bit(tiny_dir, "fp4", False), tmp_path / "adapter")
    assert sum(isinstance(m, PaCALinear4bit) for m in fresh.modules()) == 14
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_gives_a_plain_checkpoint_with_float32_merged_weights_rounded_once(tiny_dir, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    model = _train(apply_paca(load_4bit(tiny_dir, dtype=dtype), PaCAConfig(r=4)), steps=2)
    ids = random_ids(seed=6)
    with torch.no_grad():
        qpaca_logits = model(input_ids=ids).logits.float()
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, PaCALinear4bit):
            w = dequant64(m.weight).float()  # float32 products, exact
            w[:, m.indices] += m.scaling * m.delta.detach()
            expected[name] = w.to(dtype)
    merged = merge_paca(model)
    for name, w in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == dtype
        assert torch.equal(layer.weight, w)
    assert not getattr(merged, "is_quantized", False) and getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits.float()
    assert max_rel_err(merged_logits, qpaca_logits) < (1e-5 if dtype == torch.float32 else 2e-2)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=dtype,
                                                    attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits.float(), merged_logits)


def test_unload_returns_the_untouched_linear4bit_and_disable_gives_the_base(tiny_dir):
    model = load_4bit(tiny_dir, "nf4", True, torch.bfloat16)
    ids = random_ids(seed=8)
    prevent_cpu_repack(model)  # as apply_paca does: bitsandbytes' standard 4-bit path also on AVX-512 BF16 hosts
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    originals = {n: (m, m.weight.data.clone()) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    _train(apply_paca(model, PaCAConfig(r=4)), steps=2)
    with disable_paca(model), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, base_logits)
    unload_paca(model)
    for name, (module, packed) in originals.items():
        assert model.get_submodule(name) is module
        assert torch.equal(module.weight.data, packed) and not module.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)


def _linear4bit(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def repack_for_cpu_inference(model, ids):
    """What bitsandbytes does to each Linear4bit at its first eval-mode forward without gradients on a CPU with
    AVX-512 BF16: for real (the model's own forward) where this host has it, else through bitsandbytes' own repack
    function, which is what that forward calls."""
    if bnbF.has_avx512bf16():
        with torch.no_grad():
            model.eval()(input_ids=ids)
    else:
        for m in _linear4bit(model).values():
            m.weight.data, m.weight.quant_state = bnbF._convert_weight_packed_for_cpu(m.weight.data,
                                                                                      m.weight.quant_state)
    assert all(m.weight.quant_state.packing_format_for_cpu for m in _linear4bit(model).values())


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_model_that_bitsandbytes_repacked_for_cpu_inference_is_refused(tiny_dir, double_quant):
    # the repack rounds absmax to bf16 (and bitsandbytes' inverse leaves it transposed without double quantization):
    # no longer the checkpoint's 4-bit base, so PaCA refuses it instead of training on another base
    model = load_4bit(tiny_dir, "nf4", double_quant)
    repack_for_cpu_inference(model, random_ids(seed=2))
    config = PaCAConfig(r=4, target_modules=["q_proj", "v_proj"])
    first = r"layer 'model\.layers\.0\.self_attn\.q_proj' has been repacked .* Reload the model and apply PaCA"
    with pytest.raises(ValueError, match=first):
        apply_paca(model, config)
    assert not any(isinstance(m, PaCALinear4bit) for m in model.modules())  # untouched
    with pytest.raises(ValueError, match="repacked"):
        PaCALinear4bit(model.model.layers[0].mlp.down_proj, torch.arange(4), 2.0, name="down_proj")
    with pytest.raises(ValueError, match="repacked"):
        load_adapter(model, _saved_adapter(tiny_dir, config))


def _saved_adapter(tiny_dir, config):
    import tempfile

    path = tempfile.mkdtemp(prefix="qpaca-adapter-")
    save_adapter(apply_paca(load_4bit(tiny_dir, "nf4", False), config), path)
    return path


def test_a_paca_model_is_never_repacked_and_trains_right_after_evaluation_and_generation(tiny_dir):
    # q_proj / v_proj only (optimum-habana's run_lora_clm targets): the other projections are bitsandbytes layers that
    # bitsandbytes would repack at the evaluation below on AVX-512 BF16 hosts, after which they pass no gradient on
    model = load_4bit(tiny_dir, "nf4", False)
    model = _train(apply_paca(model, PaCAConfig(r=4, target_modules=["q_proj", "v_proj"])), steps=1)
    before = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in _linear4bit(model).items()}
    ids = random_ids(seed=3)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    for name, m in _linear4bit(model).items():
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False), name
        assert torch.equal(m.weight.data, before[name][0]) and torch.equal(m.weight.quant_state.absmax, before[name][1])
    assert_delta_gradients_match(model, reference_model(tiny_dir, model), ids)


def _qlora_from_the_training_script(tiny_dir):
    from paca_hpu.trainer import prepare_model

    return prepare_model(load_4bit(tiny_dir, "nf4", False), "lora", r=4, target_modules=["q_proj", "v_proj"])


def _qlora_from_the_benchmark(tiny_dir):
    from benchmarks.qpaca import load_quantized_base
    from benchmarks.variants import ModelSpec, build_variant

    base = load_quantized_base(ModelSpec(kind="tiny", attn_implementation="eager"), torch.float32,
                               torch.device("cpu"), "nf4", double_quant=False)
    return build_variant("lora", base, r=4, alpha=8, targets=("q_proj", "v_proj")).model


@pytest.mark.parametrize("build", [_qlora_from_the_training_script, _qlora_from_the_benchmark])
def test_qlora_base_is_not_repacked_by_an_evaluation(tiny_dir, build):
    # peft LoRA calls the bitsandbytes layer itself: after a repack its input gets no gradient from it (and LoRA's
    # own gradients change), silently; the reference is the same QLoRA model never evaluated
    def gradients(evaluate_first):
        torch.manual_seed(0)
        model = build(tiny_dir)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)  # (peft starts B at zero)
        ids = random_ids(seed=4)
        if evaluate_first:
            with torch.no_grad():
                model.eval()(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fresh, evaluated = gradients(False), gradients(True)
    assert fresh.keys() == evaluated.keys() and len(fresh) == 8
    for name, g in fresh.items():
        assert g.abs().max() > 0 and evaluated[name] is not None and torch.equal(evaluated[name], g), name


def test_device_move_then_generation_in_inference_mode_then_training(tiny_dir):
    model = _train(apply_paca(load_4bit(tiny_dir), PaCAConfig(r=4)), steps=1)
    model.to("cpu")  # a device move: the dequantized columns are re-captured at the next forward
    ids = random_ids(seed=5)
    with torch.inference_mode():
        model.eval().generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    for m in model.modules():
        if isinstance(m, PaCALinear4bit):
            assert not m.original_columns.is_inference()
    assert_delta_gradients_match(model, reference_model(tiny_dir, model), ids)


def test_merge_of_a_partly_4bit_adapted_model_reloads_as_the_merged_model(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _train(apply_paca(load_4bit(tiny_dir), PaCAConfig(r=4, target_modules=["q_proj", "v_proj"])), steps=2)
    ids = random_ids(seed=6)
    with torch.no_grad():
        qpaca_logits = model(input_ids=ids).logits
    merged = merge_paca(model)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert max_rel_err(merged_logits, qpaca_logits) < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu", torch_dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    kinds = {n: type(m) for n, m in reloaded.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {n: type(m) for n, m in merged.named_modules() if isinstance(m, nn.Linear)}
    assert kinds["model.layers.1.self_attn.q_proj"] is nn.Linear
    assert kinds["model.layers.1.self_attn.k_proj"] is bnb.nn.Linear4bit
    saved = dict(merged.named_modules())
    for name, m in reloaded.named_modules():
        if type(m) is nn.Linear:  # merged (and never quantized: lm_head): the float weights as saved
            assert torch.equal(m.weight, saved[name].weight), name
        elif isinstance(m, bnb.nn.Linear4bit):  # the same 4-bit codes and scales
            assert torch.equal(dequant64(m.weight), dequant64(saved[name].weight)), name
    prevent_cpu_repack(reloaded)  # bitsandbytes' standard 4-bit path, as in the merged model
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, merged_logits)


# ------------------------------------------------------------------------------------------ the training script


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from helpers import make_tiny_checkpoint, qa_records, write_jsonl

    root = tmp_path_factory.mktemp("qpaca_run")
    return {"model": make_tiny_checkpoint(root / "model", hidden_size=Q_HIDDEN),
            "train": write_jsonl(root / "train.jsonl", qa_records(24))}


def _run(tiny_run, out, *extra):
    from paca_hpu.cli import main

    return main(["--model_name_or_path", tiny_run["model"], "--train_file", tiny_run["train"],
                 "--validation_split_percentage", "25", "--max_seq_len", "64", "--per_device_train_batch_size", "4",
                 "--learning_rate", "5e-3", "--seed", "11", "--output_dir", str(out), *extra])


def test_script_trains_qpaca_and_qlora_on_a_4bit_base(tiny_run, tmp_path, reset_accelerate):
    import json

    from transformers import AutoConfig

    out = tmp_path / "qpaca"
    assert _run(tiny_run, out, "--max_steps", "3", "--load_in_4bit", "--bnb_4bit_quant_type", "fp4",
                "--bnb_4bit_use_double_quant", "--verify_adapter", "True", "--save_merged") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["quantization"] == "bitsandbytes 4-bit fp4 + double quant, compute float32"
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["eval_loss_reloaded"] == m["eval_loss_after"]  # the adapter on a freshly quantized base
    dense_total = sum(p.numel() for p in tiny_llama_from(tiny_run["model"]).parameters())
    assert m["total_params"] == dense_total + m["trainable_params"]  # 4-bit weights counted as elements
    assert getattr(AutoConfig.from_pretrained(out / "merged"), "quantization_config", None) is None
    out = tmp_path / "qlora"
    assert _run(tiny_run, out, "--max_steps", "2", "--load_in_4bit", "--peft_type", "lora") == 0
    assert json.loads((out / "metrics.json").read_text())["quantization"].startswith("bitsandbytes 4-bit nf4")


def tiny_llama_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("extra, message", [
    (["--bnb_4bit_quant_type", "fp4"], "--bnb_4bit_quant_type has no effect without --load_in_4bit"),
    (["--load_in_4bit", "--peft_type", "none"], "pass --peft_type paca (QPaCA) or --peft_type lora (QLoRA)"),
])
def test_script_quantization_usage_errors(tiny_run, tmp_path, capsys, extra, message):
    assert _run(tiny_run, tmp_path / "e", "--max_steps", "1", *extra) == 2
    assert message in capsys.readouterr().err


def test_functional_paca_gives_the_same_outputs_and_double_backward():
    from paca_hpu import functional_paca

    layer = _layer(bias=True)
    model = nn.Sequential()
    model.add_module("proj", layer)
    with torch.no_grad():
        layer.delta.normal_(std=0.05)
    ref = _reference(layer)
    x64 = randn(4, 64, seed=9).requires_grad_(True)
    x = x64.detach().float().requires_grad_(True)
    with pytest.raises(RuntimeError, match="functional_paca"):
        g, = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
        g.sum().backward()
    with functional_paca(model):
        y = layer(x)
        g, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        g.pow(2).sum().backward()  # a gradient penalty: second order through the merged columns
    y_ref = ref(x64)
    g_ref, = torch.autograd.grad(y_ref.pow(2).sum(), x64, create_graph=True)
    g_ref.pow(2).sum().backward()
    assert max_rel_err(y.detach(), y_ref.detach()) < 2e-5
    assert max_rel_err(layer.delta.grad, ref.delta.grad) < 2e-5
    with torch.no_grad():
        assert max_rel_err(layer(x), y) < 2e-5  # the fused path outside agrees
