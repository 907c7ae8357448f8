"""Per-rank bodies of tests/distributed/test_distributed.py: real engines (torch DDP, FSDP, FSDP2, DeepSpeed ZeRO-1/2/3,
optimum-habana's GaudiTrainer and transformers.Trainer) on CPU processes over gloo, plus the single-process
reference they are compared with.

The children are started with ``torch.multiprocessing`` (spawn) by :func:`launch`; each returns a dict of CPU
tensors / numbers that the parent compares. Everything is float32, tiny LLaMA (hidden 32, 2 layers), PaCA r=4 on
every projection, AdamW; each optimizer step sees a global batch of ``world * MICRO`` sequences of equal length
(no padding), so the mean loss over the global batch is the mean of the ranks' mean losses. Gradients are clipped
to a global norm of 1.0 everywhere (DeepSpeed 0.19.8 does that by default; each engine computes the norm over its
shards).

bf16 (``zero2_bf16``, ``zero3_bf16``): DeepSpeed's bf16 mode (the parameters cast to bf16, the buffers and PaCA's
``delta`` float32) with the gradient communication dtype of the DeepSpeed config this repository ships for the
stage, against :func:`reference` with the same cast (see there).

DeepSpeed: its CPU accelerator, stock package. ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]`` is set
False in the children: that optional C++ op (shared-memory all-reduce) serves only ``inference_all_reduce`` and would
otherwise be JIT-compiled on first use (about 3 minutes on 2 cores); training collectives go through gloo either way.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from typing import Dict, List

import torch

R, ALPHA, SEED = 4, 8.0, 3
MICRO, SEQ, LR = 2, 12, 1e-2
CLIP = 1.0  # gradient clipping by the global norm of all deltas (DeepSpeed's default, transformers' max_grad_norm)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


# ----------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn_name: str, world: int, port: int, out_dir: str, kwargs: dict) -> None:
    for p in (TESTS_DIR, REPO):
        if p not in sys.path:
            sys.path.insert(0, p)
    torch.set_num_threads(1)
    import torch.distributed as dist

    if world > 1:  # world 1: a plain single process (the reference), no process group, no launcher variables
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = globals()[fn_name](rank, world, **kwargs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def launch(fn_name: str, world: int = 2, timeout: float = 600, **kwargs) -> List[dict]:
    """Run ``fn_name(rank, world, **kwargs)`` in ``world`` spawned processes (gloo process group initialised) and
    return their results, rank order. Raises if a rank fails or the group does not finish within ``timeout``
    seconds (a hung collective fails the test instead of stalling it)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(fn_name, world, _free_port(), out_dir, kwargs), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn_name} on {world} ranks did not finish within {timeout:.0f} s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------- model, data, reference


def build_model(seed: int = 0):
    """Tiny LLaMA in training mode with PaCA on every projection (14 layers)."""
    from helpers import tiny_llama

    from paca_hpu import PaCAConfig, apply_paca

    model = tiny_llama(seed=seed)
    model.train()
    return apply_paca(model, PaCAConfig(r=R, paca_alpha=ALPHA, random_seed=SEED))


def global_batch(step: int, world: int) -> torch.Tensor:
    from helpers import random_ids

    return random_ids(world * MICRO, SEQ, seed=100 + step)


def local_batch(step: int, rank: int, world: int) -> torch.Tensor:
    return global_batch(step, world)[rank * MICRO:(rank + 1) * MICRO]


def probe_ids() -> torch.Tensor:
    from helpers import random_ids

    return random_ids(2, SEQ, seed=999)


def _optimizer(params):
    return torch.optim.AdamW(params, lr=LR)


def _clip(wrapped, params) -> None:
    """Clip to the global gradient norm :data:`CLIP` (FSDP1 has its own method; DTensor gradients work with torch's)."""
    if hasattr(wrapped, "clip_grad_norm_"):
        wrapped.clip_grad_norm_(CLIP)
    else:
        torch.nn.utils.clip_grad_norm_(params, CLIP)


def deepspeed_bf16_cast(model) -> None:
    """What DeepSpeed 0.19.8's engine does to a model in bf16 mode (``DeepSpeedEngine._configure_distributed_model``):
    every floating-point parameter cast to bf16 through ``p.data`` (``_cast_module_mixed_precision``; buffers keep
    their dtype unless the config sets ``buffer_dtype``), then ``module.to(device)``, where a PaCA layer puts its
    ``delta`` back to float32."""
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
    model.to("cpu")


