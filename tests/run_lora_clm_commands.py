"""Every ``run_lora_clm.py`` command line of optimum-habana's language-modeling README, verbatim (data for
tests/scripts/test_run_lora_clm_parity.py).

Source: github.com/huggingface/optimum-habana, ``examples/language-modeling/README.md`` at commit
1d8504c6c7666a19d71968dba50976dceaf7c6b6 (2026-01-14), section "PEFT / LORA/ADALORA/IA3/LLAMA_ADAPTER/VERA/LN_TUNING"
(7 commands) and its "Custom Files" subsection (1 command), plus "Training models with Long Sequence lengths"
(1 command): 8 distinct ``run_lora_clm.py`` invocations in all (the Falcon-180B mention has no command line).
The DeepSpeed / FSDP configuration files the commands name are optimum-habana's own, from the same directory and
commit (``DS_CONFIGS``).
"""

import shlex

#: name -> the command exactly as printed in the README (shell line continuations included).
COMMANDS = {
    "llama1_7b_single_card": r"""
PT_HPU_LAZY_MODE=1 python3 run_lora_clm.py \
    --model_name_or_path huggyllama/llama-7b \
    --dataset_name tatsu-lab/alpaca \
    --bf16 True \
    --output_dir ./model_lora_llama \
    --num_train_epochs 3 \
    --per_device_train_batch_size 16 \
    --eval_strategy "no" \
    --save_strategy "no" \
    --learning_rate 1e-4 \
    --warmup_ratio  0.03 \
    --lr_scheduler_type "constant" \
    --max_grad_norm  0.3 \
    --logging_steps 1 \
    --do_train \
    --do_eval \
    --use_habana \
    --use_lazy_mode \
    --throughput_warmup_steps 3 \
    --lora_rank=8 \
    --lora_alpha=16 \
    --lora_dropout=0.05 \
    --lora_target_modules "q_proj" "v_proj" \
    --dataset_concatenation \
    --max_seq_length 512 \
    --low_cpu_mem_usage True \
    --validation_split_percentage 4 \
    --adam_epsilon 1e-08
""",
    "gemma2_chat_template_2_cards": r"""
PT_HPU_LAZY_MODE=1 python ../gaudi_spawn.py \
    --world_size 2 --use_mpi run_lora_clm.py \
    --model_name_or_path google/gemma-2b-it \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 16 \
    --do_train \
    --do_eval \
    --num_train_epochs 15 \
    --output_dir ./output/2b_2hpu_16bs_15ep \
    --save_total_limit 1 \
    --gaudi_config_name Habana/gpt2 \
    --use_habana \
    --gradient_checkpointing \
    --throughput_warmup_steps 3 \
    --use_lazy_mode \
    --pipelining_fwd_bwd \
    --bf16 \
    --logging_strategy epoch \
    --eval_strategy epoch \
    --lora_target_modules "q_proj" "o_proj" "k_proj" "v_proj" "gate_proj" "up_proj" "down_proj" \
    --lora_rank=8 \
    --lora_alpha=16 \
    --lora_dropout=0.05 \
    --dataset_name mamamiya405/finred \
    --chat_prompt True
""",
    "falcon_40b_8_cards": r"""
PT_HPU_LAZY_MODE=1 PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST=ops_bf16.txt python3 ../gaudi_spawn.py \
    --world_size 8 --use_mpi run_lora_clm.py \
    --model_name_or_path tiiuae/falcon-40b \
    --dataset_name timdettmers/openassistant-guanaco \
    --bf16 True \
    --output_dir ./model_lora_falcon_ddp \
    --num_train_epochs 3 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --eval_strategy "no" \
    --save_strategy "no" \
    --learning_rate 4e-4 \
    --max_grad_norm  0.3 \
    --warmup_ratio  0.03 \
    --lr_scheduler_type "constant" \
    --logging_steps 1 \
    --do_train \
    --use_habana \
    --use_lazy_mode \
    --pipelining_fwd_bwd \
    --throughput_warmup_steps 3 \
    --lora_rank=64 \
    --lora_alpha=16 \
    --lora_dropout=0.1 \
    --lora_target_modules "query_key_value" "dense" "dense_h_to_4h" "dense_4h_to_h" \
    --dataset_concatenation \
    --max_seq_length 256 \
    --ddp_bucket_cap_mb 50 \
    --adam_epsilon 1e-08 \
    --do_eval \
    --low_cpu_mem_usage True \
    --validation_split_percentage 6
""",
    "llama3_1_8b_zero1_fp8": r"""
PT_TE_CUSTOM_OP=1 PT_HPU_LAZY_MODE=0 python ../gaudi_spawn.py \
    --world_size 8 --use_deepspeed run_lora_clm.py \
    --model_name_or_path meta-llama/Meta-Llama-3.1-8B \
    --dataset_name tatsu-lab/alpaca \
    --bf16 False \
    --output_dir ./model_lora_llama_8B \
    --num_train_epochs 3 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --eval_strategy "no" \
    --save_strategy "no" \
    --learning_rate 3e-4 \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "constant" \
    --max_grad_norm 1.0 \
    --logging_steps 10 \
    --do_train \
    --do_eval \
    --use_habana \
    --use_lazy_mode False \
    --throughput_warmup_steps 3 \
    --lora_rank=8 \
    --lora_alpha=16 \
    --lora_dropout=0.05 \
    --lora_target_modules "q_proj" "v_proj" \
    --dataset_concatenation \
    --max_seq_length 4096 \
    --adam_epsilon 1e-08 \
    --validation_split_percentage 4 \
    --deepspeed llama3_ds_zero1_config.json \
    --torch_compile_backend hpu_backend \
    --torch_compile \
    --fp8 \
    --attn_implementation gaudi_fused_sdpa \
    --flash_attention_causal_mask True  \
    --per_device_eval_batch_size 4  \
    --cache_size_limit 64 \
    --use_regional_compilation \
    --compile_from_sec_iteration \
    --allow_unspec_int_on_nn_module True
""",
    "llama2_70b_zero3_fp8": r"""
PT_HPU_LAZY_MODE=1 PT_HPU_MAX_COMPOUND_OP_SIZE=10 \
python3 ../gaudi_spawn.py --use_deepspeed --world_size 8 run_lora_clm.py \
  --model_name_or_path meta-llama/Llama-2-70b-hf \
  --deepspeed llama2_ds_zero3_config.json \
  --dataset_name tatsu-lab/alpaca \
  --bf16 True \
  --output_dir ./lora_out \
  --num_train_epochs 2 \
  --max_seq_len 2048 \
  --per_device_train_batch_size 10 \
  --per_device_eval_batch_size 1 \
  --gradient_checkpointing \
  --eval_strategy epoch \
  --eval_delay 2 \
  --save_strategy no \
  --learning_rate 0.0018 \
  --warmup_ratio 0.03 \
  --lr_scheduler_type "cosine" \
  --logging_steps 1 \
  --dataset_concatenation \
  --attn_softmax_bf16 True \
  --do_train \
  --do_eval \
  --use_habana \
  --use_lazy_mode \
  --pipelining_fwd_bwd \
  --throughput_warmup_steps 3 \
  --lora_rank 4 \
  --lora_target_modules "q_proj" "v_proj" "k_proj" "o_proj" \
  --validation_split_percentage 4 \
  --attn_implementation gaudi_fused_sdpa \
  --flash_attention_causal_mask True \
  --fp8 True
""",
    "llama2_70b_fsdp": r"""
PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST=ops_bf16.txt \
python3 ../gaudi_spawn.py --world_size 8 --use_mpi run_lora_clm.py \
  --model_name_or_path meta-llama/Llama-2-70b-hf \
  --dataset_name tatsu-lab/alpaca \
  --bf16 True \
  --output_dir ./lora_out \
  --max_seq_len 2048 \
  --gradient_checkpointing \
  --per_device_train_batch_size 5 \
  --save_strategy no \
  --learning_rate 0.0004 \
  --warmup_ratio 0.03 \
  --lr_scheduler_type "constant" \
  --logging_steps 1 \
  --dataset_concatenation \
  --do_train \
  --use_habana \
  --throughput_warmup_steps 3 \
  --lora_rank 4 \
  --lora_target_modules "q_proj" "v_proj" "k_proj" "o_proj" \
  --attn_softmax_bf16 True \
  --validation_split_percentage 4 \
  --use_lazy_mode False \
  --fsdp_config fsdp_config.json \
  --fsdp auto_wrap \
  --num_train_epochs 2 \
  --eval_strategy epoch \
  --per_device_eval_batch_size 1 \
  --eval_delay 2 \
  --do_eval \
  --pipelining_fwd_bwd False \
  --use_fused_rope False \
  --torch_compile_backend hpu_backend \
  --torch_compile \
  --gradient_accumulation_steps 2 \
  --attn_implementation gaudi_fused_sdpa \
  --flash_attention_causal_mask True
""",
    "starcoder_custom_files": r"""
PT_HPU_LAZY_MODE=1 python run_lora_clm.py \
    --model_name_or_path bigcode/starcoder \
    --train_file path_to_train_file \
    --validation_file path_to_validation_file \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 8 \
    --do_train \
    --do_eval \
    --output_dir /tmp/test-lora-clm \
    --bf16 \
    --use_habana \
    --use_lazy_mode \
    --use_hpu_graphs_for_inference \
    --dataset_concatenation \
    --throughput_warmup_steps 3
""",
    "llama3_1_8b_long_sequence_context_parallel": r"""
PT_HPU_LAZY_MODE=1 python3 ../gaudi_spawn.py  \
        --world_size 8  --use_deepspeed run_lora_clm.py \
        --model_name_or_path meta-llama/Llama-3.1-8B \
        --dataset_name tatsu-lab/alpaca \
        --bf16 True \
        --output_dir /tmp/lora_out \
        --max_seq_len 32768 \
        --per_device_train_batch_size 1 \
        --per_device_eval_batch_size 1 \
        --save_strategy no \
        --learning_rate 0.0004 \
        --warmup_ratio 0.03 \
        --lr_scheduler_type "constant" \
        --logging_steps 1 \
        --dataset_concatenation \
        --do_train \
        --use_habana \
        --throughput_warmup_steps 3 \
        --lora_rank 8 \
        --lora_target_modules "q_proj" "v_proj" "k_proj" "o_proj" \
        --attn_softmax_bf16 True \
        --validation_split_percentage 4 \
        --flash_attention_causal_mask True \
        --eval_strategy epoch \
        --pipelining_fwd_bwd \
        --use_lazy_mode \
        --attn_implementation gaudi_fused_sdpa \
        --deepspeed llama3_ds_zero1_config.json \
        --num_train_epochs 3 \
        --eval_delay 3 \
        --do_eval \
        --lora_alpha 16 \
        --lora_dropout 0.05 \
        --gradient_accumulation_steps 4 \
        --flash_attention_recompute True \
        --context_parallel_size 4
""",
}

