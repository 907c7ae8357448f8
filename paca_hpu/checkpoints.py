"""Trainer checkpoint folders: written atomically, recognised when incomplete, and tied to the run that wrote them.

Layout inside a Trainer ``output_dir`` (names as ``transformers.Trainer``'s, plus two of this package)::

    checkpoint-N/            a complete checkpoint: it holds trainer_state.json and paca_run.json
    tmp-checkpoint-N/        a checkpoint being written (left behind only when the process was killed mid-save)
    paca_run.json            {"run_id": ...}: the run that last trained into this output_dir

* **Atomic.** :class:`paca_hpu.trainer.PaCATrainerMixin` writes checkpoint ``N`` into ``tmp-checkpoint-N/`` and
  renames it to ``checkpoint-N`` only once every file is written and flushed (:func:`publish`), the scheme
  transformers 4.36 used (PR #27820) and later reverted for multi-node races; here only the saving process renames,
  after a barrier.  ``transformers.trainer_utils.get_last_checkpoint`` matches ``^checkpoint-N$`` only, so a staging
  folder is never taken for a checkpoint.
* **Complete** means: named ``checkpoint-N`` and holding ``trainer_state.json`` (the file the Trainer writes last).
* **Run lineage.** Every checkpoint records the id of the run that wrote it (``paca_run.json``); a resumed run keeps
  the id of the checkpoint it resumed from, a fresh run gets a new one and records it in ``output_dir``.  Checkpoint
  rotation (``save_total_limit``) and ``--resume_from_checkpoint last`` consider only checkpoints of the run named in
  ``output_dir/paca_run.json``, so an earlier run's ``checkpoint-N`` folders in the same directory are neither deleted
  nor resumed by mistake.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import uuid
from typing import Iterable, List, Optional, Tuple, Union

from .atomic import replace_directory, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "RUN_FILE",
    "STAGING_PREFIX",
    "CheckpointWriteError",
    "new_run_id",
    "read_run_id",
    "write_run_id",
    "is_complete",
    "checkpoints_in",
    "staging_dirs_in",
    "rotate",
    "detach_abandoned",
    "last_checkpoint",
    "resolve_checkpoint",
    "staging_dir",
    "publish",
    "is_disk_full",
]

RUN_FILE = "paca_run.json"
STAGING_PREFIX = "tmp-checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_STAGING_RE = re.compile(r"^tmp-checkpoint-(\d+)$")
#: Below this many free bytes a failed write is reported as a full disk (torch.save's RuntimeError has no errno).
_NEARLY_FULL_BYTES = 1 << 20


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed for lack of space; ``str()`` is a one-line message naming the folder."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def new_run_id() -> str:
    """A fresh run id (32 hex digits, ``uuid4``)."""
    return uuid.uuid4().hex


def read_run_id(folder: Union[str, os.PathLike]) -> Optional[str]:
    """The run id recorded in ``folder/paca_run.json``; None when the file is missing or unreadable."""
    try:
        with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as fh:
            value = json.load(fh).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def write_run_id(folder: Union[str, os.PathLike], run_id: str) -> None:
    """Record ``run_id`` in ``folder/paca_run.json`` (written atomically, :func:`paca_hpu.atomic.write_json_atomic`)."""
    write_json_atomic(os.path.join(folder, RUN_FILE), {"run_id": run_id})


def is_complete(folder: Union[str, os.PathLike]) -> bool:
    """``folder`` is a finished Trainer checkpoint: it holds ``trainer_state.json``."""
    return os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME))


def _numbered(output_dir: str, pattern: "re.Pattern") -> List[Tuple[int, str]]:
    try:
        names = os.listdir(output_dir)
    except OSError:
        return []
    found = []
    for name in names:
        m = pattern.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def checkpoints_in(output_dir: Union[str, os.PathLike], run_id: Optional[str] = None) -> List[Tuple[int, str]]:
    """``[(step, path), ...]`` of the ``checkpoint-N`` folders in ``output_dir``, oldest step first; with ``run_id``
    only those written by that run.  Staging (``tmp-checkpoint-N``) folders are never included."""
    found = _numbered(os.fspath(output_dir), _CHECKPOINT_RE)
    if run_id is None:
        return found
    return [(step, path) for step, path in found if read_run_id(path) == run_id]


def staging_dirs_in(output_dir: Union[str, os.PathLike]) -> List[Tuple[int, str]]:
    """``[(step, path), ...]`` of the ``tmp-checkpoint-N`` staging folders in ``output_dir`` (saves in progress, or
    left behind by a process killed mid-save)."""
    return _numbered(os.fspath(output_dir), _STAGING_RE)


def rotate(output_dir: Union[str, os.PathLike], run_id: Optional[str], save_total_limit: Optional[int],
           best_model_checkpoint: Optional[str] = None) -> List[str]:
    """Delete the oldest checkpoints of run ``run_id`` in ``output_dir`` beyond ``save_total_limit``; returns the
    deleted paths.

    Same policy as transformers' ``save_total_limit`` (the newest checkpoint and ``best_model_checkpoint`` are always
    kept, so the limit is at least their number), but only this run's complete checkpoints count: an earlier run's
    ``checkpoint-N`` in the same directory (another run id, or none) is never deleted.
    """
    if not save_total_limit or save_total_limit <= 0 or run_id is None:
        return []
    mine = [path for _, path in checkpoints_in(output_dir, run_id) if is_complete(path)]
    protected = {os.path.abspath(mine[-1])} if mine else set()
    if best_model_checkpoint:
        protected.add(os.path.abspath(best_model_checkpoint))
    keep = max(save_total_limit, len(protected))
    deleted = []
    for path in mine:
        if len(mine) - len(deleted) <= keep:
            break
        if os.path.abspath(path) not in protected:
            logger.info("Deleting older checkpoint [%s] due to save_total_limit", path)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def detach_abandoned(output_dir: Union[str, os.PathLike], run_id: Optional[str], resumed: str) -> List[str]:
    """A run that resumes ``resumed`` (a ``checkpoint-N`` of run ``run_id``) abandons that run's later checkpoints in
    ``output_dir`` (steps above N, trained past the point it goes back to): each gets a run id of its own, so that
    from now on it is an earlier run's checkpoint there, kept, never rotated and never picked by
    :func:`last_checkpoint` (which would otherwise resume the abandoned branch, silently). Returns their paths.
    """
    m = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(os.fspath(resumed))))
    if run_id is None or m is None:
        return []
    step = int(m.group(1))
    later = [path for n, path in checkpoints_in(output_dir, run_id) if n > step]
    for path in later:
        write_run_id(path, new_run_id())
    return later


def _warn_incomplete(paths: Iterable[str]) -> None:
    for path in paths:
        logger.warning("skipping incomplete checkpoint '%s' (a save was interrupted: no %s); resuming from the last "
                       "complete one", path, TRAINER_STATE_NAME)


def last_checkpoint(output_dir: Union[str, os.PathLike]) -> Optional[str]:
    """The newest complete checkpoint of the run that last trained into ``output_dir``; None if there is none.

    The run is the one named in ``output_dir/paca_run.json``; without that file (a directory written by another
    tool or an older paca_hpu) every complete ``checkpoint-N`` counts.  Incomplete checkpoints newer than the one
    returned (``tmp-checkpoint-N`` folders, ``checkpoint-N`` without ``trainer_state.json``) are skipped with a
    warning that names them.
    """
    output_dir = os.fspath(output_dir)
    run_id = read_run_id(output_dir)
    chosen, chosen_step, skipped = None, -1, []
    for step, path in reversed(_numbered(output_dir, _CHECKPOINT_RE)):
        if not is_complete(path):
            skipped.append((step, path))
            continue
        if run_id is not None and read_run_id(path) != run_id:
            continue  # an earlier run's checkpoint in the same directory
        chosen, chosen_step = path, step
        break
    skipped += staging_dirs_in(output_dir)
    _warn_incomplete(path for step, path in sorted(skipped) if step > chosen_step)
    return chosen


def _resume_fix() -> str:
    return ("pass a checkpoint-N folder of an earlier run's --output_dir, 'last' for the newest one in --output_dir, "
            "or drop --resume_from_checkpoint")


def resolve_checkpoint(resume_from_checkpoint: Union[str, bool, None], output_dir: str) -> Optional[str]:
    """``True`` / ``"true"`` / ``"last"`` -> :func:`last_checkpoint` of ``output_dir``; a path is checked and kept;
    ``None`` / ``False`` / ``"false"`` / ``"no"`` / ``"none"`` -> None.

    Raises:
        FileNotFoundError: asked for the last checkpoint but the run in ``output_dir`` has no complete one (the
            message names the complete checkpoints of other runs there, if any); the path does not exist; or it is
            no complete Trainer checkpoint (no ``trainer_state.json``, e.g. an interrupted save).
    """
    if resume_from_checkpoint in (None, False, "", "false", "False", "no", "none", "None"):
        return None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "last", "yes"):
        last = last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            others = [p for _, p in checkpoints_in(output_dir) if is_complete(p)] if os.path.isdir(output_dir) else []
            hint = (f"; {os.path.basename(others[-1])} there belongs to an earlier run: pass its path to "
                    "--resume_from_checkpoint to continue that run") if others else \
                "; drop --resume_from_checkpoint to start a new run"
            raise FileNotFoundError(f"no complete checkpoint-N directory of the latest run to resume from in "
                                    f"'{output_dir}'{hint}")
        return last
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory '{path}' not found; {_resume_fix()}")
    if not is_complete(path):
        raise FileNotFoundError(f"'{path}' is not a Trainer checkpoint, or its save was interrupted (no "
                                f"{TRAINER_STATE_NAME}); {_resume_fix()}")
    return path


def staging_dir(final: Union[str, os.PathLike]) -> str:
    """The staging folder ``tmp-checkpoint-N`` next to ``final`` (``.../checkpoint-N``); the Trainer writes the
    checkpoint into ``tmp-checkpoint-N/checkpoint-N`` (see :func:`publish`)."""
    final = os.fspath(final)
    return os.path.join(os.path.dirname(final), "tmp-" + os.path.basename(final))


def publish(staging: str, final: str) -> None:
    """Make the finished checkpoint ``staging/<name of final>`` visible as ``final``: flush every file, rename it,
    then remove the (now empty) ``staging`` folder.

    An existing ``final`` (a run resumed from an earlier step writes the same step again) is first moved into
    ``staging`` and removed with it, so there is never a half-written ``final``; a kill in between leaves ``final``
    missing (resume then takes the checkpoint before it) and ``staging`` behind, which the next save of that step
    clears.
    """
    replace_directory(os.path.join(staging, os.path.basename(final)), final, trash=staging)
    shutil.rmtree(staging, ignore_errors=True)


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def is_disk_full(err: BaseException, path: str) -> bool:
    """Whether the write error ``err`` (or one it was raised from) means the filesystem of ``path`` is full:
    ``ENOSPC`` / ``EDQUOT``, safetensors' "No space left on device", or an error without errno (torch.save's
    ``RuntimeError``) while less than 1 MiB is free there."""
    seen = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    if isinstance(err, (RuntimeError, OSError)):
        free = _free_bytes(path)
        return free is not None and free < _NEARLY_FULL_BYTES
    return False
