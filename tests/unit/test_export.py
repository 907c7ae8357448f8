"""python -m paca_hpu export: the LoRA export against peft's own loading (PeftModel, merge_and_unload) and the merged
export against AutoModelForCausalLM, both compared with the PaCA model they come from; bad inputs."""

from helpers import REPO_DIR  # the repository root / tests folder
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import logits, random_ids, tiny_gpt2, tiny_llama
from helpers import make_tiny_checkpoint

from paca_hpu import PaCAConfig, apply_paca, merge_paca, paca_layers, sync_paca
from paca_hpu.__main__ import main

peft = pytest.importorskip("peft")


def _trained_adapter(base_dir, out, seed=0, scale=0.05, **cfg):
    """A PaCA model on ``base_dir`` with random deltas (every layer non-zero), saved to ``out``."""
    from transformers import AutoModelForCausalLM

    model = apply_paca(AutoModelForCausalLM.from_pretrained(base_dir), PaCAConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in paca_layers(model):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=gen) * scale)
        for name, p in model.named_parameters():  # the modules_to_save (one shared copy for tied weights)
            if p.requires_grad and not name.endswith(".delta"):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    sync_paca(model)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base_dir, adapter_dir, trained PaCA model): scaling 6/4 = 1.5, so delta * scaling rounds."""
    root = tmp_path_factory.mktemp("export_llama")
    base = make_tiny_checkpoint(root / "base")
    model = _trained_adapter(base, root / "adapter", r=4, paca_alpha=6, random_seed=1)
    return base, str(root / "adapter"), model


def _export(*argv):
    return main(["export", *map(str, argv)])


def _peft_lora(base_dir, lora_dir):
    from transformers import AutoModelForCausalLM

    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(lora_dir)).eval()


def _check_lora(base_dir, lora_dir, paca_model, ids):
    """Unmerged within 1e-4, merged bit for bit (weights and logits); returns the unmerged max abs difference."""
    lora = _peft_lora(base_dir, lora_dir)
    expected = logits(paca_model, ids)
    err = (logits(lora, ids) - expected).abs().max().item()
    assert err <= 1e-4, err
    merged_lora = lora.merge_and_unload()
    merged_paca = merge_paca(copy.deepcopy(paca_model))
    lora_state = merged_lora.state_dict()
    for key, value in merged_paca.state_dict().items():
        assert torch.equal(lora_state[key], value), key
    assert torch.equal(logits(merged_lora, ids), expected)
    return err


def test_lora_export_is_the_paca_adapter(llama, tmp_path):
    base, adapter, model = llama
    assert _export(adapter, "--to", "lora", "--output", tmp_path / "lora") == 0
    assert sorted(os.listdir(tmp_path / "lora")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == ("LORA", 4, 6, base)
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    _check_lora(base, tmp_path / "lora", model, random_ids(2, 12, seed=3, vocab=model.config.vocab_size))


def test_lora_export_partial_targets_and_modules_to_save(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base")
    model = _trained_adapter(base, tmp_path / "adapter", r=2, paca_alpha=3, random_seed=4,
                             target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.self_attn.v_proj"],
                             modules_to_save=["lm_head"])
    assert _export(tmp_path / "adapter", "--to", "lora", "--output", tmp_path / "lora") == 0
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    # v_proj of layer 1 is not adapted: suffixes would over-select, so the full names are written
    assert sorted(cfg["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                             "model.layers.1.self_attn.q_proj"]
    assert cfg["modules_to_save"] == ["lm_head"]
    _check_lora(base, tmp_path / "lora", model, random_ids(2, 12, seed=5, vocab=model.config.vocab_size))


_TIED_KEYS = ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]


@pytest.mark.parametrize("kind,mts,written,tying,keys", [
    ("llama_tied", ["lm_head"], ["lm_head"], True, _TIED_KEYS),
    ("llama_tied", ["embed_tokens"], ["embed_tokens"], True, _TIED_KEYS),
    ("llama", ["norm"], ["model.norm"], False, ["base_model.model.model.norm.weight"]),
    ("gpt2", ["wte"], ["lm_head", "transformer.wte"], True,
     ["base_model.model.lm_head.weight", "base_model.model.transformer.wte.weight"]),
], ids=["tied_lm_head", "tied_embed_tokens", "norm", "gpt2_wte"])
def test_lora_export_of_modules_to_save_is_the_paca_model(tmp_path, kind, mts, written, tying, keys):
    """Issue 23 items 2 and 8: the LoRA export of ``modules_to_save`` loads in peft as the PaCA model. A tied head or
    embedding (the PaCA model trains the one matrix both use) is written with ``ensure_weight_tying`` and both keys
    (before: the other module stayed at the base value, logits off by 1.4 / 13); ``["norm"]``, which peft would match
    as a suffix of every layer norm (before: KeyError in PeftModel.from_pretrained), is written as ``model.norm``;
    GPT-2's ``wte``, whose tie peft keeps only when a name ends in ``lm_head`` or ``embed_tokens``, is written with
    both modules named. The merged export stays bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    (tiny_gpt2(seed=0) if kind == "gpt2" else tiny_llama(seed=0, tie=kind == "llama_tied")).save_pretrained(
        tmp_path / "base")
    base = str(tmp_path / "base")
    model = _trained_adapter(base, tmp_path / "adapter", r=4, paca_alpha=6, random_seed=2, modules_to_save=mts)
    assert _export(tmp_path / "adapter", "--to", "lora", "--output", tmp_path / "lora") == 0
    ids = random_ids(2, 12, seed=13, vocab=model.config.vocab_size)
    _check_lora(base, tmp_path / "lora", model, ids)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["modules_to_save"], cfg["ensure_weight_tying"]) == (written, tying)
    saved = sorted(k for k in load_file(str(tmp_path / "lora" / "adapter_model.safetensors")) if "lora_" not in k)
    assert saved == keys

    assert _export(tmp_path / "adapter", "--to", "merged", "--output", tmp_path / "merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(merged, ids), logits(model, ids))


def test_lora_export_conv1d(tmp_path):
    tiny_gpt2(seed=0).save_pretrained(tmp_path / "base")
    model = _trained_adapter(str(tmp_path / "base"), tmp_path / "adapter", r=4, paca_alpha=8)
    assert _export(tmp_path / "adapter", "--to", "lora", "--output", tmp_path / "lora") == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    _check_lora(str(tmp_path / "base"), tmp_path / "lora", model, random_ids(2, 12, seed=6))


def test_merged_export_fp32_is_bit_exact(llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter, model = llama
    assert _export(adapter, "--to", "merged", "--output", tmp_path / "merged", "--dtype", "fp32") == 0
    files = set(os.listdir(tmp_path / "merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "adapter_config.json" not in files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert loaded.dtype == torch.float32 and not any("delta" in k for k in loaded.state_dict())
    ids = random_ids(2, 12, seed=7, vocab=model.config.vocab_size)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    text = "What is 2 plus 3?"
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")(text).input_ids == AutoTokenizer.from_pretrained(base)(
        text).input_ids


def test_merged_export_bf16_is_the_fp32_merge_rounded_once(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter, model = llama
    assert _export(adapter, "--to", "merged", "--output", tmp_path / "merged", "--dtype", "bf16") == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype="auto").eval()
    assert loaded.dtype == torch.bfloat16
    reference = merge_paca(copy.deepcopy(model)).to(torch.bfloat16)
    got = loaded.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(got[key], value), key
    # what the rounding costs: bf16 logits against the fp32 PaCA model
    ids = random_ids(2, 12, seed=8, vocab=model.config.vocab_size)
    assert (logits(loaded, ids).float() - logits(model, ids)).abs().max().item() < 0.05


def _run_cli(capsys, *argv):
    code = _export(*argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_inputs_exit_2_with_one_line(llama, tmp_path, capsys):
    base, adapter, _ = llama
    code, err = _run_cli(capsys, tmp_path / "nope", "--to", "lora", "--output", tmp_path / "o1")
    assert code == 2 and "not found" in err and "\n" not in err
    assert _export(adapter, "--to", "lora", "--output", tmp_path / "lora") == 0
    code, err = _run_cli(capsys, tmp_path / "lora", "--to", "merged", "--output", tmp_path / "o2")
    assert code == 2 and "not a paca_hpu adapter" in err and "\n" not in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, err = _run_cli(capsys, adapter, "--to", "lora", "--output", tmp_path / "full")
    assert code == 2 and "not empty" in err and "\n" not in err
    code, err = _run_cli(capsys, adapter, "--to", "merged", "--output", tmp_path / "o3", "--base_model",
                         tmp_path / "no_model")
    assert code == 2 and "base model" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        _export(adapter, "--to", "lora", "--output", tmp_path / "o4", "--dtype", "int8")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "int8" in err and "\n" not in err
    # nothing half-written anywhere
    left = sorted(p for p in os.listdir(tmp_path) if p not in ("lora", "full"))
    assert left == [], left


def _damage(adapter, out, damage):
    """A copy of ``adapter`` with one defect: a layer's delta removed, one index -1, one index repeated, or 0xff
    bytes (NaN) in a delta's data with the file's header intact."""
    from safetensors.torch import load_file, save_file
    from test_adapter import _overwrite_data

    shutil.copytree(adapter, out)
    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = sorted(k[: -len(".indices")] for k in tensors if k.endswith(".indices"))[0]
    if damage == "garbled_delta":
        _overwrite_data(path, f"{first}.delta", float("nan"))
        return first
    idx = tensors[f"{first}.indices"].clone()
    if damage == "missing_layer":
        del tensors[f"{first}.delta"], tensors[f"{first}.indices"]
    elif damage == "negative_index":
        idx[0] = -1
    else:
        idx[1] = idx[0]
    if damage != "missing_layer":
        tensors[f"{first}.indices"] = idx
    save_file(tensors, str(path), metadata={"format": "pt"})
    return first


@pytest.mark.parametrize("damage", ["missing_layer", "negative_index", "repeated_index", "garbled_delta"])
@pytest.mark.parametrize("to", ["lora", "merged"])
def test_incomplete_or_corrupt_adapter_is_refused_by_both_exports(llama, tmp_path, capsys, damage, to):
    """Newcomer finding: ``--to lora`` wrote a LoRA without the missing layer, with index -1 wrapped to the last
    column, or with two equal one-hot rows (exit 0), where ``load_adapter`` and ``--to merged`` refuse. Both exports
    now refuse, one line naming the layer, exit 2, nothing written. Issue 23 item 9: NaN deltas from garbage in the
    data section were exported by both (exit 0); refused alike."""
    _, adapter, _ = llama
    layer = _damage(adapter, tmp_path / "bad", damage)
    code, err = _run_cli(capsys, tmp_path / "bad", "--to", to, "--output", tmp_path / "out")
    errors = [line for line in err.splitlines() if "error:" in line]  # transformers 5 may show a loading bar first
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert layer in errors[0], err
    assert not (tmp_path / "out").exists()


def test_base_model_and_dtype_options(tmp_path, capsys):
    """An adapter that records no base model (trained on a model built in memory): refused without --base_model, and
    with it both exports follow the named base; --dtype bf16 gives bf16 LoRA matrices (lora_A still exactly one-hot)."""
    from safetensors.torch import load_file

    tiny_llama(seed=0).save_pretrained(tmp_path / "base")  # the same weights as the model trained below
    trained = apply_paca(tiny_llama(seed=0), PaCAConfig(r=4, paca_alpha=6, random_seed=2))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in paca_layers(trained):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=gen) * 0.05)
    sync_paca(trained)
    trained.save_pretrained(tmp_path / "adapter")
    code, err = _run_cli(capsys, tmp_path / "adapter", "--to", "merged", "--output", tmp_path / "m0")
    assert code == 2 and "records no base model; pass --base_model" in err and not os.path.exists(tmp_path / "m0")

    base = str(tmp_path / "base")
    assert _export(tmp_path / "adapter", "--to", "merged", "--output", tmp_path / "merged", "--base_model", base) == 0
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key, value in merge_paca(copy.deepcopy(trained)).state_dict().items():
        assert key not in got or torch.equal(got[key], value), key
    assert {k for k in got if k.endswith("proj.weight")} == {n + ".weight" for n, _ in paca_layers(trained)}

    assert _export(tmp_path / "adapter", "--to", "lora", "--output", tmp_path / "lora", "--base_model", base,
                   "--dtype", "bf16") == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    lora = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    for name, layer in paca_layers(trained):
        a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(b, layer.delta.detach().to(torch.bfloat16))
        assert torch.equal(a.float(), torch.eye(layer.in_features)[layer.indices])


def _full_or_read_only(tmp_path, disk):
    """A folder on a read-only file system or on a nearly full one (a tmpfs where it can be mounted; a read-only
    folder is a chmod 555 one for a non-root user, whom it refuses alike)."""
    from test_safe_outputs import _mount_tmpfs

    folder = tmp_path / disk
    if disk == "read_only" and os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        return folder, False
    _mount_tmpfs(folder, "ro,size=64k" if disk == "read_only" else "size=1m")
    if disk == "full":
        with open(folder / "filler", "wb") as fh:
            fh.write(b"\0" * (shutil.disk_usage(folder).free - 4096))
    return folder, True


@pytest.mark.parametrize("disk", ["read_only", "full"])
@pytest.mark.parametrize("to", ["lora", "merged"])
def test_full_or_read_only_disk_is_one_line(llama, tmp_path, capsys, to, disk):
    """Both exports used to end in a traceback there (OSError Errno 30 from mkdtemp; safetensors' SafetensorError
    "No space left on device"); exit 2, one line, nothing left behind."""
    from test_safe_outputs import _umount

    folder, mounted = _full_or_read_only(tmp_path, disk)
    try:
        before = sorted(os.listdir(folder))
        code, err = _run_cli(capsys, llama[1], "--to", to, "--output", folder / "out")
        errors = [line for line in err.splitlines() if "error:" in line]  # transformers 5 may show a loading bar
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
        expected = ("cannot write" if disk == "read_only" else "no space left on the disk of") + f" '{folder / 'out'}'"
        assert expected in errors[0], err
        assert sorted(os.listdir(folder)) == before
    finally:
        if mounted:
            _umount(folder)
        elif disk == "read_only":
            folder.chmod(0o755)


def test_disk_full_while_writing_the_lora_file_is_one_line(llama, tmp_path, capsys, monkeypatch):
    """The same where no tmpfs can be mounted: safetensors' own error for a full disk, raised by its writer."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, err = _run_cli(capsys, llama[1], "--to", "lora", "--output", tmp_path / "out")
    assert code == 2 and err.startswith(f"python -m paca_hpu export: error: no space left on the disk of "
                                        f"'{tmp_path / 'out'}' (Error while serializing"), err
    assert os.listdir(tmp_path) == []


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "paca_hpu", "export", str(tmp_path / "missing"), "--to", "lora",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          cwd=REPO_DIR)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr


@pytest.mark.embedded_model
def test_exports_of_embedded_smollm2(embedded_checkpoint, tmp_path):
    """On the real model: LoRA (unmerged within 1e-4, merged bit for bit), merged fp32 bit for bit; file sizes."""
    from transformers import AutoModelForCausalLM

    model = _trained_adapter(embedded_checkpoint, tmp_path / "adapter", scale=0.01, r=8, paca_alpha=16)
    ids = random_ids(2, 16, seed=9, vocab=model.config.vocab_size)
    assert _export(tmp_path / "adapter", "--to", "lora", "--output", tmp_path / "lora") == 0
    err = _check_lora(embedded_checkpoint, tmp_path / "lora", model, ids)
    assert _export(tmp_path / "adapter", "--to", "merged", "--output", tmp_path / "merged", "--dtype", "fp32") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(merged, ids), logits(model, ids))
    paca_size = os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_size = os.path.getsize(tmp_path / "lora" / "adapter_model.safetensors")
    print(f"SmolLM2-135M r=8 all-linear: PaCA adapter {paca_size} B, LoRA export {lora_size} B "
          f"({lora_size / paca_size:.2f}x), unmerged LoRA max |logit diff| {err:.2e}")
    assert 1.8 < lora_size / paca_size < 2.1
