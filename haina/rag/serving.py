"""`haina serve --rag NAME`: chat completions grounded in a collection, with the sources in the answer.

The server stage knows nothing of retrieval: it takes a context provider (`ServiceConfig.context`) and calls it
with every chat request's messages (unless the request sends `"haina_rag": false`). `RagContext` is that
provider: it searches the collection for the last user message (`Retriever`, hybrid by default), puts the hits
into a system message as numbered sources with the instruction to cite them as [1], [2], and returns the
sources, which the server answers under `sources`:

    "sources": [{"n": 1, "id": "docs/guide.md:0", "source": "docs/guide.md", "score": 0.032, "text": "..."}]

at the top level of a chat completion, and of the first chunk of a stream. `n` is the number the model was told
to cite; `score` is the retrieval mode's (see `haina.rag.retrieve`); `text` is what the model was given. Sources
that would not leave the answer room in the model's context are dropped from the last, and the last one left is
shortened if need be. When nothing matches, the system message tells the model to say it does not know.

`serve_rag_command` is `haina serve` with the --rag options added: its signature and help are serve's own
(`haina.serve.command.serve_command`, read when this module loads) followed by the --rag ones, so that the two
cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_type_hints

from haina.core.errors import HainaError
from haina.rag.command import STORE_DEFAULT
from haina.serve.command import serve_command

__all__ = ["RagContext", "serve_rag_command", "with_sources"]

Messages = list[dict[str, str]]
MAX_TOP_K = 50
MIN_SOURCE_CHARS = 40  # a source cut shorter than this says too little to be worth its place
INSTRUCTIONS = ("Answer using the numbered sources below, and cite the ones you use by number, as in [1]. If "
                "they do not contain the answer, say that you do not know.")
NOTHING_FOUND = ("The knowledge base has nothing on this question: say that you do not know rather than guess.")


def with_sources(messages: Messages, sources: list[dict[str, Any]]) -> Messages:
    """The conversation with the numbered sources (or, with none, the note that nothing was found) in its system
    message: appended to the first message when that is a system message (templates want one, first), else
    a new system message before the others."""
    if sources:
        listed = "\n\n".join(f"[{s['n']}] {s['source']}\n{s['text']}" for s in sources)
        block = f"{INSTRUCTIONS}\n\n{listed}"
    else:
        block = NOTHING_FOUND
    if messages and messages[0].get("role") == "system":
        head = messages[0]
        content = f"{head.get('content', '')}\n\n{block}" if head.get("content") else block
        return [{**head, "content": content}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


class RagContext:
    """The context provider of `haina serve --rag` (see the module docstring); built when the model loads.

    Args:
        collection: the collection to search.
        store: the embedded store's directory (ignored with `server`).
        server: a Chroma server URL.
        backend: chroma or exact.
        top_k: sources per answer (fewer when they do not fit the model's context).
        mode: hybrid, dense or bm25 (a BM25-only collection is searched by BM25 whatever the mode).
        bm25_dir: where the collection's BM25 index lives (None: beside the store).
        device: where the query embedder runs.
    """

    def __init__(self, collection: str, *, store: str = STORE_DEFAULT, server: str | None = None,
                 backend: str = "chroma", top_k: int = 8, mode: str = "hybrid", bm25_dir: str | None = None,
                 device: str = "auto"):
        from haina.rag.retrieve import Retriever
        from haina.rag.store import open_store

        self.collection, self.top_k, self.mode = collection, top_k, mode
        self.store = open_store(backend, store, server)
        self.retriever = Retriever(self.store, collection, bm25_dir=bm25_dir, device=device)
        # Loaded now, not at the first question: a broken index or embedder is a load error that /health reports.
        if mode != "dense" or self.retriever.bm25_only:
            self.retriever.bm25()
        if mode != "bm25" and not self.retriever.bm25_only:
            _ = self.retriever.embedder

    def describe(self) -> dict[str, Any]:
        return {"collection": self.collection, "top_k": self.top_k,
                "mode": "bm25" if self.retriever.bm25_only else self.mode}

    def __call__(self, messages: Messages, fits: Callable[[Messages], bool]) -> tuple[Messages, list[dict[str, Any]]]:
        query = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        if not query.strip():  # nothing asked (an assistant prefill, an empty message): nothing to look up
            return messages, []
        hits = self.retriever.search(query, top_k=self.top_k, mode=self.mode)
        sources = [{"n": n, "id": h.id, "source": str(h.metadata.get("source") or h.metadata.get("file") or h.id),
                    "score": float(h.score), "text": h.text} for n, h in enumerate(hits, start=1)]
        return fit_sources(messages, sources, fits)

    def close(self) -> None:
        self.store.close()


def fit_sources(messages: Messages, sources: list[dict[str, Any]], fits: Callable[[Messages], bool]
                ) -> tuple[Messages, list[dict[str, Any]]]:
    """The conversation with as many sources as leave room for the answer: the last ones dropped first, the last
    one left halved until it fits (or too short to keep). None fitting: the conversation as it came."""
    kept = list(sources)
    while True:
        candidate = with_sources(messages, kept)
        if fits(candidate):
            return candidate, kept
        if not kept:
            return messages, []
        if len(kept) > 1:
            kept.pop()
            continue
        text = kept[0]["text"]
        if len(text) // 2 < MIN_SOURCE_CHARS:
            return messages, []  # no source fits; the "nothing found" note would be untrue
        kept[0] = {**kept[0], "text": text[:len(text) // 2].rstrip() + " …"}


# ---------------------------------------------------------------------------------------- haina serve --rag
def serve_rag_command(*args: Any, rag: str | None = None, rag_store: str = STORE_DEFAULT,
                      rag_server: str | None = None, rag_backend: Literal["chroma", "exact"] = "chroma",
                      rag_top_k: int = 8, rag_mode: Literal["hybrid", "dense", "bm25"] = "hybrid",
                      rag_bm25_dir: str | None = None, **serve_args: Any) -> int:
    """With --rag NAME, every chat completion is grounded in collection NAME: the passages retrieved for the
    last user message go into the system message as numbered sources the model is told to cite, and the
    answer lists them under "sources" (a stream: in its first chunk). A request with "haina_rag": false skips
    retrieval; the playground has a toggle for it, and a panel showing the sources of the last answer.

    Args:
        rag: the collection chat completions retrieve from (`haina rag index --collection NAME`).
        rag_store: the embedded store holding it (ignored with --rag-server).
        rag_server: a Chroma server holding it (http://HOST:PORT).
        rag_backend: the store's backend, chroma or exact.
        rag_top_k: sources per answer; fewer when they would not leave the answer room in the context.
        rag_mode: hybrid (dense + BM25), dense or bm25; a collection indexed without an embedder is BM25-only.
        rag_bm25_dir: where the collection's BM25 index lives, if it was indexed with --bm25-dir.
    """
    if rag is None:
        return serve_command(*args, **serve_args)
    if not 1 <= rag_top_k <= MAX_TOP_K:
        raise HainaError(f"--rag-top-k must be between 1 and {MAX_TOP_K}, got {rag_top_k}")
    if rag_mode not in ("hybrid", "dense", "bm25"):
        raise HainaError(f"--rag-mode {rag_mode} is not one of hybrid, dense, bm25")
    check_collection(rag, rag_store, rag_server, rag_backend, rag_mode)
    context = functools.partial(RagContext, rag, store=rag_store, server=rag_server, backend=rag_backend,
                                top_k=rag_top_k, mode=rag_mode, bm25_dir=rag_bm25_dir,
                                device=serve_args.get("device", "auto"))
    return serve_command(*args, **serve_args, context=context)


def check_collection(name: str, store: str, server: str | None, backend: str, mode: str) -> None:
    """Refuse a missing store or collection, an empty one, or dense search on a BM25-only one, before the server
    starts (a store is never created here)."""
    from haina.rag.index import is_bm25_only
    from haina.rag.store import open_store

    if server is None and not Path(store).is_dir():
        raise HainaError(f"--rag-store {store} does not exist; index documents into it first (haina rag index "
                         f"--input PATH --collection {name} --store {store})")
    with open_store(backend, store, server) as s:
        info = s.get_collection(name)
    if not info.count:
        raise HainaError(f"collection {name!r} is empty; index documents into it first (haina rag index --input PATH "
                         f"--collection {name})")
    if mode == "dense" and is_bm25_only(info):
        raise HainaError(f"collection {name!r} is BM25-only (indexed without an embedder); use --rag-mode bm25 or "
                         "hybrid")


def _compose_cli() -> None:
    """Give `serve_rag_command` serve's options then its own, for the typed CLI (signature, hints, help)."""
    own = inspect.signature(serve_rag_command)
    serve = inspect.signature(serve_command)
    params = [p for name, p in serve.parameters.items() if name != "context"]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in own.parameters.items()
               if name.startswith("rag")]
    serve_rag_command.__signature__ = inspect.Signature(params, return_annotation=int)  # type: ignore[attr-defined]
    hints = {k: v for k, v in get_type_hints(serve_command).items() if k != "context"}
    serve_rag_command.__annotations__ = {**hints, **{k: v for k, v in get_type_hints(serve_rag_command).items()
                                                     if k.startswith("rag")}}
    serve_doc, own_doc = inspect.getdoc(serve_command) or "", inspect.getdoc(serve_rag_command) or ""
    serve_text, _, serve_args = serve_doc.partition("\nArgs:\n")
    own_text, _, own_args = own_doc.partition("\nArgs:\n")
    # serve's `context` (Python only) goes, with its continuation lines.
    serve_args = re.sub(r"^ {4}context:.*\n?(?:^ {8}.*\n?)*", "", serve_args, flags=re.MULTILINE)
    serve_rag_command.__doc__ = (f"{serve_text.rstrip()}\n\n{own_text.rstrip()}\n\nArgs:\n"
                                 f"{serve_args.rstrip()}\n{own_args.rstrip()}\n")


_compose_cli()
