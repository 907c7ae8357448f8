"""optimum-habana ``run_lora_clm.py`` parity: every command line of its README (tests/run_lora_clm_commands.py, with
the source) parses with ``run_paca_clm.py`` after the script name is replaced and ``--peft_type paca`` added, on
every argument set the script uses (GaudiTrainingArguments on HPU and, with optimum-habana, on CPU;
transformers.TrainingArguments on CUDA and without optimum-habana), and two of them run end to end on a tiny model.
Flags that mean nothing for PaCA (``--lora_dropout``) or off HPU are warned about, never dropped silently.
``--train_on_inputs`` and ``--chat_prompt`` follow run_lora_clm.py's semantics."""

import json
import logging
import os

import pytest
import torch
from run_lora_clm_commands import COMMANDS, DS_CONFIGS, script_argv
from test_trainer import make_tiny_checkpoint, write_jsonl

from paca_hpu import cli
from paca_hpu import device as dev
from paca_hpu._optimum_habana import is_optimum_habana_installed

CPU = dev.DeviceInfo("cpu", torch.device("cpu"))


def _paca_argv(name):
    return script_argv(COMMANDS[name]) + ["--peft_type", "paca"]


def _flag_values(argv, flag):
    """The values following ``--flag`` / ``--flag=v`` in argv (None if absent)."""
    for i, tok in enumerate(argv):
        if tok == flag:
            vals = []
            for t in argv[i + 1:]:
                if t.startswith("--"):
                    break
                vals.append(t)
            return vals
        if tok.startswith(flag + "="):
            return [tok.split("=", 1)[1]]
    return None


def _argument_sets():
    """(label, training-arguments class) of every argument set run_paca_clm.py parses with on some machine."""
    from transformers import TrainingArguments

    from paca_hpu.trainer import arguments_class

    sets = [("cuda / no optimum-habana", TrainingArguments)]
    if is_optimum_habana_installed():
        sets.append(("hpu / cpu with optimum-habana", arguments_class("hpu")))
    return sets


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_readme_command_line_is_accepted(name):
    """Every flag of every README command is one run_paca_clm.py knows, and the LoRA names map onto PaCA's."""
    argv = _paca_argv(name)
    for label, args_cls in _argument_sets():
        namespace, unknown = cli.build_parser(args_cls).parse_known_args(argv)
        assert unknown == [], (label, unknown)
        values = vars(namespace)
        assert values["peft_type"] == "paca"
        rank = _flag_values(argv, "--lora_rank")
        assert values["paca_r"] == (int(rank[0]) if rank else 8), label
        alpha = _flag_values(argv, "--lora_alpha")
        assert values["paca_alpha"] == (float(alpha[0]) if alpha else 16.0), label
        targets = _flag_values(argv, "--lora_target_modules")
        assert values["target_modules"] == (targets or ["all-linear"]), label
        length = _flag_values(argv, "--max_seq_length") or _flag_values(argv, "--max_seq_len")
        assert values["max_seq_len"] == (int(length[0]) if length else 512), label


