""":class:`PaCATrainerMixin`: what paca_hpu adds to a ``transformers.Trainer`` subclass (``GaudiTrainer`` or
``Trainer``): adapter-only PaCA checkpoints, atomic checkpoints and run lineage (:mod:`paca_hpu.checkpoints`), the
write-back callback, schedule-free optimizer modes, and the contexts its methods run in (a quantized PaCA base
accepted, evaluation under DeepSpeed before training, a plain CPU device, no empty parameter groups).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from typing import Optional, Tuple

import torch
from torch import nn

from .. import checkpoints as _ckpt
from .. import _optimum_habana as _oh
from .callbacks import _WriteBackGuard, _host_token_count
from .models import _unwrap, is_paca_model

logger = logging.getLogger(__name__)


def _drop_empty_param_groups(optimizer) -> None:
    """Remove parameter groups without parameters from a freshly built ``torch.optim.Optimizer`` (in place; before
    its first step nothing refers to a group by position). Other objects are left alone."""
    if isinstance(optimizer, torch.optim.Optimizer) and not optimizer.state:
        kept = [g for g in optimizer.param_groups if g["params"]]
        if kept and len(kept) < len(optimizer.param_groups):
            optimizer.param_groups[:] = kept


@contextlib.contextmanager
def _plain_cpu_device(args):
    """While inside, ``args.device`` is ``torch.device("cpu")`` if it is an indexed CPU device (``cpu:0``); restored
    on exit. ``TrainingArguments.device`` returns ``_setup_devices``, a transformers ``cached_property`` that keeps
    its value in the attribute ``__cached__setup_devices``."""
    device = args.device
    cache = "__cached__setup_devices"
    if device.type != "cpu" or device.index is None or getattr(args, cache, None) is not device:
        yield
        return
    setattr(args, cache, torch.device("cpu"))
    try:
        yield
    finally:
        setattr(args, cache, device)


def zero3_before_training(trainer) -> bool:
    """Whether ``trainer`` runs DeepSpeed ZeRO-3 and has no engine yet (nothing trained or evaluated so far)."""
    if not (getattr(trainer, "is_deepspeed_enabled", False) and getattr(trainer, "deepspeed", None) is None):
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


@contextlib.contextmanager
def _without_deepspeed_before_training(trainer):
    """Evaluation before ``train()`` under DeepSpeed: ZeRO stage 1 or 2 runs on the plain model; ZeRO-3 is noted.

    ``transformers.Trainer.evaluation_loop`` starts a DeepSpeed inference engine when no training engine exists yet,
    and DeepSpeed refuses that below stage 3 ("ZeRO inference only makes sense with ZeRO Stage 3"), so the held-out
    loss before training (what ``run_paca_clm`` reports) could not be measured. Below stage 3 every rank holds the
    whole model, so evaluating it without an engine gives the same loss. The model the evaluation registered with the
    accelerator is unregistered again, so the training engine built later is the accelerator's only model.
    Under ZeRO-3 the inference engine stays (the parameters are partitioned; only an engine can run them), and
    ``train()`` would reuse it and fail without a training engine (transformers 4.55: ``'NoneType' object has no
    attribute 'backward'``): :meth:`PaCATrainerMixin.train` refuses that with the fix (``eval_on_start``).
    """
    if not (getattr(trainer, "is_deepspeed_enabled", False) and getattr(trainer, "deepspeed", None) is None):
        yield
        return
    if zero3_before_training(trainer):
        trainer._paca_zero3_inference_engine = True
        yield
        return
    known = list(trainer.accelerator._models)
    trainer.is_deepspeed_enabled = False
    try:
        yield
    finally:
        trainer.is_deepspeed_enabled = True
        trainer.accelerator._models[:] = known



_MISSING = object()


@contextlib.contextmanager
def _quantized_base_accepted(model: Optional[nn.Module]):
    """transformers' ``Trainer.__init__`` refuses a quantized model (``model.is_quantized``) unless it is a peft
    ``PeftModel`` or carries adapters loaded through transformers' peft integration (``_hf_peft_config_loaded``)
    ("You cannot perform fine-tuning on purely quantized models"). A PaCA model on a 4-bit base (QPaCA) has trainable
    adapters, so for the duration of ``__init__`` only it is marked as such; the mark is removed again (it also
    changes what ``save_pretrained`` writes)."""
    inner = _unwrap(model) if model is not None else None
    mark = (inner is not None and getattr(inner, "is_quantized", False) and is_paca_model(inner)
            and not getattr(inner, "_hf_peft_config_loaded", False))
    saved = inner.__dict__.get("_hf_peft_config_loaded", _MISSING) if mark else _MISSING
    if mark:
        inner._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if mark:
            if saved is _MISSING:
                del inner.__dict__["_hf_peft_config_loaded"]
            else:
                inner._hf_peft_config_loaded = saved


class PaCATrainerMixin:
    """Adds to a ``transformers.Trainer`` subclass (``GaudiTrainer`` or ``Trainer``):

    * adapter-only checkpoints for PaCA models: ``_save`` through the model's own ``save_pretrained`` (the files a
      plain ``model.save_pretrained`` writes; :func:`_paca_save_state_dict`), resume (``_load_from_checkpoint``)
      and ``load_best_model_at_end`` (``_load_best_model``) through ``load_adapter``;
    * a PaCA write-back after every optimizer step that PaCA's global step hook does not see (DeepSpeed ZeRO style
      optimizers; see :class:`_WriteBackGuard`);
    * the Gaudi-only ``generation_config`` fields for the duration of ``train`` / ``evaluate`` / ``predict``
      (workaround 5 in :mod:`paca_hpu._optimum_habana`), hidden again while a checkpoint is written;
    * schedule-free optimizers (``optim="schedule_free_*"``, package ``schedulefree``) switched to train mode for
      each training step and to eval mode for evaluation / prediction, as ``transformers.Trainer`` does
      (optimum-habana 1.21's ``GaudiTrainer`` has those calls commented out, so ``step()`` raised "Optimizer was
      not in train mode"); the switches are idempotent, so ``transformers.Trainer``'s own calls are harmless;
    * atomic checkpoints for every method (:mod:`paca_hpu.checkpoints`): checkpoint ``N`` is written into
      ``tmp-checkpoint-N/`` and renamed to ``checkpoint-N`` when complete; a full disk raises
      :class:`paca_hpu.checkpoints.CheckpointWriteError` ("no space left on ...") and leaves no checkpoint folder;
    * run lineage: ``paca_run_id`` (the resumed checkpoint's, else a new one) is recorded in ``output_dir`` and in
      every checkpoint, and ``save_total_limit`` rotation and ``train(resume_from_checkpoint=True)`` consider only
      this run's checkpoints (an earlier run's ``checkpoint-N`` in the same ``output_dir`` is left alone).
    * PaCA on a bitsandbytes 4-bit base (QPaCA) passes transformers' "purely quantized model" check
      (:func:`_quantized_base_accepted`); on the CPU ``GaudiTrainer`` a bitsandbytes model's CPU-only
      ``hf_device_map`` is hidden during ``train`` / ``evaluate`` / ``predict`` (workaround 11 in
      :mod:`paca_hpu._optimum_habana`).

    LoRA (``PeftModel``) and full fine-tuning keep the base class's behaviour otherwise.
    """

    _paca_gen_fields_added: Tuple[str, ...] = ()
    #: :class:`paca_hpu.trainer.ThroughputCallback` reads the tokens ``training_step`` counts on the host
    _paca_counts_tokens: bool = True
    _paca_staging: Optional[str] = None
    #: Id of the run this trainer trains (set by ``train``); only the saving process's value is ever written.
    paca_run_id: Optional[str] = None

    def __init__(self, *args, **kwargs):
        with _quantized_base_accepted(kwargs.get("model", args[0] if args else None)):
            super().__init__(*args, **kwargs)
        self.add_callback(_WriteBackGuard(self))

    # -- optimizer train / eval mode (schedule-free optimizers) -----------------------------------
    def _optimizer_mode(self, mode: str) -> None:
        switch = getattr(self.optimizer, mode, None)  # AcceleratedOptimizer forwards train() / eval()
        if callable(switch):
            switch()

    def training_step(self, model, inputs, *args, **kwargs):
        self._optimizer_mode("train")
        self._paca_tokens = getattr(self, "_paca_tokens", 0) + _host_token_count(self.model, inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        self._optimizer_mode("eval")
        return super().evaluation_loop(*args, **kwargs)

    def prediction_loop(self, *args, **kwargs):
        self._optimizer_mode("eval")
        return super().prediction_loop(*args, **kwargs)

    def create_optimizer(self):
        """The base class's optimizer without empty parameter groups.

        ``transformers.Trainer.create_optimizer`` always builds a weight-decay and a no-decay group; with adapters
        (PaCA ``delta``, LoRA ``lora_A``/``lora_B``: no biases or norms trainable) the no-decay group is empty.
        DeepSpeed ZeRO drops empty groups from the optimizer it wraps, while the LR scheduler built on the trainer's
        optimizer keeps one learning rate per original group, so the first ``lr_scheduler.step()`` fails with
        ``zip() argument 2 is longer than argument 1`` (transformers 4.55, torch 2.13). ``GaudiTrainer`` already
        filters empty groups (for its FusedAdamW); this does the same for ``transformers.Trainer``.
        """
        optimizer = super().create_optimizer()
        _drop_empty_param_groups(optimizer)
        return optimizer

    # -- generation_config fields (workaround 5) --------------------------------------------------
    def _with_gen_fields(self, fn, *args, **kwargs):
        cpu_gaudi = hasattr(self.args, "use_habana") and not self.args.use_habana
        with _oh.gaudi_generation_fields(self.model) as added, \
                (_oh.hidden_cpu_device_map(self.model) if cpu_gaudi else contextlib.nullcontext()):
            outer = self._paca_gen_fields_added
            if added:
                self._paca_gen_fields_added = tuple(added)
            try:
                return fn(*args, **kwargs)
            finally:
                self._paca_gen_fields_added = outer

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if getattr(self, "_paca_zero3_inference_engine", False):
            raise RuntimeError(
                "this trainer evaluated before training under DeepSpeed ZeRO-3, which left it a DeepSpeed inference "
                "engine that train() cannot train with (transformers 4.55 fails with \"'NoneType' object has no "
                "attribute 'backward'\"): evaluate before training with TrainingArguments(eval_on_start=True) "
                "instead, or build a new trainer for training")
        resume_from_checkpoint = self._begin_run(resume_from_checkpoint)
        return self._with_gen_fields(super().train, resume_from_checkpoint, *args, **kwargs)

    # -- run lineage and atomic checkpoints (paca_hpu.checkpoints) ---------------------------------
    def _begin_run(self, resume_from_checkpoint):
        """Resolve ``True`` to this output_dir's latest run's newest complete checkpoint, take over the run id of
        the checkpoint resumed (else a new one), detach that run's checkpoints beyond the one resumed
        (:func:`paca_hpu.checkpoints.detach_abandoned`), record the run id in ``output_dir`` and clear staging folders
        left by a killed save.  Returns the checkpoint to resume from (or None)."""
        out = self.args.output_dir
        if resume_from_checkpoint is True:
            resume_from_checkpoint = _ckpt.last_checkpoint(out) if os.path.isdir(out) else None
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({out})")
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        inherited = _ckpt.read_run_id(resume_from_checkpoint) if resume_from_checkpoint else None
        self.paca_run_id = inherited or _ckpt.new_run_id()
        if self.args.should_save:
            os.makedirs(out, exist_ok=True)
            for _step, staging in _ckpt.staging_dirs_in(out):
                shutil.rmtree(staging, ignore_errors=True)
            if inherited:
                for path in _ckpt.detach_abandoned(out, inherited, resume_from_checkpoint):
                    logger.warning("'%s' was trained past the checkpoint this run resumes from; it is kept, but is "
                                   "no longer part of this run ('last' will not resume it, rotation will not delete "
                                   "it)", path)
            _ckpt.write_run_id(out, self.paca_run_id)
        return resume_from_checkpoint

    def _get_output_dir(self, trial):
        if self._paca_staging is not None:  # inside _save_checkpoint: the base class writes into the staging folder
            return self._paca_staging
        return super()._get_output_dir(trial)

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        # transformers <= 4.x rotates through this method (transformers 5 through trainer_utils.rotate_checkpoints,
        # which then only sees the staging folder): this run's checkpoints only, after the new one is in place
        if self._paca_staging is None:
            _ckpt.rotate(output_dir or self.args.output_dir, self.paca_run_id, self.args.save_total_limit,
                         self.state.best_model_checkpoint)

    def _sorted_checkpoints(self, output_dir=None, checkpoint_prefix="checkpoint", use_mtime=False):
        found = super()._sorted_checkpoints(output_dir=output_dir, checkpoint_prefix=checkpoint_prefix,
                                            use_mtime=use_mtime)
        if self.paca_run_id is None:
            return found
        return [path for path in found if _ckpt.read_run_id(path) == self.paca_run_id]

    def _save_checkpoint_atomic(self, model, trial, *args, **kwargs):
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        staging = _ckpt.staging_dir(final)
        if self.paca_run_id is None:
            self.paca_run_id = _ckpt.new_run_id()
        if self.args.should_save and os.path.lexists(staging):
            shutil.rmtree(staging)
        self._paca_staging = staging
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
            self._paca_staging = None
            self._publish_checkpoint(staging, final, run_dir)
        except BaseException as err:
            self._paca_staging = None
            full = _ckpt.is_disk_full(err, run_dir)  # before the cleanup frees the space again
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if full:
                raise _ckpt.CheckpointWriteError(
                    errno.ENOSPC, f"no space left on {run_dir} while writing {os.path.basename(final)} (the partial "
                                  "checkpoint was removed); free some space or pass an --output_dir on another "
                                  "disk") from err
            raise

    def _publish_checkpoint(self, staging: str, final: str, run_dir: str) -> None:
        """Rename the finished ``staging/checkpoint-N`` to ``final`` (saving process only, after all ranks wrote),
        then rotate this run's checkpoints."""
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
        if self.args.should_save:
            inner = os.path.join(staging, os.path.basename(final))
            best = self.state.best_model_checkpoint
            if best and os.path.abspath(best).startswith(os.path.abspath(staging) + os.sep):
                # the base class saw the checkpoint under its staging name: record its final name
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                if _ckpt.is_complete(inner):
                    self.state.save_to_json(os.path.join(inner, _ckpt.TRAINER_STATE_NAME))
            _ckpt.write_run_id(inner, self.paca_run_id)
            _ckpt.publish(staging, final)
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _ckpt.rotate(run_dir, self.paca_run_id, self.args.save_total_limit, self.state.best_model_checkpoint)

    def evaluate(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            with _without_deepspeed_before_training(self):
                return self._with_gen_fields(super().evaluate, *args, **kwargs)
        finally:
            self._paca_eval_seconds = getattr(self, "_paca_eval_seconds", 0.0) + time.perf_counter() - t0
            self._paca_evals = getattr(self, "_paca_evals", 0) + 1

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._save_checkpoint_atomic(model, trial, *args, **kwargs)
        finally:
            self._paca_checkpoint_seconds = getattr(self, "_paca_checkpoint_seconds", 0.0) + time.perf_counter() - t0

    def predict(self, *args, **kwargs):
        return self._with_gen_fields(super().predict, *args, **kwargs)

    # -- saving ----------------------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        model = _unwrap(self.model)
        if is_paca_model(model):
            state_dict = _paca_save_state_dict(model, state_dict)
        with _oh.hidden_generation_fields(model, self._paca_gen_fields_added):
            return super()._save(output_dir, state_dict=state_dict)

    # -- loading ---------------------------------------------------------------------------------
    def _load_optimizer_and_scheduler(self, checkpoint):
        """Upstream's, with ``args.device`` read as plain ``cpu`` while it runs on CPU processes.

        Under ``torchrun`` on CPU ``args.device`` is ``cpu:0``, and both ``transformers.Trainer`` and ``GaudiTrainer``
        load the optimizer state with ``torch.load(..., map_location=args.device)`` in multi-process runs, which torch
        2.13 rejects (``don't know how to restore data location ... (tagged with cpu:0)``), so no multi-process CPU
        run could resume. Upstream: ``_load_optimizer_and_scheduler`` of both trainers.
        """
        with _plain_cpu_device(self.args):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        if is_paca_model(target):
            from .. import load_adapter

            logger.info("Resuming PaCA adapter from %s", resume_from_checkpoint)
            load_adapter(_unwrap(target), resume_from_checkpoint)  # in place: the optimizer's deltas are kept
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def _load_best_model(self):
        if is_paca_model(self.model) and self.state.best_model_checkpoint:
            from .. import load_adapter

            logger.info("Loading best PaCA adapter from %s", self.state.best_model_checkpoint)
            load_adapter(_unwrap(self.model), self.state.best_model_checkpoint)
            return None
        return super()._load_best_model()


def _paca_save_state_dict(model: nn.Module, state_dict):
    """What ``PaCATrainerMixin._save`` hands the base class's ``_save`` as ``state_dict`` for a PaCA model, whose
    ``save_pretrained`` (:func:`paca_hpu.adapter.save_pretrained`) the base class then calls: of a state dict
    DeepSpeed / FSDP gathered, only the adapter's tensors (``GaudiTrainer._save`` copies every tensor it is given
    to the CPU); without one, ``{}``: ``_save`` runs on the saving process only, so nothing may be gathered there
    (a collective would wait for the other ranks forever), and with ``{}`` a partitioned tensor is an error instead
    (a ``None`` would also make ``GaudiTrainer._save`` copy the whole ``model.state_dict()``).

    Raises:
        TypeError: ``model`` is no transformers ``PreTrainedModel``: the base class would save its state dict itself,
            not through ``save_pretrained``.
    """
    from transformers import PreTrainedModel

    from ..adapter import adapter_state_dict_keys

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"a PaCA {type(model).__name__} is no transformers PreTrainedModel: the Trainer would save its "
                        "whole state dict instead of the adapter; train a transformers model (AutoModelForCausalLM), "
                        "or save with paca_hpu.save_adapter yourself")
    if state_dict is None:
        return {}
    keys = adapter_state_dict_keys(model)
    return {k: v for k, v in state_dict.items() if k in keys}

