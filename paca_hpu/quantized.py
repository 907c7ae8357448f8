"""QPaCA's names where they were before the layers got their package: the 4-bit layer and its bitsandbytes helpers
live in :mod:`paca_hpu.layer.quantized4bit`; ``from paca_hpu.quantized import PaCALinear4bit, prevent_cpu_repack``
keeps working."""

from .layer.quantized4bit import (PaCALinear4bit, clear_quantization_markers, is_linear4bit, linear_features,
                                  merged_linear, prevent_cpu_repack, unsupported_reason)

__all__ = ["PaCALinear4bit", "is_linear4bit", "unsupported_reason", "linear_features", "merged_linear",
           "clear_quantization_markers", "prevent_cpu_repack"]
