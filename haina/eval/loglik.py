"""Log-likelihood scoring of continuations directly with the model, tokenized exactly as lm-eval does through
`haina serve`.

lm-eval's `local-completions` model with `tokenizer_backend=remote` (0.4.13) scores a (context, continuation)
pair like this, and these functions do the same without a server:

1. Trailing whitespace of the context moves to the front of the continuation (`TemplateLM._encode_pair`).
2. Both `context + continuation` and `context` are encoded (the server's /tokenize: plain text, no special
   tokens added); the continuation's ids are the whole's ids after the context's length. An empty context
   becomes one prefix token (BOS, else EOS) unless the continuation already starts with it.
3. The ids are left-truncated to `max_length - 1` tokens (one is kept for the token the server generates) and
   the context length shrinks by what was cut.
4. The server echoes the prompt's log-probabilities; the continuation's are summed, and it is greedy when
   each of its tokens is the most likely one.

`multiple_choice` then predicts as lm-eval's `multiple_choice` output type: the choice with the highest sum
(`acc`), or with the highest sum per character of the choice (`acc_norm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from haina.core.errors import HainaError
from haina.tokenizer import Tokenizer

__all__ = ["ChoiceResult", "encode_pair", "loglikelihood", "multiple_choice", "prefix_token_id"]


def prefix_token_id(tokenizer: Tokenizer) -> int:
    """The token an empty context stands for: BOS when the tokenizer has one, else EOS (what documents follow)."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal `loglikelihood` splits them."""
    if context == "":
        cont = tokenizer.encode(continuation)
        if not cont:
            raise HainaError("cannot score an empty continuation after an empty context")
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:  # "Answer: " + "B" scores " B": the space belongs to the word, as BPE pre-tokenizers see it
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def _window(ctx: list[int], cont: list[int], max_length: int | None) -> tuple[list[int], int]:
    """lm-eval's input and context length for one pair (TemplateAPI.batch_loglikelihood_requests)."""
    if max_length is None:
        return ctx + cont, len(ctx)
    keep = max_length - 1  # the server generates one token after the prompt
    inp = (ctx + cont)[-keep:]
    ctxlen = len(ctx) - max(0, len(ctx) + len(cont) - keep)
    return inp, ctxlen


@torch.inference_mode()
def loglikelihood(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *,
                  max_length: int | None = None, batch_size: int = 8) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy) for each (context ids, continuation ids) pair.

    Args:
        model: a haina Transformer (its device and dtype are used; log-probabilities in fp32).
        pairs: token ids, as `encode_pair` makes them.
        max_length: the context lm-eval was given (its `max_length` model argument, by default the server's
            context); longer inputs are left-truncated as lm-eval truncates them. None: no truncation.
        batch_size: sequences per forward pass.
    """
    if batch_size < 1:
        raise HainaError(f"batch_size must be at least 1, got {batch_size}")
    windows = [_window(list(c), list(x), max_length) for c, x in pairs]
    for inp, ctxlen in windows:
        if ctxlen < 1:
            raise HainaError(f"a continuation of {len(inp)} tokens leaves no context within max_length "
                             f"{max_length}; lm-eval cannot score it either")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[float, bool]] = []
    try:
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            T = max(len(inp) for inp, _ in chunk)
            # Right padding cannot change a real token's logits under the causal mask.
            idx = torch.tensor([inp + [0] * (T - len(inp)) for inp, _ in chunk], device=device)
            lp = model(idx).float().log_softmax(dim=-1)  # (B, T, V)
            for b, (inp, ctxlen) in enumerate(chunk):
                rows = lp[b, ctxlen - 1:len(inp) - 1]  # position i-1 predicts token i (none: sum 0, greedy)
                targets = torch.tensor(inp[ctxlen:], device=device)
                picked = rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                # The server calls a token greedy when its logprob equals the top-1 value: ties count as greedy.
                greedy = bool((picked == rows.max(dim=-1).values).all())
                out.append((sum(picked.tolist()), greedy))  # summed in Python, in order, as lm-eval sums
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True, kw_only=True)
class ChoiceResult:
    """One multiple-choice item scored: each choice's log-likelihood and greediness, and the predictions."""

    loglikelihoods: list[float]
    greedy: list[bool]
    pred: int
    pred_norm: int
    gold: int


def multiple_choice(model: torch.nn.Module, tokenizer: Tokenizer, items: Sequence[tuple[str, Sequence[str], int]],
                    *, delimiter: str = " ", max_length: int | None = None, batch_size: int = 8
                    ) -> tuple[dict[str, float], list[ChoiceResult]]:
    """lm-eval's `acc` and `acc_norm` of (context, choices, gold index) items, and each item's scores.

    Args:
        model: a haina Transformer.
        tokenizer: its tokenizer.
        items: (context, choices, gold index); the continuation of each choice is `delimiter + choice`.
        delimiter: the task's `target_delimiter`.
        max_length: as in `loglikelihood`.
        batch_size: sequences per forward pass.
    """
    if not items:
        raise HainaError("no items to score")
    pairs = [encode_pair(tokenizer, ctx, f"{delimiter}{c}") for ctx, choices, _ in items for c in choices]
    scores = loglikelihood(model, pairs, max_length=max_length, batch_size=batch_size)
    results, at = [], 0
    for _, choices, gold in items:
        lls, greedy = zip(*scores[at:at + len(choices)])
        at += len(choices)
        lengths = np.array([float(len(c)) for c in choices])  # characters of the choice, the delimiter left out
        results.append(ChoiceResult(loglikelihoods=list(lls), greedy=list(greedy), pred=int(np.argmax(lls)),
                                    pred_norm=int(np.argmax(np.array(lls) / lengths)), gold=int(gold)))
    acc = sum(r.pred == r.gold for r in results) / len(results)
    acc_norm = sum(r.pred_norm == r.gold for r in results) / len(results)
    return {"acc": acc, "acc_norm": acc_norm}, results
