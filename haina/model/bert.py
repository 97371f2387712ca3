"""BERT (`BertModel`, `BertForMaskedLM`) <-> haina: config and weight mapping, both directions.

A BERT is a haina encoder with BERT's options set (`ModelConfig`: causal false, norm_position post, embed_norm,
type_vocab_size, mlm_head, mlp gelu_exact, LayerNorm eps 1e-12). What does not cross over:

- token types: haina passes none, so every token is type 0 (a single sentence, as `finetune classify` feeds
  it). The whole token-type table is kept, so an exported model is the imported one, pairs included.
- the pooler (dense + tanh over [CLS], BertModel's `pooler_output`) and the next-sentence head: classification
  has its own head, so neither is imported; an exported BertModel has no pooler weights, and `transformers`
  initializes a fresh pooler (its `last_hidden_state` is unaffected).
- dropout: imported as 0, like every Hugging Face import; fine-tuning sets its own.

Plain dicts and tensors, as in `haina.model.hf`, which dispatches here for `model_type: bert`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from haina.core.errors import HainaError
from haina.model.config import ModelConfig

# hidden_act -> ModelConfig.mlp. transformers' "gelu" is the exact (erf) one; the tanh forms are haina's "gelu".
_ACTS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
_HF_ACTS = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}
HEAD = "cls.predictions."  # BertForMaskedLM's (and BertForPreTraining's) masked-LM head
# The options that make a haina encoder compute what BERT does.
_BERT = {"norm": "layernorm", "pos": "learned", "norm_position": "post", "embed_norm": True}


# ---------------------------------------------------------------------------------------- checks
def bert_mismatch(cfg: ModelConfig) -> list[str]:
    """What keeps the encoder `cfg` from being a BERT, as `option=value` strings (empty: it is one)."""
    off = [f"{k}={getattr(cfg, k)}" for k, v in _BERT.items() if getattr(cfg, k) != v]
    if cfg.mlp not in _HF_ACTS:
        off.append(f"mlp={cfg.mlp}")
    if cfg.kv_heads != cfg.n_head:
        off.append(f"n_kv_head={cfg.n_kv_head}")
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        off.append(f"head_size={cfg.head_size}")
    return off


def bert_only(cfg: ModelConfig) -> list[str]:
    """BERT's options that a causal model (Llama or GPT-2 layout) has set, as `option=value` strings."""
    off = [f"norm_position={cfg.norm_position}"] if cfg.norm_position != "pre" else []
    off += [f"{k}={getattr(cfg, k)}" for k in ("embed_norm", "type_vocab_size", "mlm_head") if getattr(cfg, k)]
    return off + (["mlp=gelu_exact"] if cfg.mlp == "gelu_exact" else [])


# ---------------------------------------------------------------------------------------- haina -> HF
def to_bert_config(cfg: ModelConfig, common: dict) -> dict:
    """config.json of the `BertForMaskedLM` (with an MLM head) or `BertModel` that computes what `cfg` does."""
    return {"architectures": ["BertForMaskedLM" if cfg.mlm_head else "BertModel"], "model_type": "bert",
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.ffn_dim, "hidden_act": _HF_ACTS[cfg.mlp], "max_position_embeddings": cfg.block_size,
            # No token types: two zero rows (what BERT's tokenizers ask for), which add nothing.
            "type_vocab_size": cfg.type_vocab_size or 2, "layer_norm_eps": cfg.norm_eps,
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
            "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
            "classifier_dropout": None, **common, "use_cache": False,
            # Without an MLM head there is no output matrix to tie or not.
            "tie_word_embeddings": cfg.tie_embeddings or not cfg.mlm_head}


