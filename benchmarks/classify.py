"""Text classification, speed and agreement: haina `finetune classify` against `transformers`'
`AutoModelForSequenceClassification` + `Trainer`, on the same weights, examples, batches and steps.

The base is the quickstart's shape (recipes/pretrain/quickstart.yaml: rope, rmsnorm, swiglu, 4 layers,
d=256) with random weights and a byte-level BPE tokenizer trained here on the training texts, or --base
(a causal checkpoint such as runs/quickstart, for a macro-F1 that means something). It is exported with
`export_hf`, so transformers loads the same weights as LlamaForSequenceClassification, which pools the
last token that is not its pad token: haina's `last` pooling of a causal model. The data is a `haina data
tasks --from-stdlib` output (built here by default, or --data DIR): train.jsonl trains, test.jsonl is scored.

Each run is its own process (`--worker`), so its peak memory is its own:
- **haina**: the real path, `load_finetune_config("classify", ...)` (recipes/finetune/classify.yaml with
  max_steps, batch size, block size, seed, device=cpu, no validation, no checkpoint before the end, and
  --test as flags) and `run_classify`. `ClassifyTrainer` is subclassed only to read the clock and the
  memory after each optimizer step and to fingerprint the batches it draws. Its test accuracy and
  macro-F1 come from its report.json.
- **peer**: `transformers.Trainer` on the very batches haina's trainer draws: the texts are encoded here
  with haina's own functions (`read_splits`, `label_map`, `to_targets`, `encode_texts`) and batched by
  `ClassBatches` with a generator seeded as the trainer seeds its own, one pre-padded batch per step (a
  dataset of batches, batch size 1, a sequential sampler, a collator that passes each through), with
  the attention mask a padding collator gives. haina pads with the end-of-text token that ends every
  text, which transformers would take for padding, so the peer's batches are padded with an id that
  occurs in no text (its config's pad_token_id); before any run, the pooled hidden states of both on
  one batch are compared (the peer's head set to the identity), so both pool the same position. The
  worker checks that haina drew exactly these batches (fingerprints). The test split is scored with
  `trainer.predict` on haina's test batches, and both sides' metrics come from
  `haina.train.metrics.classification_report`.

The same settings on both sides: the recipe's lr (or --lr), AdamW with its betas, eps and weight decay
(fused kernels: haina's `build_adamw`, transformers' `adamw_torch_fused`), linear warm-up then cosine to
min_lr (transformers' `cosine_with_min_lr`, whose warm-up starts at 0: one step behind haina's), the
gradient clip, fp32 on CPU, --threads torch threads, --max-length tokens per text (end-of-text kept).
The heads differ as the two libraries make them (haina's has a bias, transformers' `score` none), each
initialized from the round's seed. Each library's own loop work is timed as users get it (logging;
haina's metrics.jsonl and, where installed, TensorBoard events; the fingerprint of each batch, a few
microseconds); checkpoints and evaluation are not (no checkpoint before the end, no validation).

--warmup steps untimed, then --steps timed ones, from the end of the last warm-up step to the end of
the last step. Examples/s counts trained examples, tokens/s real (non-padding) tokens. Memory: the
worker's peak resident set (VmHWM) at the end of the timed steps, imports included, and what training
adds (the peak during the timed steps above the resident set before the first step). Every figure is
the median of --rounds interleaved rounds (`rounds.py`; round r uses seed + r on both sides, so its own
batches and heads) with its range; ratios are medians of per-round ratios. Macro-F1 agrees "within
noise" when the medians differ by at most the larger of either side's range and --f1-tolerance.

    .venv/bin/python benchmarks/classify.py                              # 3 rounds of 5 + 200 steps, batch 16
    .venv/bin/python benchmarks/classify.py --base runs/quickstart --threads 1
    .venv/bin/python benchmarks/classify.py --quick --threads 1          # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rounds import Spread, cpu_model, load_average, peak_kib, ratios, reset_peak, round_order, status_kib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIDES = ("haina", "hf")
LABELS = {"haina": "haina finetune classify", "hf": "transformers Trainer"}
DEFAULTS = {"rounds": 3, "steps": 200, "warmup": 5, "batch_size": 16, "max_length": 0}
QUICK = {"rounds": 1, "steps": 4, "warmup": 1, "batch_size": 4, "max_length": 64}


# --------------------------------------------------------------------------------- clock, memory, batches
class Clock:
    """The clock and memory of one training run, told after every optimizer step."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.done = self.examples = self.tokens = 0
        self.rss_start: int | None = None
        self.peak_setup, self.peak_train, self.reset = 0, 0, False
        self.t0 = self.t1 = 0.0

    def begin(self) -> None:
        if self.rss_start is None:
            self.rss_start = status_kib("VmRSS")

    def step_done(self, examples: int, tokens: int) -> None:
        now = time.perf_counter()
        self.done += 1
        if self.done == self.warmup:
            self.peak_setup, self.reset = peak_kib(), reset_peak()
            self.t0 = time.perf_counter()  # after reading /proc, so that is not timed
        elif self.warmup < self.done <= self.warmup + self.steps:
            self.examples, self.tokens = self.examples + examples, self.tokens + tokens
            if self.done == self.warmup + self.steps:
                self.t1, self.peak_train = now, peak_kib()

    def result(self) -> dict:
        seconds = self.t1 - self.t0
        if self.done < self.warmup + self.steps or seconds <= 0:
            raise RuntimeError(f"the run ended after {self.done} of {self.warmup + self.steps} steps")
        added = self.peak_train - self.rss_start if self.reset and self.rss_start is not None else None
        return {"seconds": seconds, "examples": self.examples, "tokens": self.tokens,
                "examples_per_sec": self.examples / seconds, "tokens_per_sec": self.tokens / seconds,
                "ms_per_step": 1000 * seconds / self.steps, "peak_mib": max(self.peak_setup, self.peak_train) / 1024,
                "added_mib": None if added is None else added / 1024, "threads": torch.get_num_threads()}


