"""``run_paca_clm``: causal-LM fine-tuning with PaCA / LoRA / full fine-tuning on HPU, CUDA or CPU.

Used by ``scripts/run_paca_clm.py``; flags follow optimum-habana's ``examples/language-modeling/run_lora_clm.py``
(``HfArgumentParser`` over model / data / adapter dataclasses plus ``GaudiTrainingArguments``, or
``transformers.TrainingArguments`` on CUDA), so the usual Gaudi command lines work::

    python scripts/run_paca_clm.py --model_name_or_path meta-llama/Llama-3.1-8B --dataset_name tatsu-lab/alpaca \\
        --bf16 --use_habana --use_lazy_mode --use_hpu_graphs_for_training --throughput_warmup_steps 3 \\
        --per_device_train_batch_size 8 --learning_rate 3e-4 --num_train_epochs 3 \\
        --peft_type paca --paca_r 8 --paca_alpha 16 --target_modules all-linear --output_dir out

Without model and data arguments it fine-tunes the embedded default (SmolLM2-135M-Instruct on GSM8K, with a
fixed held-out split).  Every run prints the held-out loss before and after training and a short summary, and
writes the adapter (or the full model for ``--peft_type none``), ``metrics.json`` and ``loss_curves.png`` into
``--output_dir``.

Exit codes: 0 success, 2 a usage / input error (bad flag, missing data file, unknown column layout, no module
matching ``--target_modules``), reported as one ``error: ...`` line on stderr.
"""

import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

from . import device as _device
from . import trainer as _tr
from .adapter import is_paca_adapter_config
from .model import trainable_parameters
from .selection import DATA_AWARE_INIT_INDICES, INIT_INDICES

logger = logging.getLogger("paca_hpu.run_paca_clm")

__all__ = [
    "ModelArguments",
    "DataArguments",
    "AdapterArguments",
    "HabanaCompatArguments",
    "ParsedArgs",
    "UsageError",
    "parse_args",
    "run",
    "main",
]


class UsageError(Exception):
    """A problem with the user's input; :func:`main` prints it as one line and exits with code 2."""