@pytest.fixture
def in_tmp_with_ds_configs(tmp_path, monkeypatch):
    """cwd = tmp_path holding optimum-habana's DeepSpeed / FSDP config files (the commands name them relative)."""
    monkeypatch.chdir(tmp_path)
    for fname, cfg in DS_CONFIGS.items():
        (tmp_path / fname).write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_readme_command_line_builds_its_arguments_on_this_cpu(name, in_tmp_with_ds_configs, caplog,
                                                                      reset_accelerate):
    """The whole parse (dataclasses built, device adjustments applied) on this CPU; a DeepSpeed command takes the
    transformers.Trainer path (optimum-habana's DeepSpeed needs an HPU) and is refused with a one-line usage error
    where DeepSpeed is not installed."""
    import importlib.util

    argv = [a if not a.startswith(("./", "/tmp/")) else str(in_tmp_with_ds_configs / "out") for a in _paca_argv(name)]
    gaudi = is_optimum_habana_installed()
    deepspeed = _flag_values(argv, "--deepspeed")
    with caplog.at_level(logging.WARNING, logger="paca_hpu"):
        if deepspeed and importlib.util.find_spec("deepspeed") is None:
            with pytest.raises(cli.UsageError, match="DeepSpeed") as err:
                cli.parse_args(argv, CPU)
            assert "\n" not in str(err.value)
            return
        parsed = cli.parse_args(argv, CPU)
    t = parsed.training
    # --deepspeed on a CPU runs transformers.Trainer (GaudiTrainer's DeepSpeed path needs an HPU)
    assert type(t).__name__ == ("GaudiTrainingArguments" if gaudi and not deepspeed else "TrainingArguments")
    assert t.use_cpu and parsed.adapter.peft_type == "paca"
    lr = _flag_values(argv, "--learning_rate")
    assert t.learning_rate == (float(lr[0]) if lr else cli.DEFAULT_LR["paca"])
    ratio = _flag_values(argv, "--warmup_ratio")
    if ratio:  # transformers 4.x: warmup_ratio; 5.x: a fractional warmup_steps; the same number of steps
        assert t.get_warmup_steps(1000) == round(1000 * float(ratio[0]))
    warned = caplog.text
    dropout = _flag_values(argv, "--lora_dropout")
    assert ("--lora_dropout" in warned) == bool(dropout)
    if dropout:
        assert "does not apply to --peft_type paca" in warned
    if _flag_values(argv, "--use_fused_rope") is not None:
        assert "--use_fused_rope" in warned and "does nothing on cpu" in warned
    if type(t).__name__ == "TrainingArguments" and _flag_values(argv, "--fp8") is not None:
        assert "--fp8 has no effect on cpu" in warned


def test_lora_only_and_paca_only_flags_are_warned_about(tmp_path, caplog):
    base = ["--model_name_or_path", "x", "--train_file", "t.jsonl", "--output_dir", str(tmp_path)]
    with caplog.at_level(logging.WARNING, logger="paca_hpu"):
        cli.parse_args(base + ["--lora_dropout", "0.1"], CPU)
        assert "--lora_dropout 0.1 does not apply to --peft_type paca" in caplog.text
        caplog.clear()
        cli.parse_args(base + ["--peft_type", "lora", "--random_seed", "3", "--lora_dropout", "0.1"], CPU)
        assert "--random_seed 3 does not apply to --peft_type lora" in caplog.text
        assert "--lora_dropout" not in caplog.text
        caplog.clear()
        cli.parse_args(base + ["--peft_type", "none", "--paca_r", "4"], CPU)
        assert "--paca_r 4 does not apply to --peft_type none" in caplog.text
        caplog.clear()
        cli.parse_args(base, CPU)
        assert "does not apply" not in caplog.text


@pytest.mark.parametrize("ratio", ["1.5", "-0.1"])
def test_warmup_ratio_out_of_range_is_a_usage_error(tmp_path, ratio):
    with pytest.raises(cli.UsageError, match="warmup_ratio"):
        cli.parse_args(["--model_name_or_path", "x", "--output_dir", str(tmp_path), "--warmup_ratio", ratio], CPU)


# ----------------------------------------------------------------------------- data semantics


def _alpaca_rows(n):
    return [{"instruction": f"Add {i % 7 + 1} and {i % 5 + 2}.", "input": "" if i % 2 else f"context {i}",
             "output": f"{i % 7 + 1} plus {i % 5 + 2} is {i % 7 + i % 5 + 3}."} for i in range(n)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("parity_model"))