def fingerprint(idx: torch.Tensor, lengths: torch.Tensor, y: torch.Tensor) -> str:
    """A short hash of one haina batch (ids as haina pads them, lengths, targets)."""
    h = hashlib.sha1()
    for t in (idx, lengths, y):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def hf_batch(batch: dict, pad: int) -> dict[str, torch.Tensor]:
    """A haina batch as the peer reads it: padded with `pad`, an attention mask, labels."""
    idx, lengths = batch["idx"], batch["lengths"]
    real = torch.arange(idx.shape[1])[None, :] < lengths[:, None]
    return {"input_ids": idx.masked_fill(~real, pad), "attention_mask": real.long(), "labels": batch["y"]}


def load_batches(path: str, prefix: str) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    saved = load_file(path)
    n = sum(1 for k in saved if k.startswith(f"{prefix}.input_ids."))
    return [{k: saved[f"{prefix}.{k}.{i}"] for k in ("input_ids", "attention_mask", "labels")} for i in range(n)]


# --------------------------------------------------------------------------------- the workers
def haina_worker(spec: dict) -> dict:
    """`haina finetune classify` as the CLI runs it (recipe + flags → `run_classify`), clocked after every step."""
    from haina.finetune import classify
    from haina.finetune.command import load_finetune_config

    clock = Clock(spec["warmup"], spec["steps"])
    seen: list[str] = []

    class ClockedClassifyTrainer(classify.ClassifyTrainer):
        """The real trainer; only reads the clock and memory after its steps and fingerprints its batches."""

        def next_batch(self):
            batch = super().next_batch()
            seen.append(fingerprint(batch["idx"], batch["lengths"], batch["y"]))
            return batch

        def train_step(self, lr: float):
            clock.begin()
            out = super().train_step(lr)
            clock.step_done(out["weight"], out["tokens"])
            return out

    classify.ClassifyTrainer = ClockedClassifyTrainer  # run_classify looks the class up in its module when it runs
    t = spec["train"]
    train = {"max_steps": spec["warmup"] + spec["steps"], "batch_size": spec["batch_size"],
             "block_size": spec["block"], "seed": spec["seed"], "device": "cpu", "precision": "fp32",
             "save_every": 0, "lr": t["lr"]}
    flags = {"base": spec["base"], "out": spec["run_dir"], "data": {"train": [spec["train_file"]], "val_fraction": 0.0},
             "classify": {"test": [spec["test_file"]]}, "train": train}
    cfg = load_finetune_config("classify", None, flags)
    classify.run_classify(cfg, overwrite=True)
    report = json.loads((Path(spec["run_dir"]) / "report.json").read_text())
    if report.get("evaluated_on") != "test":
        raise RuntimeError(f"haina scored {report.get('evaluated_on')}, not the test split")
    return {**clock.result(), "fingerprints": seen, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "evaluated": report["evaluated_examples"]}


