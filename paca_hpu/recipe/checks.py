"""Checks of the training script's input, each before the first step that would fail on it: flags that need nothing
loaded, the output folder, the engine and quantization, the adapter against the loaded base model, and a checkpoint
to resume from.  Every refusal is a :class:`~paca_hpu.recipe.errors.UsageError` naming the flag as typed."""

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import checkpoints as _ckpt
from .. import trainer as _tr
from ..adapter import ADAPTER_CONFIG_NAME, read_adapter
from ..hub import one_line
from ..model import name_matches
from ..selection import check_r
from .errors import UsageError
from .parsing import typed_flag
from .training import checkpoint_step

logger = logging.getLogger("paca_hpu.run_paca_clm")

def check_batch_sizes(training_args) -> None:
    """Batch sizes and accumulation steps must be positive (0 divides by zero deep inside the Trainer)."""
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, flag, 1)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} {value} is not allowed; pass a value >= 1")


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


def check_targets(model, peft_type: str, config, argv: Sequence[str]) -> None:
    """Right after the base model is loaded, before any data is processed: every name of the run's
    ``config.target_modules`` (:class:`~paca_hpu.PaCAConfig`; for LoRA too) matches a module of ``model`` (as peft
    and :func:`paca_hpu.apply_paca` match names: the qualified name or its last parts; one regular expression must
    match some module), and for PaCA ``config.r`` fits every targeted layer's ``in_features``.  A name that matches
    nothing used to be dropped silently when another one matched.

    Raises:
        UsageError: naming the unknown modules and the model's linear module names, or the layer whose
            ``in_features`` is smaller than ``--paca_r``.
    """
    if config is None:  # --peft_type none
        return
    target = config.target_modules  # "all-linear", one regular expression, or a list of names
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target, str):
        unknown = [] if target == "all-linear" or any(name_matches(n, target) for n in names) else [target]
    else:
        unknown = [t for t in target if not any(name_matches(n, [t]) for n in names)]
    if unknown:
        shown = ", ".join("'" + u + "'" for u in unknown)
        verb = "matches" if len(unknown) == 1 else "match"
        kinds, tied = _linear_module_kinds(model, without_tied=peft_type == "paca")
        left_out = f"; {', '.join(tied)}: tied to another module's weight, which PaCA cannot adapt" if tied else ""
        raise UsageError(f"{typed_flag(argv, 'target_modules')}: {shown} {verb} no module of {type(model).__name__}; "
                         f"its linear modules are {', '.join(kinds) or 'none'} (or pass all-linear){left_out}")
    if peft_type != "paca":
        return
    modules = dict(model.named_modules())
    for name in _selected_layers(model, config):
        in_features = getattr(modules[name], "in_features", None) or getattr(modules[name], "nx", None)
        try:
            check_r(config.r, in_features, name)
        except ValueError:
            raise UsageError(f"{typed_flag(argv, 'paca_r')} {config.r} exceeds in_features={in_features} of layer "
                             f"'{name}' (PaCA trains r of its input columns); lower it, or leave that layer out "
                             "with --exclude_modules") from None


def _selected_layers(model, config) -> List[str]:
    """The layers of the un-adapted ``model`` that ``config`` adapts (:func:`paca_hpu.find_target_modules`).

    Raises:
        UsageError: the selection is refused (e.g. a tied output head named explicitly).
    """
    from .. import find_target_modules

    try:
        return find_target_modules(model, config)
    except ValueError as err:
        raise UsageError(str(err)) from err


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
    if not entries or entries == [_ckpt.RUN_FILE]:
        return  # empty, or only the run id of an earlier run that failed before it saved anything
    if resume and os.path.isdir(resume) and os.path.samefile(os.path.dirname(os.path.abspath(resume)), out):
        return  # continuing the run that this directory holds
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    resumable = any(_ckpt.is_complete(p) for _, p in _ckpt.checkpoints_in(out))
    raise UsageError(f"--output_dir '{out}' is not empty ({shown}); pass --overwrite_output_dir to write over it"
                     + (", --resume_from_checkpoint last to continue the run in it" if resumable else "")
                     + ", or another --output_dir")


