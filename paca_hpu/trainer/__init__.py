"""Trainer integration: the right Hugging Face trainer for the device, with adapter-only PaCA checkpoints.

Device -> trainer (the device is decided by :mod:`paca_hpu.device`):

* HPU  -> optimum-habana ``GaudiTrainer`` + ``GaudiTrainingArguments(use_habana=True, use_lazy_mode=...)`` +
  ``GaudiConfig(use_fused_adam=True, use_fused_clip_norm=True)``.
* CPU  -> where optimum-habana is installed (the ``gaudi`` extra), the same ``GaudiTrainer`` with ``use_cpu=True,
  use_habana=False, use_lazy_mode=False`` (optimum-habana's CPU path: it runs the Gaudi training loop without an
  HPU; see :mod:`paca_hpu._optimum_habana` for what that takes); elsewhere (e.g. transformers 5.x, which
  optimum-habana 1.21 does not support) plain ``transformers.Trainer``.
* CUDA -> plain ``transformers.Trainer`` (``GaudiTrainer`` has no CUDA path).

The same code runs three fine-tuning methods (``peft_type``): ``"paca"`` (this package), ``"lora"`` (peft
0.21.2 ``LoraConfig``, same rank / alpha / target modules, dropout 0 by default) and ``"none"`` (full fine-tuning).

With PaCA the trainer writes adapter-only checkpoints through the base class's ``_save``, which calls the model's
own ``save_pretrained`` (:func:`paca_hpu.adapter.save_pretrained`: the adapter files plus ``model.safetensors``, the
same bytes), so a checkpoint holds the files a plain ``model.save_pretrained`` writes, plus the usual trainer /
optimizer / scheduler / RNG state, never the base weights.  Resuming (``trainer.train(resume_from_checkpoint=...)``)
and ``load_best_model_at_end`` load the adapter into the adapted model with :func:`paca_hpu.load_adapter`, the
reader of :func:`paca_hpu.from_pretrained` (in place: the ``delta`` Parameters the optimizer holds are kept, the
merged weight columns rewritten), so training continues exactly where it stopped.

The package's files, following optimum-habana's trainer / training-arguments split:

* :mod:`.arguments`: training arguments per device (:func:`arguments_class`, :func:`adjust_for_device`,
  :func:`build_training_arguments`) and the checks on them (:func:`check_engine`, :func:`check_hpu_graphs_args`,
  :func:`weight_partitioning_engine`, :func:`start_deepspeed_comm`);
* :mod:`.models`: :func:`prepare_model`, :func:`paca_config`, :func:`is_paca_model`, :func:`save_merged_model`;
* :mod:`.mixin`: :class:`PaCATrainerMixin`, the methods it overrides and the contexts they run in;
* :mod:`.callbacks`: the write-back guard, :class:`ThroughputCallback`, :func:`side_seconds`;
* here: :func:`trainer_class` (the mixin over ``GaudiTrainer`` or ``transformers.Trainer``), :func:`make_trainer`,
  :func:`resolve_checkpoint`.

Of PaCA itself the package uses the public API (``PaCAConfig``, ``apply_paca``, ``calibrate_indices``,
``paca_parameters``, ``load_adapter``, ``merge_paca``) plus :func:`paca_hpu.adapter.adapter_state_dict_keys`,
:func:`paca_hpu.distributed.unwrap` and :func:`paca_hpu.layer.quantized4bit.prevent_cpu_repack`; besides, it
imports :mod:`paca_hpu.checkpoints`, :mod:`paca_hpu.device`, :mod:`paca_hpu.hpu_graphs` and
:mod:`paca_hpu._optimum_habana`. After the optimizer steps that PaCA's global write-back hook does not see, the
write-back guard (:mod:`.callbacks`) asks :mod:`paca_hpu.writeback` to write back
(:func:`~paca_hpu.writeback.hook_covers`, :func:`~paca_hpu.writeback.write_back_model`).
"""

from __future__ import annotations

from typing import Dict, Optional, Union

from torch import nn

from .. import checkpoints as _ckpt
from .. import device as _device
from .. import _optimum_habana as _oh
from .arguments import (adjust_for_device, arguments_class, build_training_arguments, check_engine,
                        check_hpu_graphs_args, start_deepspeed_comm, weight_partitioning_engine)
from .callbacks import ThroughputCallback, side_seconds
from .mixin import PaCATrainerMixin, zero3_before_training
from .models import PEFT_TYPES, _fp32_delta_gradients, is_paca_model, paca_config, prepare_model, save_merged_model

# where they were before the split (the tests import them from here)
from .callbacks import _WriteBackGuard  # noqa: F401
from .models import _unwrap  # noqa: F401

__all__ = [
    "PEFT_TYPES",
    "is_paca_model",
    "paca_config",
    "prepare_model",
    "arguments_class",
    "adjust_for_device",
    "build_training_arguments",
    "make_trainer",
    "check_engine",
    "check_hpu_graphs_args",
    "weight_partitioning_engine",
    "start_deepspeed_comm",
    "zero3_before_training",
    "trainer_class",
    "PaCATrainerMixin",
    "save_merged_model",
    "resolve_checkpoint",
    "ThroughputCallback",
    "side_seconds",
]


