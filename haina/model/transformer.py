"""The Transformer: one file, one device. Decoder-only (causal), or an encoder with `cfg.causal` False.

The same class computes BERT when its config says so (`norm_position: post`, `embed_norm`, `type_vocab_size`,
`mlm_head`, `mlp: gelu_exact`): the token embeddings gain the first token-type row and a norm, the blocks are
post-norm with no final norm, and the LM head is BERT's masked-LM head.

Parallelism, compilation and activation checkpointing are applied from outside (by the
trainer); inference state (the KV cache) belongs to the generation engine and is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from haina.core.errors import HainaError
from haina.model.config import ModelConfig
from haina.model.layers import Block, KVCacheLike, MLMHead, call_plain, make_norm, rope_cos_sin, sinusoidal

# The one message of every path that would generate text (the engine, `decode`, a forward with a KV cache).
ENCODER_CANNOT_GENERATE = ("an encoder (causal: false) cannot generate text: it attends to later tokens, which a "
                           "KV cache cannot supply; use it with `haina finetune classify` or train a causal model")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        # BERT's extras are created only when asked for: every other model's state dict stays as it was.
        if cfg.type_vocab_size:
            self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        if cfg.embed_norm:
            self.emb_norm = make_norm(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        # Post-norm blocks end normalized; a final norm would normalize twice.
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = MLMHead(cfg) if cfg.mlm_head else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.gradient_checkpointing = False
        self.reset_parameters()

    # ----------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        cfg = self.cfg
        # GPT-2: residual projections get std / sqrt(2·layers) so the residual stream's variance
        # does not grow with depth.
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if cfg.init == "normal":
                    std = resid_std if name.endswith(".proj") else cfg.init_std
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                elif cfg.init == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(module, MLMHead):  # its vocabulary projection, as an untied LM head's
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
                nn.init.zeros_(module.bias)
        if cfg.tie_embeddings:
            # The tied matrix is initialized once, as an embedding.
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.init_std)

    # ----------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: KVCacheLike | None = None, attn_mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab), or (N, vocab) for the N positions `select` keeps.

        Args:
            idx: token ids (B, T).
            positions: absolute position of every token (B, T); default 0..T-1 for each row.
            cache: the inference engine's KV cache; None for training and plain scoring.
            attn_mask: bool (B, 1, T, T), True where a query may attend, instead of causal attention
                (documents packed into one row, with positions restarting per document) or an encoder's full
                attention (padding keys masked); not with `cache`.
            select: bool (B, T): compute logits only where True. Fine-tuning's loss needs only the answer
                tokens, and on a small model the LM head and its softmax are a quarter of the step.
        """
        return self.lm_head(self.hidden_states(idx, positions=positions, cache=cache, attn_mask=attn_mask,
                                               select=select))

    def hidden_states(self, idx: torch.Tensor, *, positions: torch.Tensor | None = None,
                      cache: KVCacheLike | None = None, attn_mask: torch.Tensor | None = None,
                      select: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalized hidden states (B, T, C) before the LM head; (N, C) at `select`'s positions.

        Only the last block can skip the unselected positions: the earlier ones give keys and values to
        every later position.
        """
        B, T = idx.shape
        cfg = self.cfg
        if attn_mask is not None and cache is not None:
            raise ValueError("attn_mask and cache cannot be combined: the cache supplies its own mask")
        if cache is not None and not cfg.causal:
            raise HainaError(ENCODER_CANNOT_GENERATE)
        if positions is None:
            if T > cfg.block_size:
                raise HainaError(f"sequence of {T} tokens exceeds the model's context of {cfg.block_size}")
            positions = torch.arange(T, device=idx.device).expand(B, T)
        x, rope = self._embed(idx, positions)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            keep = select if i == last else None
            if self.gradient_checkpointing and self.training:
                # Recompute activations in backward: memory O(layers) instead of O(layers · T · C).
                x = checkpoint(block, x, rope, cache, attn_mask, keep, use_reentrant=False)
            else:
                x = block(x, rope, cache, attn_mask, keep)
        return self.norm_f(x)

    def decode(self, idx: torch.Tensor, *, positions: torch.Tensor, cache: KVCacheLike,
               head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, V) of one new token per row, idx (B, 1), through the inference engine's KV cache.

        The computation of `forward` in eval mode, without nn.Module call overhead (see
        `layers.call_plain`): the per-token cost of single-stream decoding on a small model is mostly
        per-op overhead, not arithmetic. Hooks on Linear and norm layers do not fire here. `head`
        replaces the LM head's call (the engine passes one with a pre-packed weight on CPUs).
        """
        if not self.cfg.causal:
            raise HainaError(ENCODER_CANNOT_GENERATE)
        x, rope = self._embed(idx, positions)
        for block in self.blocks:
            x = block.decode(x, rope, cache)
        x = call_plain(self.norm_f, x[:, -1])
        return head(x) if head is not None else call_plain(self.lm_head, x)

    def _embed(self, idx: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token (and position) embeddings (B, T, C), and the rotary tables when the model uses rope."""
        cfg = self.cfg
        x = self.tok_emb(idx)  # (B, T, C)
        if cfg.type_vocab_size:
            # Every token is of type 0 (haina passes no segments), added before the positions as BERT adds it.
            x = x + self.type_emb.weight[0]
        rope = None
        if cfg.pos == "learned":
            x = x + self.pos_emb(positions)
        elif cfg.pos == "sinusoidal":
            x = x + sinusoidal(positions, cfg.n_embd).to(x.dtype)
        else:
            rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        if cfg.embed_norm:
            x = self.emb_norm(x)
        if self.training and cfg.dropout:
            x = F.dropout(x, cfg.dropout)
        return x, rope

    # ----------------------------------------------------------------- helpers
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting a tied matrix once; optionally without position/token(-type) embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if self.cfg.type_vocab_size:
                n -= self.type_emb.weight.numel()
        return n

    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict to save: a tied LM head is stored once (as the embedding)."""
        sd = self.state_dict()
        if self.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        """Load weights saved by `weights()`, with a clear error if they belong to another architecture."""
        expected = self.weights()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            detail = []
            if missing:
                detail.append(f"missing {missing[:3]}")
            if unexpected:
                detail.append(f"unexpected {unexpected[:3]}")
            if wrong:
                k = wrong[0]
                detail.append(f"shape of {k} is {tuple(sd[k].shape)}, model expects {tuple(expected[k].shape)}")
            raise HainaError("checkpoint weights do not match this model's architecture (" + "; ".join(detail)
                             + "); load it with the config.yaml saved beside it")
        self.load_state_dict(sd, strict=False)


def segment_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) restarting at 0 for each document, and the attention mask (B, 1, T, T).

    The mask is True where a query may attend: causal and within its own document. A padding position
    (segment -1) attends only to itself: SDPA gives NaN for a query that may attend to nothing, and a NaN
    would reach the loss through the backward pass even though padding has no target.
    """
    T = segments.shape[1]
    t = torch.arange(T, device=segments.device)
    # Documents are contiguous: a document starts where the segment changes.
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    positions = t - first  # (B, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    mask = same & causal & (segments >= 0)[:, :, None]
    mask |= torch.eye(T, dtype=torch.bool, device=segments.device)
    return positions, mask[:, None]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != ignore_index; logits (B, T, V), targets (B, T).

    A micro-batch whose targets are all ignored gives 0 (not cross_entropy's 0/0 = NaN), so that with
    gradient accumulation it adds nothing instead of poisoning the step.
    """
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), flat, ignore_index=ignore_index, reduction="sum")
    return total / (flat != ignore_index).sum().clamp(min=1)
