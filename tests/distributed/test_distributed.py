"""PaCA on two CPU ranks (gloo) with the engines users run, each against one process with the same global batch:
torch DDP, FSDP (FULL_SHARD, use_orig_params=True), FSDP2 (fully_shard), DeepSpeed ZeRO-1/2/3 (stock DeepSpeed on
its CPU accelerator, hand-written loops without sync_paca), optimum-habana's GaudiTrainer in CPU mode and
transformers.Trainer with the shipped DeepSpeed configs.

Checked for every engine: losses, deltas, indices and the merged weights (the probe logits through the engine's own
forward; the layers' weights where the engine leaves them whole; the saved adapter merged into a fresh base model)
equal the single-process run within 1e-5 relative (float32), every rank holds the same values, and the adapter is
written once (rank 0), complete. Also the communication the engines did against :mod:`benchmarks.scale_out`.

bf16 (DeepSpeed's bf16 mode: the weights cast to bf16, ``delta`` float32, gradients communicated as the shipped
configs say, in float32): ZeRO-2 equals one process with DeepSpeed's cast exactly; ZeRO-3 (whose gathered bf16
weights PaCA never writes: it adds its update through a rank-``r`` correction) equals one process computing that
correction within bf16 rounding; with PaCA disabled both give the bf16 base model bit for bit.

The default run (CI) covers DDP, ZeRO-2 (float32 and bf16), FSDP2 and the trainers' data-parallel paths;
``make test-dist`` adds the tests marked ``dist_heavy`` (ZeRO-1, ZeRO-3 on ``zero.Init`` placeholders, ZeRO-3 in
bf16, FSDP1, the training script under ``torchrun``, resume).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import dist_workers as dw
from helpers import max_rel_err

WORLD, STEPS = 2, 3
TOL = 1e-5  # float32, relative (norm of the difference / norm of the reference)
N_LAYERS = 14  # tiny LLaMA: 2 decoder layers x 7 projections


def _rel(a, b) -> float:
    return max_rel_err(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


@pytest.fixture(scope="module")
def ref():
    return dw.reference(WORLD, STEPS)


@pytest.fixture(scope="module")
def tiny_shape():
    from helpers import llama_config

    from benchmarks.scale_out import ModelShape

    return ModelShape.from_config(llama_config().to_dict())


def _run(tmp_path_factory, fn, **kwargs):
    adapter_dir = str(tmp_path_factory.mktemp(fn) / "adapter")
    return dw.launch(fn, world=WORLD, steps=STEPS, adapter_dir=adapter_dir, **kwargs), adapter_dir


def check_against_reference(ranks, adapter_dir, ref, dense: bool) -> None:
    """What every engine must satisfy (module docstring)."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM  # noqa: F401  (helpers builds it)

    from helpers import tiny_llama
    from paca_hpu import load_adapter, merge_paca

    r0, r1 = ranks
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == STEPS
    assert _rel(r0["losses"], ref["losses"]) < TOL, (r0["losses"], ref["losses"])
    assert r0["adapter"].keys() == r1["adapter"].keys()
    assert all(torch.equal(r0["adapter"][k], r1["adapter"][k]) for k in r0["adapter"])
    assert len([k for k in r0["adapter"] if k.endswith(".delta")]) == N_LAYERS
    for name, delta in ref["deltas"].items():
        assert torch.equal(r0["adapter"][f"{name}.indices"], ref["indices"][name].long())
        assert _rel(r0["adapter"][f"{name}.delta"], delta) < TOL, name
    assert torch.equal(r0["logits"], r1["logits"])
    assert _rel(r0["logits"], ref["logits"]) < TOL
    if not dense:  # sharded weights: PaCA never writes into them, the forward adds the update
        assert r0["weights"] == {} and r1["weights"] == {}
    else:  # the engine leaves the weights whole: the merged columns are written into them
        assert r0["weights"].keys() == ref["merged"].keys()
        for name, w in ref["merged"].items():
            assert torch.equal(r0["weights"][name], r1["weights"][name])
            assert _rel(r0["weights"][name], w) < TOL, name
    # written once (rank 0: weights then config), complete, and what merge_paca makes of it is the reference
    assert r0["writes"] == ["adapter_model.safetensors", "adapter_config.json"] and r1["writes"] == []
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert saved.keys() == r0["adapter"].keys() and all(torch.equal(saved[k], r0["adapter"][k]) for k in saved)
    merged = merge_paca(load_adapter(tiny_llama(seed=0), adapter_dir))
    for name, w in ref["merged"].items():
        assert _rel(merged.get_submodule(name).weight.detach(), w) < TOL, name


