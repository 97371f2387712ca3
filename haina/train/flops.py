"""Training FLOPs per token and model FLOPs utilization (MFU)."""

from __future__ import annotations

from haina.model.config import ModelConfig
from haina.model.transformer import Transformer


def matmul_params(model: Transformer) -> int:
    """Parameters that take part in a matmul for every token.

    The non-embedding parameters (embedding lookups cost no FLOPs), plus the output head: it is a
    d × V matmul per token whether or not it shares its matrix with the embedding.
    """
    n = model.num_params(non_embedding=True)
    if model.cfg.tie_embeddings:
        n += model.lm_head.weight.numel()
    return n


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6·N + 6·L·d·T.

    6·N: 2 FLOPs per parameter per token forward, 4 backward. 6·L·d·T: the attention scores and
    the weighted sum (2 matmuls of T × d per token per layer, ×3 for backward) counted over the
    causal half only, which is all a FlashAttention-style kernel computes.
    """
    return 6.0 * n_params + 6.0 * cfg.n_layer * cfg.n_embd * seq_len


def mfu(tokens_per_sec: float, flops_per_tok: float, peak_flops: float) -> float:
    """Fraction of the device's peak FLOP/s spent on the model's own arithmetic.

    `peak_flops` comes from `haina.core.device.peak_flops`: a GPU's datasheet figure, or on a CPU its
    theoretical fp32 vector peak (`cpu_peak`: cores × FMA lanes × FMA units × 2 × clock), not what a
    BLAS library happens to reach, so that CPU and GPU MFU mean the same thing.
    """
    return tokens_per_sec * flops_per_tok / peak_flops if peak_flops > 0 else 0.0


__all__ = ["flops_per_token", "matmul_params", "mfu"]