@dataclass
class ModelArguments:
    """Model flags of ``run_paca_clm.py`` (names as optimum-habana's ``run_lora_clm.py``)."""
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Model checkpoint (local dir or Hub id). Default: the embedded SmolLM2-135M-Instruct."},
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer if not the model's."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Hub cache directory."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub auth token for private models."})
    model_revision: str = field(default="main", metadata={"help": "Model branch, tag or commit."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    use_cache: bool = field(default=True, metadata={"help": "KV cache (turned off with gradient checkpointing)."})
    low_cpu_mem_usage: bool = field(default=False, metadata={"help": "Load the model as an empty shell first."})
    attn_softmax_bf16: bool = field(
        default=False, metadata={"help": "HPU, llama: run the attention softmax in bf16 (as run_lora_clm.py)."}
    )


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
                          "training batches, computed before training). The indices are saved with the adapter. "
                          "Which one to use: docs/benchmarks.md, 'Parity study and column selection'.",
                  "choices": list(INIT_INDICES)},
    )
    paca_calibration_batches: int = field(
        default=8,
        metadata={"help": "PaCA, --paca_init_indices activation_norm: training batches (of "
                          "--per_device_train_batch_size) run through the base model to choose the columns."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (LoRA only)."})
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


@dataclass
class HabanaCompatArguments:
    """Gaudi flags of ``GaudiTrainingArguments`` accepted where plain ``transformers.TrainingArguments`` is used
    (CUDA, or CPU without optimum-habana), so the same command line runs everywhere.  They are ignored (with a
    warning when switched on), except ``throughput_warmup_steps``, which the throughput summary honours."""

    use_habana: bool = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    use_lazy_mode: bool = field(default=True, metadata={"help": "Gaudi only; ignored here."})
    use_hpu_graphs_for_training: bool = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    use_hpu_graphs_for_inference: bool = field(default=False, metadata={"help": "Gaudi only; ignored here."})
    gaudi_config_name: Optional[str] = field(default=None, metadata={"help": "Gaudi only; ignored here."})
    distribution_strategy: str = field(default="ddp", metadata={"help": "Gaudi only; ignored here."})
    throughput_warmup_steps: int = field(
        default=0, metadata={"help": "Steps left out of the tokens/s measurement (warm-up / compilation)."}
    )


class ParsedArgs(NamedTuple):
    """What :func:`parse_args` returns: the four argument dataclasses, the explicitly given field names and the throughput warm-up step count."""
    model: "ModelArguments"
    data: "DataArguments"
    adapter: "AdapterArguments"
    training: Any
    explicit: set
    throughput_warmup_steps: int


#: Defaults of this script that differ from the TrainingArguments ones (an explicit flag always wins).
SCRIPT_DEFAULTS: Dict[str, Any] = {
    "output_dir": os.path.join("outputs", "run_paca_clm"),
    "do_train": True,
    "do_eval": True,
    "eval_strategy": "steps",
    "logging_steps": 1,
    "report_to": "none",
    "save_total_limit": 2,
    "include_num_input_tokens_seen": True,
}
#: Learning rates used when --learning_rate is not given (adapters learn with larger steps).
DEFAULT_LR = {"paca": 2e-4, "lora": 2e-4, "none": 2e-5}
#: The embedded default run (no model / data arguments) on CPU is kept short unless told otherwise.
EMBEDDED_CPU_DEFAULTS = {"max_steps": 40, "per_device_train_batch_size": 4, "max_seq_len": 256, "max_eval_samples": 32}
#: Number of held-out evaluations during training when --eval_steps is not given.
EVALS_PER_RUN = 5


def _given(argv: Sequence[str], name: str, aliases: Sequence[str] = ()) -> bool:
    opts = {f"--{name}", f"--{name.replace('_', '-')}", *aliases}
    return any(a in opts or a.split("=", 1)[0] in opts for a in argv if a.startswith("--"))


def _build_parser(args_cls):
    from transformers import HfArgumentParser

    types = [ModelArguments, DataArguments, AdapterArguments, args_cls]
    if not any(f.name == "use_habana" for f in dataclasses.fields(args_cls)):
        types.append(HabanaCompatArguments)
    parser = HfArgumentParser(tuple(types))
    parser.prog = "run_paca_clm.py"
    defaults = {k: v for k, v in SCRIPT_DEFAULTS.items() if any(f.name == k for f in dataclasses.fields(args_cls))}
    parser.set_defaults(**defaults)
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


def _check_distributed(training_args, info) -> None:
    """Engines the trainer cannot honour here are usage errors before anything loads (see
    :func:`paca_hpu.trainer.check_engine`)."""
    try:
        _tr.check_engine(training_args, info.type)
    except ValueError as err:
        raise UsageError(str(err)) from err


def parse_args(argv: Optional[Sequence[str]] = None, info: Optional[_device.DeviceInfo] = None) -> ParsedArgs:
    """:class:`ParsedArgs` ``(model, data, adapter, training, explicit, throughput_warmup_steps)`` for this device.

    ``argv`` may also be a single ``.json`` file holding the same keys.  ``explicit`` is the set of field names
    given on the command line / in the file.  The training arguments are adjusted for the device before the
    dataclass is built (see :func:`paca_hpu.trainer.adjust_for_device`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    info = info or _device.get_device_info()
    args_cls = _tr.arguments_class(info.type, deepspeed=_deepspeed_requested(argv))
    parser = _build_parser(args_cls)
    compat = not any(f.name == "use_habana" for f in dataclasses.fields(args_cls))
    dataclass_types = (ModelArguments, DataArguments, AdapterArguments, args_cls) + (
        (HabanaCompatArguments,) if compat else ()
    )
    all_fields = [f for dt in dataclass_types for f in dataclasses.fields(dt) if f.init]

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
        explicit = set(data)
    else:
        namespace, remaining = parser.parse_known_args(argv)
        if remaining:
            parser.error(f"unrecognized arguments: {' '.join(remaining)}")
        values = vars(namespace)
        explicit = set()
        for f in all_fields:
            aliases = f.metadata.get("aliases", []) if f.metadata else []
            if _given(argv, f.name, [aliases] if isinstance(aliases, str) else aliases):
                explicit.add(f.name)

    embedded = not any(values.get(k) for k in ("model_name_or_path", "dataset_name", "train_file", "validation_file"))
    if embedded and info.type == "cpu":
        for key, value in EMBEDDED_CPU_DEFAULTS.items():
            if key == "max_steps" and ("num_train_epochs" in explicit or "max_steps" in explicit):
                continue
            if key not in explicit:
                values[key] = value
    if "do_eval" in explicit and not values.get("do_eval") and "eval_strategy" not in explicit:
        values["eval_strategy"] = "no"  # else TrainingArguments turns do_eval back on for our eval_strategy default
    if "learning_rate" not in explicit:
        values["learning_rate"] = DEFAULT_LR[values.get("peft_type", "paca")]

    outs = []
    for dt in dataclass_types[:3]:
        names = {f.name for f in dataclasses.fields(dt) if f.init}
        outs.append(dt(**{k: v for k, v in values.items() if k in names}))
    names = {f.name for f in dataclasses.fields(args_cls) if f.init}
    targs = {k: v for k, v in values.items() if k in names}
    if compat:
        for flag in ("use_habana", "use_hpu_graphs_for_training", "use_hpu_graphs_for_inference", "gaudi_config_name"):
            if values.get(flag):
                logger.warning("--%s has no effect on %s; ignored.", flag, info.type)
    try:
        targs = _tr.adjust_for_device(targs, info, args_cls)
        training_args = args_cls(**targs)
    except ValueError as err:
        raise UsageError(str(err)) from err
    warmup = int(values.get("throughput_warmup_steps") or 0)
    return ParsedArgs(outs[0], outs[1], outs[2], training_args, explicit, warmup)


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


def _setup_logging(training_args) -> None:
    import transformers

    level = logging.INFO if training_args.should_log else logging.WARNING
    root = logging.getLogger("paca_hpu")
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    transformers.utils.logging.set_verbosity_warning()


def _load_tokenizer(model_args, model_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
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

    # adapters: bf16 base weights (the trained deltas / LoRA factors stay float32); full fine-tuning keeps
    # float32 master weights and relies on autocast for bf16 compute.
    if training_args.bf16 and peft_type != "none":
        return torch.bfloat16
    return None


def _load_model(model_args, model_path: str, training_args, peft_type: str):
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
        kwargs["torch_dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False if training_args.gradient_checkpointing else model_args.use_cache
    return model


def _configure_gaudi_generation(model, model_args, training_args) -> None:
    """HPU only, as run_lora_clm.py: the Gaudi attention options live in ``model.generation_config``."""
    if not getattr(training_args, "use_habana", False) or model.config.model_type != "llama":
        return
    gc = model.generation_config
    if model_args.attn_softmax_bf16:
        gc.attn_softmax_bf16 = True
    if getattr(training_args, "attn_implementation", None) == "gaudi_fused_sdpa":
        gc.use_flash_attention = True
        gc.flash_attention_recompute = bool(getattr(training_args, "flash_attention_recompute", False))
        gc.flash_attention_causal_mask = bool(getattr(training_args, "flash_attention_causal_mask", False))


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
            raw, tokenizer, data_args.max_seq_len, dataset_concatenation=data_args.dataset_concatenation
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


def _plot_losses(log_history: List[Dict[str, Any]], eval_before: Optional[float], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is an install requirement
        logger.warning("matplotlib is not installed; no loss plot written")
        return None
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
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


# --------------------------------------------------------------------------- main


def run(argv: Optional[Sequence[str]] = None, callbacks: Optional[list] = None) -> Dict[str, Any]:
    """Do the whole run and return the metrics dict (raises :class:`UsageError` for input errors)."""
    info = _device.get_device_info()
    parsed = parse_args(argv, info)
    model_args, data_args, adapter_args, training_args = parsed.model, parsed.data, parsed.adapter, parsed.training
    explicit = parsed.explicit
    _setup_logging(training_args)
    # On HPU this adapts transformers to Gaudi (adapt_transformers_to_gaudi), which must precede model creation.
    run_device = training_args.device
    trainer_kind = "GaudiTrainer" if hasattr(training_args, "use_habana") else "transformers.Trainer"
    logger.info("device: %s, trainer: %s (%s)", info.describe(), trainer_kind, run_device)

    if os.path.exists(training_args.output_dir) and not os.path.isdir(training_args.output_dir):
        raise UsageError(f"--output_dir '{training_args.output_dir}' is an existing file; pass a directory path")
    if training_args.do_train and training_args.max_steps == 0:
        raise UsageError("--max_steps 0 trains nothing; pass a positive --max_steps, or -1 (the default) to train "
                         "for --num_train_epochs")
    if training_args.do_train and training_args.max_steps < 0 and training_args.num_train_epochs <= 0:
        raise UsageError(f"--num_train_epochs {training_args.num_train_epochs:g} trains nothing; pass a positive "
                         "--num_train_epochs or --max_steps")
    if training_args.learning_rate < 0:
        raise UsageError(f"--learning_rate {training_args.learning_rate:g} is negative; pass a positive value")
    _check_distributed(training_args, info)
    if adapter_args.paca_calibration_batches < 1:
        raise UsageError(f"--paca_calibration_batches must be >= 1, got {adapter_args.paca_calibration_batches}")
    try:  # fail fast, before loading model and data
        resume = _tr.resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err

    from transformers import set_seed

    set_seed(training_args.seed)
    if info.type == "hpu":
        _device.manual_seed_all(training_args.seed)

    # ---- model path & tokenizer
    model_path = model_args.model_name_or_path
    if model_path is None:
        from .embedded import embedded_model_path

        try:
            model_path = embedded_model_path()
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise UsageError(str(err)) from err
    elif os.path.sep in model_path and not os.path.exists(model_path):
        raise UsageError(f"model path '{model_path}' not found")
    try:
        tokenizer = _load_tokenizer(model_args, model_path)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the tokenizer from '{model_args.tokenizer_name or model_path}': {err}") from err

    # ---- data
    try:
        datasets, collator = _load_data(data_args, tokenizer, training_args, info)
    except (FileNotFoundError, ValueError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise UsageError(str(msg)) from err
    train_ds = datasets["train"] if training_args.do_train else None
    eval_ds = datasets["validation"] if (training_args.do_eval and "validation" in datasets) else None
    if training_args.do_train and (train_ds is None or len(train_ds) == 0):
        raise UsageError("the training set is empty")
    if eval_ds is not None and len(eval_ds) == 0:
        logger.warning("the held-out set is empty (validation_split_percentage=0?): no held-out loss is reported")
        eval_ds = None
    check_selection = bool(resume) and _check_resume(resume, adapter_args)
    calibration = _calibration_batches(adapter_args, train_ds, collator, training_args)

    # ---- model + adapter
    try:
        model = _load_model(model_args, model_path, training_args, adapter_args.peft_type)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the model from '{model_path}': {err}") from err
    _configure_gaudi_generation(model, model_args, training_args)
    try:
        model = _tr.prepare_model(
            model,
            adapter_args.peft_type,
            r=adapter_args.paca_r,
            alpha=adapter_args.paca_alpha,
            target_modules=adapter_args.target_modules,
            exclude_modules=adapter_args.exclude_modules,
            modules_to_save=adapter_args.modules_to_save,
            random_seed=adapter_args.random_seed,
            lora_dropout=adapter_args.lora_dropout,
            gradient_checkpointing=training_args.gradient_checkpointing,
            init_indices=adapter_args.paca_init_indices,
            calibration_data=calibration,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    if check_selection:
        _check_resume_selection(resume, model, adapter_args)
    trainable, total = trainable_parameters(model)
    logger.info(
        "%s: %s trainable parameters of %s (%.4f %%)",
        adapter_args.peft_type,
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
    )

    # ---- schedule of held-out evaluations
    if train_ds is not None and eval_ds is not None and "eval_steps" not in explicit and training_args.eval_strategy == "steps":
        training_args.eval_steps = max(1, math.ceil(_total_steps(training_args, len(train_ds)) / EVALS_PER_RUN))
    if eval_ds is None and training_args.eval_strategy != "no":
        from transformers.trainer_utils import IntervalStrategy

        training_args.eval_strategy = IntervalStrategy.NO

    trainer = _tr.make_trainer(
        model,
        training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )

    warmup = parsed.throughput_warmup_steps
    throughput = _tr.ThroughputCallback(trainer, warmup_steps=warmup)
    trainer.add_callback(throughput)

    metrics: Dict[str, Any] = {
        "device": info.type,
        "device_description": info.describe(),
        "trainer": trainer_kind,
        "peft_type": adapter_args.peft_type,
        "model": model_args.model_name_or_path or "embedded:SmolLM2-135M-Instruct",
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
    }
    if adapter_args.peft_type != "none":
        metrics.update(r=adapter_args.paca_r, alpha=adapter_args.paca_alpha, target_modules=adapter_args.target_modules)
    if adapter_args.peft_type == "paca":
        metrics.update(init_indices=adapter_args.paca_init_indices,
                       calibration_batches=len(calibration) if calibration is not None else 0)

    eval_before = None
    if eval_ds is not None:
        eval_before = trainer.evaluate(metric_key_prefix="eval")["eval_loss"]
        metrics["eval_loss_before"] = eval_before
        logger.info("held-out loss before training: %.4f", eval_before)

    train = training_args.do_train
    if train and resume and training_args.max_steps and training_args.max_steps > 0:
        done = _checkpoint_step(resume)
        if done is not None and done >= training_args.max_steps:
            # upstream would run one extra step when resuming at max_steps; there is nothing left to train
            logger.info("checkpoint %s is at step %d >= max_steps %d: nothing left to train", resume, done,
                        training_args.max_steps)
            trainer._load_from_checkpoint(resume)
            trainer.save_model()  # the output directory still gets the (loaded) final adapter / model
            train = False
    if train:
        mem_kind = run_device.type if run_device.type in ("hpu", "cuda", "cpu") else None
        _device.reset_peak_memory(mem_kind)
        result = trainer.train(resume_from_checkpoint=resume)
        _device.synchronize()
        metrics["peak_memory_bytes"] = _device.peak_memory_bytes(mem_kind)
        metrics["peak_memory_kind"] = _device.peak_memory_kind(mem_kind)
        tm = result.metrics
        metrics.update(
            train_loss=tm.get("train_loss"),
            train_runtime=tm.get("train_runtime"),
            train_steps=trainer.state.global_step,
            train_samples_per_second=tm.get("train_samples_per_second"),
            train_tokens=throughput.tokens,
            train_tokens_per_second=throughput.tokens_per_second,
            throughput_warmup_steps=warmup,
            throughput_measured_steps=throughput.steps,
        )
        trainer.save_model()  # adapter only for PaCA (and LoRA); full model for peft_type none
        trainer.save_state()

    if eval_ds is not None:
        reuse = train and not training_args.load_best_model_at_end
        last = trainer.state.log_history[-3:] if reuse else []
        done = [h for h in last if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        # the trainer already evaluated the final weights at the last step: reuse that, do not run it twice
        ev = done[-1] if done else trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_loss_after"] = ev["eval_loss"]
        metrics["eval_samples"] = len(eval_ds)
        logger.info("held-out loss after training: %.4f", ev["eval_loss"])

    out = training_args.output_dir
    embedded_run = model_args.model_name_or_path is None
    verify = adapter_args.verify_adapter if adapter_args.verify_adapter is not None else embedded_run
    if verify and train and eval_ds is not None and adapter_args.peft_type == "paca":
        metrics["eval_loss_reloaded"] = _reloaded_eval_loss(
            model_args, model_path, training_args, out, eval_ds, collator, tokenizer)
        logger.info("held-out loss of the saved adapter on a freshly loaded base model: %.4f",
                    metrics["eval_loss_reloaded"])

    os.makedirs(out, exist_ok=True)
    if training_args.should_save:
        plot = _plot_losses(trainer.state.log_history, eval_before, os.path.join(out, "loss_curves.png"))
        metrics["loss_plot"] = plot
        if adapter_args.save_merged:
            merged_dir = os.path.join(out, "merged")
            # last use of the model in this run: merge in place (no second copy of the weights)
            _tr.save_merged_model(trainer.model, merged_dir, tokenizer, inplace=True)
            metrics["merged_dir"] = merged_dir
            logger.info("merged model written to %s", merged_dir)
        metrics["log_history"] = trainer.state.log_history
        _write_json_atomic(os.path.join(out, "metrics.json"), metrics)
        _print_summary(metrics, out)
    return metrics


def _reloaded_eval_loss(model_args, model_path, training_args, adapter_dir, eval_ds, collator, tokenizer) -> float:
    """Held-out loss of the adapter in ``adapter_dir`` loaded onto a freshly loaded base model (same trainer
    evaluation loop, so it equals the trained model's final held-out loss)."""
    from .adapter import load_adapter

    fresh = _load_model(model_args, model_path, training_args, "paca")
    _configure_gaudi_generation(fresh, model_args, training_args)
    load_adapter(fresh, adapter_dir)
    checker = _tr.make_trainer(fresh, training_args, eval_dataset=eval_ds, data_collator=collator,
                               processing_class=tokenizer)
    return float(checker.evaluate(metric_key_prefix="eval")["eval_loss"])


def _write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _print_summary(m: Dict[str, Any], out: str) -> None:
    def f(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    lines = [
        "",
        "=" * 64,
        "run_paca_clm summary",
        "-" * 64,
        f"device                : {m['device_description']}  [{m['trainer']}]",
        f"method                : {m['peft_type']}"
        + (f" (r={m.get('r')}, alpha={m.get('alpha')}, targets={' '.join(m.get('target_modules') or [])})"
           if m["peft_type"] != "none" else " (full fine-tuning)"),
        f"trainable parameters  : {m['trainable_params']:,} of {m['total_params']:,} ({m['trainable_percent']:.4f} %)",
        f"held-out loss         : {f(m.get('eval_loss_before'))} -> {f(m.get('eval_loss_after'))}"
        + (f"  ({m['eval_samples']} examples)" if m.get("eval_samples") else ""),
    ]
    if "eval_loss_reloaded" in m:
        lines.append(f"saved adapter reloaded: held-out loss {f(m['eval_loss_reloaded'])} on a fresh base model")
    if "train_runtime" in m:
        lines += [
            f"train steps / time    : {m.get('train_steps')} steps in {f(m.get('train_runtime'), '.1f')} s",
            f"train tokens/s        : {f(m.get('train_tokens_per_second'), ',.1f')} (input tokens incl. padding; "
            f"{m.get('throughput_measured_steps')} steps after {m.get('throughput_warmup_steps')} warm-up, "
            "evaluation and checkpoint time excluded)",
            f"peak memory           : {_fmt_bytes(m.get('peak_memory_bytes'))} ({m.get('peak_memory_kind')})",
        ]
    lines += [f"output                : {out}", "=" * 64]
    print("\n".join(lines), flush=True)


def main(argv: Optional[Sequence[str]] = None, callbacks: Optional[list] = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 input error)."""
    try:
        run(argv, callbacks=callbacks)
    except UsageError as err:
        return _error(str(err))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
