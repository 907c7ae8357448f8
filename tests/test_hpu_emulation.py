"""HPU code paths driven on the CPU: a fake ``habana_frameworks``, fake-device autocast, GaudiTrainer's lazy mode.

No Gaudi is reachable from the machines this suite runs on, so these tests prove what can be proven without one:

* device detection: with the (test-only) fake plugin of ``tests/fake_habana`` on ``sys.path``, ``paca_hpu.device``
  reports an HPU, lazy mode from ``PT_HPU_LAZY_MODE``, routes ``mark_step`` to the plugin, and the default gather
  index dtype for that device is int32;
* lazy mode: optimum-habana's ``GaudiTrainer`` training loop, run on the CPU with its lazy-mode branch switched on,
  calls ``mark_step`` after every backward and after every optimizer step, and PaCA's write-back of the merged
  columns happens inside the optimizer step, i.e. between those two ``mark_step`` calls (so it is part of the
  optimizer-step graph, never of the forward/backward graph); with ``pipelining_fwd_bwd`` one more ``mark_step``
  separates forward and backward;
* HPU graphs for training (``--use_hpu_graphs_for_training``): ``GaudiTrainer`` wraps the model with the plugin's
  ``ModuleCacher``; the fake records a capture per input shape and, at every replay, any parameter or buffer whose
  storage moved (an HPU graph would keep reading the old address).  PaCA's write-back is in place: one capture,
  no moved storage, and the merged weights carry the trained deltas at the end;
* autocast on every device type: ``_PaCAFunction`` runs its GEMMs in the autocast dtype of the input's device
  (``hpu``, ``cuda``, ``cpu``) and returns float32 ``delta`` gradients, without warnings (fake tensors on fake
  ``hpu`` / ``cuda`` devices; the autocast state is the real per-device thread-local state).

What only a real Gaudi can confirm is listed in docs/hpu.md ("Verified where").
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import types
import warnings

import pytest
from helpers import ZeroStyleOptimizer
import torch
from torch import nn

import paca_hpu
from paca_hpu import PaCAConfig, PaCALinear, apply_paca, paca_layers
from paca_hpu import device as dev
from paca_hpu.layer import _PaCAFunction, default_index_dtype

FAKE_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_habana")
#: on a real Gaudi machine the fake must not shadow (or unload) the real plugin: those tests are skipped there
REAL_PLUGIN = FAKE_ROOT not in sys.path and importlib.util.find_spec("habana_frameworks") is not None


def _drop_habana_modules():
    for name in list(sys.modules):
        if name == "habana_frameworks" or name.startswith("habana_frameworks."):
            del sys.modules[name]


@contextlib.contextmanager
def fake_habana_installed(lazy: bool = True):
    """Put ``tests/fake_habana`` on ``sys.path`` for the duration; afterwards no trace is left (``sys.path``,
    ``sys.modules``, ``PT_HPU_LAZY_MODE``, paca_hpu's cached device detection)."""
    if REAL_PLUGIN:
        pytest.skip("the real habana_frameworks is installed: run the real thing instead of the fake")
    saved_env = {k: os.environ.get(k) for k in ("PT_HPU_LAZY_MODE", dev.DEVICE_ENV, "FAKE_HPU_AVAILABLE",
                                                  "DS_ACCELERATOR")}
    _drop_habana_modules()
    sys.path.insert(0, FAKE_ROOT)
    importlib.invalidate_caches()
    os.environ["PT_HPU_LAZY_MODE"] = "1" if lazy else "0"
    # DeepSpeed (when installed) picks its HPU accelerator as soon as habana_frameworks imports, and the fake has
    # none of what that accelerator calls: keep DeepSpeed on its CPU accelerator under the fake.
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.pop(dev.DEVICE_ENV, None)
    os.environ.pop("FAKE_HPU_AVAILABLE", None)
    try:
        fake = importlib.import_module("habana_frameworks.fake")
        fake.reset()
        dev.refresh()
        yield fake
    finally:
        try:
            sys.path.remove(FAKE_ROOT)
        except ValueError:
            pass
        _drop_habana_modules()
        importlib.invalidate_caches()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        dev.refresh()


@pytest.fixture
def fake_habana():
    with fake_habana_installed() as fake:
        yield fake


# --------------------------------------------------------------------------------------------------------------
# the fake itself: test-only, scoped
# --------------------------------------------------------------------------------------------------------------


def test_fake_plugin_is_scoped_and_never_shipped():
    assert importlib.util.find_spec("habana_frameworks") is None  # not importable outside the fixture
    with fake_habana_installed() as fake:
        import habana_frameworks.torch.core as htcore

        htcore.mark_step()
        assert fake.EVENTS == [("mark_step",)]
        assert "habana_frameworks" in sys.modules
    assert importlib.util.find_spec("habana_frameworks") is None
    assert not any(n == "habana_frameworks" or n.startswith("habana_frameworks.") for n in sys.modules)
    assert FAKE_ROOT not in sys.path and dev.device_type() == "cpu"
    # never shipped: the package list is paca_hpu only, and nothing in paca_hpu refers to the fake
    import configparser

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(repo, "setup.cfg"))
    assert cfg["options.packages.find"]["include"].split(",")[0].strip() == "paca_hpu"
    for root, _, files in os.walk(os.path.dirname(paca_hpu.__file__)):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(root, f)) as fh:
                    assert "fake_habana" not in fh.read(), f


