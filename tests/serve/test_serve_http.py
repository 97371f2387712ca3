"""HTTP behaviour: error shapes, API keys, body limits, health while loading, metrics, tokenizer endpoints."""

import threading

import httpx
import pytest

from haina.serve.service import load_checkpoint


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_errors_are_openai_shaped(api_server):
    s = api_server
    r = httpx.post(s.url + "/v1/completions", content=b'{"prompt": "x", ', timeout=30,
                   headers={"content-type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]
    err = assert_error(s.post("/v1/completions", {"prompt": "x", "temperature": -1}), 400)
    assert err["param"] == "temperature"
    assert_error(s.post("/v1/completions", {"prompt": "x", "max_tokens": 0}), 400)  # 0 only with echo
    assert_error(s.post("/v1/completions", {"prompt": "x", "top_p": 1.5}), 400)
    assert_error(s.post("/v1/completions", {"prompt": ""}), 400)
    assert_error(s.post("/v1/completions", {"prompt": [1, 2, 320]}), 400)  # outside the vocabulary
    assert_error(s.post("/v1/completions", {"prompt": "x " * 200, "max_tokens": 1}), 400)  # beyond the context
    assert_error(s.post("/v1/completions", {}), 400)
    assert_error(s.post("/v1/chat/completions", {"messages": []}), 400)
    # More sequences than the queue holds can never be admitted: 400, not a 429 that a client retries forever.
    assert assert_error(s.post("/v1/completions", {"prompt": ["a"] * 200, "n": 2, "max_tokens": 1}), 400)["param"]
    assert_error(s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                 "model": "nope"}), 404)
    assert_error(s.get("/v1/nothing"), 404)
    assert_error(s.get("/v1/completions"), 405)


def test_models_tokenize_detokenize_and_tokenizer_info(api_server):
    s = api_server
    assert s.get("/v1/models").json()["data"][0]["id"] == "tiny"
    r = s.post("/tokenize", {"prompt": "héllo wörld"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == 128
    assert s.post("/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "héllo wörld"}
    chat = s.post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    text = s.post("/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    info = s.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and "<|im_start|>" in info["chat_template"]
    assert info["model_max_length"] == 128 and info["vocab_size"] == 320
    assert_error(s.post("/tokenize", {}), 400)
    assert_error(s.post("/detokenize", {"tokens": [-1]}), 400)


def test_a_template_that_fails_on_the_messages_is_a_400(api_server, monkeypatch):
    # e.g. a template that assumes a system message first; a TypeError inside Jinja is the request's, not a 500
    monkeypatch.setattr(api_server.service.tokenizer, "chat_template", "{{ messages[0]['content'] + 1 }}")
    msgs = {"messages": [{"role": "user", "content": "hi"}]}
    assert "template" in assert_error(api_server.post("/v1/chat/completions", {**msgs, "max_tokens": 2}), 400)["message"]
    assert_error(api_server.post("/tokenize", msgs), 400)


def test_metrics_move_after_requests(api_server):
    s = api_server
    before = s.metric("haina_generation_tokens_total")
    ttft = s.metric("haina_time_to_first_token_seconds_count")
    errors = s.metric("haina_request_errors_total", 'status="400"')
    assert s.post("/v1/completions", {"prompt": "the cat", "max_tokens": 5, "temperature": 0,
                                      "ignore_eos": True}).status_code == 200
    s.post("/v1/completions", {"prompt": "x", "n": 0})
    text = s.get("/metrics").text
    for name in ("haina_inter_token_latency_seconds_bucket", "haina_e2e_request_latency_seconds_count",
                 "haina_request_queue_time_seconds_count", "haina_num_requests_running",
                 "haina_num_requests_waiting", "haina_prompt_tokens_total"):
        assert name in text
    assert s.metric("haina_generation_tokens_total") == before + 5
    assert s.metric("haina_time_to_first_token_seconds_count") == ttft + 1
    assert s.metric("haina_request_errors_total", 'status="400"') == errors + 1


def test_playground_page_is_served(api_server):
    r = api_server.get("/")
    assert r.status_code in (200, 404)  # the page itself is another helper's; / answers either way
    if r.status_code == 200:
        assert "text/html" in r.headers["content-type"]
    else:
        assert_error(r, 404)


def test_api_keys_and_body_limit(tiny_ckpt, launch):
    with launch(tiny_ckpt, api_keys=("k1", "sekret"), max_body_bytes=2048) as s:
        body = {"prompt": "the cat", "max_tokens": 2}
        assert assert_error(s.post("/v1/completions", body), 401)["type"] == "authentication_error"
        assert_error(s.post("/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(s.get("/v1/models", headers={"Authorization": "Basic sekret"}), 401)
        assert s.post("/v1/completions", body, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert s.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert s.get("/health").status_code == 200 and s.get("/metrics").status_code == 200  # public
        auth = {"Authorization": "Bearer k1"}
        assert_error(s.post("/v1/completions", {"prompt": "x" * 5000}, headers=auth), 413)

        def chunks():  # no Content-Length: the limit must hold on the bytes actually read
            for _ in range(10):
                yield b" " * 500

        r = httpx.post(s.url + "/v1/completions", content=chunks(), headers=auth, timeout=30)
        assert_error(r, 413)
        assert s.metric("haina_request_errors_total", 'status="413"') == 2


def test_health_is_503_while_loading_then_200(tiny_ckpt, launch):
    gate = threading.Event()

    def gated(config):
        gate.wait(30)
        return load_checkpoint(config)

    with launch(tiny_ckpt, loader=gated, wait=False) as s:
        r = s.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert_error(s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}), 503)
        gate.set()
        assert s.service.wait_ready(30)
        assert s.get("/health").json()["status"] == "ok"


def test_health_reports_a_failed_load(tiny_ckpt, launch):
    def broken(config):
        raise ValueError("weights are corrupt")

    with launch(tiny_ckpt, loader=broken, wait=False) as s:
        s.service.wait_ready(30)
        r = s.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error" and "corrupt" in r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unexpected_errors_are_500_in_openai_shape(api_server, monkeypatch, path):
    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api_server.service, "_require_ready", boom)
    body = {"prompt": "x"} if "chat" not in path else {"messages": [{"role": "user", "content": "x"}]}
    assert assert_error(api_server.post(path, body), 500)["type"] == "internal_server_error"


def test_a_failing_engine_step_fails_its_requests_and_the_server_recovers(api_server, monkeypatch):
    def broken_step():
        raise RuntimeError("device lost")

    body = {"prompt": "the cat", "max_tokens": 3}
    engine = api_server.service.loop.engine
    monkeypatch.setattr(engine, "step", broken_step)
    assert "device lost" in assert_error(api_server.post("/v1/completions", body), 500)["message"]
    assert api_server.service.loop.engine is not engine  # a fresh engine took over
    monkeypatch.setattr(api_server.service.loop.engine, "step", broken_step)
    streamed = api_server.post("/v1/completions", {**body, "stream": True})  # headers went out: an error event
    assert streamed.status_code == 200 and '"code": 500' in streamed.text and streamed.text.endswith("[DONE]\n\n")
    assert api_server.post("/v1/completions", body).status_code == 200
