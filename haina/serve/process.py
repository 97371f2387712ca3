"""`haina serve` as a child process on a free loopback port: for tests, benchmarks and scripts."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["free_port", "serve_process"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(checkpoint: str | Path, *args: str, log_path: str | Path, timeout: float = 120.0,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `haina serve --checkpoint CHECKPOINT --port P ARGS…`; yield its base URL once /health answers 200.

    The server's output goes to `log_path`; its tail is in the error when it exits or never becomes
    healthy (RuntimeError). The process is terminated (killed after 15 s) when the block ends.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "haina.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    with Path(log_path).open("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

        def tail() -> str:
            log.flush()
            log.seek(0)
            return log.read()[-3000:]

        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"haina serve exited with {proc.returncode}:\n{tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"haina serve did not become healthy within {timeout:g} s:\n{tail()}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        if e.code == 503 and json.loads(e.read() or b"{}").get("status") == "error":
            raise RuntimeError(f"haina serve failed to load its model: {e}") from None
        return False
    except OSError:  # not listening yet
        return False