def reference(world: int, steps: int, fixed_batch: bool = False, bf16: bool = False,
              partitioned: bool = False) -> Dict:
    """One process, the same global batches (``fixed_batch``: the first one at every step, what the trainer runs
    see): losses, deltas, the merged weights (the layer's own weight, kept merged by the write-back), the logits of a
    probe batch after training and (``base_logits``) with PaCA disabled. In float32 one step sees the whole global
    batch; ``bf16``: DeepSpeed's cast (:func:`deepspeed_bf16_cast`) and, as a data-parallel run computes, the
    gradient of each step averaged over the ranks' micro-batches (in bf16 a GEMM over 4 sequences need not round as
    two GEMMs over 2 do). ``partitioned`` (bf16): the PaCA layers compute on the bf16 base weights as they were
    before training, through ``torch.func.functional_call``, i.e. the rank-``r`` correction a ZeRO-3 engine's
    gathered weights get (PaCA never writes into them)."""
    from paca_hpu import disable_paca, paca_layers, paca_parameters

    model = build_model()
    if bf16:
        deepspeed_bf16_cast(model)
    fixed = {f"{n}.weight": m.weight.detach().clone() for n, m in paca_layers(model)} if partitioned else {}

    def run(ids, labels=None):
        if not partitioned:
            return model(input_ids=ids, labels=labels)
        return torch.func.functional_call(model, fixed, args=(), kwargs={"input_ids": ids, "labels": labels})

    opt = _optimizer(paca_parameters(model))
    losses = []
    for step in range(steps):
        ids = global_batch(0 if fixed_batch else step, world)
        parts = [ids[r * MICRO:(r + 1) * MICRO] for r in range(world)] if bf16 else [ids]
        loss = 0.0
        for part in parts:
            part_loss = run(part, part).loss
            (part_loss / len(parts)).backward()
            loss += float(part_loss.detach()) / len(parts)
        _clip(model, paca_parameters(model))
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    with torch.no_grad():
        logits = run(probe_ids()).logits
        with disable_paca(model):
            base_logits = run(probe_ids()).logits
    layers = dict(paca_layers(model))
    return {"losses": losses, "logits": logits, "base_logits": base_logits,
            "deltas": {n: m.delta.detach().clone() for n, m in layers.items()},
            "indices": {n: m.indices.clone() for n, m in layers.items()},
            "merged": {n: m.weight.detach().clone() for n, m in layers.items()}}


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    t = value.detach().clone()
    torch.distributed.all_reduce(t)
    return float(t) / world


def _finish(model, wrapped, losses, world, adapter_dir, base: bool = False, **extra) -> Dict:
    """Probe logits through the engine's forward (every rank; ``base``: also with PaCA disabled), the layers' own
    weights where they are whole on this rank (DDP, ZeRO-1/2: the merged columns live there; read after that
    forward, which refreshes them after an update the step hook did not see), the whole adapter (gathered on every
    rank, written by rank 0)."""
    from paca_hpu import adapter as adapter_mod
    from paca_hpu import atomic as atomic_mod
    from paca_hpu import disable_paca

    was_training = wrapped.training
    wrapped.eval()
    base_logits = None
    with torch.no_grad():
        logits = wrapped(input_ids=probe_ids()).logits.detach().clone()
        if base:
            with disable_paca(model):
                base_logits = wrapped(input_ids=probe_ids()).logits.detach().clone()
    wrapped.train(was_training)
    weights = _dense_weights(model)
    state = adapter_mod.adapter_state_dict(wrapped)
    writes, atomic_write = [], atomic_mod.write_atomic

    def spy(path, write):  # records which files this rank writes, then writes them
        writes.append(os.path.basename(str(path)))
        return atomic_write(path, write)

    atomic_mod.write_atomic = spy
    try:
        adapter_mod.save_adapter(wrapped, adapter_dir)
    finally:
        atomic_mod.write_atomic = atomic_write
    _barrier()
    return {"losses": losses, "logits": logits, "base_logits": base_logits, "adapter": state, "writes": writes,
            "weights": weights, **extra}


def _dense_weights(model) -> Dict[str, torch.Tensor]:
    """The layers' own weights where they are whole on this rank (DDP, ZeRO-1/2): the merged columns live there."""
    from paca_hpu import paca_layers

    return {n: m.weight.detach().clone() for n, m in paca_layers(model) if m.owns_weight()}


