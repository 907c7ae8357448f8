"""Candidate speed-ups of PaCA's training step, OFF by default, to be measured before any becomes the default.

Each candidate computes exactly what the default path computes (``bf16_delta_grad`` excepted, see there) and is
switched on and off at run time, so that ``python -m benchmarks.ab --candidate NAME`` can time the old and new
path interleaved in one process on the same model. The correctness tests are in ``tests/unit/test_experimental.py``.

* ``fused_writeback``: the write-back after an optimizer step for all stepped layers at once: the merged columns
  ``original_columns + scaling * delta`` of every layer of one (weight dtype, device, scaling) group in one
  ``torch._foreach_add`` call instead of two to four ops per layer, then one ``index_copy_`` per layer (no batched
  ``index_copy_`` exists across separate weight tensors). Bit-identical merged weights.
* ``lean_forward``: a :class:`~paca_hpu.layer.PaCALinear` forward and autograd Function specialised to the common
  case (enabled layer, own ``delta``, no autocast, input dtype == weight dtype): no autocast queries or
  ``torch.autocast`` contexts and no dtype checks or casts inside the Function's forward and backward (210 layers x
  forward + backward per step on SmolLM2-135M). Any other case, and a forward that ``torch.compile`` traces, takes
  the default path. Bit-identical outputs and gradients.
* ``bf16_delta_grad``: for bf16/fp16 inputs, the delta gradient as a bf16 batched GEMM (one per sequence, float32
  accumulation inside the GEMM, each sequence's (r x out) partial rounded to bf16) summed in float32, instead of
  casting ``grad_y`` and ``x_sel`` to float32 first (a float32 copy of every layer's ``grad_y``). NOT bit-identical:
  each partial carries bf16 rounding (relative error ~2^-9); upstream peft's PaCA rounds its whole bf16 product the
  same way. float32/float64 models are unaffected.
* torch.compile of the decoder blocks with PaCA inside: :func:`compile_decoder_layers` (not a switch: it returns
  the compiled wrappers and a function that swaps them in or out).

Use :func:`enable` / :func:`disable` / :func:`enabled`, or ``with candidate("fused_writeback"):``. The switches go
through the public extension points: :func:`paca_hpu.writeback.set_write_back` (the write-back every trigger runs)
and :func:`paca_hpu.layer.set_delta_gradient` (the backward's ``delta`` gradient).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import writeback
from .layer import PaCADelta, PaCALinear, delta_gradient, delta_gradient_in_use, refuse_double_backward, \
    set_delta_gradient

__all__ = ["CANDIDATES", "enable", "disable", "enabled", "candidate", "fused_write_back", "lowp_delta_gradient",
           "compile_decoder_layers"]


# ------------------------------------------------------------------------------------------ fused write-back


def _index_of(layer: PaCALinear) -> torch.Tensor:
    idx = layer.indices
    return idx if idx.dtype == torch.int64 else idx.long()


@torch.no_grad()
def fused_write_back(layers: Sequence[PaCALinear]) -> None:
    """Write the merged columns of every layer in ``layers`` into its weight (what :meth:`PaCALinear.sync` does
    per layer), with one ``torch._foreach_add`` per (weight dtype, device, scaling) group: a
    :data:`paca_hpu.writeback.WriteBack`, which ``fused_writeback`` installs with
    :func:`~paca_hpu.writeback.set_write_back`.

    The sum is formed in the accumulation dtype (float32; float64 for float64 weights) exactly as
    ``original_columns.to(acc) + scaling * delta.to(acc)`` and rounded once to the weight dtype, so the merged
    weights are bit-identical to the per-layer path."""
    groups: Dict[Tuple, List[PaCALinear]] = {}
    for lay in layers:
        if not lay.owns_weight():  # partitioned by a sharding engine: sync() notes the version, writes nothing
            lay.sync()
            continue
        w = lay.weight
        groups.setdefault((w.dtype, w.device, lay.scaling, lay.delta.dtype), []).append(lay)
    for (wdtype, _dev, scaling, ddtype), group in groups.items():
        acc = torch.float64 if wdtype == torch.float64 else torch.float32
        deltas = [lay.delta.detach() for lay in group]
        if ddtype != acc:
            deltas = [d.to(acc) for d in deltas]
        # mixed dtypes (bf16 columns + float32 delta) promote to float32 inside the add, like .to(acc) first
        merged = torch._foreach_add([lay.original_columns for lay in group], deltas, alpha=scaling)
        for lay, cols in zip(group, merged):
            lay.weight.index_copy_(1, _index_of(lay), cols if cols.dtype == wdtype else cols.to(wdtype))
            delta = lay.delta
            delta.__dict__["_paca_touched"] = False
            lay._synced = (id(delta), delta._version)


# ------------------------------------------------------------------------------------------ lean forward


class _LeanPaCAFunction(torch.autograd.Function):
    """:class:`paca_hpu.layer.dense._PaCAFunction` for inputs in the weight's dtype with autocast off (no casts)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices, scaling):
        y = F.linear(x, weight, bias)
        ctx.save_for_backward(x.index_select(-1, indices) if ctx.needs_input_grad[3] else None, weight)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward()
        x_sel, weight = ctx.saved_tensors
        grad_x = torch.matmul(grad_y, weight) if ctx.needs_input_grad[0] else None
        grad_delta = delta_gradient_in_use()(grad_y, x_sel, ctx.scaling) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_delta, None, None


_DEFAULT_FORWARD = PaCALinear.forward


