"""Exports of a trained PaCA adapter for serving (``python -m paca_hpu export``).

**LoRA** (:func:`export_lora`). PaCA's update of a layer with weight ``W0`` ``(out_features, in_features)`` is
``W - W0 = scaling * delta @ E`` with ``scaling = paca_alpha / r`` and ``E`` ``(r, in_features)`` the one-hot rows
``E[j, indices[j]] = 1``: a rank-``r`` update. peft's LoRA update is ``(lora_alpha / r) * lora_B @ lora_A``. So
``lora_A = E``, ``lora_B = delta`` and ``lora_alpha = paca_alpha`` (same ``r``, hence the same scaling) is the same
function, with no arithmetic on the trained values: a relabelling. peft's merge ``W0 + (lora_B @ lora_A) * scaling``
then equals PaCA's merged weight bit for bit (``lora_B @ lora_A`` only picks entries of ``delta``, and PaCA merges
as ``W0[:, idx] + delta * scaling``); unmerged, ``x @ lora_A.T`` picks ``x[..., indices]`` exactly and only the
order of the float32 additions differs from PaCA's single GEMM. The file is peft's layout (``adapter_config.json``
written by ``peft.LoraConfig``, ``adapter_model.safetensors`` with ``base_model.model.<name>.lora_A.weight`` /
``.lora_B.weight``), which ``peft.PeftModel.from_pretrained`` and vLLM's ``--lora-modules`` load. Cost: a dense
``lora_A`` of ``r x in_features`` per layer next to ``delta``'s ``out_features x r``, about twice the PaCA adapter
for LLaMA-style models. ``modules_to_save`` are written as peft loads them into the same function: spelled so that
peft's suffix matching wraps exactly the modules the PaCA model trained, a tied head / embedding with
``ensure_weight_tying`` and one tensor per tied module (checked with peft itself on a meta-device copy of the base:
:func:`_peft_modules_to_save`), or refused.

**Merged** (:func:`export_merged`): the base model with the adapter merged (:func:`paca_hpu.merge_paca`), saved by
transformers' ``save_pretrained`` in the requested dtype, plus the tokenizer of the adapter directory or the base
model. The merge runs in float32 unless the base is stored in the requested dtype already, and the result is rounded
once to that dtype.

Both write into a temporary sibling directory and rename it to ``output_dir`` when complete; ``output_dir`` must not
exist or be empty. A full or read-only disk is an :class:`ExportError` (one line), and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .adapter import ADAPTER_WEIGHTS_NAME, load_adapter, read_adapter
from .adapter_state import MTS_PREFIX, check_complete, check_layers_fit
from .atomic import atomic_directory
from .checkpoints import is_disk_full
from .config import PaCAConfig
from .hub import ModelSourceError, base_model_source, from_pretrained_cache_first, one_line
from .model import merge_paca
from .selection import check_indices
from .targets import is_supported, name_matches

__all__ = ["ExportError", "DTYPES", "export_lora", "export_merged", "lora_state_dict"]

logger = logging.getLogger(__name__)

#: ``--dtype`` names.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

PathLike = Union[str, os.PathLike]


class ExportError(ValueError):
    """A bad input to an export (missing, foreign, incomplete or corrupt adapter directory, unusable base model,
    occupied output directory, unknown dtype) or an output disk that is full or read-only; the message is one line
    and names the fix. The CLI exits with status 2."""


def _read(adapter_dir: PathLike, base_model: Optional[PathLike]) -> Tuple[PaCAConfig, Dict, Dict, str]:
    """``(config, metadata, tensors, base)``; ``base`` from ``base_model`` or the adapter's record."""
    if not Path(adapter_dir).is_dir():
        raise ExportError(f"adapter directory '{adapter_dir}' not found")
    try:
        config, meta, tensors = read_adapter(adapter_dir)
    except (OSError, ValueError) as err:
        raise ExportError(one_line(err, limit=None)) from err
    base = base_model if base_model is not None else meta.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"the adapter in '{adapter_dir}' records no base model; pass --base_model PATH_OR_NAME")
    try:  # a local path is made absolute (the LoRA export records it) and never looked up on the Hub
        base = base_model_source(str(base), None if base_model is not None else str(adapter_dir),
                                 "pass --base_model PATH_OR_NAME")
    except ModelSourceError as err:
        raise ExportError(str(err)) from err
    return config, meta, tensors, base


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ExportError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _write_error(out: Path, err: BaseException) -> Optional[ExportError]:
    """The one-line error for a write into ``out`` that failed for lack of space (``ENOSPC`` / ``EDQUOT``,
    safetensors' "No space left on device") or of permission (read-only file system, no access); None for any
    other failure."""
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ExportError(f"cannot write '{out}': {err.strerror}; pass a writable --output")
    if is_disk_full(err, str(out.parent)):
        return ExportError(f"no space left on the disk of '{out}' ({one_line(err)}); free some space or pass "
                           "another --output")
    return None


