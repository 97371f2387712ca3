"""Beam search, reached through `Engine.generate` when `num_beams > 1`.

Hugging Face's convention: at each step the 2·num_beams best continuations of all beams are
ranked by cumulative log-probability; a stop / EOS token among the first num_beams of them
finishes a hypothesis with score sum_logprob / generated_len ** length_penalty (the EOS token
counted in the length), and the best num_beams other continuations go on. Search ends at
max_new_tokens (running beams become hypotheses), or earlier once num_beams hypotheses are
finished and — unless `early_stopping` — no running beam can still beat the worst of them.
Beam search is deterministic: temperature, top-k, top-p and min-p do not apply; repetition
penalties and no-repeat-n-gram do (as log-probability processors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from haina.generate.cache import KVCache
from haina.generate.outputs import GenerationResult, TokenLogprob, token_logprobs
from haina.generate.sampling import PENALTY_PROCESSORS, RowState, SamplingContext, SamplingParams, process_logits

if TYPE_CHECKING:
    from haina.generate.engine import Engine


@dataclass
class _Hyp:
    score: float
    tokens: list[int]
    logprobs: list[TokenLogprob]
    stopped: bool


def beam_search(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> list[GenerationResult]:
    """The num_beams best hypotheses for one prompt, best first."""
    prompt = engine.check_prompt(prompt_ids, params)
    model, device, k = engine.model, engine.device, params.num_beams
    n = len(prompt)
    max_new = min(params.max_new_tokens, engine.max_seq_len - n)
    stop = set(params.stop_token_ids)
    if engine.eos_token_id is not None and not params.ignore_eos:
        stop.add(engine.eos_token_id)
    lp_k = params.logprobs
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = KVCache(model.cfg, k, n + max_new, device=device, dtype=engine.dtype)
            positions = cache.bind(0, [0], n)
            h = model.hidden_states(torch.tensor([prompt], device=device), positions=positions, cache=cache)
            cache.commit(0, [n])
            cache.reorder([0] * k)  # every beam starts from the prompt
            logits = model.lm_head(h[:, -1]).float().expand(k, -1).clone()  # (k, V)
            V = logits.size(-1)
            beams: list[tuple[list[int], list[TokenLogprob]]] = [([], [])] * k
            scores = torch.full((k,), float("-inf"), device=device)
            scores[0] = 0.0  # identical beams at first: expand only one of them
            finished: list[_Hyp] = []
            for step in range(max_new):
                raw = logits.log_softmax(dim=-1)
                rows = [RowState(params=params, tokens=prompt + toks, prompt_len=n) for toks, _ in beams]
                if params.uses_penalties or params.no_repeat_ngram_size:
                    lp = process_logits(logits, SamplingContext(rows), PENALTY_PROCESSORS).log_softmax(dim=-1)
                else:
                    lp = raw
                cand = (scores[:, None] + lp).view(-1)
                top_v, top_i = cand.topk(min(2 * k, cand.numel()))
                length = step + 1
                nxt: list[tuple[int, int, float]] = []  # (source beam, token, cumulative score)
                for rank, (s, flat) in enumerate(zip(top_v.tolist(), top_i.tolist())):
                    if s == float("-inf"):
                        break
                    b, tok = divmod(flat, V)
                    if tok in stop:
                        if rank < k:
                            _add(finished, k, _Hyp(s / length ** params.length_penalty, beams[b][0] + [tok],
                                                   _lps(raw, b, tok, lp_k, beams[b][1]), True))
                        continue
                    nxt.append((b, tok, s))
                    if len(nxt) == k:
                        break
                if not nxt or step == max_new - 1:
                    for b, tok, s in nxt:
                        _add(finished, k, _Hyp(s / length ** params.length_penalty, beams[b][0] + [tok],
                                               _lps(raw, b, tok, lp_k, beams[b][1]), False))
                    break
                if len(finished) >= k:
                    worst = min(hyp.score for hyp in finished)
                    if params.early_stopping or worst >= max(s for _, _, s in nxt) / length ** params.length_penalty:
                        break
                beams = [(beams[b][0] + [tok], _lps(raw, b, tok, lp_k, beams[b][1]))
                         for b, tok, _ in nxt]
                sources = [b for b, _, _ in nxt]
                scores = torch.tensor([s for _, _, s in nxt], device=device)
                if len(nxt) < k:  # fewer live continuations than beams: pad with dead copies
                    beams += [beams[0]] * (k - len(nxt))
                    sources += [sources[0]] * (k - len(nxt))
                    scores = torch.cat([scores, torch.full((k - len(nxt),), float("-inf"), device=device)])
                cache.reorder(sources)
                toks = torch.tensor([[b[0][-1]] for b in beams], device=device)
                positions = cache.bind(0, [n + step] * k, 1)
                logits = model.lm_head(model.hidden_states(toks, positions=positions, cache=cache)[:, -1]).float()
                cache.commit(0, [1] * k)
    finally:
        model.train(was_training)
    finished.sort(key=lambda hyp: hyp.score, reverse=True)
    prompt_lps = None
    if params.prompt_logprobs is not None:
        prompt_lps = engine.prompt_logprobs(prompt, params.prompt_logprobs)
    return [GenerationResult(token_ids=hyp.tokens, finish_reason="stop" if hyp.stopped else "length",
                             logprobs=hyp.logprobs if lp_k is not None else None, prompt_logprobs=prompt_lps)
            for hyp in finished[:k]]


def _add(finished: list[_Hyp], k: int, hyp: _Hyp) -> None:
    """Keep the k best hypotheses."""
    if len(finished) < k:
        finished.append(hyp)
    else:
        worst = min(range(k), key=lambda i: finished[i].score)
        if hyp.score > finished[worst].score:
            finished[worst] = hyp


def _lps(raw: torch.Tensor, b: int, tok: int, k: int | None, prev: list[TokenLogprob]) -> list[TokenLogprob]:
    """The beam's token log-probabilities extended by `tok` (unchanged when none are requested)."""
    if k is None:
        return prev
    return prev + token_logprobs(raw[b:b + 1], [tok], [k])
