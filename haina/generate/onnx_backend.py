"""Generation from an ONNX export (`haina export onnx`) with ONNX Runtime: `haina generate --backend onnxruntime`.

The export directory holds `model.onnx` (a decoder graph with the KV cache as inputs and outputs), the tokenizer and
`haina_onnx.json`, the contract between the two sides: the names of the inputs and outputs, the cache layout, the
element type and the special tokens. This module defines that contract (it sits below `haina.export`, which writes
it) and reads only the JSON, never the checkpoint, so an export runs where neither torch's model code nor the
checkpoint is.

`OnnxEngine` has the faces of `haina.generate.engine.Engine` that `TextGenerator` and the CLI use (`add_request`,
`step`, `abort`, `stream`, `generate`, `check_prompt`), with the same sampling code (`sample_tokens`, seeded torch
generators), so a seeded run picks the same tokens as haina's engine given the same logits. It decodes one request
at a time (batch 1): the graph takes any batch, but rows of different lengths would need a padding mask the graph
does not have, and a batch-1 runner is what the benchmark compares. Beam search stays with haina's engine.

onnxruntime is imported when a session is made, so importing this module costs nothing without it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from haina.core.errors import HainaError
from haina.core.io import read_json
from haina.generate.outputs import GenerationResult, StepEvent, TokenLogprob, token_logprobs
from haina.generate.sampling import RowState, SamplingParams, sample_tokens

__all__ = ["FORMAT", "SPEC_FILE", "OnnxDecoder", "OnnxEngine", "is_onnx_export", "load_onnx_engine", "read_spec"]

SPEC_FILE = "haina_onnx.json"
FORMAT = "haina-onnx-decoder"
FORMAT_VERSION = 1
# What numpy arrays the cache inputs take per exported dtype; numpy has no bfloat16, and ONNX Runtime's CPU provider
# has no bfloat16 kernels for these graphs, so a bfloat16 export is for other runtimes.
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
_REQUIRED = ("format", "version", "model", "dtype", "vocab_size", "context_length", "n_layer", "kv_heads", "head_dim",
             "inputs", "outputs", "cache")


def is_onnx_export(path: str | Path) -> bool:
    """Whether `path` is a directory written by `haina export onnx`."""
    return (Path(path) / SPEC_FILE).is_file()


def read_spec(path: str | Path) -> dict[str, Any]:
    """The checked contents of an export's haina_onnx.json, with one-line errors for anything else."""
    path = Path(path)
    if not is_onnx_export(path):
        what = "does not exist" if not path.exists() else f"holds no {SPEC_FILE}"
        raise HainaError(f"{path} {what}; --backend onnxruntime needs a directory written by `haina export onnx`")
    spec = read_json(path / SPEC_FILE, "re-create it with `haina export onnx`", expect=dict)
    missing = [k for k in _REQUIRED if k not in spec]
    if missing or spec.get("format") != FORMAT:
        raise HainaError(f"{path / SPEC_FILE} is not a haina ONNX export description (missing {', '.join(missing)} "
                         f"or format is not {FORMAT}); re-create it with `haina export onnx`")
    sizes = [spec[k] for k in ("vocab_size", "context_length", "n_layer", "kv_heads", "head_dim")]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in sizes) \
            or not isinstance(spec["model"], str) or Path(spec["model"]).name != spec["model"]:
        raise HainaError(f"{path / SPEC_FILE}: sizes must be positive integers and 'model' a file name beside it; "
                         "re-create it with `haina export onnx`")
    if spec["version"] != FORMAT_VERSION:
        raise HainaError(f"{path / SPEC_FILE} has format version {spec['version']}, this haina reads "
                         f"{FORMAT_VERSION}; re-export with this haina")
    cache = spec["cache"]
    n = spec["n_layer"]
    names = [cache.get(k) for k in ("key_inputs", "value_inputs", "key_outputs", "value_outputs")]
    if not all(isinstance(x, list) and len(x) == n for x in names):
        raise HainaError(f"{path / SPEC_FILE}: cache names must list one input and output per layer ({n}); "
                         "re-create it with `haina export onnx`")
    if not (path / spec["model"]).is_file():
        raise HainaError(f"{path / spec['model']} is missing; re-create the export with `haina export onnx`")
    return spec


