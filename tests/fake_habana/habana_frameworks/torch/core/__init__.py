"""Fake ``habana_frameworks.torch.core``: ``mark_step()`` ends a lazy-mode graph on a real Gaudi; here it is
recorded.

Import-order rule: the real plugin reads its Torch-autocast op lists from the files named by
``PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST`` / ``PT_HPU_AUTOCAST_FP32_OPS_LIST`` when it starts, i.e. when this
module is first imported; variables set later change nothing (optimum-habana's ``GaudiConfig`` refuses to declare
them once this module is in ``sys.modules``). The fake reads them at import too, into :data:`AUTOCAST_OP_LISTS`,
and never again.
"""

import os

from ...fake import record


def _read_op_list(variable):
    path = os.environ.get(variable)
    if not path or not os.path.isfile(path):
        return None
    with open(path) as fh:
        return tuple(line.strip() for line in fh if line.strip())


#: The autocast op lists this process runs with: ``{"bf16": ops or None, "fp32": ops or None}``, fixed at import.
AUTOCAST_OP_LISTS = {"bf16": _read_op_list("PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST"),
                     "fp32": _read_op_list("PT_HPU_AUTOCAST_FP32_OPS_LIST")}


def mark_step(device_str="", sync=False):
    record("mark_step")


class step_closure:  # noqa: N801  (the real plugin's name: habana_frameworks.torch.core.step_closure)
    """``htcore.step_closure._mark_step_if_lazy()``, what Habana's fused optimizer and clip-norm call."""

    @staticmethod
    def _mark_step_if_lazy():
        if os.environ.get("PT_HPU_LAZY_MODE", "1") != "0":
            mark_step()
