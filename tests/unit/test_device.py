"""paca_hpu.device (device choice, fake habana_frameworks) and the optimum-habana CPU-emulation shims."""

from helpers import REPO_DIR  # the repository root / tests folder
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from paca_hpu import device as dev
from paca_hpu import _optimum_habana as oh

REPO = REPO_DIR

FAKE_HPU = textwrap.dedent(
    """
    AVAILABLE = {available}
    PEAK = [0]
    def is_available():
        return AVAILABLE
    def device_count():
        return 2
    def get_device_name():
        return "GAUDI2"
    def max_memory_allocated(device=None):
        return PEAK[0]
    def reset_peak_memory_stats(device=None):
        PEAK[0] = 0
    def memory_stats(device=None):
        return {{"InUse": 1 << 30, "MaxInUse": 2 << 30, "Limit": 96 << 30}}
    SYNCS = [0]
    def synchronize():
        SYNCS[0] += 1
    """
)
FAKE_CORE = "STEPS = [0]\ndef mark_step():\n    STEPS[0] += 1\n"


def _drop_habana_modules():
    for name in list(sys.modules):
        if name == "habana_frameworks" or name.startswith("habana_frameworks."):
            del sys.modules[name]


@pytest.fixture
def fake_habana(tmp_path, monkeypatch):
    """Install a fake ``habana_frameworks`` package on sys.path; yields a function (available=True) -> root."""

    def install(available=True, broken=False):
        root = tmp_path / f"fake_{available}_{broken}"
        pkg = root / "habana_frameworks" / "torch"
        (pkg / "hpu").mkdir(parents=True)
        (pkg / "core").mkdir()
        (root / "habana_frameworks" / "__init__.py").write_text("")
        (pkg / "__init__.py").write_text("raise RuntimeError('driver exploded')\n" if broken else "")
        (pkg / "hpu" / "__init__.py").write_text(FAKE_HPU.format(available=available))
        (pkg / "core" / "__init__.py").write_text(FAKE_CORE)
        _drop_habana_modules()
        monkeypatch.syspath_prepend(str(root))
        return root

    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    yield install
    _drop_habana_modules()
    monkeypatch.undo()
    dev.refresh()


@pytest.fixture(autouse=True)
def _fresh_detection(monkeypatch):
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    dev.refresh()
    yield
    monkeypatch.undo()
    dev.refresh()


def test_cpu_here():
    info = dev.get_device_info()
    assert info.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not dev.is_hpu_available() and not dev.is_habana_installed()
    assert info.lazy_mode is False
    assert dev.get_device() == info.device
    dev.mark_step()  # no-op, must not import anything
    dev.synchronize()
    assert "habana_frameworks" not in sys.modules
    assert dev.get_device_info() is info  # cached


def test_cpu_peak_memory():
    dev.reset_peak_memory()
    before = dev.peak_memory_bytes()
    assert before > 0
    # 64 MiB of fresh pages, touched: an anonymous mmap, so that the allocator cannot hand back memory that an
    # earlier test left resident (torch.ones here once reused such memory and the peak did not move)
    import mmap

    block = mmap.mmap(-1, 64 * 1024 * 1024)
    block.write(b"\x01" * len(block))
    after = dev.peak_memory_bytes()
    assert after >= before + 32 * 1024 * 1024
    block.close()
    stats = dev.memory_stats()
    assert set(stats) == {"peak_rss (GB)"} and stats["peak_rss (GB)"] > 0
    assert "RSS" in dev.peak_memory_kind()


def test_fake_hpu_detected_lazy(fake_habana, monkeypatch):
    fake_habana(available=True)
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "1")
    info = dev.refresh()
    assert info.type == "hpu" and info.device == torch.device("hpu")
    assert info.lazy_mode is True and info.name == "GAUDI2" and info.count == 2
    assert dev.is_hpu_available() and dev.is_habana_installed()
    assert "GAUDI2 x2" in info.describe() and "lazy" in info.describe()
    core = dev.habana_module("habana_frameworks.torch.core")
    dev.mark_step()
    dev.mark_step()
    assert core.STEPS[0] == 2
    hpu = dev.habana_module("habana_frameworks.torch.hpu")
    hpu.PEAK[0] = 12345
    assert dev.peak_memory_bytes() == 12345
    dev.reset_peak_memory()
    assert dev.peak_memory_bytes() == 0
    assert dev.memory_stats()["max_memory_allocated (GB)"] == 2.0


def test_fake_hpu_eager_mode_no_mark_step(fake_habana, monkeypatch):
    fake_habana(available=True)
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    info = dev.refresh()
    assert info.type == "hpu" and info.lazy_mode is False
    dev.mark_step()
    assert dev.habana_module("habana_frameworks.torch.core").STEPS[0] == 0


def test_fake_habana_without_device_falls_back(fake_habana):
    fake_habana(available=False)
    info = dev.refresh()
    assert dev.is_habana_installed() and not dev.is_hpu_available()
    assert info.type != "hpu"


def test_broken_habana_falls_back(fake_habana, caplog):
    fake_habana(broken=True)
    with caplog.at_level(logging.WARNING, logger="paca_hpu.device"):
        info = dev.refresh()
    assert info.type != "hpu"
    assert "driver exploded" in caplog.text


