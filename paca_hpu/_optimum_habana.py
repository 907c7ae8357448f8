"""Scoped access to optimum-habana (``GaudiTrainer`` & co.) on machines with and without Gaudi software.

optimum-habana 1.21.2 assumes the Intel Gaudi software stack.  Its ``GaudiTrainer`` also has a CPU
path (``use_cpu=True``), which is how this project tests the Gaudi training loop without an HPU, but
several things break on the way there.  Every workaround is importable from here (5, 10 and 11, which
wrap a run, are defined in :mod:`paca_hpu._optimum_habana_run`; ``log()``'s in :mod:`paca_hpu.trainer`), is
scoped to the smallest region possible, and names the upstream code it works around.  Nothing here edits site-packages or leaves a patch in place after it returns.

1. ``import optimum.habana`` crashes without Gaudi software.
   Upstream: ``optimum/habana/__init__.py`` calls ``optimum.habana.utils.misc.check_synapse_version()``,
   which calls ``get_habana_frameworks_version()``; that runs ``pip list | grep habana-torch-plugin``
   in a shell and indexes the (empty) output -> ``IndexError``.  No environment variable skips it.
   Workaround (:func:`import_optimum_habana`): only when the ``habana-torch-plugin`` distribution is
   absent (the exact condition of the crash), import under a temporary ``sys.meta_path`` finder that,
   right after ``optimum.habana.utils.misc`` executes, replaces *that module's*
   ``check_synapse_version`` with a no-op that logs at debug level why it was skipped.  The finder
   is removed in a ``finally`` as soon as the import returns.  With Gaudi software installed the
   import is left completely alone (the version check then works and its warnings are useful).

2. ``GaudiTrainer(gaudi_config=None)`` downloads ``args.gaudi_config_name`` from the Hub.
   Upstream: ``GaudiTrainer.__init__`` (``GaudiConfig.from_pretrained(args.gaudi_config_name)``).
   Workaround: :func:`make_gaudi_config` always builds an explicit ``GaudiConfig``.

3. ``GaudiTrainingArguments(use_lazy_mode=True)`` (the default!) raises ``ValueError`` without
   ``use_habana``.  Upstream: ``GaudiTrainingArguments.__post_init__``.  Workaround: the argument
   builder in :mod:`paca_hpu.trainer.arguments` sets ``use_cpu=True, use_habana=False, use_lazy_mode=False``
   (and no HPU graphs) off HPU, before the dataclass is constructed.

4. ``torch_compile=True`` defaults to backend ``"hpu_backend"``, which only exists with the Gaudi
   plugin; giving a backend without ``--torch_compile`` asserts on ``get_habana_frameworks_version()``
   (the same ``pip list`` crash).  Upstream: ``GaudiTrainingArguments.__post_init__``.
   Workaround: :func:`compile_backend_for` picks ``aot_eager`` off HPU (or keeps ``inductor`` /
   ``aot_eager`` / ``eager`` when asked for) and the argument builder sets ``torch_compile=True``
   whenever a backend is given.

5. For llama / qwen2 / gemma (and a few more) the trainer reads four Gaudi-only attributes from
   ``model.generation_config``: ``attn_softmax_bf16``, ``use_flash_attention``,
   ``flash_attention_recompute``, ``flash_attention_causal_mask``.  They exist only on
   ``GaudiGenerationConfig``, which ``adapt_transformers_to_gaudi()`` installs on HPU; a plain
   ``transformers.GenerationConfig`` raises ``AttributeError``.
   Upstream: ``optimum.habana.transformers.trainer._get_input_update_settings`` (called from
   ``_inner_training_loop`` and ``evaluation_loop``).
   Workaround: :func:`gaudi_generation_fields`, a context manager that adds the missing attributes
   (all ``False``, i.e. the HPU defaults: no special attention path) and removes exactly those again
   on exit, so they never end up in a saved ``generation_config.json``.  The trainer wraps
   ``train`` / ``evaluate`` / ``predict`` / ``_save`` in it.

6. ``GaudiTrainer.log()`` calls ``optimum.habana.utils.get_hpu_memory_stats()``, which imports
   ``habana_frameworks.torch.hpu`` -> ``ImportError`` on CPU at the first logging step.
   Upstream: ``optimum.habana.transformers.trainer.GaudiTrainer.log``.  Workaround: the trainer
   class in :mod:`paca_hpu.trainer` (``trainer_class("gaudi")``) overrides ``log`` when ``args.use_habana`` is False
   (same bookkeeping, memory numbers from :func:`paca_hpu.device.memory_stats` instead).

7. ``optimum.habana.utils.set_seed`` imports ``habana_frameworks``; use ``transformers.set_seed``
   off HPU (``GaudiTrainer.train`` only calls it with ``model_init``, which we do not use).

8. ``--bf16`` with the default ``half_precision_backend="hpu_amp"`` makes the trainer run
   ``torch.autocast(device_type="hpu")``, which does not exist without the plugin.
   Upstream: ``GaudiTrainer.__init__`` (``use_hpu_amp``) and ``autocast_smart_context_manager``.
   Workaround: the argument builder sets ``half_precision_backend="cpu_amp"`` off HPU (CPU bf16 autocast).

9. Resuming from a checkpoint that already reached ``max_steps`` makes the training loop run one more
   step (``GaudiTrainer._inner_training_loop``, like ``transformers.Trainer``'s, checks ``max_steps`` only in
   ``on_step_end``, i.e. after a step).  Not Gaudi-specific; :mod:`paca_hpu.cli` checks the checkpoint's
   ``global_step`` and only loads the adapter then.

10. Under ``torchrun`` on CPU (accelerate's ``MULTI_CPU`` state) ``GaudiAccelerator.prepare_model`` never wraps
    the model in ``DistributedDataParallel``: it wraps only in the ``MULTI_HPU`` state.  Each rank then trains
    alone on its shard of the data, the ranks diverge, and rank 0's half-trained model is saved, without a
    warning.  Upstream: ``optimum.habana.accelerate.accelerator.GaudiAccelerator.prepare_model``.
    Workaround: :func:`wrap_ddp_on_multi_cpu` makes *one* accelerator (the trainer's own) wrap a trainable
    model in ``DistributedDataParallel`` in the ``MULTI_CPU`` state, with the DDP options the trainer chose
    (``ddp_handler``), exactly as upstream does for ``MULTI_HPU``.
11. A bitsandbytes 4-bit model on the CPU (QPaCA / QLoRA) is refused by ``GaudiAccelerator.prepare_model`` ("You
    can't train a model that has been loaded in 8-bit precision with CPU or disk offload") whenever its
    ``hf_device_map`` names ``"cpu"``, which transformers always records for a CPU load. Upstream:
    ``optimum.habana.accelerate.accelerator.GaudiAccelerator.prepare_model``, copied from an accelerate older than
    bitsandbytes' CPU backend (accelerate 1.10's own ``prepare_model`` lets it pass when bitsandbytes' multi-backend
    is available). Workaround: :func:`hidden_cpu_device_map` removes a CPU-only ``hf_device_map`` of a
    bitsandbytes-quantized model for the duration of ``train`` / ``evaluate`` / ``predict`` of the CPU
    ``GaudiTrainer`` and puts it back afterwards.
12. ``GaudiTrainingArguments`` accepts its HPU-only flags on the CPU path and acts on some of them there: ``--fp8``
    sets ``ACCELERATE_MIXED_PRECISION=fp8`` in the process environment (Intel Gaudi's transformer engine),
    ``--flash_attention_recompute`` / ``--minimize_memory`` set HPU environment variables, and
    ``--context_parallel_size N`` under ``torchrun`` cuts every sequence into N pieces for a sequence-parallel
    attention that only optimum-habana's Gaudi model classes have; the others (``--use_lazy_mode``,
    ``--pipelining_fwd_bwd``, ...) silently do nothing. Upstream: ``GaudiTrainingArguments.__post_init__`` /
    ``_setup_devices``, ``GaudiTrainer``. Workaround: :data:`HPU_ONLY_FIELDS`; off HPU
    :func:`paca_hpu.trainer.adjust_for_device` sets each of them to the value that asks for nothing and warns
    about every one the user asked for (so does it, with :data:`GAUDI_TRAINER_FIELDS`, where
    ``transformers.TrainingArguments`` lacks a GaudiTrainer option).
13. A Gaudi configuration with autocast op lists (``--gaudi_config_name`` whose ``gaudi_config.json`` holds
    ``autocast_bf16_ops`` / ``autocast_fp32_ops``) must be declared before ``habana_frameworks.torch`` is imported:
    ``GaudiConfig.declare_autocast_bf16_fp32_ops`` writes the lists to files named by
    ``PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST`` / ``PT_HPU_AUTOCAST_FP32_OPS_LIST``, which the plugin reads when
    ``habana_frameworks.torch.core`` starts, and raises ``RuntimeError`` once that module is imported.
    ``GaudiTrainingArguments._setup_devices`` declares them (with ``--bf16`` or the config's ``use_torch_autocast``,
    without DeepSpeed, with ``half_precision_backend="hpu_amp"``). But ``import optimum.habana`` alone already imports
    the plugin where bitsandbytes is installed (``optimum.habana`` -> ``transformers.Trainer`` -> peft ->
    ``bitsandbytes/__init__.py``, which imports ``habana_frameworks.torch`` when it finds it), and the device has to
    be known before the arguments class is chosen. Upstream: ``optimum/habana/transformers/gaudi_configuration.py``,
    ``training_args.py``. Workaround: :func:`declare_autocast_ops_first` declares the lists of
    ``--gaudi_config_name`` exactly as upstream does (same files, same variables), reading the configuration without
    importing optimum-habana, before anything imports the plugin; :func:`declared_autocast_ops_accepted` then lets
    upstream's declaration return without raising, during the construction of the training arguments only, when the
    lists it would declare are the very ones declared before the plugin started.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
from types import ModuleType
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ._optimum_habana_run import (GAUDI_GENERATION_FIELDS, gaudi_generation_fields, hidden_cpu_device_map,
                                  hidden_generation_fields, wrap_ddp_on_multi_cpu)

logger = logging.getLogger(__name__)

__all__ = [
    "GAUDI_GENERATION_FIELDS",
    "HPU_ONLY_FIELDS",
    "GAUDI_TRAINER_FIELDS",
    "is_optimum_habana_installed",
    "synapse_check_would_crash",
    "import_optimum_habana",
    "gaudi_classes",
    "make_gaudi_config",
    "compile_backend_for",
    "gaudi_generation_fields",
    "hidden_generation_fields",
    "wrap_ddp_on_multi_cpu",
    "hidden_cpu_device_map",
    "gaudi_config_op_lists",
    "declare_autocast_ops_first",
    "declared_autocast_ops_accepted",
]

_MISC_MODULE = "optimum.habana.utils.misc"
_PLUGIN_DIST = "habana-torch-plugin"

_HPU_GRAPHS = "HPU graphs"
_FUSED_SDPA = "options of Habana's fused attention kernel (gaudi_fused_sdpa)"

#: ``GaudiTrainingArguments`` fields (optimum-habana 1.21.2, same names and types) that act only on an HPU (workaround
#: 12): name -> (the value that asks for nothing, what the flag is for). ``None``: any given value asks for something;
#: such a field is reset to the dataclass default. ``attn_implementation`` is read only on HPU (``gaudi_fused_sdpa``);
#: elsewhere the model keeps transformers' default attention.
HPU_ONLY_FIELDS: Dict[str, Tuple[Any, str]] = {
    "use_habana": (False, "training on an HPU"),
    "use_lazy_mode": (False, "the HPU's lazy graph mode"),
    "use_hpu_graphs": (False, _HPU_GRAPHS),
    "use_hpu_graphs_for_training": (False, _HPU_GRAPHS),
    "use_hpu_graphs_for_inference": (False, _HPU_GRAPHS),
    "disable_tensor_cache_hpu_graphs": (False, _HPU_GRAPHS),
    "max_hpu_graphs": (None, _HPU_GRAPHS),
    "gaudi_config_name": (None, "Habana's mixed-precision op lists and fused optimizer kernels"),
    "pipelining_fwd_bwd": (False, "an HPU mark_step between forward and backward, in lazy mode"),
    "fp8": (False, "FP8 training through Intel Gaudi's transformer engine"),
    "minimize_memory": (False, "memory saving of Intel Gaudi's FP8 transformer engine"),
    "attn_implementation": (None, "Habana's fused attention kernel; the model keeps transformers' default attention"),
    "flash_attention_recompute": (False, _FUSED_SDPA),
    "flash_attention_causal_mask": (False, _FUSED_SDPA),
    "flash_attention_fast_softmax": (False, _FUSED_SDPA),
    "flash_attention_fp8": (False, _FUSED_SDPA),
    "context_parallel_size": (1, "sequence parallelism of optimum-habana's Gaudi model classes"),
}

#: GaudiTrainer options that also work off HPU (on GaudiTrainer's CPU path) but that ``transformers.TrainingArguments``
#: lacks: name -> (``GaudiTrainingArguments`` default, what the option does).
GAUDI_TRAINER_FIELDS: Dict[str, Tuple[Any, str]] = {
    "distribution_strategy": ("ddp", "fast_ddp: GaudiTrainer's own gradient all-reduce"),
    "cache_size_limit": (None, "torch._dynamo's cache size under --torch_compile"),
    "use_regional_compilation": (False, "GaudiTrainer's per-block torch.compile"),
    "compile_from_sec_iteration": (False, "GaudiTrainer's torch.compile from the second step on"),
    "allow_unspec_int_on_nn_module": (None, "a torch._dynamo option GaudiTrainer sets"),
}

# Backends torch.compile accepts without the Gaudi plugin (workaround 4).
_OFF_HPU_BACKENDS = ("aot_eager", "inductor", "eager")


def is_optimum_habana_installed() -> bool:
    """optimum-habana is installed (found without importing it)."""
    try:
        return importlib.util.find_spec("optimum.habana") is not None
    except (ImportError, ValueError):
        return False


def synapse_check_would_crash() -> bool:
    """True when ``check_synapse_version()`` would raise: no ``habana-torch-plugin`` distribution."""
    try:
        importlib.metadata.distribution(_PLUGIN_DIST)
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


def _skipped_check_synapse_version() -> None:
    logger.debug(
        "optimum.habana: check_synapse_version() skipped by paca_hpu: no '%s' distribution is installed "
        "(no Intel Gaudi software on this machine), and upstream would raise IndexError parsing the empty "
        "output of `pip list | grep %s`.",
        _PLUGIN_DIST,
        _PLUGIN_DIST,
    )


class _PatchMiscLoader(importlib.abc.Loader):
    """Runs the real loader, then swaps ``check_synapse_version`` in the fresh module."""

    def __init__(self, inner: importlib.abc.Loader):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        module.check_synapse_version = _skipped_check_synapse_version

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._inner, name)


class _SkipSynapseCheckFinder(importlib.abc.MetaPathFinder):
    """Temporary ``sys.meta_path`` entry: wraps the loader of ``optimum.habana.utils.misc`` only."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MISC_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchMiscLoader(spec.loader)
        return spec


