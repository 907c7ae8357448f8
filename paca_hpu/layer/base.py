r"""What every PaCA layer is (:class:`PaCALayerBase`) and the math its implementations share.

PaCA (Partial Connection Adaptation; Woo et al., ICLR 2025, arXiv 2503.01905, section 3) trains ``r`` fixed input
columns ("partial connections") of a frozen pretrained weight instead of adding adapter matrices beside it. For a
base layer with weight ``W0`` of shape ``(out_features, in_features)``, bias ``b`` ``(out_features,)`` or none, and
column indices ``idx`` of shape ``(r,)``::

    delta      : (out_features, r), float32 (float64 for a float64 weight), zero at start, the only trainable tensor
    scaling    = paca_alpha / r
    W          = W0 ;  W[:, idx] = W0[:, idx] + scaling * delta             the effective ("merged") weight
    y          = x @ W.T + b                                                x: (..., in_features) -> (..., out_features)
    grad_x     = grad_y @ W                                                 (..., in_features)
    grad_delta = scaling * grad_y_2d.T @ x_2d[:, idx]                       (out_features, r), accumulated in float32

Saved for backward: ``x[..., idx]`` only (``r`` of ``in_features`` channels); a LoRA layer keeps the whole ``x``
for ``grad_A``. ``delta`` starting at zero makes the layer start as the base layer, and weight decay pull towards the
pretrained weight.

The implementations, one file each (all subclasses of :class:`PaCALayerBase`):

* :mod:`paca_hpu.layer.dense`: :class:`~paca_hpu.layer.dense.PaCALinear`, a float ``nn.Linear`` / ``Conv1D`` base;
  ``W`` is kept in ``weight`` (written after each optimizer step), so forward is one GEMM;
* :mod:`paca_hpu.layer.partitioned`: the same layer when a sharding engine (DeepSpeed ZeRO-3, FSDP, FSDP2) owns
  ``weight``: ``y = x @ weight.T + b + x[..., idx] @ D.T``, a rank-``r`` correction that never writes;
* :mod:`paca_hpu.layer.quantized4bit`: :class:`~paca_hpu.layer.quantized4bit.PaCALinear4bit`, a bitsandbytes
  4-bit base (QPaCA) that is never written; ``delta`` is read in every forward.

Callers (conversion, adapter files, export, trainers) find every kind with ``isinstance(module, PaCALayerBase)``
and use only the interface of :class:`PaCALayerBase`.

The module's functions are the pieces the implementations' autograd functions share: the autocast rules
(``torch.amp.custom_fwd`` / ``custom_bwd`` semantics on every device type), ``grad_x`` and ``grad_delta``, the merged
columns, and keeping ``delta`` float32 through casts of the model. The backward's ``grad_delta`` is the one
extension point of the layers: :func:`set_delta_gradient` installs another computation of it (when the merged
``weight`` is written is :mod:`paca_hpu.writeback`'s).
"""

from __future__ import annotations

import abc
import contextlib
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["PaCALayerBase", "default_index_dtype", "keep_delta_values", "input_gradient", "merge_columns",
           "delta_gradient", "set_delta_gradient", "delta_gradient_in_use", "refuse_double_backward"]


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


_TENSOR_DATA = torch._C.TensorBase.data  # the C-level ``.data`` descriptor that nn.Parameter inherits


def keep_delta_values(layer: nn.Module, master=None, dtype: Optional[torch.dtype] = None):
    """Keep a PaCA layer's ``delta`` (and its gradient) exact through ``nn.Module._apply``.

    A whole-model cast (``model.to(torch.bfloat16)``, ``model.half()``, what a Trainer's ``bf16_full_eval`` does)
    makes ``nn.Module`` cast ``delta`` too; casting it back afterwards would keep the dtype but round the values, in
    every layer, and the next save would write the rounded deltas. Call it twice around the conversion::

        master = keep_delta_values(layer)          # before: the current tensors (no copy)
        ...nn.Module._apply...
        keep_delta_values(layer, master, dtype)    # after: where delta is not ``dtype``, the values of before

    Args:
        layer: a module with a ``delta`` parameter.
        master: what the first call returned.
        dtype: the dtype ``delta`` must have (float32; float64 for a float64 weight). Only the device follows the
            conversion; a conversion that leaves ``delta``'s dtype alone (a device move) is kept as it is.

    Returns:
        ``(delta tensor, grad tensor or None)`` from the first call; None from the second.
    """
    delta = layer._parameters["delta"]
    if master is None:  # aliases: nn.Module._apply replaces the data of delta and of delta.grad, not their storage
        return _TENSOR_DATA.__get__(delta), None if delta.grad is None else delta.grad.detach()
    if delta.dtype != dtype:
        delta.data = master[0].to(device=delta.device, dtype=dtype)
    grad = delta.grad
    if grad is not None and grad.dtype != dtype:
        delta.grad = (grad if master[1] is None else master[1]).to(device=grad.device, dtype=dtype)
    return None


