"""Server-sent events stay one line per event for every line reader."""

import asyncio
import json

from haina.serve.formats import sse


def _events(chunks: list[dict]) -> str:
    async def gen():
        for c in chunks:
            yield c

    async def collect() -> str:
        return "".join([s async for s in sse(gen())])

    return asyncio.run(collect())


def test_unicode_line_separators_in_generated_text_do_not_split_an_event():
    # A model may generate U+2028, U+2029 or NEL; str.splitlines-based readers (httpx's iter_lines) end lines there.
    text = "a\u2028b\u2029c\x85d é 中"
    body = _events([{"choices": [{"text": text}]}])
    lines = [line for line in body.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) == 2
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"] == text
    assert "é 中" in lines[0]  # still UTF-8 text, not ASCII escapes
