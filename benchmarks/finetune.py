"""Supervised fine-tuning speed and memory: haina SFT (full and LoRA; padding and packing) against
`transformers`' `Trainer` (full) and `Trainer` + `peft` (LoRA), on the same weights, tokens and batches.

The model is the quickstart's shape (recipes/pretrain/quickstart.yaml: rope, rmsnorm, swiglu, 4 layers,
d=256, 4 heads, context 256) with random weights and a byte-level BPE tokenizer trained here on the
records, with the ChatML markers; or --base, a trained checkpoint such as runs/quickstart. It is saved
as a haina checkpoint and exported with `export_hf`, so transformers loads the same weights
(LlamaForCausalLM). The records are the stdlib question → answer pairs of `haina data instruct`
(`build_pairs`, offline) or --data JSONL. They are rendered once here, with haina's chat rendering and
assistant-only mask (`tokenize_sft`), and the peer trains on exactly those token ids, with labels -100
wherever haina has no target: tokenization is not part of the race.

Each configuration runs in its own process (`--worker`), so its peak memory is its own:
- **haina**: the real `haina finetune sft` path, `load_finetune_config("sft", ...)` (the bundled recipe
  recipes/finetune/sft.yaml, with max_steps, batch size, block size, device=cpu, no validation split
  and the batching or LoRA rank set as flags) and `run_sft`. `SFTTrainer` is subclassed only to read
  the clock and the memory after each step and to count the positions each batch computes.
  Configurations: full fine-tuning with length-bucketed padding (`data.batching=pad`, the default) and
  with packing (`pack`: full windows, a block-diagonal mask, positions restarting per example), and
  LoRA r=8 (alpha 16) on every projection (`lora.targets=all`) with padding.
- **peer**: `transformers.Trainer` (what users run), fed the very batches haina's padded trainer draws:
  the same `PaddedBatches` with the same seed, drawn here in advance, one pre-padded batch per step
  (a dataset of batches, sequential sampler, a collator that passes each through), with the padding
  attention mask a padding collator gives; `shift_labels` carries haina's targets, so both sides
  supervise the same positions. LoRA is `peft.get_peft_model` with q/k/v/o/gate/up/down_proj, the
  same r, alpha and dropout. The optimizer is each side's AdamW with the recipe's lr, betas, eps, weight
  decay, warm-up, cosine schedule and gradient clipping, each with its default kernel: transformers'
  `adamw_torch_fused` (its default on torch >= 2.8), haina's `build_adamw` (torch's per-tensor loop on
  CPU). TRL's SFTTrainer is reported as not installed when `import trl` fails (and as not measured yet
  when it imports: this script has no TRL worker).

Both fp32 on CPU, the same torch thread count (--threads, default all cores), the same number of
steps: --warmup steps untimed, then --steps timed ones, from the end of the last warm-up step to the end
of the last step (the loop's own overhead between steps included). Tokens/s counts real (non-padding)
input tokens; supervised tokens/s counts the positions with a training target. Memory: the process's
peak resident set (VmHWM) at the end of the timed steps, imports included (transformers' Trainer adds
about 160 MiB on import), and what training adds: the peak during the timed steps (VmHWM reset after
the warm-up) above the resident set just before the first step. With packing a step holds batch ×
block tokens, with padding batch examples, so the two differ in work per step: compare them by
tokens/s and supervised tokens/s, not by ms/step or memory.

Every figure comes from --rounds interleaved rounds (`rounds.py`): each round runs every
configuration once, the order reversed in every other round; a figure is the median over the rounds
with its range, and each haina/peer ratio the median of the per-round ratios.

    .venv/bin/python benchmarks/finetune.py                          # 3 rounds of 3 + 30 steps, batch 8 × 256
    .venv/bin/python benchmarks/finetune.py --base runs/quickstart --threads 1
    .venv/bin/python benchmarks/finetune.py --rounds 1 --steps 3     # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rounds import Spread, cpu_model, load_average, peak_kib, ratios, reset_peak, round_order, status_kib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # haina's `all`


@dataclass(frozen=True)
class Setup:
    """One measured configuration: who trains, how batches are formed, full or LoRA."""

    key: str
    label: str
    side: str  # "haina" or "hf"
    batching: str  # "pad" or "pack"
    lora: bool


CONFIGS = (
    Setup("haina-full-pad", "haina full, padded", "haina", "pad", False),
    Setup("haina-full-pack", "haina full, packed", "haina", "pack", False),
    Setup("haina-lora-pad", "haina LoRA r={r}, padded", "haina", "pad", True),
    Setup("hf-full", "transformers Trainer full, padded", "hf", "pad", False),
    Setup("hf-lora", "transformers Trainer + peft LoRA r={r}, padded", "hf", "pad", True),
)


# --------------------------------------------------------------------------------- memory and clock (in a worker)
class Probe:
    """The clock and memory of one training run, told after every optimizer step."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.done = 0
        self.rss_start: int | None = None
        self.peak_setup = 0
        self.peak_train: int | None = None
        self.reset = False
        self.t0 = self.t1 = 0.0
        self.tokens = self.supervised = self.positions = 0
        self.step_tokens: list[int] = []
        self.cuda_peak: int | None = None

    def begin(self) -> None:
        if self.rss_start is None:
            self.rss_start = status_kib("VmRSS")

    def step_done(self, tokens: int, supervised: int, positions: int) -> None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:  # the step's kernels are queued, not done: wait for them before reading the clock
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.done += 1
        self.step_tokens.append(int(tokens))
        if self.done == self.warmup:
            self.peak_setup = peak_kib()
            self.reset = reset_peak()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()  # after reading /proc, so that is not timed
        elif self.warmup < self.done <= self.warmup + self.steps:
            self.tokens, self.supervised, self.positions = (self.tokens + tokens, self.supervised + supervised,
                                                            self.positions + positions)
            if self.done == self.warmup + self.steps:
                self.t1 = now
                self.peak_train = peak_kib()
                self.cuda_peak = torch.cuda.max_memory_allocated() if cuda else None

    def result(self) -> dict:
        seconds = self.t1 - self.t0
        if self.done < self.warmup + self.steps or seconds <= 0:
            raise RuntimeError(f"the run ended after {self.done} of {self.warmup + self.steps} steps")
        peak = max(self.peak_setup, self.peak_train or 0)
        added = (self.peak_train - self.rss_start) if self.reset and self.rss_start is not None else None
        return {"seconds": seconds, "tokens": self.tokens, "supervised": self.supervised,
                "positions": self.positions, "tokens_per_sec": self.tokens / seconds,
                "supervised_per_sec": self.supervised / seconds, "ms_per_step": 1000 * seconds / self.steps,
                "peak_mib": peak / 1024, "added_mib": None if added is None else added / 1024,
                "step_tokens": self.step_tokens, "threads": torch.get_num_threads(),
                "cuda_peak_mib": None if self.cuda_peak is None else self.cuda_peak / 2**20}


