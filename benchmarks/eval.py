"""Perplexity evaluation speed: `haina eval lm`'s scoring against the `transformers` reference loop.

The model (a preset's shape with random weights, or --checkpoint) is saved as a haina checkpoint and
exported with `export_hf`; haina loads the checkpoint the way `haina eval lm` does (`load_for_eval`),
transformers the export (`AutoModelForCausalLM`), so both compute with identical weights. The text is
../shared/data/*.txt when present, else the standard library's documentation (`stdlib_corpus`), encoded
once with a byte-level BPE trained on it, each document followed by end-of-text, as `eval lm` reads
raw text; tokenization is not part of the race.

Both sides score the same sliding windows (context --context, stride --stride, Hugging Face's
"Perplexity of fixed-length models"), and the script checks that their perplexities agree (1e-4):
- **haina**: `score_stream`, the code `haina eval lm` runs: --batch-size windows per forward pass, the
  LM head only at the scored positions, float32 cross-entropy in row chunks; also at batch 1, to show
  what batching and what the selected head bring;
- **transformers**: the guide's loop: one window per forward pass, `labels` masked with -100, the
  model's own loss (what users run), under `torch.no_grad`.

Tokens/s counts scored tokens. Both fp32 on CPU with the same torch threads (--threads). Every figure
comes from --rounds interleaved rounds (`rounds.py`), after an untimed warm-up batch per side: each
round runs every side once, the order reversed in every other round; a figure is the median over the
rounds with its range, the ratio the median of the per-round ratios.

    .venv/bin/python benchmarks/eval.py                              # quickstart shape, context 256, stride 128
    .venv/bin/python benchmarks/eval.py --preset gpt2-124m --context 512 --stride 256 --tokens 4096
    .venv/bin/python benchmarks/eval.py --rounds 1 --quick           # a smoke run (tiny model, seconds)
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rounds import Spread, cpu_model, load_average, ratios, round_order

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- inputs
def read_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    """(documents, where they came from): --data, else ../shared/data/*.txt, else the stdlib documentation."""
    from haina.data.text_input import iter_documents

    if args.data:
        return list(iter_documents(args.data)), ", ".join(args.data)
    shared = sorted((ROOT.parent / "shared" / "data").glob("*.txt"))
    if shared:
        return list(iter_documents([str(p) for p in shared])), ", ".join(f"../shared/data/{p.name}" for p in shared)
    from haina.data.stdlib_corpus import build_stdlib_corpus

    return build_stdlib_corpus(), "the standard library's documentation (stdlib_corpus)"


def model_config(args: argparse.Namespace):
    from haina.model import ModelConfig

    if args.quick:
        return ModelConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64, pos="rope", norm="rmsnorm",
                           mlp="swiglu", bias=False)
    if args.preset == "quickstart":
        from haina.train.config import PretrainConfig
        from haina.train.pretrain import find_recipe

        return PretrainConfig.from_file(find_recipe("quickstart")).model
    return ModelConfig.from_name(args.preset)


def prepare(args: argparse.Namespace, tmp: Path) -> dict:
    """The checkpoint and its HF export, the token stream and the windows both sides score."""
    from haina.eval.lm import encode_documents, sliding_windows
    from haina.export.hf import export_hf
    from haina.model import Transformer
    from haina.model.checkpoint import save_model
    from haina.tokenizer.train import train_bpe

    texts, source = read_texts(args)
    if args.checkpoint:
        from haina.model.checkpoint import load_model

        model, tokenizer = load_model(args.checkpoint)
        if tokenizer is None:
            raise SystemExit(f"--checkpoint {args.checkpoint} has no tokenizer")
        ckpt, label = args.checkpoint, args.checkpoint
    else:
        cfg = model_config(args)
        # The vocabulary the text affords (the model keeps its preset's, so the LM head costs what it would).
        tokenizer = train_bpe(texts, vocab_size=min(cfg.vocab_size, 8192))
        torch.manual_seed(0)
        model = Transformer(cfg)
        ckpt, label = str(tmp / "ckpt"), "random init"
        save_model(ckpt, model, tokenizer)
    export_hf(model.float(), tokenizer, tmp / "hf")
    context = min(args.context, model.cfg.block_size)
    stride = min(args.stride or context, context)
    # Enough text for --tokens scored tokens: each window scores `stride` of them.
    need = args.tokens + context
    ids = encode_documents(texts, tokenizer, limit=need)
    if len(ids) < need:
        raise SystemExit(f"the text holds {len(ids):,} tokens, fewer than the {need:,} needed; lower --tokens")
    windows = sliding_windows(len(ids), context, stride)
    return {"ckpt": ckpt, "hf": str(tmp / "hf"), "ids": ids, "windows": windows, "context": context,
            "stride": stride, "label": label, "source": source, "cfg": model.cfg, "params": model.num_params()}


# --------------------------------------------------------------------------------- the sides
def haina_side(model, shared: dict, batch_size: int, windows=None) -> tuple[float, int, float]:
    """(seconds, scored tokens, total NLL) of `score_stream`, the scoring `haina eval lm` runs."""
    from haina.eval.lm import ArrayTokens, score_stream

    windows = shared["windows"] if windows is None else windows
    byte_lengths = np.zeros(model.cfg.vocab_size, dtype=np.int64)
    t0 = time.perf_counter()
    res = score_stream(model, ArrayTokens(shared["ids"]), windows, batch_size=batch_size,
                       byte_lengths=byte_lengths, device=torch.device("cpu"))
    return time.perf_counter() - t0, res.tokens, res.nll


def hf_side(model, shared: dict, windows=None) -> tuple[float, int, float]:
    """(seconds, scored tokens, total NLL) of the guide's loop over the same windows, one per forward pass."""
    windows = shared["windows"] if windows is None else windows
    ids = torch.from_numpy(shared["ids"])[None]
    nll_sum, n_tokens, prev_end = 0.0, 0, windows[0].begin
    t0 = time.perf_counter()
    for w in windows:
        input_ids = ids[:, w.begin:w.end]
        target_ids = input_ids.clone()
        target_ids[:, :-(w.end - prev_end)] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())  # the labels the loss averaged, after its shift
        nll_sum += float(loss) * counted
        n_tokens += counted
        prev_end = w.end
    return time.perf_counter() - t0, n_tokens, nll_sum


# --------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quickstart", help="model shape with random weights: quickstart (the "
                                                          "recipe's) or a ModelConfig preset (tiny, small, gpt2-124m)")
    p.add_argument("--checkpoint", default=None, help="a trained haina checkpoint instead (with its tokenizer)")
    p.add_argument("--data", nargs="+", default=None, help="text files (default: ../shared/data/*.txt, else the "
                                                           "stdlib documentation)")
    p.add_argument("--context", type=int, default=256, help="tokens per window (capped at the model's context)")
    p.add_argument("--stride", type=int, default=128, help="tokens between window starts (0: = context)")
    p.add_argument("--tokens", type=int, default=16384, help="scored tokens per run (about)")
    p.add_argument("--batch-size", type=int, default=8, help="haina's windows per forward pass")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over them")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--target", type=float, default=1.5, help="tokens/s ratio over transformers the target checks")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, context 64, 1,024 tokens")
    args = p.parse_args()
    if args.quick:
        args.context, args.stride, args.tokens = 64, 32, 1024
    if args.rounds < 1 or args.tokens < 1:
        p.error("--rounds and --tokens must be at least 1")
    torch.set_num_threads(args.threads)

    import transformers

    from haina.eval.load import load_for_eval

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="haina-bench-eval-") as tmp_name:
        shared = prepare(args, Path(tmp_name))
        ours, _, _ = load_for_eval(shared["ckpt"], device="cpu", dtype="float32")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(shared["hf"], dtype=torch.float32).eval()
        sides = {
            f"haina eval lm (batch {args.batch_size})": lambda w=None: haina_side(ours, shared, args.batch_size, w),
            "haina eval lm (batch 1)": lambda w=None: haina_side(ours, shared, 1, w),
            "transformers, the guide's loop": lambda w=None: hf_side(theirs, shared, w),
        }
        # Warm-up, untimed: each side's first batch shape (allocator, BLAS and oneDNN set-up for it).
        for run in sides.values():
            run(shared["windows"][:max(2, args.batch_size)])
        load_before = load_average()
        results: dict[str, list[tuple[float, int, float]]] = {k: [] for k in sides}
        for r in range(args.rounds):
            for name in round_order(list(sides), r):
                res = sides[name]()
                results[name].append(res)
                print(f"round {r + 1}/{args.rounds}: {name}: {res[1] / res[0]:,.0f} tokens/s", file=sys.stderr,
                      flush=True)
        report(args, shared, results, (load_before, load_average()))


def report(args: argparse.Namespace, shared: dict, results: dict, load: tuple[float, float]) -> None:
    import transformers

    cfg = shared["cfg"]
    names = list(results)
    ours, peer = names[0], names[-1]
    tps = {k: [n / s for s, n, _ in v] for k, v in results.items()}
    ppl = {k: math.exp(v[0][2] / v[0][1]) for k, v in results.items()}
    tokens = {k: v[0][1] for k, v in results.items()}
    print(f"\n## Perplexity evaluation: haina eval lm vs transformers {transformers.__version__}\n")
    print(f"{datetime.date.today()} · {cpu_model()} ({os.cpu_count()} cores, {args.threads} torch threads) · torch "
          f"{torch.__version__} · Python {platform.python_version()} · {shared['label']} "
          f"({shared['params'] / 1e6:.1f}M params, {cfg.n_layer} layers, d={cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"{cfg.norm}/{cfg.pos}/{cfg.mlp}) · fp32 · {shared['source']} · {len(shared['windows']):,} windows of "
          f"{shared['context']} tokens, stride {shared['stride']} · {args.rounds} interleaved round{'s' if args.rounds != 1 else ''} · "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after\n")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/eval.py', *sys.argv[1:]])}`\n")
    print("| scorer | scored tokens | ppl | tokens/s | vs transformers |")
    print("|---|---:|---:|---:|---:|")
    for k in names:
        vs = ratios(tps[k], tps[peer]).text(unit="×") if k != peer else "1×"
        print(f"| {k} | {tokens[k]:,} | {ppl[k]:.4f} | {Spread.of(tps[k]).text(',.0f')} | {vs} |")
    agree = all(tokens[k] == tokens[peer] and abs(ppl[k] / ppl[peer] - 1) < 1e-4 for k in names)
    speed = ratios(tps[ours], tps[peer])
    print(f"\nMedians over rounds (min–max, rounds). Same tokens scored and perplexities equal within 1e-4: "
          f"{'yes' if agree else 'NO'}.")
    print(f"Target (haina ≥ {args.target:g}× the transformers loop's tokens/s, CPU): "
          f"{'**met**' if speed.median >= args.target else '**not met**'}: {speed.text(unit='×')}.")


if __name__ == "__main__":
    main()
