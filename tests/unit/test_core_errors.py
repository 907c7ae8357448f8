"""Every error path of the core, written from the spec."""
import re

import pytest
import torch
from torch import nn

from helpers import OneLayer, paca_layers, tiny_gpt2, tiny_llama

from paca_hpu import PaCAConfig, apply_paca, load_adapter, save_adapter, sync_paca  # noqa: F401

# ------------------------------------------------------------------------------------------
# PaCAConfig validation
# ------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(r=0), "r"),
    (dict(r=-2), "r"),
    (dict(r=2.5), "r"),
    (dict(paca_alpha=0), "paca_alpha"),
    (dict(paca_alpha=-1.0), "paca_alpha"),
    (dict(target_modules=42), "target_modules"),
    (dict(target_modules=["q_proj", 3]), "target_modules"),
    (dict(exclude_modules=42), "exclude_modules"),
    (dict(modules_to_save=42), "modules_to_save"),
    (dict(random_seed="zero"), "random_seed"),
]


@pytest.mark.parametrize("kwargs,field", BAD_CONFIGS, ids=[str(k) for k, _ in BAD_CONFIGS])
def test_bad_config_fields_raise_clear_errors(kwargs, field):
    with pytest.raises((ValueError, TypeError)) as info:
        PaCAConfig(**kwargs)
    assert re.search(rf"\b{field}\b", str(info.value)), str(info.value)


def test_invalid_regex_raises_at_config_or_apply():
    with pytest.raises((ValueError, TypeError)) as info:
        apply_paca(tiny_llama(), PaCAConfig(target_modules="(unclosed"))
    assert "(unclosed" in str(info.value), str(info.value)


def test_from_dict_validates_too():
    d = PaCAConfig().to_dict()
    d["r"] = 0
    with pytest.raises((ValueError, TypeError)):
        PaCAConfig.from_dict(d)


# ------------------------------------------------------------------------------------------
# apply_paca errors
# ------------------------------------------------------------------------------------------

def test_r_larger_than_in_features_names_the_layer():
    with pytest.raises(ValueError) as info:
        apply_paca(OneLayer(16, 8), PaCAConfig(r=17, target_modules=["proj"]))
    assert "proj" in str(info.value)


def test_r_larger_than_in_features_names_the_layer_in_a_model():
    # hidden 32 < r = 40 < intermediate 64: only the attention/up/gate projections are too small
    with pytest.raises(ValueError) as info:
        apply_paca(tiny_llama(), PaCAConfig(r=40, target_modules=["up_proj", "down_proj"]))
    msg = str(info.value)
    assert re.search(r"model\.layers\.\d\.mlp\.up_proj", msg), msg
    assert "down_proj" not in msg, msg  # down_proj (in_features 64) is fine


def test_r_equal_to_in_features_is_allowed():
    model = apply_paca(OneLayer(16, 8), PaCAConfig(r=16, target_modules=["proj"]))
    assert torch.equal(model.proj.indices.long(), torch.arange(16))


@pytest.mark.parametrize("targets", [["nope_proj", "nada"], r"nothing\.here\..*"], ids=["list", "regex"])
def test_nothing_matches_names_the_patterns(targets):
    with pytest.raises(ValueError) as info:
        apply_paca(tiny_llama(), PaCAConfig(target_modules=targets))
    msg = str(info.value)
    for pat in (targets if isinstance(targets, list) else [targets]):
        assert pat in msg or repr(pat) in msg, msg


def test_regex_is_a_full_match():
    # a prefix of a real qualified name must not match (peft: re.fullmatch)
    with pytest.raises(ValueError):
        apply_paca(tiny_llama(), PaCAConfig(target_modules=r"model\.layers\.0\.self_attn\.q"))


