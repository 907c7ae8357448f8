"""The benchmark's quality section (benchmarks/quality.py, variants.py, study.py) in-process on tiny models:
parameter-matched r, variant specs, learning-rate grid extension and its edge flag, seed reruns, the docs tables."""
import pytest
import torch

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from benchmarks.quality import EDGE_NOTE, run_quality  # noqa: E402
from benchmarks.report import quality_markdown  # noqa: E402
from benchmarks.variants import (LLAMA_TARGETS, build_variant, paca_r_matching_lora,  # noqa: E402
                                 parse_quality_variant, tiny_llama_config)


def _llama(seed=0, **cfg):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batches(n, seed, batch=2, seq=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def test_paca_r_matching_lora_on_smollm2_shapes_matches_peft_parameter_counts():
    """SmolLM2-135M's projection shapes (hidden 576, intermediate 1536, 9 heads / 3 KV heads): r_eq = 16, and the
    trainable counts of real peft LoRA r 8 and PaCA r 16 are what the formula says (per decoder layer)."""
    base = _llama(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                  num_hidden_layers=1, vocab_size=300)
    assert paca_r_matching_lora(base, 8) == round(8 * 10176 / 5184) == 16
    lora = build_variant("lora", base, r=8)
    paca = build_variant("paca", base, r=16)
    assert lora.trainable == 8 * 10176 == 81408
    assert paca.trainable == 16 * 5184 == 82944
    tiny = _llama()  # hidden 64, intermediate 128, kv out 32: sum(in+out) = 1024, sum(out) = 512 -> exactly 2 r
    r_eq = paca_r_matching_lora(tiny, 8)
    assert r_eq == 16
    assert build_variant("paca", tiny, r=r_eq).trainable == build_variant("lora", tiny, r=8).trainable
    with pytest.raises(ValueError, match="above the smallest targeted in_features"):
        paca_r_matching_lora(tiny, 40)


@pytest.mark.parametrize("spec, method, r, init", [
    ("paca", "paca", None, "random"),
    ("paca-req", "paca", "eq", "random"),
    ("paca-r16-activation_norm", "paca", 16, "activation_norm"),
    ("paca-weight_norm-req", "paca", "eq", "weight_norm"),
    ("lora-r16", "lora", 16, "random"),
    ("full", "full", None, "random"),
])
def test_parse_quality_variant(spec, method, r, init):
    v = parse_quality_variant(spec)
    assert (v.spec, v.method, v.r, v.init_indices) == (spec, method, r, init)


@pytest.mark.parametrize("spec", ["dora", "lora-req", "lora-weight_norm", "full-r8", "paca-r0", "paca-req-r8",
                                  "paca-magnitude", "paca-req-req", ""])
def test_bad_quality_variants_are_refused(spec):
    with pytest.raises(ValueError, match="expected <method>"):
        parse_quality_variant(spec)


@pytest.mark.parametrize("grid, extend, want_grid, want_best, edge", [
    ([1e-5, 3e-5], 2, [1e-5, 3e-5, 9e-5, 2.7e-4], 2.7e-4, True),            # still rising after 2 points: flagged
    ([1e-2, 3e-2], 3, [3.7e-4, 1.11e-3, 3.33e-3, 1e-2, 3e-2], 1.11e-3, False),  # 3.7e-4 is worse: interior
    ([1e-4, 1e-3, 1e-2], 3, [1e-4, 1e-3, 1e-2], 1e-3, False),               # interior from the start: no extension
    ([1e-4, 3e-4, 9e-4, 10.0], 1, [1e-4, 3e-4, 9e-4, 10.0], 9e-4, False),   # a diverged (NaN) point is never best
])
def test_grid_search_grows_past_an_edge_until_the_best_is_interior(grid, extend, want_grid, want_best, edge):
    """Grid search on a known objective (held-out loss = (log10 lr + 3)^2, best at 1e-3; NaN above lr 1): the
    grown grid, the best point and the edge flag are what the objective dictates."""
    import math

    from benchmarks.quality import _search

    def train(variant, lr, seed):
        return {"lr": lr, "final_select": float("nan") if lr > 1 else (math.log10(lr) + 3) ** 2}

    v = parse_quality_variant("paca")
    runs, got_grid, key = _search(v, grid, 0, extend, train, lambda msg: None)
    assert got_grid == pytest.approx(want_grid) and runs[key]["lr"] == pytest.approx(want_best)
    assert sorted(r["lr"] for r in runs.values()) == got_grid
    assert (runs[key]["lr"] in (got_grid[0], got_grid[-1])) is edge


def test_a_real_run_left_at_the_grid_edge_is_flagged_in_log_and_report():
    """Tiny learning rates on a tiny LLaMA: the larger the better, so the best stays at the top edge."""
    logs = []
    res = run_quality(_llama(), ["paca"], {"paca": [1e-5, 3e-5]}, _batches(2, 1), _batches(1, 2), _batches(1, 3),
                      steps=2, eval_every=0, log=logs.append, lr_extend=1)
    b = res["best"]["paca"]
    assert b["grid"] == [1e-5, 3e-5, 9e-5] and b["lr"] == 9e-5 and b["at_grid_edge"] is True
    assert res["grid_edge"] == ["paca"] and b["trainable"] == 8 * 512 * 2 and b["r"] == 8
    assert any(EDGE_NOTE in line for line in logs)
    assert f"paca: {EDGE_NOTE}" in "\n".join(quality_markdown(res))


def test_seed_reruns_equal_single_seed_runs_and_ratios_are_per_seed():
    base = _llama()
    per_seed = {s: _batches(3, 10 + s) for s in (0, 1)}
    args = dict(select_batches=_batches(2, 2), report_batches=_batches(2, 3), steps=3, eval_every=0,
                log=lambda msg: None)
    res = run_quality(base, ["lora", "paca-activation_norm"], {"lora": [1e-3, 1e-2], "paca": [1e-3, 1e-2]},
                      per_seed.__getitem__, seeds=[0, 1], calibration_batches=2, **args)
    for spec in ("lora", "paca-activation_norm"):
        b = res["best"][spec]
        alone = run_quality(base, [spec], {spec.split("-")[0]: [b["lr"]]}, per_seed[1], seed=1,
                            calibration_batches=2, **args)
        assert b["seeds"]["1"] == alone["best"][spec]["heldout_loss"]  # the rerun is a true seed-1 run
        assert b["seeds"]["0"] == b["heldout_loss"]
    r = res["ratios_to_lora"]["paca-activation_norm"]
    want = {s: res["best"]["paca-activation_norm"]["seeds"][s] / res["best"]["lora"]["seeds"][s] for s in ("0", "1")}
    assert r["per_seed"] == pytest.approx(want) and r["min"] == min(want.values()) and r["max"] == max(want.values())
    md = "\n".join(quality_markdown(res))
    assert "| seed 0 | seed 1 |" in md and "paca-activation_norm" in md


def _tiny_study(tmp_path, **over):
    from benchmarks.study_runs import StudyConfig

    cfg = dict(name="study-test", dtype="fp32", batch=2, seq_len=64, steps=6, stage1_steps=2, eval_every=2,
               model="tiny", max_train_samples=24, max_eval_samples=8, variants=["lora", "paca"],
               seed_variants=["lora", "paca"], grids={"lora": [1e-3, 1e-2], "paca": [1e-2, 3e-2, 1e-1]})
    cfg.update(over)
    return StudyConfig(**cfg), tmp_path / "study-test", tmp_path / "ckpt"


def test_study_halving_resume_and_tables_from_run_files(tmp_path):
    """The resumable study on the tiny model: every grid point is trained to stage 1, only the best `keep` go on;
    an interrupted run continues from its checkpoint and a lost checkpoint retrains from zero, both giving exactly
    the uninterrupted run's losses; the summary and page come from the run files (ratios recomputed here)."""
    import json

    from benchmarks import study, study_runs

    cfg, d, ck = _tiny_study(tmp_path)
    summary = study_runs.run_study(cfg, d, ck, tmp_path, lambda m: None)
    runs = study_runs.load_runs(d)
    for spec in ("lora", "paca"):
        mine = [r for r in runs.values() if r["spec"] == spec and r["seed"] == 0]
        stage1 = {r["lr"]: dict(map(tuple, r["eval"]))[2] for r in mine}
        done = [r for r in mine if r["steps_done"] == 6]
        assert len(done) == 2 and len(mine) >= len(cfg.grids[spec])  # halving: only 2 of the grid go the whole way
        finalists = sorted(stage1, key=stage1.get)[:2]
        assert {r["lr"] for r in done} >= set(finalists)
        b = summary["best"][spec]
        assert b["lr"] == min(done, key=lambda r: r["final_select"])["lr"]
        seed1 = runs[study_runs.run_id(spec, b["lr"], 1)]
        assert b["seeds"] == {"0": runs[b["run"]]["final_report"], "1": seed1["final_report"]}
    ratio = {s: summary["best"]["paca"]["seeds"][s] / summary["best"]["lora"]["seeds"][s] for s in ("0", "1")}
    assert summary["ratios_to_lora"]["paca"]["per_seed"] == pytest.approx(ratio)
    assert summary["missing"] == []
    page = study.study_markdown(str(tmp_path))
    assert f"{summary['ratios_to_lora']['paca']['mean']:.4f}" in page
    assert f"(benchmarks/study-test/runs/{summary['best']['lora']['run']}.json)" in page  # relative to docs/
    assert page.count(study.PENDING) == 7  # full FT and PaCA r 16 (not in this study), five ablation cells

    # resume: the same command trains nothing more (no new files, same records)
    before = {k: json.dumps(v, sort_keys=True) for k, v in runs.items()}
    study_runs.run_study(cfg, d, ck, tmp_path, lambda m: None)
    assert {k: json.dumps(v, sort_keys=True) for k, v in study_runs.load_runs(d).items()} == before

    # an interrupted run (checkpoint at step 4) and a run whose checkpoint is lost reproduce the losses exactly
    best = summary["best"]["lora"]
    rid = best["run"]
    ref = runs[rid]
    cfg2, d2, ck2 = _tiny_study(tmp_path / "again")
    log = []
    partial = study_runs.run_study(cfg2, d2, ck2, tmp_path, log.append, only=["nothing"])
    assert partial["missing"]
    runner_log = []
    from benchmarks import study_runs as sr

    def stop_at_4(rec):
        raise KeyboardInterrupt if rec["steps_done"] == 2 and rec["spec"] == "lora" else None

    with pytest.raises(KeyboardInterrupt):
        sr.run_study(cfg2, d2, ck2, tmp_path, runner_log.append, on_record=stop_at_4)
    sr.run_study(cfg2, d2, ck2, tmp_path, runner_log.append)
    assert any("resuming from its checkpoint" in m for m in runner_log)
    again = sr.load_runs(d2)[rid]
    assert again["train_loss"] == ref["train_loss"] and again["final_report"] == ref["final_report"]
    (d2 / "runs" / f"{rid}.json").unlink()
    assert not list(ck2.glob(f"{rid}*"))  # a finished run leaves no checkpoint behind
    sr.run_study(cfg2, d2, ck2, tmp_path, runner_log.append)
    assert sr.load_runs(d2)[rid]["eval"] == ref["eval"]


def test_study_refuses_another_configuration_in_the_same_folder(tmp_path):
    from benchmarks import study_runs

    cfg, d, ck = _tiny_study(tmp_path, variants=[])
    study_runs.run_study(cfg, d, ck, tmp_path, lambda m: None)
    cfg.steps = 8
    with pytest.raises(ValueError, match="another configuration"):
        study_runs.run_study(cfg, d, ck, tmp_path, lambda m: None)


def test_study_section_is_pending_without_study_folders(tmp_path):
    from benchmarks import study

    page = study.study_markdown(str(tmp_path))
    assert page.startswith("## Parity study and column selection")
    assert page.count(study.PENDING) == 3 and "scripts/study.py" in page