def to_bert_state_dict(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """haina weights (as `Transformer.weights()`) -> `BertForMaskedLM` / `BertModel` names."""
    dtype = w["tok_emb.weight"].dtype
    C = cfg.n_embd

    def zeros(*shape: int) -> torch.Tensor:  # BERT always has biases: zeros make a bias-free model compute the same
        return torch.zeros(*shape, dtype=dtype)

    base = "bert." if cfg.mlm_head else ""  # BertModel saves its keys without the prefix
    out: dict[str, torch.Tensor] = {}

    def put(dst: str, src: str, size: int = 0) -> None:
        out[base + dst] = w[src] if src in w else zeros(size)

    put("embeddings.word_embeddings.weight", "tok_emb.weight")
    put("embeddings.position_embeddings.weight", "pos_emb.weight")
    out[base + "embeddings.token_type_embeddings.weight"] = w["type_emb.weight"] if cfg.type_vocab_size \
        else zeros(2, C)
    put("embeddings.LayerNorm.weight", "emb_norm.weight")
    put("embeddings.LayerNorm.bias", "emb_norm.bias", C)
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = w.get(f"{src}attn.qkv.{kind}", zeros(3 * C))
            for name, part in zip(("query", "key", "value"), qkv.split(C, dim=0), strict=True):
                out[f"{base}{dst}attention.self.{name}.{kind}"] = part
            for a, b, size in (("attn.proj", "attention.output.dense", C), ("norm1", "attention.output.LayerNorm", C),
                               ("mlp.fc", "intermediate.dense", cfg.ffn_dim), ("mlp.proj", "output.dense", C),
                               ("norm2", "output.LayerNorm", C)):
                put(f"{dst}{b}.{kind}", f"{src}{a}.{kind}", size)
    if cfg.mlm_head:
        out[HEAD + "transform.dense.weight"] = w["lm_head.dense.weight"]
        out[HEAD + "transform.dense.bias"] = w.get("lm_head.dense.bias", zeros(C))
        out[HEAD + "transform.LayerNorm.weight"] = w["lm_head.norm.weight"]
        out[HEAD + "transform.LayerNorm.bias"] = w.get("lm_head.norm.bias", zeros(C))
        out[HEAD + "bias"] = w["lm_head.bias"]
        if not cfg.tie_embeddings:
            # transformers >= 5 unties the decoder's bias from `bias` along with its weight, and uses the decoder's.
            out[HEAD + "decoder.weight"] = w["lm_head.weight"]
            out[HEAD + "decoder.bias"] = w["lm_head.bias"].clone()  # safetensors stores no shared tensors
    return out


# ---------------------------------------------------------------------------------------- HF -> haina
def from_bert_config(hf: dict, make: Callable[..., ModelConfig], size: Callable[[dict, str], int]) -> ModelConfig:
    """A haina `ModelConfig` from a BERT config.json; `make` and `size` are `haina.model.hf`'s checked builders.

    The MLM head is taken when `architectures` names a masked-LM model (`import_hf` sets it from the weights);
    without one there is no output matrix, and the LM head haina still has is tied to the embeddings.
    """
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise HainaError("a BERT with is_decoder / add_cross_attention is a causal or cross-attending model; only "
                         "BERT encoders (BertModel, BertForMaskedLM) are imported")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise HainaError(f"BERT position_embedding_type '{position}' has no haina equivalent (absolute positions only)")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise HainaError(f"BERT hidden_act {act!r} has no haina equivalent; supported: {', '.join(_ACTS)}")
    archs = hf.get("architectures") or []
    mlm = isinstance(archs, list) and any(isinstance(a, str) and a.endswith(("ForMaskedLM", "ForPreTraining"))
                                          for a in archs)
    return make(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 512),
        n_layer=hf["num_hidden_layers"], n_head=size(hf, "num_attention_heads"), n_embd=size(hf, "hidden_size"),
        intermediate_size=hf["intermediate_size"], norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
        pos="learned", mlp=_ACTS[act], bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)) or not mlm,
        causal=False, norm_position="post", embed_norm=True, type_vocab_size=hf.get("type_vocab_size", 2),
        mlm_head=mlm, init_std=hf.get("initializer_range", 0.02))


def as_stored(hf: dict, names: Iterable[str]) -> dict:
    """A BERT's config.json with `architectures` saying what weights of these names hold: BertForMaskedLM with
    the MLM head, BertModel without (a sentence-transformers directory, a classifier's encoder)."""
    head = HEAD + "transform.dense.weight" in set(bert_names(dict.fromkeys(names)))
    return {**hf, "architectures": ["BertForMaskedLM" if head else "BertModel"]}


def bert_names(sd: dict) -> dict:
    """Weights keyed as BertModel's own (no `bert.` prefix), with the masked-LM head under `cls.`.

    Old checkpoints converted from TensorFlow name LayerNorm parameters gamma and beta; they are renamed.
    """
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("bert.")
        if k.endswith(("LayerNorm.gamma", "LayerNorm.beta")):
            k = k.rsplit(".", 1)[0] + (".weight" if k.endswith("gamma") else ".bias")
        out[k] = v
    return out


def from_bert_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`transformers` BERT weights (BertModel, BertForMaskedLM, or any Bert* model's encoder) -> haina `weights()`.

    Keys nothing here reads (the pooler, the next-sentence or a classification head, `position_ids`) are left.
    """
    w = bert_names(sd)

    def get(name: str) -> torch.Tensor:
        if name not in w:
            raise HainaError(f"the Hugging Face weights lack '{name}'; is the directory complete?")
        return w[name]

    out = {"tok_emb.weight": get("embeddings.word_embeddings.weight"),
           "pos_emb.weight": get("embeddings.position_embeddings.weight"),
           "type_emb.weight": get("embeddings.token_type_embeddings.weight"),
           "emb_norm.weight": get("embeddings.LayerNorm.weight"), "emb_norm.bias": get("embeddings.LayerNorm.bias")}
    for i in range(cfg.n_layer):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([get(f"{src}attention.self.{p}.{kind}")
                                                      for p in ("query", "key", "value")])
            for a, b in (("attn.proj", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
                         ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"), ("norm2", "output.LayerNorm")):
                out[f"{dst}{a}.{kind}"] = get(f"{src}{b}.{kind}")
    if cfg.mlm_head:
        for a, b in (("dense", "transform.dense"), ("norm", "transform.LayerNorm")):
            out[f"lm_head.{a}.weight"] = get(f"{HEAD}{b}.weight")
            out[f"lm_head.{a}.bias"] = get(f"{HEAD}{b}.bias")
        # The decoder's bias is the one BertLMPredictionHead adds. Tied, it is `bias` under a second name (and
        # transformers >= 5 saves only `bias`); untied in transformers >= 5, `bias` is a parameter nothing reads.
        out["lm_head.bias"] = w.get(HEAD + "decoder.bias", w.get(HEAD + "bias"))
        if out["lm_head.bias"] is None:
            raise HainaError(f"the Hugging Face weights lack '{HEAD}bias'; is the directory complete?")
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = get(HEAD + "decoder.weight")
    return out


__all__ = ["as_stored", "bert_mismatch", "bert_names", "bert_only", "from_bert_config", "from_bert_state_dict",
           "to_bert_config", "to_bert_state_dict"]