def hf_worker(spec: dict) -> dict:
    """`transformers.Trainer` on the batches haina's trainer draws, clocked after every step; then its test scores."""
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    n = spec["warmup"] + spec["steps"]
    batches, tests = load_batches(spec["batches"], "train"), load_batches(spec["test_batches"], "test")
    if len(batches) != n:
        raise RuntimeError(f"{spec['batches']} holds {len(batches)} batches, not {n}")
    fetched: dict[int, list[int]] = {id(batches): [], id(tests): []}

    class Batches(torch.utils.data.Dataset):
        """One ready batch per item; the trainer's batch size is 1 and the collator unwraps it."""

        def __init__(self, items: list[dict]):
            self.items = items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> dict:
            fetched[id(self.items)].append(i)
            return self.items[i]

    clock = Clock(spec["warmup"], spec["steps"])

    class ClockCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            b = batches[state.global_step - 1]  # a sequential sampler: step k trains on batch k - 1
            clock.step_done(len(b["labels"]), int(b["attention_mask"].sum()))

    t = spec["train"]
    transformers.set_seed(spec["seed"])  # the head's initialization, before the model exists
    config = AutoConfig.from_pretrained(spec["hf"], num_labels=len(spec["labels"]), pad_token_id=spec["hf_pad"],
                                        problem_type="single_label_classification", use_cache=False)
    model = AutoModelForSequenceClassification.from_pretrained(spec["hf"], config=config, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=spec["run_dir"], per_device_train_batch_size=1, per_device_eval_batch_size=1,
        gradient_accumulation_steps=1, max_steps=n, learning_rate=t["lr"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": t["min_lr"]}, warmup_steps=t["warmup_steps"], weight_decay=t["weight_decay"],
        adam_beta1=t["beta1"], adam_beta2=t["beta2"], adam_epsilon=t["eps"], optim="adamw_torch_fused",
        max_grad_norm=t["grad_clip"], logging_steps=t["log_every"], save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False, remove_unused_columns=False,
        label_names=["labels"], train_sampling_strategy="sequential", seed=spec["seed"])
    trainer = Trainer(model=model, args=args, train_dataset=Batches(batches), data_collator=lambda items: items[0],
                      callbacks=[ClockCallback()])
    trainer.train()
    if list(dict.fromkeys(fetched[id(batches)]))[:n] != list(range(n)):
        raise RuntimeError(f"transformers fetched batches {fetched[id(batches)][:10]}…, not 0..{n - 1} in order")
    result = clock.result()

    from haina.train.metrics import classification_report

    out = trainer.predict(Batches(tests))
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    if fetched[id(tests)] != list(range(len(tests))):
        raise RuntimeError("transformers did not score the test batches once each, in order")
    proba = torch.softmax(torch.as_tensor(logits).float(), dim=-1).numpy()
    y = torch.cat([b["labels"] for b in tests]).numpy()
    rep = classification_report(y, None, proba, spec["labels"])
    return {**result, "accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"], "evaluated": rep["n"]}


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    result = haina_worker(spec) if spec["side"] == "haina" else hf_worker(spec)
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------- the shared inputs
def prepare(args: argparse.Namespace, tmp: Path) -> dict:
    """Data, base (haina checkpoint + its HF export), encoded splits, the peer's pad id and test batches."""
    from safetensors.torch import save_file

    from haina.export.hf import export_hf
    from haina.finetune.base import load_base
    from haina.finetune.classify_data import ClassBatches, encode_texts, label_map, read_splits, to_targets
    from haina.finetune.command import load_finetune_config
    from haina.model import Transformer
    from haina.model.checkpoint import save_model
    from haina.model.classifier import Classifier, ClassifierConfig

    if args.data:
        data = Path(args.data)
        source = f"--data {args.data}"
    else:
        from haina.data.tasks import tasks_command

        data = tmp / "tasks"
        tasks_command(str(data), from_stdlib=True)
        source = "haina data tasks --from-stdlib"
    train_file, test_file = data / "train.jsonl", data / "test.jsonl"
    for f in (train_file, test_file):
        if not f.is_file():
            raise SystemExit(f"{f} not found: --data must be a `haina data tasks` output (train.jsonl, test.jsonl)")
    parsed, _ = read_splits([str(train_file)], [], [str(test_file)], text_field="text", label_field="label",
                            multi_label=False)
    labels = label_map(parsed["train"], False, "label")
    splits = {s: to_targets(parsed[s], labels, False, s) for s in ("train", "test")}

    if args.base:
        base = load_base(args.base)
        model, tokenizer, base_path = base.model, base.tokenizer, base.path
        if tokenizer is None:
            raise SystemExit(f"--base {args.base} has no tokenizer; give a checkpoint saved with one")
        if not getattr(model.cfg, "causal", True):
            raise SystemExit(f"--base {args.base} is an encoder (causal: false); this benchmark compares last-token "
                             "pooling with transformers' causal ...ForSequenceClassification: give a causal base")
    else:
        from haina.tokenizer.tokenizer import EOT
        from haina.tokenizer.train import train_bpe
        from haina.train.config import PretrainConfig
        from haina.train.pretrain import find_recipe

        shape = PretrainConfig.from_file(find_recipe("quickstart")).model
        tokenizer = train_bpe(splits["train"].texts, vocab_size=shape.vocab_size, special_tokens=(EOT,))
        torch.manual_seed(0)
        model = Transformer(shape)  # the quickstart's vocabulary, even if the texts' BPE stopped short of it
        base_path = str(tmp / "base")
        save_model(base_path, model, tokenizer)
    model = model.float().eval()
    export_hf(model, tokenizer, tmp / "hf")

    recipe = load_finetune_config("classify", None, {}).train
    if recipe.schedule != "cosine":
        raise SystemExit(f"recipes/finetune/classify.yaml uses the {recipe.schedule} schedule; this benchmark matches "
                         "it with transformers' cosine_with_min_lr only")
    block = args.max_length or model.cfg.block_size
    if block > model.cfg.block_size:
        raise SystemExit(f"--max-length {block} exceeds the model's context of {model.cfg.block_size}")
    clf = Classifier(model, ClassifierConfig(labels=labels, pooling="last"), tokenizer)  # run_classify's, causal
    encoded = {s: encode_texts(clf, splits[s].texts, block) for s in splits}
    pad = tokenizer.eos_id  # what run_classify pads with
    used = {i for s in encoded for seq in encoded[s][0] for i in seq}
    hf_pad = next((i for i in range(model.cfg.vocab_size) if i not in used), None)
    if hf_pad is None:
        raise SystemExit("every token id occurs in the texts; the peer needs one that does not, as its pad token")
    train_batches = ClassBatches(encoded["train"][0], splits["train"].targets, pad)
    test_batches = ClassBatches(encoded["test"][0], splits["test"].targets, pad)
    tensors = {}
    for i, b in enumerate(test_batches.eval_batches(args.batch_size, block)):  # in order, as haina's predict
        tensors |= {f"test.{k}.{i}": v for k, v in hf_batch(b, hf_pad).items()}
    save_file(tensors, str(tmp / "test_batches.safetensors"))
    first = train_batches.get_batch(args.batch_size, block, torch.Generator().manual_seed(args.seed))
    pooled = pooled_difference(clf, tmp / "hf", first, hf_pad)
    lengths = [len(s) for s in encoded["train"][0]]
    return {
        "base": base_path, "hf": str(tmp / "hf"), "train_file": str(train_file), "test_file": str(test_file),
        "labels": list(labels), "hf_pad": hf_pad, "block": block, "train_batches": train_batches,
        "test_batches": str(tmp / "test_batches.safetensors"), "test_examples": len(test_batches),
        "train_examples": len(train_batches), "mean_len": sum(lengths) / len(lengths),
        "truncated": sum(encoded[s][1] for s in encoded), "pooled_diff": pooled, "model": model,
        "base_label": args.base or "random init", "source": source,
        "train": {"lr": args.lr or recipe.lr, "min_lr": recipe.min_lr, "warmup_steps": recipe.warmup_steps,
                  "weight_decay": recipe.weight_decay, "beta1": recipe.beta1, "beta2": recipe.beta2,
                  "eps": recipe.eps, "grad_clip": recipe.grad_clip, "log_every": recipe.log_every},
    }


