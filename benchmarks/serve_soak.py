"""Serving soak: minutes of mixed traffic against one `haina serve`; its memory, its errors and its latency.

One real server runs as a subprocess on loopback (a small `--max-queue`, so bursts meet 429) while
--clients workers send, each in a closed loop until the time is up, a seeded mix of:
- stream:   a chat completion streamed through the official `openai` client, read to the end;
- complete: a completion (n of 1 or 2, sometimes logprobs) through the `openai` client;
- cancel:   a streamed completion dropped after 1-5 chunks (the server must abort it in the engine);
- bad:      a malformed request (invalid JSON, unknown model, a context overflow, a negative temperature, an
            unsupported field, an unknown route, a wrong method, a body over --max-body-mb): a 4xx each;
- burst:    max-queue + max-batch-size + 4 short completions at once: some must get 429;
- light:    /health, /v1/models, /tokenize, /metrics.
The server's resident memory (VmRSS from /proc) is sampled every --sample-s seconds. Its start is the
first sample after the warm-up (--warmup-s); the slope is a least-squares line over every sample after
it. Statuses are counted per kind (a client-side failure, e.g. a refused connection, is counted by its
exception name), latencies (p50/p99, 2xx only) are per kind, from sending to the last byte. At the end
the server's own /metrics must show nothing running, waiting or in flight (no leaked sequence), its log
no traceback, and SIGTERM must drain it to exit status 0.

Targets: no 5xx at all, and RSS growth under 5 % from the end of the warm-up over a 10-minute run.

The model: the `tiny` preset with random weights and a byte-level BPE tokenizer (ChatML tokens, the
default chat template) trained on the Python standard library's documentation; nothing is downloaded.
Or any checkpoint with --checkpoint (it needs a tokenizer with a chat template for the chat streams).

    .venv/bin/python benchmarks/serve_soak.py                 # 10 minutes
    .venv/bin/python benchmarks/serve_soak.py --minutes 0.5   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import re
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import openai
import torch

from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.serve.process import ServerProcess, serve_subprocess
from haina.tokenizer.train import train_bpe

KINDS = {"stream": 25, "complete": 25, "cancel": 15, "bad": 15, "burst": 3, "light": 15}  # relative weights
WORDS = ["the", "model", "reads", "a", "prompt", "and", "writes", "tokens", "one", "at", "time", "until", "it",
         "stops", "or", "runs", "out", "of", "room", "server", "batches", "many", "such", "requests", "together"]


# --------------------------------------------------------------------------------- the model
def build_checkpoint(out: Path) -> str:
    """The `tiny` preset with random weights and a BPE tokenizer on the stdlib docs; returns a description."""
    from haina.data.stdlib_corpus import build_stdlib_corpus

    tok = train_bpe(build_stdlib_corpus(), vocab_size=2048, special_tokens=("<|endoftext|>", IM_START, IM_END))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size))
    save_model(out, model, tok)
    return (f"`tiny` preset, random weights, {model.num_params() / 1e6:.1f} M parameters, context "
            f"{model.cfg.block_size}, BPE vocab {tok.vocab_size} trained on the standard library's docs")


# --------------------------------------------------------------------------------- measurements
def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


class Tally:
    """Statuses and 2xx latencies per kind of request."""

    def __init__(self) -> None:
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.examples: list[str] = []  # the first client-side failures, as they were raised

    def add(self, kind: str, status: int | str, seconds: float) -> None:
        self.statuses[kind][status] += 1
        if isinstance(status, int) and 200 <= status < 300:
            self.latencies[kind].append(seconds)

    def count(self, pred) -> int:
        return sum(n for c in self.statuses.values() for s, n in c.items() if pred(s))


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    t = np.array([s[0] for s in samples]) / 60
    y = np.array([s[1] for s in samples])
    return float(np.polyfit(t, y, 1)[0]) if len(samples) >= 2 else 0.0


# --------------------------------------------------------------------------------- the traffic
class Traffic:
    """The request kinds, each recorded in a `Tally`; every request has a client timeout."""

    def __init__(self, url: str, model: str, args: argparse.Namespace, tally: Tally):
        self.url, self.model, self.args, self.tally = url, model, args, tally
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(base_url=url, timeout=args.client_timeout, limits=limits)
        self.client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                         timeout=args.client_timeout)

    async def close(self) -> None:
        await self.http.aclose()
        await self.client.close()

    def prompt(self, rng: random.Random, lo: int = 3, hi: int = 30) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    async def timed(self, kind: str, fn) -> None:
        start = time.perf_counter()
        try:
            status = await fn()
        except openai.APIStatusError as e:
            status = e.status_code
        except openai.APIError as e:  # an error event inside a stream
            body = e.body if isinstance(e.body, dict) else {}
            status = f"stream {body.get('code', '?')}"
        except (httpx.HTTPError, openai.APIConnectionError) as e:
            status = f"client {type(e).__name__}"
            if len(self.tally.examples) < 5:
                self.tally.examples.append(f"{kind}: {e!r} (cause: {e.__cause__!r})")
        self.tally.add(kind, status, time.perf_counter() - start)

    async def stream(self, rng: random.Random) -> int:
        chunks = await self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": self.prompt(rng)}], stream=True,
            max_tokens=rng.randint(8, 64), temperature=rng.choice([0.0, 0.8]))
        async for _ in chunks:
            pass
        return 200

    async def complete(self, rng: random.Random) -> int:
        await self.client.completions.create(model=self.model, prompt=self.prompt(rng), max_tokens=rng.randint(4, 48),
                                             n=rng.choice([1, 1, 2]), logprobs=rng.choice([None, None, 3]),
                                             temperature=rng.choice([0.0, 1.0]))
        return 200

    async def cancel(self, rng: random.Random) -> int:
        body = {"model": self.model, "prompt": self.prompt(rng), "max_tokens": 150, "ignore_eos": True, "stream": True}
        keep = rng.randint(1, 5)
        async with self.http.stream("POST", "/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= keep:
                    break  # leaving the block closes the connection mid-stream
            return r.status_code

    async def bad(self, rng: random.Random) -> int:
        m = self.model
        cases = [
            lambda: self.http.post("/v1/completions", content=b'{"model": "x", "prompt": ',
                                   headers={"content-type": "application/json"}),
            lambda: self.http.post("/v1/completions", json={"model": "no-such-model", "prompt": "hi"}),
            lambda: self.http.post("/v1/completions", json={"model": m, "prompt": "hi", "max_tokens": 10**6}),
            lambda: self.http.post("/v1/completions", json={"model": m, "prompt": "hi", "temperature": -1}),
            lambda: self.http.post("/v1/chat/completions", json={"model": m, "messages": [
                {"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}),
            lambda: self.http.post("/v1/nothing", json={}),
            lambda: self.http.get("/v1/completions"),
            lambda: self.http.post("/v1/completions", json={"model": m, "prompt": "x" * int(self.args.max_body_mb
                                                                                          * 1.2 * 2**20)}),
        ]
        return (await rng.choice(cases)()).status_code

    async def burst(self, rng: random.Random) -> int:
        size = self.args.max_queue + self.args.max_batch_size + 4
        body = {"model": self.model, "max_tokens": 16, "ignore_eos": True}

        async def one(i: int) -> None:
            async def send() -> int:
                return (await self.http.post("/v1/completions", json={**body, "prompt": f"{i} {self.prompt(rng)}"})
                        ).status_code
            await self.timed("burst", send)

        await asyncio.gather(*(one(i) for i in range(size)))
        return 0  # recorded per request above

    async def light(self, rng: random.Random) -> int:
        choice = rng.randrange(4)
        if choice == 0:
            return (await self.http.get("/health")).status_code
        if choice == 1:
            return (await self.http.get("/v1/models")).status_code
        if choice == 2:
            return (await self.http.post("/tokenize", json={"model": self.model, "prompt": self.prompt(rng)})
                    ).status_code
        return (await self.http.get("/metrics")).status_code

    async def worker(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < until:  # bounded: every request has a client timeout, the loop an end
            kind = rng.choices(kinds, weights)[0]
            if kind == "burst":
                await self.burst(rng)
            else:
                await self.timed(kind, lambda kind=kind: getattr(self, kind)(rng))


async def sample_rss(pid: int, samples: list[tuple[float, float]], t0: float, every: float, until: float) -> None:
    while True:
        samples.append((time.monotonic() - t0, rss_mib(pid)))
        if time.monotonic() >= until:
            return
        await asyncio.sleep(min(every, max(0.0, until - time.monotonic())))


async def soak(server: ServerProcess, model: str, args: argparse.Namespace) -> tuple[Tally, list, float]:
    tally = Tally()
    traffic = Traffic(server.url, model, args, tally)
    t0 = time.monotonic()
    until = t0 + args.minutes * 60
    samples: list[tuple[float, float]] = []
    try:
        sampler = asyncio.create_task(sample_rss(server.pid, samples, t0, args.sample_s, until))
        await asyncio.gather(*(traffic.worker(args.seed * 1000 + i, until) for i in range(args.clients)))
        await sampler
        samples.append((time.monotonic() - t0, rss_mib(server.pid)))  # after the last requests ended
    finally:
        await traffic.close()
    return tally, samples, time.monotonic() - t0


def server_metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(("haina_num_", "haina_request_errors_total", "haina_request_timeouts_total",
                            'haina_requests_total')):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------------- report
def percentile_ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.0f}" if values else "-"


def report(tally: Tally, samples: list, elapsed: float, warmup_s: float, metrics: dict, drain: tuple[int, float],
           tracebacks: int, args: argparse.Namespace, description: str) -> dict:
    after = [s for s in samples if s[0] >= warmup_s] or samples[-1:]
    start, end = after[0][1], after[-1][1]
    growth = (end - start) / start * 100
    slope = slope_per_min(after)
    total = tally.count(lambda s: True)
    fivexx = tally.count(lambda s: (isinstance(s, int) and s >= 500) or (isinstance(s, str) and " 5" in s))
    statuses = sorted({s for c in tally.statuses.values() for s in c}, key=str)
    print(f"\n## Serving soak: {args.minutes:g} min, {args.clients} clients, {total} requests "
          f"({total / elapsed:.1f}/s)\n")
    print(f"Model: {description}. Server: --max-batch-size {args.max_batch_size} --max-queue {args.max_queue} "
          f"--threads {args.threads} --request-timeout {args.request_timeout:g} --max-body-mb {args.max_body_mb:g}.\n")
    print("| RSS after warm-up (MiB) | RSS at end (MiB) | growth | slope (MiB/min, fit) | slope x 10 min "
          "| samples | peak (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    peak = max(s[1] for s in samples)
    print(f"| {start:.1f} (at {after[0][0]:.0f} s) | {end:.1f} | {growth:+.2f} % | {slope:+.3f} | "
          f"{slope * 10 / start * 100:+.2f} % | {len(after)} | {peak:.1f} |")
    print(f"\nRSS before the warm-up ended: {samples[0][1]:.1f} MiB at {samples[0][0]:.0f} s; warm-up {warmup_s:.0f} s.\n")
    print("| kind | requests | " + " | ".join(str(s) for s in statuses) + " | p50 (ms) | p99 (ms) |")
    print("| --- | --- | " + " | ".join("---" for _ in statuses) + " | --- | --- |")
    for kind in KINDS:
        c = tally.statuses.get(kind, Counter())
        lat = tally.latencies.get(kind, [])
        print(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c.get(s, 0)) for s in statuses)
              + f" | {percentile_ms(lat, 50)} | {percentile_ms(lat, 99)} |")
    every = [x for v in tally.latencies.values() for x in v]
    print(f"| all | {total} | " + " | ".join(str(sum(c.get(s, 0) for c in tally.statuses.values()))
                                           for s in statuses)
          + f" | {percentile_ms(every, 50)} | {percentile_ms(every, 99)} |")
    leaks = {k: v for k, v in metrics.items() if k.startswith("haina_num_") and v}
    print(f"\nServer after the run: running/waiting/in flight all zero: {'yes' if not leaks else leaks}; "
          f"tracebacks in its log: {tracebacks}; SIGTERM: exit {drain[0]} after {drain[1]:.1f} s.")
    if tally.examples:
        print("Client-side failures (first ones): " + "; ".join(tally.examples))
    ok_5xx, ok_rss = fivexx == 0, growth < 5
    print(f"Targets: 0 x 5xx: {fivexx} ({'met' if ok_5xx else 'NOT met'}); RSS growth < 5 % after warm-up: "
          f"{growth:+.2f} % ({'met' if ok_rss else 'NOT met'}).")
    return {"minutes": args.minutes, "elapsed_s": elapsed, "requests": total, "rss_start_mib": start,
            "rss_end_mib": end, "rss_growth_pct": growth, "rss_slope_mib_per_min": slope, "samples": samples,
            "statuses": {k: {str(s): n for s, n in c.items()} for k, c in tally.statuses.items()},
            "p50_ms": {k: float(np.percentile(v, 50) * 1000) for k, v in tally.latencies.items() if v},
            "p99_ms": {k: float(np.percentile(v, 99) * 1000) for k, v in tally.latencies.items() if v},
            "fivexx": fivexx, "server_metrics": metrics, "tracebacks": tracebacks, "exit_code": drain[0],
            "exit_s": drain[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: a random-init tiny model built here)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=6, help="concurrent closed-loop workers")
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=8, help="small, so that bursts meet 429")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--request-timeout", type=float, default=60.0, help="the server's; generous: none should fire")
    ap.add_argument("--max-body-mb", type=float, default=0.25)
    ap.add_argument("--client-timeout", type=float, default=120.0)
    ap.add_argument("--warmup-s", type=float, default=None, help="default: 60 s, or a fifth of a shorter run")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    warmup_s = args.warmup_s if args.warmup_s is not None else min(60.0, args.minutes * 60 / 5)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                   text=True, check=False).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    print(f"# serve_soak: {datetime.datetime.now().isoformat(timespec='seconds')}, {cpu}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="haina-soak-") as tmp:
        if args.checkpoint:
            checkpoint, description = args.checkpoint, f"checkpoint {args.checkpoint}"
        else:
            checkpoint = str(Path(tmp) / "tiny")
            description = build_checkpoint(Path(checkpoint))
        log_path = Path(tmp) / "server.log"
        flags = ["--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue), "--threads",
                 str(args.threads), "--request-timeout", str(args.request_timeout), "--max-body-mb",
                 str(args.max_body_mb), "--served-model-name", "soak", "--log-level", "warning"]
        with serve_subprocess(checkpoint, *flags, log_path=log_path, timeout=300, env={"HAINA_API_KEY": ""}) as server:
            tally, samples, elapsed = asyncio.run(soak(server, "soak", args))
            metrics = server_metrics(server.url)
            stop_start = time.monotonic()
            code = server.stop()
            drain = (code, time.monotonic() - stop_start)
        log = log_path.read_text(errors="replace")
        tracebacks = log.count("Traceback")
        if tracebacks:
            print(log[-4000:])
    result = report(tally, samples, elapsed, warmup_s, metrics, drain, tracebacks, args, description)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
