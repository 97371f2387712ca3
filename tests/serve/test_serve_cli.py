"""`haina serve` as a user runs it: --help, and one real subprocess (health poll, one request, terminate)."""

import signal
import socket
import subprocess
import sys
import time

import httpx

from haina.serve.app import wait_healthy


def test_help_lists_the_options():
    r = subprocess.run([sys.executable, "-m", "haina.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    for flag in ("--checkpoint", "--host", "--port", "--api-key", "--max-batch-size", "--max-queue",
                 "--max-model-len", "--served-model-name", "--device"):
        assert flag in r.stdout


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "haina.cli", "serve", "--checkpoint", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: checkpoint not found") and "Traceback" not in r.stderr


def test_a_queue_of_zero_is_refused(tiny_ckpt):
    # Every sequence waits in the queue before its first step, so with no queue no request could ever run.
    r = subprocess.run([sys.executable, "-m", "haina.cli", "serve", "--checkpoint", str(tiny_ckpt), "--max-queue", "0"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "--max-queue must be at least 1" in r.stderr and "Traceback" not in r.stderr


def test_a_kv_budget_on_the_fixed_cache_is_refused(tiny_ckpt):
    r = subprocess.run([sys.executable, "-m", "haina.cli", "serve", "--checkpoint", str(tiny_ckpt), "--kv-cache",
                        "fixed", "--kv-budget-mb", "1"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: kv_budget_mb bounds the paged KV cache")
    assert r.stderr.count("\n") == 1


def test_serve_subprocess_answers_and_stops(tiny_ckpt, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "haina.cli", "serve", "--checkpoint", str(tiny_ckpt), "--port",
                             str(port), "--max-batch-size", "2", "--threads", "1", "--api-key", "k",
                             "--kv-budget-mb", "1"],  # a paged KV cache within a budget
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until it listens, then until the model is loaded
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "haina serve did not listen within 60 s"
                time.sleep(0.1)
        wait_healthy(url, timeout=60)
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                       json={"model": tiny_ckpt.name, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down cleanly, then re-raises the signal
    text = (tmp_path / "serve.log").read_text()
    assert f"http://127.0.0.1:{port}" in text.splitlines()[0] and "Finished server process" in text
