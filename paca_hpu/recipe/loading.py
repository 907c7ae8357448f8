"""Loading for the training script: tokenizer, base model (dtype, 4-bit quantization, Gaudi generation options),
tokenized data and collator, and the calibration batches of a data-aware column selection."""

from typing import Any, Dict, List, Optional

from .._transformers_compat import dtype_kwarg
from ..selection import DATA_AWARE_INIT_INDICES
from .errors import UsageError


def calibration_batches(adapter_args, config, train_ds, collator, training_args) -> Optional[List[Dict[str, Any]]]:
    """The training batches a data-aware ``--paca_init_indices`` chooses its columns from (None when the run needs
    none; ``config`` is the run's :class:`~paca_hpu.PaCAConfig`): ``--paca_calibration_batches`` batches of
    ``--per_device_train_batch_size`` examples of the training set, drawn in an order fixed by ``--seed`` through a
    private generator (the global RNG, hence the training order, is left alone), collated like the training batches.

    Raises:
        UsageError: no training set to calibrate on.
    """
    if adapter_args.peft_type != "paca" or config.init_indices not in DATA_AWARE_INIT_INDICES:
        return None
    if train_ds is None:
        raise UsageError(f"--paca_init_indices {config.init_indices} chooses columns from training "
                         "batches: run with training data (--do_train), or use --paca_init_indices random")
    import itertools

    import torch

    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=training_args.per_device_train_batch_size, shuffle=True, collate_fn=collator,
        generator=torch.Generator().manual_seed(int(training_args.seed)))
    return list(itertools.islice(loader, adapter_args.paca_calibration_batches))


def model_source(model_name_or_path: Optional[str]) -> str:
    """Where the base model loads from: the embedded SmolLM2-135M-Instruct when ``--model_name_or_path`` is not
    given, a local folder as its absolute path (the adapter records it, and must reload from anywhere), else the
    Hub id (:func:`paca_hpu.hub.base_model_source`).

    Raises:
        UsageError: the embedded model is not installed, or the path / id names no model.
    """
    if model_name_or_path is None:
        from ..embedded import embedded_model_path

        try:
            return embedded_model_path()
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise UsageError(str(err)) from err
    from ..hub import ModelSourceError, base_model_source

    try:
        return base_model_source(model_name_or_path, label="--model_name_or_path")
    except ModelSourceError as err:
        raise UsageError(str(err)) from err


def from_hub_or_cache(load, name: str, **kwargs):
    """:func:`paca_hpu.hub.from_pretrained_cache_first`, with its one-line errors as :class:`UsageError`."""
    from ..hub import ModelSourceError, from_pretrained_cache_first

    try:
        return from_pretrained_cache_first(load, name, **kwargs)
    except ModelSourceError as err:
        raise UsageError(str(err)) from err


def load_tokenizer(model_args, model_path: str):
    from transformers import AutoTokenizer

    tok = from_hub_or_cache(
        AutoTokenizer.from_pretrained,
        model_args.tokenizer_name or model_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def model_dtype(training_args, peft_type: str):
    import torch

    # adapters: bf16 base weights (PaCA's deltas stay float32; LoRA factors follow run_lora_clm.py, lora_dtype);
    # full fine-tuning keeps float32 master weights and relies on autocast for bf16 compute.
    if training_args.bf16 and peft_type != "none":
        return torch.bfloat16
    return None


def lora_dtype(training_args, model_args):
    """``--peft_type lora --bf16``: the LoRA factors in bf16, as optimum-habana's run_lora_clm.py trains them (it
    casts the peft model with ``.to(torch.bfloat16)``); QLoRA (``--load_in_4bit``) keeps peft's float32 factors."""
    import torch

    return torch.bfloat16 if training_args.bf16 and not getattr(model_args, "load_in_4bit", False) else None


def quantization_kwargs(model_args, training_args) -> Dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``--load_in_4bit`` (empty without it): a ``BitsAndBytesConfig``,
    the model dtype (the compute dtype unless --bf16 sets bf16; transformers would otherwise pick float16) and the
    training device as ``device_map`` (trainers do not move bitsandbytes models)."""
    if not model_args.load_in_4bit:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    compute = model_args.bnb_4bit_compute_dtype or ("bfloat16" if training_args.bf16 else "float32")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                                bnb_4bit_compute_dtype=getattr(torch, compute),
                                bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant)
    return {"quantization_config": config, "device_map": {"": str(training_args.device)},
            dtype_kwarg(): torch.bfloat16 if training_args.bf16 else getattr(torch, compute)}


def load_model(model_args, model_path: str, training_args, peft_type: str, use_cache: bool):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        low_cpu_mem_usage=model_args.low_cpu_mem_usage,
    )
    dtype = model_dtype(training_args, peft_type)
    if dtype is not None:
        kwargs[dtype_kwarg()] = dtype
    kwargs.update(quantization_kwargs(model_args, training_args))
    model = from_hub_or_cache(AutoModelForCausalLM.from_pretrained, model_path, **kwargs)
    model.config.use_cache = False if training_args.gradient_checkpointing else use_cache
    return model


def configure_gaudi_generation(model, model_args, training_args) -> None:
    """HPU only, as run_lora_clm.py: the Gaudi attention / RoPE options live in ``model.generation_config``."""
    if not getattr(training_args, "use_habana", False) or model.config.model_type != "llama":
        return
    gc = model.generation_config
    if model_args.attn_softmax_bf16:
        gc.attn_softmax_bf16 = True
    if getattr(training_args, "attn_implementation", None) == "gaudi_fused_sdpa":
        gc.use_flash_attention = True
        gc.flash_attention_recompute = bool(getattr(training_args, "flash_attention_recompute", False))
        gc.flash_attention_causal_mask = bool(getattr(training_args, "flash_attention_causal_mask", False))
    if not model_args.use_fused_rope:
        gc.use_fused_rope = False


def load_data(data_args, tokenizer, training_args, info):
    from .. import data as _data

    raw = _data.load_raw_datasets(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        validation_split_percentage=data_args.validation_split_percentage,
        seed=data_args.dataset_seed,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
    )
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = _data.tokenize_datasets(
            raw, tokenizer, data_args.max_seq_len, dataset_concatenation=data_args.dataset_concatenation,
            train_on_inputs=bool(data_args.train_on_inputs), chat_prompt=data_args.chat_prompt,
        )
    pad = data_args.pad_to_max_length
    if pad is None:  # static shapes on HPU (one compiled graph), dynamic padding elsewhere
        pad = info.type == "hpu"
    collator = _data.make_data_collator(tokenizer, pad_to_max_length=data_args.max_seq_len if pad else None)
    return tokenized, collator
