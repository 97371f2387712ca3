"""The drain's count of requests in flight, at the ASGI level: a request that passed the drain check while its
body was still arriving is counted, so a drain that starts meanwhile waits for it instead of exiting under it."""

import asyncio
from types import SimpleNamespace

from haina.serve.app import Drain, Gate
from haina.serve.metrics import ServeMetrics


def test_a_request_whose_body_is_still_arriving_counts_as_in_flight():
    service = SimpleNamespace(config=SimpleNamespace(api_keys=[], max_body_bytes=1 << 20), metrics=ServeMetrics())
    drain = Drain()
    reached_app = []

    async def app(scope, receive, send):
        reached_app.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def main():
        gate = Gate(app, service, drain)
        body_arrives = asyncio.Event()

        async def receive():
            await body_arrives.wait()  # a slow client: the body is not here yet
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            pass

        scope = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": []}
        task = asyncio.create_task(gate(scope, receive, send))
        await asyncio.sleep(0.01)  # the gate is now waiting for the body
        drain.draining = True
        assert drain.in_flight == 1  # the drain must wait for it (before the fix: 0, and the server exited)
        body_arrives.set()
        await task
        assert drain.in_flight == 0

    asyncio.run(main())
    assert reached_app == [b"{}"]
