"""Generation speed: haina's Engine against `transformers`' `generate`, on the same weights, in one run.

The model (a preset with random weights, or --checkpoint) is exported to Hugging Face format with
`haina export hf` machinery and loaded back with `AutoModelForCausalLM`, so both sides compute with
identical weights (the script checks that both produce the same greedy tokens). Both decode
greedily with end-of-sequence disabled, so they generate exactly the same number of tokens;
`transformers` uses its default dynamic KV cache.

Measured in --repeats interleaved rounds after one warm-up run each: in every round each side runs
once, the order reversed in every other round. Each figure is the median over the rounds; each
ratio is taken within a round and reported as its median with its range over the rounds:
- single stream: time to first token (prefill of --prompt-len tokens + the first token) and
  decode tokens/s (tokens 2..N over the time after the first token);
- batched throughput at each --batch-sizes: generated tokens/s for B prompts decoded together;
- KV-cache bytes per token: predicted (2 · layers · kv_heads · head_dim · element size) against
  the engine's allocation, and against what transformers' cache holds;
- on CUDA, decode tokens/s over the memory-bandwidth bound (weights + KV bytes read per token
  over a measured device-to-device copy bandwidth).

    .venv/bin/python benchmarks/generate.py                       # small preset, CPU, 128 + 128 tokens
    .venv/bin/python benchmarks/generate.py --device cuda --dtype bfloat16 --preset gpt2-124m
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from rounds import Spread, cpu_model, load_average, ratios, round_order

from haina.core.device import resolve_device
from haina.export.hf import export_hf
from haina.generate import Engine, KVCache, SamplingParams
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach the hub
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Timestamps of each token's arrival (both sides report them as they are produced)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []
        self.t0 = 0.0

    def start(self) -> None:
        _sync(self.device)
        self.times, self.t0 = [], time.perf_counter()

    def tick(self) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self.t0)


class _HFStreamer:
    """A transformers streamer: `put` is called with the prompt first, then with every new token."""

    def __init__(self, clock: _Clock):
        self.clock, self.seen_prompt = clock, False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.clock.tick()

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------------- the two sides
def haina_stream(model: Transformer, prompt: list[int], new: int, clock: _Clock) -> list[int]:
    engine = Engine(model, max_batch_size=1, max_seq_len=len(prompt) + new, eos_token_id=None)
    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    out: list[int] = []
    clock.start()
    for ev in engine.stream(prompt, params):
        clock.tick()
        out += ev.new_token_ids
    return out


def hf_stream(hf, prompt: list[int], new: int, clock: _Clock) -> list[int]:
    x = torch.tensor([prompt], device=hf.device)
    clock.start()
    with torch.inference_mode():
        y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                        min_new_tokens=new, streamer=_HFStreamer(clock))
    return y[0, len(prompt):].tolist()


def haina_batch(model: Transformer, prompts: list[list[int]], new: int) -> list[list[int]]:
    engine = Engine(model, max_batch_size=len(prompts), max_seq_len=len(prompts[0]) + new, eos_token_id=None)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
    return [r[0].token_ids for r in results]


def hf_batch(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    x = torch.tensor(prompts, device=hf.device)  # equal lengths: no padding needed
    with torch.inference_mode():
        y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                        min_new_tokens=new)
    return y[:, x.shape[1]:].tolist()


# --------------------------------------------------------------------------------- measurement
def interleaved(repeats: int, runs: list[Callable[[], object]]) -> list[list[object]]:
    """Each run once as warm-up, then `repeats` rounds of each run in turn; results[side][round].

    Alternating the two sides spreads a noisy neighbour's bursts (a shared machine) over both,
    rather than over whichever side happened to run during them; reversing the order in every
    other round keeps either side from always running first (or always right after the other).
    """
    for run in runs:
        run()  # warm-up: allocator, kernel selection, lazy initialization
    results: list[list[object]] = [[] for _ in runs]
    for r in range(repeats):
        for i in round_order(range(len(runs)), r):
            results[i].append(runs[i]())
    return results


def single_stream(sides: list[tuple[str, Callable, object]], prompt: list[int], new: int, repeats: int,
                  device) -> list[dict]:
    """Time to first token (ms) and decode tokens/s of each (name, stream function, model), one per round."""
    clock = _Clock(device)

    def runner(name: str, fn, model) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            tokens = fn(model, prompt, new, clock)
            assert len(tokens) == new, f"{name} generated {len(tokens)} tokens, expected {new}"
            assert len(clock.times) >= new, f"{name} reported {len(clock.times)} token times"
            return clock.times[0], (new - 1) / (clock.times[new - 1] - clock.times[0])
        return run

    results = interleaved(repeats, [runner(*side) for side in sides])
    return [{"ttft_ms": [1000 * r[0] for r in res], "decode_tps": [r[1] for r in res]} for res in results]


def batched(sides: list[tuple[Callable, object]], prompts: list[list[int]], new: int, repeats: int,
            device) -> list[list[float]]:
    """Generated tokens/s of each (batch function, model) for `prompts` decoded together, one per round."""
    def runner(fn, model) -> Callable[[], float]:
        def run() -> float:
            _sync(device)
            t0 = time.perf_counter()
            out = fn(model, prompts, new)
            _sync(device)
            assert sum(len(o) for o in out) == len(prompts) * new
            return len(prompts) * new / (time.perf_counter() - t0)
        return run

    return interleaved(repeats, [runner(*side) for side in sides])


def hf_kv_bytes_per_token(hf, prompt: list[int]) -> int | None:
    """Bytes of transformers' cache per token of one sequence (None if its layout is unknown)."""
    x = torch.tensor([prompt], device=hf.device)
    with torch.inference_mode():
        out = hf(input_ids=x, use_cache=True)
    cache = out.past_key_values
    tensors = []
    for layer in getattr(cache, "layers", []):
        tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    if not tensors:
        return None
    return sum(t.numel() * t.element_size() for t in tensors) // len(prompt)


