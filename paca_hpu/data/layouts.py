"""Column layouts of a data set: detection (:func:`detect_layout`), one example as chat messages
(:func:`example_to_messages`) and the rows that do not fit their layout (:func:`row_problem`, :func:`check_rows`).

The supported layouts are listed in :mod:`paca_hpu.data`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import datasets

logger = logging.getLogger(__package__)  # "paca_hpu.data": one logger for the whole data pipeline

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

