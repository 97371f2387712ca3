"""Serving under load: `haina serve` with continuous batching against the same server one request at a time.

Two servers run the same checkpoint: `--max-batch-size 32` (continuous batching: requests join the
running batch at every decode step) and `--max-batch-size 1` (each request has the model to itself;
the rest wait in the queue). Both stay up, but only one has work at any time (an idle server sleeps
on its queue), so they never share the CPU; they take turns at each N, so that both see the machine
in about the same state. N concurrent clients (a closed loop: each client sends its next request
as soon as its last one finished) work through the same seeded list of requests, N in --concurrency.

Measured in --rounds interleaved rounds: each round runs every server at every torch thread count
in --threads (default: all cores but one, and all cores) at every N, one after the other (the order
reversed in every other round, so that neither server always goes first). A ratio is taken within
each round, between runs made minutes apart at most, and reported as its median over the rounds
with its minimum, maximum and the number of rounds; the per-run tables give each metric's median
over the rounds. Nothing is a best-of: the best continuous run over the best batch-1 run would
measure the noise of a shared machine as much as the servers.

The ratio is reported for every pair of thread counts. The pair that the target is judged on is
fixed before the run (--target-threads; default: the continuous server at all cores, the batch-1
server at all cores but one; --only-target-threads runs each server at its own count only, which
halves the run), from what earlier runs showed: a batched step has enough work for
every core, while a one-token step does not, and its threads then wait on the cores that the
clients and the server's HTTP thread are using (on 2 cores, the one-at-a-time server was 10-15%
slower with 2 threads than with 1, the batching server about 20% faster).

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
per server comes first and is not counted.

The model: the `small` preset (about 10 M parameters) with random weights and a byte-level BPE
tokenizer trained on ../shared/data/tinyshakespeare.txt if present, else on the Python standard
library's documentation (nothing is downloaded); or any checkpoint with --checkpoint.

    .venv/bin/python benchmarks/serve_load.py            # small preset, 1/4/16/32 clients, 3 rounds
    .venv/bin/python benchmarks/serve_load.py --concurrency 16 --rounds 5
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
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from rounds import Spread, cpu_model, load_average, ratios, round_order

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
Key = tuple[str, int, int]  # (server, torch threads, clients)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_runs(runs: dict[Key, list[dict]], levels: list[int], threads: dict[str, list[int]]) -> None:
    """One row per server, thread count and N: each metric's median over the rounds."""
    print("| server | torch threads | clients | requests per round | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
          "| TPOT p99 (ms) | end-to-end p50 (s) | end-to-end p99 (s) | req/s | output tok/s: median (min–max, rounds) |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, mbs in SERVERS:
        for t in threads[name]:
            for n in levels:
                rs = runs[name, t, n]
                failed = sum(r["failed"] for r in rs)
                failed_text = f" ({failed} failed in all)" if failed else ""
                tok = Spread.of([r["tok_s"] for r in rs])
                print(f"| {name} (max batch {mbs}) | {t} | {n} | {rs[0]['requests']}{failed_text} | "
                      f"{_median(rs, 'ttft_p50'):.0f} | {_median(rs, 'ttft_p99'):.0f} | {_median(rs, 'tpot_p50'):.1f} | "
                      f"{_median(rs, 'tpot_p99'):.1f} | {_median(rs, 'e2e_p50'):.2f} | {_median(rs, 'e2e_p99'):.2f} | "
                      f"{_median(rs, 'req_s'):.2f} | {tok.text('.0f')} |")


def print_ratios(tok_s: dict[Key, list[float]], ttft_p99: dict[Key, list[float]] | None, levels: list[int],
                 threads: dict[str, list[int]], target_pair: tuple[int, int]) -> None:
    """The ratio of output tok/s for every pair of thread counts: median of the per-round ratios, with its range."""
    (a, _), (b, _) = SERVERS
    ttft_cols = f" {a} TTFT p99 (ms) | {b} TTFT p99 (ms) |" if ttft_p99 else ""
    print(f"| clients | {a} threads | {b} threads | {a} output tok/s | {b} output tok/s |{ttft_cols} "
          f"output tok/s ratio ({a} / {b}): median (min–max, rounds) |")
    print("|--:|--:|--:|--:|--:|" + ("--:|--:|" if ttft_p99 else "") + "--:|")
    for n in levels:
        for ta in threads[a]:
            for tb in threads[b]:
                pair = " (target pair)" if (ta, tb) == target_pair and len(threads[a]) * len(threads[b]) > 1 else ""
                ttft = (f" {statistics.median(ttft_p99[a, ta, n]):.0f} | {statistics.median(ttft_p99[b, tb, n]):.0f} |"
                        if ttft_p99 else "")
                print(f"| {n} | {ta} | {tb}{pair} | {statistics.median(tok_s[a, ta, n]):.0f} | "
                      f"{statistics.median(tok_s[b, tb, n]):.0f} |{ttft} "
                      f"{ratios(tok_s[a, ta, n], tok_s[b, tb, n]).text(unit='×')} |")


def target_line(tok_s: dict[Key, list[float]], n: int, pair: tuple[int, int], target: float) -> str:
    """Whether the median per-round ratio at n clients, for the pair fixed before the run, reaches the target."""
    (a, _), (b, _) = SERVERS
    per_round = [x / y for x, y in zip(tok_s[a, pair[0], n], tok_s[b, pair[1], n], strict=True) if y]
    sp = Spread.of(per_round)
    verdict = "**met**" if sp.median >= target else "**not met**"
    above = sum(x >= target for x in per_round)
    return (f"Target: at {n} clients, output tok/s ≥ {target:g}× the {b} server (torch threads: {a} {pair[0]}, "
            f"{b} {pair[1]}, fixed before the run): {verdict} by the median, {sp.median:.2f}× over {sp.rounds} "
            f"rounds (range {sp.low:.2f}–{sp.high:.2f}×; {above} of {sp.rounds} rounds at or above {target:g}×).")


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
                   help="torch thread counts: every round runs each server at each (default: all cores but one, which "
                        "leaves one for the clients and the HTTP thread, and all cores)")
    p.add_argument("--target-threads", type=int, nargs=2, default=None, metavar=("CONTINUOUS", "BATCH1"),
                   help="the thread counts the target is judged at, fixed before the run (default: the most and the "
                        "fewest of --threads)")
    p.add_argument("--only-target-threads", action="store_true",
                   help="run each server only at its --target-threads count, not at every count in --threads")
    p.add_argument("--target", type=float, default=4.0, help="the target ratio at --target-clients")
    p.add_argument("--target-clients", type=int, default=16)
    p.add_argument("--rounds", "--repeats", type=int, default=3,
                   help="interleaved rounds: each runs every server at every thread count and N once; ratios are "
                        "taken within a round and reported as the median over the rounds with their range")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy, as vLLM's benchmark_serving does by default; > 0 adds the sampler's cost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-alone", action="store_true",
                   help="also run the same loads on an in-process Engine (no HTTP) at max batch 32 and 1, in rounds "
                        "of their own: the ceiling of the ratio for this model on this machine")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 1 and 4 clients, short requests")
    args = p.parse_args()
    if args.quick:
        args.preset, args.vocab_size, args.concurrency = "tiny", 1024, [1, 4]
        args.prompt_len, args.output_len, args.requests = [8, 32], [8, 16], 4
    levels = sorted(set(args.concurrency))
    threads = sorted(set(args.threads))
    if threads[0] < 1 or args.rounds < 1:
        raise SystemExit("--threads and --rounds must be at least 1")
    target_pair = tuple(args.target_threads) if args.target_threads else (threads[-1], threads[0])
    if args.only_target_threads:
        threads = sorted(set(target_pair))
    if not set(target_pair) <= set(threads):
        raise SystemExit(f"--target-threads {target_pair} must be among --threads {threads}")
    (a, _), (b, _) = SERVERS
    per_server = ({a: [target_pair[0]], b: [target_pair[1]]} if args.only_target_threads
                  else {a: threads, b: threads})  # the thread counts each server runs at

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

        runs: dict[Key, list[dict]] = {(name, t, n): [] for name, _ in SERVERS for t in per_server[name]
                                       for n in levels}
        load_avgs = [load_average()]
        with ExitStack() as stack:
            urls = {(name, t): stack.enter_context(server(checkpoint, mbs, t, Path(tmp) / f"{name}-{t}.log"))
                    for name, mbs in SERVERS for t in per_server[name]}
            for url in urls.values():
                warm_up = workload(1, -1, low_id, vocab, (16, 16), (8, 8))
                asyncio.run(run_load(url, warm_up, 1, args.temperature))
            for r in range(args.rounds):
                for n in levels:
                    for name, t in round_order(list(urls), r):
                        s = summarize(*asyncio.run(run_load(urls[name, t], loads[n], n, args.temperature)))
                        runs[name, t, n].append(s)
                        print(f"round {r + 1}  {name:>10}  {t} threads  {n:>2} clients: {s['requests']} requests in "
                              f"{s['wall']:.1f} s, {s['tok_s']:.0f} output tok/s, TTFT p50 {s['ttft_p50']:.0f} ms"
                              + (f", {s['failed']} FAILED: {s['errors']}" if s["failed"] else ""), file=sys.stderr)
                load_avgs.append(load_average())
                print(f"round {r + 1} of {args.rounds} done; load average {load_avgs[-1]:.1f}", file=sys.stderr)

        alone: dict[Key, list[float]] = {}
        if args.engine_alone:
            model = load_model(checkpoint)[0]
            order = [(name, mbs, t) for name, mbs in SERVERS for t in per_server[name]]
            for r in range(args.rounds):
                for n in levels:
                    for name, mbs, t in round_order(order, r):
                        torch.set_num_threads(t)
                        tok_s = engine_alone(model, loads[n], n, mbs, args.temperature)
                        alone.setdefault((name, t, n), []).append(tok_s)
                        print(f"round {r + 1}  {name:>10}  {t} threads  {n:>2} clients, engine alone: {tok_s:.0f} "
                              f"output tok/s", file=sys.stderr)
            load_avgs.append(load_average())

    # Other work on the machine slows both servers, but not equally: say how busy it was.
    thread_text = "; ".join(f"{name} at {' and '.join(map(str, ts))}" for name, ts in per_server.items())
    print(f"\n{datetime.date.today()} · {cpu_model()} ({os.cpu_count()} cores; torch threads: {thread_text}; "
          f"{args.rounds} interleaved rounds, medians over rounds; load average "
          f"{load_avgs[0]:.1f} before, {load_avgs[-1]:.1f} after, {min(load_avgs):.1f}–{max(load_avgs):.1f} between "
          f"rounds) · torch {torch.__version__} · Python {platform.python_version()}")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/serve_load.py', *sys.argv[1:]])}`")
    print(f"Model: {what}. Workload: prompts {args.prompt_len[0]}–{args.prompt_len[1]} tokens, "
          f"max_tokens {args.output_len[0]}–{args.output_len[1]} with ignore_eos, temperature {args.temperature:g}, streaming "
          f"/v1/completions; closed loop, the same seeded requests for both servers.\n")
    print_runs(runs, levels, per_server)
    tok_s = {k: [r["tok_s"] for r in v] for k, v in runs.items()}
    ttft = {k: [r["ttft_p99"] for r in v] for k, v in runs.items()}
    print("\nThe ratio within each round, for each pair of thread counts (tok/s and TTFT: medians over rounds):\n")
    print_ratios(tok_s, ttft, levels, per_server, target_pair)
    if alone:
        (_, ma), (_, mb) = SERVERS
        print(f"\nThe same loads on an in-process Engine, without HTTP (max batch {ma} and {mb}), in rounds of their "
              f"own:\n")
        print_ratios(alone, None, levels, per_server, target_pair)
    if args.target_clients in levels:
        print()
        print(target_line(tok_s, args.target_clients, target_pair, args.target))


if __name__ == "__main__":
    main()
