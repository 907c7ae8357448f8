"""scripts/run_paca_clm.py end to end on the CPU (in-process via paca_hpu.cli.main, plus real subprocess runs): on the
GaudiTrainer CPU path where optimum-habana is installed (the pinned Gaudi stack), on transformers.Trainer where it is
not (the newest stack, transformers 5.x)."""

from helpers import REPO_DIR  # the repository root / tests folder
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import WEIGHT_FILES, StopAt, base_weight_files, write_jsonl

REPO = REPO_DIR
SCRIPT = os.path.join(REPO, "scripts", "run_paca_clm.py")


def _gaudi_stack():
    from paca_hpu._optimum_habana import is_optimum_habana_installed

    return is_optimum_habana_installed()


#: the trainer the script picks on this CPU: GaudiTrainer's CPU path with optimum-habana, else transformers.Trainer
CPU_TRAINER = "GaudiTrainer" if _gaudi_stack() else "transformers.Trainer"


def _argv(tiny, out, *extra):
    return [
        "--model_name_or_path", tiny["model"], "--train_file", tiny["train"],
        "--validation_split_percentage", "25", "--max_seq_len", "64",
        "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--seed", "11",
        "--output_dir", str(out), *extra,
    ]


def _main(argv, callbacks=None):
    from paca_hpu.cli import main

    return main(argv, callbacks=callbacks)


def _losses(out):
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter_model.safetensors"))


