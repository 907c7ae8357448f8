"""``run_paca_clm``: causal-LM fine-tuning with PaCA / LoRA / full fine-tuning on HPU, CUDA or CPU.

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
"""

import dataclasses
import errno
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from . import _optimum_habana as _oh
from . import checkpoints as _ckpt
from . import device as _device
from . import trainer as _tr
from ._transformers_compat import dtype_kwarg
from .adapter import is_paca_adapter_config
from .atomic import write_json_atomic
from .hub import one_line
from .model import name_matches, trainable_parameters
from .selection import DATA_AWARE_INIT_INDICES, INIT_INDICES, check_r

logger = logging.getLogger("paca_hpu.run_paca_clm")

__all__ = [
    "ModelArguments",
    "VERSION_COMPAT_FIELDS",
    "version_compat_arguments",
    "DataArguments",
    "AdapterArguments",
    "HabanaCompatArguments",
    "ParsedArgs",
    "UsageError",
    "argument_classes",
    "build_parser",
    "parse_args",
    "default_eval_steps",
    "plot_title",
    "loss_figure",
    "run",
    "main",
]


class UsageError(Exception):
    """A problem with the user's input; :func:`main` prints it as one line and exits with code 2."""


@dataclass
class ModelArguments:
    """Model flags of ``run_paca_clm.py`` (names as optimum-habana's ``run_lora_clm.py``; its ``--use_cache`` is a
    :data:`VERSION_COMPAT_FIELDS` entry, since transformers 5's ``TrainingArguments`` has its own)."""
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Model checkpoint (local dir or Hub id). Default: the embedded SmolLM2-135M-Instruct."},
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer if not the model's."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Hub cache directory."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub auth token for private models."})
    model_revision: str = field(default="main", metadata={"help": "Model branch, tag or commit."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    low_cpu_mem_usage: bool = field(default=False, metadata={"help": "Load the model as an empty shell first."})
    attn_softmax_bf16: bool = field(
        default=False, metadata={"help": "HPU, llama: run the attention softmax in bf16 (as run_lora_clm.py)."}
    )
    use_fused_rope: bool = field(
        default=True,
        metadata={"help": "HPU, llama: Habana's fused RoPE kernel (as run_lora_clm.py; False turns it off). "
                          "Off HPU it does nothing (a warning says so when the flag is given)."},
    )

    # bitsandbytes 4-bit base (names as transformers' BitsAndBytesConfig / TRL's ModelConfig): --peft_type paca on it
    # is QPaCA, --peft_type lora is QLoRA
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Quantize the base model's linear layers to 4 bits with bitsandbytes and "
                                         "train the adapter on it (paca: QPaCA, lora: QLoRA)."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type (with --load_in_4bit).", "choices": ["nf4", "fp4"]}
    )
    bnb_4bit_compute_dtype: Optional[str] = field(
        default=None, metadata={"help": "dtype of the 4-bit GEMMs (with --load_in_4bit); default bfloat16 with --bf16, "
                                        "else float32.", "choices": ["float32", "bfloat16", "float16"]}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=False, metadata={"help": "Quantize the 4-bit block scales too (QLoRA's double quantization)."}
    )


#: Training flags that one supported transformers version's ``TrainingArguments`` has and another lacks:
#: name -> (type, default, help).  :func:`argument_classes` adds the ones ``args_cls`` lacks, so a command line
#: written for either version parses on both.  ``use_cache``: transformers 5's own field (default False there; its
#: Trainer writes it into ``model.config.use_cache``).  ``warmup_ratio``: removed in transformers 5, where a
#: ``warmup_steps`` below 1 is the ratio; it is passed on that way.
VERSION_COMPAT_FIELDS: Dict[str, Tuple[Any, Any, str]] = {
    "use_cache": (bool, True, "KV cache (turned off with gradient checkpointing)."),
    "warmup_ratio": (Optional[float], None, "Linear warm-up over this fraction [0, 1) of the training steps."),
    "overwrite_output_dir": (bool, False, "Write into a non-empty --output_dir (removed in transformers 5; this "
                                          "script keeps it: a non-empty --output_dir is refused without it)."),
}
_VERSION_COMPAT_CLASSES: Dict[Tuple[str, ...], type] = {}


def version_compat_arguments(args_cls) -> Optional[type]:
    """Dataclass ``VersionCompatArguments`` of the :data:`VERSION_COMPAT_FIELDS` that ``args_cls`` lacks (None if
    it has them all)."""
    missing = tuple(name for name in VERSION_COMPAT_FIELDS if not _has_field(args_cls, name))
    if not missing:
        return None
    if missing not in _VERSION_COMPAT_CLASSES:
        spec = [(n, VERSION_COMPAT_FIELDS[n][0], field(default=VERSION_COMPAT_FIELDS[n][1],
                                                         metadata={"help": VERSION_COMPAT_FIELDS[n][2]}))
                for n in missing]
        _VERSION_COMPAT_CLASSES[missing] = dataclasses.make_dataclass("VersionCompatArguments", spec)
    return _VERSION_COMPAT_CLASSES[missing]


@dataclass
class DataArguments:
    """Data flags of ``run_paca_clm.py``: a datasets name or a local json/jsonl/csv/parquet/txt file; lengths in tokens."""
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A datasets-library dataset name."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Its configuration name."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training data (json/jsonl/csv/parquet/txt)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Held-out data (same formats)."})
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Percent of train held out when there is no validation split."}
    )
    max_seq_len: int = field(
        default=512,
        metadata={"help": "Maximum tokens per example (longer ones are truncated).", "aliases": ["--max_seq_length"]},
    )
    dataset_concatenation: bool = field(
        default=False, metadata={"help": "Concatenate examples and cut into max_seq_len blocks."}
    )
    pad_to_max_length: Optional[bool] = field(
        default=None,
        metadata={"help": "Pad every batch to max_seq_len (static shapes; default: on HPU yes, elsewhere no)."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N train examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N held-out examples."})
    dataset_seed: int = field(default=42, metadata={"help": "Seed of the train/validation split."})
    train_on_inputs: Optional[bool] = field(
        default=None,
        metadata={"help": "Loss on the prompt tokens too (True, run_lora_clm.py's default) or on the responses only "
                          "(False). Default: True, except on the embedded GSM8K data, where the held-out loss "
                          "measures the answers (False)."},
    )
    chat_prompt: bool = field(
        default=False,
        metadata={"help": "instruction/input/output rows: ask as run_lora_clm.py --chat_prompt does ('Answer the "
                          "below Query based on the Content given below. #### Query: ... #### Content: ...'). Rows "
                          "are always rendered with the tokenizer's chat template here."},
    )


@dataclass
class AdapterArguments:
    """Method flags of ``run_paca_clm.py``: ``--peft_type {paca,lora,none}`` and its r / alpha / targets."""
    peft_type: str = field(
        default="paca",
        metadata={"help": "paca (this package), lora (peft LoRA) or none (full fine-tuning).", "choices": list(_tr.PEFT_TYPES)},
    )
    paca_r: int = field(
        default=8, metadata={"help": "PaCA: trained columns per layer; LoRA: rank.", "aliases": ["--lora_rank"]}
    )
    paca_alpha: float = field(
        default=16, metadata={"help": "Scaling numerator (update scaled by alpha / r).", "aliases": ["--lora_alpha"]}
    )
    target_modules: List[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "'all-linear', module names / suffixes (q_proj v_proj ...), or one regular expression.",
            "aliases": ["--lora_target_modules"],
        },
    )
    exclude_modules: Optional[List[str]] = field(default=None, metadata={"help": "Modules to leave alone."})
    modules_to_save: Optional[List[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. lm_head)."}
    )
    random_seed: int = field(default=0, metadata={"help": "PaCA: seed of the column selection (init_indices random)."})
    paca_init_indices: str = field(
        default="random",
        metadata={"help": "PaCA: how each layer's r columns are chosen: random (default; seed and layer name), "
                          "weight_norm (largest L2 norm of the pretrained weight's columns) or activation_norm "
                          "(largest input-activation L2 norm per input channel over --paca_calibration_batches "
                          "training batches, computed before training; its columns meet the largest inputs, so "
                          "tune its learning rate, likely lower). The indices are saved with the adapter. "
                          "Which one to use: docs/benchmarks.md, 'Parity study and column selection'.",
                  "choices": list(INIT_INDICES)},
    )
    paca_calibration_batches: int = field(
        default=8,
        metadata={"help": "PaCA, --paca_init_indices activation_norm: training batches (of "
                          "--per_device_train_batch_size) run through the base model to choose the columns."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (LoRA only; PaCA has none)."})
    save_merged: bool = field(
        default=False,
        metadata={"help": "Also write a plain merged transformers checkpoint to <output_dir>/merged."},
    )
    verify_adapter: Optional[bool] = field(
        default=None,
        metadata={"help": "PaCA: after training, load the saved adapter onto a freshly loaded base model and "
                          "evaluate the held-out loss again (needs memory for a second model). Default: on when the model "
                          "is the embedded SmolLM2 (no --model_name_or_path, whatever the data), off otherwise."},
    )


#: Adapter flags that mean nothing for a --peft_type; given anyway, they are warned about (never silently dropped).
NOT_APPLICABLE = {
    "paca": {"lora_dropout": "PaCA trains the selected weight columns directly; it has no adapter input to drop out"},
    "lora": {"random_seed": "it seeds PaCA's column selection",
             "verify_adapter": "the reload check runs for PaCA adapters only"},
    "none": {"paca_r": "full fine-tuning has no rank", "paca_alpha": "full fine-tuning has no scaling",
             "target_modules": "full fine-tuning trains every parameter",
             "exclude_modules": "full fine-tuning trains every parameter",
             "modules_to_save": "full fine-tuning saves the whole model", "lora_dropout": "LoRA only",
             "random_seed": "it seeds PaCA's column selection",
             "verify_adapter": "the reload check runs for PaCA adapters only"},
}


@dataclass
class HabanaCompatArguments:
    """Gaudi flags of ``GaudiTrainingArguments`` (optimum-habana 1.21.2: same names, types and defaults) accepted where
    plain ``transformers.TrainingArguments`` is used (CUDA, or CPU without optimum-habana), so the same command line
    runs everywhere, every ``run_lora_clm.py`` command of optimum-habana's README included.  They are ignored, with a
    warning for each one given that asks for something (:func:`paca_hpu.trainer.adjust_for_device`, after the lists
    in :mod:`paca_hpu._optimum_habana`), except ``throughput_warmup_steps``, which the throughput summary honours."""

    use_habana: Optional[bool] = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    use_lazy_mode: Optional[bool] = field(default=True, metadata={"help": "Gaudi only; ignored here."})
    use_hpu_graphs_for_training: Optional[bool] = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    use_hpu_graphs_for_inference: Optional[bool] = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    use_hpu_graphs: Optional[bool] = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    disable_tensor_cache_hpu_graphs: Optional[bool] = field(default=False,
                                                            metadata={"help": "Gaudi only; ignored here."})
    max_hpu_graphs: Optional[int] = field(default=None, metadata={"help": "Gaudi only; ignored here."})
    gaudi_config_name: Optional[str] = field(default=None, metadata={"help": "Gaudi only; ignored here."})
    distribution_strategy: Optional[str] = field(default="ddp", metadata={"help": "Gaudi only; ignored here."})
    pipelining_fwd_bwd: Optional[bool] = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    attn_implementation: Optional[str] = field(default="eager", metadata={"help": "Gaudi only; ignored here."})
    flash_attention_recompute: bool = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    flash_attention_causal_mask: bool = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    flash_attention_fast_softmax: bool = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    flash_attention_fp8: bool = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    fp8: Optional[bool] = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    minimize_memory: Optional[bool] = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    cache_size_limit: Optional[int] = field(default=None, metadata={"help": "Gaudi only; ignored here."})
    use_regional_compilation: Optional[bool] = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    compile_from_sec_iteration: Optional[bool] = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    allow_unspec_int_on_nn_module: Optional[bool] = field(default=None, metadata={"help": "Gaudi only; ignored here."})
    context_parallel_size: Optional[int] = field(default=1, metadata={"help": "Gaudi only; ignored here."})
    throughput_warmup_steps: Optional[int] = field(
        default=0, metadata={"help": "Steps left out of the tokens/s measurement (warm-up / compilation)."}
    )


class ParsedArgs(NamedTuple):
    """What :func:`parse_args` returns: the argument dataclasses, the explicitly given field names, the throughput
    warm-up step count and the resolved ``use_cache`` (the training arguments' own field where they have one)."""
    model: "ModelArguments"
    data: "DataArguments"
    adapter: "AdapterArguments"
    training: Any
    explicit: set
    throughput_warmup_steps: int
    use_cache: bool


#: Defaults of this script that differ from the TrainingArguments ones (an explicit flag always wins).
SCRIPT_DEFAULTS: Dict[str, Any] = {
    "output_dir": os.path.join("outputs", "run_paca_clm"),
    "do_train": True,
    "do_eval": True,
    "eval_strategy": "steps",
    "logging_steps": 1,
    "report_to": "none",
    "save_total_limit": 2,
}
#: Learning rates used when --learning_rate is not given (adapters learn with larger steps).
DEFAULT_LR = {"paca": 2e-4, "lora": 2e-4, "none": 2e-5}
#: The embedded default run (no model / data arguments) on CPU is kept short unless told otherwise.
EMBEDDED_CPU_DEFAULTS = {"max_steps": 40, "per_device_train_batch_size": 4, "max_seq_len": 256, "max_eval_samples": 32}
#: Most held-out evaluations during training when --eval_steps is not given ...
EVALS_PER_RUN = 5
#: ... and the share of the training time they may take at most: one evaluated example costs about a third of a
#: trained one (forward only), so evaluations are at least ``n_eval * EVAL_COST / (EVAL_BUDGET * examples per
#: step)`` steps apart.  A run shorter than that interval is evaluated only before and after training.
EVAL_COST = 1 / 3
EVAL_BUDGET = 0.25

#: A help sentence naming the library's own default ("Defaults to 'trainer_output' if not provided.", "Default is
#: unlimited checkpoints"), dropped where this script sets another default.
_LIBRARY_DEFAULT = re.compile(r"\s*Defaults? (?:to|is) [^.]*\.?")


def _given(argv: Sequence[str], name: str, aliases: Sequence[str] = ()) -> bool:
    opts = {f"--{name}", f"--{name.replace('_', '-')}", *aliases}
    return any(a in opts or a.split("=", 1)[0] in opts for a in argv if a.startswith("--"))


def _has_field(cls, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def argument_classes(args_cls) -> tuple:
    """The dataclasses ``run_paca_clm.py`` parses for the training-arguments class ``args_cls``:
    ``(ModelArguments, DataArguments, AdapterArguments, args_cls)`` plus :func:`version_compat_arguments` when
    ``args_cls`` lacks one of its fields and :class:`HabanaCompatArguments` when it is no
    ``GaudiTrainingArguments``."""
    compat = version_compat_arguments(args_cls)
    extra = () if compat is None else (compat,)
    extra += () if _has_field(args_cls, "use_habana") else (HabanaCompatArguments,)
    return (ModelArguments, DataArguments, AdapterArguments, args_cls) + extra


def build_parser(args_cls):
    """``HfArgumentParser`` over :func:`argument_classes` ``(args_cls)`` with this script's defaults; a help text that
    names the library's own default of such a flag (transformers 4.55: "Defaults to 'trainer_output'") loses that
    sentence, so that ``--help`` shows the one default that applies."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(argument_classes(args_cls))
    parser.prog = "run_paca_clm.py"
    defaults = {k: v for k, v in SCRIPT_DEFAULTS.items() if _has_field(args_cls, k)}
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults and action.help:
            action.help = _LIBRARY_DEFAULT.sub("", action.help)
    return parser


def _deepspeed_requested(argv: Sequence[str]) -> bool:
    """``--deepspeed`` is given on the command line or as the key ``deepspeed`` of a single ``.json`` argument
    file; decides the training-arguments class on CPU (:func:`paca_hpu.trainer.arguments_class`)."""
    if len(argv) == 1 and argv[0].endswith(".json") and os.path.isfile(argv[0]):
        try:
            with open(argv[0]) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return False  # parse_args reports the broken file
        return isinstance(data, dict) and bool(data.get("deepspeed"))
    return _given(argv, "deepspeed")


def _calibration_batches(adapter_args, train_ds, collator, training_args) -> Optional[List[Dict[str, Any]]]:
    """The training batches a data-aware ``--paca_init_indices`` chooses its columns from (None when the run needs
    none): ``--paca_calibration_batches`` batches of ``--per_device_train_batch_size`` examples of the training set,
    drawn in an order fixed by ``--seed`` through a private generator (the global RNG, hence the training order, is
    left alone), collated like the training batches.

    Raises:
        UsageError: no training set to calibrate on.
    """
    if adapter_args.peft_type != "paca" or adapter_args.paca_init_indices not in DATA_AWARE_INIT_INDICES:
        return None
    if train_ds is None:
        raise UsageError(f"--paca_init_indices {adapter_args.paca_init_indices} chooses columns from training "
                         "batches: run with training data (--do_train), or use --paca_init_indices random")
    import itertools

    import torch

    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=training_args.per_device_train_batch_size, shuffle=True, collate_fn=collator,
        generator=torch.Generator().manual_seed(int(training_args.seed)))
    return list(itertools.islice(loader, adapter_args.paca_calibration_batches))


def _check_batch_sizes(training_args) -> None:
    """Batch sizes and accumulation steps must be positive (0 divides by zero deep inside the Trainer)."""
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, flag, 1)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} {value} is not allowed; pass a value >= 1")


def _typed_flag(argv: Sequence[str], name: str) -> str:
    """How the user spelled the flag of field ``name`` (``--paca_r``, ``--paca-r`` or an alias like ``--lora_rank``);
    ``--name`` when it was not on the command line (a JSON argument file, a default)."""
    spec = next((f for dt in (AdapterArguments, DataArguments) for f in dataclasses.fields(dt) if f.name == name),
                None)
    aliases = spec.metadata.get("aliases", []) if spec is not None else []
    spellings = {f"--{name}", f"--{name.replace('_', '-')}", *aliases}
    typed = [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in spellings]
    return typed[-1] if typed else f"--{name}"


def _check_adapter_numbers(adapter_args, argv: Sequence[str]) -> None:
    """``--paca_r`` (LoRA: the rank) must be >= 1 and PaCA's ``--paca_alpha`` a finite number > 0; checked before
    anything loads, and named as the user typed them (not as the ``PaCAConfig`` fields they end up in).

    Raises:
        UsageError: naming the flag and its value.
    """
    a = adapter_args
    if a.peft_type == "none":
        return  # warned about as not applicable (NOT_APPLICABLE)
    try:
        check_r(a.paca_r)
    except ValueError:
        what = "the number of trained columns per layer" if a.peft_type == "paca" else "the LoRA rank"
        raise UsageError(f"{_typed_flag(argv, 'paca_r')} {a.paca_r} is not allowed: {what} must be >= 1 (e.g. 8)"
                         ) from None
    if a.peft_type == "paca" and not (math.isfinite(a.paca_alpha) and a.paca_alpha > 0):
        raise UsageError(f"{_typed_flag(argv, 'paca_alpha')} {a.paca_alpha:g} is not allowed: the scaling numerator "
                         "must be a finite number > 0 (e.g. 16; the update is scaled by alpha / r)")


def _linear_module_kinds(model, without_tied: bool = False) -> Tuple[List[str], List[str]]:
    """``(kinds, tied)``: distinct last name parts of ``model``'s linear layers (``nn.Linear`` and subclasses such as
    bitsandbytes' ``Linear4bit``, transformers ``Conv1D``), in module order (``q_proj, k_proj, ..., lm_head``).  With
    ``without_tied``, a name whose every layer shares its weight with another module (``lm_head`` tied to the
    input embedding: PaCA refuses it) goes to ``tied`` instead."""
    import collections

    import torch
    from transformers.pytorch_utils import Conv1D

    holders = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    layers: Dict[str, List[bool]] = {}  # last name part -> whether each such layer's weight is shared
    for name, module in model.named_modules():
        if name and isinstance(module, (torch.nn.Linear, Conv1D)):
            shared = holders[id(module.weight)] > 1
            layers.setdefault(name.rsplit(".", 1)[-1], []).append(shared)
    tied = [k for k, shared in layers.items() if without_tied and all(shared)]
    return [k for k in layers if k not in tied], tied


def _check_targets(model, adapter_args, argv: Sequence[str]) -> None:
    """Right after the base model is loaded, before any data is processed: every name given to ``--target_modules``
    matches a module of ``model`` (as peft and :func:`paca_hpu.apply_paca` match names: the qualified name or its
    last parts; one regular expression must match some module), and for PaCA ``--paca_r`` fits every targeted
    layer's ``in_features``.  A name that matches nothing used to be dropped silently when another one matched.

    Raises:
        UsageError: naming the unknown modules and the model's linear module names, or the layer whose
            ``in_features`` is smaller than ``--paca_r``.
    """
    a = adapter_args
    if a.peft_type == "none":
        return
    flag = _typed_flag(argv, "target_modules")
    try:  # the value as the adapter sees it: "all-linear", one regular expression, or a list of names
        target = _tr.paca_config(target_modules=a.target_modules, exclude_modules=a.exclude_modules).target_modules
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from err
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target, str):
        unknown = [] if target == "all-linear" or any(name_matches(n, target) for n in names) else [target]
    else:
        unknown = [t for t in target if not any(name_matches(n, [t]) for n in names)]
    if unknown:
        shown = ", ".join("'" + u + "'" for u in unknown)
        verb = "matches" if len(unknown) == 1 else "match"
        kinds, tied = _linear_module_kinds(model, without_tied=a.peft_type == "paca")
        left_out = f"; {', '.join(tied)}: tied to another module's weight, which PaCA cannot adapt" if tied else ""
        raise UsageError(f"{flag}: {shown} {verb} no module of {type(model).__name__}; its linear modules are "
                         f"{', '.join(kinds) or 'none'} (or pass all-linear){left_out}")
    if a.peft_type != "paca":
        return
    from . import find_target_modules

    config = _tr.paca_config(a.paca_r, a.paca_alpha, a.target_modules, a.exclude_modules, None, a.random_seed)
    try:
        layers = find_target_modules(model, config)
    except ValueError as err:
        raise UsageError(str(err)) from err
    modules = dict(model.named_modules())
    for name in layers:
        in_features = getattr(modules[name], "in_features", None) or getattr(modules[name], "nx", None)
        try:
            check_r(a.paca_r, in_features, name)
        except ValueError:
            raise UsageError(f"{_typed_flag(argv, 'paca_r')} {a.paca_r} exceeds in_features={in_features} of layer "
                             f"'{name}' (PaCA trains r of its input columns); lower it, or leave that layer out "
                             "with --exclude_modules") from None


#: Config fields that hold a model's number of positions (LLaMA / Mistral / Qwen and most others; GPT-2; others).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def _model_positions(model) -> Optional[Tuple[str, int]]:
    """``(config field, value)`` of the number of positions ``model`` was built for; None when its config names
    none (a model without position limit)."""
    config = getattr(model, "config", None)
    for name in _POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def _fit_seq_len(model, data_args, argv: Sequence[str]) -> None:
    """``--max_seq_len`` must be >= 1, and above the model's positions it is lowered to them with a warning, as
    transformers' ``run_clm.py`` does with ``--block_size`` (so the default 512 still runs on a model of fewer
    positions): longer examples would run past the positions the model was trained on, and
    ``--pad_to_max_length`` would pad every batch to the length asked for.  Sets ``data_args.max_seq_len``.

    Raises:
        UsageError: ``--max_seq_len`` below 1.
    """
    flag = _typed_flag(argv, "max_seq_len")
    if data_args.max_seq_len < 1:
        raise UsageError(f"{flag} {data_args.max_seq_len} is not allowed: pass a number of tokens >= 1")
    positions = _model_positions(model)
    if positions is not None and data_args.max_seq_len > positions[1]:
        logger.warning("%s %d is larger than the %d positions of %s (config.%s=%d): using %s %d (longer examples "
                       "are truncated)", flag, data_args.max_seq_len, positions[1], type(model).__name__,
                       positions[0], positions[1], flag, positions[1])
        data_args.max_seq_len = positions[1]


def _check_writable(out: str) -> None:
    """``out`` (or, when it does not exist yet, the nearest existing folder above it) must be writable."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.access(probe, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable for this user"
    raise UsageError(f"--output_dir '{out}' cannot be written: '{probe}' {why}; pass a writable --output_dir")


def _check_not_the_model(output_dir: str, model_path: Optional[str]) -> None:
    """``--output_dir`` must not be, or hold, the local ``--model_name_or_path`` folder, whatever
    ``--overwrite_output_dir`` says: the run would write its adapter config (which makes the folder unloadable as
    a base model) or, with ``--peft_type none``, its weights over the base model.

    Raises:
        UsageError: naming both paths.
    """
    if not model_path or not os.path.isdir(model_path) or not os.path.isdir(output_dir):
        return
    model, out = os.path.realpath(model_path), os.path.realpath(output_dir)
    if model == out or model.startswith(out + os.sep):
        raise UsageError(f"--output_dir '{output_dir}' is (or holds) the model folder --model_name_or_path "
                         f"'{model_path}'; the run would write over the base model: choose another --output_dir")


def _check_output_dir(training_args, resume: Optional[str]) -> None:
    """Refuse to write into a non-empty ``--output_dir`` unless ``--overwrite_output_dir`` is given or the run resumes
    from a checkpoint inside it (transformers' convention), so an earlier run's adapter, metrics and checkpoints are
    never silently replaced; the directory must be writable.

    Raises:
        UsageError: naming the directory, some of what it holds, and the flags that resolve it.
    """
    out = training_args.output_dir
    _check_writable(out)
    if not os.path.isdir(out) or getattr(training_args, "overwrite_output_dir", False):
        return
    entries = sorted(os.listdir(out))
    if not entries:
        return
    if resume and os.path.isdir(resume) and os.path.samefile(os.path.dirname(os.path.abspath(resume)), out):
        return  # continuing the run that this directory holds
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    resumable = any(_ckpt.is_complete(p) for _, p in _ckpt.checkpoints_in(out))
    raise UsageError(f"--output_dir '{out}' is not empty ({shown}); pass --overwrite_output_dir to write over it"
                     + (", --resume_from_checkpoint last to continue the run in it" if resumable else "")
                     + ", or another --output_dir")


def _environment_error(err: BaseException) -> Optional[str]:
    """One line for a failure of the disk or file permissions (full disk, read-only, no access); None otherwise."""
    if isinstance(err, _ckpt.CheckpointWriteError):
        return str(err)
    where = getattr(err, "filename", None)
    if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(err):
        return f"no space left on {where or 'the output disk'} ({one_line(err)}); free some space or write elsewhere"
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and where:
        return f"cannot access '{where}': {err.strerror}"
    return None


def _check_distributed(training_args, info, save_merged: bool = False) -> None:
    """Engines the trainer cannot honour here are usage errors before anything loads (see
    :func:`paca_hpu.trainer.check_engine`), and so is ``--save_merged`` under an engine that partitions the weights
    (merging needs every layer's whole weight in one process, which would otherwise fail only after training);
    DeepSpeed's backend starts before the model loads (:func:`paca_hpu.trainer.start_deepspeed_comm`)."""
    try:
        _tr.check_engine(training_args, info.type)
    except ValueError as err:
        raise UsageError(str(err)) from err
    engine = _tr.weight_partitioning_engine(training_args)
    if save_merged and engine:
        raise UsageError(f"--save_merged needs the whole weights in one process, but {engine} partitions them across "
                         "the ranks: drop --save_merged and merge the saved adapter afterwards in one process: "
                         "python -m paca_hpu export OUTPUT_DIR --to merged --output MERGED_DIR")
    _tr.start_deepspeed_comm(training_args)


def _read_argv(argv: List[str], parser, all_fields) -> Tuple[Dict[str, Any], set]:
    """``(values, explicit field names)`` from the command line or from a single ``.json`` argument file."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            raise UsageError(f"argument file '{argv[0]}' not found")
        with open(path) as fh:
            data = json.load(fh)
        values = vars(parser.parse_args([]))
        unknown = sorted(set(data) - {f.name for f in all_fields})
        if unknown:
            raise UsageError(f"unknown keys in {argv[0]}: {', '.join(unknown)}")
        values.update(data)
        return values, set(data)
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    explicit = set()
    for f in all_fields:
        aliases = f.metadata.get("aliases", []) if f.metadata else []
        if _given(argv, f.name, [aliases] if isinstance(aliases, str) else aliases):
            explicit.add(f.name)
    return vars(namespace), explicit


def _apply_script_defaults(values: Dict[str, Any], explicit: set, info: _device.DeviceInfo) -> None:
    """Defaults that depend on other flags: the short embedded CPU run, eval_strategy without do_eval, the
    learning rate per method, train_on_inputs (run_lora_clm.py's True; False on the embedded GSM8K)."""
    embedded_data = not any(values.get(k) for k in ("dataset_name", "train_file", "validation_file"))
    if embedded_data and not values.get("model_name_or_path") and info.type == "cpu":
        for key, value in EMBEDDED_CPU_DEFAULTS.items():
            if key == "max_steps" and ("num_train_epochs" in explicit or "max_steps" in explicit):
                continue
            if key not in explicit:
                values[key] = value
    if "do_eval" in explicit and not values.get("do_eval") and "eval_strategy" not in explicit:
        values["eval_strategy"] = "no"  # else TrainingArguments turns do_eval back on for our eval_strategy default
    if "learning_rate" not in explicit:
        values["learning_rate"] = DEFAULT_LR[values.get("peft_type", "paca")]
    if values.get("train_on_inputs") is None:
        values["train_on_inputs"] = not embedded_data


def _translate_version_fields(values: Dict[str, Any], explicit: set, args_cls) -> None:
    """``--warmup_ratio`` where ``TrainingArguments`` has none (transformers 5): a fractional ``warmup_steps``,
    which means the same there; as in transformers 4.x, an explicit ``--warmup_steps`` wins."""
    ratio = values.get("warmup_ratio")
    if _has_field(args_cls, "warmup_ratio") or ratio is None:
        return
    if not 0 <= ratio < 1:
        raise UsageError(f"--warmup_ratio {ratio:g} is outside [0, 1); pass a fraction of the training steps, or "
                         "--warmup_steps N")
    if "warmup_steps" in explicit and values.get("warmup_steps"):
        logger.warning("--warmup_steps %s given: --warmup_ratio %g is ignored (as in transformers 4.x)",
                       values["warmup_steps"], ratio)
    else:
        values["warmup_steps"] = ratio


#: Model flags of run_lora_clm.py that configure optimum-habana's Gaudi model classes (read on HPU only).
HPU_ONLY_MODEL_FLAGS = {
    "use_fused_rope": "Habana's fused RoPE kernel, which exists on HPU only",
    "attn_softmax_bf16": "the attention softmax of optimum-habana's Gaudi llama, on HPU only",
}


def _warn_ignored(values: Dict[str, Any], explicit: set, info: _device.DeviceInfo) -> None:
    """Warn about every given method or model flag that has no effect in this run (never drop one silently); the
    Gaudi training flags are warned about by :func:`paca_hpu.trainer.adjust_for_device`."""
    for name, why in NOT_APPLICABLE.get(values.get("peft_type", "paca"), {}).items():
        if name in explicit:
            logger.warning("--%s %s does not apply to --peft_type %s (%s); ignored.", name, values.get(name),
                           values.get("peft_type"), why)
    if info.type != "hpu":
        for name, why in HPU_ONLY_MODEL_FLAGS.items():
            if name in explicit:
                logger.warning("--%s has no effect without Gaudi (HPU), and this run is on %s: ignored (%s).", name,
                               info.type, why)


def parse_args(argv: Optional[Sequence[str]] = None, info: Optional[_device.DeviceInfo] = None) -> ParsedArgs:
    """:class:`ParsedArgs` for this device.

    ``argv`` may also be a single ``.json`` file holding the same keys.  ``explicit`` is the set of field names
    given on the command line / in the file.  The training arguments are adjusted for the device before the
    dataclass is built (see :func:`paca_hpu.trainer.adjust_for_device`).  Flags that do nothing here (another
    method's, Gaudi-only ones off HPU) are accepted with a warning.  The autocast op lists of a
    ``--gaudi_config_name`` are declared before the device is detected (workaround 13 in
    :mod:`paca_hpu._optimum_habana`: the Gaudi plugin reads them when it starts).

    Raises:
        UsageError: unknown keys in a JSON argument file, or training arguments the dataclass rejects.
        SystemExit: (argparse, exit code 2) an unknown flag or a bad value on the command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _oh.declare_autocast_ops_first(argv)  # before anything imports habana_frameworks.torch (workaround 13)
    info = info or _device.get_device_info()
    args_cls = _tr.arguments_class(info.type, deepspeed=_deepspeed_requested(argv))
    classes = argument_classes(args_cls)
    parser = build_parser(args_cls)
    values, explicit = _read_argv(argv, parser, [f for dt in classes for f in dataclasses.fields(dt) if f.init])
    _apply_script_defaults(values, explicit, info)
    _translate_version_fields(values, explicit, args_cls)
    _warn_ignored(values, explicit, info)

    def build(dt):
        return dt(**{f.name: values[f.name] for f in dataclasses.fields(dt) if f.init and f.name in values})

    model_args, data_args, adapter_args = (build(dt) for dt in classes[:3])
    # HabanaCompatArguments values go along (where parsed) so that adjust_for_device warns about them and drops them
    with_compat = (args_cls, HabanaCompatArguments) if HabanaCompatArguments in classes else (args_cls,)
    targs = {f.name: values[f.name] for dt in with_compat for f in dataclasses.fields(dt)
             if f.init and f.name in values}
    if targs.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise UsageError("--deepspeed needs DeepSpeed, which is not installed: pip install deepspeed (on a CPU-only "
                         "machine DS_BUILD_OPS=0 pip install deepspeed; on Gaudi, Habana's DeepSpeed fork)")
    try:
        targs = _tr.adjust_for_device(targs, info, args_cls, explicit)
        with _oh.declared_autocast_ops_accepted():
            training_args = args_cls(**targs)
    except ValueError as err:
        raise UsageError(str(err)) from err
    warmup = int(values.get("throughput_warmup_steps") or 0)
    use_cache = bool(getattr(training_args, "use_cache", values.get("use_cache", True)))
    if not hasattr(training_args, "overwrite_output_dir"):  # transformers >= 5 dropped the field
        training_args.overwrite_output_dir = bool(values.get("overwrite_output_dir", False))
    return ParsedArgs(model_args, data_args, adapter_args, training_args, explicit, warmup, use_cache)


# --------------------------------------------------------------------------- helpers


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (main() may run repeatedly in one process)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(training_args=None) -> None:
    """paca_hpu's log records to stdout; INFO on the main process once ``training_args`` are known, WARNING before
    (so the warnings of argument parsing are printed too)."""
    root = logging.getLogger("paca_hpu")
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    if training_args is None:
        root.setLevel(logging.WARNING)
        return
    import transformers

    root.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()


def _from_hub_or_cache(load, name: str, **kwargs):
    """:func:`paca_hpu.hub.from_pretrained_cache_first`, with its one-line errors as :class:`UsageError`."""
    from .hub import ModelSourceError, from_pretrained_cache_first

    try:
        return from_pretrained_cache_first(load, name, **kwargs)
    except ModelSourceError as err:
        raise UsageError(str(err)) from err


def _load_tokenizer(model_args, model_path: str):
    from transformers import AutoTokenizer

    tok = _from_hub_or_cache(
        AutoTokenizer.from_pretrained,
        model_args.tokenizer_name or model_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def _model_dtype(training_args, peft_type: str):
    import torch

    # adapters: bf16 base weights (PaCA's deltas stay float32; LoRA factors follow run_lora_clm.py, _lora_dtype);
    # full fine-tuning keeps float32 master weights and relies on autocast for bf16 compute.
    if training_args.bf16 and peft_type != "none":
        return torch.bfloat16
    return None


def _lora_dtype(training_args, model_args):
    """``--peft_type lora --bf16``: the LoRA factors in bf16, as optimum-habana's run_lora_clm.py trains them (it
    casts the peft model with ``.to(torch.bfloat16)``); QLoRA (``--load_in_4bit``) keeps peft's float32 factors."""
    import torch

    return torch.bfloat16 if training_args.bf16 and not getattr(model_args, "load_in_4bit", False) else None


_BNB_FLAGS = ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")


def _check_quantization(model_args, peft_type: str, explicit: set, device_type: str) -> None:
    """``--load_in_4bit`` and its flags fit together and with the method and device.

    Raises:
        UsageError: a bnb_4bit flag without --load_in_4bit, full fine-tuning of a 4-bit model, FP4 on HPU
            (bitsandbytes' HPU backend dequantizes NF4 only), or bitsandbytes not installed.
    """
    if not model_args.load_in_4bit:
        given = [f for f in _BNB_FLAGS if f in explicit]
        if given:
            raise UsageError(f"--{given[0]} has no effect without --load_in_4bit; add --load_in_4bit or drop it")
        return
    if peft_type == "none":
        raise UsageError("--load_in_4bit trains an adapter on a frozen 4-bit base; pass --peft_type paca (QPaCA) or "
                         "--peft_type lora (QLoRA), not none")
    if device_type == "hpu" and model_args.bnb_4bit_quant_type != "nf4":
        raise UsageError("bitsandbytes' HPU backend supports only --bnb_4bit_quant_type nf4")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--load_in_4bit needs bitsandbytes: pip install bitsandbytes")


def _quantization_metrics(model) -> Dict[str, Any]:
    """``{"quantization": "bitsandbytes 4-bit nf4 ..."}`` for a model loaded with ``--load_in_4bit``, else ``{}``."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None or not getattr(qc, "load_in_4bit", False):
        return {}
    return {"quantization": f"bitsandbytes 4-bit {qc.bnb_4bit_quant_type}"
                            f"{' + double quant' if qc.bnb_4bit_use_double_quant else ''}, compute "
                            f"{str(qc.bnb_4bit_compute_dtype).replace('torch.', '')}"}


def _quantization_kwargs(model_args, training_args) -> Dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``--load_in_4bit`` (empty without it): a ``BitsAndBytesConfig``,
    the model dtype (the compute dtype unless --bf16 sets bf16; transformers would otherwise pick float16) and the
    training device as ``device_map`` (trainers do not move bitsandbytes models)."""
    if not model_args.load_in_4bit:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    compute = model_args.bnb_4bit_compute_dtype or ("bfloat16" if training_args.bf16 else "float32")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                                bnb_4bit_compute_dtype=getattr(torch, compute),
                                bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant)
    return {"quantization_config": config, "device_map": {"": str(training_args.device)},
            dtype_kwarg(): torch.bfloat16 if training_args.bf16 else getattr(torch, compute)}


def _load_model(model_args, model_path: str, training_args, peft_type: str, use_cache: bool):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        low_cpu_mem_usage=model_args.low_cpu_mem_usage,
    )
    dtype = _model_dtype(training_args, peft_type)
    if dtype is not None:
        kwargs[dtype_kwarg()] = dtype
    kwargs.update(_quantization_kwargs(model_args, training_args))
    model = _from_hub_or_cache(AutoModelForCausalLM.from_pretrained, model_path, **kwargs)
    model.config.use_cache = False if training_args.gradient_checkpointing else use_cache
    return model


def _configure_gaudi_generation(model, model_args, training_args) -> None:
    """HPU only, as run_lora_clm.py: the Gaudi attention / RoPE options live in ``model.generation_config``."""
    if not getattr(training_args, "use_habana", False) or model.config.model_type != "llama":
        return
    gc = model.generation_config
    if model_args.attn_softmax_bf16:
        gc.attn_softmax_bf16 = True
    if getattr(training_args, "attn_implementation", None) == "gaudi_fused_sdpa":
        gc.use_flash_attention = True
        gc.flash_attention_recompute = bool(getattr(training_args, "flash_attention_recompute", False))
        gc.flash_attention_causal_mask = bool(getattr(training_args, "flash_attention_causal_mask", False))
    if not model_args.use_fused_rope:
        gc.use_fused_rope = False


def _load_data(data_args, tokenizer, training_args, info):
    from . import data as _data

    raw = _data.load_raw_datasets(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        validation_split_percentage=data_args.validation_split_percentage,
        seed=data_args.dataset_seed,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
    )
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = _data.tokenize_datasets(
            raw, tokenizer, data_args.max_seq_len, dataset_concatenation=data_args.dataset_concatenation,
            train_on_inputs=bool(data_args.train_on_inputs), chat_prompt=data_args.chat_prompt,
        )
    pad = data_args.pad_to_max_length
    if pad is None:  # static shapes on HPU (one compiled graph), dynamic padding elsewhere
        pad = info.type == "hpu"
    collator = _data.make_data_collator(tokenizer, pad_to_max_length=data_args.max_seq_len if pad else None)
    return tokenized, collator


def _spec_key(value: Any) -> Any:
    """A ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` value without its spelling order: a list of
    names matches by membership (``["q_proj", "v_proj"]`` selects what ``["v_proj", "q_proj"]`` selects)."""
    if isinstance(value, (list, tuple)):
        return tuple(sorted(set(value)))
    return value


def _check_resume(checkpoint: str, adapter_args) -> bool:
    """The checkpoint must hold what this run trains: the same ``--peft_type`` and, for PaCA, the same adapter
    shape (else the optimizer state cannot fit). Reads the checkpoint's adapter_config.json once.

    Returns:
        True when ``--target_modules`` / ``--exclude_modules`` are spelled differently from the checkpoint's (other
        names, a regex): whether they select the same layers is then checked once the model is adapted
        (:func:`_check_resume_selection`). Lists that differ only in order count as equal here.

    Raises:
        UsageError: naming the flag to pass to match the checkpoint.
    """
    path = os.path.join(checkpoint, "adapter_config.json")
    saved = None
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                saved = json.load(fh)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read '{path}': {err}") from err
    saved_type = saved.get("peft_type") if saved is not None else None
    if is_paca_adapter_config(saved):
        saved_type = "PACA"  # the sentence paca_hpu writes as peft_type (paca_hpu.adapter.PEFT_TYPE), or older "PACA"
    saved_kind = "none" if saved is None else {"PACA": "paca", "LORA": "lora"}.get(saved_type)
    if saved_kind is not None and saved_kind != adapter_args.peft_type:
        raise UsageError(f"cannot resume from '{checkpoint}': it holds a --peft_type {saved_kind} checkpoint, this run "
                         f"has --peft_type {adapter_args.peft_type}; pass --peft_type {saved_kind} to resume it")
    if adapter_args.peft_type != "paca":
        return False
    if saved_type not in (None, "PACA"):
        raise UsageError(f"'{checkpoint}' holds a {saved_type} adapter, not a PaCA one")
    want = _tr.paca_config(adapter_args.paca_r, adapter_args.paca_alpha, adapter_args.target_modules,
                           adapter_args.exclude_modules, adapter_args.modules_to_save,
                           adapter_args.random_seed, adapter_args.paca_init_indices).to_dict()
    for key in ("r", "paca_alpha", "modules_to_save"):
        if key in saved and _spec_key(saved[key]) != _spec_key(want[key]):
            flag = {"r": "paca_r"}.get(key, key)
            raise UsageError(f"cannot resume from '{checkpoint}': it was trained with {key}={saved[key]!r}, this run "
                             f"has {key}={want[key]!r}; pass --{flag} to match the checkpoint")
    for key in ("random_seed", "init_indices"):
        if key in saved and saved[key] != want[key]:
            logger.warning("resuming with the checkpoint's column indices (%s=%s), not --%s %s", key, saved[key],
                           {"init_indices": "paca_init_indices"}.get(key, key), want[key])
    return any(key in saved and _spec_key(saved[key]) != _spec_key(want[key])
               for key in ("target_modules", "exclude_modules"))


def _check_resume_selection(checkpoint: str, model, adapter_args) -> None:
    """The PaCA layers of ``model`` (adapted with this run's flags) must be the layers the checkpoint's adapter
    holds: what ``--target_modules`` / ``--exclude_modules`` select, whatever their spelling.

    Raises:
        UsageError: the checkpoint's adapter file cannot be read, or the selections differ (names a layer in one
            and not the other, and the checkpoint's flags).
    """
    from safetensors import safe_open

    from . import paca_layers

    path = os.path.join(checkpoint, "adapter_model.safetensors")
    try:
        with safe_open(path, framework="pt") as fh:
            saved = {k[: -len(".delta")] for k in fh.keys() if k.endswith(".delta") and not k.startswith(
                "modules_to_save.")}
    except Exception as err:  # OSError, or safetensors' own SafetensorError for a damaged file
        raise UsageError(f"cannot read '{path}': {err}") from err
    here = {name for name, _ in paca_layers(model)}
    if saved == here:
        return
    with open(os.path.join(checkpoint, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    diff = [f"this run adds '{n}'" for n in sorted(here - saved)[:1]] + [
        f"lacks '{n}'" for n in sorted(saved - here)[:1]]
    raise UsageError(
        f"cannot resume from '{checkpoint}': --target_modules {' '.join(adapter_args.target_modules)} selects other "
        f"layers than the checkpoint's adapter ({len(here)} vs {len(saved)}; {', '.join(diff)}); pass "
        f"--target_modules / --exclude_modules as the checkpoint was trained with (target_modules="
        f"{cfg.get('target_modules')!r}, exclude_modules={cfg.get('exclude_modules')!r})")


def _checkpoint_step(checkpoint: str) -> Optional[int]:
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as fh:
            return int(json.load(fh)["global_step"])
    except (OSError, ValueError, KeyError):
        return None


def _total_steps(training_args, n_train: int) -> int:
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


def plot_title(metrics: Dict[str, Any]) -> str:
    """``"<model> · <method> (r=<r>) · <steps> steps"`` for the loss plot (model: the directory's or hub name's last
    part; method paca / lora / full fine-tuning; steps: the last optimizer step, ``global_step``, which after a
    resume counts the checkpoint's steps too, else ``train_steps``)."""
    model = str(metrics.get("model", "")).rstrip("/\\")
    model = model.split(":", 1)[1] if model.startswith("embedded:") else os.path.basename(model) or model
    method = {"paca": "PaCA", "lora": "LoRA", "none": "full fine-tuning"}.get(metrics.get("peft_type"), "?")
    if metrics.get("r") is not None:
        method += f" (r={metrics['r']})"
    steps = metrics.get("global_step", metrics.get("train_steps"))  # the plot shows a resumed run's earlier steps too
    return f"{model} · {method}" + (f" · {steps} steps" if steps is not None else "")


def loss_figure(log_history: List[Dict[str, Any]], eval_before: Optional[float], title: str):
    """Matplotlib figure of training loss (per logged step) and held-out loss (step 0 = before training) against
    the optimizer step, with ``title`` and integer step ticks."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if eval_before is not None and not any(s == 0 for s, _ in evals):
        evals = [(0, eval_before)] + evals
    evals = sorted(dict(evals).items())
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label="held-out loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _plot_losses(log_history: List[Dict[str, Any]], eval_before: Optional[float], path: str,
                 title: str) -> Optional[str]:
    try:
        fig = loss_figure(log_history, eval_before, title)
    except ImportError:  # matplotlib is in the train / demo extras, not in the core install
        logger.warning("matplotlib is not installed (pip install 'paca_hpu[train]'); no loss plot written")
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


# --------------------------------------------------------------------------- main


def _divergence_check():
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


class _Run:
    """One ``run_paca_clm`` run, step by step (:func:`run` calls the steps in order).  Holds what the steps
    share: the parsed arguments, tokenizer, data, model, trainer, the metrics dict and the time spent where."""

    def __init__(self, argv: Optional[Sequence[str]], callbacks: Optional[list]):
        self.t_start = time.perf_counter()
        self.callbacks = callbacks
        _setup_logging()
        self.argv = list(sys.argv[1:] if argv is None else argv)  # to name flags as the user typed them
        self.args = parse_args(argv)  # detects the device after declaring a Gaudi config's op lists
        self.info = _device.get_device_info()
        self.model_args, self.data_args = self.args.model, self.args.data
        self.adapter_args, self.training_args = self.args.adapter, self.args.training
        self.eval_seconds = 0.0  # evaluations outside the trainer (the saved-adapter check)
        self.evals = 0

    # -- 1. checks that need no model or data
    def check_and_seed(self) -> None:
        """Logging, the argument checks that need nothing loaded, the checkpoint to resume from, seeds."""
        ta = self.training_args
        _setup_logging(ta)
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
        if ta.learning_rate < 0:
            raise UsageError(f"--learning_rate {ta.learning_rate:g} is negative; pass a positive value")
        _check_distributed(ta, self.info, self.adapter_args.save_merged)
        _check_quantization(self.model_args, self.adapter_args.peft_type, self.args.explicit, self.info.type)
        _check_adapter_numbers(self.adapter_args, self.argv)
        if self.adapter_args.paca_calibration_batches < 1:
            raise UsageError("--paca_calibration_batches must be >= 1, got "
                             f"{self.adapter_args.paca_calibration_batches}")
        try:  # fail fast, before loading model and data
            self.resume = _tr.resolve_checkpoint(ta.resume_from_checkpoint, ta.output_dir)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
        _check_batch_sizes(ta)
        _check_not_the_model(ta.output_dir, self.model_args.model_name_or_path)
        _check_output_dir(ta, self.resume)
        from transformers import set_seed

        set_seed(ta.seed)
        if self.info.type == "hpu":
            _device.manual_seed_all(ta.seed)

    # -- 2. tokenizer, base model, data
    def load_tokenizer_and_data(self) -> None:
        """Model path (the embedded default when none is given), tokenizer, the base model (checked against
        --target_modules before the data are processed: a typo must not wait for the tokenization of a large data
        set), tokenized splits and collator."""
        model_path = self.model_args.model_name_or_path
        if model_path is None:
            from .embedded import embedded_model_path

            try:
                model_path = embedded_model_path()
            except (ModuleNotFoundError, FileNotFoundError) as err:
                raise UsageError(str(err)) from err
        else:  # a local folder as its absolute path: the adapter records it, and must reload from anywhere
            from .hub import ModelSourceError, base_model_source

            try:
                model_path = base_model_source(model_path, label="--model_name_or_path")
            except ModelSourceError as err:
                raise UsageError(str(err)) from err
        self.model_path = model_path
        try:
            self.tokenizer = _load_tokenizer(self.model_args, model_path)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load the tokenizer from '{self.model_args.tokenizer_name or model_path}': "
                             f"{one_line(err)}") from err
        self.check_selection = bool(self.resume) and _check_resume(self.resume, self.adapter_args)
        self._load_base_model()
        _fit_seq_len(self.base_model, self.data_args, self.argv)
        ta = self.training_args
        try:
            datasets, self.collator = _load_data(self.data_args, self.tokenizer, ta, self.info)
        except (FileNotFoundError, ValueError, KeyError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise UsageError(str(msg)) from err
        self.train_ds = datasets["train"] if ta.do_train else None
        self.eval_ds = datasets["validation"] if (ta.do_eval and "validation" in datasets) else None
        if ta.do_train and (self.train_ds is None or len(self.train_ds) == 0):
            raise UsageError("the training set is empty")
        if self.eval_ds is not None and len(self.eval_ds) == 0:
            logger.warning("the held-out set is empty (validation_split_percentage=0?): no held-out loss is reported")
            self.eval_ds = None

    def _load_base_model(self) -> None:
        """The base model (Gaudi generation options set) as ``self.base_model``; what ``--target_modules`` and
        ``--paca_r`` ask of it is checked at once (:func:`_check_targets`)."""
        a = self.adapter_args
        try:
            model = _load_model(self.model_args, self.model_path, self.training_args, a.peft_type, self.args.use_cache)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load the model from '{self.model_path}': {one_line(err)}") from err
        _configure_gaudi_generation(model, self.model_args, self.training_args)
        _check_targets(model, a, self.argv)
        self.base_model = model

    # -- 3. model with the adapter
    def load_model(self) -> None:
        """The base model (loaded in step 2) with ``--peft_type`` applied; counts trainable parameters."""
        a = self.adapter_args
        model, self.base_model = self.base_model, None
        self.calibration = _calibration_batches(a, self.train_ds, self.collator, self.training_args)
        try:
            self.model = _tr.prepare_model(
                model, a.peft_type, r=a.paca_r, alpha=a.paca_alpha, target_modules=a.target_modules,
                exclude_modules=a.exclude_modules, modules_to_save=a.modules_to_save, random_seed=a.random_seed,
                lora_dropout=a.lora_dropout, gradient_checkpointing=self.training_args.gradient_checkpointing,
                init_indices=a.paca_init_indices, calibration_data=self.calibration,
                lora_dtype=_lora_dtype(self.training_args, self.model_args),
            )
        except ValueError as err:
            raise UsageError(str(err)) from err
        if self.check_selection:
            _check_resume_selection(self.resume, self.model, a)
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
            ta.eval_steps = default_eval_steps(_total_steps(ta, len(self.train_ds)), len(self.eval_ds),
                                               ta.per_device_train_batch_size * ta.gradient_accumulation_steps * world)
        if self.eval_ds is None and ta.eval_strategy != "no":
            from transformers.trainer_utils import IntervalStrategy

            ta.eval_strategy = IntervalStrategy.NO
        self.trainer = _tr.make_trainer(self.model, ta, train_dataset=self.train_ds, eval_dataset=self.eval_ds,
                                        data_collator=self.collator, processing_class=self.tokenizer,
                                        callbacks=self.callbacks)
        self.throughput = _tr.ThroughputCallback(self.trainer, warmup_steps=self.args.throughput_warmup_steps)
        self.trainer.add_callback(self.throughput)
        self.trainer.add_callback(_divergence_check())
        a = self.adapter_args
        self.metrics: Dict[str, Any] = {
            "device": self.info.type, "device_description": self.info.describe(), "trainer": self.trainer_kind,
            "peft_type": a.peft_type, "model": self.model_args.model_name_or_path or "embedded:SmolLM2-135M-Instruct",
            "trainable_params": self.trainable, "total_params": self.total,
            "trainable_percent": 100.0 * self.trainable / max(self.total, 1),
            "train_on_inputs": bool(self.data_args.train_on_inputs), "max_seq_len": self.data_args.max_seq_len,
        }
        if a.peft_type != "none":
            self.metrics.update(r=a.paca_r, alpha=a.paca_alpha, target_modules=a.target_modules)
        if a.peft_type == "paca":
            self.metrics.update(init_indices=a.paca_init_indices,
                                calibration_batches=len(self.calibration) if self.calibration is not None else 0)
        self.metrics.update(_quantization_metrics(self.model))

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
            done = _checkpoint_step(self.resume)
            if done is not None and done >= ta.max_steps:
                # upstream would run one extra step when resuming at max_steps; there is nothing left to train
                logger.info("checkpoint %s is at step %d >= max_steps %d: nothing left to train", self.resume, done,
                            ta.max_steps)
                trainer._load_from_checkpoint(self.resume)
                trainer.save_model()  # the output directory still gets the (loaded) final adapter / model
                self.trained = False
        if not self.trained:
            return
        mem_kind = self.run_device.type if self.run_device.type in ("hpu", "cuda", "cpu") else None
        _device.reset_peak_memory(mem_kind)
        side_before = _tr.side_seconds(trainer)
        start = (_checkpoint_step(self.resume) or 0) if self.resume else 0
        result = trainer.train(resume_from_checkpoint=self.resume)
        _device.synchronize()
        side = {k: after - side_before[k] for k, after in _tr.side_seconds(trainer).items()}
        tm = result.metrics
        tp = self.throughput
        steps = trainer.state.global_step - start  # the optimizer steps this process ran (after a resume: not all)
        self.metrics.update(
            peak_memory_bytes=_device.peak_memory_bytes(mem_kind), peak_memory_kind=_device.peak_memory_kind(mem_kind),
            train_loss=_train_loss_of_run(trainer, tm.get("train_loss"), steps),
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
            self.metrics["eval_loss_reloaded"] = _reloaded_eval_loss(
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
        m["loss_plot"] = _plot_losses(trainer.state.log_history, self.eval_before, os.path.join(out, "loss_curves.png"),
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
        _print_summary(m, out)


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


def _reloaded_eval_loss(model_args, model_path, training_args, adapter_dir, eval_ds, collator, tokenizer,
                        use_cache: bool) -> float:
    """Held-out loss of the adapter in ``adapter_dir`` loaded onto a freshly loaded base model (same trainer
    evaluation loop, so it equals the trained model's final held-out loss)."""
    from .adapter import load_adapter

    fresh = _load_model(model_args, model_path, training_args, "paca", use_cache)
    _configure_gaudi_generation(fresh, model_args, training_args)
    load_adapter(fresh, adapter_dir)
    checker = _tr.make_trainer(fresh, training_args, eval_dataset=eval_ds, data_collator=collator,
                               processing_class=tokenizer)
    return float(checker.evaluate(metric_key_prefix="eval")["eval_loss"])


def _train_loss_of_run(trainer, reported: Optional[float], steps: int) -> Optional[float]:
    """Mean training loss over the ``steps`` optimizer steps this ``train()`` call ran.  The trainers add each
    step's loss to ``_total_loss_scalar`` for the steps they run; transformers >= 5 divides that by the steps run,
    transformers 4.55 and optimum-habana's GaudiTrainer by ``global_step``, which after a resume also counts the
    checkpoint's steps (a loss too small by their share).  ``reported`` when the sum is not there."""
    total = getattr(trainer, "_total_loss_scalar", None)
    if reported is None or not isinstance(total, float) or steps < 1:
        return reported
    return total / steps


def _print_summary(m: Dict[str, Any], out: str) -> None:
    def f(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    loss_on = "prompt and response" if m.get("train_on_inputs") else "responses only"
    lines = [
        "",
        "=" * 64,
        "run_paca_clm summary",
        "-" * 64,
        f"device                : {m['device_description']}  [{m['trainer']}]",
        f"method                : {m['peft_type']}"
        + (f" (r={m.get('r')}, alpha={m.get('alpha')}, targets={' '.join(m.get('target_modules') or [])})"
           if m["peft_type"] != "none" else " (full fine-tuning)"),
        *([f"base weights          : {m['quantization']}"] if m.get("quantization") else []),
        f"trainable parameters  : {m['trainable_params']:,} of {m['total_params']:,} ({m['trainable_percent']:.4f} %)",
        f"held-out loss         : {f(m.get('eval_loss_before'))} -> {f(m.get('eval_loss_after'))}"
        + (f"  ({m['eval_samples']} examples, loss on {loss_on})" if m.get("eval_samples") else ""),
    ]
    if "eval_loss_reloaded" in m:
        lines.append(f"saved adapter reloaded: held-out loss {f(m['eval_loss_reloaded'])} on a fresh base model")
    if "train_runtime" in m:
        steps, start = m.get("train_steps") or 0, m.get("resumed_from_step") or 0
        per_step = f", {m['train_seconds'] / steps:.2f} s/step" if steps else ""
        resumed = f" ({start + 1} to {start + steps}, resumed at step {start})" if start and steps else ""
        lines += [
            f"training              : {steps} steps{resumed} in {f(m.get('train_seconds'), '.1f')} s{per_step} "
            "(optimizer steps only)",
            f"train tokens/s        : {f(m.get('train_tokens_per_second'), ',.1f')} (input tokens incl. padding; "
            f"{m.get('throughput_measured_steps')} steps after {m.get('throughput_warmup_steps')} warm-up, "
            "evaluation and checkpoint time excluded)",
            f"peak memory           : {_fmt_bytes(m.get('peak_memory_bytes'))} ({m.get('peak_memory_kind')})",
        ]
    lines += [
        f"held-out evaluation   : {m.get('evaluations', 0)} evaluations in {f(m.get('eval_seconds'), '.1f')} s",
        f"wall time             : {f(m.get('total_seconds'), '.1f')} s in all (training, evaluation, "
        f"checkpoints {f(m.get('checkpoint_seconds'), '.1f')} s, loading and saving)",
        f"output                : {out}",
        "=" * 64,
    ]
    print("\n".join(lines), flush=True)


def main(argv: Optional[Sequence[str]] = None, callbacks: Optional[list] = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 input error or a full / read-only disk)."""
    try:
        run(argv, callbacks=callbacks)
    except UsageError as err:
        return _error(str(err))
    except Exception as err:  # a full or read-only disk is the user's to fix: one line, no traceback
        line = _environment_error(err)
        if line is None:
            raise
        print(file=sys.stderr)  # end the line of a progress bar the failure interrupted
        return _error(line)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
