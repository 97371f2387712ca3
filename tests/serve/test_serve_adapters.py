"""One base, several LoRA adapters: each request's `model` picks one, and concurrent requests for different
adapters share batches yet each returns what a server of that adapter merged into its base returns."""

from __future__ import annotations

import copy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from haina.core.errors import HainaError
from haina.model.checkpoint import load_model, save_model
from haina.model.lora import LoRAConfig, apply_lora, base_weights_hash, merge_lora, save_adapter
from haina.serve.command import check_adapters, parse_adapters
from haina.serve.service import ServiceConfig

# Adapter b's own tokenizer renders chats differently from the base's ChatML: its requests must use it.
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["the cat sat", "To be, or", "héllo wörld"]
CHAT = [{"role": "user", "content": "the dog ran to the park"}]


def make_adapter(tiny_ckpt, out, lora: LoRAConfig, seed: int, template: str | None = None):
    """An adapter with random non-zero B on the tiny base in `out`, and the merged checkpoint beside it."""
    base, tok = load_model(tiny_ckpt)
    base_hash = base_weights_hash(base)
    apply_lora(base, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    save_adapter(out, base, lora, base_hash=base_hash, base=str(tiny_ckpt))
    if template is not None:
        tok = copy.deepcopy(tok)
        tok.chat_template = template
        tok.save(out / "tokenizer")
    save_model(out.parent / f"{out.name}-merged", merge_lora(base), tok)


@pytest.fixture(scope="module")
def adapters(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_ckpt, root / "a", LoRAConfig(r=2, targets="q,v"), seed=1)
    make_adapter(tiny_ckpt, root / "b", LoRAConfig(r=8, alpha=8, targets="all"), seed=2, template=TEMPLATE)
    return root


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, model: str, what: str) -> str:
    """Greedy text for one prompt (a completion) or for CHAT (what == "chat")."""
    if what == "chat":
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
        assert r.model == model
        return r.choices[0].message.content
    r = client.completions.create(model=model, prompt=what, max_tokens=16, temperature=0)
    assert r.model == model
    return r.choices[0].text


@pytest.fixture(scope="module")
def reference(launch, tiny_ckpt, adapters):
    """What single-model servers answer: the base alone, and each adapter merged into it."""
    out = {}
    for name, ckpt in (("tiny", tiny_ckpt), ("a", adapters / "a-merged"), ("b", adapters / "b-merged")):
        with launch(ckpt, served_model_name=name) as server:
            client = client_of(server)
            out[name] = {what: ask(client, name, what) for what in [*PROMPTS, "chat"]}
            out[name]["score"] = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=0, echo=True,
                                                           logprobs=1).choices[0].logprobs.token_logprobs
    return out


@pytest.fixture(scope="module")
def multi(launch, tiny_ckpt, adapters, slow_loader):
    """One server for the base and both adapters; each forward pass sleeps 5 ms, so that concurrent requests
    overlap in the engine for certain."""
    with launch(tiny_ckpt, loader=slow_loader(0.005), served_model_name="tiny",
                adapters=(("a", str(adapters / "a")), ("b", str(adapters / "b")))) as server:
        yield server


def test_concurrent_requests_for_three_models_each_get_their_own(multi, reference, monkeypatch):
    assert reference["a"] != reference["tiny"] != reference["b"] != reference["a"]  # the adapters matter
    selection = multi.service.loop.engine._adapters
    mixed = []
    select = selection.select
    monkeypatch.setattr(selection, "select",
                        lambda a, device=None: (mixed.append(not isinstance(a, int) and len(set(a)) > 1),
                                                select(a, device))[1])
    client = client_of(multi)
    jobs = [(name, what) for what in [*PROMPTS, "chat"] for name in ("tiny", "a", "b")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: ask(client, *job), jobs))
    for (name, what), text in zip(jobs, got):
        assert text == reference[name][what], (name, what)
    assert any(mixed)  # rows of different models were in one batch


def test_scoring_uses_the_adapter(multi, reference):
    for name in ("tiny", "a", "b"):
        got = client_of(multi).completions.create(model=name, prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1)
        assert got.choices[0].logprobs.token_logprobs == pytest.approx(reference[name]["score"], abs=1e-4)


def test_models_lists_base_and_adapters_and_unknown_is_404(multi):
    client = client_of(multi)
    cards = client.models.list().data
    assert [m.id for m in cards] == ["tiny", "a", "b"]
    assert [getattr(m, "parent", None) for m in cards] == [None, "tiny", "tiny"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="c", prompt="x", max_tokens=2)
    assert "'tiny', 'a', 'b'" in str(e.value)
    # Each model tokenizes with its own tokenizer (b's chat template is not ChatML).
    ids = {m: multi.post("/tokenize", {"model": m, "messages": CHAT}).json()["tokens"] for m in ("tiny", "a", "b")}
    assert ids["tiny"] == ids["a"] != ids["b"]


def test_adapter_names_are_parsed_and_checked(adapters, tiny_ckpt):
    assert parse_adapters(["x=runs/a", str(adapters / "b"), "runs/k=v"]) == (
        ("x", "runs/a"), ("b", str(adapters / "b")), ("k=v", "runs/k=v"))
    with pytest.raises(HainaError, match="names no directory"):
        parse_adapters(["x="])
    with pytest.raises(HainaError, match="--adapter .*nope not found"):
        check_adapters(str(tiny_ckpt), (("a", str(adapters / "a")), ("x", str(adapters / "nope"))))
    for pairs, why in [((("tiny", "d"),), "base model's"), ((("x", "d"), ("x", "e")), "another adapter's"),
                       (((" x", "d"),), "padded")]:
        with pytest.raises(HainaError, match=why):
            ServiceConfig(checkpoint=str(tiny_ckpt), served_model_name="tiny", adapters=pairs)


def test_an_adapter_for_another_base_fails_the_load(launch, tiny_ckpt, adapters, tmp_path):
    other = tmp_path / "other"
    torch.manual_seed(3)
    model, tok = load_model(tiny_ckpt)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_model(other, model, tok)  # the same architecture, other weights: found when the model loads
    with launch(other, wait=False, adapters=(("a", str(adapters / "a")),)) as server:
        assert not server.service.wait_ready(60)
        assert server.service.load_error == (f"adapter {adapters / 'a'} was trained on another base model (recorded "
                                             f"base: {tiny_ckpt}); pass that model as --checkpoint")
        assert server.get("/health").status_code == 503


def test_serve_refuses_an_adapter_of_another_architecture_before_binding(tiny_ckpt, tmp_path):
    from haina.model import ModelConfig, Transformer

    small = Transformer(ModelConfig.from_name("tiny", vocab_size=320, block_size=128, n_layer=1))
    make_adapter_dir = tmp_path / "x"
    apply_lora(small, LoRAConfig(r=2))
    save_adapter(make_adapter_dir, small, LoRAConfig(r=2), base_hash="unknown")
    r = subprocess.run([sys.executable, "-m", "haina.cli", "serve", "--checkpoint", str(tiny_ckpt), "--adapter",
                        f"x={make_adapter_dir}", "--port", "1"], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == (f"error: adapter {make_adapter_dir} was trained on another base model "
                                         "(recorded base: unknown); pass that model as --checkpoint")
