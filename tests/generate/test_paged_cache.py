"""The paged KV cache: the fixed cache's outputs, memory that follows the tokens held, and a budget."""

import pytest
import torch

from haina.core.errors import HainaError
from haina.generate import Engine, KVCache, SamplingParams
from haina.generate.ensemble import Ensemble
from haina.generate.paged import PagedKVCache
from haina.model import ModelConfig, Transformer

VARIANTS = {
    "learned": {},
    "rope-gqa": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2,
                 "tie_embeddings": False},
    "sinusoidal-mqa": {"pos": "sinusoidal", "mlp": "relu", "n_kv_head": 1},
}
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42, 43, 44], list(range(60, 80))]


def make_model(variant: str = "learned", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    # A large init makes greedy choices clear-cut, so that they do not flip with float reordering.
    base = {"vocab_size": 128, "block_size": 64, "n_layer": 2, "n_embd": 64, "init_std": 0.3}
    return Transformer(ModelConfig.from_name("tiny", **{**base, **VARIANTS[variant], **kw})).eval()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)


def reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def run_joining_and_leaving(engine: Engine) -> dict[str, list[int]]:
    """Requests of different lengths join mid-way and leave at different steps; their tokens by id."""
    plan = {0: [("a", 0, 20), ("b", 1, 4)], 2: [("c", 2, 9)], 5: [("d", 3, 15), ("e", 4, 6)], 9: [("f", 1, 12)]}
    outs: dict[str, list[int]] = {}
    step = 0
    while step <= max(plan) or engine.has_unfinished():
        for rid, p, n in plan.get(step, []):
            engine.add_request(rid, PROMPTS[p], greedy(n))
            outs[rid] = []
        for ev in engine.step():
            outs[ev.request_id] += ev.new_token_ids
        step += 1
    return outs


# ------------------------------------------------------------------ same tokens as the fixed cache
@pytest.mark.parametrize("variant", VARIANTS)
def test_continuous_batching_gives_the_fixed_caches_tokens(variant):
    model = make_model(variant)
    fixed = Engine(model, max_batch_size=3, kv_cache="fixed")
    paged = Engine(model, max_batch_size=3, kv_cache="paged")
    assert isinstance(fixed.cache, KVCache) and isinstance(paged.cache, PagedKVCache)
    got = run_joining_and_leaving(paged)
    assert got == run_joining_and_leaving(fixed)
    assert got["a"] == reference(model, PROMPTS[0], 20) and got["e"] == reference(model, PROMPTS[4], 6)
    assert paged.cache.bytes == 0 and paged.cache.tokens_held == 0  # all returned at the end


