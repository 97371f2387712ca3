"""Hugging Face `transformers` conversion: config and weight mapping, both directions.

Three layouts have an exact equivalent in `transformers`:

- Llama (`LlamaForCausalLM`): rmsnorm + rope + swiglu. GQA/MQA map to `num_key_value_heads`,
  a bias to `attention_bias` and `mlp_bias` together.
- GPT-2 (`GPT2LMHeadModel`): layernorm + learned positions + gelu (tanh), plain multi-head
  attention. GPT-2's Conv1D stores weights as (in, out), the transpose of `nn.Linear`; it always
  has biases, so a bias-free haina model exports with zero biases, which computes the same.
- BERT (`BertForMaskedLM`, `BertModel`): an encoder with BERT's options (post-norm, embedding norm, token
  types, the masked-LM head); the mapping and what does not cross over are in `haina.model.bert`.

Everything here works on plain dicts and tensors; `transformers` is never imported, so a model
can be converted without the optional extra. Reading directories (sharded safetensors, pickled
`pytorch_model.bin`) is here too; the commands live in `haina.export.hf`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch

from haina.core.errors import HainaError
from haina.core.io import read_json
from haina.model.bert import (
    bert_mismatch,
    bert_only,
    from_bert_config,
    from_bert_state_dict,
    to_bert_config,
    to_bert_state_dict,
)
from haina.model.config import ModelConfig

Layout = Literal["llama", "gpt2", "bert"]
# model_type values we read. Mistral is Llama's architecture plus an optional sliding window.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gpt2", "bert")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------- haina -> HF
def hf_layout(cfg: ModelConfig) -> Layout:
    """The `transformers` layout that computes exactly what `cfg` does, or HainaError naming what has none."""
    if not cfg.causal:
        off = bert_mismatch(cfg)
        if off:
            raise HainaError(f"an encoder (causal: false) has no Llama or GPT-2 equivalent (both are causal), and this "
                             f"one is no BERT ({', '.join(off)}; BERT is layernorm + learned positions with "
                             "norm_position post and embed_norm true); export a causal model, or a BERT encoder")
        return "bert"
    extra = bert_only(cfg)
    if extra:
        raise HainaError(f"no Hugging Face equivalent for a causal model with {', '.join(extra)}: these are BERT's "
                         "options, and BERT is an encoder (causal: false)")
    if cfg.norm == "rmsnorm" and cfg.pos == "rope" and cfg.mlp == "swiglu":
        return "llama"
    if cfg.norm == "layernorm" and cfg.pos == "learned" and cfg.mlp == "gelu":
        if cfg.kv_heads != cfg.n_head:
            raise HainaError(f"GPT-2 has no grouped key/value heads (n_kv_head={cfg.n_kv_head}); export a model "
                             "with n_kv_head equal to n_head, or use the Llama layout (rmsnorm + rope + swiglu)")
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            raise HainaError(f"GPT-2 needs heads of n_embd / n_head; this model's are {cfg.head_dim} wide (head_size, "
                             "e.g. after pruning heads): use the Llama layout, which records head_dim")
        return "gpt2"
    llama = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu"}
    gpt2 = {"norm": "layernorm", "pos": "learned", "mlp": "gelu"}
    # Name the options that stop the closer of the two layouts.
    ref = llama if sum(getattr(cfg, k) == v for k, v in llama.items()) >= 2 else gpt2
    off = [f"{k}={getattr(cfg, k)}" for k, v in ref.items() if getattr(cfg, k) != v]
    raise HainaError(f"no Hugging Face equivalent for {', '.join(off)} (with {cfg.norm} + {cfg.pos} + {cfg.mlp}); "
                     "exportable are rmsnorm + rope + swiglu (Llama) and layernorm + learned + gelu (GPT-2)")


def to_hf_config(cfg: ModelConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """The `config.json` of the equivalent `transformers` model."""
    layout = hf_layout(cfg)
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_token_id,
              "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "initializer_range": cfg.init_std,
              "use_cache": True, "dtype": dtype, "torch_dtype": dtype}  # "torch_dtype" for transformers < 4.56
    if layout == "bert":
        return to_bert_config(cfg, common)
    if layout == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.n_embd,
                "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
                "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": cfg.bias,
                "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout, "pretraining_tp": 1, **common}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": cfg.ffn_dim, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "attn_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "add_cross_attention": False, **common}


def to_hf_state_dict(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """haina weights (as `Transformer.weights()`: a tied head stored once) -> `transformers` names and shapes."""
    layout = hf_layout(cfg)
    w = {k: v.detach() for k, v in weights.items()}
    if layout == "bert":
        return {k: v.contiguous() for k, v in to_bert_state_dict(cfg, w).items()}
    hs, nh, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
    out: dict[str, torch.Tensor] = {}
    if layout == "llama":
        out["model.embed_tokens.weight"] = w["tok_emb.weight"]
        for i in range(cfg.n_layer):
            src, dst = f"blocks.{i}.", f"model.layers.{i}."
            out[dst + "input_layernorm.weight"] = w[src + "norm1.weight"]
            out[dst + "post_attention_layernorm.weight"] = w[src + "norm2.weight"]
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                q, k, v = w[f"{src}attn.qkv.{kind}"].split([nh * hs, nkv * hs, nkv * hs], dim=0)
                out[f"{dst}self_attn.q_proj.{kind}"] = q
                out[f"{dst}self_attn.k_proj.{kind}"] = k
                out[f"{dst}self_attn.v_proj.{kind}"] = v
                out[f"{dst}self_attn.o_proj.{kind}"] = w[f"{src}attn.proj.{kind}"]
                gate, up = w[f"{src}mlp.fc.{kind}"].chunk(2, dim=0)
                out[f"{dst}mlp.gate_proj.{kind}"] = gate
                out[f"{dst}mlp.up_proj.{kind}"] = up
                out[f"{dst}mlp.down_proj.{kind}"] = w[f"{src}mlp.proj.{kind}"]
        out["model.norm.weight"] = w["norm_f.weight"]
    else:
        out["transformer.wte.weight"] = w["tok_emb.weight"]
        out["transformer.wpe.weight"] = w["pos_emb.weight"]

        def bias(name: str, size: int) -> torch.Tensor:
            # GPT-2 always has biases; zeros make a bias-free model compute the same thing.
            return w[name] if name in w else torch.zeros(size, dtype=w["tok_emb.weight"].dtype)

        for i in range(cfg.n_layer):
            src, dst = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{dst}{b}.weight"] = w[f"{src}{a}.weight"]
                out[f"{dst}{b}.bias"] = bias(f"{src}{a}.bias", cfg.n_embd)
            for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                         ("mlp.proj", "mlp.c_proj")):
                weight = w[f"{src}{a}.weight"]
                out[f"{dst}{b}.weight"] = weight.t()  # Conv1D is (in, out)
                out[f"{dst}{b}.bias"] = bias(f"{src}{a}.bias", weight.shape[0])
        out["transformer.ln_f.weight"] = w["norm_f.weight"]
        out["transformer.ln_f.bias"] = bias("norm_f.bias", cfg.n_embd)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------- HF -> haina
def from_hf_config(hf: dict) -> ModelConfig:
    """A haina `ModelConfig` from a `transformers` config.json dict (Llama family, GPT-2 or BERT)."""
    try:
        cfg = _from_hf_config(hf)
    except KeyError as e:
        raise HainaError(f"config.json has no '{e.args[0]}', which a {hf.get('model_type')} model needs") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as e:  # a field of the wrong type (a string for a size, ...)
        raise HainaError(f"config.json has a field of the wrong type or value ({e})") from None
    # Leave intermediate_size at None when it is haina's default for the width, so an exported and
    # re-imported config compares equal to the original.
    default = dataclasses.replace(cfg, intermediate_size=None)
    return default if default.ffn_dim == cfg.ffn_dim else cfg


def _from_hf_config(hf: dict) -> ModelConfig:
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise HainaError(f"cannot import model_type '{kind}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if kind == "bert":
        return from_bert_config(hf, _model_config, _int)
    tie = bool(hf.get("tie_word_embeddings", kind == "gpt2"))
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise HainaError(f"GPT-2 activation_function '{act}' has no haina equivalent (haina's gelu is the tanh "
                             "approximation, 'gelu_new')")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise HainaError("GPT-2 attention scaling options scale_attn_by_inverse_layer_idx / "
                             "scale_attn_weights=false have no haina equivalent")
        if hf.get("add_cross_attention"):
            raise HainaError("GPT-2 with cross-attention (add_cross_attention) is not a decoder-only model")
        n_embd = _int(hf, "n_embd")
        return _model_config(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions") or hf.get("n_ctx", 1024),
                             n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
                             intermediate_size=hf.get("n_inner") or 4 * n_embd, norm="layernorm",
                             norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos="learned", mlp="gelu", bias=True,
                             tie_embeddings=tie, init_std=hf.get("initializer_range", 0.02))
    if hf.get("hidden_act", "silu") != "silu":
        raise HainaError(f"{kind} hidden_act '{hf.get('hidden_act')}' has no haina equivalent (swiglu uses silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise HainaError(f"rope scaling '{rope_type}' has no haina equivalent; only plain rope (rope_theta) "
                         "is supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise HainaError(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} has no haina equivalent "
                         "(haina's `bias` covers both)")
    n_pos = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window", window is not None) and window is not None and window < n_pos:
        raise HainaError(f"sliding-window attention (sliding_window={window}) has no haina equivalent")
    n_embd, n_head = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
    head_dim = _int(hf, "head_dim") if hf.get("head_dim") else n_embd // n_head
    head_size = None if head_dim * n_head == n_embd else head_dim  # heads narrower or wider than d / n_head
    return _model_config(vocab_size=hf["vocab_size"], block_size=n_pos, n_layer=hf["num_hidden_layers"],
                         n_head=n_head, n_embd=n_embd, head_size=head_size, n_kv_head=hf.get("num_key_value_heads") or n_head,
                         intermediate_size=hf["intermediate_size"], norm="rmsnorm",
                         norm_eps=hf.get("rms_norm_eps", 1e-6), pos="rope", rope_theta=theta, mlp="swiglu",
                         bias=attn_bias, tie_embeddings=tie, init_std=hf.get("initializer_range", 0.02))


def _int(hf: dict, key: str) -> int:
    """A size field of config.json that arithmetic follows, checked before it is used."""
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HainaError(f"config.json: '{key}' must be a positive integer, got {value!r}")
    return value


def _model_config(**fields) -> ModelConfig:
    """A ModelConfig through `from_dict`, so a value of the wrong type in config.json is named, not a crash later."""
    size = fields.get("intermediate_size")
    if isinstance(size, int) and not isinstance(size, bool) and size < 1:  # ModelConfig reads < 1 as "the default"
        raise HainaError(f"config.json: the MLP width must be a positive integer, got {size!r}")
    try:
        return ModelConfig.from_dict(fields)
    except HainaError as e:
        raise HainaError(f"config.json: {e}") from None


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`transformers` weights (with or without the `model.` / `transformer.` prefix) -> haina `weights()`."""
    try:
        return _from_hf_state_dict(cfg, sd)
    except (RuntimeError, IndexError) as e:  # tensors whose shapes cannot be joined or transposed as config.json says
        raise HainaError(f"the Hugging Face weights do not have the shapes config.json describes "
                         f"({str(e).splitlines()[0]})") from None