# ----------------------------------------------------------------------------- hand-written loops

DEFAULT_ENGINES = {"ddp": True, "fsdp2": False, "zero2": True}  # engine: leaves the weights whole (dense)
HEAVY_ENGINES = {"zero1": True, "fsdp1": False, "zero3": False, "zero3_persistent": False}


def _engines(root, engines, **kwargs):
    ranks = dw.launch("engines_worker", world=WORLD, steps=STEPS, adapter_root=str(root), engines=list(engines),
                      **kwargs)
    return {e: ([r[e] for r in ranks], str(root / e)) for e in engines}


@pytest.fixture(scope="module")
def ci_runs(tmp_path_factory):
    """The default set in one pair of processes (dist_workers.ci_worker): the DDP, FSDP2 and ZeRO-2 loops, then
    apply_paca on wrapped models, GaudiTrainer (CPU mode, DDP) and transformers.Trainer with
    scripts/ds_zero2_gaudi.json. ``{name: ([rank0, rank1], output dir)}``."""
    root = tmp_path_factory.mktemp("ci")
    ranks = dw.launch("ci_worker", world=WORLD, steps=STEPS, root=str(root),
                      engines=list(DEFAULT_ENGINES) + list(BF16_ENGINES))
    return {name: ([r[name] for r in ranks], str(root / name)) for name in ranks[0]}


@pytest.mark.parametrize("engine", list(DEFAULT_ENGINES))
def test_engine_matches_one_process(ci_runs, ref, engine):
    """DDP; FSDP2 (``fully_shard``: the weights are DTensor shards, PaCA adds its update in the forward); ZeRO-2
    with ``engine.backward`` / ``engine.step`` only (no ``sync_paca``: the ZeRO optimizer copies its master weights
    into ``delta`` through ``.data``, and the layers refresh their merged columns at the next forward)."""
    ranks, adapter_dir = ci_runs[engine]
    if engine == "fsdp2":
        assert all(ranks[0]["sharded"].values())  # every PaCA weight was a DTensor shard
    check_against_reference(ranks, adapter_dir, ref, dense=DEFAULT_ENGINES[engine])


@pytest.mark.parametrize("engine,name", [("ddp", "DistributedDataParallel"), ("fsdp2", "fully_shard")])
def test_apply_paca_on_a_wrapped_model_is_refused(ci_runs, engine, name):
    """apply_paca on a model DDP or fully_shard already wraps: the engine registered its parameters before the
    deltas existed (DDP would not all-reduce them: each rank would train alone; fully_shard would not shard them),
    so it is refused with the order that works. Before, DDP went through silently."""
    ranks, _ = ci_runs["refusals"]
    for rank in ranks:
        assert rank[engine].startswith(f"ValueError: the model is already wrapped by {name}"), rank[engine]
        assert "Apply PaCA (apply_paca / load_adapter) to the plain model, then wrap it" in rank[engine]


