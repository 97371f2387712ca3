"""What the engine returns: per-step events, finished results and token log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    """A token's log-probability under the raw model distribution, with the best alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class StepEvent:
    """What `step()` reports for one request.

    `new_token_ids` includes a stop / EOS token when one ends the request (detokenizers skip
    special tokens). `prompt_logprobs` comes only with a request's first event; its entry 0 is None.
    """

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    finished: bool
    finish_reason: str | None  # "stop" (eos / stop token) | "length" | "abort"
    num_prompt_tokens: int
    num_generated_tokens: int


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None


def token_logprobs(lp: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """Per row of log-probabilities lp (N, V): the chosen token's logprob and the top-k alternatives."""
    if not tokens:  # a one-token prompt has nothing to score (torch.tensor([]) is float: no index)
        return []
    rows = torch.arange(len(tokens), device=lp.device)
    chosen = lp[rows, torch.tensor(tokens, device=lp.device)].tolist()
    kmax = min(max((k for k in ks if k is not None), default=0), lp.size(-1))
    top_v, top_i = (lp.topk(kmax, dim=-1) if kmax else (None, None))
    top_v = top_v.tolist() if kmax else None
    top_i = top_i.tolist() if kmax else None
    out: list[TokenLogprob | None] = []
    for b, (tok, k) in enumerate(zip(tokens, ks)):
        if k is None:
            out.append(None)
            continue
        top = list(zip(top_i[b][:k], top_v[b][:k])) if k and kmax else []
        out.append(TokenLogprob(token_id=tok, logprob=chosen[b], top=top))
    return out