def check_something_to_train(training_args, resume: Optional[str]) -> None:
    """A resume that would train no step is refused before anything is written when its outputs would replace what
    the output directory holds: a checkpoint past ``--max_steps``, or a run that already finished (its final
    ``trainer_state.json`` at or past the checkpoint's step). A checkpoint at exactly ``--max_steps`` of a run that
    was stopped before its final save is still finished (its adapter written as the run's output, :meth:`train`).

    Raises:
        UsageError: naming the checkpoint's step, ``--max_steps`` and the flag to change.
    """
    ta = training_args
    if not (resume and ta.do_train and ta.max_steps and ta.max_steps > 0):
        return
    done = checkpoint_step(resume)
    if done is None or done < ta.max_steps:
        return
    if done > ta.max_steps:
        raise UsageError(f"checkpoint '{resume}' is at step {done}, past --max_steps {ta.max_steps}: there is nothing "
                         f"to train; raise --max_steps above {done} to train further, or resume from a checkpoint-K "
                         f"with K <= {ta.max_steps}")
    final = checkpoint_step(ta.output_dir)
    if final is not None and final >= done:
        raise UsageError(f"the run in '{ta.output_dir}' already finished at step {final} and --max_steps is "
                         f"{ta.max_steps}: there is nothing to train, and its outputs are left as they are; raise "
                         f"--max_steps above {final} to train further")


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


def _checkpoint_adapter(checkpoint: str, peft_type: str):
    """``(kind, PaCAConfig or None)`` of what ``checkpoint`` holds: ``"none"`` (no adapter_config.json: a full
    model), ``"paca"`` (read with :func:`paca_hpu.adapter.read_adapter`, which checks both files) or ``"other"``
    (an adapter that is no paca_hpu one, such as peft LoRA's).

    Raises:
        UsageError: this run is PaCA and the checkpoint's adapter files cannot be read as a PaCA adapter (names the
            file and why: garbled, truncated, another method's adapter).
    """
    if not os.path.isfile(os.path.join(checkpoint, ADAPTER_CONFIG_NAME)):
        return "none", None
    try:
        config, _, _ = read_adapter(checkpoint)
    except (OSError, ValueError) as err:
        if peft_type == "paca":  # the reader's own fix (save the adapter again) is not the one for a checkpoint
            raise UsageError(f"cannot resume from '{checkpoint}' with --peft_type paca: "
                             f"{one_line(err).split('; ', 1)[0]}; {_other_checkpoints_fix(checkpoint)}") from err
        return "other", None
    return "paca", config


def _other_checkpoints_fix(checkpoint: str) -> str:
    """What to do instead of resuming from a damaged ``checkpoint``: another complete checkpoint in the same folder
    (the newest two are named), or starting over."""
    folder, here = os.path.dirname(os.path.abspath(checkpoint)), os.path.abspath(checkpoint)
    earlier = [os.path.basename(p) for _, p in _ckpt.checkpoints_in(folder)
               if os.path.abspath(p) != here and _ckpt.is_complete(p)]
    named = f" ({', '.join(earlier[-2:])} there)" if earlier else ""
    return f"resume from another complete checkpoint-N{named}, or drop --resume_from_checkpoint to start over"


