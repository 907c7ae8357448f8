"""The resumable parity study and column-selection ablation: one JSON file per finished run, successive halving
on the learning-rate grid, checkpoints so that an interrupted run continues where it stopped.

A *run* is one (quality variant, learning rate, seed). Every run follows the same protocol as
:mod:`benchmarks.quality` (fresh copy of the base model, the same batches in the same order, AdamW, 10 %
warm-up then linear decay over the full ``steps``, held-out loss on the *selection* half of the validation blocks
every ``eval_every`` steps, the *report* half at the end).

Successive halving (per variant, seed 0):

1. every learning rate of the grid trains the first ``stage1_steps`` steps (a third of the schedule); the
   schedule is the full ``steps``-step schedule, so those steps are exactly the first steps of a full run;
2. while the best selection-half loss at ``stage1_steps`` is at an edge of the grid, one more point past that edge
   (same log spacing) is added and trained to ``stage1_steps`` (up to ``lr_extend`` points);
3. the best ``keep`` learning rates continue from their checkpoint to ``steps``; the winner is the lowest
   selection-half loss at ``steps``; a winner at an edge of everything tried gets one more point past that edge,
   trained for the whole schedule (up to ``lr_extend`` points again);
4. parity variants train the winner again with every other seed (another data order, LoRA initialisation and
   random PaCA columns).

Files (``study_dir`` = ``docs/benchmarks/<study name>/``): ``study.json`` (the configuration), ``runs/<variant>__lr<lr>
__seed<seed>.json`` (written atomically when a run reaches ``stage1_steps`` and again when it finishes: losses per
step, evaluations, wall and CPU seconds, commit, host), ``log.txt``. Checkpoints (trainable parameters, optimizer and
scheduler state, losses so far) go to ``ckpt_dir`` every ``eval_every`` steps and are deleted when the run finishes;
a run whose checkpoint was lost (a new machine) restarts from step 0 and must reproduce the recorded losses (a
mismatch is logged). The tables are built from the run files that exist (:func:`study_summary`).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from paca_hpu.atomic import write_atomic, write_json_atomic
from .quality import _beyond_edge, _spread

__all__ = ["StudyConfig", "run_id", "load_runs", "study_summary", "run_study"]


@dataclass
class StudyConfig:
    """What one study trains. ``grids`` maps a variant spec or a method (lora / paca / full) to its first grid;
    ``seed_variants`` get every seed of ``seeds`` at their best learning rate, the others only ``seeds[0]``.
    ``model``: ``"embedded"`` (SmolLM2-135M-Instruct) or ``"tiny"`` (random 2-layer LLaMA, for tests);
    ``max_*_samples`` limit the raw GSM8K examples (None: all)."""

    name: str
    dtype: str = "fp32"
    batch: int = 4
    seq_len: int = 256
    steps: int = 120
    stage1_steps: int = 40
    eval_every: int = 20
    r: int = 8
    alpha: float = 16.0
    keep: int = 2
    lr_extend: int = 3
    calibration_batches: int = 8
    seeds: List[int] = field(default_factory=lambda: [0, 1])
    variants: List[str] = field(default_factory=lambda: [
        "lora", "paca", "paca-req",
        "paca-weight_norm", "paca-activation_norm", "paca-req-weight_norm", "paca-req-activation_norm", "full"])
    seed_variants: List[str] = field(default_factory=lambda: ["lora", "paca", "paca-req"])
    model: str = "embedded"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    grids: Dict[str, List[float]] = field(default_factory=lambda: {
        "lora": [1e-3, 3e-3, 1e-2], "paca": [3e-3, 1e-2, 3e-2], "full": [1e-5, 3e-5, 1e-4],
        "paca-activation_norm": [3e-4, 1e-3, 3e-3], "paca-req-activation_norm": [3e-4, 1e-3, 3e-3]})

    def grid(self, spec: str, method: str) -> List[float]:
        return sorted(set(float(x) for x in self.grids.get(spec, self.grids.get(method, []))))


def run_id(spec: str, lr: float, seed: int) -> str:
    """File stem of one run: ``<spec>__lr<lr:g>__seed<seed>``."""
    return f"{spec}__lr{lr:g}__seed{seed}"


def load_runs(study_dir: Path) -> Dict[str, dict]:
    """Every run file of a study: run id -> its record."""
    out = {}
    for p in sorted((Path(study_dir) / "runs").glob("*.json")):
        with open(p, encoding="utf-8") as f:
            out[p.stem] = json.load(f)
    return out


def _host() -> Dict[str, str]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - an older torch without the op
        bf16 = False
    return {"cpu": model, "mkldnn_bf16": str(bf16), "torch": torch.__version__, "threads": str(torch.get_num_threads())}


def _commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class _Runner:
    """Trains, checkpoints and records single runs of one study (the base model and batches loaded once)."""

    def __init__(self, cfg: StudyConfig, study_dir: Path, ckpt_dir: Path, base, train_batches: Callable[[int], list],
                 select, report, log: Callable[[str], None], root: Path):
        from .quality import evaluate_loss

        self.cfg, self.dir, self.ckpt_dir, self.base, self.log = cfg, Path(study_dir), Path(ckpt_dir), base, log
        self.train_batches, self.select, self.report, self.root = train_batches, select, report, root
        self.on_record: Optional[Callable[[dict], None]] = None
        self.evaluate = evaluate_loss
        (self.dir / "runs").mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._batches: Dict[int, list] = {}
        self.eval_points = sorted(set(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)) | {cfg.stage1_steps,
                                                                                                   cfg.steps})

    def record(self, spec: str, lr: float, seed: int) -> Optional[dict]:
        p = self.dir / "runs" / f"{run_id(spec, lr, seed)}.json"
        if not p.is_file():
            return None
        with open(p, encoding="utf-8") as f:
            return json.load(f)

    def batches(self, seed: int) -> list:
        if seed not in self._batches:
            self._batches[seed] = self.train_batches(seed)
        return self._batches[seed]

    def _build(self, variant, seed: int):
        from .variants import build_variant, make_optimizer, paca_r_matching_lora
        from paca_hpu.selection import DATA_AWARE_INIT_INDICES
        from transformers import get_linear_schedule_with_warmup

        r = paca_r_matching_lora(self.base, self.cfg.r) if variant.r == "eq" else (variant.r or self.cfg.r)
        torch.manual_seed(seed)
        calib = (self.batches(seed)[:self.cfg.calibration_batches]
                 if variant.init_indices in DATA_AWARE_INIT_INDICES else None)
        built = build_variant(variant.method, self.base, r=r, alpha=self.cfg.alpha, paca_seed=seed,
                              init_indices=variant.init_indices, calibration_batches=calib)
        if self._amp(variant.method):  # float32 master weights (the bf16 values of the base, exactly)
            built.model.float()
            built.params = [p for p in built.model.parameters() if p.requires_grad]
        return built, r, make_optimizer, get_linear_schedule_with_warmup

    def _amp(self, method: str) -> bool:
        """Full fine-tuning in a bf16 study trains float32 master weights under bf16 autocast (what
        transformers' ``--bf16`` does): a bf16 parameter would lose AdamW updates of about ``lr`` (1e-5) against its
        spacing (about 1.2e-4 at |w| = 0.03). LoRA's and PaCA's trainable parameters are float32 already."""
        return method == "full" and self.cfg.dtype == "bf16"

    def _autocast(self, method: str):
        import contextlib

        return (torch.autocast("cpu", dtype=torch.bfloat16) if self._amp(method) else contextlib.nullcontext())

    def _trainable_state(self, model) -> Dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _restore(self, built, opt, sched, ck: dict) -> None:
        with torch.no_grad():
            params = dict(built.model.named_parameters())
            for n, t in ck["params"].items():
                params[n].copy_(t)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if built.name == "paca":
            from paca_hpu import sync_paca

            sync_paca(built.model)  # the merged columns follow the restored deltas

    def ensure(self, spec: str, lr: float, seed: int, target: int) -> dict:
        """The record of run (spec, lr, seed) trained to at least ``target`` steps: read if it exists, else
        trained (from its checkpoint when there is one)."""
        rec = self.record(spec, lr, seed)
        if rec is not None and rec["steps_done"] >= target:
            return rec
        return self._train(spec, lr, seed, target, rec)

    def _train(self, spec: str, lr: float, seed: int, target: int, rec: Optional[dict]) -> dict:
        from .measure import _to, train_step
        from .variants import parse_quality_variant
        from paca_hpu import device as _device

        cfg, rid = self.cfg, run_id(spec, lr, seed)
        variant = parse_quality_variant(spec)
        built, r, make_opt, make_sched = self._build(variant, seed)
        opt = make_opt(built, lr)
        sched = make_sched(opt, max(1, cfg.steps // 10), cfg.steps)
        state = {"step": 0, "train_loss": [], "eval": [[0, self.base_select]], "seconds": 0.0, "cpu_seconds": 0.0}
        ck_path = self.ckpt_dir / f"{rid}.pt"
        if ck_path.is_file():
            ck = torch.load(ck_path, map_location="cpu", weights_only=False)
            self._restore(built, opt, sched, ck)
            state = ck["state"]
            self.log(f"{rid}: resuming from its checkpoint at step {state['step']}")
        elif rec is not None:
            self.log(f"{rid}: no checkpoint; retraining from step 0 (must reproduce step {rec['steps_done']}: "
                     f"select {rec['eval'][-1][1]:.5f})")
        dev = _device.get_device()
        batches = self.batches(seed)
        t0, c0 = time.perf_counter(), time.process_time()
        step = state["step"]
        while step < target:
            step += 1
            with self._autocast(variant.method):
                loss = train_step(built, opt, _to(batches[step - 1], dev), scheduler=sched)
            state["train_loss"].append(float(loss))
            if step in self.eval_points:
                with self._autocast(variant.method):
                    sel = self.evaluate(built.model, self.select)
                state["eval"].append([step, sel])
                state["step"] = step
                state["seconds"] += time.perf_counter() - t0
                state["cpu_seconds"] += time.process_time() - c0
                t0, c0 = time.perf_counter(), time.process_time()
                self._check_reproduced(rid, rec, step, sel)
                if step < cfg.steps:
                    self._checkpoint(built, opt, sched, state, ck_path)
                if step == cfg.stage1_steps or step == cfg.steps:
                    with self._autocast(variant.method):
                        rec = self._write(spec, lr, seed, r, built, state, final=step == cfg.steps)
        del built, opt, sched
        gc.collect()
        if rec["steps_done"] >= cfg.steps and ck_path.is_file():
            ck_path.unlink()
        return rec

    def _check_reproduced(self, rid: str, rec: Optional[dict], step: int, sel: float) -> None:
        old = dict((int(s), v) for s, v in (rec or {}).get("eval", []))
        if step in old and abs(old[step] - sel) > 1e-4 * abs(old[step]):
            self.log(f"{rid}: WARNING step {step} select loss {sel:.6f} differs from the recorded {old[step]:.6f}")

    def _checkpoint(self, built, opt, sched, state: dict, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"params": self._trainable_state(built.model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "state": state}
        write_atomic(path, lambda tmp: torch.save(blob, tmp))

    def _write(self, spec: str, lr: float, seed: int, r: int, built, state: dict, final: bool) -> dict:
        cfg = self.cfg
        rec = {"spec": spec, "lr": lr, "seed": seed, "r": r if not spec.startswith("full") else None,
               "trainable": built.trainable, "steps": cfg.steps, "steps_done": state["step"],
               "status": "done" if final else "stage1", "train_loss": list(state["train_loss"]),
               "eval": [list(e) for e in state["eval"]], "final_select": state["eval"][-1][1],
               "seconds": round(state["seconds"], 1), "cpu_seconds": round(state["cpu_seconds"], 1),
               "commit": _commit(self.root), "host": _host(), "dtype": cfg.dtype,
               "batch": [cfg.batch, cfg.seq_len]}
        if final:
            c0 = time.process_time()
            rec["final_report"] = self.evaluate(built.model, self.report)
            rec["cpu_seconds"] = round(rec["cpu_seconds"] + time.process_time() - c0, 1)
        write_json_atomic(self.dir / "runs" / f"{run_id(spec, lr, seed)}.json", rec, indent=1)
        self.log(f"{run_id(spec, lr, seed)}: step {state['step']}/{cfg.steps} select {rec['final_select']:.4f}"
                 + (f" report {rec['final_report']:.4f}" if final else "")
                 + f" ({rec['seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} s CPU so far)")
        if self.on_record is not None:
            self.on_record(rec)
        return rec


def _search(run: _Runner, spec: str, grid: List[float]) -> dict:
    """Successive halving for one variant with the study's first seed; returns the plan it followed."""
    cfg, seed = run.cfg, run.cfg.seeds[0]
    stage1 = {lr: run.ensure(spec, lr, seed, cfg.stage1_steps) for lr in grid}

    def at1(lr):
        return _eval_at(stage1[lr], cfg.stage1_steps)

    for _ in range(cfg.lr_extend):
        best = min(grid, key=at1)
        if len(grid) < 2 or best not in (grid[0], grid[-1]) or not math.isfinite(at1(best)):
            break
        lr = _beyond_edge(grid, best == grid[0])
        run.log(f"{spec}: best lr {best:g} at step {cfg.stage1_steps} is at an edge of {grid}: adding {lr:g}")
        grid = sorted(grid + [lr])
        stage1[lr] = run.ensure(spec, lr, seed, cfg.stage1_steps)
    finalists = sorted((lr for lr in grid if math.isfinite(at1(lr))), key=at1)[:cfg.keep]
    full = {lr: run.ensure(spec, lr, seed, cfg.steps) for lr in finalists}
    for _ in range(cfg.lr_extend):
        win = min(full, key=lambda lr: full[lr]["final_select"])
        if win not in (grid[0], grid[-1]):
            break
        lr = _beyond_edge(grid, win == grid[0])
        run.log(f"{spec}: winner {win:g} after {cfg.steps} steps is at an edge of {grid}: training {lr:g} fully")
        grid = sorted(grid + [lr])
        full[lr] = run.ensure(spec, lr, seed, cfg.steps)
    return {"grid": grid, "finalists": sorted(full)}


def _eval_at(rec: dict, step: int) -> float:
    for s, v in rec["eval"]:
        if int(s) == step:
            return v if math.isfinite(v) else math.inf
    return math.inf


def study_summary(study_dir: Path) -> dict:
    """The study's state from its run files alone: per variant the learning rates tried (stage 1 and full), the
    best full-length run (lowest selection-half loss), whether it is interior, the report-half loss per seed and
    the ratios to LoRA's at the same seed; plus the runs still missing."""
    study_dir = Path(study_dir)
    with open(study_dir / "study.json", encoding="utf-8") as f:
        cfg = StudyConfig(**json.load(f))
    runs = load_runs(study_dir)
    by_spec: Dict[str, List[dict]] = {}
    for rec in runs.values():
        by_spec.setdefault(rec["spec"], []).append(rec)
    best: Dict[str, dict] = {}
    missing: List[str] = []
    seed0 = cfg.seeds[0]
    for spec in cfg.variants:
        recs = [r for r in by_spec.get(spec, []) if r["seed"] == seed0]
        done = [r for r in recs if r["steps_done"] >= cfg.steps]
        tried = sorted({r["lr"] for r in recs})
        if not done:
            missing.append(f"{spec}: " + ("grid search not started" if not recs else
                                          f"{len(recs)} stage-1 runs, no full-length run yet"))
            continue
        win = min(done, key=lambda r: r["final_select"])
        seeds = {str(seed0): win["final_report"]}
        wanted = cfg.seeds if spec in cfg.seed_variants else [seed0]
        for s in wanted[1:]:
            other = [r for r in by_spec.get(spec, []) if r["seed"] == s and r["lr"] == win["lr"]
                     and r["steps_done"] >= cfg.steps]
            if other:
                seeds[str(s)] = other[0]["final_report"]
            else:
                missing.append(f"{run_id(spec, win['lr'], s)} (seed {s} at the best lr)")
        vals = list(seeds.values())
        best[spec] = {"lr": win["lr"], "r": win["r"], "trainable": win["trainable"], "tried": tried,
                      "full_length": sorted(r["lr"] for r in done), "at_grid_edge": win["lr"] in (tried[0], tried[-1]),
                      "select_loss": win["final_select"], "heldout_loss": win["final_report"], "seeds": seeds,
                      "heldout_spread": _spread(vals),
                      "run": run_id(spec, win["lr"], seed0)}
    ratios = {}
    ref = best.get("lora", {}).get("seeds", {})
    for spec, b in best.items():
        per = {s: v / ref[s] for s, v in b["seeds"].items() if s in ref}
        if per:
            vals = list(per.values())
            ratios[spec] = {"per_seed": per, **_spread(vals)}
    return {"config": asdict(cfg), "best": best, "ratios_to_lora": ratios, "missing": missing,
            "runs": len(runs), "cpu_hours": sum(r.get("cpu_seconds", 0) for r in runs.values()) / 3600}


def run_study(cfg: StudyConfig, study_dir: Path, ckpt_dir: Path, root: Path, log: Callable[[str], None],
              only: Optional[Sequence[str]] = None, on_record: Optional[Callable[[dict], None]] = None) -> dict:
    """Run (or continue) the study: every variant's search, then the extra seeds; returns :func:`study_summary`.
    ``on_record(record)`` is called after each run file is written (e.g. to rebuild the docs page).

    Raises:
        ValueError: the study folder holds a ``study.json`` with another configuration (start a new study name).
    """
    from .inputs import all_batches, fixed_batches, load_tokenizer, packed_splits
    from .variants import DTYPES, ModelSpec, load_base_model, parse_quality_variant
    from paca_hpu import device as _device

    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = study_dir / "study.json"
    if cfg_path.is_file():
        with open(cfg_path, encoding="utf-8") as f:
            old = json.load(f)
        new = asdict(cfg)
        defaults = asdict(StudyConfig(name=cfg.name))
        if any(old.get(k, defaults[k]) != v for k, v in new.items()) or set(old) - set(new):
            raise ValueError(f"{cfg_path} holds another configuration ({old}); keep it or use a new study name")
    else:
        write_json_atomic(cfg_path, asdict(cfg), indent=1)
    for spec in cfg.variants:
        v = parse_quality_variant(spec)
        if not cfg.grid(spec, v.method):
            raise ValueError(f"no learning-rate grid for {spec!r}")
    spec = ModelSpec(kind=cfg.model)
    tok = load_tokenizer(spec)
    splits = packed_splits(tok, cfg.seq_len, max_train_samples=cfg.max_train_samples,
                           max_eval_samples=cfg.max_eval_samples)
    val = splits["validation"]
    select = all_batches(val.select(range(0, len(val), 2)), cfg.batch)
    report = all_batches(val.select(range(1, len(val), 2)), cfg.batch)
    base = load_base_model(spec, DTYPES[cfg.dtype], _device.get_device())
    n = max(cfg.steps, cfg.calibration_batches)
    run = _Runner(cfg, study_dir, ckpt_dir, base, lambda s: fixed_batches(splits["train"], cfg.batch, n, seed=s + 1),
                  select, report, log, root)
    run.on_record = on_record
    run.base_select = run.evaluate(base, select)
    log(f"study {cfg.name}: {len(splits['train'])} train / {len(val)} held-out blocks; base select loss "
        f"{run.base_select:.4f}; host {_host()}")
    plans = {}
    for spec in cfg.variants:
        if only and spec not in only:
            continue
        plans[spec] = _search(run, spec, cfg.grid(spec, parse_quality_variant(spec).method))
        if spec in cfg.seed_variants:
            summary = study_summary(study_dir)
            lr = summary["best"][spec]["lr"]
            for s in cfg.seeds[1:]:
                run.ensure(spec, lr, s, cfg.steps)
    return study_summary(study_dir)
