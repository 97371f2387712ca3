"""The engine: KV-cache decoding equals full recompute, batch invariance, continuous batching, logprobs."""

import pytest
import torch

from haina.core.errors import HainaError
from haina.generate import Engine, SamplingParams
from haina.model import ModelConfig, Transformer

VARIANTS = {
    "learned": {},
    "rope-gqa": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2,
                 "tie_embeddings": False},
    "sinusoidal-mqa": {"pos": "sinusoidal", "mlp": "relu", "n_kv_head": 1},
}
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


def make_model(variant: str = "learned", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    # A larger init than training's makes the random model's distribution peaked, so greedy choices are
    # never near-ties that float reordering between batch shapes could flip.
    base = {"vocab_size": 128, "block_size": 64, "n_layer": 2, "n_embd": 64, "init_std": 0.3}
    cfg = ModelConfig.from_name("tiny", **{**base, **VARIANTS[variant], **kw})
    return Transformer(cfg).eval()


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42, 43, 44]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_logits_equal_full_recompute(variant):
    model = make_model(variant, init_std=0.02)  # the training init: logits of order 1
    engine = Engine(model, max_batch_size=4)
    seqs = [p + [(7 * i + 3) % 128 for i in range(10)] for p in PROMPTS]
    # Prefill the prompts, then feed the fixed continuations one token at a time through the cache,
    # comparing every step's logits with a full forward over the whole prefix.
    cache, lens = engine.cache, [len(p) for p in PROMPTS]
    with torch.inference_mode():
        T = max(lens)
        idx = torch.tensor([p + [0] * (T - len(p)) for p in PROMPTS])
        h = model.hidden_states(idx, positions=cache.bind(0, [0] * 4, T), cache=cache)
        cache.commit(0, lens)
        got = model.lm_head(h[torch.arange(4), torch.tensor(lens) - 1])
        for step in range(10):
            full = torch.stack([model(torch.tensor([s[:n + step]]))[0, -1] for s, n in zip(seqs, lens)])
            torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
            tok = torch.tensor([[s[n + step]] for s, n in zip(seqs, lens)])
            pos = cache.bind(0, cache.lengths[:4], 1)
            got = model(tok, positions=pos, cache=cache)[:, -1]
            cache.commit(0, [1] * 4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_equals_reference_alone_and_in_any_batch(variant):
    model = make_model(variant)
    refs = [reference_greedy(model, p, 12) for p in PROMPTS]
    alone = [Engine(model, max_batch_size=1).generate([p], GREEDY)[0][0].token_ids for p in PROMPTS]
    batched = [r[0].token_ids for r in Engine(model, max_batch_size=4).generate(PROMPTS, GREEDY)]
    # Fewer slots than prompts: requests wait, then join while others are mid-way.
    queued = [r[0].token_ids for r in Engine(model, max_batch_size=2).generate(PROMPTS[::-1], GREEDY)][::-1]
    assert alone == refs
    assert batched == refs
    assert queued == refs


def test_continuous_batching_joining_midway_changes_nothing():
    model = make_model("rope-gqa")
    engine = Engine(model, max_batch_size=4)
    p_long = SamplingParams(temperature=0, max_new_tokens=20)
    engine.add_request("a", PROMPTS[0], p_long)
    outs: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    step = 0
    while step < 7 or engine.has_unfinished():
        if step == 3:
            engine.add_request("b", PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=5))
        if step == 6:
            engine.add_request("c", PROMPTS[3], p_long)
        for ev in engine.step():
            outs[ev.request_id] += ev.new_token_ids
        step += 1
    assert step == 6 + 20 and not engine.has_unfinished() and engine.num_running == 0
    assert outs["a"] == reference_greedy(model, PROMPTS[0], 20)
    assert outs["b"] == reference_greedy(model, PROMPTS[1], 5)
    assert outs["c"] == reference_greedy(model, PROMPTS[3], 20)


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours():
    model = make_model()
    p = SamplingParams(temperature=1.0, max_new_tokens=15, seed=123)
    alone = Engine(model, max_batch_size=1).generate([PROMPTS[0]], p)[0][0].token_ids
    mixed = Engine(model, max_batch_size=4).generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
        [SamplingParams(temperature=1.3, max_new_tokens=9), p, SamplingParams(temperature=0.7, seed=9)])
    assert mixed[1][0].token_ids == alone
    other = Engine(model).generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_new_tokens=15, seed=124))
    assert other[0][0].token_ids != alone