def test_disable_paca_with_modules_to_save_under_fully_shard_is_refused(ci_runs):
    """Issue 23 item 1: ``disable_paca`` switches the frozen originals of ``modules_to_save`` into their modules; an
    engine that shards and re-installs those parameters itself (FSDP2 here; FSDP, ZeRO-3 alike) is refused with the
    way out, instead of leaving it to the engine which tensor the reference forward uses."""
    ranks, _ = ci_runs["refusals"]
    for rank in ranks:
        got = rank["fsdp2_disable_modules_to_save"]
        assert got.startswith("RuntimeError: disable_paca with modules_to_save under fully_shard"), got
        assert "Use a separate frozen reference model" in got


def test_ddp_bytes_reduced_match_the_scale_out_model(ci_runs, tiny_shape):
    """A DDP communication hook counts the bytes all-reduced per step: every delta gradient once, float32."""
    from benchmarks.scale_out import step_communication

    predicted = step_communication(tiny_shape, "paca", dw.R, "ddp", WORLD, grad_bytes=4)
    assert predicted["all_reduce"] == 2048 * 4  # 14 layers: sum of out_features (2 x 256) x r=4 float32 gradients
    for rank in ci_runs["ddp"][0]:
        assert rank["allreduce_bytes_per_step"] == predicted["all_reduce"]


def _ds_bytes(comms, op, world=1) -> int:
    return sum(size * count for size, count in comms.get(op, {}).items()) * world


def test_zero2_bytes_match_the_scale_out_model(ci_runs, tiny_shape):
    """DeepSpeed's comms logger: per step one all-reduce of the float32 gradients (plus a 4-byte overflow check)
    and one all-gather of the updated deltas (each rank logs its own shard)."""
    from benchmarks.scale_out import step_communication

    predicted = step_communication(tiny_shape, "paca", dw.R, "zero2", WORLD, param_bytes=4, grad_bytes=4)
    for rank in ci_runs["zero2"][0]:
        for comms in rank["comms"][1:]:
            assert predicted["all_reduce"] in comms["all_reduce"]
            assert _ds_bytes(comms, "all_reduce") - predicted["all_reduce"] <= 8
            assert _ds_bytes(comms, "all_gather_into_tensor", WORLD) == predicted["all_gather"]


# ----------------------------------------------------------------------------- bf16 (DeepSpeed's bf16 mode)

BF16_ENGINES = ["zero2_bf16"]  # in the default run (ci_worker)
HEAVY_BF16_ENGINES = ["zero3_bf16", "zero3_persistent_bf16"]
#: (reference, tolerances) per engine. ZeRO-2 keeps the merged weights whole and reduces the float32 delta gradients
#: in float32: one process with DeepSpeed's cast to TOL. ZeRO-3 keeps the bf16 weights the engine gathers and PaCA
#: adds its update through the rank-r correction: one process computing that correction, within bf16 rounding
#: (measured on 2 CPU ranks, 3 AdamW steps: losses 7e-5, deltas 4e-3, logits 8e-3 relative; a GEMM rounds to bf16
#: and a sum of partitions in another order moves a few of its outputs by one bf16 step).
BF16_TOL = {"zero2_bf16": ("dense", {"losses": TOL, "deltas": TOL, "logits": TOL}),
            "zero3_bf16": ("partitioned", {"losses": 5e-4, "deltas": 2e-2, "logits": 3e-2}),
            "zero3_persistent_bf16": ("partitioned", {"losses": 5e-4, "deltas": 2e-2, "logits": 3e-2})}


@pytest.fixture(scope="module")
def ref_bf16():
    return {kind: dw.reference(WORLD, STEPS, bf16=True, partitioned=kind == "partitioned")
            for kind in ("dense", "partitioned")}


