"""paca_hpu.data: loading, fixed split, layouts, response-only labels, packing, collation.

Most tests use a tiny byte-level BPE tokenizer trained here in milliseconds (with SmolLM2's special tokens and
ChatML template); the ones marked `embedded_model` use the real converted SmolLM2 tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import random

import datasets
import numpy as np
import pytest
import torch

from paca_hpu import data as D
from paca_hpu.embedded import SMOLLM2_CHAT_TEMPLATE

CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


# ----------------------------------------------------------------------------------------------------- fixtures


def _train_tiny_tokenizer(chat_template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [
        "Janet has 3 apples and buys 4 more. How many apples does she have?",
        "She has 3 + 4 = 7 apples.\n#### 7",
        "The quick brown fox jumps over the lazy dog. user assistant system",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    ] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tiny_tok():
    """Tiny byte-level BPE with SmolLM2's special tokens (ids 0, 1, 2) and SmolLM2's ChatML template."""
    tok = _train_tiny_tokenizer(SMOLLM2_CHAT_TEMPLATE)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    return tok


@pytest.fixture(scope="module")
def tiny_tok_no_template():
    return _train_tiny_tokenizer(None)


def _dd(train_rows, validation_rows=None):
    d = {"train": datasets.Dataset.from_list(train_rows)}
    if validation_rows is not None:
        d["validation"] = datasets.Dataset.from_list(validation_rows)
    return datasets.DatasetDict(d)


def _trained_ids(example):
    return [i for i, lab in zip(example["input_ids"], example["labels"]) if lab != D.IGNORE_INDEX]


def _check_trained_is_suffix(example):
    """labels equal input_ids where trained, and every trained run is contiguous up to the first -100 after it."""
    for i, lab in zip(example["input_ids"], example["labels"]):
        assert lab == D.IGNORE_INDEX or lab == i


# ------------------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize(
    "cols, expected",
    [
        (["messages"], "messages"),
        (["question", "answer"], "question/answer"),
        (["instruction", "input", "output"], "instruction/input/output"),
        (["instruction", "output"], "instruction/input/output"),
        (["instruction", "input", "output", "text"], "instruction/input/output"),  # tatsu-lab/alpaca has "text" too
        (["prompt", "completion"], "prompt/completion"),
        (["prompt", "response", "id"], "prompt/response"),
        (["text"], "text"),
        (["id", "text", "meta"], "text"),
    ],
)
def test_detect_layout(cols, expected):
    assert D.detect_layout(cols) == expected


def test_detect_layout_unknown_lists_columns_and_fix():
    with pytest.raises(ValueError) as exc:
        D.detect_layout(["foo", "bar_col"])
    msg = str(exc.value)
    assert "foo" in msg and "bar_col" in msg
    for layout in D.SUPPORTED_LAYOUTS:
        assert layout in msg
    assert "rename" in msg.lower()


def test_example_to_messages_alpaca_and_conversational():
    m = D.example_to_messages({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "instruction/input/output")
    assert m == [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    m = D.example_to_messages({"instruction": "Say hi.", "input": "", "output": "hi"}, "instruction/input/output")
    assert m[0]["content"] == "Say hi."
    m = D.example_to_messages({"instruction": "Say hi.", "output": "hi"}, "instruction/input/output")
    assert m[0]["content"] == "Say hi."
    conv = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
            "completion": [{"role": "assistant", "content": "A"}]}
    assert [x["role"] for x in D.example_to_messages(conv, "prompt/completion")] == ["system", "user", "assistant"]
    with pytest.raises(ValueError):
        D.example_to_messages({"text": "x"}, "text")


# ------------------------------------------------------------------------------------------------------ loading


def _gsm8k_rows():
    from paca_hpu.embedded import embedded_gsm8k_path

    with open(embedded_gsm8k_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_embedded_gsm8k_fixed_split_independent_of_seed_and_rng():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    a = D.load_raw_datasets(seed=1)
    random.seed(12345)
    np.random.seed(999)
    torch.manual_seed(7)
    b = D.load_raw_datasets(seed=2024)
    assert set(a) == {"train", "validation"}
    assert list(a["train"]["question"]) == list(b["train"]["question"])
    assert list(a["validation"]["question"]) == list(b["validation"]["question"])
    assert (len(a["train"]), len(a["validation"])) == (1199, 120)

    # independent reference: recompute the documented rule from the raw file
    rows = _gsm8k_rows()
    assert len(rows) == 1319
    bucket = lambda q: int.from_bytes(hashlib.sha256(q.encode("utf-8")).digest()[:8], "big") % 100  # noqa: E731
    assert list(a["validation"]["question"]) == [r["question"] for r in rows if bucket(r["question"]) < 10]
    assert list(a["train"]["question"]) == [r["question"] for r in rows if bucket(r["question"]) >= 10]
    first = a["validation"][0]
    assert first["answer"] == next(r["answer"] for r in rows if r["question"] == first["question"])
    assert set(list(a["train"]["question"])).isdisjoint(list(a["validation"]["question"]))


def test_embedded_split_percentage_nested_and_max_samples():
    small = D.load_raw_datasets(validation_split_percentage=5)
    big = D.load_raw_datasets(validation_split_percentage=20)
    assert set(list(small["validation"]["question"])) < set(list(big["validation"]["question"]))
    assert len(small["train"]) + len(small["validation"]) == 1319
    cut = D.load_raw_datasets(max_train_samples=7, max_eval_samples=3)
    full = D.load_raw_datasets()
    assert list(cut["train"]["question"]) == list(full["train"]["question"])[:7]
    assert list(cut["validation"]["question"]) == list(full["validation"]["question"])[:3]


ROWS = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_local_files_by_extension(tmp_path, ext):
    path = tmp_path / f"data.{ext}"
    df_rows = ROWS
    if ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df_rows))
    elif ext == "json":
        path.write_text(json.dumps(df_rows))
    else:
        ds = datasets.Dataset.from_list(df_rows)
        ds.to_csv(str(path), index=False) if ext == "csv" else ds.to_parquet(str(path))
    raw = D.load_raw_datasets(train_file=str(path), validation_split_percentage=25, seed=3)
    assert (len(raw["train"]), len(raw["validation"])) == (30, 10)
    got = sorted(list(raw["train"]["question"]) + list(raw["validation"]["question"]))
    assert got == sorted(r["question"] for r in ROWS)
    again = D.load_raw_datasets(train_file=str(path), validation_split_percentage=25, seed=3)
    assert list(again["validation"]["question"]) == list(raw["validation"]["question"])  # deterministic for a seed
    other = D.load_raw_datasets(train_file=str(path), validation_split_percentage=25, seed=4)
    assert list(other["validation"]["question"]) != list(raw["validation"]["question"])


def test_local_train_and_validation_files(tmp_path):
    tr, va = tmp_path / "tr.jsonl", tmp_path / "va.csv"
    tr.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:30]))
    datasets.Dataset.from_list(ROWS[30:]).to_csv(str(va), index=False)
    raw = D.load_raw_datasets(train_file=tr, validation_file=va, max_eval_samples=4)
    assert list(raw["train"]["question"]) == [r["question"] for r in ROWS[:30]]
    assert list(raw["validation"]["question"]) == [r["question"] for r in ROWS[30:34]]


def test_text_file(tmp_path):
    p = tmp_path / "plays.txt"
    p.write_text("To be, or not to be.\nThat is the question.\n")
    raw = D.load_raw_datasets(train_file=p, validation_split_percentage=0)
    assert list(raw["train"]["text"]) == ["To be, or not to be.", "That is the question."]
    assert len(raw["validation"]) == 0


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match="nope/train.jsonl"):
        D.load_raw_datasets(train_file=str(missing))
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(FileNotFoundError, match="val.jsonl"):
        D.load_raw_datasets(train_file=good, validation_file=tmp_path / "val.jsonl")


def test_unsupported_extension_lists_supported(tmp_path):
    p = tmp_path / "data.xlsx"
    p.write_text("x")
    with pytest.raises(ValueError) as exc:
        D.load_raw_datasets(train_file=p)
    for ext in (".json", ".jsonl", ".csv", ".parquet"):
        assert ext in str(exc.value)


@pytest.mark.parametrize("name, lines, where", [
    # pyarrow reported "in row 2" (0-based, blank lines not counted) for these; the user's editor shows line numbers
    ("rows.jsonl", [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), '{"question": "e?" "answer": "f"}',
                    json.dumps(ROWS[2])], "line 4, column 19: Expecting ',' delimiter"),
    ("rows.jsonl", [json.dumps(ROWS[0]), json.dumps(ROWS[1]), "not json", json.dumps(ROWS[2])],
     "line 3, column 1: Expecting value"),
    ("rows.jsonl", [json.dumps(ROWS[0]), '{"question": "e?", "answer": ', json.dumps(ROWS[1])],
     "line 2, column 30: Expecting value"),
    ("rows.jsonl", [json.dumps(ROWS[0]), json.dumps([ROWS[1]]), json.dumps(ROWS[2])],
     "line 2: a JSON list, not an object"),
    ("rows.json", ["[", "  " + json.dumps(ROWS[0]) + ",", "  " + json.dumps(ROWS[1]), "  " + json.dumps(ROWS[2]), "]"],
     "line 4, column 3: Expecting ',' delimiter"),
])
def test_malformed_json_names_the_line_as_an_editor_counts_it(tmp_path, name, lines, where):
    """The 1-based line (blank lines counted) and column where the file stops being valid JSON; the broken line
    is the one each case builds by hand."""
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as exc:
        D.load_raw_datasets(train_file=p)
    assert f"Data file {str(p)!r} is not valid JSON: {where};" in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_argument_combinations(tmp_path):
    with pytest.raises(ValueError):
        D.load_raw_datasets(validation_file=tmp_path / "v.jsonl")
    with pytest.raises(ValueError):
        D.load_raw_datasets(dataset_name="x", train_file=tmp_path / "t.jsonl")
    with pytest.raises(ValueError):
        D.load_raw_datasets(validation_split_percentage=100)


# ------------------------------------------------------------------------------------------------- tokenisation


def test_question_answer_labels_are_response_plus_im_end(tiny_tok):
    rows = ROWS[:5]
    out = D.tokenize_datasets(_dd(rows), tiny_tok, max_seq_len=512)["train"]
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(out) == 5
    for ex, row in zip(out, rows):
        _check_trained_is_suffix(ex)
        assert ex["attention_mask"] == [1] * len(ex["input_ids"])
        # loss on the response and its closing <|im_end|>, nothing else
        assert tiny_tok.decode(_trained_ids(ex)) == row["answer"] + "<|im_end|>"
        # the whole sequence is the ChatML rendering (with SmolLM2's default system prompt)
        text = tiny_tok.decode(ex["input_ids"])
        assert text == (
            CHATML_SYSTEM + f"<|im_start|>user\n{row['question']}<|im_end|>\n"
            f"<|im_start|>assistant\n{row['answer']}<|im_end|>\n"
        )
        # masked prefix = exactly the inference prompt
        n_prompt = next(k for k, lab in enumerate(ex["labels"]) if lab != D.IGNORE_INDEX)
        prompt_ids = tiny_tok.apply_chat_template(
            [{"role": "user", "content": row["question"]}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
        assert ex["input_ids"][:n_prompt] == prompt_ids
        # trailing "\n" after <|im_end|> is template: masked
        assert ex["labels"][-1] == D.IGNORE_INDEX and ex["labels"][-2] == tiny_tok.eos_token_id == 2


def test_multi_turn_messages_train_every_assistant_turn(tiny_tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Janet has 3 apples."},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "She buys 4 more. How many?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "trailing user turn is dropped"},
    ]
    ex = D.tokenize_datasets(_dd([{"messages": msgs}]), tiny_tok, 512)["train"][0]
    assert tiny_tok.decode(_trained_ids(ex)) == "Ok.<|im_end|>7<|im_end|>"
    text = tiny_tok.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")  # given system prompt replaces default
    assert text.endswith("<|im_start|>assistant\n7<|im_end|>\n")
    # the trained runs are separated by masked template tokens
    runs, prev = 0, False
    for lab in ex["labels"]:
        cur = lab != D.IGNORE_INDEX
        runs += cur and not prev
        prev = cur
    assert runs == 2


def test_conversation_without_assistant_is_dropped(tiny_tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ok."}]}]
    out = D.tokenize_datasets(_dd(rows), tiny_tok, 512)["train"]
    assert len(out) == 1 and tiny_tok.decode(_trained_ids(out[0])) == "Ok.<|im_end|>"


def test_alpaca_and_prompt_response(tiny_tok):
    raw = _dd([{"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"}])
    ex = D.tokenize_datasets(raw, tiny_tok, 512)["train"][0]
    assert "<|im_start|>user\nAdd the numbers.\n\n3 and 4<|im_end|>" in tiny_tok.decode(ex["input_ids"])
    assert tiny_tok.decode(_trained_ids(ex)) == "7<|im_end|>"
    raw = _dd([{"prompt": "How many apples?", "response": "She has 7 apples."}])
    ex = D.tokenize_datasets(raw, tiny_tok, 512)["train"][0]
    assert tiny_tok.decode(_trained_ids(ex)) == "She has 7 apples.<|im_end|>"


def test_text_layout_all_tokens_trained_with_eos(tiny_tok):
    raw = _dd([{"text": "The quick brown fox."}, {"text": "Janet has 3 apples."}])
    out = D.tokenize_datasets(raw, tiny_tok, 512)["train"]
    for ex, t in zip(out, ["The quick brown fox.", "Janet has 3 apples."]):
        assert ex["labels"] == ex["input_ids"]
        assert ex["input_ids"] == tiny_tok(t)["input_ids"] + [tiny_tok.eos_token_id]


def test_truncation_and_dropping_examples_without_loss(tiny_tok):
    long_q = "The quick brown fox jumps over the lazy dog. " * 30
    raw = _dd([{"question": "What is 3 plus 4?", "answer": "7 " * 100}, {"question": long_q, "answer": "7"}])
    out = D.tokenize_datasets(raw, tiny_tok, max_seq_len=64)["train"]
    assert len(out) == 1  # the example whose prompt alone fills max_seq_len has nothing to learn: dropped
    ex = out[0]
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"]) == 64
    full = D.tokenize_datasets(raw, tiny_tok, max_seq_len=100000)["train"][0]
    assert ex["input_ids"] == full["input_ids"][:64] and ex["labels"] == full["labels"][:64]


def test_fallback_format_without_chat_template(tiny_tok_no_template):
    tok = tiny_tok_no_template
    assert not tok.chat_template
    ex = D.tokenize_datasets(_dd([{"question": "What is 3 plus 4?", "answer": "7"}]), tok, 512)["train"][0]
    assert tok.decode(ex["input_ids"]) == "User: What is 3 plus 4?\nAssistant: 7<|im_end|>\n"
    assert tok.decode(_trained_ids(ex)) == "7<|im_end|>"


def test_fallback_format_keeps_default_bos_masked():
    from tokenizers import processors

    tok = _train_tiny_tokenizer(None)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    assert tok("Janet")["input_ids"][0] == 1  # this tokenizer adds a BOS by default, like Llama's
    ex = D.tokenize_datasets(_dd([{"prompt": "Janet has 3 apples.", "completion": "Ok"}]), tok, 512)["train"][0]
    assert ex["input_ids"][0] == 1 and ex["input_ids"].count(1) == 1 and ex["labels"][0] == D.IGNORE_INDEX
    assert tok.decode(ex["input_ids"][1:]) == "User: Janet has 3 apples.\nAssistant: Ok<|im_end|>\n"
    assert tok.decode(_trained_ids(ex)) == "Ok<|im_end|>"


def test_packing_blocks_exact_and_masks_kept(tiny_tok):
    raw = _dd(ROWS[:20], ROWS[20:30])
    plain = D.tokenize_datasets(raw, tiny_tok, 512)
    packed = D.tokenize_datasets(raw, tiny_tok, 32, dataset_concatenation=True)
    for split in ("train", "validation"):
        stream_ids = [t for ex in plain[split] for t in ex["input_ids"]]
        stream_lab = [t for ex in plain[split] for t in ex["labels"]]
        blocks = packed[split]
        assert len(blocks) == len(stream_ids) // 32 > 0
        assert all(len(b["input_ids"]) == len(b["labels"]) == len(b["attention_mask"]) == 32 for b in blocks)
        got_ids = [t for b in blocks for t in b["input_ids"]]
        got_lab = [t for b in blocks for t in b["labels"]]
        assert got_ids == stream_ids[: len(got_ids)]
        assert got_lab == stream_lab[: len(got_lab)]
        assert D.IGNORE_INDEX in got_lab and any(lab != D.IGNORE_INDEX for lab in got_lab)


def test_packing_too_short_raises(tiny_tok):
    with pytest.raises(ValueError, match="no full block"):
        D.tokenize_datasets(_dd(ROWS[:1]), tiny_tok, 4096, dataset_concatenation=True)


def test_unknown_layout_in_tokenize(tiny_tok):
    with pytest.raises(ValueError, match="columns found"):
        D.tokenize_datasets(_dd([{"foo": "x", "bar": "y"}]), tiny_tok, 64)


# ---------------------------------------------------------------------------------------------------- collation


def test_collator_dynamic_and_static_padding(tiny_tok):
    feats = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    b = D.make_data_collator(tiny_tok)(feats)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 3) for t in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]

    s = D.make_data_collator(tiny_tok, pad_to_max_length=6)(feats)
    assert all(t.shape == (2, 6) for t in s.values())
    assert s["input_ids"][1].tolist() == [8, 2, 2, 2, 2, 2]
    assert s["labels"][0].tolist() == [-100, 6, 7, -100, -100, -100]
    with pytest.raises(ValueError, match="pad_to_max_length"):
        D.make_data_collator(tiny_tok, pad_to_max_length=2)(feats)


def test_collator_right_pads_even_if_tokenizer_pads_left():
    tok = _train_tiny_tokenizer(None)
    tok.padding_side = "left"
    b = D.make_data_collator(tok)([{"input_ids": [5, 6]}, {"input_ids": [9]}])
    assert b["input_ids"].tolist() == [[5, 6], [9, 2]]
    assert b["labels"].tolist() == [[5, 6], [9, -100]]  # labels default to input_ids


def test_collator_needs_pad_token():
    tok = _train_tiny_tokenizer(None)
    tok.pad_token = None
    with pytest.raises(ValueError, match="pad_token"):
        D.make_data_collator(tok)


def test_collator_works_on_tokenized_dataset_with_model_loss(tiny_tok):
    out = D.tokenize_datasets(_dd(ROWS[:4]), tiny_tok, 512)["train"]
    b = D.make_data_collator(tiny_tok, pad_to_max_length=128)([out[i] for i in range(4)])
    n_trained = sum(sum(lab != -100 for lab in ex["labels"]) for ex in out)
    assert int((b["labels"] != -100).sum()) == n_trained
    assert int(b["attention_mask"].sum()) == sum(len(ex["input_ids"]) for ex in out)


# --------------------------------------------------------------------------------- real SmolLM2 tokenizer (GSM8K)


@pytest.mark.embedded_model
def test_gsm8k_with_real_tokenizer(embedded_tokenizer):
    tok = embedded_tokenizer
    raw = D.load_raw_datasets(max_train_samples=16, max_eval_samples=8)
    out = D.tokenize_datasets(raw, tok, max_seq_len=1024)
    assert (len(out["train"]), len(out["validation"])) == (16, 8)
    for split in ("train", "validation"):
        for ex, row in zip(out[split], raw[split]):
            assert tok.decode(_trained_ids(ex)) == row["answer"] + "<|im_end|>"
            # piecewise tokenisation equals tokenising the whole rendered conversation
            msgs = D.example_to_messages(row, "question/answer")
            assert ex["input_ids"] == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
            assert ex["input_ids"][0] == 1 and ex["input_ids"][-2:] == [2, 198]  # <|im_start|> ... <|im_end|>\n
    packed = D.tokenize_datasets(raw, tok, max_seq_len=256, dataset_concatenation=True)
    assert all(len(x) == 256 for x in list(packed["train"]["input_ids"]))


# ------------------------------------------------------------------ issue 12: rows that do not fit, ShareGPT, UTF-8


def _write_jsonl(path, rows, blank_after=None):
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r))
        if blank_after is not None and i == blank_after:
            lines.append("")  # datasets skips blank lines: the reported line number must not
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rows_of_another_layout_or_empty_are_counted_reported_and_left_out(tmp_path, caplog):
    qa = [{"question": f"What is {i} plus 1?", "answer": f"{i + 1}"} for i in range(6)]
    rows = qa[:2] + [{"prompt": "Say hi.", "completion": "hi"}] + qa[2:] + [{"question": "Empty?", "answer": ""},
                                                                             {"prompt": "Bye?", "completion": "bye"}]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows, blank_after=0)
    with caplog.at_level("WARNING", logger="paca_hpu.data"):
        raw = D.load_raw_datasets(train_file=path, validation_split_percentage=0)
    assert sorted(raw["train"]["question"]) == sorted(r["question"] for r in qa)  # exactly the usable rows
    msgs = [r.getMessage() for r in caplog.records if r.name == "paca_hpu.data"]
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    assert "3 of 9 rows do not fit the detected layout 'question/answer'" in msg, msg
    assert f"first at line 4 of '{path}'" in msg and "Say hi." in msg  # line 4: one blank line before it
    assert "2 null 'question'" in msg and "1 empty 'answer'" in msg
    assert "2 of them fit layout 'prompt/completion' instead" in msg


def test_most_rows_unusable_stops_with_an_error(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": None if i % 3 else "A"} for i in range(20)]
    rows[1]["answer"] = ""
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as exc:
        D.load_raw_datasets(train_file=path)
    msg = str(exc.value)
    assert "13 of 20 rows do not fit the detected layout 'question/answer'" in msg, msg
    assert f"first at line 2 of '{path}'" in msg and "Most rows are unusable" in msg and "\n" not in msg


def test_sharegpt_conversations_train_like_the_same_messages(tiny_tok, tmp_path):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 3 plus 4?"},
            {"from": "gpt", "value": "7"}, {"from": "human", "value": "And 7 plus 1?"}, {"from": "gpt", "value": "8"}]
    path = _write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": conv, "id": "a"}] * 3)
    raw = D.load_raw_datasets(train_file=path, validation_split_percentage=0)
    assert D.detect_layout(raw["train"].column_names) == "conversations"
    got = D.tokenize_datasets(raw, tiny_tok, 512)["train"][0]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in conv]
    want = D.tokenize_datasets(_dd([{"messages": messages}]), tiny_tok, 512)["train"][0]
    assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]
    assert tiny_tok.decode(_trained_ids(got)) == "7<|im_end|>8<|im_end|>"
    # ShareGPT turns under a "messages" column are read the same way
    same = D.tokenize_datasets(_dd([{"messages": conv}]), tiny_tok, 512)["train"][0]
    assert same["input_ids"] == want["input_ids"] and same["labels"] == want["labels"]


def test_unknown_conversation_role_or_keys_say_what_to_change():
    with pytest.raises(ValueError, match=r"unknown ShareGPT role from='bot' \(use one of .*gpt, human"):
        D.example_to_messages({"conversations": [{"from": "bot", "value": "x"}]}, "conversations")
    with pytest.raises(ValueError, match=r"each turn needs 'role' and 'content' \(or ShareGPT's 'from' and 'value'\)"):
        D.example_to_messages({"messages": [{"speaker": "user", "text": "x"}]}, "messages")
    assert D.row_problem({"messages": [{"role": "user", "content": "hi"}]}, "messages") == \
        "no assistant turn with content"


@pytest.mark.parametrize("ext", ["jsonl", "csv", "txt"])
def test_non_utf8_file_names_file_and_byte_offset(tmp_path, ext):
    text = {"jsonl": '{"question": "q", "answer": "a"}\n{"question": "café?", "answer": "oui"}\n',
            "csv": "question,answer\nq,a\ncafé?,oui\n", "txt": "first line\ncafé au lait\n"}[ext]
    data = text.encode("latin-1")
    path = tmp_path / f"latin1.{ext}"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    line = data[:offset].count(b"\n") + 1
    with pytest.raises(ValueError) as exc:
        D.load_raw_datasets(train_file=path)
    assert str(exc.value).startswith(
        f"Data file '{path}' is not UTF-8 text: byte 0xe9 at byte offset {offset} (line {line}) cannot be decoded")
    assert D.utf8_error(path, chunk_bytes=3) == f"byte 0xe9 at byte offset {offset} (line {line})"
    path.write_bytes(text.encode("utf-8"))
    assert D.utf8_error(path) is None