def _delta_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """``delta`` is float32, float64 for a float64 weight, whatever the model's dtype."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def input_gradient(grad_y: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype,
                   x_dtype: torch.dtype) -> torch.Tensor:
    """``grad_x = grad_y @ weight`` computed in ``compute_dtype`` and returned in ``x_dtype``.

    Args:
        grad_y: ``(..., out_features)``; weight: ``(out_features, in_features)`` (the effective weight).

    Returns:
        ``(..., in_features)`` of ``x_dtype``. Call with autocast off.
    """
    g = grad_y if grad_y.dtype == compute_dtype else grad_y.to(compute_dtype)
    w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
    grad_x = torch.matmul(g, w)
    return grad_x if grad_x.dtype == x_dtype else grad_x.to(x_dtype)


def merge_columns(original_columns: torch.Tensor, delta: torch.Tensor, scaling: float,
                  weight_dtype: torch.dtype) -> torch.Tensor:
    """``original_columns + scaling * delta`` in ``weight_dtype``: what the merged weight holds in the selected columns.

    Args:
        original_columns: ``(out_features, r)`` ``W0[:, indices]``, weight dtype.
        delta: ``(out_features, r)``; differentiable through this function.
        scaling: ``paca_alpha / r``.
        weight_dtype: the base weight's dtype; the sum is formed in float32 (float64 for a float64 weight).

    Returns:
        ``(out_features, r)`` of ``weight_dtype``. Two separately rounded operations (``delta * scaling``, then ``+``),
        never a fused multiply-add (``torch.add(..., alpha=)`` is an FMA on CPU and may be one elsewhere): the merged
        weight is then the same on every backend and path, and equals peft's LoRA merge ``W0 + (B @ A) * scaling`` of
        the exported adapter bit for bit (:mod:`paca_hpu.export`).
    """
    acc = _delta_dtype(weight_dtype)
    return (original_columns.to(acc) + delta.to(acc) * scaling).to(weight_dtype)


def delta_gradient(grad_y: torch.Tensor, x_sel: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * grad_y_2d.T @ x_sel_2d``: the gradient of PaCA's ``delta`` (section 3 of the paper).

    Args:
        grad_y: ``(..., out_features)`` gradient of the layer output, any float dtype.
        x_sel: ``(..., r)`` the saved ``x[..., indices]`` (same leading dims as ``grad_y``).
        scaling: ``paca_alpha / r``.

    Returns:
        ``(out_features, r)``, accumulated and returned in float32 (float64 when ``x_sel`` is float64), whatever
        the dtype of the inputs. Call with autocast off.
    """
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
    # (x_sel^T g)^T: same value as g^T x_sel; this operand order ran 2-4x faster for a float32 (out x r) result
    # on a 2-thread x86 CPU (torch 2.13).
    return grad_delta.t().mul_(scaling)


