"""`haina serve`: an OpenAI-compatible HTTP server for a checkpoint."""

from __future__ import annotations

import os
from typing import Literal

from haina.core.errors import HainaError
from haina.core.log import info

__all__ = ["serve_command"]


def serve_command(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: list[str] | None = None,
                  max_batch_size: int = 16, max_queue: int = 256, max_model_len: int | None = None,
                  served_model_name: str | None = None, device: str = "auto", max_body_mb: float = 4.0,
                  threads: int | None = None,
                  log_level: Literal["critical", "error", "warning", "info", "debug"] = "info") -> int:
    """Serve a checkpoint over HTTP with the OpenAI API (completions, chat, streaming), with continuous batching.

    Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize,
    /tokenizer_info, /health (503 while the model loads, then 200), /metrics (Prometheus) and a chat
    playground at /. The model loads in the background, so /health answers at once.

    Args:
        checkpoint: checkpoint or training run directory (with a tokenizer).
        host: address to bind; the default serves this machine only, 0.0.0.0 serves the network.
        port: TCP port.
        api_key: accepted API keys (clients send 'Authorization: Bearer KEY'); the HAINA_API_KEY environment
            variable adds one. None: no authentication.
        max_batch_size: sequences decoded together (KV-cache slots); 1 serves one request at a time.
        max_queue: most sequences waiting for a slot; beyond it requests get 429 at once.
        max_model_len: context length, prompt plus completion (default: the model's block size).
        served_model_name: the model name clients send (default: the checkpoint directory's name).
        device: auto, cpu, cuda, cuda:1 or mps.
        max_body_mb: largest request body accepted, in MiB (413 beyond).
        threads: torch intra-op CPU threads (default: torch's choice, one per core). Batched decode steps use
            them all; a server that decodes one request at a time (--max-batch-size 1) can be faster with one
            fewer, leaving a core to the HTTP thread (see benchmarks/serve_load.py).
        log_level: how much uvicorn logs (info logs every request).
    """
    import uvicorn

    from haina.model.checkpoint import resolve_checkpoint
    from haina.serve.app import create_app
    from haina.serve.service import Service, ServiceConfig

    resolve_checkpoint(checkpoint)  # a wrong path fails here, at once, not later in the background load
    keys = [k for k in (api_key or []) if k]
    if os.environ.get("HAINA_API_KEY"):
        keys.append(os.environ["HAINA_API_KEY"])
    for name, value, low in (("--max-batch-size", max_batch_size, 1), ("--max-queue", max_queue, 1),
                             ("--port", port, 0)):
        if value < low:
            raise HainaError(f"{name} must be at least {low}, got {value}")
    if max_body_mb <= 0:
        raise HainaError(f"--max-body-mb must be positive, got {max_body_mb}")
    if threads is not None:
        if threads < 1:
            raise HainaError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    config = ServiceConfig(checkpoint=str(checkpoint), served_model_name=served_model_name,
                           max_batch_size=max_batch_size, max_queue=max_queue, max_model_len=max_model_len,
                           device=device, api_keys=tuple(keys), max_body_bytes=int(max_body_mb * 1024 * 1024))
    service = Service(config)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    service.on_load_error = on_load_error
    app = create_app(config, service=service)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    shown = f"[{host}]" if ":" in host else host
    auth = f", {len(keys)} API key(s)" if keys else ", no API key"
    info(f"haina serve: http://{shown}:{port} (model '{config.model_name}'{auth}; loading in the background)")
    server.run()
    if failed:
        raise HainaError(f"cannot serve {checkpoint}: {failed[0]}")
    return 0
