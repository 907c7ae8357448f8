"""Fake ``habana_frameworks.torch.hpu``: device queries, memory numbers, and HPU graphs.

HPU graphs (``ModuleCacher`` for training, ``wrap_in_hpu_graph`` for inference) capture a module's ops once and
replay them without running the module's Python again, on the same device buffers: see ``graphs.py``.
"""

import os

from ...fake import record
from . import random  # noqa: F401

_PEAK = [0]


def is_available():
    return os.environ.get("FAKE_HPU_AVAILABLE", "1") != "0"


def device_count():
    return int(os.environ.get("FAKE_HPU_COUNT", "8"))


def get_device_name():
    return "GAUDI2"


def current_device():
    return 0


def is_initialized():
    return True


def synchronize():
    record("synchronize")


def enable_dynamic_shape():
    record("enable_dynamic_shape")


def disable_dynamic_shape():
    record("disable_dynamic_shape")


def max_memory_allocated(device=None):
    return _PEAK[0]


def reset_peak_memory_stats(device=None):
    _PEAK[0] = 0


def memory_stats(device=None):
    return {"InUse": 1 << 30, "MaxInUse": 2 << 30, "Limit": 96 << 30}


from .graphs import ModuleCacher, wrap_in_hpu_graph  # noqa: E402,F401  (HPU graphs: see graphs.py)
