"""Scheduling: 32 concurrent streaming clients share the batch and get their lone greedy outputs, a client that
disconnects frees its slot, and a full queue answers 429 at once."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

PROMPTS = [f"{w} {i}" for i in range(8) for w in ("the cat", "To be", "héllo", "the dog ran")]


def test_32_concurrent_streams_equal_their_lone_outputs(api_server):
    s = api_server
    kw = {"model": "tiny", "max_tokens": 12, "temperature": 0}
    sync = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
    alone = [sync.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]
    peak, stop = [0], threading.Event()

    def watch():  # the engine's running batch, sampled while the clients stream
        while not stop.is_set():
            peak[0] = max(peak[0], s.service.loop.engine.num_running)
            time.sleep(0.0005)

    async def one(client, prompt):
        stream = await client.completions.create(prompt=prompt, stream=True, **kw)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them():
        client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))
        finally:
            await client.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        together = asyncio.run(all_of_them())
    finally:
        stop.set()
        watcher.join()
    assert len(together) == 32 and together == alone
    assert peak[0] > 1  # they really shared the batch


@pytest.fixture(scope="module")
def slow_server(tiny_ckpt, launch, slow_loader, one_torch_thread):
    """One slot, a queue of one, and ~20 ms per forward: a 100-token request lasts ~2 s."""
    with launch(tiny_ckpt, loader=slow_loader(0.02), max_batch_size=1, max_queue=1) as s:
        yield s


LONG = {"prompt": "the cat", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}


def _first_chunk(lines) -> dict:
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("the stream ended without a chunk")


def _wait(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_disconnecting_client_frees_its_slot(slow_server):
    s = slow_server
    engine_loop = s.service.loop
    tokens = s.metric("haina_generation_tokens_total")
    aborted = s.metric("haina_requests_total", 'finish_reason="abort"')
    with httpx.Client(timeout=30) as client, client.stream("POST", s.url + "/v1/completions", json=LONG) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response
        _first_chunk(lines)
        time.sleep(0.1)
        assert engine_loop.engine.num_running == 1
    # The connection is closed: the engine drops the request long before its 100 tokens.
    _wait(lambda: engine_loop.engine.num_running == 0)
    assert s.metric("haina_generation_tokens_total") - tokens < 50
    assert s.metric("haina_requests_total", 'finish_reason="abort"') == aborted + 1
    r = s.post("/v1/completions", {"prompt": "the dog", "max_tokens": 3})  # the only slot serves the next one
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_a_non_streaming_client_that_leaves_frees_its_slot(slow_server):
    # Tokens keep arriving while it runs, so the gone client must be noticed between events, not only in a lull.
    s = slow_server
    engine_loop = s.service.loop
    with pytest.raises(httpx.TimeoutException):
        httpx.post(s.url + "/v1/completions", json={**LONG, "stream": False}, timeout=0.3)
    start = time.monotonic()
    _wait(lambda: engine_loop.engine.num_running == 0, timeout=1.5)  # the 100 tokens would take ~2 s
    assert time.monotonic() - start < 1.5


def test_full_queue_answers_429(slow_server):
    s = slow_server
    engine_loop = s.service.loop
    results = {}
    with httpx.Client(timeout=30) as client, client.stream("POST", s.url + "/v1/completions", json=LONG) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response
        _first_chunk(lines)  # A runs in the only slot

        def waiter():  # B waits for the slot
            results["b"] = s.post("/v1/completions", {"prompt": "the dog", "max_tokens": 2})

        t = threading.Thread(target=waiter)
        t.start()
        _wait(lambda: engine_loop.num_waiting == 1)
        start = time.monotonic()
        c = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert time.monotonic() - start < 1.0  # refused at once, not after waiting
        assert c.status_code == 429 and c.json()["error"]["type"] == "rate_limit_error"
        # Scoring (echo with max_tokens 0) runs between steps, but it waits in the same queue.
        d = s.post("/v1/completions", {"prompt": "the cat", "max_tokens": 0, "echo": True, "logprobs": 1})
        assert d.status_code == 429 and d.json()["error"]["type"] == "rate_limit_error"
        assert s.metric("haina_num_requests_waiting") == 1
    t.join(30)  # closing A freed the slot for B
    assert results["b"].status_code == 200
