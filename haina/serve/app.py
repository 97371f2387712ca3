"""The HTTP layer: thin FastAPI routes over `Service`, plus authentication, body limits and error shapes.

Every error leaves in the OpenAI shape `{"error": {"message", "type", "param", "code"}}`: pydantic
validation and malformed JSON become 400 (not FastAPI's 422), unknown routes 404, a request that
outlives the config's `request_timeout` 504, requests during a drain 503, and anything unexpected 500.
`DrainingServer` is uvicorn's server with a graceful drain on SIGTERM (`haina serve`);
`ServerThread` runs the app on uvicorn in a background thread (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from haina.core.errors import HainaError
from haina.core.log import info, logger
from haina.serve.loop import Cancelled
from haina.serve.metrics import CONTENT_TYPE_LATEST
from haina.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ErrorBody,
    TokenizeRequest,
    error_body,
)
from haina.serve.service import APIError, Loader, Service, ServiceConfig

__all__ = ["STATIC_DIR", "Drain", "DrainingServer", "ServerThread", "create_app", "wait_healthy"]

STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/health", "/metrics", "/", "/favicon.ico")
_ERRORS = {400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 404: {"model": ErrorBody},
           413: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody},
           504: {"model": ErrorBody}}
DRAIN_CANCEL_GRACE_S = 1.0  # after cancelling at the drain deadline: time for the error answers to go out


def _error(status: int, message: str, param: str | None = None, type: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, type), status_code=status)


class Drain:
    """What the `Gate` and the `DrainingServer` share: whether a drain is on, and the API requests in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0


