"""The OpenAI wire format: request and response models, and the error shape.

Requests are validated here, before anything reaches the engine: types, ranges and the fields
this server does not support. Ranges are tighter than "whatever does not crash" on purpose:
e.g. a repetition penalty of 1e-300 or a temperature of 1e-30 turns logits into inf and the
sampler into NaN, which would fail every request sharing the batch.
OpenAI fields this server cannot honour (tools, structured output, audio, `suffix`...) are a 400
naming the field unless they ask for nothing (`tools: []`, `response_format: {"type": "text"}`):
a request is never answered as if a field it relies on had been applied. Fields that do not change
the answer (`user`, `metadata`, `service_tier`, prompt-cache hints...) and fields OpenAI does not
define are ignored, as OpenAI-compatible servers do.

A chat request's `haina_rag` (true/false) is haina's own field: with a server started with `--rag`, retrieval
runs for every chat request unless it sends `haina_rag: false`, and the answer carries the passages the model
was given under `sources` (see `haina.serve.service`); without `--rag`, `haina_rag: true` is a 400.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "DetokenizeRequest", "EmbeddingRequest",
           "ErrorBody", "StreamOptions", "TokenizeRequest", "error_body"]

MAX_N = 64
MAX_LOGPROBS = 20
MAX_STOP = 16
SEED_LIMIT = 2**62  # torch generators take 64-bit seeds; seed + n must stay inside
MAX_BIAS = 100  # OpenAI's range for logit_bias values
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one embeddings request

# Fields OpenAI (or vLLM, for structured output) defines that this server cannot honour: why, and the values that
# ask for nothing, which pass. Any other value is a 400 naming the field.
_TOOLS = "this server has no tool calling"
_GUIDED = "this server has no constrained decoding"
UNSUPPORTED_SHARED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "guided_json": (_GUIDED, (None,)), "guided_regex": (_GUIDED, (None,)), "guided_choice": (_GUIDED, (None,)),
    "guided_grammar": (_GUIDED, (None,)), "structured_outputs": (_GUIDED, (None,)),
}
UNSUPPORTED_COMPLETION = {
    **UNSUPPORTED_SHARED, "suffix": ("this server does not complete text before a suffix", (None, "")),
}
UNSUPPORTED_CHAT = {
    **UNSUPPORTED_SHARED,
    "tools": (_TOOLS, (None, [])), "tool_choice": (_TOOLS, (None, "none")),
    "functions": (_TOOLS, (None, [])), "function_call": (_TOOLS, (None, "none")),
    "response_format": ('this server has no JSON mode or JSON schema output; only {"type": "text"} is accepted',
                        (None, {"type": "text"})),
    "audio": ("this server has no audio output", (None,)),
    "modalities": ('this server writes text only; only ["text"] is accepted', (None, ["text"])),
    "prediction": ("this server has no predicted outputs", (None,)),
    "web_search_options": ("this server has no web search", (None,)),
    "reasoning_effort": ('the model is not a reasoning model; only "none" is accepted', (None, "none")),
    "verbosity": ("this server has no verbosity control", (None,)),
    "moderation": ("this server runs no moderation", (None,)),
    "store": ("this server stores no completions; only false is accepted", (None, False)),
}
UNSUPPORTED_MESSAGE = {
    "tool_calls": (_TOOLS, (None, [])), "tool_call_id": (_TOOLS, (None,)), "function_call": (_TOOLS, (None,)),
    "audio": ("this server takes no audio", (None,)), "refusal": ("this server has no refusal messages", (None,)),
}


def _asks_for_nothing(value: Any, off: tuple[Any, ...]) -> bool:
    return any(type(value) is type(o) and value == o for o in off)  # typed: 0 is not False, "" is not None


def refused_field(extra: dict[str, Any] | None, table: dict[str, tuple[str, tuple[Any, ...]]],
                  prefix: str = "") -> tuple[str, str] | None:
    """(param, message) for the first field of `extra` in `table` that asks for something, else None."""
    for name, value in (extra or {}).items():
        if name in table and not _asks_for_nothing(value, table[name][1]):
            return prefix + name, f"'{prefix}{name}' is not supported: {table[name][0]}; remove the field"
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _Sampling(_Request):
    """The fields completions and chat share."""

    model: StrictStr | None = None
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=-1, le=1_000_000)  # -1 and 0 both mean off
    min_p: float = Field(0.0, ge=0, le=1)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=SEED_LIMIT)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # OpenAI sends token ids as string keys; the ids are checked against the vocabulary by the service.
    logit_bias: dict[StrictStr, Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not re.fullmatch(r"[0-9]{1,10}", key):
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got '{key}'")
        return bias

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs (a key written twice, like "7" and "07", counts once)."""
        return tuple({int(k): v for k, v in (self.logit_bias or {}).items()}.items())

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    model_config = ConfigDict(extra="allow")  # kept, so that fields we cannot honour are refused by name

    prompt: StrictStr | TokenIds | Annotated[list[StrictStr], Field(min_length=1, max_length=256)] | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=256)]
    max_tokens: StrictInt | None = Field(16, ge=0)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N)

    def refused(self) -> tuple[str, str] | None:
        """(param, message) for the first field this server cannot honour, else None."""
        return refused_field(self.model_extra, UNSUPPORTED_COMPLETION)


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")  # kept, so that tool calls and the like are refused by name

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    # OpenAI's pattern: a name is an identifier, so it cannot carry a newline or a marker into the template.
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")] | None = None

    def template_dict(self) -> dict[str, str]:
        """The message as the chat template sees it: role, content and, when given, name."""
        out = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")  # kept, so that fields we cannot honour are refused by name

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: StrictBool = True
    # haina's extension: retrieval on (true) or off (false) for this request; None: on when the server has --rag.
    haina_rag: StrictBool | None = None

    def refused(self) -> tuple[str, str] | None:
        """(param, message) for the first field this server cannot honour, the messages' included, else None."""
        found = refused_field(self.model_extra, UNSUPPORTED_CHAT)
        for i, m in enumerate(self.messages):
            found = found or refused_field(m.model_extra, UNSUPPORTED_MESSAGE, prefix=f"messages.{i}.")
        return found