#: optimum-habana's DeepSpeed / FSDP configuration files named by the commands (same directory and commit).
DS_CONFIGS = {
    "llama3_ds_zero1_config.json": {
        "steps_per_print": 64, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "bf16": {"enabled": True}, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1, "contiguous_gradients": False},
        "timers": {"throughput": {"enabled": True, "synchronized": False}},
    },
    "llama2_ds_zero3_config.json": {
        "steps_per_print": 64, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "bf16": {"enabled": True}, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": False,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "timers": {"throughput": {"enabled": True, "synchronized": False}},
    },
    "fsdp_config.json": {
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_forward_prefetch": False, "fsdp_offload_params": False, "fsdp_sharding_strategy": 1,
        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_sync_module_states": True, "fsdp_use_orig_params": True,
        "transformer_layer_cls_to_wrap": "GaudiLlamaDecoderLayer", "fsdp_activation_checkpointing": False,
        "fsdp_cpu_ram_efficient_loading": True,
    },
}


def script_argv(command: str):
    """The arguments ``run_lora_clm.py`` receives in ``command``: environment assignments and the launcher
    (``python3 ../gaudi_spawn.py --world_size N --use_mpi|--use_deepspeed``) stripped, shell quoting resolved."""
    tokens = shlex.split(command.replace("\\\n", " "))
    return tokens[tokens.index("run_lora_clm.py") + 1:]
