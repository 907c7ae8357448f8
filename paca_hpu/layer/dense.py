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
``x`` for ``grad_A``.  Forward and backward are exactly one plain GEMM each plus one static-shape gather
(``index_select``): no boolean masks, no host synchronisation, no data-dependent shapes, which is what lets Gaudi's
graph compiler (lazy mode, HPU graphs, ``torch.compile`` with ``hpu_backend``) build one graph and reuse it.

Write-back by construction (when ``weight`` holds ``W0[:, idx] + scaling * delta``; every trigger and the write-back
they run are in :mod:`paca_hpu.writeback`):

* after every ``Optimizer.step()`` that updates ``delta`` (a global step post-hook), so ``weight`` is fresh right
  after the step and the next forward graph is the plain one;
* before ``state_dict()`` (a state-dict pre-hook), so a saved ``weight`` is current;
* and in ``forward``, before the GEMM, whenever ``delta`` changed since the last write-back by any other route:
  its autograd version counter moved (in-place writes: schedule-free ``optimizer.eval()/train()``,
  ``load_state_dict``, ``torch.no_grad()`` edits), it was written through ``delta.data`` (LOMO/AdaLomo update in
  backward that way, DeepSpeed copies master weights that way; ``delta`` is a :class:`PaCADelta` that notes such
  accesses), or it is another tensor object than at the last write-back. The check reads host-side integers only
  (no device sync).

A ``torch.compile``d graph cannot run that check: dynamo cannot guard on a version counter, so a graph traced with the
dense path would keep reading stale columns after ``delta`` changed outside ``Optimizer.step()`` (schedule-free
``optimizer.eval()``, a ``torch.no_grad()`` edit). While dynamo traces, the layer therefore takes the rank-``r``
correction of :mod:`paca_hpu.layer.partitioned`, which is exact whatever ``weight``'s selected columns hold, and is
zero (bit for bit the dense result) when they are fresh; it costs one ``(tokens x r) @ (r x out_features)`` GEMM
more per layer in forward and one in backward. Eager mode, lazy mode and the step hook's write-back are unchanged.

``weight`` is never written while a layer is disabled (:func:`paca_hpu.disable_paca`): a disabled layer computes
the base output ``x @ W0.T + b`` from an out-of-place copy ``weight.index_copy(1, idx, original_columns)``, so a
reference forward between a policy forward and its backward (TRL DPO with ``ref_model=None``) leaves the policy
graph intact, and ``delta`` gets no gradient from it. When ``delta`` is replaced by a tensor that is not the
layer's own (``torch.func.functional_call``) or inside :func:`paca_hpu.functional_paca`, the layer uses plain
autograd ops on an out-of-place merged weight instead (exact gradients, double backward; a weight-sized copy per
call).

A weight the layer does not own (partitioned by DeepSpeed ZeRO-3, FSDP or FSDP2, or substituted by
``torch.func.functional_call``) is never written: the layer then computes through the rank-``r`` correction of
:mod:`paca_hpu.layer.partitioned` (its :class:`~paca_hpu.layer.partitioned.PartitionableLayer` decides which weight
the layer owns).

Autocast: the autograd function follows ``torch.amp.custom_fwd`` / ``custom_bwd`` semantics for whatever device
the input lives on (``hpu``, ``cuda``, ``cpu``): under autocast the GEMMs run in the autocast dtype, and
``grad_delta`` is computed from float32 operands, so ``delta.grad`` is float32 even when the model runs in bf16.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import writeback as _wb
from . import base as _base
from .base import (_TENSOR_DATA, _autocast_dtype, _autocast_off, _delta_dtype, input_gradient, merge_columns,
                   refuse_double_backward)
from ..selection import check_indices
from .partitioned import PartitionableLayer, _PaCAPartitionedFunction

__all__ = ["PaCALinear", "PaCADelta", "live_paca_layers"]


def live_paca_layers():
    """A snapshot list of every :class:`PaCALinear` alive in this process (built, deep-copied or unpickled; they
    register with :func:`paca_hpu.writeback.track`, where the optimizer step hook looks for them)."""
    return _wb.live_layers()