def pooled_difference(clf, hf_dir: Path, batch: dict, hf_pad: int) -> float:
    """The largest difference between haina's pooled hidden states and the peer's on one batch.

    The peer's head is made the identity (num_labels = n_embd), so its pooled logits are the hidden states
    at the position transformers picks: the last id that is not its pad token.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    n = clf.backbone.cfg.n_embd
    config = AutoConfig.from_pretrained(hf_dir, num_labels=n, pad_token_id=hf_pad, use_cache=False)
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        hf.score.weight.copy_(torch.eye(n))
        b = hf_batch(batch, hf_pad)
        theirs = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ours = clf.eval().pool(batch["idx"], batch["lengths"])
    diff = float((ours - theirs).abs().max())
    if diff > 1e-3:
        raise SystemExit(f"transformers pools another position than haina (pooled states differ by {diff:.3g}); the "
                         "comparison would not be of the same model")
    return diff


def round_batches(args: argparse.Namespace, shared: dict, tmp: Path, r: int) -> tuple[str, list[str]]:
    """Round r's training batches, as haina's trainer will draw them with seed + r: the peer's file, fingerprints."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(args.seed + r)  # the Trainer's data generator
    tensors, prints = {}, []
    for i in range(args.warmup + args.steps):
        b = shared["train_batches"].get_batch(args.batch_size, shared["block"], gen)
        prints.append(fingerprint(b["idx"], b["lengths"], b["y"]))
        tensors |= {f"train.{k}.{i}": v for k, v in hf_batch(b, shared["hf_pad"]).items()}
    path = tmp / f"batches-{r}.safetensors"
    save_file(tensors, str(path))
    return str(path), prints


