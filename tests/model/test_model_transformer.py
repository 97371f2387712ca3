import dataclasses

import pytest
import torch

from haina.core.errors import HainaError
from haina.model import PRESETS, ModelConfig, Transformer
from haina.model.checkpoint import load_model, save_model
from haina.model.layers import apply_rope, rope_cos_sin
from haina.model.params import count_params

VARIANTS = {
    "gpt2": {},
    "llama-gqa": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2,
                  "tie_embeddings": False},
    "mqa-sinusoidal-relu": {"pos": "sinusoidal", "mlp": "relu", "n_kv_head": 1, "init": "xavier"},
    "kaiming-nobias": {"init": "kaiming", "bias": False, "dropout": 0.1},
}


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_name("tiny", vocab_size=97, block_size=32, n_layer=2, n_embd=32, **kw)


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_causality(name):
    torch.manual_seed(0)
    model = Transformer(tiny(**VARIANTS[name])).eval()
    x = torch.randint(0, 97, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 97)
    # Changing a future token must not change any earlier position's logits.
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 97
    logits2 = model(x2)
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])


def test_rope_matches_complex_reference():
    # Reference: rotate pairs (i, i + hs/2) as complex numbers by angle pos * theta^(-2i/hs).
    hs, T = 8, 5
    x = torch.randn(1, 2, T, hs)
    pos = torch.arange(T)[None]
    cos, sin = rope_cos_sin(pos, hs, 10000.0)
    out = apply_rope(x, cos, sin)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, hs, 2).float() / hs)
    angles = torch.arange(T)[:, None].float() * freqs
    z = torch.complex(x[..., : hs // 2], x[..., hs // 2:]) * torch.polar(torch.ones_like(angles), angles)
    ref = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(out, ref)


def test_rope_is_relative():
    # q·k after RoPE depends only on the distance between positions.
    hs = 16
    q, k = torch.randn(1, 1, 1, hs), torch.randn(1, 1, 1, hs)
    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), hs, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), hs, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(score(3, 1), score(10, 8))


def test_gqa_equals_mha_with_repeated_heads():
    torch.manual_seed(0)
    cfg = tiny(n_kv_head=2)
    gqa = Transformer(cfg).eval()
    mha = Transformer(dataclasses.replace(cfg, n_kv_head=None)).eval()
    sd = gqa.state_dict()
    hs, nh, nkv = cfg.head_dim, cfg.n_head, 2
    for i in range(cfg.n_layer):
        w = sd[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([nh * hs, nkv * hs, nkv * hs])
        rep = lambda t: t.view(nkv, hs, -1).repeat_interleave(nh // nkv, 0).reshape(nh * hs, -1)
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
        b = sd[f"blocks.{i}.attn.qkv.bias"]
        qb, kb, vb = b.split([nh * hs, nkv * hs, nkv * hs])
        repb = lambda t: t.view(nkv, hs).repeat_interleave(nh // nkv, 0).reshape(-1)
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([qb, repb(kb), repb(vb)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(gqa(x), mha(x))


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    model = Transformer(tiny())
    x = torch.randint(0, 97, (2, 16))
    model(x).sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x).sum().backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_presets_have_their_sizes():
    sizes = {name: count_params(cfg)["total"] for name, cfg in PRESETS.items()}
    assert 0.8e6 < sizes["tiny"] < 2e6
    assert 8e6 < sizes["small"] < 13e6
    assert 120e6 < sizes["gpt2-124m"] < 130e6
    assert 1.1e9 < sizes["llama-1b"] < 1.4e9
    assert 6.5e9 < sizes["llama-7b"] < 7e9
    assert 68e9 < sizes["llama-70b"] < 70e9


def test_init_normal_scales_residual_projections():
    model = Transformer(ModelConfig.from_name("tiny", n_layer=8))
    assert model.blocks[0].attn.proj.weight.std() < 0.6 * model.blocks[0].attn.qkv.weight.std()


def test_bad_configs():
    with pytest.raises(HainaError, match="divisible"):
        tiny(n_kv_head=3)
    with pytest.raises(HainaError, match="unknown model preset"):
        ModelConfig.from_name("gpt5")
    with pytest.raises(HainaError, match="must be positive"):  # not a ZeroDivisionError traceback
        tiny(n_head=0)
    with pytest.raises(HainaError, match="must be positive"):
        ModelConfig(n_embd=0)
    with pytest.raises(HainaError, match="n_kv_head must be positive"):
        tiny(n_kv_head=0)
    with pytest.raises(HainaError, match="unknown config key 'model.n_layers'"):
        ModelConfig.from_dict({"preset": "tiny", "n_layers": 3})
    with pytest.raises(HainaError, match="exceeds the model's context"):
        Transformer(tiny())(torch.zeros(1, 33, dtype=torch.long))


def test_checkpoint_round_trip_and_architecture_mismatch(tmp_path):
    model = Transformer(tiny(**VARIANTS["llama-gqa"]))
    save_model(tmp_path / "ck", model)
    loaded, tok = load_model(tmp_path / "ck")
    assert tok is None
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    other = Transformer(tiny())
    with pytest.raises(HainaError, match="do not match this model's architecture"):
        other.load_weights(loaded.weights())
    with pytest.raises(HainaError, match="checkpoint not found"):
        load_model(tmp_path / "missing")


def test_select_computes_logits_only_where_asked():
    import torch

    from haina.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 64, (3, 10))
    keep = torch.rand(3, 10) > 0.5
    torch.testing.assert_close(model(x, select=keep), model(x)[keep])


def test_select_gives_the_same_gradients_as_slicing_full_logits():
    """The last block skips unselected positions: the loss and every gradient must not change."""
    import torch

    from haina.model import ModelConfig, Transformer
    from haina.model.transformer import lm_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, pos="rope",
                                    norm="rmsnorm", mlp="swiglu", bias=False))
    x, y = torch.randint(0, 64, (3, 12)), torch.randint(0, 64, (3, 12))
    keep = torch.rand(3, 12) > 0.6
    grads = []
    for select in (False, True):
        model.zero_grad()
        logits = model(x, select=keep) if select else model(x)[keep]
        lm_loss(logits, y[keep]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