# --------------------------------------------------------------------------------- the workers
def haina_worker(spec: dict) -> dict:
    """`haina finetune sft` as the CLI runs it (recipe + flags → `run_sft`), clocked after every step."""
    from haina.finetune import sft
    from haina.finetune.command import load_finetune_config

    probe = Probe(spec["warmup"], spec["steps"])
    positions = [0]

    class ClockedSFTTrainer(sft.SFTTrainer):
        """The real trainer; only reads the clock and memory around its steps."""

        def next_batch(self):
            batch = super().next_batch()
            positions[0] += batch["x"].numel()
            return batch

        def train_step(self, lr: float):
            probe.begin()
            out = super().train_step(lr)
            probe.step_done(out["tokens"], out["weight"], positions[0])
            positions[0] = 0
            return out

    sft.SFTTrainer = ClockedSFTTrainer  # run_sft looks the class up in its module when it runs
    flags = {"base": spec["base"], "out": spec["run_dir"],
             "data": {"train": [spec["data"]], "val_fraction": 0.0, "batching": spec["batching"]},
             "train": {"max_steps": spec["warmup"] + spec["steps"], "batch_size": spec["batch_size"],
                       "block_size": spec["block_size"], "device": spec["device"],
                       "precision": spec["precision"]},
             "lora": {"r": spec["lora_r"] if spec["lora"] else 0, "alpha": spec["lora_alpha"]}}
    cfg = load_finetune_config("sft", None, flags)
    report = sft.run_sft(cfg, overwrite=True)
    return {**probe.result(), "report_steps": report["steps"]}