# --------------------------------------------------------------------------------------------------------------
# device detection through the plugin
# --------------------------------------------------------------------------------------------------------------


def test_device_detection_lazy_mode_and_mark_step(fake_habana):
    info = dev.get_device_info()
    assert (info.type, info.lazy_mode, info.name, info.count) == ("hpu", True, "GAUDI2", 8)
    assert info.device == torch.device("hpu")
    assert default_index_dtype(info.device) == torch.int32  # the gather index dtype PaCA picks on this device
    dev.mark_step()
    dev.synchronize()
    assert fake_habana.kinds() == ["mark_step", "synchronize"]  # synchronize also ends the lazy graph first
    dev.manual_seed_all(7)
    assert fake_habana.EVENTS[-1] == ("manual_seed_all", 7)
    assert dev.memory_stats()["total_memory_available (GB)"] == 96.0


def test_eager_mode_has_no_mark_step():
    with fake_habana_installed(lazy=False) as fake:
        info = dev.get_device_info()
        assert info.type == "hpu" and not info.lazy_mode
        dev.mark_step()
        assert fake.EVENTS == []


@pytest.mark.optimum_habana
def test_training_arguments_for_the_detected_hpu(fake_habana):
    """What ``run_paca_clm.py`` would hand ``GaudiTrainingArguments`` on this (fake) Gaudi, for the launchers' flags.
    (The dataclass itself is not built: with ``use_habana`` it patches transformers for Gaudi process-wide.)"""
    from paca_hpu.trainer import adjust_for_device, arguments_class

    info = dev.get_device_info()
    assert arguments_class(info.type).__name__ == "GaudiTrainingArguments"
    v = adjust_for_device({"use_habana": True, "use_lazy_mode": True, "use_hpu_graphs_for_training": True,
                           "bf16": True}, info)
    assert v["use_habana"] and v["use_lazy_mode"] and v["use_hpu_graphs_for_training"] and not v.get("use_cpu")
    with pytest.raises(ValueError, match="PT_HPU_LAZY_MODE=0"):  # lazy mode and torch.compile are exclusive
        adjust_for_device({"use_habana": True, "torch_compile": True}, info)
    v = adjust_for_device({"use_habana": True, "torch_compile": True, "use_lazy_mode": False}, info)
    assert v["torch_compile_backend"] == "hpu_backend" and not v["use_lazy_mode"]


# --------------------------------------------------------------------------------------------------------------
# GaudiTrainer: lazy mode mark_step placement and HPU graphs for training, with PaCA's write-back
# --------------------------------------------------------------------------------------------------------------

SEQ = 8


def _tiny_paca_llama():
    from helpers import tiny_llama

    from paca_hpu.trainer import prepare_model

    model = tiny_llama(seed=3, layers=1)
    model.train()
    return prepare_model(model, "paca", r=4, alpha=8)


