"""Benchmark inputs: tokenizer and fixed-shape batches of real text.

Every variant sees exactly the same batches in the same order. The data is the project's default data set
(:func:`paca_hpu.data.load_raw_datasets`: the embedded GSM8K with its fixed held-out split), formatted with the
chat template, response-only labels, and packed into blocks of exactly ``seq_len`` tokens
(:func:`paca_hpu.data.tokenize_datasets` with ``dataset_concatenation=True``), so every batch is ``(batch,
seq_len)`` with no padding.

The ``--tiny`` / ``--model_config`` models (random weights, built in-process) use a byte-level tokenizer built
in-process (256 byte tokens + ``<|im_start|>`` / ``<|im_end|>``), so the smoke test needs neither the embedded
model's conversion nor network access, yet still runs the same data pipeline on the same GSM8K text.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

__all__ = ["byte_level_tokenizer", "load_tokenizer", "packed_splits", "fixed_batches", "token_stream",
           "BYTE_VOCAB_SIZE"]

#: 256 byte tokens + <|im_start|> (256) + <|im_end|> (257), rounded up.
BYTE_VOCAB_SIZE = 260

_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer():
    """A ``PreTrainedTokenizerFast`` over UTF-8 bytes (ids 0-255), ``<|im_start|>`` = 256, ``<|im_end|>`` = 257
    (eos = pad), with a ChatML chat template without system prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ids follow the byte values: map each byte to its printable ByteLevel character (the GPT-2 table; its home
    # in transformers 4.x and 5.x alike)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token=None, model_max_length=1 << 20)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert tok.convert_tokens_to_ids("<|im_start|>") == 256 and tok.convert_tokens_to_ids("<|im_end|>") == 257
    tok.chat_template = _CHATML
    return tok


def load_tokenizer(spec):
    """The tokenizer for :class:`~benchmarks.variants.ModelSpec` ``spec`` (a Hub id: local cache first).

    Raises:
        paca_hpu.hub.ModelSourceError: a Hub id neither cached nor reachable (one line)."""
    if spec.random_init:
        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    from paca_hpu.hub import from_pretrained_cache_first

    tok = from_pretrained_cache_first(AutoTokenizer.from_pretrained, spec.resolved_path())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def packed_splits(tokenizer, seq_len: int, max_train_samples: Optional[int] = None,
                  max_eval_samples: Optional[int] = None):
    """``DatasetDict(train, validation)`` of blocks of exactly ``seq_len`` tokens (input_ids / attention_mask /
    labels), from the project's default data (embedded GSM8K, fixed held-out split)."""
    from paca_hpu.data import load_raw_datasets, tokenize_datasets

    raw = load_raw_datasets(max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)
    packed = tokenize_datasets(raw, tokenizer, seq_len, dataset_concatenation=True)
    # a block made only of prompt tokens has no trained label (its loss would be NaN): drop it
    return packed.filter(lambda b: [any(t != -100 for t in lab[1:]) for lab in b["labels"]], batched=True,
                         desc="Dropping blocks without labels")


def _collate(rows: List[Dict[str, list]]) -> Dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")}


def fixed_batches(ds, batch: int, count: int, seed: int = 0, shuffle: bool = True) -> List[Dict[str, torch.Tensor]]:
    """``count`` batches of ``batch`` blocks, drawn in a fixed order (a seeded permutation of ``ds``, repeated
    if ``ds`` is too small)."""
    n = len(ds)
    if n == 0:
        raise ValueError("no packed blocks: use a smaller seq_len")
    gen = torch.Generator().manual_seed(seed)
    order: List[int] = []
    while len(order) < batch * count:
        order += (torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n)))
    return [_collate([ds[i] for i in order[b * batch:(b + 1) * batch]]) for b in range(count)]


def all_batches(ds, batch: int) -> List[Dict[str, torch.Tensor]]:
    """Every block of ``ds`` in order, in batches of ``batch`` (the last may be smaller)."""
    return [_collate([ds[i] for i in range(s, min(s + batch, len(ds)))]) for s in range(0, len(ds), batch)]


def token_stream(ds, length: int) -> Dict[str, torch.Tensor]:
    """One ``(1, length)`` batch cut from the concatenation of ``ds``'s blocks (repeated if needed); used for
    the longest-sequence search, where ``length`` exceeds the block length."""
    ids: List[int] = []
    labels: List[int] = []
    i = 0
    while len(ids) < length:
        row = ds[i % len(ds)]
        ids += row["input_ids"]
        labels += row["labels"]
        i += 1
    return {"input_ids": torch.tensor([ids[:length]]), "attention_mask": torch.ones(1, length, dtype=torch.long),
            "labels": torch.tensor([labels[:length]])}
