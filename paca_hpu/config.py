"""Configuration of a PaCA adapter (peft-style ``tuners/<method>/config.py``)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .selection import INIT_INDICES, check_init_indices, check_r

__all__ = ["PaCAConfig"]


@dataclass
class PaCAConfig:
    """What to adapt with PaCA (Partial Connection Adaptation, Woo et al., ICLR 2025, arXiv 2503.01905).

    Each targeted linear layer ``W`` of shape ``(out_features, in_features)`` gets ``r`` fixed input columns
    ``idx`` (randomly chosen by default, see ``init_indices``); only those columns are trained, through ``delta``
    of shape ``(out_features, r)``:
    ``W[:, idx] = W0[:, idx] + (paca_alpha / r) * delta``.

    Args:
        r: number of trained input columns per layer (the "rank"), ``>= 1`` and ``<= in_features`` of every
            targeted layer.
        paca_alpha: scaling numerator; the update is scaled by ``paca_alpha / r`` (as LoRA's ``lora_alpha``).
            Must be ``> 0``.
        target_modules: which layers to adapt. ``"all-linear"``: every ``nn.Linear`` / transformers ``Conv1D``
            except the output head (``lm_head`` or any layer tied to the input embedding). A list of names:
            a layer matches when its qualified name equals an entry or ends with ``"." + entry``
            (e.g. ``["q_proj", "v_proj"]``). Any other string: a regular expression that must match the whole
            qualified name (peft semantics).
        exclude_modules: layers to leave alone, same matching rules as ``target_modules`` (``None``: none).
        random_seed: seed of the column selection. The indices of a layer are a function of this seed and the
            layer's qualified name only, never of the global RNG, so every process selects the same columns.
        modules_to_save: modules (name or suffix, as ``target_modules`` lists) kept fully trainable and stored
            in the adapter file, e.g. ``["lm_head"]``.
        init_indices: how the ``r`` columns of each layer are chosen (:mod:`paca_hpu.selection`):
            ``"random"`` (default, the paper's choice; from ``random_seed`` and the layer name), ``"weight_norm"``
            (the ``r`` columns of largest L2 norm of the pretrained weight, ``||W0[:, j]||``), or
            ``"activation_norm"`` (the ``r`` input channels of largest L2 norm of the layer's input over a few
            calibration batches; needs ``paca_hpu.calibrate_indices(model, config, batches)`` before
            :func:`paca_hpu.apply_paca`). Ties go to the lower index. The chosen indices are stored in the
            adapter, so loading needs no calibration.

    Raises:
        ValueError: a field has an invalid value; the message names the field and the fix.
    """

    # each field's "help" is what the training script's --help shows for it (transformers' HfArgumentParser
    # convention, as peft's configs); paca_hpu.recipe.arguments names the flags and adds the script's defaults
    r: int = field(default=8, metadata={"help": "PaCA: trained input columns per layer (>= 1, <= in_features of "
                                                "every targeted layer)."})
    paca_alpha: float = field(default=16, metadata={"help": "Scaling numerator (> 0): the update is scaled by "
                                                            "alpha / r."})
    target_modules: Union[str, List[str]] = field(
        default="all-linear",
        metadata={"help": "'all-linear' (every linear layer but the output head), module names / suffixes (q_proj "
                          "v_proj ...), or one regular expression matching whole qualified names."})
    exclude_modules: Optional[Union[str, List[str]]] = field(
        default=None, metadata={"help": "Modules to leave alone (names, suffixes or one regular expression)."})
    random_seed: int = field(default=0, metadata={"help": "PaCA: seed of the column selection (init_indices "
                                                          "random; with the layer name, never the global RNG)."})
    modules_to_save: Optional[List[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. lm_head)."})
    init_indices: str = field(
        default="random",
        metadata={"help": "PaCA: how each layer's r columns are chosen: random (default; seed and layer name), "
                          "weight_norm (largest L2 norm of the pretrained weight's columns) or activation_norm "
                          "(largest input-activation L2 norm per input channel over a few calibration batches; its "
                          "columns meet the largest inputs, so tune its learning rate, likely lower). The indices "
                          "are saved with the adapter.",
                  "choices": list(INIT_INDICES)})

    def __post_init__(self) -> None:
        check_r(self.r)
        if isinstance(self.paca_alpha, bool) or not isinstance(self.paca_alpha, (int, float)) or not (
            self.paca_alpha > 0
        ) or self.paca_alpha == float("inf"):
            raise ValueError(f"PaCAConfig.paca_alpha must be a finite number > 0, got {self.paca_alpha!r}")
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int):
            raise ValueError(f"PaCAConfig.random_seed must be an integer, got {self.random_seed!r}")
        check_init_indices(self.init_indices)
        self.target_modules = self._check_patterns("target_modules", self.target_modules, allow_none=False)
        self.exclude_modules = self._check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not isinstance(self.modules_to_save, (list, tuple)):
                raise ValueError(f"PaCAConfig.modules_to_save must be a list of module names, e.g. ['lm_head'], "
                                 f"got {self.modules_to_save!r}")
            self.modules_to_save = self._check_patterns("modules_to_save", list(self.modules_to_save), True)

    @staticmethod
    def _check_patterns(name: str, value: Any, allow_none: bool):
        if value is None:
            if allow_none:
                return None
            raise ValueError(f"PaCAConfig.{name} must not be None; use 'all-linear' or a list of module names")
        if isinstance(value, str):
            if not value:
                raise ValueError(f"PaCAConfig.{name} must not be an empty string")
            if value != "all-linear":
                try:
                    re.compile(value)
                except re.error as e:
                    raise ValueError(f"PaCAConfig.{name}={value!r} is not a valid regular expression: {e}") from e
            return value
        if isinstance(value, (list, tuple, set)):
            items = sorted(value) if isinstance(value, set) else list(value)
            if not items:
                raise ValueError(f"PaCAConfig.{name} must not be an empty list")
            for item in items:
                if not isinstance(item, str) or not item:
                    raise ValueError(f"PaCAConfig.{name} entries must be non-empty strings, got {item!r}")
            return items
        raise ValueError(
            f"PaCAConfig.{name} must be 'all-linear', a regular expression string or a list of module names, "
            f"got {type(value).__name__}"
        )

    @property
    def scaling(self) -> float:
        """``paca_alpha / r``, the factor applied to ``delta``."""
        return float(self.paca_alpha) / self.r

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict of all fields (lists stay lists)."""
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in dataclasses.fields(self)
                for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PaCAConfig":
        """Build a config from :meth:`to_dict` output (extra keys such as ``format_version`` are ignored).

        Raises:
            ValueError: ``data`` is not a dict, or a field is invalid.
        """
        if not isinstance(data, dict):
            raise ValueError(f"PaCAConfig.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