@contextlib.contextmanager
def _atomic_output(output_dir: PathLike) -> Iterator[Path]:
    """A temporary directory beside ``output_dir`` for a ``with`` block, renamed to it when the block completes,
    removed on error (:func:`paca_hpu.atomic.atomic_directory`).

    Raises:
        ExportError: ``output_dir`` exists and is not an empty directory; a full or read-only disk
            (:func:`_write_error`).
    """
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output directory '{out}' exists and is not empty; pass a new --output or remove it")
    try:
        with atomic_directory(out) as tmp:
            yield tmp
    except BaseException as err:
        failed = _write_error(out, err)
        if failed is None:
            raise
        raise failed from err


def _load_config(base: str):
    from transformers import AutoConfig

    try:
        return from_pretrained_cache_first(AutoConfig.from_pretrained, base)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot load the base model config from '{base}': {one_line(err)}; pass --base_model "
                          "PATH_OR_NAME") from err


def _layer_shapes(base: str, names: List[str], config: PaCAConfig, tensors: Dict[str, torch.Tensor],
                  adapter_dir: PathLike) -> Tuple[Dict[str, Tuple[str, int, int]], List[str], nn.Module]:
    """``({name: (kind, out_features, in_features)}, names of all linear layers, the model)`` of the base
    architecture, built on the meta device from its config (no weights read; tied weights are tied). The adapter is
    checked against it as
    :func:`paca_hpu.load_adapter` checks it (every saved layer fits, its indices distinct and in range; every layer
    that ``target_modules`` selects has a saved delta): ExportError naming the first layer that fails."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_load_config(base))
    modules = dict(model.named_modules())
    shapes = {}
    for name in names:
        module = modules.get(name)
        if module is None or not is_supported(module):
            raise ExportError(f"adapter layer '{name}' is no linear layer of the base model '{base}'; the adapter "
                              "was trained on another model (pass the right --base_model)")
        w = module.weight
        shapes[name] = ("conv1d", w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else (
            "linear", w.shape[0], w.shape[1])
    try:
        check_layers_fit(model, config, tensors, names)
        check_complete(model, config, names, adapter_dir)
    except ValueError as err:
        raise ExportError(one_line(err, limit=None)) from err
    return shapes, [n for n, m in model.named_modules() if n and is_supported(m)], model


def _target_modules(names: List[str], linear_names: List[str]) -> List[str]:
    """Module-name suffixes (``["q_proj", ...]``, what vLLM and most tools expect) when they select exactly the
    adapted layers, else the full qualified names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    covered = {n for n in linear_names if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if covered == set(names) else sorted(names)


def _holders(model: nn.Module) -> Dict[int, List[str]]:
    """``{id(parameter): ["<module>.<name>", ...]}``: every module that holds each parameter (tied weights: several)."""
    out: Dict[int, List[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return out


def _peft_wrapped(model: nn.Module, lora_kwargs: Dict, spelling: List[str], tie: bool) -> Dict[str, nn.Module]:
    """``{module name: ModulesToSaveWrapper}`` that peft's ``get_peft_model`` makes of a copy of ``model`` (the
    meta-device base) for ``LoraConfig(**lora_kwargs, modules_to_save=spelling[, ensure_weight_tying=True])``: peft's
    own matching and tying, asked of peft itself."""
    import copy
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.utils import ModulesToSaveWrapper

    kwargs = dict(lora_kwargs, modules_to_save=list(spelling), **({"ensure_weight_tying": True} if tie else {}))
    with warnings.catch_warnings():  # peft's warnings about the ties it is asked to keep or not
        warnings.simplefilter("ignore")
        inner = get_peft_model(copy.deepcopy(model), LoraConfig(**kwargs)).base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _trained_by_id(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """``{id(base parameter): saved value}`` of the adapter's ``modules_to_save.<param>`` tensors.

    Raises:
        ExportError: a saved parameter is not in the base model.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    trained: Dict[int, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(MTS_PREFIX):
            p = params.get(key[len(MTS_PREFIX):])
            if p is None:
                raise ExportError(f"adapter modules_to_save parameter '{key[len(MTS_PREFIX):]}' is not in the base "
                                  "model; the adapter was trained on another model (pass the right --base_model)")
            trained[id(p)] = value
    return trained


def _peft_modules_to_save(model: nn.Module, config: PaCAConfig, tensors: Dict[str, torch.Tensor], lora_kwargs: Dict
                          ) -> Tuple[List[str], bool, Dict[str, torch.Tensor]]:
    """``(modules_to_save, ensure_weight_tying, {peft key: tensor})`` with which peft's LoRA computes the
    ``modules_to_save`` as the PaCA model does.

    The PaCA model computes every module that holds a saved parameter with the trained copy, tied holders outside
    ``modules_to_save`` included (``lm_head`` and a tied input embedding share one copy). peft matches
    ``modules_to_save`` as plain name suffixes (``"norm"`` also selects every ``input_layernorm``) and keeps a tie only
    with ``ensure_weight_tying=True``. Both are asked of peft itself on a meta-device copy of ``model``
    (:func:`_peft_wrapped`) for these spellings, in order: the adapter's names, the full names of the modules they
    select, each without and then with ``ensure_weight_tying``, then every module holding a trained parameter (with,
    then without). The first whose wrapped modules hold exactly the trained parameters is taken, with the keys
    ``PeftModel.from_pretrained`` loads (``base_model.model.<module>.<name>``, each tied module its own).

    Raises:
        ExportError: no spelling gives the PaCA model (names the parameter peft would leave at its base value, or the
            module it would replace in addition); a saved parameter is not in the base model.
    """
    from peft import LoraConfig

    holders, trained = _holders(model), _trained_by_id(model, tensors)
    params = dict(model.named_parameters(remove_duplicate=False))
    need = {h for pid in trained for h in holders[pid]}
    found = sorted(n for n, _ in model.named_modules() if n and name_matches(n, config.modules_to_save))
    every = sorted({h.rpartition(".")[0] for h in need})
    tie = "ensure_weight_tying" in getattr(LoraConfig, "__dataclass_fields__", {})
    candidates = [(list(config.modules_to_save), False), (found, False)] + (
        [(list(config.modules_to_save), True), (found, True), (every, True)] if tie else []) + [(every, False)]
    why = None
    for i, (spelling, tied) in enumerate(candidates):
        if (spelling, tied) in candidates[:i]:
            continue
        try:
            wrapped = _peft_wrapped(model, lora_kwargs, spelling, tied)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
            why = why or f"peft refuses modules_to_save={spelling!r} ({one_line(err)})"
            continue
        covered = {h for hs in holders.values() for h in hs if any(h.startswith(w + ".") for w in wrapped)}
        keys = {f"{w}.{q}" for w, wrapper in wrapped.items()
                for q in wrapper.modules_to_save[next(iter(wrapper.modules_to_save))].state_dict()}
        if covered == need and all(k in params and id(params[k]) in trained for k in keys):
            return spelling, tied, {f"base_model.model.{k}": trained[id(params[k])] for k in sorted(keys)}
        why = why or _why_not(need, covered, holders, keys - set(params))
    raise ExportError(f"modules_to_save={config.modules_to_save!r} cannot be exported as a peft LoRA adapter: {why}; "
                      "export --to merged instead (exact)")


def _why_not(need: set, covered: set, holders: Dict[int, List[str]], unheld: set) -> str:
    """Why peft's wrapping (``covered``: the parameters its ``modules_to_save`` copies replace) is not the PaCA model's
    (``need``), in words."""
    missing, extra = sorted(need - covered), sorted(covered - need)
    if missing:
        partner = next((h for hs in holders.values() if missing[0] in hs for h in hs if h != missing[0]), None)
        return f"peft leaves '{missing[0]}' at its base value" + (
            f" (it is tied to '{partner}', which the PaCA model trains as one shared copy)" if partner else "")
    if extra:
        return f"peft would also replace '{extra[0]}' (its modules_to_save match name suffixes), which was not trained"
    return f"peft would load '{sorted(unheld)[0]}', which the adapter does not hold"


def lora_state_dict(config: PaCAConfig, tensors: Dict[str, torch.Tensor],
                    shapes: Dict[str, Tuple[str, int, int]], dtype: torch.dtype = torch.float32,
                    modules_to_save: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """peft LoRA tensors equal to a PaCA adapter.

    Args:
        config: the adapter's :class:`PaCAConfig`.
        tensors: the adapter file's tensors (``<name>.delta`` ``(out_features, r)``, ``<name>.indices`` ``(r,)``,
            ``modules_to_save.<param>``).
        shapes: ``{name: (kind, out_features, in_features)}`` of the base layers.
        dtype: dtype of the LoRA matrices (``lora_A`` is 0/1, exact in any dtype).
        modules_to_save: ``{peft key: tensor}`` of the ``modules_to_save`` (what :func:`export_lora` checked peft
            loads, tied modules included); default: ``base_model.model.<param>`` for each ``modules_to_save.<param>``
            of ``tensors``.

    Returns:
        ``base_model.model.<name>.lora_A.weight`` ``(r, in_features)`` (one-hot rows at ``indices``),
        ``base_model.model.<name>.lora_B.weight`` ``(out_features, r)`` (= ``delta``) and the
        ``modules_to_save`` tensors, in ``dtype``; with ``lora_alpha = paca_alpha``.

    Raises:
        ExportError: a delta or its indices do not fit the base layer.
    """
    out: Dict[str, torch.Tensor] = {}
    for name, (_, out_features, in_features) in shapes.items():
        delta = tensors[f"{name}.delta"]
        if delta.shape != (out_features, config.r):
            raise ExportError(f"adapter layer '{name}' (delta {tuple(delta.shape)}) does not fit the base layer "
                              f"({out_features} x {in_features}); pass the right --base_model")
        try:
            idx = check_indices(tensors[f"{name}.indices"], in_features, config.r,
                                what=f"the indices of adapter layer '{name}'")
        except ValueError as err:
            raise ExportError(f"{err} (base layer {out_features} x {in_features}); pass the right --base_model"
                              ) from None
        lora_a = torch.zeros(config.r, in_features, dtype=dtype)
        lora_a[torch.arange(config.r), idx] = 1
        out[f"base_model.model.{name}.lora_A.weight"] = lora_a
        out[f"base_model.model.{name}.lora_B.weight"] = delta.to(dtype).contiguous()
    if modules_to_save is None:
        modules_to_save = {f"base_model.model.{key[len(MTS_PREFIX):]}": value for key, value in tensors.items()
                           if key.startswith(MTS_PREFIX)}
    for key, value in modules_to_save.items():  # a copy each: tied modules are written as separate tensors
        out[key] = value.to(dtype=dtype, copy=True).contiguous()
    return out


def export_lora(adapter_dir: PathLike, output_dir: PathLike, *, base_model: Optional[PathLike] = None,
                dtype: Optional[str] = None) -> str:
    """Write the PaCA adapter in ``adapter_dir`` as an equivalent peft LoRA adapter into ``output_dir``.

    Args:
        adapter_dir: a paca_hpu adapter directory.
        output_dir: new or empty directory; written atomically.
        base_model: base model path or hub name (only its config is read); default: the adapter's record.
        dtype: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` for the LoRA matrices.

    Returns:
        ``output_dir`` as a string.

    Raises:
        ExportError: see :class:`ExportError`; also ``modules_to_save`` that peft cannot load as the PaCA model
            computes them (:func:`_peft_modules_to_save`; names the reason, ``--to merged`` is exact).
        ImportError: peft is not installed (its ``LoraConfig`` writes the config).
    """
    torch_dtype = _dtype(dtype) or torch.float32
    config, _, tensors, base = _read(adapter_dir, base_model)
    try:
        from peft import LoraConfig
    except ImportError as err:
        raise ImportError("export --to lora needs peft (it writes peft's adapter_config.json): pip install peft"
                          ) from err
    names = [k[: -len(".delta")] for k in tensors if k.endswith(".delta") and not k.startswith(MTS_PREFIX)]
    shapes, linear_names, meta_model = _layer_shapes(base, names, config, tensors, adapter_dir)
    kinds = {kind for kind, _, _ in shapes.values()}
    if len(kinds) > 1:
        raise ExportError("the adapter mixes nn.Linear and Conv1D layers; peft's fan_in_fan_out is one flag for all: "
                          "export --to merged instead")
    lora_kwargs = dict(r=config.r, lora_alpha=config.paca_alpha, lora_dropout=0.0, bias="none",
                       target_modules=_target_modules(names, linear_names), fan_in_fan_out=kinds == {"conv1d"},
                       task_type="CAUSAL_LM", base_model_name_or_path=base, inference_mode=True)
    to_save = None
    if config.modules_to_save:
        spelling, tie, to_save = _peft_modules_to_save(meta_model, config, tensors, lora_kwargs)
        lora_kwargs.update(modules_to_save=spelling, **({"ensure_weight_tying": True} if tie else {}))
    state = lora_state_dict(config, tensors, shapes, torch_dtype, to_save)
    lora_config = LoraConfig(**lora_kwargs)
    from safetensors.torch import save_file

    with _atomic_output(output_dir) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        lora_config.save_pretrained(str(tmp))
    return str(output_dir)


def _stored_dtype(config) -> Optional[torch.dtype]:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if value in DTYPES.values() else None


def _load_base(base: str, load_dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from .hub import dtype_kwargs

    try:
        return from_pretrained_cache_first(AutoModelForCausalLM.from_pretrained, base, **dtype_kwargs(load_dtype))
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot load the base model '{base}': {one_line(err)}; pass --base_model PATH_OR_NAME"
                          ) from err


def _save_tokenizer(sources: List[str], target: Path) -> Optional[str]:
    """Save the tokenizer of the first source that has one into ``target``; the source used, or None."""
    from transformers import AutoTokenizer

    for src in sources:
        if Path(src).is_dir() and not (Path(src) / "tokenizer_config.json").is_file():
            continue
        try:
            AutoTokenizer.from_pretrained(src).save_pretrained(str(target))
            return src
        except (OSError, ValueError) as err:
            logger.info("no tokenizer from %s (%s)", src, one_line(err))
    logger.warning("no tokenizer found in the adapter directory or the base model; the export has none")
    return None


def export_merged(adapter_dir: PathLike, output_dir: PathLike, *, base_model: Optional[PathLike] = None,
                  dtype: Optional[str] = None) -> str:
    """Write the base model with the PaCA adapter merged in as a plain transformers checkpoint into ``output_dir``
    (``AutoModelForCausalLM.from_pretrained`` loads it), plus the tokenizer.

    Args:
        adapter_dir: a paca_hpu adapter directory.
        output_dir: new or empty directory; written atomically.
        base_model: base model path or hub name; default: the adapter's record.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``; default: the dtype the base checkpoint is stored in (float32
            if it does not say). The merged weight ``W0[:, idx] + delta * scaling`` is computed in float32 and
            rounded once to ``dtype``.

    Returns:
        ``output_dir`` as a string.

    Raises:
        ExportError: see :class:`ExportError`; also when the adapter does not fit the base model.
    """
    requested = _dtype(dtype)
    _, _, _, base = _read(adapter_dir, base_model)
    stored = _stored_dtype(_load_config(base))
    target = requested or stored or torch.float32
    # float32 unless the base is stored in the target dtype already (its values then are exact there)
    model = _load_base(base, target if stored == target else torch.float32)
    try:
        load_adapter(model, adapter_dir)
    except ValueError as err:
        raise ExportError(one_line(err, limit=None)) from err
    merged = merge_paca(model).to(target)
    with _atomic_output(output_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer([str(adapter_dir), base], tmp)
    return str(output_dir)