def resolve_checkpoint(resume_from_checkpoint: Union[str, bool, None], output_dir: str) -> Optional[str]:
    """``True`` / ``"true"`` / ``"last"`` -> the newest complete checkpoint of the latest run in ``output_dir``; a
    path is checked and kept (see :func:`paca_hpu.checkpoints.resolve_checkpoint`).

    Raises:
        FileNotFoundError: asked for the last checkpoint but there is none, the path does not exist, or it is no
            complete Trainer checkpoint (no ``trainer_state.json``).
    """
    return _ckpt.resolve_checkpoint(resume_from_checkpoint, output_dir)



_TRAINER_CLASSES: Dict[str, type] = {}


def trainer_class(kind: str) -> type:
    """``"gaudi"`` -> ``PaCAGaudiTrainer`` (optimum-habana ``GaudiTrainer`` + mixin); ``"hf"`` -> ``PaCATrainer``."""
    if kind in _TRAINER_CLASSES:
        return _TRAINER_CLASSES[kind]
    if kind == "gaudi":
        GaudiTrainer, _, _ = _oh.gaudi_classes()

        class PaCAGaudiTrainer(PaCATrainerMixin, GaudiTrainer):
            """``GaudiTrainer`` with adapter-only PaCA checkpoints; also runs without an HPU (``use_cpu=True``), on
            several CPU processes data-parallel (workaround 10 in :mod:`paca_hpu._optimum_habana`)."""

            def create_accelerator_and_postprocess(self):
                super().create_accelerator_and_postprocess()
                _oh.wrap_ddp_on_multi_cpu(self.accelerator)

            def train(self, *args, **kwargs):
                # before upstream's train() swaps in its lazy-mode checkpoint function process-wide
                check_hpu_graphs_args(self.args)
                return super().train(*args, **kwargs)

            def _wrap_model(self, model, training=True, dataloader=None):
                # HPU graphs for training: upstream wraps the model with ModuleCacher here; the guard
                # (paca_hpu.hpu_graphs) then runs before every call, outside the replayed graph
                wrapped = super()._wrap_model(model, training=training, dataloader=dataloader)
                if training and getattr(self.args, "use_hpu_graphs_for_training", False):
                    from ..hpu_graphs import guard_hpu_graphs

                    guard_hpu_graphs(model)
                return wrapped

            def log(self, logs: Dict[str, float], start_time: Optional[float] = None, end_time: Optional[float] = None):
                # Workaround 6: upstream GaudiTrainer.log() calls get_hpu_memory_stats(), which imports
                # habana_frameworks; off HPU do the same bookkeeping with paca_hpu.device's memory numbers.
                if self.args.use_habana:
                    return super().log(logs, start_time=start_time, end_time=end_time)
                if self.state.epoch is not None:
                    logs["epoch"] = self.state.epoch
                if self.args.include_num_input_tokens_seen:
                    logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
                    if start_time is not None and end_time is not None:
                        from optimum.habana.utils import speed_metrics

                        logs.update(
                            speed_metrics("train", start_time, end_time, num_tokens=self.state.num_input_tokens_seen)
                        )
                logs.update(_device.memory_stats(self.args.device.type))
                output = {**logs, **{"step": self.state.global_step}}
                self.state.log_history.append(output)
                self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

        cls = PaCAGaudiTrainer
    elif kind == "hf":
        from transformers import Trainer

        class PaCATrainer(PaCATrainerMixin, Trainer):
            """``transformers.Trainer`` with adapter-only PaCA checkpoints (CUDA, or CPU without optimum-habana)."""

        cls = PaCATrainer
    else:
        raise ValueError(f"trainer kind must be 'gaudi' or 'hf', got {kind!r}")
    _TRAINER_CLASSES[kind] = cls
    return cls



def make_trainer(
    model: nn.Module,
    args,
    *,
    train_dataset=None,
    eval_dataset=None,
    data_collator=None,
    processing_class=None,
    callbacks=None,
    gaudi_config=None,
    **kwargs,
):
    """The trainer for ``args``: ``GaudiTrainingArguments`` -> ``PaCAGaudiTrainer`` (with an explicit
    ``GaudiConfig``: ``--gaudi_config_name`` on HPU if given, else fused AdamW + fused clip-norm on HPU and neither
    off HPU), otherwise ``PaCATrainer``.

    Under DeepSpeed in bf16 / fp16 mode a PaCA model's delta gradients are all-reduced in float32
    (:func:`_fp32_delta_gradients`).

    Raises:
        ValueError: an engine the trainer cannot honour on this device (see :func:`check_engine`).
    """
    check_engine(args, args.device.type)
    _fp32_delta_gradients(model, args)
    is_gaudi = hasattr(args, "use_habana")
    common = dict(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=processing_class,
        callbacks=callbacks,
        **kwargs,
    )
    if is_gaudi:
        if gaudi_config is None and args.use_habana and getattr(args, "gaudi_config_name", None):
            _, _, GaudiConfig = _oh.gaudi_classes()
            gaudi_config = GaudiConfig.from_pretrained(args.gaudi_config_name)  # the user's choice, on HPU
        if gaudi_config is None:
            gaudi_config = _oh.make_gaudi_config(use_habana=bool(args.use_habana))
        return trainer_class("gaudi")(gaudi_config=gaudi_config, **common)
    return trainer_class("hf")(**common)
