"""Fake ``habana_frameworks.torch.hpu.random``."""

from ...fake import record


def manual_seed_all(seed):
    record("manual_seed_all", int(seed))
