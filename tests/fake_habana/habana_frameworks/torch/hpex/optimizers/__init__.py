"""Fake ``habana_frameworks.torch.hpex.optimizers.FusedAdamW``.

Where the real one (Intel Gaudi software, ``hpex/optimizers/FusedAdamW.py``) calls ``mark_step`` is modelled
exactly: ``step`` is wrapped so that ``htcore.step_closure._mark_step_if_lazy()`` runs after the whole step, and it
runs again at the start of every parameter group; the update of each group is one fused op
(``torch.ops.hpu.optimizer_adamw``), recorded here as the event ``("fused_adamw", n_params)`` and computed with
torch ops: moments in the parameter dtype, ``step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, decoupled weight
decay ``w *= 1 - lr * weight_decay``, ``w -= step_size * m / (sqrt(v) + eps)``.
"""

import math

import torch
from torch.optim import Optimizer

from ...core import step_closure
from ....fake import record


def _step_wrap(step_func):
    def wrap_(*args, **kwargs):
        result = step_func(*args, **kwargs)
        step_closure._mark_step_if_lazy()
        return result

    return wrap_


class FusedAdamW(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True,
                 moments_dtype=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction))

    @_step_wrap
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            step_closure._mark_step_if_lazy()
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            step_size = group["lr"]
            if group.get("bias_correction", True):
                step_size *= math.sqrt(1.0 - beta2 ** group["step"]) / (1.0 - beta1 ** group["step"])
            record("fused_adamw", len(params))
            for p in params:
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.mul_(1.0 - group["weight_decay"] * group["lr"])
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
        return loss
