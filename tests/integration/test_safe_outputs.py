"""Nothing lost, nothing silently wrong (issue 12): output directories, atomic checkpoints (a kill mid-save in a
subprocess, a full disk), run lineage in rotation and resume, Hub ids from the local cache, and the one-line errors
of scripts/run_paca_clm.py. Tiny LLaMA on CPU; the CLI runs in-process except where a process must die, where its exit
status is the point (a full disk) or where the environment must differ (HF_HUB_OFFLINE)."""

from helpers import REPO_DIR  # the repository root / tests folder
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import StopAt

REPO = REPO_DIR


def _argv(tiny, out, *extra):
    return ["--model_name_or_path", tiny["model"], "--train_file", tiny["train"], "--validation_split_percentage",
            "25", "--max_seq_len", "64", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--seed",
            "11", "--lr_scheduler_type", "linear", "--output_dir", str(out), *extra]


def _main(argv, callbacks=None):
    from paca_hpu.cli import main

    return main(argv, callbacks=callbacks)


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _losses(out):
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def _checkpoints(out):
    return sorted(d for d in os.listdir(out) if "checkpoint-" in d)


def _one_error_line(err):
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------- output directory


def test_nonempty_output_dir_is_refused_and_left_as_it_was(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(_argv(tiny, out, "--max_steps", "2", "--save_steps", "2")) == 0
    before = {name: (out / name).read_bytes() for name in ("adapter_model.safetensors", "metrics.json",
                                                           "loss_curves.png")}
    capsys.readouterr()
    assert _main(_argv(tiny, out, "--max_steps", "3", "--learning_rate", "1e-2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(out) in line and "--overwrite_output_dir" in line and "--resume_from_checkpoint last" in line
    assert {name: (out / name).read_bytes() for name in before} == before
    assert _checkpoints(out) == ["checkpoint-2"]


def test_overwrite_never_rotates_or_resumes_an_earlier_runs_checkpoints(tiny, tmp_path):
    """An earlier run's checkpoint-6 stays; the new run (interrupted at step 2, save_total_limit 1) keeps its own
    checkpoint; 'last' resumes the new run, whose final adapter equals an uninterrupted run's, not the old one."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert _main(_argv(tiny, out, "--max_steps", "6", "--save_steps", "6", "--seed", "5", "--do_eval", "False")) == 0
    old = _adapter(out / "checkpoint-6")
    new_run = ("--max_steps", "4", "--save_steps", "1", "--save_total_limit", "1", "--do_eval", "False")
    assert _main(_argv(tiny, ref, *new_run)) == 0
    assert _main(_argv(tiny, out, *new_run, "--overwrite_output_dir"), callbacks=[StopAt(2)]) == 0
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-6"]
    assert _same(_adapter(out / "checkpoint-6"), old)  # the earlier run's checkpoint is untouched
    assert _main(_argv(tiny, out, *new_run, "--resume_from_checkpoint", "last")) == 0
    final = _adapter(out)
    assert _same(final, _adapter(ref)) and not _same(final, old)
    assert _losses(out) == _losses(ref)
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-6"] and _same(_adapter(out / "checkpoint-6"), old)


def test_a_run_without_save_merged_removes_an_earlier_merged_model(tiny, tmp_path, caplog):
    """Newcomer finding: after --save_merged at step 2, a resume to step 4 without --save_merged left merged/ of
    step 2 beside the step-4 adapter, silently. It is removed with a warning."""
    out = tmp_path / "out"
    assert _main(_argv(tiny, out, "--max_steps", "2", "--save_steps", "2", "--save_merged")) == 0
    assert (out / "merged" / "config.json").is_file()
    with caplog.at_level("WARNING"):
        assert _main(_argv(tiny, out, "--max_steps", "4", "--resume_from_checkpoint", "last")) == 0
    assert not (out / "merged").exists()
    assert any("merged" in r.getMessage() and "does not match" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("where", ["same", "parent"])
def test_output_dir_that_is_or_holds_the_model_folder_is_refused(tiny, tmp_path, capsys, where):
    """Newcomer finding: ``--output_dir`` equal to the model folder, with ``--overwrite_output_dir``, wrote an
    adapter_config.json into the base model (no longer loadable), or with ``--peft_type none`` its weights over the
    base. Refused before anything is written; the model folder is byte-identical afterwards."""
    model = tmp_path / "models" / "base"
    shutil.copytree(tiny["model"], model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = model if where == "same" else model.parent
    argv = _argv(dict(tiny, model=str(model)), out, "--max_steps", "1", "--overwrite_output_dir")
    for extra in ([], ["--peft_type", "none"]):
        assert _main(argv + extra) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "--output_dir" in line and "--model_name_or_path" in line
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_resume_from_an_earlier_checkpoint_abandons_the_later_ones(tiny, tmp_path, caplog):
    """Newcomer finding: after resuming checkpoint-2 of a run that had reached checkpoint-4, the new run's
    checkpoint-3 sat beside the old checkpoint-4 under the same run id, and 'last' resumed the abandoned branch
    (checkpoint-4) without a word. Now checkpoint-4 is kept but detached (warning naming it) and 'last' is
    checkpoint-3, the resumed run's newest."""
    from paca_hpu import checkpoints

    out = tmp_path / "out"
    keep = ("--save_steps", "1", "--save_total_limit", "10", "--do_eval", "False")
    assert _main(_argv(tiny, out, "--max_steps", "4", *keep)) == 0
    old4 = _adapter(out / "checkpoint-4")
    with caplog.at_level("WARNING"):
        assert _main(_argv(tiny, out, "--max_steps", "3", "--learning_rate", "1e-2", *keep,
                           "--resume_from_checkpoint", str(out / "checkpoint-2"))) == 0
    assert any("checkpoint-4" in r.getMessage() and "no longer part of this run" in r.getMessage()
               for r in caplog.records)
    assert checkpoints.last_checkpoint(out) == str(out / "checkpoint-3")
    assert checkpoints.read_run_id(out / "checkpoint-4") != checkpoints.read_run_id(out)
    assert _same(_adapter(out / "checkpoint-4"), old4)  # kept as it was


# ------------------------------------------------------------------------------- a kill / a full disk mid-save

_FAULT_DRIVER = textwrap.dedent("""
    import errno, os, signal, sys
    import torch
    target, fault = os.environ["FAULT_AT"], os.environ["FAULT"]
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(target):
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 / OOM killer / preemption in the middle of the save
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))  # what a full filesystem raises
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
    from paca_hpu.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _run_with_fault(tmp_path, argv, target, fault):
    """``scripts/run_paca_clm.py``'s ``main(argv)`` in its own process, whose ``torch.save`` of a path ending in
    ``target`` meets ``fault``: ``"kill"`` (SIGKILL, mid-save) or ``"enospc"`` (the write fails: disk full)."""
    driver = tmp_path / "driver.py"
    driver.write_text(_FAULT_DRIVER)
    env = dict(os.environ, FAULT_AT=target, FAULT=fault, PACA_DEVICE="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(driver), *argv], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def test_kill_mid_save_then_resume_skips_the_incomplete_checkpoint(tiny, tmp_path, capsys):
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = ("--max_steps", "4", "--save_steps", "1", "--save_total_limit", "5", "--do_eval", "False")
    proc = _run_with_fault(tmp_path, _argv(tiny, out, *args), os.path.join("checkpoint-3", "scheduler.pt"), "kill")
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]
    # checkpoint 3 was being written: it exists only under its staging name, so nothing looks complete
    assert _checkpoints(out) == ["checkpoint-1", "checkpoint-2", "tmp-checkpoint-3"]
    assert os.path.isfile(out / "checkpoint-2" / "trainer_state.json")
    assert _main(_argv(tiny, ref, *args)) == 0
    capsys.readouterr()
    assert _main(_argv(tiny, out, *args, "--resume_from_checkpoint", "last")) == 0
    printed = capsys.readouterr()
    assert "skipping incomplete checkpoint" in printed.out and "tmp-checkpoint-3" in printed.out, printed.out[-3000:]
    assert _same(_adapter(out), _adapter(ref)) and _losses(out) == _losses(ref)
    assert _checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    for step in (3, 4):
        assert _same(_adapter(out / f"checkpoint-{step}"), _adapter(ref / f"checkpoint-{step}"))


def test_disk_full_mid_save_is_one_line_and_leaves_no_checkpoint(tiny, tmp_path):
    """In its own process (the exit status and stderr are the user's): the optimizer state of checkpoint 2 hits a
    full disk (the writer raises ENOSPC, as a full filesystem does; runs everywhere, unlike the tmpfs test below)."""
    out = tmp_path / "out"
    argv = _argv(tiny, out, "--max_steps", "3", "--save_steps", "1", "--do_eval", "False")
    proc = _run_with_fault(tmp_path, argv, os.path.join("checkpoint-2", "optimizer.pt"), "enospc")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert line.startswith(f"error: no space left on {out}") and "checkpoint-2" in line, line
    assert _checkpoints(out) == ["checkpoint-1"]  # no checkpoint-2, no staging folder
    assert os.path.isfile(out / "checkpoint-1" / "trainer_state.json")


def _mount_tmpfs(path, options):
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_full_tmpfs_mid_save(tiny, tmp_path, capsys):
    """The same on a real full filesystem (a 2 MiB tmpfs, filled up to 8 KiB; in-process, nothing is killed):
    the writers fail with their own errors, still reported as one 'no space left' line. Skipped where tmpfs cannot
    be mounted."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=2m")
    try:
        out = disk / "out"
        out.mkdir()
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as fh:
            fh.write(b"\0" * (free - 8192))
        assert _main(_argv(tiny, out, "--max_steps", "2", "--save_steps", "1", "--do_eval", "False")) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith("error: no space left on") and str(out) in line, line
        assert _checkpoints(out) == []
        # torch.save's own error on a full disk carries no errno: recognised by the free space left
        from paca_hpu.checkpoints import is_disk_full

        with pytest.raises(RuntimeError) as exc:
            torch.save(torch.zeros(1 << 16), out / "big.pt")
        assert is_disk_full(exc.value, str(out)) and not is_disk_full(exc.value, str(tmp_path))
    finally:
        _umount(disk)


#: System folders that unprivileged containers (Docker, Podman) mount read-only.
_CONTAINER_READ_ONLY = ("/sys", "/sys/fs/cgroup", "/proc/sys", "/proc/bus", "/proc/fs", "/proc/irq")


def _read_only_mount_point():
    """One of :data:`_CONTAINER_READ_ONLY` when it is mounted read-only here (nothing is written to it: the script
    refuses the folder before writing), or None."""
    try:
        with open("/proc/mounts") as fh:
            mounts = [line.split() for line in fh]
    except OSError:
        return None
    for fields in mounts:
        if len(fields) >= 4 and fields[1] in _CONTAINER_READ_ONLY and "ro" in fields[3].split(",") \
                and not os.access(fields[1], os.W_OK):
            return fields[1]
    return None


def test_read_only_output_dir_is_one_line(tiny, tmp_path, capsys):
    """A folder this user cannot write: chmod 555 for a normal user; root writes there anyway, so for root a read-only
    tmpfs, or where mounting is not allowed a system folder that containers mount read-only (skipped only without
    either)."""
    ro, mounted = tmp_path / "ro", False
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    else:
        mounted = bool(shutil.which("mount")) and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode == 0
        if not mounted:
            ro = _read_only_mount_point()
            if ro is None:
                pytest.skip("root, no tmpfs can be mounted and no system folder is mounted read-only")
    try:
        assert _main(_argv(tiny, os.path.join(ro, "out"), "--max_steps", "1")) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "cannot be written" in line and str(ro) in line, line
    finally:
        if mounted:
            _umount(ro)


# --------------------------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("case, expected", [
    ("batch_size_0", "--per_device_train_batch_size 0"),
    ("not_a_model", "is not a model folder (no config.json)"),
    ("no_model_type", "has no model_type"),
    ("not_utf8", "byte 0xe9 at byte offset 17"),
])
def test_bad_inputs_are_one_line_errors(tiny, tmp_path, capsys, case, expected):
    out = tmp_path / "out"
    argv = _argv(tiny, out, "--max_steps", "1")
    if case == "batch_size_0":
        argv += ["--per_device_train_batch_size", "0"]
    elif case in ("not_a_model", "no_model_type"):
        folder = tmp_path / "folder"
        folder.mkdir()
        (folder / ("config.json" if case == "no_model_type" else "notes.txt")).write_text('{"hidden_size": 8}')
        argv[argv.index("--model_name_or_path") + 1] = str(folder)
    else:
        bad = tmp_path / "latin1.jsonl"
        bad.write_bytes('{"question": "café?", "answer": "yes"}\n'.encode("latin-1"))
        argv[argv.index("--train_file") + 1] = str(bad)
        expected = f"'{bad}' is not UTF-8 text: {expected}"
    assert _main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line and len(line) < 400, line
    assert not out.exists()


def _latin1_data(tmp_path):
    """A data file that fails as soon as the data are processed: an error about anything else proves that it was
    found before the data were read."""
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"question": "café?", "answer": "yes"}\n'.encode("latin-1"))
    return str(bad)


@pytest.mark.parametrize("flags, expected", [
    (("--paca_r", "0"), "error: --paca_r 0 is not allowed: the number of trained columns per layer must be >= 1"),
    (("--peft_type", "lora", "--lora_rank", "0"), "error: --lora_rank 0 is not allowed: the LoRA rank must be >= 1"),
    (("--paca_alpha", "0"), "error: --paca_alpha 0 is not allowed"),
    (("--paca_r", "40"), "error: --paca_r 40 exceeds in_features=32 of layer 'model.layers.0.self_attn.q_proj'"),
])
def test_adapter_size_errors_name_the_flag_typed_before_the_data(tiny, tmp_path, capsys, flags, expected):
    """``--paca_r 0`` used to be reported as ``PaCAConfig.r`` (a name the user never typed), and only after the whole
    data set was tokenized; r larger than a layer's in_features likewise."""
    out = tmp_path / "out"
    argv = _argv(tiny, out, "--max_steps", "1", *flags)
    argv[argv.index("--train_file") + 1] = _latin1_data(tmp_path)
    assert _main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(expected) and "PaCAConfig" not in line, line
    assert not out.exists()


@pytest.mark.parametrize("peft_type, targets, unknown", [
    ("paca", ["q_proj", "no_such_proj"], "'no_such_proj' matches"),  # used to train q_proj only, without a word
    ("paca", ["qproj", "vproj"], "'qproj', 'vproj' match"),
    ("paca", [r".*\.attn\.q_proj"], r"'.*\.attn\.q_proj' matches"),  # one regular expression that matches nothing
    ("lora", ["q_proj", "no_such_proj"], "'no_such_proj' matches"),  # peft drops unmatched names silently too
])
def test_unknown_target_modules_are_refused_before_the_data(tiny, tmp_path, capsys, peft_type, targets, unknown):
    out = tmp_path / "out"
    argv = _argv(tiny, out, "--max_steps", "1", "--peft_type", peft_type, "--target_modules", *targets)
    argv[argv.index("--train_file") + 1] = _latin1_data(tmp_path)
    assert _main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --target_modules: {unknown} no module of LlamaForCausalLM; its linear modules are "
                           "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"), line
    assert not out.exists()
    # with usable data the same flags without the unknown name train (the check refuses only what matches nothing)
    known = [t for t in targets if t == "q_proj"]
    if known and peft_type == "paca":
        capsys.readouterr()
        assert _main(_argv(tiny, out, "--max_steps", "1", "--peft_type", peft_type, "--target_modules", *known,
                           "--do_eval", "False")) == 0


