"""One ``run_paca_clm`` run, step by step (:class:`_Run`), and the entry points :func:`run` and :func:`main`."""

import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, Optional, Sequence

from .. import device as _device
from .. import trainer as _tr
from ..atomic import write_json_atomic
from ..hub import one_line
from ..model import trainable_parameters
from .checks import (check_batch_sizes, check_distributed, check_not_the_model, check_output_dir, check_quantization,
                     check_resume, check_resume_selection, check_something_to_train, check_targets, fit_seq_len)
from .errors import UsageError, environment_error
from .loading import (calibration_batches, configure_gaudi_generation, load_data, load_model, load_tokenizer, lora_dtype,
                      model_source)
from .parsing import parse_args
from .report import plot_losses, plot_title, print_summary, quantization_metrics, setup_logging
from .training import checkpoint_step, default_eval_steps, divergence_check, reloaded_eval_loss, total_steps, \
    train_loss_of_run

logger = logging.getLogger("paca_hpu.run_paca_clm")

def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def _empty_split_cause(data_args, split: str) -> str:
    """Why the ``"train"`` or ``"validation"`` split came out empty, with the fix: no held-out split was asked for,
    ``--max_*_samples 0``, or tokenization dropped every example (none has a trained token within ``--max_seq_len``)."""
    if split == "validation" and not data_args.validation_file and not data_args.validation_split_percentage:
        return "--validation_split_percentage is 0 and no --validation_file is given"
    flag = "max_train_samples" if split == "train" else "max_eval_samples"
    if getattr(data_args, flag, None) == 0:
        return f"--{flag} is 0"
    return (f"every example was dropped: none has a trained token within --max_seq_len={data_args.max_seq_len}; raise "
            "--max_seq_len or check the data")


