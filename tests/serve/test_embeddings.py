"""POST /v1/embeddings: the official `openai` client, equality with `haina embed`'s pooling, input shapes, bad input."""

import base64

import httpx
import numpy as np
import openai
import pytest

from haina.generate.embed import Embedder
from haina.tokenizer import Tokenizer

TEXTS = ["the cat sat on the mat", "To be, or not to be", "héllo wörld café 日本語 😀", "the dog"]


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """What `haina embed` gives for TEXTS with the same checkpoint."""
    return Embedder.load(str(tiny_ckpt), device="cpu").embed(TEXTS)


def test_openai_client_gets_haina_embed_vectors(client, reference):
    # The client asks for base64 unless told otherwise, and decodes it; float is the JSON list.
    for fmt in (openai.NOT_GIVEN, "float"):
        r = client.embeddings.create(model="tiny", input=TEXTS, encoding_format=fmt)
        assert r.object == "list" and r.model == "tiny"
        assert [d.index for d in r.data] == [0, 1, 2, 3] and {d.object for d in r.data} == {"embedding"}
        got = np.array([d.embedding for d in r.data])
        assert got.shape == (4, 128)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, reference, atol=1e-5)  # the same pooling as `haina embed`, batched or not
        assert r.usage.prompt_tokens == r.usage.total_tokens > len(TEXTS)
    # One string alone, and the model's own dimension as `dimensions`, are accepted.
    one = client.embeddings.create(model="tiny", input=TEXTS[1], dimensions=128, encoding_format="float")
    assert len(one.data) == 1
    np.testing.assert_allclose(one.data[0].embedding, reference[1], atol=1e-5)


def test_base64_is_little_endian_float32_and_token_ids_embed_as_their_text(api_server, tiny_ckpt, reference):
    tok = Tokenizer.load(tiny_ckpt / "tokenizer")
    ids = [tok.encode(t) for t in TEXTS[:2]]
    for body in ({"input": ids}, {"input": ids[0]}):
        r = api_server.post("/v1/embeddings", {"model": "tiny", "encoding_format": "base64", **body})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
        np.testing.assert_allclose(got, reference[:len(data)], atol=1e-5)


def test_embeddings_while_chat_streams(api_server, reference):
    # Batches run on the engine thread between decode steps: both requests finish, the vector unchanged.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", api_server.url + "/v1/chat/completions", json=body, timeout=60) as chat:
        lines = chat.iter_lines()
        next(lines)
        r = api_server.post("/v1/embeddings", {"input": TEXTS[0], "encoding_format": "float"})
        assert any(line == "data: [DONE]" for line in lines)
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], reference[0], atol=1e-5)


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"input": "hi", "dimensions": 64}, 400, "dimensions", "cannot be shortened"),
    ({"input": ""}, 400, "input", "empty"),
    ({"input": ["a", ""]}, 400, "input.1", "empty"),
    ({"input": []}, 400, "input", "empty list"),
    ({"input": [[1], "a"]}, 400, "input", "a list of strings"),
    ({"input": [5, 100000]}, 400, "input", "outside the vocabulary"),
    ({"input": "the cat " * 200}, 400, "input", "tokens, more than"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format", ""),
    ({"input": "hi", "model": "other"}, 404, "model", "does not exist"),
])
def test_bad_requests_are_openai_errors(api_server, body, status, param, words):
    r = api_server.post("/v1/embeddings", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_an_ensemble_is_refused(launch, tiny_ckpt):
    with launch(tiny_ckpt, ensemble=(str(tiny_ckpt),), max_batch_size=2) as server:
        r = server.post("/v1/embeddings", {"input": "hi"})
    assert r.status_code == 400 and "ensemble" in r.json()["error"]["message"], r.text
