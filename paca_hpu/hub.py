"""Where a model comes from: a local checkpoint folder, or a Hugging Face Hub id looked up in the local cache first.

``--model_name_or_path`` (and the benchmark's) accepts a folder holding a transformers ``config.json`` or a Hub id
(``name`` or ``org/name``).  A Hub id whose revision is in the local Hugging Face cache (``HF_HUB_CACHE`` /
``--cache_dir``) is loaded from its cached snapshot folder without any network access (plain
``from_pretrained(id, local_files_only=True)`` is not enough in transformers 4.55: its PEFT-adapter probe still
asks the Hub, retrying for ~25 s without network), and only otherwise from the Hub.  Failures are reported as one line that says which of the three was missing (local folder, cache,
network / access).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

__all__ = ["ModelSourceError", "HUB_ID", "check_model_source", "base_model_source", "cached_snapshot",
           "from_pretrained_cache_first", "one_line", "dtype_kwargs"]

#: A Hugging Face Hub model id: ``name`` or ``org/name`` (a name that is no local path is looked up there).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelSourceError(ValueError):
    """A model is neither a usable local folder nor loadable from the Hub cache / the Hub; ``str()`` is one line."""


def one_line(err: BaseException, limit: Optional[int] = 300) -> str:
    """The first line of ``str(err)`` (its type name when empty), cut to ``limit`` characters (``None``: not cut;
    for paca_hpu's own messages, whose fix comes last). The one helper that turns an exception into a message line."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def check_model_source(name: str) -> Optional[str]:
    """Why ``name`` cannot be a model (one line), or None: a folder must hold a ``config.json`` with a
    ``model_type``; a path that does not exist must look like a Hub id (then ``from_pretrained`` decides)."""
    fix = "pass a transformers checkpoint folder (config.json + weights) or a Hub model id"
    if os.path.isdir(name):
        cfg = os.path.join(name, "config.json")
        if not os.path.isfile(cfg):
            return f"'{name}' is not a model folder (no config.json); {fix}"
        try:
            with open(cfg, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as err:
            return f"cannot read '{cfg}': {one_line(err)}"
        if not isinstance(data, dict) or "model_type" not in data:
            return f"'{cfg}' has no model_type: '{name}' is not a transformers model folder; {fix}"
        return None
    if os.path.exists(name):
        return f"model path '{name}' is a file; pass the checkpoint folder that holds config.json"
    if not HUB_ID.match(name):
        return f"model path '{name}' not found"
    return None


def base_model_source(name: str, recorded_in: Optional[str] = None, fix: str = "", label: str = "base model") -> str:
    """``name`` (a base model path or Hub id, given or recorded in an adapter) ready to load from any working
    directory: a local folder as its absolute path, a Hub id as it is.

    Args:
        name: what was given, or what the adapter records as ``base_model_name_or_path``.
        recorded_in: the adapter directory when ``name`` is its record (named in the error).
        fix: what to pass instead, appended to the error (``"pass --base_model PATH_OR_NAME"``).
        label: what the error calls a given ``name`` (``"--model_name_or_path"``).

    Raises:
        ModelSourceError: ``name`` looks like a local path (it is no Hub id) and no such folder exists, or it is a
            folder that holds no transformers model (:func:`check_model_source`); such a name is never looked up on
            the Hub. One line naming the path, the working directory it was resolved against, and ``fix``.
    """
    problem = check_model_source(name)
    if problem is None:
        return os.path.abspath(name) if os.path.isdir(name) else name
    problem = f"the base model recorded in '{recorded_in}': {problem}" if recorded_in is not None else \
        f"{label}: {problem}"
    if not os.path.isabs(os.path.expanduser(name)):
        problem += f" (relative to the working directory {os.getcwd()})"
    raise ModelSourceError(problem + (f"; {fix}" if fix else ""))


def _hub_error(name: str, err: BaseException, cache_dir: Optional[str]) -> str:
    """One line saying why ``name`` could be loaded neither from the local cache nor from the Hub."""
    from huggingface_hub import constants as hub_constants

    chain, e = [], err
    while e is not None and all(e is not x for x in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    kinds = {type(x).__name__ for x in chain}
    offline = bool(hub_constants.HF_HUB_OFFLINE)
    if offline or "LocalEntryNotFoundError" in kinds or any(isinstance(x, ConnectionError) for x in chain) \
            or any("couldn't connect" in str(x) for x in chain):
        why = "HF_HUB_OFFLINE is set" if offline else "no network"
        return (f"'{name}' is not a local folder, not in the local Hugging Face cache "
                f"({cache_dir or hub_constants.HF_HUB_CACHE}), and the Hub cannot be reached ({why}); download it "
                f"where there is network (huggingface-cli download {name}) or pass a local folder")
    if kinds & {"RepositoryNotFoundError", "GatedRepoError"} or "is not a local folder" in str(err):
        return (f"'{name}' is neither a local folder nor a model on the Hugging Face Hub that this account can "
                "access (private or gated models: pass --token)")
    return f"cannot load '{name}': {one_line(err)}"


def cached_snapshot(name: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> Optional[str]:
    """The folder of Hub id ``name`` at ``revision`` in the local Hugging Face cache (``snapshot_download`` with
    ``local_files_only=True``: no network), or None when that revision is not cached."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, HFValidationError a ValueError
        return None


def _keep_hub_name(obj: Any, name: str) -> Any:
    """Record the Hub id, not the cache folder, as the name of what was loaded (saved adapters record it)."""
    config = getattr(obj, "config", None)
    if config is not None and hasattr(config, "_name_or_path"):
        config._name_or_path = name
    if hasattr(obj, "name_or_path"):
        try:
            obj.name_or_path = name
        except AttributeError:  # a read-only property
            pass
    return obj


def from_pretrained_cache_first(load: Callable[..., Any], name: str, **kwargs) -> Any:
    """``load(name, **kwargs)`` (any ``from_pretrained``): a local folder directly; a Hub id from its folder in the
    local Hugging Face cache when that revision is cached (no network at all), else from the Hub.

    Raises:
        ModelSourceError: the Hub id is not (fully) cached and the Hub cannot be reached, or the repository does
            not exist / is not accessible (one line naming the id and the cache folder).
    """
    if os.path.isdir(name):
        return load(name, **kwargs)
    snapshot = cached_snapshot(name, kwargs.get("revision"), kwargs.get("cache_dir"))
    if snapshot is not None:
        try:
            return _keep_hub_name(load(snapshot, **kwargs), name)
        except OSError as err:  # e.g. only some files of the model were downloaded
            logger.info("'%s' is not completely in the local Hugging Face cache (%s): asking the Hub", name,
                        one_line(err))
    try:
        return load(name, **kwargs)
    except OSError as err:
        raise ModelSourceError(_hub_error(name, err, kwargs.get("cache_dir"))) from err


def dtype_kwargs(dtype) -> dict:
    """The ``from_pretrained`` keyword for a dtype: ``{"dtype": dtype}`` for transformers >= 4.56 (``torch_dtype`` is
    deprecated there), else ``{"torch_dtype": dtype}``; ``{}`` for ``None``."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}
