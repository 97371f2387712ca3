"""`haina compress prune`: zero the least important weights, or remove whole attention heads or FFN channels.

Unstructured (`magnitude`, `wanda`): in every Linear inside the blocks (attention qkv and proj, the MLP's fc
and proj) each output row loses the same share of its weights, the lowest-scoring ones: round(sparsity · inputs)
per row, the comparison group that Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
Language Models") found best. magnitude scores |W_ij|; wanda scores |W_ij| · ‖X_j‖₂, with ‖X_j‖₂ the norm of
input feature j over the calibration tokens. As in Wanda's code the blocks are pruned in order, and each
block's input norms are measured with the blocks before it already pruned (a forward pass stopped after the
block, so only public model calls are used). The result stays a dense float checkpoint with zeros: without
sparse kernels it is no smaller on disk and no faster on a CPU; it shows what a sparse format or a 2:4 kernel
could keep.

Structured (`heads`, `ffn`): the same number of heads or channels leaves every layer, so the config stays
uniform and the saved checkpoint really is smaller and faster wherever a checkpoint loads.
- heads: what goes is a key/value group with the query heads that share it (with plain multi-head attention a
  group is one head), so n_head / n_kv_head stays whole; the heads keep their width (`head_size`), the model
  its n_embd. A group's importance is what it adds to the residual stream: the squared norm of its share of the
  attention output projection, Σ_tokens ‖W_o[:, group] · y_group‖², on the calibration data. A group that adds
  nothing scores 0 and removing it changes no logit.
- ffn: channel j's importance is ‖h_j‖₂ · ‖W_down[:, j]‖₂ (h the activated hidden state over the calibration
  tokens), the norm of what the channel adds to the residual stream; intermediate_size shrinks.
Structured scores come from one pass over the dense model. Recovery: a short `haina finetune continue`
(recipes/finetune/prune-recover.yaml); a dense fine-tune refills the zeros of unstructured pruning, so recover
those with care (or not at all).

Calibration data: token shards (`haina data tokenize`), text files read with the checkpoint's tokenizer, or by
default the first documents of the standard-library corpus (`haina.data.stdlib_corpus`), so the command works
offline. A held-out slice of the same source (the shards' val split, or the text's last fifth) gives the
perplexity before and after, in report.json next to parameters and size.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from haina.core.errors import HainaError
from haina.core.log import info

COMMAND = "compress prune"
Method = Literal["magnitude", "wanda", "heads", "ffn"]
METHODS: tuple[str, ...] = get_args(Method)
UNSTRUCTURED = ("magnitude", "wanda")
_MAX_SEQ = 512  # calibration rows: the model's context, at most this many tokens
_BATCH = 8  # calibration rows per forward pass


class _Stop(Exception):
    """Raised by a hook after the block being measured: the blocks after it need not run."""


# ---------------------------------------------------------------------------------------- calibration data
@dataclasses.dataclass
class Calibration:
    """Windows to measure activations on, and a held-out token stream to score perplexity on."""

    rows: list[np.ndarray]
    held_out: np.ndarray
    source: str

    def batches(self) -> list[torch.Tensor]:
        """The rows (all of one length) as (B, T) batches of up to _BATCH rows."""
        return [torch.from_numpy(np.stack(self.rows[i:i + _BATCH]).astype(np.int64))
                for i in range(0, len(self.rows), _BATCH)]

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


def _stdlib_ids(tokenizer, limit: int) -> np.ndarray:
    """The first `limit` tokens of the standard-library corpus (documents encoded until there are enough)."""
    from haina.data.stdlib_corpus import iter_stdlib_documents
    from haina.eval.lm import encode_documents

    docs = iter_stdlib_documents()
    parts, total = [], 0
    while total < limit:
        chunk = [d["text"] for d in itertools.islice(docs, 16)]
        if not chunk:
            break
        ids = encode_documents(chunk, tokenizer)
        parts.append(ids)
        total += len(ids)
    return np.concatenate(parts)[:limit] if parts else np.zeros(0, dtype=np.int64)


def _shard_streams(data_dir: str, tokenizer, vocab_size: int):
    """(calibration stream, held-out stream or None, description) of a token-shard directory."""
    from haina.data.shards import TokenShards, read_meta

    meta = read_meta(data_dir)
    want = meta.get("tokenizer_hash")
    if tokenizer is not None and want and tokenizer.hash() != want:
        raise HainaError(f"--calibration {data_dir} was tokenized with another tokenizer (hash {want}) than the "
                         f"checkpoint's (hash {tokenizer.hash()}); re-tokenize it with the checkpoint's tokenizer or "
                         "give the raw text")
    if int(meta.get("vocab_size", 0)) > vocab_size:
        raise HainaError(f"--calibration {data_dir} has a vocabulary of {meta['vocab_size']} tokens, more than the "
                         f"model's {vocab_size}; it was tokenized for another model")
    splits = [s for s, v in meta["splits"].items() if int(v.get("tokens", 0)) > 0]
    if not splits:
        raise HainaError(f"--calibration {data_dir} holds no tokens; tokenize some text into it first")
    split = "train" if "train" in splits else splits[0]
    held = TokenShards(data_dir, "val") if "val" in splits and split != "val" else None
    where = f"{data_dir} ({split} split" + (", held out: val split)" if held else ")")
    return TokenShards(data_dir, split), held, where


def load_calibration(calibration: list[str] | None, tokenizer, *, vocab_size: int, seq: int, tokens: int,
                     seed: int) -> Calibration:
    """Calibration rows of `seq` tokens (about `tokens` in all) and a held-out stream of about tokens / 4.

    Rows are drawn at seeded random non-overlapping slots when the source holds more than enough; a text source
    is read only as far as needed, so its rows are simply its first tokens.
    """
    from haina.eval.lm import ArrayTokens, load_stream, resolve_source

    held_tokens = max(tokens // 4, 2)
    paths = list(calibration or [])
    shard_dirs = [p for p in paths if Path(p).is_dir() and (Path(p) / "meta.json").is_file()]
    held = None
    if shard_dirs:
        if len(paths) != 1:
            raise HainaError("--calibration takes one token-shard directory, or text files, not both or several "
                             "directories")
        stream, held, where = _shard_streams(paths[0], tokenizer, vocab_size)
    else:
        if tokenizer is None:
            raise HainaError("the checkpoint has no tokenizer to read calibration text with; pass token shards as "
                             "--calibration")
        if paths:
            stream, _ = load_stream(resolve_source(paths, "test"), tokenizer, vocab_size, tokens + held_tokens)
            where = ", ".join(paths)
        else:
            stream = ArrayTokens(_stdlib_ids(tokenizer, tokens + held_tokens))
            where = "the standard-library corpus (haina.data.stdlib_corpus)"
    n = len(stream)
    if held is not None:
        held_ids = np.asarray(held.window(0, min(len(held), held_tokens)), dtype=np.int64)
        region = n
    else:  # the held-out slice is the stream's end, never used for calibration
        cut = max(n - held_tokens, n * 4 // 5)
        held_ids = np.asarray(stream.window(cut, n - cut), dtype=np.int64)
        region = cut
    if region < 2 or len(held_ids) < 2:
        raise HainaError(f"the calibration data ({where}) holds only {n} tokens; give more text or token shards")
    seq = min(seq, region)
    slots = region // seq
    want = min(slots, math.ceil(tokens / seq))
    order = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:want] if slots > want \
        else torch.arange(want)
    rows = [np.asarray(stream.window(int(s) * seq, seq), dtype=np.int64) for s in sorted(order.tolist())]
    return Calibration(rows=rows, held_out=held_ids, source=where)


# ---------------------------------------------------------------------------------------- measuring
def _block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def input_norms(model: nn.Module, batches: list[torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every input feature j of block `layer`'s Linears over the calibration batches (float32)."""
    sums: dict[str, torch.Tensor] = {}
    block = model.blocks[layer]
    hooks = []
    for name, lin in _block_linears(block):
        sums[name] = torch.zeros(lin.in_features, dtype=torch.float64)

        def pre(module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] += x.pow(2).sum(0).double().cpu()

        hooks.append(lin.register_forward_pre_hook(pre))

    def stop(module, args, output):
        raise _Stop

    hooks.append(block.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    model.hidden_states(x.to(model.tok_emb.weight.device))
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt().float() for name, s in sums.items()}


