"""LoRA adapters: what they train, what they save, merging, loading on the right base only, and the decode path."""

from __future__ import annotations

import json

import pytest
import torch

from haina.core.config import from_dict, to_dict
from haina.core.errors import HainaError
from haina.core.io import write_json
from haina.generate import Engine, SamplingParams
from haina.generate.cache import KVCache
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    base_weights_hash,
    has_lora,
    is_adapter_dir,
    load_adapter,
    load_adapter_state_dict,
    merge_lora,
    read_adapter_config,
    resolve_adapter,
    save_adapter,
)

LAYOUTS = {
    "llama": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2},
    "gpt2": {},
}


def make_model(layout: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, init_std=0.1, **LAYOUTS[layout])
    return Transformer(cfg).eval()


def randomize_adapters(model: Transformer, seed: int = 1) -> None:
    """B is zero at init; give it values so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def ids(T: int = 11) -> torch.Tensor:
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(2))


def adapted(layout: str, cfg: LoRAConfig | None = None) -> Transformer:
    model = make_model(layout)
    apply_lora(model, cfg or LoRAConfig(r=4))
    randomize_adapters(model)
    return model


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------- config
def test_config_targets_from_cli_string_and_round_trip():
    cfg = from_dict(LoRAConfig, {"r": "8", "targets": "q,v", "rslora": "true"})
    assert cfg.targets == ("q", "v") and cfg.r == 8
    assert LoRAConfig(r=8, targets="q, v,q") == LoRAConfig(r=8, targets=("q", "v"))  # Python callers too
    assert from_dict(LoRAConfig, to_dict(cfg)) == cfg
    assert LoRAConfig(r=4, alpha=8).scale == 2.0
    assert LoRAConfig(r=4, alpha=8, rslora=True).scale == 4.0
    assert LoRAConfig().scale == 0.0  # r = 0: LoRA off


@pytest.mark.parametrize("fields", [{"r": -1}, {"alpha": 0}, {"dropout": 1.0}, {"targets": ()},
                                    {"targets": ("q", "query")}])
def test_config_refuses_bad_values_in_one_line(fields):
    with pytest.raises(HainaError) as e:
        LoRAConfig(r=4, **fields) if "r" not in fields else LoRAConfig(**fields)
    assert "lora." in one_line(e)


def test_targets_that_name_no_module_are_one_line_with_the_choices():
    model = make_model("gpt2")
    with pytest.raises(HainaError) as e:
        apply_lora(model, LoRAConfig(r=4, targets=("gate", "up")))
    msg = one_line(e)
    assert msg.startswith("--lora.targets=gate,up names no module of this model; choose from q, k, v")
    assert "gate" not in msg.split("choose from")[1]  # only names that apply to this model are offered
    assert not has_lora(model)
    # A name that does not apply is fine next to one that does.
    assert apply_lora(model, LoRAConfig(r=4, targets=("gate", "q"))) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_targets_map_to_slices_of_the_fused_matrices():
    model = make_model("llama")  # q 32 rows, k and v 16 each (2 kv heads of 8); ffn 128 per half
    apply_lora(model, LoRAConfig(r=2, targets=("k", "up", "o")))
    qkv, fc = model.blocks[0].attn.qkv, model.blocks[0].mlp.fc
    assert {n: (p.start, p.stop) for n, p in qkv.lora.items()} == {"k": (32, 48)}
    assert {n: (p.start, p.stop) for n, p in fc.lora.items()} == {"up": (128, 256)}
    assert list(model.blocks[0].attn.proj.lora) == ["all"]
    assert type(model.blocks[0].mlp.proj) is torch.nn.Linear
    assert "blocks.0.attn.qkv.lora.k.A" in adapter_state_dict(model)
    # `fc` is one adapter over gate and up together.
    model = make_model("llama")
    apply_lora(model, LoRAConfig(r=2, targets="fc,gate"))
    assert {n: (p.start, p.stop) for n, p in model.blocks[1].mlp.fc.lora.items()} == {"all": (0, 256)}


# ---------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fresh_adapters_change_nothing_and_only_adapters_train(layout):
    model = make_model(layout)
    x = ids()
    with torch.no_grad():
        before = model(x)
    names = apply_lora(model, LoRAConfig(r=4))
    assert len(names) == 4 * model.cfg.n_layer
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) and all(".lora." in n for n in trainable)
    assert not model.tok_emb.weight.requires_grad and not model.blocks[0].attn.qkv.weight.requires_grad
    # Base weights keep their state-dict names: a base checkpoint loads into the adapted model.
    assert "blocks.0.attn.qkv.weight" in model.state_dict()
    with pytest.raises(HainaError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(r=4))


def test_dropout_applies_to_the_adapters_in_training_only():
    model = adapted("gpt2", LoRAConfig(r=4, dropout=0.5, targets="fc"))
    layer, x = model.blocks[0].mlp.fc, torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))  # eval: no dropout
        layer.train()
        assert not torch.equal(layer(x), layer(x))


def test_lora_off_is_refused():
    with pytest.raises(HainaError, match="lora.r=0"):
        apply_lora(make_model("gpt2"), LoRAConfig())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_an_out_of_place_reference(layout):
    # LoRALinear adds into slices of its output in place; autograd must see the same function as W x + Σ s·B A x.
    model = adapted(layout, LoRAConfig(r=3, targets=("q", "v", "up", "fc", "down")))
    layer = model.blocks[0].attn.qkv
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    layer(x).pow(2).sum().backward()
    got = [x.grad] + [p.grad for p in layer.lora.parameters()]
    x.grad = None
    for p in layer.lora.parameters():
        p.grad = None
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    pieces = [ref]
    for part in layer.lora.values():
        d = layer.scale * (x @ part.A.t() @ part.B.t())
        pieces.append(torch.nn.functional.pad(d, (part.start, layer.out_features - part.stop)))
    sum(pieces).pow(2).sum().backward()
    want = [x.grad] + [p.grad for p in layer.lora.parameters()]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("targets", ["all", "q,v,gate,down", "qkv,fc,proj"])
def test_merge_equals_unmerged(layout, targets):
    model = adapted(layout, LoRAConfig(r=4, alpha=8, targets=targets, rslora=targets == "all"))
    x = ids()
    with torch.no_grad():
        base = make_model(layout)(x)
        ref = model(x)
        assert (ref - base).abs().max() > 1e-2  # the adapters matter
        merge_lora(model)
        assert not has_lora(model) and not adapter_state_dict(model)
        assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.startswith("blocks.")
                   and isinstance(m, torch.nn.Linear))
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    assert set(model.weights()) == set(make_model(layout).weights())  # a plain checkpoint again


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_path_runs_the_adapters(layout):
    model = adapted(layout)
    assert not any(type(m) in (torch.nn.Linear,) for m in (model.blocks[0].attn.qkv, model.blocks[0].mlp.fc))
    x = ids(9)
    # model.decode through a KV cache equals forward's last position.
    cache = KVCache(model.cfg, 2, 32)
    with torch.inference_mode():
        model.hidden_states(x[:, :8], positions=cache.bind(0, [0, 0], 8), cache=cache)
        cache.commit(0, [8, 8])
        got = model.decode(x[:, 8:9], positions=cache.bind(0, [8, 8], 1), cache=cache)
        torch.testing.assert_close(got, model(x)[:, -1], atol=1e-5, rtol=1e-5)
    # The engine's greedy tokens equal greedy decoding by full forward passes.
    prompts = [[5, 17, 3, 88], [60, 2]]
    engine = Engine(model, max_batch_size=2, eos_token_id=None)
    out = [r[0].token_ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0))]
    want = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            want.append(seq[len(p):])
    assert out == want
    base = Engine(make_model(layout), max_batch_size=2, eos_token_id=None)
    assert out != [r[0].token_ids for r in base.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0))]


# ---------------------------------------------------------------------------------------- state and files
def test_adapter_state_dict_and_strict_loading():
    model = adapted("llama", LoRAConfig(r=2, targets="q,v"))
    sd = adapter_state_dict(model)
    assert sorted(sd) == sorted(f"blocks.{i}.attn.qkv.lora.{s}.{m}" for i in range(2) for s in "qv" for m in "AB")
    other = make_model("llama")
    apply_lora(other, LoRAConfig(r=2, targets="q,v"))
    load_adapter_state_dict(other, sd)
    assert all(torch.equal(adapter_state_dict(other)[k], v) for k, v in sd.items())
    with pytest.raises(HainaError) as e:
        load_adapter_state_dict(other, {k: v for k, v in sd.items() if ".v." not in k})
    assert "missing" in one_line(e)
    with pytest.raises(HainaError) as e:
        load_adapter_state_dict(other, {**sd, "blocks.0.attn.qkv.lora.q.A": torch.zeros(3, 32)})
    assert "(3, 32)" in one_line(e)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load_round_trip_gives_identical_logits(layout, tmp_path):
    base = make_model(layout)
    base_hash = base_weights_hash(base)
    lora = LoRAConfig(r=4, alpha=32, targets="q,k,o,down", rslora=True)
    apply_lora(base, lora)
    randomize_adapters(base)
    save_adapter(tmp_path / "ckpt", base, lora, base_hash=base_hash, base="runs/base")
    assert is_adapter_dir(tmp_path / "ckpt") and not is_adapter_dir(tmp_path)
    data = read_adapter_config(tmp_path / "ckpt")
    assert data["format"] == "haina-lora/1" and data["base"] == "runs/base" and data["targets"] == ["q", "k", "o", "down"]
    assert data["model"] == base.cfg.to_dict() and data["base_hash"] == base_hash
    # The adapter is a small share of the base.
    base_bytes = sum(v.numel() * 4 for v in make_model(layout).weights().values())
    assert (tmp_path / "ckpt" / ADAPTER_WEIGHTS).stat().st_size < base_bytes / 4

    fresh = make_model(layout)
    assert load_adapter(fresh, tmp_path / "ckpt") == lora
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x), base(x))


def test_base_hash_ignores_adapters_and_bf16_rounding():
    model = make_model("gpt2")
    h = base_weights_hash(model)
    bf16 = make_model("gpt2").to(torch.bfloat16)
    assert base_weights_hash(bf16) == h  # the same base, held in bfloat16
    apply_lora(model, LoRAConfig(r=2))
    assert base_weights_hash(model) == h
    assert base_weights_hash(make_model("gpt2", seed=5)) != h


def test_another_base_is_refused_in_one_line(tmp_path):
    model = adapted("gpt2")
    save_adapter(tmp_path / "a", model, LoRAConfig(r=4), base_hash=base_weights_hash(make_model("gpt2")),
                 base="runs/base-a")
    with pytest.raises(HainaError) as e:
        load_adapter(make_model("gpt2", seed=7), tmp_path / "a")
    assert one_line(e) == (f"adapter {tmp_path / 'a'} was trained on another base model (recorded base: runs/base-a); "
                           "pass that model as --checkpoint")
    with pytest.raises(HainaError, match="another base"):  # another architecture altogether
        load_adapter(make_model("llama"), tmp_path / "a")
    other = make_model("gpt2", seed=7)
    load_adapter(other, tmp_path / "a", check_base=False)  # on request, it loads anyway
    assert has_lora(other)


def test_damaged_or_missing_adapter_files_are_one_line(tmp_path):
    with pytest.raises(HainaError) as e:
        read_adapter_config(tmp_path)
    assert ADAPTER_CONFIG in one_line(e)
    model = adapted("gpt2")
    save_adapter(tmp_path / "a", model, LoRAConfig(r=4), base_hash=base_weights_hash(make_model("gpt2")))
    cfg_file = tmp_path / "a" / ADAPTER_CONFIG
    good = json.loads(cfg_file.read_text())
    cfg_file.write_text('{"format": "haina-lora/1", "r": ')
    with pytest.raises(HainaError) as e:
        read_adapter_config(tmp_path / "a")
    assert "not valid JSON" in one_line(e)
    write_json(cfg_file, {**good, "targets": ["nope"]})
    with pytest.raises(HainaError) as e:
        read_adapter_config(tmp_path / "a")
    assert "unknown target 'nope'" in one_line(e)
    write_json(cfg_file, good)
    (tmp_path / "a" / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 5)
    with pytest.raises(HainaError) as e:
        load_adapter(make_model("gpt2"), tmp_path / "a")
    assert "truncated or not a safetensors file" in one_line(e)


def test_resolve_adapter_from_a_run_directory(tmp_path):
    model = adapted("gpt2")
    run = tmp_path / "run"
    save_adapter(run / "checkpoints" / "step-0000010", model, LoRAConfig(r=4), base_hash="x")
    save_adapter(run / "checkpoints" / "step-0000020", model, LoRAConfig(r=4), base_hash="x")
    write_json(run / "checkpoints" / "index.json", {"latest": "step-0000020", "best": "step-0000010"})
    assert resolve_adapter(run) == run / "checkpoints" / "step-0000010"
    assert resolve_adapter(run, "latest") == run / "checkpoints" / "step-0000020"
    assert resolve_adapter(run / "checkpoints" / "step-0000020") == run / "checkpoints" / "step-0000020"
    save_model(tmp_path / "full", make_model("gpt2"))
    with pytest.raises(HainaError) as e:
        resolve_adapter(tmp_path / "full")
    assert "full checkpoint without a LoRA adapter" in one_line(e)
    with pytest.raises(HainaError) as e:
        resolve_adapter(tmp_path / "nowhere")
    assert "not found" in one_line(e)


def test_lora_linear_is_a_linear_sharing_the_base_parameters():
    model = make_model("gpt2")
    weight = model.blocks[0].mlp.fc.weight
    apply_lora(model, LoRAConfig(r=2, targets="fc"))
    layer = model.blocks[0].mlp.fc
    assert isinstance(layer, LoRALinear) and isinstance(layer, torch.nn.Linear)
    assert layer.weight is weight and layer.lora["all"].A.shape == (2, 32) and layer.lora["all"].B.shape == (128, 2)
