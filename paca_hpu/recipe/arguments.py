"""The flags of ``run_paca_clm.py``: model, data and method dataclasses, the Gaudi flags accepted off Gaudi, the
version-dependent training flags, the script's defaults, and the ``HfArgumentParser`` over them all."""

import argparse
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from .. import trainer as _tr
from ..config import PaCAConfig

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
    missing = tuple(name for name in VERSION_COMPAT_FIELDS if not has_field(args_cls, name))
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
    """Method flags of ``run_paca_clm.py`` that the adapter configuration does not hold: ``--peft_type
    {paca,lora,none}`` and what the run does around the adapter.  The adapter's own flags (r, alpha, targets, ...)
    are :class:`~paca_hpu.PaCAConfig`'s fields (:data:`PaCAConfigArguments`)."""
    peft_type: str = field(
        default="paca",
        metadata={"help": "paca (this package), lora (peft LoRA) or none (full fine-tuning).", "choices": list(_tr.PEFT_TYPES)},
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


#: How the command line names :class:`~paca_hpu.PaCAConfig`'s fields: field -> (flag, aliases, a sentence added to
#: the field's help).  The flag names are the script's own (optimum-habana's ``run_lora_clm.py`` spellings as
#: aliases); type, default and help come from ``PaCAConfig``, so the adapter configuration is declared once.  A field
#: not listed here is a flag of its own name.
PACA_CONFIG_FLAGS: Dict[str, Tuple[str, List[str], str]] = {
    "r": ("paca_r", ["--lora_rank"], " LoRA (--peft_type lora): the rank. In the parity study (docs/benchmarks.md) "
                                      "PaCA r 16 came closest to LoRA r 8: 1.013 x its held-out loss, against "
                                      "1.020 x for r 8."),
    "paca_alpha": ("paca_alpha", ["--lora_alpha"], " LoRA: lora_alpha."),
    "target_modules": ("target_modules", ["--lora_target_modules"], ""),
    "init_indices": ("paca_init_indices", [], " activation_norm computes them before training, over "
                                              "--paca_calibration_batches training batches. In the study "
                                              "(docs/benchmarks.md, 'Parity study and column selection') neither "
                                              "did better than random."),
}


def paca_config_flag(name: str) -> str:
    """The flag name (``PaCAConfigArguments`` field, without ``--``) of :class:`~paca_hpu.PaCAConfig`'s field
    ``name``: ``paca_r`` for ``r``, ``paca_init_indices`` for ``init_indices``, else ``name`` itself."""
    return PACA_CONFIG_FLAGS.get(name, (name,))[0]


def _command_line_type(hint):
    """``hint`` as ``HfArgumentParser`` can take it: it takes no ``Union`` but ``Optional``, so a pattern field (a
    string or a list of names) is a list of strings on the command line (``--target_modules q_proj v_proj``; a
    one-element list is read back as the string by :func:`paca_hpu.trainer.paca_config`)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union and List[str] in args:
        return Optional[List[str]] if type(None) in args else List[str]
    return hint


def _paca_config_arguments() -> type:
    """The dataclass ``PaCAConfigArguments``: :class:`~paca_hpu.PaCAConfig`'s fields under their flag names
    (:data:`PACA_CONFIG_FLAGS`), for ``HfArgumentParser``; :func:`~paca_hpu.recipe.parsing.parse_args` builds the
    run's one ``PaCAConfig`` from what it parses."""
    hints = typing.get_type_hints(PaCAConfig)
    spec = []
    for f in dataclasses.fields(PaCAConfig):
        _, aliases, more = PACA_CONFIG_FLAGS.get(f.name, (f.name, [], ""))
        metadata = dict(f.metadata, help=f.metadata.get("help", "") + more, **({"aliases": aliases} if aliases else {}))
        kind = _command_line_type(hints[f.name])
        if kind is List[str] and isinstance(f.default, str):
            default = field(default_factory=lambda d=f.default: [d], metadata=metadata)
        else:
            default = field(default=f.default, metadata=metadata)
        spec.append((paca_config_flag(f.name), kind, default))
    return dataclasses.make_dataclass("PaCAConfigArguments", spec)


PaCAConfigArguments = _paca_config_arguments()


#: Adapter flags that mean nothing for a --peft_type; given anyway, they are warned about (never silently dropped).
NOT_APPLICABLE = {
    "paca": {"lora_dropout": "PaCA trains the selected weight columns directly; it has no adapter input to drop out"},
    "lora": {"random_seed": "it seeds PaCA's column selection",
             "paca_init_indices": "LoRA selects no columns", "paca_calibration_batches": "LoRA selects no columns",
             "verify_adapter": "the reload check runs for PaCA adapters only"},
    "none": {"paca_r": "full fine-tuning has no rank", "paca_alpha": "full fine-tuning has no scaling",
             "target_modules": "full fine-tuning trains every parameter",
             "exclude_modules": "full fine-tuning trains every parameter",
             "modules_to_save": "full fine-tuning saves the whole model", "lora_dropout": "LoRA only",
             "random_seed": "it seeds PaCA's column selection",
             "paca_init_indices": "full fine-tuning selects no columns",
             "paca_calibration_batches": "full fine-tuning selects no columns",
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


#: Defaults of this script that differ from those of the fields' own classes (TrainingArguments, PaCAConfig; by
#: flag name); an explicit flag always wins.
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

#: A help sentence naming the library's own default ("Defaults to 'trainer_output' if not provided.", "Default is
#: unlimited checkpoints"), dropped where this script sets another default.
_LIBRARY_DEFAULT = re.compile(r"\s*Defaults? (?:to|is) [^.]*\.?")


def has_field(cls, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def argument_classes(args_cls) -> tuple:
    """The dataclasses ``run_paca_clm.py`` parses for the training-arguments class ``args_cls``:
    ``(ModelArguments, DataArguments, AdapterArguments, PaCAConfigArguments, args_cls)`` plus
    :func:`version_compat_arguments` when ``args_cls`` lacks one of its fields and :class:`HabanaCompatArguments`
    when it is no ``GaudiTrainingArguments``."""
    compat = version_compat_arguments(args_cls)
    extra = () if compat is None else (compat,)
    extra += () if has_field(args_cls, "use_habana") else (HabanaCompatArguments,)
    return (ModelArguments, DataArguments, AdapterArguments, PaCAConfigArguments, args_cls) + extra


#: What this script adds to a library flag's help text: values it takes beyond the library's.
HELP_ADDENDA = {
    "resume_from_checkpoint": " This script also takes 'last' (or 'true'): the newest complete checkpoint-N of the "
                              "run in --output_dir.",
}
#: Library help texts that say something else than what this script does (transformers' --overwrite_output_dir
#: "use this to continue training"): replaced.
HELP_REPLACED = {
    "overwrite_output_dir": "Write this run into a non-empty --output_dir; the files it writes replace the earlier "
                            "run's there. It does not resume: to continue a run, pass --resume_from_checkpoint last.",
}


def _default_text(dest: str, default: Any) -> Optional[str]:
    """The ``(default: ...)`` of a flag whose default this script decides at run time (:data:`DEFAULT_LR`,
    :data:`EMBEDDED_CPU_DEFAULTS`), else None (argparse shows the field's own)."""
    if dest == "learning_rate":
        by_lr: Dict[float, List[str]] = {}
        for method, lr in DEFAULT_LR.items():
            by_lr.setdefault(lr, []).append(method)
        return "; ".join(f"{lr:g} for --peft_type {' and '.join(m)}" for lr, m in by_lr.items())
    if dest in EMBEDDED_CPU_DEFAULTS:
        return (f"{default}; {EMBEDDED_CPU_DEFAULTS[dest]} for the embedded model and data on CPU, i.e. without "
                "--model_name_or_path and data flags")
    return None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``HfArgumentParser``'s formatter, except that a help text which already states its default (:func:`_default_text`)
    gets no second ``(default: ...)``."""

    def _get_help_string(self, action):
        if getattr(action, "states_default", False):
            return action.help
        return super()._get_help_string(action)


def build_parser(args_cls):
    """``HfArgumentParser`` over :func:`argument_classes` ``(args_cls)`` with this script's defaults
    (:data:`SCRIPT_DEFAULTS`, which may override any field's default, ``PaCAConfig``'s too); a help text that
    names the library's own default of such a flag (transformers 4.55: "Defaults to 'trainer_output'") loses that
    sentence, so that ``--help`` shows the one default that applies; :data:`HELP_REPLACED` and :data:`HELP_ADDENDA`
    apply, and a flag whose default depends on the run states it (:func:`_default_text`)."""
    from transformers import HfArgumentParser

    classes = argument_classes(args_cls)
    parser = HfArgumentParser(classes)
    parser.prog = "run_paca_clm.py"
    defaults = {k: v for k, v in SCRIPT_DEFAULTS.items() if any(has_field(c, k) for c in classes)}
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults and action.help:
            action.help = _LIBRARY_DEFAULT.sub("", action.help)
        if action.dest in HELP_REPLACED:
            action.help = HELP_REPLACED[action.dest]
        if action.dest in HELP_ADDENDA:
            action.help = (action.help or "").rstrip() + HELP_ADDENDA[action.dest]
        text = _default_text(action.dest, action.default)
        if text is not None and action.help:
            action.help = f"{action.help.rstrip()} (default: {text})"
            action.states_default = True
    parser.formatter_class = _HelpFormatter
    return parser


#: Model flags of run_lora_clm.py that configure optimum-habana's Gaudi model classes (read on HPU only).
HPU_ONLY_MODEL_FLAGS = {
    "use_fused_rope": "Habana's fused RoPE kernel, which exists on HPU only",
    "attn_softmax_bf16": "the attention softmax of optimum-habana's Gaudi llama, on HPU only",
}
