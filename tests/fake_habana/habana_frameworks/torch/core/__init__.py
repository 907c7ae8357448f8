"""Fake ``habana_frameworks.torch.core``: ``mark_step()`` ends a lazy-mode graph on a real Gaudi; here it is
recorded."""

from ...fake import record


def mark_step(device_str="", sync=False):
    record("mark_step")
