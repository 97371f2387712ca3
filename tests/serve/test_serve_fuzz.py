"""Property-based fuzzing of request bodies: whatever a client sends, the answer is never a 500, errors keep the
OpenAI shape, and the engine keeps serving other requests exactly as before."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Any JSON value, small.
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
TEXT = st.text(max_size=30)
TOKENS = st.lists(st.integers(-2, 400), max_size=6)


SAMPLING = {
    "model": st.sampled_from(["fuzz", "other", ""]),
    "max_tokens": st.integers(-2, 6),
    "temperature": st.floats(-1, 3) | st.sampled_from([0, 1e-9, 1e-30, 100, 101]),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 400),
    "min_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 4),
    "stop": st.none() | TEXT | st.lists(TEXT, max_size=3),
    "seed": st.none() | st.integers(-5, 2**64),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3) | st.sampled_from([1e-300, 1e300]),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
}
PROMPT = TEXT | TOKENS | st.lists(TEXT, max_size=3) | st.lists(TOKENS, max_size=3)
COMPLETION = {"logprobs": st.integers(-1, 25), "echo": st.booleans(), "best_of": st.integers(0, 3)}
CONTENT = TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}))
ROLE = st.sampled_from(["user", "system", "assistant", "tool"])
CHAT = {"logprobs": st.booleans(), "top_logprobs": st.integers(-1, 25), "max_completion_tokens": st.integers(-1, 6)}


def bodies(noisy: bool):
    """Request bodies whose fields are of the right kind near the edges of their ranges, or (noisy) sometimes
    any JSON at all."""

    def f(plausible):
        return st.one_of(plausible, plausible, JSON) if noisy else plausible

    completion = st.fixed_dictionaries({"prompt": f(PROMPT)},
                                       optional={k: f(v) for k, v in {**SAMPLING, **COMPLETION}.items()})
    message = st.fixed_dictionaries({"role": f(ROLE), "content": f(CONTENT)})
    chat = st.fixed_dictionaries({"messages": f(st.lists(message, max_size=3))},
                                 optional={k: f(v) for k, v in {**SAMPLING, **CHAT}.items()})
    return st.tuples(st.just("/v1/completions"), completion) | st.tuples(st.just("/v1/chat/completions"), chat)


ANY_JSON = st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]), JSON)
REQUESTS = st.one_of(bodies(noisy=False), bodies(noisy=True), ANY_JSON)


@pytest.fixture(scope="module")
def server(tiny_ckpt, launch, one_torch_thread):
    # A short context keeps chat requests without max_tokens cheap.
    with launch(tiny_ckpt, served_model_name="fuzz", max_model_len=48, max_batch_size=8, max_queue=64) as s:
        yield s


def check(client: httpx.Client, path: str, body) -> None:
    r = client.post(path, content=json.dumps(body))
    assert r.status_code != 500 and r.status_code < 600, (path, body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for ln in lines[:-1]:
            assert "error" not in json.loads(ln[6:]), (path, body, ln)


def test_fuzzed_bodies_never_give_500(server):
    probe = {"prompt": "the cat", "max_tokens": 6, "temperature": 0}
    before = server.post("/v1/completions", probe).json()["choices"][0]["text"]
    with httpx.Client(base_url=server.url, timeout=60, headers={"content-type": "application/json"}) as client:

        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(REQUESTS)
        def run(request):
            check(client, *request)

        run()
        for raw in (b"", b"{", b"\xff\xfe", b"[1, 2", b'{"prompt": NaN}', b"null", b'"x"'):
            r = client.post("/v1/completions", content=raw)
            assert r.status_code == 400, (raw, r.text)
    assert server.service.loop.engine.num_running == 0
    # Nothing above disturbed the engine: the same request gives the same answer.
    assert server.post("/v1/completions", probe).json()["choices"][0]["text"] == before
