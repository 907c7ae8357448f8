"""The ``run_paca_clm`` recipe: causal-LM fine-tuning with PaCA / LoRA / full fine-tuning on HPU, CUDA or CPU.

Used by ``scripts/run_paca_clm.py``; flags follow optimum-habana's ``examples/language-modeling/run_lora_clm.py``
(``HfArgumentParser`` over model / data / adapter dataclasses plus ``GaudiTrainingArguments``, or
``transformers.TrainingArguments`` on CUDA and wherever optimum-habana is not installed), so every
``run_lora_clm.py`` command line of optimum-habana's README runs as PaCA after the script name is replaced and
``--peft_type paca`` added (its LoRA-only flags, e.g. ``--lora_dropout``, are warned about; Gaudi-only flags off HPU
too)::

    python scripts/run_paca_clm.py --model_name_or_path meta-llama/Llama-3.1-8B --dataset_name tatsu-lab/alpaca \\
        --bf16 --use_habana --use_lazy_mode --use_hpu_graphs_for_training --throughput_warmup_steps 3 \\
        --per_device_train_batch_size 8 --learning_rate 3e-4 --num_train_epochs 3 \\
        --peft_type paca --paca_r 8 --paca_alpha 16 --target_modules all-linear --output_dir out

Without model and data arguments it fine-tunes the embedded default (SmolLM2-135M-Instruct on GSM8K, with a
fixed held-out split).  Every run prints the held-out loss before and after training and a short summary, and
writes the adapter (or the full model for ``--peft_type none``), ``metrics.json`` and ``loss_curves.png`` into
``--output_dir``.

Exit codes: 0 success, 2 a usage / input error (bad flag, missing data file, unknown column layout, a
``--target_modules`` name that matches no module of the model, an adapter size that does not fit it, a non-empty
``--output_dir`` without ``--overwrite_output_dir``, a model or data set that is neither local nor reachable on the
Hub) or a full / read-only disk, reported as one ``error: ...`` line on stderr.

A non-empty ``--output_dir`` is refused unless ``--overwrite_output_dir`` is given or the run resumes from a checkpoint
inside it (transformers' convention); checkpoints are written atomically and only this run's own ones are rotated
or resumed by ``--resume_from_checkpoint last`` (see :mod:`paca_hpu.checkpoints`).  ``--model_name_or_path`` takes
a local folder or a Hub id (``org/name``), looked up in the local Hugging Face cache first.

The recipe's files, in the order a run uses them: :mod:`.arguments` (the flags), :mod:`.parsing` (``parse_args``),
:mod:`.checks` (every refusal of the input), :mod:`.loading` (tokenizer, model, data), :mod:`.training` (evaluation
schedule, divergence stop, reload check), :mod:`.run` (the run step by step, ``run``, ``main``) and :mod:`.report`
(log, plot, summary); :mod:`.errors` holds :class:`UsageError`.
"""

from .arguments import (DEFAULT_LR, HPU_ONLY_MODEL_FLAGS, SCRIPT_DEFAULTS, VERSION_COMPAT_FIELDS, AdapterArguments,
                        DataArguments, HabanaCompatArguments, ModelArguments, argument_classes, build_parser,
                        version_compat_arguments)
from .errors import UsageError
from .parsing import ParsedArgs, parse_args
from .report import loss_figure, plot_title
from .run import main, run
from .training import EVAL_BUDGET, EVAL_COST, EVALS_PER_RUN, default_eval_steps

__all__ = [
    "ModelArguments", "VERSION_COMPAT_FIELDS", "version_compat_arguments", "DataArguments", "AdapterArguments",
    "HabanaCompatArguments", "ParsedArgs", "UsageError", "argument_classes", "build_parser", "parse_args",
    "default_eval_steps", "plot_title", "loss_figure", "run", "main", "DEFAULT_LR", "SCRIPT_DEFAULTS",
    "HPU_ONLY_MODEL_FLAGS", "EVALS_PER_RUN", "EVAL_COST", "EVAL_BUDGET",
]