def import_optimum_habana() -> ModuleType:
    """``import optimum.habana``, also on machines without Gaudi software (workaround 1).

    Raises ``ImportError`` when optimum-habana is not installed.
    """
    mod = sys.modules.get("optimum.habana")
    if mod is not None:
        return mod
    if not synapse_check_would_crash() or _MISC_MODULE in sys.modules:
        return importlib.import_module("optimum.habana")
    finder = _SkipSynapseCheckFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("optimum.habana")
    finally:
        try:
            sys.meta_path.remove(finder)
        except ValueError:
            pass


def gaudi_classes() -> Tuple[type, type, type]:
    """``(GaudiTrainer, GaudiTrainingArguments, GaudiConfig)``, importable on any machine."""
    ohpu = import_optimum_habana()
    return ohpu.GaudiTrainer, ohpu.GaudiTrainingArguments, ohpu.GaudiConfig


def make_gaudi_config(use_habana: bool, **overrides):
    """An explicit ``GaudiConfig`` (workaround 2).

    On HPU: Habana's fused AdamW and fused gradient clipping (what ``run_lora_clm.py`` uses).
    Off HPU the two flags are ignored by upstream anyway (it checks ``args.use_habana``); they are set
    to False so the saved ``gaudi_config.json`` says what actually ran.
    """
    _, _, GaudiConfig = gaudi_classes()
    kwargs = {"use_fused_adam": bool(use_habana), "use_fused_clip_norm": bool(use_habana)}
    kwargs.update(overrides)
    return GaudiConfig(**kwargs)