def _dataset(n=8):
    from helpers import random_ids

    ids = random_ids(n, SEQ, seed=11)  # fixed length: static shapes, as --pad_to_max_length gives on HPU
    return [{"input_ids": row, "labels": row} for row in ids]


def _run_gaudi_trainer_lazy(fake, tmp_path, monkeypatch, *, pipelining: bool, max_steps: int = 2, ga: int = 2,
                            forward_write_back: bool = False):
    """GaudiTrainer's CPU path with its lazy-mode and HPU-graph branches switched on (``use_lazy_mode``,
    ``use_hpu_graphs_for_training``, ``htcore`` = the fake plugin's core); events are recorded in ``fake.EVENTS``."""
    import habana_frameworks.torch.core as htcore

    from paca_hpu.trainer import build_training_arguments, make_trainer

    model = _tiny_paca_llama()
    layers = dict(paca_layers(model))
    base_columns = {n: layer.original_columns.clone() for n, layer in layers.items()}
    for name, layer in layers.items():
        layer.delta.register_post_accumulate_grad_hook(lambda p, name=name: fake.record("backward", name))
    real_sync = PaCALinear.sync

    def recording_sync(self):
        fake.record("write_back")
        return real_sync(self)

    monkeypatch.setattr(PaCALinear, "sync", recording_sync)
    if forward_write_back:  # a deliberately wrong design, to show the ordering check can fail
        real_forward = PaCALinear.forward

        def forward(self, x):
            self.sync()
            return real_forward(self, x)

        monkeypatch.setattr(PaCALinear, "forward", forward)

    cpu = dev.DeviceInfo("cpu", torch.device("cpu"))  # tensors stay on the CPU: GaudiTrainer's CPU path ...
    args = build_training_arguments(
        info=cpu, output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=ga, learning_rate=5e-2, report_to="none", save_strategy="no",
        eval_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0,
    )
    args.use_lazy_mode = True  # ... with the lazy-mode and HPU-graph branches of its training loop switched on
    args.use_hpu_graphs_for_training = True  # (build_training_arguments turns these HPU-only fields off on a CPU)
    args.pipelining_fwd_bwd = pipelining
    trainer = make_trainer(model, args, train_dataset=_dataset())
    trainer.htcore = htcore
    fake.reset()
    trainer.train()
    return model, layers, base_columns


def _expected_lazy_sequence(steps, ga, pipelining):
    micro = ["forward", "mark_step", "backward", "mark_step"] if pipelining else ["forward", "backward", "mark_step"]
    return (micro * ga + ["write_back", "mark_step"]) * steps


def _lazy_kinds(fake):
    rename = {"hpu_graph_capture": "forward", "hpu_graph_replay": "forward"}
    events = [(rename.get(e[0], e[0]),) + e[1:] for e in fake.EVENTS if e[0] in rename or e[0] in
              ("mark_step", "backward", "write_back", "hpu_graph_stale_address")]
    return fake.kinds(events)


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelining_fwd_bwd"])
@pytest.mark.optimum_habana
def test_gaudi_trainer_lazy_mode_mark_steps_and_hpu_graphs(fake_habana, tmp_path, monkeypatch, reset_accelerate,
                                                           pipelining):
    steps, ga = 2, 2
    model, layers, base_columns = _run_gaudi_trainer_lazy(fake_habana, tmp_path, monkeypatch, pipelining=pipelining,
                                                          max_steps=steps, ga=ga)
    # mark_step after every backward and after every optimizer step; the write-back sits between the last
    # backward's mark_step and the optimizer step's mark_step: it is part of the optimizer-step graph
    assert _lazy_kinds(fake_habana) == _expected_lazy_sequence(steps, ga, pipelining)
    # HPU graphs: wrapped once, captured once (one input shape), replayed for every later micro-batch, and no
    # parameter or buffer storage ever moved (the write-back is in place)
    events = fake_habana.EVENTS
    assert [e[0] for e in events].count("hpu_graph_wrap") == 1  # by GaudiTrainer._wrap_model ...
    assert sum(e[0] == "hpu_graph_capture" for e in events) == 1
    assert sum(e[0] == "hpu_graph_replay" for e in events) == steps * ga - 1
    assert not [e for e in events if e[0] == "hpu_graph_stale_address"]
    assert getattr(model, "_fake_hpu_graph", None) is not None  # ... with the (fake) plugin's ModuleCacher
    # the write-back reached the weights the graph reads
    for name, layer in layers.items():
        assert torch.count_nonzero(layer.delta) > 0, name
        expected = (base_columns[name].float() + layer.scaling * layer.delta.detach()).to(layer.weight.dtype)
        torch.testing.assert_close(layer.weight.detach().index_select(1, layer.indices.long()), expected,
                                   rtol=0, atol=0, msg=name)


