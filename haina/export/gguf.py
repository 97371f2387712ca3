"""`haina export gguf`: a Llama-architecture checkpoint as one GGUF file for llama.cpp.

The file is written key by key with the `gguf` package's `GGUFWriter`, not through llama.cpp's
converter: that script recognizes a BPE tokenizer's pre-tokenizer by hashing how it splits a fixed
test string and refuses every tokenizer it has not seen before, which includes every tokenizer haina
trains. haina knows which pre-tokenizer it used, so it names it (`tokenizer.ggml.pre`) directly.

What llama.cpp reads from the file:

- `llama.*` hyperparameters, and the tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`,
  ..., `output_norm`, `output`). A tied head is written once, as `token_embd`: llama.cpp uses the
  embedding as the head when `output` is absent. Biases, when the model has them, go in as the optional
  `*.bias` tensors of llama.cpp's Llama.
- q and k with their rows reordered within each head. haina (like Hugging Face's Llama) rotates
  dimension i together with i + hs/2; llama.cpp's Llama rope rotates neighbours 2i and 2i + 1.
  Interleaving the two halves of each head's rows (`interleave_rope_rows`) gives the same scores.
- the tokenizer as byte-level BPE (`tokenizer.ggml.model = "gpt2"`): tokens in their byte-level
  spelling, merges, token types, the special ids and the chat template. Ids the tokenizer does not use
  (a vocabulary padded to a round size) become unused `[PADn]` tokens, so the list matches the embedding.
- f32 / f16: 2-D weights in that type. q8_0 / q4_0: 2-D weights quantized by `gguf.quants` in blocks of
  32 along each row; a tensor whose rows are not a multiple of 32 stays f16. With q4_0 the output head
  (the embedding, when tied) is q8_0: it is the tensor most sensitive to error, which is why llama.cpp's
  own quantizer also keeps it at higher precision. Norms and biases are always f32, as llama.cpp keeps them.

The file also carries `haina.*` keys: the command that wrote it (so a later export may replace it,
while any other file at `--out` needs `--overwrite`), haina's version, and the model config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from haina.core.errors import HainaError
from haina.core.io import atomic_path
from haina.core.log import info
from haina.model.checkpoint import WEIGHTS, load_config, load_model, resolve_checkpoint
from haina.model.config import ModelConfig, require_causal
from haina.model.hf import to_hf_state_dict
from haina.model.lora import has_lora, merge_lora, read_adapter_config
from haina.model.quant import refuse_quantized
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer

COMMAND = "export gguf"
MARK = "haina.command"  # the key naming the command that wrote a file; its value is COMMAND
GGUFType = Literal["f32", "f16", "q8_0", "q4_0"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_0")

# The pre-tokenizer regex of Llama 3's tokenizer, which llama.cpp knows as "llama-bpe" (models imported with
# `haina import hf` may carry it). haina's own tokenizers split with GPT-2's regex, llama.cpp's "gpt-2".
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Hugging Face Llama names (what `to_hf_state_dict` gives) -> llama.cpp names, within a layer.
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise HainaError("GGUF export needs the `gguf` package; install haina's export extra: "
                         "pip install 'haina[export]'") from None
    return gguf


# ---------------------------------------------------------------------------------------- model
def check_exportable(cfg: ModelConfig) -> None:
    """Raise a one-line HainaError unless `cfg` is the Llama architecture that llama.cpp's `llama` runs."""
    require_causal(cfg, "haina export gguf", "this checkpoint")
    want = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu"}
    off = [f"{k}={getattr(cfg, k)}" for k, v in want.items() if getattr(cfg, k) != v]
    if off:
        raise HainaError(f"GGUF export covers the Llama architecture (rmsnorm + rope + swiglu) only; this model "
                         f"has {', '.join(off)}; export it with `haina export hf` or `haina export onnx` instead")


def interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection (weight or bias) from rotate-half pairs to neighbouring pairs.

    Within each head, rows [0, hs/2) and [hs/2, hs) become the even and odd rows: row i goes to 2i and row
    i + hs/2 to 2i + 1, so the pair haina rotates together sits where llama.cpp's rope expects it.
    """
    hs = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hs // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    """haina weights (as `Transformer.weights()`) -> (llama.cpp name, float32 array in its layout), in file order.

    One tensor at a time, so that a caller quantizing as it goes never holds a float32 copy of the whole model.
    """
    check_exportable(cfg)
    hf = to_hf_state_dict(cfg, weights)  # views of `weights`, split into Hugging Face Llama's tensors

    def array(name: str) -> np.ndarray:
        return hf[name].detach().to(device="cpu", dtype=torch.float32).numpy()

    yield "token_embd.weight", array("model.embed_tokens.weight")
    for i in range(cfg.n_layer):
        for src, dst in _LAYER.items():
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.{src}.{kind}"
                if name not in hf:
                    continue
                t = array(name)
                if dst in ("attn_q", "attn_k"):
                    t = interleave_rope_rows(t, cfg.n_head if dst == "attn_q" else cfg.kv_heads)
                yield f"blk.{i}.{dst}.{kind}", np.ascontiguousarray(t)
    yield "output_norm.weight", array("model.norm.weight")
    if not cfg.tie_embeddings:
        yield "output.weight", array("lm_head.weight")


def tensor_type(name: str, array: np.ndarray, dtype: str, head: str):
    """The GGML type tensor `name` is stored in for export type `dtype` (`head`: the tensor used as the head)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if array.ndim == 1 or dtype == "f32":
        return T.F32
    if dtype == "f16":
        return T.F16
    qtype = T.Q8_0 if dtype == "q8_0" or name == head else T.Q4_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if array.shape[-1] % block == 0 else T.F16


# ---------------------------------------------------------------------------------------- tokenizer
def _pre_tokenizer(data: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a HainaError naming what it cannot express."""
    pre = data.get("pre_tokenizer") or {}

    def byte_level(p: dict, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and bool(p.get("use_regex", True)) == regex

    if byte_level(pre, regex=True):
        return "gpt-2"
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("pattern") == {"Regex": LLAMA3_REGEX}
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
            and byte_level(parts[1], regex=False)):
        return "llama-bpe"
    raise HainaError(f"the tokenizer's pre-tokenizer ({pre.get('type', 'none')}) is not one llama.cpp knows; GGUF "
                     "export supports byte-level BPE with GPT-2's split (haina's own) or Llama 3's")


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file for `tokenizer` and an embedding of `vocab_size` rows.

    Raises HainaError for a tokenizer llama.cpp cannot run as byte-level BPE (a character vocabulary,
    a normalizer, an unknown pre-tokenizer).
    """
    gguf = _gguf()
    data = json.loads(tokenizer.to_json())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise HainaError(f"the tokenizer is {model.get('type', 'unknown')}, not BPE; GGUF export needs a byte-level "
                         "BPE tokenizer (`haina tokenizer train --kind bpe`)")
    if data.get("normalizer") or model.get("byte_fallback"):
        raise HainaError("the tokenizer has a normalizer or byte fallback, which llama.cpp's byte-level BPE does not "
                         "apply; GGUF export needs a plain byte-level BPE tokenizer")
    pre = _pre_tokenizer(data)
    if tokenizer.vocab_size > vocab_size:
        raise HainaError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    added = tokenizer.tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:  # a row of a padded embedding that no text maps to
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(token)
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(token)
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    before, after = tokenizer.post_processor_tokens()
    bos = tokenizer.bos_id
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        # Without a BOS, llama.cpp would take id 11 as BOS; GPT-2's convention (BOS = EOS, never added) avoids that.
        "tokenizer.ggml.bos_token_id": bos if bos is not None else tokenizer.eos_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
        "tokenizer.ggml.add_bos_token": bos is not None and before == [bos],
        "tokenizer.ggml.add_eos_token": after == [tokenizer.eos_id],
    }
    if tokenizer.pad_id is not None:
        meta["tokenizer.ggml.padding_token_id"] = tokenizer.pad_id
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