def create_app(config: ServiceConfig, service: Service | None = None, loader: Loader | None = None) -> FastAPI:
    """The FastAPI app serving `config`; the model starts loading when the app starts up.

    Args:
        config: what to serve.
        service: a prepared service (default: one built from config and loader).
        loader: builds (model, tokenizer) from the config, e.g. a slow one in tests.
    """
    service = service or Service(config, loader=loader)
    drain = Drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="haina", description="OpenAI-compatible API for a haina checkpoint", lifespan=lifespan)
    app.state.service, app.state.drain = service, drain
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if drain.draining:  # load balancers take the server out of rotation before it goes
            return JSONResponse({"status": "draining", **_draining_body()}, status_code=503)
        if service.ready:
            return JSONResponse({"status": "ok", "model": config.model_name})
        status = "error" if service.load_error else "loading"
        body = error_body(503, service.load_error or "the model is still loading")
        return JSONResponse({"status": status, **body}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=_ERRORS)
    async def models() -> dict[str, Any]:
        return service.models()

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return _respond(await service.completions(body, request.is_disconnected))

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return _respond(await service.chat(body, request.is_disconnected))

    @app.post("/v1/embeddings", responses=_ERRORS)
    async def embeddings(body: EmbeddingRequest) -> Any:
        return _respond(await service.embeddings(body))

    @app.post("/tokenize", responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return service.tokenize(body)

    @app.post("/detokenize", responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return service.detokenize(body)

    @app.get("/tokenizer_info", responses=_ERRORS)
    async def tokenizer_info() -> dict[str, Any]:
        return service.tokenizer_info()

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return _error(404, "the playground page is not installed (haina/serve/static/index.html)")
        return FileResponse(page, media_type="text/html")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(Gate, service=service, drain=drain)  # type: ignore[arg-type]
    return app


def _respond(result: Any) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    # Proxies (nginx) buffer responses unless told not to; a token stream must not wait in a buffer.
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _draining_body() -> dict[str, Any]:
    return error_body(503, "the server is shutting down and takes no new requests; retry on another instance")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return _error(e.status, e.message, e.param, e.type)

    @app.exception_handler(HainaError)
    async def haina_error(request: Request, e: HainaError) -> Response:
        return _error(400, str(e))

    @app.exception_handler(Cancelled)  # a request past --request-timeout (504) or cut off by a drain (503)
    async def cancelled(request: Request, e: Cancelled) -> Response:
        return _error(e.status, e.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", type="invalid_request_error")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        where = f" at '{param}'" if param else ""
        extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        return _error(400, f"{msg}{where}{extra}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        message = "no such route" if e.status_code == 404 else str(e.detail)
        return _error(e.status_code, f"{message}: {request.method} {request.url.path}")


class Gate:
    """Pure ASGI middleware in front of the app: API keys, the body-size limit, the drain, error counting,
    and a catch-all.

    It reads the body up front (at most the limit) and replays it to the app, so an oversized body
    is refused with 413 whatever its Content-Length claims. Afterwards `receive` goes to the client
    again, so a streaming response still notices when the client leaves. It counts the API requests
    in flight, which a drain waits for, and during a drain answers new ones 503.
    """

    def __init__(self, app, service: Service, drain: Drain | None = None):
        self.app, self.service = app, service
        self.drain = drain or Drain()
        self.keys = [k.encode() for k in service.config.api_keys]
        self.limit = service.config.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = {"status": 0}

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
                if message["status"] >= 400:
                    self.service.metrics.errors.labels(str(message["status"])).inc()
            await send(message)

        async def reply(response: Response) -> None:
            await response(scope, receive, send_counted)

        public = self._public(scope["path"])
        if self.drain.draining and not public:
            # Connection: close, so that a client on a kept-alive connection opens its next one elsewhere.
            return await reply(JSONResponse(_draining_body(), status_code=503, headers={"Connection": "close"}))
        if self.keys and not public and not self._authorized(scope):
            return await reply(_error(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                                      type="authentication_error"))
        # Counted before the body is read (an await): a drain starting meanwhile must wait for this request,
        # which passed the drain check, rather than exit under it.
        if not public:
            self.drain.in_flight += 1
            self.service.metrics.in_flight.inc()
        try:
            body, too_big = await self._read_body(scope, receive)
            if too_big:
                return await reply(_error(413, f"the request body exceeds the limit of {self.limit} bytes"))
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_counted)
        except Exception:  # noqa: BLE001 - the last line of defence: a 500 in the OpenAI shape, logged
            logger.exception("unhandled error")
            if not started["status"]:
                await reply(_error(500, "internal server error; see the server log"))
        finally:
            if not public:
                self.drain.in_flight -= 1
                self.service.metrics.in_flight.dec()

    def _public(self, path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith("/static/")

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # Compare against every key (no early exit) so timing does not reveal which one nearly matched.
        matches = [hmac.compare_digest(token, k) for k in self.keys]
        return any(matches)

    async def _read_body(self, scope, receive) -> tuple[bytes, bool]:
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.limit:
                    return b"", True
            except ValueError:
                pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a graceful drain on SIGTERM or SIGINT (the app must come from `create_app`).

    The first signal starts a drain: the server keeps listening but answers every new API request,
    and /health, with 503 (so clients and load balancers go elsewhere), while the requests in flight
    run to their end. When none is left it exits, and the process with status 0: the signal was
    handled, so it is not raised again as uvicorn does. At `drain_timeout` seconds, or at a second
    signal, the requests still running are cancelled in the engine and answered 503 (a stream with an
    error event), and the server exits about a second later.

    Args:
        config: uvicorn's config; `config.app` is the app from `create_app`.
        drain_timeout: seconds the requests in flight may take to finish once a drain starts.
    """

    def __init__(self, config: uvicorn.Config, drain_timeout: float):
        super().__init__(config)
        self.drain: Drain = config.app.state.drain
        self.service: Service = config.app.state.service
        self.drain_timeout = drain_timeout
        self._deadline = 0.0
        self._announced = False
        self._cancelled_at: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler interrupts the event loop's thread anywhere: set flags only, on_tick does the work.
        if self.drain.draining:
            self._deadline = 0.0  # a second signal: cancel what is left now
        else:
            self._deadline = time.monotonic() + self.drain_timeout
            self.drain.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and self._drained():
            return True
        return await super().on_tick(counter)

    def _drained(self) -> bool:
        """One step of the drain (every 0.1 s on the event loop); True when the server may exit."""
        now = time.monotonic()
        left = self.drain.in_flight
        if not self._announced:
            self._announced = True
            self.service.metrics.draining.set(1)
            info(f"draining: {left} request(s) in flight, new requests get 503; exiting when they finish or in "
                 f"{max(0.0, self._deadline - now):.1f} s")
        if left == 0:
            info("drained: no request in flight; exiting")
            return True
        if self._cancelled_at is None and now >= self._deadline:
            self._cancelled_at = now
            info(f"drain timeout: cancelling {left} request(s) still in flight")
            if self.service.loop is not None:
                self.service.loop.cancel_all(Cancelled("the server shut down before this request finished "
                                                       "(its drain timeout ran out); retry on another instance"))
        # Past the grace, uvicorn's own shutdown closes what remains (cancelling requests not in the engine).
        return self._cancelled_at is not None and now >= self._cancelled_at + DRAIN_CANCEL_GRACE_S


class ServerThread:
    """Serve an app with uvicorn on a background thread, on a free loopback port unless one is given.

    Use as a context manager (`with ServerThread(app) as server: server.url`), or `start()` / `stop()`.

    Args:
        app: the ASGI app (e.g. from `create_app`).
        host: address to bind.
        port: port to bind; 0 picks a free one (see `port` after start).
        log_level: uvicorn's log level.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="haina-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Self:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    """Poll GET {url}/health until it answers 200 (RuntimeError after `timeout` seconds)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 503 and json.loads(e.read() or b"{}").get("status") == "error":
                raise RuntimeError(f"the server failed to load its model: {e}") from None
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout} s")