# ----------------------------------------------------------------------------- engines


def ddp_worker(rank: int, world: int, steps: int, adapter_dir: str) -> Dict:
    """Hand-written DistributedDataParallel loop; a communication hook counts the bytes all-reduced."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from paca_hpu import paca_parameters

    model = build_model()
    ddp = DDP(model)
    reduced = {"bytes": 0}

    def counting_allreduce(state, bucket):
        buf = bucket.buffer()
        reduced["bytes"] += buf.numel() * buf.element_size()
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    opt = _optimizer(paca_parameters(model))
    losses = []
    for step in range(steps):
        ids = local_batch(step, rank, world)
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        _clip(model, paca_parameters(model))
        opt.step()
        opt.zero_grad()
        losses.append(_mean_over_ranks(loss, world))
    return _finish(model, ddp, losses, world, adapter_dir, allreduce_bytes_per_step=reduced["bytes"] / steps)


def fsdp_worker(rank: int, world: int, steps: int, adapter_dir: str, version: int) -> Dict:
    """FSDP (version 1: FullyShardedDataParallel, FULL_SHARD, use_orig_params=True, one unit per decoder layer) or
    FSDP2 (version 2: fully_shard on each decoder layer and the root), torch optimizer on the sharded deltas."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from paca_hpu import paca_layers

    model = build_model()
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FSDP(model, use_orig_params=True, sharding_strategy=ShardingStrategy.FULL_SHARD,
                       auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu"))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    sharded = {n: tuple(m.weight.shape) != (m.out_features, m.in_features) or type(m.weight).__name__ == "DTensor"
               for n, m in paca_layers(model)}
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    opt = _optimizer(trainable)
    losses = []
    for step in range(steps):
        ids = local_batch(step, rank, world)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        _clip(wrapped, trainable)
        opt.step()
        opt.zero_grad()
        losses.append(_mean_over_ranks(loss, world))
    return _finish(model, wrapped, losses, world, adapter_dir, sharded=sharded)


def _deepspeed():
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see the module docstring
    return deepspeed


#: the DeepSpeed config this repository ships for each ZeRO stage (scripts/)
SHIPPED_DS_CONFIGS = {1: "ds_zero1.json", 2: "ds_zero2_gaudi.json", 3: "ds_zero3.json"}


def shipped_ds_config(stage: int) -> Dict:
    import json

    with open(os.path.join(REPO, "scripts", SHIPPED_DS_CONFIGS[stage])) as fh:
        return json.load(fh)


def _ds_config(stage: int, world: int, persist_small: bool = False, bf16: bool = False) -> Dict:
    cfg = {"train_batch_size": world * MICRO, "train_micro_batch_size_per_gpu": MICRO,
           "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6, "gradient_clipping": CLIP,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}},
           "zero_optimization": {"stage": stage},
           "comms_logger": {"enabled": True, "verbose": False, "prof_all": True}}
    if stage == 3 and not persist_small:  # partition every tensor, also the tiny ones (default: < 1e5 elements whole)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if bf16:  # bf16 mode, with the gradient communication dtype of the shipped config (DeepSpeed's default: bf16)
        cfg["bf16"] = {"enabled": True}
        comm = shipped_ds_config(stage).get("communication_data_type")
        if comm is not None:
            cfg["communication_data_type"] = comm
    return cfg


