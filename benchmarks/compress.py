"""Compression: what each method saves (disk, memory, decode speed) and what it costs (perplexity).

One table per section (`--sections`); each row is a compressed checkpoint made with the real command,
measured against the float checkpoint it came from:

- **quantize**: `haina compress quantize` with each --methods (int8-weight, int8-dynamic, int4-weight at
  --group-size), and, when torchao imports, its `quantize_` applied in memory to the float model as a peer
  (int8 weight-only and int8 dynamic; torchao's int4 needs the `mslk` kernels, and its layers cannot be
  saved as plain safetensors, so it has no size on disk).

More sections (pruning) plug into `SECTIONS`: a section makes its checkpoints and hands them to
`measure`, which gives every row the same columns.

Models (`--models`): **quickstart**, the trained checkpoint `haina quickstart` leaves in runs/quickstart
(--checkpoint), and **larger**, a bigger shape (--larger-shape, default 6 layers, d=384, 6 heads, about 12M
parameters) trained from random initialization for --larger-steps steps (`haina pretrain quickstart`) on
the quickstart's own token shards. Both are scored on the quickstart's val split.

Columns:
- size: model.safetensors in MiB, and how many times smaller than the float one.
- memory: the model's tensors after decoding (a quantized layer's integers, scales and the CPU kernel's own
  copy of its weight, which int4 needs: 1 byte per weight in memory for 0.56 on disk); the peak resident set
  (VmHWM) of a process that loads the checkpoint and decodes at both batch sizes; and what loading and
  decoding add to it, the peak above the resident set just before loading. On a model of a few MiB the last
  two are mostly the code torch pages in for each kernel, not the weights.
- decode tokens/s at batch 1 and --batch: greedy, end of sequence ignored, --new-tokens per sequence after
  a prompt of --prompt-len random tokens, timed from the end of the prefill step to the end of the last step
  (the first token comes with the prefill and is not counted). Each row runs in a fresh process
  (`--worker`), once per round, in --rounds interleaved rounds with the order reversed every other round
  (`rounds.py`); a figure is the median with its range, a ratio the median of the per-round ratios against
  the float checkpoint.
- perplexity on the same held-out windows for every row: the val shards' first --eval-tokens tokens in
  windows of the model's context, no overlap (`haina.eval.lm`'s `sliding_windows` and `score_stream`, what
  `haina eval lm` runs), and its change against the float checkpoint.

On a machine whose cores are busy with other work give --threads 1: torch's threads waiting on each other
for a core otherwise dominate the decode figures (seen on a shared 2-core machine: 10x slower at 2 threads).

    .venv/bin/python benchmarks/compress.py                                 # quickstart + larger, 3 rounds
    .venv/bin/python benchmarks/compress.py --models quickstart --threads 1
    .venv/bin/python benchmarks/compress.py --rounds 1 --new-tokens 16 --eval-tokens 2048 --batch 4 --threads 1 \\
        --larger-steps 4 --larger-shape n_layer=2,n_embd=128,n_head=2       # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rounds import Spread, cpu_model, load_average, ratios, round_order, status_kib

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"int8-weight": (1.0, 1.3), "int4-weight": (5.0, None)}  # method: (max ppl increase %, min b1 speed-up)


@dataclass(frozen=True)
class Subject:
    """A float model to compress: its checkpoint and the token shards whose val split scores it."""

    name: str
    checkpoint: Path
    data: Path
    note: str


@dataclass(frozen=True)
class Row:
    """One measured checkpoint: a compressed one, the float one (`reference`), or a peer made in memory."""

    label: str
    checkpoint: Path
    reference: bool = False
    torchao: str | None = None  # a torchao config to apply to `checkpoint` in memory (a peer, not a file)
    size: bool = True  # whether its size on disk means anything


# --------------------------------------------------------------------------------- in a worker
def apply_torchao(model, config: str) -> None:
    """torchao's `quantize_` on the block Linears (the layers `haina compress quantize` quantizes)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    made = {"int8-weight": Int8WeightOnlyConfig, "int8-dynamic": Int8DynamicActivationInt8WeightConfig}[config]()
    quantize_(model, made, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("blocks."))


