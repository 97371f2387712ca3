"""Serving: an OpenAI-compatible HTTP API over the generation engine.

`protocol` holds the wire format (pydantic), `service` turns requests into engine work (with
`loop`, the one thread that steps the engine, and `formats`, the response bodies), `app` wires
thin FastAPI routes, and `command` is `haina serve`.
"""