def _from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layout = hf_layout(cfg)
    if layout == "bert":
        return {k: v.contiguous() for k, v in from_bert_state_dict(cfg, sd).items()}
    prefix = "model." if layout == "llama" else "transformer."
    # A bare base model (LlamaModel, GPT2Model) saves its keys without the prefix.
    w = {(k if k.startswith((prefix, "lm_head.")) else prefix + k): v for k, v in sd.items()}

    def get(name: str) -> torch.Tensor:
        if name not in w:
            raise HainaError(f"the Hugging Face weights lack '{name}'; is the directory complete?")
        return w[name]

    out: dict[str, torch.Tensor] = {}
    if layout == "llama":
        out["tok_emb.weight"] = get("model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            src, dst = f"model.layers.{i}.", f"blocks.{i}."
            out[dst + "norm1.weight"] = get(src + "input_layernorm.weight")
            out[dst + "norm2.weight"] = get(src + "post_attention_layernorm.weight")
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                out[f"{dst}attn.qkv.{kind}"] = torch.cat([get(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
                out[f"{dst}attn.proj.{kind}"] = get(f"{src}self_attn.o_proj.{kind}")
                out[f"{dst}mlp.fc.{kind}"] = torch.cat([get(f"{src}mlp.gate_proj.{kind}"),
                                                        get(f"{src}mlp.up_proj.{kind}")])
                out[f"{dst}mlp.proj.{kind}"] = get(f"{src}mlp.down_proj.{kind}")
        out["norm_f.weight"] = get("model.norm.weight")
    else:
        out["tok_emb.weight"] = get("transformer.wte.weight")
        out["pos_emb.weight"] = get("transformer.wpe.weight")
        for i in range(cfg.n_layer):
            src, dst = f"transformer.h.{i}.", f"blocks.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{dst}{a}.weight"] = get(f"{src}{b}.weight")
                out[f"{dst}{a}.bias"] = get(f"{src}{b}.bias")
            for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                         ("mlp.proj", "mlp.c_proj")):
                out[f"{dst}{a}.weight"] = get(f"{src}{b}.weight").t()
                out[f"{dst}{a}.bias"] = get(f"{src}{b}.bias")
        out["norm_f.weight"] = get("transformer.ln_f.weight")
        out["norm_f.bias"] = get("transformer.ln_f.bias")
    if not cfg.tie_embeddings:
        if "lm_head.weight" not in w:
            raise HainaError("the Hugging Face weights have no lm_head.weight but tie_word_embeddings is false; "
                             "a base model without an LM head cannot be imported")
        out["lm_head.weight"] = w["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------- files
def read_hf_config(path: str | Path) -> dict:
    """config.json of a local `transformers` model directory."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HainaError(f"{path} has no config.json; point --path at a saved Hugging Face model directory")
    return read_json(file, expect=dict)


def load_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local `transformers` model: model.safetensors, sharded safetensors (with an
    index), or pytorch_model.bin (read with `weights_only=True`, so no code runs from the pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    for index_name, loader in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "pt")):
        index = path / index_name
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise HainaError(f"{index} has no 'weight_map' naming the shard of each tensor")
            shards = sorted(set(weight_map.values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(_load_one(path / shard, loader, load_file))
            return sd
    if (path / "model.safetensors").is_file():
        return _load_one(path / "model.safetensors", "st", load_file)
    if (path / "pytorch_model.bin").is_file():
        return _load_one(path / "pytorch_model.bin", "pt", load_file)
    raise HainaError(f"{path} holds no weights (model.safetensors, a sharded index, or pytorch_model.bin)")


def _load_one(file: Path, kind: str, load_file) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise HainaError(f"weight shard {file} is missing")
    with open(file, "rb"):  # an unreadable file is a PermissionError here; safetensors would call it 'not found'
        pass
    try:
        sd = load_file(str(file)) if kind == "st" else torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files raise library-specific error types
        what = "a safetensors" if kind == "st" else "a PyTorch weights"
        reason = str(e).splitlines()[0].removeprefix("Error while deserializing header: ") if str(e) else ""
        raise HainaError(f"cannot read weights {file}: truncated or not {what} file ({reason or type(e).__name__})"
                          ) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise HainaError(f"{file} holds no mapping of tensor names to tensors")
    return sd


__all__ = ["DTYPES", "SUPPORTED_MODEL_TYPES", "from_hf_config", "from_hf_state_dict", "hf_layout", "load_hf_weights",
           "read_hf_config", "to_hf_config", "to_hf_state_dict"]