def tensor_mib(model) -> float | None:
    """MiB of the model's tensors, with the quantized layers' kernel copies; None for torchao's tensor subclasses."""
    from haina.model.quant import QuantLinear

    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    inside = {id(t) for m in quantized for t in m.buffers()}  # counted by the layer's own nbytes()
    total = sum(m.nbytes() for m in quantized)
    for t in [*model.parameters(), *model.buffers()]:  # a tied head is one parameter
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return None  # a torchao tensor subclass: numel × element size is not what it holds
        if id(t) not in inside:
            total += t.numel() * t.element_size()
    return total / 2**20


def decode_rate(model, batch: int, prompt_len: int, new: int) -> float:
    """Greedy decode tokens/s of `batch` sequences decoded together, the prefill step not timed."""
    from haina.generate import Engine, SamplingParams

    engine = Engine(model, max_batch_size=batch, max_seq_len=prompt_len + new, eos_token_id=None)
    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        engine.add_request(f"r{i}", torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=gen).tolist(),
                           params)
    engine.step()  # prefill, and each sequence's first token
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return batch * (new - 1) / (time.perf_counter() - t0)


def worker(spec_path: str) -> None:
    from haina.model.checkpoint import load_model

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    rss_before = status_kib("VmRSS")
    model, _ = load_model(spec["checkpoint"])
    if spec["torchao"]:
        apply_torchao(model, spec["torchao"])
    out = {}
    for batch in (1, spec["batch"]):
        decode_rate(model, batch, spec["prompt_len"], min(4, spec["new_tokens"]))  # warm-up: kernels, layouts
        out[f"b{batch}"] = decode_rate(model, batch, spec["prompt_len"], spec["new_tokens"])
    peak = status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out |= {"peak_mib": peak / 1024, "added_mib": None if rss_before is None else (peak - rss_before) / 1024,
            "tensor_mib": tensor_mib(model), "threads": torch.get_num_threads()}
    Path(spec["result"]).write_text(json.dumps(out))


# --------------------------------------------------------------------------------- measuring rows
def run_worker(row: Row, args: argparse.Namespace, tmp: Path, key: str) -> dict:
    spec = {"checkpoint": str(row.checkpoint), "torchao": row.torchao, "threads": args.threads, "batch": args.batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "result": str(tmp / f"{key}.json")}
    spec_path = tmp / f"{key}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], capture_output=True, text=True,
                          check=False, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SystemExit(f"{row.label} failed:\n{tail}")
    return json.loads(Path(spec["result"]).read_text())


def perplexity(row: Row, subject: Subject, args: argparse.Namespace) -> float:
    """Perplexity on the subject's held-out windows (the same windows for every row)."""
    from haina.eval.lm import load_stream, resolve_source, score_stream, sliding_windows, token_byte_lengths
    from haina.model.checkpoint import load_model

    model, tokenizer = load_model(row.checkpoint)
    if row.torchao:
        apply_torchao(model, row.torchao)
    stream, _ = load_stream(resolve_source([str(subject.data)], "val"), tokenizer, model.cfg.vocab_size,
                            args.eval_tokens)
    ctx = model.cfg.block_size
    windows = sliding_windows(len(stream), ctx, ctx)
    scores = score_stream(model, stream, windows, batch_size=8, byte_lengths=token_byte_lengths(
        tokenizer, model.cfg.vocab_size), device=torch.device("cpu"))
    return scores.metrics()["ppl"]


