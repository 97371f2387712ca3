"""ModelConfig: a frozen, keyword-only dataclass with named presets.

Architecture variants are typed fields (`norm`, `pos`, `mlp`, ...), never inferred from a
model's name. A config is loadable by preset name, from YAML, or from the `config.yaml` that
sits beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from haina.core.config import from_dict, load_yaml, to_dict
from haina.core.errors import HainaError


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 8192
    block_size: int = 256  # maximum context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None  # None = n_head (MHA); 1 = MQA; in between = GQA
    head_size: int | None = None  # None: n_embd / n_head; set when heads were pruned, or as some HF models have it
    intermediate_size: int | None = None  # None: 4·d for gelu/relu, ≈8/3·d (multiple of 64) for swiglu
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    pos: Literal["learned", "sinusoidal", "rope"] = "learned"
    rope_theta: float = 10000.0
    # gelu is GPT-2's tanh approximation, gelu_exact the erf form (BERT's "gelu")
    mlp: Literal["gelu", "gelu_exact", "relu", "swiglu"] = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    # False: every token attends to the whole sequence (an encoder, pretrained with `train.objective: mlm`);
    # such a model reads text but cannot generate it.
    causal: bool = True
    # BERT's computation (what `haina import hf` gives a BertModel / BertForMaskedLM); the defaults are GPT-2's and
    # Llama's. post: each block is norm(x + attn(x)), then norm(x + mlp(x)), and ends normalized, so there is no
    # final norm; pre: x + attn(norm(x)), then x + mlp(norm(x)), with a final norm after the last block.
    norm_position: Literal["pre", "post"] = "pre"
    embed_norm: bool = False  # a norm on the summed embeddings, before the first block
    # Rows of BERT's token-type (segment) embeddings; 0: none. haina passes no token types, so every token is
    # type 0 and only the first row is used; the others are kept so that an exported BERT is the imported one.
    type_vocab_size: int = 0
    # BERT's masked-LM head: dense -> activation (the MLP's) -> norm before the vocabulary projection, which has
    # a bias of its own; False: the projection alone, without bias.
    mlm_head: bool = False
    dropout: float = 0.0
    init: Literal["normal", "xavier", "kaiming"] = "normal"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise HainaError("vocab_size, block_size, n_layer, n_head and n_embd must be positive")
        if self.n_kv_head is not None and self.n_kv_head < 1:
            raise HainaError(f"n_kv_head must be positive (or null for n_head), got {self.n_kv_head}")
        if self.head_size is not None and self.head_size < 1:
            raise HainaError(f"head_size must be positive (or null for n_embd / n_head), got {self.head_size}")
        if self.head_size is None and self.n_embd % self.n_head:
            raise HainaError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or head_size set")
        if self.n_head % self.kv_heads:
            raise HainaError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.pos == "rope" and self.head_dim % 2:
            raise HainaError(f"rope needs an even head dimension, got {self.head_dim}")
        if self.type_vocab_size < 0:
            raise HainaError(f"type_vocab_size must be 0 (no token types) or positive, got {self.type_vocab_size}")
        if self.mlm_head and self.mlp == "swiglu":
            raise HainaError("mlm_head applies the MLP's activation to one projection, which swiglu (two) has not; "
                             "use mlp gelu_exact, gelu or relu with mlm_head")
        if not 0.0 <= self.dropout < 1.0:
            raise HainaError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "swiglu":
            # Keep parameters equal to a 4·d MLP: 3 matrices of d×h with h = 8/3·d, rounded up to 64.
            return ((8 * self.n_embd // 3) + 63) // 64 * 64
        return 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str, **changes) -> ModelConfig:
        if name not in PRESETS:
            raise HainaError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **changes)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """From a mapping; a `preset` key starts from that preset and the other keys override it."""
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            base = to_dict(cls.from_name(preset))
            base.update(data)
            data = base
        return from_dict(cls, data, where="model.")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """From a YAML file: a model config, or a recipe / checkpoint config with a `model:` section."""
        data = load_yaml(path)
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return to_dict(self)


def _llama(**kw) -> ModelConfig:
    return ModelConfig(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, **kw)


PRESETS: dict[str, ModelConfig] = {
    # ≈1M parameters: unit tests and smoke runs.
    "tiny": ModelConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128),
    # ≈10M parameters: the CPU workhorse.
    "small": ModelConfig(vocab_size=8192, block_size=512, n_layer=6, n_head=5, n_embd=320),
    "gpt2-124m": ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # Llama 3.2 1B shapes.
    "llama-1b": _llama(vocab_size=128256, block_size=8192, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                       intermediate_size=8192, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True),
    # Llama 2 7B and 70B shapes.
    "llama-7b": _llama(vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_embd=4096,
                       intermediate_size=11008, norm_eps=1e-5, tie_embeddings=False),
    "llama-70b": _llama(vocab_size=32000, block_size=4096, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192,
                        intermediate_size=28672, norm_eps=1e-5, tie_embeddings=False),
    # Bidirectional encoders for masked-language-model pretraining and classification. ≈5M parameters with an
    # 8192-token vocabulary: pretrains on CPU in minutes.
    "encoder-small": ModelConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256, causal=False),
    # BERT-base's shape (WordPiece vocabulary of 30522, 512 positions, LayerNorm eps 1e-12), ≈110M parameters.
    # Its size, not its exact computation: these blocks are pre-norm, the gelu the tanh approximation, with no
    # token types or MLM-head transform; BERT's computation is norm_position post, embed_norm, mlp gelu_exact,
    # type_vocab_size 2 and mlm_head (as `haina import hf` reads a real BERT).
    "bert-base": ModelConfig(vocab_size=30522, block_size=512, n_layer=12, n_head=12, n_embd=768,
                             intermediate_size=3072, norm_eps=1e-12, causal=False),
}


def require_causal(cfg: ModelConfig, what: str, where: str) -> None:
    """A one-line HainaError when `what` (a command that predicts next tokens) meets an encoder (causal: false)."""
    if not cfg.causal:
        raise HainaError(f"{what} needs a causal language model, and {where} is an encoder (causal: false), which sees "
                         "the tokens it would predict; use it with `haina finetune classify`")