def _providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for a haina device name (CUDA only where this onnxruntime has it)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
            else ["CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise HainaError(f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu) ; "
                             "use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise HainaError(f"--device {device} is not available to --backend onnxruntime; use auto, cpu or cuda")


class OnnxDecoder:
    """An exported decoder graph in an ONNX Runtime session: (token ids, past cache) -> (logits, present cache).

    Args:
        path: the export directory.
        device: auto, cpu or cuda (ONNX Runtime's CPU or CUDA provider).
        threads: intra-op threads of the session (0: ONNX Runtime's default, one per core).
        spin: let idle threads spin-wait for the next call (a little faster alone, costly beside other work).
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0, spin: bool = False):
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        self.path = Path(path)
        self.spec = spec = read_spec(self.path)
        if spec["dtype"] not in NUMPY_DTYPES:
            raise HainaError(f"{self.path} is a {spec['dtype']} export, which ONNX Runtime cannot run here (no "
                             f"{spec['dtype']} kernels on its CPU provider); export with --dtype float32 or float16")
        self.np_dtype = NUMPY_DTYPES[spec["dtype"]]
        self.vocab_size, self.context_length = spec["vocab_size"], spec["context_length"]
        self.n_layer, self.kv_heads, self.head_dim = spec["n_layer"], spec["kv_heads"], spec["head_dim"]
        cache = spec["cache"]
        self._k_in, self._v_in = cache["key_inputs"], cache["value_inputs"]
        self._outputs = [spec["outputs"]["logits"], *cache["key_outputs"], *cache["value_outputs"]]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # ONNX Runtime's threads otherwise spin for a while after every call, taking the cores from torch's own
        # work in the same process (sampling; or, side by side, haina's engine, measured several times slower on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        providers = _providers(device)
        try:
            self.session = ort.InferenceSession(str(self.path / spec["model"]), options, providers=providers)
        except (ort_errors.Fail, ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.NotImplemented,
                ort_errors.InvalidArgument, ort_errors.RuntimeException) as e:  # a damaged or foreign graph
            raise HainaError(f"ONNX Runtime cannot load {self.path / spec['model']}: {str(e).splitlines()[0]}; "
                             "re-create it with `haina export onnx`") from None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        wanted = {spec["inputs"]["input_ids"], *self._k_in, *self._v_in}
        if wanted - graph_inputs:
            raise HainaError(f"{self.path / spec['model']} lacks the inputs {SPEC_FILE} names "
                             f"({sorted(wanted - graph_inputs)[:3]}); re-create the export")

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        """The cache of a prefill: keys then values of every layer, (batch, kv_heads, 0, head_dim) each."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.np_dtype)
        return [empty] * (2 * self.n_layer)

    def __call__(self, ids: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (B, T, V) float32 of token ids (B, T) after `cache` (keys then values per layer), and the new cache.

        Row b's token t has position past_length + t (the graph computes the positions); rows share one length.
        """
        feed = {self.spec["inputs"]["input_ids"]: np.ascontiguousarray(ids, dtype=np.int64)}
        feed.update(zip(self._k_in + self._v_in, cache))
        logits, *present = self.session.run(self._outputs, feed)
        return logits, present


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    max_new: int  # max_new_tokens clamped to the context
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    row: RowState
    output: list[int] = field(default_factory=list)
    cache: list[np.ndarray] | None = None  # None until the prefill
    aborted: bool = False


class OnnxEngine:
    """Token ids in, token ids out through an `OnnxDecoder`, one request at a time; the faces of `Engine`.

    Args:
        decoder: the exported graph's session.
        eos_token_id: ends a request unless its params say `ignore_eos`; None for no EOS.
        max_seq_len: tokens per sequence, prompt included (default and upper bound: the export's context length).
    """

    def __init__(self, decoder: OnnxDecoder, *, eos_token_id: int | None = None, max_seq_len: int | None = None):
        self.decoder = decoder
        self.eos_token_id = eos_token_id
        self.vocab_size = decoder.vocab_size
        self.max_seq_len = min(max_seq_len or decoder.context_length, decoder.context_length)
        self._waiting: deque[_Request] = deque()
        self._current: _Request | None = None
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ queue
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """Validate params and prompt (HainaError naming the problem); returns the prompt as a list."""
        params.validate(self.vocab_size)
        if params.num_beams > 1:
            raise HainaError("beam search runs on haina's own engine only; use --backend haina or --num-beams 1")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise HainaError("the prompt is empty; give at least one token (e.g. the BOS or EOS token)")
        if len(prompt) >= self.max_seq_len:
            raise HainaError(f"the prompt has {len(prompt)} tokens but the context holds {self.max_seq_len}, "
                             "leaving no room to generate; shorten the prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise HainaError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return prompt

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: int = -1) -> None:
        """Validate and queue one sequence (n = 1); it starts when the requests before it have finished."""
        if request_id in self._requests:
            raise HainaError(f"request id '{request_id}' is already in use; give each request a unique id")
        if params.n != 1:
            raise HainaError("add_request runs one sequence: add n requests for n samples, or use generate()")
        self._requests[request_id] = self._make_request(request_id, prompt_ids, params, adapter=adapter)
        self._waiting.append(self._requests[request_id])

    def _make_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed_offset: int = 0,
                      adapter: int = -1) -> _Request:
        if adapter != -1:
            raise HainaError("an ONNX export holds no LoRA adapters to select; merge them in at export "
                             "(`haina export onnx --adapter`)")
        prompt = self.check_prompt(prompt_ids, params)
        stop = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stop.add(self.eos_token_id)
        gen = None
        if params.seed is not None:  # the engine's seeding, so that a seeded request samples what it would there
            gen = torch.Generator()
            gen.manual_seed(params.seed + seed_offset)
        row = RowState(params=params, tokens=list(prompt), prompt_len=len(prompt))
        max_new = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        return _Request(request_id, prompt, params, max_new, frozenset(stop), gen, row)

    def abort(self, request_id: str) -> None:
        """Stop a request; it reports finish_reason "abort" at the next step."""
        req = self._requests.get(request_id)
        if req is not None:
            req.aborted = True

    # ------------------------------------------------------------------ the step
    def step(self) -> list[StepEvent]:
        """Report aborted requests, then prefill the next waiting request or decode one token of the running one."""
        events = []
        for req in [r for r in self._waiting if r.aborted] + [r for r in [self._current] if r and r.aborted]:
            events.append(self._event(req, [], None, "abort"))
            self._requests.pop(req.request_id, None)
        self._waiting = deque(r for r in self._waiting if not r.aborted)
        if self._current is not None and self._current.aborted:
            self._current = None
        if self._current is None and self._waiting:
            self._current = self._waiting.popleft()
        if self._current is not None:
            events.append(self._advance(self._current))
        return events

    def _advance(self, req: _Request) -> StepEvent:
        """One graph call for `req`: its prompt (prefill) or its last token, then one token sampled."""
        prefill = req.cache is None
        ids = np.array([req.prompt if prefill else req.output[-1:]], dtype=np.int64)
        cache = self.decoder.empty_cache() if prefill else req.cache
        out, req.cache = self.decoder(ids, cache)
        all_logits = torch.from_numpy(out[0])  # (T, V) float32
        logits = all_logits[-1:]
        tok = sample_tokens(logits, [req.row], [req.generator]).tolist()[0]
        lps = None
        if req.params.logprobs is not None:
            lps = token_logprobs(logits.log_softmax(dim=-1), [tok], [req.params.logprobs])
        prompt_lps = None
        if prefill and req.params.prompt_logprobs is not None:
            k = req.params.prompt_logprobs
            full = all_logits[:-1].log_softmax(dim=-1)
            prompt_lps = [None] + token_logprobs(full, req.prompt[1:], [k] * (len(req.prompt) - 1))
        req.output.append(tok)
        req.row.tokens.append(tok)
        reason = "stop" if tok in req.stop_ids else "length" if len(req.output) >= req.max_new else None
        if reason is not None:
            self._requests.pop(req.request_id, None)
            self._current = None
        return self._event(req, [tok], lps, reason, prompt_lps)

    def _event(self, req: _Request, new: list[int], lps: list[TokenLogprob | None] | None, reason: str | None,
               prompt_lps: list[TokenLogprob | None] | None = None) -> StepEvent:
        if req.params.logprobs is not None and lps is None:
            lps = []
        return StepEvent(request_id=req.request_id, new_token_ids=new, logprobs=lps, prompt_logprobs=prompt_lps,
                         finished=reason is not None, finish_reason=reason, num_prompt_tokens=len(req.prompt),
                         num_generated_tokens=len(req.output))

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[list[GenerationResult]]:
        """Run prompts to completion: per prompt, its n samples (sample i of a seeded request uses seed + i)."""
        plist = list(params) if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise HainaError(f"got {len(plist)} sampling params for {len(prompts)} prompts; give one or one each")
        tag = next(self._ids)
        index: dict[str, tuple[int, _Request]] = {}  # request id -> (prompt index, request), in sample order
        for p, (prompt, sp) in enumerate(zip(prompts, plist)):
            for i in range(sp.n):
                req = self._make_request(f"_generate-{tag}-{p}-{i}", prompt, sp, seed_offset=i)
                index[req.request_id] = (p, req)
        for _, req in index.values():
            self._requests[req.request_id] = req
            self._waiting.append(req)
        lps: dict[str, list[TokenLogprob]] = {rid: [] for rid in index}
        prompt_lps: dict[str, list[TokenLogprob | None]] = {}
        done: dict[str, GenerationResult] = {}
        while len(done) < len(index):
            for ev in self.step():
                if ev.request_id not in index:
                    continue
                req = index[ev.request_id][1]
                lps[ev.request_id] += ev.logprobs or []
                if ev.prompt_logprobs is not None:
                    prompt_lps[ev.request_id] = ev.prompt_logprobs
                if ev.finished:
                    done[ev.request_id] = GenerationResult(
                        token_ids=list(req.output), finish_reason=ev.finish_reason or "length",
                        logprobs=lps[ev.request_id] if req.params.logprobs is not None else None,
                        prompt_logprobs=prompt_lps.get(ev.request_id))
        results: list[list[GenerationResult]] = [[] for _ in prompts]
        for rid, (p, _) in index.items():
            results[p].append(done[rid])
        return results

    def stream(self, prompt_ids: list[int], params: SamplingParams, adapter: int = -1) -> Iterator[StepEvent]:
        """Yield the events of one request as its tokens arrive; closing the iterator early aborts it."""
        rid = f"_stream-{next(self._ids)}"
        self.add_request(rid, prompt_ids, params, adapter=adapter)
        finished = False
        try:
            while not finished:
                for ev in self.step():
                    if ev.request_id == rid:
                        finished = ev.finished
                        yield ev
        finally:
            if not finished and rid in self._requests:  # leave at once, without a step that would run others
                req = self._requests.pop(rid)
                if req in self._waiting:
                    self._waiting.remove(req)
                if self._current is req:
                    self._current = None


def load_onnx_engine(path: str | Path, device: str = "auto", threads: int = 0):
    """An `OnnxEngine` over the export in `path` and the tokenizer saved with it: (engine, tokenizer or None)."""
    from haina.tokenizer import Tokenizer

    decoder = OnnxDecoder(path, device=device, threads=threads)
    tok_dir = Path(path) / decoder.spec.get("tokenizer", "tokenizer")
    tokenizer = Tokenizer.load(tok_dir) if tok_dir.is_dir() else None
    eos = decoder.spec.get("eos_token_id")
    if tokenizer is not None:
        eos = tokenizer.eos_id
    return OnnxEngine(decoder, eos_token_id=eos), tokenizer
