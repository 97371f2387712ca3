"""`haina serve`: an OpenAI-compatible HTTP server for a checkpoint."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from haina.core.errors import HainaError
from haina.core.log import info, logger, setup_logging

__all__ = ["check_adapters", "check_bindable", "is_loopback", "parse_adapters", "read_api_keys", "serve_command"]

# How long an idle kept-alive connection stays open. Longer than the idle expiry of the clients and proxies in
# front (httpx and the openai client 5 s, aiohttp 15 s, nginx and cloud load balancers 60 s), so that the client
# always closes first. With uvicorn's 5 s, a request sent on a connection in the instant the server closes it
# fails on the client ("Server disconnected without sending a response", ReadError): 4 in 3,840 httpx requests
# that reused connections after 4.85-5.05 s idle (none at 65 s), and 4 in 27,592 in benchmarks/serve_soak.py.
KEEP_ALIVE_S = 65


def serve_command(checkpoint: list[str], adapter: list[str] | None = None, weights: list[float] | None = None,
                  host: str = "127.0.0.1", port: int = 8000,
                  api_key: list[str] | None = None, api_key_file: str | None = None, max_batch_size: int | None = None,
                  max_queue: int = 256, max_model_len: int | None = None, served_model_name: str | None = None,
                  device: str = "auto", dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                  max_body_mb: float = 4.0, threads: int | None = None,
                  request_timeout: float | None = None, drain_timeout: float = 30.0,
                  log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
                  kv_cache: Literal["auto", "paged", "fixed"] = "auto", kv_budget_mb: float | None = None, *,
                  context: Callable[[], Any] | None = None) -> int:
    """Serve a checkpoint over HTTP with the OpenAI API (completions, chat, streaming), with continuous batching.

    With --adapter, one base serves several LoRA adapters at once: a request's `model` picks the base (its own
    name) or an adapter (the adapter's name), and requests for different adapters are batched together.
    Several --checkpoint are served as one ensemble: at every step their next-token probabilities are mixed
    (weighted by --weights), so they must share one tokenizer.

    Endpoints: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models, /tokenize, /detokenize,
    /tokenizer_info, /health (503 while the model loads, then 200), /metrics (Prometheus) and a chat
    playground at /. The model loads in the background, so /health answers at once.
    SIGTERM (or Ctrl-C) drains: requests in flight finish while new ones get 503, then the server exits
    with status 0; after --drain-timeout seconds, or at a second signal, what is left is cancelled.

    Args:
        checkpoint: checkpoint or training run directory (with a tokenizer); several make an ensemble.
        adapter: a LoRA adapter to serve on the base, as NAME=DIR (requests with model NAME use it) or DIR (named
            after the directory); repeat for several. DIR is a LoRA run or checkpoint directory trained on
            --checkpoint; its tokenizer, when it saved one, serves its requests. A single --checkpoint only.
        weights: the ensemble's weights, one per --checkpoint (e.g. 0.6,0.4), normalized to sum 1 (default: equal).
        host: address to bind; the default serves this machine only, 0.0.0.0 serves the network (without an
            API key, anyone who reaches the port may use the server: a warning says so).
        port: TCP port.
        api_key: accepted API keys (clients send 'Authorization: Bearer KEY'). A key on the command line is
            visible to every user of the machine (ps, /proc); prefer HAINA_API_KEY or --api-key-file, which add
            theirs. None of the three: no authentication.
        api_key_file: a file holding API keys, one per line (keep it readable by you only: chmod 600).
        max_batch_size: sequences decoded together (KV-cache slots); 1 serves one request at a time. Default: 64 on
            a GPU (a decode step there costs about the same for 1 or 64 sequences), 16 elsewhere.
        max_queue: most sequences waiting for a slot; beyond it requests get 429 at once.
        max_model_len: context length, prompt plus completion (default: the model's block size).
        served_model_name: the model name clients send (default: the checkpoint directory's name; an ensemble's
            names joined by '+').
        device: auto, cpu, cuda, cuda:1 or mps.
        dtype: the weights' precision: float32, bfloat16 (half the memory), or float16 (CUDA/MPS only).
        max_body_mb: largest request body accepted, in MiB (413 beyond).
        threads: torch intra-op CPU threads (default: torch's choice, one per core). Batched decode steps use
            them all; a server that decodes one request at a time (--max-batch-size 1) can be faster with one
            fewer, leaving a core to the HTTP thread (see benchmarks/serve_load.py).
        request_timeout: seconds a completion or chat request may take, from arrival to last token; beyond it
            the request is cancelled in the engine and answered 504 (a stream ends with an error event).
            Default: no limit.
        drain_timeout: seconds requests in flight may take to finish after SIGTERM before they are cancelled
            (503) and the server exits.
        log_level: how much uvicorn logs (info logs every request).
        kv_cache: paged (memory follows the tokens held), fixed (every slot's whole context reserved at start;
            what CUDA graphs replay), or auto: paged on a CPU, fixed on CUDA unless --kv-budget-mb is given.
        kv_budget_mb: the most memory the paged KV cache may take, in MiB; requests beyond it wait in the queue
            (and the newest running one goes back to it when the others outgrow it). Default: no bound.
        context: (Python API; `haina serve --rag` sets it) builds the provider that adds context to chat
            requests when the model loads: `ServiceConfig.context`.
    """
    # The options are checked first: their mistakes are then one line at once, before torch is even imported.
    keys = [k for k in (api_key or []) if k]
    if os.environ.get("HAINA_API_KEY", "").strip():
        keys.append(os.environ["HAINA_API_KEY"].strip())
    if api_key_file is not None:
        keys += read_api_keys(api_key_file)
    for name, value, low in (("--max-batch-size", max_batch_size, 1), ("--max-queue", max_queue, 1),
                             ("--port", port, 0)):
        if value is not None and value < low:
            raise HainaError(f"{name} must be at least {low}, got {value}")
    if max_body_mb <= 0:
        raise HainaError(f"--max-body-mb must be positive, got {max_body_mb}")
    if request_timeout is not None and not request_timeout > 0:
        raise HainaError(f"--request-timeout must be positive (seconds), got {request_timeout}")
    if not drain_timeout >= 0:
        raise HainaError(f"--drain-timeout must be 0 or more (seconds), got {drain_timeout}")
    if threads is not None and threads < 1:
        raise HainaError(f"--threads must be at least 1, got {threads}")
    adapters = parse_adapters(adapter or [])
    shown = f"[{host}]" if ":" in host else host
    if not keys and not is_loopback(host):
        _warn(f"warning: --host {host} serves the network without an API key: anyone who can reach port {port} "
              "can use this server; set HAINA_API_KEY or --api-key-file")

    import uvicorn

    from haina.generate.ensemble import ADAPTER_WITH_ENSEMBLE, as_checkpoints, check_members, mixture_weights
    from haina.model.checkpoint import verify_checkpoint
    from haina.serve.app import DrainingServer, create_app
    from haina.serve.service import Service, ServiceConfig

    checkpoints = as_checkpoints(checkpoint)
    mixture_weights(weights, len(checkpoints))
    if len(checkpoints) > 1 and adapters:
        raise HainaError(ADAPTER_WITH_ENSEMBLE)
    # A wrong path or a damaged checkpoint (checksums, config, weights header, tokenizer) fails here, before the
    # port is bound, not later in the background load; the digests are remembered, so that load does not rehash.
    for path in checkpoints:
        verify_checkpoint(path)
    if len(checkpoints) > 1:
        check_members(checkpoints)  # tokenizers and vocabularies: a mismatch is refused before the port is bound
    check_adapters(checkpoints[0], adapters)
    from haina.core.device import resolve_device, resolve_dtype
    from haina.generate.engine import check_kv_options

    check_kv_options(kv_cache, kv_budget_mb)  # before the port is bound, as the rest

    resolve_dtype(dtype, resolve_device(device))  # float16 on a CPU: refused before the port is bound
    if max_batch_size is None:
        max_batch_size = 64 if resolve_device(device).type == "cuda" else 16
    check_bindable(host, port)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    config = ServiceConfig(checkpoint=checkpoints[0], ensemble=tuple(checkpoints[1:]),
                           weights=tuple(weights or ()), served_model_name=served_model_name,
                           max_batch_size=max_batch_size, max_queue=max_queue, max_model_len=max_model_len,
                           device=device, dtype=dtype, api_keys=tuple(keys), max_body_bytes=int(max_body_mb * 1024 * 1024),
                           request_timeout=request_timeout, adapters=adapters, context=context,
                           kv_cache=kv_cache, kv_budget_mb=kv_budget_mb)
    service = Service(config)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    service.on_load_error = on_load_error
    app = create_app(config, service=service)
    # The drain happens before uvicorn's own shutdown starts, so that one has only stragglers to close.
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=2),
                            drain_timeout=drain_timeout)
    auth = f", {len(keys)} API key(s)" if keys else ", no API key"
    names = "', '".join(config.model_names)
    info(f"haina serve: http://{shown}:{port} (model{'s' if adapters else ''} '{names}'{auth}; loading in the "
         "background)")
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind, after logging why
        if not server.started:
            raise HainaError(f"cannot listen on {shown}:{port} (see the message above)") from None
        raise
    if failed:
        raise HainaError(f"cannot serve {' + '.join(checkpoints)}: {failed[0]}")
    return 0


def parse_adapters(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """(name, directory) of each `--adapter NAME=DIR` or `--adapter DIR` (named after the directory)."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or os.sep in name:  # DIR alone (a path may hold '=' after a slash)
            name, path = Path(spec).resolve().name, spec
        if not path:
            raise HainaError(f"--adapter {spec} names no directory; write --adapter NAME=DIR or --adapter DIR")
        out.append((name, path))
    return tuple(out)


def check_adapters(checkpoint: str, adapters: tuple[tuple[str, str], ...]) -> None:
    """Check each adapter's files and that its recorded base has the checkpoint's architecture, before the
    port is bound; that it was trained on these very weights is checked when the model loads (it needs them)."""
    if not adapters:
        return
    from haina.model.checkpoint import check_weights, load_config
    from haina.model.config import ModelConfig
    from haina.model.lora import ADAPTER_WEIGHTS, read_adapter_config, resolve_adapter

    base = load_config(checkpoint)
    for _, path in adapters:
        if not Path(path).exists():
            raise HainaError(f"--adapter {path} not found; point it at a LoRA run or checkpoint directory")
        directory = resolve_adapter(path)
        data = read_adapter_config(directory)
        check_weights(directory / ADAPTER_WEIGHTS)
        if ModelConfig.from_dict(data["model"]) != base:
            raise HainaError(f"adapter {directory} was trained on another base model (recorded base: "
                             f"{data['base'] or 'unknown'}); pass that model as --checkpoint")


def read_api_keys(path: str | Path) -> list[str]:
    """The API keys in a file, one per line (blank lines skipped); a missing, unreadable or empty file is an error.

    A file that other users can read gets a warning: it would expose the key as surely as argv does.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HainaError(f"--api-key-file {p} does not exist; write the key into it (one per line)") from None
    except UnicodeDecodeError:
        raise HainaError(f"--api-key-file {p} is not UTF-8 text; write the key into it (one per line)") from None
    except OSError as e:
        raise HainaError(f"cannot read --api-key-file {p}: {e.strerror or e}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    if not keys:
        raise HainaError(f"--api-key-file {p} is empty; write the key into it (one per line)")
    if os.name == "posix" and p.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        _warn(f"warning: --api-key-file {p} is readable by other users; chmod 600 it")
    return keys


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only (127.0.0.0/8, ::1, localhost, or a name resolving there)."""
    name = host.strip("[]")
    if not name:
        return False  # an empty host binds every interface
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(name, None)
    except OSError:
        return False  # unresolvable: binding fails anyway, and a warning too many does no harm
    return bool(found) and all(ipaddress.ip_address(str(a[4][0]).split("%")[0]).is_loopback for a in found)



def check_bindable(host: str, port: int) -> None:
    """Bind (and release) every address uvicorn will, so a taken port or a foreign address is one line, before
    the model starts loading. uvicorn binds again right after; a port taken in between fails there."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise HainaError(f"cannot listen on {shown}: {e.strerror or e}; check --host") from None
    for family, kind, proto, _, addr in found:
        try:
            s = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks (IPv6 off): asyncio skips it too
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server does on Unix
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise HainaError(f"cannot listen on {shown}: {e.strerror or e}; choose another --port or --host"
                                 ) from None


def _warn(message: str) -> None:
    setup_logging()
    logger.warning(message)
