"""logit_bias: an additive bias per request, applied before sampling, greedy and beams included."""

import pytest
import torch

from haina.core.errors import HainaError
from haina.generate import Engine, SamplingParams
from haina.generate.sampling import RowState, sample_tokens
from haina.model import ModelConfig, Transformer

V = 96


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=V, block_size=64, n_layer=2, n_embd=64, init_std=0.3)
    return Transformer(cfg).eval()


def _run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id] += ev.new_token_ids
    return out


def test_bias_is_added_to_the_logits_of_its_own_row():
    logits = torch.zeros(3, 8)
    rows = [RowState(params=SamplingParams(temperature=0, logit_bias=b), tokens=[1], prompt_len=1)
            for b in ({5: 3.0}, {}, {2: 1.5, 7: -100})]
    picked = sample_tokens(logits, rows, [None] * 3)
    assert picked.tolist() == [5, 0, 2]
    expected = torch.zeros(3, 8)
    expected[0, 5], expected[2, 2], expected[2, 7] = 3.0, 1.5, -100.0
    torch.testing.assert_close(logits, expected)  # in place, each row its own bias


def test_greedy_ban_and_force(model):
    engine = Engine(model, max_batch_size=4)
    prompt = [3, 1, 4, 1, 5]
    base = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    plain = engine.generate([prompt], base)[0][0].token_ids
    banned = engine.generate([prompt], SamplingParams(**{**base.__dict__, "logit_bias": {plain[0]: -100}}))[0][0]
    assert banned.token_ids[0] != plain[0] and plain[0] not in banned.token_ids
    forced = engine.generate([prompt], SamplingParams(**{**base.__dict__, "logit_bias": {17: 100}}))[0][0]
    assert forced.token_ids == [17] * 6


def test_rows_of_one_batch_keep_their_own_bias(model):
    """Three requests decoded together: two forced to different tokens, one unbiased and unchanged."""
    prompt = [9, 8, 7]
    greedy = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    alone = _run(Engine(model, max_batch_size=1), {"p": (prompt, greedy)})["p"]
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=5, ignore_eos=True, seed=1,
                             logit_bias={11: 100})
    engine = Engine(model, max_batch_size=3)
    out = _run(engine, {"a": (prompt, SamplingParams(**{**greedy.__dict__, "logit_bias": {40: 100}})),
                        "b": (prompt, sampled), "c": (prompt, greedy)})
    assert out == {"a": [40] * 5, "b": [11] * 5, "c": alone}


def test_beam_search_applies_the_bias(model):
    engine = Engine(model, max_batch_size=4)
    params = SamplingParams(temperature=0, max_new_tokens=4, num_beams=2, ignore_eos=True, logit_bias={23: 100})
    assert engine.generate([[1, 2, 3]], params)[0][0].token_ids == [23] * 4


@pytest.mark.parametrize("bias, match", [({V: 1.0}, "outside the vocabulary"), ({-1: 1.0}, "outside"),
                                         ({3: 100.5}, r"\[-100, 100\]"), ({3: float("inf")}, r"\[-100, 100\]"),
                                         ({"3": 1.0}, "integer token ids"), ([(3, 1.0), (3, 2.0)], "twice"),
                                         (7, "map token ids")])
def test_invalid_bias_is_one_clear_error(model, bias, match):
    engine = Engine(model, max_batch_size=1)
    with pytest.raises(HainaError, match=match):
        engine.add_request("x", [1, 2], SamplingParams(logit_bias=bias))
