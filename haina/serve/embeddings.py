"""/v1/embeddings: the served model's final hidden states, pooled as `haina embed` reads a haina model.

Pooling goes through the classifier's `encode` and `pool`: the last token, an appended end-of-text, for a causal
model; the mean for an encoder. Vectors are L2-normalized, as OpenAI's embeddings are, and computed a batch at a
time on the engine thread between its decode steps, so that embedding requests never stall generation for long.

This module sits above `haina.serve.service` (it answers with its `APIError`); `Service.embeddings` imports it when
the first embedding request comes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from haina.serve.formats import embedding_response
from haina.serve.loop import QueueFull
from haina.serve.protocol import EmbeddingRequest
from haina.serve.service import APIError, Service
from haina.tokenizer import Tokenizer

__all__ = ["Pooler", "embed"]


async def embed(service: Service, req: EmbeddingRequest) -> dict[str, Any]:
    """OpenAI's embedding list for `req`: one unit vector per input, in input order.

    Builds the service's `Pooler` on the first call (on the engine thread: nothing else touches the model or
    the RNG meanwhile) and keeps it on the service.
    """
    loop, base_tok = service._require_ready()
    served = service.check_model(req.model)
    if service.config.ensemble:
        raise APIError(400, "this server serves an ensemble, whose members' hidden states make no one embedding; "
                       "serve a single --checkpoint for /v1/embeddings", param="model")
    if service._pooler is None:
        service._pooler = await asyncio.wrap_future(loop.call(lambda engine: Pooler(engine.model, base_tok)))
    pooler, tok = service._pooler, served.tokenizer
    if req.dimensions is not None and req.dimensions != pooler.dim:
        raise APIError(400, f"dimensions={req.dimensions}, but this model's embeddings have {pooler.dim} and "
                       "cannot be shortened; leave dimensions out", param="dimensions")
    inputs = req.input
    one = isinstance(inputs, str) or isinstance(inputs[0], int)
    raw = []
    for i, x in enumerate([inputs] if one else inputs):
        where = "input" if one else f"input.{i}"
        ids = tok.encode(x) if isinstance(x, str) else list(x)
        if not ids:
            raise APIError(400, f"{where} is empty; give at least one character or token", param=where)
        service._check_ids(ids, service.vocab_size, what=where)
        if len(ids) > pooler.room:
            raise APIError(400, f"{where} has {len(ids)} tokens, more than the {pooler.room} this model embeds "
                           "at once; shorten or split it", param=where)
        raw.append(ids)
    seqs = pooler.frame(raw, tok)
    vectors = np.zeros((len(seqs), pooler.dim), dtype=np.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad little
    size = service.config.max_batch_size
    for start in range(0, len(order), size):  # a batch per call: decode steps go on in between
        rows = order[start:start + size]
        try:
            fut = loop.call(lambda engine, b=[seqs[i] for i in rows]: pooler.pool(b, served.adapter), queued=True)
        except QueueFull as e:
            raise APIError(429, str(e)) from None
        vectors[rows] = await asyncio.wrap_future(fut)
    tokens = sum(map(len, seqs))
    service.metrics.prompt_tokens.inc(tokens)
    return embedding_response(vectors, req.encoding_format, served.name, tokens)


class _Pretokenized:
    """A tokenizer whose "texts" are token ids already, so that the classifier frames ids as it frames text."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    @staticmethod
    def encode_batch(items: list[list[int]]) -> list[list[int]]:
        return [list(ids) for ids in items]


class Pooler:
    """The served model's embeddings, read as `haina embed` reads a haina model: the classifier's `encode` (an
    appended end-of-text; an encoder's [CLS] ... [SEP]) and `pool` (the last token for a causal model, the mean
    for an encoder), scaled to unit length."""

    def __init__(self, model: Any, tokenizer: Tokenizer):
        import torch

        from haina.model.classifier import Classifier, ClassifierConfig
        from haina.model.lora_serving import adapter_selection

        pooling = "last" if model.cfg.causal else "mean"
        with torch.random.fork_rng(devices=[]):  # the unused head's initialization must not move the RNG
            self.reader = Classifier(model, ClassifierConfig(labels=("_", "__"), pooling=pooling), tokenizer)
        self.selection = adapter_selection(model)
        self.device = next(model.parameters()).device
        self.dim = model.cfg.n_embd
        self.pad_id = tokenizer.eos_id
        self.room = model.cfg.block_size - len(self.frame([[]], tokenizer)[0])  # tokens of text read whole

    def frame(self, ids: list[list[int]], tok: Tokenizer) -> list[list[int]]:
        """Token ids of texts as the model reads them to embed them."""
        return self.reader.encode(ids, tokenizer=_Pretokenized(tok))[0]  # type: ignore[arg-type]

    def pool(self, seqs: list[list[int]], adapter: int) -> np.ndarray:
        """(len(seqs), dim) unit vectors; run on the engine thread, between its steps."""
        import torch

        from haina.model.classifier import pad_batch

        if self.selection is not None:
            self.selection.select(adapter, self.device)
        idx, lengths = pad_batch(seqs, self.pad_id, self.device)
        with torch.inference_mode():
            v = self.reader.pool(idx, lengths).float()  # (B, C)
        return torch.nn.functional.normalize(v, dim=-1).cpu().numpy()