def test_refresh_forgets_removed_fake(fake_habana, monkeypatch):
    root = fake_habana(available=True)
    assert dev.refresh().type == "hpu"
    sys.path.remove(str(root))  # monkeypatch restores sys.path afterwards anyway
    _drop_habana_modules()
    assert dev.refresh().type != "hpu"


def test_forced_device(monkeypatch):
    monkeypatch.setenv(dev.DEVICE_ENV, "cpu")
    assert dev.refresh().type == "cpu"
    monkeypatch.setenv(dev.DEVICE_ENV, "hpu")
    with pytest.raises(RuntimeError, match="no HPU"):
        dev.refresh()
    monkeypatch.setenv(dev.DEVICE_ENV, "tpu")
    with pytest.raises(RuntimeError, match="expected one of"):
        dev.refresh()


def test_habana_module_rejects_other_names():
    with pytest.raises(ValueError):
        dev.habana_module("os")


# ----------------------------------------------------------------------------- optimum-habana shims


@pytest.mark.optimum_habana
def test_import_optimum_habana_scoped_in_fresh_process():
    """The synapse-version check is skipped only inside the import; no finder is left on sys.meta_path."""
    code = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s|%(message)s")
        for noisy in ("urllib3", "matplotlib", "h5py", "datasets", "filelock", "jax", "fsspec", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from paca_hpu import _optimum_habana as oh
        assert oh.synapse_check_would_crash()
        n = len(sys.meta_path)
        mod = oh.import_optimum_habana()
        assert len(sys.meta_path) == n, sys.meta_path
        assert not any(type(f).__name__ == "_SkipSynapseCheckFinder" for f in sys.meta_path)
        import optimum.habana.utils.misc as misc
        assert misc.check_synapse_version.__module__ == "paca_hpu._optimum_habana"
        GaudiTrainer, GaudiTrainingArguments, GaudiConfig = oh.gaudi_classes()
        cfg = oh.make_gaudi_config(use_habana=False)
        assert cfg.use_fused_adam is False and cfg.use_fused_clip_norm is False
        assert oh.make_gaudi_config(use_habana=True).use_fused_adam is True
        assert "habana_frameworks" not in sys.modules
        print("OK", mod.__name__)
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK optimum.habana" in proc.stdout
    assert "check_synapse_version() skipped by paca_hpu" in proc.stdout


def test_gaudi_generation_fields_added_and_removed():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    gc = model.generation_config
    gc.attn_softmax_bf16 = True  # a user's choice is kept
    with oh.gaudi_generation_fields(model) as added:
        assert set(added) == set(oh.GAUDI_GENERATION_FIELDS) - {"attn_softmax_bf16"}
        assert gc.use_flash_attention is False and gc.attn_softmax_bf16 is True
        with oh.gaudi_generation_fields(model) as inner:  # re-entrant
            assert inner == []
        with oh.hidden_generation_fields(model, added):
            assert not hasattr(gc, "use_flash_attention")
        assert gc.use_flash_attention is False
    for name in added:
        assert not hasattr(gc, name)
    assert gc.attn_softmax_bf16 is True
    assert "use_flash_attention" not in gc.to_json_string()


def test_compile_backend_for():
    assert oh.compile_backend_for("hpu", None) == "hpu_backend"
    assert oh.compile_backend_for("cpu", None) == "aot_eager"
    assert oh.compile_backend_for("cpu", "hpu_backend") == "aot_eager"
    assert oh.compile_backend_for("cpu", "inductor") == "inductor"
    assert oh.compile_backend_for("cuda", "aot_eager") == "aot_eager"


@pytest.mark.optimum_habana
def test_adjust_for_device_cpu_and_hpu():
    from paca_hpu.trainer import adjust_for_device, arguments_class

    gta = arguments_class("cpu")
    assert gta.__name__ == "GaudiTrainingArguments"
    cpu = dev.DeviceInfo("cpu", torch.device("cpu"))
    v = adjust_for_device(
        {"use_habana": True, "use_lazy_mode": True, "use_hpu_graphs_for_training": True, "bf16": True,
         "torch_compile_backend": "hpu_backend"}, cpu, gta)
    assert v["use_cpu"] is True and v["use_habana"] is False and v["use_lazy_mode"] is False
    assert v["use_hpu_graphs_for_training"] is False and v["half_precision_backend"] == "cpu_amp"
    assert v["torch_compile"] is True and v["torch_compile_backend"] == "aot_eager"

    hpu_eager = dev.DeviceInfo("hpu", torch.device("hpu"), lazy_mode=False)
    v = adjust_for_device({"use_lazy_mode": True, "torch_compile": True}, hpu_eager, gta)
    assert v["use_habana"] is True and v["use_lazy_mode"] is False and v["torch_compile_backend"] == "hpu_backend"
    hpu_lazy = dev.DeviceInfo("hpu", torch.device("hpu"), lazy_mode=True)
    v = adjust_for_device({"use_lazy_mode": True}, hpu_lazy, gta)
    assert v["use_habana"] is True and v["use_lazy_mode"] is True

    from transformers import TrainingArguments

    cuda = dev.DeviceInfo("cuda", torch.device("cuda"), name="fake")
    assert arguments_class("cuda") is TrainingArguments
    v = adjust_for_device({"use_habana": True, "use_lazy_mode": True, "learning_rate": 1e-3}, cuda, TrainingArguments)
    assert v == {"learning_rate": 1e-3}
