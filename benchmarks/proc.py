"""Fresh processes for the benchmark's measurements (timing groups, peak memory, longest-sequence probes).

A measurement that should see what a user's training script sees runs in a process of its own: nothing that the
harness did before (loading and copying models, other variants' steps, a tuned ``malloc``, earlier probes) is left in
its allocator, caches or Python heap. Processes come from a ``multiprocessing`` "forkserver" context with torch /
transformers / peft imported once in the server (a child starts in well under a second; nothing in the server has
touched an accelerator or run a kernel), or "spawn" where there is no forkserver. Each child writes one JSON result
file atomically (:func:`paca_hpu.atomic.write_json_atomic`); :func:`run_fresh` waits for it and returns the parsed
result.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from typing import Callable, Optional, Sequence

__all__ = ["PRELOAD", "run_fresh"]

#: Modules the forkserver imports once, so that every child starts fast. Not ``paca_hpu`` itself: the server
#: resolves imports with its own start-up path, so a preloaded ``paca_hpu`` could be another checkout's (an
#: editable install of the main worktree) than the parent's; each child imports it after taking the parent's
#: ``sys.path``.
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "safetensors"]

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        methods = multiprocessing.get_all_start_methods()
        _CTX = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if _CTX.get_start_method() == "forkserver":
            _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def run_fresh(target: Callable, args: Sequence, out_path: str, name: str,
              allow_failure: bool = False) -> Optional[dict]:
    """Run ``target(*args)`` in a fresh process that writes its JSON result to ``out_path``; return that result.

    Args:
        target: a module-level function (picklable by reference) that ends by writing ``out_path``.
        args: its arguments (picklable).
        out_path: the JSON file the child writes (removed first if it exists).
        name: process name, for error messages.
        allow_failure: return ``None`` instead of raising when the child dies without a result (a longest-sequence
            probe killed by the memory limit, for example).

    Raises:
        RuntimeError: the child exited with an error or without writing ``out_path`` (its traceback is printed
            above by the child), unless ``allow_failure``.
    """
    if os.path.exists(out_path):
        os.remove(out_path)
    proc = _context().Process(target=target, args=tuple(args), name=name)
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not os.path.exists(out_path):
        if allow_failure:
            return None
        raise RuntimeError(f"benchmark subprocess {name} failed (exit code {proc.exitcode}); its traceback is "
                           "printed above")
    with open(out_path, encoding="utf-8") as f:
        return json.load(f)