def test_train_on_inputs_puts_the_loss_on_the_prompt_too(tiny_model):
    """run_lora_clm.py's default: labels == input_ids over prompt and response; False: the response only."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from paca_hpu import data as D

    tok = AutoTokenizer.from_pretrained(tiny_model)
    raw = DatasetDict({"train": Dataset.from_list(_alpaca_rows(4))})
    both = D.tokenize_datasets(raw, tok, 128, train_on_inputs=True)["train"]
    answer_only = D.tokenize_datasets(raw, tok, 128)["train"]
    for ex_all, ex_ans, row in zip(both, answer_only, _alpaca_rows(4)):
        assert ex_all["input_ids"] == ex_ans["input_ids"]
        assert ex_all["labels"] == ex_all["input_ids"]
        trained = [t for t, lab in zip(ex_ans["input_ids"], ex_ans["labels"]) if lab != D.IGNORE_INDEX]
        assert tok.decode(trained).startswith(row["output"])
        assert sum(lab != D.IGNORE_INDEX for lab in ex_ans["labels"]) < len(ex_ans["labels"]) / 2


def test_chat_prompt_asks_as_run_lora_clm_does(tiny_model):
    """--chat_prompt: the user turn is run_lora_clm.py's create_chat_prompts text, rendered with the chat template."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from paca_hpu import data as D

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = _alpaca_rows(2)
    ex = D.tokenize_datasets(DatasetDict({"train": Dataset.from_list(rows)}), tok, 256, chat_prompt=True)["train"]
    for row, got in zip(rows, ex):
        # optimum-habana run_lora_clm.py create_chat_prompts (same commit as the README commands)
        source = ("Answer the below Query based on the Content given below. #### Query: {instruction} "
                  "#### Content: {input}").format_map(row)
        prompt = tok.apply_chat_template([{"role": "user", "content": source}], tokenize=False,
                                         add_generation_prompt=True)
        assert tok.decode(got["input_ids"]).startswith(prompt + row["output"])


def test_train_on_inputs_defaults(tmp_path):
    user_data = cli.parse_args(["--model_name_or_path", "x", "--train_file", "t.jsonl", "--output_dir",
                                str(tmp_path)], CPU)
    assert user_data.data.train_on_inputs is True  # run_lora_clm.py's default
    embedded = cli.parse_args(["--output_dir", str(tmp_path)], CPU)
    assert embedded.data.train_on_inputs is False  # the embedded GSM8K demo: loss on the answers
    explicit = cli.parse_args(["--model_name_or_path", "x", "--train_file", "t.jsonl", "--train_on_inputs",
                               "False", "--output_dir", str(tmp_path)], CPU)
    assert explicit.data.train_on_inputs is False


# ----------------------------------------------------------------------------- end to end on a tiny model


def _replace(argv, flag, *values):
    """argv with ``flag``'s values replaced by ``values`` (the flag removed when none; appended when absent)."""
    out, i, found = [], 0, False
    while i < len(argv):
        tok = argv[i]
        if tok == flag or tok.startswith(flag + "="):
            found = True
            i += 1
            if tok == flag:
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            if values:
                out += [flag, *values]
            continue
        out.append(tok)
        i += 1
    return out if found or not values else out + [flag, *values]


@pytest.mark.parametrize("name", ["llama1_7b_single_card", "gemma2_chat_template_2_cards"])
def test_readme_command_runs_as_paca(name, tiny_model, tmp_path, capsys, reset_accelerate):
    """The README command, with the model, data, length and duration swapped for tiny ones, trains PaCA end to end."""
    train = write_jsonl(tmp_path / "alpaca.jsonl", _alpaca_rows(48))
    argv = _paca_argv(name)
    argv = _replace(argv, "--dataset_name")
    for flag, values in {"--model_name_or_path": [tiny_model], "--train_file": [train],
                         "--output_dir": [str(tmp_path / "out")], "--max_seq_length": ["64"],
                         "--max_steps": ["2"], "--validation_split_percentage": ["25"],
                         "--per_device_train_batch_size": ["4"], "--per_device_eval_batch_size": ["4"],
                         "--gaudi_config_name": []}.items():
        argv = _replace(argv, flag, *values)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "does not apply to --peft_type paca" in out  # --lora_dropout 0.05 of the command, warned about
    m = json.load(open(tmp_path / "out" / "metrics.json"))
    assert m["peft_type"] == "paca" and m["train_steps"] == 2 and m["train_on_inputs"] is True
    assert m["eval_loss_after"] < m["eval_loss_before"]
    cfg = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert cfg["format"] == "paca_hpu" and "paca_hpu.from_pretrained" in cfg["peft_type"] and cfg["r"] == 8
    assert cfg["target_modules"] == _flag_values(argv, "--lora_target_modules")
    assert os.path.isfile(tmp_path / "out" / "loss_curves.png")
