"""The PaCA layers: one interface (:class:`PaCALayerBase`, in ``base.py``) and its implementations, one file each.

* ``base.py``: :class:`PaCALayerBase` and the math the implementations share (``grad_x``, ``grad_delta``, the merged
  columns, autocast);
* ``dense.py``: :class:`PaCALinear` (a float ``nn.Linear`` / ``Conv1D`` base; the merged weight kept in ``weight``);
* ``partitioned.py``: its path for a weight that a sharding engine owns (DeepSpeed ZeRO-3, FSDP, FSDP2);
* ``quantized4bit.py``: :class:`PaCALinear4bit` (a bitsandbytes 4-bit base, QPaCA), and ``bnb_helpers.py`` its
  bitsandbytes helpers.

``from paca_hpu.layer import PaCALinear, default_index_dtype, ...`` works as it did when this was one module.
"""

from .base import (PaCALayerBase, default_index_dtype, delta_gradient, delta_gradient_in_use, input_gradient,
                   keep_delta_values, merge_columns, refuse_double_backward, set_delta_gradient)
from .dense import PaCADelta, PaCALinear, live_paca_layers
from .dense import _PaCAFunction  # noqa: F401  (imported from here before the layers got their package)
from .partitioned import PartitionableLayer, is_dtensor
from .quantized4bit import PaCALinear4bit

__all__ = ["PaCALayerBase", "PaCALinear", "PaCALinear4bit", "PartitionableLayer", "PaCADelta", "default_index_dtype",
           "live_paca_layers", "delta_gradient", "input_gradient", "merge_columns", "keep_delta_values",
           "refuse_double_backward", "is_dtensor", "set_delta_gradient", "delta_gradient_in_use"]
