"""Requests in, engine work out: validation, tokenization, streaming, detokenization and stop strings.

The `Service` loads the checkpoint on a background thread (so the HTTP server answers /health at
once), then runs one `EngineLoop`. Each HTTP request becomes one engine sequence per prompt and
sample; its events come back on the request's own asyncio queue, where they are turned into text
(incrementally, UTF-8 safe) and checked for stop strings (`haina.serve.sequences`). A stop string hit aborts
the engine request so its slot frees at the next step. Everything a request could get wrong is checked
before anything is submitted, so a bad request never reaches the engine thread.

With LoRA adapters (`ServiceConfig.adapters`) one base serves several models: a request's `model`
names the base or one adapter, each with its own tokenizer (a fine-tuning run may have added chat
tokens), and the engine runs requests for different adapters in the same batch.

With several checkpoints (`ServiceConfig.ensemble`) the model is an ensemble (`haina.generate.ensemble`): one
engine, whose every step mixes the members' next-token probabilities.

With a context provider (`ServiceConfig.context`, `haina serve --rag`) a chat request's messages pass through it
before they are rendered (`haina.serve.context`). /v1/embeddings pools the served model's final hidden states
(`haina.serve.embeddings`).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haina.core.errors import HainaError
from haina.core.log import logger
from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, chat_stop_strings, chat_stop_token_ids, encode_chat
from haina.generate.engine import Engine
from haina.generate.outputs import TokenLogprob
from haina.generate.sampling import SamplingParams
from haina.serve.context import CONTEXT_ANSWER_ROOM, ContextBusy, ContextProvider, ContextRunner, Messages
from haina.serve.formats import ChatFormat, CompletionFormat, sse
from haina.serve.loop import EngineLoop, QueueFull
from haina.serve.metrics import ServeMetrics
from haina.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from haina.serve.sequences import Disconnected, Run, Seq
from haina.tokenizer import Tokenizer

if TYPE_CHECKING:
    from haina.serve.embeddings import Pooler

__all__ = ["APIError", "ContextProvider", "Served", "Service", "ServiceConfig", "attach_adapters"]

GREEDY_BELOW = 1e-5  # temperatures this small are greedy: dividing logits by them overflows fp32


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """What `haina serve` serves and how.

    Args:
        checkpoint: checkpoint or training run directory (with a tokenizer).
        served_model_name: the name clients use as `model` (default: the checkpoint directory's name).
        max_batch_size: sequences decoded together (KV-cache slots); 1 serves one request at a time.
        max_queue: most sequences waiting for a slot; beyond it requests get 429.
        max_model_len: context length, prompt plus completion (default: the model's block size).
        device: auto, cpu, cuda, cuda:1 or mps.
        api_keys: accepted bearer keys; empty means no authentication.
        max_body_bytes: largest request body accepted (413 beyond).
        request_timeout: seconds a generation request may take before it is cancelled in the engine (504).
        adapters: (name, directory) of each LoRA adapter served on the base: a request whose `model` is the
            name runs with that adapter (a LoRA run or checkpoint directory trained on this base).
        ensemble: further checkpoints served with `checkpoint` as one ensemble, whose next-token probabilities
            are mixed (they must share its tokenizer); not with adapters.
        weights: the ensemble's weights, `checkpoint`'s first (normalized; empty: equal).
        kv_cache: the engine's KV cache: paged, fixed, or auto (paged on a CPU, fixed on CUDA: `Engine`).
        kv_budget_mb: the most memory the paged KV cache may take (None: what the requests need).
        context: builds the `ContextProvider` of chat requests when the model loads (so /health answers
            meanwhile, and a failure is a load error). A picklable callable without arguments (a top-level
            function or a functools.partial of one), so that the config can go to another process. None: chat
            requests reach the model as sent.
    """

    checkpoint: str
    served_model_name: str | None = None
    max_batch_size: int = 16
    max_queue: int = 256
    max_model_len: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout: float | None = None
    adapters: tuple[tuple[str, str], ...] = ()
    ensemble: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    kv_cache: str = "auto"
    kv_budget_mb: float | None = None
    context: Callable[[], ContextProvider] | None = None

    def __post_init__(self) -> None:
        from haina.generate.ensemble import ADAPTER_WITH_ENSEMBLE, mixture_weights

        mixture_weights(self.weights or None, len(self.checkpoints))
        if self.ensemble and self.adapters:
            raise HainaError(ADAPTER_WITH_ENSEMBLE)
        names = [self.model_name]
        for name, _ in self.adapters:
            if not name or name != name.strip():
                raise HainaError(f"adapter name {name!r} is empty or padded with spaces; write --adapter NAME=DIR")
            if name in names:
                what = "the base model's" if name == self.model_name else "another adapter's"
                raise HainaError(f"adapter name '{name}' is already {what}; give each adapter its own name "
                                 "(--adapter NAME=DIR)")
            names.append(name)

    @property
    def checkpoints(self) -> tuple[str, ...]:
        """Every checkpoint served: `checkpoint`, then the rest of an ensemble."""
        return (self.checkpoint, *self.ensemble)

    @property
    def model_name(self) -> str:
        """served_model_name, else the checkpoint directory's name (an ensemble's names joined by '+')."""
        return self.served_model_name or "+".join(Path(p).resolve().name for p in self.checkpoints)

    @property
    def model_names(self) -> list[str]:
        """Every name clients may send as `model`: the base's first, then the adapters'."""
        return [self.model_name, *(name for name, _ in self.adapters)]


Loader = Callable[[ServiceConfig], tuple[Any, Tokenizer | None]]


@dataclass(frozen=True)
class Served:
    """A model a request may name: the base (adapter -1) or one of its LoRA adapters, with its tokenizer."""

    name: str
    adapter: int
    tokenizer: Tokenizer


def load_checkpoint(config: ServiceConfig) -> tuple[Any, Tokenizer | None]:
    """The default loader: the checkpoint's model (eval mode, on the device) and tokenizer; an ensemble's of several."""
    from haina.core.device import resolve_device, resolve_dtype
    from haina.generate.ensemble import load_ensemble

    device = resolve_device(config.device)
    return load_ensemble(config.checkpoints, config.weights or None, device=device,
                         dtype=resolve_dtype(config.dtype, device))


class Service:
    """The serving state of one model: loading, the engine loop and the request logic.

    Args:
        config: what to serve.
        metrics: where to record (a fresh registry by default).
        loader: builds (model, tokenizer) from the config; tests swap in slow or failing loaders.
    """

    def __init__(self, config: ServiceConfig, metrics: ServeMetrics | None = None, loader: Loader | None = None):
        self.config = config
        self.metrics = metrics or ServeMetrics()
        self._loader = loader or load_checkpoint
        self.loop: EngineLoop | None = None
        self.tokenizer: Tokenizer | None = None
        self.served: dict[str, Served] = {}
        self.load_error: str | None = None
        self.max_model_len = 0
        self.vocab_size = 0
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_load_error: Callable[[str], None] | None = None
        self.context: ContextRunner | None = None
        self._pooler: Pooler | None = None  # built by the first embedding request (haina.serve.embeddings)

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self.loop is not None

    def start(self) -> None:
        """Load the model on a background thread; `ready` turns true when it is served."""
        self._thread = threading.Thread(target=self._load, name="haina-load", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._loaded.wait(timeout)
        return self.ready

    def _load(self) -> None:
        try:
            model, tokenizer = self._loader(self.config)
            if tokenizer is None:
                raise HainaError(f"checkpoint {self.config.checkpoint} has no tokenizer/ directory; serving needs one")
            cfg = self.config
            served = {cfg.model_name: Served(cfg.model_name, -1, tokenizer)}
            if cfg.adapters:
                served |= attach_adapters(model, tokenizer, cfg.adapters)
            if cfg.context is not None:
                self.context = ContextRunner(cfg.context(), cfg.max_queue)

            def make_engine() -> Engine:
                return Engine(model, max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_model_len,
                              eos_token_id=tokenizer.eos_id, kv_cache=cfg.kv_cache, kv_budget_mb=cfg.kv_budget_mb)

            loop = EngineLoop(make_engine, self.metrics, max_queue=cfg.max_queue, request_timeout=cfg.request_timeout)
            self.tokenizer, self.vocab_size, self.served = tokenizer, model.cfg.vocab_size, served
            self.max_model_len = loop.engine.max_seq_len
            self.loop = loop
            adapters = f", adapters {', '.join(n for n, _ in cfg.adapters)}" if cfg.adapters else ""
            if cfg.ensemble:
                adapters = f", an ensemble of {len(cfg.checkpoints)} models"
            logger.info(f"serving {cfg.model_name} ({model.num_params() / 1e6:.1f}M parameters, context "
                        f"{self.max_model_len}, batch {cfg.max_batch_size}{adapters})")
        except Exception as e:  # noqa: BLE001 - reported by /health and the log, not lost
            self.load_error = str(e) if isinstance(e, HainaError) else f"{type(e).__name__}: {e}"
            logger.error(f"error: cannot load the model: {self.load_error}")
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
        finally:
            self._loaded.set()

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()
        if self.context is not None:
            self.context.close()

    # ------------------------------------------------------------------ checks shared by every endpoint
    def _require_ready(self) -> tuple[EngineLoop, Tokenizer]:
        if self.loop is None or self.tokenizer is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, f"{why}; retry when GET /health answers 200")
        return self.loop, self.tokenizer

    def check_model(self, name: str | None) -> Served:
        """The served model a request names (None: the base); 404 for a name this server does not serve."""
        served = self.served.get(self.config.model_name if name is None else name)
        if served is None:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                           f"{', '.join(repr(n) for n in self.config.model_names)}", param="model",
                           type="model_not_found")
        return served

    def models(self) -> dict[str, Any]:
        now, base = int(time.time()), self.config.model_name
        card = {"object": "model", "created": now, "owned_by": "haina", "max_model_len": self.max_model_len or None}
        if self.context is not None:
            card["haina_rag"] = self.context.describe()
        # An adapter names its base as `parent`, as vLLM lists LoRA adapters.
        return {"object": "list", "data": [{"id": base, **card}] + [{"id": name, **card, "parent": base}
                                                                   for name, _ in self.config.adapters]}

    def _check_ids(self, ids: list[int], limit: int, what: str = "prompt") -> None:
        bad = next((t for t in ids if not 0 <= t < limit), None)
        if bad is not None:
            raise APIError(400, f"{what} token id {bad} is outside the vocabulary (0..{limit - 1})", param=what)

    @staticmethod
    def _refuse_unsupported(req: CompletionRequest | ChatCompletionRequest | TokenizeRequest) -> None:
        found = req.refused()
        if found is not None:
            raise APIError(400, found[1], param=found[0], type="invalid_request_error")

    def _encode(self, tok: Tokenizer, text: str) -> list[int]:
        ids = tok.encode(text)  # text only: a control string written in the prompt stays text
        if not ids:
            raise APIError(400, "the prompt is empty; give at least one character or token", param="prompt")
        return ids

    def _params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None,
                prompt_logprobs: int | None = None, stop_ids: tuple[int, ...] = ()) -> SamplingParams:
        if req.n > self.config.max_queue:
            raise APIError(400, f"n={req.n} exceeds the server's queue of {self.config.max_queue} sequences",
                           param="n")
        bias = req.bias_pairs()
        bad = next((t for t, _ in bias if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"logit_bias token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                           param="logit_bias")
        params = SamplingParams(
            max_new_tokens=max(1, max_tokens), temperature=0.0 if req.temperature < GREEDY_BELOW else req.temperature,
            top_p=req.top_p, top_k=max(0, req.top_k), min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, stop_token_ids=stop_ids,
            ignore_eos=req.ignore_eos, seed=req.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logit_bias=bias)
        try:
            params.validate(self.vocab_size)
        except HainaError as e:
            raise APIError(400, str(e)) from None
        return params

    def _fits(self, ids: list[int], max_tokens: int) -> None:
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, beyond the "
                           f"context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens")

    # ------------------------------------------------------------------ /v1/completions
    async def completions(self, req: CompletionRequest, disconnected: Disconnected | None = None):
        """A completion response (dict) or, for stream=true, an async iterator of SSE lines."""
        self._refuse_unsupported(req)
        loop, _ = self._require_ready()
        served = self.check_model(req.model)
        tok = served.tokenizer
        arrival = time.perf_counter()
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported; use n", param="best_of")
        prompts = _prompt_ids(req.prompt, tok, self)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo=true, to score the "
                           "prompt)", param="max_tokens")
        for ids in prompts:
            self._check_ids(ids, self.vocab_size)
            self._fits(ids, max_tokens)
        k = req.logprobs
        texts = [tok.decode(ids) for ids in prompts] if req.echo else None
        rid = f"cmpl-{uuid.uuid4().hex}"
        fmt = CompletionFormat(rid, served.name, tok, req.echo)
        if max_tokens == 0:  # score only: log-probabilities of the prompt, nothing generated
            self._params(req, 1, None)  # the sampling fields are checked even though nothing is sampled
            results = await self._score(loop, prompts, k, req.n, served.adapter)
            return fmt.scored(results, prompts, texts, req.n, req.stream, _include_usage(req))
        params = self._params(req, max_tokens, k, prompt_logprobs=k if req.echo and k is not None else None)
        stops = _stops(req.stops)
        seqs = [Seq(p * req.n + i, loop.new_id(), p, tok, stops, _stop_ids(tok, params), k is not None,
                     echo_text=texts[p] if texts else None)
                for p in range(len(prompts)) for i in range(req.n)]
        run = Run(self, loop, [(s, prompts[s.prompt_index], _seeded(params, i % req.n)) for i, s in enumerate(seqs)],
                   arrival, served.adapter)
        if req.stream:
            return sse(fmt.stream(run, disconnected, _include_usage(req), prompts))
        async for _ in run.events(disconnected):
            pass
        return fmt.response(seqs, prompts)

    async def _score(self, loop: EngineLoop, prompts: list[list[int]], k: int | None, n: int,
                     adapter: int) -> list[list[TokenLogprob | None] | None]:
        if k is None:
            return [None] * len(prompts)
        out = []
        for ids in prompts:
            try:
                fut = loop.call(lambda engine, ids=ids: engine.prompt_logprobs(ids, k, adapter), queued=True)
            except QueueFull as e:
                raise APIError(429, str(e)) from None
            try:
                out.append(await asyncio.wrap_future(fut))
            except HainaError as e:
                raise APIError(400, str(e)) from None
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)) * n)
        return out

    # ------------------------------------------------------------------ /v1/chat/completions
    async def chat(self, req: ChatCompletionRequest, disconnected: Disconnected | None = None):
        """A chat completion response (dict) or, for stream=true, an async iterator of SSE lines."""
        self._refuse_unsupported(req)
        loop, _ = self._require_ready()
        served = self.check_model(req.model)
        tok = served.tokenizer
        arrival = time.perf_counter()
        requested = req.max_completion_tokens or req.max_tokens
        messages, sources = [m.template_dict() for m in req.messages], None
        if req.haina_rag and self.context is None:
            raise APIError(400, "haina_rag is true but this server has no knowledge base; start it with --rag NAME, "
                           "or leave the field out", param="haina_rag")
        if self.context is not None and req.haina_rag is not False:
            messages, sources = await self._add_context(tok, messages, req.add_generation_prompt, requested)
        ids = self._chat_ids(tok, messages, req.add_generation_prompt)
        if not ids:
            raise APIError(400, "the conversation renders to no tokens; give a message with some text",
                           param="messages")
        self._check_ids(ids, self.vocab_size)
        if requested is None:
            max_tokens = self.max_model_len - len(ids)
            if max_tokens < 1:
                raise APIError(400, f"the conversation has {len(ids)} tokens, which fills the context of "
                               f"{self.max_model_len}; shorten it", param="messages")
        else:
            max_tokens = requested
            self._fits(ids, max_tokens)
        k = (req.top_logprobs or 0) if req.logprobs else None
        stop_ids = tuple(dict.fromkeys(chat_stop_token_ids(tok)))
        params = self._params(req, max_tokens, k, stop_ids=stop_ids)
        stops = _stops(list(dict.fromkeys(chat_stop_strings(tok) + req.stops)))
        seqs = [Seq(i, loop.new_id(), 0, tok, stops, _stop_ids(tok, params), k is not None) for i in range(req.n)]
        run = Run(self, loop, [(s, ids, _seeded(params, i)) for i, s in enumerate(seqs)], arrival, served.adapter)
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", served.name, tok, sources)
        if req.stream:
            return sse(fmt.stream(run, disconnected, _include_usage(req), len(ids)))
        async for _ in run.events(disconnected):
            pass
        return fmt.response(seqs, len(ids))

    async def _add_context(self, tok: Tokenizer, messages: Messages, add_generation_prompt: bool,
                           requested: int | None) -> tuple[Messages, list[dict[str, Any]]]:
        """The provider's messages and sources for a chat request (`haina.serve.context`)."""
        room = requested or max(1, min(CONTEXT_ANSWER_ROOM, self.max_model_len // 4))

        def fits(candidate: Messages) -> bool:
            try:
                return len(self._chat_ids(tok, candidate, add_generation_prompt)) + room <= self.max_model_len
            except APIError:
                return False

        assert self.context is not None
        try:
            return await self.context.add(messages, fits)
        except ContextBusy as e:
            raise APIError(429, str(e)) from None
        except HainaError as e:
            raise APIError(503, f"adding context to the request failed: {e}") from None

    def _chat_ids(self, tok: Tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
        """The prompt ids of a conversation: the template's markers are special tokens, what messages say is text."""
        try:
            return encode_chat(tok, messages, add_generation_prompt=add_generation_prompt)
        except HainaError as e:
            raise APIError(400, str(e), param="messages") from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as e:
            # A checkpoint's template may assume conversations shaped a certain way (a system message first,
            # alternating roles) and fail outside Jinja's own errors on others: these messages, not the server.
            raise APIError(400, f"the chat template cannot render these messages: {type(e).__name__}: {e}",
                           param="messages") from None

    # ------------------------------------------------------------------ /v1/embeddings
    async def embeddings(self, req: EmbeddingRequest) -> dict[str, Any]:
        """OpenAI's embedding list: one unit vector per input, in input order (`haina.serve.embeddings`)."""
        from haina.serve.embeddings import embed  # above this module: it answers with APIError

        return await embed(self, req)

    # ------------------------------------------------------------------ tokenizer endpoints
    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self._refuse_unsupported(req)
        self._require_ready()
        tok = self.check_model(req.model).tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = self._chat_ids(tok, [m.template_dict() for m in req.messages], req.add_generation_prompt)
            if req.add_special_tokens:
                before, after = tok.post_processor_tokens()
                ids = before + ids + after
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self._require_ready()
        tok = self.check_model(req.model).tokenizer
        self._check_ids(req.tokens, tok.vocab_size, what="tokens")
        return {"prompt": tok.decode(req.tokens)}

    def tokenizer_info(self) -> dict[str, Any]:
        _, tok = self._require_ready()
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
                "eos_token_id": tok.eos_id, "bos_token": tok.bos_token, "bos_token_id": tok.bos_id,
                "pad_token": tok.pad_token, "pad_token_id": tok.pad_id,
                "chat_template": tok.chat_template or DEFAULT_CHAT_TEMPLATE,
                "model_max_length": self.max_model_len, "vocab_size": tok.vocab_size}


# ---------------------------------------------------------------------------------------------- helpers
def attach_adapters(model: Any, tokenizer: Tokenizer, adapters: tuple[tuple[str, str], ...]) -> dict[str, Served]:
    """Stack the named adapters into the base `model` (`haina.model.lora_serving.load_adapters`); their served entries.

    An adapter directory's own tokenizer, when it saved one, serves its requests (fine-tuning may have added
    chat tokens); it must end text with the base's EOS token, which is the one the shared engine stops at.
    """
    from haina.model.lora import resolve_adapter
    from haina.model.lora_serving import load_adapters

    dirs = [resolve_adapter(path) for _, path in adapters]
    load_adapters(model, dirs)
    served = {}
    for i, ((name, _), directory) in enumerate(zip(adapters, dirs)):
        tok = tokenizer
        if (directory / "tokenizer").is_dir():
            tok = Tokenizer.load(directory / "tokenizer")
            if tok.vocab_size > model.cfg.vocab_size:
                raise HainaError(f"adapter {directory} has a tokenizer of {tok.vocab_size} tokens but the model only "
                                 f"{model.cfg.vocab_size}")
            if tok.eos_id != tokenizer.eos_id:
                raise HainaError(f"adapter {directory} ends text with token {tok.eos_id} ({tok.eos_token}), the base "
                                 f"with {tokenizer.eos_id}, where the shared engine stops; merge the adapter into its "
                                 "base (haina finetune merge) and serve that")
        served[name] = Served(name, i, tok)
    return served


def _prompt_ids(prompt, tok: Tokenizer, service: Service) -> list[list[int]]:
    """Every accepted prompt shape as a list of token-id lists."""
    if isinstance(prompt, str):
        return [service._encode(tok, prompt)]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [service._encode(tok, p) for p in prompt]
    return [list(p) for p in prompt]


def _stops(stops: list[str]) -> list[str]:
    if any(not s for s in stops):
        raise APIError(400, "a stop string is empty; remove it or give at least one character", param="stop")
    return stops


def _stop_ids(tok: Tokenizer, params: SamplingParams) -> frozenset[int]:
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.add(tok.eos_id)
    return frozenset(ids)


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    """Sample i of a request: seed + i, so n samples differ yet each is reproducible."""
    return params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)
