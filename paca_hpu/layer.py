r"""The PaCA linear layer (Partial Connection Adaptation, Woo et al., ICLR 2025, arXiv 2503.01905).

Math (section 3 of the paper), for a pretrained weight ``W0`` of shape ``(out_features, in_features)`` and fixed
column indices ``idx`` of shape ``(r,)``::

    delta    : (out_features, r), float32 (float64 for a float64 weight), zero at start, the only trainable tensor
    scaling  = paca_alpha / r
    W        = W0 ;  W[:, idx] = W0[:, idx] + scaling * delta          (the "merged" weight, kept in ``weight``)
    y        = x @ W.T + b                                              (ONE GEMM, x: (..., in_features))
    grad_x   = grad_y @ W                                               (..., in_features)
    grad_delta = scaling * grad_y_2d.T @ x_2d[:, idx]                   (out_features, r), accumulated in float32

Only ``x[..., idx]`` (``r`` of ``in_features`` channels) is saved for backward; a LoRA layer has to keep the full
``x`` for ``grad_A``.  The merged columns are written back into ``weight`` once per optimizer step (see
:mod:`paca_hpu.model`), not in forward, so forward and backward are exactly one plain GEMM each plus one
static-shape gather (``index_select``): no boolean masks, no host synchronisation, no data-dependent shapes,
which is what lets Gaudi's graph compiler (lazy mode, HPU graphs, ``torch.compile`` with ``hpu_backend``) build
one graph and reuse it.

Autocast: the autograd function follows ``torch.amp.custom_fwd`` / ``custom_bwd`` semantics for whatever device
the input lives on (``hpu``, ``cuda``, ``cpu``): under autocast the GEMMs run in the autocast dtype, and
``grad_delta`` is computed from float32 operands, so ``delta.grad`` is float32 even when the model runs in bf16.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PaCALinear", "select_indices", "default_index_dtype", "live_paca_layers"]

#: Every PaCALinear alive in this process (built, deep-copied or unpickled); the optimizer step hook in
#: :mod:`paca_hpu.model` looks here for the layers whose ``delta`` an optimizer just updated.
_LIVE_LAYERS: "weakref.WeakSet[PaCALinear]" = weakref.WeakSet()


def live_paca_layers():
    """A snapshot list of every :class:`PaCALinear` alive in this process."""
    return list(_LIVE_LAYERS)


def select_indices(name: str, in_features: int, r: int, random_seed: int) -> torch.Tensor:
    """The ``r`` input columns PaCA trains in layer ``name``.

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
    if not 1 <= r <= in_features:
        raise ValueError(
            f"PaCA r={r} must be between 1 and in_features={in_features} of layer '{name}'; lower r or exclude the "
            f"layer (exclude_modules)"
        )
    digest = hashlib.sha256(f"paca:{int(random_seed)}:{name}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(in_features, generator=gen)[:r].sort().values


def default_index_dtype(device: torch.device) -> torch.dtype:
    """Index dtype for the gather: int32 on HPU (Gaudi's TPC gather kernels prefer 32-bit indices), int64 elsewhere
    (CPU/CUDA kernels use int64 natively; an int32 index would be converted on every call)."""
    return torch.int32 if torch.device(device).type == "hpu" else torch.int64


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype active for ``x``'s device type, or None (``torch.amp.custom_fwd`` semantics)."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda", "hpu", "xpu", "mps"):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    # autocast only touches floating point tensors of lower-or-equal precision; float64 stays float64.
    if x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device_type)


_is_autocast_available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4


