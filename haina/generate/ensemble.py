"""Ensembles: several models that share a tokenizer, run as one model whose prediction is their mixture.

At every position the members' next-token distributions are mixed with weights w (normalized to sum 1),
p(x) = Σ_i w_i softmax(z_i)(x), and the ensemble hands on log p = logsumexp_i(log w_i + log_softmax(z_i)):
a valid logit vector (it is already normalized), so sampling, beam search and log-probabilities need
nothing special. Probabilities are averaged rather than logits because one member that is sure a token
cannot come then does not veto it (fairseq ensembles the same way). Since −log is convex, the mixture's
loss on every token is at most the weighted mean of the members' losses (Jensen), so its cross-entropy
is at most theirs averaged and its perplexity at most their weighted geometric mean. Members that err on
different tokens (differently seeded runs, say) usually give a mixture better than each of them.

To the engine, beam search and `eval lm` an `Ensemble` looks like one `Transformer`:
- `hidden_states` are the members' final hidden states side by side (B, T, Σ n_embd), and `lm_head`
  turns such rows into the mixture's log-probabilities; the engine's prefill, prompt log-probabilities
  and eval lm's chunked scoring slice hidden states before the head, and work on these unchanged.
- `decode` runs each member's decode step with its own pre-packed head (`DecodeHead`) and mixes.
- `cfg` (an `EnsembleConfig`) gives the shared vocabulary, the shortest context, and a KV-cache shape
  that stacks the members' layers: one `KVCache(cfg, ...)`, allocated by whoever runs the model as
  for a single one, holds every member (member i's layers at an offset, its heads and head size in the
  leading part when they are smaller than the widest member's). All members see the same tokens at the
  same positions, so the slots, lengths and masks of that one cache are right for all of them.
A single model never goes through this module, so it pays nothing for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from haina.core.errors import HainaError
from haina.generate.head import DecodeHead
from haina.model.config import ModelConfig, require_causal
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer

__all__ = ["ADAPTER_WITH_ENSEMBLE", "Ensemble", "EnsembleConfig", "MixtureHead", "as_checkpoints", "check_members",
           "load_ensemble", "member_configs", "mixture_weights"]

ADAPTER_WITH_ENSEMBLE = ("--adapter applies to a single --checkpoint; to use an adapted model in an ensemble, merge its "
                         "adapters into their base first (haina finetune merge) and pass the merged checkpoint")


@dataclass(frozen=True, kw_only=True)
class EnsembleConfig:
    """What the engine and the KV cache need to know of an ensemble, derived from its members' configs."""

    members: tuple[ModelConfig, ...]

    @property
    def vocab_size(self) -> int:
        return self.members[0].vocab_size

    @property
    def block_size(self) -> int:
        """The shortest member's context: no member is run past what it was built for."""
        return min(c.block_size for c in self.members)

    @property
    def causal(self) -> bool:
        return all(c.causal for c in self.members)

    @property
    def pos(self) -> str:
        """The members' kind of positions, or learned when any member's are (the context then stops at block_size)."""
        return "learned" if any(c.pos == "learned" for c in self.members) else self.members[0].pos

    @property
    def n_layer(self) -> int:
        """Layers of the shared KV cache: every member's, one after the other."""
        return sum(c.n_layer for c in self.members)

    @property
    def kv_heads(self) -> int:
        return max(c.kv_heads for c in self.members)

    @property
    def head_dim(self) -> int:
        return max(c.head_dim for c in self.members)

    @property
    def layer_offsets(self) -> list[int]:
        """Where each member's layers start in the shared cache."""
        return [sum(c.n_layer for c in self.members[:i]) for i in range(len(self.members))]


class _MemberCache:
    """One member's view of the shared KV cache: its layers at an offset, narrower heads in the leading part."""

    __slots__ = ("_offset", "_update")

    def __init__(self, cache, offset: int, cfg: ModelConfig):
        self._offset = offset
        same = (cfg.kv_heads, cfg.head_dim) == (cache.n_kv, cache.head_dim)
        self._update = cache.update if same else cache.update_narrow

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self._update(self._offset + layer, k, v)


