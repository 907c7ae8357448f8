"""Dependencies by need (setup.cfg): the core install requires only what the core imports, so it never moves a
user's transformers / accelerate / datasets; optimum-habana and its version caps live in the ``gaudi`` extra only."""

from helpers import REPO_DIR  # the repository root / tests folder
import configparser
import os
import subprocess
import sys
import textwrap

import pytest

REPO = REPO_DIR


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


def _installed_extras():
    """The extras this environment was set up with (Makefile: .[gaudi,test] pinned, .[test] newest)."""
    from paca_hpu._optimum_habana import is_optimum_habana_installed

    return ["gaudi", "test"] if is_optimum_habana_installed() else ["test"]


def _source_copy(tmp_path):
    """What ``pip install .`` reads, copied (building the metadata writes an egg-info next to setup.cfg)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(os.path.join(REPO, "paca_hpu"), src / "paca_hpu",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    return src


@pytest.mark.parametrize("extras", [[], "installed"], ids=["core", "extras"])
def test_pip_install_leaves_this_stack_alone(extras, tmp_path):
    """``pip install .`` (and with the extras this environment was set up with) into this environment, as pip's
    resolver decides it (``--dry-run --report``, offline: only what is installed can satisfy a requirement): it would
    install paca_hpu and nothing else, so transformers 5.x stays 5.x on the newest stack (and 4.55.4 on the pinned
    one)."""
    import importlib.metadata
    import json

    extras = _installed_extras() if extras == "installed" else extras
    target = str(_source_copy(tmp_path)) + (f"[{','.join(extras)}]" if extras else "")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "--disable-pip-version-check", "--quiet", "--report", str(report), target],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    install = [item["metadata"]["name"] for item in json.load(open(report))["install"]]
    assert install == ["paca_hpu"], install
    transformers = importlib.metadata.version("transformers")
    stack = "gaudi" if "gaudi" in _installed_extras() else "latest"
    assert f"transformers=={transformers}" in open(os.path.join(REPO, ".ci", f"constraints-{stack}.txt")).read()


def test_readme_names_the_tested_stacks_as_ci_pins_them():
    """README 'Tested stacks' gives, for each stack, the versions .ci/constraints-<stack>.txt pins."""
    import re

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    tested = readme[readme.index("Tested stacks"):]
    tested = " ".join(tested[:tested.index("\n\n")].split())
    pinned, newest = tested.split("**newest stack**")
    names = {"optimum-habana", "transformers", "accelerate", "datasets", "huggingface_hub", "peft", "trl"}
    for part, stack in ((pinned, "gaudi"), (newest, "latest")):
        text = open(os.path.join(REPO, ".ci", f"constraints-{stack}.txt")).read()
        pins = dict(re.findall(r"^([\w.-]+)==(\S+)$", text, flags=re.M))
        shown = {n: pins[n] for n in names if n in pins}
        assert len(shown) >= 6, (stack, shown)
        for name, version in shown.items():
            label = "TRL" if name == "trl" else name
            assert re.search(rf"{re.escape(label)} {re.escape(version)}\b", part), (stack, name, version, part)
        assert f".ci/constraints-{stack}.txt" in part
        assert f"torch {pins['torch']}" in tested  # one torch for both


def test_the_wheel_holds_paca_hpu_only(tmp_path):
    """``pip install .`` installs no benchmark code: the wheel built from the source tree, with the benchmark harness
    (``benchmarks/``) and ``scripts/`` next to the package as in the repository, holds ``paca_hpu`` and its metadata
    only. (It held ``paca_hpu/bench/``, 18 modules, before issue 21.)"""
    import shutil
    import zipfile

    src = _source_copy(tmp_path)
    for name in ("benchmarks", "scripts"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
                           "--disable-pip-version-check", "--quiet", str(src), "-w", str(tmp_path / "wheel")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"paca_hpu", "paca_hpu-0.1.0.dist-info"}, names
    modules = [n for n in names if n.endswith(".py")]
    assert "paca_hpu/__init__.py" in modules and "paca_hpu/layer/dense.py" in modules  # subpackages too
    assert not [n for n in modules if "bench" in n], modules


def _paca_hpu_names(path):
    """``[(line, "paca_hpu.mod.name")]`` for every name that ``path`` takes from paca_hpu: ``import paca_hpu[.mod]
    [as alias]``, ``from paca_hpu[.mod] import name [as alias]``, and attribute reads (``alias.name``, chained too)
    on what those bound."""
    import ast

    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    bound = {}  # local name -> the paca_hpu object it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "paca_hpu":
            for a in node.names:
                found.append((node.lineno, f"{node.module}.{a.name}"))
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "paca_hpu":
                    found.append((node.lineno, a.name))
                    bound[a.asname or "paca_hpu"] = a.name if a.asname else "paca_hpu"
    for node in ast.walk(tree):
        attrs = []
        while isinstance(node, ast.Attribute):
            attrs.insert(0, node.attr)
            node = node.value
        if attrs and isinstance(node, ast.Name) and node.id in bound:
            found.append((node.lineno, ".".join([bound[node.id]] + attrs)))
    return found


def test_the_benchmark_harness_uses_the_public_api_only():
    """The harness (``benchmarks/*.py``) and the scripts that drive it take nothing private from paca_hpu: no name
    with a leading underscore, from no module with one (the harness imported ``layer._PaCAFunction`` and called
    ``model._optimizer_step_post_hook`` and the ``_write_back`` / ``_delta_grad`` seams before issue 21)."""
    import glob

    files = sorted(glob.glob(os.path.join(REPO, "benchmarks", "*.py")))
    files += [os.path.join(REPO, "scripts", n) for n in ("benchmark.py", "study.py", "minimal_loop.py", "scale_out.py")]
    assert len(files) > 15
    private = [f"{os.path.relpath(f, REPO)}:{line}: {name}" for f in files for line, name in _paca_hpu_names(f)
               if any(part.startswith("_") and not part.endswith("__") for part in name.split("."))]
    assert not private, private
    paca_hpu_dir = os.path.join(REPO, "paca_hpu")
    for f in glob.glob(os.path.join(paca_hpu_dir, "**", "*.py"), recursive=True):  # and the package never imports it
        assert "import benchmarks" not in open(f, encoding="utf-8").read() and \
            "from benchmarks" not in open(f, encoding="utf-8").read(), f
