"""PaCA models inside data-parallel engines: DDP, DeepSpeed ZeRO-1/2/3, FSDP (``FullyShardedDataParallel``) and
FSDP2 (``fully_shard``).

What the adapter code needs from an engine-wrapped model, found by duck typing (no engine is imported unless its
parameters are present):

* :func:`unwrap`: the user's model inside DDP (``.module``), a DeepSpeed engine (``.module``) or
  ``torch.compile`` (``._orig_mod``); an FSDP1 root is kept (its parameters are gathered through it);
* :func:`clean_name`: module names without the wrapper segments FSDP1 and activation checkpointing insert
  (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``), so an adapter saved from a wrapped model loads
  into the plain one;
* :func:`whole_parameters`: a context in which partitioned parameters are whole on every rank (ZeRO-3:
  ``deepspeed.zero.GatheredParameters``; FSDP1: ``FullyShardedDataParallel.summon_full_params``); FSDP2's ``DTensor``
  parameters are made whole one by one with :func:`whole_tensor`. Every rank must enter it (collectives);
* :func:`gathered`: DeepSpeed ZeRO-3 placeholders among given parameters whole for a block (PaCA's conversion and the
  ``modules_to_save`` copies read them once; a collective), a no-op for ordinary tensors;
* :func:`is_main_process`: global rank 0, or no process group;
* :func:`wrapping_engine`: the engine that already wraps a model (PaCA must be applied before wrapping).

Sources: torch.distributed.fsdp (``summon_full_params``, ``_fsdp_wrapped_module``), torch.distributed.tensor
(``DTensor.full_tensor``), DeepSpeed ``zero.GatheredParameters`` and its parameter attributes (``ds_id``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .layer import is_dtensor

__all__ = ["unwrap", "clean_name", "is_partitioned", "whole_parameters", "whole_tensor", "is_main_process",
           "wrapping_engine", "gathered"]

_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_WRAPPER_CLASSES = ("DistributedDataParallel", "DeepSpeedEngine", "FullyShardedDataParallel")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / a DeepSpeed engine (``.module``) and ``torch.compile``
    (``._orig_mod``), repeatedly; anything else (an FSDP1 root included) is returned as is."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine") and isinstance(
                getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def clean_name(name: str) -> str:
    """``name`` without FSDP1 / activation-checkpointing wrapper segments (``_fsdp_wrapped_module.`` ...)."""
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def is_partitioned(t: torch.Tensor, shape: Sequence[int]) -> bool:
    """``t`` is not the whole tensor of shape ``shape`` on this rank right now: a DTensor (FSDP2), or of another
    shape (a ZeRO-3 placeholder outside ``GatheredParameters``, an FSDP1 flat shard)."""
    return is_dtensor(t) or tuple(t.shape) != tuple(shape)


def _fsdp1_modules(model: nn.Module):
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


@contextlib.contextmanager
def whole_parameters(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside, the ZeRO-3 parameters among ``params`` and every FSDP1-sharded parameter of ``model`` are whole on
    every rank (read-only: changes are not written back). A collective: call it on every rank, with the same
    ``params`` in the same order. A no-op for models without partitioned parameters."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(gathered(params))
        if _fsdp1_modules(model):
            from torch.distributed.fsdp import FullyShardedDataParallel

            stack.enter_context(FullyShardedDataParallel.summon_full_params(model, writeback=False))
        yield


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of an FSDP2 ``DTensor`` (``full_tensor()``, a collective)."""
    return t.full_tensor() if is_dtensor(t) else t


def is_main_process() -> bool:
    """Global rank 0 of the default process group, or no process group at all."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wrapping_engine(model: nn.Module) -> Optional[str]:
    """The data-parallel engine that already wraps ``model`` or one of its submodules: ``"DistributedDataParallel"``,
    ``"DeepSpeedEngine"``, ``"FullyShardedDataParallel"`` (FSDP1), ``"fully_shard"`` (FSDP2: torch makes each
    sharded module an ``FSDPModule``); ``None`` for a plain model. Such an engine registered the parameters it
    synchronises, shards or optimises when it wrapped the model, so parameters added afterwards (PaCA's ``delta``)
    would be left out. Host-side, one pass over the modules."""
    fsdp2 = ()
    if torch.distributed.is_available():
        try:
            from torch.distributed.fsdp import FSDPModule

            fsdp2 = (FSDPModule,)
        except ImportError:  # torch < 2.6: no FSDP2
            pass
    for module in model.modules():
        name = type(module).__name__
        if name in _WRAPPER_CLASSES:
            return name
        if fsdp2 and isinstance(module, fsdp2):
            return "fully_shard"
    return None


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """DeepSpeed ZeRO-3 partitioned parameters among ``params`` gathered whole on every rank for the block
    (``deepspeed.zero.GatheredParameters``, a collective: every rank converts the same layers in the same order);
    a no-op for ordinary tensors."""
    zero3 = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
        yield
