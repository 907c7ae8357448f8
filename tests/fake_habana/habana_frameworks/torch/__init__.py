"""Fake ``habana_frameworks.torch``: importing it is what "the Gaudi plugin is installed" means to paca_hpu.

The real plugin registers the ``hpu`` device with torch; this fake does not (tensors stay on the CPU)."""

from . import core, hpu  # noqa: F401  (real plugin exposes both as attributes)

__version__ = "1.24.0+fake"