def check_bf16_against_reference(engine, ranks, adapter_dir, refs) -> None:
    """A DeepSpeed bf16 run against one process (:data:`BF16_TOL`): bf16 weights with float32 deltas on every layer,
    losses, deltas, logits, merged weights (ZeRO-2); PaCA disabled gives the bf16 base model bit for bit; the
    adapter is written once, in float32."""
    from safetensors.torch import load_file

    kind, tol = BF16_TOL[engine]
    ref = refs[kind]
    r0, r1 = ranks
    assert set(r0["dtypes"].values()) == {(torch.bfloat16, torch.float32)} and len(r0["dtypes"]) == N_LAYERS
    assert r0["losses"] == r1["losses"] and torch.equal(r0["logits"], r1["logits"])
    assert _rel(r0["losses"], ref["losses"]) < tol["losses"], (r0["losses"], ref["losses"])
    assert _rel(r0["losses"], refs["dense"]["losses"]) < 1e-3  # and one bf16 rounding from the dense one
    for name, delta in ref["deltas"].items():
        assert torch.equal(r0["adapter"][f"{name}.delta"], r1["adapter"][f"{name}.delta"])
        assert _rel(r0["adapter"][f"{name}.delta"], delta) < tol["deltas"], name
    assert _rel(r0["logits"].float(), ref["logits"].float()) < tol["logits"]
    assert torch.equal(r0["base_logits"], ref["base_logits"]) and torch.equal(r0["base_logits"], r1["base_logits"])
    for name, w in ref["merged"].items() if r0["weights"] else ():
        assert _rel(r0["weights"][name].float(), w.float()) < TOL, name
    assert r0["writes"] == ["adapter_model.safetensors", "adapter_config.json"] and r1["writes"] == []
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert all(saved[k].dtype == torch.float32 for k in saved if k.endswith(".delta"))


@pytest.mark.parametrize("engine", BF16_ENGINES)
def test_bf16_engine_matches_one_process(ci_runs, ref_bf16, engine):
    """ZeRO-2 in DeepSpeed's bf16 mode with scripts/ds_zero2_gaudi.json's gradient communication dtype (float32:
    with DeepSpeed's bf16 default the float32 delta gradients were rounded to bf16 before the all-reduce, deltas
    5 % apart from one process after 3 steps); disable_paca on the DeepSpeed-cast model used to fail (float32 base
    columns into a bf16 weight)."""
    ranks, adapter_dir = ci_runs[engine]
    check_bf16_against_reference(engine, ranks, adapter_dir, ref_bf16)


@pytest.mark.dist_heavy
@pytest.mark.parametrize("engine", HEAVY_BF16_ENGINES)
def test_heavy_bf16_engine_matches_one_process(heavy_runs, ref_bf16, engine):
    """ZeRO-3 in bf16 (every tensor partitioned; and DeepSpeed's default persistence threshold, where the tiny
    bf16 weights and float32 deltas stay whole on every rank: the mixed-dtype persistent parameters of
    deepspeedai/DeepSpeed#8072), with scripts/ds_zero3.json's gradient communication dtype."""
    ranks, adapter_dir = heavy_runs[engine]
    check_bf16_against_reference(engine, ranks, adapter_dir, ref_bf16)


def test_trainer_reduces_paca_gradients_in_float32_under_deepspeed_bf16(reset_accelerate):
    """A DeepSpeed config without a communication dtype in bf16 mode would all-reduce PaCA's float32 delta gradients
    in bf16 (as test_bf16_engine_matches_one_process shows, 5 % off after 3 steps): the trainer builds the engine
    config with float32 communication for a PaCA model, and leaves a config that names a dtype alone."""
    import json

    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from helpers import tiny_llama
    from paca_hpu.trainer import make_trainer

    with open(os.path.join(dw.REPO, "scripts", "ds_zero2.json")) as fh:
        shipped = json.load(fh)
    dw._deepspeed()
    try:
        for named, want in ((None, "fp32"), ("bf16", "bf16")):
            config = {k: v for k, v in shipped.items() if k != "communication_data_type"}
            if named:
                config["communication_data_type"] = named
            args = TrainingArguments(output_dir="unused", use_cpu=True, bf16=True, deepspeed=config,
                                     per_device_train_batch_size=dw.MICRO, report_to="none")
            trainer = make_trainer(dw.build_model(), args, train_dataset=dw.trainer_dataset(1))
            assert trainer.accelerator.state.deepspeed_plugin.deepspeed_config["communication_data_type"] == want
        config = {k: v for k, v in shipped.items() if k != "communication_data_type"}
        args = TrainingArguments(output_dir="unused", use_cpu=True, bf16=True, deepspeed=config,
                                 per_device_train_batch_size=dw.MICRO, report_to="none")
        trainer = make_trainer(tiny_llama(seed=0), args, train_dataset=dw.trainer_dataset(1))  # no PaCA: untouched
        assert "communication_data_type" not in trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    finally:
        unset_hf_deepspeed_config()