def measure(rows: list[Row], subject: Subject, args: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    """Every row's size, perplexity and (over interleaved rounds) decode speed and memory."""
    out: dict[str, dict] = {}
    for row in rows:
        size = (row.checkpoint / "model.safetensors").stat().st_size if row.size else None
        out[row.label] = {"size": size, "ppl": perplexity(row, subject, args), "runs": []}
    for r in range(args.rounds):
        for i, row in round_order(list(enumerate(rows)), r):
            out[row.label]["runs"].append(run_worker(row, args, tmp, f"{subject.name}-{i}-{r}"))
    return out


def print_table(title: str, rows: list[Row], results: dict[str, dict], args: argparse.Namespace) -> None:
    ref = next(r for r in rows if r.reference)
    base = results[ref.label]

    def col(label: str, field: str) -> list[float]:
        return [run[field] for run in results[label]["runs"] if run.get(field) is not None]

    print(f"\n### {title}\n")
    print(f"| checkpoint | model.safetensors, MiB | tensors in memory, MiB | peak RSS, MiB | added by the model, MiB "
          f"| decode tok/s, batch 1 | × float | decode tok/s, batch {args.batch} | × float | perplexity | Δ perplexity |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        res = results[row.label]
        size = "—" if res["size"] is None else f"{res['size'] / 2**20:.2f}" + (
            "" if row.reference else f" ({base['size'] / res['size']:.2f}× smaller)")
        b1, bn = col(row.label, "b1"), col(row.label, f"b{args.batch}")
        speed1 = "" if row.reference else ratios(b1, col(ref.label, "b1")).text(unit="×")
        speedn = "" if row.reference else ratios(bn, col(ref.label, f"b{args.batch}")).text(unit="×")
        delta = "" if row.reference else f"{100 * (res['ppl'] / base['ppl'] - 1):+.2f} %"
        tensors = col(row.label, "tensor_mib")
        print(f"| {row.label} | {size} | {f'{tensors[0]:.2f}' if tensors else '—'} | "
              f"{Spread.of(col(row.label, 'peak_mib')).text('.0f')} | "
              f"{Spread.of(col(row.label, 'added_mib')).text('.0f')} | {Spread.of(b1).text(',.0f')} | {speed1} | "
              f"{Spread.of(bn).text(',.0f')} | {speedn} | {res['ppl']:.3f} | {delta} |")


# --------------------------------------------------------------------------------- sections
def quantize_section(subject: Subject, args: argparse.Namespace, tmp: Path) -> None:
    from haina.compress.quantize import quantize_command

    rows = [Row("float (fp32)", subject.checkpoint, reference=True)]
    for method in args.methods:
        out = tmp / subject.name / f"quantized-{method}"
        quantize_command(str(subject.checkpoint), str(out), method, group_size=args.group_size, overwrite=True)
        label = f"haina {method}" + (f", group {args.group_size}" if method == "int4-weight" else "")
        rows.append(Row(label, out))
    if args.torchao and _torchao_imports():
        rows += [Row(f"torchao {m} (in memory)", subject.checkpoint, torchao=m, size=False)
                 for m in ("int8-weight", "int8-dynamic")]
    results = measure(rows, subject, args, tmp)
    print_table(f"quantize: {subject.name} ({subject.note})", rows, results, args)
    base = results[rows[0].label]
    for row in rows[1:]:
        method = next((m for m in TARGETS if row.label.startswith(f"haina {m}")), None)
        if method is None:
            continue
        max_ppl, min_speed = TARGETS[method]
        ppl = 100 * (results[row.label]["ppl"] / base["ppl"] - 1)
        speed = ratios([r["b1"] for r in results[row.label]["runs"]], [r["b1"] for r in base["runs"]])
        met = ppl <= max_ppl and (min_speed is None or speed.median >= min_speed)
        want = f"≤ +{max_ppl:g} % perplexity" + (f" and ≥ {min_speed:g}× decode tok/s at batch 1" if min_speed else "")
        print(f"\nTarget ({row.label}: {want}): {'**met**' if met else '**not met**'}: {ppl:+.2f} % perplexity, "
              f"{speed.median:.2f}× decode tok/s at batch 1 ({speed.low:.2f}–{speed.high:.2f}).")


def _torchao_imports() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


SECTIONS: dict[str, Callable[[Subject, argparse.Namespace, Path], None]] = {"quantize": quantize_section}


# ================================================================================= prune section
# Owned by the pruning work (`haina compress prune`); the rest of this file is the quantization section's.
# `--sections prune` runs it; its options are added by `prune_arguments`.
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES),
                   help="prune section: sparsities of magnitude and Wanda pruning")
    p.add_argument("--prune-ratio", type=float, default=0.25, help="prune section: --ratio of heads and ffn pruning")
    p.add_argument("--recover-steps", type=int, default=100,
                   help="prune section: steps of `finetune continue --config prune-recover` (0: no recovery rows)")
    p.add_argument("--calibration-tokens", type=int, default=16384, help="prune section: calibration tokens")


