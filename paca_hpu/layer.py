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

Write-back by construction (when ``weight`` holds ``W0[:, idx] + scaling * delta``):

* after every ``Optimizer.step()`` that updates ``delta`` (a global step post-hook in :mod:`paca_hpu.model`), so
  ``weight`` is fresh right after the step and the next forward graph is the plain one;
* and in ``forward``, before the GEMM, whenever ``delta`` changed since the last write-back by any other route:
  its autograd version counter moved (in-place writes: schedule-free ``optimizer.eval()/train()``,
  ``load_state_dict``, ``torch.no_grad()`` edits), it was written through ``delta.data`` (LOMO/AdaLomo update in
  backward that way, DeepSpeed copies master weights that way; ``delta`` is a :class:`PaCADelta` that notes such
  accesses), or it is another tensor object than at the last write-back. The check reads host-side integers only
  (no device sync) and is skipped while ``torch.compile`` traces (compiled models rely on the step hook).

``weight`` is never written while a layer is disabled (:func:`paca_hpu.disable_paca`): a disabled layer computes
the base output ``x @ W0.T + b`` from an out-of-place copy ``weight.index_copy(1, idx, original_columns)``, so a
reference forward between a policy forward and its backward (TRL DPO with ``ref_model=None``) leaves the policy
graph intact, and ``delta`` gets no gradient from it. When ``delta`` is replaced by a tensor that is not the
layer's own (``torch.func.functional_call``) or inside :func:`paca_hpu.functional_paca`, the layer uses plain
autograd ops on an out-of-place merged weight instead (exact gradients, double backward; a weight-sized copy per
call).

Partitioned weights (DeepSpeed ZeRO-3, FSDP, FSDP2). A sharding engine owns ``weight``: it keeps only a shard on
each rank and gathers the whole weight into a temporary tensor for each forward and backward (FSDP1: a view of its
flat parameter; FSDP2: an unsharded ``nn.Parameter`` beside the ``DTensor`` shard; ZeRO-3: ``param.data`` swapped
between a partition and a gathered buffer). A column written into that gathered tensor is dropped at the next
gather, and writing into the shard would need each rank to own whole columns. So the layer writes its merged
columns only into a weight it owns (its registered ``nn.Parameter``, whole ``(out_features, in_features)``, not a
``DTensor``, not a ZeRO-3 parameter; checked outside forward, when the layer is built, loaded, cast or synced) and
takes the dense path above only for that very tensor object. Any other weight (the gathered tensor of an engine, or
one substituted by ``torch.func.functional_call``) goes through a rank-``r`` correction that never writes::

    D      = original_columns + scaling * delta - weight[:, idx]            (out_features, r)
    y      = x @ weight.T + b + x[..., idx] @ D.T                           (== x @ W_merged.T + b)
    grad_x = grad_y @ weight ;  grad_x[..., idx] += grad_y @ D
    grad_delta as above

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
capture ``original_columns`` (see :mod:`paca_hpu.model`).

Autocast: the autograd function follows ``torch.amp.custom_fwd`` / ``custom_bwd`` semantics for whatever device
the input lives on (``hpu``, ``cuda``, ``cpu``): under autocast the GEMMs run in the autocast dtype, and
``grad_delta`` is computed from float32 operands, so ``delta.grad`` is float32 even when the model runs in bf16.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PaCALinear", "PaCADelta", "default_index_dtype", "live_paca_layers", "delta_gradient",
           "input_gradient"]

#: Every PaCALinear alive in this process (built, deep-copied or unpickled); the optimizer step hook in
#: :mod:`paca_hpu.model` looks here for the layers whose ``delta`` an optimizer just updated.
_LIVE_LAYERS: "weakref.WeakSet[PaCALinear]" = weakref.WeakSet()


def live_paca_layers():
    """A snapshot list of every :class:`PaCALinear` alive in this process."""
    return list(_LIVE_LAYERS)


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
    # (x_sel^T g)^T: same value as g^T x_sel; this operand order was 2-4x faster on CPU (DESIGN.md).
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
                grad_delta = _delta_grad(grad_y, x_sel, ctx.scaling)
        return grad_x, None, None, grad_delta, None, None


def _write_back_before_state_dict(module, prefix, keep_vars) -> None:
    """``state_dict()`` pre-hook: a stale layer writes back first, so a saved ``weight`` always equals
    ``W0`` with ``original_columns + scaling * delta`` in the selected columns (what loading checks)."""
    if module.is_stale():
        module.sync()


#: The delta-gradient computation of the backward (:func:`delta_gradient`); :mod:`paca_hpu.experimental` swaps in
#: candidates.
_delta_grad = delta_gradient


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
            d = torch.add(original_columns.to(acc), delta.detach().to(acc), alpha=scaling)
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
                grad_delta = _delta_grad(grad_y, x_sel, ctx.scaling)
        return grad_x, None, None, grad_delta, None, None, None


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _no_weight():
    return None


