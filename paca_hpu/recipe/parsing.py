"""``parse_args``: the command line (or one ``.json`` argument file) into the argument dataclasses, with the
script's defaults that depend on other flags, and a warning for each given flag that does nothing in this run."""

import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .. import _optimum_habana as _oh
from .. import device as _device
from .. import trainer as _tr
from ..config import PaCAConfig
from .arguments import (DEFAULT_LR, EMBEDDED_CPU_DEFAULTS, HPU_ONLY_MODEL_FLAGS, NOT_APPLICABLE, AdapterArguments,
                        DataArguments, HabanaCompatArguments, ModelArguments, PaCAConfigArguments, argument_classes,
                        build_parser, has_field, paca_config_flag)
from .errors import UsageError

logger = logging.getLogger("paca_hpu.run_paca_clm")


class ParsedArgs(NamedTuple):
    """What :func:`parse_args` returns: the argument dataclasses, the explicitly given field names, the throughput
    warm-up step count, the resolved ``use_cache`` (the training arguments' own field where they have one) and the
    run's adapter configuration: the one :class:`~paca_hpu.PaCAConfig` a run builds (for ``--peft_type lora`` its
    r / alpha / targets / modules_to_save configure the LoRA adapter; None for ``--peft_type none``)."""
    model: ModelArguments
    data: DataArguments
    adapter: AdapterArguments
    training: Any
    explicit: set
    throughput_warmup_steps: int
    use_cache: bool
    paca_config: Optional[PaCAConfig] = None


def given(argv: Sequence[str], name: str, aliases: Sequence[str] = ()) -> bool:
    opts = {f"--{name}", f"--{name.replace('_', '-')}", *aliases}
    return any(a in opts or a.split("=", 1)[0] in opts for a in argv if a.startswith("--"))


def deepspeed_requested(argv: Sequence[str]) -> bool:
    """``--deepspeed`` is given on the command line or as the key ``deepspeed`` of a single ``.json`` argument
    file; decides the training-arguments class on CPU (:func:`paca_hpu.trainer.arguments_class`)."""
    if len(argv) == 1 and argv[0].endswith(".json") and os.path.isfile(argv[0]):
        try:
            with open(argv[0]) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return False  # parse_args reports the broken file
        return isinstance(data, dict) and bool(data.get("deepspeed"))
    return given(argv, "deepspeed")


def typed_flag(argv: Sequence[str], name: str) -> str:
    """How the user spelled the flag of field ``name`` (``--paca_r``, ``--paca-r`` or an alias like ``--lora_rank``);
    ``--name`` when it was not on the command line (a JSON argument file, a default)."""
    spec = next((f for dt in (AdapterArguments, PaCAConfigArguments, DataArguments) for f in dataclasses.fields(dt)
                 if f.name == name), None)
    aliases = spec.metadata.get("aliases", []) if spec is not None else []
    spellings = {f"--{name}", f"--{name.replace('_', '-')}", *aliases}
    typed = [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in spellings]
    return typed[-1] if typed else f"--{name}"


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
        if given(argv, f.name, [aliases] if isinstance(aliases, str) else aliases):
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
    if has_field(args_cls, "warmup_ratio") or ratio is None:
        return
    if not 0 <= ratio < 1:
        raise UsageError(f"--warmup_ratio {ratio:g} is outside [0, 1); pass a fraction of the training steps, or "
                         "--warmup_steps N")
    if "warmup_steps" in explicit and values.get("warmup_steps"):
        logger.warning("--warmup_steps %s given: --warmup_ratio %g is ignored (as in transformers 4.x)",
                       values["warmup_steps"], ratio)
    else:
        values["warmup_steps"] = ratio


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
        UsageError: unknown keys in a JSON argument file, training arguments the dataclass rejects, or adapter
            flags ``PaCAConfig`` rejects (named as typed).
        SystemExit: (argparse, exit code 2) an unknown flag or a bad value on the command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _oh.declare_autocast_ops_first(argv)  # before anything imports habana_frameworks.torch (workaround 13)
    info = info or _device.get_device_info()
    args_cls = _tr.arguments_class(info.type, deepspeed=deepspeed_requested(argv))
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
    paca_config = _paca_config(values, adapter_args.peft_type, argv)
    return ParsedArgs(model_args, data_args, adapter_args, training_args, explicit, warmup, use_cache, paca_config)


#: What ``r`` is, per ``--peft_type``, in the message that refuses a value below 1.
_R_MEANS = {"paca": "the number of trained columns per layer", "lora": "the LoRA rank"}


def _paca_config(values: Dict[str, Any], peft_type: str, argv: Sequence[str]) -> Optional[PaCAConfig]:
    """The run's one :class:`~paca_hpu.PaCAConfig`, from the parsed ``PaCAConfigArguments`` values (flag names of
    :func:`~paca_hpu.recipe.arguments.paca_config_flag`; a one-element ``--target_modules`` list that is
    ``all-linear`` or a regular expression becomes that string, :func:`paca_hpu.trainer.paca_config`); None for
    ``--peft_type none`` (its adapter flags are warned about as not applicable, and not checked).

    Raises:
        UsageError: a field ``PaCAConfig`` refuses, named by its flag as typed (``--paca_r 0``, ``--lora_rank 0``,
            ``--paca_alpha 0``, ``--target_modules`` with a broken regular expression).
    """
    if peft_type == "none":
        return None
    flags = {f.name: paca_config_flag(f.name) for f in dataclasses.fields(PaCAConfig)}
    v = {name: values[flag] for name, flag in flags.items()}
    try:
        return _tr.paca_config(v["r"], v["paca_alpha"], v["target_modules"], v["exclude_modules"],
                               v["modules_to_save"], v["random_seed"], v["init_indices"])
    except ValueError as err:
        named = re.match(r"PaCAConfig\.(\w+)", str(err))  # PaCAConfig's messages name the field first
        name = named.group(1) if named else None
        if name not in flags:
            raise UsageError(str(err)) from None
        flag = typed_flag(argv, flags[name])
        if name == "r":
            raise UsageError(f"{flag} {v['r']} is not allowed: {_R_MEANS[peft_type]} must be >= 1 (e.g. 8)") from None
        if name == "paca_alpha":
            raise UsageError(f"{flag} {v['paca_alpha']:g} is not allowed: the scaling numerator must be a finite "
                             "number > 0 (e.g. 16; the update is scaled by alpha / r)") from None
        raise UsageError(f"{flag}: {err}") from None
