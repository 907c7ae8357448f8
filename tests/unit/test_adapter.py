"""PaCAConfig serialisation and save_adapter / load_adapter round trips, written from the spec."""
import copy
import dataclasses
import json
import os

import pytest
import torch

from helpers import logits, lm_loss, paca_layers, random_ids, tiny_gpt2, tiny_llama

from paca_hpu import PaCAConfig, apply_paca, disable_paca, load_adapter, save_adapter

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}

CONFIGS = [
    PaCAConfig(),
    PaCAConfig(r=4, paca_alpha=8, target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.self_attn.v_proj"],
               random_seed=3, modules_to_save=["lm_head"]),
    PaCAConfig(r=2, paca_alpha=0.5, target_modules=r".*\.mlp\.(up|down)_proj", random_seed=12),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "lists", "regex"])
def test_config_json_round_trip(cfg):
    assert dataclasses.is_dataclass(cfg)
    d = cfg.to_dict()
    assert isinstance(d, dict)
    back = PaCAConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert back.to_dict() == d


def test_config_defaults():
    cfg = PaCAConfig()
    assert (cfg.r, cfg.paca_alpha, cfg.target_modules, cfg.exclude_modules, cfg.random_seed, cfg.modules_to_save) == (
        8, 16, "all-linear", None, 0, None)


