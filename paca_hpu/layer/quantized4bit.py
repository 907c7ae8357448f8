r"""QPaCA: PaCA on a bitsandbytes 4-bit (NF4 / FP4) base layer (Woo et al., ICLR 2025, arXiv 2503.01905, the
QPaCA experiments; QLoRA, Dettmers et al. 2023, arXiv 2305.14314, is the baseline and the source of the 4-bit format).

For a ``bitsandbytes.nn.Linear4bit`` with ``in_features`` / ``out_features`` and fixed column indices ``idx`` ``(r,)``::

    Wq       : the frozen 4-bit weight, a packed ``Params4bit`` of shape (out*in/2, 1), uint8, with its ``quant_state``
               (blocksize, per-block absmax -- itself 8-bit quantized with double quantization --, NF4 or FP4 code)
    D        = dequantize_4bit(Wq)                                   (out, in), float32 products code * absmax
    C        = D[:, idx]                 ``original_columns``: (out, r) float32, dequantized once (buffer)
    delta    : (out, r) float32, zero at start, the only trainable tensor
    s        = paca_alpha / r
    M        = C + s * delta             the merged columns, (out, r) float32, formed in every forward (out x r adds)
    W        = D ;  W[:, idx] = M        the effective weight (never materialised in forward)

    forward  : y = matmul_4bit(x0, Wq) + b + x[..., idx] @ M.T        x0 = x with the r selected channels set to 0
               (an out-of-place copy of x, freed at once); the first term is bitsandbytes' own 4-bit GEMM; the second
               is one (N x r) @ (r x out) GEMM added into y in place (addmm_). For bf16 / fp16 compute, M enters as
               the pair [hi | lo] of bf16 / fp16 parts (K = 2r), so it keeps about 16 bits.
    backward : grad_x     = grad_y @ W    W built as a temporary, as bitsandbytes' own backward does (dequantize_4bit,
                                          then the r merged columns copied in), one GEMM
               grad_delta = s * grad_y_2d.T @ x_2d[:, idx]            float32 (paca_hpu.layer.base.delta_gradient)
    saved    : x[..., idx] (N x r, compute dtype) only; Wq, delta and C are the layer's own tensors.

Nothing is ever written into the quantized weight: ``Wq`` stays bit-for-bit the weight bitsandbytes produced, so
disabling (exactly bitsandbytes' base output), unloading (the very ``Linear4bit`` object) and a fresh quantization of
the same checkpoint all see the same base. ``delta`` is read by every forward, so there is no write-back to go stale:
optimizer steps of any kind, gradient accumulation, checkpointing recompute and evaluation are right by construction.
``C`` is re-captured when bitsandbytes replaces the weight tensor (load, device move; a host-side identity check).

Compute dtype (bitsandbytes' ``Linear4bit`` semantics): the autocast dtype when autocast is on for the input's device,
else the layer's ``compute_dtype`` (``bnb_4bit_compute_dtype``), else the input's dtype; the output has the input's
dtype (the autocast dtype under autocast), as ``Linear4bit`` returns it. Only float32, bfloat16 and float16 are
accepted (bitsandbytes' CPU dequantization writes nothing for other dtypes).

**Why the selected columns are taken out of the 4-bit GEMM and carried in float32** (``scripts/qpaca_design_probe.py``,
this project's CPU, torch 2.13, bitsandbytes 0.50.2, 2 threads, one NF4 576 x 576 layer, r = 8, s = 2). ``upd``: the
relative error of the weight update ``s * delta`` as each design really applies it, recovered from the layer's
outputs by least squares over 16,384 tokens, for ``s * delta`` of 1 % of the weights' standard deviation (early
training); time: forward + backward of 512 tokens, float32, medians of 15 interleaved rounds [q1, q3], measured
while other jobs kept the 2 cores ~7x oversubscribed (load average 15), so only rough:

================================================  ============  ==========  ========================
design                                            upd float32   upd bf16    fwd+bwd ms float32
================================================  ============  ==========  ========================
zeroed input channels, M as bf16 hi/lo (here)     5.1e-6        0.062       554 [470, 632]
correction ``+ s * x_sel @ delta.T`` after GEMM   4.5e-6        0.43        566 [475, 597]
zeroed 4-bit codes (or inputs), M in bf16         5.1e-6        0.17        560 [446, 620]
dense merge (dequantize, copy M in, one GEMM)     5.1e-6        0.24        499 [468, 557]
bitsandbytes' frozen layer alone (QLoRA's base)   -             -           406 [324, 446]
================================================  ============  ==========  ========================

The outputs themselves agree with float64 to 2.4e-7 (float32) and 3e-3 (bf16, the output rounding) for every
design; the designs differ in what reaches the output of a small update, and not measurably in time:

* correction: in bf16 the base output is rounded before the small correction is added, and the second rounding
  drops any correction under half a bf16 step of ``y`` (peft's QLoRA adds its LoRA branch the same way).
* zeroed codes: the selected 4-bit codes set to 0.0 (NF4 code 7, FP4 code 0) give exactly the numbers of zeroing
  the input channels, but write into the quantized weight (unload must undo it, a saved state dict would hold a
  modified base). Carrying ``M`` as one bf16 operand rounds updates under half a bf16 step of the weight away;
  the hi/lo pair keeps them.
* dense merge (the dense layer's design): ``M`` rounded to bf16, and bitsandbytes' fused 4-bit GEMM on CUDA (used
  up to 1536 tokens per call) given up; on CPU, where bitsandbytes' GEMM is itself a dequantization plus a
  ``linear``, its median was 10 % lower in this noisy run.

At ``delta = 0`` the layer's output equals bitsandbytes' base output up to rounding (the selected channels are
summed separately), not bit for bit; :func:`paca_hpu.disable_paca` gives the base output bit for bit.

bitsandbytes' CPU inference repack (bitsandbytes >= 0.50 on AVX-512 BF16 hosts, at a layer's first eval-mode forward
without gradients) is kept off every 4-bit layer of a PaCA model, and a model it has already repacked is refused
(:func:`prevent_cpu_repack` says why).

8-bit ``Linear8bitLt`` layers are refused (:func:`unsupported_reason`); 4-bit is the supported quantized mode.
bitsandbytes is imported only when a model already holds its layers; importing this module does not import it. The
bitsandbytes helpers (recognising its layers, the quantization state and its dequantization, the CPU repack, the
quantization markers of a merged model) are in :mod:`paca_hpu.layer.bnb_helpers` and importable from here as before.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..selection import check_indices
from .base import PaCALayerBase, _autocast_dtype, _autocast_off, delta_gradient, input_gradient
from .bnb_helpers import (checked_quant_state, clear_quantization_markers, dequantized, is_linear4bit,
                          linear_features, prevent_cpu_repack, unsupported_reason)

__all__ = ["PaCALinear4bit", "is_linear4bit", "unsupported_reason", "linear_features", "merged_linear",
           "clear_quantization_markers", "prevent_cpu_repack"]

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _merged_operand(original_columns: torch.Tensor, delta: torch.Tensor, scaling: float, cd: torch.dtype):
    """``M = original_columns + scaling * delta`` (float32, ``(out, r)``) as the GEMM operand in ``cd``: ``M`` itself
    for float32; for bf16 / fp16 the pair ``[hi | lo]`` ``(out, 2r)`` with ``hi = M`` rounded to ``cd`` and ``lo =``
    the rest rounded to ``cd``, so ``[x_sel | x_sel] @ [hi | lo].T`` keeps ``M`` to about 16 bits (a single bf16
    operand would round away updates smaller than half a bf16 step of the weight)."""
    m = torch.add(original_columns, delta, alpha=scaling)
    if cd == torch.float32:
        return m
    hi = m.to(cd)
    return torch.cat([hi, (m - hi.float()).to(cd)], 1)


class _QPaCAFunction(torch.autograd.Function):
    """``y = matmul_4bit(x with x[..., idx] = 0, Wq) + b + x[..., idx] @ (D[:, idx] + scaling * delta).T``, saving
    only ``x[..., idx]`` (module docstring).

    Inputs: x (..., in), weight (packed Params4bit), bias (out,) or None, delta (out, r) float32 or None (PaCA
    disabled: exactly bitsandbytes' base output, no graph edge to delta), indices (r,), scaling float, quant_state
    (bitsandbytes QuantState), original_columns (out, r) float32, compute_dtype, out_dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices, scaling, quant_state, original_columns, compute_dtype,
                out_dtype):
        import bitsandbytes as bnb

        cd = compute_dtype
        x_sel = None
        with _autocast_off(x.device.type):
            xc = x if x.dtype == cd else x.to(cd)
            bc = None if bias is None else (bias if bias.dtype == cd else bias.to(cd))
            if delta is None:
                y = bnb.matmul_4bit(xc, weight, quant_state=quant_state, bias=bc)
            else:
                x_sel = xc.index_select(-1, indices)
                # the selected input channels are zeroed (an out-of-place copy of x; Wq is never touched) and enter
                # through the merged columns instead; grad mode is off here, so bitsandbytes runs its 4-bit GEMM op
                # directly (no MatMul4Bit node, nothing saved by it)
                y = bnb.matmul_4bit(xc.index_fill(-1, indices.long(), 0), weight, quant_state=quant_state, bias=bc)
                if y.numel():
                    m = _merged_operand(original_columns, delta, scaling, cd)
                    xs = x_sel.reshape(-1, x_sel.shape[-1])
                    y.view(-1, y.shape[-1]).addmm_(xs if m.shape[1] == xs.shape[1] else torch.cat([xs, xs], 1), m.t())
        ctx.save_for_backward(x_sel if ctx.needs_input_grad[3] else None, delta, indices, original_columns)
        ctx.weight, ctx.quant_state = weight, quant_state
        ctx.compute_dtype, ctx.x_dtype, ctx.scaling = cd, x.dtype, scaling
        return y if y.dtype == out_dtype else y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the 4-bit PaCA layer's fused backward is not differentiable (double backward, create_graph=True): run "
                "that computation inside `with paca_hpu.functional_paca(model):`, which uses plain autograd ops")
        x_sel, delta, indices, original_columns = ctx.saved_tensors
        grad_x = grad_delta = None
        with _autocast_off(grad_y.device.type):
            if ctx.needs_input_grad[0]:
                cd = ctx.compute_dtype
                w = dequantized(ctx.weight, ctx.quant_state, cd)  # (out, in), a temporary, as bitsandbytes' backward
                if delta is not None:
                    w.index_copy_(1, indices.long(), torch.add(original_columns, delta, alpha=ctx.scaling).to(cd))
                grad_x = input_gradient(grad_y, w, cd, ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                grad_delta = delta_gradient(grad_y, x_sel, ctx.scaling)
        return grad_x, None, None, grad_delta, None, None, None, None, None, None


class PaCALinear4bit(PaCALayerBase):
    """PaCA on a bitsandbytes 4-bit layer: ``r`` fixed input columns trained in float32 on top of a frozen NF4 /
    FP4 weight that is never modified (see the module docstring for the math and the design measurements); the 4-bit
    implementation of :class:`~paca_hpu.layer.base.PaCALayerBase`.

    Attributes:
        base_layer: the original ``bitsandbytes.nn.Linear4bit`` (frozen; returned as is by
            :func:`paca_hpu.unload_paca`).
        weight, bias: the base layer's (read-only properties): the packed ``Params4bit`` and ``(out,)`` or None.
        indices: buffer ``(r,)``, unique, sorted, int64 (int32 on HPU by default).
        original_columns: non-persistent buffer ``(out_features, r)`` float32, ``dequantize(Wq)[:, indices]``.
        delta: trainable ``nn.Parameter`` ``(out_features, r)``, float32 (kept float32 by ``.to(dtype)``), zeros at
            start.
        scaling: ``paca_alpha / r``; in_features, out_features, r: ints; base_layer_type: ``"linear4bit"``.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``.

    Args:
        base_layer: a quantized ``bitsandbytes.nn.Linear4bit``.
        indices: ``(r,)`` integer column indices, unique, within ``[0, in_features)``.
        scaling: ``paca_alpha / r``.
        index_dtype: ``torch.int32`` / ``torch.int64``; None picks :func:`paca_hpu.layer.base.default_index_dtype`
            (again after every device move).

    Raises:
        TypeError: ``base_layer`` is not a bitsandbytes ``Linear4bit``.
        ValueError: the layer is not quantized yet, or bitsandbytes repacked it for CPU inference
            (:func:`prevent_cpu_repack`, which the layer applies to its base); bad indices.
    """

    base_layer_type = "linear4bit"

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, scaling: float,
                 index_dtype: Optional[torch.dtype] = None, name: str = "") -> None:
        super().__init__()
        if not is_linear4bit(base_layer):
            raise TypeError(f"PaCALinear4bit wraps a bitsandbytes Linear4bit, got {type(base_layer).__name__}")
        qs = checked_quant_state(base_layer, name)
        self.in_features, self.out_features = linear_features(base_layer)
        if tuple(qs.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear4bit '{name}' quant_state.shape {tuple(qs.shape)} does not match "
                             f"(out_features, in_features) = ({self.out_features}, {self.in_features})")
        idx = self._checked_indices(indices)
        device = base_layer.weight.device
        index_dtype = self._init_index_dtype(index_dtype, device)
        self.r = int(idx.numel())
        self.scaling = float(scaling)
        self._base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        for p in base_layer.parameters():
            p.requires_grad_(False)
        base_layer.support_avx512bf16_for_cpu = False  # never repacked for CPU inference (prevent_cpu_repack)
        self.base_layer = base_layer
        self.register_buffer("indices", idx.to(device=device, dtype=index_dtype))
        self.register_buffer("original_columns", torch.empty(self.out_features, self.r, device=device),
                             persistent=False)
        self._columns_of = None
        self._refresh_columns()
        self.delta = nn.Parameter(torch.zeros(self.out_features, self.r, dtype=torch.float32, device=device))
        self._paca_enabled = True
        self._functional = False
        self.train(base_layer.training)

    def _checked_indices(self, indices, r: Optional[int] = None) -> torch.Tensor:
        return check_indices(indices, self.in_features, r, what="PaCALinear4bit indices").sort().values

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's packed 4-bit ``Params4bit`` (frozen)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias ``(out_features,)`` or None (frozen)."""
        return self.base_layer.bias

    def _after_apply(self) -> None:
        """After a device move or cast (:meth:`PaCALayerBase._apply`, which keeps ``delta`` float32 with its values
        and re-picks the default index dtype)."""
        self._columns_of = None  # original_columns are re-captured (float32, from the moved weight) when next used

    def extra_repr(self) -> str:
        qs = self.base_layer.weight.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, bias={self.bias is not None}, quant_type={qs.quant_type}, "
                f"double_quant={bool(qs.nested)}, compute_dtype={self.base_layer.compute_dtype}")

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The GEMM dtype for input ``x`` (module docstring). Raises ValueError for other than fp32 / bf16 / fp16."""
        cd = _autocast_dtype(x) or self.base_layer.compute_dtype or x.dtype
        if cd not in _COMPUTE_DTYPES:
            raise ValueError(f"4-bit PaCA layers compute in float32, bfloat16 or float16, got {cd} (input {x.dtype}); "
                             "set bnb_4bit_compute_dtype or cast the input")
        return cd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)`` (module docstring)."""
        cd = self.compute_dtype(x)
        out_dtype = _autocast_dtype(x) or x.dtype
        qs = checked_quant_state(self.base_layer, getattr(self, "paca_name", ""))
        delta = None
        if self._paca_enabled:
            self._refresh_columns()
            delta = self.delta
            if self._functional or not isinstance(delta, nn.Parameter):  # functional_paca / torch.func.functional_call
                return self._functional_forward(x, delta, qs, cd, out_dtype)
        return _QPaCAFunction.apply(x, self.base_layer.weight, self.base_layer.bias, delta, self.indices,
                                    self.scaling, qs, self.original_columns, cd, out_dtype)

    def _functional_forward(self, x, delta, quant_state, cd, out_dtype):
        """``F.linear(x, W)`` by plain autograd ops, ``W`` = the dequantized weight with the merged columns copied in
        out of place: exact higher-order gradients (:func:`paca_hpu.functional_paca`); keeps a dequantized weight
        copy per call and the full input for backward."""
        w = dequantized(self.base_layer.weight, quant_state, cd)
        w = w.index_copy(1, self.indices.long(), torch.add(self.original_columns, delta, alpha=self.scaling).to(cd))
        bias = self.base_layer.bias
        with _autocast_off(x.device.type):
            y = nn.functional.linear(x.to(cd), w, None if bias is None else bias.to(cd))
        return y.to(out_dtype)

    # ---- the dense float view (merge, references); nothing here writes into the quantized weight -----------

    @torch.no_grad()
    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``D = dequantize_4bit(Wq)`` as a new ``(out_features, in_features)`` tensor of ``dtype`` (float32 by
        default: the exact products code * absmax)."""
        return dequantized(self.base_layer.weight, checked_quant_state(self.base_layer), dtype)

    def _refresh_columns(self) -> None:
        """(Re)capture ``original_columns = D[:, indices]`` (float32) when the base weight is another tensor than
        the one they were taken from (bitsandbytes replaces the ``Params4bit`` on load / device moves). Host-side
        check of identities only; no device synchronisation."""
        w = self.base_layer.weight
        key = (id(w), w.data_ptr(), id(getattr(w, "quant_state", None)), self.indices.data_ptr(),
               self.indices._version)
        if key != self._columns_of:
            # a normal tensor even when first needed under torch.inference_mode() (a generation after a device
            # move): an inference tensor could not be saved for a later training step's backward
            with torch.inference_mode(False), torch.no_grad():
                self.original_columns = self.base_weight().index_select(1, self.indices).to(self.indices.device)
            self._columns_of = key

    def merged_columns(self) -> torch.Tensor:
        """``D[:, indices] + scaling * delta``, ``(out_features, r)`` float32."""
        self._refresh_columns()
        return torch.add(self.original_columns, self.delta.detach(), alpha=self.scaling)

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The effective weight ``W`` (``D`` with ``D[:, idx] + scaling * delta``) as ``(out, in)`` of ``dtype``:
        computed in float32, then rounded ONCE to ``dtype`` (round to nearest even). Default dtype: the dtype the
        weights had before quantization (``quant_state.dtype``, the model's ``torch_dtype`` at load)."""
        dtype = dtype or checked_quant_state(self.base_layer).dtype
        w = self.base_weight()
        w.index_add_(1, self.indices, self.delta.detach().float(), alpha=self.scaling)
        return w.to(dtype)

    def sync(self) -> None:
        """No-op: the 4-bit layer reads ``delta`` in every forward; nothing is written back."""

    def restore_original(self) -> None:
        """No-op: the quantized weight is never modified."""

    @torch.no_grad()
    def set_indices(self, indices: torch.Tensor) -> None:
        """Select other columns (e.g. from an adapter file); ``delta`` is reset to zeros in place (same Parameter).

        Raises:
            ValueError: indices that are no 1-D int32 / int64 tensor of r distinct columns in range (names the rule).
        """
        idx = self._checked_indices(indices, self.r)
        self.indices.copy_(idx.to(self.indices.device, self.indices.dtype))
        self._refresh_columns()
        self.delta.zero_()

    def merged_layer(self) -> nn.Linear:
        """A plain float ``nn.Linear`` holding :meth:`merged_weight` (:func:`merged_linear`)."""
        return merged_linear(self)

    def unloaded(self) -> nn.Module:
        """The original ``Linear4bit`` with its parameters' ``requires_grad`` as they were (the adaptation dropped)."""
        for n, p in self.base_layer.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, False))
        return self.base_layer


def merged_linear(layer: PaCALinear4bit, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A plain ``nn.Linear`` carrying ``layer.merged_weight(dtype)`` and the base bias (cast to the same dtype),
    in the base layer's train/eval mode; its weight is frozen unless the base weight required grad."""
    w = layer.merged_weight(dtype)
    new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    new.weight = nn.Parameter(w, requires_grad=layer._base_requires_grad.get("weight", False))
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().to(w.dtype), requires_grad=layer._base_requires_grad.get("bias",
                                                                                                             False))
    new.train(layer.training)
    return new