def test_everything_excluded_counts_as_nothing_matches():
    with pytest.raises(ValueError):
        apply_paca(tiny_llama(), PaCAConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_unsupported_target_type_embedding():
    with pytest.raises(ValueError) as info:
        apply_paca(tiny_llama(), PaCAConfig(target_modules=["embed_tokens"]))
    assert "embed_tokens" in str(info.value)


def test_unsupported_target_type_conv2d():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

    with pytest.raises(ValueError) as info:
        apply_paca(M(), PaCAConfig(r=2, target_modules=["conv"]))
    assert "conv" in str(info.value)


# ------------------------------------------------------------------------------------------
# load_adapter onto a model that does not fit
# ------------------------------------------------------------------------------------------

@pytest.fixture
def saved_llama(tmp_path):
    model = apply_paca(tiny_llama(seed=0), PaCAConfig(r=8, paca_alpha=16))
    with torch.no_grad():
        for l in paca_layers(model).values():
            l.delta.fill_(0.01)
    sync_paca(model)
    save_adapter(model, str(tmp_path))
    return str(tmp_path), set(paca_layers(model))


def test_load_onto_model_with_other_shapes_names_the_module(saved_llama):
    path, names = saved_llama
    with pytest.raises(Exception) as info:
        load_adapter(tiny_llama(seed=0, hidden=48), path)
    msg = str(info.value)
    assert any(n in msg for n in names), msg


def test_load_onto_model_with_one_mismatching_out_features_names_it(saved_llama):
    path, _ = saved_llama
    other = tiny_llama(seed=0)
    other.model.layers[1].mlp.down_proj = nn.Linear(64, 40, bias=False)
    with pytest.raises(Exception) as info:
        load_adapter(other, path)
    assert "model.layers.1.mlp.down_proj" in str(info.value), str(info.value)


def test_load_onto_model_with_one_mismatching_in_features_names_it(saved_llama):
    path, _ = saved_llama
    other = tiny_llama(seed=0)
    other.model.layers[1].mlp.down_proj = nn.Linear(16, 32, bias=False)
    with pytest.raises(Exception) as info:
        load_adapter(other, path)
    assert "model.layers.1.mlp.down_proj" in str(info.value), str(info.value)


def test_load_onto_model_with_other_names_names_the_module(saved_llama):
    path, names = saved_llama
    with pytest.raises(Exception) as info:
        load_adapter(tiny_gpt2(seed=0), path)
    msg = str(info.value)
    assert any(n in msg for n in names), msg


def test_load_onto_model_missing_one_module_names_it(saved_llama):
    path, _ = saved_llama
    other = tiny_llama(seed=0)
    del other.model.layers[0].self_attn.v_proj
    other.model.layers[0].self_attn.value = nn.Linear(32, 16, bias=False)
    with pytest.raises(Exception) as info:
        load_adapter(other, path)
    assert "model.layers.0.self_attn.v_proj" in str(info.value), str(info.value)


def test_apply_paca_twice_says_already_applied():
    from helpers import tiny_llama

    model = apply_paca(tiny_llama(), PaCAConfig(r=4))
    with pytest.raises(ValueError, match="already"):
        apply_paca(model, PaCAConfig(r=4))


def test_apply_paca_on_something_that_is_no_model_names_what_to_pass():
    """Newcomer finding: ``apply_paca("path/to/model", config)`` failed with ``'str' object has no attribute
    'modules'``; a config given as a dict is refused likewise."""
    with pytest.raises(TypeError, match=r"torch\.nn\.Module.*got str; load the model first"):
        apply_paca("HuggingFaceTB/SmolLM2-135M", PaCAConfig(r=4))
    with pytest.raises(TypeError, match="expects a PaCAConfig, got dict"):
        apply_paca(tiny_llama(seed=0), {"r": 4})


# ------------------------------------------------------------------------------------------
# column indices: one rule (paca_hpu.selection.check_indices), refused naming the layer
# ------------------------------------------------------------------------------------------

def test_given_indices_with_a_repeated_column_name_the_layer():
    """``apply_paca(indices=...)`` with a column twice: refused naming the layer and the column (the layer's own check
    used to say only 'PaCALinear indices must be unique')."""
    config = PaCAConfig(r=4, target_modules=["q_proj"])
    indices = {f"model.layers.{i}.self_attn.q_proj": torch.tensor([0, 5, 9, 12]) for i in range(2)}
    indices["model.layers.1.self_attn.q_proj"] = torch.tensor([0, 5, 5, 12])
    with pytest.raises(ValueError) as info:
        apply_paca(tiny_llama(seed=0), config, indices=indices)
    msg = str(info.value)
    assert "'model.layers.1.self_attn.q_proj'" in msg and "column 5 2 times" in msg, msg


def test_adapter_with_fractional_indices_is_refused_not_truncated(saved_llama):
    """An adapter file whose indices are floats (a corrupt or hand-made file) was loaded with each index truncated
    to an integer column; now refused, naming the module."""
    from safetensors.torch import load_file, save_file

    path, _ = saved_llama
    weights = f"{path}/adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if k.endswith(".indices"))[0]
    tensors[name] = tensors[name].double() + 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        load_adapter(tiny_llama(seed=0), path)
    msg = str(info.value)
    assert name[: -len(".indices")] in msg and "int32/int64" in msg, msg
