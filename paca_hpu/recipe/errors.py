"""The training script's usage errors and the one-line report of a disk or permission failure."""

import errno
from typing import Optional

from .. import checkpoints as _ckpt
from ..hub import one_line

class UsageError(Exception):
    """A problem with the user's input; :func:`main` prints it as one line and exits with code 2."""


def environment_error(err: BaseException) -> Optional[str]:
    """One line for a failure of the disk or file permissions (full disk, read-only, no access); None otherwise."""
    if isinstance(err, _ckpt.CheckpointWriteError):
        return str(err)
    where = getattr(err, "filename", None)
    if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(err):
        return f"no space left on {where or 'the output disk'} ({one_line(err)}); free some space or write elsewhere"
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and where:
        return f"cannot access '{where}': {err.strerror}"
    return None
