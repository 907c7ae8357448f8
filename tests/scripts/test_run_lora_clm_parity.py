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
from helpers import make_tiny_checkpoint, write_jsonl

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
    # each Gaudi-only flag of the command that asks for something (not e.g. --use_lazy_mode False): one warning
    ignored = [m.split()[0] for m in _messages(caplog, "has no effect without Gaudi (HPU), and this run is on cpu")]
    assert len(ignored) == len(set(ignored)), ignored
    for flag in ("use_habana", "use_lazy_mode", "pipelining_fwd_bwd", "fp8", "gaudi_config_name", "attn_implementation",
                 "flash_attention_causal_mask", "context_parallel_size", "attn_softmax_bf16", "use_fused_rope"):
        given = _flag_values(argv, f"--{flag}")
        asks = given is not None and (flag == "use_fused_rope" or given[:1] not in (["False"], ["1"]))
        assert (f"--{flag}" in ignored) == asks, (flag, given, ignored)


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
        # newcomer finding: the column-selection flags were dropped without a word under LoRA and full fine-tuning
        for method in ("lora", "none"):
            cli.parse_args(base + ["--peft_type", method, "--paca_init_indices", "weight_norm",
                                   "--paca_calibration_batches", "4"], CPU)
            assert f"--paca_init_indices weight_norm does not apply to --peft_type {method}" in caplog.text
            assert f"--paca_calibration_batches 4 does not apply to --peft_type {method}" in caplog.text
            caplog.clear()
        cli.parse_args(base + ["--paca_init_indices", "weight_norm"], CPU)
        assert "does not apply" not in caplog.text
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


# ----------------------------------------------------------------------------- Gaudi-only flags off HPU

#: Every Gaudi-only flag of run_lora_clm.py / GaudiTrainingArguments, each with a value that asks for something.
HPU_ONLY_ARGV = {
    "use_habana": [], "use_lazy_mode": [], "use_hpu_graphs_for_training": [], "use_hpu_graphs_for_inference": [],
    "use_hpu_graphs": [], "disable_tensor_cache_hpu_graphs": [], "max_hpu_graphs": ["4"],
    "gaudi_config_name": ["Habana/gpt2"], "pipelining_fwd_bwd": [], "fp8": [], "minimize_memory": [],
    "attn_implementation": ["gaudi_fused_sdpa"], "flash_attention_recompute": ["True"],
    "flash_attention_causal_mask": ["True"], "flash_attention_fast_softmax": ["True"],
    "flash_attention_fp8": ["True"], "context_parallel_size": ["2"],
    "use_fused_rope": ["False"], "attn_softmax_bf16": ["True"],  # model flags
}
#: GaudiTrainer options that work on its CPU path too but that transformers.TrainingArguments lacks.
GAUDI_TRAINER_ARGV = {"distribution_strategy": ["fast_ddp"], "cache_size_limit": ["64"],
                      "use_regional_compilation": [], "compile_from_sec_iteration": [],
                      "allow_unspec_int_on_nn_module": ["True"]}


def _as_argv(flags):
    return [tok for name, vals in flags.items() for tok in (f"--{name}", *vals)]


@pytest.fixture(params=[pytest.param("gaudi", marks=pytest.mark.optimum_habana), "transformers"])
def trainer_path(request, monkeypatch):
    """'gaudi' (GaudiTrainer's CPU path; needs optimum-habana) or 'transformers' (transformers.Trainer: real on the
    newest stack; on the pinned one the script is made to see no optimum-habana, as on a machine without it)."""
    from paca_hpu import _optimum_habana

    if request.param == "transformers":
        monkeypatch.setattr(_optimum_habana, "is_optimum_habana_installed", lambda: False)
    return request.param


