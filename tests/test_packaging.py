"""Dependencies by need (setup.cfg): the core install requires only what the core imports, so it never moves a
user's transformers / accelerate / datasets; optimum-habana and its version caps live in the ``gaudi`` extra only."""

import configparser
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    return cfg


def _requirements(text):
    from packaging.requirements import Requirement

    return [Requirement(line.strip()) for line in text.strip().splitlines() if line.strip()]


def test_core_requires_torch_and_safetensors_only():
    core = _requirements(_setup_cfg()["options"]["install_requires"])
    assert sorted(r.name for r in core) == ["safetensors", "torch"]
    torch_req = next(r for r in core if r.name == "torch")
    assert str(torch_req.specifier) == ">=2.4"  # no upper bound, no pin: on Gaudi torch is the image's own build


def test_only_the_gaudi_extra_caps_the_hf_stack():
    """Every extra but ``gaudi`` admits the newest stack (transformers 5.24, accelerate 1.15, datasets 5.2,
    huggingface_hub 2.4); ``gaudi`` carries optimum-habana 1.21.2 and the caps it needs."""
    newest = {"transformers": "5.24.0", "accelerate": "1.15.0", "datasets": "5.2.0", "huggingface-hub": "2.4.0",
              "huggingface_hub": "2.4.0", "peft": "0.21.2", "trl": "1.16.0"}
    extras = _setup_cfg()["options.extras_require"]
    for extra in extras:
        for req in _requirements(extras[extra]):
            assert req.name != "optimum-habana" or extra == "gaudi", extra
            if extra != "gaudi" and req.name in newest:
                assert req.specifier.contains(newest[req.name]), (extra, str(req))
    gaudi = {r.name: r for r in _requirements(extras["gaudi"])}
    assert str(gaudi["optimum-habana"].specifier) == "==1.21.2"
    assert not gaudi["transformers"].specifier.contains("5.0.0") and gaudi["transformers"].specifier.contains("4.55.4")
    assert not gaudi["datasets"].specifier.contains("5.0.0") and not gaudi["huggingface_hub"].specifier.contains("1.0")


def test_the_core_runs_without_the_hugging_face_stack(tmp_path):
    """apply / train / save / load / merge with transformers, accelerate, datasets, peft, TRL, optimum and
    matplotlib made unimportable (a fresh process): the core needs nothing but torch and safetensors."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        BLOCKED = ("transformers", "accelerate", "datasets", "peft", "trl", "optimum", "matplotlib", "huggingface_hub")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked for this test: {name}")

        sys.meta_path.insert(0, Block())
        import torch
        from torch import nn
        from paca_hpu import PaCAConfig, apply_paca, load_adapter, merge_paca, save_adapter

        def net():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

        model = apply_paca(net(), PaCAConfig(r=4, paca_alpha=8, target_modules=["0", "2"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x = torch.randn(5, 16)
        model(x).pow(2).mean().backward()
        opt.step()
        with torch.no_grad():
            want = model(x)
        save_adapter(model, sys.argv[1])
        fresh = load_adapter(net(), sys.argv[1])
        with torch.no_grad():
            assert torch.equal(fresh(x), want)
            assert torch.allclose(merge_paca(fresh)(x), want, atol=1e-6)
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("CORE-OK")
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "adapter")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CORE-OK" in proc.stdout
