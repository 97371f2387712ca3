"""Sampling options: each processor limits the distribution as it should, alone and in the engine."""

import math

import pytest
import torch

from haina.core.errors import HainaError
from haina.generate import Engine, SamplingParams
from haina.generate.sampling import (
    RowState,
    SamplingContext,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p,
    sample_tokens,
)
from haina.model import ModelConfig, Transformer

PROBS = [0.5, 0.3, 0.15, 0.05]


def rows(*params: SamplingParams, tokens=(0,), prompt_len=1) -> SamplingContext:
    return SamplingContext([RowState(params=p, tokens=list(tokens), prompt_len=prompt_len) for p in params])


def logits_of(probs, batch=1) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs]).repeat(batch, 1)


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(r).nonzero().flatten().tolist() for r in logits]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=64, block_size=96, n_layer=2, n_embd=64, init_std=0.3)
    return Transformer(cfg).eval()


def test_top_k_top_p_min_p_keep_the_right_tokens_per_row():
    ctx = rows(SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(top_p=0.81),
               SamplingParams(top_k=1, top_p=0.99), SamplingParams())
    out = apply_top_k_top_p(logits_of(PROBS, 5), ctx)
    assert kept(out) == [[0, 1], [0, 1], [0, 1, 2], [0], [0, 1, 2, 3]]
    ctx = rows(SamplingParams(min_p=0.2), SamplingParams(min_p=0.7), SamplingParams(min_p=0.0))
    assert kept(apply_min_p(logits_of(PROBS, 3), ctx)) == [[0, 1, 2], [0], [0, 1, 2, 3]]
    # The order of tokens in the vocabulary does not matter.
    perm = [2, 0, 3, 1]
    out = apply_top_k_top_p(logits_of([PROBS[i] for i in perm]), rows(SamplingParams(top_p=0.7)))
    assert kept(out) == [[1, 3]]


def test_temperature_divides_and_greedy_rows_are_left_alone():
    x = logits_of(PROBS, 2)
    out = apply_temperature(x.clone(), rows(SamplingParams(temperature=0.5), SamplingParams(temperature=0)))
    torch.testing.assert_close(out[0], x[0] / 0.5)
    torch.testing.assert_close(out[1], x[1])


def test_samples_follow_the_softmax_and_temperature_sharpens_it():
    n = 4000

    def freq(params):
        counts = torch.zeros(4)
        for _ in range(n // 100):
            ctx = [RowState(params=params, tokens=[0], prompt_len=1)] * 100
            picks = sample_tokens(logits_of(PROBS, 100), ctx, [None] * 100)
            counts += torch.bincount(picks, minlength=4)
        return counts / n
    torch.manual_seed(0)
    f1 = freq(SamplingParams(temperature=1.0))
    assert f1.tolist() == pytest.approx(PROBS, abs=0.03)
    assert freq(SamplingParams(temperature=0.5))[0] > f1[0] + 0.1  # 0.5² / (0.5² + 0.3² + ...) ≈ 0.71
    assert freq(SamplingParams(top_k=2))[2:].sum() == 0


def test_penalties_follow_their_definitions():
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    # History: prompt [0], generated [1, 1, 2].
    ctx = rows(SamplingParams(repetition_penalty=2.0), tokens=[0, 1, 1, 2], prompt_len=1)
    out = apply_penalties(x.clone(), ctx)
    assert out.tolist() == [[1.0, -2.0, 0.25, 3.0]]
    ctx = rows(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), tokens=[0, 1, 1, 2], prompt_len=1)
    out = apply_penalties(x.clone(), ctx)
    # Token 0 is only in the prompt: presence/frequency count generated tokens only.
    assert out.tolist() == [[2.0, -1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 3.0]]


