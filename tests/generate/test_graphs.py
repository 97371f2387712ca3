"""The graph-safe decode step (`haina.generate.graphs`) run eagerly on a CPU: the same logits and greedy tokens
as `Transformer.decode` through `KVCache.bind/update/commit`, whatever the rows do; and on a GPU (when one is
there) the same tokens with and without graphs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from haina.core.errors import HainaError
from haina.generate import Engine, SamplingParams
from haina.generate.cache import KVCache
from haina.generate.graphs import DecodeGraphs, buckets
from haina.generate.head import DecodeHead
from haina.model import ModelConfig, Transformer
from haina.model.lora_serving import AdapterSelection, MultiLoRALinear

TINY = {"vocab_size": 97, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 32, "init_std": 0.2}
CONFIGS = {
    "mha-learned-tied": {},
    "gqa-rope-untied": {"n_kv_head": 2, "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
                        "tie_embeddings": False},
    "mqa-sinusoidal": {"n_kv_head": 1, "pos": "sinusoidal", "mlp": "relu"},
}


def make_model(name: str = "mha-learned-tied", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("tiny", **TINY, **CONFIGS[name], **kw)).eval()


def prefill(model: Transformer, cache: KVCache, slot: int, prompt: list[int]) -> None:
    """Store a prompt's keys and values in one slot, as the engine's prefill does."""
    positions = cache.bind(slot, [0], len(prompt))
    model.hidden_states(torch.tensor([prompt]), positions=positions, cache=cache)
    cache.commit(slot, [len(prompt)])


def reference(model: Transformer, cache: KVCache, tokens: list[int]) -> torch.Tensor:
    """The engine's decode call today: bind, Transformer.decode, commit."""
    n = len(tokens)
    positions = cache.bind(0, cache.lengths[:n], 1)
    logits = model.decode(torch.tensor([[t] for t in tokens]), positions=positions, cache=cache)
    cache.commit(0, [1] * n)
    return logits


class Pair:
    """The reference cache and the static step's cache, given the same prompts, moves and tokens."""

    def __init__(self, model: Transformer, max_batch: int = 6, max_len: int = 48, head: bool = False, **kw):
        self.model = model
        self.ref = KVCache(model.cfg, max_batch, max_len)
        self.cache = KVCache(model.cfg, max_batch, max_len)
        self.graphs = DecodeGraphs(model, self.cache, DecodeHead(model) if head else None, use_graphs=False,
                                   min_keys=4, **kw)
        self.last: list[int] = []

    def join(self, prompt: list[int]) -> None:
        slot = len(self.last)
        for cache in (self.ref, self.cache):
            prefill(self.model, cache, slot, prompt)
        self.last.append(prompt[-1])

    def leave(self, slot: int) -> None:
        """The engine's retirement: the last running slot moves into the hole."""
        last = len(self.last) - 1
        for cache in (self.ref, self.cache):
            if slot != last:
                cache.move(last, slot)
            else:
                cache.reset(slot)
        self.last[slot] = self.last[last]
        self.last.pop()

    def step(self) -> list[int]:
        with torch.inference_mode():
            want = reference(self.model, self.ref, self.last)
            got = self.graphs.decode(self.last, len(self.last))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert self.cache.lengths == self.ref.lengths
        tokens = got.argmax(-1).tolist()
        assert tokens == want.argmax(-1).tolist()
        self.last = tokens
        return tokens


