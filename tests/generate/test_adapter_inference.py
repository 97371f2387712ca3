"""LoRA adapters at inference: `generate`/`chat --adapter` equal the merged checkpoint, and an engine serving
several stacked adapters gives every row of a mixed batch what that row's adapter alone gives."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys

import pytest
import torch

from haina.cli import main
from haina.core.errors import HainaError
from haina.generate.chat import IM_END, IM_START, ChatSession
from haina.generate.engine import Engine
from haina.generate.sampling import SamplingParams
from haina.generate.text import TextGenerator
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.model.lora import LoRAConfig, apply_lora, base_weights_hash, merge_lora, save_adapter
from haina.model.lora_serving import MultiLoRALinear, adapter_selection, load_adapters
from haina.tokenizer.train import train_bpe

CORPUS = ["the cat sat on the mat and the dog ran to the park. " * 10,
          "To be, or not to be, that is the question. " * 10]
LLAMA = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2}
# What the adapter's own tokenizer renders chats with: if the base's (ChatML) were used, replies would differ.
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def make_adapter(base: Transformer, out, lora: LoRAConfig, seed: int, base_path=None, tokenizer=None) -> Transformer:
    """Save an adapter with random non-zero B trained on `base` into `out`; returns the merged model."""
    model = copy.deepcopy(base)
    base_hash = base_weights_hash(model)
    apply_lora(model, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    save_adapter(out, model, lora, base_hash=base_hash, base=base_path)
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer")
    return merge_lora(model).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a tiny model it is the fastest, and extra threads spin against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A base checkpoint, an adapter on it (with its own chat template), the merged checkpoint, and an adapter
    trained on another base."""
    root = tmp_path_factory.mktemp("adapters")
    tok = train_bpe(CORPUS, vocab_size=300, special_tokens=("<|endoftext|>", IM_START, IM_END))
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, block_size=64, n_layer=2, init_std=0.3, **LLAMA)
    base = Transformer(cfg).eval()
    save_model(root / "base", base, tok)
    adapter_tok = copy.deepcopy(tok)
    adapter_tok.chat_template = TEMPLATE
    merged = make_adapter(base, root / "adapter", LoRAConfig(r=4, targets="all"), seed=1, base_path=root / "base",
                          tokenizer=adapter_tok)
    save_model(root / "merged", merged, adapter_tok)
    torch.manual_seed(5)
    make_adapter(Transformer(cfg), root / "foreign", LoRAConfig(r=4), seed=2)
    return root


