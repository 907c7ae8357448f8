"""The training script around ``trainer.train()``: the held-out evaluation schedule, the stop at the first
non-finite loss, the mean loss of the steps this run trained, and the held-out loss of the reloaded adapter."""

import json
import math
import os
from typing import Optional

from .. import trainer as _tr
from .errors import UsageError
from .loading import configure_gaudi_generation, load_model

#: Most held-out evaluations during training when --eval_steps is not given ...
EVALS_PER_RUN = 5
#: ... and the share of the training time they may take at most: one evaluated example costs about a third of a
#: trained one (forward only), so evaluations are at least ``n_eval * EVAL_COST / (EVAL_BUDGET * examples per
#: step)`` steps apart.  A run shorter than that interval is evaluated only before and after training.
EVAL_COST = 1 / 3
EVAL_BUDGET = 0.25


def checkpoint_step(checkpoint: str) -> Optional[int]:
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as fh:
            return int(json.load(fh)["global_step"])
    except (OSError, ValueError, KeyError):
        return None


def total_steps(training_args, n_train: int) -> int:
    if training_args.max_steps and training_args.max_steps > 0:
        return int(training_args.max_steps)
    world = max(1, getattr(training_args, "world_size", 1))
    per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    return max(1, math.ceil(n_train / per_step) * math.ceil(training_args.num_train_epochs))


def default_eval_steps(total_steps: int, n_eval: int, examples_per_step: int) -> int:
    """Optimizer steps between held-out evaluations when ``--eval_steps`` is not given.

    At most :data:`EVALS_PER_RUN` evaluations during training, and together they may take at most
    :data:`EVAL_BUDGET` of the training time: evaluating ``n_eval`` examples (forward only, about
    :data:`EVAL_COST` of a trained example each) must come after at least ``n_eval * EVAL_COST / EVAL_BUDGET``
    trained examples.  Example: 40 steps of 4 examples with 32 held-out examples -> every 11 steps; a 4-step run ->
    11 > 4, no evaluation during training (the held-out loss is still measured before and after).
    """
    by_count = math.ceil(total_steps / EVALS_PER_RUN)
    by_cost = math.ceil(n_eval * EVAL_COST / (EVAL_BUDGET * max(1, examples_per_step)))
    return max(1, by_count, by_cost)


def divergence_check():
    """A ``TrainerCallback`` that stops the run at the first logged training loss or gradient norm that is NaN or
    infinite: a diverged run must not save its non-finite adapter (nor replace an earlier one with
    ``--overwrite_output_dir``) and exit 0. The loss is logged every step (``--logging_steps 1``, the script's default), before that step's
    checkpoint is saved, so every checkpoint written holds finite values.

    Raises (from ``on_log``):
        UsageError: naming the step, the loss and the fix (a lower ``--learning_rate``).
    """
    from transformers import TrainerCallback

    def number(value) -> Optional[float]:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    class DivergenceCheck(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            # the loss and the gradient norm: the Trainer's logging_nan_inf_filter (on by default) logs a NaN loss
            # as the mean of the earlier ones, so a NaN gradient norm can be the only sign
            for key in ("loss", "grad_norm"):
                value = number((logs or {}).get(key))
                if value is not None and not math.isfinite(value):
                    raise UsageError(f"training diverged at step {state.global_step}: the {key} is {value}; nothing "
                                     f"of this run after step {state.global_step - 1} was saved; lower "
                                     f"--learning_rate (it is {args.learning_rate:g})")

    return DivergenceCheck()


def reloaded_eval_loss(model_args, model_path, training_args, adapter_dir, eval_ds, collator, tokenizer,
                        use_cache: bool) -> float:
    """Held-out loss of the adapter in ``adapter_dir`` loaded onto a freshly loaded base model (same trainer
    evaluation loop, so it equals the trained model's final held-out loss)."""
    from ..adapter import load_adapter

    fresh = load_model(model_args, model_path, training_args, "paca", use_cache)
    configure_gaudi_generation(fresh, model_args, training_args)
    load_adapter(fresh, adapter_dir)
    checker = _tr.make_trainer(fresh, training_args, eval_dataset=eval_ds, data_collator=collator,
                               processing_class=tokenizer)
    return float(checker.evaluate(metric_key_prefix="eval")["eval_loss"])


def train_loss_of_run(trainer, reported: Optional[float], steps: int) -> Optional[float]:
    """Mean training loss over the ``steps`` optimizer steps this ``train()`` call ran.  The trainers add each
    step's loss to ``_total_loss_scalar`` for the steps they run; transformers >= 5 divides that by the steps run,
    transformers 4.55 and optimum-habana's GaudiTrainer by ``global_step``, which after a resume also counts the
    checkpoint's steps (a loss too small by their share).  ``reported`` when the sum is not there."""
    total = getattr(trainer, "_total_loss_scalar", None)
    if reported is None or not isinstance(total, float) or steps < 1:
        return reported
    return total / steps