def test_buckets():
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(1) == [1]
    assert buckets(1000, 128) == [128, 256, 512, 1000]
    assert buckets(100, 100) == [100]
    graphs = DecodeGraphs(make_model(), KVCache(make_model().cfg, 6, 48), use_graphs=False, min_keys=4)
    assert graphs.use_graphs is False and graphs.supported
    assert graphs.bucket(3, 5) == (4, 8)
    assert graphs.bucket(5, 48) == (6, 48)
    assert graphs.bucket(1, 1) == (1, 4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_step_equals_the_cache_path_as_rows_leave_and_join(name):
    pair = Pair(make_model(name), head=name == "mha-learned-tied")
    for prompt in ([1, 2, 3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13, 14, 15]):  # three lengths: n = 3 pads to 4
        pair.join(prompt)
    seen = set()
    for step in range(30):
        if step == 4:
            pair.leave(0)  # a hole at the front: slot 2 moves into it
        if step in (7, 9, 11):
            pair.join(list(range(20, 20 + 3 * step // 2)))
        if step == 15:
            pair.leave(len(pair.last) - 1)  # the last slot leaves: nothing moves
        seen.add(pair.graphs.bucket(len(pair.last), max(pair.cache.lengths[:len(pair.last)]) + 1))
        pair.step()
    # The run went through several batch buckets (2, 4 and 6 padded from 3 and 5) and key lengths.
    assert {b for b, _ in seen} >= {2, 4, 6} and {L for _, L in seen} >= {16, 32, 48}


def test_padded_rows_write_only_free_slots():
    pair = Pair(make_model("gqa-rope-untied"))
    for prompt in ([1, 2, 3], [4, 5], [6, 7, 8, 9]):
        pair.join(prompt)
    cache = pair.cache
    with torch.no_grad():
        cache._k_all[:, 3:].fill_(7.0)
        cache._v_all[:, 3:].fill_(7.0)
    before_k, before_v = cache._k_all.clone(), cache._v_all.clone()
    pair.step()  # n = 3 runs as b = 4: slot 3 is the padding
    for new, old in ((cache._k_all, before_k), (cache._v_all, before_v)):
        changed = (new != old).any(dim=-1).any(dim=2)  # (layers, slots, positions): which cells were written
        written = {(s, p) for s, p in changed.any(dim=0).nonzero().tolist()}
        assert written == {(0, 3), (1, 2), (2, 4), (3, 0)}  # each live row at its position; padding at 0 of slot 3
        assert torch.equal(new[:, 4:], old[:, 4:])
    # The live rows hold what the reference holds.
    for s, n in enumerate(cache.lengths[:3]):
        torch.testing.assert_close(cache._k_all[:, s, :, :n], pair.ref._k_all[:, s, :, :n], rtol=1e-5, atol=1e-5)


def test_weights_updated_in_place_are_followed_without_a_reset():
    model = make_model("gqa-rope-untied")
    pair = Pair(model)
    pair.join([1, 2, 3])
    pair.join([4])
    pair.step()
    model.load_state_dict(make_model("gqa-rope-untied", seed=1).state_dict())  # copies into the same tensors
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight.mul_(1.5)  # as an optimizer step
    pair.step()
    assert pair.graphs.resets == 0


@pytest.mark.parametrize("change", ["parameter", "data", "module", "cast"])
def test_replaced_weights_reset_the_graphs(change):
    model = make_model("gqa-rope-untied")
    pair = Pair(model)
    pair.join([1, 2, 3])
    pair.join([4])
    pair.step()
    if change == "parameter":
        model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight))
    elif change == "data":
        model.blocks[1].attn.qkv.weight.data = torch.randn_like(model.blocks[1].attn.qkv.weight)
    elif change == "module":
        fc = model.blocks[0].mlp.fc
        model.blocks[0].mlp.fc = nn.Linear(fc.in_features, fc.out_features, bias=False)
    else:
        model.double().float()  # a round trip: every tensor is new
    pair.step()
    assert pair.graphs.resets == 1
    pair.step()
    assert pair.graphs.resets == 1


class _FakeGraph:
    """A CPU stand-in for a captured graph: replay recomputes the step into the same output tensor."""

    def __init__(self, graphs: DecodeGraphs, b: int, L: int):
        self.graphs, self.b, self.L = graphs, b, L

    def replay(self) -> None:
        out = self.graphs._graphs[(self.b, self.L)][1]
        out.copy_(self.graphs._step(self.b, self.L))


def test_buckets_are_captured_once_lazily_up_to_the_cap(monkeypatch):
    captured = []

    def capture(self, b, L):
        captured.append((b, L))
        self._graphs[(b, L)] = (_FakeGraph(self, b, L), self._step(b, L))
        return self._graphs[(b, L)][1]

    monkeypatch.setattr(DecodeGraphs, "_capture", capture)
    model = make_model()
    pair = Pair(model, max_graphs=3)
    pair.graphs.use_graphs = True  # as on a GPU, with the fake capture
    for prompt in ([1, 2, 3], [4, 5, 6, 7, 8, 9]):
        pair.join(prompt)
    for _ in range(12):  # keys 7..18: buckets (2, 8), (2, 16), (2, 32)
        pair.step()
    pair.join([1])
    for _ in range(3):  # a fourth bucket, past the cap: eager, still right
        pair.step()
    assert captured == [(2, 8), (2, 16), (2, 32)] and pair.graphs.graphs == 3
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied now: replaced
    pair.step()
    assert pair.graphs.resets == 1 and captured[3:] == [(4, 32)] and pair.graphs.graphs == 1


def test_training_mode_decodes_as_eval_and_is_restored():
    model = make_model(dropout=0.5)
    pair = Pair(model)
    pair.join([1, 2, 3])
    model.train()
    pair.model = model
    with torch.inference_mode():
        got = pair.graphs.decode([3])
    assert model.training
    model.eval()
    with torch.inference_mode():
        want = reference(model, pair.ref, [3])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_what_it_cannot_run():
    model = make_model()
    cache = KVCache(model.cfg, 2, 16)
    with pytest.raises(HainaError, match="CUDA"):
        DecodeGraphs(model, cache, use_graphs=True)
    with pytest.raises(HainaError, match="max_batch"):
        DecodeGraphs(model, cache, max_batch=3)
    graphs = DecodeGraphs(model, cache)
    assert graphs.use_graphs is False  # a CPU cache: eager
    with pytest.raises(HainaError, match="rows"):
        graphs.decode([1, 2, 3])
    with pytest.raises(HainaError, match="vocabulary"):
        graphs.decode([97])
    cache.lengths[0] = 16
    with pytest.raises(HainaError, match="overflow"):
        graphs.decode([1])
    assert cache.lengths[0] == 16
    # Stacked LoRA adapters: a graph would freeze one call's choice of adapter.
    stacked = copy.deepcopy(model)
    qkv = stacked.blocks[0].attn.qkv
    stacked.blocks[0].attn.qkv = MultiLoRALinear(qkv, [(0, 32)], count=1, rank=2, selection=AdapterSelection(1))
    graphs = DecodeGraphs(stacked, KVCache(model.cfg, 2, 16))
    assert not graphs.supported and "LoRA" in graphs.reason
    with pytest.raises(HainaError, match="LoRA"):
        graphs.decode([1])
    assert not DecodeGraphs(model, KVCache(model.cfg, 2, 16, dtype=torch.bfloat16)).supported
    encoder = Transformer(ModelConfig.from_name("tiny", **TINY, causal=False))
    assert not DecodeGraphs(encoder, KVCache(encoder.cfg, 2, 16)).supported
    wrapper = nn.Module()  # anything else that decodes (an ensemble of members sharing one cache)
    wrapper.cfg = model.cfg
    assert "not a single Transformer" in DecodeGraphs(wrapper, KVCache(model.cfg, 2, 16)).reason


@pytest.mark.parametrize("name", ["mha-learned-tied", "gqa-rope-untied"])
def test_the_engine_through_the_static_step_gives_its_own_tokens(name):
    model = make_model(name)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13], [14, 15, 16, 17, 18]]
    greedy = [SamplingParams(temperature=0, max_new_tokens=n) for n in (20, 7, 30, 12, 25)]
    seeded = SamplingParams(temperature=0.8, top_k=20, max_new_tokens=15, seed=3)
    engine = Engine(model, max_batch_size=3, kv_cache="fixed")  # five prompts, three slots: rows leave and join
    if not hasattr(engine, "_graphs"):
        pytest.skip("this engine does not call DecodeGraphs yet (Engine._graphs)")
    engine._graphs = DecodeGraphs(model, engine.cache, engine._head, use_graphs=False)
    for params in (greedy, seeded):
        want = [r[0].token_ids for r in Engine(model, max_batch_size=3).generate(prompts, params)]
        assert [r[0].token_ids for r in engine.generate(prompts, params)] == want