class PaCADelta(nn.Parameter):
    """``nn.Parameter`` for a PaCA layer's ``delta`` that notes writes through ``.data``.

    Writes through ``.data`` (``p.data.copy_(...)``, ``p.data = ...``) do not move a tensor's autograd version
    counter, so :class:`PaCALinear` could not see them; LOMO/AdaLomo and DeepSpeed's ZeRO optimizers update
    parameters exactly that way. Every access to ``.data`` sets ``_paca_touched``; the layer refreshes its merged
    columns at the next forward. A read through ``.data`` only costs one redundant write-back. Otherwise identical
    to ``nn.Parameter`` (``isinstance(p, nn.Parameter)`` holds; optimizers, DDP, ``deepcopy`` work unchanged).
    """

    @property
    def data(self):
        self._paca_touched = True
        return _TENSOR_DATA.__get__(self)

    @data.setter
    def data(self, value):
        if value is not self:  # ``module.to()`` sets ``p.data = p`` when nothing changes: not a write
            self._paca_touched = True
        _TENSOR_DATA.__set__(self, value)


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
        refuse_double_backward()
        x_sel, weight = ctx.saved_tensors
        grad_x = grad_delta = None
        with _autocast_off(grad_y.device.type):
            if ctx.needs_input_grad[0]:
                grad_x = input_gradient(grad_y, weight, ctx.compute_dtype, ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                grad_delta = _base._delta_gradient(grad_y, x_sel, ctx.scaling)
        return grad_x, None, None, grad_delta, None, None


#: The name under which models pickled by earlier versions reference the state-dict pre-hook (now
#: :func:`paca_hpu.writeback.before_state_dict`).
_write_back_before_state_dict = _wb.before_state_dict


class PaCALinear(PartitionableLayer):
    """A linear layer of which ``r`` fixed input columns are trained (PaCA): the dense implementation of
    :class:`~paca_hpu.layer.base.PaCALayerBase`, whose sharded-weight path is
    :class:`~paca_hpu.layer.partitioned.PartitionableLayer`.

    Replaces an ``nn.Linear`` (weight ``(out, in)``) or a transformers ``Conv1D`` (weight ``(in, out)``); the
    replacement always stores the weight in ``nn.Linear`` layout.

    Attributes:
        weight: frozen ``nn.Parameter`` ``(out_features, in_features)``, the MERGED weight (``W0`` with
            ``W0[:, indices] + scaling * delta`` written into the selected columns) while the layer owns it; once a
            sharding engine partitions it (ZeRO-3, FSDP) it is never written again (module docstring).
        bias: frozen ``nn.Parameter`` ``(out_features,)`` or ``None``.
        indices: buffer ``(r,)``, unique, sorted, int64 (int32 on HPU by default, also after ``.to("hpu")``).
        delta: trainable :class:`PaCADelta` ``(out_features, r)``, float32 (float64 if the weight is float64),
            zeros at start; stays float32, values untouched, when the model is cast (``model.to(torch.bfloat16)``,
            a Trainer's ``bf16_full_eval``: :func:`~paca_hpu.layer.base.keep_delta_values`).
        original_columns: buffer ``(out_features, r)``: ``W0[:, indices]`` in the weight's dtype, kept so that
            disabling, unmerging and unloading restore the base weights bit for bit. Persistent (in the state
            dict), and recaptured whenever a state dict loads new base weights or other indices.
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
        index_dtype: ``torch.int32`` or ``torch.int64``; ``None`` picks
            :func:`~paca_hpu.layer.base.default_index_dtype`.

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
        idx_cpu = check_indices(indices, in_features, what="PaCALinear indices")
        if base_layer_type not in ("linear", "conv1d"):
            raise ValueError(f"base_layer_type must be 'linear' or 'conv1d', got {base_layer_type!r}")
        index_dtype = self._init_index_dtype(index_dtype, weight.device)
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
            self.register_buffer("original_columns", weight.index_select(1, sorted_idx).clone())
        self.delta = PaCADelta(torch.zeros(out_features, self.r, dtype=_delta_dtype(weight.dtype),
                                           device=weight.device))
        self._paca_enabled = True
        self._functional = False
        self.register_state_dict_pre_hook(_wb.before_state_dict)
        self._synced = (id(self.delta), self.delta._version)  # weight == W0 + scaling * 0 already
        self._claim_weight()
        _wb.track(self)

    def __setstate__(self, state):
        """Unpickling and ``copy.deepcopy`` build layers without ``__init__``: register those too (pickle turns
        ``delta`` into a plain ``nn.Parameter``: wrap it again)."""
        super().__setstate__(state)
        delta = self._parameters.get("delta")
        if isinstance(delta, nn.Parameter) and not isinstance(delta, PaCADelta):
            self._parameters["delta"] = PaCADelta(_TENSOR_DATA.__get__(delta), delta.requires_grad)
        self._claim_weight()
        _wb.track(self)

    def _required_delta_dtype(self) -> torch.dtype:
        """float32; float64 for a float64 weight (:meth:`PaCALayerBase._apply` keeps ``delta`` so)."""
        return _delta_dtype(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, bias={self.bias is not None}, base_layer_type={self.base_layer_type}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)``; one GEMM with the merged weight (see the module
        docstring for when the merged columns are refreshed first, and for the disabled / functional paths)."""
        params, buffers = self._parameters, self._buffers  # dict lookups: nn.Module.__getattr__ costs ~1-2 us each
        weight, bias, indices, delta = params["weight"], params.get("bias"), buffers["indices"], params["delta"]
        if not self._paca_enabled:
            # the base columns in the weight's dtype: DeepSpeed's bf16 casts the parameters only, not the buffers
            return F.linear(x, weight.index_copy(1, indices.long(), buffers["original_columns"].to(weight.dtype)), bias)
        owned = weight is self._dense_weight()
        if self._functional or (owned and not isinstance(delta, PaCADelta)):
            return F.linear(x, weight.index_copy(1, indices.long(), self._merged_columns_of(delta)), bias)
        if owned:
            if torch.compiler.is_compiling():
                owned = False  # a compiled graph runs no host-side check: correct stale columns in-graph (module doc)
            elif (id(delta), delta._version) != self._synced or delta.__dict__.get("_paca_touched", False):
                _wb.refresh(self)  # may find that an engine took the weight over (ZeRO-3 partitioning touches delta)
                owned = weight is self._dense_weight()
            if owned:
                return _PaCAFunction.apply(x, weight, bias, delta, indices, self.scaling)
        return _PaCAPartitionedFunction.apply(x, weight, bias, delta, indices, buffers["original_columns"],
                                              self.scaling)

    def is_stale(self) -> bool:
        """Whether ``delta`` may have changed since the merged columns were last written (host-side check, no
        device sync): other version, other object, or written through ``.data``."""
        delta = self.delta
        return (id(delta), delta._version) != self._synced or delta.__dict__.get("_paca_touched", False)

    def _merged_columns_of(self, delta: torch.Tensor) -> torch.Tensor:
        """``original_columns + scaling * delta`` in the weight's dtype, differentiable in ``delta``
        (:func:`merge_columns`)."""
        return merge_columns(self.original_columns, delta, self.scaling, self.weight.dtype)

    # ---- weight bookkeeping (outside forward/backward; fixed-shape index_copy_) ----------------------------

    def merged_columns(self) -> torch.Tensor:
        """``original_columns + scaling * delta`` in the weight's dtype, shape ``(out_features, r)`` (no grad)."""
        return self._merged_columns_of(self.delta.detach())

    @torch.no_grad()
    def sync(self) -> None:
        """Write the adapted columns into ``weight`` (a fixed-shape ``index_copy_`` of ``(out_features, r)``) and
        note the ``delta`` version it reflects. Writes nothing into a weight the layer does not own (partitioned
        by ZeRO-3 / FSDP: the forward then adds the update itself, see the module docstring).

        What the default write-back of :mod:`paca_hpu.writeback` runs for each layer (after every optimizer step,
        before a forward or ``state_dict()`` when :meth:`is_stale`). Disabled layers are written too (their forward
        does not read the merged columns)."""
        delta = self.delta
        if self.owns_weight():
            self.weight.index_copy_(1, self.indices.long(), self.merged_columns())
        delta.__dict__["_paca_touched"] = False
        self._synced = (id(delta), delta._version)

    @torch.no_grad()
    def restore_original(self) -> None:
        """Write the original (base) columns back into ``weight``; bit-for-bit the base weight afterwards. Nothing
        to do for a weight the layer does not own (it never wrote into it)."""
        if self.owns_weight():
            self.weight.index_copy_(1, self.indices.long(), self.original_columns.to(self.weight.dtype))

    @torch.no_grad()
    def set_indices(self, indices: torch.Tensor) -> None:
        """Select other columns (e.g. those stored in an adapter file): restores the base weight first, then
        re-captures ``original_columns``; ``delta`` is reset to zeros in place (the Parameter object is kept, so
        optimizers that hold it stay valid).

        Raises:
            ValueError: indices that are no 1-D int32 / int64 tensor of r distinct columns in range (names the rule).
        """
        new = check_indices(indices, self.in_features, self.r, what="PaCALinear indices")
        self._require_whole_weight("set_indices")
        self.restore_original()
        self.indices.copy_(new.sort().values.to(self.indices.device, self.indices.dtype))
        self.original_columns.copy_(self.weight.index_select(1, self.indices))
        self.delta.zero_()
        self.sync()

    def base_weight(self) -> torch.Tensor:
        """A copy of the original weight ``W0`` (``(out_features, in_features)``, weight dtype).

        Raises:
            RuntimeError: the weight is partitioned by a sharding engine.
        """
        self._require_whole_weight("base_weight")
        return self.weight.detach().index_copy(1, self.indices.long(), self.original_columns.to(self.weight.dtype))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``nn.Module`` loading, then ``original_columns`` made consistent with what was loaded, and the merged
        columns rewritten (any load path that goes through ``load_state_dict``, strict or not):

        * ``weight``, ``original_columns`` and ``delta`` loaded and consistent (the weight's selected columns equal
          ``original_columns + scaling * delta``: a PaCA state dict, any indices): the loaded base columns;
        * ``weight`` loaded but inconsistent with the loaded ``original_columns``/``delta`` (a loader that fills the
          keys missing from a base checkpoint with this model's current values, as ``accelerate``'s
          ``load_checkpoint_in_model`` does through ``torch.distributed.checkpoint.set_model_state_dict``): the
          loaded weight is the new ``W0``;
        * ``weight`` loaded without ``original_columns`` (a plain base checkpoint into an already converted model):
          the loaded weight is the new ``W0``; if ``delta`` came too (a state dict of paca_hpu < 0.2, whose weight
          is merged), ``W0[:, idx] = weight[:, idx] - scaling * delta`` (exact in float32/64, rounded to the weight
          dtype otherwise);
        * no ``weight`` (e.g. only ``delta``/``indices``): the base columns of this layer's own weight.

        A weight partitioned by a sharding engine is loaded as the engine loads it; ``original_columns`` then comes
        from the state dict or stays as it is (the layer never wrote into that weight).
        """
        has = {k: prefix + k in state_dict for k in ("weight", "original_columns", "delta")}
        with torch.no_grad():
            self.restore_original()  # weight = W0 under the current indices, whatever gets loaded next
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        with torch.no_grad():
            if not self.owns_weight():
                pass
            elif has["weight"] and has["original_columns"] and torch.equal(
                    self.weight.index_select(1, self.indices.long()), self.merged_columns()):
                self.restore_original()  # a consistent PaCA state dict (state_dict() writes back first)
            elif has["weight"] and has["delta"]:
                acc = _delta_dtype(self.weight.dtype)
                w0 = self.weight.index_select(1, self.indices).to(acc) - self.scaling * self.delta.detach().to(acc)
                self.original_columns.copy_(w0.to(self.weight.dtype))
                self.restore_original()
            else:
                self.original_columns.copy_(self.weight.index_select(1, self.indices))
            if not isinstance(self._parameters.get("delta"), PaCADelta):  # load_state_dict(assign=True)
                d = self._parameters["delta"]
                self._parameters["delta"] = PaCADelta(_TENSOR_DATA.__get__(d).to(_delta_dtype(self.weight.dtype)),
                                                      d.requires_grad)
            self.sync()

    # ---- back to the base layer (merge_paca / unload_paca) -----------------------------------------------------

    def merged_layer(self) -> nn.Module:
        """An ``nn.Linear`` / ``Conv1D`` (as :attr:`base_layer_type`) carrying ``weight`` with the merged columns
        written in (``W0`` with ``W0[:, indices] + scaling * delta``; the same tensor, no copy for ``nn.Linear``) and
        the layer's bias."""
        with torch.no_grad():
            w = self.weight.detach()
            w.index_copy_(1, self.indices.long(), self.merged_columns())
        return self._plain_layer(w)

    def unloaded(self) -> nn.Module:
        """An ``nn.Linear`` / ``Conv1D`` carrying the base weight ``W0`` (bit for bit: the original columns are written
        back into ``weight``) and the layer's bias, with ``requires_grad`` as they had before conversion."""
        with torch.no_grad():
            self.restore_original()
            w = self.weight.detach()
        return self._plain_layer(w)

    def _plain_layer(self, weight: torch.Tensor) -> nn.Module:
        """A plain ``nn.Linear`` / ``Conv1D`` with ``weight`` (nn.Linear layout ``(out_features, in_features)``) and
        the layer's bias."""
        requires_grad = self._base_weight_requires_grad
        if self.base_layer_type == "linear":
            new = nn.Linear.__new__(nn.Linear)
            nn.Module.__init__(new)
            new.in_features, new.out_features = self.in_features, self.out_features
            new.weight = nn.Parameter(weight, requires_grad=requires_grad)
        else:
            from transformers.pytorch_utils import Conv1D

            new = Conv1D.__new__(Conv1D)
            nn.Module.__init__(new)
            new.nf, new.nx = self.out_features, self.in_features
            new.weight = nn.Parameter(weight.t().contiguous(), requires_grad=requires_grad)
        if self.bias is not None:
            self.bias.requires_grad_(self._base_bias_requires_grad)
            new.bias = self.bias
        else:
            new.register_parameter("bias", None)
        new.train(self.training)
        return new