@pytest.mark.optimum_habana
def test_lazy_mode_ordering_check_catches_a_forward_write_back(fake_habana, tmp_path, monkeypatch, reset_accelerate):
    _run_gaudi_trainer_lazy(fake_habana, tmp_path, monkeypatch, pipelining=False, max_steps=1, ga=1,
                            forward_write_back=True)
    assert _lazy_kinds(fake_habana) != _expected_lazy_sequence(1, 1, False)


def test_hpu_graph_fake_catches_a_weight_that_is_replaced_not_updated(fake_habana):
    import habana_frameworks.torch as ht

    from helpers import random_ids

    model = _tiny_paca_llama()
    ht.hpu.ModuleCacher()(model=model, inplace=True)
    ids = random_ids(2, SEQ)
    model(input_ids=ids)
    layer = model.model.layers[0].self_attn.q_proj
    layer.sync()  # in place: fine
    model(input_ids=ids)
    assert not [e for e in fake_habana.EVENTS if e[0] == "hpu_graph_stale_address"]
    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)  # a new tensor: stale
    model(input_ids=ids)
    stale = [e for e in fake_habana.EVENTS if e[0] == "hpu_graph_stale_address"]
    assert stale == [("hpu_graph_stale_address", "LlamaForCausalLM", "model.layers.0.self_attn.q_proj.weight")]


# --------------------------------------------------------------------------------------------------------------
# autocast on every device type
# --------------------------------------------------------------------------------------------------------------


