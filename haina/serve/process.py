"""`haina serve` as a child process on a free loopback port: for tests, benchmarks and scripts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerProcess", "free_port", "serve_process", "serve_subprocess"]

# Longer than a drain by default (30 s) plus uvicorn's shutdown, so that terminating never cuts a drain short.
STOP_TIMEOUT_S = 45.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A running `haina serve`: its base URL, the process and its log."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the server has printed so far (stdout and stderr)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (a drain), wait up to `timeout` seconds, then SIGKILL; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextlib.contextmanager
def serve_subprocess(checkpoint: str | Path, *args: str, log_path: str | Path, timeout: float = 120.0,
                     env: dict[str, str] | None = None, stop_timeout: float = STOP_TIMEOUT_S
                     ) -> Iterator[ServerProcess]:
    """Run `haina serve --checkpoint CHECKPOINT --port P ARGS…`; yield it once /health answers 200.

    The server's output goes to `log_path`; its tail is in the error when it exits or never becomes
    healthy (RuntimeError). When the block ends the server is stopped with SIGTERM (it drains), and
    killed if it has not exited `stop_timeout` seconds later.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "haina.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    with Path(log_path).open("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        server = ServerProcess(url, proc, Path(log_path))

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
            yield server
        finally:
            server.stop(stop_timeout)


@contextlib.contextmanager
def serve_process(checkpoint: str | Path, *args: str, log_path: str | Path, timeout: float = 120.0,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """`serve_subprocess`, yielding only the base URL."""
    with serve_subprocess(checkpoint, *args, log_path=log_path, timeout=timeout, env=env) as server:
        yield server.url


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
