"""`haina model params`: what a model's size means in bytes and GPUs.

Counts come from building the model on the `meta` device (no memory is allocated, so even
`llama-70b` is instant). Activation memory follows Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"): about 34·d bytes per token per layer
in 16-bit with fused (flash) attention, and 2·d bytes per token per layer — only each layer's
input — with full activation checkpointing.
"""

from __future__ import annotations

import math

import torch

from haina.core.errors import HainaError
from haina.model.config import PRESETS, ModelConfig
from haina.model.transformer import Transformer

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}
GPU_BYTES = 80 * 2**30  # one 80 GB accelerator (A100/H100 class)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total and non-embedding parameter counts, without allocating the weights."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {"total": model.num_params(), "non_embedding": model.num_params(non_embedding=True)}


def memory_table(cfg: ModelConfig) -> dict[str, dict[str, float]]:
    """Bytes for weights, gradients, AdamW state, activations and KV cache, per storage dtype."""
    n = count_params(cfg)["total"]
    d, layers = cfg.n_embd, cfg.n_layer
    out = {}
    for name, b in DTYPE_BYTES.items():
        weights = n * b
        grads = n * b
        adam = 2 * n * b  # first and second moments
        # The 34·d figure is for 2-byte activations; scale it with the storage width.
        act_token = 34 * d * layers * b / 2
        act_token_ckpt = 2 * d * layers * b / 2
        kv_token = 2 * layers * cfg.kv_heads * cfg.head_dim * b
        train = weights + grads + adam
        out[name] = {
            "weights": weights, "grads": grads, "adamw": adam, "train_states": train,
            "act_per_token": act_token, "act_per_token_ckpt": act_token_ckpt, "kv_per_token": kv_token,
            "gpus_80gb_train_states": math.ceil(train / GPU_BYTES), "gpus_80gb_inference": math.ceil(weights / GPU_BYTES),
        }
    return out


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes:.0f} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def params_command(preset: str | None = None, config: str | None = None, seq_len: int | None = None) -> None:
    """Parameter count and memory for weights, gradients, AdamW state and activations.

    Shows what a model size means in bytes: per storage dtype (fp32, bf16, int8), the memory
    for weights, gradients and AdamW moments, activations per token (with and without
    activation checkpointing), the KV cache per token, and how many 80 GB GPUs hold it.

    Args:
        preset: a named preset (tiny, small, gpt2-124m, llama-1b, llama-7b, llama-70b).
        config: a YAML model config, recipe or checkpoint config.yaml (instead of --preset).
        seq_len: sequence length for the per-sequence activation figure (default: the model's context).
    """
    if (preset is None) == (config is None):
        raise HainaError(f"give exactly one of --preset NAME or --config FILE; presets: {', '.join(PRESETS)}")
    if seq_len is not None and seq_len < 1:
        raise HainaError(f"--seq-len must be a positive number of tokens, got {seq_len}")
    cfg = ModelConfig.from_name(preset) if preset else ModelConfig.from_file(config)
    counts = count_params(cfg)
    seq = seq_len or cfg.block_size
    print(f"model: {preset or config}  ({cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, "
          f"{cfg.kv_heads} kv heads, context {cfg.block_size}, vocab {cfg.vocab_size})")
    print(f"parameters: {counts['total']:,} ({counts['total'] / 1e6:,.1f}M); "
          f"non-embedding {counts['non_embedding']:,}")
    table = memory_table(cfg)
    rows = [("weights", "weights"), ("gradients", "grads"), ("AdamW moments", "adamw"),
            ("weights+grads+AdamW", "train_states"), ("activations / token", "act_per_token"),
            ("  with checkpointing", "act_per_token_ckpt"), (f"activations / {seq}-token seq", None),
            ("KV cache / token", "kv_per_token")]
    print(f"\n{'':28}" + "".join(f"{k:>14}" for k in table))
    for label, key in rows:
        vals = [v["act_per_token"] * seq if key is None else v[key] for v in table.values()]
        print(f"{label:28}" + "".join(f"{human(x):>14}" for x in vals))
    print(f"{'80 GB GPUs to train':28}" + "".join(f"{v['gpus_80gb_train_states']:>14}" for v in table.values())
          + "   (weights+grads+AdamW only; activations extra)")
    print(f"{'80 GB GPUs for inference':28}" + "".join(f"{v['gpus_80gb_inference']:>14}" for v in table.values()))
    print("\nMixed-precision training usually keeps fp32 master weights and moments: "
          f"≈16 bytes/param = {human(16 * counts['total'])} before activations.")