# ------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mha-learned-tied", "gqa-rope-untied"])
def test_graphs_on_cuda_give_the_eager_tokens(name, dtype):
    model = make_model(name).to("cuda", dtype)
    caches = [KVCache(model.cfg, 4, 64, device="cuda", dtype=dtype) for _ in range(3)]
    graphs = DecodeGraphs(model, caches[1], min_keys=16)
    eager = DecodeGraphs(model, caches[2], use_graphs=False, min_keys=16)
    assert graphs.use_graphs
    with torch.inference_mode():
        for cache in caches:
            for slot, prompt in enumerate(([1, 2, 3], [4, 5, 6, 7, 8], [9])):
                prefill(model, cache, slot, prompt)
        last = [3, 8, 9]
        for step in range(40):  # every path decodes the graphs' tokens, so that no difference compounds
            if step == 20:  # a replaced weight: the graphs read its old address, so they are captured again
                with torch.inference_mode(False):
                    fc = model.blocks[0].mlp.fc
                    fc.weight = nn.Parameter(torch.randn_like(fc.weight) / 8)
            want = reference(model, caches[0], last)
            got, same_code = graphs.decode(last), eager.decode(last)
            torch.testing.assert_close(got, same_code)  # a replay runs the eager step's kernels
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
            last = got.argmax(-1).tolist()
    assert graphs.graphs >= 1 and graphs.resets == 1