def test_paca_run_outputs_and_summary(tiny, tmp_path, capsys):
    out = tmp_path / "paca"
    assert _main(_argv(tiny, out, "--max_steps", "4", "--save_steps", "2", "--verify_adapter", "True")) == 0
    printed = capsys.readouterr().out
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss_curves.png"} <= files
    assert not base_weight_files(out), files  # adapter only
    for ck in ("checkpoint-2", "checkpoint-4"):
        ck_files = set(os.listdir(out / ck))
        assert "adapter_model.safetensors" in ck_files and not base_weight_files(out / ck)
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= ck_files
    assert open(out / "loss_curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    m = json.load(open(out / "metrics.json"))
    assert m["device"] == "cpu" and m["trainer"] == CPU_TRAINER and m["peft_type"] == "paca"
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["eval_loss_before"] > m["eval_loss_after"] > 0
    # the saved adapter on a freshly loaded base model reproduces the final held-out loss
    assert m["eval_loss_reloaded"] == pytest.approx(m["eval_loss_after"], rel=1e-6, abs=1e-7)
    assert m["train_steps"] == 4 and m["train_tokens_per_second"] > 0 and m["peak_memory_bytes"] > 0
    assert any("eval_loss" in h for h in m["log_history"])
    for needle in ("run_paca_clm summary", "trainable parameters", "held-out loss", "train tokens/s", "peak memory",
                   "cpu", "saved adapter reloaded", "held-out evaluation   : 4 evaluations in",
                   "training              : 4 steps in", "loss on prompt and response"):
        assert needle in printed, needle
    # 18 training / 6 held-out examples, batch 4: evaluated every 2 steps (not every step), plus before training
    # and the reload check; the summary's training time excludes the evaluations and checkpoints
    assert [h["step"] for h in m["log_history"] if "eval_loss" in h] == [2, 4]
    assert m["evaluations"] == 4 and 0 < m["train_seconds"] < m["train_runtime"] < m["total_seconds"]
    assert 0 < m["eval_seconds"] < m["total_seconds"] and m["checkpoint_seconds"] > 0
    assert m["loss_plot_title"] == "model · PaCA (r=8) · 4 steps"
    assert m["train_on_inputs"] is True  # run_lora_clm.py's default for a user's data
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["r"] == 8 and cfg["paca_alpha"] == 16 and cfg["target_modules"] == "all-linear"


def test_resume_through_script_is_exact(tiny, tmp_path, capsys):
    """Interrupted at step 3 + --resume_from_checkpoint == uninterrupted run (losses, deltas, indices, eval loss)."""
    common = ("--max_steps", "6", "--save_steps", "3", "--lr_scheduler_type", "linear", "--eval_strategy", "no")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _main(_argv(tiny, full, *common)) == 0
    assert _main(_argv(tiny, cut, *common), callbacks=[StopAt(3)]) == 0
    assert [s for s, _ in _losses(cut)] == [1, 2, 3]
    capsys.readouterr()
    assert _main(_argv(tiny, cut, *common, "--resume_from_checkpoint", str(cut / "checkpoint-3"))) == 0
    assert _losses(cut) == _losses(full) and len(_losses(full)) == 6
    # the figures of the resumed run are those of the 3 steps it trained: the step count and s/step, and the mean
    # training loss of steps 4-6 (the Trainer logs each step's loss, rounded to 4 decimals)
    m = json.load(open(cut / "metrics.json"))
    assert (m["train_steps"], m["global_step"], m["resumed_from_step"]) == (3, 6, 3)
    assert m["train_loss"] == pytest.approx(sum(loss for _, loss in _losses(full)[3:]) / 3, abs=1e-4)
    assert f"training              : 3 steps (4 to 6, resumed at step 3) in {m['train_seconds']:.1f} s, " \
           f"{m['train_seconds'] / 3:.2f} s/step" in capsys.readouterr().out
    assert m["loss_plot_title"].endswith("· 6 steps")  # the plot shows all 6
    assert json.load(open(full / "metrics.json"))["train_loss"] == pytest.approx(
        sum(loss for _, loss in _losses(full)) / 6, abs=1e-4)
    a, b = _adapter(full), _adapter(cut)
    assert a.keys() == b.keys() and any(k.endswith(".indices") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    ma, mb = json.load(open(full / "metrics.json")), json.load(open(cut / "metrics.json"))
    assert ma["eval_loss_after"] == mb["eval_loss_after"]
    # a run whose PaCA shape differs from the checkpoint's is refused up front, with the flag to fix
    capsys.readouterr()
    assert _main(_argv(tiny, cut, *common, "--paca_r", "4", "--resume_from_checkpoint", str(cut / "checkpoint-3"))) == 2
    assert "--paca_r" in capsys.readouterr().err
    # "--resume_from_checkpoint true" picks the last checkpoint; the run already finished there: nothing to train,
    # refused, and its outputs are left as they were (they used to be rewritten from the checkpoint, metrics.json
    # without the training history)
    before = {f: (cut / f).read_bytes() for f in ("metrics.json", "adapter_model.safetensors", "loss_curves.png")}
    assert _main(_argv(tiny, cut, *common, "--resume_from_checkpoint", "true")) == 2
    assert "already finished at step 6" in capsys.readouterr().err
    assert sorted(d for d in os.listdir(cut) if d.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-6"]
    assert {f: (cut / f).read_bytes() for f in before} == before


def test_max_seq_len_above_the_model_positions_is_lowered_with_a_warning(tiny, tmp_path, capsys):
    """As transformers' run_clm.py does with --block_size: --max_seq_length 512 on a model of 256 positions pads (and
    truncates) to 256, with a warning; it used to pad every batch to 512, past the positions (with 100000 it
    allocated past 8 GB). --max_seq_len 0 is refused."""
    from transformers import TrainerCallback

    class Batches(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            self.shape = tuple(train_dataloader.collate_fn([train_dataloader.dataset[0]])["input_ids"].shape)

    positions = json.load(open(os.path.join(tiny["model"], "config.json")))["max_position_embeddings"]
    assert positions == 256
    seen, out = Batches(), tmp_path / "out"
    argv = _argv(tiny, out, "--max_steps", "1", "--do_eval", "False", "--pad_to_max_length", "true")
    argv[argv.index("--max_seq_len")] = "--max_seq_length"  # run_lora_clm.py's spelling, named as typed
    argv[argv.index("--max_seq_length") + 1] = "512"
    assert _main(argv, callbacks=[seen]) == 0
    assert seen.shape == (1, positions)
    assert json.load(open(out / "metrics.json"))["max_seq_len"] == positions
    assert ("--max_seq_length 512 is larger than the 256 positions of LlamaForCausalLM (config.max_position_embeddings"
            "=256): using --max_seq_length 256") in capsys.readouterr().out
    argv[argv.index("--max_seq_length") + 1] = "0"
    assert _main(argv + ["--overwrite_output_dir"]) == 2
    assert "error: --max_seq_length 0 is not allowed" in capsys.readouterr().err


def test_init_indices_through_the_script(tiny, tmp_path, monkeypatch):
    """--paca_init_indices weight_norm / activation_norm: the saved indices are the top-r column norms of the base
    weights (numpy) / of the inputs seen on the calibration batches (by hand); calibration leaves the training
    data order alone (same step-1 loss, taken before any update, as without calibration)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    import paca_hpu
    from test_selection import _layer_inputs_by_hand, _top_r_reference

    seen = []
    real = paca_hpu.calibrate_indices

    def spy(model, config, batches=None):
        seen.append(list(batches))
        return real(model, config, seen[-1])

    monkeypatch.setattr(paca_hpu, "calibrate_indices", spy)
    runs = {}
    for strategy in ("weight_norm", "activation_norm"):
        out = tmp_path / strategy
        assert _main(_argv(tiny, out, "--max_steps", "2", "--paca_r", "4", "--eval_strategy", "no",
                           "--paca_init_indices", strategy, "--paca_calibration_batches", "2")) == 0
        assert json.load(open(out / "adapter_config.json"))["init_indices"] == strategy
        m = json.load(open(out / "metrics.json"))
        assert m["init_indices"] == strategy and m["calibration_batches"] == (2 if strategy == "activation_norm" else 0)
        runs[strategy] = ({k[: -len(".indices")]: v.tolist() for k, v in _adapter(out).items()
                           if k.endswith(".indices")}, _losses(out))
    assert len(seen) == 1 and len(seen[0]) == 2 and all(b["input_ids"].shape[0] == 4 for b in seen[0])
    base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    names = sorted(runs["weight_norm"][0])
    modules = dict(base.named_modules())
    expected_wn = {n: _top_r_reference(np.linalg.norm(modules[n].weight.detach().double().numpy(), axis=0), 4)
                   for n in names}
    assert runs["weight_norm"][0] == expected_wn
    inputs = _layer_inputs_by_hand(base, names, seen[0])
    expected_an = {n: _top_r_reference(np.sqrt((x ** 2).sum(axis=0)), 4) for n, x in inputs.items()}
    assert runs["activation_norm"][0] == expected_an
    assert runs["weight_norm"][1][0] == runs["activation_norm"][1][0]  # same first batch: order untouched


def test_save_merged_same_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from paca_hpu import load_adapter

    out = tmp_path / "merged_run"
    assert _main(_argv(tiny, out, "--max_steps", "3", "--save_merged", "--paca_r", "4", "--target_modules",
                       "q_proj", "v_proj", "down_proj")) == 0
    paca = load_adapter(AutoModelForCausalLM.from_pretrained(tiny["model"]), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not any("PaCA" in type(m).__name__ for m in merged.modules())
    ids = torch.tensor([[1, 9, 40, 77, 120, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, paca(ids).logits, rtol=0, atol=1e-6)
        base = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
        assert not torch.allclose(base(ids).logits, paca(ids).logits)  # training changed something
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]


def test_gaudi_flags_bf16_and_gradient_checkpointing_on_cpu(tiny, tmp_path, reset_accelerate):
    """A Gaudi command line (run_lora_clm.py style) runs unchanged on CPU: the HPU-only flags are turned off."""
    out = tmp_path / "gaudi_flags"
    argv = _argv(tiny, out, "--max_steps", "3", "--use_habana", "--use_lazy_mode", "--use_hpu_graphs_for_training",
                 "--throughput_warmup_steps", "1", "--bf16", "--gradient_checkpointing", "--lora_rank", "4",
                 "--lora_target_modules", "q_proj", "v_proj")
    assert _main(argv) == 0
    m = json.load(open(out / "metrics.json"))
    assert m["throughput_warmup_steps"] == 1 and m["throughput_measured_steps"] == 2
    assert m["eval_loss_after"] < m["eval_loss_before"]
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.use_cpu and args.gradient_checkpointing
    if _gaudi_stack():  # GaudiTrainingArguments with the HPU-only switches turned off
        assert not args.use_habana and not args.use_lazy_mode and not args.use_hpu_graphs_for_training
        assert args.half_precision_backend == "cpu_amp"
    else:  # transformers.TrainingArguments: the Gaudi flags were accepted and left out
        assert type(args).__name__ == "TrainingArguments" and args.bf16 and not hasattr(args, "use_habana")
    delta = _adapter(out)["model.layers.0.self_attn.q_proj.delta"]
    assert delta.dtype == torch.float32 and delta.abs().sum() > 0


@pytest.mark.parametrize("peft_type", ["lora", "none"])
def test_lora_and_full_through_same_script(tiny, tmp_path, peft_type):
    out = tmp_path / peft_type
    assert _main(_argv(tiny, out, "--peft_type", peft_type, "--max_steps", "2", "--paca_r", "4")) == 0
    files = set(os.listdir(out))
    m = json.load(open(out / "metrics.json"))
    assert m["peft_type"] == peft_type and "loss_curves.png" in files
    if peft_type == "lora":
        assert json.load(open(out / "adapter_config.json"))["peft_type"] == "LORA"
        assert not files & set(WEIGHT_FILES)
        assert m["trainable_params"] < m["total_params"]
    else:
        assert "model.safetensors" in files
        assert m["trainable_params"] == m["total_params"]
        gen = json.load(open(out / "generation_config.json"))
        assert "use_flash_attention" not in gen


def test_diverged_run_stops_with_one_line_and_keeps_the_earlier_adapter(tiny, tmp_path, capsys):
    """A learning rate that makes the loss NaN: exit 2 with one line naming the step and the fix, no NaN adapter
    written over the adapter an earlier run left in the folder (it was saved with exit 0 before)."""
    import math

    out = tmp_path / "run"
    assert _main(_argv(tiny, out, "--max_steps", "1", "--do_eval", "False")) == 0
    good = _adapter(out)
    assert all(torch.isfinite(t).all() for t in good.values())
    capsys.readouterr()
    argv = _argv(tiny, out, "--max_steps", "3", "--do_eval", "False", "--overwrite_output_dir")
    argv[argv.index("--learning_rate") + 1] = "1e30"
    assert _main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error: " in ln]
    assert len(err) == 1 and "training diverged at step" in err[0] and "--learning_rate" in err[0], err
    after = _adapter(out)
    assert after.keys() == good.keys() and all(torch.equal(after[k], good[k]) for k in good)
    for ck in out.glob("checkpoint-*"):  # any checkpoint this run wrote holds finite deltas only
        from safetensors.torch import load_file

        assert all(math.isfinite(float(t.abs().max())) for t in load_file(ck / "adapter_model.safetensors").values())


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_file", "not found"),
        ("bad_columns", "layout"),
        ("no_targets", "no_such_proj"),
        ("empty_file", "empty"),
        ("malformed_json", "is not valid JSON: line 2, column 14: Expecting value"),
        ("output_dir_is_file", "is an existing file"),
        ("max_steps_0", "--max_steps 0 trains nothing"),
        ("negative_lr", "--learning_rate -0.001 is negative"),
        ("resume_missing", "drop --resume_from_checkpoint"),
        ("resume_not_a_checkpoint", "is not a Trainer checkpoint"),
        ("calibration_batches_0", "--paca_calibration_batches must be >= 1"),
        ("bad_flag", None),
        ("bad_init_indices", None),
    ],
)
def test_clean_errors(tiny, tmp_path, capsys, case, expected):
    out = tmp_path / case
    if case == "missing_file":
        argv = _argv(tiny, out, "--max_steps", "1")
        argv[argv.index("--train_file") + 1] = str(tmp_path / "nope.jsonl")
    elif case == "bad_columns":
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": f"x{i}", "bar": "y"} for i in range(8)])
        argv = _argv(tiny, out, "--max_steps", "1")
        argv[argv.index("--train_file") + 1] = bad
    elif case == "no_targets":
        argv = _argv(tiny, out, "--max_steps", "1", "--target_modules", "no_such_proj")
    elif case in ("empty_file", "malformed_json"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("" if case == "empty_file" else '{"question": "1+1?", "answer": "2"}\n{"question": oops\n')
        argv = _argv(tiny, out, "--max_steps", "1")
        argv[argv.index("--train_file") + 1] = str(bad)
    elif case == "output_dir_is_file":
        out.write_text("precious")
        argv = _argv(tiny, out, "--max_steps", "1")
    elif case == "max_steps_0":
        argv = _argv(tiny, out, "--max_steps", "0")
    elif case == "negative_lr":
        argv = _argv(tiny, out, "--max_steps", "1", "--learning_rate=-1e-3")
    elif case == "resume_missing":
        argv = _argv(tiny, out, "--max_steps", "1", "--resume_from_checkpoint", str(tmp_path / "nodir"))
    elif case == "resume_not_a_checkpoint":
        (tmp_path / "somedir").mkdir()
        argv = _argv(tiny, out, "--max_steps", "1", "--resume_from_checkpoint", str(tmp_path / "somedir"))
    elif case == "calibration_batches_0":
        argv = _argv(tiny, out, "--max_steps", "1", "--paca_init_indices", "activation_norm",
                     "--paca_calibration_batches", "0")
    elif case == "bad_init_indices":
        argv = _argv(tiny, out, "--max_steps", "1", "--paca_init_indices", "magnitude")
    else:
        argv = _argv(tiny, out, "--max_steps", "1", "--peft_type", "ia3")
    if case in ("bad_flag", "bad_init_indices"):
        with pytest.raises(SystemExit) as exc:  # argparse: usage + one error line, exit 2
            _main(argv)
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
        return
    assert _main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err
    if case == "output_dir_is_file":
        assert out.read_text() == "precious"  # the user's file is untouched
    else:
        assert not out.exists()  # refused before anything was written


def test_resume_with_another_peft_type_is_a_clean_error(tiny, tmp_path, capsys):
    out = tmp_path / "paca"
    assert _main(_argv(tiny, out, "--max_steps", "2", "--save_steps", "2")) == 0
    capsys.readouterr()
    for peft_type in ("lora", "none"):
        argv = _argv(tiny, tmp_path / peft_type, "--max_steps", "3", "--peft_type", peft_type,
                     "--resume_from_checkpoint", str(out / "checkpoint-2"))
        assert _main(argv) == 2
        err = capsys.readouterr().err
        assert "--peft_type paca" in err and "Traceback" not in err, err[-2000:]


def test_resume_with_another_adapter_shape_or_a_broken_config_is_a_clean_error(tiny, tmp_path, capsys):
    out = tmp_path / "paca"
    assert _main(_argv(tiny, out, "--max_steps", "2", "--save_steps", "2")) == 0
    ck = out / "checkpoint-2"
    capsys.readouterr()
    argv = _argv(tiny, tmp_path / "r4", "--max_steps", "3", "--paca_r", "4", "--resume_from_checkpoint", str(ck))
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert "r=8" in err and "r=4" in err and "--paca_r" in err and "Traceback" not in err, err[-2000:]
    (ck / "adapter_config.json").write_text("{not json")
    argv = _argv(tiny, tmp_path / "broken", "--max_steps", "3", "--resume_from_checkpoint", str(ck))
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and "Traceback" not in err, err[-2000:]
    assert (ck / "adapter_config.json").read_text() == "{not json"  # left as found


def test_resume_at_max_steps_still_writes_the_adapter(tiny, tmp_path):
    """A run stopped after its last checkpoint, before its final save: resuming at --max_steps writes that
    checkpoint's adapter as the run's output."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert _main(_argv(tiny, first, "--max_steps", "2", "--save_steps", "2")) == 0
    assert _main(_argv(tiny, again, "--max_steps", "2", "--resume_from_checkpoint", str(first / "checkpoint-2"))) == 0
    a, b = _adapter(first), _adapter(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("which", ["last", "earlier"])
def test_resume_with_nothing_to_train_leaves_the_outputs_alone(tiny, tmp_path, capsys, which):
    """Newcomer finding: resuming with --max_steps at or below the checkpoint's step exited 0 after rewriting the
    output folder: ``last`` (step 2) with --max_steps 1 replaced metrics.json by one without the training history;
    ``checkpoint-1`` with --max_steps 1 replaced the step-2 final adapter by the step-1 one. Both are refused, exit 2,
    naming the step and --max_steps; every file in the folder is byte-identical afterwards."""
    out = tmp_path / "out"
    assert _main(_argv(tiny, out, "--max_steps", "2", "--save_steps", "1", "--save_total_limit", "3")) == 0
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    capsys.readouterr()
    resume = "last" if which == "last" else str(out / "checkpoint-1")
    assert _main(_argv(tiny, out, "--max_steps", "1", "--resume_from_checkpoint", resume)) == 2
    err = capsys.readouterr().err
    expected = "is at step 2, past --max_steps 1" if which == "last" else "already finished at step 2"
    assert expected in err and "raise --max_steps above 2" in err, err[-2000:]
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert {p: p.read_bytes() for p in files} == before


def _run_subprocess(argv, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


def test_real_subprocess_run(tiny, tmp_path):
    out = tmp_path / "sub"
    proc = _run_subprocess(_argv(tiny, out, "--max_steps", "2", "--save_steps", "1", "--save_total_limit", "1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run_paca_clm summary" in proc.stdout
    assert "%|" in proc.stderr  # the Trainer's tqdm progress bar
    assert {"adapter_model.safetensors", "metrics.json", "loss_curves.png"} <= set(os.listdir(out))
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]


def test_real_subprocess_error_exit_code(tiny, tmp_path):
    argv = _argv(tiny, tmp_path / "e", "--max_steps", "1")
    argv[argv.index("--train_file") + 1] = str(tmp_path / "missing.jsonl")
    proc = _run_subprocess(argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_parse_args_defaults_aliases_and_json(tmp_path):
    from paca_hpu import device as dev
    from paca_hpu.cli import UsageError, parse_args

    m, d, a, t, explicit, _, _, c = parse_args(["--model_name_or_path", "x", "--train_file", "t.jsonl",
                                             "--max_seq_length", "128", "--lora_rank", "4", "--lora_alpha", "32",
                                             "--lora_target_modules", "q_proj", "v_proj", "--output_dir",
                                             str(tmp_path)])
    assert d.max_seq_len == 128 and c.r == 4 and c.paca_alpha == 32 and c.target_modules == ["q_proj", "v_proj"]
    assert {"max_seq_len", "paca_r", "paca_alpha", "target_modules"} <= explicit
    assert a.peft_type == "paca" and t.learning_rate == 2e-4 and t.logging_steps == 1
    # off: False on transformers 4.x, "no" on 5.x (the field became a choice of "no", "all", "non_padding")
    assert t.report_to == [] and t.do_train and t.do_eval and t.include_num_input_tokens_seen in (False, "no")
    assert t.max_steps == -1  # the short CPU default applies only to the embedded default run
    _, _, _, t, *_ = parse_args(["--model_name_or_path", "x", "--peft_type", "none", "--output_dir", str(tmp_path)])
    assert t.learning_rate == 2e-5 and t.eval_strategy == "steps"
    _, _, _, t, *_ = parse_args(["--model_name_or_path", "x", "--do_eval", "False", "--output_dir", str(tmp_path)])
    assert not t.do_eval and t.eval_strategy == "no"
    _, d, _, t, *_ = parse_args(["--output_dir", str(tmp_path)])  # embedded default on CPU: short run
    assert t.max_steps == 40 and d.max_seq_len == 256 and t.per_device_train_batch_size == 4
    _, d, _, t, *_ = parse_args(["--output_dir", str(tmp_path), "--num_train_epochs", "1", "--max_seq_len", "100"])
    assert t.max_steps == -1 and d.max_seq_len == 100
    cfg = tmp_path / "args.json"
    cfg.write_text(json.dumps({"model_name_or_path": "x", "paca_r": 2, "learning_rate": 1e-3,
                               "output_dir": str(tmp_path), "use_lazy_mode": True}))
    _, _, _, t, *_, c = parse_args([str(cfg)])
    assert c.r == 2 and t.learning_rate == 1e-3 and not getattr(t, "use_lazy_mode", False)
    # the CUDA argument set (transformers.TrainingArguments) still accepts a Gaudi command line
    cuda = dev.DeviceInfo("cuda", torch.device("cuda"), name="fake")
    p = parse_args(["--model_name_or_path", "x", "--use_habana", "--use_lazy_mode", "--use_hpu_graphs_for_training",
                    "--throughput_warmup_steps", "3", "--output_dir", str(tmp_path)], cuda)
    assert type(p.training).__name__ == "TrainingArguments" and p.throughput_warmup_steps == 3
    cfg.write_text(json.dumps({"no_such_key": 1}))
    with pytest.raises(UsageError, match="no_such_key"):
        parse_args([str(cfg)])


#: The script's own flags (model, data, method and adapter, the Gaudi flags accepted off Gaudi, the version-dependent
#: training flags; aliases and dash spellings included) as the parser of paca_hpu/cli.py had them before it became
#: the recipe package (taken from build_parser(transformers.TrainingArguments) at f354785).  The training arguments'
#: own flags are compared with HfArgumentParser(args_cls) below, since they depend on the installed transformers.
OLD_SCRIPT_FLAGS = [
    "--allow-unspec-int-on-nn-module", "--allow_unspec_int_on_nn_module", "--attn-implementation",
    "--attn-softmax-bf16", "--attn_implementation", "--attn_softmax_bf16", "--bnb-4bit-compute-dtype",
    "--bnb-4bit-quant-type", "--bnb-4bit-use-double-quant", "--bnb_4bit_compute_dtype", "--bnb_4bit_quant_type",
    "--bnb_4bit_use_double_quant", "--cache-dir", "--cache-size-limit", "--cache_dir", "--cache_size_limit",
    "--chat-prompt", "--chat_prompt", "--compile-from-sec-iteration", "--compile_from_sec_iteration",
    "--context-parallel-size", "--context_parallel_size", "--dataset-concatenation", "--dataset-config-name",
    "--dataset-name", "--dataset-seed", "--dataset_concatenation", "--dataset_config_name", "--dataset_name",
    "--dataset_seed", "--disable-tensor-cache-hpu-graphs", "--disable_tensor_cache_hpu_graphs",
    "--distribution-strategy", "--distribution_strategy", "--exclude-modules", "--exclude_modules",
    "--flash-attention-causal-mask", "--flash-attention-fast-softmax", "--flash-attention-fp8",
    "--flash-attention-recompute", "--flash_attention_causal_mask", "--flash_attention_fast_softmax",
    "--flash_attention_fp8", "--flash_attention_recompute", "--fp8", "--gaudi-config-name", "--gaudi_config_name",
    "--load-in-4bit", "--load_in_4bit", "--lora-dropout", "--lora_alpha", "--lora_dropout", "--lora_rank",
    "--lora_target_modules", "--low-cpu-mem-usage", "--low_cpu_mem_usage", "--max-eval-samples", "--max-hpu-graphs",
    "--max-seq-len", "--max-train-samples", "--max_eval_samples", "--max_hpu_graphs", "--max_seq_len",
    "--max_seq_length", "--max_train_samples", "--minimize-memory", "--minimize_memory", "--model-name-or-path",
    "--model-revision", "--model_name_or_path", "--model_revision", "--modules-to-save", "--modules_to_save",
    "--no-use-cache", "--no-use-fused-rope", "--no-use-lazy-mode", "--no_use_cache", "--no_use_fused_rope",
    "--no_use_lazy_mode", "--overwrite-output-dir", "--overwrite_output_dir", "--paca-alpha",
    "--paca-calibration-batches", "--paca-init-indices", "--paca-r", "--paca_alpha", "--paca_calibration_batches",
    "--paca_init_indices", "--paca_r", "--pad-to-max-length", "--pad_to_max_length", "--peft-type", "--peft_type",
    "--pipelining-fwd-bwd", "--pipelining_fwd_bwd", "--random-seed", "--random_seed", "--save-merged",
    "--save_merged", "--target-modules", "--target_modules", "--throughput-warmup-steps",
    "--throughput_warmup_steps", "--token", "--tokenizer-name", "--tokenizer_name", "--train-file",
    "--train-on-inputs", "--train_file", "--train_on_inputs", "--trust-remote-code", "--trust_remote_code",
    "--use-cache", "--use-fused-rope", "--use-habana", "--use-hpu-graphs", "--use-hpu-graphs-for-inference",
    "--use-hpu-graphs-for-training", "--use-lazy-mode", "--use-regional-compilation", "--use_cache",
    "--use_fused_rope", "--use_habana", "--use_hpu_graphs", "--use_hpu_graphs_for_inference",
    "--use_hpu_graphs_for_training", "--use_lazy_mode", "--use_regional_compilation", "--validation-file",
    "--validation-split-percentage", "--validation_file", "--validation_split_percentage", "--verify-adapter",
    "--verify_adapter", "--warmup-ratio", "--warmup_ratio",
]


def test_help_lists_every_flag_of_the_old_parser_with_its_help():
    """Every flag the script's parser had (OLD_SCRIPT_FLAGS, and every flag of the training-arguments class), on
    both argument sets the script uses, is still accepted and shown by --help with a help text; the adapter flags'
    help is PaCAConfig's own (declared once, in paca_hpu/config.py)."""
    import argparse
    import dataclasses
    import re

    from transformers import HfArgumentParser, TrainingArguments

    from paca_hpu import PaCAConfig, cli
    from paca_hpu.trainer import arguments_class

    for args_cls in {TrainingArguments, arguments_class("cpu")}:
        parser = cli.build_parser(args_cls)
        text = parser.format_help()
        library = [o for a in HfArgumentParser(args_cls)._actions for o in a.option_strings if o.startswith("--")]
        # --no_use_cache came with the script's own use_cache (default True) where TrainingArguments lacks one
        # (transformers 4.x); transformers 5's use_cache defaults to False and has no --no_ form, then as now
        own_cache = any(f.name == "use_cache" for f in dataclasses.fields(args_cls))
        old = [f for f in OLD_SCRIPT_FLAGS if not (own_cache and f in ("--no_use_cache", "--no-use-cache"))]
        for flag in old + library:
            action = parser._option_string_actions.get(flag)
            assert action is not None, (args_cls.__name__, flag)
            assert action.help and action.help != argparse.SUPPRESS, (args_cls.__name__, flag)
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,\]=]|$)", text, flags=re.M), (args_cls.__name__, flag)
        config_help = {f.name: f.metadata["help"] for f in dataclasses.fields(PaCAConfig)}
        for flag, name in (("--paca_r", "r"), ("--lora_alpha", "paca_alpha"), ("--exclude_modules", "exclude_modules"),
                           ("--lora_target_modules", "target_modules"), ("--paca_init_indices", "init_indices")):
            assert parser._option_string_actions[flag].help.startswith(config_help[name]), flag


def test_one_run_builds_its_paca_config_once(tiny, tmp_path, monkeypatch):
    """Issue 21 item 2: the run's PaCAConfig is built once from the flags and passed down (the target check, the
    r-fits check and prepare_model each built their own before: three per run, four when resuming)."""
    from paca_hpu import PaCAConfig

    built = []
    post_init = PaCAConfig.__post_init__
    monkeypatch.setattr(PaCAConfig, "__post_init__", lambda self: (built.append(self), post_init(self))[1])
    out = tmp_path / "out"
    assert _main(_argv(tiny, out, "--max_steps", "1", "--do_eval", "False", "--save_strategy", "no", "--paca_r", "4",
                       "--target_modules", "q_proj", "v_proj")) == 0
    assert len(built) == 1, built
    saved = json.load(open(out / "adapter_config.json"))
    assert (saved["r"], saved["target_modules"]) == (4, ["q_proj", "v_proj"]) == (built[0].r, built[0].target_modules)


def test_prepare_model_takes_a_config_or_its_arguments_not_both():
    """The script hands its one PaCAConfig to prepare_model; an argument given beside it would be ignored silently,
    so it is refused, and the config's own values are the ones applied."""
    from paca_hpu import PaCAConfig, paca_layers
    from paca_hpu.trainer import prepare_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="pass r, random_seed in config"):
        prepare_model(model, "paca", r=4, random_seed=3, config=PaCAConfig(r=2))
    config = PaCAConfig(r=2, paca_alpha=6, target_modules=["2"], random_seed=5)
    prepare_model(model, "paca", config=config)
    (name, layer), = paca_layers(model)
    assert name == "2" and layer.r == 2 and layer.scaling == 3.0 and model.paca_config is config


def test_help_shows_one_default_per_flag_the_script_sets():
    """``--help``: a flag whose default the script changes (SCRIPT_DEFAULTS) names that default only; transformers
    4.55's own help texts also said "Defaults to 'trainer_output' if not provided." (--output_dir) and "Default is
    unlimited checkpoints" (--save_total_limit). Checked for every argument set the script uses."""
    import re

    from transformers import TrainingArguments

    from paca_hpu import cli
    from paca_hpu.trainer import arguments_class

    for args_cls in {TrainingArguments, arguments_class("cpu")}:
        text = cli.build_parser(args_cls).format_help()
        entries = {m.group(1): " ".join(m.group(0).split())
                   for m in re.finditer(r"^  (--\w+).*?(?=^  -|\Z)", text, flags=re.M | re.S)}
        for name, value in cli.SCRIPT_DEFAULTS.items():
            entry = entries[f"--{name}"]
            assert len(re.findall("default", entry, flags=re.I)) == 1, (args_cls.__name__, entry)
            assert f"(default: {value})" in entry, (args_cls.__name__, entry)


def test_only_device_module_imports_habana():
    pkg = os.path.join(REPO, "paca_hpu")
    offenders = []
    for dirpath, _, files in os.walk(pkg):
        for name in files:
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or path == os.path.join(pkg, "device.py"):
                continue
            for line in open(path, encoding="utf-8"):
                s = line.strip()
                if s.startswith(("import habana_frameworks", "from habana_frameworks")):
                    offenders.append(f"{path}: {s}")
    assert not offenders, offenders


def test_loss_plot_has_a_title_and_integer_step_ticks():
    from paca_hpu.cli import loss_figure, plot_title

    title = plot_title({"model": "/data/models/my-llama/", "peft_type": "paca", "r": 8, "train_steps": 4})
    assert title == "my-llama · PaCA (r=8) · 4 steps"
    assert plot_title({"model": "embedded:SmolLM2-135M-Instruct", "peft_type": "none", "train_steps": 40}) == (
        "SmolLM2-135M-Instruct · full fine-tuning · 40 steps")
    history = [{"step": s, "loss": 2.0 - 0.1 * s} for s in (1, 2, 3, 4)] + [{"step": 4, "eval_loss": 1.5}]
    fig = loss_figure(history, 2.1, title)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_title() == title
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["held-out loss"].get_xdata()) == [0, 4]  # before training at step 0, then the evaluation
    assert list(lines["training loss"].get_ydata()) == pytest.approx([1.9, 1.8, 1.7, 1.6])


@pytest.mark.parametrize("total, n_eval, per_step, expected", [
    (40, 32, 4, 11),    # the embedded demo: every 11 steps (3 evaluations during 40 steps, ~25 % of their time)
    (4, 32, 4, 11),     # a 4-step run: none during training (only before and after)
    (1000, 32, 4, 200),  # long runs: at most EVALS_PER_RUN evaluations
    (10, 0, 4, 2),
])
def test_default_eval_steps_keep_evaluation_a_minor_share(total, n_eval, per_step, expected):
    from paca_hpu.cli import EVAL_BUDGET, EVAL_COST, EVALS_PER_RUN, default_eval_steps

    got = default_eval_steps(total, n_eval, per_step)
    assert got == expected
    evals_during = total // got
    assert evals_during <= EVALS_PER_RUN
    # evaluated examples (forward only) cost at most EVAL_BUDGET of the trained ones
    assert evals_during * n_eval * EVAL_COST <= EVAL_BUDGET * total * per_step + 1e-9


@pytest.mark.parametrize("lr", ["nan", "inf"])
def test_non_finite_learning_rate_is_refused_before_training(tiny, tmp_path, capsys, lr):
    """A NaN learning rate crashed inside torch's AdamW with a traceback; an infinite one trained until the loss was
    NaN. Both are refused up front, one line, exit 2, and the output folder stays empty."""
    out = tmp_path / "run"
    argv = _argv(tiny, out, "--max_steps", "1")
    argv[argv.index("--learning_rate") + 1] = lr
    assert _main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error: " in ln]
    assert len(err) == 1 and "--learning_rate" in err[0] and "not a finite number" in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_a_run_that_failed_before_saving_does_not_block_the_next_one_in_its_folder(tiny, tmp_path, capsys):
    """A run that diverged before its first save leaves only its run id (paca_run.json) in a new --output_dir; the
    corrected rerun there was refused as "not empty". It now runs; a folder with anything else in it still is refused."""
    out = tmp_path / "run"
    argv = _argv(tiny, out, "--max_steps", "3", "--do_eval", "False")
    argv[argv.index("--learning_rate") + 1] = "1e30"
    assert _main(argv) == 2
    assert sorted(p.name for p in out.iterdir()) == ["paca_run.json"]
    assert _main(_argv(tiny, out, "--max_steps", "1", "--do_eval", "False")) == 0
    assert (out / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert _main(_argv(tiny, out, "--max_steps", "1", "--do_eval", "False")) == 2
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                                    "adapter_model.safetensors", "adapter_model.safetensors:deleted"])
def test_resume_from_a_checkpoint_with_a_damaged_trainer_file_is_one_line(tiny, tmp_path, capsys, damage):
    """A garbled optimizer / scheduler / RNG state or trainer_state.json in the checkpoint resumed gave a traceback
    from inside the Trainer (IndexError, UnpicklingError advising weights_only=False, JSONDecodeError). Now: one line
    naming the file and the fix, exit 2, before anything is trained or written; the checkpoint is left as it was.
    Newcomer finding: a damaged or missing adapter file gave the fix for a save_adapter folder ("save the adapter
    again") and did not name the intact checkpoint beside it; the fix now names it."""
    out = tmp_path / "run"
    assert _main(_argv(tiny, out, "--max_steps", "2", "--save_steps", "1", "--do_eval", "False")) == 0
    ck = out / "checkpoint-2"
    name, _, how = damage.partition(":")
    target = ck / name
    assert target.is_file(), sorted(p.name for p in ck.iterdir())
    data = target.read_bytes()
    if how == "deleted":
        target.unlink()
    else:
        target.write_bytes(b"{\"global_step\": 2,\x01 oops" if name.endswith(".json") else data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _main(_argv(tiny, out, "--max_steps", "4", "--save_steps", "2", "--do_eval", "False",
                       "--resume_from_checkpoint", str(ck))) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error: " in ln]
    assert len(err) == 1 and name in err[0] and "another complete checkpoint-N (checkpoint-1 there)" in err[0], err
    assert "save the adapter again" not in err[0] and "save_adapter" not in err[0], err
    assert {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()} == before
    assert not (out / "checkpoint-4").exists()


def test_help_states_the_defaults_the_script_applies(tmp_path):
    """Newcomer findings: ``--help`` showed transformers' defaults where the script applies its own (--learning_rate
    5e-05 against the 2e-4 used; batch 8 / 512 tokens / max_steps -1 against the embedded CPU run's 4 / 256 / 40), said
    that --overwrite_output_dir "continues training" (here it does not resume), and did not say that
    --resume_from_checkpoint takes 'last'. Each entry now states the defaults applied (read from the tables the parser
    uses) once, on every argument set; 'last' resolves to the newest complete checkpoint."""
    import re

    from transformers import TrainingArguments

    from paca_hpu import cli
    from paca_hpu.recipe.arguments import EMBEDDED_CPU_DEFAULTS
    from paca_hpu.trainer import arguments_class, resolve_checkpoint

    for args_cls in {TrainingArguments, arguments_class("cpu")}:
        text = cli.build_parser(args_cls).format_help()
        entries = {m.group(1): " ".join(m.group(0).split())
                   for m in re.finditer(r"^  (--\w+).*?(?=^  -|\Z)", text, flags=re.M | re.S)}
        lr = entries["--learning_rate"]
        assert len(re.findall("default", lr)) == 1 and "5e-05" not in lr, lr
        for method, value in cli.DEFAULT_LR.items():
            assert re.search(rf"{value:g} for --peft_type [a-z ]*\b{method}\b", lr), (method, lr)
        for flag, value in EMBEDDED_CPU_DEFAULTS.items():
            entry = entries[f"--{flag}"]
            assert len(re.findall(r"\(default:", entry)) == 1 and f"; {value} for the embedded model" in entry, entry
        assert "continue training" not in entries["--overwrite_output_dir"]
        assert "--resume_from_checkpoint last" in entries["--overwrite_output_dir"]
        assert "'last'" in entries["--resume_from_checkpoint"]
    for step in (2, 4):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert resolve_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-4")