def test_n_samples_are_distinct_and_seeded():
    model = make_model()
    p = SamplingParams(temperature=1.5, max_new_tokens=10, n=3, seed=5)
    (res,) = Engine(model).generate([PROMPTS[0]], p)
    assert len(res) == 3 and len({tuple(r.token_ids) for r in res}) == 3
    assert [r.token_ids for r in Engine(model).generate([PROMPTS[0]], p)[0]] == [r.token_ids for r in res]


def test_stop_token_ids_eos_and_max_new_tokens():
    model = make_model()
    ref = reference_greedy(model, PROMPTS[1], 12)
    stop = ref[4]
    first = ref.index(stop)
    (res,), = Engine(model).generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=12,
                                                                   stop_token_ids=(stop,)))
    assert res.token_ids == ref[:first + 1] and res.finish_reason == "stop"
    (res,), = Engine(model, eos_token_id=stop).generate([PROMPTS[1]], GREEDY)
    assert res.token_ids == ref[:first + 1] and res.finish_reason == "stop"
    (res,), = Engine(model, eos_token_id=stop).generate(
        [PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    assert res.token_ids == ref and res.finish_reason == "length"
    (res,), = Engine(model).generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=3))
    assert res.token_ids == ref[:3] and res.finish_reason == "length"


def test_generation_is_clamped_to_the_context():
    model = make_model()
    engine = Engine(model, max_seq_len=20)
    (res,), = engine.generate([list(range(1, 16))], SamplingParams(temperature=0, max_new_tokens=50))
    assert len(res.token_ids) == 5 and res.finish_reason == "length"


def test_logprobs_equal_log_softmax_of_a_full_forward():
    model = make_model("rope-gqa")
    p = SamplingParams(temperature=0.8, max_new_tokens=6, seed=1, logprobs=3, prompt_logprobs=2)
    engine = Engine(model)
    (res,), = engine.generate([PROMPTS[1]], p)
    seq = PROMPTS[1] + res.token_ids
    with torch.no_grad():
        lp = model(torch.tensor([seq]))[0].float().log_softmax(-1)
    n = len(PROMPTS[1])
    assert [t.token_id for t in res.logprobs] == res.token_ids
    for i, t in enumerate(res.logprobs):
        row = lp[n - 1 + i]
        assert t.logprob == pytest.approx(row[t.token_id].item(), abs=1e-4)
        top_v, top_i = row.topk(3)
        assert [a for a, _ in t.top] == top_i.tolist()
        assert [b for _, b in t.top] == pytest.approx(top_v.tolist(), abs=1e-4)
    # Echo: prompt logprobs equal score() and the full forward.
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == n
    scored = engine.score([PROMPTS[1]])[0]
    assert scored[0] is None
    for i in range(1, n):
        assert res.prompt_logprobs[i].token_id == PROMPTS[1][i]
        assert res.prompt_logprobs[i].logprob == pytest.approx(scored[i], abs=1e-4)
        assert scored[i] == pytest.approx(lp[i - 1, PROMPTS[1][i]].item(), abs=1e-4)
        assert len(res.prompt_logprobs[i].top) == 2


