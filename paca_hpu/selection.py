r"""Which input columns PaCA trains: the column selection strategies of ``PaCAConfig.init_indices``.

For a layer with weight ``W0`` of shape ``(out_features, in_features)`` a strategy picks ``r`` column indices
``idx`` (the "partial connections" of Woo et al., ICLR 2025, arXiv 2503.01905, section 3):

* ``"random"`` (default; the paper's choice): :func:`select_indices`, a seeded random permutation that depends only
  on ``random_seed`` and the layer's qualified name.
* ``"weight_norm"``: the ``r`` columns of largest L2 norm ``||W0[:, j]||_2`` (:func:`weight_norm_indices`).
* ``"activation_norm"`` (data-aware): the ``r`` input channels of largest L2 norm of the layer's input over a few
  calibration batches, ``sqrt(sum over tokens of x[t, j] ** 2)`` (:func:`activation_norms`), computed in a
  calibration pass over the base model BEFORE conversion: :func:`paca_hpu.calibrate_indices`.

Every strategy is deterministic given its inputs (seed and name; weights; weights and calibration batches): ties
go to the lower column index, and the result is an int64 CPU tensor of shape ``(r,)``, unique, sorted ascending.
Selection happens once, before training; the chosen indices are stored in the adapter file, so reloading needs
neither the seed nor calibration data, and the training hot path keeps its static shapes. Under
``torch.distributed`` :func:`agree_across_ranks` makes every rank use rank 0's indices.

It also holds the two rules every part of the package checks its columns against: :func:`check_r` (``r`` is an
integer ``>= 1`` and at most a layer's ``in_features``) and :func:`check_indices` (``r`` distinct column indices
within ``[0, in_features)``). It imports only torch and :mod:`paca_hpu.device`; :mod:`paca_hpu.config`,
:mod:`paca_hpu.layer`, :mod:`paca_hpu.quantized` and :mod:`paca_hpu.model` (the conversion) import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from . import device as _device

__all__ = [
    "INIT_INDICES",
    "DATA_AWARE_INIT_INDICES",
    "check_init_indices",
    "check_r",
    "check_indices",
    "select_indices",
    "top_r",
    "weight_norm_indices",
    "initial_indices",
    "activation_norms",
    "agree_across_ranks",
]

#: Valid values of ``PaCAConfig.init_indices``.
INIT_INDICES = ("random", "weight_norm", "activation_norm")
#: The strategies that need calibration data (:func:`paca_hpu.calibrate_indices`).
DATA_AWARE_INIT_INDICES = ("activation_norm",)


def check_init_indices(value) -> str:
    """``value`` if it names a strategy of :data:`INIT_INDICES`.

    Raises:
        ValueError: anything else; the message lists the valid names.
    """
    if not isinstance(value, str) or value not in INIT_INDICES:
        raise ValueError(f"PaCAConfig.init_indices must be one of {', '.join(repr(v) for v in INIT_INDICES)}, "
                         f"got {value!r}")
    return value


def check_r(r, in_features: Optional[int] = None, name: str = "?") -> int:
    """``r`` if it can be the number of trained columns: an ``int`` (not a ``bool``) ``>= 1`` and, when
    ``in_features`` is given, ``<= in_features`` of layer ``name``. The one place this rule lives
    (:class:`paca_hpu.PaCAConfig`, the strategies below and the training script's early check all call it).

    Raises:
        ValueError: naming ``PaCAConfig.r`` (not an integer >= 1), or the layer and its ``in_features``.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"PaCAConfig.r must be an integer >= 1 (number of trained columns), got {r!r}")
    if in_features is not None and r > in_features:
        raise ValueError(
            f"PaCA r={r} must be between 1 and in_features={in_features} of layer '{name}'; lower r or exclude the "
            f"layer (exclude_modules)"
        )
    return r


def check_indices(indices, in_features: int, r: Optional[int] = None, what: str = "indices") -> torch.Tensor:
    """``indices`` as an int64 CPU tensor if they can be the trained columns of a layer with ``in_features`` inputs:
    a 1-D int32 / int64 tensor of ``r`` entries (at least one when ``r`` is None), distinct, within
    ``[0, in_features)``; the order is kept. The one place this rule lives (the PaCA layers, :func:`paca_hpu.apply_paca`
    with given indices, :func:`paca_hpu.load_adapter` and the LoRA export call it).

    Raises:
        ValueError: starting with ``what`` (e.g. ``"PaCALinear indices"``), naming the rule broken and the values.
    """
    idx = torch.as_tensor(indices).detach()
    size = "at least one entry" if r is None else f"{r} entries"
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64) or idx.numel() < 1 or (
            r is not None and idx.numel() != r):
        raise ValueError(f"{what} must be a 1-D int32/int64 tensor of {size}, got {idx.dtype} of shape "
                         f"{tuple(idx.shape)}")
    idx = idx.to("cpu", torch.int64)
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= in_features:
        raise ValueError(f"{what} must lie in [0, {in_features}), got min {low} max {high}")
    values, counts = torch.unique(idx, return_counts=True)
    if bool((counts > 1).any()):
        raise ValueError(f"{what} must be distinct columns, got column {int(values[counts > 1][0])} "
                         f"{int(counts.max())} times")
    return idx


