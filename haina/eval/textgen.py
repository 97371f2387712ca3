"""`haina eval generate`: generate for the prompts of a reference file and score the generations.

`refs.jsonl` holds one object per line: a string `prompt` (or, for chat models, `messages` as in
`haina finetune sft`), the expected output as `reference` (a string) or `references` (several strings),
and optionally an `id`, per-prompt `stop` strings and the field `--group-field` names. A plain prompt is
continued as text; with `--chat`, or for a record with `messages`, the conversation is rendered through
the tokenizer's chat template (`encode_chat`, as `haina chat` renders it) and the reply is scored.

Generation runs through the engine in batches (`TextGenerator`), `--n K` samples per prompt with seeds
seed, seed+1, ... Scores (`textmetrics`) are computed per sample run — sample k of every prompt forms one
corpus — and averaged over the K runs; with K > 1, `<score>_best_of_k` also scores, per example, the
sample that matches the references best (an oracle: how much a perfect reranker could gain).

The directory holds `report.json` / `report.md` and `outputs.jsonl` (one row per prompt, in file order:
id, prompt, references, generations and each generation's scores). `--noise` repeats the evaluation on
perturbed prompts (a table and a metric-versus-noise PNG; the top-level metrics stay the clean ones);
`--group-field` adds every score per group and the largest gap.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from haina.core.errors import HainaError
from haina.eval.load import DType
from haina.eval.textmetrics import (
    HEADLINE,
    METRICS,
    check_metric_packages,
    corpus_scores,
    parse_metrics,
    score_names,
    sentence_scores,
)

__all__ = ["RefRecord", "eval_generate_command", "read_references", "score_generations"]

OUTPUTS = "outputs.jsonl"
NOISE_PNG = "metric_vs_noise.png"


@dataclass(frozen=True, kw_only=True)
class RefRecord:
    """One line of the reference file: what to prompt with and what the answer should be."""

    line: int  # 1-based line number in the file, for messages and the default id
    id: Any
    prompt: str | None
    messages: list[dict] | None
    references: list[str]
    stop: list[str]
    raw: dict  # the whole object (for --group-field)


# ---------------------------------------------------------------------------------------------- reading
def _references_of(obj: dict) -> list[str] | None:
    """The record's references, or None when it has no usable one (missing, empty, or not strings)."""
    if "references" in obj:
        refs = obj["references"]
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            return None
    elif "reference" in obj:
        refs = [obj["reference"]] if isinstance(obj["reference"], str) else None
    else:
        return None
    refs = [r for r in refs if r.strip()]
    return refs or None


def _messages_of(raw: object, where: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise HainaError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} objects")
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise HainaError(f"{where}: each message needs a role (system, user or assistant) and a string content")
    return [dict(m) for m in raw]


def read_references(path: str | Path, limit: int | None = None) -> list[RefRecord]:
    """The records of a reference JSONL file (the first `limit` of them), all checked before any is used.

    Bad JSON, a record without a prompt, or records without references are one-line errors naming the
    first bad line and how many lines share the problem: an evaluation never skips examples silently.
    """
    from haina.generate.detok import check_stop_strings

    path = Path(path)
    if not path.is_file():
        raise HainaError(f"--data {path} not found; give a JSONL file of {{'prompt': ..., 'reference': ...}} lines")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise HainaError(f"--data {path} is not UTF-8 text (byte {e.start})") from None
    records: list[RefRecord] = []
    bad_json: list[int] = []
    no_refs: list[int] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and len(records) + len(bad_json) + len(no_refs) >= limit:
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad_json.append(n)
            continue
        where = f"{path}:{n}"
        if not isinstance(obj, dict):
            raise HainaError(f"{where}: each line must be a JSON object with 'prompt' and 'reference'")
        if "messages" in obj:
            prompt, messages = None, _messages_of(obj["messages"], where)
        elif isinstance(obj.get("prompt"), str):
            prompt, messages = obj["prompt"], None
        else:
            raise HainaError(f"{where}: no string 'prompt' (or 'messages' list) to generate from")
        refs = _references_of(obj)
        if refs is None:
            no_refs.append(n)
            continue
        try:
            stop = check_stop_strings(obj.get("stop"))
        except HainaError as e:
            raise HainaError(f"{where}: {e}") from None
        records.append(RefRecord(line=n, id=obj.get("id", n), prompt=prompt, messages=messages, references=refs,
                                 stop=stop, raw=obj))
    if bad_json:
        raise HainaError(f"{path}:{bad_json[0]}: not valid JSON ({len(bad_json)} such line(s)); fix them, an "
                         "evaluation does not skip examples")
    if no_refs:
        raise HainaError(f"{path}:{no_refs[0]}: no 'reference' string or 'references' list of strings "
                         f"({len(no_refs)} record(s) lack one); give every prompt a reference")
    if not records:
        raise HainaError(f"--data {path} holds no records")
    return records


