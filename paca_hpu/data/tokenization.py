"""Tokenisation with response-only labels, and packing into fixed-length blocks (:func:`tokenize_datasets`,
:func:`pack_dataset`)."""

from __future__ import annotations

import logging
from typing import Sequence

import datasets

from .chat import FALLBACK_CHAT_TEMPLATE, chat_segments
from .layouts import LAYOUT_ALPACA, LAYOUT_TEXT, SUPPORTED_LAYOUTS, check_rows, detect_layout, example_to_messages

logger = logging.getLogger(__package__)  # "paca_hpu.data": one logger for the whole data pipeline

IGNORE_INDEX = -100


def _leading_special_ids(tokenizer) -> list[int]:
    """Ids the tokenizer puts in front of a text by default (e.g. Llama's BOS); [] for SmolLM2."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(plain)
    for start in range(len(with_special) - n + 1):
        if with_special[start : start + n] == plain:
            return list(with_special[:start])
    return []



def _has_loss(labels: Sequence[int]) -> bool:
    # A causal LM predicts token t from tokens < t, so a label at position 0 never contributes to the loss.
    return any(label != IGNORE_INDEX for label in labels[1:])


def _make_tokenize_fn(tokenizer, layout: str, max_seq_len: int | None, train_on_inputs: bool = False,
                      chat_prompt: bool = False):
    """Batched map function; ``max_seq_len=None`` means no truncation."""
    if layout == LAYOUT_TEXT:
        eos_id = tokenizer.eos_token_id

        def tokenize_text(batch):
            enc = tokenizer(list(batch["text"]), add_special_tokens=True)
            ids_list = []
            for ids in enc["input_ids"]:
                ids = list(ids)
                if eos_id is not None and (not ids or ids[-1] != eos_id):
                    ids.append(eos_id)  # document separator, as optimum-habana's run_lora_clm.py does
                ids_list.append(ids[:max_seq_len])
            return {
                "input_ids": ids_list,
                "attention_mask": [[1] * len(ids) for ids in ids_list],
                "labels": [list(ids) for ids in ids_list],
            }

        return tokenize_text

    chat_template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    prefix_ids = _leading_special_ids(tokenizer) if chat_template is not None else []
    columns = [c for c in (*SUPPORTED_LAYOUTS[layout][0], *SUPPORTED_LAYOUTS[layout][1])]

    def tokenize_chat(batch):
        n = len(batch[next(iter(batch))])
        per_example = []
        for j in range(n):
            example = {c: batch[c][j] for c in columns if c in batch}
            messages = example_to_messages(example, layout, chat_prompt)
            if not any(m["role"] == "assistant" for m in messages):
                per_example.append([])  # nothing to learn: becomes an empty example, dropped below
                continue
            per_example.append(chat_segments(tokenizer, messages, chat_template))
        texts = [text for segs in per_example for text, _ in segs]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        k = 0
        for segs in per_example:
            ids = list(prefix_ids)
            labels = list(prefix_ids) if train_on_inputs else [IGNORE_INDEX] * len(prefix_ids)
            for _text, trained in segs:
                piece = list(encoded[k])
                k += 1
                ids += piece
                labels += piece if (trained or train_on_inputs) else [IGNORE_INDEX] * len(piece)
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    return tokenize_chat


def pack_dataset(ds: datasets.Dataset, max_seq_len: int) -> datasets.Dataset:
    """Concatenate all examples of ``ds`` (columns input_ids / attention_mask / labels, in order) and cut the
    stream into blocks of exactly ``max_seq_len`` tokens; the last partial block is dropped. This is what
    optimum-habana's ``run_lora_clm.py --dataset_concatenation`` does (the whole split at once). Labels keep
    their ``-100`` masks; attention_mask is all ones (blocks attend across example boundaries, as there).
    """

    def group(batch):
        out = {}
        for col in ("input_ids", "attention_mask", "labels"):
            flat = [t for seq in batch[col] for t in seq]
            nblocks = len(flat) // max_seq_len
            out[col] = [flat[i * max_seq_len : (i + 1) * max_seq_len] for i in range(nblocks)]
        return out

    return ds.map(group, batched=True, batch_size=None, remove_columns=ds.column_names, desc="Packing")


def tokenize_datasets(
    raw: datasets.DatasetDict,
    tokenizer,
    max_seq_len: int,
    dataset_concatenation: bool = False,
    train_on_inputs: bool = False,
    chat_prompt: bool = False,
) -> datasets.DatasetDict:
    """Tokenise every split of ``raw`` into ``input_ids``, ``attention_mask``, ``labels`` (lists of int; the
    original columns are removed).

    * Instruction layouts (everything except ``"text"``) are rendered with ``tokenizer.apply_chat_template``
      (user turn = prompt, assistant turn = response; see :func:`chat_segments`) and tokenised piece by piece
      with ``add_special_tokens=False``, so the prompt tokens are exactly those of
      ``apply_chat_template(prompt, add_generation_prompt=True)`` (as at inference). ``labels`` equal
      ``input_ids`` on the response tokens and the closing end-of-turn token (``<|im_end|>``, id 2, for
      SmolLM2) and are ``-100`` on every prompt / system / template token (including the ``"\\n"`` after
      ``<|im_end|>``). A tokenizer without a chat template uses :data:`FALLBACK_CHAT_TEMPLATE`.
      ``train_on_inputs=True`` (optimum-habana ``run_lora_clm.py``'s default) puts the loss on every token instead:
      ``labels == input_ids`` (up to the end of the last assistant turn). ``chat_prompt=True``: see
      :func:`example_to_messages`.
    * ``"text"``: ``tokenizer(text)`` (default special tokens) plus ``eos_token`` as document end; loss on all
      tokens.
    * ``dataset_concatenation=False``: each example is truncated to ``max_seq_len`` tokens (right side).
      ``dataset_concatenation=True``: examples are not truncated; every split is packed with
      :func:`pack_dataset` into blocks of exactly ``max_seq_len`` tokens (the last partial block is dropped), so
      a long example continues into the next block instead of losing its tail.
    * Examples with no trained token after position 0 (a prompt longer than ``max_seq_len``, an empty text) are
      dropped before packing, with a log message.

    Args:
        raw: splits to tokenise (typically ``"train"`` and ``"validation"``); the layout is detected per split.
        tokenizer: a ``transformers`` tokenizer (a fast one is much quicker).
        max_seq_len: maximum / block length in tokens, > 1.

    Raises:
        ValueError: unknown layout (see :func:`detect_layout`); ``max_seq_len < 2``; packing a non-empty split
            yields no full block (use a smaller ``max_seq_len`` or ``dataset_concatenation=False``).
    """
    max_seq_len = int(max_seq_len)
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    out = {}
    for split, ds in raw.items():
        layout = detect_layout(ds.column_names)
        if chat_prompt and layout != LAYOUT_ALPACA:
            logger.warning("chat_prompt only changes instruction/input/output rows (run_lora_clm.py's Query/Content "
                           "prompt); %s rows of split %r are rendered with the chat template as always", layout, split)
        ds = check_rows(ds, split)
        fn = _make_tokenize_fn(tokenizer, layout, None if dataset_concatenation else max_seq_len, train_on_inputs,
                               chat_prompt)
        tok = ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split} ({layout})")
        n_before = len(tok)
        tok = tok.filter(lambda b: [_has_loss(lab) for lab in b["labels"]], batched=True, desc="Dropping empty")
        if len(tok) < n_before:
            logger.warning(
                "%s: dropped %d of %d examples with no trained token within max_seq_len=%d",
                split, n_before - len(tok), n_before, max_seq_len,
            )
        if dataset_concatenation and len(tok) > 0:
            n_examples = len(tok)
            tok = pack_dataset(tok, max_seq_len)
            if len(tok) == 0:
                raise ValueError(
                    f"Packing split {split!r} ({n_examples} examples) into blocks of {max_seq_len} tokens gave no "
                    "full block; use a smaller max_seq_len, more examples, or dataset_concatenation=False."
                )
        out[split] = tok
    return datasets.DatasetDict(out)