def _recover(checkpoint: Path, subject: Subject, args: argparse.Namespace, out: Path) -> Path:
    """`haina finetune continue --config prune-recover` on the subject's shards; the checkpoint it leaves."""
    from haina.model.checkpoint import resolve_checkpoint

    cmd = [sys.executable, "-m", "haina.cli", "finetune", "continue", "--config", "prune-recover", "--base",
           str(checkpoint), "--data", str(subject.data), "--out", str(out), f"--train.max_steps={args.recover_steps}",
           f"--train.eval_every={args.recover_steps}", "--train.device=cpu",
           f"--train.warmup_steps={max(1, args.recover_steps // 10)}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"recovering {checkpoint} failed:\n" + "\n".join(proc.stderr.splitlines()[-20:]))
    return resolve_checkpoint(out)


def prune_tables(subject: Subject, args: argparse.Namespace, tmp: Path) -> None:
    """Perplexity against sparsity (magnitude, Wanda), then size and speed of heads/ffn pruning before and after
    a short recovery, each pruned with the subject's shards as calibration (train split; val held out)."""
    from haina.compress.prune import prune_command
    from haina.model.checkpoint import load_model

    ref = Row("float (fp32)", subject.checkpoint, reference=True)
    base_ppl = perplexity(ref, subject, args)
    calib = {"calibration": [str(subject.data)], "calibration_tokens": args.calibration_tokens, "overwrite": True}
    ppl: dict[tuple[str, float], float] = {}
    seconds: dict[str, float] = {"magnitude": 0.0, "wanda": 0.0}
    for sparsity in args.sparsities:
        for method in ("magnitude", "wanda"):
            out = tmp / subject.name / f"{method}-{sparsity:g}"
            t0 = time.perf_counter()
            prune_command(str(subject.checkpoint), str(out), method, sparsity=sparsity, **calib)
            seconds[method] += time.perf_counter() - t0
            ppl[method, sparsity] = perplexity(Row(method, out), subject, args)
    print(f"\n### prune, unstructured: {subject.name} ({subject.note})\n")
    print(f"Perplexity on the first {args.eval_tokens:,} val tokens; float {base_ppl:.3f}. Every block Linear loses "
          "the same share of each output row; the checkpoint stays dense (same size and speed).\n")
    print("| sparsity | magnitude | Δ | Wanda | Δ | Wanda / magnitude |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in args.sparsities:
        m, w = ppl["magnitude", s], ppl["wanda", s]
        print(f"| {s:.0%} | {m:.3f} | {100 * (m / base_ppl - 1):+.1f} % | {w:.3f} | {100 * (w / base_ppl - 1):+.1f} % "
              f"| {w / m:.3f} |")
    if 0.5 in args.sparsities:
        better = ppl["wanda", 0.5] < ppl["magnitude", 0.5]
        print(f"\nWanda {'beats' if better else 'does not beat'} magnitude at 50 % on this model "
              f"({ppl['wanda', 0.5]:.3f} against {ppl['magnitude', 0.5]:.3f}). Pruning took {seconds['magnitude']:.1f} s "
              f"(magnitude) and {seconds['wanda']:.1f} s (Wanda) over {len(args.sparsities)} sparsities.")

    rows = [ref]
    for method in ("heads", "ffn"):
        out = tmp / subject.name / f"{method}-{args.prune_ratio:g}"
        prune_command(str(subject.checkpoint), str(out), method, ratio=args.prune_ratio, **calib)
        rows.append(Row(f"{method} {args.prune_ratio:.0%}", out))
        if args.recover_steps:
            rows.append(Row(f"{method} {args.prune_ratio:.0%} + recovery", _recover(
                out, subject, args, tmp / subject.name / f"{method}-recovered")))
    if args.recover_steps:  # the float model trained the same steps: what recovery owes to the extra training
        rows.append(Row("float + the same steps (control)", _recover(subject.checkpoint, subject, args,
                                                                     tmp / subject.name / "float-continued")))
    results = measure(rows, subject, args, tmp)
    title = (f"prune, structured: {subject.name} (--ratio {args.prune_ratio:g}; recovery: {args.recover_steps} steps "
             "of `finetune continue --config prune-recover` on the subject's shards)")
    print_table(title, rows, results, args)
    print("\n| checkpoint | parameters | n_head / n_kv_head × head_size | intermediate_size |\n|---|---:|---|---:|")
    for row in rows:
        model = load_model(row.checkpoint)[0]
        cfg = model.cfg
        print(f"| {row.label} | {model.num_params():,} | {cfg.n_head} / {cfg.kv_heads} × {cfg.head_dim} | "
              f"{cfg.ffn_dim} |")


SECTIONS["prune"] = prune_tables
# ================================================================================= end of prune section


# --------------------------------------------------------------------------------- models
def quickstart_subject(args: argparse.Namespace) -> Subject:
    from haina.model.checkpoint import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    data = Path(args.data) if args.data else Path(args.checkpoint) / "data"
    if not (data / "meta.json").is_file():
        raise SystemExit(f"no token shards at {data}: run `haina quickstart` first, or pass --data")
    model, _ = load_model(ckpt)
    return Subject("quickstart", ckpt, data, f"{args.checkpoint}, {model.num_params() / 1e6:.2f}M parameters")


def larger_subject(args: argparse.Namespace, quickstart: Subject, tmp: Path) -> Subject:
    """The --larger-shape trained from random initialization for --larger-steps steps on the quickstart's shards."""
    from haina.model.checkpoint import load_model, resolve_checkpoint
    from haina.tokenizer import Tokenizer

    vocab = Tokenizer.load(quickstart.data / "tokenizer").vocab_size
    run = tmp / "larger"
    overrides = [f"--model.{kv}" for kv in args.larger_shape.split(",")]
    cmd = [sys.executable, "-m", "haina.cli", "pretrain", "--config", "quickstart", "--data", str(quickstart.data),
           "--out", str(run), f"--model.vocab_size={vocab}", *overrides, f"--train.max_steps={args.larger_steps}",
           "--train.fit_to_budget=false", "--train.max_minutes=600", f"--train.eval_every={args.larger_steps}",
           f"--train.warmup_steps={max(1, args.larger_steps // 10)}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit("training the larger model failed:\n" + "\n".join(proc.stderr.splitlines()[-20:]))
    model, _ = load_model(run)
    note = (f"{args.larger_shape}, {model.num_params() / 1e6:.2f}M parameters, random init trained "
            f"{args.larger_steps} steps in {time.perf_counter() - t0:.0f} s")
    return Subject("larger", resolve_checkpoint(run), quickstart.data, note)


# --------------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--models", nargs="+", default=["quickstart", "larger"], choices=["quickstart", "larger"])
    p.add_argument("--checkpoint", default="runs/quickstart", help="the quickstart run (or any checkpoint)")
    p.add_argument("--data", default=None, help="token shards to score (default: CHECKPOINT/data, val split)")
    p.add_argument("--larger-shape", default="n_layer=6,n_embd=384,n_head=6", help="model overrides, comma-separated")
    p.add_argument("--larger-steps", type=int, default=50, help="training steps of the larger model")
    p.add_argument("--methods", nargs="+", default=["int8-weight", "int8-dynamic", "int4-weight"],
                   choices=["int8-weight", "int8-dynamic", "int4-weight"])
    p.add_argument("--group-size", type=int, default=64, help="int4-weight's group size")
    p.add_argument("--torchao", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure torchao's quantize_ in memory, when it imports")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over them")
    p.add_argument("--batch", type=int, default=16, help="the second decode batch size (the first is 1)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per sequence")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored for perplexity")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every worker")
    prune_arguments(p)  # the prune section's options
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="haina-bench-compress-") as name:
        tmp = Path(name)
        subjects = [quickstart_subject(args)]
        if "larger" in args.models:
            subjects.append(larger_subject(args, subjects[0], tmp))
        if "quickstart" not in args.models:
            subjects = subjects[1:]
        print(f"\n## Compression\n\n{datetime.date.today()} · {cpu_model()} ({os.cpu_count()} cores, {args.threads} "
              f"torch threads) · torch {torch.__version__} · Python {platform.python_version()} · decode: prompt "
              f"{args.prompt_len} + {args.new_tokens} new tokens, batch 1 and {args.batch}, {args.rounds} interleaved "
              f"rounds · perplexity on the first {args.eval_tokens:,} val tokens · load average {load_before:.1f} "
              "before")
        print(f"\nCommand: `{' '.join(['.venv/bin/python', 'benchmarks/compress.py', *sys.argv[1:]])}`")
        for section in args.sections:
            for subject in subjects:
                SECTIONS[section](subject, args, tmp)
        print(f"\nLoad average after: {load_average():.1f}. Medians over rounds (min–max, rounds); ratios are "
              "medians of per-round ratios against the float checkpoint.")


if __name__ == "__main__":
    main()