def _autocast_off(device_type: str):
    """Autocast disabled for ``device_type``: ``torch.autocast(enabled=False)`` only while autocast is on for that
    device type (entering the context costs a few microseconds per call, 210 layers x 2 calls per step), a no-op
    context otherwise and for device types without autocast (e.g. ``meta``, where
    ``torch.autocast(device_type="meta", enabled=False)`` raises)."""
    if (_is_autocast_available is None or _is_autocast_available(device_type)) and torch.is_autocast_enabled(
            device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return _NULL_CONTEXT


_NULL_CONTEXT = contextlib.nullcontext()  # reusable and reentrant


class _PaCAFunction(torch.autograd.Function):
    """``y = F.linear(x, weight, bias)``, saving only ``x[..., indices]``; gradient for ``delta`` (see module doc).

    ``weight`` already holds the merged columns and is frozen; ``delta`` is an input only so that autograd routes
    its gradient.  Inputs: x (..., in), weight (out, in), bias (out,) or None, delta (out, r), indices (r,)
    int32/int64, scaling float.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices, scaling):
        compute_dtype = _autocast_dtype(x) or x.dtype
        with _autocast_off(x.device.type):
            xc = x if x.dtype == compute_dtype else x.to(compute_dtype)
            wc = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
            bc = None if bias is None else (bias if bias.dtype == compute_dtype else bias.to(compute_dtype))
            y = F.linear(xc, wc, bc)
            x_sel = xc.index_select(-1, indices) if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(x_sel, weight)
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_sel, weight = ctx.saved_tensors
        grad_x = grad_delta = None
        with _autocast_off(grad_y.device.type):
            if ctx.needs_input_grad[0]:
                cd = ctx.compute_dtype
                g = grad_y if grad_y.dtype == cd else grad_y.to(cd)
                w = weight if weight.dtype == cd else weight.to(cd)
                grad_x = torch.matmul(g, w)
                if grad_x.dtype != ctx.x_dtype:
                    grad_x = grad_x.to(ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                acc = torch.float64 if x_sel.dtype == torch.float64 else torch.float32
                out_features, r = grad_y.shape[-1], x_sel.shape[-1]
                if x_sel.dim() == 3:
                    # (batch, seq, .) inputs: one (r x seq) @ (seq x out) GEMM per sequence, summed. A single
                    # (r x N) @ (N x out) GEMM with r = 8 rows keeps few threads busy; the batched form took 0.64x
                    # the time on 2 CPU threads at SmolLM2's shapes (bf16, 4 x 256; docs/benchmarks.md).
                    grad_delta = torch.bmm(x_sel.to(acc).transpose(1, 2), grad_y.to(acc)).sum(0)
                else:
                    g2 = grad_y.reshape(-1, out_features).to(acc)
                    xs2 = x_sel.reshape(-1, r).to(acc)
                    grad_delta = torch.mm(xs2.t(), g2)
                # (x_sel^T g)^T: same value as g^T x_sel; this operand order was 2-4x faster on CPU (DESIGN.md).
                grad_delta = grad_delta.t().mul_(ctx.scaling)
        return grad_x, None, None, grad_delta, None, None


class PaCALinear(nn.Module):
    """A linear layer of which ``r`` fixed input columns are trained (PaCA).

    Replaces an ``nn.Linear`` (weight ``(out, in)``) or a transformers ``Conv1D`` (weight ``(in, out)``); the
    replacement always stores the weight in ``nn.Linear`` layout.

    Attributes:
        weight: frozen ``nn.Parameter`` ``(out_features, in_features)``, always the MERGED weight
            (``W0`` with ``W0[:, indices] + scaling * delta`` written into the selected columns).
        bias: frozen ``nn.Parameter`` ``(out_features,)`` or ``None``.
        indices: buffer ``(r,)``, unique, sorted, int64 (int32 on HPU by default, also after ``.to("hpu")``).
        delta: trainable ``nn.Parameter`` ``(out_features, r)``, float32 (float64 if the weight is float64),
            zeros at start.
        original_columns: non-persistent buffer ``(out_features, r)``: ``W0[:, indices]`` in the weight's dtype,
            kept so that disabling, unmerging and unloading restore the base weights bit for bit.
        scaling: ``paca_alpha / r`` (float).
        in_features, out_features, r: ints.
        base_layer_type: ``"linear"`` or ``"conv1d"``: what :func:`paca_hpu.merge_paca` turns it back into.

    Shapes: input ``(..., in_features)`` with any number of leading dims (none included), output
    ``(..., out_features)``.

    Args:
        weight: the base weight in ``nn.Linear`` layout ``(out_features, in_features)``; an ``nn.Parameter`` is
            reused as is (no copy) and frozen.
        bias: ``(out_features,)`` or None.
        indices: ``(r,)`` integer column indices, unique, within ``[0, in_features)``.
        scaling: ``paca_alpha / r``.
        base_layer_type: ``"linear"`` or ``"conv1d"``.
        index_dtype: ``torch.int32`` or ``torch.int64``; ``None`` picks :func:`default_index_dtype`.

    Raises:
        ValueError: bad shapes, duplicate or out-of-range indices, unsupported index dtype.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        indices: torch.Tensor,
        scaling: float,
        base_layer_type: str = "linear",
        index_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"PaCALinear weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64) or indices.numel() < 1:
            raise ValueError(f"PaCALinear indices must be a non-empty 1-D int32/int64 tensor, got {indices!r}")
        idx_cpu = indices.detach().to("cpu", torch.int64)
        if idx_cpu.min() < 0 or idx_cpu.max() >= in_features:
            raise ValueError(f"PaCALinear indices must lie in [0, {in_features}), got min {int(idx_cpu.min())} "
                             f"max {int(idx_cpu.max())}")
        if torch.unique(idx_cpu).numel() != idx_cpu.numel():
            raise ValueError("PaCALinear indices must be unique")
        if base_layer_type not in ("linear", "conv1d"):
            raise ValueError(f"base_layer_type must be 'linear' or 'conv1d', got {base_layer_type!r}")
        # None: follow the device, also when the layer is moved later (built on CPU, then .to("hpu"): int32)
        self._index_dtype_auto = index_dtype is None
        if index_dtype is None:
            index_dtype = default_index_dtype(weight.device)
        if index_dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.r = int(idx_cpu.numel())
        self.scaling = float(scaling)
        self.base_layer_type = base_layer_type
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight, requires_grad=False)
        self._base_weight_requires_grad = bool(weight.requires_grad)
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            if not isinstance(bias, nn.Parameter):
                bias = nn.Parameter(bias, requires_grad=False)
            self._base_bias_requires_grad = bool(bias.requires_grad)
            bias.requires_grad_(False)
        else:
            self._base_bias_requires_grad = False
        self.bias = bias
        sorted_idx = idx_cpu.sort().values.to(device=weight.device, dtype=index_dtype)
        self.register_buffer("indices", sorted_idx)
        with torch.no_grad():
            self.register_buffer(
                "original_columns", weight.index_select(1, sorted_idx).clone(), persistent=False
            )
        delta_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.delta = nn.Parameter(torch.zeros(out_features, self.r, dtype=delta_dtype, device=weight.device))
        self._paca_enabled = True
        _LIVE_LAYERS.add(self)

    def __setstate__(self, state):
        """Unpickling and ``copy.deepcopy`` build layers without ``__init__``: register those too."""
        super().__setstate__(state)
        _LIVE_LAYERS.add(self)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ...), then re-pick the default index dtype for the new
        device when none was given: a model converted on the CPU and moved to an HPU gathers with int32 indices."""
        super()._apply(fn, recurse)
        if getattr(self, "_index_dtype_auto", False):
            wanted = default_index_dtype(self.indices.device)
            if self.indices.dtype != wanted:
                self.indices = self.indices.to(wanted)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, bias={self.bias is not None}, base_layer_type={self.base_layer_type}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)``; one GEMM with the merged weight."""
        return _PaCAFunction.apply(x, self.weight, self.bias, self.delta, self.indices, self.scaling)

    # ---- weight bookkeeping (outside forward/backward; fixed-shape index_copy_) ----------------------------

    def merged_columns(self) -> torch.Tensor:
        """``original_columns + scaling * delta`` in the weight's dtype, shape ``(out_features, r)``."""
        acc = self.delta.dtype
        return torch.add(self.original_columns.to(acc), self.delta.detach(), alpha=self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def sync(self) -> None:
        """Write the adapted columns into ``weight`` (a fixed-shape ``index_copy_`` of ``(out_features, r)``).

        Called after every optimizer step by the hook in :mod:`paca_hpu.model`; a no-op while disabled."""
        if self._paca_enabled:
            self.weight.index_copy_(1, self.indices.long(), self.merged_columns())

    @torch.no_grad()
    def restore_original(self) -> None:
        """Write the original (base) columns back into ``weight``; bit-for-bit the base weight afterwards."""
        self.weight.index_copy_(1, self.indices.long(), self.original_columns)

    @torch.no_grad()
    def set_indices(self, indices: torch.Tensor) -> None:
        """Select other columns (e.g. those stored in an adapter file): restores the base weight first, then
        re-captures ``original_columns``; ``delta`` is reset to zeros in place (the Parameter object is kept, so
        optimizers that hold it stay valid).

        Raises:
            ValueError: wrong length, out of range or duplicate indices.
        """
        new = torch.as_tensor(indices).detach().to("cpu", torch.int64)
        if new.shape != (self.r,):
            raise ValueError(f"expected {self.r} indices, got shape {tuple(new.shape)}")
        if new.min() < 0 or new.max() >= self.in_features or torch.unique(new).numel() != self.r:
            raise ValueError(f"indices must be unique and lie in [0, {self.in_features})")
        self.restore_original()
        self.indices.copy_(new.sort().values.to(self.indices.device, self.indices.dtype))
        self.original_columns.copy_(self.weight.index_select(1, self.indices))
        self.delta.zero_()

    def base_weight(self) -> torch.Tensor:
        """A copy of the original weight ``W0`` (``(out_features, in_features)``, weight dtype)."""
        w = self.weight.detach().clone()
        w.index_copy_(1, self.indices.long(), self.original_columns)
        return w