def structured_scores(model: nn.Module, batches: list[torch.Tensor], method: str) -> list[torch.Tensor]:
    """Per layer, the importance of each key/value group (heads) or FFN channel (ffn); see the module docstring."""
    cfg = model.cfg
    sums: list[torch.Tensor | None] = [None] * cfg.n_layer
    hooks = []
    for i, block in enumerate(model.blocks):
        proj = block.attn.proj if method == "heads" else block.mlp.proj

        def pre(module, args, i=i):
            y = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, nh·hs) or (N, hidden)
            if method == "heads":
                w = module.weight.detach().float()  # (C, nh·hs): a group's columns are contiguous
                groups = cfg.kv_heads
                part = torch.einsum("ngd,cgd->ngc", y.view(len(y), groups, -1), w.view(w.shape[0], groups, -1))
                s = part.pow(2).sum((0, 2))  # (groups,)
            else:
                s = y.pow(2).sum(0)  # (hidden,)
            s = s.double().cpu()
            sums[i] = s if sums[i] is None else sums[i] + s

        hooks.append(proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            for x in batches:
                model.hidden_states(x.to(model.tok_emb.weight.device))
    finally:
        for h in hooks:
            h.remove()
    if method == "heads":
        return [s.float() for s in sums]
    return [s.sqrt().float() * b.mlp.proj.weight.detach().float().norm(dim=0).cpu() for s, b in zip(sums, model.blocks)]


# ---------------------------------------------------------------------------------------- unstructured
def prune_rows(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> int:
    """Zero the round(sparsity · inputs) lowest-scoring weights of every output row, in place; returns that count."""
    k = round(sparsity * weight.shape[1])
    if k:
        idx = torch.topk(score, k, dim=1, largest=False).indices
        weight.scatter_(1, idx.to(weight.device), 0.0)
    return k


def prune_unstructured(model: nn.Module, method: str, sparsity: float, batches: list[torch.Tensor]) -> None:
    """Magnitude or Wanda pruning of every block Linear, block after block (see the module docstring)."""
    for i, block in enumerate(model.blocks):
        norms = input_norms(model, batches, i) if method == "wanda" else {}
        with torch.no_grad():
            for name, lin in _block_linears(block):
                score = lin.weight.detach().float().abs()
                if method == "wanda":
                    score = score * norms[name].to(score.device)[None, :]
                prune_rows(lin.weight.data, score, sparsity)


# ---------------------------------------------------------------------------------------- structured
def removal_count(n: int, ratio: float, what: str) -> int:
    """How many of `n` units per layer a --ratio removes (rounded half up), with one-line errors at the ends."""
    if n == 1:
        raise HainaError(f"every layer has a single one of its {what}, so --ratio {ratio:g} would leave none; heads "
                         "pruning removes whole key/value groups (a model with n_kv_head=1 has none to spare)")
    k = math.floor(ratio * n + 0.5)
    if k == 0:
        raise HainaError(f"--ratio {ratio:g} of the {n} {what} per layer removes none; use at least 1/{n} = "
                         f"{1 / n:.3g}")
    if k >= n:
        raise HainaError(f"--ratio {ratio:g} would remove all {n} {what} of every layer, leaving none; use at most "
                         f"{n - 1}/{n} = {(n - 1) / n:.3g}")
    return k


def _units(cfg, method: str) -> tuple[int, str]:
    """(units per layer, their name) that `method` removes: heads (key/value groups under GQA) or FFN channels."""
    if method == "ffn":
        return cfg.ffn_dim, "FFN channels"
    rep = cfg.n_head // cfg.kv_heads
    if rep == 1:
        return cfg.n_head, "attention heads"
    return cfg.kv_heads, f"key/value groups ({rep} query heads each)"


def shrink(model: nn.Module, method: str, keep: list[list[int]]):
    """A new, smaller model: in layer i only the groups or channels `keep[i]` (the same count in every layer)."""
    from haina.model.transformer import Transformer

    cfg = model.cfg
    sd = {k: v.detach().clone() for k, v in model.weights().items()}
    hs, nh, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
    rep = nh // nkv
    for i, kept in enumerate(keep):
        idx = torch.tensor(kept, dtype=torch.long)
        if method == "heads":
            heads = (idx[:, None] * rep + torch.arange(rep)).reshape(-1)  # the query heads of the kept groups
            cols = (heads[:, None] * hs + torch.arange(hs)).reshape(-1)
            kv = (idx[:, None] * hs + torch.arange(hs)).reshape(-1)
            rows = torch.cat([cols, nh * hs + kv, (nh + nkv) * hs + kv])  # q, k and v rows of the fused projection
            fc, proj = f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj"
        else:
            cols = idx
            rows = torch.cat([idx, cfg.ffn_dim + idx]) if cfg.mlp == "swiglu" else idx  # gate and up halves
            fc, proj = f"blocks.{i}.mlp.fc", f"blocks.{i}.mlp.proj"
        sd[f"{fc}.weight"] = sd[f"{fc}.weight"][rows]
        if f"{fc}.bias" in sd:
            sd[f"{fc}.bias"] = sd[f"{fc}.bias"][rows]
        sd[f"{proj}.weight"] = sd[f"{proj}.weight"][:, cols].contiguous()
    n = len(keep[0])
    if method == "heads":
        new_cfg = dataclasses.replace(cfg, n_head=n * rep, n_kv_head=None if cfg.n_kv_head is None else n,
                                      head_size=hs)
    else:
        new_cfg = dataclasses.replace(cfg, intermediate_size=n)
    dtype = model.tok_emb.weight.dtype
    small = Transformer(new_cfg)
    small.load_weights({k: v.float() for k, v in sd.items()})
    return small.to(device=model.tok_emb.weight.device, dtype=dtype).eval()


def prune_structured(model: nn.Module, method: str, ratio: float, batches: list[torch.Tensor]):
    """(smaller model, per-layer indices removed) after removing round(ratio · n) heads/groups or channels."""
    n, what = _units(model.cfg, method)
    k = removal_count(n, ratio, what)
    scores = structured_scores(model, batches, method)
    removed = [sorted(torch.topk(s, k, largest=False).indices.tolist()) for s in scores]
    keep = [[j for j in range(n) if j not in set(r)] for r in removed]
    return shrink(model, method, keep), removed


# ---------------------------------------------------------------------------------------- the command
def _check_options(method: str, sparsity: float, ratio: float, calibration_tokens: int) -> None:
    if method not in METHODS:
        raise HainaError(f"unknown pruning method '{method}'; choose one of {', '.join(METHODS)}")
    if method in UNSTRUCTURED and not 0.0 < sparsity < 1.0:
        raise HainaError(f"--sparsity {sparsity:g} is not in (0, 1): it is the share of each row's weights to zero")
    if method not in UNSTRUCTURED and not 0.0 < ratio < 1.0:
        raise HainaError(f"--ratio {ratio:g} is not in (0, 1): it is the share of heads or channels to remove")
    if calibration_tokens < 16:
        raise HainaError(f"--calibration-tokens {calibration_tokens} is too few; use at least 16 (default 16384)")


def _perplexity(model: nn.Module, held_out: np.ndarray, seq: int) -> float:
    from haina.eval.lm import ArrayTokens, score_stream, sliding_windows

    ctx = max(2, min(seq, len(held_out)))
    windows = sliding_windows(len(held_out), ctx, ctx)
    scores = score_stream(model, ArrayTokens(held_out), windows, batch_size=_BATCH,
                          byte_lengths=np.zeros(model.cfg.vocab_size, dtype=np.int64),
                          device=model.tok_emb.weight.device, desc="perplexity")
    return scores.metrics()["ppl"]


def _block_zeros(model: nn.Module) -> tuple[int, int]:
    """(zero weights, all weights) of the block Linears."""
    ws = [lin.weight for b in model.blocks for _, lin in _block_linears(b)]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def _shape(cfg) -> dict:
    return {"n_head": cfg.n_head, "n_kv_head": cfg.kv_heads, "head_size": cfg.head_dim,
            "intermediate_size": cfg.ffn_dim}


def prune_command(checkpoint: str, out: str, method: Method, sparsity: float = 0.5, ratio: float = 0.25,
                  calibration: list[str] | None = None, calibration_tokens: int = 16384, adapter: str | None = None,
                  seed: int = 0, overwrite: bool = False) -> None:
    """Prune a checkpoint: zero a share of every block Linear's weights, or remove whole heads or FFN channels.

    magnitude and wanda zero round(--sparsity · inputs) weights in each output row of every block Linear (wanda
    weighs |W| by the calibration inputs' norms); the checkpoint stays dense float with zeros, so it is neither
    smaller nor faster on CPU without sparse kernels. heads and ffn remove --ratio of the key/value groups (with
    their query heads) or FFN channels of every layer, least important first on the calibration data, and save a
    smaller config and smaller matrices that load, generate and serve as any checkpoint does (and run faster).
    OUT/report.json holds the parameters, size and held-out perplexity before and after. Recover quality with a
    short `haina finetune continue --config prune-recover`.

    Args:
        checkpoint: a float checkpoint or run directory (a LoRA run: its adapters are merged into its base first).
        out: the checkpoint directory to write (an earlier `compress prune` output there is replaced whole;
            anything else needs --overwrite).
        method: magnitude or wanda (unstructured, --sparsity), heads or ffn (structured, --ratio).
        sparsity: the share of each row's weights to zero, in (0, 1) (magnitude, wanda).
        ratio: the share of heads (key/value groups) or FFN channels to remove from every layer, in (0, 1).
        calibration: token shards (`haina data tokenize`) or .txt/.jsonl files read with the checkpoint's
            tokenizer; default: the standard-library corpus. Its held-out part (the shards' val split, or the
            text's last fifth) scores perplexity before and after.
        calibration_tokens: tokens of calibration data to measure activations on (about a quarter more are read
            and held out for perplexity).
        adapter: LoRA adapters trained on --checkpoint, merged into it before pruning.
        seed: chooses which windows of a large calibration source are used.
        overwrite: replace an existing OUT that is not a `compress prune` output (never the checkpoint itself).
    """
    from haina.core.checksums import write_checksums
    from haina.core.config import load_yaml
    from haina.core.io import write_json
    from haina.core.output import check_output, output_dir
    from haina.model.checkpoint import CONFIG, WEIGHTS, load_model, load_quantization, resolve_checkpoint, save_model
    from haina.model.lora import has_lora, merge_lora

    _check_options(method, sparsity, ratio, calibration_tokens)
    inputs = [p for p in (checkpoint, adapter, *(calibration or [])) if p]
    check_output(out, COMMAND, inputs=inputs, overwrite=overwrite)  # before the model is loaded
    done = load_quantization(checkpoint)
    if done is not None:
        raise HainaError(f"{checkpoint} is quantized ({done.method}); prune the float checkpoint it was made from, "
                         "then quantize the pruned one")
    model, tokenizer = load_model(checkpoint, adapter=adapter)
    if has_lora(model):
        merge_lora(model)
        info("the checkpoint is a LoRA run: its adapters are merged into the base before pruning "
             "(pruned adapters would refill the zeros)")
    cfg = model.cfg
    if method not in UNSTRUCTURED:  # a ratio that removes nothing or everything: before any calibration work
        n, what = _units(cfg, method)
        removal_count(n, ratio, what)
    seq = min(cfg.block_size, _MAX_SEQ)
    calib = load_calibration(calibration, tokenizer, vocab_size=cfg.vocab_size, seq=seq, tokens=calibration_tokens,
                             seed=seed)
    batches = calib.batches()
    ckpt = resolve_checkpoint(checkpoint)
    params_before, shape_before = model.num_params(), _shape(cfg)
    ppl_before = _perplexity(model, calib.held_out, seq)
    zeros_before, total = _block_zeros(model)
    entry: dict = {"method": method}
    if method in UNSTRUCTURED:
        entry["sparsity"] = sparsity
        prune_unstructured(model, method, sparsity, batches)
        zeros_after, _ = _block_zeros(model)
        details = {"block_weights": total, "zero_before": zeros_before, "zero_after": zeros_after,
                   "note": "stored dense (float, with zeros): no smaller and no faster on CPU without sparse kernels"}
    else:
        entry["ratio"] = ratio
        model, removed = prune_structured(model, method, ratio, batches)
        details = {"removed_per_layer": len(removed[0]), "removed": removed, "unit": _units(cfg, method)[1],
                   "shape_before": shape_before, "shape_after": _shape(model.cfg)}
    ppl_after = _perplexity(model, calib.held_out, seq)
    entry |= {"calibration": calib.source, "calibration_tokens": calib.tokens, "seed": seed}
    previous = load_yaml(ckpt / CONFIG).get("pruning")
    history = (previous if isinstance(previous, list) else []) + [entry]
    source = {"checkpoint": str(ckpt.resolve())} | ({"adapter": str(Path(adapter).resolve())} if adapter else {})
    report = {**entry, "parameters": {"before": params_before, "after": model.num_params()},
              "size_bytes": {"before": (ckpt / WEIGHTS).stat().st_size, "after": None},
              "perplexity": {"before": ppl_before, "after": ppl_after, "held_out_tokens": len(calib.held_out)},
              **details, "source": source}
    with output_dir(out, COMMAND, inputs=inputs, overwrite=overwrite) as tmp:
        save_model(tmp, model, tokenizer, extra_config={"pruning": history, "source": source}, checksums=False)
        report["size_bytes"]["after"] = (tmp / WEIGHTS).stat().st_size
        write_json(tmp / "report.json", report)
        write_checksums(tmp)
    _summary(report, method, out)


def _summary(report: dict, method: str, out: str) -> None:
    p, s, ppl = report["parameters"], report["size_bytes"], report["perplexity"]
    if method in UNSTRUCTURED:
        what = (f"{method}: {report['zero_after'] / report['block_weights']:.1%} of the block weights are zero "
                f"(was {report['zero_before'] / report['block_weights']:.1%}); stored dense, so the size stays "
                f"{s['after'] / 2**20:.2f} MiB")
    else:
        what = (f"{method}: removed {report['removed_per_layer']} {report['unit']} per layer; parameters "
                f"{p['before']:,} -> {p['after']:,}, model.safetensors {s['before'] / 2**20:.2f} -> "
                f"{s['after'] / 2**20:.2f} MiB")
    info(what)
    info(f"held-out perplexity ({ppl['held_out_tokens']:,} tokens): {ppl['before']:.3f} -> {ppl['after']:.3f} "
         f"({100 * (ppl['after'] / ppl['before'] - 1):+.1f} %); recover with haina finetune continue "
         "--config prune-recover")
    info(f"wrote {out}")


__all__ = ["COMMAND", "METHODS", "Calibration", "input_norms", "load_calibration", "prune_command", "prune_rows",
           "prune_structured", "prune_unstructured", "removal_count", "shrink", "structured_scores"]