def bandwidth(device: torch.device) -> float:
    """Device memory bandwidth (bytes/s) from a large device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * src.element_size() * reps / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------- main
def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: Path):
    from transformers import AutoModelForCausalLM

    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name(args.preset))
    export_hf(model.eval(), None, out, dtype="float32")
    model = model.to(device=device, dtype=dtype).eval()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like the engine
    hf.generation_config.pad_token_id = 0
    return model, hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="a haina checkpoint or run directory instead of a preset")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", "--rounds", type=int, default=3,
                   help="interleaved rounds; figures are medians over them, ratios per round with their range")
    p.add_argument("--target", type=float, default=1.5,
                   help="single-stream decode speedup over transformers that the target line checks (CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        model, hf = build(args, device, dtype, Path(tmp) / "hf")
    cfg = model.cfg
    if args.prompt_len + args.new_tokens > cfg.block_size:
        raise SystemExit(f"--prompt-len + --new-tokens must fit the context of {cfg.block_size}")
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (max(args.batch_sizes), args.prompt_len), generator=gen).tolist()
    new = args.new_tokens

    same = haina_batch(model, prompts[:2], 16) == hf_batch(hf, prompts[:2], 16)
    load_before = load_average()
    rows: list[tuple[str, float, float, Spread]] = []  # (measure, haina median, transformers median, ratio)
    s_h, s_t = single_stream([("haina", haina_stream, model), ("transformers", hf_stream, hf)], prompts[0], new,
                             args.repeats, device)
    decode = ratios(s_h["decode_tps"], s_t["decode_tps"])
    rows.append(("single stream: decode tokens/s", statistics.median(s_h["decode_tps"]),
                 statistics.median(s_t["decode_tps"]), decode))
    rows.append((f"single stream: time to first token, ms ({args.prompt_len}-token prompt)",
                 statistics.median(s_h["ttft_ms"]), statistics.median(s_t["ttft_ms"]),
                 ratios(s_t["ttft_ms"], s_h["ttft_ms"])))
    for b in args.batch_sizes:
        th, tt = batched([(haina_batch, model), (hf_batch, hf)], prompts[:b], new, args.repeats, device)
        rows.append((f"batch {b}: generated tokens/s", statistics.median(th), statistics.median(tt), ratios(th, tt)))
    load_after = load_average()

    per_token = KVCache.bytes_per_token(cfg, dtype)
    # The fixed cache's reservation (the paged one, the CPU default, holds only what is in use: benchmarks/kv_cache.py).
    engine = Engine(model, max_batch_size=4, max_seq_len=args.prompt_len + new, eos_token_id=None, kv_cache="fixed")
    engine_per_token = engine.cache.bytes / (4 * (args.prompt_len + new))
    hf_per_token = hf_kv_bytes_per_token(hf, prompts[0])

    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"\n## Generation: haina Engine vs transformers {transformers.__version__} generate\n")
    print(f"{datetime.date.today()} · {where} ({os.cpu_count()} cores, {threads} torch threads) · torch "
          f"{torch.__version__} · Python {platform.python_version()} · {args.checkpoint or args.preset} "
          f"({model.num_params() / 1e6:.1f}M params, {cfg.n_layer} layers, d={cfg.n_embd}) · {args.dtype} · prompt "
          f"{args.prompt_len} + {new} new tokens, greedy · {args.repeats} interleaved rounds, medians · load average "
          f"{load_before:.1f} before, {load_after:.1f} after · same greedy tokens on both sides: "
          f"{'yes' if same else 'NO'}\n")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/generate.py', *sys.argv[1:]])}`\n")
    print("| measure | haina (median) | transformers (median) | haina speedup: median of per-round ratios (min–max, "
          "rounds) |")
    print("|---|---:|---:|---:|")
    for name, a, b, ratio in rows:
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {ratio.text(unit='×')} |")
    print("\nspeedup > 1: haina is faster (for time to first token: transformers' time / haina's).\n")
    if device.type == "cpu":
        above = sum(h / t >= args.target for h, t in zip(s_h["decode_tps"], s_t["decode_tps"], strict=True))
        print(f"Target (single-stream decode ≥ {args.target:g}× transformers on CPU): "
              f"{'**met**' if decode.median >= args.target else '**not met**'} by the median, {decode.median:.2f}× "
              f"over {decode.rounds} rounds (range {decode.low:.2f}–{decode.high:.2f}×; {above} of {decode.rounds} "
              f"rounds at or above {args.target:g}×).\n")
    print(f"KV cache per token: predicted 2·{cfg.n_layer}·{cfg.kv_heads}·{cfg.head_dim}·"
          f"{torch.empty((), dtype=dtype).element_size()} = {per_token:,} B; engine allocates "
          f"{engine_per_token:,.0f} B per slot-token ({engine.cache.bytes / 2**20:.1f} MiB for 4 × "
          f"{args.prompt_len + new} tokens)" + ("" if hf_per_token is None else
                                                f"; transformers' cache holds {hf_per_token:,} B per token"))
    if device.type == "cuda":
        bw = bandwidth(device)
        weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
        kv_read = per_token * (args.prompt_len + new / 2)  # average context during decode
        bound = bw / (weight_bytes + kv_read)
        print(f"memory bandwidth (device copy): {bw / 1e9:,.0f} GB/s; bytes per decode token: weights "
              f"{weight_bytes / 2**20:.1f} MiB + KV {kv_read / 2**20:.2f} MiB → bound {bound:,.0f} tokens/s; "
              f"haina decode reaches {statistics.median(s_h['decode_tps']) / bound:.1%} of it, transformers "
              f"{statistics.median(s_t['decode_tps']) / bound:.1%}")


if __name__ == "__main__":
    main()