def refuse_double_backward() -> None:
    """Raise when a fused PaCA backward runs with grad mode on (``create_graph=True``): it is not differentiable.

    Raises:
        RuntimeError: naming :func:`paca_hpu.functional_paca`, the exact alternative."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "PaCA's fused backward is not differentiable (double backward, create_graph=True, e.g. a gradient "
            "penalty): run that computation inside `with paca_hpu.functional_paca(model):`, which uses plain "
            "autograd ops with exact higher-order gradients")


#: The delta gradient every fused backward computes (dense and partitioned paths); set by :func:`set_delta_gradient`.
_delta_gradient = delta_gradient


def set_delta_gradient(fn: Optional[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]]) -> Callable:
    """Install ``fn`` as the ``delta`` gradient of every fused PaCA backward in this process (the extension point of
    the backward; :mod:`paca_hpu.experimental` installs its candidates here); ``None`` installs the default
    :func:`delta_gradient`. ``fn`` takes and returns what :func:`delta_gradient` does (``grad_y`` ``(..., out)``,
    ``x_sel`` ``(..., r)``, ``scaling``; ``(out, r)`` float32) and runs with autocast off.

    Returns:
        The function installed before (to restore it).

    Raises:
        TypeError: ``fn`` is neither callable nor None."""
    global _delta_gradient
    if fn is not None and not callable(fn):
        raise TypeError(f"set_delta_gradient expects a callable (grad_y, x_sel, scaling) -> (out_features, r) "
                        f"tensor, or None for the default; got {type(fn).__name__}")
    before, _delta_gradient = _delta_gradient, (delta_gradient if fn is None else fn)
    return before


def delta_gradient_in_use() -> Callable:
    """The ``delta`` gradient the fused backward computes now (:func:`delta_gradient` unless
    :func:`set_delta_gradient` installed another)."""
    return _delta_gradient


class PaCALayerBase(nn.Module, abc.ABC):
    """A PaCA layer: ``r`` fixed input columns of a frozen base layer, trained through ``delta`` (module docstring).

    The interface that conversion (:func:`paca_hpu.apply_paca`, :func:`paca_hpu.merge_paca`,
    :func:`paca_hpu.unload_paca`, :func:`paca_hpu.disable_paca`), adapter files, export and the trainers rely on; every
    implementation has these attributes and methods, whatever its base layer.

    Attributes:
        in_features, out_features, r: ints.
        scaling: ``paca_alpha / r`` (float).
        indices: buffer ``(r,)``, unique, sorted ascending, int64 (int32 on HPU by default,
            :func:`default_index_dtype`, again after every device move when none was given).
        original_columns: buffer ``(out_features, r)``: the base columns ``W0[:, indices]``.
        delta: trainable ``nn.Parameter`` ``(out_features, r)``, float32 (float64 for a float64 weight), zeros at
            start; float32 with its values kept when the model is cast (:func:`keep_delta_values`).
        weight, bias: the base layer's weight (in the implementation's layout) and bias ``(out_features,)`` or None,
            frozen.
        base_layer_type: what the layer replaced (``"linear"``, ``"conv1d"``, ``"linear4bit"``).
        _paca_enabled: False inside :func:`paca_hpu.disable_paca`: forward then gives the base output
            ``x @ W0.T + b``, and ``delta`` gets no gradient.
        _functional: True inside :func:`paca_hpu.functional_paca`: forward by plain autograd ops on an out-of-place
            merged weight (double backward, ``torch.func``).

    Shapes: input ``(..., in_features)`` with any number of leading dims, output ``(..., out_features)``.
    """

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., in_features)`` -> ``y = x @ W.T + b`` ``(..., out_features)`` (module docstring)."""

    @abc.abstractmethod
    def merged_columns(self) -> torch.Tensor:
        """``W[:, indices] = W0[:, indices] + scaling * delta``, ``(out_features, r)``, without gradient."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make the layer's stored state reflect the current ``delta`` (write the merged columns where the layer
        keeps them; a no-op where forward reads ``delta`` itself). Called by :func:`paca_hpu.sync_paca`, and after
        every optimizer step for the layers that keep merged columns (:mod:`paca_hpu.writeback`)."""

    @abc.abstractmethod
    def restore_original(self) -> None:
        """Undo what :meth:`sync` wrote: the stored base weight is bit for bit ``W0`` afterwards."""

    @abc.abstractmethod
    def set_indices(self, indices: torch.Tensor) -> None:
        """Train other columns ``indices`` ``(r,)`` (e.g. those of an adapter file); ``delta`` is reset to zeros in
        place (the same Parameter, so an optimizer holding it stays valid).

        Raises:
            ValueError: wrong length, out of range or duplicate indices."""

    @abc.abstractmethod
    def base_weight(self) -> torch.Tensor:
        """A new tensor holding the base weight ``W0``, ``(out_features, in_features)``."""

    @abc.abstractmethod
    def merged_layer(self) -> nn.Module:
        """The plain layer that computes what this one does (``W`` as its weight): what :func:`paca_hpu.merge_paca`
        puts in this layer's place."""

    @abc.abstractmethod
    def unloaded(self) -> nn.Module:
        """The base layer with the original weights (bit for bit ``W0``; the adaptation dropped): what
        :func:`paca_hpu.unload_paca` puts in this layer's place."""

    # ---- shared by the implementations -------------------------------------------------------------------------

    def _init_index_dtype(self, index_dtype: Optional[torch.dtype], device: torch.device) -> torch.dtype:
        """The gather's index dtype: ``index_dtype``, or :func:`default_index_dtype` for ``device`` when None (then
        re-picked after every device move, :meth:`_apply`).

        Raises:
            ValueError: not int32 / int64."""
        # None: follow the device, also when the layer is moved later (built on CPU, then .to("hpu"): int32)
        self._index_dtype_auto = index_dtype is None
        if index_dtype is None:
            index_dtype = default_index_dtype(device)
        if index_dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
        return index_dtype

    def _required_delta_dtype(self) -> torch.dtype:
        """The dtype ``delta`` must have (float32; the dense layer: float64 for a float64 weight)."""
        return torch.float32

    def _after_apply(self) -> None:
        """Called at the end of :meth:`_apply`: an implementation's bookkeeping after a device move or cast."""

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ...), then: ``delta`` float32 again (float64 for a
        float64 weight) with its values from before a cast (:func:`keep_delta_values`), and the default index dtype
        re-picked for the new device when none was given (a model converted on the CPU and moved to an HPU gathers
        with int32 indices)."""
        master = keep_delta_values(self)
        super()._apply(fn, recurse)
        keep_delta_values(self, master, self._required_delta_dtype())
        if getattr(self, "_index_dtype_auto", False):
            wanted = default_index_dtype(self.indices.device)
            if self.indices.dtype != wanted:
                self.indices = self.indices.to(wanted)
        self._after_apply()
        return self
