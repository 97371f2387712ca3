"""`haina quickstart`: the whole pipeline on an embedded corpus, on a laptop CPU, in minutes.

corpus (the Python documentation that ships with every Python) → data prepare (clean, filter,
dedup, split, report) → byte-level BPE tokenizer → token shards → pretraining within a time
budget → validation loss and perplexity → checkpoint, report, loss curve → three samples.
Nothing is downloaded.
"""

from __future__ import annotations

import time
from pathlib import Path

from haina.core.config import merge, parse_overrides, to_dict
from haina.core.errors import HainaError
from haina.core.io import write_json
from haina.core.log import info
from haina.core.output import claim_output, output_dir, write_manifest

PROMPTS = ["The ", "Return a ", "This module "]
RESERVE_SECONDS = 25.0  # kept back from the budget for the final evaluation, saving and sampling
COMMAND = "quickstart"  # the name in the manifest of its run directories


def quickstart(out: str = "runs/quickstart", max_minutes: float = 5.0, vocab_size: int = 4096,
               seed: int = 1337, overwrite: bool = False, overrides: list[str] = ()) -> None:
    """The main job: corpus → prepare → tokenizer → shards → pretrain → evaluate → sample.

    Builds a corpus from the documentation inside this Python installation (pydoc topics and
    the standard library's docstrings, read with `ast`), runs it through `haina data prepare`,
    trains a byte-level BPE tokenizer, writes train/val token shards, pretrains a small
    Transformer on CPU within the time budget, and writes `OUT/report.json`, `OUT/loss.png`,
    the checkpoint and three sampled continuations. Extra `--train.key=value` or
    `--model.key=value` overrides tune the pretraining recipe.

    Args:
        out: run directory (corpus, prepared data, tokenizer, shards, checkpoints, reports); an earlier
            quickstart run there is replaced, anything else needs --overwrite.
        max_minutes: wall-clock budget for the whole job, in minutes.
        vocab_size: BPE vocabulary size.
        seed: seed for the split-independent parts (tokenizer is deterministic; training and sampling use it).
        overwrite: replace an existing OUT that is not a quickstart run.
    """
    from haina.data.prepare.command import PrepareConfig, prepare_documents
    from haina.data.stdlib_corpus import write_stdlib_corpus
    from haina.data.text_input import iter_documents
    from haina.data.tokenize import tokenize_to_shards
    from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START
    from haina.tokenizer.tokenizer import EOT
    from haina.tokenizer.train import train_bpe
    from haina.train.config import PretrainConfig
    from haina.train.pretrain import find_recipe, run_pretrain

    if max_minutes <= 0:
        raise HainaError("--max-minutes must be positive")
    # A mistyped override is refused now, not after minutes of data preparation (and before --out is claimed).
    PretrainConfig.from_dict(merge(to_dict(PretrainConfig.from_file(find_recipe("quickstart"))),
                                   parse_overrides(list(overrides))))
    start = time.perf_counter()
    # The run grows in place (a training run's checkpoints are written as it goes): claimed first, with an earlier
    # quickstart run there moved away; everything below is written into this fresh directory.
    run = claim_output(out, COMMAND, overwrite=overwrite)

    info("[1/6] building the corpus from this Python installation's documentation")
    corpus_stats = write_stdlib_corpus(run / "corpus" / "stdlib.jsonl")
    info(f"      {corpus_stats['documents']:,} documents, {corpus_stats['characters']:,} characters")

    info("[2/6] data prepare: normalize, filter, deduplicate, split")
    prep_cfg = PrepareConfig(filters=("repetition",), dedup=("exact", "minhash"), val_fraction=0.05)
    prep_report = prepare_documents([str(run / "corpus" / "stdlib.jsonl")], run / "prepared", prep_cfg)
    kept = prep_report["documents"]["kept"]
    info(f"      kept {kept:,} of {prep_report['documents']['in']:,} documents (report: {run / 'prepared' / 'report.md'})")

    info(f"[3/6] training a byte-level BPE tokenizer (vocab {vocab_size})")
    # The chat markers are reserved now so that the model can later be fine-tuned to chat (`haina finetune sft`)
    # with ChatML, whose turn markers must be single special tokens the vocabulary already holds.
    tokenizer = train_bpe(iter_documents([str(run / "prepared" / "train")]), vocab_size=vocab_size,
                          special_tokens=(EOT, IM_START, IM_END))
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    with output_dir(run / "tokenizer", "tokenizer train", inputs=[run / "prepared"]) as tmp:
        tokenizer.save(tmp)

    info("[4/6] tokenizing into train/val shards")
    splits = {s: iter_documents([str(run / "prepared" / s)]) for s in ("train", "val")}
    with output_dir(run / "data", "data tokenize", inputs=[run / "prepared", run / "tokenizer"]) as tmp:
        meta = tokenize_to_shards(splits, tokenizer, tmp, shown_as=run / "data")
    info(f"      train {meta['splits']['train']['tokens']:,} tokens, val {meta['splits']['val']['tokens']:,} tokens")

    spent = (time.perf_counter() - start) / 60
    # A short budget (a smoke run) keeps back a quarter of itself, not a fixed 25 s it could not afford.
    train_minutes = max_minutes - spent - min(RESERVE_SECONDS, 15 * max_minutes) / 60
    if train_minutes <= 0.05:
        raise HainaError(f"--max-minutes {max_minutes} leaves no time for training after data preparation "
                         f"({spent:.1f} min); give at least {spent + 1:.0f}")
    info(f"[5/6] pretraining for up to {train_minutes:.1f} minutes on CPU")
    base = PretrainConfig.from_file(find_recipe("quickstart"))  # package data once installed
    data = merge(to_dict(base), {"data": {"dir": str(run / "data"), "tokenizer": str(run / "tokenizer")},
                                 "out": str(run), "model": {"vocab_size": tokenizer.vocab_size},
                                 "train": {"max_minutes": train_minutes, "seed": seed}})
    cfg = PretrainConfig.from_dict(merge(data, parse_overrides(list(overrides))))
    report = run_pretrain(cfg, tokenizer=tokenizer)

    info("[6/6] sampling")
    samples = _samples(run, seed)
    report = {**report, "quickstart": {"corpus": corpus_stats, "prepare": prep_report["documents"],
                                        "samples": samples, "total_wall_seconds": time.perf_counter() - start}}
    write_json(run / "report.json", report)
    write_manifest(run, COMMAND, {"complete": True})  # last, as for every output: the run is whole
    _print_summary(run, report, samples)


