"""ONNX Runtime against haina's engine: single-stream decode tokens/s on CPU, on the same weights, in one run.

The model (the quickstart recipe's architecture with random weights, or --checkpoint) is exported with
`haina export onnx` machinery; a third side is that graph after ONNX Runtime's int8 dynamic quantization
(`onnxruntime.quantization.quantize_dynamic`: int8 weights, activations quantized per call). All sides decode greedily
with end-of-sequence disabled, one sequence at a time, so they generate exactly the same number of tokens; the script
checks that the float32 graph picks haina's tokens and reports how long the int8 graph agrees with them.

Measured in --rounds interleaved rounds after one warm-up run each (`rounds.py`): in every round each side runs once,
the order reversed in every other round. Figures are medians over the rounds; the ratio against haina is taken
within each round and reported as its median with its range. Both runtimes get the same number of threads.

    .venv/bin/python benchmarks/export_onnx.py                               # quickstart model, 128 + 128 tokens
    .venv/bin/python benchmarks/export_onnx.py --checkpoint runs/quickstart --rounds 7
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rounds import Spread, cpu_model, load_average, ratios, round_order

from haina.export.onnx import MODEL_FILE, export_onnx
from haina.generate import Engine, SamplingParams
from haina.generate.onnx_backend import OnnxDecoder, OnnxEngine
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model
from haina.train.pretrain import find_recipe


def build_model(checkpoint: str | None) -> tuple[Transformer, str]:
    """The model to compare and its name: a checkpoint, or the quickstart architecture with random weights."""
    if checkpoint:
        return load_model(checkpoint)[0], checkpoint
    torch.manual_seed(0)
    cfg = ModelConfig.from_file(find_recipe("quickstart"))
    return Transformer(cfg).eval(), "quickstart recipe's model, random weights"


def quantize_int8(src: Path, dst: Path) -> None:
    """A copy of the export in `src` whose graph ONNX Runtime has quantized to int8 weights (dynamic activations)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(src, dst)
    (dst / MODEL_FILE).unlink()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process concerns convolution graphs
    try:
        quantize_dynamic(src / MODEL_FILE, dst / MODEL_FILE, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def run_stream(engine: Engine | OnnxEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], list[float]]:
    """The tokens of one streamed request and each one's arrival time (seconds from the call)."""
    t0 = time.perf_counter()
    tokens, times = [], []
    for ev in engine.stream(prompt, params):
        times.append(time.perf_counter() - t0)
        tokens += ev.new_token_ids
    assert len(tokens) == params.max_new_tokens, f"generated {len(tokens)} tokens, expected {params.max_new_tokens}"
    return tokens, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a haina checkpoint or run directory (default: quickstart "
                   "architecture, random weights)")
    p.add_argument("--threads", type=int, default=0, help="threads for both runtimes (0: torch's default)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", "--repeats", type=int, default=5,
                   help="interleaved rounds; figures are medians over them, ratios per round with their range")
    p.add_argument("--no-int8", action="store_true", help="leave out the int8-quantized graph")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    warnings.filterwarnings("ignore")

    model, name = build_model(args.checkpoint)
    model = model.float().eval()
    cfg, new = model.cfg, args.new_tokens
    if args.prompt_len + new > cfg.block_size:
        raise SystemExit(f"--prompt-len + --new-tokens must fit the context of {cfg.block_size}")
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        export_onnx(model, None, root / "fp32")
        export_s = time.perf_counter() - t0
        dirs = {"onnxruntime float32": root / "fp32"}
        if not args.no_int8:
            quantize_int8(root / "fp32", root / "int8")
            dirs["onnxruntime int8 dynamic"] = root / "int8"
        sizes = {k: sum(f.stat().st_size for f in d.glob(MODEL_FILE + "*")) for k, d in dirs.items()}
        engines = {k: OnnxEngine(OnnxDecoder(d, device="cpu", threads=threads)) for k, d in dirs.items()}

        haina = Engine(model, max_batch_size=1, max_seq_len=args.prompt_len + new, eos_token_id=None)
        sides = {k: functools.partial(run_stream, eng, prompt, params) for k, eng in
                 {"haina engine": haina, **engines}.items()}
        names = list(sides)
        tokens = {k: sides[k]()[0] for k in names}  # warm-up, and the tokens each side picks
        load_before = load_average()
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in names}  # (ttft ms, decode tok/s)
        for r in range(args.rounds):
            for k in round_order(names, r):
                _, times = sides[k]()
                results[k].append((1000 * times[0], (new - 1) / (times[-1] - times[0])))
        load_after = load_average()

    ref = tokens["haina engine"]
    agree = {k: next((i for i, (a, b) in enumerate(zip(t, ref)) if a != b), len(ref)) for k, t in tokens.items()}
    haina_bytes = sum(t.numel() * t.element_size() for t in model.weights().values())
    print("\n## ONNX Runtime vs haina's engine: single-stream decode on CPU\n")
    import onnxruntime

    print(f"{datetime.date.today()} · {cpu_model()} ({os.cpu_count()} cores, {threads} threads each) · torch "
          f"{torch.__version__} · onnxruntime {onnxruntime.__version__} · Python {platform.python_version()} · {name} "
          f"({model.num_params() / 1e6:.1f}M params, {cfg.n_layer} layers, d={cfg.n_embd}) · prompt {args.prompt_len} "
          f"+ {new} new tokens, greedy, batch 1 · {args.rounds} interleaved rounds, medians · export took "
          f"{export_s:.0f} s · load average {load_before:.1f} before, {load_after:.1f} after\n")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/export_onnx.py', *sys.argv[1:]])}`\n")
    print("| side | weights on disk, MB | time to first token, ms | decode tokens/s | greedy tokens equal to haina's "
          "| decode speed over haina: median of per-round ratios (min–max, rounds) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = [tps for _, tps in results["haina engine"]]
    for k in names:
        ttft = statistics.median(t for t, _ in results[k])
        tps = [x for _, x in results[k]]
        size = haina_bytes if k == "haina engine" else sizes[k]
        ratio = Spread.of([1.0] * len(tps)) if k == "haina engine" else ratios(tps, base)
        same = f"{agree[k]} of {new}" + (" (first differs)" if agree[k] < new else "")
        print(f"| {k} | {size / 1e6:,.1f} | {ttft:,.1f} | {statistics.median(tps):,.1f} | {same} | "
              f"{ratio.text(unit='×')} |")
    print("\nratio > 1: that side decodes faster than haina's engine. The int8 graph's tokens may part from haina's "
          "once its rounding flips a near tie; it still generates the same number of tokens, so the speeds compare.")


if __name__ == "__main__":
    main()