class _Ctx:
    """Stands in for autograd's ctx: the forward / backward staticmethods are called directly, because autograd's
    engine needs a real device (fake ``cuda`` / ``hpu`` tensors abort it on a CPU build)."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


class _TorchHpuShim(types.ModuleType):
    """The bits of ``torch.hpu`` (registered by the real plugin) that fake tensors on ``hpu`` ask for."""

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def current_device(self):
        return 0

    def device_count(self):
        return 1


@contextlib.contextmanager
def _autocast_state(device_type, enabled, dtype):
    prev = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, enabled)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, prev[0])
        torch.set_autocast_dtype(device_type, prev[1])


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16, None], ids=["bf16", "fp16", "off"])
@pytest.mark.parametrize("device_type", ["hpu", "cuda", "cpu"])
def test_autograd_function_autocast_on_every_device_type(device_type, autocast_dtype, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    if device_type == "hpu" and not hasattr(torch, "hpu"):
        monkeypatch.setattr(torch, "hpu", _TorchHpuShim("torch.hpu"), raising=False)
    mode = FakeTensorMode()

    def make(*shape, dtype=torch.float32):
        return FakeTensor(mode, torch.empty(*shape, device="meta", dtype=dtype), torch.device(device_type))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation (or any other) warning
        with mode:
            x, w, b = make(2, 5, 16), make(8, 16), make(8)
            delta, idx = make(8, 4), make(4, dtype=torch.int32)
            ctx = _Ctx((True, False, False, True, False, False))
            with _autocast_state(device_type, autocast_dtype is not None, autocast_dtype or torch.bfloat16):
                y = _PaCAFunction.forward(ctx, x, w, b, delta, idx, 2.0)
            with torch.no_grad():  # as the autograd engine runs a backward without create_graph
                grad_x, _, _, grad_delta, _, _ = _PaCAFunction.backward(ctx, torch.ones_like(y))
    compute = autocast_dtype or torch.float32
    assert y.device.type == device_type and y.dtype == compute and y.shape == (2, 5, 8)
    assert ctx.saved_tensors[0].dtype == compute and ctx.saved_tensors[0].shape == (2, 5, 4)  # only x[..., idx]
    assert grad_x.dtype == torch.float32 and grad_x.shape == x.shape  # the input's dtype
    assert grad_delta.dtype == torch.float32 and grad_delta.shape == (8, 4)


def test_autocast_uses_the_device_generic_api_only():
    for name in ("base", "dense", "partitioned", "quantized4bit"):  # every file of the layer package
        src = inspect.getsource(importlib.import_module(f"paca_hpu.layer.{name}"))
        assert "torch.autocast" in src or "_autocast_off" in src, name  # the file is read (the check can fail)
        assert "torch.cuda.amp" not in src and "cuda.amp" not in src, name
    # and a real CPU autocast round trip emits no warning at all
    model = apply_paca(nn.Sequential(nn.Linear(16, 8)), PaCAConfig(r=4))
    x = torch.randn(3, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and model[0].delta.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------
# 8 cards with DeepSpeed: ZeRO's optimizer is not a torch.optim.Optimizer
# --------------------------------------------------------------------------------------------------------------




def test_write_back_reaches_the_weights_with_a_zero_style_optimizer(tmp_path, reset_accelerate):
    from transformers import get_constant_schedule

    from paca_hpu.trainer import build_training_arguments, make_trainer

    model = _tiny_paca_llama()
    layers = dict(paca_layers(model))
    base_columns = {n: layer.original_columns.clone() for n, layer in layers.items()}
    args = build_training_arguments(
        info=dev.DeviceInfo("cpu", torch.device("cpu")), output_dir=str(tmp_path), max_steps=2,
        per_device_train_batch_size=2, report_to="none", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=0.0,
    )
    opt = ZeroStyleOptimizer(model.parameters(), lr=5e-2)
    trainer = make_trainer(model, args, train_dataset=_dataset(),
                           optimizers=(opt, get_constant_schedule(opt.optimizer)))
    trainer.train()
    for name, layer in layers.items():
        assert torch.count_nonzero(layer.delta) > 0, name  # the deltas did train ...
        expected = (base_columns[name].float() + layer.scaling * layer.delta.detach()).to(layer.weight.dtype)
        torch.testing.assert_close(layer.weight.detach().index_select(1, layer.indices.long()), expected,
                                   rtol=0, atol=0, msg=name)  # ... and the forward must see them


# --------------------------------------------------------------------------------------------------------------
# the Gaudi launchers (scripts/): their commands are valid run_paca_clm.py command lines for an HPU
# --------------------------------------------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")


def _dry_run(script, **env):
    import subprocess

    full_env = {k: v for k, v in os.environ.items() if k not in ("GAUDI_SPAWN", "DISTRIBUTED", "PT_HPU_LAZY_MODE")}
    full_env.update(DRY_RUN="1", HOME=str(env.pop("HOME", full_env.get("HOME", "/nonexistent"))), **env)
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, script)], env=full_env, capture_output=True, text=True,
                          timeout=60)
    return proc


def _split_command(line):
    import shlex

    tokens = shlex.split(line)
    assert tokens[0] == "PT_HPU_LAZY_MODE=1", tokens[0]
    i = next(i for i, t in enumerate(tokens) if t.endswith("scripts/run_paca_clm.py"))
    assert tokens[i] == os.path.join(SCRIPTS, "run_paca_clm.py")
    return tokens[1:i], tokens[i + 1:]


def _hpu_training_values(argv):
    """Parse ``argv`` with run_paca_clm.py's own dataclasses (unknown flags fail) and adjust the training arguments
    for a Gaudi2 as the script does.  The HPU dataclass itself is not built (see
    test_training_arguments_for_the_detected_hpu)."""
    from transformers import HfArgumentParser

    from paca_hpu import cli
    from paca_hpu.trainer import adjust_for_device, arguments_class

    hpu = dev.DeviceInfo("hpu", torch.device("hpu"), lazy_mode=True, name="GAUDI2", count=8)
    classes = cli.argument_classes(arguments_class("hpu"))
    parser = HfArgumentParser(classes)
    namespace, unknown = parser.parse_known_args(argv)
    assert unknown == [], unknown
    values = vars(namespace)
    training_fields = {f.name for f in __import__("dataclasses").fields(classes[3]) if f.init}
    training = adjust_for_device({k: v for k, v in values.items() if k in training_fields}, hpu, classes[3])
    return values, training


@pytest.mark.parametrize("script", ["run_gaudi_single.sh", "run_gaudi_8x.sh"])
def test_launchers_are_valid_shell(script):
    import subprocess

    path = os.path.join(SCRIPTS, script)
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0


@pytest.mark.optimum_habana
def test_single_card_launcher_command():
    proc = _dry_run("run_gaudi_single.sh", HOME="/nonexistent")
    assert proc.returncode == 0, proc.stderr
    launcher, argv = _split_command(proc.stdout.strip())
    assert len(launcher) == 1 and launcher[0].endswith("python3")
    values, training = _hpu_training_values(argv)
    assert values["peft_type"] == "paca" and values["paca_r"] == 8 and values["target_modules"] == ["all-linear"]
    assert values["model_name_or_path"] is None  # the main job: the embedded default model and data
    assert training["use_habana"] and training["use_lazy_mode"] and training["use_hpu_graphs_for_training"]
    assert training["bf16"] and training["dataloader_drop_last"] and not training.get("deepspeed")
    # extra flags win; lazy mode can be switched to plain (no HPU graphs)
    proc = _dry_run("run_gaudi_single.sh", HPU_GRAPHS="0")
    _, argv = _split_command(proc.stdout.strip())
    assert "--use_hpu_graphs_for_training" not in argv
    proc = _dry_run("run_gaudi_single.sh", PT_HPU_LAZY_MODE="0")
    assert proc.returncode == 2 and "PT_HPU_LAZY_MODE=0" in proc.stderr


@pytest.mark.optimum_habana
def test_eight_card_launcher_command_deepspeed(tmp_path):
    import json

    proc = _dry_run("run_gaudi_8x.sh", HOME=str(tmp_path))  # no gaudi_spawn.py anywhere: the deepspeed launcher
    assert proc.returncode == 0, proc.stderr
    launcher, argv = _split_command(proc.stdout.strip())
    assert launcher[:8] == ["deepspeed", "--num_nodes", "1", "--num_gpus", "8", "--no_local_rank", "--master_port",
                            "29500"]
    values, training = _hpu_training_values(argv)
    assert training["use_habana"] and training["use_lazy_mode"] and training["bf16"]
    assert not training["use_hpu_graphs_for_training"]
    config_path = training["deepspeed"]
    assert config_path == os.path.join(SCRIPTS, "ds_zero2_gaudi.json")
    with open(config_path) as fh:
        ds = json.load(fh)
    assert ds["zero_optimization"]["stage"] in (1, 2)  # ZeRO-3 would partition the frozen merged weights
    assert ds["bf16"]["enabled"] in (True, "auto")
    assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"  # from the flags

    # with optimum-habana's gaudi_spawn.py found next to the repository's parent or in $HOME
    spawn = tmp_path / "optimum-habana" / "examples" / "gaudi_spawn.py"
    spawn.parent.mkdir(parents=True)
    spawn.write_text("# placeholder\n")
    proc = _dry_run("run_gaudi_8x.sh", HOME=str(tmp_path))
    launcher, argv = _split_command(proc.stdout.strip())
    assert launcher[1:] == [str(spawn), "--world_size", "8", "--use_deepspeed"]
    # DDP over MPI instead of DeepSpeed
    proc = _dry_run("run_gaudi_8x.sh", HOME=str(tmp_path), DISTRIBUTED="mpi", WORLD_SIZE="4")
    launcher, argv = _split_command(proc.stdout.strip())
    assert launcher[1:] == [str(spawn), "--world_size", "4", "--use_mpi"]
    _, training = _hpu_training_values(argv)
    assert not training.get("deepspeed")
    assert _dry_run("run_gaudi_8x.sh", DISTRIBUTED="bogus").returncode == 2
