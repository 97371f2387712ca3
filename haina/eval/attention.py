"""`haina eval attention`: the attention weights of every layer and head for one prompt.

The model's own attention runs through `F.scaled_dot_product_attention`, which never materializes the
weights (fused kernels cannot give them back). This module recomputes them on a path used only for
introspection: forward hooks capture each selected attention module's input (and the rotary tables and
mask the model passed it) during a normal forward; the module's own q/k/v projection and
`haina.model.layers.apply_rope` give q and k; softmax(q kᵀ / √d + mask) is then written out. Keys and
values are shared among query heads as the module shares them (GQA), so every query head has a map.

The explicit path is proved against the fast one on every run: its weights times v, through the
module's own output projection, must equal the output the hook captured. If not (the model's
attention changed and this file did not follow) the command stops instead of drawing wrong maps.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from haina.core.errors import HainaError
from haina.eval.report import Report, eval_output, markdown_table, print_summary, write_report
from haina.model.layers import Attention, apply_rope

KIND = "attention"
LABELLED_TOKENS = 32  # up to this prompt length the axes name the tokens; beyond, they would overlap
# explicit vs fast path: float32 SDPA kernels sum in another order than q kᵀ, softmax, @ v.
RTOL, ATOL = 1e-3, 1e-4


@dataclass
class AttentionMaps:
    """What `attention_maps` found: per layer (nh, T, T) probabilities, and how far the check came from the model."""

    weights: dict[int, torch.Tensor]  # layer -> (n_head, T, T), float32 on the CPU
    max_abs_diff: float  # explicit output vs the module's own, largest over the layers
    scale: float  # the largest magnitude of the module outputs compared (what the tolerance is relative to)


def explicit_attention(attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                       attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of module `attn` on its input x (B, T, C), written out: (probabilities (B, nh, T, T), output (B, T, C)).

    `rope` and `attn_mask` are what the model passed the module (None: no rotary embedding; causal attention).
    The scores and the softmax are computed in float64 (float32 on MPS), so the maps add no rounding of their own.
    """
    B, T, _ = x.shape
    nh, nkv, hs = attn.n_head, attn.n_kv, attn.hs
    # The module's fused projection (a LoRA layer in its place adds its update), split as the module splits it.
    qkv = attn.qkv(x).view(B, T, nh + 2 * nkv, hs).transpose(1, 2)
    q, k, v = qkv.split([nh, nkv, nkv], dim=1)  # (B, nh | nkv, T, hs)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if nkv != nh:  # each key/value head serves nh / nkv consecutive query heads
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
    wide = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    scores = q.to(wide) @ k.to(wide).transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T)
    allowed = attn_mask if attn_mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device)
    if attn_mask is None and attn.causal:  # an encoder (causal: false) attends to every position
        allowed = allowed.tril()
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    y = (probs @ v.to(wide)).transpose(1, 2).reshape(B, T, nh * hs).to(x.dtype)  # (B, T, nh·hs)
    return probs, attn.proj(y)


