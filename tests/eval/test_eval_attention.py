"""`haina eval attention`: maps that are probabilities, causal, and the model's own attention written out."""

import json

import numpy as np
import pytest
import torch

from haina.cli import main
from haina.core.errors import HainaError
from haina.eval import attention as attention_mod
from haina.eval.attention import attention_maps, explicit_attention, row_entropy
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.lora import LoRAConfig, apply_lora
from haina.tokenizer.train import train_bpe

CORPUS = ["the cat sat on the mat and the dog ran to the park. " * 10,
          "To be, or not to be, that is the question. " * 10]
PROMPT = "the cat sat on the mat"
# Two architectures, both tiny: GPT-2 (learned positions, LayerNorm, GELU, bias) and Llama (rope, RMSNorm,
# SwiGLU, no bias) with grouped key/value heads. A large init makes attention far from uniform, so a wrong
# map would not pass for a right one.
ARCHS = {
    "gpt2": {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
    "llama": {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2},
}


def _config(arch: str) -> ModelConfig:
    return ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=4, n_embd=32, init_std=0.3, **ARCHS[arch])


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("attn")
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        save_model(root / arch, Transformer(_config(arch)), tok)
        out[arch] = root / arch
    return out


def _run(*args) -> int:
    return main(["eval", "attention", *map(str, args), "--device", "cpu"])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_explicit_path_equals_fast_path(arch):
    torch.manual_seed(1)
    model = Transformer(_config(arch)).eval()
    idx = torch.randint(0, 320, (1, 20))
    found = attention_maps(model, idx, [0, 1])
    assert found.max_abs_diff < 1e-4 and found.scale > 0.1  # a real output, matched
    for probs in found.weights.values():
        assert probs.shape == (4, 20, 20)
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, 20))
        assert probs.triu(1).abs().max() == 0  # causal: no query sees a later key
        # Neither one-hot nor uniform: the check compared maps with something to get wrong.
        assert 0.1 < row_entropy(probs)[:, -1].mean() < np.log(20) - 0.1


def test_gqa_heads_share_keys_and_values_as_the_module_does():
    torch.manual_seed(2)
    model = Transformer(_config("llama")).eval()
    attn = model.blocks[0].attn
    assert (attn.n_head, attn.n_kv) == (4, 2)
    x = torch.randn(1, 6, 32)
    rope = model._embed(torch.zeros(1, 6, dtype=torch.long), torch.arange(6)[None])[1]
    _, out = explicit_attention(attn, x, rope, None)
    torch.testing.assert_close(out, attn(x, rope), rtol=1e-4, atol=1e-5)


def test_adapted_projections_are_followed():
    torch.manual_seed(3)
    model = Transformer(_config("llama"))
    apply_lora(model, LoRAConfig(r=2, targets=("all",)))
    for name, p in model.named_parameters():
        if ".lora." in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: give the adapters something to add
    found = attention_maps(model.eval(), torch.randint(0, 320, (1, 12)), [0, 1])
    assert found.max_abs_diff < 1e-4


def test_a_path_that_drifts_from_the_model_is_refused(monkeypatch):
    torch.manual_seed(4)
    model = Transformer(_config("llama")).eval()
    monkeypatch.setattr(attention_mod, "apply_rope", lambda x, cos, sin: x)  # forget the rotary embedding
    with pytest.raises(HainaError, match="differs from the model's own output"):
        attention_maps(model, torch.randint(0, 320, (1, 12)), [0])
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone after the failure


def test_cli_writes_maps_grid_and_report(ckpts, tmp_path, tok):
    out = tmp_path / "attn"
    assert _run("--checkpoint", ckpts["gpt2"], "--prompt", PROMPT, "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    T = len(tok.encode(PROMPT))
    assert report["kind"] == "attention" and report["tokens"] == T
    assert (report["layers"], report["heads"]) == (2, 4)
    assert report["max_abs_diff_vs_fast_path"] < 1e-4
    assert {"entropy_layer_0", "entropy_layer_1"} <= set(report)
    assert (out / "attention.png").stat().st_size > 1000
    with np.load(out / "attention.npz", allow_pickle=False) as npz:
        assert "".join(npz["tokens"].tolist()) == PROMPT
        assert npz["token_ids"].tolist() == tok.encode(PROMPT)
        for layer in (0, 1):
            a = npz[f"layer_{layer}"]
            assert a.shape == (4, T, T)
            np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
            assert np.abs(np.triu(a, 1)).max() == 0
            ent = -(a * np.log(np.where(a > 0, a, 1))).sum(-1).mean()
            assert report[f"entropy_layer_{layer}"] == pytest.approx(ent, rel=1e-4)
    assert "## Entropy of attention" in (out / "report.md").read_text()


def test_cli_selects_layers_and_heads_on_a_gqa_model(ckpts, tmp_path, tok):
    out = tmp_path / "sel"
    assert _run("--checkpoint", ckpts["llama"], "--prompt", PROMPT, "--out", out, "--layers", 1,
                "--heads", 2, 0) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["layers"], report["heads"]) == (1, 2)
    assert "entropy_layer_1" in report and "entropy_layer_0" not in report
    assert report["details"]["heads"] == [0, 2]
    assert report["details"]["architecture"]["n_kv_head"] == 2
    with np.load(out / "attention.npz") as npz:
        assert sorted(k for k in npz.files if k.startswith("layer_")) == ["layer_1"]
        assert npz["layer_1"].shape == (2, len(tok.encode(PROMPT)), len(tok.encode(PROMPT)))
        assert npz["heads"].tolist() == [0, 2]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "the cat sat on the mat. " * 20], "context is 32"),
    (["--prompt", PROMPT, "--layers", 2], "--layers 2 is out of range"),
    (["--prompt", PROMPT, "--heads", 4], "--heads 4 is out of range"),
    (["--prompt", PROMPT, "--heads", -1], "out of range"),
    (["--prompt", ""], "--prompt is empty"),
])
def test_bad_input_is_one_line_and_writes_nothing(ckpts, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert _run("--checkpoint", ckpts["gpt2"], "--out", out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()