class MixtureHead(nn.Module):
    """The ensemble's LM head: members' hidden states side by side (..., Σ C) -> mixture log-probs (..., V).

    It holds no parameters of its own: the members' heads are reached through the ensemble (registered
    there once), the weights are plain floats.
    """

    def __init__(self, members: Sequence[Transformer], log_weights: Sequence[float]):
        super().__init__()
        self._members = tuple(members)  # a tuple, not a ModuleList: the Ensemble registers them
        self.widths = [m.cfg.n_embd for m in members]
        self.log_weights = list(log_weights)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _mix(self.member_log_probs(h), self.log_weights)

    def member_log_probs(self, h: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each member's own log-probabilities (..., V) in float32, one member at a time."""
        parts = h.split(self.widths, dim=-1) if len(self.widths) > 1 else (h,)
        for m, x in zip(self._members, parts):
            yield m.lm_head(x).float().log_softmax(dim=-1)

    def with_members(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's log-probabilities (N, V) of rows h (N, Σ C), and each member's of `targets` (M, N).

        What `forward` computes, plus the members' own scores at no extra cost (eval lm reports them beside
        the ensemble's).
        """
        picked: list[torch.Tensor] = []

        def keep(lps: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
            for lp in lps:
                picked.append(lp.gather(-1, targets[:, None]).squeeze(-1))
                yield lp

        mixed = _mix(keep(self.member_log_probs(h)), self.log_weights)
        return mixed, torch.stack(picked)

    def extra_repr(self) -> str:
        return f"members={len(self.widths)}, weights={[round(math.exp(w), 4) for w in self.log_weights]}"


def _mix(log_probs: Iterable[torch.Tensor], log_weights: Sequence[float]) -> torch.Tensor:
    """log Σ_i w_i p_i from the members' log-probabilities log p_i (..., V), taken one at a time, and log w_i."""
    out = None
    for lp, lw in zip(log_probs, log_weights):
        lp = lp + lw
        out = lp if out is None else torch.logaddexp(out, lp)
    return out


class Ensemble(nn.Module):
    """Several causal LMs with one vocabulary (and tokenizer) run as one model: their probability mixture.

    Args:
        members: the models; shapes may differ (layers, heads, width, positions), the vocabulary may not.
        weights: one positive weight per member, normalized to sum 1 (default: equal).
        names: what to call each member in messages and reports (default: member 0, member 1, ...).
    """

    def __init__(self, members: Sequence[Transformer], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None):
        super().__init__()
        if not members:
            raise HainaError("an ensemble needs at least one model")
        self.names = tuple(names) if names is not None else tuple(f"member {i}" for i in range(len(members)))
        if len(self.names) != len(members):
            raise HainaError(f"got {len(self.names)} names for {len(members)} ensemble members")
        for name, m in zip(self.names, members):
            require_causal(m.cfg, "an ensemble", name)
        for name, m in zip(self.names[1:], members[1:]):
            _check_vocab(self.names[0], members[0].cfg, name, m.cfg)
        self.mixture_weights = mixture_weights(weights, len(members))
        self.members = nn.ModuleList(members)
        self.cfg = EnsembleConfig(members=tuple(m.cfg for m in members))
        self._log_weights = [math.log(w) for w in self.mixture_weights]
        self.lm_head = MixtureHead(members, self._log_weights)
        self._offsets = self.cfg.layer_offsets
        # Each member's decode step uses its own packed head, as the engine does for a single model; made at the
        # first decode step, so that scoring (eval lm) never holds the packed copies.
        self._decode_heads: list[DecodeHead] = []

    def forward(self, idx: torch.Tensor, *, positions: torch.Tensor | None = None, cache=None,
                attn_mask: torch.Tensor | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> the mixture's log-probabilities (B, T, V), or (N, V) at `select`'s positions."""
        return self.lm_head(self.hidden_states(idx, positions=positions, cache=cache, attn_mask=attn_mask,
                                               select=select))

    def hidden_states(self, idx: torch.Tensor, *, positions: torch.Tensor | None = None, cache=None,
                      attn_mask: torch.Tensor | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
        """The members' final hidden states side by side (B, T, Σ n_embd), or (N, Σ n_embd) with `select`."""
        hs = [m.hidden_states(idx, positions=positions, cache=self._view(cache, i), attn_mask=attn_mask,
                              select=select) for i, m in enumerate(self.members)]
        return hs[0] if len(hs) == 1 else torch.cat(hs, dim=-1)

    def decode(self, idx: torch.Tensor, *, positions: torch.Tensor, cache, head=None) -> torch.Tensor:
        """Mixture log-probabilities (B, V) of one new token per row, idx (B, 1), through the shared KV cache.

        `head` (the engine's packed head for a single model) does not apply: each member decodes with its own.
        """
        if not self._decode_heads:
            self._decode_heads = [DecodeHead(m) for m in self.members]
        return _mix((m.decode(idx, positions=positions, cache=self._view(cache, i), head=self._decode_heads[i])
                     .float().log_softmax(dim=-1) for i, m in enumerate(self.members)), self._log_weights)

    def _view(self, cache, i: int):
        return None if cache is None else _MemberCache(cache, self._offsets[i], self.members[i].cfg)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of all members together."""
        return sum(m.num_params(non_embedding) for m in self.members)

    def extra_repr(self) -> str:
        return ", ".join(f"{n} ({w:.4g})" for n, w in zip(self.names, self.mixture_weights))


# ------------------------------------------------------------------------------------------ loading
def as_checkpoints(checkpoint: str | Path | Sequence[str | Path]) -> list[str]:
    """The --checkpoint value(s) as a list of paths (a command called from Python may pass one string)."""
    paths = [str(checkpoint)] if isinstance(checkpoint, (str, Path)) else [str(p) for p in checkpoint]
    if not paths:
        raise HainaError("give at least one --checkpoint")
    return paths


def mixture_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """One weight per member, normalized to sum 1 (None: equal); a one-line HainaError for a wrong count or value."""
    if weights is None or len(weights) == 0:
        return tuple([1.0 / n] * n)
    if len(weights) != n:
        raise HainaError(f"--weights has {len(weights)} value(s) for {n} checkpoint(s); give one weight per "
                         "--checkpoint, e.g. --weights 0.6,0.4")
    values = []
    for w in weights:
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise HainaError(f"--weights: {w!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise HainaError(f"--weights must be positive numbers, got {w}; a member with no weight is better left "
                             "out of the ensemble")
        values.append(value)
    total = sum(values)
    return tuple(v / total for v in values)


def member_configs(model: nn.Module) -> tuple[ModelConfig, ...]:
    """The config of every model in `model`: an ensemble's members', or the model's own."""
    cfg = model.cfg
    return cfg.members if isinstance(cfg, EnsembleConfig) else (cfg,)


def _check_vocab(first: str, a: ModelConfig, other: str, b: ModelConfig) -> None:
    if a.vocab_size != b.vocab_size:
        raise HainaError(f"--checkpoint {first} has a vocabulary of {a.vocab_size} tokens and {other} one of "
                         f"{b.vocab_size}; the models of an ensemble must share their vocabulary and tokenizer")


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Same pieces, merges, normalization and special tokens (a chat template may differ: the first one is used)."""
    return (a.to_json() == b.to_json() and (a.eos_token, a.bos_token, a.pad_token, a.extra_special)
            == (b.eos_token, b.bos_token, b.pad_token, b.extra_special))


def _check_tokenizers(first: str, a: Tokenizer | None, other: str, b: Tokenizer | None) -> None:
    for name, tok in ((first, a), (other, b)):
        if tok is None:
            raise HainaError(f"checkpoint {name} has no tokenizer/ directory; every model of an ensemble needs one, "
                             "to check that they all share it")
    if not _same_tokenizer(a, b):
        raise HainaError(f"--checkpoint {first} and {other} have different tokenizers (hashes {a.hash()} and "
                         f"{b.hash()}); an ensemble mixes next-token probabilities, so its models must share one")


def check_members(checkpoints: Sequence[str]) -> None:
    """Check, from their configs and tokenizer files alone, that checkpoints can form an ensemble.

    Cheap (no weights are read), so commands refuse a mismatch before loading anything or binding a port.
    A LoRA checkpoint whose tokenizer lives with its base is checked when the models load (`load_ensemble`).
    """
    from haina.model.checkpoint import load_config, resolve_checkpoint

    first = None
    for path in checkpoints:
        ckpt = resolve_checkpoint(path)
        cfg = load_config(ckpt)
        require_causal(cfg, "an ensemble", f"--checkpoint {path}")
        tok = Tokenizer.load(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
        if first is None:
            first = (path, cfg, tok)
            continue
        _check_vocab(first[0], first[1], path, cfg)
        if first[2] is not None and tok is not None:
            _check_tokenizers(first[0], first[2], path, tok)


def load_ensemble(checkpoint: str | Sequence[str], weights: Sequence[float] | None = None, *,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  adapter: str | None = None) -> tuple[Transformer | Ensemble, Tokenizer | None]:
    """(model, tokenizer) for one checkpoint (exactly `load_model`) or an `Ensemble` of several.

    Args:
        checkpoint: one checkpoint or run directory, or several to ensemble (they must share their tokenizer).
        weights: one positive weight per checkpoint, normalized (default: equal).
        device: where to put the models.
        dtype: the element type of the weights (None: as stored).
        adapter: LoRA adapters for a single checkpoint; refused with several (merge them into their base first).
    """
    from haina.model.checkpoint import load_model

    paths = as_checkpoints(checkpoint)
    w = mixture_weights(weights, len(paths))  # before loading: a wrong --weights fails at once
    if len(paths) == 1:
        return load_model(paths[0], device=device, dtype=dtype, adapter=adapter)
    if adapter is not None:
        raise HainaError(ADAPTER_WITH_ENSEMBLE)
    check_members(paths)
    models: list[Transformer] = []
    tokenizers: list[Tokenizer | None] = []
    for path in paths:
        model, tok = load_model(path, device=device, dtype=dtype)
        if models:  # the tokenizer actually loaded (a LoRA run may bring its own)
            _check_tokenizers(paths[0], tokenizers[0], path, tok)
        models.append(model)
        tokenizers.append(tok)
    return Ensemble(models, w, names=paths).eval(), tokenizers[0]