def attention_maps(model: torch.nn.Module, idx: torch.Tensor, layers: list[int]) -> AttentionMaps:
    """The attention probabilities of `layers` for token ids idx (1, T), checked against the model's own outputs.

    Raises:
        HainaError: the explicit path's output differs from the module's (beyond float32 rounding).
    """
    captured: dict[int, tuple[dict[str, Any], torch.Tensor]] = {}

    def hook(layer: int):
        def fn(module: Attention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            captured[layer] = (dict(bound.arguments), output.detach())
        return fn

    handles = [model.blocks[i].attn.register_forward_hook(hook(i), with_kwargs=True) for i in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model.hidden_states(idx)
            weights, worst, scale = {}, 0.0, 0.0
            for i in layers:
                inputs, fast = captured[i]
                if inputs.get("cache") is not None or inputs.get("select") is not None:
                    raise HainaError("attention maps need a plain forward (no KV cache, all positions)")
                probs, explicit = explicit_attention(model.blocks[i].attn, inputs["x"], inputs.get("rope"),
                                                     inputs.get("attn_mask"))
                diff = (explicit.float() - fast.float()).abs()
                bound = ATOL * max(1.0, fast.abs().max().item()) + RTOL * fast.float().abs()
                worst, scale = max(worst, diff.max().item()), max(scale, fast.abs().max().item())
                if (diff > bound).any():
                    raise HainaError(f"the explicit attention of layer {i} differs from the model's own output by "
                                     f"{diff.max().item():.3g}: haina/eval/attention.py no longer follows "
                                     "haina.model.layers.Attention; no maps were written")
                weights[i] = probs[0].float().cpu()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return AttentionMaps(weights=weights, max_abs_diff=worst, scale=scale)


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each attention row: (..., T, T) -> (..., T); masked (zero) entries add nothing."""
    p = probs.double()
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def token_label(text: str) -> str:
    """A token as an axis label: spaces and line breaks made visible."""
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or "∅"


def plot_grid(maps: dict[int, np.ndarray], heads: list[int], tokens: list[str], path: Path) -> None:
    """One panel per (layer, head): rows are layers, columns heads; token labels when the prompt is short."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(maps)
    rows, cols = len(layers), len(heads)
    T = len(tokens)
    labelled = T <= LABELLED_TOKENS
    # Panels shrink as the grid grows, so a 32-head, 16-layer grid stays a picture and not a poster.
    cell = max(0.9, min(2.6 if labelled else 2.0, 30.0 / max(rows, cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1.2, cell * rows + 0.8), dpi=100, squeeze=False,
                             layout="constrained")
    labels = [token_label(t) for t in tokens]
    font = max(3.0, min(7.0, 140.0 * cell / max(T, 1) / 2.6))
    image = None
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            image = ax.imshow(maps[layer][c], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
            if labelled and c == 0:
                ax.set_yticks(range(T), labels, fontsize=font)
            if labelled and r == rows - 1:
                ax.set_xticks(range(T), labels, fontsize=font, rotation=90)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a token's glyph the font lacks (CJK, emoji) is drawn as a box
        fig.savefig(path)
    plt.close(fig)


def _selection(given: list[int] | None, count: int, what: str) -> list[int]:
    chosen = sorted(set(given)) if given else list(range(count))
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise HainaError(f"--{what} {bad[0]} is out of range: the model has {count} {what} (0..{count - 1})")
    return chosen


def eval_attention_command(checkpoint: str, prompt: str, out: str, adapter: str | None = None,
                           layers: list[int] | None = None, heads: list[int] | None = None, device: str = "auto",
                           overwrite: bool = False) -> None:
    """Attention weights of every selected layer and head for a prompt: attention.npz and a PNG grid.

    Args:
        checkpoint: a checkpoint or run directory.
        prompt: the text whose attention is shown (tokenized without special tokens).
        out: the report directory (report.json, report.md, attention.npz, attention.png).
        adapter: LoRA adapters to apply on top of the checkpoint.
        layers: the layers to show, counted from 0 (default all).
        heads: the query heads to show in each layer, counted from 0 (default all).
        device: auto, cpu, cuda, cuda:1 or mps.
        overwrite: replace an --out directory that is not an earlier attention report.
    """
    from haina.core.output import check_output

    if not prompt:
        raise HainaError("--prompt is empty; give the text whose attention to show")
    for what, given in (("layers", layers), ("heads", heads)):
        if given and min(given) < 0:
            raise HainaError(f"--{what} {min(given)} is out of range: {what} are counted from 0")
    check_output(out, f"eval {KIND}", inputs=[checkpoint, adapter], overwrite=overwrite)

    from haina.eval.load import load_for_eval

    model, tok, dev = load_for_eval(checkpoint, adapter, device, "float32")
    cfg = model.cfg
    chosen_layers = _selection(layers, cfg.n_layer, "layers")
    chosen_heads = _selection(heads, cfg.n_head, "heads")
    ids = tok.encode(prompt)
    if not ids:
        raise HainaError("--prompt encodes to no tokens; give some text")
    if len(ids) > cfg.block_size:
        raise HainaError(f"--prompt is {len(ids)} tokens but the model's context is {cfg.block_size}; shorten it")
    tokens = [tok.decode([i]) for i in ids]

    found = attention_maps(model, torch.tensor([ids], device=dev), chosen_layers)
    maps = {i: found.weights[i][chosen_heads].numpy() for i in chosen_layers}  # (heads, T, T)
    entropy = {i: row_entropy(found.weights[i][chosen_heads]).mean(-1).tolist() for i in chosen_layers}  # per head

    metrics: dict[str, Any] = {"tokens": len(ids), "layers": len(chosen_layers), "heads": len(chosen_heads)}
    metrics.update({f"entropy_layer_{i}": float(np.mean(entropy[i])) for i in chosen_layers})
    metrics["max_abs_diff_vs_fast_path"] = found.max_abs_diff
    details = {
        "prompt": prompt, "token_ids": ids, "tokens": tokens, "layers": chosen_layers, "heads": chosen_heads,
        "entropy_per_head": {str(i): entropy[i] for i in chosen_layers},
        "check": {"max_abs_diff": found.max_abs_diff, "output_scale": found.scale, "rtol": RTOL,
                  "atol": f"{ATOL} × max(1, |output|max)"},
        "architecture": {"pos": cfg.pos, "norm": cfg.norm, "mlp": cfg.mlp, "n_head": cfg.n_head,
                         "n_kv_head": cfg.kv_heads},
    }
    table = markdown_table(["layer", *(f"head {h}" for h in chosen_heads), "mean"],
                           [(i, *entropy[i], metrics[f"entropy_layer_{i}"]) for i in chosen_layers])
    sections = [
        ("Entropy of attention (nats, mean over query positions)", table),
        ("How the maps were computed",
         (f"Recomputed explicitly from each attention module's captured input (softmax(q kᵀ/√{cfg.head_dim} + causal "
          f"mask) in float64, {cfg.kv_heads} key/value heads shared by {cfg.n_head} query heads) and checked against "
          f"the model's own attention output: largest difference {found.max_abs_diff:.3g}. "
          "`attention.npz` holds `layer_<i>` arrays of shape (heads, T, T) (row: query, column: key), `tokens`, "
          "`token_ids`, `layers` and `heads`.")),
    ]
    with eval_output(out, KIND, inputs=[checkpoint, adapter], overwrite=overwrite) as tmp:
        np.savez(tmp / "attention.npz", **{f"layer_{i}": maps[i] for i in chosen_layers},
                 tokens=np.array(tokens, dtype=str), token_ids=np.array(ids, dtype=np.int64),
                 layers=np.array(chosen_layers, dtype=np.int64), heads=np.array(chosen_heads, dtype=np.int64))
        plot_grid(maps, chosen_heads, tokens, tmp / "attention.png")
        obj = write_report(tmp, Report(kind=KIND, metrics=metrics, details=details, sections=sections,
                                       images=["attention.png"], checkpoint=checkpoint, adapter=adapter))
    print_summary(obj, ["tokens", "layers", "heads", "max_abs_diff_vs_fast_path"], out)
    print(f"maps: {Path(out) / 'attention.npz'}")