def _train(model, steps=2, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for s in range(steps):
        opt.zero_grad()
        lm_loss(model, random_ids(2, 8, seed=seed + s)).backward()
        opt.step()
    model.eval()


def _trained(kind, **cfg):
    model = apply_paca(BUILDERS[kind](seed=0), PaCAConfig(**cfg))
    _train(model)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_load_round_trip_onto_fresh_base(kind, tmp_path):
    trained = _trained(kind, r=8, paca_alpha=16, random_seed=5)
    ids = random_ids(3, 10, seed=9)
    expected = logits(trained, ids)
    path = tmp_path / "adapter"
    save_adapter(trained, str(path))

    files = sorted(os.listdir(path))
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert not [f for f in files if f not in ("adapter_config.json", "adapter_model.safetensors", "README.md")], files

    with open(path / "adapter_config.json") as f:
        meta = json.load(f)
    flat = json.dumps(meta)
    assert "version" in flat
    for key, value in (("r", 8), ("paca_alpha", 16), ("random_seed", 5)):
        assert key in flat

    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    n_layers = len(paca_layers(trained))
    delta_keys = [k for k in tensors if "delta" in k]
    index_keys = [k for k in tensors if "indices" in k]
    assert len(delta_keys) == n_layers and len(index_keys) == n_layers
    assert all(tensors[k].dtype == torch.float32 for k in delta_keys)
    # nothing of the frozen base model is stored
    assert sum(t.numel() for t in tensors.values()) == sum(
        l.delta.numel() + l.indices.numel() for l in paca_layers(trained).values())

    fresh = BUILDERS[kind](seed=0)
    base_logits = logits(fresh, ids)
    loaded = load_adapter(fresh, str(path))
    loaded.eval()
    lt, ll = paca_layers(trained), paca_layers(loaded)
    assert set(lt) == set(ll)
    for n in lt:
        assert torch.equal(lt[n].indices, ll[n].indices), n
        assert torch.equal(lt[n].delta, ll[n].delta), n
        assert torch.equal(lt[n].weight, ll[n].weight), n
    assert torch.equal(logits(loaded, ids), expected)
    # the loaded model keeps the ORIGINAL columns: disabling gives the fresh base exactly
    with disable_paca(loaded):
        assert torch.equal(logits(loaded, ids), base_logits)

    # and training continues identically from both (stateless SGD, same data)
    for m in (trained, loaded):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        opt.zero_grad(set_to_none=True)  # the trained model still holds its last step's grads
        m.train()
        lm_loss(m, random_ids(2, 8, seed=123)).backward()
        opt.step()
        m.eval()
    assert torch.equal(logits(loaded, ids), logits(trained, ids))


def test_load_uses_saved_indices_not_seed(tmp_path):
    trained = _trained("llama", r=8, paca_alpha=16, random_seed=5)
    ids = random_ids(2, 8, seed=1)
    save_adapter(trained, str(tmp_path))
    cfg_file = tmp_path / "adapter_config.json"
    meta = json.loads(cfg_file.read_text())

    def patch_seed(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "random_seed":
                    obj[k] = 999
                else:
                    patch_seed(v)

    patch_seed(meta)
    cfg_file.write_text(json.dumps(meta))
    loaded = load_adapter(tiny_llama(seed=0), str(tmp_path))
    for n, l in paca_layers(loaded).items():
        assert torch.equal(l.indices, paca_layers(trained)[n].indices), n
    assert torch.equal(logits(loaded.eval(), ids), logits(trained, ids))


def test_modules_to_save_round_trip(tmp_path):
    base = tiny_llama(seed=0, tie=False)
    w_head0 = base.lm_head.weight.detach().clone()
    trained = apply_paca(copy.deepcopy(base), PaCAConfig(r=4, paca_alpha=8, modules_to_save=["lm_head"]))
    _train(trained)
    assert not torch.equal(trained.lm_head.weight, w_head0), "modules_to_save was not trained"
    ids = random_ids(2, 8, seed=4)
    expected = logits(trained, ids)
    save_adapter(trained, str(tmp_path))

    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("lm_head" in k for k in tensors)
    assert not any("embed_tokens" in k for k in tensors)

    loaded = load_adapter(tiny_llama(seed=0, tie=False), str(tmp_path))
    loaded.eval()
    assert torch.equal(loaded.lm_head.weight, trained.lm_head.weight)
    assert torch.equal(logits(loaded, ids), expected)


def test_base_model_name_recorded(tmp_path):
    model = tiny_llama(seed=0)
    model.config._name_or_path = "tiny-org/tiny-llama-for-tests"
    model.name_or_path = "tiny-org/tiny-llama-for-tests"
    apply_paca(model, PaCAConfig(r=4))
    save_adapter(model, str(tmp_path))
    assert "tiny-org/tiny-llama-for-tests" in (tmp_path / "adapter_config.json").read_text()


def test_save_overwrites_and_leaves_no_temporaries(tmp_path):
    ids = random_ids(2, 8, seed=2)
    first = _trained("llama", r=4, paca_alpha=8)
    save_adapter(first, str(tmp_path))
    second = apply_paca(tiny_llama(seed=0), PaCAConfig(r=4, paca_alpha=8))
    _train(second, steps=1, seed=50)
    save_adapter(second, str(tmp_path))
    assert sorted(f for f in os.listdir(tmp_path) if f != "README.md") == [
        "adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter(tiny_llama(seed=0), str(tmp_path))
    assert torch.equal(logits(loaded.eval(), ids), logits(second, ids))


def test_peft_type_names_the_paca_call_and_older_files_load(tmp_path):
    """peft_type is no peft method name (transformers/peft then fail naming paca_hpu.from_pretrained, and upstream
    peft's own "PACA" tuner cannot pick the file up); adapters written with the older "PACA" still load."""
    trained = _trained("llama", r=4, paca_alpha=8)
    save_adapter(trained, str(tmp_path))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] != "PACA" and "paca_hpu.from_pretrained" in meta["peft_type"]
    meta["peft_type"] = "PACA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    ids = random_ids(2, 8, seed=6)
    assert torch.equal(logits(load_adapter(tiny_llama(seed=0), str(tmp_path)).eval(), ids), logits(trained, ids))


# ---- issue 12: incomplete, foreign-base and damaged adapter files


def _drop_tensors(path, names):
    """Rewrite the adapter's safetensors file without the ``.delta`` / ``.indices`` of ``names``."""
    from safetensors.torch import load_file, save_file

    w_file = str(path / "adapter_model.safetensors")
    tensors = load_file(w_file)
    for name in names:
        del tensors[f"{name}.delta"], tensors[f"{name}.indices"]
    save_file(tensors, w_file)


@pytest.mark.parametrize("keep", ["all_but_one", "only_one"])
def test_load_adapter_missing_layers_names_the_first(tmp_path, keep):
    trained = _trained("llama", r=4, paca_alpha=8)
    save_adapter(trained, str(tmp_path))
    names = list(paca_layers(trained))  # named_modules order
    assert len(names) == 14
    dropped = [names[5]] if keep == "all_but_one" else names[1:]
    _drop_tensors(tmp_path, dropped)
    fresh = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError) as exc:
        load_adapter(fresh, str(tmp_path))
    msg = str(exc.value)
    assert f"'{dropped[0]}.delta'" in msg and f"{len(dropped)} of 14" in msg, msg
    assert not paca_layers(fresh) and all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def test_load_adapter_onto_another_base_warns_naming_both(tmp_path, caplog):
    model = tiny_llama(seed=0)
    model.config._name_or_path = "org/base-a"
    apply_paca(model, PaCAConfig(r=4))
    save_adapter(model, str(tmp_path))
    other = tiny_llama(seed=0)
    other.config._name_or_path = "org/base-b"
    with caplog.at_level("WARNING", logger="paca_hpu.adapter"):
        load_adapter(other, str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if r.name == "paca_hpu.adapter"]
    assert len(warned) == 1 and "'org/base-a'" in warned[0] and "'org/base-b'" in warned[0], warned
    caplog.clear()
    same = tiny_llama(seed=0)
    same.config._name_or_path = "org/base-a"
    with caplog.at_level("WARNING", logger="paca_hpu.adapter"):
        load_adapter(same, str(tmp_path))
    assert not [r for r in caplog.records if r.name == "paca_hpu.adapter"]


@pytest.mark.parametrize("damage", ["truncated_weights", "garbled_weights", "truncated_config"])
def test_damaged_adapter_file_is_named(tmp_path, damage):
    save_adapter(_trained("llama", r=4, paca_alpha=8), str(tmp_path))
    name = "adapter_config.json" if damage == "truncated_config" else "adapter_model.safetensors"
    target = tmp_path / name
    data = target.read_bytes()
    if damage == "garbled_weights":
        data = b"\xff" * 16 + data[16:]
    else:
        data = data[: len(data) // 2]
    target.write_bytes(data)
    with pytest.raises(ValueError) as exc:
        load_adapter(tiny_llama(seed=0), str(tmp_path))
    msg = str(exc.value)
    assert f"'{target}'" in msg and "truncated or garbled" in msg and "\n" not in msg, msg


def _overwrite_data(path, key, value: float, count: int = 2):
    """Overwrite the first ``count`` float32 values of ``key`` in a safetensors file in place, header intact."""
    import struct

    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start = 8 + n + json.loads(data[8:8 + n])[key]["data_offsets"][0]
    data[start:start + 4 * count] = struct.pack("<f", value) * count
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("how", ["load_adapter", "from_pretrained"])
def test_non_finite_delta_in_the_data_section_is_refused_naming_the_layer(tmp_path, how, value):
    """Issue 23 item 9: garbage in the data section with the header intact (0xff bytes read as NaN) loaded without a
    word and the model's logits became NaN. Such a file is now refused before the model is touched, naming the layer;
    the same file with finite values loads."""
    import paca_hpu

    trained = _trained("llama", r=4, paca_alpha=8)
    save_adapter(trained, str(tmp_path))
    layer = sorted(paca_layers(trained))[3]
    target = tmp_path / "adapter_model.safetensors"
    intact = target.read_bytes()
    _overwrite_data(target, f"{layer}.delta", value)
    base = tiny_llama(seed=0)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError) as exc:
        if how == "load_adapter":
            load_adapter(base, str(tmp_path))
        else:
            paca_hpu.from_pretrained(str(tmp_path), base_model=base)
    msg = str(exc.value)
    assert f"layer '{layer}'" in msg and "not finite" in msg and f"'{target}'" in msg and "\n" not in msg, msg
    assert not paca_layers(base) and all(torch.equal(v, weights[k]) for k, v in base.state_dict().items())
    target.write_bytes(intact)
    ids = random_ids(2, 8, seed=6)
    torch.testing.assert_close(logits(load_adapter(base, str(tmp_path)), ids), logits(trained, ids))