def select_indices(name: str, in_features: int, r: int, random_seed: int) -> torch.Tensor:
    """The ``"random"`` strategy: the ``r`` input columns PaCA trains in layer ``name``.

    Derived only from ``(random_seed, name)`` through a private ``torch.Generator`` (never the global RNG), so
    every data-parallel rank, every process and every reload picks the same columns.

    Args:
        name: qualified module name, e.g. ``"model.layers.0.self_attn.q_proj"``.
        in_features: number of input columns of the layer's weight.
        r: number of columns to select, ``1 <= r <= in_features``.
        random_seed: :attr:`PaCAConfig.random_seed`.

    Returns:
        int64 CPU tensor of shape ``(r,)``, unique, sorted ascending.

    Raises:
        ValueError: ``r`` is out of range (the message names the layer).
    """
    check_r(r, in_features, name)
    digest = hashlib.sha256(f"paca:{int(random_seed)}:{name}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(in_features, generator=gen)[:r].sort().values


def top_r(scores: torch.Tensor, r: int, name: str = "?") -> torch.Tensor:
    """Indices of the ``r`` largest entries of ``scores`` (shape ``(in_features,)``), ties to the lower index.

    A stable descending sort keeps equal scores in index order, so the choice is deterministic.

    Returns:
        int64 CPU tensor ``(r,)``, sorted ascending.

    Raises:
        ValueError: ``scores`` is not 1-D, holds NaN/inf, or ``r`` is out of range (names the layer).
    """
    if scores.dim() != 1:
        raise ValueError(f"column scores of layer '{name}' must be 1-D (in_features,), got {tuple(scores.shape)}")
    check_r(r, scores.numel(), name)
    scores = scores.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"column scores of layer '{name}' hold NaN or inf (non-finite weights or activations); "
                         "cannot rank the columns")
    order = torch.sort(scores, descending=True, stable=True).indices[:r]
    return order.sort().values


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it; float32 on HPU / MPS (no float64 there)."""
    return torch.float32 if torch.device(device).type in ("hpu", "mps") else torch.float64


def weight_norm_indices(name: str, weight: torch.Tensor, r: int) -> torch.Tensor:
    """The ``"weight_norm"`` strategy: the ``r`` columns of ``weight`` (``nn.Linear`` layout ``(out_features,
    in_features)``) of largest L2 norm ``||W0[:, j]||_2``, ties to the lower index.

    The norms are computed on the weight's device in float64 (float32 on HPU/MPS).

    Returns:
        int64 CPU tensor ``(r,)``, sorted ascending.

    Raises:
        ValueError: the weight is not a 2-D floating-point tensor (e.g. a packed 4-bit weight), or ``r`` is out
            of range.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"init_indices='weight_norm' needs the dense floating-point weight of layer '{name}', got "
                         f"{weight.dtype} of shape {tuple(weight.shape)}; use init_indices='random' for this model")
    norms = torch.linalg.vector_norm(weight.detach(), ord=2, dim=0, dtype=_accumulate_dtype(weight.device))
    return top_r(norms, r, name)


def initial_indices(name: str, weight: torch.Tensor, config) -> torch.Tensor:
    """The indices of layer ``name`` for ``config.init_indices`` when no calibration data is needed.

    Args:
        name: qualified module name.
        weight: the base weight in ``nn.Linear`` layout ``(out_features, in_features)`` (a view is fine).
        config: a :class:`paca_hpu.PaCAConfig` (``r``, ``random_seed``, ``init_indices`` are read).

    Returns:
        int64 CPU tensor ``(r,)``, unique, sorted ascending.

    Raises:
        ValueError: a data-aware strategy (the message names :func:`paca_hpu.calibrate_indices`), an unknown
            strategy, or ``r`` out of range.
    """
    strategy = check_init_indices(config.init_indices)
    if strategy == "random":
        return select_indices(name, weight.shape[1], config.r, config.random_seed)
    if strategy == "weight_norm":
        return weight_norm_indices(name, weight, config.r)
    raise ValueError(
        f"PaCAConfig(init_indices={strategy!r}) chooses columns from calibration data: compute them first with "
        "indices = paca_hpu.calibrate_indices(model, config, batches) and pass apply_paca(model, config, "
        "indices=indices) (or use init_indices='random' / 'weight_norm')")