# ---------------------------------------------------------------------------------------------- scoring
def score_generations(generations: list[list[str]], references: list[list[str]], metrics: list[str],
                      per_example: list[list[dict[str, float]]] | None = None,
                      indices: list[int] | None = None) -> dict[str, float]:
    """Scores of K samples per example: the mean over the K sample runs, and best-of-K when K > 1.

    Args:
        generations: per example, its K generated texts (the same K for every example).
        references: per example, its references.
        metrics: names from `textmetrics.METRICS`.
        per_example: `sentence_scores` of each generation, when already computed.
        indices: score only these examples (a group).
    """
    ix = list(range(len(generations))) if indices is None else list(indices)
    if per_example is None:
        per_example = [[sentence_scores(g, r, metrics) for g in gs] for gs, r in zip(generations, references)]
    refs = [references[i] for i in ix]
    k = len(generations[ix[0]]) if ix else 1
    runs = [corpus_scores([generations[i][j] for i in ix], refs, metrics, [per_example[i][j] for i in ix])
            for j in range(k)]
    names = score_names(metrics)
    out = {s: sum(r[s] for r in runs) / k for s in names}
    if k > 1:
        for m in metrics:
            for s in METRICS[m]:
                best = [max(range(k), key=lambda j, i=i: per_example[i][j][s]) for i in ix]
                if m in ("bleu", "chrf"):  # corpus metrics: score the oracle's choices as one corpus
                    chosen = [generations[i][b] for i, b in zip(ix, best)]
                    out[f"{s}_best_of_k"] = corpus_scores(chosen, refs, [m])[s]
                else:
                    out[f"{s}_best_of_k"] = sum(per_example[i][b][s] for i, b in zip(ix, best)) / len(ix)
    return out


# ---------------------------------------------------------------------------------------------- generating
def _noisy(rec: RefRecord, kind: str, rate: float, seed: int) -> RefRecord:
    """The record with its prompt (or every user message) perturbed; system messages stay as written."""
    from haina.eval.noise import perturb

    if kind == "clean" or rate == 0.0:
        return rec
    if rec.messages is not None:
        msgs = [{**m, "content": perturb(m["content"], kind, rate, seed)} if m["role"] == "user" else m
                for m in rec.messages]
        return replace(rec, messages=msgs)
    return replace(rec, prompt=perturb(rec.prompt, kind, rate, seed))


def _encode(rec: RefRecord, tokenizer, chat: bool) -> list[int]:
    from haina.generate.chat import encode_chat

    if rec.messages is not None:
        return encode_chat(tokenizer, rec.messages)
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": rec.prompt}])
    return tokenizer.encode(rec.prompt)


def _run(gen, records: list[RefRecord], base, chat: bool, batch_size: int, data: str, label: str,
         noisy: bool = False):
    """Generate for every record: (per record, its TextResults), seconds spent generating.

    A prompt that noise deleted entirely starts from the BOS (else EOS) token: generation without context,
    which is what the perturbation left.
    """
    from haina.core.log import progress
    from haina.generate.chat import chat_stop_strings, chat_stop_token_ids

    tok = gen.tokenizer
    chat_params = replace(base, stop_token_ids=tuple(dict.fromkeys([*base.stop_token_ids, *chat_stop_token_ids(tok)])))
    chat_stops = chat_stop_strings(tok)
    prompts, plist, stops = [], [], []
    for rec in records:
        as_chat = chat or rec.messages is not None
        ids = _encode(rec, tok, chat)
        if not ids and noisy:
            ids = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
        params = chat_params if as_chat else base
        try:
            gen.engine.check_prompt(ids, params)
        except HainaError as e:  # name the line, not the position in a batch
            raise HainaError(f"{data}:{rec.line}: {e}") from None
        prompts.append(ids)
        plist.append(params)
        stops.append(rec.stop + (chat_stops if as_chat else []))
    # Several batches' worth per call: the engine refills free slots as sequences finish, and each call
    # ends with a partly empty batch, so fewer, larger calls waste less.
    chunk = 4 * batch_size
    results = []
    start = time.perf_counter()
    with progress(total=len(prompts), desc=label, unit="prompt") as bar:
        for s in range(0, len(prompts), chunk):
            results += gen.generate(prompts[s:s + chunk], plist[s:s + chunk], stop=stops[s:s + chunk])
            bar.update(len(prompts[s:s + chunk]))
    return results, time.perf_counter() - start


