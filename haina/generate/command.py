"""`haina generate`: complete one prompt, or a file of prompts in batches, from a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Literal

from haina.core.device import DTypeName
from haina.core.errors import HainaError
from haina.generate.detok import check_stop_strings
from haina.generate.outputs import TokenLogprob
from haina.generate.sampling import SamplingParams
from haina.tokenizer import Tokenizer

__all__ = ["check_adapter_path", "generate_command", "read_prompts"]

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt specs from a .txt file (one prompt per non-blank line) or a .jsonl file.

    A JSONL line is an object with a string `prompt`, optionally `id`, `stop` (a string or a list
    of strings) and any SamplingParams field, which overrides the command-line value for that prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise HainaError(f"prompts file not found: {path}")
    if path.suffix not in (".txt", ".jsonl"):
        raise HainaError(f"prompts file {path} must be .txt (one prompt per line) or .jsonl (a 'prompt' field per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise HainaError(f"prompts file {path} is not UTF-8 text (byte {e.start})") from None
    specs = [{"prompt": line} for line in lines if line.strip()] if path.suffix == ".txt" else []
    for n, line in enumerate(lines if path.suffix == ".jsonl" else [], 1):
        if not line.strip():
            continue
        try:
            spec = json.loads(line)
        except json.JSONDecodeError as e:
            raise HainaError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("prompt"), str):
            raise HainaError(f"{path}:{n}: each line must be an object with a string 'prompt' field")
        unknown = set(spec) - _PARAM_FIELDS - {"prompt", "id", "stop"}
        if unknown:
            raise HainaError(f"{path}:{n}: unknown field(s) {', '.join(sorted(unknown))}; use prompt, id, stop or "
                             "sampling options such as temperature, max_new_tokens, seed")
        try:
            check_stop_strings(spec.get("stop"))
        except HainaError as e:
            raise HainaError(f"{path}:{n}: {e}") from None
        specs.append(spec)
    if not specs:
        raise HainaError(f"{path} holds no prompts")
    return specs


def _params_for(spec: dict[str, Any], base: SamplingParams, where: str) -> SamplingParams:
    """`base` with the sampling options a prompt spec overrides (typed and checked like a config)."""
    from haina.core.config import from_dict, to_dict

    changes = {k: v for k, v in spec.items() if k in _PARAM_FIELDS}
    params = from_dict(SamplingParams, {**to_dict(base), **changes}, where=where) if changes else base
    try:
        params.validate()
    except HainaError as e:  # name the prompt whose options are wrong
        raise HainaError(f"{where}{e}") from None
    return params


def _logprobs_json(tok: Tokenizer, lps: list[TokenLogprob] | None) -> list[dict] | None:
    if lps is None:
        return None
    return [{"token": tok.decode([lp.token_id]), "token_id": lp.token_id, "logprob": round(lp.logprob, 6),
             "top": [{"token": tok.decode([i]), "token_id": i, "logprob": round(v, 6)} for i, v in lp.top]}
            for lp in lps]


def _print_logprobs(tok: Tokenizer, lps: list[TokenLogprob] | None, out=sys.stdout) -> None:
    if not lps:
        return
    print("\ntoken logprobs (chosen token, then the best alternatives):", file=out)
    for lp in lps:
        alts = "  ".join(f"{tok.decode([i])!r} {v:.3f}" for i, v in lp.top)
        print(f"  {tok.decode([lp.token_id])!r:>16} {lp.logprob:8.3f}   {alts}", file=out)


def check_adapter_path(adapter: str | None) -> None:
    """A mistyped --adapter is named as such (loading would call it a missing checkpoint)."""
    if adapter is not None and not Path(adapter).exists():
        raise HainaError(f"--adapter {adapter} not found; point it at a LoRA run or checkpoint directory")


def _load_engine(checkpoint: str | list[str], adapter: str | None, backend: str, device: str, dtype: DTypeName,
                 batch_size: int, weights: list[float] | None = None, kv_cache: str = "auto",
                 kv_budget_mb: float | None = None) -> tuple[Any, Tokenizer]:
    """The engine of `backend` over `checkpoint` (an ONNX export for onnxruntime), and the tokenizer.

    Several checkpoints run as one ensemble (`haina.generate.ensemble`), mixed with `weights`; `kv_cache` and
    `kv_budget_mb` choose haina's KV cache (`Engine`).
    """
    from haina.generate.ensemble import as_checkpoints
    from haina.generate.onnx_backend import is_onnx_export, load_onnx_engine

    paths = as_checkpoints(checkpoint)
    if backend == "onnxruntime":
        if len(paths) > 1:
            raise HainaError("--backend onnxruntime runs one exported model; an ensemble of several --checkpoint "
                             "runs on --backend haina")
        if adapter is not None:
            raise HainaError("--adapter does not apply to --backend onnxruntime; merge the adapters in at export "
                             "(haina export onnx --adapter)")
        if kv_cache != "auto" or kv_budget_mb is not None:
            raise HainaError("--kv-cache and --kv-budget-mb choose haina's own KV cache; drop them with --backend "
                             "onnxruntime")
        engine, tokenizer = load_onnx_engine(paths[0], device=device)
        exported = engine.decoder.spec["dtype"]
        if dtype not in ("float32", exported):  # float32 is the default: it stands for "as exported"
            raise HainaError(f"--dtype {dtype}: the ONNX export in {paths[0]} is {exported}, fixed at export; "
                             f"drop --dtype or re-export with haina export onnx --dtype {dtype}")
    elif onnx := next((p for p in paths if is_onnx_export(p)), None):
        raise HainaError(f"{onnx} is an ONNX export; run it with --backend onnxruntime" + (
            "" if len(paths) == 1 else ", alone (an ensemble mixes haina checkpoints)"))
    else:
        from haina.core.device import resolve_device, resolve_dtype
        from haina.generate.engine import Engine
        from haina.generate.ensemble import load_ensemble

        dev = resolve_device(device)
        model, tokenizer = load_ensemble(paths, weights, device=dev, dtype=resolve_dtype(dtype, dev), adapter=adapter)
        engine = None if tokenizer is None else Engine(model, max_batch_size=batch_size, eos_token_id=tokenizer.eos_id,
                                                       kv_cache=kv_cache, kv_budget_mb=kv_budget_mb)
    if tokenizer is None:
        raise HainaError(f"checkpoint {paths[0]} has no tokenizer/ directory; generate needs one to read text")
    return engine, tokenizer


def generate_command(checkpoint: list[str], adapter: str | None = None, weights: list[float] | None = None,
                     prompt: str | None = None,
                     prompts_file: str | None = None, out: str | None = None, max_new_tokens: int = 200,
                     temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, min_p: float = 0.0,
                     repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     no_repeat_ngram_size: int = 0, num_beams: int = 1, length_penalty: float = 1.0,
                     early_stopping: bool = False, n: int = 1, stop: list[str] | None = None, seed: int | None = 0,
                     stream: bool = False, logprobs: int | None = None, ignore_eos: bool = False, batch_size: int = 16,
                     device: str = "auto", dtype: DTypeName = "float32",
                     backend: Literal["haina", "onnxruntime"] = "haina",
                     kv_cache: Literal["auto", "paged", "fixed"] = "auto", kv_budget_mb: float | None = None) -> int:
    """Generate text from a checkpoint: one --prompt, or a --prompts-file processed in batches.

    Several --checkpoint make an ensemble: at every step their next-token probabilities are mixed (weighted by
    --weights), so they must share one tokenizer.

    Args:
        checkpoint: checkpoint or training run directory (with a tokenizer); several make an ensemble.
        adapter: a LoRA run or checkpoint directory to generate with, trained on --checkpoint (its tokenizer, when
            it saved one, is used instead of the base's); a single --checkpoint only.
        weights: the ensemble's weights, one per --checkpoint (e.g. 0.6,0.4), normalized to sum 1 (default: equal).
        prompt: the text to continue.
        prompts_file: .txt (one prompt per line) or .jsonl (objects with a 'prompt' field and optional 'stop',
            'id' and sampling options); writes JSONL results to --out or stdout.
        out: where to write the JSONL results of --prompts-file (default: stdout).
        max_new_tokens: the most tokens to generate per completion.
        temperature: sampling temperature; 0 = greedy.
        top_k: sample from the k most likely tokens only (0 = off).
        top_p: nucleus sampling: the smallest set of tokens with this total probability, in (0, 1].
        min_p: drop tokens less likely than min_p times the most likely one (0 = off).
        repetition_penalty: > 1 discourages tokens already present (1 = off).
        presence_penalty: subtracted from the logit of every token already generated.
        frequency_penalty: subtracted once per earlier occurrence of a token.
        no_repeat_ngram_size: never repeat an n-gram of this size (0 = off).
        num_beams: beam search with this many beams (1 = off); prints the best beams.
        length_penalty: beam scores are divided by length ** length_penalty.
        early_stopping: end beam search as soon as num_beams hypotheses are finished.
        n: completions per prompt.
        stop: stop strings; the text ends right before the first one.
        seed: random seed (completion i of a prompt uses seed + i).
        stream: print the text as it is generated (single --prompt, n = 1).
        logprobs: also report each token's logprob and this many alternatives.
        ignore_eos: keep generating past the end-of-text token.
        batch_size: sequences generated together.
        device: auto, cpu, cuda, cuda:1 or mps.
        dtype: the weights' precision: float32, bfloat16, or float16 (CUDA/MPS only).
        backend: haina (its own engine, on a checkpoint) or onnxruntime (ONNX Runtime, on a directory written by
            `haina export onnx`; one sequence at a time, no beam search, precision fixed at export).
        kv_cache: paged (memory follows the tokens held), fixed (every sequence's whole context reserved up front,
            as CUDA graphs need), or auto (fixed on CUDA without --kv-budget-mb, else paged).
        kv_budget_mb: the most memory the KV cache may take, in MiB; sequences beyond it wait for room (default: no
            limit).
    """
    from haina.generate.text import TextGenerator

    if (prompt is None) == (prompts_file is None):
        raise HainaError("give exactly one of --prompt TEXT or --prompts-file FILE")
    if stream and (prompts_file is not None or n != 1 or num_beams != 1):
        raise HainaError("--stream prints one completion: use it with --prompt, --n 1 and --num-beams 1")
    if out is not None and prompts_file is None:
        raise HainaError("--out is for the JSONL results of --prompts-file; with --prompt the text goes to stdout")
    stops = check_stop_strings(stop)
    base = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                          num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, n=n,
                          seed=seed, logprobs=logprobs, ignore_eos=ignore_eos)
    base.validate()  # before loading the model: bad options fail fast
    specs = read_prompts(prompts_file) if prompts_file is not None else [{"prompt": prompt}]
    plist = [_params_for(s, base, f"{prompts_file}:prompt {i + 1}: ") for i, s in enumerate(specs)]
    check_adapter_path(adapter)
    if backend == "onnxruntime" and num_beams > 1:
        raise HainaError("beam search runs on haina's own engine only; use --backend haina or --num-beams 1")
    engine, tokenizer = _load_engine(checkpoint, adapter, backend, device, dtype, batch_size, weights, kv_cache,
                                     kv_budget_mb)
    gen = TextGenerator(engine, tokenizer)

    if stream:
        print(prompt, end="", flush=True)
        collected: list[TokenLogprob] = []
        for delta in gen.stream_events(prompt, plist[0], stop=stops):
            print(delta.text, end="", flush=True)
            collected += delta.logprobs or []
        print(flush=True)
        _print_logprobs(tokenizer, collected if logprobs is not None else None)
        return 0

    per_prompt_stops = [stops + check_stop_strings(s.get("stop")) for s in specs]
    results = gen.generate([s["prompt"] for s in specs], plist, stop=per_prompt_stops)
    if prompts_file is None:
        many = len(results[0]) > 1
        for i, r in enumerate(results[0]):
            if many:
                print(f"--- completion {i + 1} ({r.finish_reason})")
            print(prompt + r.text, flush=True)
            _print_logprobs(tokenizer, r.logprobs)
        return 0
    lines = []
    for spec, rs in zip(specs, results):
        record = {k: spec[k] for k in ("id",) if k in spec}
        record["prompt"] = spec["prompt"]
        record["completions"] = [{"text": r.text, "finish_reason": r.finish_reason, "num_tokens": len(r.token_ids),
                                  **({"logprobs": _logprobs_json(tokenizer, r.logprobs)} if r.logprobs is not None
                                     else {})} for r in rs]
        lines.append(json.dumps(record, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    if out is None:
        sys.stdout.write(text)
    else:
        from haina.core.io import write_text

        write_text(out, text)
        print(f"wrote {len(lines)} results to {out}", file=sys.stderr)
    return 0