# ----------------------------------------------------------------------------- trainers


@pytest.fixture(scope="module")
def ref_fixed():
    """The trainer runs see all ``WORLD * MICRO`` examples at every step (see dist_workers.trainer_dataset)."""
    return dw.reference(WORLD, STEPS, fixed_batch=True)


def check_trainer(ranks, ref, out) -> None:
    """Logged losses and final deltas of a 2-rank trainer run equal the hand-written single-process loop; the
    adapter was written by rank 0 only (``should_save``) and holds the final deltas."""
    from safetensors.torch import load_file

    r0, r1 = ranks
    assert r0["losses"] == r1["losses"] and [st for st, _ in r0["losses"]] == list(range(1, STEPS + 1))
    # the Trainer logs losses rounded to 4 decimals
    assert all(abs(v - want) <= 5e-5 for (_, v), want in zip(r0["losses"], ref["losses"])), (r0["losses"], ref)
    assert r0["deltas"].keys() == ref["deltas"].keys()
    for name, d in ref["deltas"].items():
        assert torch.equal(r0["deltas"][name], r1["deltas"][name]), name
        assert _rel(r0["deltas"][name], d) < TOL, name
    assert r0["should_save"] and not r1["should_save"]
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert len([k for k in saved if k.endswith(".delta")]) == N_LAYERS
    for name, d in ref["deltas"].items():
        assert _rel(saved[f"{name}.delta"], d) < TOL, name


def test_gaudi_trainer_on_cpu_ranks_is_data_parallel(ci_runs, ref_fixed):
    """Under a torchrun-style launch on CPU, GaudiTrainer wraps the model in DDP (upstream wraps only on HPUs: each
    rank trained alone on its half of the data and the ranks diverged); the run equals one process with the same
    global batch."""
    ranks, out = ci_runs["gaudi"]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    check_trainer(ranks, ref_fixed, out)


def test_trainer_with_shipped_gaudi_zero2_config(ci_runs, ref_fixed):
    """transformers.Trainer + DeepSpeed with scripts/ds_zero2_gaudi.json as shipped (no optimizer block: the
    trainer's optimizer had an empty no-decay group that DeepSpeed drops, and the LR scheduler crashed)."""
    ranks, out = ci_runs["hf_zero2"]
    assert ranks[0]["wrapped"] == "DeepSpeedEngine"
    check_trainer(ranks, ref_fixed, out)


# ----------------------------------------------------------------------------- make test-dist (dist_heavy)


@pytest.fixture(scope="module")
def heavy_runs(tmp_path_factory):
    """ZeRO-1, FSDP1 and ZeRO-3 loops (float32, then ZeRO-3 in bf16) in one pair of processes; ZeRO-3 in float32
    loads the model with from_pretrained under an active ZeRO-3 config (zero.Init placeholders) and applies PaCA to
    those."""
    from helpers import tiny_llama

    root = tmp_path_factory.mktemp("heavy")
    tiny_llama(seed=0).save_pretrained(root / "base")
    return _engines(root, list(HEAVY_ENGINES) + HEAVY_BF16_ENGINES, checkpoint=str(root / "base"))