# ---------------------------------------------------------------------------------------- writing
def gguf_metadata(cfg: ModelConfig, dtype: str, name: str) -> dict[str, Any]:
    """The `general.*`, `llama.*` and `haina.*` metadata of the exported file (the tokenizer's apart)."""
    from haina import __version__

    gguf = _gguf()
    F = gguf.LlamaFileType
    file_type = {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[dtype]
    meta: dict[str, Any] = {
        "general.type": "model", "general.name": name, "general.file_type": int(file_type),
        "llama.vocab_size": cfg.vocab_size, "llama.context_length": cfg.block_size,
        "llama.embedding_length": cfg.n_embd, "llama.block_count": cfg.n_layer,
        "llama.feed_forward_length": cfg.ffn_dim, "llama.attention.head_count": cfg.n_head,
        "llama.attention.head_count_kv": cfg.kv_heads, "llama.attention.key_length": cfg.head_dim,
        "llama.attention.value_length": cfg.head_dim, "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        "llama.rope.freq_base": float(cfg.rope_theta), "llama.rope.dimension_count": cfg.head_dim,
        MARK: COMMAND, "haina.version": __version__, "haina.model": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    if dtype in ("q8_0", "q4_0"):
        meta["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    return meta


def _add(writer, key: str, value: Any) -> None:
    """One metadata key with the GGUF value type llama.cpp reads it as (uint32 sizes, float32, int32 arrays)."""
    gguf = _gguf()
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:  # a list: `add_array` would skip an empty one, and llama.cpp requires the merges key even when empty
        sub = V.STRING if not value or isinstance(value[0], str) else V.INT32
        writer.add_key_value(key, list(value), V.ARRAY, sub_type=sub)


def write_gguf(path: str | Path, model: Transformer, tokenizer: Tokenizer, dtype: GGUFType = "f16",
               name: str = "haina", before_replace: Callable[[], object] | None = None) -> dict[str, str]:
    """Write `model` and `tokenizer` as GGUF to `path` (atomically); returns each tensor's GGML type name.

    Checks nothing about `path` itself: commands check their `--out` with `check_gguf_output` first, and pass
    that check again as `before_replace`, which runs once the file is complete, just before it is renamed onto
    `path` (during a long export something else may have appeared there).
    """
    if dtype not in GGUF_TYPES:
        raise HainaError(f"unknown GGUF type '{dtype}'; choose one of {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    cfg = model.cfg
    check_exportable(cfg)
    meta = {**gguf_metadata(cfg, dtype, name), **gguf_vocab(tokenizer, cfg.vocab_size)}
    head = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
    types: dict[str, str] = {}
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            for key, value in meta.items():
                _add(writer, key, value)
            for tname, array in gguf_tensors(cfg, model.weights()):
                qtype = tensor_type(tname, array, dtype, head)
                data = gguf.quants.quantize(array, qtype)
                quantized = qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
                writer.add_tensor(tname, data, raw_dtype=qtype if quantized else None)
                types[tname] = qtype.name
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        if before_replace is not None:
            before_replace()
    return types


def written_by_haina(path: str | Path) -> bool:
    """Whether `path` is a GGUF file that `haina export gguf` wrote (its `haina.command` key says so)."""
    gguf = _gguf()
    try:
        field = gguf.GGUFReader(path, "r").get_field(MARK)
        return field is not None and field.contents() == COMMAND
    except Exception:  # noqa: BLE001 - any file that is not a readable GGUF is simply not ours
        return False


def check_gguf_output(out: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> bool:
    """Raise HainaError unless `export gguf` may write file `out`; return True if an existing file is replaced.

    The rules of `haina.core.output`, for one file: a missing `out` is created; an earlier `export gguf`
    file is replaced; any other file needs `overwrite`, and even then one that is an input or lies inside
    one (a checkpoint's own files) is refused; a directory is never replaced.
    """
    path = Path(out)
    if path.name in ("", "..") or str(out).endswith(("/", os.sep)):
        raise HainaError(f"--out {out} names no file; give the path of the .gguf file to write")
    if path.is_dir():
        raise HainaError(f"--out {out} is a directory; give the path of the .gguf file to write, e.g. "
                         f"{path / 'model.gguf'}")
    target = path.resolve()
    inputs = [Path(p) for p in inputs if p is not None]
    for src in inputs:
        if target == src.resolve():
            raise HainaError(f"--out {out} is the input {src}; choose another --out")
    if not path.exists() and not path.is_symlink():
        return False
    if written_by_haina(path):
        return True
    if not path.is_file():
        raise HainaError(f"--out {out} exists and is not a regular file; choose another --out")
    inside = next((src for src in inputs if src.resolve() in target.parents), None)
    if inside is not None:
        raise HainaError(f"--out {out} lies inside the input {inside} and was not written by 'haina {COMMAND}'; "
                         "even --overwrite does not replace it, choose another --out")
    if not overwrite:
        raise HainaError(f"--out {out} exists and is not a GGUF file written by 'haina {COMMAND}'; choose another "
                         "--out, or pass --overwrite to replace it")
    return True


def export_gguf(model: Transformer, tokenizer: Tokenizer, out: str | Path, dtype: GGUFType = "f16", *,
                name: str = "haina", overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Write `model` with `tokenizer` as the GGUF file `out`, atomically; returns the path.

    Args:
        model: a Llama-architecture haina model (rmsnorm + rope + swiglu) without LoRA adapters.
        tokenizer: its byte-level BPE tokenizer.
        out: the file to write (an earlier `export gguf` file there is replaced; anything else needs `overwrite`).
        dtype: f32, f16, q8_0 or q4_0 for the 2-D weights (norms and biases stay f32).
        name: `general.name`, the name llama.cpp shows.
        overwrite: replace a file at `out` that this command did not write (never an input's own file).
        inputs: where the model came from; `out` may not be one, nor replace a file inside one.
    """
    inputs = list(inputs)
    check_gguf_output(out, inputs, overwrite)
    if has_lora(model):
        raise HainaError("the model has LoRA adapters, which GGUF cannot hold beside the weights; merge them first "
                         "(haina.model.lora.merge_lora)")
    write_gguf(out, model, tokenizer, dtype, name=name, before_replace=lambda: check_gguf_output(out, inputs, overwrite))
    return Path(out)


# ---------------------------------------------------------------------------------------- command
def export_gguf_command(checkpoint: str, out: str, dtype: GGUFType = "f16", adapter: str | None = None,
                        overwrite: bool = False) -> None:
    """Export a Llama-architecture checkpoint with its tokenizer as one GGUF file for llama.cpp.

    Writes the weights under llama.cpp's names, the hyperparameters, and the byte-level BPE tokenizer
    with its chat template, so `llama-cli -m OUT` runs it. Only rmsnorm + rope + swiglu models (with
    or without grouped key/value heads) have a GGUF equivalent.

    Args:
        checkpoint: a checkpoint directory or a training run directory (its best checkpoint).
        out: the .gguf file to write (an earlier `export gguf` file is replaced; anything else needs --overwrite).
        dtype: element type of the 2-D weights: f32, f16, or llama.cpp's q8_0 / q4_0 blocks of 32 (norms stay f32).
        adapter: a LoRA run or checkpoint trained on CHECKPOINT; its adapters are merged into the exported weights.
        overwrite: replace an existing OUT that is not an `export gguf` file (never a file of the checkpoint).
    """
    if dtype not in GGUF_TYPES:
        raise HainaError(f"unknown GGUF type '{dtype}'; choose one of {', '.join(GGUF_TYPES)}")
    inputs = [checkpoint, *([adapter] if adapter else [])]
    check_gguf_output(out, inputs, overwrite)  # before loading the model
    ckpt = resolve_checkpoint(checkpoint)
    if not (ckpt / WEIGHTS).is_file():  # a LoRA checkpoint: adapters apart from a base GGUF cannot express
        base = read_adapter_config(ckpt).get("base") or "its base model"
        raise HainaError(f"{checkpoint} is a LoRA run, and a GGUF file holds one plain model; pass {base} as "
                         f"--checkpoint and {checkpoint} as --adapter to merge the adapters into the exported weights")
    check_exportable(load_config(ckpt))  # before reading the weights
    model, tokenizer = load_model(checkpoint, adapter=adapter)
    refuse_quantized(model, "haina export gguf", f"--checkpoint {checkpoint}")
    if tokenizer is None:
        raise HainaError(f"{checkpoint} has no tokenizer, and llama.cpp needs one in the GGUF file; save the "
                         "checkpoint with its tokenizer (tokenizer/ beside the weights)")
    if has_lora(model):
        merge_lora(model)
        info(f"merged the LoRA adapters of {adapter} into the exported weights")
    name = Path(checkpoint).resolve().name or "haina"
    export_gguf(model, tokenizer, out, dtype, name=name, overwrite=overwrite, inputs=inputs)
    size = Path(out).stat().st_size
    info(f"exported {model.num_params():,} parameters as GGUF ({dtype}, {size / 2**20:.1f} MiB) to {out}")


__all__ = ["COMMAND", "GGUF_TYPES", "LLAMA3_REGEX", "check_exportable", "check_gguf_output", "export_gguf",
           "export_gguf_command", "gguf_metadata", "gguf_tensors", "gguf_vocab", "interleave_rope_rows",
           "tensor_type", "write_gguf", "written_by_haina"]