class PaCALinear(nn.Module):
    """A linear layer of which ``r`` fixed input columns are trained (PaCA).

    Replaces an ``nn.Linear`` (weight ``(out, in)``) or a transformers ``Conv1D`` (weight ``(in, out)``); the
    replacement always stores the weight in ``nn.Linear`` layout.

    Attributes:
        weight: frozen ``nn.Parameter`` ``(out_features, in_features)``, the MERGED weight (``W0`` with
            ``W0[:, indices] + scaling * delta`` written into the selected columns) while the layer owns it; once a
            sharding engine partitions it (ZeRO-3, FSDP) it is never written again (module docstring).
        bias: frozen ``nn.Parameter`` ``(out_features,)`` or ``None``.
        indices: buffer ``(r,)``, unique, sorted, int64 (int32 on HPU by default, also after ``.to("hpu")``).
        delta: trainable :class:`PaCADelta` ``(out_features, r)``, float32 (float64 if the weight is float64),
            zeros at start; stays float32 when the model is cast (``model.to(torch.bfloat16)``, a Trainer's
            ``bf16_full_eval``).
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
            self.register_buffer("original_columns", weight.index_select(1, sorted_idx).clone())
        self.delta = PaCADelta(torch.zeros(out_features, self.r, dtype=_delta_dtype(weight.dtype),
                                           device=weight.device))
        self._paca_enabled = True
        self._functional = False
        self.register_state_dict_pre_hook(_write_back_before_state_dict)
        self._synced = (id(self.delta), self.delta._version)  # weight == W0 + scaling * 0 already
        self._claim_weight()
        _LIVE_LAYERS.add(self)

    def __getstate__(self):
        """Pickling and ``copy.deepcopy``: without the weak reference to the owned weight (not picklable, and a copy
        owns its own weight: :meth:`__setstate__` claims it)."""
        state = self.__dict__.copy()
        state.pop("_dense_weight", None)
        return state

    def __setstate__(self, state):
        """Unpickling and ``copy.deepcopy`` build layers without ``__init__``: register those too (pickle turns
        ``delta`` into a plain ``nn.Parameter``: wrap it again)."""
        super().__setstate__(state)
        delta = self._parameters.get("delta")
        if isinstance(delta, nn.Parameter) and not isinstance(delta, PaCADelta):
            self._parameters["delta"] = PaCADelta(_TENSOR_DATA.__get__(delta), delta.requires_grad)
        self._claim_weight()
        _LIVE_LAYERS.add(self)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ...), then: ``delta`` back to float32 (float64 for
        a float64 weight) if a cast changed it, and the default index dtype re-picked for the new device when none
        was given (a model converted on the CPU and moved to an HPU gathers with int32 indices)."""
        super()._apply(fn, recurse)
        want = _delta_dtype(self.weight.dtype)
        if self.delta.dtype != want:
            self.delta.data = self.delta.data.to(want)
            if self.delta.grad is not None:
                self.delta.grad = self.delta.grad.to(want)
        if getattr(self, "_index_dtype_auto", False):
            wanted = default_index_dtype(self.indices.device)
            if self.indices.dtype != wanted:
                self.indices = self.indices.to(wanted)
        self._claim_weight()  # a conversion may have replaced the weight Parameter by a new object
        return self

    def _owns(self, weight) -> bool:
        """``weight`` is a whole tensor this layer may write its merged columns into (checked outside forward): its
        registered ``nn.Parameter``, of shape ``(out_features, in_features)``, neither a DTensor (FSDP2 shard) nor a
        DeepSpeed ZeRO-3 parameter (``ds_id``: the engine swaps its data between a partition and gathered
        copies). FSDP1 keeps the registered Parameter but gives it a flat shard of another shape."""
        return (isinstance(weight, nn.Parameter) and weight is self._parameters.get("weight")
                and tuple(weight.shape) == (self.out_features, self.in_features)
                and not hasattr(weight, "ds_id") and not _is_dtensor(weight))

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
            if not torch.compiler.is_compiling() and (
                    (id(delta), delta._version) != self._synced or delta.__dict__.get("_paca_touched", False)):
                self.sync()  # may find that an engine took the weight over (ZeRO-3 partitioning touches delta)
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
        """``original_columns + scaling * delta`` in the weight's dtype, differentiable in ``delta``.

        Two separately rounded operations (``delta * scaling``, then ``+``), never a fused multiply-add
        (``torch.add(..., alpha=)`` is an FMA on CPU and may be one elsewhere): the merged weight is then the same on
        every backend and equals peft's LoRA merge ``W0 + (B @ A) * scaling`` of the exported adapter bit for bit
        (:mod:`paca_hpu.export`)."""
        acc = _delta_dtype(self.weight.dtype)
        return (self.original_columns.to(acc) + delta.to(acc) * self.scaling).to(self.weight.dtype)

    # ---- weight bookkeeping (outside forward/backward; fixed-shape index_copy_) ----------------------------

    def merged_columns(self) -> torch.Tensor:
        """``original_columns + scaling * delta`` in the weight's dtype, shape ``(out_features, r)`` (no grad)."""
        return self._merged_columns_of(self.delta.detach())

    @torch.no_grad()
    def sync(self) -> None:
        """Write the adapted columns into ``weight`` (a fixed-shape ``index_copy_`` of ``(out_features, r)``) and
        note the ``delta`` version it reflects. Writes nothing into a weight the layer does not own (partitioned
        by ZeRO-3 / FSDP: the forward then adds the update itself, see the module docstring).

        Called after every optimizer step by the hook in :mod:`paca_hpu.model`, and by ``forward`` when
        :meth:`is_stale`. Disabled layers are written too (their forward does not read the merged columns)."""
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

    def _require_whole_weight(self, what: str) -> None:
        if not self.owns_weight():
            raise RuntimeError(
                f"{what} needs the whole weight of PaCA layer '{getattr(self, 'paca_name', '?')}', but it is "
                f"partitioned by a sharding engine (shape {tuple(self.weight.shape)}, "
                f"{type(self.weight).__name__}): do it before wrapping the model (FSDP, DeepSpeed ZeRO-3), or on the "
                "whole model (save_adapter, then load_adapter into an unwrapped base model)")

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
