"""The one place in ``paca_hpu`` that decides which accelerator to run on.

Order of preference: Intel Gaudi (HPU) > CUDA > CPU.

* HPU is used when ``habana_frameworks.torch`` imports *and* reports a device
  (``habana_frameworks.torch.hpu.is_available()``).  The Intel Gaudi software image ships that
  package; it is not on PyPI, so on every other machine the import fails and we fall through.
* Lazy mode on HPU follows the environment variable ``PT_HPU_LAZY_MODE`` (``"1"`` - lazy - is the
  default of the Gaudi image; ``"0"`` selects eager / ``torch.compile`` mode).  It must be set before
  ``habana_frameworks`` is imported, so we only read it.
* ``PACA_DEVICE=hpu|cuda|cpu`` overrides the choice (e.g. to run the CPU path on a GPU machine);
  asking for a device that is not there raises ``RuntimeError``.

Nothing else in the package imports ``habana_frameworks``: other modules call :func:`habana_module`
or the helpers below.  The import is lazy and cached; :func:`refresh` clears the cache so that a
test can install a fake ``habana_frameworks`` (``sys.modules`` / ``sys.path``) and re-detect.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import resource
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DeviceInfo",
    "get_device_info",
    "get_device",
    "device_type",
    "is_hpu_available",
    "is_habana_installed",
    "habana_module",
    "hpu_lazy_mode_env",
    "mark_step",
    "synchronize",
    "manual_seed_all",
    "reset_peak_memory",
    "peak_memory_bytes",
    "peak_memory_kind",
    "memory_stats",
    "refresh",
]

DEVICE_ENV = "PACA_DEVICE"
_DEVICE_TYPES = ("hpu", "cuda", "cpu")


@dataclass(frozen=True)
class DeviceInfo:
    """What :func:`get_device_info` decided.

    Attributes:
        type: ``"hpu"``, ``"cuda"`` or ``"cpu"``.
        device: the ``torch.device`` to put models and batches on.
        lazy_mode: HPU lazy mode (``PT_HPU_LAZY_MODE != "0"``); always ``False`` off HPU.
        name: human-readable device name (e.g. ``"GAUDI2"``, the CUDA device name, ``"2 threads"`` on CPU).
        count: number of visible devices of that type (1 for CPU).
    """

    type: str
    device: torch.device
    lazy_mode: bool = False
    name: str = "cpu"
    count: int = 1

    @property
    def is_hpu(self) -> bool:
        return self.type == "hpu"

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    @property
    def is_cpu(self) -> bool:
        return self.type == "cpu"

    def describe(self) -> str:
        """One line for logs and run summaries, e.g. ``"hpu (GAUDI2 x8, lazy mode)"``."""
        extra = f"{self.name} x{self.count}" if self.count > 1 else self.name
        if self.type == "hpu":
            extra += ", lazy mode" if self.lazy_mode else ", eager/compile mode"
        return f"{self.type} ({extra})"


# --------------------------------------------------------------------------- habana import


@functools.lru_cache(maxsize=None)
def _import_optional(name: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(name)
    except ImportError as err:  # the normal case off Gaudi
        logger.debug("%s is not importable: %s", name, err)
        return None
    except Exception as err:  # a broken Gaudi install must not take the CPU/CUDA paths down
        logger.warning("Importing %s failed (%s: %s); HPU support disabled.", name, type(err).__name__, err)
        return None


def habana_module(name: str = "habana_frameworks.torch") -> Optional[ModuleType]:
    """Import ``name`` (a ``habana_frameworks`` module) once and cache it; ``None`` if unavailable.

    E.g. ``habana_module("habana_frameworks.torch.core")`` or ``habana_module("habana_frameworks.torch.hpu")``.
    """
    if not (name == "habana_frameworks" or name.startswith("habana_frameworks.")):
        raise ValueError(f"habana_module() only imports habana_frameworks modules, got {name!r}")
    if name != "habana_frameworks.torch" and name.startswith("habana_frameworks.torch"):
        # the sub-modules need the plugin's own start-up (device registration) first
        if _import_optional("habana_frameworks.torch") is None:
            return None
    return _import_optional(name)


def is_habana_installed() -> bool:
    """``habana_frameworks.torch`` imports (the Intel Gaudi PyTorch plugin is installed)."""
    return habana_module("habana_frameworks.torch") is not None


@functools.lru_cache(maxsize=None)
def _hpu_count() -> int:
    hthpu = habana_module("habana_frameworks.torch.hpu")
    if hthpu is None:
        return 0
    try:
        if not hthpu.is_available():
            return 0
        count = getattr(hthpu, "device_count", None)
        return int(count()) if callable(count) else 1
    except Exception as err:
        logger.warning("habana_frameworks.torch.hpu query failed (%s); HPU support disabled.", err)
        return 0


def is_hpu_available() -> bool:
    """An HPU is present and usable (``habana_frameworks.torch.hpu.is_available()``)."""
    return _hpu_count() > 0


def hpu_lazy_mode_env() -> bool:
    """HPU lazy mode as set by ``PT_HPU_LAZY_MODE`` (default ``"1"`` in the Gaudi image)."""
    return os.environ.get("PT_HPU_LAZY_MODE", "1").strip() != "0"


# --------------------------------------------------------------------------- device choice


def _hpu_info() -> DeviceInfo:
    hthpu = habana_module("habana_frameworks.torch.hpu")
    name = "hpu"
    try:
        name = str(hthpu.get_device_name())
    except Exception:  # older plugins have no get_device_name
        pass
    return DeviceInfo("hpu", torch.device("hpu"), lazy_mode=hpu_lazy_mode_env(), name=name, count=_hpu_count())


def _cuda_info() -> DeviceInfo:
    return DeviceInfo(
        "cuda", torch.device("cuda"), lazy_mode=False, name=torch.cuda.get_device_name(0), count=torch.cuda.device_count()
    )


def _cpu_info() -> DeviceInfo:
    return DeviceInfo("cpu", torch.device("cpu"), lazy_mode=False, name=f"{torch.get_num_threads()} threads")


@functools.lru_cache(maxsize=None)
def get_device_info() -> DeviceInfo:
    """Decide the device once (cached; see :func:`refresh`)."""
    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced:
        if forced not in _DEVICE_TYPES:
            raise RuntimeError(f"{DEVICE_ENV}={forced!r}: expected one of {', '.join(_DEVICE_TYPES)}")
        if forced == "hpu" and not is_hpu_available():
            raise RuntimeError(f"{DEVICE_ENV}=hpu but no HPU is available (habana_frameworks missing or no device)")
        if forced == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{DEVICE_ENV}=cuda but torch.cuda.is_available() is False")
        info = {"hpu": _hpu_info, "cuda": _cuda_info, "cpu": _cpu_info}[forced]()
    elif is_hpu_available():
        info = _hpu_info()
    elif torch.cuda.is_available():
        info = _cuda_info()
    else:
        info = _cpu_info()
    logger.debug("paca_hpu device: %s", info.describe())
    return info


def get_device() -> torch.device:
    """The ``torch.device`` to train on (``hpu``, ``cuda`` or ``cpu``), from :func:`get_device_info`."""
    return get_device_info().device


def device_type() -> str:
    """``"hpu"``, ``"cuda"`` or ``"cpu"``, from :func:`get_device_info`."""
    return get_device_info().type


def refresh() -> DeviceInfo:
    """Forget every cached import / detection result and detect again.

    Modules that were already imported stay in ``sys.modules``; a test that removes a fake
    ``habana_frameworks`` must also drop its entries from ``sys.modules`` before calling this.
    """
    _import_optional.cache_clear()
    _hpu_count.cache_clear()
    get_device_info.cache_clear()
    return get_device_info()


# --------------------------------------------------------------------------- graph / sync helpers


def mark_step() -> None:
    """End the current lazy-mode graph on HPU (``habana_frameworks.torch.core.mark_step()``); no-op elsewhere."""
    info = get_device_info()
    if info.type == "hpu" and info.lazy_mode:
        habana_module("habana_frameworks.torch.core").mark_step()


def synchronize() -> None:
    """Wait for queued device work (for timing)."""
    info = get_device_info()
    if info.type == "hpu":
        hthpu = habana_module("habana_frameworks.torch.hpu")
        if info.lazy_mode:
            habana_module("habana_frameworks.torch.core").mark_step()
        hthpu.synchronize()
    elif info.type == "cuda":
        torch.cuda.synchronize()


def manual_seed_all(seed: int) -> None:
    """Seed the accelerator RNGs too (``torch.manual_seed`` covers CPU and CUDA)."""
    torch.manual_seed(seed)
    if get_device_info().type == "hpu":
        habana_module("habana_frameworks.torch.hpu.random").manual_seed_all(seed)


# --------------------------------------------------------------------------- memory


def _read_vmhwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _kind(device_type: Optional[str]) -> str:
    return device_type or get_device_info().type


def reset_peak_memory(device_type: Optional[str] = None) -> None:
    """Reset the peak-memory counter: device allocator on HPU/CUDA, peak RSS (VmHWM) on Linux CPU.

    On CPU the reset writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0); where that is not
    allowed the counter keeps the process-lifetime peak (``ru_maxrss``).
    """
    kind = _kind(device_type)
    if kind == "hpu":
        habana_module("habana_frameworks.torch.hpu").reset_peak_memory_stats()
    elif kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError as err:
            logger.debug("cannot reset peak RSS (%s); reporting the process-lifetime peak", err)


def peak_memory_bytes(device_type: Optional[str] = None) -> int:
    """Peak device memory allocated since the last :func:`reset_peak_memory` (peak RSS on CPU).

    ``device_type`` defaults to the detected device; pass ``"cpu"`` for a run kept on the host."""
    kind = _kind(device_type)
    if kind == "hpu":
        return int(habana_module("habana_frameworks.torch.hpu").max_memory_allocated())
    if kind == "cuda":
        return int(torch.cuda.max_memory_allocated())
    hwm = _read_vmhwm_bytes()
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_memory_kind(device_type: Optional[str] = None) -> str:
    """What :func:`peak_memory_bytes` measures on this device, for reports."""
    kind = _kind(device_type)
    return "peak host RSS" if kind == "cpu" else f"peak {kind} memory allocated"


def memory_stats(device_type: Optional[str] = None) -> Dict[str, float]:
    """Memory numbers (GB, 3 decimals) for training logs on any device."""
    gb = lambda b: round(b / 1024**3, 3)  # noqa: E731
    kind = _kind(device_type)
    if kind == "hpu":
        stats = habana_module("habana_frameworks.torch.hpu").memory_stats()
        return {
            "memory_allocated (GB)": gb(stats["InUse"]),
            "max_memory_allocated (GB)": gb(stats["MaxInUse"]),
            "total_memory_available (GB)": gb(stats["Limit"]),
        }
    if kind == "cuda":
        return {
            "memory_allocated (GB)": gb(torch.cuda.memory_allocated()),
            "max_memory_allocated (GB)": gb(torch.cuda.max_memory_allocated()),
        }
    return {"peak_rss (GB)": gb(peak_memory_bytes("cpu"))}
