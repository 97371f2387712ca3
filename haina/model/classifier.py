"""Sequence classifiers: the Transformer's final hidden states, pooled, into a linear head; and their files.

A text is encoded as its tokens followed by the end-of-text token (`ClassifierConfig.append_eos`): the
pooled position of a causal model is then always the same kind of token, one that has seen the whole text,
and an empty text still has one token. An encoder whose tokenizer frames a sequence (an imported BERT:
[CLS] ... [SEP]) reads it framed instead, as it was pretrained. Texts longer than the context keep their first tokens. Batches are
padded on the right, which a causal model's real tokens never attend to; `pooling` picks

    last    the last real token (the end-of-text): the one a causal model has read everything at
    mean    the mean over the real tokens
    first   the first token (an encoder's [CLS]-like position)

A classifier checkpoint is a normal checkpoint (`haina.model.checkpoint`: full weights, or a LoRA run's
adapters) with the head beside it, always saved in full, since PEFT's habit of dropping heads on reload
is exactly what this format must not repeat:

    classifier.safetensors   head.weight (K, C), head.bias (K,)
    classifier.json          {"format": "haina-classifier/1", "labels": [...], "multi_label": false,
                              "pooling": "last", "append_eos": true, "n_embd": C}

Both are covered by the checkpoint's checksums.json. A training run's checkpoints get the head through
`save_head`, called from the trainer's `write_weights` after the backbone's files; `save_classifier` writes
a whole classifier checkpoint in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from haina.core.checksums import verify_checksums, write_checksums
from haina.core.config import from_dict, to_dict
from haina.core.errors import HainaError
from haina.core.io import atomic_path, read_json, write_json, write_yaml
from haina.data.records import label_name
from haina.model.checkpoint import CONFIG, load_model, read_weights, resolve_checkpoint, save_model
from haina.model.config import ModelConfig
from haina.model.packed import pack_linears
from haina.model.transformer import Transformer, segment_positions_and_mask
from haina.tokenizer import Tokenizer

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
FORMAT = "haina-classifier/1"
POOLINGS = ("last", "mean", "first")
Pooling = Literal["last", "mean", "first"]


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """What a classifier head predicts and how it reads the hidden states.

    Args:
        labels: the class names, in the order of the head's outputs (a list is accepted and kept as a tuple).
        multi_label: independent yes/no per label (sigmoid) instead of one class per text (softmax).
        pooling: which hidden states feed the head: last, mean or first (see the module docstring).
        append_eos: end every text with the end-of-text token before pooling.
    """

    labels: tuple[str, ...]
    multi_label: bool = False
    pooling: Pooling = "last"
    append_eos: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.labels, str) or not isinstance(self.labels, Sequence):
            raise HainaError(f"classifier labels must be a list of names, got {type(self.labels).__name__}")
        labels = tuple(str(x) for x in self.labels)
        object.__setattr__(self, "labels", labels)
        if len(labels) < (1 if self.multi_label else 2):
            raise HainaError(f"a {'multi-label' if self.multi_label else 'single-label'} classifier needs at least "
                             f"{1 if self.multi_label else 2} labels, got {len(labels)}")
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise HainaError(f"classifier labels repeat {dup[:3]}; every class needs one name")
        if self.pooling not in POOLINGS:
            raise HainaError(f"classifier pooling '{self.pooling}' is not one of {', '.join(POOLINGS)}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def label_index(self) -> dict[str, int]:
        """Label name -> output index."""
        return {name: i for i, name in enumerate(self.labels)}

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        return from_dict(cls, data, where="classifier.")

    def to_dict(self) -> dict:
        return to_dict(self)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the real lengths (B,) of a batch of token-id lists (none empty)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    if not len(lengths) or int(lengths.min()) < 1:
        raise ValueError("every sequence needs at least one token")
    idx = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        idx[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return idx.to(device), lengths.to(device)


# Packing pays when padding is most of the batch; its attention is dense over all the texts (masked), so the row
# stays short. Measured by benchmarks/classify.py (BENCHMARKS.md, classification).
PACK_MAX_TOKENS = 1024
PACK_MAX_FILL = 0.75  # pack when the real tokens fill at most this share of the padded batch


def _worth_packing(cfg: ModelConfig, B: int, T: int, lengths: torch.Tensor) -> bool:
    """Whether a batch computes faster as one packed row (causal models only: an encoder's mask differs)."""
    if B < 2 or not cfg.causal:
        return False
    n = int(lengths.sum())
    return int(lengths.min()) >= 1 and n <= PACK_MAX_TOKENS and n <= PACK_MAX_FILL * B * T


class Classifier(nn.Module):
    """A Transformer backbone, a pooling of its final hidden states, and a linear head (B, C) -> (B, K).

    Args:
        backbone: the Transformer (full, or with LoRA adapters applied); its LM head is never computed.
        cfg: the labels, multi-label flag and pooling.
        tokenizer: kept for `encode` and `predict_proba`; may be passed to them instead.
    """

    def __init__(self, backbone: Transformer, cfg: ClassifierConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.head = nn.Linear(backbone.cfg.n_embd, cfg.num_labels)
        nn.init.normal_(self.head.weight, mean=0.0, std=backbone.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    # ----------------------------------------------------------------- forward
    def pool(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded ids (B, T) with real lengths (B,) -> pooled hidden states (B, C)."""
        B, T = idx.shape
        if _worth_packing(self.backbone.cfg, B, T, lengths):
            return self._pool_packed(idx, lengths)
        real = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]  # (B, T)
        mask = None
        if not getattr(self.backbone.cfg, "causal", True):
            # A bidirectional encoder would let real tokens attend to the padding: mask those keys. Padded queries
            # still see the real keys, so no row of the mask is empty (which would give NaN).
            mask = real[:, None, None, :].expand(B, 1, T, T)
        if self.cfg.pooling == "mean":
            h = self.backbone.hidden_states(idx, attn_mask=mask)  # (B, T, C)
            w = real.to(h.dtype)[..., None]
            return (h * w).sum(1) / w.sum(1)
        # One position per row: `select` lets the last block skip every other position.
        pos = lengths - 1 if self.cfg.pooling == "last" else torch.zeros_like(lengths)
        select = torch.zeros(B, T, dtype=torch.bool, device=idx.device)
        select[torch.arange(B, device=idx.device), pos] = True
        return self.backbone.hidden_states(idx, attn_mask=mask, select=select)  # (B, C), rows in batch order

    def _pool_packed(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`pool` without the padding: the batch's texts end to end in one row, each attending only to itself.

        Short texts of uneven length leave most of a padded batch padding (docstrings of 17 tokens on average,
        padded to their batch's longest: 2.7 rows computed per real token); every Linear layer then runs on the
        real tokens only. Positions restart at each text and the mask is causal within it, so each text's
        hidden states are those it has alone, as in the padded batch.
        """
        B, T = idx.shape
        real = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]
        flat = idx[real][None]  # (1, N): row-major, so each text's tokens are contiguous and in batch order
        segments = torch.repeat_interleave(torch.arange(B, device=idx.device), lengths)[None]
        positions, mask = segment_positions_and_mask(segments)
        if self.cfg.pooling == "mean":
            h = self.backbone.hidden_states(flat, positions=positions, attn_mask=mask)[0]  # (N, C)
            sums = torch.zeros(B, h.shape[-1], device=h.device, dtype=h.dtype).index_add_(0, segments[0], h)
            return sums / lengths[:, None].to(h.dtype)
        ends = torch.cumsum(lengths, 0)
        pos = ends - 1 if self.cfg.pooling == "last" else ends - lengths
        select = torch.zeros(1, flat.shape[1], dtype=torch.bool, device=idx.device)
        select[0, pos] = True
        return self.backbone.hidden_states(flat, positions=positions, attn_mask=mask, select=select)  # (B, C)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded ids (B, T) and real lengths (B,) -> logits (B, K)."""
        pooled = self.pool(idx, lengths)
        return self.head(pooled.to(self.head.weight.dtype))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes, or one sigmoid per label for a multi-label head; in float32."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.cfg.multi_label else torch.softmax(logits, dim=-1)

    # ----------------------------------------------------------------- text in
    def _tokenizer(self, tokenizer: Tokenizer | None) -> Tokenizer:
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise HainaError("this classifier has no tokenizer; load a checkpoint with a tokenizer/ directory")
        return tok

    def encode(self, texts: Sequence[str], tokenizer: Tokenizer | None = None) -> tuple[list[list[int]], int]:
        """Token ids of each text as the classifier reads it (see the module docstring), and how many were cut."""
        tok = self._tokenizer(tokenizer)
        block = self.backbone.cfg.block_size
        # An encoder whose tokenizer frames a sequence (BERT: [CLS] ... [SEP]) reads it framed, as it was
        # pretrained: first-token pooling then sees [CLS]. Causal models and haina's own tokenizers add nothing.
        before, after = ([], []) if self.backbone.cfg.causal else tok.post_processor_tokens()
        end = after if after else [tok.eos_id] if self.cfg.append_eos else []
        room = block - len(before) - len(end)
        out, cut = [], 0
        for ids in tok.encode_batch(list(texts)):
            if len(ids) > room:
                ids, cut = ids[:room], cut + 1
            tail = end if end or ids else [tok.eos_id]  # an empty text without an end-of-text would have no token
            out.append([*before, *ids, *tail])
        return out, cut

    @torch.no_grad()
    def predict_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 32, pad_id: int = 0,
                    on_batch: Callable[[int], object] | None = None) -> np.ndarray:
        """(N, K) probabilities of encoded texts, in their order, `batch_size` at a time.

        Sequences are batched in order of length, so that a batch pads little; padding never changes a result.
        `on_batch(n)` is called after each batch of n sequences (a progress bar's update).
        """
        if batch_size < 1:
            raise HainaError(f"batch size must be at least 1, got {batch_size}")
        device = self.head.weight.device
        out = np.zeros((len(sequences), self.cfg.num_labels), dtype=np.float32)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            idx, lengths = pad_batch([sequences[i] for i in rows], pad_id, device)
            out[rows] = self.probabilities(self(idx, lengths)).cpu().numpy()
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32,
                      tokenizer: Tokenizer | None = None) -> np.ndarray:
        """(N, K) class probabilities of `texts`, in input order; batched, padded on the right."""
        tok = self._tokenizer(tokenizer)
        ids, _ = self.encode(texts, tok)
        return self.predict_ids(ids, batch_size=batch_size, pad_id=tok.eos_id)


# ---------------------------------------------------------------------------------------- files
def save_head(out_dir: str | Path, model: Classifier) -> None:
    """Write the head (`classifier.safetensors`, `classifier.json`) into a checkpoint directory, each atomically.

    The backbone's files and checksums.json are the caller's (a trainer writes them around this call);
    `save_classifier` does everything.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {f"head.{k}": v.detach().float().contiguous().cpu() for k, v in model.head.state_dict().items()}
    with atomic_path(out / CLASSIFIER_WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "producer": "haina"})
    write_json(out / CLASSIFIER_CONFIG, {"format": FORMAT, **model.cfg.to_dict(), "n_embd": model.backbone.cfg.n_embd})


def save_classifier(out_dir: str | Path, model: Classifier, tokenizer: Tokenizer | None = None, *,
                    lora=None, base_hash: str | None = None, base: str | Path | None = None,
                    extra_config: dict | None = None) -> None:
    """Write a classifier checkpoint: the backbone as `save_model` does (or its LoRA adapters), the head, checksums.

    Args:
        out_dir: the checkpoint directory (created if needed).
        model: the classifier.
        tokenizer: written into `out_dir/tokenizer` (default: the classifier's own).
        lora: the `LoRAConfig` the backbone was adapted with; required when it has adapters, whose checkpoint then
            holds only them (and the whole head).
        base_hash: `base_weights_hash` of the base before adaptation (LoRA only).
        base: the base checkpoint's path, recorded so the adapters can be loaded without naming it (LoRA only).
        extra_config: more sections for config.yaml.
    """
    from haina.model.lora import has_lora, save_adapter  # lora.py builds on checkpoint.py, like this module

    out = Path(out_dir)
    tokenizer = tokenizer or model.tokenizer
    if has_lora(model.backbone):
        if lora is None or base_hash is None:
            raise ValueError("a LoRA classifier is saved with its LoRAConfig and the base's hash (lora=, base_hash=)")
        save_adapter(out, model.backbone, lora, base_hash=base_hash, base=base)
        write_yaml(out / CONFIG, {"model": model.backbone.cfg.to_dict(), **(extra_config or {})})
        if tokenizer is not None:
            tokenizer.save(out / "tokenizer")
    else:
        save_model(out, model.backbone, tokenizer, extra_config=extra_config, checksums=False)
    save_head(out, model)
    write_checksums(out)


def has_head(path: str | Path) -> bool:
    """Whether checkpoint directory `path` holds a classifier head."""
    return (Path(path) / CLASSIFIER_CONFIG).is_file()


def head_dir(checkpoint: str | Path, adapter: str | Path | None = None) -> Path:
    """The directory holding the head of `checkpoint` (+ `adapter`): the adapter's when it has one.

    Raises:
        HainaError: when neither has a classifier head, naming the checkpoint and how to get one.
    """
    from haina.model.lora import resolve_adapter

    where = [resolve_adapter(adapter)] if adapter is not None else []
    where.append(resolve_checkpoint(checkpoint))
    for d in where:
        if has_head(d):
            return d
    named = f"{checkpoint}" + (f" (with adapter {adapter})" if adapter is not None else "")
    raise HainaError(f"{named} has no classifier head ({CLASSIFIER_CONFIG}); train one with "
                     "`haina finetune classify`")


def read_head(directory: str | Path) -> tuple[ClassifierConfig, dict[str, torch.Tensor], int]:
    """A head's checked config, its tensors and the hidden width it expects (checksums verified when recorded)."""
    d = Path(directory)
    verify_checksums(d, only=(CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS))
    data = read_json(d / CLASSIFIER_CONFIG, "copy the classifier checkpoint again", expect=dict)
    if data.get("format") != FORMAT:
        raise HainaError(f"{d / CLASSIFIER_CONFIG} is not a haina classifier head (format {data.get('format')!r}, "
                         f"expected '{FORMAT}')")
    if not isinstance(data.get("n_embd"), int) or not isinstance(data.get("labels"), list):
        raise HainaError(f"{d / CLASSIFIER_CONFIG} has no 'labels' list or 'n_embd'; the file is damaged")
    try:
        cfg = ClassifierConfig.from_dict({k: v for k, v in data.items() if k not in ("format", "n_embd")})
    except HainaError as e:
        raise HainaError(f"{d / CLASSIFIER_CONFIG}: {e}") from None
    if not (d / CLASSIFIER_WEIGHTS).is_file():
        raise HainaError(f"{d} has {CLASSIFIER_CONFIG} but no {CLASSIFIER_WEIGHTS}; copy the whole checkpoint")
    weights = read_weights(d / CLASSIFIER_WEIGHTS)
    want = {"head.weight": (cfg.num_labels, data["n_embd"]), "head.bias": (cfg.num_labels,)}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != want:
        raise HainaError(f"{d / CLASSIFIER_WEIGHTS} holds {got}, but {CLASSIFIER_CONFIG} describes {want}; "
                         "the checkpoint is damaged")
    return cfg, weights, data["n_embd"]


def load_classifier(path: str | Path, device: str | torch.device = "cpu", *, adapter: str | Path | None = None,
                    dtype: torch.dtype | None = None) -> tuple[Classifier, Tokenizer | None]:
    """Load a classifier checkpoint for inference: (classifier in eval mode, tokenizer or None).

    Args:
        path: a checkpoint or run directory with a classifier head (a LoRA one loads its recorded base first).
        device: where to put the model.
        adapter: LoRA adapters for the checkpoint's backbone; the head is read from them when they hold one.
        dtype: the backbone's element type (None: as stored); the head stays in float32.

    Raises:
        HainaError: the checkpoint has no classifier head (before any weights are read), or is damaged.
    """
    where = head_dir(path, adapter)
    cfg, weights, n_embd = read_head(where)
    backbone, tokenizer = load_model(path, device=device, dtype=dtype, adapter=adapter)
    if backbone.cfg.n_embd != n_embd:
        raise HainaError(f"the classifier head in {where} expects hidden states of width {n_embd}, but the model "
                         f"has {backbone.cfg.n_embd}; it was trained on another base")
    model = Classifier(backbone, cfg, tokenizer)
    model.head.load_state_dict({k.removeprefix("head."): v for k, v in weights.items()})
    model.head.to(device=device)
    model.eval()
    pack_linears(model)  # inference on a CPU: the Linear products through packed weights (haina.model.packed)
    return model, tokenizer


__all__ = ["CLASSIFIER_CONFIG", "CLASSIFIER_WEIGHTS", "POOLINGS", "Classifier", "ClassifierConfig", "has_head",
           "head_dir", "label_name", "load_classifier", "pad_batch", "read_head", "save_classifier", "save_head"]
