"""`haina eval efficiency`: what a checkpoint costs to keep and to run on this device.

Parameters, size of the weights on disk, peak memory, prefill latency and decode tokens/s at several
batch sizes, measured through the generation engine as serving and `haina generate` use it: greedy,
`ignore_eos`, so that every sequence runs to `--new-tokens` and runs with different outputs do the same
work. The engine is driven step by step (what `Engine.generate` does inside): its first step admits the
whole batch and prefills it, the steps after it decode, so prefill and decode are clocked apart in the
same run. CUDA is synchronized before every clock reading.

Percentiles are over repeats of a whole run. For latencies p99 is the slow tail; decode tokens/s at p99
is the token count over the p99 decode time, the slow tail too (so it is at most the p50), not the 99th
percentile of the rates, which would be the fast one. With a handful of repeats p99 is close to the
slowest run.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` since just before the weights were loaded
(weights, KV caches, activations). On CPU the growth of the process's peak resident set (VmHWM) over
its resident set before loading, with the peak reset first (`/proc/self/clear_refs`) so that an earlier
peak of the same process cannot pass for this one; where it cannot be reset and the peak did not rise,
the number is unknown and reported as such rather than guessed.
"""

from __future__ import annotations

import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from haina.core.errors import HainaError
from haina.eval.load import DType, load_for_eval
from haina.eval.report import Report, eval_output, markdown_table, print_summary, write_report

KIND = "efficiency"
MIB = 2**20


# --------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM); None without /proc (not Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak memory of this process since the last `reset`, in MiB, counted from a baseline taken at creation.

    CUDA: bytes allocated by torch on `device` (the caching allocator's reserve is not counted). Elsewhere:
    the resident set's high-water mark minus the resident set at creation.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.baseline_kib = None if self.cuda else _proc_status_kib("VmRSS")
        self.resettable = False
        self.hwm_at_reset: int | None = None

    @property
    def basis(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated (weights, KV cache, activations)"
        if self.baseline_kib is None:
            return "unavailable: no /proc/self/status on this system"
        how = "reset through /proc/self/clear_refs" if self.resettable else "not resettable: counted only if it rose"
        return f"growth of the peak resident set (VmHWM) over the resident set before loading; peak {how}"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
            self.resettable = True
        except OSError:
            self.resettable = False
        self.hwm_at_reset = _proc_status_kib("VmHWM")

    def peak_mib(self) -> float | None:
        """The peak since `reset`, or None where it cannot be known honestly."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / MIB
        hwm = _proc_status_kib("VmHWM")
        if hwm is None or self.baseline_kib is None or self.hwm_at_reset is None:
            return None
        if not self.resettable and hwm <= self.hwm_at_reset:
            return None  # the high-water mark may be older than this run: this run's peak is below it, unknown
        return max(0, hwm - self.baseline_kib) / 1024


# --------------------------------------------------------------------------------------------- sizes
def weight_files(checkpoint: str, adapter: str | None) -> list[Path]:
    """The weight files a run with `checkpoint` (+ `adapter`) reads: the base's, then the adapters'."""
    from haina.model.checkpoint import ADAPTER, WEIGHTS, resolve_checkpoint
    from haina.model.hf_import import is_hf_dir
    from haina.model.lora import read_adapter_config, resolve_adapter

    ckpt = resolve_checkpoint(checkpoint)
    files: list[Path] = []
    if (ckpt / WEIGHTS).is_file():
        files.append(ckpt / WEIGHTS)
    else:  # a LoRA checkpoint: the base it records, then its adapters
        base = Path(read_adapter_config(ckpt)["base"])
        files += sorted(base.glob("*.safetensors")) if is_hf_dir(base) else [resolve_checkpoint(base) / WEIGHTS]
        files.append(ckpt / ADAPTER)
    if adapter is not None:
        files.append(resolve_adapter(adapter) / ADAPTER)
    return files


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters: each tensor once (`params`, what an optimizer updates), every use of a tied one counted
    (`params_incl_tied`), and the LoRA adapters' share (`params_adapter`)."""
    unique = sum(p.numel() for p in model.parameters())
    every_use = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    adapter = sum(p.numel() for n, p in model.named_parameters() if ".lora." in n)
    return {"params": unique, "params_incl_tied": every_use, "params_adapter": adapter}


# --------------------------------------------------------------------------------------------- timing
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the sorted values."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_run(engine, prompts: list[list[int]], new_tokens: int, tag: str) -> tuple[float, float, int]:
    """One greedy run of `prompts` to `new_tokens` each: (prefill seconds, decode seconds, decoded tokens).

    The first step admits every prompt (the engine has a slot for each) and prefills them in one forward,
    sampling each row's first token; every later step decodes one token per row.
    """
    from haina.generate.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    dev = engine.device
    _sync(dev)
    t0 = time.perf_counter()
    first = engine.step()
    _sync(dev)
    t1 = time.perf_counter()
    decoded = 0
    while engine.has_unfinished():
        decoded += sum(len(ev.new_token_ids) for ev in engine.step())
    _sync(dev)
    t2 = time.perf_counter()
    if len(first) != len(prompts) or decoded != len(prompts) * (new_tokens - 1):
        raise RuntimeError(f"the engine prefilled {len(first)} of {len(prompts)} prompts and decoded {decoded} "
                           f"tokens, not {len(prompts) * (new_tokens - 1)}")
    return t1 - t0, t2 - t1, decoded


def bench_batch(model, batch: int, prompt_tokens: int, new_tokens: int, repeats: int, warmup: int,
                memory: PeakMemory | None = None, progress=None) -> dict[str, Any]:
    """Prefill and decode timings for `batch` prompts of `prompt_tokens` random tokens (seeded), over repeats."""
    from haina.generate.engine import Engine

    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_tokens), generator=gen).tolist()
    if memory is not None:
        memory.reset()
    engine = Engine(model, max_batch_size=batch, max_seq_len=prompt_tokens + new_tokens, eos_token_id=None)
    prefill, decode = [], []
    decoded = 0
    for r in range(warmup + repeats):
        p, d, decoded = timed_run(engine, prompts, new_tokens, tag=f"b{batch}-r{r}")
        if r >= warmup:
            prefill.append(p)
            decode.append(d)
        if progress is not None:
            progress.update(1)
    row: dict[str, Any] = {
        "batch": batch,
        "prefill_ms": [1000 * s for s in prefill],
        "decode_s": decode,
        "decoded_tokens": decoded,
        "prefill_ms_p50": 1000 * percentile(prefill, 50), "prefill_ms_p99": 1000 * percentile(prefill, 99),
    }
    if decoded:
        row["decode_tok_s_p50"] = decoded / percentile(decode, 50)
        row["decode_tok_s_p99"] = decoded / percentile(decode, 99)
        row["ms_per_step_p50"] = 1000 * percentile(decode, 50) / (new_tokens - 1)
    row["peak_memory_mb"] = memory.peak_mib() if memory is not None else None
    del engine  # its KV cache goes before the next batch size allocates its own
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        from haina.core.device import cpu_peak

        peak = cpu_peak()
        return peak.model if peak is not None else (platform.processor() or platform.machine() or "CPU")
    return device.type