@pytest.mark.dist_heavy
@pytest.mark.parametrize("engine", list(HEAVY_ENGINES))
def test_heavy_engine_matches_one_process(heavy_runs, ref, engine):
    """ZeRO-1 (no sync_paca); FSDP1 FULL_SHARD with use_orig_params=True (flat shards: PaCA adds its update in the
    forward); ZeRO-3 on placeholders (every tensor partitioned, persistence threshold 0); ZeRO-3 partitioning a
    model PaCA was applied to before ``deepspeed.initialize``, default persistence threshold: the tiny weights stay
    whole on every rank as persistent ZeRO-3 parameters, which DeepSpeed may overwrite, so PaCA must not keep its
    merged columns in them either."""
    ranks, adapter_dir = heavy_runs[engine]
    if engine.startswith("zero3"):
        assert ranks[0]["placeholders"] == (engine == "zero3")  # zero3: from_pretrained built shape-(0,) placeholders
        assert all(is_zero3 and persistent == (engine == "zero3_persistent")
                   for is_zero3, persistent in ranks[0]["zero3"].values())
    if engine == "fsdp1":
        assert all(ranks[0]["sharded"].values())
    check_against_reference(ranks, adapter_dir, ref, dense=HEAVY_ENGINES[engine])


@pytest.mark.dist_heavy
def test_zero3_bytes_match_the_scale_out_model(heavy_runs, tiny_shape):
    """ZeRO-3 per step: one all-gather of every parameter (frozen weights included; the tiny model stays gathered
    between forward and backward) and one reduce-scatter of the float32 delta gradients."""
    from benchmarks.scale_out import step_communication

    predicted = step_communication(tiny_shape, "paca", dw.R, "zero3", WORLD, param_bytes=4, grad_bytes=4,
                                   persistence_threshold=0)
    for rank in heavy_runs["zero3"][0]:
        for comms in rank["comms"][1:]:
            assert _ds_bytes(comms, "all_gather_into_tensor", WORLD) == predicted["all_gather"]
            assert _ds_bytes(comms, "reduce_scatter_tensor") == predicted["reduce_scatter"]


# ----------------------------------------------------------------------------- the training script


@pytest.fixture(scope="module")
def script_data(tmp_path_factory):
    from helpers import make_tiny_checkpoint, qa_records, write_jsonl

    root = tmp_path_factory.mktemp("script")
    return {"model": make_tiny_checkpoint(root / "model"), "train": write_jsonl(root / "train.jsonl", qa_records(24))}


def _script_argv(data, out, per_device, *extra):
    # 24 records, 25 % held out: 18 training examples, so per_device 9 on 2 ranks or 18 on one is the whole set;
    # held-out batches of 1: the Trainer's held-out loss (mean over batches of each batch's token mean, weighted by
    # batch size) is then the same average on 1 and on 2 ranks
    return ["--model_name_or_path", data["model"], "--train_file", data["train"], "--validation_split_percentage",
            "25", "--max_seq_len", "64", "--learning_rate", "5e-3", "--seed", "11", "--adam_epsilon", "1e-8",
            "--per_device_train_batch_size", str(per_device), "--per_device_eval_batch_size", "1",
            "--output_dir", str(out), *extra]


def test_fsdp_on_cpu_is_a_usage_error(script_data, tmp_path, capsys, reset_accelerate):
    """--fsdp cannot run on CPU processes (accelerate's FSDP needs an accelerator: upstream failed with "There are
    currently no available devices found"); refused with the alternatives before anything loads. (The arguments
    export ACCELERATE_USE_FSDP, which reset_accelerate removes again for the tests after this one.)"""
    from paca_hpu.cli import main

    out = tmp_path / "fsdp"
    assert main(_script_argv(script_data, out, 4, "--max_steps", "1", "--fsdp", "full_shard auto_wrap")) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "--fsdp needs CUDA or HPU" in err[0] and "ds_zero3.json" in err[0]
    assert not out.exists()


