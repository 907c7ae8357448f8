"""Differences between the transformers versions paca_hpu supports (4.55 on the pinned Gaudi stack, 5.x elsewhere).

Each helper names the version that changed and keeps one code path for both; nothing here patches transformers.
"""

from __future__ import annotations

import importlib.metadata

__all__ = ["transformers_version", "dtype_kwarg"]


def transformers_version() -> tuple:
    """``(major, minor)`` of the installed transformers, read from its metadata (transformers is not imported)."""
    parts = importlib.metadata.version("transformers").split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def dtype_kwarg() -> str:
    """``from_pretrained``'s / a config's dtype keyword: ``dtype`` from transformers 4.56 on (``torch_dtype`` is
    deprecated there and warns in 5.x), ``torch_dtype`` before."""
    return "dtype" if transformers_version() >= (4, 56) else "torch_dtype"