def _output_row(rec: RefRecord, results, scores: list[dict[str, float]], group_field: str | None) -> dict:
    row: dict[str, Any] = {"id": rec.id}
    if rec.messages is not None:
        row["messages"] = rec.messages
    else:
        row["prompt"] = rec.prompt
    if group_field is not None:
        row[group_field] = rec.raw[group_field]
    row["references"] = rec.references
    row["generations"] = [r.text for r in results]
    row["finish_reasons"] = [r.finish_reason for r in results]
    row["scores"] = [{k: round(v, 6) for k, v in s.items()} for s in scores]
    return row


def _validate(metrics, n, max_new_tokens, temperature, top_p, seed, batch_size, limit):
    """Every option checked before the model loads; returns (metric names, sampling params)."""
    from haina.generate.sampling import SamplingParams

    names = parse_metrics(metrics)
    check_metric_packages(names)
    if n < 1:
        raise HainaError(f"--n must be at least 1, got {n}")
    if n > 1 and temperature == 0:
        raise HainaError(f"--n {n} with --temperature 0 gives {n} identical greedy generations; set --temperature "
                         "above 0 (e.g. 0.7) to sample different ones")
    if batch_size < 1:
        raise HainaError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise HainaError(f"--limit must be at least 1, got {limit}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, n=n)
    params.validate()
    return names, params


def eval_generate_command(checkpoint: list[str], data: str, out: str, adapter: str | None = None,
                          weights: list[float] | None = None, metrics: list[str] | None = None, n: int = 1, max_new_tokens: int = 128,
                          temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
                          batch_size: int = 16, limit: int | None = None, noise: list[str] | None = None,
                          rates: list[float] | None = None, group_field: str | None = None, device: str = "auto",
                          dtype: DType = "float32", overwrite: bool = False) -> int:
    """Generate for the prompts of a reference file and score them: BLEU, chrF, ROUGE, exact match.

    Writes report.json, report.md and outputs.jsonl (each prompt's generations and their scores) to --out.
    BLEU and chrF (sacrebleu) are corpus scores in [0, 100]; ROUGE-1/2/L F1 (rouge-score, stemmed) and exact
    match (after stripping and collapsing whitespace) are means over examples in [0, 1].

    Args:
        checkpoint: checkpoint or training run directory (with a tokenizer); several generate as one ensemble
            (`haina generate`'s: their next-token probabilities mixed at every step).
        data: JSONL, one object per line: 'prompt' (or chat 'messages'), 'reference' (a string) or 'references'
            (a list), and optionally 'id', 'stop' (strings that end the generation) and a group field.
        out: the report directory.
        adapter: a LoRA run or checkpoint directory trained on --checkpoint, applied on top (one checkpoint only).
        weights: an ensemble's weights, one per --checkpoint (e.g. 0.6,0.4; default: equal).
        metrics: which scores: bleu, chrf, rouge, exact_match (default: all).
        n: generations per prompt; scores are averaged over them, and best-of-n is reported too.
        max_new_tokens: the most tokens generated per prompt.
        temperature: sampling temperature; 0 = greedy (--n above 1 needs more than 0).
        top_p: nucleus sampling: the smallest set of tokens with this total probability, in (0, 1].
        seed: random seed (generation i of a prompt uses seed + i; noise uses it too).
        chat: render each prompt as a user message through the tokenizer's chat template (records with
            'messages' are always rendered so).
        batch_size: sequences generated together.
        limit: evaluate only the first N records.
        noise: also evaluate on perturbed prompts: char (typos), word (deletions, swaps), or both.
        rates: noise rates for --noise (default: 0 0.05 0.1 0.2).
        group_field: a record field naming each example's group: every score per group and the largest gap.
        device: auto, cpu, cuda, cuda:1 or mps.
        dtype: float32, bfloat16 or float16 (CUDA only).
        overwrite: replace --out even when it holds something other than a generate report.
    """
    from haina.eval.groups import group_values, groups_markdown, largest_gaps, per_group
    from haina.eval.load import load_for_eval
    from haina.eval.noise import noise_grid, plot_metric_vs_noise
    from haina.eval.report import Report, eval_output, markdown_table, print_summary, write_report
    from haina.generate.engine import Engine
    from haina.generate.text import TextGenerator

    names, params = _validate(metrics, n, max_new_tokens, temperature, top_p, seed, batch_size, limit)
    grid = noise_grid(noise, rates)
    records = read_references(data, limit)
    groups = group_values([r.raw for r in records], group_field, str(data)) if group_field is not None else None
    scores = score_names(names)

    from haina.generate.ensemble import as_checkpoints

    paths = as_checkpoints(checkpoint)
    with eval_output(out, "generate", inputs=[*paths, adapter, data], overwrite=overwrite) as tmp:
        model, tokenizer, _ = load_for_eval(paths, adapter, device, dtype, weights=weights)
        gen = TextGenerator(Engine(model, max_batch_size=batch_size, eos_token_id=tokenizer.eos_id), tokenizer)
        refs = [r.references for r in records]

        results, seconds = _run(gen, records, params, chat, batch_size, data, "generating")
        texts = [[r.text for r in rs] for rs in results]
        per_example = [[sentence_scores(t, rf, names) for t in ts] for ts, rf in zip(texts, refs)]
        clean = score_generations(texts, refs, names, per_example)
        tokens = sum(len(r.token_ids) for rs in results for r in rs)
        with open(tmp / OUTPUTS, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(_output_row(rec, rs, sc, group_field), ensure_ascii=False) + "\n"
                         for rec, rs, sc in zip(records, results, per_example))

        report_metrics: dict[str, float | int | None] = {**clean, "examples": len(records), "samples_per_prompt": n,
                                                         "generated_tokens": tokens,
                                                         "tokens_per_sec": tokens / seconds if seconds > 0 else None}
        details: dict[str, Any] = {"metrics": names, "outputs": OUTPUTS,
                                   "sampling": {"n": n, "max_new_tokens": max_new_tokens, "temperature": temperature,
                                                "top_p": top_p, "seed": seed, "chat": chat}}
        mode = "greedy" if temperature == 0 else f"temperature {temperature}, top-p {top_p}"
        sections = [("Generation", f"{len(records)} prompts × {n} generation(s), {mode}, at most {max_new_tokens} "
                                   f"new tokens; per-example generations and scores in `{OUTPUTS}`. BLEU and chrF "
                                   "are sacrebleu corpus scores (0–100); ROUGE F1 and exact match are means over "
                                   "examples (0–1)." + (" With n > 1, scores average the n sample runs and "
                                                        "`*_best_of_k` keeps each example's best sample."
                                                        if n > 1 else ""))]
        images: list[str] = []

        if groups is not None:
            by_group = per_group(groups, lambda ix: score_generations(texts, refs, names, per_example, ix))
            gaps = largest_gaps(by_group)
            details["groups"] = {"field": group_field, "by_group": by_group, "gaps": gaps}
            report_metrics.update({f"gap_{s}": gaps[s]["gap"] for s in scores if s in gaps})
            sections.append((f"Groups ({group_field})", groups_markdown(by_group, gaps)))

        if grid:
            rows = []
            for kind, rate in grid:
                if kind == "clean":
                    found = {s: clean[s] for s in scores}
                else:
                    perturbed = [_noisy(r, kind, rate, seed) for r in records]
                    res, _ = _run(gen, perturbed, params, chat, batch_size, data, f"{kind} noise {rate}", noisy=True)
                    found = score_generations([[r.text for r in rs] for rs in res], refs, names)
                    found = {s: found[s] for s in scores}
                rows.append({"noise": kind, "rate": rate, **found})
            details["noise"] = rows
            table = markdown_table(["noise", "rate", *scores], [[r["noise"], r["rate"], *[r[s] for s in scores]]
                                                               for r in rows])
            sections.append(("Robustness", table))
            headline = HEADLINE[names[0]]
            plot_metric_vs_noise([(r["noise"], r["rate"], r[headline]) for r in rows], headline, tmp / NOISE_PNG)
            images.append(NOISE_PNG)

        obj = write_report(tmp, Report(kind="generate", metrics=report_metrics, details=details, sections=sections,
                                       images=images, checkpoint=" + ".join(paths), adapter=adapter,
                                       data=[data]))
    print_summary(obj, [*scores, "examples"], out)
    return 0
