"""Collation of tokenised examples into padded int64 tensors (:class:`PaddingCollator`, :func:`make_data_collator`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .tokenization import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """Right-pads a list of tokenised examples into int64 tensors of shape ``(batch, length)``.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with -100 (an example
    without ``labels`` gets ``labels = input_ids``). ``length`` is ``pad_to_max_length`` when set (static shapes
    for HPU graphs / lazy mode), else the longest example of the batch. Padding is always on the right,
    whatever ``tokenizer.padding_side`` says, so position ids stay 0, 1, 2, ... for training.
    """

    pad_token_id: int
    pad_to_max_length: int | None = None
    label_pad_token_id: int = IGNORE_INDEX

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        longest = max(lengths)
        if self.pad_to_max_length is not None:
            if longest > self.pad_to_max_length:
                raise ValueError(
                    f"an example has {longest} tokens, more than pad_to_max_length={self.pad_to_max_length}; "
                    "tokenize with max_seq_len <= pad_to_max_length"
                )
            length = self.pad_to_max_length
        else:
            length = longest
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), self.label_pad_token_id, dtype=torch.long)
        for row, (f, n) in enumerate(zip(features, lengths)):
            if n == 0:
                continue
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask = f.get("attention_mask")
            attention_mask[row, :n] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
            lab = f.get("labels")
            labels[row, :n] = input_ids[row, :n] if lab is None else torch.as_tensor(lab, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_data_collator(tokenizer, pad_to_max_length: int | None = None) -> PaddingCollator:
    """Collator for :func:`tokenize_datasets` output (see :class:`PaddingCollator`).

    Args:
        tokenizer: supplies ``pad_token_id`` (for the embedded SmolLM2: 2, ``<|im_end|>``). Padded positions have
            attention_mask 0 and label -100, so the pad id itself never affects the loss.
        pad_to_max_length: pad every batch to exactly this many tokens (static shapes); ``None`` pads to the
            longest example of each batch (faster on CPU).

    Raises:
        ValueError: the tokenizer has no pad token (fix: ``tokenizer.pad_token = tokenizer.eos_token``);
            ``pad_to_max_length < 1``.
    """
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise ValueError("The tokenizer has no pad token. Fix: tokenizer.pad_token = tokenizer.eos_token")
    if pad_to_max_length is not None and int(pad_to_max_length) < 1:
        raise ValueError(f"pad_to_max_length must be >= 1 or None, got {pad_to_max_length}")
    return PaddingCollator(
        pad_token_id=int(pad_id), pad_to_max_length=None if pad_to_max_length is None else int(pad_to_max_length)
    )