def test_prompt_logprobs_of_a_one_token_prompt_are_one_null():
    # Nothing comes before the only token: one null entry, in a batch that others share without failing.
    engine = Engine(make_model())
    p = SamplingParams(temperature=0, max_new_tokens=3, logprobs=2, prompt_logprobs=2)
    (one,), (other,) = engine.generate([[12], PROMPTS[0]], p)
    assert one.prompt_logprobs == [None] and len(one.token_ids) == 3
    assert len(other.prompt_logprobs) == len(PROMPTS[0])
    assert engine.prompt_logprobs([12], 2) == [None]


def test_score_batches_sequences_of_different_lengths():
    model = make_model()
    engine = Engine(model, max_batch_size=2)
    seqs = [PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    batched = engine.score(seqs)
    assert [len(s) for s in batched] == [7, 3, 1]
    for s, got in zip(seqs, batched):
        assert got == pytest.approx(engine.score([s])[0], abs=1e-5)


def test_stream_yields_one_event_per_token_and_closing_aborts():
    model = make_model()
    engine = Engine(model, max_batch_size=2)
    events = list(engine.stream(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=5)))
    assert [t for e in events for t in e.new_token_ids] == reference_greedy(model, PROMPTS[0], 5)
    assert [e.finished for e in events] == [False] * 4 + [True]
    assert events[-1].num_generated_tokens == 5 and events[0].num_prompt_tokens == 3
    it = engine.stream(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=50))
    next(it)
    it.close()
    assert not engine.has_unfinished() and engine.num_running == 0


def test_abort_frees_the_slot_and_reports():
    model = make_model()
    engine = Engine(model, max_batch_size=1)
    long = SamplingParams(temperature=0, max_new_tokens=40)
    engine.add_request("a", PROMPTS[0], long)
    engine.add_request("b", PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=4))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.abort("a")
    events = engine.step()
    ab = [e for e in events if e.request_id == "a"]
    assert ab and ab[0].finished and ab[0].finish_reason == "abort" and ab[0].new_token_ids == []
    assert [e.request_id for e in events if e.new_token_ids] == ["b"]  # b took the freed slot at once
    out = [t for e in events if e.request_id == "b" for t in e.new_token_ids]
    while engine.has_unfinished():
        out += [t for e in engine.step() for t in e.new_token_ids]
    assert out == reference_greedy(model, PROMPTS[1], 4)
    # Aborting a waiting request reports it too, without running it.
    engine.add_request("c", PROMPTS[0], long)
    engine.abort("c")
    (ev,) = engine.step()
    assert ev.finish_reason == "abort" and ev.num_generated_tokens == 0


def test_engine_restores_training_mode():
    model = make_model(dropout=0.5).train()
    engine = Engine(model)
    (a,), = engine.generate([PROMPTS[0]], GREEDY)
    (b,), = engine.generate([PROMPTS[0]], GREEDY)
    assert a.token_ids == b.token_ids  # dropout off while generating
    assert model.training


@pytest.mark.parametrize("prompt, params, match", [
    ([], GREEDY, "empty"),
    (list(range(64)), GREEDY, "no room"),
    ([1, 500], GREEDY, "outside the vocabulary"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(top_p=1.5), "top_p"),
    ([1], SamplingParams(temperature=-1.0), "temperature"),
    ([1], SamplingParams(num_beams=0), "num_beams"),
    ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([1], SamplingParams(stop_token_ids=(999,)), "stop token"),
])
def test_bad_input_is_one_clear_error(prompt, params, match):
    engine = Engine(make_model())
    with pytest.raises(HainaError, match=match):
        engine.generate([prompt], params)
    with pytest.raises(HainaError, match=match):
        engine.add_request("x", prompt, params)
    assert not engine.has_unfinished()


def test_duplicate_ids_and_multi_sample_requests_are_refused():
    engine = Engine(make_model())
    engine.add_request("x", [1], GREEDY)
    with pytest.raises(HainaError, match="already in use"):
        engine.add_request("x", [2], GREEDY)
    with pytest.raises(HainaError, match="n requests"):
        engine.add_request("y", [2], SamplingParams(n=2))
