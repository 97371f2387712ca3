"""Building blocks of the Transformer: norms, positional encodings, attention, MLP.

Shapes in comments: B batch, T query length, S key length (cache + new), C model width,
nh query heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from haina.model.config import ModelConfig


class KVCacheLike(Protocol):
    """What attention needs from an inference-time KV cache (owned by `haina.generate`).

    `update` stores this step's keys/values for `layer` and returns every cached key and value
    for the rows in the batch, with a mask (B, 1, T, S) for SDPA: boolean (True where a query may
    attend) or additive (0 there, -inf elsewhere, in the keys' dtype: what the CUDA-graph decode step passes,
    sparing SDPA a conversion per layer); None means plain causal attention over the returned keys.
    """

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        ...


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 for stability under bf16 autocast."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


# The layers `call_plain` runs without nn.Module.__call__ (exact types: a subclass may rely on hooks).
_PLAIN = (nn.Linear, nn.LayerNorm, RMSNorm)


def call_plain(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, but a plain Linear / LayerNorm / RMSNorm runs its `forward` directly.

    nn.Module.__call__ spends a few microseconds on hook bookkeeping; a one-token decode step makes
    about 70 such calls, a visible share of its time on a small model. Consequently hooks registered
    on these layers do not fire in `decode` paths (they do in `forward`); any other module type (an
    adapter or quantized layer that replaced a Linear) is called normally.
    """
    return module.forward(x) if type(module) in _PLAIN else module(x)


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": (B, T) positions -> (B, T, dim)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freq  # (B, T, dim/2)
    out = torch.zeros(*positions.shape, dim, device=positions.device)
    out[..., 0 : 2 * half : 2] = angles.sin()
    out[..., 1 : 2 * half : 2] = angles.cos()
    return out


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings, (B, T) -> 2 × (B, 1, T, hs).

    Uses the "rotate half" pairing (dimension i with i + hs/2), as Hugging Face's Llama does,
    so converted weights need no permutation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hs)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by the angles in cos/sin (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# SDPA shares each key/value head among its query heads itself (no copies of K and V) from torch 2.5 on.
_GQA_TORCH = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_GQA = {"enable_gqa": True}
_HALF = (torch.float16, torch.bfloat16)


def _native_gqa(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA should take grouped key/value heads as they are rather than copied to every query head.

    Measured on an H200 (torch 2.11, 32 query and 8 key/value heads, benchmarks/gpu_session.sh part 5): in half
    precision grouped heads took 0.09-0.60x the time of copies, with or without a mask (batch 64 decode over 1024
    cached tokens: 741 -> 64 us, masked 758 -> 106 us); in float32 they were no faster and a causal prefill took
    2.8x as long, so float32 on CUDA keeps the copies. The CPU kernel takes everything: same outputs bit for bit,
    and a decode step's attention ran 2-14x faster on 2 cores (no copy of the whole cache per layer).
    """
    if q.device.type == "cuda":
        return _GQA_TORCH and q.dtype in _HALF
    return _GQA_TORCH


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (MHA, GQA, MQA) through SDPA."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hs = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # One fused projection for q, k and v: one matmul instead of three.
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv) * self.hs, bias=cfg.bias)
        self.proj = nn.Linear(self.n_head * self.hs, cfg.n_embd, bias=cfg.bias)
        self.causal = cfg.causal  # False: an encoder, every query sees every key (unless `attn_mask` says otherwise)
        # A float, not an nn.Dropout: at p = 0 or in eval the call is skipped, not made and ignored.
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCacheLike | None = None, attn_mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or (N, C) for the positions `select` (bool (B, T)) keeps."""
        y = self._attend(self.qkv(x), rope, cache, attn_mask)
        y = self.proj(y if select is None else y[select])
        return F.dropout(y, self.dropout) if self.training and self.dropout else y

    def decode(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
               cache: KVCacheLike) -> torch.Tensor:
        """`forward` in eval mode without module-call overhead (see `call_plain`)."""
        return call_plain(self.proj, self._attend(call_plain(self.qkv, x), rope, cache))

    def _attend(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCacheLike | None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fused projections (B, T, (nh + 2·nkv)·hs) -> attention output (B, T, nh·hs), before `proj`.

        `attn_mask` (B, 1, T, T), True where a query may attend, replaces causal (or an encoder's full)
        attention when there is no cache: packed documents attend only within themselves, an encoder's
        padded batch masks the padding keys. A cache brings its own mask.
        """
        B, T, _ = qkv.shape
        # One view and one split rather than three: per-op overhead is what a one-token step pays.
        qkv = qkv.view(B, T, self.n_head + 2 * self.n_kv, self.hs).transpose(1, 2)
        q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=1)  # (B, nh | nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = attn_mask
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hs), mask (B, 1, T, S)
        grouped = self.n_kv != self.n_head and _native_gqa(q, mask)
        if self.n_kv != self.n_head and not grouped:
            # Share each key/value head among n_head / n_kv query heads by copying it.
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None and T > 1 and cache is None,
            dropout_p=self.dropout if self.training else 0.0, **(_GQA if grouped else {}),
        )  # (B, nh, T, hs)
        if T == 1:
            return y.view(B, 1, self.n_head * self.hs)  # (B, nh, 1, hs) is already (B, 1, nh, hs) in memory
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.hs)


def activate(kind: str, h: torch.Tensor) -> torch.Tensor:
    """The MLP's nonlinearity `kind` (ModelConfig.mlp) on h; swiglu halves the last dimension (gate * up)."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if kind == "gelu":
        return F.gelu(h, approximate="tanh")
    if kind == "gelu_exact":
        return F.gelu(h)
    return F.relu(h)


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (tanh, as GPT-2; erf, as BERT), ReLU, or SwiGLU (as Llama)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.ffn_dim
        # SwiGLU's gate and up projections are fused into one matmul of twice the width.
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if cfg.mlp == "swiglu" else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(activate(self.kind, self.fc(x)))
        return F.dropout(h, self.dropout) if self.training and self.dropout else h

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` in eval mode without module-call overhead (see `call_plain`)."""
        return call_plain(self.proj, activate(self.kind, call_plain(self.fc, x)))


class Block(nn.Module):
    """A residual block around attention and the MLP, with its norms placed as `cfg.norm_position` says.

    pre (GPT-2, Llama): x + attn(norm1(x)), then x + mlp(norm2(x)); the stream itself is never normalized.
    post (BERT): norm1(x + attn(x)), then norm2(x + mlp(x)); the block's output is normalized.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.post = cfg.norm_position == "post"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCacheLike | None = None, attn_mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `select` (bool (B, T)), (N, C) for the kept positions only.

        Every position still supplies keys and values; only the kept ones go on through the output
        projection and the MLP, the larger part of a block's work.
        """
        if self.post:
            a = self.attn(x, rope, cache, attn_mask, select)
            x = self.norm1((x if select is None else x[select]) + a)
            return self.norm2(x + self.mlp(x))
        a = self.attn(self.norm1(x), rope, cache, attn_mask, select)
        x = (x if select is None else x[select]) + a
        return x + self.mlp(self.norm2(x))

    def decode(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
               cache: KVCacheLike) -> torch.Tensor:
        """`forward` in eval mode through the KV cache, without module-call overhead (see `call_plain`)."""
        if self.post:
            x = call_plain(self.norm1, x + self.attn.decode(x, rope, cache))
            return call_plain(self.norm2, x + self.mlp.decode(x))
        x = x + self.attn.decode(call_plain(self.norm1, x), rope, cache)
        return x + self.mlp.decode(call_plain(self.norm2, x))


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> activation -> norm, then the vocabulary projection with its own bias.

    `weight` (V, C) is the projection, tied to the token embeddings as an `nn.Linear` LM head's would be, so
    that code reading `model.lm_head.weight` (tying, parameter counts) treats both heads alike.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.norm = make_norm(cfg)
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.n_embd))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., V)."""
        return F.linear(self.norm(activate(self.kind, self.dense(x))), self.weight, self.bias)
