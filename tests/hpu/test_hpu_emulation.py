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
  ``ModuleCacher``; the fake replays the recorded ops without running Python, as the plugin does, and records any
  parameter or buffer whose storage moved.  PaCA's write-back is in place; gradients accumulate as without graphs;
  what a frozen Python branch would get wrong is refused or refreshed before the replay (``paca_hpu.hpu_graphs``);
* with Habana's FusedClipNorm / FusedAdamW the write-back is a lazy graph of its own (the sequence docs/hpu.md
  prints); a Gaudi config's autocast op lists are declared before the plugin starts; the throughput counts tokens
  on the host; the launchers' commands parse for a Gaudi2;
* autocast on every device type: ``_PaCAFunction`` runs its GEMMs in the autocast dtype of the input's device
  (``hpu``, ``cuda``, ``cpu``) and returns float32 ``delta`` gradients, without warnings (fake tensors on fake
  ``hpu`` / ``cuda`` devices; the autocast state is the real per-device thread-local state).

What only a real Gaudi can confirm is listed in docs/hpu.md ("Verified where").
"""
from __future__ import annotations

from helpers import REPO_DIR, TESTS_DIR  # the repository root / tests folder
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

FAKE_ROOT = os.path.join(TESTS_DIR, "fake_habana")
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

    repo = REPO_DIR
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
# a Gaudi config's autocast op lists: declared before the plugin starts (it reads them once, at import)
# --------------------------------------------------------------------------------------------------------------

OP_LISTS = {"bf16": ["add", "addmm", "bmm", "linear", "matmul", "mm"], "fp32": ["embedding", "log_softmax"]}
#: the variables optimum-habana's GaudiConfig.declare_autocast_bf16_fp32_ops sets (gaudi_configuration.py)
OP_LIST_VARIABLES = ("PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST", "PT_HPU_AUTOCAST_FP32_OPS_LIST")

_PARSE_IN_FRESH_PROCESS = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])  # tests/fake_habana
from paca_hpu import cli
out = {}
try:
    cli.parse_args(json.loads(sys.argv[2]))
    out["error"] = None
except BaseException as err:
    out["error"] = f"{type(err).__name__}: {err}"
core = sys.modules.get("habana_frameworks.torch.core")
out["lists"] = None if core is None else {k: list(v) if v else v for k, v in core.AUTOCAST_OP_LISTS.items()}
print("RESULT " + json.dumps(out))
"""


def _gaudi_config_with_op_lists(tmp_path):
    import json

    folder = tmp_path / "gaudi_config"
    folder.mkdir()
    (folder / "gaudi_config.json").write_text(json.dumps({
        "use_torch_autocast": True, "use_fused_adam": True, "use_fused_clip_norm": True,
        "autocast_bf16_ops": OP_LISTS["bf16"], "autocast_fp32_ops": OP_LISTS["fp32"]}))
    return str(folder)


