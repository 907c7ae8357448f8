r"""The sharded-weight path of a PaCA layer: a weight that a sharding engine owns (DeepSpeed ZeRO-3, FSDP, FSDP2), or
that ``torch.func.functional_call`` substitutes (Woo et al., ICLR 2025, arXiv 2503.01905, section 3, for the math).

A sharding engine owns ``weight``: it keeps only a shard on each rank and gathers the whole weight into a temporary
tensor for each forward and backward (FSDP1: a view of its flat parameter; FSDP2: an unsharded ``nn.Parameter``
beside the ``DTensor`` shard; ZeRO-3: ``param.data`` swapped between a partition and a gathered buffer). A column
written into that gathered tensor is dropped at the next gather, and writing into the shard would need each rank to
own whole columns. So a :class:`PartitionableLayer` writes its merged columns only into a weight it owns (its
registered ``nn.Parameter``, whole ``(out_features, in_features)``, not a ``DTensor``, not a ZeRO-3 parameter;
checked outside forward, when the layer is built, loaded, cast or synced: :meth:`PartitionableLayer.owns_weight`)
and takes the dense path (:mod:`paca_hpu.layer.dense`) only for that very tensor object. Any other weight (the
gathered tensor of an engine, or one substituted by ``torch.func.functional_call``) goes through a rank-``r``
correction that never writes; with ``weight`` ``(out_features, in_features)`` as the engine hands it over,
``original_columns = W0[:, idx]`` ``(out_features, r)`` and ``x`` ``(..., in_features)``::

    D          = (original_columns + scaling * delta, in the weight dtype) - weight[:, idx]    (out_features, r)
    y          = x @ weight.T + b + x[..., idx] @ D.T                     (..., out_features), == x @ W_merged.T + b
    grad_x     = grad_y @ weight ;  grad_x[..., idx] += grad_y @ D         (..., in_features)
    grad_delta = scaling * grad_y_2d.T @ x_2d[:, idx]                     (out_features, r), float32

``D`` is exact whatever the gathered columns hold (base columns, or merged ones written before the model was
sharded). Saved for backward: ``x[..., idx]``, ``D`` and the engine's reference to ``weight`` (re-gathered by the
engine for backward, as for any ``nn.Linear``). Chosen over forming the merged weight out of place
(``weight.index_copy(1, idx, merged)``) by measured memory: one fp32 layer, forward + backward, peak heap bytes
beyond the output and ``grad_x`` that every linear layer allocates, r = 8 (glibc ``mallinfo2`` after every op):
in=2048, out=8192 (a 64 MiB weight), 128 tokens: correction +0.8 MiB, out-of-place merged weight +74 MiB (a
weight-sized copy in forward and again in backward), plain autograd on that copy (``functional_paca``) +128 MiB
(it also keeps the copy and the whole input); 1,024 tokens: +0.8, +75 and +128 MiB. The cost is one
``(tokens x r) @ (r x out_features)`` GEMM in forward and one ``(tokens x out_features) @ (out_features x r)`` in
backward (``r / in_features`` of the layer's GEMM work). The dense single-device path is unchanged. ``apply_paca``
on a ZeRO-3 model built under ``deepspeed.zero.Init`` gathers each targeted weight once, at conversion, to
capture ``original_columns`` (see :mod:`paca_hpu.model`). A ``torch.compile``d dense layer takes this path too,
while dynamo traces (:mod:`paca_hpu.layer.dense`).

Whatever needs the whole weight (``set_indices``, ``base_weight``) refuses a partitioned one with an error that names
the fix (:meth:`PartitionableLayer._require_whole_weight`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import base as _base
from .base import (PaCALayerBase, _autocast_dtype, _autocast_off, _delta_dtype, input_gradient, merge_columns,
                   refuse_double_backward)

__all__ = ["PartitionableLayer", "is_dtensor"]


class _PaCAPartitionedFunction(torch.autograd.Function):
    """PaCA on a weight the layer does not own (an engine's gathered weight): the rank-``r`` correction of the
    module docstring, ``y = F.linear(x, weight, bias) + x[..., idx] @ D.T`` with
    ``D = original_columns + scaling * delta - weight[:, idx]``; nothing is written into ``weight``.

    Inputs: x (..., in), weight (out, in), bias (out,) or None, delta (out, r), indices (r,) int32/int64,
    original_columns (out, r), scaling float. Saves ``x[..., idx]`` (only when ``delta`` needs a gradient), ``D``
    (out, r, compute dtype) and ``weight``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices, original_columns, scaling):
        compute_dtype = _autocast_dtype(x) or x.dtype
        with _autocast_off(x.device.type):
            xc = x if x.dtype == compute_dtype else x.to(compute_dtype)
            wc = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
            bc = None if bias is None else (bias if bias.dtype == compute_dtype else bias.to(compute_dtype))
            y = F.linear(xc, wc, bc)
            acc = _delta_dtype(weight.dtype)
            d = merge_columns(original_columns, delta.detach(), scaling, weight.dtype).to(acc)
            d = d.sub_(weight.detach().index_select(1, indices).to(acc)).to(compute_dtype)
            x_sel = xc.index_select(-1, indices)
            y.view(-1, y.shape[-1]).addmm_(x_sel.reshape(-1, x_sel.shape[-1]), d.t())
        ctx.save_for_backward(x_sel if ctx.needs_input_grad[3] else None, weight, d)
        ctx.indices = indices
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward()
        x_sel, weight, d = ctx.saved_tensors
        grad_x = grad_delta = None
        with _autocast_off(grad_y.device.type):
            if ctx.needs_input_grad[0]:
                cd = ctx.compute_dtype
                grad_x = input_gradient(grad_y, weight, cd, cd)
                grad_x.index_add_(-1, ctx.indices, torch.matmul(grad_y if grad_y.dtype == cd else grad_y.to(cd), d))
                if grad_x.dtype != ctx.x_dtype:
                    grad_x = grad_x.to(ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                grad_delta = _base._delta_gradient(grad_y, x_sel, ctx.scaling)
        return grad_x, None, None, grad_delta, None, None, None


def is_dtensor(t: torch.Tensor) -> bool:
    """``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 shard); False where torch.distributed is absent."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _no_weight():
    return None


class PartitionableLayer(PaCALayerBase):
    """A PaCA layer whose merged columns live in its own ``weight`` as long as it owns that weight, and that computes
    through the rank-``r`` correction (:class:`_PaCAPartitionedFunction`) once a sharding engine partitions it
    (module docstring). :class:`paca_hpu.layer.dense.PaCALinear` is one; it calls :meth:`_claim_weight` whenever its
    weight may have been replaced (built, unpickled, moved or cast, synced) and compares the weight its forward gets
    with ``_dense_weight()`` (a weak reference; None while the layer does not own its weight).
    """

    def __getstate__(self):
        """Pickling and ``copy.deepcopy``: without the weak reference to the owned weight (not picklable, and a copy
        owns its own weight: the implementation's ``__setstate__`` claims it)."""
        state = self.__dict__.copy()
        state.pop("_dense_weight", None)
        return state

    def _owns(self, weight) -> bool:
        """``weight`` is a whole tensor this layer may write its merged columns into (checked outside forward): its
        registered ``nn.Parameter``, of shape ``(out_features, in_features)``, neither a DTensor (FSDP2 shard) nor a
        DeepSpeed ZeRO-3 parameter (``ds_id``: the engine swaps its data between a partition and gathered
        copies). FSDP1 keeps the registered Parameter but gives it a flat shard of another shape."""
        return (isinstance(weight, nn.Parameter) and weight is self._parameters.get("weight")
                and tuple(weight.shape) == (self.out_features, self.in_features)
                and not hasattr(weight, "ds_id") and not is_dtensor(weight))

    def _claim_weight(self) -> None:
        """Note the weight tensor object the dense path may use (a weak reference), or none if the layer does not
        own its current weight (:meth:`_owns`)."""
        weight = self._parameters.get("weight")
        self.__dict__["_dense_weight"] = weakref.ref(weight) if self._owns(weight) else _no_weight

    def owns_weight(self) -> bool:
        """Whether the merged columns live in ``weight`` (False once a sharding engine partitioned it, see the
        module docstring); host-side check."""
        self._claim_weight()
        return self._dense_weight() is not None

    def _require_whole_weight(self, what: str) -> None:
        """Raise unless the layer owns its whole weight.

        Raises:
            RuntimeError: naming ``what``, the layer, the shard's shape and type, and the fix (do it before wrapping,
                or on the whole model)."""
        if not self.owns_weight():
            raise RuntimeError(
                f"{what} needs the whole weight of PaCA layer '{getattr(self, 'paca_name', '?')}', but it is "
                f"partitioned by a sharding engine (shape {tuple(self.weight.shape)}, "
                f"{type(self.weight).__name__}): do it before wrapping the model (FSDP, DeepSpeed ZeRO-3), or on the "
                "whole model (save_adapter, then load_adapter into an unwrapped base model)")

    def _after_apply(self) -> None:
        """After a device move or cast (:meth:`PaCALayerBase._apply`): claim the weight again."""
        self._claim_weight()  # a conversion may have replaced the weight Parameter by a new object