def hf_worker(spec: dict) -> dict:
    """`transformers.Trainer` (+ peft) on the batches haina's padded trainer draws, clocked after every step."""
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    saved = load_file(spec["batches"])
    n = spec["warmup"] + spec["steps"]
    batches = [{"input_ids": saved[f"input_ids.{i}"], "attention_mask": saved[f"attention_mask.{i}"],
                "labels": saved[f"labels.{i}"], "shift_labels": saved[f"labels.{i}"]} for i in range(n)]
    fetched: list[int] = []

    class Batches(torch.utils.data.Dataset):
        """One ready batch per item; the trainer's batch size is 1 and the collator unwraps it."""

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            fetched.append(i)
            return batches[i]

    probe = Probe(spec["warmup"], spec["steps"])

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            probe.begin()

        def on_step_end(self, args, state, control, **kwargs):
            b = batches[state.global_step - 1]  # a sequential sampler: step k trains on batch k - 1
            probe.step_done(int(b["attention_mask"].sum()), int((b["shift_labels"] != -100).sum()),
                            b["input_ids"].numel())

    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    if spec["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                                 target_modules=HF_TARGETS, task_type="CAUSAL_LM"))
    t = spec["train"]
    args = TrainingArguments(
        output_dir=spec["run_dir"], per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=n,
        learning_rate=t["lr"], lr_scheduler_type="cosine", warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"], adam_beta1=t["beta1"], adam_beta2=t["beta2"], adam_epsilon=t["eps"],
        max_grad_norm=t["grad_clip"], logging_steps=t["log_every"], save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=spec["device"] == "cpu", bf16=spec["precision"] == "bf16",
        dataloader_pin_memory=False, remove_unused_columns=False,
        label_names=["labels"], train_sampling_strategy="sequential", seed=t["seed"])
    trainer = Trainer(model=model, args=args, train_dataset=Batches(), data_collator=lambda items: items[0],
                      callbacks=[Clock()])
    trainer.train()
    if list(dict.fromkeys(fetched))[:n] != list(range(n)):
        raise RuntimeError(f"transformers fetched batches {fetched[:10]}…, not 0..{n - 1} in order")
    return probe.result()


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    result = haina_worker(spec) if spec["side"] == "haina" else hf_worker(spec)
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------- the shared inputs
def prepare(args: argparse.Namespace, tmp: Path) -> dict:
    """Base model (haina checkpoint + its HF export), records, rendered examples and the peer's batches."""
    from safetensors.torch import save_file

    from haina.data.instruct import build_pairs
    from haina.export.hf import export_hf
    from haina.finetune.base import load_base
    from haina.finetune.batching import PaddedBatches
    from haina.finetune.command import load_finetune_config
    from haina.finetune.sft_data import prepare_chat_tokenizer, read_sft_records, record_to_messages, tokenize_sft
    from haina.model import Transformer
    from haina.model.checkpoint import save_model

    if args.data:
        conversations = read_sft_records(args.data).conversations
        if args.max_records:
            conversations = conversations[:args.max_records]
        source = ", ".join(args.data)
        tokenizer_texts = [m["content"] for conv in conversations for m in conv]
    else:
        pairs, _ = build_pairs()
        tokenizer_texts = [t for r in pairs for t in (r["prompt"], r["response"])]
        if args.max_records:
            pairs, _ = build_pairs(max_pairs=args.max_records)  # a seeded sample, as `haina data instruct` takes
        conversations = [record_to_messages(r) for r in pairs]
        source = f"stdlib question → answer pairs (haina data instruct), {len(conversations):,} records"

    if args.base:
        base = load_base(args.base)
        model, tokenizer, base_path = base.model, base.tokenizer, base.path
        if tokenizer is None:
            raise SystemExit(f"--base {args.base} has no tokenizer; give a checkpoint saved with one")
    else:
        from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START
        from haina.tokenizer.tokenizer import EOT
        from haina.tokenizer.train import train_bpe
        from haina.train.config import PretrainConfig
        from haina.train.pretrain import find_recipe

        shape = PretrainConfig.from_file(find_recipe("quickstart")).model
        tokenizer = train_bpe(tokenizer_texts, vocab_size=shape.vocab_size, special_tokens=(EOT, IM_START, IM_END))
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        torch.manual_seed(0)
        model = Transformer(shape)  # the quickstart's vocabulary, even if the records' BPE stopped short of it
        base_path = str(tmp / "base")
        save_model(base_path, model, tokenizer)
    export_hf(model.float(), tokenizer, tmp / "hf")

    data = tmp / "records.jsonl"
    data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))
    recipe = load_finetune_config("sft", None, {}).train
    block = args.block_size or model.cfg.block_size
    if block > model.cfg.block_size:
        raise SystemExit(f"--block-size {block} exceeds the model's context of {model.cfg.block_size}")
    chat = prepare_chat_tokenizer(tokenizer, model.cfg.vocab_size)
    examples, rejects = tokenize_sft(chat, conversations, block_size=block)  # as run_sft renders them
    pad = chat.pad_id if chat.pad_id is not None else chat.eos_id

    # The batches haina's padded trainer draws: the same class, the same examples, a generator with the
    # trainer's seed. A pad id of -1 marks padding, so the attention mask can be read off the ids.
    source_batches = PaddedBatches(examples, -1)
    gen = torch.Generator().manual_seed(recipe.seed)
    tensors, expected = {}, []
    for i in range(args.warmup + args.steps):
        b = source_batches.get_batch(args.batch_size, block, gen)
        real = b["x"] >= 0
        tensors |= {f"input_ids.{i}": b["x"].masked_fill(~real, pad), f"attention_mask.{i}": real.long(),
                    f"labels.{i}": b["y"]}
        expected.append(int(b["tokens"]))
    save_file(tensors, str(tmp / "batches.safetensors"))
    losses = first_batch_losses(model, tmp / "hf", tensors)
    lengths = [len(e) for e in examples]
    return {
        "base": base_path, "hf": str(tmp / "hf"), "data": str(data), "batches": str(tmp / "batches.safetensors"),
        "block": block, "expected_tokens": expected, "model": model, "base_label": args.base or "random init",
        "source": source, "examples": len(examples), "rejects": len(rejects),
        "losses": losses, "mean_len": statistics.mean(lengths), "supervised_share": source_batches.supervised_tokens / sum(lengths),
        "train": {"lr": recipe.lr, "warmup_steps": recipe.warmup_steps, "weight_decay": recipe.weight_decay,
                  "beta1": recipe.beta1, "beta2": recipe.beta2, "eps": recipe.eps, "grad_clip": recipe.grad_clip,
                  "log_every": recipe.log_every, "seed": recipe.seed},
    }