def test_auto_is_paged_on_a_cpu_and_logits_equal_the_fixed_cache():
    model = make_model("rope-gqa", init_std=0.02)
    caches = [Engine(model, max_batch_size=4).cache, KVCache(model.cfg, 4, 64)]
    assert isinstance(caches[0], PagedKVCache)
    lens = [len(p) for p in PROMPTS[:4]]
    T = max(lens)
    idx = torch.tensor([p + [0] * (T - len(p)) for p in PROMPTS[:4]])
    with torch.inference_mode():
        logits = []
        for cache in caches:
            h = model.hidden_states(idx, positions=cache.bind(0, [0] * 4, T), cache=cache)
            cache.commit(0, lens)
            steps = [model.lm_head(h[torch.arange(4), torch.tensor(lens) - 1])]
            for i in range(30):  # past several growths of the paged cache
                if i == 10:
                    cache.move(3, 1)  # row 1 leaves, the last row takes its slot
                    cache.reset(3)
                rows = 3 if i >= 10 else 4
                tok = torch.tensor([[(7 * i + b) % 128] for b in range(rows)])
                pos = cache.bind(0, cache.lengths[:rows], 1)
                steps.append(model(tok, positions=pos, cache=cache)[:, -1])
                cache.commit(0, [1] * rows)
            logits.append(steps)
    assert caches[0].resizes >= 2
    for a, b in zip(*logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_beam_search_reorder_and_move_equal_the_fixed_cache():
    cfg = ModelConfig.from_name("tiny", n_layer=2, n_embd=32, n_head=2)
    fixed, paged = KVCache(cfg, 4, 40), PagedKVCache(cfg, 4, 40, block=4)
    k = torch.randn(2, 2, 2, 9, 16)
    for cache in (fixed, paged):
        cache.bind(0, [0, 0], 9)
        for layer in range(2):
            cache.update(layer, k[layer], -k[layer])
        cache.commit(0, [9, 5])
        cache.reorder([1, 0, 1, 1])  # grows the paged cache to 4 slots
        cache.move(0, 3)
    assert paged.lengths == fixed.lengths == [0, 9, 5, 5]
    for layer in range(2):
        for slot, n in enumerate(fixed.lengths):
            torch.testing.assert_close(paged.k[layer][slot, :, :n], fixed.k[layer][slot, :, :n], rtol=0, atol=0)
            torch.testing.assert_close(paged.v[layer][slot, :, :n], fixed.v[layer][slot, :, :n], rtol=0, atol=0)


def test_beam_search_and_an_ensemble_through_a_paged_engine():
    model = make_model("rope-gqa")
    beams = SamplingParams(num_beams=3, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert ([r.token_ids for r in Engine(model, kv_cache="paged").generate([PROMPTS[1]], beams)[0]]
            == [r.token_ids for r in Engine(model, kv_cache="fixed").generate([PROMPTS[1]], beams)[0]])
    # Members of different shapes share the one cache (narrower heads in its leading part).
    ens = Ensemble([make_model("rope-gqa"), make_model("learned", seed=1, n_layer=1, n_embd=32, n_head=2)],
                   [0.6, 0.4]).eval()
    outs = [[r[0].token_ids for r in Engine(ens, max_batch_size=2, kv_cache=kind).generate(PROMPTS[:3], greedy(10))]
            for kind in ("paged", "fixed")]
    assert outs[0] == outs[1]


# ------------------------------------------------------------------ memory follows the tokens held
def test_memory_grows_with_the_tokens_held_and_is_returned():
    model = make_model()
    engine = Engine(model, max_batch_size=4, max_seq_len=64, kv_cache="paged")
    cache, per_token = engine.cache, KVCache.bytes_per_token(model.cfg)
    fixed_bytes = KVCache(model.cfg, 4, 64).bytes
    assert cache.bytes == 0
    engine.add_request("short", [1, 2, 3], greedy(40))
    engine.step()
    assert cache.bytes == 16 * per_token  # one slot of one block, not max_seq_len
    seen = []
    while engine.has_unfinished():
        if len(seen) == 5:
            engine.add_request("late", PROMPTS[1], greedy(4))
        engine.step()
        seen.append(cache.bytes)
        capacity = cache.capacity[0] * cache.capacity[1]
        assert cache.tokens_held * per_token <= cache.bytes
        # At most 4x the rows running times their longest, in whole blocks (growth, then shrinking, keep it so).
        assert capacity <= 4 * engine.num_running * -(-max(cache.lengths) // 16) * 16
    assert max(seen) < fixed_bytes / 2
    assert seen == sorted(seen[:seen.index(max(seen)) + 1]) + seen[seen.index(max(seen)) + 1:]  # grew, then
    assert seen[-1] == 0 and cache.bytes == 0  # ... all of it returned when the requests finished


def test_a_long_request_leaving_shrinks_the_cache():
    cfg = ModelConfig.from_name("tiny", n_layer=1, n_embd=32, n_head=2)
    cache = PagedKVCache(cfg, 4, 512, block=16)
    cache.reserve(4, 400)
    cache.lengths[:4] = [400, 10, 12, 9]
    cache.trim()
    assert cache.capacity == (4, 400)  # still in use
    cache.move(3, 0)  # the long one leaves
    cache.reset(3)
    cache.trim()
    assert cache.capacity == (3, 16) and cache.lengths[:3] == [9, 10, 12]


# ------------------------------------------------------------------ the budget
def test_a_request_over_the_budget_waits_in_the_queue():
    model = make_model()
    per_token = KVCache.bytes_per_token(model.cfg)
    budget = 40 * per_token  # a 20-token prompt and a 7-token one do not fit together
    engine = Engine(model, max_batch_size=4, kv_cache="paged", kv_budget_mb=budget / 2**20)
    assert engine.max_seq_len == 40  # the budget bounds one sequence's context
    engine.add_request("a", PROMPTS[4], greedy(20))
    engine.add_request("b", PROMPTS[1], greedy(20))
    outs: dict[str, list[int]] = {"a": [], "b": []}
    waited = False
    while engine.has_unfinished():
        for ev in engine.step():
            outs[ev.request_id] += ev.new_token_ids
        waited |= engine.num_waiting == 1 and engine.num_running == 1
        assert engine.cache.bytes <= budget
    assert waited and engine.num_preempted == 0
    assert outs == {"a": reference(model, PROMPTS[4], 20), "b": reference(model, PROMPTS[1], 20)}


def test_requests_outgrowing_the_budget_are_requeued_and_resume():
    model = make_model("rope-gqa")
    per_token = KVCache.bytes_per_token(model.cfg)
    budget = 64 * per_token  # both prompts fit at first; two sequences of over 32 tokens do not
    engine = Engine(model, max_batch_size=4, kv_cache="paged", kv_budget_mb=budget / 2**20)
    p = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    engine.add_request("a", PROMPTS[1], p)
    engine.add_request("b", PROMPTS[3], p)
    events: dict[str, list] = {"a": [], "b": []}
    while engine.has_unfinished():
        for ev in engine.step():
            events[ev.request_id].append(ev)
        assert engine.cache.bytes <= budget
    assert engine.num_preempted >= 1
    for rid, prompt in (("a", PROMPTS[1]), ("b", PROMPTS[3])):
        evs = events[rid]
        assert [t for ev in evs for t in ev.new_token_ids] == reference(model, prompt, 30)
        assert sum(ev.prompt_logprobs is not None for ev in evs) == 1  # reported once, not again on resuming
        assert len([lp for ev in evs for lp in ev.logprobs]) == 30 and evs[-1].finish_reason == "length"


def test_budget_and_kind_errors_are_one_line():
    model = make_model()
    per_mib = 2**20 / KVCache.bytes_per_token(model.cfg)
    with pytest.raises(HainaError, match="fewer than 2 tokens") as e:
        Engine(model, kv_budget_mb=1 / per_mib)
    assert "\n" not in str(e.value)
    with pytest.raises(HainaError, match="kv_budget_mb bounds the paged"):
        Engine(model, kv_cache="fixed", kv_budget_mb=1.0)
    with pytest.raises(HainaError, match="kv_cache must be one of"):
        Engine(model, kv_cache="pages")
    engine = Engine(model, kv_budget_mb=10 / per_mib)
    with pytest.raises(HainaError, match=r"shorten the prompt or raise kv_budget_mb \(its .* MiB hold 10 tokens\)"):
        engine.add_request("x", list(range(12)), greedy(4))
    cache = PagedKVCache(model.cfg, 4, 64, budget_bytes=int(40 * 2**20 / per_mib))
    cache.bind(0, [0], 30)
    cache.commit(0, [30])
    with pytest.raises(HainaError, match=r"over its budget of .*--kv-budget-mb"):
        cache.bind(1, [0], 20)  # 2 rows of 30 tokens: 60 > 40


# ------------------------------------------------------------------ the command line
def test_generate_cli_chooses_the_cache_and_its_budget(tmp_path, capsys):
    from haina.cli import main
    from haina.model.checkpoint import save_model
    from haina.tokenizer.train import train_bpe

    tok = train_bpe(["the cat sat on the mat and the dog ran to the park. " * 10], vocab_size=300)
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    save_model(ckpt, Transformer(ModelConfig.from_name("tiny", vocab_size=300, block_size=64, n_layer=2)), tok)
    run = ["generate", "--checkpoint", str(ckpt), "--prompt", "the cat", "--temperature", "0", "--max-new-tokens",
           "10", "--ignore-eos", "--device", "cpu"]
    texts = []
    for extra in (["--kv-cache", "fixed"], ["--kv-cache", "paged", "--kv-budget-mb", "0.5"], []):
        assert main(run + extra) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("the cat")
    assert main(run + ["--kv-cache", "fixed", "--kv-budget-mb", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: kv_budget_mb bounds the paged KV cache") and err.count("\n") == 1