def test_save_merged_under_zero3_is_a_usage_error(script_data, tmp_path, capsys, reset_accelerate):
    """--save_merged with a ZeRO-3 config: merging needs every whole weight in one process; it used to fail only
    after training, on rank 0. Refused before anything loads, naming the export command."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from paca_hpu.cli import main

    out = tmp_path / "merged"
    argv = _script_argv(script_data, out, 4, "--max_steps", "1", "--save_merged", "--deepspeed",
                        os.path.join(dw.REPO, "scripts", "ds_zero3.json"))
    try:
        assert main(argv) == 2
    finally:
        unset_hf_deepspeed_config()  # later from_pretrained calls in this process must not see ZeRO-3
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "--save_merged needs the whole weights" in err[0] and "DeepSpeed ZeRO-3" in err[0]
    assert "python -m paca_hpu export OUTPUT_DIR --to merged" in err[0]
    assert not out.exists()


def _run_script(argv, nproc: int, timeout: float = 900):
    """scripts/run_paca_clm.py, under torchrun for ``nproc`` > 1; returns the finished process."""
    script = os.path.join(dw.REPO, "scripts", "run_paca_clm.py")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(dw._free_port())]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=dw.REPO)
    proc = subprocess.run(launcher + [script, *argv], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=dw.REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _script_result(out):
    from safetensors.torch import load_file

    state = json.load(open(os.path.join(out, "trainer_state.json")))
    losses = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    held_out = {k: metrics.get(k) for k in ("eval_loss_before", "eval_loss_after")}
    return losses, load_file(os.path.join(out, "adapter_model.safetensors")), held_out


@pytest.fixture(scope="module")
def script_single(script_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("script_single") / "out"
    _run_script(_script_argv(script_data, out, 18, "--max_steps", "3", "--save_strategy", "no"), 1)
    return _script_result(out)


@pytest.mark.dist_heavy
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_script_under_torchrun_matches_one_process(script_data, script_single, tmp_path, engine):
    """The README's commands: ``torchrun --nproc_per_node 2 scripts/run_paca_clm.py ...`` (GaudiTrainer, DDP) and
    ``... --deepspeed scripts/ds_zero2.json`` / ``ds_zero3.json`` (transformers.Trainer on DeepSpeed's CPU
    accelerator; ZeRO-3 loads the model as zero.Init placeholders) give one process's losses and adapter. ZeRO-2
    used to hang here on a machine where an earlier DeepSpeed start had been interrupted while JIT-compiling
    DeepSpeed's shared-memory op (see test_deepspeed_on_cpu_does_not_build_the_shared_memory_op)."""
    out = tmp_path / engine
    extra = [] if engine == "ddp" else ["--deepspeed", os.path.join(dw.REPO, "scripts", f"ds_{engine}.json")]
    proc = _run_script(_script_argv(script_data, out, 9, "--max_steps", "3", "--save_strategy", "no", *extra), 2)
    want = "GaudiTrainer on 2 CPU processes: model wrapped in DistributedDataParallel" if engine == "ddp" else \
        "trainer: transformers.Trainer"
    assert want in proc.stdout + proc.stderr
    losses, adapter, held_out = _script_result(out)
    want_losses, want_adapter, want_held_out = script_single
    assert losses == want_losses
    assert adapter.keys() == want_adapter.keys()
    for key, value in want_adapter.items():
        assert _rel(adapter[key], value) < TOL, key
    # held-out loss before (ZeRO-3: evaluated at step 0 inside train(), eval_on_start) and after training
    for key, value in want_held_out.items():
        assert value is not None and held_out[key] is not None, (key, held_out)
        assert abs(held_out[key] - value) <= TOL * abs(value), (key, held_out[key], value)


