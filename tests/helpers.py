"""Shared helpers for the paca_hpu test-suite: tiny model builders and independent references.

Nothing in here imports paca_hpu, so other test modules can use the builders and the
reference computations without depending on the implementation under test.
"""
from __future__ import annotations

import copy
import filecmp
import json
import os
from typing import Callable, Dict, Iterable, Tuple

import torch
from torch import nn

VOCAB = 100
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2

LLAMA_LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_CONV1D_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# --------------------------------------------------------------------------------------
# model builders
# --------------------------------------------------------------------------------------

def llama_config(hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, layers: int = LAYERS,
                 vocab: int = VOCAB, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_dropout=0.0,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = False, **cfg_kwargs):
    """A tiny LlamaForCausalLM (hidden 32, 2 layers, vocab 100), deterministic given ``seed``."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(tie=tie, **cfg_kwargs)
    cfg._attn_implementation = "eager"
    with _fork_rng(seed):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    model.eval()
    return model


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, n_embd: int = HIDDEN):
    """A tiny GPT2LMHeadModel (Conv1D projections, tied lm_head), deterministic, dropout-free."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=n_embd,
        n_layer=LAYERS,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.1,
    )
    cfg._attn_implementation = "eager"
    with _fork_rng(seed):
        model = GPT2LMHeadModel(cfg)
    model.to(dtype)
    model.eval()
    return model


class OneLayer(nn.Module):
    """``proj`` is the only linear layer; used for single-layer tests (target_modules=["proj"])."""

    def __init__(self, in_features: int = 64, out_features: int = 24, bias: bool = True,
                 seed: int = 0, dtype: torch.dtype = torch.float64):
        super().__init__()
        with _fork_rng(seed):
            self.proj = nn.Linear(in_features, out_features, bias=bias)
        self.to(dtype)

    def forward(self, x):
        return self.proj(x)


class OneConv1D(nn.Module):
    """``proj`` is a transformers Conv1D (weight stored (in, out))."""

    def __init__(self, in_features: int = 64, out_features: int = 24, seed: int = 0,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        with _fork_rng(seed):
            self.proj = Conv1D(out_features, in_features)
            nn.init.normal_(self.proj.weight, std=0.2)
            nn.init.normal_(self.proj.bias, std=0.2)
        self.to(dtype)

    def forward(self, x):
        return self.proj(x)


class TiedToyLM(nn.Module):
    """A plain (non-transformers) LM whose output layer ``out`` is tied to the input embedding."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, seed: int = 0):
        super().__init__()
        with _fork_rng(seed):
            self.emb = nn.Embedding(vocab, hidden)
            self.body = nn.Linear(hidden, hidden)
            self.out = nn.Linear(hidden, vocab, bias=False)
        self.out.weight = self.emb.weight

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.out

    def forward(self, ids):
        return self.out(torch.tanh(self.body(self.emb(ids))))


class _fork_rng:
    """Seed torch's global RNG inside the block, restore the caller's RNG state afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)
        return False


def random_ids(batch: int = 2, seq: int = 8, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def randn(*shape, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------------------
# introspection helpers (by duck typing / class name, so they do not import paca_hpu)
# --------------------------------------------------------------------------------------

def paca_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Qualified name -> module for every module whose class is named PaCALinear."""
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "PaCALinear"}


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a base layer in nn.Linear layout (out, in); Conv1D stores (in, out)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def dense_weight_grad(module: nn.Module) -> torch.Tensor:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.grad.t()
    return module.weight.grad


def scatter_deltas_into_dense(dense_model: nn.Module, paca_model: nn.Module) -> nn.Module:
    """In ``dense_model`` (a plain copy of the base model), add ``scaling * delta`` into the
    selected columns of every layer that is a PaCALinear in ``paca_model`` (in the dense dtype)."""
    with torch.no_grad():
        for name, layer in paca_layers(paca_model).items():
            base = dense_model.get_submodule(name)
            w = dense_weight(base)
            idx = layer.indices.long()
            upd = w[:, idx] + layer.scaling * layer.delta.detach().to(w.dtype)
            w[:, idx] = upd
    return dense_model


# --------------------------------------------------------------------------------------
# saved-tensor measurement
# --------------------------------------------------------------------------------------

def saved_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages saved for backward while running ``fn`` (which builds a graph).

    Storages of the tensors in ``exclude`` (parameters, buffers) are not counted.
    The pack hook returns ``t.detach()``: returning ``t`` itself keeps the autograd graph alive across calls.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in excluded:
            seen[ptr] = st.nbytes()
        return t.detach()

    def unpack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn()
    del out
    return sum(seen.values())


def deepcopy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    b = b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def named_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


class ZeroStyleOptimizer:
    """What DeepSpeed's ZeRO-1/2 optimizer does, in miniature: it is NOT a ``torch.optim.Optimizer`` (DeepSpeed's
    ``ZeROOptimizer`` derives from ``object``); it keeps a flat float32 master copy of the trainable parameters, steps
    an inner torch optimizer (``inner``, e.g. ``torch.optim.AdamW``) on that flat tensor, and copies the result back
    into the model's parameters.  PaCA's global optimizer-step post-hook fires for the inner optimizer, whose only
    parameter is the flat master tensor, so it finds no ``delta`` to write back."""

    def __init__(self, params, lr, inner=torch.optim.AdamW):
        self.params = [p for p in params if p.requires_grad]
        self.flat = torch.cat([p.detach().float().flatten() for p in self.params]).requires_grad_(True)
        self.optimizer = inner([self.flat], lr=lr)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self, closure=None):
        self.flat.grad = torch.cat([p.grad.float().flatten() for p in self.params])
        self.optimizer.step()
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(self.flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, sd):
        self.optimizer.load_state_dict(sd)


# --------------------------------------------------------------------------------------
# tiny checkpoints on disk and data files (the trainer and training-script tests)
# --------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def base_weight_files(path) -> set:
    """The model weight files in ``path``; ``model.safetensors`` counts only when it is not the adapter's second name
    (the same bytes as ``adapter_model.safetensors``, written for transformers' resume)."""
    found = set(os.listdir(path)) & set(WEIGHT_FILES)
    alias, adapter = os.path.join(path, "model.safetensors"), os.path.join(path, "adapter_model.safetensors")
    if "model.safetensors" in found and os.path.isfile(adapter) and filecmp.cmp(alias, adapter, shallow=False):
        found.discard("model.safetensors")
    return found


def qa_records(n, offset=0):
    """``n`` GSM8K-style rows ``{"question", "answer"}`` (small sums, answer ending "#### <sum>"), deterministic."""
    out = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, (3 * i) % 5 + 2
        out.append({"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}. #### {a + b}"})
    return out


def write_jsonl(path, records):
    """Write ``records`` (dicts) to ``path`` as JSON lines; returns the path as a string."""
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def make_tiny_checkpoint(path, seed=0, hidden_size=32):
    """A tiny LlamaForCausalLM (hidden 32 by default, 2 layers) + a small byte-level BPE tokenizer with a chat
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [r["question"] + " " + r["answer"] for r in qa_records(200)]
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


class StopAt:
    """Simulates an interruption: stop (after saving) once ``global_step == k``."""

    def __new__(cls, k):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= k:
                    control.should_save = True
                    control.should_training_stop = True

        return _Stop()


#: The repository root and the tests folder (test modules live in tests/<kind>/; these support files stay in tests/).
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
