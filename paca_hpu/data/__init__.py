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

from .chat import FALLBACK_CHAT_TEMPLATE, chat_segments
from .collator import PaddingCollator, make_data_collator
from .layouts import (
    LAYOUT_ALPACA,
    LAYOUT_MESSAGES,
    LAYOUT_PROMPT_COMPLETION,
    LAYOUT_PROMPT_RESPONSE,
    LAYOUT_QUESTION_ANSWER,
    LAYOUT_SHAREGPT,
    LAYOUT_TEXT,
    RUN_LORA_CLM_CHAT_PROMPT,
    SHAREGPT_ROLES,
    SUPPORTED_LAYOUTS,
    check_rows,
    detect_layout,
    example_to_messages,
    row_problem,
)
from .loading import (
    SUPPORTED_EXTENSIONS,
    fixed_split_bucket,
    json_error,
    load_embedded_gsm8k,
    load_raw_datasets,
    utf8_error,
)
from .tokenization import IGNORE_INDEX, pack_dataset, tokenize_datasets

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "LAYOUT_ALPACA",
    "LAYOUT_MESSAGES",
    "LAYOUT_PROMPT_COMPLETION",
    "LAYOUT_PROMPT_RESPONSE",
    "LAYOUT_QUESTION_ANSWER",
    "LAYOUT_SHAREGPT",
    "LAYOUT_TEXT",
    "PaddingCollator",
    "RUN_LORA_CLM_CHAT_PROMPT",
    "SHAREGPT_ROLES",
    "SUPPORTED_EXTENSIONS",
    "SUPPORTED_LAYOUTS",
    "chat_segments",
    "check_rows",
    "detect_layout",
    "example_to_messages",
    "fixed_split_bucket",
    "json_error",
    "load_embedded_gsm8k",
    "load_raw_datasets",
    "make_data_collator",
    "pack_dataset",
    "row_problem",
    "tokenize_datasets",
    "utf8_error",
]