def check_trainer_files(checkpoint: str) -> None:
    """The Trainer's own files of ``checkpoint`` must be readable before training starts: ``trainer_state.json``
    parses as JSON, and each ``*.pt`` / ``*.pth`` (optimizer, scheduler, RNG states: zip archives written by
    ``torch.save``) passes its zip CRC check. Nothing is unpickled here.

    Raises:
        UsageError: naming the damaged file (one line), with the fix: an earlier checkpoint, or no resume.
    """
    import zipfile

    fix = _other_checkpoints_fix(checkpoint)
    state = os.path.join(checkpoint, "trainer_state.json")
    if os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot resume from '{checkpoint}': trainer_state.json is damaged ({one_line(err)}); "
                             f"{fix}") from err
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if not (name.endswith((".pt", ".pth")) and os.path.isfile(path)):
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            bad = one_line(err) or "not a torch.save archive"
        if bad is not None:
            raise UsageError(f"cannot resume from '{checkpoint}': {name} is truncated or damaged ({bad}); {fix}")


def check_resume(checkpoint: str, peft_type: str, config) -> Optional[Any]:
    """The checkpoint must hold what this run trains: the same ``--peft_type`` and, for PaCA, the same adapter shape
    as the run's ``config`` (else the optimizer state cannot fit).

    Returns:
        The checkpoint's :class:`~paca_hpu.PaCAConfig` when its ``target_modules`` / ``exclude_modules`` are
        spelled differently from ``config``'s (other names, a regex): whether they select the same layers is then
        checked once the base model is loaded (:func:`check_resume_selection`); else None. Lists that differ only
        in order count as equal here.

    Raises:
        UsageError: naming the flag to pass to match the checkpoint.
    """
    check_trainer_files(checkpoint)
    kind, saved = _checkpoint_adapter(checkpoint, peft_type)
    if kind != peft_type and (kind != "other" or peft_type == "none"):
        held = "an adapter that is no PaCA one" if kind == "other" else f"a --peft_type {kind} checkpoint"
        fix = "" if kind == "other" else f"; pass --peft_type {kind} to resume it"
        raise UsageError(f"cannot resume from '{checkpoint}': it holds {held}, this run has --peft_type {peft_type}"
                         + fix)
    if saved is None:
        return None
    have, want = saved.to_dict(), config.to_dict()
    for key in ("r", "paca_alpha", "modules_to_save"):
        if _spec_key(have[key]) != _spec_key(want[key]):
            flag = {"r": "paca_r"}.get(key, key)
            raise UsageError(f"cannot resume from '{checkpoint}': it was trained with {key}={have[key]!r}, this run "
                             f"has {key}={want[key]!r}; pass --{flag} to match the checkpoint")
    for key in ("random_seed", "init_indices"):
        if have[key] != want[key]:
            logger.warning("resuming with the checkpoint's column indices (%s=%s), not --%s %s", key, have[key],
                           {"init_indices": "paca_init_indices"}.get(key, key), want[key])
    differ = any(_spec_key(have[key]) != _spec_key(want[key]) for key in ("target_modules", "exclude_modules"))
    return saved if differ else None


def check_resume_selection(checkpoint: str, model, saved, config, argv: Sequence[str]) -> None:
    """The layers this run's ``config`` selects in the un-adapted base ``model`` must be those that the checkpoint's
    ``saved`` config selects there (which its adapter file holds, :func:`paca_hpu.load_adapter` checks): what
    ``--target_modules`` / ``--exclude_modules`` select, whatever their spelling.

    Raises:
        UsageError: the selections differ (names a layer in one and not the other, and the checkpoint's flags).
    """
    here, there = set(_selected_layers(model, config)), set(_selected_layers(model, saved))
    if here == there:
        return
    diff = [f"this run adds '{n}'" for n in sorted(here - there)[:1]] + [
        f"lacks '{n}'" for n in sorted(there - here)[:1]]
    target = config.target_modules if isinstance(config.target_modules, str) else " ".join(config.target_modules)
    raise UsageError(
        f"cannot resume from '{checkpoint}': {typed_flag(argv, 'target_modules')} {target} selects other layers than "
        f"the checkpoint's adapter ({len(here)} vs {len(there)}; {', '.join(diff)}); pass --target_modules / "
        f"--exclude_modules as the checkpoint was trained with (target_modules={saved.target_modules!r}, "
        f"exclude_modules={saved.exclude_modules!r})")
