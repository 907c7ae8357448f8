"""paca_hpu: PaCA (Partial Connection Adaptation, ICLR 2025) fine-tuning, Intel Gaudi (HPU) first.

Importing this package is light: it imports neither optimum-habana nor ``habana_frameworks``; its only side
effect is registering the global optimizer step post-hook that refreshes PaCA's merged weights
(:mod:`paca_hpu.writeback`; done on first :func:`apply_paca`, and here).
"""

from .adapter import load_adapter, save_adapter
from .config import PaCAConfig
from .integration import apply_paca, from_pretrained
from .layer import PaCADelta, PaCALayerBase, PaCALinear, PaCALinear4bit
from .reference import PaCAReferenceModel
from .model import (
    calibrate_indices,
    disable_paca,
    functional_paca,
    find_target_modules,
    merge_paca,
    paca_layers,
    paca_parameters,
    sync_paca,
    trainable_parameters,
    unload_paca,
)
from .selection import INIT_INDICES, select_indices
from .writeback import install_step_hook as _install_step_hook

__version__ = "0.1.0"

__all__ = [
    "PaCAConfig",
    "PaCALayerBase",
    "PaCALinear",
    "PaCALinear4bit",
    "PaCADelta",
    "PaCAReferenceModel",
    "apply_paca",
    "calibrate_indices",
    "sync_paca",
    "disable_paca",
    "functional_paca",
    "merge_paca",
    "unload_paca",
    "save_adapter",
    "load_adapter",
    "from_pretrained",
    "paca_layers",
    "paca_parameters",
    "find_target_modules",
    "trainable_parameters",
    "select_indices",
    "INIT_INDICES",
]

_install_step_hook()
del _install_step_hook