def _sum_of_squares(x: torch.Tensor, dtype: torch.dtype, chunk_rows: int = 8192) -> torch.Tensor:
    """``(x.to(dtype) ** 2).sum(0)`` for ``x`` of shape ``(rows, in_features)``, in row chunks (a full float64
    copy of a long sequence's activations would be large)."""
    total = torch.zeros(x.shape[-1], dtype=dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_rows):
        total += x[start:start + chunk_rows].to(dtype).square().sum(0)
    return total


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    raise TypeError(f"calibration batches must be dicts of tensors (model(**batch)) or tensors (model(batch)), got "
                    f"{type(batch).__name__}")


def activation_norms(model: nn.Module, names: Sequence[str], batches: Iterable) -> Dict[str, torch.Tensor]:
    """L2 norm per input channel of the inputs of the submodules ``names`` of ``model`` over ``batches``.

    For each layer: ``norm[j] = sqrt(sum over every token t of every batch of x[t, j] ** 2)``, with ``x`` the
    layer's input reshaped to ``(tokens, in_features)``. Tokens where a dict batch's ``attention_mask`` is 0
    (padding) are left out when the layer input's leading shape equals the mask's. Runs ``model`` in eval mode under
    ``torch.no_grad()`` (restored after), on the device of its first parameter, through forward pre-hooks that are
    removed afterwards; sums in float64 (float32 on HPU/MPS).

    Args:
        model: the (un-converted) model.
        names: qualified names of the layers to measure (typically :func:`paca_hpu.find_target_modules`).
        batches: iterable of dicts (``model(**batch)``, e.g. ``input_ids`` / ``attention_mask``) or tensors
            (``model(batch)``).

    Returns:
        ``{name: float64 CPU tensor (in_features,)}``.

    Raises:
        ValueError: ``batches`` is None or empty, or a layer never ran during the pass (names it).
        TypeError: a batch is neither a dict nor a tensor.
    """
    if batches is None:
        raise ValueError("activation_norms needs calibration batches (dicts for model(**batch) or tensors), got None")
    modules = dict(model.named_modules())
    sums: Dict[str, torch.Tensor] = {}
    mask: list = [None]

    def hook_for(name):
        def hook(module, args, kwargs):
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            m = mask[0]
            if m is not None and x.dim() == m.dim() + 1 and x.shape[:-1] == m.shape:
                x = x[m.to(x.device)]
            part = _sum_of_squares(x.reshape(-1, x.shape[-1]), _accumulate_dtype(x.device))
            sums[name] = part if name not in sums else sums[name] + part
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n), with_kwargs=True) for n in names]
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    was_training, count = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = _to_device(batch, dev)
                am = batch.get("attention_mask") if isinstance(batch, dict) else None
                mask[0] = am.bool() if isinstance(am, torch.Tensor) else None
                model(**batch) if isinstance(batch, dict) else model(batch)
                _device.mark_step()
                count += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("activation_norms got no calibration batches (an empty iterable); pass a few batches of "
                         "training data")
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"layer '{missing[0]}' never ran during the calibration pass, so its input norms are "
                         "unknown; exclude it (exclude_modules) or use init_indices='weight_norm'")
    return {n: sums[n].sqrt().to("cpu", torch.float64) for n in names}


def agree_across_ranks(indices: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Under an initialised ``torch.distributed`` default group of more than one process: every rank gets rank 0's
    ``indices`` (``broadcast_object_list``, which picks the device the backend needs: CPU for gloo, the current
    GPU for NCCL, HPU for HCCL). A collective: every rank must call it. Without a process group: ``indices``.

    Returns:
        ``{name: int64 CPU tensor (r,)}`` in the order of the local ``indices``.

    Raises:
        RuntimeError: the ranks target different layers (names one).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return indices
    payload = [{n: t.tolist() for n, t in indices.items()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    chosen = payload[0]
    differ = sorted(set(chosen) ^ set(indices))
    if differ:
        raise RuntimeError(f"PaCA column selection: rank 0 and rank {dist.get_rank()} target different layers (e.g. "
                           f"'{differ[0]}'); every rank must load the same model with the same PaCAConfig")
    return {n: torch.tensor(chosen[n], dtype=torch.int64) for n in indices}