def _samples(run: Path, seed: int) -> list[dict]:
    from haina.generate.engine import Engine
    from haina.generate.sampling import SamplingParams
    from haina.generate.text import TextGenerator
    from haina.model.checkpoint import load_model

    model, tokenizer = load_model(run)
    gen = TextGenerator(Engine(model, max_batch_size=len(PROMPTS), eos_token_id=tokenizer.eos_id), tokenizer)
    params = SamplingParams(max_new_tokens=60, temperature=0.8, top_k=50, top_p=0.95, seed=seed)
    results = gen.generate(PROMPTS, params)
    return [{"prompt": p, "completion": r[0].text} for p, r in zip(PROMPTS, results)]


def _print_summary(run: Path, report: dict, samples: list[dict]) -> None:
    init, final = report.get("initial_val_loss"), report.get("val_loss")
    print()
    print(f"quickstart done in {report['quickstart']['total_wall_seconds'] / 60:.1f} min: "
          f"{report['steps']} steps, {report['train_tokens']:,} tokens, {report['tokens_per_sec']:,.0f} tokens/s, "
          f"{report['params'] / 1e6:.2f}M parameters")
    if init is not None:
        print(f"validation loss {init:.3f} → {final:.3f} (perplexity {report['val_ppl']:.1f}); "
              f"best {report['best_val_loss']:.3f}")
    print(f"report: {run / 'report.json'}   loss curve: {run / 'loss.png'}   data report: {run / 'prepared' / 'report.md'}")
    print()
    for s in samples:
        print(f"--- {s['prompt']!r}")
        print(s["prompt"] + s["completion"])
    print()
    print("Go on with:")
    print(f"  haina generate --checkpoint {run} --prompt 'Return the ' --max-new-tokens 100")
    print(f"  haina chat --checkpoint {run}")
    print(f"  haina serve --checkpoint {run}")
    print(f"  haina export hf --checkpoint {run} --out {run}/hf")


__all__ = ["quickstart"]
