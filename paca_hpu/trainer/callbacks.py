"""Trainer callbacks: the PaCA write-back after optimizer steps PaCA's global step hook does not see
(:class:`_WriteBackGuard`, which asks :mod:`paca_hpu.writeback`), and the training throughput without warm-up,
evaluation and checkpoint time (:class:`ThroughputCallback`, :func:`side_seconds`, the host-side token count).
``PaCATrainerMixin`` below is :class:`paca_hpu.trainer.mixin.PaCATrainerMixin`, which adds the write-back guard and
counts the tokens.
"""

from __future__ import annotations

import logging
import time
from typing import Dict

import torch

from .. import device as _device
from .. import writeback as _wb
from .models import _unwrap

logger = logging.getLogger(__name__)


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback



class _WriteBackGuard(_callback_base()):
    """Writes back PaCA's merged columns (:func:`paca_hpu.writeback.write_back_model`) after each optimizer step that
    the global post-hook does not cover (:func:`paca_hpu.writeback.hook_covers`); a no-op with ordinary torch
    optimizers, so no double write-back."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._needed = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._needed = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = _unwrap(self.trainer.model)
        if self._needed is None:
            self._needed = not _wb.hook_covers(self.trainer.optimizer, model)
            if self._needed:
                logger.info("optimizer %s is not covered by PaCA's step hook: syncing PaCA weights after each step",
                            type(self.trainer.optimizer).__name__)
        if self._needed:
            _wb.write_back_model(model)


def side_seconds(trainer) -> Dict[str, float]:
    """Time a trainer with :class:`PaCATrainerMixin` spent off the optimizer steps so far (wall seconds, since it was
    built): ``{"evaluation": s, "evaluations": count of evaluate() calls, "checkpoint": s}``; zeros for any other
    trainer or ``None``."""
    return {"evaluation": float(getattr(trainer, "_paca_eval_seconds", 0.0)),
            "evaluations": int(getattr(trainer, "_paca_evals", 0)),
            "checkpoint": float(getattr(trainer, "_paca_checkpoint_seconds", 0.0))}


def _host_token_count(model, inputs) -> int:
    """Tokens of one micro-batch, padding included, read from the shape of its main input (``input_ids``): host-side
    metadata, no device synchronisation (0 when the batch has no such tensor)."""
    name = getattr(_unwrap(model), "main_input_name", "input_ids") if model is not None else "input_ids"
    value = inputs.get(name) if hasattr(inputs, "get") else None
    return int(value.numel()) if isinstance(value, torch.Tensor) else 0


def _counts_host_tokens(trainer) -> bool:
    """Whether ``trainer`` counts its input tokens on the host (a trainer with :class:`PaCATrainerMixin`, which marks
    itself with ``_paca_counts_tokens``; the mixin imports this module, so the mark stands for an ``isinstance``)."""
    return bool(getattr(trainer, "_paca_counts_tokens", False))


def _sum_over_ranks(trainer, value: int) -> int:
    """``value`` summed over the data-parallel ranks of ``trainer`` (one collective; the value itself when alone)."""
    args = getattr(trainer, "args", None)
    if args is None or getattr(args, "world_size", 1) <= 1:
        return int(value)
    total = trainer.accelerator.gather(torch.tensor([int(value)], dtype=torch.int64, device=args.device))
    return int(total.sum().item())


class ThroughputCallback(_callback_base()):
    """Training throughput without warm-up, evaluation and checkpoint time.

    Counts input tokens (padding included) on the host, from the shape of each micro-batch that
    :class:`PaCATrainerMixin` trains on (summed over the data-parallel ranks once, at the end), from the end of the
    first ``warmup_steps`` optimizer steps of this ``train()`` call (graph compilation on HPU) to its end; time spent
    in ``evaluate`` and ``_save_checkpoint`` meanwhile is subtracted (tracked by :class:`PaCATrainerMixin`). Other
    trainers: ``state.num_input_tokens_seen`` (``include_num_input_tokens_seen=True``, which ``GaudiTrainer``
    counts with a device all-gather and a host read after every micro-batch). The device is synchronised at both
    marks (queued device work belongs to the steps before the mark).  After training: ``tokens``, ``seconds``,
    ``steps``, ``tokens_per_second`` (``None`` when nothing was measured).
    """

    def __init__(self, trainer=None, warmup_steps: int = 0):
        self.trainer = trainer
        self.warmup_steps = max(0, int(warmup_steps))
        self.tokens = self.seconds = self.steps = self.tokens_per_second = None
        self._mark = None

    def _tokens(self, state) -> int:
        if _counts_host_tokens(self.trainer):
            return int(getattr(self.trainer, "_paca_tokens", 0))
        return int(state.num_input_tokens_seen)

    def _now(self, state):
        _device.synchronize()
        side = side_seconds(self.trainer)
        off_steps = side["evaluation"] + side["checkpoint"]
        return time.perf_counter(), off_steps, self._tokens(state), state.global_step

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_step = state.global_step
        self._mark = self._now(state) if self.warmup_steps == 0 else None

    def on_step_end(self, args, state, control, **kwargs):
        if self._mark is None and state.global_step - self._start_step >= self.warmup_steps:
            self._mark = self._now(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self._mark is None:
            return
        t1, side1, tok1, step1 = self._now(state)
        t0, side0, tok0, step0 = self._mark
        self.seconds = max(1e-9, (t1 - t0) - (side1 - side0))
        local = int(tok1 - tok0)
        self.tokens = _sum_over_ranks(self.trainer, local) if _counts_host_tokens(self.trainer) else local
        self.steps = int(step1 - step0)
        self.tokens_per_second = self.tokens / self.seconds if self.steps > 0 and self.tokens > 0 else None
