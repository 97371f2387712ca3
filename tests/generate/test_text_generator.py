"""TextGenerator: text in and out of the engine, streaming and stop strings."""

import pytest
import torch

from haina.core.errors import HainaError
from haina.generate.engine import Engine
from haina.generate.sampling import SamplingParams
from haina.generate.text import TextGenerator
from haina.model import ModelConfig, Transformer
from haina.tokenizer.train import train_bpe

CORPUS = ["the cat sat on the mat and the dog ran to the park. " * 10, "héllo wörld café 日本語 😀 " * 10,
          "To be, or not to be, that is the question. " * 10]


@pytest.fixture(scope="module")
def gen():
    tok = train_bpe(CORPUS, vocab_size=320)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=320, block_size=64, n_layer=2)).eval()
    return TextGenerator(Engine(model, max_batch_size=4, eos_token_id=tok.eos_id), tok)


P = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7, ignore_eos=True)


def test_generate_matches_engine_tokens(gen):
    ids = gen.tokenizer.encode("the cat")
    (ref,), = gen.engine.generate([ids], P)
    (res,), = gen.generate(["the cat"], P)
    assert res.token_ids == ref.token_ids
    assert res.text == gen.tokenizer.decode(ref.token_ids, skip_special=True)
    assert res.finish_reason == "length"


def test_stream_equals_generate(gen):
    (res,), = gen.generate(["to be"], P)
    deltas = list(gen.stream("to be", P))
    assert "".join(deltas) == res.text
    assert len(deltas) > 1
    assert not gen.engine.has_unfinished()


def test_stop_string_cuts_text_and_frees_the_engine(gen):
    prompts = ["the cat", "héllo", "To be"]
    full = [r[0] for r in gen.generate(prompts, P)]
    text = full[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), "want a visible stop string"
    out = gen.generate(prompts, P, stop=[stop])
    first = out[0][0]
    assert first.finish_reason == "stop"
    assert first.text == text[:text.index(stop)]
    assert len(first.token_ids) < len(full[0].token_ids)  # stopped early, not cut afterwards
    for before, after in zip(full[1:], out[1:]):  # neighbours unaffected unless the stop occurs in them
        if stop not in before.text:
            assert after[0].text == before.text and after[0].finish_reason == "length"
    assert not gen.engine.has_unfinished()
    streamed = "".join(gen.stream("the cat", P, stop=[stop]))
    assert streamed == first.text
    assert not gen.engine.has_unfinished()


def test_per_prompt_params_and_stops(gen):
    params = [P, SamplingParams(max_new_tokens=3, temperature=0)]
    out = gen.generate(["the cat", "the dog"], params, stop=[["zzzz"], ["qqqq"]])
    assert len(out[1][0].token_ids) <= 3
    with pytest.raises(HainaError, match="stop lists"):
        gen.generate(["a", "b"], P, stop=[["x"]])


def test_stop_token_id_excluded_from_text(gen):
    (ref,), = gen.generate(["the cat"], P)
    toks = ref.token_ids
    k = next(i for i in range(2, len(toks)) if toks[i] not in toks[:i])
    (res,), = gen.generate(["the cat"], SamplingParams(**{**P.__dict__, "stop_token_ids": (toks[k],)}))
    assert res.finish_reason == "stop"
    assert res.token_ids == toks[:k + 1]
    assert res.text == gen.tokenizer.decode(toks[:k], skip_special=True)


def test_n_samples_seeded(gen):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, n=3, ignore_eos=True)
    a = [r.text for r in gen.generate(["the"], p)[0]]
    b = [r.text for r in gen.generate(["the"], p)[0]]
    assert a == b and len(a) == 3
    assert len(set(a)) > 1


def test_beam_search_with_stop(gen):
    p = SamplingParams(max_new_tokens=8, num_beams=2, ignore_eos=True)
    beams = gen.generate(["the cat"], p)[0]
    assert len(beams) == 2
    text = beams[0].text
    stop = text[2:4]
    if stop:
        cut = gen.generate(["the cat"], p, stop=[stop])[0][0]
        assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"


def test_logprobs_come_through(gen):
    p = SamplingParams(max_new_tokens=5, temperature=0, logprobs=2)
    (res,), = gen.generate(["the cat"], p)
    assert [lp.token_id for lp in res.logprobs] == res.token_ids
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in res.logprobs)  # greedy = best


def test_closing_a_stream_early_aborts(gen):
    it = gen.stream("the cat", SamplingParams(max_new_tokens=50, temperature=1.0, seed=1, ignore_eos=True))
    next(it)
    it.close()
    assert not gen.engine.has_unfinished()


def test_bad_input(gen):
    with pytest.raises(HainaError, match="empty"):
        gen.generate([""], P)
    with pytest.raises(HainaError, match="must be strings"):
        gen.generate(["the"], P, stop=["ok", 3])
    with pytest.raises(HainaError, match="top_p"):
        gen.generate(["the"], SamplingParams(top_p=1.5))
    with pytest.raises(HainaError, match="context"):
        gen.generate(["the cat sat " * 40], P)
    with pytest.raises(HainaError, match="^prompt 2: the prompt is empty"):  # a batch names the prompt at fault
        gen.generate(["the", ""], P)
    with pytest.raises(HainaError, match="n=1"):
        next(gen.stream("the", SamplingParams(n=2)))
    assert not gen.engine.has_unfinished()
