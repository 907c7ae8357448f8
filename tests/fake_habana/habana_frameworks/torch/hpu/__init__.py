"""Fake ``habana_frameworks.torch.hpu``: device queries, memory numbers, and HPU graphs.

HPU graphs (``ModuleCacher`` for training, ``wrap_in_hpu_graph`` for inference) capture a module's ops once and
replay them on the SAME device addresses: a parameter or buffer that is later replaced by a new tensor (instead
of being updated in place) would be silently ignored by the replay.  The fake wraps ``forward``; at the first
call per input signature it "captures" (records the storage address of every parameter and buffer), at later
calls it "replays" and records ``hpu_graph_stale_address`` for every parameter / buffer whose storage moved.  The
actual computation runs eagerly on the CPU.
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


def _signature(args, kwargs):
    def sig(v):
        shape = getattr(v, "shape", None)
        return (tuple(shape), str(v.dtype)) if shape is not None else type(v).__name__

    return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))


def _addresses(module):
    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    return {name: t.untyped_storage().data_ptr() for name, t in named.items()}


class _GraphedForward:
    def __init__(self, module, forward, name, max_graphs=None):
        self.module, self.forward, self.name, self.max_graphs = module, forward, name, max_graphs
        self.graphs = {}

    def __call__(self, *args, **kwargs):
        key = _signature(args, kwargs)
        captured = self.graphs.get(key)
        if captured is None:
            self.graphs[key] = _addresses(self.module)
            record("hpu_graph_capture", self.name, len(self.graphs))
        else:
            now = _addresses(self.module)
            for tname, ptr in captured.items():
                if now.get(tname) != ptr:
                    record("hpu_graph_stale_address", self.name, tname)
            record("hpu_graph_replay", self.name)
        return self.forward(*args, **kwargs)


def _wrap(module, name, max_graphs=None):
    graphed = _GraphedForward(module, module.forward, name, max_graphs)
    module.forward = graphed
    module._fake_hpu_graph = graphed
    record("hpu_graph_wrap", name)
    return module


class ModuleCacher:
    """``ht.hpu.ModuleCacher(max_graphs=...)(model=model, inplace=True, ...)``: HPU graphs for training."""

    def __init__(self, max_graphs=10):
        self.max_graphs = max_graphs

    def __call__(self, model, inplace=True, allow_unused_input=False, have_grad_accumulation=False, **kwargs):
        return _wrap(model, type(model).__name__, self.max_graphs)


def wrap_in_hpu_graph(module, asynchronous=False, disable_tensor_cache=False, max_graphs=None, **kwargs):
    """HPU graphs for inference."""
    return _wrap(module, type(module).__name__, max_graphs)
