"""The official `openai` client against a real server: completions and chat, streaming or not, n > 1, stop
strings, seeds, and echo + logprobs scoring that equals the engine's own log-likelihoods."""

import math

import openai
import pytest

from haina.generate.engine import Engine
from haina.model.checkpoint import load_model


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    model, tok = load_model(tiny_ckpt)
    return Engine(model, eos_token_id=tok.eos_id), tok


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_greedy_stream_equals_non_stream(client):
    kw = {"model": "tiny", "prompt": "the cat", "max_tokens": 10, "temperature": 0}
    full = client.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert full.usage.prompt_tokens > 0 and 0 < full.usage.completion_tokens <= 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_stream_and_non_stream(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6  # greedy picks the best


def test_n_samples_and_seeds(client):
    kw = {"model": "tiny", "prompt": "To be", "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7}
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeds reproduce
    assert len({c.text for c in a.choices}) > 1  # sample i uses seed + i
    # The first sample of n equals a lone request with the same seed.
    alone = client.completions.create(**{**kw, "n": 1})
    assert alone.choices[0].text == a.choices[0].text
    streamed = list(client.completions.create(**kw, stream=True))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(3)]
    assert texts == [c.text for c in a.choices]


def test_stop_string_truncates(client):
    base = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text[3:5] if len(text) >= 5 else text[-1]
    cut = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0, stop=[stop, "zzzz"])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_several_prompts_and_token_ids(client, reference):
    _, tok = reference
    ids = tok.encode("the dog")
    r = client.completions.create(model="tiny", prompt=["the cat", "To be"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy twice
    by_text = client.completions.create(model="tiny", prompt="the dog", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    by_lists = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=6, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == by_lists.choices[1].text


def test_echo_logprobs_equal_engine_scores(client, reference):
    engine, tok = reference
    text = "To be, or not to be"
    ids = tok.encode(text)
    expected = engine.score([ids])[0]
    for max_tokens in (0, 1):  # score only (as harnesses send) and with one generated token
        r = client.completions.create(model="tiny", prompt=text, max_tokens=max_tokens, echo=True, logprobs=1, temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith(text)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = lp.token_logprobs[:len(ids)]
        assert "".join(lp.tokens[:len(ids)]) == text
        assert all(math.isclose(g, e, abs_tol=1e-4) for g, e in zip(got[1:], expected[1:]))
        assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
        assert len(lp.tokens) == len(ids) + max_tokens
    # Token-id prompts score the same way (lm-eval sends ids).
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert all(math.isclose(g, e, abs_tol=1e-4) for g, e in zip(r.choices[0].logprobs.token_logprobs[1:],
                                                                   expected[1:]))


def test_errors_reach_the_client_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="x", max_tokens=2)
    assert e.value.body["type"] == "model_not_found" or "does not exist" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="the cat", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], top_p=0)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="tiny", prompt=[5, 99_999], max_tokens=2)


def test_echo_logprobs_of_a_one_token_prompt(client):
    # Nothing precedes the only token: one null entry; asking the engine for it used to fail the whole batch.
    for max_tokens in (0, 1):
        r = client.completions.create(model="tiny", prompt=[5], max_tokens=max_tokens, echo=True, logprobs=2)
        lp = r.choices[0].logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == 1 + max_tokens
    chunks = list(client.completions.create(model="tiny", prompt=[5, 6], max_tokens=1, echo=True, logprobs=0,
                                            stream=True))
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    chunks = list(client.completions.create(model="tiny", prompt=[[5], [5, 6]], max_tokens=2, echo=True, logprobs=0,
                                            stream=True))
    first = {}
    for c in chunks:
        first.setdefault(c.choices[0].index, c.choices[0].logprobs)
    assert sorted(first) == [0, 1] and all(lp.token_logprobs[0] is None for lp in first.values())
    assert len(first[1].tokens) >= 2  # the two-token prompt is echoed with its scored second token