def plot_decode(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Bars of decode tokens/s (p50) per batch size, the p99 (slow tail) marked on each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["batch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=120)
    ax.bar(labels, [r["decode_tok_s_p50"] for r in rows], color="#4c72b0", label="p50")
    ax.scatter(labels, [r["decode_tok_s_p99"] for r in rows], color="#c44e52", marker="_", s=400, zorder=3,
               label="p99 (slow tail)")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- command
def _check_options(prompt_tokens: int, new_tokens: int, batch_sizes: list[int], repeats: int, warmup: int) -> None:
    if prompt_tokens < 1:
        raise HainaError(f"--prompt-tokens must be at least 1, got {prompt_tokens}")
    if new_tokens < 2:
        raise HainaError(f"--new-tokens must be at least 2 (one prefilled, the rest decoded), got {new_tokens}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise HainaError(f"--batch-sizes must be positive integers, got {batch_sizes}")
    if repeats < 1:
        raise HainaError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise HainaError(f"--warmup must be 0 or more, got {warmup}")


def eval_efficiency_command(checkpoint: list[str], out: str, adapter: str | None = None,
                            weights: list[float] | None = None, prompt_tokens: int = 128,
                            new_tokens: int = 64, batch_sizes: list[int] | None = None, repeats: int = 5,
                            warmup: int = 1, device: str = "auto", dtype: DType = "float32",
                            overwrite: bool = False) -> None:
    """Parameters, size on disk, peak memory, prefill latency and decode tokens/s on this device.

    Args:
        checkpoint: a checkpoint or run directory (a LoRA run counts its base too); several are measured as one
            ensemble (every member runs at every step, and the sizes add up).
        out: the report directory (report.json, report.md, decode_tok_s.png).
        adapter: LoRA adapters to apply on top of the checkpoint (one checkpoint only).
        weights: an ensemble's weights, one per --checkpoint (they do not change its cost).
        prompt_tokens: tokens in each (random, seeded) prompt.
        new_tokens: tokens generated per sequence (greedy, end-of-text ignored); the first comes with the prefill.
        batch_sizes: sequences decoded together, one measurement each (default 1 and 8).
        repeats: timed runs per batch size; p50 and p99 are over these.
        warmup: untimed runs before them per batch size.
        device: auto, cpu, cuda, cuda:1 or mps.
        dtype: the precision of the weights; float16 needs CUDA.
        overwrite: replace an --out directory that is not an earlier efficiency report.
    """
    from tqdm import tqdm

    from haina.core.output import check_output

    batches = sorted(set(batch_sizes or [1, 8]))
    _check_options(prompt_tokens, new_tokens, batches, repeats, warmup)
    from haina.generate.ensemble import as_checkpoints

    paths = as_checkpoints(checkpoint)
    check_output(out, f"eval {KIND}", inputs=[*paths, adapter], overwrite=overwrite)

    from haina.core.device import resolve_device

    memory = PeakMemory(resolve_device(device))
    memory.reset()
    model, _, dev = load_for_eval(paths, adapter, device, dtype, need_tokenizer=False, weights=weights)
    load_peak = memory.peak_mib()
    context = prompt_tokens + new_tokens
    if context > model.cfg.block_size:
        raise HainaError(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} = {context} exceeds the "
                         f"model's context of {model.cfg.block_size}; lower them")
    files = [f for p in paths for f in weight_files(p, adapter)]
    sizes = {str(f): f.stat().st_size for f in files}

    rows = []
    with tqdm(total=len(batches) * (warmup + repeats) + (0 if 1 in batches else warmup + repeats),
              desc="efficiency", unit="run", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        for b in batches:
            rows.append(bench_batch(model, b, prompt_tokens, new_tokens, repeats, warmup, memory, bar))
        # The headline prefill latency is one prompt's: measured alone (one token, no decode) when batch 1 is not run.
        single = rows[0] if batches[0] == 1 else bench_batch(model, 1, prompt_tokens, 1, repeats, warmup, progress=bar)
    peaks = [p for p in [load_peak, *(r["peak_memory_mb"] for r in rows)] if p is not None]

    metrics: dict[str, Any] = param_counts(model)
    metrics["size_mb"] = sum(sizes.values()) / MIB
    metrics["peak_memory_mb"] = max(peaks) if peaks else None
    metrics["prefill_ms_p50"] = single["prefill_ms_p50"]
    metrics["prefill_ms_p99"] = single["prefill_ms_p99"]
    for r in rows:
        metrics[f"decode_tok_s_b{r['batch']}_p50"] = r["decode_tok_s_p50"]
        metrics[f"decode_tok_s_b{r['batch']}_p99"] = r["decode_tok_s_p99"]
    env = {"device": str(dev), "device_name": device_name(dev), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "dtype": dtype, "python": platform.python_version()}
    details = {
        "environment": env,
        "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch_sizes": batches,
                     "repeats": repeats, "warmup": warmup, "decoding": "greedy, ignore_eos"},
        "weight_files": sizes,
        "memory": {"basis": memory.basis, "after_load_mb": load_peak,
                   "per_batch_mb": {str(r["batch"]): r["peak_memory_mb"] for r in rows}},
        "batches": rows,
    }
    table = markdown_table(
        ["batch", "prefill ms p50", "prefill ms p99", "decode tok/s p50", "decode tok/s p99", "ms/step p50",
         "peak MiB"],
        [(r["batch"], r["prefill_ms_p50"], r["prefill_ms_p99"], r["decode_tok_s_p50"], r["decode_tok_s_p99"],
          r["ms_per_step_p50"], r["peak_memory_mb"]) for r in rows])
    setup = (f"{env['device_name']} ({env['device']}), torch {env['torch']}, {env['threads']} threads, {dtype}; "
             f"prompts of {prompt_tokens} tokens, {new_tokens} new tokens each (greedy, EOS ignored), "
             f"{repeats} timed runs after {warmup} warm-up per batch size. Sizes and memory in MiB; "
             f"memory: {memory.basis}.")
    sections = [("Setup", setup), ("Per batch size", table)]
    with eval_output(out, KIND, inputs=[*paths, adapter], overwrite=overwrite) as tmp:
        plot_decode(rows, tmp / "decode_tok_s.png", f"decode throughput, {env['device_name']}")
        obj = write_report(tmp, Report(kind=KIND, metrics=metrics, details=details, sections=sections,
                                       images=["decode_tok_s.png"], checkpoint=" + ".join(paths),
                                       adapter=adapter))
    print_summary(obj, ["params", "size_mb", "peak_memory_mb", "prefill_ms_p50",
                        *(f"decode_tok_s_b{b}_p50" for b in batches)], out)