@pytest.mark.dist_heavy
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_script_resume_under_torchrun_is_exact(script_data, tmp_path, engine):
    """Stopped after step 2 and resumed under torchrun up to step 4: the uninterrupted run's losses and adapter. DDP:
    the optimizer state used to fail to load (transformers passes map_location='cpu:0', which torch 2.13 rejects);
    ZeRO-2: DeepSpeed's own checkpoint (its partitioned optimizer state) next to the adapter."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ("--save_steps", "2", "--lr_scheduler_type", "constant", "--eval_strategy", "no", "--do_eval", "False")
    if engine == "zero2":
        common += ("--deepspeed", os.path.join(dw.REPO, "scripts", "ds_zero2.json"))
    _run_script(_script_argv(script_data, full, 9, "--max_steps", "4", *common), 2)
    _run_script(_script_argv(script_data, cut, 9, "--max_steps", "2", *common), 2)
    _run_script(_script_argv(script_data, cut, 9, "--max_steps", "4", *common, "--resume_from_checkpoint",
                             str(cut / "checkpoint-2")), 2)
    (losses, adapter, _), (want_losses, want_adapter, _) = _script_result(cut), _script_result(full)
    assert losses == want_losses and len(losses) == 4
    assert adapter.keys() == want_adapter.keys()
    assert all(torch.equal(adapter[k], want_adapter[k]) for k in want_adapter)


def test_deepspeed_on_cpu_does_not_build_the_shared_memory_op():
    """The training script's DeepSpeed start on CPU switches off DeepSpeed's shared-memory all-reduce op: its CPU
    backend otherwise JIT-compiles that C++ op at start-up (minutes; a lock left by an interrupted build made every
    later ``--deepspeed`` run on the machine wait forever), and the op serves only inference_all_reduce."""
    from types import SimpleNamespace

    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.comm.torch import build_shm_op

    from paca_hpu.trainer import start_deepspeed_comm

    compatible = deepspeed.ops.__compatible_ops__
    before = compatible.get("deepspeed_shm_comm")
    try:
        start_deepspeed_comm(SimpleNamespace(deepspeed="ds.json", device=torch.device("cpu"), world_size=1))
        assert compatible["deepspeed_shm_comm"] is False
        assert build_shm_op() is None  # what DeepSpeed's TorchBackend calls when it starts
        compatible["deepspeed_shm_comm"] = before
        start_deepspeed_comm(SimpleNamespace(deepspeed=None, device=torch.device("cpu"), world_size=1))
        assert compatible.get("deepspeed_shm_comm") == before  # without DeepSpeed: left alone
    finally:
        compatible["deepspeed_shm_comm"] = before


@pytest.mark.dist_heavy
def test_gaudi_check_script_runs_on_cpu(tmp_path):
    """scripts/gaudi_check.sh, the check a Gaudi owner runs for HPU graphs and DeepSpeed bf16, in its CPU smoke mode
    (tests/fake_habana for the graphs part, torchrun and DeepSpeed's CPU accelerator for the ranks): every check
    line it documents is printed and passes, so the script itself works before it travels to a Gaudi."""
    env = dict(os.environ, GAUDI_CHECK_SMOKE="1", OUT=str(tmp_path), MASTER_PORT=str(dw._free_port()),
               PYTHON=sys.executable)
    env.pop("PT_HPU_LAZY_MODE", None)
    proc = subprocess.run(["bash", os.path.join(dw.REPO, "scripts", "gaudi_check.sh")], env=env, cwd=dw.REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHECK ")]
    with open(os.path.join(dw.REPO, "scripts", "gaudi_check.sh")) as fh:
        documented = [ln[len("#   "):] for ln in fh if ln.startswith("#   CHECK ")]
    assert [ln.split(":")[0] for ln in lines] == [ln.split(":")[0] for ln in documented]
    assert [ln.split(": ")[1].split()[0] for ln in lines] == [ln.split(": ")[1].split()[0] for ln in documented]
    assert "gaudi_check: 20 checks, 0 FAIL" in proc.stdout
