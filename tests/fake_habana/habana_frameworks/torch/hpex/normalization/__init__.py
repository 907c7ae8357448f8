"""Fake ``habana_frameworks.torch.hpex.normalization.FusedClipNorm``.

As the real one (Intel Gaudi software, ``hpex/normalization/FusedClipNorm.py``): ``clip_norm(parameters)`` calls
``htcore.step_closure._mark_step_if_lazy()`` before and after one fused op that computes the total 2-norm of the
gradients and scales them in place to ``max_norm`` (recorded as ``("fused_clip_norm", n_grads)``; computed with
``torch.nn.utils.clip_grad_norm_``), and returns the total norm.
"""

import torch

from ...core import step_closure
from ....fake import record


class FusedClipNorm:
    def __init__(self, parameters, max_norm):
        self.max_norm = float(max_norm)
        self.norm_type = 2.0

    def clip_norm(self, parameters):
        step_closure._mark_step_if_lazy()
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        grads = [p for p in params if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        record("fused_clip_norm", len(grads))
        total = torch.nn.utils.clip_grad_norm_(grads, self.max_norm, self.norm_type)
        step_closure._mark_step_if_lazy()
        return total