def compile_backend_for(device_type: str, requested: Optional[str]) -> Optional[str]:
    """``torch.compile`` backend for ``device_type`` (workaround 4).

    HPU: the requested one, default ``hpu_backend``.  Elsewhere ``hpu_backend`` / ``None`` become
    ``aot_eager`` (needs no C++ compiler); ``inductor`` / ``aot_eager`` / ``eager`` are kept.
    """
    if device_type == "hpu":
        return requested or "hpu_backend"
    if requested in (None, "", "hpu_backend"):
        if requested == "hpu_backend":
            logger.warning("torch_compile_backend 'hpu_backend' needs an HPU; using 'aot_eager' on %s.", device_type)
        return "aot_eager"
    if requested not in _OFF_HPU_BACKENDS:
        logger.warning("torch_compile_backend %r is not one paca_hpu tested off HPU (%s).", requested, _OFF_HPU_BACKENDS)
    return requested


# ------------------------------------------------------------------------------------------ workaround 13

#: What ``GaudiConfig.declare_autocast_bf16_fp32_ops`` writes (optimum-habana 1.21.2 gaudi_configuration.py): the
#: variable the plugin reads -> the file upstream writes the list into.
AUTOCAST_OP_FILES = {"PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST": "/tmp/lower_list.txt",
                     "PT_HPU_AUTOCAST_FP32_OPS_LIST": "/tmp/fp32_list.txt"}