def test_no_repeat_ngram_bans_completions_of_seen_ngrams():
    ctx = rows(SamplingParams(no_repeat_ngram_size=3), tokens=[1, 2, 3, 1, 2], prompt_len=2)
    assert kept(apply_no_repeat_ngram(torch.zeros(1, 5), ctx)) == [[0, 1, 2, 4]]  # 1 2 -> 3 seen
    ctx = rows(SamplingParams(no_repeat_ngram_size=1), tokens=[1, 3], prompt_len=1)
    assert kept(apply_no_repeat_ngram(torch.zeros(1, 5), ctx)) == [[0, 2, 4]]


def _repeats(tokens: list[int], n: int) -> int:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_engine_no_repeat_ngram_never_repeats(model):
    prompt = [1, 2, 3, 4]
    base = Engine(model).generate([prompt], SamplingParams(temperature=0, max_new_tokens=40))[0][0].token_ids
    assert _repeats(prompt + base, 2) > 0  # the random model loops, so the option has work to do
    for params in (SamplingParams(temperature=0, max_new_tokens=40, no_repeat_ngram_size=2),
                   SamplingParams(temperature=1.0, max_new_tokens=40, no_repeat_ngram_size=2, seed=3)):
        out = Engine(model).generate([prompt], params)[0][0].token_ids
        assert len(out) == 40 and _repeats(prompt + out, 2) == 0


def test_engine_repetition_penalty_discourages_repeats(model):
    prompt = [1, 2, 3, 4]
    base = Engine(model).generate([prompt], SamplingParams(temperature=0, max_new_tokens=30))[0][0].token_ids
    pen = Engine(model).generate([prompt], SamplingParams(temperature=0, max_new_tokens=30,
                                                          repetition_penalty=3.0))[0][0].token_ids
    freq = Engine(model).generate([prompt], SamplingParams(temperature=0, max_new_tokens=30,
                                                           frequency_penalty=5.0))[0][0].token_ids
    assert len(set(pen)) > len(set(base)) and len(set(freq)) > len(set(base))


def test_top_k_1_and_tiny_top_p_equal_greedy_and_min_p_filters(model):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    engine = Engine(model)
    greedy = [r[0].token_ids for r in engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=20))]
    for p in (SamplingParams(temperature=1.5, top_k=1, max_new_tokens=20, seed=1),
              SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=20, seed=1),
              SamplingParams(temperature=1.5, min_p=1.0, max_new_tokens=20, seed=1)):
        assert [r[0].token_ids for r in engine.generate(prompts, p)] == greedy
    # With min_p, every sampled token had at least min_p times the top probability (after temperature).
    p = SamplingParams(temperature=1.0, min_p=0.3, max_new_tokens=20, seed=2, logprobs=0)
    (res,), = engine.generate([prompts[0]], p)
    seq = prompts[0] + res.token_ids
    with torch.no_grad():
        probs = model(torch.tensor([seq]))[0].softmax(-1)
    for i, tok in enumerate(res.token_ids):
        row = probs[len(prompts[0]) - 1 + i]
        assert row[tok] >= 0.3 * row.max() - 1e-6


def test_validate_messages():
    SamplingParams(top_p=1.0, min_p=1.0, temperature=0).validate(10)
    for params, match in [(SamplingParams(min_p=1.5), "min_p"), (SamplingParams(top_k=-1), "top_k"),
                          (SamplingParams(n=0), "n must"), (SamplingParams(repetition_penalty=0), "repetition"),
                          (SamplingParams(logprobs=-1), "logprobs"), (SamplingParams(stop_token_ids=(10,)), "stop"),
                          (SamplingParams(presence_penalty=float("nan")), "presence_penalty must be a finite"),
                          (SamplingParams(temperature=float("inf")), "temperature must be a finite"),
                          (SamplingParams(length_penalty=float("nan")), "length_penalty")]:
        with pytest.raises(HainaError, match=match):
            params.validate(10)
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)


def test_draw_follows_the_distribution_and_never_picks_zero_probability():
    from haina.generate.sampling import draw

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).repeat(20_000, 1)
    picks = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=5).float() / len(picks)
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    a = draw(probs[:3], torch.Generator().manual_seed(5))
    b = draw(probs[:3], torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # a seeded generator reproduces its draws
