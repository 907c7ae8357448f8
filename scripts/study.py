#!/usr/bin/env python
"""Run or continue the parity study and column-selection ablation (resumable, one file per finished run).

    nice -n 19 python scripts/study.py                 # fp32 on AVX2-only CPUs, bf16 where the CPU has bf16 GEMMs
    python scripts/study.py --summary                  # the tables' state from the run files, no training

Run files: docs/benchmarks/<name>/runs/; checkpoints: outputs/study-ckpt/<name>/ (see benchmarks.study_runs).
Stop it at any time (Ctrl-C, kill); the same command continues where it stopped.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 where torch.ops.mkldnn._is_mkldnn_bf16_supported() is True, else fp32")
    p.add_argument("--name", default=None, help="study name (default study-<dtype>-b4-s256)")
    p.add_argument("--only", default=None, help="comma-separated variants to run (default: all, in study order)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--ckpt_dir", default=None, help="default outputs/study-ckpt/<name>")
    p.add_argument("--summary", action="store_true", help="print the summary of the existing runs and exit")
    args = p.parse_args(argv)
    import torch

    from benchmarks.study_runs import StudyConfig, run_study, study_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    name = args.name or f"study-{dtype}-b4-s256"
    study_dir = ROOT / "docs" / "benchmarks" / name
    if args.summary:
        if not (study_dir / "study.json").is_file():
            print(f"error: no study at {study_dir}: run scripts/study.py first", file=sys.stderr)
            return 2
        print(json.dumps(study_summary(study_dir), indent=1))
        return 0
    ckpt = Path(args.ckpt_dir) if args.ckpt_dir else ROOT / "outputs" / "study-ckpt" / name
    study_dir.mkdir(parents=True, exist_ok=True)
    log_path = study_dir / "log.txt"

    def log(msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    only = [s.strip() for s in args.only.split(",")] if args.only else None

    def rebuild(_record) -> None:  # the page and the plot follow every run file written
        from benchmarks.report import write_docs_page
        from benchmarks.study import plot_study

        try:
            plot_study(str(study_dir))
            write_docs_page(str(ROOT / "docs" / "benchmarks.md"))
        except Exception as err:  # noqa: BLE001 - the run file is written; hours of training must not stop here
            # (e.g. the checkout's page templates changed under this long-running process)
            log(f"the page was not rebuilt ({type(err).__name__}: {err}); the run files are complete: the next "
                "start of scripts/study.py rebuilds it")

    summary = run_study(StudyConfig(name=name, dtype=dtype), study_dir, ckpt, ROOT, log, only=only,
                        on_record=rebuild)
    rebuild(None)
    log(f"study {name}: {summary['runs']} run files; missing: {summary['missing'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