class _Run:
    """One ``run_paca_clm`` run, step by step (:func:`run` calls the steps in order).  Holds what the steps
    share: the parsed arguments, tokenizer, data, model, trainer, the metrics dict and the time spent where."""

    def __init__(self, argv: Optional[Sequence[str]], callbacks: Optional[list]):
        self.t_start = time.perf_counter()
        self.callbacks = callbacks
        setup_logging()
        self.argv = list(sys.argv[1:] if argv is None else argv)  # to name flags as the user typed them
        self.args = parse_args(argv)  # detects the device after declaring a Gaudi config's op lists
        self.info = _device.get_device_info()
        self.model_args, self.data_args = self.args.model, self.args.data
        self.adapter_args, self.training_args = self.args.adapter, self.args.training
        self.config = self.args.paca_config  # the run's one PaCAConfig (None for --peft_type none), passed down
        self.eval_seconds = 0.0  # evaluations outside the trainer (the saved-adapter check)
        self.evals = 0

    # -- 1. checks that need no model or data
    def check_and_seed(self) -> None:
        """Logging, the argument checks that need nothing loaded, the checkpoint to resume from, seeds."""
        ta = self.training_args
        setup_logging(ta)
        # On HPU this adapts transformers to Gaudi (adapt_transformers_to_gaudi), which must precede model creation.
        self.run_device = ta.device
        self.trainer_kind = "GaudiTrainer" if hasattr(ta, "use_habana") else "transformers.Trainer"
        logger.info("device: %s, trainer: %s (%s)", self.info.describe(), self.trainer_kind, self.run_device)
        if os.path.exists(ta.output_dir) and not os.path.isdir(ta.output_dir):
            raise UsageError(f"--output_dir '{ta.output_dir}' is an existing file; pass a directory path")
        if ta.do_train and ta.max_steps == 0:
            raise UsageError("--max_steps 0 trains nothing; pass a positive --max_steps, or -1 (the default) to "
                             "train for --num_train_epochs")
        if ta.do_train and ta.max_steps < 0 and ta.num_train_epochs <= 0:
            raise UsageError(f"--num_train_epochs {ta.num_train_epochs:g} trains nothing; pass a positive "
                             "--num_train_epochs or --max_steps")
        if not math.isfinite(ta.learning_rate):
            raise UsageError(f"--learning_rate {ta.learning_rate:g} is not a finite number; pass a positive value")
        if ta.learning_rate < 0:
            raise UsageError(f"--learning_rate {ta.learning_rate:g} is negative; pass a positive value")
        check_distributed(ta, self.info, self.adapter_args.save_merged)
        check_quantization(self.model_args, self.adapter_args.peft_type, self.args.explicit, self.info.type)
        if self.adapter_args.paca_calibration_batches < 1:
            raise UsageError("--paca_calibration_batches must be >= 1, got "
                             f"{self.adapter_args.paca_calibration_batches}")
        try:  # fail fast, before loading model and data
            self.resume = _tr.resolve_checkpoint(ta.resume_from_checkpoint, ta.output_dir)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
        check_batch_sizes(ta)
        check_not_the_model(ta.output_dir, self.model_args.model_name_or_path)
        check_something_to_train(ta, self.resume)
        check_output_dir(ta, self.resume)
        from transformers import set_seed

        set_seed(ta.seed)
        if self.info.type == "hpu":
            _device.manual_seed_all(ta.seed)

    # -- 2. tokenizer, base model, data
    def load_tokenizer_and_data(self) -> None:
        """Model path (the embedded default when none is given), tokenizer, the base model (checked against
        --target_modules before the data are processed: a typo must not wait for the tokenization of a large data
        set), tokenized splits and collator."""
        self.model_path = model_path = model_source(self.model_args.model_name_or_path)
        try:
            self.tokenizer = load_tokenizer(self.model_args, model_path)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load the tokenizer from '{self.model_args.tokenizer_name or model_path}': "
                             f"{one_line(err)}") from err
        self.resumed_config = (check_resume(self.resume, self.adapter_args.peft_type, self.config) if self.resume
                               else None)
        self._load_base_model()
        fit_seq_len(self.base_model, self.data_args, self.argv)
        ta = self.training_args
        try:
            datasets, self.collator = load_data(self.data_args, self.tokenizer, ta, self.info)
        except (FileNotFoundError, ValueError, KeyError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise UsageError(str(msg)) from err
        self.train_ds = datasets["train"] if ta.do_train else None
        self.eval_ds = datasets["validation"] if (ta.do_eval and "validation" in datasets) else None
        if ta.do_train and (self.train_ds is None or len(self.train_ds) == 0):
            raise UsageError("the training set is empty: " + _empty_split_cause(self.data_args, "train"))
        if self.eval_ds is not None and len(self.eval_ds) == 0:
            logger.warning("the held-out set is empty: no held-out loss is reported (%s)", _empty_split_cause(self.data_args, "validation"))
            self.eval_ds = None

    def _load_base_model(self) -> None:
        """The base model (Gaudi generation options set) as ``self.base_model``; what ``--target_modules`` and
        ``--paca_r`` ask of it is checked at once (:func:`check_targets`)."""
        a = self.adapter_args
        try:
            model = load_model(self.model_args, self.model_path, self.training_args, a.peft_type, self.args.use_cache)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load the model from '{self.model_path}': {one_line(err)}") from err
        configure_gaudi_generation(model, self.model_args, self.training_args)
        check_targets(model, a.peft_type, self.config, self.argv)
        if self.resumed_config is not None:
            check_resume_selection(self.resume, model, self.resumed_config, self.config, self.argv)
        self.base_model = model

    # -- 3. model with the adapter
    def load_model(self) -> None:
        """The base model (loaded in step 2) with ``--peft_type`` applied; counts trainable parameters."""
        a = self.adapter_args
        model, self.base_model = self.base_model, None
        self.calibration = calibration_batches(a, self.config, self.train_ds, self.collator, self.training_args)
        try:
            self.model = _tr.prepare_model(
                model, a.peft_type, config=self.config, lora_dropout=a.lora_dropout,
                gradient_checkpointing=self.training_args.gradient_checkpointing, calibration_data=self.calibration,
                lora_dtype=lora_dtype(self.training_args, self.model_args),
            )
        except ValueError as err:
            raise UsageError(str(err)) from err
        self.trainable, self.total = trainable_parameters(self.model)
        logger.info("%s: %s trainable parameters of %s (%.4f %%)", a.peft_type, f"{self.trainable:,}",
                    f"{self.total:,}", 100.0 * self.trainable / max(self.total, 1))

    # -- 4. trainer
    def build_trainer(self) -> None:
        """Evaluation schedule, the trainer for the device, the throughput callback, the metrics dict."""
        ta = self.training_args
        if self.train_ds is not None and self.eval_ds is not None and "eval_steps" not in self.args.explicit \
                and ta.eval_strategy == "steps":
            world = max(1, getattr(ta, "world_size", 1))
            ta.eval_steps = default_eval_steps(total_steps(ta, len(self.train_ds)), len(self.eval_ds),
                                               ta.per_device_train_batch_size * ta.gradient_accumulation_steps * world)
        if self.eval_ds is None and ta.eval_strategy != "no":
            from transformers.trainer_utils import IntervalStrategy

            ta.eval_strategy = IntervalStrategy.NO
        self.trainer = _tr.make_trainer(self.model, ta, train_dataset=self.train_ds, eval_dataset=self.eval_ds,
                                        data_collator=self.collator, processing_class=self.tokenizer,
                                        callbacks=self.callbacks)
        self.throughput = _tr.ThroughputCallback(self.trainer, warmup_steps=self.args.throughput_warmup_steps)
        self.trainer.add_callback(self.throughput)
        self.trainer.add_callback(divergence_check())
        a = self.adapter_args
        self.metrics: Dict[str, Any] = {
            "device": self.info.type, "device_description": self.info.describe(), "trainer": self.trainer_kind,
            "peft_type": a.peft_type, "model": self.model_args.model_name_or_path or "embedded:SmolLM2-135M-Instruct",
            "trainable_params": self.trainable, "total_params": self.total,
            "trainable_percent": 100.0 * self.trainable / max(self.total, 1),
            "train_on_inputs": bool(self.data_args.train_on_inputs), "max_seq_len": self.data_args.max_seq_len,
        }
        if a.peft_type != "none":
            c = self.config
            self.metrics.update(r=c.r, alpha=c.paca_alpha, target_modules=c.target_modules)
        if a.peft_type == "paca":
            self.metrics.update(init_indices=self.config.init_indices,
                                calibration_batches=len(self.calibration) if self.calibration is not None else 0)
        self.metrics.update(quantization_metrics(self.model))

    # -- 5. held-out loss before, training, held-out loss after
    def evaluate_before(self) -> None:
        self.eval_before = None
        if self.eval_ds is None:
            return
        if self.training_args.do_train and _tr.zero3_before_training(self.trainer):
            # ZeRO-3 evaluates only through an engine, and one built for evaluation cannot train: the trainer
            # evaluates at step 0 inside train() instead (see _held_out_loss_at_start)
            self.trainer.args.eval_on_start = True
            return
        self.eval_before = self.trainer.evaluate(metric_key_prefix="eval")["eval_loss"]
        self.metrics["eval_loss_before"] = self.eval_before
        logger.info("held-out loss before training: %.4f", self.eval_before)

    def _held_out_loss_at_start(self) -> None:
        """The held-out loss that ``eval_on_start`` logged at step 0 (ZeRO-3, see :meth:`evaluate_before`)."""
        if self.eval_before is None and self.trainer.args.eval_on_start:
            start = [h["eval_loss"] for h in self.trainer.state.log_history if "eval_loss" in h and h.get("step") == 0]
            if start:
                self.eval_before = start[0]
                self.metrics["eval_loss_before"] = self.eval_before
                logger.info("held-out loss before training (evaluated at step 0): %.4f", self.eval_before)

    def train(self) -> None:
        """``trainer.train`` (resuming if asked), then the final adapter / model and trainer state are saved."""
        ta, trainer = self.training_args, self.trainer
        self.trained = ta.do_train
        if self.trained and self.resume and ta.max_steps and ta.max_steps > 0:
            done = checkpoint_step(self.resume)
            if done is not None and done >= ta.max_steps:
                # a run stopped after its last checkpoint, before its final save (check_something_to_train refused
                # the other cases); upstream would run one extra step when resuming at max_steps
                logger.warning("checkpoint %s is at --max_steps %d: nothing left to train; its adapter is written as "
                               "this run's output (raise --max_steps to train further)", self.resume, ta.max_steps)
                trainer._load_from_checkpoint(self.resume)
                trainer.save_model()  # the output directory still gets the (loaded) final adapter / model
                self.trained = False
        if not self.trained:
            return
        mem_kind = self.run_device.type if self.run_device.type in ("hpu", "cuda", "cpu") else None
        _device.reset_peak_memory(mem_kind)
        side_before = _tr.side_seconds(trainer)
        start = (checkpoint_step(self.resume) or 0) if self.resume else 0
        result = trainer.train(resume_from_checkpoint=self.resume)
        _device.synchronize()
        side = {k: after - side_before[k] for k, after in _tr.side_seconds(trainer).items()}
        tm = result.metrics
        tp = self.throughput
        steps = trainer.state.global_step - start  # the optimizer steps this process ran (after a resume: not all)
        self.metrics.update(
            peak_memory_bytes=_device.peak_memory_bytes(mem_kind), peak_memory_kind=_device.peak_memory_kind(mem_kind),
            train_loss=train_loss_of_run(trainer, tm.get("train_loss"), steps),
            train_runtime=tm.get("train_runtime"), train_steps=steps, global_step=trainer.state.global_step,
            resumed_from_step=start,
            train_samples_per_second=tm.get("train_samples_per_second"), train_tokens=tp.tokens,
            train_tokens_per_second=tp.tokens_per_second, throughput_warmup_steps=tp.warmup_steps,
            throughput_measured_steps=tp.steps,
            # optimizer steps only: train() minus the evaluations and checkpoints it ran
            train_seconds=max(0.0, (tm.get("train_runtime") or 0.0) - side["evaluation"] - side["checkpoint"]),
        )
        trainer.save_model()  # adapter only for PaCA (and LoRA); full model for peft_type none
        trainer.save_state()

    def evaluate_after(self) -> None:
        """Held-out loss of the trained model (the trainer's own evaluation at the last step when it ran one), and
        for PaCA, if asked, of the saved adapter loaded onto a fresh base model."""
        if self.eval_ds is None:
            return
        self._held_out_loss_at_start()
        trainer = self.trainer
        reuse = self.trained and not self.training_args.load_best_model_at_end
        last = trainer.state.log_history[-3:] if reuse else []
        done = [h for h in last if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        # the trainer already evaluated the final weights at the last step: reuse that, do not run it twice
        ev = done[-1] if done else trainer.evaluate(metric_key_prefix="eval")
        self.metrics["eval_loss_after"] = ev["eval_loss"]
        self.metrics["eval_samples"] = len(self.eval_ds)
        logger.info("held-out loss after training: %.4f", ev["eval_loss"])
        a = self.adapter_args
        verify = a.verify_adapter if a.verify_adapter is not None else self.model_args.model_name_or_path is None
        if verify and self.trained and a.peft_type == "paca":
            t0 = time.perf_counter()
            self.metrics["eval_loss_reloaded"] = reloaded_eval_loss(
                self.model_args, self.model_path, self.training_args, self.training_args.output_dir, self.eval_ds,
                self.collator, self.tokenizer, self.args.use_cache)
            self.eval_seconds += time.perf_counter() - t0
            self.evals += 1
            logger.info("held-out loss of the saved adapter on a freshly loaded base model: %.4f",
                        self.metrics["eval_loss_reloaded"])

    # -- 6. outputs
    def write_outputs(self) -> None:
        """Loss plot, optional merged checkpoint, metrics.json (atomically) and the printed summary."""
        out = self.training_args.output_dir
        os.makedirs(out, exist_ok=True)
        if not self.training_args.should_save:
            return
        m, trainer = self.metrics, self.trainer
        m["loss_plot_title"] = plot_title(m)
        m["loss_plot"] = plot_losses(trainer.state.log_history, self.eval_before, os.path.join(out, "loss_curves.png"),
                                      m["loss_plot_title"])
        if self.adapter_args.save_merged:
            merged_dir = os.path.join(out, "merged")
            # last use of the model in this run: merge in place (no second copy of the weights)
            _tr.save_merged_model(trainer.model, merged_dir, self.tokenizer, inplace=True)
            m["merged_dir"] = merged_dir
            logger.info("merged model written to %s", merged_dir)
        elif os.path.isfile(os.path.join(out, "merged", "config.json")):
            # an earlier run's merged checkpoint no longer matches this run's adapter beside it
            shutil.rmtree(os.path.join(out, "merged"))
            logger.warning("removed %s: an earlier run's merged model, which does not match this run's adapter "
                           "(pass --save_merged to write a new one)", os.path.join(out, "merged"))
        side = _tr.side_seconds(trainer)
        m.update(eval_seconds=side["evaluation"] + self.eval_seconds, evaluations=side["evaluations"] + self.evals,
                 checkpoint_seconds=side["checkpoint"], total_seconds=time.perf_counter() - self.t_start)
        m["log_history"] = trainer.state.log_history
        write_json_atomic(os.path.join(out, "metrics.json"), m, indent=2, default=str)
        print_summary(m, out)


def run(argv: Optional[Sequence[str]] = None, callbacks: Optional[list] = None) -> Dict[str, Any]:
    """Do the whole run and return the metrics dict (raises :class:`UsageError` for input errors).

    Steps (methods of :class:`_Run`): argument checks and seeds; tokenizer, base model (targets checked) and data;
    the adapter; trainer; held-out loss before; training and saving; held-out loss after (and the saved-adapter
    check); plot, metrics.json and the summary.
    """
    r = _Run(argv, callbacks)
    r.check_and_seed()
    r.load_tokenizer_and_data()
    r.load_model()
    r.build_trainer()
    r.evaluate_before()
    r.train()
    r.evaluate_after()
    r.write_outputs()
    return r.metrics


def main(argv: Optional[Sequence[str]] = None, callbacks: Optional[list] = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 input error or a full / read-only disk)."""
    try:
        run(argv, callbacks=callbacks)
    except UsageError as err:
        return _error(str(err))
    except Exception as err:  # a full or read-only disk is the user's to fix: one line, no traceback
        line = environment_error(err)
        if line is None:
            raise
        print(file=sys.stderr)  # end the line of a progress bar the failure interrupted
        return _error(line)
    return 0
