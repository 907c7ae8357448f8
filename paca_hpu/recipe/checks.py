"""Checks of the training script's input, each before the first step that would fail on it: flags that need nothing
loaded, the output folder, the engine and quantization, the adapter against the loaded base model, and a checkpoint
to resume from.  Every refusal is a :class:`~paca_hpu.recipe.errors.UsageError` naming the flag as typed."""

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import checkpoints as _ckpt
from .. import trainer as _tr
from ..adapter import is_paca_adapter_config
from ..model import name_matches
from ..selection import check_r
from .errors import UsageError
from .parsing import typed_flag

logger = logging.getLogger("paca_hpu.run_paca_clm")

def check_batch_sizes(training_args) -> None:
    """Batch sizes and accumulation steps must be positive (0 divides by zero deep inside the Trainer)."""
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, flag, 1)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} {value} is not allowed; pass a value >= 1")


def check_adapter_numbers(adapter_args, argv: Sequence[str]) -> None:
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
        raise UsageError(f"{typed_flag(argv, 'paca_r')} {a.paca_r} is not allowed: {what} must be >= 1 (e.g. 8)"
                         ) from None
    if a.peft_type == "paca" and not (math.isfinite(a.paca_alpha) and a.paca_alpha > 0):
        raise UsageError(f"{typed_flag(argv, 'paca_alpha')} {a.paca_alpha:g} is not allowed: the scaling numerator "
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


def check_targets(model, adapter_args, argv: Sequence[str]) -> None:
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
    flag = typed_flag(argv, "target_modules")
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
    from .. import find_target_modules

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
            raise UsageError(f"{typed_flag(argv, 'paca_r')} {a.paca_r} exceeds in_features={in_features} of layer "
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


def fit_seq_len(model, data_args, argv: Sequence[str]) -> None:
    """``--max_seq_len`` must be >= 1, and above the model's positions it is lowered to them with a warning, as
    transformers' ``run_clm.py`` does with ``--block_size`` (so the default 512 still runs on a model of fewer
    positions): longer examples would run past the positions the model was trained on, and
    ``--pad_to_max_length`` would pad every batch to the length asked for.  Sets ``data_args.max_seq_len``.

    Raises:
        UsageError: ``--max_seq_len`` below 1.
    """
    flag = typed_flag(argv, "max_seq_len")
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


def check_not_the_model(output_dir: str, model_path: Optional[str]) -> None:
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


def check_output_dir(training_args, resume: Optional[str]) -> None:
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


def check_distributed(training_args, info, save_merged: bool = False) -> None:
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


_BNB_FLAGS = ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")


def check_quantization(model_args, peft_type: str, explicit: set, device_type: str) -> None:
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


def _spec_key(value: Any) -> Any:
    """A ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` value without its spelling order: a list of
    names matches by membership (``["q_proj", "v_proj"]`` selects what ``["v_proj", "q_proj"]`` selects)."""
    if isinstance(value, (list, tuple)):
        return tuple(sorted(set(value)))
    return value


def check_resume(checkpoint: str, adapter_args) -> bool:
    """The checkpoint must hold what this run trains: the same ``--peft_type`` and, for PaCA, the same adapter
    shape (else the optimizer state cannot fit). Reads the checkpoint's adapter_config.json once.

    Returns:
        True when ``--target_modules`` / ``--exclude_modules`` are spelled differently from the checkpoint's (other
        names, a regex): whether they select the same layers is then checked once the model is adapted
        (:func:`check_resume_selection`). Lists that differ only in order count as equal here.

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


def check_resume_selection(checkpoint: str, model, adapter_args) -> None:
    """The PaCA layers of ``model`` (adapted with this run's flags) must be the layers the checkpoint's adapter
    holds: what ``--target_modules`` / ``--exclude_modules`` select, whatever their spelling.

    Raises:
        UsageError: the checkpoint's adapter file cannot be read, or the selections differ (names a layer in one
            and not the other, and the checkpoint's flags).
    """
    from safetensors import safe_open

    from .. import paca_layers

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
