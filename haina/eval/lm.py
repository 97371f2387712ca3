"""`haina eval lm`: sliding-window perplexity, loss and bits per byte over token shards or raw text.

The windows are those of Hugging Face's guide "Perplexity of fixed-length models": windows of
`context` tokens start every `stride` tokens, and each scores only the tokens the previous window did
not reach, predicted from everything before them in its own window (the first window scores all but its
first token). With stride < context every token but the first is scored exactly once, each with at
least context − stride tokens of history; with stride == context the windows do not overlap and the
first token of each has no history, so it is not scored (as in the guide's loop).

Bits per byte divide the total loss (in bits) by the UTF-8 bytes of the scored tokens' text, so models
with different tokenizers compare on the same text. The scoring batches windows, and computes the LM
head only where a token is scored (`Transformer.hidden_states(select=...)`), in row chunks so that a
large vocabulary never holds (batch × window × vocab) logits at once. On a CPU the Linear products go
through oneDNN-packed copies of the weights (`haina.model.packed`), packed once per run.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from haina.core.errors import HainaError
from haina.core.log import info, progress
from haina.eval.load import DType
from haina.tokenizer import Tokenizer

KIND = "lm"
# Logits computed at once, in elements: 2^25 float32 = 128 MiB (670 rows of a 50k vocabulary).
HEAD_CHUNK = 1 << 25
TEXT_BATCH_DOCS = 256


# ---------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go in; the targets tokens[first:end] are scored, each from those before it."""

    begin: int
    end: int
    first: int


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows of the HF guide's loop over a stream of `n_tokens` (those that score something)."""
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context, got {context} and {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(begin + 1, prev_end)  # the guide's trg_len = end - prev_end, less the label shift
        if first < end:
            out.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


# ---------------------------------------------------------------------------------------- token streams
class ArrayTokens:
    """A token stream in memory, read like `TokenShards` (raw text tokenized here)."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def window(self, start: int, length: int) -> np.ndarray:
        return self.ids[start:start + length]


def encode_documents(docs: Sequence[str], tokenizer: Tokenizer, limit: int | None = None) -> np.ndarray:
    """Each document's ids followed by the end-of-text id, as `haina data tokenize` writes them.

    Stops once `limit` tokens are there (documents are encoded in batches, so a cap reads only what it needs).
    """
    parts: list[np.ndarray] = []
    total = 0
    eos = tokenizer.eos_id
    for i in range(0, len(docs), TEXT_BATCH_DOCS):
        for ids in tokenizer.encode_batch(list(docs[i:i + TEXT_BATCH_DOCS])):
            parts.append(np.asarray([*ids, eos], dtype=np.int64))
            total += len(ids) + 1
        if limit is not None and total >= limit:
            break
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return ids[:limit] if limit is not None else ids


def decode_documents(ids: np.ndarray, tokenizer: Tokenizer) -> list[str]:
    """Token ids split at end-of-text back into document texts (for noise on token shards)."""
    cuts = np.flatnonzero(ids == tokenizer.eos_id)
    pieces = np.split(ids, cuts)
    docs = [p[1:] if i else p for i, p in enumerate(pieces)]  # each piece after the first starts with the EOS
    texts = tokenizer.tok.decode_batch([d.tolist() for d in docs if len(d)], skip_special_tokens=True)
    return [t for t in texts if t]


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def token_byte_lengths(tokenizer: Tokenizer, size: int) -> np.ndarray:
    """UTF-8 bytes of the text each id decodes to, (size,) int64; special tokens count 0.

    Byte-level BPE (haina's, GPT-2's, Llama 3's) spells each byte as one symbol, so a token's length is
    its byte count exactly. Other decoders are measured: the bytes a token adds after a plain one (so
    a leading-space marker counts its space), and byte-fallback tokens `<0xNN>` count one.
    """
    out = np.zeros(size, dtype=np.int64)
    n = min(size, tokenizer.vocab_size)
    added = tokenizer.tok.get_added_tokens_decoder()
    special = {i for i, t in added.items() if t.special} | set(tokenizer.special_tokens.values())
    pieces = [tokenizer.id_to_token(i) for i in range(n)]
    if type(tokenizer.tok.decoder).__name__ == "ByteLevel":
        for i, piece in enumerate(pieces):
            if piece is None or i in special:
                continue
            out[i] = len(piece.encode("utf-8")) if i in added else len(piece)
        return out
    probe = next((i for i, p in enumerate(pieces) if p is not None and i not in special and p.isalnum()), None)
    prefix = [] if probe is None else [probe]
    base = len(tokenizer.decode(prefix).encode("utf-8"))
    texts = tokenizer.tok.decode_batch([[*prefix, i] for i in range(n)], skip_special_tokens=False)
    for i, (piece, text) in enumerate(zip(pieces, texts)):
        if piece is None or i in special:
            continue
        out[i] = 1 if _BYTE_TOKEN.match(piece) else max(0, len(text.encode("utf-8")) - base)
    return out


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class LMScores:
    """What scoring a stream found: sums, counts, and (with MC dropout) one value per scored token."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    windows: int = 0
    member_nll: list[float] = field(default_factory=list)  # an ensemble's members, each scored alone
    seconds: float = 0.0
    mc_seconds: float = 0.0
    mc_nll: float = 0.0
    entropy: list[np.ndarray] = field(default_factory=list)
    mutual_info: list[np.ndarray] = field(default_factory=list)
    errors: list[np.ndarray] = field(default_factory=list)

    def metrics(self) -> dict[str, float | int]:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        return {"ppl": math.exp(loss) if loss < 700 else float("inf"), "loss": loss,
                "bits_per_byte": self.nll / math.log(2) / self.bytes if self.bytes else float("nan"),
                "tokens": self.tokens, "bytes": self.bytes, "windows": self.windows,
                "tokens_per_sec": self.tokens / self.seconds if self.seconds > 0 else float("nan")}

    def mc_metrics(self, passes: int) -> dict[str, float]:
        from haina.eval.uncertainty import uncertainty_summary

        cat = [np.concatenate(a) if a else np.zeros(0) for a in (self.entropy, self.mutual_info, self.errors)]
        out = uncertainty_summary(*cat, prefix="mc_")
        loss = self.mc_nll / self.tokens if self.tokens else float("nan")
        return {"mc_passes": passes, "mc_ppl": math.exp(loss) if loss < 700 else float("inf"), **out}


def _batch(stream, windows: Sequence[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Inputs (B, L) right-padded, the positions whose next token is scored (B, L), their targets (N,), ids."""
    length = max(w.end - w.begin for w in windows)
    x = torch.zeros(len(windows), length, dtype=torch.long)
    select = torch.zeros(len(windows), length, dtype=torch.bool)
    targets = []
    for b, w in enumerate(windows):
        ids = torch.from_numpy(np.ascontiguousarray(stream.window(w.begin, w.end - w.begin)))
        x[b, :len(ids)] = ids
        # Padding comes after the real tokens, so causal attention never lets it change them.
        select[b, w.first - w.begin - 1:w.end - w.begin - 1] = True
        targets.append(ids[w.first - w.begin:])
    y = torch.cat(targets)
    return x, select, y, y.numpy()


def _row_slices(n: int, vocab_size: int) -> list[slice]:
    """Row chunks of the (N, C) hidden states whose logits fit in HEAD_CHUNK elements."""
    rows = max(1, HEAD_CHUNK // vocab_size)
    return [slice(i, i + rows) for i in range(0, n, rows)]


def score_stream(model, stream, windows: Sequence[Window], *, batch_size: int, byte_lengths: np.ndarray,
                 device: torch.device, mc_passes: int = 0, dropout: float = 0.1, seed: int = 0,
                 desc: str = "scoring") -> LMScores:
    """Score `windows` of `stream` (anything with `window(start, length)`): total NLL, tokens, bytes.

    With `mc_passes` K > 0, each batch also runs K passes with dropout at rate `dropout` (seeded once by
    `seed`), and the per-token predictive entropy, mutual information and errors of the mean prediction
    are kept (the logits of one row chunk at a time; the K passes' hidden states, not their logits).
    An ensemble (`haina.generate.ensemble`) is scored by its mixture, and each member alone (`member_nll`).
    """
    from haina.eval.uncertainty import MCPasses, mc_dropout
    from haina.generate.ensemble import MixtureHead
    from haina.model.packed import packed_linears

    model.eval()
    res = LMScores(windows=len(windows))
    mixture = model.lm_head if isinstance(model.lm_head, MixtureHead) else None
    if mixture is not None:
        res.member_nll = [0.0] * len(mixture.widths)
    bar = progress(total=len(windows), desc=desc, unit="window")
    # The MC passes draw from torch's generators; forking them leaves the caller's random state as it was.
    forks = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # On a CPU the Linear products run on oneDNN-packed weights (haina.model.packed): 2x faster at these row counts.
    with torch.inference_mode(), torch.random.fork_rng(devices=forks), packed_linears(model):
        torch.manual_seed(seed)
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            x, select, y, y_np = _batch(stream, chunk)
            x, select, y = x.to(device), select.to(device), y.to(device)
            t0 = time.perf_counter()
            hidden = model.hidden_states(x, select=select)  # (N, C)
            chunks = _row_slices(hidden.size(0), model.cfg.vocab_size)
            nll = 0.0
            for rows in chunks:
                if mixture is None:
                    logits = model.lm_head(hidden[rows])
                else:  # the mixture's log-probabilities (cross-entropy leaves them as they are), and the members'
                    logits, picked = mixture.with_members(hidden[rows], y[rows])
                    res.member_nll = [t - float(p) for t, p in zip(res.member_nll, picked.sum(dim=1))]
                nll += float(F.cross_entropy(logits.float(), y[rows], reduction="sum"))
            res.seconds += time.perf_counter() - t0
            res.nll += nll
            res.tokens += len(y_np)
            res.bytes += int(byte_lengths[y_np].sum())
            if mc_passes:
                t0 = time.perf_counter()
                with mc_dropout(model, dropout):
                    passes = [model.hidden_states(x, select=select) for _ in range(mc_passes)]
                for rows in chunks:
                    acc = MCPasses()
                    for h in passes:
                        acc.add(F.log_softmax(model.lm_head(h[rows]).float(), dim=-1))
                    mean = acc.mean_probs
                    res.mc_nll -= float(mean.gather(1, y[rows, None]).clamp_min(1e-45).log().sum())
                    res.entropy.append(acc.predictive_entropy().cpu().numpy())
                    res.mutual_info.append(acc.mutual_information().cpu().numpy())
                    res.errors.append((mean.argmax(-1) != y[rows]).cpu().numpy())
                res.mc_seconds += time.perf_counter() - t0
            bar.update(len(chunk))
    bar.close()
    return res


# ---------------------------------------------------------------------------------------- data
@dataclass
class Source:
    """Where the tokens come from: a shard directory's split, or text files tokenized here."""

    kind: str  # "shards" or "text"
    paths: list[str]
    split: str | None = None
    note: str | None = None


def resolve_source(data: Sequence[str], split: str) -> Source:
    """Token shards (one directory with meta.json) or raw text files; test falls back to val for shards."""
    from haina.data.shards import read_meta
    from haina.data.text_input import expand_inputs

    if not data:
        raise HainaError("--data is required: a token-shard directory or .txt/.jsonl files")
    shard_dirs = [d for d in data if Path(d).is_dir() and (Path(d) / "meta.json").is_file()]
    if shard_dirs:
        if len(data) != 1:
            raise HainaError("--data takes one token-shard directory, or text files, not both or several directories")
        splits = read_meta(shard_dirs[0])["splits"]
        if split in splits:
            return Source("shards", list(data), split)
        if split == "test" and "val" in splits:
            return Source("shards", list(data), "val", note=f"{data[0]} has no test split; scored its val split")
        raise HainaError(f"{data[0]} has no split '{split}' (has: {', '.join(splits) or 'none'}); pass --split")
    expand_inputs(list(data))  # a missing or unreadable input is an error now, before the model loads
    return Source("text", list(data))


def load_stream(source: Source, tokenizer: Tokenizer, vocab_size: int, limit: int | None):
    """(token stream, documents as text or None): the shards as stored, or the text tokenized here."""
    from haina.data.shards import TokenShards, read_meta
    from haina.data.text_input import iter_documents

    if source.kind == "shards":
        meta = read_meta(source.paths[0])
        want = meta.get("tokenizer_hash")
        if want and tokenizer.hash() != want:
            raise HainaError(f"{source.paths[0]} was tokenized with another tokenizer (hash {want}) than the "
                             f"checkpoint's (hash {tokenizer.hash()}); re-tokenize it with the checkpoint's tokenizer "
                             "or give the raw text")
        if int(meta.get("vocab_size", 0)) > vocab_size:
            raise HainaError(f"{source.paths[0]} has a vocabulary of {meta['vocab_size']} tokens, more than the "
                             f"model's {vocab_size}; it was written for another model")
        shards = TokenShards(source.paths[0], source.split)
        if limit is not None and limit < len(shards):
            return ArrayTokens(shards.window(0, limit)), None
        return shards, None
    docs = [d for d in iter_documents(source.paths) if d]
    if not docs:
        raise HainaError(f"no text in {', '.join(source.paths)}; check the files (JSONL needs a 'text' field)")
    return ArrayTokens(encode_documents(docs, tokenizer, limit)), docs


# ---------------------------------------------------------------------------------------- the command
def _check_options(context: int | None, stride: int | None, batch_size: int, mc_dropout: int, dropout: float,
                   limit_tokens: int | None) -> None:
    if context is not None and context < 2:
        raise HainaError(f"--context {context} is too small; a window needs at least 2 tokens")
    if stride is not None and stride < 1:
        raise HainaError(f"--stride {stride} must be at least 1")
    if stride is not None and context is not None and stride > context:
        raise HainaError(f"--stride {stride} is larger than --context {context}: tokens between windows would never "
                         "be scored; use a stride <= context")
    if batch_size < 1:
        raise HainaError(f"--batch-size {batch_size} must be at least 1")
    if mc_dropout < 0:
        raise HainaError(f"--mc-dropout {mc_dropout} must be 0 (off) or a number of passes")
    if mc_dropout and not 0.0 < dropout < 1.0:
        raise HainaError(f"--dropout {dropout} is not in (0, 1)")
    if limit_tokens is not None and limit_tokens < 2:
        raise HainaError(f"--limit-tokens {limit_tokens} must be at least 2")


def eval_lm_command(checkpoint: list[str], data: list[str], out: str, adapter: str | None = None,
                    weights: list[float] | None = None, split: str = "test",
                    context: int | None = None, stride: int | None = None, batch_size: int = 8, mc_dropout: int = 0,
                    dropout: float = 0.1, noise: list[str] | None = None, rates: list[float] | None = None,
                    seed: int = 0, limit_tokens: int | None = None, device: str = "auto", dtype: DType = "float32",
                    overwrite: bool = False) -> None:
    """Sliding-window perplexity, loss and bits per byte of a checkpoint on token shards or raw text.

    Windows of --context tokens every --stride tokens, as in Hugging Face's "Perplexity of fixed-length
    models": each window scores only the tokens the previous one did not (the first all but its first
    token). Writes OUT/report.json (ppl, loss, bits_per_byte, tokens, bytes, windows, tokens_per_sec, and
    mc_* with --mc-dropout) and OUT/report.md, plus ppl_vs_noise.png with --noise.

    Several --checkpoint are scored as one ensemble: at every token their next-token probabilities are mixed
    (weighted by --weights), so they must share one tokenizer; the report gives each member's numbers too.

    Args:
        checkpoint: a checkpoint or run directory (its tokenizer reads raw text); several make an ensemble.
        data: a token-shard directory from `haina data tokenize`, or .txt/.jsonl files (optionally .gz),
            directories or globs; every text document is followed by the end-of-text token, as in shards.
        out: the report directory (an earlier `eval lm` report there is replaced).
        adapter: LoRA adapters trained on the checkpoint, applied on top (a single --checkpoint only).
        weights: the ensemble's weights, one per --checkpoint (e.g. 0.6,0.4), normalized to sum 1 (default: equal).
        split: the split of token shards to score; test falls back to val when the shards have none.
        context: tokens per window (default: the model's context, block_size).
        stride: tokens between window starts (default: --context, no overlap); smaller strides give every
            scored token more history and cost context/stride times the compute.
        batch_size: windows per forward pass.
        mc_dropout: K > 0 also runs K passes with dropout on and reports predictive entropy, mutual
            information and how well they flag errors (mc_*).
        dropout: the dropout rate of the MC passes (set for them even if the model trained without dropout).
        noise: perturb the text and evaluate again: char, word or both (char,word); shards are decoded to text.
        rates: noise rates (default 0, 0.05, 0.1, 0.2).
        seed: seeds the noise and the MC-dropout passes.
        limit_tokens: score only the first N tokens of the stream.
        device: auto, cpu, cuda, cuda:1 or mps.
        dtype: precision of the weights (the loss is always computed in float32).
        overwrite: replace an OUT that is not an `eval lm` report.
    """
    from haina.core.output import check_output
    from haina.eval.load import load_for_eval
    from haina.eval.noise import noise_grid
    from haina.generate.ensemble import as_checkpoints, mixture_weights
    from haina.model.config import require_causal

    paths = as_checkpoints(checkpoint)
    mix = mixture_weights(weights, len(paths))
    _check_options(context, stride, batch_size, mc_dropout, dropout, limit_tokens)
    if mc_dropout and len(paths) > 1:
        raise HainaError("--mc-dropout samples one model's dropout; it does not apply to an ensemble of several "
                         "--checkpoint (score each member with it instead)")
    grid = noise_grid(noise, rates)
    source = resolve_source(data, split)
    check_output(out, f"eval {KIND}", inputs=[p for p in (*paths, adapter, *data) if p], overwrite=overwrite)
    model, tokenizer, dev = load_for_eval(paths, adapter, device, dtype, weights=weights)
    require_causal(model.cfg, "haina eval lm", f"--checkpoint {' '.join(paths)}")
    block = model.cfg.block_size
    ctx = context if context is not None else block
    if ctx > block:
        raise HainaError(f"--context {ctx} is larger than the model's context of {block} tokens; use --context <= "
                         f"{block}")
    st = stride if stride is not None else ctx
    if st > ctx:
        raise HainaError(f"--stride {st} is larger than the context of {ctx}: tokens between windows would never be "
                         "scored; use a stride <= context")
    stream, docs = load_stream(source, tokenizer, model.cfg.vocab_size, limit_tokens)
    if source.note:
        info(source.note)
    if len(stream) < 2:
        raise HainaError(f"{', '.join(data)} holds {len(stream)} token(s); scoring needs at least 2")
    byte_lengths = token_byte_lengths(tokenizer, model.cfg.vocab_size)
    windows = sliding_windows(len(stream), ctx, st)
    scores = score_stream(model, stream, windows, batch_size=batch_size, byte_lengths=byte_lengths, device=dev,
                          mc_passes=mc_dropout, dropout=dropout, seed=seed)
    metrics: dict[str, float | int | None] = scores.metrics()
    details: dict = {"source": source.kind, "split": source.split, "split_note": source.note, "context": ctx,
                     "stride": st, "batch_size": batch_size, "stream_tokens": len(stream),
                     "limit_tokens": limit_tokens, "device": str(dev), "dtype": dtype,
                     "seconds": round(scores.seconds, 3)}
    if len(paths) > 1:
        details["ensemble"] = [{"checkpoint": p, "weight": w, "loss": nll / scores.tokens,
                                "ppl": math.exp(nll / scores.tokens) if nll / scores.tokens < 700 else float("inf")}
                               for p, w, nll in zip(paths, mix, scores.member_nll)]
    if mc_dropout:
        metrics |= scores.mc_metrics(mc_dropout)
        details["mc_dropout"] = {"passes": mc_dropout, "dropout": dropout, "seed": seed,
                                 "seconds": round(scores.mc_seconds, 3)}

    sections = [("What was scored", _scored_sentence(source, scores, ctx, st, len(stream)))]
    if len(paths) > 1:
        sections.append(("Ensemble", _ensemble_table(details["ensemble"], metrics)))
    if mc_dropout:
        sections.append(("MC dropout", _mc_sentence(mc_dropout, dropout, metrics)))
    rows: list[dict] = []
    if grid:
        if docs is None:
            docs = decode_documents(stream.window(0, len(stream)), tokenizer)
        rows = _noise_rows(grid, docs, metrics, model, tokenizer, byte_lengths, ctx, st, batch_size, dev, seed,
                           limit_tokens)
        details["noise"] = rows
        sections.append(("Robustness to noise", _noise_table(rows, from_shards=source.kind == "shards")))

    from haina.eval.report import Report, eval_output, print_summary, write_report

    report = Report(kind=KIND, metrics=metrics, details=details, sections=sections, checkpoint=" + ".join(paths),
                    adapter=adapter, data=list(data))
    with eval_output(out, KIND, inputs=[*paths, adapter, *data], overwrite=overwrite) as tmp:
        if rows:
            from haina.eval.noise import plot_metric_vs_noise

            plot_metric_vs_noise([(r["noise"], r["rate"], r["ppl"]) for r in rows], "ppl", tmp / "ppl_vs_noise.png",
                                 title="perplexity against noise")
            report.images.append("ppl_vs_noise.png")
        obj = write_report(tmp, report)
    print_summary(obj, ["ppl", "loss", "bits_per_byte", "tokens", "tokens_per_sec", "mc_entropy", "mc_mutual_info"],
                  out)


def _noise_rows(grid, docs, clean: dict, model, tokenizer, byte_lengths, ctx, st, batch_size, dev, seed,
                limit) -> list[dict]:
    """One row per (noise, rate): the clean run's numbers, then each perturbed run's."""
    from haina.eval.noise import perturb

    keep = ("ppl", "loss", "bits_per_byte", "tokens", "bytes")
    rows = [{"noise": "clean", "rate": 0.0, **{k: clean[k] for k in keep}}]
    for kind, rate in grid:
        if kind == "clean":
            continue
        noisy = [perturb(d, kind, rate, seed) for d in docs]
        stream = ArrayTokens(encode_documents(noisy, tokenizer, limit))
        if len(stream) < 2:
            raise HainaError(f"{kind} noise at rate {rate} left fewer than 2 tokens; lower --rates")
        windows = sliding_windows(len(stream), ctx, st)
        m = score_stream(model, stream, windows, batch_size=batch_size, byte_lengths=byte_lengths, device=dev,
                         desc=f"{kind} noise {rate:g}").metrics()
        rows.append({"noise": kind, "rate": rate, **{k: m[k] for k in keep}})
    return rows


def _noise_table(rows: list[dict], from_shards: bool) -> str:
    from haina.eval.report import markdown_table

    table = markdown_table(["noise", "rate", "ppl", "loss", "bits/byte", "tokens"],
                           [(r["noise"], r["rate"], r["ppl"], r["loss"], r["bits_per_byte"], r["tokens"])
                            for r in rows])
    note = ("The token shards were decoded to text, perturbed and tokenized again. " if from_shards else "")
    return (note + "Perturbed text tokenizes differently: compare bits per byte across rows rather than "
            "perplexity alone.\n\n" + table)


def _ensemble_table(members: list[dict], metrics: dict) -> str:
    from haina.eval.report import markdown_table

    rows = [(f"`{m['checkpoint']}`", m["weight"], m["ppl"], m["loss"]) for m in members]
    rows.append(("the ensemble", 1.0, metrics["ppl"], metrics["loss"]))
    return ("At every token the members' next-token probabilities were mixed with these weights (their log is "
            "what was scored); each member's own numbers come from the same forward passes.\n\n"
            + markdown_table(["model", "weight", "ppl", "loss"], rows))


def _scored_sentence(source: Source, scores: LMScores, ctx: int, st: int, stream_tokens: int) -> str:
    where = (f"split `{source.split}` of the token shards `{source.paths[0]}`" if source.kind == "shards"
             else f"the text of {', '.join(f'`{p}`' for p in source.paths)}, tokenized with the checkpoint's "
                  "tokenizer (each document followed by end-of-text)")
    overlap = ("windows do not overlap, so the first token of each has no history and is not scored"
               if st == ctx else f"every scored token has at least {ctx - st:,} tokens of history")
    note = f" ({source.note})" if source.note else ""
    return (f"Scored {scores.tokens:,} of the {stream_tokens:,} tokens of {where}{note}, in {scores.windows:,} "
            f"windows of {ctx:,} tokens every {st:,} tokens; each window scores only the tokens the previous one "
            f"did not reach ({overlap}). Bits per byte count the {scores.bytes:,} UTF-8 bytes of the scored "
            "tokens' text.")


def _mc_sentence(passes: int, dropout: float, m: dict) -> str:
    return (f"{passes} passes with dropout {dropout:g} on every scored token. Entropy is that of the mean "
            "prediction, mutual information the part of it due to disagreement between passes (nats). AUROC: how "
            "well each separates the tokens the mean prediction gets wrong from those it gets right (0.5 is "
            f"chance); the mean prediction errs on {m.get('mc_error_rate', float('nan')):.1%} of them.")


__all__ = ["ArrayTokens", "LMScores", "Window", "decode_documents", "encode_documents", "eval_lm_command",
           "resolve_source", "score_stream", "sliding_windows", "token_byte_lengths"]
