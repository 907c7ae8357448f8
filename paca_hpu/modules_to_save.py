"""``modules_to_save``: a trainable copy beside the frozen original (peft's ``ModulesToSaveWrapper``).

Each parameter of a ``modules_to_save`` module is replaced, in every module that holds it (tied weights stay tied), by
a trainable copy, and the frozen original stays registered beside it as ``paca_original_<name>``
(:data:`ORIGINAL_PREFIX`). :func:`paca_hpu.model.apply_paca` selects the modules (:func:`find_modules_to_save`) and
makes the copies (:func:`keep_originals`, also :func:`paca_hpu.load_adapter`'s route);
:func:`paca_hpu.disable_paca` switches the originals in (:func:`originals_in_place`); :func:`paca_hpu.unload_paca`
puts them back and :func:`paca_hpu.merge_paca` keeps the copies (:func:`settle_originals`).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Sequence, Tuple

from torch import nn

from .config import PaCAConfig
from .distributed import gathered, wrapping_engine
from .layer import PaCALayerBase, is_dtensor
from .targets import name_matches, paca_layers

__all__ = ["ORIGINAL_PREFIX", "find_modules_to_save", "keep_originals", "originals", "originals_in_place",
           "settle_originals"]

#: Name prefix under which a module keeps the frozen original of a ``modules_to_save`` parameter: ``lm_head.weight`` is
#: the trainable copy, ``lm_head.paca_original_weight`` the base weight (in ``state_dict``, moved and cast with the
#: model, never in an adapter file).
ORIGINAL_PREFIX = "paca_original_"


def find_modules_to_save(model: nn.Module, config: PaCAConfig, targets: Sequence[str]) -> List[nn.Module]:
    """The modules ``config.modules_to_save`` selects (names as ``target_modules`` lists match).

    Raises:
        ValueError: nothing matches, or a selected module is, holds or sits inside a PaCA layer (one of ``targets``
            or a layer already converted): it cannot be both adapted and trained whole.
    """
    if not config.modules_to_save:
        return []
    found = [(n, m) for n, m in model.named_modules() if n and name_matches(n, config.modules_to_save)]
    if not found:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module of {type(model).__name__}")
    adapted = set(targets) | {name for name, _ in paca_layers(model)}
    for name, _ in found:
        for target in sorted(adapted):
            if target == name or target.startswith(name + ".") or name.startswith(target + "."):
                raise ValueError(
                    f"modules_to_save={config.modules_to_save!r} selects '{name}', which "
                    f"{'is' if target == name else 'overlaps'} the PaCA layer '{target}': a module is either adapted "
                    "by PaCA or trained whole. Remove it from modules_to_save, or leave it out of the PaCA targets "
                    "(exclude_modules)")
    return [m for _, m in found]


def keep_originals(model: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Give every parameter of ``modules`` (and of their submodules) a trainable copy, as peft's
    ``ModulesToSaveWrapper`` does, so that the base weights stay available: in every module of ``model`` that holds
    such a parameter (tied weights: the input embedding and ``lm_head`` hold one), the parameter is replaced by one
    shared copy (``requires_grad=True``, same dtype and device) and the original, frozen, is registered beside it as
    ``ORIGINAL_PREFIX + name``. Parameters that already have a copy are left alone (idempotent). A DeepSpeed ZeRO-3
    placeholder is gathered whole to be copied.

    Raises:
        ValueError: a PaCA layer holds one of these parameters (it would be adapted and trained whole at once).
    """
    wanted = {id(p) for module in modules for p in module.parameters()}
    copies: Dict[int, nn.Parameter] = {}
    for holder in list(model.modules()):
        for pname, p in list(holder._parameters.items()):
            if p is None or id(p) not in wanted or pname.startswith(ORIGINAL_PREFIX) \
                    or ORIGINAL_PREFIX + pname in holder._parameters:
                continue
            if isinstance(holder, PaCALayerBase):
                raise ValueError(f"modules_to_save: parameter '{pname}' of PaCA layer "
                                 f"'{getattr(holder, 'paca_name', '?')}' cannot be trained whole as well")
            if id(p) not in copies:
                with gathered([p]):
                    copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=True)
            p.requires_grad_(False)
            holder.register_parameter(ORIGINAL_PREFIX + pname, p)
            holder._parameters[pname] = copies[id(p)]


def originals(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """``(module, name)`` of every parameter of ``model`` that is a ``modules_to_save`` copy."""
    return [(m, key[len(ORIGINAL_PREFIX):]) for m in model.modules() for key in m._parameters
            if key.startswith(ORIGINAL_PREFIX)]


@contextlib.contextmanager
def originals_in_place(model: nn.Module) -> Iterator[None]:
    """For the block, every ``modules_to_save`` parameter of ``model`` is its frozen original again (the module's
    ``_parameters`` entry is switched; nothing is copied or written, so autograd graphs built before are untouched);
    each entry's previous value comes back on exit (nests).

    Raises:
        RuntimeError: the parameters are managed by an engine that shards them (FSDP, FSDP2, DeepSpeed ZeRO-3),
            which re-installs a module's parameters itself at each forward.
    """
    slots = originals(model)
    if not slots:
        yield
        return
    engine = wrapping_engine(model)
    if engine in ("FullyShardedDataParallel", "fully_shard") or any(
            hasattr(m._parameters[n], "ds_id") or is_dtensor(m._parameters[n]) for m, n in slots):
        raise RuntimeError(
            f"disable_paca with modules_to_save under {engine or 'DeepSpeed ZeRO-3'}: the engine shards and "
            "re-installs those parameters itself, so their base values cannot be switched in. Use a separate frozen "
            "reference model, or leave modules_to_save empty")
    prior = [(m, n, m._parameters[n]) for m, n in slots]
    try:
        for m, n, _ in prior:
            m._parameters[n] = m._parameters[ORIGINAL_PREFIX + n]
        yield
    finally:
        for m, n, p in prior:
            m._parameters[n] = p


def settle_originals(model: nn.Module, keep_copies: bool) -> None:
    """Drop the ``modules_to_save`` originals (``keep_copies``: the trained copies stay, as peft's
    ``merge_and_unload``) or put them back in place of the copies (the base model)."""
    for m, n in originals(model):
        original = m._parameters.pop(ORIGINAL_PREFIX + n)
        if not keep_copies:
            m._parameters[n] = original