def _tied_copy(tiny, tmp_path):
    """The tiny checkpoint with ``lm_head`` tied to the input embedding (as SmolLM2, Gemma, Qwen2-0.5B)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    folder = tmp_path / "tied"
    shutil.copytree(tiny["model"], folder)
    model.save_pretrained(folder)
    return str(folder)


def test_unknown_target_list_on_a_tied_model_offers_only_what_the_method_adapts(tiny, tmp_path, capsys):
    """The list of linear modules used to offer lm_head on a tied model, which PaCA then refuses; LoRA adapts it."""
    tied = _tied_copy(tiny, tmp_path)
    out = tmp_path / "out"
    argv = _argv(dict(tiny, model=tied), out, "--max_steps", "1", "--do_eval", "False")
    assert _main(argv + ["--target_modules", "q_proj", "no_such_proj"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.endswith("its linear modules are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (or "
                         "pass all-linear); lm_head: tied to another module's weight, which PaCA cannot adapt"), line
    assert _main(argv + ["--target_modules", "lm_head"]) == 2  # what the list leaves out is what PaCA refuses
    assert "tied weights" in _one_error_line(capsys.readouterr().err)
    assert _main(argv + ["--peft_type", "lora", "--target_modules", "q_proj", "no_such_proj"]) == 2
    assert _one_error_line(capsys.readouterr().err).endswith("down_proj, lm_head (or pass all-linear)")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ base model paths


def test_relative_model_path_is_recorded_so_the_adapter_reloads_from_any_folder(tiny, tmp_path, monkeypatch,
                                                                               capsys):
    """``--model_name_or_path ./my-llama`` (the README's example) was recorded as given: paca_hpu.from_pretrained and
    the export from another folder then looked './my-llama' up on the Hub (48 s / 25 s of retries without network,
    then a traceback). The adapter now records the folder's absolute path; reloaded from elsewhere it gives the
    logits of the merged checkpoint the run wrote. A recorded path that is no Hub id and does not exist is one error
    naming it, with no Hub lookup."""
    import huggingface_hub.file_download as hub_download
    from transformers import AutoModelForCausalLM

    import paca_hpu
    from paca_hpu.__main__ import main as export_main
    from paca_hpu.hub import ModelSourceError

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny["model"], work / "my-llama")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    argv = _argv(dict(tiny, model="./my-llama"), "out", "--max_steps", "2", "--do_eval", "False", "--save_merged")
    assert _main(argv) == 0
    out = work / "out"
    recorded = json.load(open(out / "adapter_config.json"))["base_model_name_or_path"]
    assert os.path.isabs(recorded) and os.path.samefile(recorded, work / "my-llama"), recorded
    # the same from Python: a model loaded from a relative path, adapted and saved
    paca_hpu.apply_paca(AutoModelForCausalLM.from_pretrained("./my-llama"), paca_hpu.PaCAConfig(r=2)).save_pretrained(
        "py-adapter")
    recorded = json.load(open(work / "py-adapter" / "adapter_config.json"))["base_model_name_or_path"]
    assert os.path.isabs(recorded) and os.path.samefile(recorded, work / "my-llama"), recorded

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args or kwargs}")

    monkeypatch.setattr(hub_download, "get_hf_file_metadata", no_hub)
    monkeypatch.chdir(elsewhere)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.randint(3, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        torch.testing.assert_close(paca_hpu.from_pretrained(out)(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(paca_hpu.from_pretrained(work / "py-adapter")(input_ids=ids).logits,
                                   AutoModelForCausalLM.from_pretrained(work / "my-llama")(input_ids=ids).logits,
                                   rtol=0, atol=0)  # zero deltas: the base model
        assert export_main(["export", str(out), "--to", "merged", "--output", "exported"]) == 0
        exported = AutoModelForCausalLM.from_pretrained(elsewhere / "exported").eval()
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, rtol=0, atol=1e-6)

    # an adapter that records a local path which does not exist here (an older adapter recorded './my-llama')
    for gone in ("./my-llama", str(tmp_path / "moved" / "my-llama")):
        cfg = json.load(open(out / "adapter_config.json"))
        (out / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path=gone)))
        with pytest.raises(ModelSourceError) as err:
            paca_hpu.from_pretrained(out)
        assert f"model path '{gone}' not found" in str(err.value) and "base_model=PATH_OR_NAME" in str(err.value)
        capsys.readouterr()
        assert export_main(["export", str(out), "--to", "lora", "--output", "lora"]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and f"model path '{gone}' not found" in line and "--base_model" in line, line
        assert not (elsewhere / "lora").exists()


# ---------------------------------------------------------------------------------------------------- Hub ids


def _hub_cache(tmp_path, model_dir, repo_id):
    """A Hugging Face cache folder holding ``repo_id`` at revision main (the layout huggingface_hub writes)."""
    cache = tmp_path / "hub-cache"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_hub_id_with_a_slash_loads_from_the_local_cache(tiny, tmp_path, monkeypatch):
    import huggingface_hub.file_download as hub_download

    def no_network(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args or kwargs} although the model is cached")

    monkeypatch.setattr(hub_download, "get_hf_file_metadata", no_network)
    cache = _hub_cache(tmp_path, tiny["model"], "tiny-org/tiny-llama")
    out = tmp_path / "out"
    argv = _argv(tiny, out, "--max_steps", "1", "--cache_dir", str(cache), "--do_eval", "False")
    argv[argv.index("--model_name_or_path") + 1] = "tiny-org/tiny-llama"
    assert _main(argv) == 0
    assert json.load(open(out / "metrics.json"))["model"] == "tiny-org/tiny-llama"
    assert json.load(open(out / "adapter_config.json"))["base_model_name_or_path"] == "tiny-org/tiny-llama"
    from paca_hpu import load_adapter
    from transformers import AutoModelForCausalLM

    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny["model"]), out)  # the same base weights
    assert len([n for n, _ in model.named_modules() if n.endswith("q_proj")]) == 2


def test_hub_model_and_dataset_without_network_are_one_line(tiny, tmp_path):
    """HF_HUB_OFFLINE=1 stands in for a machine without network (the real one retries for ~40 s)."""
    code = textwrap.dedent(f"""
        import sys
        from paca_hpu.cli import main
        base = ["--max_steps", "1", "--output_dir", {str(tmp_path / "o1")!r}, "--train_file", {tiny["train"]!r},
                "--model_name_or_path", "tiny-org/not-cached"]
        print("RC1", main(base), file=sys.stderr, flush=True)
        print("RC2", main(["--max_steps", "1", "--output_dir", {str(tmp_path / "o2")!r}, "--model_name_or_path",
                           {tiny["model"]!r}, "--dataset_name", "tatsu-lab/alpaca"]), file=sys.stderr, flush=True)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PACA_DEVICE="cpu",
               HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_DATASETS_CACHE=str(tmp_path / "empty-ds-cache"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "RC1 2" in proc.stderr and "RC2 2" in proc.stderr and len(errors) == 2, proc.stderr[-3000:]
    assert "'tiny-org/not-cached'" in errors[0] and "Hub cannot be reached" in errors[0], errors[0]
    assert "'tatsu-lab/alpaca'" in errors[1] and "Hub cannot be reached" in errors[1], errors[1]


def test_training_set_emptied_by_max_seq_len_names_the_fix(tiny, tmp_path, capsys):
    """Newcomer finding: --max_seq_len 2 dropped every training example and the error said only "the training set
    is empty"; it now names --max_seq_len and the fix."""
    assert _main(_argv(tiny, tmp_path / "out", "--max_steps", "1", "--max_seq_len", "2", "--train_on_inputs",
                       "false")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "the training set is empty" in line and "--max_seq_len=2" in line and "raise --max_seq_len" in line


@pytest.mark.parametrize("case", ["all_dropped", "no_split"])
def test_empty_held_out_set_warning_names_its_cause(tiny, tmp_path, caplog, case):
    """Newcomer finding: when --max_seq_len dropped every held-out example (each prompt longer than it), the warning
    blamed validation_split_percentage. It now names --max_seq_len there, and the split only when the split is 0."""
    from helpers import write_jsonl

    out = tmp_path / "out"
    if case == "all_dropped":
        long = [{"question": "Add these numbers: " + " ".join(str(i) for i in range(80)), "answer": "#### 3160"}] * 4
        extra = ["--validation_file", write_jsonl(tmp_path / "val.jsonl", long), "--train_on_inputs", "false"]
    else:
        extra = ["--validation_split_percentage", "0"]
    argv = [a for a in _argv(tiny, out, "--max_steps", "1", "--do_eval", *extra)]
    with caplog.at_level("WARNING"):
        assert _main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if "held-out set is empty" in r.getMessage()]
    assert len(warned) == 1, caplog.text[-3000:]
    if case == "all_dropped":
        assert "--max_seq_len=64" in warned[0] and "validation_split_percentage" not in warned[0]
    else:
        assert "--validation_split_percentage is 0" in warned[0]