def first_batch_losses(model, hf_dir: Path, tensors: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(haina, transformers) loss on the first batch: the check that both sides see the same targets."""
    import transformers
    from transformers import AutoModelForCausalLM

    from haina.model.transformer import lm_loss

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    x, mask, y = tensors["input_ids.0"], tensors["attention_mask.0"], tensors["labels.0"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=x, attention_mask=mask, labels=y, shift_labels=y).loss
        ours = lm_loss(model.eval()(x), y)  # padding comes last, so causal attention never reaches it
    model.train()
    return float(ours), float(theirs)


def run_one(setup: Setup, args: argparse.Namespace, shared: dict, tmp: Path, round_index: int) -> dict:
    """One configuration in a fresh process; its measurements."""
    name = f"{setup.key}-{round_index}"
    spec = {"side": setup.side, "batching": setup.batching, "lora": setup.lora, "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha, "warmup": args.warmup, "steps": args.steps,
            "batch_size": args.batch_size, "block_size": shared["block"], "threads": args.threads,
            "base": shared["base"], "hf": shared["hf"], "data": shared["data"], "batches": shared["batches"],
            "train": shared["train"], "device": args.device, "precision": args.precision, "run_dir": str(tmp / "runs" / name), "result": str(tmp / f"{name}.json")}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], capture_output=True, text=True,
                          check=False, env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SystemExit(f"{setup.key} (round {round_index + 1}) failed:\n{tail}")
    shutil.rmtree(spec["run_dir"], ignore_errors=True)  # checkpoints of a throwaway run
    return json.loads(Path(spec["result"]).read_text())


# --------------------------------------------------------------------------------- the report
def _fmt(spread: Spread, fmt: str = ",.0f") -> str:
    return spread.text(fmt) if spread.rounds else "—"


def report(args: argparse.Namespace, shared: dict, setups: list[Setup], results: dict[str, list[dict]],
           load: tuple[float, float]) -> None:
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    model = shared["model"]
    cfg = model.cfg

    def col(key: str, field: str) -> list[float]:
        return [r[field] for r in results.get(key, []) if r.get(field) is not None]

    print(f"\n## Fine-tuning (SFT): haina vs transformers {transformers.__version__} Trainer + peft {peft_version}\n")
    print(f"{datetime.date.today()} · {cpu_model()} ({os.cpu_count()} cores, {args.threads} torch threads) · torch "
          f"{torch.__version__} · Python {platform.python_version()} · {shared['base_label']} "
          f"({model.num_params() / 1e6:.2f}M params, {cfg.n_layer} layers, d={cfg.n_embd}, vocab {cfg.vocab_size}) · "
          f"{args.device} {args.precision} · {shared['source']}: {shared['examples']:,} examples ({shared['rejects']} rejected), "
          f"{shared['mean_len']:.0f} tokens on average, {shared['supervised_share']:.0%} of them supervised · batch "
          f"{args.batch_size} × block {shared['block']} · {args.warmup} warm-up + {args.steps} timed steps · "
          f"{args.rounds} interleaved rounds · load average {load[0]:.1f} before, {load[1]:.1f} after\n")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/finetune.py', *sys.argv[1:]])}`\n")

    same = all(r["step_tokens"] == shared["expected_tokens"] for s in setups if s.side == "haina"
               and s.batching == "pad" for r in results[s.key])
    print("| configuration | tokens/s | supervised tokens/s | ms/step | computed positions that are real tokens "
          "| peak RSS, MiB | added by training, MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in setups:
        rs = results[s.key]
        fill = statistics.mean(r["tokens"] / r["positions"] for r in rs)
        print(f"| {s.label.format(r=args.lora_r)} | {_fmt(Spread.of(col(s.key, 'tokens_per_sec')))} | "
              f"{_fmt(Spread.of(col(s.key, 'supervised_per_sec')))} | {statistics.median(col(s.key, 'ms_per_step')):,.0f}"
              f" | {fill:.0%} | {_fmt(Spread.of(col(s.key, 'peak_mib')))} | "
              f"{_fmt(Spread.of(col(s.key, 'added_mib')))} |")
    try:
        import trl
        print(f"| TRL {trl.__version__} SFTTrainer | installed, not measured by this script yet | | | | | |")
    except ImportError:
        print("| TRL SFTTrainer | not installed | | | | | |")
    threads = {r["threads"] for rs in results.values() for r in rs}
    print(f"\nMedians over rounds (min–max, rounds). Torch threads seen in the workers: "
          f"{', '.join(map(str, sorted(threads)))}. haina's padded runs trained on exactly the peer's batches: "
          f"{'yes' if same else 'NO'} (per-step token counts compared); loss on the first batch before training: haina "
          f"{shared['losses'][0]:.4f}, transformers {shared['losses'][1]:.4f}.\n")

    pairs = [("full", "haina-full-pad", "hf-full"), (f"LoRA r={args.lora_r}", "haina-lora-pad", "hf-lora")]
    rows = []
    for what, h, p in pairs:
        if h not in results or p not in results:
            continue
        for measure, field, better in (("tokens/s", "tokens_per_sec", "haina / transformers"),
                                       ("supervised tokens/s", "supervised_per_sec", "haina / transformers"),
                                       ("peak RSS, MiB", "peak_mib", "haina / transformers (< 1: less)"),
                                       ("added by training, MiB", "added_mib", "haina / transformers (< 1: less)")):
            a, b = col(h, field), col(p, field)
            if len(a) == len(b) and a:
                rows.append((f"{what}: {measure}", statistics.median(a), statistics.median(b), ratios(a, b), better))
    if rows:
        print("| measure | haina (median) | transformers (median) | ratio | median of per-round ratios (min–max, "
              "rounds) |")
        print("|---|---:|---:|---|---:|")
        for name, a, b, r, better in rows:
            print(f"| {name} | {a:,.0f} | {b:,.0f} | {better} | {r.text(unit='×')} |")
        print()
    for what, h, p in pairs:
        if h in results and p in results:
            speed = ratios(col(h, "tokens_per_sec"), col(p, "tokens_per_sec"))
            memory = ratios(col(h, "peak_mib"), col(p, "peak_mib"))
            met = speed.median >= args.target and memory.median <= 1.0
            print(f"Target ({what}: haina ≥ {args.target:g}× transformers' tokens/s at equal or lower peak memory, "
                  f"CPU): {'**met**' if met else '**not met**'}: {speed.median:.2f}× the tokens/s "
                  f"({speed.low:.2f}–{speed.high:.2f}), {memory.median:.2f}× the peak RSS "
                  f"({memory.low:.2f}–{memory.high:.2f}), {speed.rounds} round{'s' if speed.rounds != 1 else ''}.")
    if "haina-full-pad" in results and "haina-lora-pad" in results:
        peak = ratios(col("haina-lora-pad", "peak_mib"), col("haina-full-pad", "peak_mib"))
        added = ratios(col("haina-lora-pad", "added_mib"), col("haina-full-pad", "added_mib"))
        print(f"haina LoRA / full: peak RSS {peak.text(unit='×')}; added by training {added.text(unit='×')}.")
    if "haina-full-pad" in results and "haina-full-pack" in results:
        tps = ratios(col("haina-full-pack", "tokens_per_sec"), col("haina-full-pad", "tokens_per_sec"))
        sup = ratios(col("haina-full-pack", "supervised_per_sec"), col("haina-full-pad", "supervised_per_sec"))
        faster = "pack" if sup.median > 1 else "pad"
        print(f"haina packing / padding: tokens/s {tps.text(unit='×')}, supervised tokens/s {sup.text(unit='×')}: "
              f"**{faster}** is faster here (recipes/finetune/sft.yaml's data.batching should be the faster).")


# --------------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="a haina checkpoint/run or HF directory with a tokenizer "
                                                "(default: the quickstart's shape, random weights)")
    p.add_argument("--data", nargs="+", default=None, help="SFT JSONL files (default: the stdlib Q&A pairs)")
    p.add_argument("--max-records", type=int, default=0, help="use at most this many records (0: all)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over them")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (at least 1)")
    p.add_argument("--batch-size", type=int, default=8, help="examples (padded) or windows (packed) per step")
    p.add_argument("--block-size", type=int, default=0, help="longest window in tokens (0: the model's context)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every worker")
    p.add_argument("--device", default="cpu", help="cpu or cuda, for both sides")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="both sides (bf16: autocast)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--configs", nargs="+", default=[s.key for s in CONFIGS], choices=[s.key for s in CONFIGS],
                   help="which configurations to run (default: all)")
    p.add_argument("--target", type=float, default=1.2, help="tokens/s ratio over transformers the target checks")
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    setups = [s for s in CONFIGS if s.key in args.configs]
    with tempfile.TemporaryDirectory(prefix="haina-bench-finetune-") as tmp_name:
        tmp = Path(tmp_name)
        shared = prepare(args, tmp)
        load_before = load_average()
        results: dict[str, list[dict]] = {s.key: [] for s in setups}
        for r in range(args.rounds):
            for s in round_order(setups, r):
                res = run_one(s, args, shared, tmp, r)
                results[s.key].append(res)
                print(f"round {r + 1}/{args.rounds}: {s.key}: {res['tokens_per_sec']:,.0f} tokens/s, "
                      f"peak {res['peak_mib']:,.0f} MiB"
                      + (f", CUDA peak {res['cuda_peak_mib']:,.0f} MiB" if res.get("cuda_peak_mib") else ""),
                      file=sys.stderr, flush=True)
        report(args, shared, setups, results, (load_before, load_average()))


if __name__ == "__main__":
    main()