def run_one(side: str, args: argparse.Namespace, shared: dict, tmp: Path, r: int, batches: str) -> dict:
    """One side in a fresh process; its measurements."""
    name = f"{side}-{r}"
    keys = ("base", "hf", "train_file", "test_file", "labels", "hf_pad", "block", "test_batches", "train")
    spec = {**{k: shared[k] for k in keys}, "side": side, "warmup": args.warmup, "steps": args.steps,
            "batch_size": args.batch_size, "threads": args.threads, "seed": args.seed + r, "batches": batches,
            "run_dir": str(tmp / "runs" / name), "result": str(tmp / f"{name}.json")}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], capture_output=True, text=True,
                          check=False, env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SystemExit(f"{side} (round {r + 1}) failed:\n{tail}")
    shutil.rmtree(spec["run_dir"], ignore_errors=True)  # checkpoints of a throwaway run
    return json.loads(Path(spec["result"]).read_text())


# --------------------------------------------------------------------------------- the report
def report(args: argparse.Namespace, shared: dict, results: dict[str, list[dict]], same: list[bool],
           load: tuple[float, float]) -> None:
    import transformers

    model, cfg = shared["model"], shared["model"].cfg

    def col(side: str, field: str) -> list[float]:
        return [r[field] for r in results[side] if r.get(field) is not None]

    rounds = len(results["haina"])
    print(f"\n## Text classification: haina vs transformers {transformers.__version__} "
          "AutoModelForSequenceClassification + Trainer\n")
    print(f"{datetime.date.today()} · {cpu_model()} ({os.cpu_count()} cores, {args.threads} torch threads) · torch "
          f"{torch.__version__} · Python {platform.python_version()} · {shared['base_label']} "
          f"({model.num_params() / 1e6:.2f}M params, {cfg.n_layer} layers, d={cfg.n_embd}, vocab {cfg.vocab_size}) · "
          f"cpu fp32 · {shared['source']}: {shared['train_examples']:,} training and {shared['test_examples']:,} test "
          f"examples, {len(shared['labels'])} classes, {shared['mean_len']:.0f} tokens per training text on average "
          f"({shared['truncated']} cut to {shared['block']}) · batch {args.batch_size} · lr {shared['train']['lr']:g} "
          f"· {args.warmup} warm-up + {args.steps} timed steps · {rounds} interleaved round{'s' if rounds != 1 else ''}"
          f" · load average {load[0]:.1f} before, {load[1]:.1f} after\n")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/classify.py', *sys.argv[1:]])}`\n")

    print(f"| measure | {LABELS['haina']} | {LABELS['hf']} | haina / transformers (per-round ratios; metrics: "
          "difference of medians) |")
    print("|---|---:|---:|---:|")
    rows = (("examples/s", "examples_per_sec", ",.1f"), ("tokens/s", "tokens_per_sec", ",.0f"),
            ("ms/step", "ms_per_step", ",.1f"), ("peak RSS, MiB", "peak_mib", ",.0f"),
            ("added by training, MiB", "added_mib", ",.0f"), ("test accuracy", "accuracy", ".4f"),
            ("test macro-F1", "macro_f1", ".4f"))
    for name, field, fmt in rows:
        a, b = Spread.of(col("haina", field)), Spread.of(col("hf", field))
        if not a.rounds or not b.rounds:
            continue
        if field in ("accuracy", "macro_f1"):
            last = f"{a.median - b.median:+.4f}"
        else:
            last = ratios(col("haina", field), col("hf", field)).text(unit="×")
        print(f"| {name} | {a.text(fmt)} | {b.text(fmt)} | {last} |")
    threads = sorted({r["threads"] for rs in results.values() for r in rs})
    print(f"\nMedians over rounds (min–max, rounds). Torch threads seen in the workers: {', '.join(map(str, threads))}. "
          f"haina trained on exactly the peer's batches: {'yes' if all(same) else 'NO'} (fingerprints of every step, "
          f"{sum(same)}/{len(same)} rounds). Pooled hidden states, haina vs transformers, on one batch before "
          f"training: max difference {shared['pooled_diff']:.1e}. Test examples scored: haina "
          f"{', '.join(str(r['evaluated']) for r in results['haina'])}, transformers "
          f"{', '.join(str(r['evaluated']) for r in results['hf'])}.\n")

    speed = ratios(col("haina", "examples_per_sec"), col("hf", "examples_per_sec"))
    print(f"Target (haina ≥ {args.target:g}× transformers' examples/s, CPU): "
          f"{'**met**' if speed.median >= args.target else '**not met**'}: {speed.text(unit='×')}.")
    f1 = {s: Spread.of(col(s, "macro_f1")) for s in SIDES}
    gap = abs(f1["haina"].median - f1["hf"].median)
    noise = max(f1["haina"].high - f1["haina"].low, f1["hf"].high - f1["hf"].low, args.f1_tolerance)
    print(f"Agreement (test macro-F1 within noise: |difference of medians| ≤ max(either side's range, "
          f"{args.f1_tolerance:g})): {'**met**' if gap <= noise else '**not met**'}: haina {f1['haina'].median:.4f}, "
          f"transformers {f1['hf'].median:.4f}, difference {gap:.4f}, allowed {noise:.4f}.")