@pytest.mark.optimum_habana
def test_gaudi_config_op_lists_are_declared_before_the_plugin_starts(tmp_path):
    """run_paca_clm.py --use_habana --bf16 --gaudi_config_name <config with autocast op lists> on a (fake) Gaudi.
    The script used to import habana_frameworks.torch to detect the device before the training arguments existed,
    so GaudiTrainingArguments refused to declare the lists (RuntimeError, optimum-habana's gaudi_configuration.py);
    bitsandbytes (installed here) imports the plugin too, when optimum-habana is imported. Now the lists are in
    effect when the plugin starts: the fake reads them at import, as the real plugin does, and they are the lists
    optimum-habana's own GaudiConfig reads from the file. The fake has none of Habana's fused kernels, so building
    the HPU training arguments then stops where optimum-habana imports its Gaudi model classes
    (adapt_transformers_to_gaudi, after the declaration)."""
    import json
    import subprocess

    if REAL_PLUGIN:
        pytest.skip("the real habana_frameworks is installed")
    from paca_hpu import _optimum_habana as oh

    config = _gaudi_config_with_op_lists(tmp_path)
    argv = ["--use_habana", "--use_lazy_mode", "--bf16", "--gaudi_config_name", config, "--model_name_or_path", "x",
            "--output_dir", str(tmp_path / "out")]
    env = dict(os.environ, PT_HPU_LAZY_MODE="1", DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    for k in (dev.DEVICE_ENV, *OP_LIST_VARIABLES):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", _PARSE_IN_FRESH_PROCESS, FAKE_ROOT, json.dumps(argv)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(line[-1][len("RESULT "):])
    assert out["error"] is not None and "Setting bf16/fp32 ops" not in out["error"], out["error"]
    assert out["error"].startswith("ModuleNotFoundError") and "habana_frameworks.torch.hpex.kernels" in out["error"]
    _, _, GaudiConfig = oh.gaudi_classes()
    upstream = GaudiConfig.from_pretrained(config)
    assert out["lists"] == {"bf16": upstream.autocast_bf16_ops, "fp32": upstream.autocast_fp32_ops} == OP_LISTS


@pytest.mark.optimum_habana
def test_fake_plugin_enforces_the_op_list_import_order(fake_habana, tmp_path, monkeypatch):
    """The rule the test above relies on, shown to bite: once habana_frameworks.torch.core is imported, optimum-
    habana refuses to declare a Gaudi config's op lists, and the lists the (fake) plugin runs with stay unset."""
    import habana_frameworks.torch.core as htcore

    from paca_hpu import _optimum_habana as oh

    for variable in OP_LIST_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    _, _, GaudiConfig = oh.gaudi_classes()
    with pytest.raises(RuntimeError, match="has already been imported"):
        GaudiConfig.from_pretrained(_gaudi_config_with_op_lists(tmp_path)).declare_autocast_bf16_fp32_ops()
    assert htcore.AUTOCAST_OP_LISTS == {"bf16": None, "fp32": None}


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


def _lazy_trainer(model, tmp_path, *, max_steps: int = 2, ga: int = 2, pipelining: bool = False,
                  hpu_graphs: bool = True, fused: bool = False, **extra):
    """optimum-habana's GaudiTrainer on its CPU path (tensors stay on the CPU) with its lazy-mode and HPU-graph
    branches switched on (``use_lazy_mode``, ``use_hpu_graphs_for_training``, ``htcore`` = the fake plugin's core;
    build_training_arguments turns these HPU-only fields off on a CPU). ``fused``: GaudiConfig's HPU defaults,
    Habana's FusedAdamW and FusedClipNorm (from the fake plugin; GaudiTrainer takes them only with ``use_habana``,
    and its log() then reads the fake plugin's memory numbers)."""
    import habana_frameworks.torch.core as htcore

    from paca_hpu import _optimum_habana as oh
    from paca_hpu.trainer import build_training_arguments, make_trainer

    args = build_training_arguments(
        info=dev.DeviceInfo("cpu", torch.device("cpu")), output_dir=str(tmp_path), max_steps=max_steps,
        per_device_train_batch_size=2, gradient_accumulation_steps=ga, learning_rate=5e-2, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        max_grad_norm=1.0, **extra)
    args.use_lazy_mode = True
    args.use_hpu_graphs_for_training = hpu_graphs
    args.pipelining_fwd_bwd = pipelining
    trainer = make_trainer(model, args, train_dataset=_dataset(), gaudi_config=oh.make_gaudi_config(use_habana=fused))
    trainer.htcore = htcore
    args.use_habana = fused
    return trainer


def _run_gaudi_trainer_lazy(fake, tmp_path, monkeypatch, *, pipelining: bool, max_steps: int = 2, ga: int = 2,
                            forward_write_back: bool = False, fused: bool = False):
    """:func:`_lazy_trainer` on a tiny PaCA LLaMA with HPU graphs; events (``backward`` per delta gradient,
    ``write_back`` per layer sync) are recorded in ``fake.EVENTS``."""
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

    trainer = _lazy_trainer(model, tmp_path, max_steps=max_steps, ga=ga, pipelining=pipelining, fused=fused)
    fake.reset()
    trainer.train()
    return model, layers, base_columns


def _expected_lazy_sequence(steps, ga, pipelining):
    micro = ["forward", "mark_step", "backward", "mark_step"] if pipelining else ["forward", "backward", "mark_step"]
    return (micro * ga + ["write_back", "mark_step"]) * steps


def _lazy_kinds(fake, extra=()):
    rename = {"hpu_graph_capture": "forward", "hpu_graph_replay": "forward"}
    events = [(rename.get(e[0], e[0]),) + e[1:] for e in fake.EVENTS if e[0] in rename or e[0] in
              ("mark_step", "backward", "write_back", "hpu_graph_stale_address", *extra)]
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


#: docs/hpu.md's lazy-mode graph sequence of one optimizer step with gradient accumulation 2, GaudiTrainer's HPU
#: defaults (FusedClipNorm, FusedAdamW): the names of the recorded events as the page writes them
DOC_STEP_NAMES = {"forward": "forward", "backward": "backward", "mark_step": "mark_step",
                  "fused_clip_norm": "FusedClipNorm", "fused_adamw": "FusedAdamW", "write_back": "PaCA write-back"}


@pytest.mark.optimum_habana
def test_lazy_mode_graphs_with_habana_fused_optimizer_match_the_docs(fake_habana, tmp_path, monkeypatch,
                                                                     reset_accelerate):
    """With GaudiTrainer's HPU defaults, Habana's FusedClipNorm and FusedAdamW each end a lazy graph before and after
    their fused op (``step_closure._mark_step_if_lazy``), so PaCA's write-back (the optimizer step post-hook, after
    FusedAdamW's closing mark_step) is a small graph of its own, not part of a "clip + step + write-back" graph.
    docs/hpu.md prints this sequence; it must be the one GaudiTrainer produces."""
    _run_gaudi_trainer_lazy(fake_habana, tmp_path, monkeypatch, pipelining=False, max_steps=1, ga=2, fused=True)
    kinds = _lazy_kinds(fake_habana, extra=("fused_clip_norm", "fused_adamw"))
    assert kinds == ["forward", "backward", "mark_step", "forward", "backward", "mark_step", "fused_clip_norm",
                     "mark_step", "fused_adamw", "mark_step", "write_back", "mark_step"]
    line = " | ".join(DOC_STEP_NAMES[k] for k in kinds).replace("forward | backward", "forward+backward")
    with open(os.path.join(REPO, "docs", "hpu.md")) as fh:
        assert line in fh.read(), line


def test_fake_hpu_graph_replays_without_running_python(fake_habana):
    """The fake ModuleCacher behaves as the real one: after the capture, a replay runs none of the module's Python
    (a Python-side factor is frozen at its capture value), the captured ops read the parameters in place, and the
    original forward runs in eval mode or without grad."""
    import habana_frameworks.torch as ht

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.factor = 1.0

        def forward(self, x):
            return self.lin(x) * self.factor

    m = Scaled()
    ht.hpu.ModuleCacher()(model=m, inplace=True)
    x = torch.randn(2, 4)
    first = m(x).detach().clone()
    m.factor = 3.0
    torch.testing.assert_close(m(x), first, rtol=0, atol=0)  # replayed: the new factor is never read
    with torch.no_grad():
        m.lin.weight.mul_(2)  # in place: the replay reads it
        eager = m(x)  # no grad: the original forward, new factor
    torch.testing.assert_close(eager, (x @ m.lin.weight.T + m.lin.bias) * 3.0)
    torch.testing.assert_close(m(x).detach(), x @ m.lin.weight.T + m.lin.bias)
    assert fake_habana.kinds() == ["hpu_graph_wrap", "hpu_graph_capture", "hpu_graph_replay", "hpu_graph_eager",
                                   "hpu_graph_replay"]


def _grad_recorder(model):
    """A trainer callback keeping a copy of every trainable gradient at each optimizer step (after clipping, before
    the update) in its ``grads`` list."""
    from transformers import TrainerCallback

    class GradRecorder(TrainerCallback):
        grads = []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    return GradRecorder()


def _tiny_model(peft_type: str, r: int):
    from helpers import tiny_llama

    from paca_hpu.trainer import prepare_model

    model = tiny_llama(seed=3, layers=1)
    model.train()
    with torch.random.fork_rng():  # peft initialises lora_A from the global generator
        torch.manual_seed(3)
        return prepare_model(model, peft_type, r=r, alpha=8)


@pytest.mark.parametrize("peft_type,r", [("paca", 1), ("lora", 4)], ids=["paca_r1", "lora"])
@pytest.mark.optimum_habana
def test_hpu_graphs_accumulate_gradients_as_without(fake_habana, tmp_path, reset_accelerate, peft_type, r):
    """Gradient accumulation 2 with and without HPU graphs: the same gradients at every optimizer step and the same
    trained parameters. A graph hands out each gradient in one fixed buffer; where a parameter had no ``.grad`` yet,
    autograd kept that buffer as ``.grad``, so the next replay overwrote it and the sum came out as ``2 * g_2``
    (PaCA with r = 1, LoRA; PaCA's transposed ``delta`` gradient for r >= 2 is copied and escaped). The trainer's
    HPU-graph guard gives every trainable parameter a gradient of its own before the first replay."""
    runs = {}
    for graphs in (False, True):
        model = _tiny_model(peft_type, r)
        trainer = _lazy_trainer(model, tmp_path / f"graphs{graphs}", max_steps=2, ga=2, hpu_graphs=graphs)
        recorder = _grad_recorder(model)
        recorder.grads = []
        trainer.add_callback(recorder)
        trainer.train()
        runs[graphs] = recorder.grads, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert [e[0] for e in fake_habana.EVENTS].count("hpu_graph_replay") == 3  # 4 micro-batches: 1 capture, 3 replays
    (grads, params), (want_grads, want_params) = runs[True], runs[False]
    assert len(grads) == len(want_grads) == 2 and grads[0].keys() == want_grads[0].keys()
    for step, want in zip(grads, want_grads):
        for name, g in want.items():
            torch.testing.assert_close(step[name], g, rtol=1e-6, atol=1e-9, msg=name)
    for name, p in want_params.items():
        torch.testing.assert_close(params[name], p, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.optimum_habana
def test_paca_features_under_hpu_graphs_are_correct_or_refused(fake_habana, tmp_path, reset_accelerate):
    """After GaudiTrainer captured its HPU graph, a training-mode forward with grad on is a replay that runs none of
    PaCA's Python. disable_paca, functional_paca and a substituted delta (torch.func.functional_call) are refused
    with the fix in the message (a replay would silently compute the enabled, fused, captured forward); without grad
    the disabled model is the base model bit for bit (that forward runs eagerly); a delta changed outside an
    optimizer step is written back before the replay, so the replayed logits equal the eager ones."""
    from helpers import random_ids, tiny_llama

    from paca_hpu import disable_paca, functional_paca

    model = _tiny_paca_llama()
    _lazy_trainer(model, tmp_path, max_steps=1, ga=1).train()
    model.train()
    ids = random_ids(2, SEQ, seed=5)  # the training batch shape: the captured graph
    with disable_paca(model):
        with pytest.raises(RuntimeError, match=r"disabled \(disable_paca\).*HPU graphs.*torch.no_grad"):
            model(input_ids=ids, labels=ids)
        with torch.no_grad():
            disabled = model(input_ids=ids).logits
    base = tiny_llama(seed=3, layers=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(disabled, base(input_ids=ids).logits, rtol=0, atol=0)
    with functional_paca(model), pytest.raises(RuntimeError, match="functional_paca under HPU graphs"):
        model(input_ids=ids, labels=ids)
    q = model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="substituted"):
        torch.func.functional_call(model, {"model.layers.0.self_attn.q_proj.delta": q.delta.detach() * 2},
                                   kwargs={"input_ids": ids, "labels": ids})
    before = model(input_ids=ids, labels=ids).logits.detach().clone()
    with torch.no_grad():
        q.delta.add_(0.25)  # outside an optimizer step (as load_state_dict, schedule-free's train()/eval() do)
    fake_habana.reset()
    replayed = model(input_ids=ids, labels=ids).logits.detach().clone()
    assert [e[0] for e in fake_habana.EVENTS] == ["hpu_graph_replay"]
    model.eval()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    torch.testing.assert_close(replayed, eager, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(replayed, before)
    merged = (q.original_columns.float() + q.scaling * q.delta.detach()).to(q.weight.dtype)
    torch.testing.assert_close(q.weight.detach().index_select(1, q.indices.long()), merged, rtol=0, atol=0)


@pytest.mark.optimum_habana
def test_hpu_graphs_with_gradient_checkpointing_are_refused(fake_habana, tmp_path, reset_accelerate):
    """optimum-habana switches HPU graphs off for gradient checkpointing after core dumps (its PR #646), and a
    replay skips the recomputation that checkpointed blocks run in Python during backward: refused, by the argument
    adjustment of the training script and by the trainer itself, naming both flags."""
    from paca_hpu.trainer import adjust_for_device

    both = {"use_habana": True, "use_lazy_mode": True, "use_hpu_graphs_for_training": True,
            "gradient_checkpointing": True}
    with pytest.raises(ValueError, match="--use_hpu_graphs_for_training cannot be combined with "
                                         "--gradient_checkpointing"):
        adjust_for_device(both, dev.get_device_info())
    trainer = _lazy_trainer(_tiny_paca_llama(), tmp_path, max_steps=1, ga=1, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="--gradient_checkpointing"):
        trainer.train()


@pytest.mark.optimum_habana
def test_static_batches_by_default_on_hpu(fake_habana):
    """On an HPU the last, ragged batch is dropped unless asked otherwise (each new batch shape is one more graph
    compilation); the launchers no longer have to pass --dataloader_drop_last."""
    from paca_hpu.trainer import adjust_for_device

    info = dev.get_device_info()
    assert adjust_for_device({"use_habana": True, "dataloader_drop_last": False}, info, explicit=set()) \
        ["dataloader_drop_last"] is True
    assert adjust_for_device({"use_habana": True, "dataloader_drop_last": False}, info,
                             explicit={"dataloader_drop_last"})["dataloader_drop_last"] is False
    cpu = dev.DeviceInfo("cpu", torch.device("cpu"))
    assert not adjust_for_device({"dataloader_drop_last": False}, cpu, explicit=set())["dataloader_drop_last"]


@pytest.mark.optimum_habana
def test_script_counts_tokens_on_the_host(tmp_path, reset_accelerate):
    """With run_paca_clm.py's training arguments GaudiTrainer no longer counts tokens itself: with
    include_num_input_tokens_seen (the script's default before) it built a device tensor, all-gathered it over the
    cards and read it on the host after EVERY micro-batch. The throughput summary counts on the host from the batch
    shapes instead: exactly micro-batches x batch x sequence length after the warm-up."""
    from paca_hpu.cli import parse_args
    from paca_hpu.trainer import ThroughputCallback, make_trainer

    cpu = dev.DeviceInfo("cpu", torch.device("cpu"))
    args = parse_args(["--model_name_or_path", "unused", "--output_dir", str(tmp_path), "--max_steps", "3",
                       "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--do_eval",
                       "False", "--save_strategy", "no", "--dataloader_num_workers", "0", "--disable_tqdm", "True"],
                      info=cpu).training
    trainer = make_trainer(_tiny_paca_llama(), args, train_dataset=_dataset())
    gathers, gather = [], trainer.accelerator.gather
    trainer.accelerator.gather = lambda t: gathers.append(t) or gather(t)
    throughput = ThroughputCallback(trainer, warmup_steps=1)
    trainer.add_callback(throughput)
    trainer.train()
    assert gathers == [] and trainer.state.num_input_tokens_seen == 0
    assert (throughput.steps, throughput.tokens) == (2, 2 * 2 * 2 * SEQ)


def test_throughput_marks_synchronize_the_device(fake_habana):
    """Work queued on the device before a mark belongs to the steps before it: both marks of the throughput window
    (after the warm-up steps, at the end) wait for the device (in lazy mode: mark_step, then synchronize)."""
    from types import SimpleNamespace

    from paca_hpu.trainer import ThroughputCallback

    throughput = ThroughputCallback(None, warmup_steps=1)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    throughput.on_train_begin(None, state, None)
    fake_habana.reset()
    state.global_step, state.num_input_tokens_seen = 1, 64
    throughput.on_step_end(None, state, None)
    assert fake_habana.kinds() == ["mark_step", "synchronize"]
    fake_habana.reset()
    state.global_step, state.num_input_tokens_seen = 3, 192
    throughput.on_train_end(None, state, None)
    assert fake_habana.kinds() == ["mark_step", "synchronize"]
    assert (throughput.steps, throughput.tokens) == (2, 128)


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

REPO = REPO_DIR
SCRIPTS = os.path.join(REPO, "scripts")


def _dry_run(script, **env):
    import subprocess

    full_env = {k: v for k, v in os.environ.items()
                if k not in ("GAUDI_SPAWN", "DISTRIBUTED", "PT_HPU_LAZY_MODE", "MASTER_PORT", "HPU_GRAPHS")}
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
    args_cls = arguments_class("hpu")
    parser = HfArgumentParser(cli.argument_classes(args_cls))
    namespace, unknown = parser.parse_known_args(argv)
    assert unknown == [], unknown
    values = vars(namespace)
    training_fields = {f.name for f in __import__("dataclasses").fields(args_cls) if f.init}
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    training = adjust_for_device({k: v for k, v in values.items() if k in training_fields}, hpu, args_cls, given)
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
    assert training["use_habana"] and training["use_lazy_mode"] and not training["use_hpu_graphs_for_training"]
    assert training["bf16"] and training["dataloader_drop_last"] and not training.get("deepspeed")
    # HPU graphs only when asked for (HPU_GRAPHS=1): off until a Gaudi run shows the same gradients with them
    proc = _dry_run("run_gaudi_single.sh", HPU_GRAPHS="1")
    _, argv = _split_command(proc.stdout.strip())
    assert _hpu_training_values(argv)[1]["use_hpu_graphs_for_training"]
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
    assert launcher[1:] == [str(spawn), "--world_size", "8", "--master_port", "29500", "--use_deepspeed"]
    assert _hpu_training_values(argv)[1]["dataloader_drop_last"]  # the HPU default, not a launcher flag
    # DDP over MPI instead of DeepSpeed; MASTER_PORT reaches gaudi_spawn.py (its --master_port)
    proc = _dry_run("run_gaudi_8x.sh", HOME=str(tmp_path), DISTRIBUTED="mpi", WORLD_SIZE="4", MASTER_PORT="29611")
    launcher, argv = _split_command(proc.stdout.strip())
    assert launcher[1:] == [str(spawn), "--world_size", "4", "--master_port", "29611", "--use_mpi"]
    _, training = _hpu_training_values(argv)
    assert not training.get("deepspeed")
    assert _dry_run("run_gaudi_8x.sh", DISTRIBUTED="bogus").returncode == 2


@pytest.mark.optimum_habana
def test_deepspeed_fork_tag_is_the_one_optimum_habana_names():
    """Habana's DeepSpeed fork is installed at the tag optimum-habana 1.21.2's own README names (its "Install
    Dependencies" section, shipped in the wheel's metadata), in docs/hpu.md and in the 8-card launcher."""
    import importlib.metadata
    import re

    pattern = re.compile(r"HabanaAI/DeepSpeed\.git@([0-9][0-9.]*[0-9])")
    named = set(pattern.findall(importlib.metadata.metadata("optimum-habana").get_payload()))
    assert named == {"1.23.0"}, named
    for path in (os.path.join(REPO, "docs", "hpu.md"), os.path.join(SCRIPTS, "run_gaudi_8x.sh")):
        with open(path) as fh:
            used = set(pattern.findall(fh.read()))
        assert used == named, (path, used)


# --------------------------------------------------------------------------------------------------------------
# the LoRA baseline as Gaudi users run it (optimum-habana's run_lora_clm.py)
# --------------------------------------------------------------------------------------------------------------


def test_lora_factors_in_bf16_as_run_lora_clm(tmp_path, reset_accelerate):
    """``--peft_type lora --bf16`` trains the LoRA factors in bf16, as optimum-habana's run_lora_clm.py does (after
    get_peft_model it casts the peft model with ``.to(torch.bfloat16)`` whenever --bf16 is given); they used to stay
    float32 (peft's own default), so a PaCA-vs-LoRA comparison on Gaudi ran another LoRA than the anchor. The
    reference is that procedure done with peft directly; PaCA's delta stays float32."""
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from helpers import make_tiny_checkpoint, qa_records, write_jsonl
    from transformers import AutoModelForCausalLM

    from paca_hpu._transformers_compat import dtype_kwarg
    from paca_hpu.cli import main
    from paca_hpu.trainer import prepare_model

    ckpt = make_tiny_checkpoint(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", qa_records(12))
    out = tmp_path / "lora"
    assert main(["--model_name_or_path", ckpt, "--train_file", data, "--validation_split_percentage", "25",
                 "--max_seq_len", "32", "--per_device_train_batch_size", "4", "--max_steps", "1", "--do_eval",
                 "False", "--peft_type", "lora", "--paca_r", "4", "--bf16", "--output_dir", str(out)]) == 0
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.bfloat16}
    targets = json.load(open(out / "adapter_config.json"))["target_modules"]

    def load():
        return AutoModelForCausalLM.from_pretrained(ckpt, **{dtype_kwarg(): torch.bfloat16})

    anchor = get_peft_model(load(), LoraConfig(r=4, lora_alpha=16, target_modules=targets, bias="none",
                                               task_type="CAUSAL_LM")).to(torch.bfloat16)
    ours = prepare_model(load(), "lora", r=4, alpha=16, target_modules=targets, lora_dtype=torch.bfloat16)
    want = {n: p.dtype for n, p in anchor.named_parameters() if p.requires_grad}
    assert want and {n: p.dtype for n, p in ours.named_parameters() if p.requires_grad} == want
    assert set(want.values()) == {torch.bfloat16}
    paca = prepare_model(load(), "paca", r=4, alpha=16, lora_dtype=torch.bfloat16)  # no effect on PaCA
    assert {p.dtype for p in paca.parameters() if p.requires_grad} == {torch.float32}