def haina(*args, stdin=None):
    r = subprocess.run([sys.executable, "-m", "haina.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=120, check=False, input=stdin)
    assert r.returncode == 0, r.stderr
    return r


# ---------------------------------------------------------------------------------------- the commands
def in_process(capsys, *args) -> str:
    """`haina ARGS` in this process (the references: a subprocess per run would double the file's time)."""
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_generate_with_an_adapter_equals_the_merged_checkpoint(ckpts, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat", "To be", "the dog ran"]))
    args = ["--prompts-file", prompts, "--temperature", "0", "--max-new-tokens", "12", "--ignore-eos",
            "--device", "cpu"]

    def texts(out: str) -> list[str]:
        return [json.loads(line)["completions"][0]["text"] for line in out.splitlines()]

    adapted = texts(haina("generate", "--checkpoint", ckpts / "base", "--adapter", ckpts / "adapter", *args).stdout)
    assert adapted == texts(in_process(capsys, "generate", "--checkpoint", ckpts / "merged", *args))
    assert adapted != texts(in_process(capsys, "generate", "--checkpoint", ckpts / "base", *args))  # it matters


def test_chat_with_an_adapter_equals_the_merged_checkpoint(ckpts):
    adapted = haina("chat", "--checkpoint", ckpts / "base", "--adapter", ckpts / "adapter", "--temperature", "0",
                    "--max-new-tokens", "10", "--device", "cpu", stdin="the cat\nTo be\n").stdout
    banner, _, talk = adapted.partition("\n")
    assert "+ adapter" in banner
    # The merged checkpoint, chatting through the same session class the command uses.
    model, tok = load_model(ckpts / "merged")
    session = ChatSession(TextGenerator(Engine(model, max_batch_size=1, eos_token_id=tok.eos_id), tok),
                          SamplingParams(max_new_tokens=10, temperature=0.0, top_p=0.95, top_k=0, seed=None))
    replies = io.StringIO()
    for line in ("the cat", "To be"):
        session.reply(line, out=replies)
    want = "".join(f">>> {r}\n" for r in replies.getvalue().splitlines()) + ">>> \n"
    assert talk == want and len(want) > 15


def test_an_adapter_for_another_base_is_one_line(ckpts, capsys):
    args = ["generate", "--checkpoint", ckpts / "base", "--adapter", ckpts / "foreign", "--prompt", "x"]
    assert main([str(a) for a in args]) == 2
    assert capsys.readouterr().err == (f"error: adapter {ckpts / 'foreign'} was trained on another base model "
                                       "(recorded base: unknown); pass that model as --checkpoint\n")
    args = ["generate", "--checkpoint", ckpts / "base", "--adapter", ckpts / "nope", "--prompt", "x"]
    assert main([str(a) for a in args]) == 2
    assert capsys.readouterr().err == f"error: --adapter {ckpts / 'nope'} not found; point it at a LoRA run or " \
                                      "checkpoint directory\n"


# ---------------------------------------------------------------------------------------- several at once
@pytest.fixture(scope="module")
def stacked(ckpts, tmp_path_factory):
    """The base with three adapters of different ranks and targets stacked, and each adapter merged alone."""
    root = tmp_path_factory.mktemp("stacked")
    base, _ = load_model(ckpts / "base")
    loras = [LoRAConfig(r=2, targets="q,v"), LoRAConfig(r=6, alpha=4, targets="fc,o"),
             LoRAConfig(r=3, targets="gate,down", rslora=True)]
    merged = [make_adapter(base, root / f"a{i}", lora, seed=10 + i) for i, lora in enumerate(loras)]
    model = copy.deepcopy(base)
    assert load_adapters(model, [root / f"a{i}" for i in range(3)]) == loras
    return model, base, merged, root


def greedy(engine: Engine, prompts: list[list[int]], adapters: list[int]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"r{i}", p, params, adapter=a)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for ev in engine.step():
            out.setdefault(ev.request_id, []).extend(ev.new_token_ids)
    return [out[f"r{i}"] for i in range(len(prompts))]


def test_mixed_batches_give_each_row_its_own_adapter(stacked, monkeypatch):
    model, base, merged, _ = stacked
    prompts = [[5, 17, 3, 88], [60, 2], [7, 7, 7, 7, 7, 1], [200, 3, 9], [42], [11, 12, 13]]
    adapters = [-1, 0, 1, 2, 1, 0]
    engine = Engine(model, max_batch_size=4, eos_token_id=None)  # 6 requests, 4 slots: rows join mid-decode
    mixed = []
    select = engine._adapters.select
    monkeypatch.setattr(engine._adapters, "select",
                        lambda a, device=None: (mixed.append(len(set(a)) > 1), select(a, device))[1])
    got = greedy(engine, prompts, adapters)
    assert any(mixed)  # prefills and decodes of rows with different adapters ran as one batch
    for p, a, tokens in zip(prompts, adapters, got):
        alone = Engine(merged[a] if a >= 0 else base, max_batch_size=1, eos_token_id=None)
        assert tokens == greedy(alone, [p], [-1])[0], f"adapter {a}"
    assert len({tuple(t) for t in got[1:4]}) == 3


def test_uniform_and_base_selection_and_scoring(stacked):
    model, base, merged, _ = stacked
    x = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(3))
    sel = adapter_selection(model)
    with torch.no_grad():
        sel.select(-1)
        assert torch.equal(model(x), base(x))  # the base alone adds nothing at all
        sel.select(1)
        torch.testing.assert_close(model(x), merged[1](x), atol=1e-4, rtol=1e-4)
        sel.select([2, -1, 0])
        want = torch.cat([merged[2](x[:1]), base(x[1:2]), merged[0](x[2:])])
        torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)
        with pytest.raises(HainaError, match="selection has 3 rows"):
            model(x[:2])
    engine = Engine(model, max_batch_size=2, eos_token_id=None)
    seqs = [list(range(1, 12)), [3, 1, 4, 1, 5]]
    for a in (-1, 2):
        ref = Engine(merged[a] if a >= 0 else base, eos_token_id=None)
        for g, w in zip(engine.score(seqs, adapter=a), ref.score(seqs)):
            assert g[0] is None and w[0] is None
            torch.testing.assert_close(torch.tensor(g[1:]), torch.tensor(w[1:]), atol=1e-4, rtol=1e-4)
        g, w = engine.prompt_logprobs(seqs[0], 2, adapter=a), ref.prompt_logprobs(seqs[0], 2)
        assert [t.token_id for t in g[1:]] == [t.token_id for t in w[1:]]
        torch.testing.assert_close(torch.tensor([t.logprob for t in g[1:]]),
                                   torch.tensor([t.logprob for t in w[1:]]), atol=1e-4, rtol=1e-4)


def test_stacking_leaves_the_base_and_its_hash_alone(stacked):
    model, base, _, root = stacked
    assert base_weights_hash(model) == base_weights_hash(base)
    assert set(model.state_dict()) == set(base.state_dict())  # the stacks are not weights to save
    fc = model.blocks[0].mlp.fc
    assert isinstance(fc, MultiLoRALinear) and fc.weight is not None
    # One stack per span any adapter targets, padded to the largest rank, slot 0 (the base) zero.
    assert fc.spans == [(0, 2 * model.cfg.ffn_dim), (0, model.cfg.ffn_dim)]
    assert fc.At0.shape == (4, model.cfg.n_embd, 6) and not fc.At0[0].any() and not fc.At0[1].any()
    with pytest.raises(HainaError, match="already has LoRA"):
        load_adapters(model, [root / "a0"])
    with pytest.raises(HainaError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(r=2))


def test_adapter_indices_are_checked(stacked, ckpts):
    model, base, _, _ = stacked
    plain = Engine(base, eos_token_id=None)
    assert plain._adapters is None and plain.num_adapters == 0  # no adapters: no selection to set per call
    with pytest.raises(HainaError, match="adapter 0 is not loaded: the model holds 0"):
        plain.add_request("x", [1, 2], SamplingParams(), adapter=0)
    engine = Engine(model, eos_token_id=None)
    assert engine.num_adapters == 3
    for bad in (3, -2):
        with pytest.raises(HainaError, match=f"adapter {bad} is not loaded"):
            engine.add_request("x", [1, 2], SamplingParams(), adapter=bad)
    with pytest.raises(HainaError) as e:
        load_adapters(copy.deepcopy(base), [ckpts / "adapter", ckpts / "foreign"])
    assert "\n" not in str(e.value) and f"adapter {ckpts / 'foreign'} was trained on another base" in str(e.value)
    with pytest.raises(HainaError, match="no adapters given"):
        load_adapters(copy.deepcopy(base), [])
