"""The reference model of preference training (DPO, KTO, KL-to-base penalties) without a copy of the weights: the
PaCA model itself with its adapter disabled.

peft users get this from TRL for free: with ``ref_model=None`` and a ``PeftModel``, TRL computes the reference
log-probs inside ``model.disable_adapter()``. A PaCA model is no ``PeftModel``, so TRL would instead build a second
model (TRL 0.22: a deep copy; TRL 1.x: loaded again from ``model.config._name_or_path``) and keep it for the whole
run. :class:`PaCAReferenceModel` is what to pass as ``ref_model`` instead::

    dpo = DPOTrainer(model=model, ref_model=PaCAReferenceModel(model), args=..., train_dataset=pairs)

Every call runs the PaCA model inside :func:`paca_hpu.disable_paca` and ``torch.no_grad()``: the output is the base
model's, bit for bit (``x @ W0.T + b`` in every PaCA layer; ``modules_to_save`` compute with their frozen originals,
not the trained copies), nothing is written (so the call is safe between the policy's forward and its backward),
and ``delta`` gets no gradient. The wrapper holds no parameter and no buffer of
its own (the model is not registered as a submodule), so trainers and accelerate can "prepare", move or cast it
without copying anything.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import disable_paca, paca_layers

__all__ = ["PaCAReferenceModel"]


class PaCAReferenceModel(nn.Module):
    """The base model of ``model`` (a model :func:`paca_hpu.apply_paca` converted), computed by ``model`` itself with
    its adapter disabled; holds no weights of its own.

    Args:
        model: the PaCA model (the policy). Not copied and not registered as a submodule.

    Calls: ``ref(*args, **kwargs)`` returns ``model(*args, **kwargs)`` computed inside :func:`paca_hpu.disable_paca`
    and ``torch.no_grad()`` (same inputs, same output type; logits in the model's dtype). ``ref.generate(...)`` does
    the same for ``model.generate``. ``ref.config`` is ``model.config``; ``ref.state_dict()`` is ``model.state_dict()``.

    The call goes to the model object itself, whatever was patched onto it (accelerate's autocast, TRL 1.x's fused
    LM head ``fused_lm_head=True``), and ignores anything a library patches onto this wrapper's own ``forward``:
    the reference always follows the policy's current wrapping.

    Not for TR-DPO (``sync_ref_model=True``): there is no separate reference to synchronise (the reference is the
    base model for the whole run), as with peft adapters, for which TRL refuses that option.

    Raises:
        ValueError: ``model`` has no PaCA layer (nothing would be disabled: the "reference" would be the policy).
        RuntimeError: at a call, ``model`` has no PaCA layer any more (``merge_paca`` / ``unload_paca`` ran on it), or
            it has ``modules_to_save`` sharded by FSDP / FSDP2 / DeepSpeed ZeRO-3 (see :func:`paca_hpu.disable_paca`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if next(paca_layers(model), None) is None:
            raise ValueError(
                f"PaCAReferenceModel: {type(model).__name__} has no PaCA layer, so with its adapter disabled it is "
                "still the policy itself; call apply_paca(model, config) first, or pass a separate frozen model "
                "as the reference")
        object.__setattr__(self, "_policy", model)  # not a submodule: no parameters, no state_dict entries

    def _disabled(self):
        """``disable_paca(policy)``, refusing a policy that lost its PaCA layers since (``merge_paca`` /
        ``unload_paca``): disabling nothing would silently make the reference the policy."""
        if next(paca_layers(self.policy), None) is None:
            raise RuntimeError(
                f"PaCAReferenceModel: its {type(self.policy).__name__} has no PaCA layer any more (merge_paca or "
                "unload_paca ran on it), so the 'reference' would be the policy itself; build the reference from "
                "the model that is trained now (after apply_paca), e.g. PaCAReferenceModel(apply_paca(merged, cfg))")
        return disable_paca(self.policy)

    @property
    def policy(self) -> nn.Module:
        """The PaCA model this reference disables (the object passed in)."""
        return self.__dict__["_policy"]

    @property
    def config(self):
        """``model.config`` (trainers read the model type, ``is_encoder_decoder``, the text config from it)."""
        return self.policy.config

    def forward(self, *args, **kwargs):
        """``model(*args, **kwargs)`` with the adapter disabled, without gradient."""
        with torch.no_grad(), self._disabled():
            return self.policy(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        # The class's forward, never an instance attribute: TRL 1.x (add_fused_lm_head) and accelerate (autocast)
        # replace ``forward`` on the objects they prepare; on this wrapper that would bypass disable_paca.
        return PaCAReferenceModel.forward(self, *args, **kwargs)

    def state_dict(self, *args, **kwargs):
        """``model.state_dict(...)``: the reference's state is the policy's (base weights, indices, deltas).

        Holding no tensors of its own, the wrapper would otherwise hash like every other wrapper: TRL 1.x keys its
        cache file of precomputed reference log-probs (``precompute_ref_log_probs=True``) on the dataset's
        fingerprint and a hash of the reference's state dict; an empty state dict would leave only the dataset to
        tell two models' cached values apart."""
        return self.policy.state_dict(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """``model.generate(*args, **kwargs)`` with the adapter disabled, without gradient."""
        with torch.no_grad(), self._disabled():
            return self.policy.generate(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"policy={type(self.policy).__name__}, adapter disabled"