class TokenizeRequest(_Request):
    """POST /tokenize: a prompt, or chat messages rendered through the chat template."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    # What the tokenizer's post-processor adds (a BOS for Llama tokenizers). Off by default: the completions and
    # chat endpoints add none, and /tokenize answers with the ids they would use.
    add_special_tokens: StrictBool = False
    add_generation_prompt: StrictBool = True

    def refused(self) -> tuple[str, str] | None:
        """(param, message) for the first message field this server cannot honour, else None."""
        found = None
        for i, m in enumerate(self.messages or ()):
            found = found or refused_field(m.model_extra, UNSUPPORTED_MESSAGE, prefix=f"messages.{i}.")
        return found


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[StrictInt]


class EmbeddingRequest(_Request):
    """POST /v1/embeddings: one text or token-id list, or a list of them; `user` and other fields are ignored."""

    model: StrictStr | None = None
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] | \
        TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    # Accepted when it is the model's own dimension: cutting a vector short is meaningful only for models trained
    # for it (Matryoshka), which a haina model is not.
    dimensions: StrictInt | None = Field(None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        # One message naming the accepted shapes, rather than pydantic's one per member of the union.
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)

        if isinstance(value, list) and not value:
            raise ValueError("input is an empty list; give at least one text")
        if not (isinstance(value, str) or ids(value) or (isinstance(value, list) and (
                all(isinstance(x, str) for x in value) or all(ids(x) for x in value)))):
            raise ValueError("input must be a string, a list of strings, a list of token ids, or a list of token-id "
                             "lists (none empty)")
        return value


# ---------------------------------------------------------------------------------------------- responses
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "internal_server_error", 503: "service_unavailable", 504: "timeout_error"}


def error_body(status: int, message: str, param: str | None = None, type: str | None = None) -> dict[str, Any]:
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    kind = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "haina"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class APIError(Exception):
    """An error answered in the OpenAI shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