# --------------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="a causal haina checkpoint/run or HF directory with a tokenizer "
                                                "(default: the quickstart's shape, random weights)")
    p.add_argument("--data", default=None, help="a `haina data tasks` output directory (default: built here with "
                                                "--from-stdlib)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds; figures are medians over them (3)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (200)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them, at least 1 (5)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (16)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text, end-of-text included (0: the "
                                                                "model's context)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every worker")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate on both sides (0: the recipe's)")
    p.add_argument("--seed", type=int, default=None, help="round r uses seed + r on both sides (the recipe's seed)")
    p.add_argument("--target", type=float, default=1.3, help="examples/s ratio over transformers the target checks")
    p.add_argument("--f1-tolerance", type=float, default=0.02, help="macro-F1 difference always counted as noise")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 1 + 4 steps, batch 4, 64 tokens")
    args = p.parse_args()
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1 or args.batch_size < 1 or args.max_length < 0:
        p.error("--warmup, --steps, --rounds and --batch-size must be at least 1, --max-length at least 0")
    if args.seed is None:
        from haina.finetune.command import load_finetune_config

        args.seed = load_finetune_config("classify", None, {}).train.seed
    with tempfile.TemporaryDirectory(prefix="haina-bench-classify-") as tmp_name:
        tmp = Path(tmp_name)
        shared = prepare(args, tmp)
        load_before = load_average()
        results: dict[str, list[dict]] = {s: [] for s in SIDES}
        same: list[bool] = []
        for r in range(args.rounds):
            batches, prints = round_batches(args, shared, tmp, r)
            for side in round_order(SIDES, r):
                res = run_one(side, args, shared, tmp, r, batches)
                results[side].append(res)
                if side == "haina":
                    same.append(res.pop("fingerprints") == prints)
                print(f"round {r + 1}/{args.rounds}: {side}: {res['examples_per_sec']:,.1f} examples/s, peak "
                      f"{res['peak_mib']:,.0f} MiB, test macro-F1 {res['macro_f1']:.4f}", file=sys.stderr, flush=True)
        report(args, shared, results, same, (load_before, load_average()))


if __name__ == "__main__":
    main()
