"""`haina serve` hardened, through real subprocesses and real HTTP: the network warning, API keys from the
environment and a file, the per-request timeout, and the graceful drain on SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.serve.command import is_loopback
from haina.serve.process import free_port, serve_subprocess
from haina.tokenizer.train import train_bpe

MODEL = "long"
TEXT = ["the cat sat on the mat and the dog ran to the park. " * 10, "To be, or not to be, that is the question. " * 10]


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """A tiny random model with an 8192-token context, so one request can run for seconds (thousands of steps)."""
    tok = train_bpe(TEXT, vocab_size=300, special_tokens=("<|endoftext|>", IM_START, IM_END))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hardening") / MODEL
    save_model(out, Transformer(ModelConfig.from_name("tiny", vocab_size=300, block_size=8192, n_layer=2)), tok)
    return out


def serve(ckpt, tmp_path, *args, env=None):
    env = {"HAINA_API_KEY": "", **(env or {})}  # a key in the developer's environment must not reach these servers
    # Two KV-cache slots: the 8192-token context costs 16 MiB of cache per slot.
    return serve_subprocess(ckpt, "--threads", "1", "--max-batch-size", "2", "--log-level", "warning", *args,
                            log_path=tmp_path / "serve.log", env=env, timeout=120)


def long_request(stream: bool = False, tokens: int = 8000) -> dict:
    # 8000 decode steps: over 4 s on an idle 2-core EPYC (a step of this tiny model is mostly fixed overhead).
    return {"model": MODEL, "prompt": "the cat", "max_tokens": tokens, "ignore_eos": True, "stream": stream}


def events(lines) -> list:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haina.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------ the network warning, API keys
def test_loopback_is_told_from_the_network():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "192.0.2.1", "10.1.2.3"):
        assert not is_loopback(host), host


def test_a_network_host_without_a_key_warns(long_ckpt, tmp_path):
    # 192.0.2.1 (TEST-NET-1, documentation only) is on no interface, so the server cannot bind it: the warning is
    # checked through the real command without ever serving the network from a test.
    with socket.socket() as s:
        try:
            s.bind(("192.0.2.1", 0))
            pytest.skip("this machine can bind 192.0.2.1 (ip_nonlocal_bind)")
        except OSError:
            pass
    port = str(free_port())
    r = run_cli("--checkpoint", str(long_ckpt), "--host", "192.0.2.1", "--port", port, env={"HAINA_API_KEY": ""})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("warning: --host 192.0.2.1 serves the network without an API key"), r.stderr
    assert "HAINA_API_KEY or --api-key-file" in lines[0]
    assert lines[1].startswith(f"error: cannot listen on 192.0.2.1:{port}") and len(lines) == 2
    # With a key from either place the warning goes; the address still cannot be bound, in one line.
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    key_file.chmod(0o600)
    for extra, env in (((), {"HAINA_API_KEY": "k"}), (("--api-key-file", str(key_file)), {"HAINA_API_KEY": ""})):
        r = run_cli("--checkpoint", str(long_ckpt), "--host", "192.0.2.1", "--port", port, *extra, env=env)
        assert r.returncode == 2 and "warning" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: cannot listen on") and len(r.stderr.strip().splitlines()) == 1


def test_a_taken_port_is_one_line(long_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("--checkpoint", str(long_ckpt), "--port", str(port))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and len(r.stderr.strip().splitlines()) == 1


def test_keys_from_the_environment_and_a_file(long_ckpt, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("\n  file-key  \n\n")
    key_file.chmod(0o644)  # readable by others: works, with a warning
    with serve(long_ckpt, tmp_path, "--api-key-file", str(key_file), env={"HAINA_API_KEY": "env-key"}) as server:
        body = {"model": MODEL, "prompt": "the", "max_tokens": 2}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        for key in ("env-key", "file-key"):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            assert client.completions.create(**body).choices[0].finish_reason == "length"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).completions.create(**body)
        log = server.log()
    assert "2 API key(s)" in log and "is readable by other users; chmod 600 it" in log
    assert "serves the network" not in log  # loopback: no warning


@pytest.mark.parametrize("content", [None, "", " \n\n"])
def test_a_missing_or_empty_key_file_is_one_line(long_ckpt, tmp_path, content):
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    r = run_cli("--checkpoint", str(long_ckpt), "--api-key-file", str(path))
    why = "does not exist" if content is None else "is empty"
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: --api-key-file {path} {why}") and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ the request timeout
def test_a_request_past_the_timeout_is_cancelled_with_an_error(long_ckpt, tmp_path):
    timeout = 0.8
    with serve(long_ckpt, tmp_path, "--request-timeout", str(timeout)) as server:
        start = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", json=long_request(), timeout=60)
        took = time.monotonic() - start
        err = r.json()["error"]
        assert r.status_code == 504 and err["code"] == 504 and err["type"] == "timeout_error", r.text
        assert "--request-timeout" in err["message"] and timeout <= took < timeout + 5

        # A stream has sent its status line already: it ends with an error event, then [DONE].
        with httpx.stream("POST", server.url + "/v1/completions", json=long_request(stream=True), timeout=60) as r:
            sent = events(r.iter_lines())
        assert r.status_code == 200 and sent[-1] == "[DONE]" and len(sent) > 3
        assert json.loads(sent[-2])["error"]["code"] == 504
        assert all("error" not in json.loads(e) for e in sent[:-2])

        # The official client raises it from the stream, as it does for OpenAI's own mid-stream errors.
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIError, match="request-timeout"):
            for _ in client.completions.create(model=MODEL, prompt="the dog", max_tokens=8000, stream=True,
                                               extra_body={"ignore_eos": True}):
                pass

        # Cancelled in the engine, not only on the wire: nothing runs on afterwards, and the server still answers.
        deadline = time.monotonic() + 10
        while metric(server.url, "haina_num_requests_running") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(server.url, "haina_num_requests_running") == 0
        assert metric(server.url, "haina_request_timeouts_total") == 3
        assert metric(server.url, 'haina_requests_total{finish_reason="abort"}') == 3
        r = httpx.post(server.url + "/v1/completions", json=long_request(tokens=4), timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_a_bad_timeout_is_refused(long_ckpt):
    for flag, value in (("--request-timeout", "0"), ("--drain-timeout", "-1")):
        r = run_cli("--checkpoint", str(long_ckpt), flag, value)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {flag} must be") and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ the drain
def test_sigterm_drains_then_exits_zero(long_ckpt, tmp_path):
    drain_timeout = 30.0
    with serve(long_ckpt, tmp_path, "--drain-timeout", str(drain_timeout)) as server:
        with httpx.stream("POST", server.url + "/v1/completions", json=long_request(stream=True),
                          timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))  # the request is in the engine
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)  # the drain starts at the server's next tick (0.1 s)
            r = httpx.post(server.url + "/v1/completions", json=long_request(tokens=2), timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == 503, r.text
            assert r.headers["connection"] == "close"
            health = httpx.get(server.url + "/health", timeout=30)
            assert health.status_code == 503 and health.json()["status"] == "draining"
            assert server.proc.poll() is None, "the server left before its request finished"
            sent = events([first, *lines])
        finished = time.monotonic()
        # The request in flight ran to its end: every token, no error, then [DONE].
        assert sent[-1] == "[DONE]" and all("error" not in json.loads(e) for e in sent[:-1])
        assert json.loads(sent[-2])["choices"][0]["finish_reason"] == "length"
        code = server.proc.wait(timeout=drain_timeout + 15)
        exited = time.monotonic()
    assert code == 0
    assert exited - signalled < drain_timeout and exited - finished < 10
    log = server.log()
    assert "draining: 1 request(s) in flight" in log and "drained: no request in flight" in log


def test_the_drain_timeout_cancels_what_is_left(long_ckpt, tmp_path):
    with serve(long_ckpt, tmp_path, "--drain-timeout", "1") as server:
        with httpx.stream("POST", server.url + "/v1/completions", json=long_request(stream=True),
                          timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            sent = events([first, *lines])
        code = server.proc.wait(timeout=30)
        exited = time.monotonic()
    assert code == 0 and exited - signalled < 1 + 10
    error = json.loads(sent[-2])["error"]
    assert sent[-1] == "[DONE]" and error["code"] == 503 and "drain timeout" in error["message"]
    assert "drain timeout: cancelling 1 request(s)" in server.log()