def _lean_forward(self: PaCALinear, x: torch.Tensor) -> torch.Tensor:
    params = self._parameters
    delta, weight = params["delta"], params["weight"]
    if (not self._paca_enabled or self._functional or type(delta) is not PaCADelta or x.dtype != weight.dtype
            or torch.is_autocast_enabled(x.device.type) or weight is not self._dense_weight()
            or torch.compiler.is_compiling()):
        return _DEFAULT_FORWARD(self, x)  # a weight partitioned by a sharding engine; compiled: no host-side check
    if (id(delta), delta._version) != self._synced or delta.__dict__.get("_paca_touched", False):
        writeback.refresh(self)
        if weight is not self._dense_weight():  # the write-back found an engine took the weight over
            return _DEFAULT_FORWARD(self, x)
    return _LeanPaCAFunction.apply(x, weight, params.get("bias"), delta, self._buffers["indices"], self.scaling)


# ------------------------------------------------------------------------------------------ bf16 delta gradient


def lowp_delta_gradient(grad_y: torch.Tensor, x_sel: torch.Tensor, scaling: float) -> torch.Tensor:
    """:func:`paca_hpu.layer.base.delta_gradient` for bf16/fp16 inputs as per-sequence GEMMs in the input dtype,
    partials summed in float32 (see the module doc); other dtypes take the default. What the fused backward
    computes while ``bf16_delta_grad`` is on.

    Args:
        grad_y: ``(..., out_features)`` gradient of the layer output.
        x_sel: ``(..., r)`` the saved ``x[..., indices]`` (same leading dims and, for this path, same dtype).
        scaling: ``paca_alpha / r``.

    Returns:
        ``(out_features, r)`` float32 (float64 for float64 inputs, through the default)."""
    if x_sel.dtype not in (torch.bfloat16, torch.float16) or grad_y.dtype != x_sel.dtype:
        return delta_gradient(grad_y, x_sel, scaling)
    if x_sel.dim() == 3:
        grad_delta = torch.bmm(x_sel.transpose(1, 2), grad_y).sum(0, dtype=torch.float32)
    else:
        grad_delta = torch.mm(x_sel.reshape(-1, x_sel.shape[-1]).t(),
                              grad_y.reshape(-1, grad_y.shape[-1])).to(torch.float32)
    return grad_delta.t().mul_(scaling)


# ------------------------------------------------------------------------------------------ switches


def _set_fused(on: bool) -> None:
    writeback.set_write_back(fused_write_back if on else None)


def _set_lean(on: bool) -> None:
    PaCALinear.forward = _lean_forward if on else _DEFAULT_FORWARD


def _set_lowp(on: bool) -> None:
    set_delta_gradient(lowp_delta_gradient if on else None)


#: name -> (switch, is-on test)
CANDIDATES: Dict[str, Tuple[Callable[[bool], None], Callable[[], bool]]] = {
    "fused_writeback": (_set_fused, lambda: writeback.write_back_in_use() is fused_write_back),
    "lean_forward": (_set_lean, lambda: PaCALinear.forward is _lean_forward),
    "bf16_delta_grad": (_set_lowp, lambda: delta_gradient_in_use() is lowp_delta_gradient),
}


def _switch(name: str):
    if name not in CANDIDATES:
        raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")
    return CANDIDATES[name]


def enable(name: str) -> None:
    """Switch candidate ``name`` on for every PaCA layer in this process.

    Raises:
        ValueError: unknown name (the message lists the candidates)."""
    _switch(name)[0](True)


def disable(name: str) -> None:
    """Switch candidate ``name`` off (back to the default path)."""
    _switch(name)[0](False)


def enabled(name: str) -> bool:
    """Whether candidate ``name`` is on."""
    return _switch(name)[1]()


@contextlib.contextmanager
def candidate(name: str, on: bool = True) -> Iterator[None]:
    """``with candidate("fused_writeback"):`` switch on (``on=False``: off) for the block, restoring the previous
    state after it."""
    before = enabled(name)
    (enable if on else disable)(name)
    try:
        yield
    finally:
        (enable if before else disable)(name)


# ------------------------------------------------------------------------------------------ torch.compile


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of a (PaCA- or peft-wrapped) LLaMA-family model.

    Raises:
        ValueError: no ``layers`` ModuleList found."""
    for _name, mod in model.named_modules():
        layers = getattr(mod, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return layers
    raise ValueError(f"no decoder-layer ModuleList (`.layers` with `self_attn` blocks) in {type(model).__name__}")


def compile_decoder_layers(model: nn.Module, backend: str = "inductor",
                           dynamic: bool = False) -> Callable[[bool], None]:
    """``torch.compile`` every decoder block of ``model`` (PaCA's autograd Function inside) and return
    ``use_compiled(on)``, which swaps the compiled wrappers in (``True``) or the original blocks back (``False``).
    The wrappers share the original modules and parameters, so both states train the same model; the optimizer
    hook's write-back reaches the compiled graphs (parameters are graph inputs). Compilation happens at the first
    compiled forward (minutes on CPU with ``inductor``, which needs a C++ compiler; ``aot_eager`` needs none).
    """
    layers = decoder_layers(model)
    originals = list(layers)
    # one compiled graph is reused across blocks of equal structure; allow one per block if guards differ
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(originals) + 8)
    compiled = [torch.compile(block, backend=backend, dynamic=dynamic) for block in originals]

    def use_compiled(on: bool) -> None:
        for i, block in enumerate(compiled if on else originals):
            layers[i] = block

    return use_compiled
