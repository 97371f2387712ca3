"""Beam search against brute force on a 2-step toy case (vocabulary of 8)."""

import itertools

import pytest
import torch

from haina.core.errors import HainaError
from haina.generate import Engine, SamplingParams
from haina.model import ModelConfig, Transformer

V, EOS = 8, 3


def toy(pos: str = "learned", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    extra = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2} if pos == "rope" else {}
    cfg = ModelConfig.from_name("tiny", vocab_size=V, block_size=16, n_layer=2, n_embd=32, init_std=0.5, **extra)
    return Transformer(cfg).eval()


def brute_force(model: Transformer, prompt: list[int], length_penalty: float) -> list[tuple[float, list[int]]]:
    """Every hypothesis of at most 2 new tokens (ending at EOS or at 2 tokens), best first."""
    def lp(seq):
        with torch.no_grad():
            return model(torch.tensor([seq]))[0, -1].log_softmax(-1)
    first = lp(prompt)
    hyps = [(first[EOS].item(), [EOS])]
    for a in range(V):
        if a == EOS:
            continue
        second = lp(prompt + [a])
        hyps += [((first[a] + second[b]).item() / 2 ** length_penalty, [a, b]) for b in range(V)]
    return sorted(((s, t) for s, t in hyps), key=lambda h: h[0], reverse=True)


@pytest.mark.parametrize("pos, seed, length_penalty", [
    ("learned", 0, 1.0), ("learned", 1, 0.0), ("rope", 2, 2.0), ("rope", 3, -1.0),
])
def test_beam_search_equals_brute_force(pos, seed, length_penalty):
    model = toy(pos, seed)
    prompt = [1, 5, 2]
    engine = Engine(model, eos_token_id=EOS)
    params = SamplingParams(num_beams=V, max_new_tokens=2, length_penalty=length_penalty)
    (beams,) = engine.generate([prompt], params)
    ref = brute_force(model, prompt, length_penalty)[:V]
    assert [b.token_ids for b in beams] == [t for _, t in ref]
    assert [b.finish_reason for b in beams] == ["stop" if t[-1] == EOS else "length" for _, t in ref]


def test_beam_logprobs_match_score_and_results_are_ranked():
    model = toy("rope", 4)
    prompt = [1, 5, 2]
    engine = Engine(model, eos_token_id=EOS)
    params = SamplingParams(num_beams=3, max_new_tokens=5, logprobs=2, prompt_logprobs=1, length_penalty=1.0)
    (beams,) = engine.generate([prompt], params)
    assert len(beams) == 3
    scores = []
    for b in beams:
        ref = engine.score([prompt + b.token_ids])[0][len(prompt):]
        assert [t.logprob for t in b.logprobs] == pytest.approx(ref, abs=1e-4)
        assert [t.token_id for t in b.logprobs] == b.token_ids and len(b.logprobs[0].top) == 2
        scores.append(sum(ref) / len(ref))
        assert b.prompt_logprobs[0] is None and len(b.prompt_logprobs) == len(prompt)
    assert scores == sorted(scores, reverse=True)


def test_early_stopping_and_mixing_beams_with_sampling():
    model = toy("learned", 5)
    engine = Engine(model, eos_token_id=EOS)
    p_beam = SamplingParams(num_beams=2, max_new_tokens=6, early_stopping=True)
    out = engine.generate([[1, 2], [4, 4, 4]], [p_beam, SamplingParams(temperature=0, max_new_tokens=4)])
    assert len(out[0]) == 2 and len(out[1]) == 1
    greedy = engine.generate([[4, 4, 4]], SamplingParams(temperature=0, max_new_tokens=4))[0][0]
    assert out[1][0].token_ids == greedy.token_ids
    # A beam of width 1 is greedy search.
    one = engine.generate([[1, 2]], SamplingParams(num_beams=1, temperature=0, max_new_tokens=6))[0][0]
    assert one.token_ids[0] == engine.generate([[1, 2]], SamplingParams(num_beams=2, max_new_tokens=1,
                                                                       ignore_eos=True))[0][0].token_ids[0]


def test_beam_search_refused_on_the_step_api():
    engine = Engine(toy())
    with pytest.raises(HainaError, match="beam"):
        engine.add_request("x", [1], SamplingParams(num_beams=2))
    with pytest.raises(HainaError, match="num_beams"):
        engine.generate([[1]], SamplingParams(num_beams=0))


def test_brute_force_reference_is_consistent():
    # Guard the reference itself: it enumerates 1 + 7·8 hypotheses.
    hyps = brute_force(toy(), [1, 2], 1.0)
    assert len(hyps) == 1 + (V - 1) * V
    assert all(a[0] >= b[0] for a, b in itertools.pairwise(hyps))