def deepspeed_worker(rank: int, world: int, steps: int, adapter_dir: str, stage: int, checkpoint: str = "",
                     persist_small: bool = False, bf16: bool = False) -> Dict:
    """Hand-written ``deepspeed.initialize`` loop (engine.backward / engine.step), no explicit ``sync_paca``.

    ZeRO-3 with ``checkpoint``: the model comes from ``from_pretrained`` under an active ZeRO-3 config, i.e. as
    ``zero.Init`` placeholders, and PaCA is applied to those; without it, PaCA is applied to the plain model and
    ``deepspeed.initialize`` partitions it afterwards. ``persist_small``: DeepSpeed's default persistence threshold
    (tensors under 1e5 elements, every weight of the tiny model, stay whole on every rank as "persistent" ZeRO-3
    parameters) instead of partitioning everything. DeepSpeed's comms logger records the bytes of each collective
    from the second step on (the first ZeRO-3 step also traces the module order)."""
    deepspeed = _deepspeed()
    from deepspeed.comm import comms_logger

    from paca_hpu import PaCAConfig, apply_paca, paca_layers, paca_parameters

    cfg = _ds_config(stage, world, persist_small, bf16)
    placeholders = False
    if checkpoint:
        from transformers import AutoModelForCausalLM

        deepspeed.init_distributed(dist_backend="gloo")  # before zero.Init reads the world size
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(cfg)  # noqa: F841  (transformers holds it by weak reference)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
        placeholders = tuple(model.model.layers[0].self_attn.q_proj.weight.shape) == (0,)
        model.train()
        apply_paca(model, PaCAConfig(r=R, paca_alpha=ALPHA, random_seed=SEED))
    else:
        model = build_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=paca_parameters(model), config=cfg)
    zero3 = {n: (hasattr(m.weight, "ds_id"), bool(getattr(m.weight, "ds_persist", False)))
             for n, m in paca_layers(model)}  # (a ZeRO-3 parameter, persistent)
    losses, comms = [], []
    for step in range(steps):
        comms_logger.comms_dict.clear()
        ids = local_batch(step, rank, world)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(_mean_over_ranks(loss, world))
        comms.append({op: {size: v[0] for size, v in sizes.items()}
                      for op, sizes in comms_logger.comms_dict.items()})
    dtypes = {n: (m.weight.dtype, m.delta.dtype) for n, m in paca_layers(model)}
    return _finish(model, engine, losses, world, adapter_dir, base=bf16, comms=comms, placeholders=placeholders,
                   zero3=zero3, dtypes=dtypes)


ENGINES = {"ddp": (ddp_worker, {}), "fsdp1": (fsdp_worker, {"version": 1}), "fsdp2": (fsdp_worker, {"version": 2}),
           "zero1": (deepspeed_worker, {"stage": 1}), "zero2": (deepspeed_worker, {"stage": 2}),
           "zero3": (deepspeed_worker, {"stage": 3}),
           "zero3_persistent": (deepspeed_worker, {"stage": 3, "persist_small": True}),
           "zero2_bf16": (deepspeed_worker, {"stage": 2, "bf16": True}),
           "zero3_bf16": (deepspeed_worker, {"stage": 3, "bf16": True}),
           "zero3_persistent_bf16": (deepspeed_worker, {"stage": 3, "persist_small": True, "bf16": True})}


def engines_worker(rank: int, world: int, steps: int, adapter_root: str, engines, checkpoint: str = "") -> Dict:
    """Several engines one after the other in the same processes (saves the start-up of a process group per
    engine): ``{engine: result}``; the adapter of each goes to ``adapter_root/<engine>``."""
    out = {}
    for name in engines:
        fn, kwargs = ENGINES[name]
        if name == "zero3" and checkpoint:
            kwargs = dict(kwargs, checkpoint=checkpoint)
        out[name] = fn(rank, world, steps=steps, adapter_dir=os.path.join(adapter_root, name), **kwargs)
    return out


# ----------------------------------------------------------------------------- trainers


def trainer_dataset(world: int):
    """``world * MICRO`` equal-length sequences: with ``per_device_train_batch_size=MICRO`` on ``world`` ranks (or
    ``world * MICRO`` on one) every optimizer step sees all of them, whatever order a sampler picks. The first
    label of each sequence is -100: transformers 4.55's Trainer divides the summed loss by the number of labels
    that are not -100 *before* the causal shift, so this makes its loss the plain mean over the predicted tokens
    (the label of position 0 is never predicted), as in :func:`reference`."""
    from datasets import Dataset

    ids = global_batch(0, world)
    labels = ids.clone()
    labels[:, 0] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def trainer_run(rank: int, world: int, kind: str, steps: int, out_dir: str, deepspeed_config: str = "",
                per_device: int = MICRO, resume: str = "", save_steps: int = 0, data_world: int = 0) -> Dict:
    """``make_trainer`` on ``kind`` ("gaudi": optimum-habana's GaudiTrainer in CPU mode; "hf": transformers.Trainer,
    with ``deepspeed_config`` if given); PaCA as :func:`build_model`. Returns the logged losses, the final deltas,
    the files written and whether this rank saves."""
    from transformers import TrainingArguments

    from paca_hpu import paca_layers
    from paca_hpu.trainer import build_training_arguments, make_trainer

    if deepspeed_config:
        _deepspeed()
    model = build_model()
    # AdamW as in reference(); adam_epsilon explicitly: GaudiTrainingArguments default to 1e-6, torch to 1e-8
    kw = dict(output_dir=out_dir, per_device_train_batch_size=per_device, max_steps=steps, logging_steps=1,
              report_to="none", learning_rate=LR, lr_scheduler_type="constant", seed=7, weight_decay=0.01,
              max_grad_norm=CLIP, adam_epsilon=1e-8, save_strategy="steps" if save_steps else "no",
              save_steps=save_steps or 500)
    if kind == "gaudi":
        args = build_training_arguments(**kw)
    else:
        args = TrainingArguments(use_cpu=True, deepspeed=deepspeed_config or None, **kw)
    trainer = make_trainer(model, args, train_dataset=trainer_dataset(data_world or world))
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model()
    _barrier()
    return {"losses": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
            "deltas": {n: m.delta.detach().float().clone() for n, m in paca_layers(model) if m.delta.numel()},
            "should_save": bool(trainer.args.should_save), "files": sorted(os.listdir(out_dir)),
            "wrapped": type(trainer.model_wrapped).__name__}


