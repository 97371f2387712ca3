"""Serving under load: `haina serve` with continuous batching against the same server one request at a time.

Two servers run the same checkpoint: `--max-batch-size 32` (continuous batching: requests join the
running batch at every decode step) and `--max-batch-size 1` (each request has the model to itself;
the rest wait in the queue). Both stay up, but only one has work at any time (an idle server sleeps
on its queue), so they never share the CPU; they take turns at each N, so that both see the machine
in about the same state. N concurrent clients (a closed loop: each client sends its next request
as soon as its last one finished) work through the same seeded list of requests, N in --concurrency.
Each server runs once per torch thread count in --threads (default: all cores but one, and all cores),
and the summary compares each server at its fastest count. Neither count suits both: a batched step
has enough work for every core, while a one-token step does not, and its threads then wait on the
cores that the clients and the server's HTTP thread are using (on 2 cores, the one-at-a-time server
was 10-15% slower with 2 threads than with 1, the batching server about 20% faster).

Requests go to /v1/completions with the prompt as token ids, so prompt lengths are exact
(uniform in --prompt-len), and `ignore_eos` so that every answer runs to its `max_tokens`
(uniform in --output-len); the output tokens counted are the server's own `usage` numbers.
Decoding is greedy by default (--temperature 0, as in vLLM's benchmark_serving), which leaves the
sampler out of the comparison; --temperature 1 measures it too.
Every request streams (server-sent events), which gives, per request:
- TTFT, time to first token: from sending the request to the first streamed token;
- TPOT, time per output token: (end-to-end - TTFT) / (output tokens - 1);
- end-to-end latency: from sending to `data: [DONE]`;
and per run, requests/s and output tokens/s over the wall time of the run. One warm-up request
per server comes first and is not counted. With --repeats R the servers alternate R times at each N
and the tables keep each server's fastest run (on a shared machine, the one least disturbed).

The model: the `small` preset (about 10 M parameters) with random weights and a byte-level BPE
tokenizer trained on ../shared/data/tinyshakespeare.txt if present, else on the Python standard
library's documentation (nothing is downloaded); or any checkpoint with --checkpoint.

    .venv/bin/python benchmarks/serve_load.py            # small preset, 1/4/16/32 clients
    .venv/bin/python benchmarks/serve_load.py --quick    # a smoke run in well under a minute
    .venv/bin/python benchmarks/serve_load.py --engine-alone   # plus the same loads without HTTP
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from haina.generate.engine import Engine
from haina.generate.sampling import SamplingParams
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.serve.process import serve_process
from haina.tokenizer.train import train_bpe

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
SERVERS = (("continuous", 32), ("batch-1", 1))  # (name, --max-batch-size)


# --------------------------------------------------------------------------------- the model
def build_checkpoint(preset: str, vocab_size: int, out: Path) -> str:
    """A preset with random weights and a BPE tokenizer trained on local text; returns a description."""
    if SHAKESPEARE.is_file():
        text, source = SHAKESPEARE.read_text(encoding="utf-8"), SHAKESPEARE.name
        docs = [text[i:i + 10_000] for i in range(0, len(text), 10_000)]
    else:
        from haina.data.stdlib_corpus import build_stdlib_corpus

        docs, source = build_stdlib_corpus(), "the standard library's docs"
    tok = train_bpe(docs, vocab_size=vocab_size)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=tok.vocab_size))
    save_model(out, model, tok)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"`{preset}` preset, random weights, {params:.1f} M parameters, BPE vocab {tok.vocab_size} trained on {source}"


# --------------------------------------------------------------------------------- the servers
@contextmanager
def server(checkpoint: str, max_batch_size: int, threads: int, log_path: Path):
    """`haina serve` as a subprocess on a free port; yields its base URL once /health answers 200."""
    # torch sizes its intra-op pool from OMP_NUM_THREADS at startup.
    try:
        with serve_process(checkpoint, "--max-batch-size", str(max_batch_size), "--max-queue", "1024",
                           "--log-level", "warning", log_path=log_path, timeout=180,
                           env={"OMP_NUM_THREADS": str(threads)}) as url:
            yield url
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


# --------------------------------------------------------------------------------- the load
@dataclass(frozen=True)
class Result:
    ok: bool
    ttft: float = 0.0  # seconds
    e2e: float = 0.0
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def workload(n: int, seed: int, low_id: int, vocab: int, prompt_len: tuple[int, int],
             output_len: tuple[int, int]) -> list[tuple[list[int], int]]:
    """n seeded requests: (prompt token ids, max_tokens)."""
    rng = random.Random(seed)
    return [([rng.randrange(low_id, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
            for _ in range(n)]


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, temperature: float) -> Result:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    return Result(False, error=str(chunk["error"])[:200])
                # The first chunk with a choice brings the first token (rarely the second: the server holds
                # back a token that ends inside a UTF-8 character, and a random model samples such bytes).
                if ttft is None and chunk.get("choices"):
                    ttft = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    e2e = time.perf_counter() - t0
    if usage is None:
        return Result(False, error="no usage chunk in the stream")
    return Result(True, ttft if ttft is not None else e2e, e2e, usage["completion_tokens"])


async def run_load(url: str, requests: list[tuple[list[int], int]], clients: int,
                   temperature: float) -> tuple[list[Result], float]:
    """`clients` workers take requests off the list in order until it is empty; returns results and wall time."""
    queue = requests[::-1]
    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            while queue:
                prompt, max_tokens = queue.pop()
                results.append(await one_request(client, prompt, max_tokens, temperature))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def engine_alone(model, requests: list[tuple[list[int], int]], clients: int, max_batch_size: int,
                 temperature: float) -> float:
    """The same closed loop straight on an in-process `Engine`, without HTTP: output tokens/s.

    This is the ceiling the server can reach with this model on this machine: what remains of the
    ratio once tokenization, JSON, SSE and the client's own work are taken out.
    """
    engine = Engine(model, max_batch_size=max_batch_size)
    todo = list(enumerate(requests))[::-1]

    def admit() -> None:
        if todo:
            i, (prompt, max_tokens) = todo.pop()
            engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                                              ignore_eos=True, seed=i))

    for _ in range(clients):
        admit()
    tokens, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        for ev in engine.step():
            tokens += len(ev.new_token_ids)
            if ev.finished:
                admit()  # the client sends its next request as soon as its last one finished
    return tokens / (time.perf_counter() - t0)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft, e2e = [r.ttft for r in ok], [r.e2e for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    tokens = sum(r.output_tokens for r in ok)
    errors = sorted({r.error for r in results if not r.ok})[:3]
    return {"requests": len(results), "failed": len(results) - len(ok), "errors": errors,
            "ttft_p50": pct(ttft, 50) * 1e3, "ttft_p99": pct(ttft, 99) * 1e3,
            "tpot_p50": pct(tpot, 50) * 1e3, "tpot_p99": pct(tpot, 99) * 1e3,
            "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99),
            "req_s": len(ok) / wall, "tok_s": tokens / wall, "tokens": tokens, "wall": wall}


# --------------------------------------------------------------------------------- report
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fastest(stats: dict, name: str, n: int, threads: list[int]) -> tuple[int, dict]:
    """The thread count at which server `name` had the most output tok/s with n clients, and its stats."""
    t = max(threads, key=lambda t: stats[name, t, n]["tok_s"])
    return t, stats[name, t, n]


def print_tables(stats: dict, levels: list[int], names: list[tuple[str, int]], threads: list[int]) -> None:
    print("| server | torch threads | clients | requests | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
          "| TPOT p99 (ms) | end-to-end p50 (s) | end-to-end p99 (s) | req/s | output tok/s |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, mbs in names:
        for t in threads:
            for n in levels:
                s = stats[name, t, n]
                failed = f" ({s['failed']} failed)" if s["failed"] else ""
                print(f"| {name} (max batch {mbs}) | {t} | {n} | {s['requests']}{failed} | {s['ttft_p50']:.0f} | "
                      f"{s['ttft_p99']:.0f} | {s['tpot_p50']:.1f} | {s['tpot_p99']:.1f} | {s['e2e_p50']:.2f} | "
                      f"{s['e2e_p99']:.2f} | {s['req_s']:.2f} | {s['tok_s']:.0f} |")
    (a, _), (b, _) = names
    print("\nEach server at its fastest thread count (in brackets) for each number of clients:\n")
    print(f"| clients | {a} output tok/s | {b} output tok/s | {a} TTFT p99 (ms) | {b} TTFT p99 (ms) "
          f"| output tok/s ratio ({a} / {b}) |")
    print("|--:|--:|--:|--:|--:|--:|")
    for n in levels:
        (ta, sa), (tb, sb) = fastest(stats, a, n, threads), fastest(stats, b, n, threads)
        print(f"| {n} | {sa['tok_s']:.0f} [{ta}] | {sb['tok_s']:.0f} [{tb}] | {sa['ttft_p99']:.0f} | "
              f"{sb['ttft_p99']:.0f} | **{sa['tok_s'] / sb['tok_s']:.2f}×** |")


# --------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of a random preset")
    p.add_argument("--preset", default="small", help="model preset (ignored with --checkpoint)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary to train (ignored with --checkpoint)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32], help="numbers of clients")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per run (0: max(16, 4 × clients): several per client, so that the ragged end of "
                        "a run, when fewer clients are left than the batch holds, weighs little)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    cores = os.cpu_count() or 2
    p.add_argument("--threads", type=int, nargs="+", default=sorted({max(1, cores - 1), cores}),
                   help="torch thread counts: each server runs at each, and the summary compares each at its fastest "
                        "(default: all cores but one, which leaves one for the clients and the HTTP thread, and all "
                        "cores)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per server and N, the two servers alternating; the tables keep each one's fastest")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy, as vLLM's benchmark_serving does by default; > 0 adds the sampler's cost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-alone", action="store_true",
                   help="also run the same loads on an in-process Engine (no HTTP) at max batch 32 and 1: the ceiling "
                        "of the ratio for this model on this machine")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 1 and 4 clients, short requests")
    args = p.parse_args()
    if args.quick:
        args.preset, args.vocab_size, args.concurrency = "tiny", 1024, [1, 4]
        args.prompt_len, args.output_len, args.requests = [8, 32], [8, 16], 4
    levels = sorted(set(args.concurrency))
    threads = sorted(set(args.threads))
    if threads[0] < 1:
        raise SystemExit("--threads must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint, what = args.checkpoint, f"checkpoint `{args.checkpoint}`"
        else:
            checkpoint = str(Path(tmp) / "ckpt")
            what = build_checkpoint(args.preset, args.vocab_size, Path(checkpoint))
        model, tok = load_model(checkpoint)
        vocab, block = model.cfg.vocab_size, model.cfg.block_size
        # Prompts of ordinary tokens only: the special tokens come first in a haina BPE vocabulary.
        low_id = max(tok.special_tokens.values(), default=-1) + 1 if tok is not None else 0
        del model
        if args.prompt_len[1] + args.output_len[1] > block:
            raise SystemExit(f"--prompt-len + --output-len reach {args.prompt_len[1] + args.output_len[1]} tokens; "
                             f"the model's context is {block}")
        loads = {n: workload(args.requests or max(16, 4 * n), args.seed + n, low_id, vocab,
                             tuple(args.prompt_len), tuple(args.output_len)) for n in levels}

        stats: dict[tuple[str, int, int], dict] = {}  # (server, threads, clients) -> its fastest run
        load_before = os.getloadavg()[0]
        with ExitStack() as stack:
            urls = {(name, t): stack.enter_context(server(checkpoint, mbs, t, Path(tmp) / f"{name}-{t}.log"))
                    for name, mbs in SERVERS for t in threads}
            for url in urls.values():
                warm_up = workload(1, -1, low_id, vocab, (16, 16), (8, 8))
                asyncio.run(run_load(url, warm_up, 1, args.temperature))
            for n in levels:
                for _ in range(args.repeats):
                    for (name, t), url in urls.items():
                        s = summarize(*asyncio.run(run_load(url, loads[n], n, args.temperature)))
                        print(f"{name:>10}  {t} threads  {n:>2} clients: {s['requests']} requests in {s['wall']:.1f} s, "
                              f"{s['tok_s']:.0f} output tok/s, TTFT p50 {s['ttft_p50']:.0f} ms"
                              + (f", {s['failed']} FAILED: {s['errors']}" if s["failed"] else ""), file=sys.stderr)
                        if (name, t, n) not in stats or s["tok_s"] > stats[name, t, n]["tok_s"]:
                            stats[name, t, n] = s  # the run least disturbed by other work on the machine

        alone: dict[tuple[str, int, int], dict] = {}
        if args.engine_alone:
            model = load_model(checkpoint)[0]
            for n in levels:
                for _ in range(args.repeats):
                    for name, mbs in SERVERS:
                        for t in threads:
                            torch.set_num_threads(t)
                            tok_s = engine_alone(model, loads[n], n, mbs, args.temperature)
                            print(f"{name:>10}  {t} threads  {n:>2} clients, engine alone: {tok_s:.0f} output tok/s",
                                  file=sys.stderr)
                            if tok_s > alone.get((name, t, n), {"tok_s": 0.0})["tok_s"]:
                                alone[name, t, n] = {"tok_s": tok_s}

    # Other work on the machine slows both servers, but not equally: say how busy it was.
    print(f"\n{datetime.date.today()} · {_cpu_name()} ({os.cpu_count()} cores; torch threads "
          f"{' and '.join(map(str, threads))}; servers take turns, best of {args.repeats}; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after) · torch {torch.__version__} · "
          f"Python {platform.python_version()}")
    print(f"Model: {what}. Workload: prompts {args.prompt_len[0]}–{args.prompt_len[1]} tokens, "
          f"max_tokens {args.output_len[0]}–{args.output_len[1]} with ignore_eos, temperature {args.temperature:g}, streaming "
          f"/v1/completions; closed loop, the same seeded requests for both servers.\n")
    print_tables(stats, levels, list(SERVERS), threads)
    if alone:
        (a, ma), (b, mb) = SERVERS
        print(f"\nThe same loads on an in-process Engine, without HTTP (max batch {ma} and {mb}), each at its fastest "
              f"thread count (in brackets):\n")
        print(f"| clients | {a} output tok/s | {b} output tok/s | ratio ({a} / {b}) |")
        print("|--:|--:|--:|--:|")
        for n in levels:
            (ta, sa), (tb, sb) = fastest(alone, a, n, threads), fastest(alone, b, n, threads)
            print(f"| {n} | {sa['tok_s']:.0f} [{ta}] | {sb['tok_s']:.0f} [{tb}] | "
                  f"**{sa['tok_s'] / sb['tok_s']:.2f}×** |")


if __name__ == "__main__":
    main()
