"""The fine-tuning worked example, measured: answers and ROUGE-L on held-out questions, before and after SFT.

Compares a base model (the quickstart model) with the same model after `haina finetune sft --config
docs-assistant` on the test split of `haina data instruct --from-stdlib`: questions about modules that
no training question was about. Both answer greedily through haina's engine with the chat template
(ChatML), stopping at the end-of-turn token or after --max-new-tokens; ROUGE-L F1 against the
reference answer is computed with Google's `rouge-score` package (the `eval` extra), separately for the
two kinds of question (what a definition does, and what its signature is) because a signature answer
can score by repeating the name from the question.

    haina quickstart                                          # runs/quickstart
    haina data instruct --from-stdlib --out runs/instruct
    haina finetune sft --config docs-assistant --base runs/quickstart \\
        --data runs/instruct/train.jsonl --val runs/instruct/val.jsonl --out runs/docs-assistant
    .venv/bin/python benchmarks/docs_assistant.py

Prints a markdown table (ROUGE-L before, after, difference; share of answers that stopped by themselves)
and a few before/after answers.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch


def load_questions(path: Path, limit: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def kind(row: dict) -> str:
    return "signature" if row["response"].startswith(row["name"] + "(") else "summary"


def answer_all(checkpoint: str, questions: list[dict], max_new_tokens: int, batch: int) -> tuple[list[str], list[bool]]:
    """Greedy answers to every question and whether each ended with the end-of-turn token."""
    from haina.generate.chat import chat_stop_token_ids, encode_chat
    from haina.generate.engine import Engine
    from haina.generate.sampling import SamplingParams
    from haina.generate.text import TextGenerator
    from haina.model.checkpoint import load_model

    model, tok = load_model(checkpoint)
    engine = Engine(model, max_batch_size=batch, eos_token_id=tok.eos_id)
    gen = TextGenerator(engine, tok)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=tuple(chat_stop_token_ids(tok)))
    prompts = [encode_chat(tok, [{"role": "user", "content": q["prompt"]}]) for q in questions]
    results = gen.generate(prompts, params)
    return [r[0].text.strip() for r in results], [r[0].finish_reason == "stop" for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="runs/quickstart", help="the model before fine-tuning")
    ap.add_argument("--tuned", default="runs/docs-assistant", help="the fine-tuned run")
    ap.add_argument("--test", default="runs/instruct/test.jsonl", help="held-out questions")
    ap.add_argument("--limit", type=int, default=300, help="questions scored (a seeded sample of the test split)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--show", type=int, default=5, help="before/after answers printed")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from rouge_score import rouge_scorer

    torch.manual_seed(args.seed)
    questions = load_questions(Path(args.test), args.limit, args.seed)
    t0 = time.perf_counter()
    before, stopped_before = answer_all(args.base, questions, args.max_new_tokens, args.batch)
    after, stopped_after = answer_all(args.tuned, questions, args.max_new_tokens, args.batch)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rows = []
    for k in ("summary", "signature", "all"):
        idx = [i for i, q in enumerate(questions) if k == "all" or kind(q) == k]
        if not idx:
            continue
        rb = [scorer.score(questions[i]["response"], before[i])["rougeL"].fmeasure for i in idx]
        ra = [scorer.score(questions[i]["response"], after[i])["rougeL"].fmeasure for i in idx]
        sb = sum(stopped_before[i] for i in idx) / len(idx)
        sa = sum(stopped_after[i] for i in idx) / len(idx)
        rows.append((k, len(idx), statistics.fmean(rb), statistics.fmean(ra), sb, sa))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"date {time.strftime('%Y-%m-%d')}; {time.perf_counter() - t0:.0f} s")
    print(f"base {args.base} → fine-tuned {args.tuned}; {len(questions)} test questions ({args.test})\n")
    print("| questions | n | ROUGE-L before | ROUGE-L after | difference | stopped by itself before | after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, n, rb, ra, sb, sa in rows:
        print(f"| {k} | {n} | {rb:.3f} | {ra:.3f} | {ra - rb:+.3f} | {sb:.0%} | {sa:.0%} |")
    print()
    for i in range(min(args.show, len(questions))):
        q = questions[i]
        print(f"Q: {q['prompt']}\n   reference: {q['response']}\n   before:    {before[i][:160]!r}\n"
              f"   after:     {after[i][:160]!r}\n")


if __name__ == "__main__":
    main()