def _reset_accelerate(saved_env: Dict[str, str]) -> None:
    """Undo what a Trainer run leaves in the process (accelerate's singleton states, the ACCELERATE_* variables
    GaudiTrainingArguments exports), so that the next trainer in the same process is set up from scratch; the
    process group stays."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    for k in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in saved_env]:
        del os.environ[k]


#: the trainers of the default (CI) set: name -> (trainer_run kind, DeepSpeed config)
CI_TRAINERS = {"gaudi": ("gaudi", ""), "hf_zero2": ("hf", os.path.join(REPO, "scripts", "ds_zero2_gaudi.json"))}


def refusals_worker(rank: int, world: int) -> Dict[str, str]:
    """``apply_paca`` on a tiny LLaMA already wrapped by DDP or by FSDP2's ``fully_shard``: ``{engine: "<error
    type>: <message>"}`` (``"applied"`` if nothing was raised); ``disable_paca`` of a PaCA model with
    ``modules_to_save`` that ``fully_shard`` wraps: key ``"fsdp2_disable_modules_to_save"`` (``"disabled"`` if
    nothing was raised)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from helpers import tiny_llama

    from paca_hpu import PaCAConfig, apply_paca, disable_paca

    fsdp2 = tiny_llama(seed=0)
    mesh = init_device_mesh("cpu", (world,))
    for layer in fsdp2.model.layers:
        fully_shard(layer, mesh=mesh)
    wrapped = {"ddp": DDP(tiny_llama(seed=0)), "fsdp2": fully_shard(fsdp2, mesh=mesh)}
    out = {}
    for name, model in wrapped.items():
        try:
            apply_paca(model, PaCAConfig(r=R, paca_alpha=ALPHA, random_seed=SEED))
            out[name] = "applied"
        except Exception as err:  # noqa: BLE001  (the parent checks type and message)
            out[name] = f"{type(err).__name__}: {err}"
    policy = apply_paca(tiny_llama(seed=0), PaCAConfig(r=R, paca_alpha=ALPHA, modules_to_save=["lm_head"]))
    try:
        with disable_paca(fully_shard(policy, mesh=mesh)):
            out["fsdp2_disable_modules_to_save"] = "disabled"
    except Exception as err:  # noqa: BLE001
        out["fsdp2_disable_modules_to_save"] = f"{type(err).__name__}: {err}"
    return out


def ci_worker(rank: int, world: int, steps: int, root: str, engines) -> Dict:
    """The default (CI) set in ONE pair of processes (each process start imports transformers, optimum-habana and
    DeepSpeed: about 20 s on 2 loaded cores): the ``engines`` loops (:func:`engines_worker`, adapters in
    ``root/<engine>``), :func:`refusals_worker` (key ``"refusals"``), then each of :data:`CI_TRAINERS`
    (:func:`trainer_run`, output in ``root/<trainer>``)."""
    out = engines_worker(rank, world, steps, adapter_root=root, engines=engines)
    out["refusals"] = refusals_worker(rank, world)
    saved_env = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    for name, (kind, config) in CI_TRAINERS.items():
        _reset_accelerate(saved_env)
        out[name] = trainer_run(rank, world, kind=kind, steps=steps, out_dir=os.path.join(root, name),
                                deepspeed_config=config)
    return out