_PLUGIN_CORE = "habana_frameworks.torch.core"
#: the (bf16, fp32) lists :func:`declare_autocast_ops_first` declared before the plugin started, or None
_DECLARED_FIRST: List[Optional[Tuple[Tuple[str, ...], Tuple[str, ...]]]] = [None]


def _flag_value(argv, name: str) -> Optional[str]:
    """The value of ``--name`` (also ``--name=V``, dashes for underscores) in ``argv``, or the key ``name`` of a
    single ``.json`` argument file; None when absent."""
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith(".json") and os.path.isfile(argv[0]):
        try:
            with open(argv[0]) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        return data.get(name) if isinstance(data, dict) else None
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    found = None
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if key in spellings:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def gaudi_config_op_lists(name: str) -> Optional[Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """``(autocast_bf16_ops, autocast_fp32_ops)`` of the Gaudi configuration ``name`` (a folder with
    ``gaudi_config.json``, such a file, or a Hub repo id, as ``GaudiConfig.from_pretrained`` takes), read without
    importing optimum-habana; None when it lacks one of the two lists (upstream then declares nothing)."""
    from optimum.configuration_utils import BaseConfig

    class _GaudiConfigFile(BaseConfig):
        CONFIG_NAME = FULL_CONFIGURATION_FILE = "gaudi_config.json"

    data, _ = _GaudiConfigFile.get_config_dict(name)
    bf16, fp32 = data.get("autocast_bf16_ops"), data.get("autocast_fp32_ops")
    if bf16 is None or fp32 is None:
        return None
    return tuple(bf16), tuple(fp32)


def declare_autocast_ops_first(argv) -> bool:
    """Workaround 13: declare the autocast op lists of ``--gaudi_config_name`` in ``argv`` (command-line flags or a
    single ``.json`` argument file) as ``GaudiConfig.declare_autocast_bf16_fp32_ops`` does, if the Gaudi plugin is
    installed and not imported yet. Returns whether it declared them. Call it before anything imports
    ``habana_frameworks.torch`` or ``optimum.habana``.

    Declared whatever ``--bf16`` says: the variables only matter to autocast, which upstream turns on exactly when it
    would have declared them itself (and then finds them declared)."""
    if _PLUGIN_CORE in sys.modules or importlib.util.find_spec("habana_frameworks") is None:
        return False
    name = _flag_value(argv, "gaudi_config_name")
    lists = gaudi_config_op_lists(name) if name else None
    if lists is None:
        return False
    for (variable, path), ops in zip(AUTOCAST_OP_FILES.items(), lists):
        with open(path, "w") as fh:
            fh.writelines(op + "\n" for op in ops)
        os.environ[variable] = path
    _DECLARED_FIRST[0] = lists
    logger.debug("declared the autocast op lists of %s before habana_frameworks.torch was imported", name)
    return True


@contextlib.contextmanager
def declared_autocast_ops_accepted() -> Iterator[None]:
    """While inside (the construction of ``GaudiTrainingArguments``; workaround 13): upstream's
    ``GaudiConfig.declare_autocast_bf16_fp32_ops`` returns without doing anything when the lists it would declare are
    those :func:`declare_autocast_ops_first` declared before the plugin started and the variables still name them;
    any other declaration is upstream's (which raises once the plugin is imported). A no-op context when nothing was
    declared first."""
    declared = _DECLARED_FIRST[0]
    if declared is None:
        yield
        return
    GaudiConfig = gaudi_classes()[2]
    original = GaudiConfig.declare_autocast_bf16_fp32_ops

    def declare(self):
        lists = (tuple(self.autocast_bf16_ops or ()), tuple(self.autocast_fp32_ops or ()))
        if lists == declared and all(os.environ.get(v) == p for v, p in AUTOCAST_OP_FILES.items()):
            return None
        return original(self)

    GaudiConfig.declare_autocast_bf16_fp32_ops = declare
    try:
        yield
    finally:
        GaudiConfig.declare_autocast_bf16_fp32_ops = original