def _messages(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_gaudi_only_flags_off_hpu_are_warned_about_once_each_and_turned_off(trainer_path, tmp_path, caplog,
                                                                             monkeypatch, reset_accelerate):
    """Off HPU each Gaudi-only flag given with a value that asks for something gets exactly one warning that names it
    and says it is ignored, and nothing of it reaches the run: on GaudiTrainer's CPU path its field is set to the value
    that asks for nothing (no FP8 / fused-attention variables exported, no sequence parallelism), on
    transformers.Trainer it is dropped, with GaudiTrainer's own options (warned there too)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("FLASH_ATTENTION_RECOMPUTE", "0")
    base = ["--model_name_or_path", "x", "--train_file", "t.jsonl", "--output_dir", str(tmp_path)]
    with caplog.at_level(logging.WARNING, logger="paca_hpu"):
        parsed = cli.parse_args(base + _as_argv(HPU_ONLY_ARGV) + _as_argv(GAUDI_TRAINER_ARGV), CPU)
    ignored = _messages(caplog, "has no effect without Gaudi (HPU), and this run is on cpu: ignored")
    assert sorted(m.split()[0] for m in ignored) == sorted(f"--{name}" for name in HPU_ONLY_ARGV), ignored
    other = _messages(caplog, "is an option of optimum-habana's GaudiTrainer")
    t = parsed.training
    if trainer_path == "gaudi":
        assert type(t).__name__ == "GaudiTrainingArguments" and not t.use_habana and t.use_cpu
        assert not (t.use_lazy_mode or t.pipelining_fwd_bwd or t.fp8 or t.minimize_memory or t.use_hpu_graphs
                    or t.use_hpu_graphs_for_training or t.use_hpu_graphs_for_inference or t.flash_attention_recompute
                    or t.flash_attention_causal_mask or t.flash_attention_fast_softmax or t.flash_attention_fp8)
        assert t.max_hpu_graphs is None and not t.disable_tensor_cache_hpu_graphs
        assert t.gaudi_config_name is None and t.attn_implementation == "eager" and t.context_parallel_size == 1
        assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no" and os.environ["FLASH_ATTENTION_RECOMPUTE"] == "0"
        assert other == []  # these work on GaudiTrainer's CPU path, and are kept
        assert t.distribution_strategy == "fast_ddp" and t.cache_size_limit == 64 and t.use_regional_compilation
    else:
        assert type(t).__name__ == "TrainingArguments"
        assert sorted(m.split()[0] for m in other) == sorted(f"--{name}" for name in GAUDI_TRAINER_ARGV), other
        assert not any(hasattr(t, name) for name in {**HPU_ONLY_ARGV, **GAUDI_TRAINER_ARGV})

    caplog.clear()  # values that ask for nothing (run_lora_clm.py commands say --use_lazy_mode False) are no news
    with caplog.at_level(logging.WARNING, logger="paca_hpu"):
        cli.parse_args(base + ["--use_lazy_mode", "False", "--pipelining_fwd_bwd", "False", "--fp8", "False",
                               "--context_parallel_size", "1", "--distribution_strategy", "ddp"], CPU)
    assert _messages(caplog, "--") == []


def test_every_gaudi_flag_the_script_accepts_off_gaudi_is_accounted_for():
    """HabanaCompatArguments (the Gaudi flags parsed where transformers.TrainingArguments is used) holds exactly the
    HPU-only and GaudiTrainer-only fields the warnings know, plus throughput_warmup_steps (honoured by the summary),
    with GaudiTrainingArguments' defaults."""
    import dataclasses

    from paca_hpu._optimum_habana import GAUDI_TRAINER_FIELDS, HPU_ONLY_FIELDS

    compat = {f.name: f.default for f in dataclasses.fields(cli.HabanaCompatArguments)}
    known = set(HPU_ONLY_FIELDS) | set(GAUDI_TRAINER_FIELDS) | {"throughput_warmup_steps"}
    assert set(compat) == known, set(compat) ^ known
    assert set(HPU_ONLY_ARGV) == set(HPU_ONLY_FIELDS) | set(cli.HPU_ONLY_MODEL_FLAGS)
    assert set(GAUDI_TRAINER_ARGV) == set(GAUDI_TRAINER_FIELDS)
    if is_optimum_habana_installed():
        from paca_hpu.trainer import arguments_class

        gaudi = {f.name: f.default for f in dataclasses.fields(arguments_class("hpu"))}
        assert all(gaudi[name] == default for name, default in compat.items()), compat
        assert set(HPU_ONLY_FIELDS) | set(GAUDI_TRAINER_FIELDS) <= set(gaudi)
        assert all(gaudi[name] == default for name, (default, _) in GAUDI_TRAINER_FIELDS.items())


def test_gaudi_only_flags_change_nothing_in_a_run(trainer_path, tiny_model, tmp_path, capsys, reset_accelerate):
    """The same tiny run with and without every Gaudi-only flag: the same losses and the same adapter, bit for bit."""
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "alpaca.jsonl", _alpaca_rows(24))
    base = ["--model_name_or_path", tiny_model, "--train_file", train, "--max_seq_len", "64", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--validation_split_percentage", "25", "--learning_rate", "5e-3",
            "--save_strategy", "no", "--seed", "7"]
    runs = {}
    for label, extra in (("plain", []), ("gaudi_flags", _as_argv(HPU_ONLY_ARGV))):
        out = tmp_path / label
        assert cli.main(base + ["--output_dir", str(out)] + extra) == 0
        m = json.load(open(out / "metrics.json"))
        runs[label] = (m["eval_loss_before"], m["eval_loss_after"], load_file(str(out / "adapter_model.safetensors")))
    assert "--fp8 has no effect without Gaudi (HPU)" in capsys.readouterr().out
    (before_a, after_a, adapter_a), (before_b, after_b, adapter_b) = runs["plain"], runs["gaudi_flags"]
    assert (before_a, after_a) == (before_b, after_b) and after_a < before_a
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
